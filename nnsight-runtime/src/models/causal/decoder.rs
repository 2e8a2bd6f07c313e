//! [`Decoder`]: the parts of a decoder-only LM that an experiment can name without naming the
//! family — the residual stream (each layer's output), the attention and MLP of a layer, the
//! hook points inside attention, the final norm and the unembedding.
//!
//! Family-specific paths stay typed where the family is named (`model.transformer.h[3]` for
//! GPT-2, `model.model.layers[3]` for Llama). Code generic over `M: Decoder` reaches the same
//! modules through methods, which `trace!` accepts inside a module path:
//!
//! ```ignore
//! fn residual<M: Decoder + TextModel>(model: &LanguageModel<M>, prompt: &str) -> nnsight::Result<Vec<Tensor>> {
//!     let n = model.layers().len();
//!     trace!(model, prompt, {
//!         let mut out = Vec::new();
//!         for l in 0..n {
//!             out.push(model.layers()[l].output.save());           // [batch, seq, hidden]
//!         }
//!         let probs = model.attn_point(0, AttnPoint::Probs).output.save(); // [batch, heads, q, k]
//!         out
//!     })
//! }
//! ```
//!
//! [`super::super::auto::AutoCausalLm`] loads any supported family by the `model_type` of its
//! `config.json` and hands the concrete model to such generic code.

use tch::Tensor;

use super::{CausalLm, LmHead};
use crate::activation::Activation;
use crate::error::Result;
use crate::hook::{HookModule, Hooked, ModuleList};
use crate::private::IndexArg;
use crate::models::point::HookPoint;

/// One of the five hook points inside every bundled attention module (see
/// [`crate::models::point`]; TransformerLens' `hook_q`, `hook_k`, `hook_attn_scores`,
/// `hook_pattern`, `hook_z`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnPoint {
    /// Queries after the head split (and rotary where the family has it),
    /// `[batch, heads, seq, head_dim]`.
    Q,
    /// Keys, cached + new (after rotary and grouped-query repetition),
    /// `[batch, heads, past + seq, head_dim]`.
    K,
    /// `q kᵀ · scaling + mask` (and soft-cap where the family has one) before the softmax,
    /// `[batch, heads, seq, past + seq]`.
    Scores,
    /// The attention probabilities, `[batch, heads, seq, past + seq]`.
    Probs,
    /// Each head's output before the output projection, `[batch, seq, heads, head_dim]`.
    Z,
}

impl AttnPoint {
    /// The field name of the hook point in every attention module (`q`, `k`, `scores`,
    /// `probs`, `z`).
    pub fn name(self) -> &'static str {
        match self {
            AttnPoint::Q => "q",
            AttnPoint::K => "k",
            AttnPoint::Scores => "scores",
            AttnPoint::Probs => "probs",
            AttnPoint::Z => "z",
        }
    }
}

/// An attention module holding the five [`AttnPoint`] hook points as fields `q`, `k`,
/// `scores`, `probs`, `z` (every bundled family's; implemented for each by a private macro).
pub trait AttnHookPoints {
    /// The hook point `point` of this attention module.
    fn hook_point(&self, point: AttnPoint) -> &Hooked<HookPoint>;
}

/// [`AttnHookPoints`] for attention modules whose hook points are the fields `q`, `k`,
/// `scores`, `probs` and `z`.
macro_rules! attn_points {
    ($($ty:ty),+ $(,)?) => {$(
        impl AttnHookPoints for $ty {
            fn hook_point(&self, point: AttnPoint) -> &Hooked<HookPoint> {
                match point {
                    AttnPoint::Q => &self.q,
                    AttnPoint::K => &self.k,
                    AttnPoint::Scores => &self.scores,
                    AttnPoint::Probs => &self.probs,
                    AttnPoint::Z => &self.z,
                }
            }
        }
    )+};
}

attn_points!(
    crate::models::gpt2::Gpt2Attention,
    crate::models::llama::LlamaAttention,
    crate::models::gpt_neox::GptNeoXAttention,
    crate::models::gemma2::Gemma2Attention,
    crate::models::gemma3::Gemma3Attention,
    crate::models::qwen3::Qwen3Attention,
    crate::models::olmo2::Olmo2Attention,
    crate::models::phi3::Phi3Attention,
);

