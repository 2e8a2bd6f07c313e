//! GPT-2 `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::act::HiddenAct;
use crate::models::causal::TokenIds;
use crate::models::validate as v;

/// GPT-2 hyper-parameters from a Hugging Face `config.json` (its field names; missing fields
/// take transformers' `GPT2Config` defaults, i.e. the 124M `gpt2`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Longest sequence (rows of `wpe`).
    pub n_positions: i64,
    /// Hidden width.
    pub n_embd: i64,
    /// Number of blocks.
    pub n_layer: i64,
    /// Attention heads; must divide `n_embd`.
    pub n_head: i64,
    /// MLP width (`None`: `4 * n_embd`).
    pub n_inner: Option<i64>,
    /// MLP activation (`"gelu_new"`: GELU, tanh approximation).
    pub activation_function: String,
    /// Epsilon of every LayerNorm.
    pub layer_norm_epsilon: f64,
    /// Scale attention scores by `head_dim^-0.5`.
    pub scale_attn_weights: bool,
    /// Also divide them by `layer_idx + 1`.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Compute scores in f32 (always done here; accepted for compatibility).
    pub reorder_and_upcast_attn: bool,
    /// Cross-attention (encoder-decoder use) is not supported; must be false.
    pub add_cross_attention: bool,
    /// `lm_head` shares `wte`'s weight (true for every released GPT-2).
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Must be `"gpt2"` when present.
    pub model_type: Option<String>,
    /// Class names, e.g. `["GPT2LMHeadModel"]`.
    pub architectures: Option<Vec<String>>,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".into(),
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            add_cross_attention: false,
            tie_word_embeddings: true,
            bos_token_id: Some(TokenIds::One(50256)),
            eos_token_id: Some(TokenIds::One(50256)),
            pad_token_id: None,
            model_type: Some("gpt2".into()),
            architectures: None,
        }
    }
}

impl Gpt2Config {
    /// Reads `config.json`: [`crate::Error::Io`] if unreadable, [`crate::Error::Config`] if it
    /// is not a GPT-2 config (`model_type` other than `"gpt2"`) or fails [`Gpt2Config::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = v::read_config(path, "GPT-2", &["gpt2"], "GPT2")?;
        let c: Gpt2Config = v::parse_config(path, json)?;
        c.validate().map_err(|m| v::config_error(&path.display().to_string(), m))?;
        Ok(c)
    }

    /// Positive sizes (the derived ones, `3 * n_embd` and `4 * n_embd`, without overflow),
    /// `n_embd` divisible by `n_head`, a positive finite `layer_norm_epsilon`, token ids inside
    /// the vocabulary, a known activation, no cross-attention. The message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        v::positive(&[
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
        ])?;
        v::product(&[("n_embd", self.n_embd), ("4", 4)])?;
        v::positive(&[("n_inner", self.inner())])?;
        v::non_negative("n_layer", self.n_layer)?;
        v::multiple_of(("n_embd", self.n_embd), ("n_head", self.n_head))?;
        v::positive_finite("layer_norm_epsilon", self.layer_norm_epsilon)?;
        for (field, ids) in [("bos_token_id", &self.bos_token_id), ("eos_token_id", &self.eos_token_id)] {
            v::token_ids_in_vocab(field, &ids.as_ref().map(TokenIds::to_vec).unwrap_or_default(), self.vocab_size)?;
        }
        v::token_ids_in_vocab("pad_token_id", self.pad_token_id.as_slice(), self.vocab_size)?;
        if self.add_cross_attention {
            return Err("`add_cross_attention`: cross-attention is not supported".into());
        }
        HiddenAct::parse(&self.activation_function).map_err(|e| e.replace("hidden_act", "activation_function"))?;
        Ok(())
    }

    /// MLP width: `n_inner` or `4 * n_embd` (saturating: [`Gpt2Config::validate`] refuses an
    /// `n_embd` that large).
    pub fn inner(&self) -> i64 {
        self.n_inner.unwrap_or(self.n_embd.saturating_mul(4))
    }
}
