//! GPT-NeoX `config.json` and the (partial) rotary embedding it describes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::act::HiddenAct;
use crate::models::causal::rotary::Rope;
use crate::models::causal::TokenIds;
use crate::models::validate as v;

/// GPT-NeoX hyper-parameters from a Hugging Face `config.json` (its field names; missing fields
/// take transformers' `GPTNeoXConfig` defaults, i.e. `EleutherAI/gpt-neox-20b`'s).
///
/// The rotary settings come in two spellings, both read (see [`GptNeoXConfig::rotary`]):
/// transformers 4 and the Pythia checkpoints on the Hub write `rotary_pct` and
/// `rotary_emb_base` (and `rope_scaling`); transformers 5 writes
/// `rope_parameters: {"rope_type", "rope_theta", "partial_rotary_factor"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GptNeoXConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden width.
    pub hidden_size: i64,
    /// MLP width (`dense_h_to_4h` output).
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads; must divide `hidden_size`.
    pub num_attention_heads: i64,
    /// MLP activation (`"gelu"`: exact GELU).
    pub hidden_act: String,
    /// Longest sequence accepted (cached + new positions).
    pub max_position_embeddings: i64,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// `x + attn(ln1(x)) + mlp(ln2(x))` (true, every Pythia) or sequential like Llama (false).
    pub use_parallel_residual: bool,
    /// Biases on `query_key_value` and `dense` (true for every released GPT-NeoX).
    pub attention_bias: bool,
    /// Fraction of each head rotated (transformers 4 spelling; default 0.25).
    pub rotary_pct: Option<f64>,
    /// Rotary base (transformers 4 spelling; default 10000).
    pub rotary_emb_base: Option<f64>,
    /// Rotary scaling (transformers 4 spelling), e.g. `{"type": "linear", "factor": 2.0}`.
    pub rope_scaling: Option<serde_json::Value>,
    /// Rotary type, base and fraction (transformers 5 spelling), e.g.
    /// `{"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25}`.
    pub rope_parameters: Option<serde_json::Value>,
    /// `embed_out` shares `embed_in`'s weight (false for every Pythia).
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id(s).
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"gpt_neox"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["GPTNeoXForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for GptNeoXConfig {
    fn default() -> Self {
        GptNeoXConfig {
            vocab_size: 50432,
            hidden_size: 6144,
            intermediate_size: 24576,
            num_hidden_layers: 44,
            num_attention_heads: 64,
            hidden_act: "gelu".into(),
            max_position_embeddings: 2048,
            layer_norm_eps: 1e-5,
            use_parallel_residual: true,
            attention_bias: true,
            rotary_pct: None,
            rotary_emb_base: None,
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            bos_token_id: Some(TokenIds::One(0)),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
            model_type: Some("gpt_neox".into()),
            architectures: None,
        }
    }
}

/// The rotary embedding of a GPT-NeoX config: frequencies and how many dims of each head turn.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotary {
    /// Base and scaling of the frequencies.
    pub rope: Rope,
    /// Rotated dims at the start of each head: `int(head_dim * partial_rotary_factor)`, even,
    /// at most `head_dim` (0: no rotary).
    pub ndims: i64,
}

