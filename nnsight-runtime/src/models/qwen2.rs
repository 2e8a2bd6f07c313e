//! Qwen2 / Qwen2.5 in tch, every submodule hookable: Llama with biases on the query, key and
//! value projections.
//!
//! Architecture: Yang et al. 2024, "Qwen2 Technical Report" (arXiv:2407.10671) and "Qwen2.5
//! Technical Report" (arXiv:2412.15115), as implemented by Hugging Face transformers'
//! `models/qwen2/modeling_qwen2.py` (`Qwen2ForCausalLM`, eager attention), itself generated from
//! Llama's (`modular_qwen2.py`). The differences from [`super::llama`]:
//!
//! - `q_proj`, `k_proj`, `v_proj` always have a bias, `o_proj` never (no `attention_bias` key);
//! - the small checkpoints tie `lm_head` to `embed_tokens` (`tie_word_embeddings`);
//! - sliding-window attention (`use_sliding_window`, `sliding_window`, `max_window_layers`,
//!   `layer_types`), off in every released checkpoint: when `use_sliding_window` is true, the
//!   layers `layer_types` marks `"sliding_attention"` (without it, layers `max_window_layers..`)
//!   see only the last `sliding_window` positions, their own included
//!   ([`Qwen2Config::layer_windows`], [`causal::sliding_window_mask`]; their `probs` are exactly
//!   0 outside the window). The KV cache keeps every key and the mask hides the old ones, so
//!   cached steps compute what a full recompute of the sequence computes.
//!
//! Everything else is Llama's, and so are the modules (their type names say so): the tree is
//!
//! ```text
//! Qwen2                               (root, path "")   Input CausalInput, Output logits
//! ├── model                           LlamaModel        embed_tokens, rotary_emb, layers[i], norm
//! │   └── layers[i]                   LlamaDecoderLayer input_layernorm, self_attn, post_attention_layernorm, mlp
//! │       ├── self_attn               LlamaAttention    q_proj, k_proj, v_proj (bias), o_proj (no bias);
//! │       │                                             hook points q, k, scores, probs, z
//! │       └── mlp                     LlamaMlp          gate_proj, up_proj, down_proj, act_fn; hook point act
//! └── lm_head                         LmHead            (embed_tokens' weight if tie_word_embeddings)
//! ```
//!
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `hidden_size`.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use super::causal::{self, CausalInput, CausalLm, LmHead, LoadOptions, TokenIds};
use super::llama::{LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaModel};
use super::params;

use crate::activation::Layout;
use crate::error::Result;
use crate::hook::{HookModule, Hooked};
use crate::models::{CAUSAL_INPUT, ROWS};
use nnsight_macros::ModuleTree;

mod config;
pub(crate) use config::layer_windows;
pub use config::Qwen2Config;

/// A Qwen2 model with its language-model head (transformers' `Qwen2ForCausalLM`).
///
/// Input [`CausalInput`], output logits `[batch, seq, vocab]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Qwen2 {
    /// `model`: embeddings, decoder layers, final norm (Llama's, with q/k/v biases).
    pub model: Hooked<LlamaModel>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: Qwen2Config,
}

impl Qwen2 {
    /// A model with zero weights as variables under `p` (use `vs.root()`: variable names are
    /// the checkpoint keys). `lm_head.weight` is a variable unless `tie_word_embeddings`.
    /// Errors: [`crate::Error::Config`] for a config failing [`Qwen2Config::validate`],
    /// [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &Qwen2Config) -> Result<Qwen2> {
        const WHAT: &str = "<Qwen2Config given to Qwen2::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        let llama = config.llama();
        let windows = config.layer_windows().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pm = p / "model";
            let model = LlamaModel::with_layers(&pm, &llama, qwen2_layer)?.with_windows(windows);
            let tied = config.tie_word_embeddings.then_some(&model.embed_tokens.ws);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.hidden_size);
            Ok(Qwen2 { model: Hooked::new(&pm, model), lm_head, config: config.clone() })
        })
    }
}

/// `model.layers.{layer_idx}`: Llama's layer whose attention has q/k/v biases and no o bias.
fn qwen2_layer(p: &nn::Path, c: &LlamaConfig, layer_idx: usize) -> Result<LlamaDecoderLayer> {
    LlamaDecoderLayer::with_attention(p, c, LlamaAttention::with_biases(&(p / "self_attn"), c, layer_idx, true, false))
}

impl HookModule for Qwen2 {
    /// [`CausalInput`].
    type Input = CausalInput;
    /// Logits `[batch, seq, vocab]`.
    type Output = Tensor;
    /// Ids, mask and position ids `[batch, ..]`; the KV cache handle shared.
    fn input_layout(&self) -> Layout {
        CAUSAL_INPUT
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, input: CausalInput) -> Tensor {
        self.lm_head.call(self.model.call(input))
    }
}

impl CausalLm for Qwen2 {
    fn load_with(dir: &Path, options: &LoadOptions) -> Result<Self> {
        causal::check_load(dir, options)?;
        let config = Qwen2Config::from_file(&dir.join("config.json"))?;
        causal::load_model(dir, options, &["model."], &causal::Parts::MODEL, |p| Qwen2::new(p, &config))
    }
    fn max_positions(&self) -> i64 {
        self.config.max_position_embeddings
    }
    fn num_layers(&self) -> usize {
        self.model.layers.len()
    }
    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }
    fn eos_token_ids(&self) -> Vec<i64> {
        self.config.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
    fn pad_token_id(&self) -> Option<i64> {
        self.config.pad_token_id
    }
    fn device(&self) -> Device {
        self.model.embed_tokens.ws.device()
    }
    fn kind(&self) -> Kind {
        self.model.embed_tokens.ws.kind()
    }
}

// Decoder: `model.layers`, `model.layers.{i}.self_attn`, `.mlp`, `.mlp.act`, `model.norm`, `lm_head`.
super::llama::llama_model_decoder!(Qwen2);

