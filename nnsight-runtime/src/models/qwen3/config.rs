//! Qwen3 `config.json`: Qwen2's fields with an explicit `head_dim` and `attention_bias`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::causal::TokenIds;
use crate::models::llama::LlamaConfig;
use crate::models::qwen2::layer_windows;
use crate::models::validate as v;

/// Qwen3 hyper-parameters from a Hugging Face `config.json` (its field names; missing fields
/// take transformers' `Qwen3Config` defaults, among them `head_dim` 128 whatever the hidden
/// width). Sizes, norms, activation and rotary settings mean what they mean for Llama
/// ([`Qwen3Config::llama`]); the sliding-window settings what they mean for Qwen2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Qwen3Config {
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
    /// Key/value heads (`None`: as many as query heads; transformers' default is 32).
    pub num_key_value_heads: Option<i64>,
    /// Width of a head (explicit: default 128, not `hidden_size / num_attention_heads`).
    pub head_dim: i64,
    /// MLP activation (`"silu"`).
    pub hidden_act: String,
    /// Longest sequence accepted (cached + new positions).
    pub max_position_embeddings: i64,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 spelling).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4 spelling).
    pub rope_scaling: Option<serde_json::Value>,
    /// RoPE type, base and scaling (transformers 5 spelling).
    pub rope_parameters: Option<serde_json::Value>,
    /// Biases on q, k, v and o (false in every released checkpoint).
    pub attention_bias: bool,
    /// `lm_head` shares `embed_tokens`' weight (true for the small checkpoints).
    pub tie_word_embeddings: bool,
    /// Sliding-window attention on layers `max_window_layers..` (or those `layer_types` marks
    /// `"sliding_attention"`); false in every released checkpoint.
    pub use_sliding_window: bool,
    /// Window of the sliding layers (only used when `use_sliding_window`).
    pub sliding_window: Option<i64>,
    /// Layers below this index keep full attention when `use_sliding_window`.
    pub max_window_layers: i64,
    /// Attention kind of each layer (transformers 5 writes it: `"full_attention"` each).
    pub layer_types: Option<Vec<String>>,
    /// Beginning-of-sequence id(s).
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"qwen3"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["Qwen3ForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for Qwen3Config {
    fn default() -> Self {
        Qwen3Config {
            vocab_size: 151936,
            hidden_size: 4096,
            intermediate_size: 22016,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(32),
            head_dim: 128,
            hidden_act: "silu".into(),
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: false,
            tie_word_embeddings: false,
            use_sliding_window: false,
            sliding_window: Some(4096),
            max_window_layers: 28,
            layer_types: None,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            model_type: Some("qwen3".into()),
            architectures: None,
        }
    }
}

impl Qwen3Config {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] naming
    /// the file if it is not a Qwen3 config (`model_type` other than `"qwen3"`) or fails
    /// [`Qwen3Config::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "Qwen3", &["qwen3"], "Qwen3For")?;
        let c: Qwen3Config = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// [`LlamaConfig::validate`] of [`Qwen3Config::llama`] (sizes, heads, norms, activation,
    /// rotary settings) and the sliding-window settings ([`Qwen3Config::layer_windows`]). The
    /// message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.llama().validate()?;
        self.layer_windows().map(drop)
    }

    /// Each layer's sliding window (`None`: full causal attention), as for Qwen2
    /// ([`crate::models::qwen2::Qwen2Config::layer_windows`]): with `use_sliding_window`, the
    /// layers `layer_types` marks `"sliding_attention"` (without `layer_types`, layers
    /// `max_window_layers..`) attend to the last `sliding_window` positions only. Errors name
    /// the field.
    pub fn layer_windows(&self) -> std::result::Result<Vec<Option<i64>>, String> {
        let (layers, window) = (self.num_hidden_layers, self.sliding_window);
        layer_windows(layers, self.use_sliding_window, window, self.max_window_layers, &self.layer_types)
    }

    /// The Llama config with the same sizes, norms, activation, attention biases and rotary
    /// settings (no MLP bias).
    pub fn llama(&self) -> LlamaConfig {
        LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: Some(self.head_dim),
            hidden_act: self.hidden_act.clone(),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            rope_parameters: self.rope_parameters.clone(),
            attention_bias: self.attention_bias,
            mlp_bias: false,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id.clone(),
            eos_token_id: self.eos_token_id.clone(),
            pad_token_id: self.pad_token_id,
            model_type: Some("llama".into()),
            architectures: None,
        }
    }
}