impl GptNeoXConfig {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] naming
    /// the file if it is not a GPT-NeoX config (`model_type` other than `"gpt_neox"`) or fails
    /// [`GptNeoXConfig::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "GPT-NeoX", &["gpt_neox"], "GPTNeoX")?;
        let c: GptNeoXConfig = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// Positive sizes (`3 * hidden_size` without overflow), `hidden_size` divisible by
    /// `num_attention_heads`, a positive finite `layer_norm_eps`, token ids inside the
    /// vocabulary, a known activation and a supported rotary embedding with an even number of
    /// rotated dims (see [`GptNeoXConfig::rotary`]). The message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        v::positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        v::non_negative("num_hidden_layers", self.num_hidden_layers)?;
        v::multiple_of(("hidden_size", self.hidden_size), ("num_attention_heads", self.num_attention_heads))?;
        v::product(&[("hidden_size", self.hidden_size), ("3", 3)])?;
        v::positive_finite("layer_norm_eps", self.layer_norm_eps)?;
        for (field, ids) in [("bos_token_id", &self.bos_token_id), ("eos_token_id", &self.eos_token_id)] {
            v::token_ids_in_vocab(field, &ids.as_ref().map(TokenIds::to_vec).unwrap_or_default(), self.vocab_size)?;
        }
        v::token_ids_in_vocab("pad_token_id", self.pad_token_id.as_slice(), self.vocab_size)?;
        HiddenAct::parse(&self.hidden_act)?;
        self.rotary()?;
        Ok(())
    }

    /// Width of one head: `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// The rotary settings, as transformers 5's `GPTNeoXConfig.convert_rope_params_to_dict`
    /// resolves them: the parameters are `rope_scaling` (if an object) else `rope_parameters`
    /// (else none); the base is their `rope_theta`, else `rotary_emb_base`, else 10000; the
    /// fraction their `partial_rotary_factor`, else `rotary_pct`, else 0.25; the type their
    /// `rope_type` (or `type`), else `"default"`. Supported types: `"default"` and `"linear"`.
    ///
    /// Rotated dims: `int(head_dim * fraction)` (transformers' `rotary_ndims`), which must be
    /// even (the two halves turn together) and at most `head_dim`; the error names the key the
    /// fraction came from.
    pub fn rotary(&self) -> std::result::Result<Rotary, String> {
        let object = |v: &Option<serde_json::Value>, field: &'static str| match v {
            Some(p @ serde_json::Value::Object(_)) => Ok(Some((field, p.clone()))),
            Some(serde_json::Value::Null) | None => Ok(None),
            Some(other) => Err(format!("`{field}` must be an object, found {other}")),
        };
        let params = match object(&self.rope_scaling, "rope_scaling")? {
            Some(p) => Some(p),
            None => object(&self.rope_parameters, "rope_parameters")?,
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
        let (theta_field, theta) = number("rope_theta")?
            .or_else(|| self.rotary_emb_base.map(|x| ("rotary_emb_base".to_string(), x)))
            .unwrap_or_else(|| ("rotary_emb_base".to_string(), 10000.0));
        v::at_least_one(&theta_field, theta)?;
        let (pct_field, pct) = number("partial_rotary_factor")?
            .or_else(|| self.rotary_pct.map(|x| ("rotary_pct".to_string(), x)))
            .unwrap_or_else(|| ("rotary_pct".to_string(), 0.25));
        if !(pct.is_finite() && (0.0..=1.0).contains(&pct)) {
            return Err(format!("`{pct_field}` must be a number from 0 to 1, found {pct}"));
        }
        let head_dim = self.head_dim();
        let ndims = (head_dim as f64 * pct) as i64;
        if ndims % 2 != 0 {
            return Err(format!(
                "`{pct_field}` {pct} gives {ndims} rotary dims per head (int({head_dim} * {pct})): the number must be even"
            ));
        }
        let ty = match get("rope_type").or_else(|| get("type")) {
            None => "default",
            Some((field, t)) => t.as_str().ok_or_else(|| format!("`{field}.rope_type` must be a string, found {t}"))?,
        };
        let rope = match ty {
            "default" => Rope::Default { theta },
            "linear" => {
                let (field, factor) = number("factor")?.ok_or_else(|| "linear rotary scaling has no number `factor`".to_string())?;
                v::at_least_one(&field, factor)?;
                Rope::Linear { theta, factor }
            }
            other => {
                let field = params.as_ref().map_or("rope_parameters", |(f, _)| f);
                return Err(format!("`{field}` rope type \"{other}\" is not supported (supported: \"default\", \"linear\")"));
            }
        };
        Ok(Rotary { rope, ndims })
    }
}
