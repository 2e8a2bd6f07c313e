//! Mistral in tch, every submodule hookable: Llama with a sliding attention window.
//!
//! Architecture: Jiang et al. 2023, "Mistral 7B" (arXiv:2310.06825), as implemented by Hugging
//! Face transformers' `models/mistral/modeling_mistral.py` (`MistralForCausalLM`, eager
//! attention), itself generated from Llama's (`modular_mistral.py`). The differences from
//! [`super::llama`]:
//!
//! - `sliding_window` (when not `null`): every layer's query sees only the last
//!   `sliding_window` positions, its own included ([`causal::sliding_window_mask`]; transformers'
//!   `create_sliding_window_causal_mask`, `kv_idx > q_idx - sliding_window`). The KV cache
//!   keeps every key and the mask hides the old ones, so cached steps compute what a full
//!   recompute of the sequence computes;
//! - a `head_dim` key may set the head width apart from `hidden_size / num_attention_heads`;
//! - no projection has a bias (no `attention_bias` / `mlp_bias` keys).
//!
//! Everything else is Llama's, and so are the modules (their type names say so): the tree is
//!
//! ```text
//! Mistral                             (root, path "")   Input CausalInput, Output logits
//! ├── model                           LlamaModel        embed_tokens, rotary_emb, layers[i], norm
//! │   └── layers[i]                   LlamaDecoderLayer input_layernorm, self_attn, post_attention_layernorm, mlp
//! │       ├── self_attn               LlamaAttention    q_proj, k_proj, v_proj, o_proj (no biases);
//! │       │                                             hook points q, k, scores, probs, z
//! │       └── mlp                     LlamaMlp          gate_proj, up_proj, down_proj, act_fn; hook point act
//! └── lm_head                         LmHead            (embed_tokens' weight if tie_word_embeddings)
//! ```
//!
//! The `probs` hook point of a layer is exactly 0 outside the window.
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `hidden_size`.


use tch::nn;

use super::causal::{self, LmHead};
use super::llama::{LlamaAttention, LlamaDecoderLayer, LlamaMlp, LlamaModel, RmsNorm};
use super::params;

use crate::error::Result;
use crate::hook::Hooked;
use nnsight_macros::ModuleTree;

mod config;
pub use config::MistralConfig;

/// A Mistral model with its language-model head (transformers' `MistralForCausalLM`).
///
/// Input [`CausalInput`](super::causal::CausalInput), output logits `[batch, seq, vocab]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Mistral {
    /// `model`: embeddings, decoder layers, final norm (Llama's, each layer with the window).
    pub model: Hooked<LlamaModel>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: MistralConfig,
}

impl Mistral {
    /// A model with zero weights as variables under `p` (use `vs.root()`: variable names are
    /// the checkpoint keys). `lm_head.weight` is a variable unless `tie_word_embeddings`.
    /// Errors: [`crate::Error::Config`] for a config failing [`MistralConfig::validate`],
    /// [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &MistralConfig) -> Result<Mistral> {
        const WHAT: &str = "<MistralConfig given to Mistral::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        let llama = config.llama();
        params::building(WHAT, || {
            let pm = p / "model";
            let windows = vec![config.sliding_window; llama.num_hidden_layers.max(0) as usize];
            let model = LlamaModel::new(&pm, &llama)?.with_windows(windows);
            let tied = config.tie_word_embeddings.then_some(&model.embed_tokens.ws);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.hidden_size);
            Ok(Mistral { model: Hooked::new(&pm, model), lm_head, config: config.clone() })
        })
    }
}

super::causal::causal_family!(Mistral, MistralConfig {
    layer: LlamaDecoderLayer,
    attn: LlamaAttention,
    mlp: LlamaMlp,
    norm: RmsNorm,
    embedding: ws,
});

