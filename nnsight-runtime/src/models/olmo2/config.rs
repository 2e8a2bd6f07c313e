//! OLMo 2 `config.json`: Llama's fields (read through [`Olmo2Config::llama`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::causal::TokenIds;
use crate::models::llama::LlamaConfig;
use crate::models::validate as v;

/// OLMo 2 hyper-parameters from a Hugging Face `config.json` (its field names; missing fields
/// take transformers' `Olmo2Config` defaults, i.e. OLMo-2-7B's). Every field means what it
/// means for Llama ([`Olmo2Config::llama`]); there is no MLP bias.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Olmo2Config {
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
    /// Key/value heads (`None`: as many as query heads).
    pub num_key_value_heads: Option<i64>,
    /// Width of a head (`None`: `hidden_size / num_attention_heads`; transformers reads a
    /// `head_dim` key when the file has one).
    pub head_dim: Option<i64>,
    /// MLP activation (`"silu"`).
    pub hidden_act: String,
    /// Longest sequence accepted (cached + new positions).
    pub max_position_embeddings: i64,
    /// Epsilon of every RMSNorm (q_norm and k_norm included).
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 spelling).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4 spelling).
    pub rope_scaling: Option<serde_json::Value>,
    /// RoPE type, base and scaling (transformers 5 spelling).
    pub rope_parameters: Option<serde_json::Value>,
    /// Biases on q, k, v and o (false in every release).
    pub attention_bias: bool,
    /// `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id(s).
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"olmo2"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["Olmo2ForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for Olmo2Config {
    fn default() -> Self {
        Olmo2Config {
            vocab_size: 50304,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-5,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: false,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: Some(TokenIds::One(50279)),
            pad_token_id: Some(1),
            model_type: Some("olmo2".into()),
            architectures: None,
        }
    }
}

impl Olmo2Config {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] naming
    /// the file if it is not an OLMo 2 config (`model_type` other than `"olmo2"`) or fails
    /// [`Olmo2Config::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "OLMo 2", &["olmo2"], "Olmo2For")?;
        let c: Olmo2Config = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// [`LlamaConfig::validate`] of [`Olmo2Config::llama`] (sizes, heads, norms, activation,
    /// rotary settings). The message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.llama().validate()
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
            head_dim: self.head_dim,
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