/// A decoder-only causal LM seen through the parts every family has.
///
/// Every method returns the model's own [`Hooked`] module, so its hook points are the same ones
/// the family's typed path reaches (`model.layers()[3]` *is* `model.transformer.h[3]` on GPT-2):
/// a read, an edit or a cache entry through either is the same. The per-layer accessors take a
/// layer index (any integer type, negative from the end) and return `Result`: in `trace!` an
/// index out of range is the trace's [`crate::Error::IndexOutOfRange`], as for `layers()[i]`.
pub trait Decoder: CausalLm {
    /// A decoder layer: output the residual stream after it, `[batch, seq, hidden]`; its first
    /// input (`.input`) the residual stream before it.
    type Layer: HookModule<Output = Tensor, Input: Activation<First = Tensor>>;
    /// A layer's attention: output `[batch, seq, hidden]` before it is added to the residual.
    type Attn: HookModule<Output = Tensor> + AttnHookPoints + 'static;
    /// A layer's MLP: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    type Mlp: HookModule<Input = Tensor, Output = Tensor>;
    /// The MLP's activation hook point: `[batch, seq, intermediate]` (TransformerLens' `hook_post`).
    type MlpAct: HookModule<Input = Tensor, Output = Tensor>;
    /// The final norm: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    type Norm: HookModule<Input = Tensor, Output = Tensor>;

    /// The decoder layers in order (`transformer.h`, `model.layers`, `gpt_neox.layers`, ...).
    /// The input of layer 0 is the embedding as the residual stream starts.
    fn layers(&self) -> &Vec<Hooked<Self::Layer>>;
    /// A layer's attention module (`transformer.h.3.attn`, `model.layers.3.self_attn`, ...).
    fn layer_attn(layer: &Hooked<Self::Layer>) -> &Hooked<Self::Attn>;
    /// A layer's MLP module.
    fn layer_mlp(layer: &Hooked<Self::Layer>) -> &Hooked<Self::Mlp>;
    /// A layer's MLP activation hook point (`mlp.act`).
    fn layer_mlp_act(layer: &Hooked<Self::Layer>) -> &Hooked<Self::MlpAct>;
    /// One hook point inside a layer's attention.
    fn layer_attn_point(layer: &Hooked<Self::Layer>, point: AttnPoint) -> &Hooked<HookPoint> {
        Self::layer_attn(layer).hook_point(point)
    }

    /// Layer `index` (negative counts from the end, as `layers()[i]` in `trace!`).
    /// [`crate::Error::IndexOutOfRange`] naming the list's module path when there is none.
    fn layer(&self, index: impl IndexArg) -> Result<&Hooked<Self::Layer>> {
        self.layers().module_at(index.into_i64())
    }
    /// Layer `index`'s attention module; errors as [`Decoder::layer`].
    fn attn(&self, index: impl IndexArg) -> Result<&Hooked<Self::Attn>> {
        self.layer(index).map(Self::layer_attn)
    }
    /// Layer `index`'s MLP module; errors as [`Decoder::layer`].
    fn mlp(&self, index: impl IndexArg) -> Result<&Hooked<Self::Mlp>> {
        self.layer(index).map(Self::layer_mlp)
    }
    /// Layer `index`'s MLP activation (`mlp.act`), `[batch, seq, intermediate]`; errors as
    /// [`Decoder::layer`].
    fn mlp_act(&self, index: impl IndexArg) -> Result<&Hooked<Self::MlpAct>> {
        self.layer(index).map(Self::layer_mlp_act)
    }
    /// One hook point inside layer `index`'s attention; errors as [`Decoder::layer`].
    fn attn_point(&self, index: impl IndexArg, point: AttnPoint) -> Result<&Hooked<HookPoint>> {
        self.layer(index).map(|l| Self::layer_attn_point(l, point))
    }
    /// The final norm before the unembedding (`transformer.ln_f`, `model.norm`,
    /// `gpt_neox.final_layer_norm`, ...).
    fn final_norm(&self) -> &Hooked<Self::Norm>;
    /// The unembedding (`lm_head`, GPT-NeoX's `embed_out`).
    fn unembedding(&self) -> &Hooked<LmHead>;
    /// Device of the final norm's weights: the last device of a [`super::DeviceMap`], else the
    /// model's device. [`Decoder::unembed`] moves its input there.
    fn final_norm_device(&self) -> tch::Device {
        self.device()
    }

    /// Logits from a residual-stream value, as the model computes them from its last layer's
    /// output: `final_norm` then the unembedding, then whatever the family does after it
    /// (Gemma 2's final soft-cap). This is the logit lens's map. `h`: `[batch, seq, hidden]`;
    /// returns `[batch, seq, vocab]`. Inside an intervention the modules run as plain
    /// functions (untraced).
    fn unembed(&self, h: &Tensor) -> Tensor {
        self.unembedding().call(self.final_norm().call(super::device_map::to(h.shallow_clone(), self.final_norm_device())))
    }
}
