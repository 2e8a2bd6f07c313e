//! Qwen2 `config.json`: Llama's fields (read through [`Qwen2Config::llama`]) plus the
//! sliding-window settings ([`Qwen2Config::layer_windows`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::causal::TokenIds;
use crate::models::llama::LlamaConfig;
use crate::models::validate as v;

/// Qwen2 / Qwen2.5 hyper-parameters from a Hugging Face `config.json` (its field names; missing
/// fields take transformers' `Qwen2Config` defaults). Sizes, norms, activation and rotary
/// settings mean what they mean for Llama ([`Qwen2Config::llama`]); q, k and v always have
/// biases and o never does (no `attention_bias` key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Qwen2Config {
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
    /// Width of a head (`None`: `hidden_size / num_attention_heads`; transformers reads a
    /// `head_dim` key when the file has one).
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
    /// `lm_head` shares `embed_tokens`' weight (true for the small checkpoints).
    pub tie_word_embeddings: bool,
    /// Sliding-window attention on layers `max_window_layers..` (or those `layer_types` marks
    /// `"sliding_attention"`); false in every released checkpoint.
    pub use_sliding_window: bool,
    /// Window of the sliding layers (only used when `use_sliding_window`).
    pub sliding_window: Option<i64>,
    /// Layers below this index keep full attention when `use_sliding_window`.
    pub max_window_layers: i64,
    /// Attention kind of each layer, `"full_attention"` or `"sliding_attention"` (transformers 5
    /// writes it).
    pub layer_types: Option<Vec<String>>,
    /// Beginning-of-sequence id(s).
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"qwen2"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["Qwen2ForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for Qwen2Config {
    fn default() -> Self {
        Qwen2Config {
            vocab_size: 151936,
            hidden_size: 4096,
            intermediate_size: 22016,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(32),
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            use_sliding_window: false,
            sliding_window: Some(4096),
            max_window_layers: 28,
            layer_types: None,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            model_type: Some("qwen2".into()),
            architectures: None,
        }
    }
}

impl Qwen2Config {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] naming
    /// the file if it is not a Qwen2 config (`model_type` other than `"qwen2"`) or fails
    /// [`Qwen2Config::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "Qwen2", &["qwen2"], "Qwen2For")?;
        let c: Qwen2Config = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// [`LlamaConfig::validate`] of [`Qwen2Config::llama`] (sizes, heads, norms, activation,
    /// rotary settings) and the sliding-window settings ([`Qwen2Config::layer_windows`]). The
    /// message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.llama().validate()?;
        self.layer_windows().map(drop)
    }

    /// Each layer's sliding window (`None`: full causal attention): with `use_sliding_window`,
    /// the layers `layer_types` marks `"sliding_attention"` (without `layer_types`, layers
    /// `max_window_layers..`) attend to the last `sliding_window` positions only, their own
    /// included. Errors name the field.
    pub fn layer_windows(&self) -> std::result::Result<Vec<Option<i64>>, String> {
        let (layers, window) = (self.num_hidden_layers, self.sliding_window);
        layer_windows(layers, self.use_sliding_window, window, self.max_window_layers, &self.layer_types)
    }

    /// The Llama config with the same sizes, norms, activation and rotary settings (no MLP
    /// bias; `attention_bias` false: Qwen2's attention biases are set by the model itself).
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

/// Each layer's sliding window (`None`: full causal attention), as Qwen2 / Qwen3 configs
/// resolve it (transformers' `Qwen2Config.__post_init__`): the window is `sliding_window` only
/// if `use_sliding_window`; `layer_types` (`"full_attention"` / `"sliding_attention"`, one per
/// layer) says which layers slide, else layers `max_window_layers..` slide when there is a
/// window. Errors name the field: a `layer_types` of the wrong length or with another entry, a
/// `"sliding_attention"` layer with no window, a window below 1.
pub(crate) fn layer_windows(
    num_layers: i64,
    use_sliding_window: bool,
    sliding_window: Option<i64>,
    max_window_layers: i64,
    layer_types: &Option<Vec<String>>,
) -> std::result::Result<Vec<Option<i64>>, String> {
    let window = sliding_window.filter(|_| use_sliding_window);
    if let Some(w) = window {
        v::positive(&[("sliding_window", w)])?;
    }
    let layers = num_layers.max(0);
    match layer_types {
        Some(types) => {
            if types.len() as i64 != layers {
                return Err(format!("`layer_types` has {} entries for {num_layers} layers (`num_hidden_layers`)", types.len()));
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => window.map(Some).ok_or_else(|| {
                        format!(
                            "`layer_types[{i}]` is \"sliding_attention\" but there is no window \
                             (`use_sliding_window` is false or `sliding_window` null)"
                        )
                    }),
                    other => Err(format!(
                        "`layer_types[{i}]` \"{other}\" is not supported (supported: \"full_attention\", \"sliding_attention\")"
                    )),
                })
                .collect()
        }
        None => Ok((0..layers).map(|i| window.filter(|_| i >= max_window_layers)).collect()),
    }
}
