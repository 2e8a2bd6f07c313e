//! Llama `config.json` and the rotary-embedding parameters it describes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::act::HiddenAct;
use super::Rope;
use crate::models::causal::TokenIds;
use crate::models::validate as v;

/// Llama hyper-parameters from a Hugging Face `config.json` (its field names; missing fields
/// take transformers' `LlamaConfig` defaults, i.e. Llama-2-7B's). Both the transformers 4
/// (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) spellings of the rotary settings
/// are read; see [`LlamaConfig::rope`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
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
    /// Key/value heads (`None`: as many as query heads); must divide `num_attention_heads`.
    pub num_key_value_heads: Option<i64>,
    /// Width of a head (`None`: `hidden_size / num_attention_heads`).
    pub head_dim: Option<i64>,
    /// MLP activation (`"silu"`).
    pub hidden_act: String,
    /// Longest sequence accepted (cached + new positions).
    pub max_position_embeddings: i64,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 spelling; default 10000).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4 spelling), e.g. `{"rope_type": "llama3", "factor": 8, ...}`.
    pub rope_scaling: Option<serde_json::Value>,
    /// RoPE type, base and scaling (transformers 5 spelling), e.g.
    /// `{"rope_type": "default", "rope_theta": 500000.0}`.
    pub rope_parameters: Option<serde_json::Value>,
    /// Biases on q, k, v, o projections.
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id(s).
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s) (Llama 3 lists several).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"llama"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["LlamaForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        LlamaConfig {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            bos_token_id: Some(TokenIds::One(1)),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
            model_type: Some("llama".into()),
            architectures: None,
        }
    }
}

impl LlamaConfig {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] if it
    /// is not a Llama config (`model_type` other than `"llama"`) or fails [`LlamaConfig::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "Llama", &["llama"], "Llama")?;
        let c: LlamaConfig = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// Positive sizes, heads divisible by key/value heads, an even head width (and
    /// `heads * head_dim` without overflow), a positive finite `rms_norm_eps`, token ids inside
    /// the vocabulary, a known activation and a supported rotary scaling with positive finite
    /// parameters. The message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        v::positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        v::non_negative("num_hidden_layers", self.num_hidden_layers)?;
        v::multiple_of(("num_attention_heads", self.num_attention_heads), ("num_key_value_heads", self.kv_heads()))?;
        let hd = self.head_dim();
        if hd <= 0 || hd % 2 != 0 {
            return Err(format!("head width {hd} (`head_dim` or hidden_size / num_attention_heads) must be positive and even"));
        }
        v::product(&[("num_attention_heads", self.num_attention_heads), ("head_dim", hd)])?;
        v::positive_finite("rms_norm_eps", self.rms_norm_eps)?;
        for (field, ids) in [("bos_token_id", &self.bos_token_id), ("eos_token_id", &self.eos_token_id)] {
            v::token_ids_in_vocab(field, &ids.as_ref().map(TokenIds::to_vec).unwrap_or_default(), self.vocab_size)?;
        }
        v::token_ids_in_vocab("pad_token_id", self.pad_token_id.as_slice(), self.vocab_size)?;
        HiddenAct::parse(&self.hidden_act)?;
        self.rope()?;
        Ok(())
    }

    /// Key/value heads: `num_key_value_heads` or `num_attention_heads`.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head: `head_dim` or `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary settings: `rope_parameters` (transformers 5) if present, else `rope_theta`
    /// (default 10000) with `rope_scaling` (transformers 4). Supported types: `"default"`,
    /// `"linear"`, `"llama3"`; others (yarn, dynamic, longrope) and `partial_rotary_factor`
    /// other than 1 are an error naming the field.
    pub fn rope(&self) -> std::result::Result<Rope, String> {
        // Both spellings: taking one and ignoring the other would silently drop a scaling.
        if let (Some(serde_json::Value::Object(new)), Some(serde_json::Value::Object(old))) = (&self.rope_parameters, &self.rope_scaling) {
            let ty = |o: &serde_json::Map<String, serde_json::Value>| {
                o.get("rope_type").or_else(|| o.get("type")).and_then(|t| t.as_str()).unwrap_or("default").to_string()
            };
            let same_numbers = old.iter().filter(|(k, _)| *k != "type" && *k != "rope_type").all(|(k, v)| new.get(k) == Some(v));
            if ty(new) != ty(old) || !same_numbers {
                return Err(format!(
                    "`rope_parameters` ({}) and the older `rope_scaling` ({}) are both set and differ: keep one",
                    serde_json::Value::Object(new.clone()),
                    serde_json::Value::Object(old.clone())
                ));
            }
        }
        let (field, params, theta) = match &self.rope_parameters {
            Some(p @ serde_json::Value::Object(_)) => {
                let theta = p.get("rope_theta").and_then(|t| t.as_f64()).or(self.rope_theta);
                ("rope_parameters", Some(p), theta)
            }
            Some(serde_json::Value::Null) | None => {
                ("rope_scaling", self.rope_scaling.as_ref().filter(|s| !s.is_null()), self.rope_theta)
            }
            Some(other) => return Err(format!("`rope_parameters` must be an object, found {other}")),
        };
        let theta = theta.unwrap_or(10000.0);
        v::at_least_one("rope_theta", theta)?;
        let Some(p) = params else { return Ok(Rope::Default { theta }) };
        // Scaling parameters divide frequencies: zero, negative or infinite ones give NaN
        // frequencies, not an error, further on.
        let num = |key: &str| -> std::result::Result<f64, String> {
            let x = p.get(key).and_then(|v| v.as_f64()).ok_or_else(|| format!("`{field}` has no number `{key}`"))?;
            let name = format!("{field}.{key}");
            if key == "factor" { v::at_least_one(&name, x) } else { v::positive_finite(&name, x) }.map(|()| x)
        };
        if let Some(f) = p.get("partial_rotary_factor").and_then(|v| v.as_f64()).filter(|&f| f != 1.0) {
            return Err(format!("`{field}.partial_rotary_factor` {f} is not supported (only 1)"));
        }
        let ty = p.get("rope_type").or_else(|| p.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        match ty {
            "default" => Ok(Rope::Default { theta }),
            "linear" => Ok(Rope::Linear { theta, factor: num("factor")? }),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    // `_compute_llama3_parameters` divides by their difference.
                    return Err(format!("`{field}.high_freq_factor` {high} must be greater than `low_freq_factor` {low}"));
                }
                Ok(Rope::Llama3 {
                    theta,
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                })
            }
            other => Err(format!(
                "`{field}` rope type \"{other}\" is not supported (supported: \"default\", \"linear\", \"llama3\")"
            )),
        }
    }
}
