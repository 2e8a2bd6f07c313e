//! Phi-3 `config.json` and the (possibly partial) rotary embedding it describes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::bert::HiddenAct;
use crate::models::causal::rotary::Rope;
use crate::models::causal::TokenIds;
use crate::models::validate as v;

/// Phi-3 hyper-parameters from a Hugging Face `config.json` (its field names; missing fields
/// take transformers' `Phi3Config` defaults, i.e. Phi-3-mini's).
///
/// Rotary settings, as transformers 5's `Phi3Config.convert_rope_params_to_dict` resolves them
/// (see [`Phi3Config::rotary`]): the parameters are `rope_scaling` (transformers 4, if set) else
/// `rope_parameters`; the base their `rope_theta`, else `rope_theta`, else 10000; the rotated
/// fraction of each head their `partial_rotary_factor`, else `partial_rotary_factor` (Phi-4-mini
/// writes it at the top level), else 1. Only the `"default"` rotary type is implemented: the
/// long-context checkpoints' `"longrope"` (`"su"`, `"yarn"`) is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phi3Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden width.
    pub hidden_size: i64,
    /// MLP width (each half of `gate_up_proj`'s output).
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (`None`: as many as query heads); must divide `num_attention_heads`.
    pub num_key_value_heads: Option<i64>,
    /// Width of a head (`None`: `hidden_size / num_attention_heads`; transformers reads a
    /// `head_dim` key when the file has one).
    pub head_dim: Option<i64>,
    /// MLP activation (`"silu"`).
    pub hidden_act: String,
    /// Longest sequence accepted (cached + new positions).
    pub max_position_embeddings: i64,
    /// Context length of pre-training (used by longrope only, which is refused).
    pub original_max_position_embeddings: Option<i64>,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 spelling).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4 spelling); takes precedence over `rope_parameters`.
    pub rope_scaling: Option<serde_json::Value>,
    /// RoPE type, base and fraction (transformers 5 spelling).
    pub rope_parameters: Option<serde_json::Value>,
    /// Rotated fraction of each head (top-level spelling, Phi-4-mini).
    pub partial_rotary_factor: Option<f64>,
    /// Each query sees only the last `sliding_window` positions, its own included (every layer;
    /// Phi-3-mini-4k writes 2047). `None`: full causal attention.
    pub sliding_window: Option<i64>,
    /// `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id(s).
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"phi3"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["Phi3ForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for Phi3Config {
    fn default() -> Self {
        Phi3Config {
            vocab_size: 32064,
            hidden_size: 3072,
            intermediate_size: 8192,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 4096,
            original_max_position_embeddings: Some(4096),
            rms_norm_eps: 1e-5,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            partial_rotary_factor: None,
            sliding_window: None,
            tie_word_embeddings: false,
            bos_token_id: Some(TokenIds::One(1)),
            eos_token_id: Some(TokenIds::One(32000)),
            pad_token_id: Some(32000),
            model_type: Some("phi3".into()),
            architectures: None,
        }
    }
}

/// The rotary embedding of a Phi-3 config: frequencies and how many dims of each head turn.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotary {
    /// Base of the frequencies (always [`Rope::Default`]).
    pub rope: Rope,
    /// Rotated dims at the start of each head: `int(head_dim * partial_rotary_factor)`, even,
    /// from 2 to `head_dim`.
    pub ndims: i64,
}

