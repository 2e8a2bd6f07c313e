//! Gemma 3 text `config.json` (`model_type` `"gemma3_text"`): Gemma 2's fields, a layer pattern
//! of five local layers per global one by default, and a rotary setting per layer kind.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::act::HiddenAct;
use crate::models::causal::TokenIds;
use crate::models::gemma2::{validate_common, Common, LayerType, Rope};
use crate::models::llama::LlamaConfig;
use crate::models::validate as v;

/// Gemma 3 text hyper-parameters from a Hugging Face `config.json` (its field names; missing
/// fields take transformers' `Gemma3TextConfig` defaults, i.e. gemma-3-4b's text part).
///
/// Rotary settings, both spellings (see [`Gemma3TextConfig::rope`]): transformers 5 writes
/// `rope_parameters: {"full_attention": {...}, "sliding_attention": {...}}`; transformers 4
/// wrote `rope_theta` and `rope_scaling` (global layers) and `rope_local_base_freq` (local ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gemma3TextConfig {
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
    /// Width of a head (256 by default).
    pub head_dim: i64,
    /// MLP gate activation (`"gelu_pytorch_tanh"`).
    pub hidden_activation: Option<String>,
    /// Older spelling of `hidden_activation`, read when that is absent.
    pub hidden_act: Option<String>,
    /// Longest sequence accepted (cached + new positions).
    pub max_position_embeddings: i64,
    /// Epsilon of every RMSNorm (q_norm and k_norm too).
    pub rms_norm_eps: f64,
    /// Global layers' RoPE base (transformers 4 spelling; default 1000000).
    pub rope_theta: Option<f64>,
    /// Global layers' RoPE scaling (transformers 4 spelling), e.g. `{"rope_type": "linear", "factor": 8.0}`.
    pub rope_scaling: Option<serde_json::Value>,
    /// Local layers' RoPE base (transformers 4 spelling; default 10000).
    pub rope_local_base_freq: Option<f64>,
    /// RoPE settings per layer kind (transformers 5 spelling).
    pub rope_parameters: Option<serde_json::Value>,
    /// Biases on q, k, v, o projections.
    pub attention_bias: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar ** -0.5`.
    pub query_pre_attn_scalar: f64,
    /// Keys a local layer's query sees: the last `sliding_window` positions, itself included.
    pub sliding_window: Option<i64>,
    /// `"sliding_attention"` or `"full_attention"` per layer (absent: layer `i` is full when
    /// `(i + 1) % sliding_window_pattern == 0`).
    pub layer_types: Option<Vec<String>>,
    /// Every `sliding_window_pattern`-th layer is global when `layer_types` is absent (default 6).
    pub sliding_window_pattern: Option<i64>,
    /// `tanh(logits / cap) * cap` after `lm_head` (`None`, Gemma 3's value: no cap).
    pub final_logit_softcapping: Option<f64>,
    /// Read but not used: transformers' `Gemma3Attention` applies no soft-cap to the scores.
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
    /// Must be `"gemma3_text"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["Gemma3ForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for Gemma3TextConfig {
    /// transformers 5.24's `Gemma3TextConfig` defaults.
    fn default() -> Self {
        Gemma3TextConfig {
            vocab_size: 262_208,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 256,
            hidden_activation: None,
            hidden_act: None,
            max_position_embeddings: 131_072,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_local_base_freq: None,
            rope_parameters: None,
            attention_bias: false,
            query_pre_attn_scalar: 256.0,
            sliding_window: Some(4096),
            layer_types: None,
            sliding_window_pattern: None,
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
            use_bidirectional_attention: None,
            tie_word_embeddings: true,
            bos_token_id: Some(TokenIds::One(2)),
            eos_token_id: Some(TokenIds::One(1)),
            pad_token_id: Some(0),
            model_type: Some("gemma3_text".into()),
            architectures: None,
        }
    }
}

/// transformers' `Gemma3TextConfig.default_theta`: global and local RoPE bases.
const DEFAULT_THETA: (f64, f64) = (1_000_000.0, 10_000.0);

