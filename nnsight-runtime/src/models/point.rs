//! Hook points on intermediate tensors inside attention and the MLP (issue 15, item 2).
//!
//! A [`HookPoint`] is an identity module without weights: the bundled models call a
//! `Hooked<HookPoint>` on a tensor that no submodule returns (the attention probabilities, each
//! head's output) so that a trace can read it as `.output` (or `.input`, the same value) and
//! replace it; the rest of the forward uses whatever the hook point returns. Outside a trace a
//! call costs what every [`Hooked::call`] costs: one thread-local read.
//!
//! Every bundled attention module has the same five points, named like TransformerLens' hooks
//! (`hook_q`, `hook_k`, `hook_attn_scores`, `hook_pattern`, `hook_z`), and every MLP one `act`
//! (TransformerLens' `hook_post`):
//!
//! | point    | value                                                         | shape                         |
//! |----------|---------------------------------------------------------------|-------------------------------|
//! | `q`      | queries after the head split (Llama: after rotary)            | `[batch, heads, seq, head_dim]` |
//! | `k`      | keys, cached + new (Llama: after rotary and `repeat_kv`)      | `[batch, heads, past + seq, head_dim]` |
//! | `scores` | `q kᵀ · scaling + mask`, before the softmax                   | `[batch, heads, seq, past + seq]` |
//! | `probs`  | `softmax(scores)`                                             | `[batch, heads, seq, past + seq]` |
//! | `z`      | `probs v`, each head's output before the output projection    | `[batch, seq, heads, head_dim]` |
//!
//! Sources: transformers' `modeling_gpt2.py`, `modeling_llama.py` and `modeling_bert.py`
//! (`eager_attention_forward`): `attn_weights = matmul(q, kᵀ) * scaling + mask`,
//! `softmax(attn_weights, dim=-1, dtype=float32)`, `matmul(attn_weights, v).transpose(1, 2)`.

use tch::{nn, Kind, Tensor};

use crate::activation::Layout;
use crate::hook::{HookModule, Hooked};
use crate::models::ROWS;
use crate::tree::ModuleTree;

/// An identity module: a named place in a forward pass where a trace can read or replace a
/// tensor. Input and output are the same tensor, `[batch, ..]` (rows on dim 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookPoint;

impl HookPoint {
    /// A hook point named `name` under `p` (module path `{p}.{name}`), no variables.
    pub fn new(p: &nn::Path, name: &str) -> Hooked<HookPoint> {
        Hooked::new(&(p / name), HookPoint)
    }
}

/// A leaf: no hooked children.
impl ModuleTree for HookPoint {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for HookPoint {
    /// Any tensor `[batch, ..]`.
    type Input = Tensor;
    /// The input, unchanged.
    type Output = Tensor;
    /// Rows on dim 0.
    fn input_layout(&self) -> Layout {
        ROWS
    }
    /// Rows on dim 0.
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, x: Tensor) -> Tensor {
        x
    }
}

/// The five attention hook points of one attention module, borrowed for
/// [`AttentionPoints::attend`].
pub(crate) struct AttentionPoints<'a> {
    pub q: &'a Hooked<HookPoint>,
    pub k: &'a Hooked<HookPoint>,
    pub scores: &'a Hooked<HookPoint>,
    pub probs: &'a Hooked<HookPoint>,
    pub z: &'a Hooked<HookPoint>,
}

impl AttentionPoints<'_> {
    /// Eager scaled dot-product attention through the hook points (transformers'
    /// `eager_attention_forward`), each stage using the hooked value of the one before:
    /// `q`, `k` → `scores = q kᵀ · scaling + mask` → `probs = softmax(scores)` in f32, cast to
    /// `v`'s dtype → `z = (probs v)ᵀ₁₂` → heads merged.
    ///
    /// `q`: `[batch, heads, seq, head_dim]`; `k`, `v`: `[batch, heads, total, head_dim]` (repeated
    /// for grouped-query attention); `mask`: additive, broadcast to `[batch, heads, seq, total]`.
    /// `upcast_scores`: add the mask to the scores in f32 (the causal models) rather than in
    /// the scores' dtype (BERT). Returns `[batch, seq, heads * head_dim]`.
    pub fn attend(&self, q: Tensor, k: Tensor, v: &Tensor, mask: &Tensor, scaling: f64, upcast_scores: bool) -> Tensor {
        let q = self.q.call(q);
        let k = self.k.call(k);
        let raw = q.matmul(&k.transpose(-1, -2)) * scaling;
        let scores = if upcast_scores { raw.to_kind(Kind::Float) + mask } else { raw + mask };
        let scores = self.scores.call(scores);
        let probs = self.probs.call(scores.softmax(-1, Kind::Float).to_kind(v.kind()));
        let z = self.z.call(probs.matmul(v).transpose(1, 2));
        let size = z.size();
        z.contiguous().reshape([size[0], size[1], -1])
    }

    /// [`AttentionPoints::attend`] with Gemma 2's attention-logit soft-cap (transformers'
    /// `eager_attention_forward` with `softcap`): `raw = q kᵀ · scaling`, then
    /// `tanh(raw / cap) · cap` in the scores' dtype, then `+ mask` in f32 → `scores` →
    /// `probs = softmax(scores)` (f32, cast to `v`'s dtype) → `z`. The `scores` point sees the
    /// capped, masked values (visible entries within `[-cap, cap]`). `cap = None` computes
    /// exactly what `attend(.., upcast_scores = true)` computes. Shapes as in `attend`.
    pub fn attend_softcapped(&self, q: Tensor, k: Tensor, v: &Tensor, mask: &Tensor, scaling: f64, cap: Option<f64>) -> Tensor {
        let q = self.q.call(q);
        let k = self.k.call(k);
        let raw = q.matmul(&k.transpose(-1, -2)) * scaling;
        let raw = match cap {
            Some(cap) => (raw / cap).tanh() * cap,
            None => raw,
        };
        let scores = self.scores.call(raw.to_kind(Kind::Float) + mask);
        let probs = self.probs.call(scores.softmax(-1, Kind::Float).to_kind(v.kind()));
        let z = self.z.call(probs.matmul(v).transpose(1, 2));
        let size = z.size();
        z.contiguous().reshape([size[0], size[1], -1])
    }
}
