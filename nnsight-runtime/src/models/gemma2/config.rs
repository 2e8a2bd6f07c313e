//! Gemma 2 `config.json`: Llama's fields plus the soft-caps, the attention scaling and the
//! sliding-window layer pattern.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{LayerType, Rope};
use crate::error::Result;
use crate::models::act::HiddenAct;
use crate::models::causal::TokenIds;
use crate::models::llama::LlamaConfig;
use crate::models::validate as v;

/// Gemma 2 hyper-parameters from a Hugging Face `config.json` (its field names; missing fields
/// take transformers' `Gemma2Config` defaults, i.e. gemma-2-2b's). The rotary base is read in
/// both spellings, `rope_theta` (transformers 4) and `rope_parameters` (5), as for Llama.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gemma2Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads; must divide `num_attention_heads`.
    pub num_key_value_heads: i64,
    /// Width of a head (Gemma sets it explicitly; 256 by default).
    pub head_dim: i64,
    /// MLP gate activation (`"gelu_pytorch_tanh"`).
    pub hidden_activation: Option<String>,
    /// Older spelling of `hidden_activation`, read when that is absent.
    pub hidden_act: Option<String>,
    /// Longest sequence accepted (cached + new positions).
    pub max_position_embeddings: i64,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 spelling; default 10000).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4 spelling).
    pub rope_scaling: Option<serde_json::Value>,
    /// RoPE type and base (transformers 5 spelling), e.g. `{"rope_type": "default", "rope_theta": 10000.0}`.
    pub rope_parameters: Option<serde_json::Value>,
    /// Biases on q, k, v, o projections.
    pub attention_bias: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar ** -0.5` (not `head_dim ** -0.5`).
    pub query_pre_attn_scalar: f64,
    /// Keys a sliding-window layer's query sees: the last `sliding_window` positions, itself
    /// included.
    pub sliding_window: Option<i64>,
    /// `"sliding_attention"` or `"full_attention"` per layer (absent: sliding first, then
    /// alternating, as transformers' `Gemma2Config` fills it).
    pub layer_types: Option<Vec<String>>,
    /// `tanh(logits / cap) * cap` after `lm_head` (`None`: no cap).
    pub final_logit_softcapping: Option<f64>,
    /// `tanh(scores / cap) * cap` on the attention scores before the mask (`None`: no cap).
    pub attn_logit_softcapping: Option<f64>,
    /// Non-causal attention (embedding models); not supported, must be absent or false.
    pub use_bidirectional_attention: Option<bool>,
    /// `lm_head` shares `embed_tokens`' weight (Gemma: true).
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id(s).
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"gemma2"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["Gemma2ForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for Gemma2Config {
    /// transformers 5.24's `Gemma2Config` defaults.
    fn default() -> Self {
        Gemma2Config {
            vocab_size: 256000,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 256,
            hidden_activation: None,
            hidden_act: None,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: false,
            query_pre_attn_scalar: 256.0,
            sliding_window: Some(4096),
            layer_types: None,
            final_logit_softcapping: Some(30.0),
            attn_logit_softcapping: Some(50.0),
            use_bidirectional_attention: None,
            tie_word_embeddings: true,
            bos_token_id: Some(TokenIds::One(2)),
            eos_token_id: Some(TokenIds::One(1)),
            pad_token_id: Some(0),
            model_type: Some("gemma2".into()),
            architectures: None,
        }
    }
}

impl Gemma2Config {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] naming
    /// the file if it is not a Gemma 2 config (`model_type` other than `"gemma2"`) or fails
    /// [`Gemma2Config::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "Gemma 2", &["gemma2"], "Gemma2")?;
        let c: Gemma2Config = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// Positive sizes, heads divisible by key/value heads, an even head width, positive finite
    /// `rms_norm_eps`, `query_pre_attn_scalar` and soft-caps, a known activation, well-formed
    /// `layer_types` with a positive `sliding_window` when a layer slides, token ids inside the
    /// vocabulary and a supported rotary setting. The message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        validate_common(&Common {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            query_pre_attn_scalar: self.query_pre_attn_scalar,
            sliding_window: self.sliding_window,
            layer_types: self.layer_types()?,
            use_bidirectional_attention: self.use_bidirectional_attention,
            token_ids: [("bos_token_id", &self.bos_token_id), ("eos_token_id", &self.eos_token_id)],
            pad_token_id: self.pad_token_id,
        })?;
        for (field, cap) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(c) = cap {
                v::positive_finite(field, c)?;
            }
        }
        HiddenAct::parse(self.activation()).map_err(|m| m.replace("`hidden_act`", self.activation_field()))?;
        self.rope()?;
        Ok(())
    }

    /// The config key the activation came from, for messages.
    fn activation_field(&self) -> &'static str {
        if self.hidden_activation.is_some() { "`hidden_activation`" } else { "`hidden_act`" }
    }

    /// The MLP activation: `hidden_activation`, else `hidden_act`, else `"gelu_pytorch_tanh"`.
    pub fn activation(&self) -> &str {
        self.hidden_activation.as_deref().or(self.hidden_act.as_deref()).unwrap_or("gelu_pytorch_tanh")
    }

    /// Each layer's kind: `layer_types`, or (absent) sliding for even layers and full for odd
    /// ones (transformers' `"sliding_attention" if bool((i + 1) % 2) else "full_attention"`).
    /// An error names `layer_types` for a wrong length or an unknown kind.
    pub fn layer_types(&self) -> std::result::Result<Vec<LayerType>, String> {
        LayerType::parse_all(self.layer_types.as_deref(), self.num_hidden_layers, 2)
    }

    /// The rotary settings, read as [`LlamaConfig::rope`] reads them (`rope_parameters`, else
    /// `rope_theta` with `rope_scaling`; default base 10000).
    pub fn rope(&self) -> std::result::Result<Rope, String> {
        LlamaConfig {
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            rope_parameters: self.rope_parameters.clone(),
            ..LlamaConfig::default()
        }
        .rope()
    }
}