impl Gemma3TextConfig {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] naming
    /// the file if it is not a Gemma 3 text config (`model_type` other than `"gemma3_text"`; the
    /// multimodal `"gemma3"` config nests this one as `text_config`) or fails
    /// [`Gemma3TextConfig::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "Gemma 3 text", &["gemma3_text"], "Gemma3ForCausalLM")?;
        let c: Gemma3TextConfig = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// Gemma 2's checks (positive sizes, heads divisible by key/value heads, an even head width,
    /// positive finite `rms_norm_eps` and `query_pre_attn_scalar`, well-formed `layer_types`
    /// with a positive `sliding_window`, token ids in the vocabulary), a positive finite final
    /// soft-cap when set, a known activation and supported rotary settings for both kinds.
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
        if let Some(c) = self.final_logit_softcapping {
            v::positive_finite("final_logit_softcapping", c)?;
        }
        HiddenAct::parse(self.activation()).map_err(|m| m.replace("`hidden_act`", self.activation_field()))?;
        self.rope(LayerType::Full)?;
        self.rope(LayerType::Sliding)?;
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

    /// Each layer's kind: `layer_types`, or (absent) full for every `sliding_window_pattern`-th
    /// layer (default 6: five local layers, then a global one), sliding otherwise.
    pub fn layer_types(&self) -> std::result::Result<Vec<LayerType>, String> {
        LayerType::parse_all(self.layer_types.as_deref(), self.num_hidden_layers, self.sliding_window_pattern.unwrap_or(6))
    }

    /// The rotary settings of a layer kind, as transformers' `convert_rope_params_to_dict`
    /// reads them: `rope_parameters.full_attention` / `.sliding_attention` (transformers 5; each
    /// read as [`LlamaConfig::rope`] reads a `rope_parameters`, base defaulting to 1000000 /
    /// 10000), else (transformers 4) `rope_theta` with `rope_scaling` for full layers and
    /// `rope_local_base_freq` for sliding ones. Errors name the field.
    pub fn rope(&self, kind: LayerType) -> std::result::Result<Rope, String> {
        let (key, default_theta) = match kind {
            LayerType::Full => ("full_attention", DEFAULT_THETA.0),
            LayerType::Sliding => ("sliding_attention", DEFAULT_THETA.1),
        };
        // (the Llama-style settings, how to name their fields in a message)
        let (llama, name): (LlamaConfig, fn(String, &str) -> String) = match &self.rope_parameters {
            Some(serde_json::Value::Object(per_kind)) => {
                if !per_kind.contains_key("full_attention") && !per_kind.contains_key("sliding_attention") {
                    return Err("`rope_parameters` must hold `full_attention` and/or `sliding_attention` settings".into());
                }
                let params = per_kind.get(key).filter(|p| !p.is_null()).cloned();
                let llama = LlamaConfig { rope_theta: Some(default_theta), rope_parameters: params, ..LlamaConfig::default() };
                (llama, |m, key| {
                    let m = m.replace("`rope_parameters", &format!("`rope_parameters.{key}"));
                    m.replace("`rope_theta`", &format!("`rope_parameters.{key}.rope_theta`"))
                })
            }
            Some(serde_json::Value::Null) | None => match kind {
                LayerType::Full => {
                    let llama = LlamaConfig {
                        rope_theta: Some(self.rope_theta.unwrap_or(default_theta)),
                        rope_scaling: self.rope_scaling.clone(),
                        ..LlamaConfig::default()
                    };
                    (llama, |m, _| m)
                }
                LayerType::Sliding => {
                    let theta = Some(self.rope_local_base_freq.unwrap_or(default_theta));
                    (LlamaConfig { rope_theta: theta, ..LlamaConfig::default() }, |m, _| {
                        m.replace("`rope_theta`", "`rope_local_base_freq`")
                    })
                }
            },
            Some(other) => return Err(format!("`rope_parameters` must be an object, found {other}")),
        };
        llama.rope().map_err(|m| name(m, key))
    }
}
