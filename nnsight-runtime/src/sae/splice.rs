//! An SAE applied to a model's activation inside a `trace!` block: functions on the real
//! tensors that a block calls on a hook point's value (a call with a proxy argument runs as a
//! node while the model runs).
//!
//! ```ignore
//! model.encoder.layer[2].output = nnsight::sae::reconstruct(&sae, &model.encoder.layer[2].output);
//! model.encoder.layer[2].output = nnsight::sae::splice(&sae, &model.encoder.layer[2].output);  // + error term
//! ```
//!
//! They take the value as it is (`[.., d_in]`, any float dtype) and return the same shape and
//! dtype, so the result can be swapped back in. A bad activation (another last dimension, an
//! integer tensor, another device, a value over 65504 for a float16 SAE) stops them with a
//! message naming the SAE's `d_in` and the shape, or the value; inside `trace!` that is an
//! [`crate::Error::Node`] naming the node, and the trace returns it.
//!
//! The error term (`x - reconstruct(x)`, SAELens' `use_error_term`) is added as
//! `x + (decode(edited latents) - decode(latents))`, which is the same sum
//! `recon_edited + (x - recon)` in another order: when the latents are not edited, both decodes
//! compute the same bits, their difference is exactly 0 and the spliced value is `x` bit for
//! bit, so the model's output is unchanged.

use tch::Tensor;

use super::{Sae, Undo};

/// [`Sae::checked_input`], panicking with its error (module docs).
fn checked(sae: &Sae, x: &Tensor) -> (Tensor, Undo) {
    sae.checked_input(x).unwrap_or_else(|e| panic!("{e}"))
}

/// The latents `[.., d_sae]` of `x [.., d_in]`, in the SAE's dtype (see [`Sae::encode`]).
/// Panics on a bad `x` (module docs).
pub fn latents(sae: &Sae, x: &Tensor) -> Tensor {
    let (xn, _) = checked(sae, x);
    sae.encoder.call(xn)
}

/// The SAE's reconstruction of `x [.., d_in]`, in `x`'s dtype, without the error term: swapping
/// it in replaces the activation by what the SAE keeps of it. Panics on a bad `x` (module docs).
pub fn reconstruct(sae: &Sae, x: &Tensor) -> Tensor {
    sae.reconstruct_prepared(checked(sae, x), x.kind())
}

/// `x` through the SAE with the error term added back: equal to `x` bit for bit (module docs).
/// What [`splice_edited`] computes with no edit; use that one to ablate or steer latents.
pub fn splice(sae: &Sae, x: &Tensor) -> Tensor {
    splice_edited(sae, x, |_| {})
}

/// `x [.., d_in]` with the latents edited by `edit` and the error term added back:
/// `x + unnormalize(decode(z')) - unnormalize(decode(z))` where `z` are the latents of `x` and
/// `z'` what `edit` made of a copy of them (`[.., d_sae]`, the SAE's dtype). Feature ablation:
/// `|z| { let _ = z.narrow(-1, f, 1).fill_(0.0); }`; steering: `|z| { let _ = z.narrow(-1, f, 1).fill_(8.0); }`.
/// Returns `x`'s shape and dtype. Panics on a bad `x` (module docs) or when `edit` changes the
/// latents' shape.
pub fn splice_edited(sae: &Sae, x: &Tensor, edit: impl FnOnce(&mut Tensor)) -> Tensor {
    let kind = x.kind();
    let (xn, undo) = checked(sae, x);
    let z = sae.encoder.call(xn);
    let mut edited = z.copy();
    edit(&mut edited);
    if edited.size() != z.size() {
        panic!("the edit changed the SAE latents' shape from {:?} to {:?}", z.size(), edited.size());
    }
    let clean = undo.apply(sae.decoder.call(z));
    let changed = undo.apply(sae.decoder.call(edited));
    x + (changed - clean).to_kind(kind)
}