/// The fields Gemma 2 and Gemma 3 check alike (see [`validate_common`]).
pub(crate) struct Common<'a> {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<i64>,
    pub layer_types: Vec<LayerType>,
    pub use_bidirectional_attention: Option<bool>,
    pub token_ids: [(&'static str, &'a Option<TokenIds>); 2],
    pub pad_token_id: Option<i64>,
}

/// The checks Gemma 2 and Gemma 3 share; the message names the field.
pub(crate) fn validate_common(c: &Common) -> std::result::Result<(), String> {
    v::positive(&[
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_attention_heads", c.num_attention_heads),
        ("num_key_value_heads", c.num_key_value_heads),
        ("max_position_embeddings", c.max_position_embeddings),
    ])?;
    v::non_negative("num_hidden_layers", c.num_hidden_layers)?;
    v::multiple_of(("num_attention_heads", c.num_attention_heads), ("num_key_value_heads", c.num_key_value_heads))?;
    if c.head_dim <= 0 || c.head_dim % 2 != 0 {
        return Err(format!("`head_dim` must be positive and even, found {}", c.head_dim));
    }
    v::product(&[("num_attention_heads", c.num_attention_heads), ("head_dim", c.head_dim)])?;
    v::positive_finite("rms_norm_eps", c.rms_norm_eps)?;
    v::positive_finite("query_pre_attn_scalar", c.query_pre_attn_scalar)?;
    if c.layer_types.contains(&LayerType::Sliding) {
        match c.sliding_window {
            Some(w) => v::positive(&[("sliding_window", w)])?,
            None => return Err("`sliding_window` must be set when `layer_types` has \"sliding_attention\"".into()),
        }
    }
    if c.use_bidirectional_attention == Some(true) {
        return Err("`use_bidirectional_attention` true is not supported (only causal attention)".into());
    }
    for (field, ids) in c.token_ids {
        v::token_ids_in_vocab(field, &ids.as_ref().map(TokenIds::to_vec).unwrap_or_default(), c.vocab_size)?;
    }
    v::token_ids_in_vocab("pad_token_id", c.pad_token_id.as_slice(), c.vocab_size)?;
    Ok(())
}