impl Phi3Config {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] naming
    /// the file if it is not a Phi-3 config (`model_type` other than `"phi3"`) or fails
    /// [`Phi3Config::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "Phi-3", &["phi3"], "Phi3For")?;
        let c: Phi3Config = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// Positive sizes, heads divisible by key/value heads, `qkv_proj`'s and `gate_up_proj`'s
    /// widths without overflow, a positive finite `rms_norm_eps`, a positive `sliding_window`,
    /// token ids inside the vocabulary, a known activation and a supported rotary embedding
    /// ([`Phi3Config::rotary`]). The message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        v::positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        v::non_negative("num_hidden_layers", self.num_hidden_layers)?;
        v::multiple_of(("num_attention_heads", self.num_attention_heads), ("num_key_value_heads", self.kv_heads()))?;
        let q_width = v::product(&[("num_attention_heads", self.num_attention_heads), ("head_dim", self.head_dim())])?;
        let kv_width = v::product(&[("num_key_value_heads", self.kv_heads()), ("head_dim", self.head_dim()), ("2", 2)])?;
        if q_width.checked_add(kv_width).is_none() {
            return Err("`num_attention_heads`, `num_key_value_heads` and `head_dim` are too large: qkv_proj's width overflows".into());
        }
        v::product(&[("intermediate_size", self.intermediate_size), ("2", 2)])?;
        v::positive_finite("rms_norm_eps", self.rms_norm_eps)?;
        if let Some(w) = self.sliding_window {
            v::positive(&[("sliding_window", w)])?;
        }
        for (field, ids) in [("bos_token_id", &self.bos_token_id), ("eos_token_id", &self.eos_token_id)] {
            v::token_ids_in_vocab(field, &ids.as_ref().map(TokenIds::to_vec).unwrap_or_default(), self.vocab_size)?;
        }
        v::token_ids_in_vocab("pad_token_id", self.pad_token_id.as_slice(), self.vocab_size)?;
        HiddenAct::parse(&self.hidden_act)?;
        self.rotary()?;
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

    /// The rotary settings (see [`Phi3Config`] for where each comes from). Errors name the key:
    /// a rotary type other than `"default"` (`longrope`, `su`, `yarn`, `linear`, ...), a base
    /// below 1, a fraction outside `(0, 1]` or one giving an odd number of rotated dims.
    pub fn rotary(&self) -> std::result::Result<Rotary, String> {
        let object = |v: &Option<serde_json::Value>, field: &'static str| match v {
            Some(p @ serde_json::Value::Object(_)) => Ok(Some((field, p.clone()))),
            Some(serde_json::Value::Null) | None => Ok(None),
            Some(other) => Err(format!("`{field}` must be an object, found {other}")),
        };
        // transformers: `rope_scaling or rope_parameters` (an empty object counts as unset).
        let params = match object(&self.rope_scaling, "rope_scaling")? {
            Some((f, p)) if p.as_object().is_some_and(|o| !o.is_empty()) => Some((f, p)),
            _ => object(&self.rope_parameters, "rope_parameters")?,
        };
        let get = |key: &str| params.as_ref().and_then(|(field, p)| p.get(key).filter(|v| !v.is_null()).map(|v| (*field, v)));
        let number = |key: &str| -> std::result::Result<Option<(String, f64)>, String> {
            match get(key) {
                None => Ok(None),
                Some((field, v)) => match v.as_f64() {
                    Some(x) => Ok(Some((format!("{field}.{key}"), x))),
                    None => Err(format!("`{field}.{key}` must be a number, found {v}")),
                },
            }
        };
        let ty = match get("rope_type").or_else(|| get("type")) {
            None => "default",
            Some((field, t)) => t.as_str().ok_or_else(|| format!("`{field}.rope_type` must be a string, found {t}"))?,
        };
        if ty != "default" {
            let field = params.as_ref().map_or("rope_parameters", |(f, _)| f);
            let alias = if matches!(ty, "su" | "yarn") { " (transformers reads it as \"longrope\")" } else { "" };
            return Err(format!(
                "`{field}` rope type \"{ty}\"{alias} is not supported: only \"default\" rotary embeddings are implemented for Phi-3"
            ));
        }
        let (theta_field, theta) = number("rope_theta")?
            .or_else(|| self.rope_theta.map(|x| ("rope_theta".to_string(), x)))
            .unwrap_or_else(|| ("rope_theta".to_string(), 10000.0));
        v::at_least_one(&theta_field, theta)?;
        let (pct_field, pct) = number("partial_rotary_factor")?
            .or_else(|| self.partial_rotary_factor.map(|x| ("partial_rotary_factor".to_string(), x)))
            .unwrap_or_else(|| ("partial_rotary_factor".to_string(), 1.0));
        if !(pct.is_finite() && pct > 0.0 && pct <= 1.0) {
            return Err(format!("`{pct_field}` must be a number in (0, 1], found {pct}"));
        }
        let head_dim = self.head_dim();
        let ndims = (head_dim as f64 * pct) as i64;
        if ndims < 2 || ndims % 2 != 0 {
            return Err(format!(
                "`{pct_field}` {pct} gives {ndims} rotary dims per head (int({head_dim} * {pct})): the number must be even and at least 2"
            ));
        }
        Ok(Rotary { rope: Rope::Default { theta }, ndims })
    }
}
