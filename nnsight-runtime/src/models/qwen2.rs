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


use tch::nn;

use super::causal::{self, LmHead};
use super::llama::{LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaMlp, LlamaModel, RmsNorm};
use super::params;

use crate::error::Result;
use crate::hook::Hooked;
use nnsight_macros::ModuleTree;

mod config;
pub(crate) use config::layer_windows;
pub use config::Qwen2Config;

/// A Qwen2 model with its language-model head (transformers' `Qwen2ForCausalLM`).
///
/// Input [`CausalInput`](super::causal::CausalInput), output logits `[batch, seq, vocab]`.
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

super::causal::causal_family!(Qwen2, Qwen2Config {
    layer: LlamaDecoderLayer,
    attn: LlamaAttention,
    mlp: LlamaMlp,
    norm: RmsNorm,
    embedding: ws,
});

