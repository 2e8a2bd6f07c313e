//! Mistral `config.json`: Llama's fields (read through [`MistralConfig::llama`]) plus
//! `sliding_window`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::causal::TokenIds;
use crate::models::llama::LlamaConfig;
use crate::models::validate as v;

/// Mistral hyper-parameters from a Hugging Face `config.json` (its field names; missing fields
/// take transformers' `MistralConfig` defaults, i.e. Mistral-7B's). Sizes, norms, activation
/// and rotary settings mean what they mean for Llama ([`MistralConfig::llama`]); no projection
/// has a bias.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MistralConfig {
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
    /// Key/value heads (`None`: as many as query heads; transformers' default is 8).
    pub num_key_value_heads: Option<i64>,
    /// Width of a head (`None`: `hidden_size / num_attention_heads`).
    pub head_dim: Option<i64>,
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
    /// `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Every layer attends to the last `sliding_window` positions only, its own included
    /// (`null`: full causal attention; missing: transformers' default 4096). Must be >= 1.
    pub sliding_window: Option<i64>,
    /// Beginning-of-sequence id(s).
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"mistral"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["MistralForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for MistralConfig {
    fn default() -> Self {
        MistralConfig {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 4096 * 32,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            sliding_window: Some(4096),
            bos_token_id: Some(TokenIds::One(1)),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
            model_type: Some("mistral".into()),
            architectures: None,
        }
    }
}

impl MistralConfig {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] naming
    /// the file if it is not a Mistral config (`model_type` other than `"mistral"`) or fails
    /// [`MistralConfig::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "Mistral", &["mistral"], "MistralFor")?;
        let c: MistralConfig = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// [`LlamaConfig::validate`] of [`MistralConfig::llama`] (sizes, heads, norms, activation,
    /// rotary settings) and a `sliding_window`, when set, of at least 1. The message names the
    /// field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.llama().validate()?;
        if let Some(w) = self.sliding_window {
            v::positive(&[("sliding_window", w)])?;
        }
        Ok(())
    }

    /// The Llama config with the same sizes, norms, activation and rotary settings (no biases).
    pub fn llama(&self) -> LlamaConfig {
        LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            hidden_act: self.hidden_act.clone(),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            rope_parameters: self.rope_parameters.clone(),
            attention_bias: false,
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
