//! Sparse autoencoders (SAEs): loading SAELens and Gemma Scope folders, encoding, decoding, and
//! an SAE as a hookable module whose latents are a hook point.
//!
//! An SAE maps an activation `x [.., d_in]` to latents `z [.., d_sae]` and back (SAELens
//! `sae_lens/saes/*.py`; Gemma Scope's reference JumpReLU SAE):
//!
//! ```text
//! x'     = normalize(x)                          (normalize_activations; identity for "none")
//! pre    = (x' - b_dec·apply_b_dec_to_input) @ W_enc + b_enc
//! z      = act(pre)                              (ReLU, JumpReLU or TopK: see Architecture)
//! recon  = unnormalize(z @ W_dec + b_dec)
//! ```
//!
//! [`Sae`] is a [`HookModule`] (input `x`, output `recon`) with two hooked children:
//! `encoder` (its output is the latents, `sae.encoder.output` in `trace!`) and `decoder`
//! (`z @ W_dec + b_dec`). Load one with [`Sae::load`] (either format), trace it on its own
//! (`trace!(sae, &x, { sae.encoder.output[.., 7] = 0.0; sae.output.save() })`), or splice it
//! into a model's trace with [`splice`] / [`splice_edited`] (see the guide chapter
//! `sae_and_harvest`).

mod config;
mod load;
mod splice;

use std::fmt;

use tch::{Device, Kind, Tensor};

pub use config::{Architecture, Normalization, SaeConfig, MAX_CFG_BYTES};
pub use splice::{latents, reconstruct, splice, splice_edited};

use crate::error::{catch_quiet, Error, Result};
use crate::hook::{HookModule, Hooked};
use crate::tree::ModuleTree;

/// The encoder: `z = act((x - b_dec·apply) @ W_enc + b_enc)`, `[.., d_in] -> [.., d_sae]`.
/// Its output is the SAE's latents hook point (`sae.encoder.output`).
pub struct SaeEncoder {
    /// `W_enc [d_in, d_sae]`.
    pub w_enc: Tensor,
    /// `b_enc [d_sae]`.
    pub b_enc: Tensor,
    /// `b_dec [d_in]`, subtracted from the input when the config's `apply_b_dec_to_input`.
    pub b_dec_in: Option<Tensor>,
    /// `threshold [d_sae]` (JumpReLU only).
    pub threshold: Option<Tensor>,
    /// The activation function.
    pub architecture: Architecture,
}

/// The decoder: `z @ W_dec + b_dec`, `[.., d_sae] -> [.., d_in]` (before any
/// un-normalization, which [`Sae`]'s forward does).
pub struct SaeDecoder {
    /// `W_dec [d_sae, d_in]`.
    pub w_dec: Tensor,
    /// `b_dec [d_in]`.
    pub b_dec: Tensor,
}

/// A sparse autoencoder (module docs). Traceable as `Hooked<Sae>` ([`Sae::load`] returns one
/// with module path `""`; children `encoder`, `decoder`).
pub struct Sae {
    /// Hook point of the latents: `encoder.output [.., d_sae]`.
    pub encoder: Hooked<SaeEncoder>,
    /// `decoder.output [.., d_in]`: `z @ W_dec + b_dec`.
    pub decoder: Hooked<SaeDecoder>,
    /// The hyper-parameters.
    pub config: SaeConfig,
}

impl HookModule for SaeEncoder {
    /// `x [.., d_in]`, already normalized, in the SAE's dtype.
    type Input = Tensor;
    /// Latents `[.., d_sae]`.
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let x = match &self.b_dec_in {
            Some(b) => x - b,
            None => x,
        };
        let pre = x.matmul(&self.w_enc) + &self.b_enc;
        match (self.architecture, &self.threshold) {
            (Architecture::Standard, _) => pre.relu(),
            (Architecture::JumpRelu, Some(th)) => pre.relu() * pre.gt_tensor(th).to_kind(pre.kind()),
            (Architecture::JumpRelu, None) => unreachable!("a JumpReLU SAE is built with its threshold"),
            (Architecture::TopK { k }, _) => {
                let (values, indices) = pre.topk(k, -1, true, true);
                pre.zeros_like().scatter(-1, &indices, &values.relu())
            }
        }
    }
}

impl HookModule for SaeDecoder {
    /// Latents `[.., d_sae]`.
    type Input = Tensor;
    /// `[.., d_in]`.
    type Output = Tensor;
    fn forward(&self, z: Tensor) -> Tensor {
        z.matmul(&self.w_dec) + &self.b_dec
    }
}

impl HookModule for Sae {
    /// An activation `[.., d_in]` of any float dtype (converted to the SAE's).
    type Input = Tensor;
    /// The reconstruction `[.., d_in]` in the input's dtype.
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let prepared = self.prepare(&x).unwrap_or_else(|e| panic!("{e}"));
        self.reconstruct_prepared(prepared, x.kind())
    }
}

/// Undoes [`normalize`] on a reconstruction.
pub(crate) enum Undo {
    None,
    Divide(Tensor),
    Affine { std: Tensor, mean: Tensor },
}

impl Undo {
    /// Whether undoing is possible: its factors finite, the divisor not 0 (a row whose norm
    /// overflowed to infinity gets the divisor 0).
    fn finite(&self) -> bool {
        let all = |t: &Tensor| t.isfinite().all().int64_value(&[]) != 0;
        match self {
            Undo::None => true,
            Undo::Divide(c) => all(c) && c.eq(0.0).any().int64_value(&[]) == 0,
            Undo::Affine { std, mean } => all(std) && all(mean),
        }
    }

    pub(crate) fn apply(&self, y: Tensor) -> Tensor {
        match self {
            Undo::None => y,
            Undo::Divide(c) => y / c,
            Undo::Affine { std, mean } => y * std + mean,
        }
    }
}

/// SAELens' run-time normalization of `x [.., d_in]` (see [`Normalization`]).
pub(crate) fn normalize(x: &Tensor, mode: Normalization) -> (Tensor, Undo) {
    match mode {
        Normalization::None => (x.shallow_clone(), Undo::None),
        Normalization::ConstantNormRescale => {
            let d_in = *x.size().last().unwrap_or(&1) as f64;
            let norm = x.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
            // A zero row (after a zero ablation, say) stays zero: SAELens' `sqrt(d) / ‖x‖` is
            // infinite there and would turn the row, and its spliced error term, into NaN.
            let norm = norm.masked_fill(&norm.eq(0.0), 1.0);
            let coeff = norm.reciprocal() * d_in.sqrt();
            (x * &coeff, Undo::Divide(coeff))
        }
        Normalization::LayerNorm => {
            let mean = x.mean_dim([-1i64].as_slice(), true, None);
            let centred = x - &mean;
            let std = centred.std_dim([-1i64].as_slice(), true, true);
            ((&centred) / (&std + 1e-5), Undo::Affine { std, mean })
        }
    }
}

impl ModuleTree for Sae {
    fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str)) {
        self.encoder.visit_modules(f);
        self.decoder.visit_modules(f);
    }
}

impl ModuleTree for SaeEncoder {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl ModuleTree for SaeDecoder {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

/// The weights of an SAE by key (`W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold`).
pub struct SaeWeights {
    /// `W_enc [d_in, d_sae]`.
    pub w_enc: Tensor,
    /// `b_enc [d_sae]`.
    pub b_enc: Tensor,
    /// `W_dec [d_sae, d_in]`.
    pub w_dec: Tensor,
    /// `b_dec [d_in]`.
    pub b_dec: Tensor,
    /// `threshold [d_sae]`, JumpReLU only.
    pub threshold: Option<Tensor>,
}

impl Sae {
    /// Builds an SAE from its config and weights, as a root module (path `""`) ready to trace.
    /// The weights are converted to `kind` (a float kind) and moved to `device`.
    ///
    /// Errors: [`Error::Input`] when a weight's shape is not the one the config implies (naming
    /// the key and both shapes), when a weight holds NaN or infinite values (as `kind`), when a
    /// JumpReLU SAE has no threshold or another one has one, for a TopK `k` outside
    /// `1..=d_sae`, or for a non-float `kind`; [`Error::Device`] for a device this build or machine lacks
    /// (see `models::checkpoint::check_device`); [`Error::Tch`] when the conversion fails.
    pub fn from_weights(config: SaeConfig, w: SaeWeights, kind: Kind, device: Device) -> Result<Hooked<Sae>> {
        crate::models::checkpoint::check_device(device)?;
        if !matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16) {
            return Err(Error::Input(format!("an SAE's weights must be a float kind, not {kind:?}")));
        }
        let jump = config.architecture == Architecture::JumpRelu;
        if jump != w.threshold.is_some() {
            return Err(Error::Input(if jump {
                "a JumpReLU SAE needs `threshold [d_sae]`".into()
            } else {
                format!("`threshold` is only used by JumpReLU SAEs, this one is {:?}", config.architecture)
            }));
        }
        if let Architecture::TopK { k } = config.architecture {
            if k < 1 || k > config.d_sae {
                return Err(Error::Input(format!("a TopK SAE keeps k latents per row: k must be from 1 to d_sae = {}, not {k}", config.d_sae)));
            }
        }
        let given = [("W_enc", &w.w_enc), ("b_enc", &w.b_enc), ("W_dec", &w.w_dec), ("b_dec", &w.b_dec)];
        let given = given.into_iter().chain(w.threshold.as_ref().map(|t| ("threshold", t)));
        for ((key, t), (_, shape)) in given.zip(config.weight_shapes()) {
            if t.size() != shape {
                return Err(Error::Input(format!("SAE weight `{key}` has shape {:?}, the config implies {shape:?}", t.size())));
            }
            // A NaN or infinite weight (as stored, or overflowing `kind`) gives NaN latents later.
            let finite = t.f_to_kind(kind)?.isfinite().all().int64_value(&[]) != 0;
            if !finite {
                return Err(Error::Input(format!("SAE weight `{key}` holds NaN or infinite values (as {kind:?})")));
            }
        }
        let conv = |t: &Tensor| -> Result<Tensor> { Ok(t.f_to_kind(kind)?.f_to_device(device)?.detach()) };
        let b_dec = conv(&w.b_dec)?;
        let encoder = SaeEncoder {
            w_enc: conv(&w.w_enc)?,
            b_enc: conv(&w.b_enc)?,
            b_dec_in: config.apply_b_dec_to_input.then(|| b_dec.shallow_clone()),
            threshold: w.threshold.as_ref().map(conv).transpose()?,
            architecture: config.architecture,
        };
        let decoder = SaeDecoder { w_dec: conv(&w.w_dec)?, b_dec };
        Ok(Hooked::with_path(
            "",
            Sae { encoder: Hooked::with_path("encoder", encoder), decoder: Hooked::with_path("decoder", decoder), config },
        ))
    }

    /// The dtype of the weights.
    pub fn kind(&self) -> Kind {
        self.encoder.w_enc.kind()
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.encoder.w_enc.device()
    }

    /// `Ok` if `x` can be encoded: a float tensor `[.., d_in]` on the SAE's device; else
    /// [`Error::Input`] naming the expected and actual shape, dtype or device.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let size = x.size();
        if size.last() != Some(&self.config.d_in) {
            return Err(Error::Input(format!(
                "the SAE takes activations [.., d_in = {}], got shape {size:?}",
                self.config.d_in
            )));
        }
        if !x.is_floating_point() {
            return Err(Error::Input(format!("the SAE takes float activations, got {:?}", x.kind())));
        }
        if x.device() != self.device() {
            return Err(Error::Device(format!("the SAE is on {:?}, the activation on {:?}", self.device(), x.device())));
        }
        Ok(())
    }

    /// `x [.., d_in]` in the SAE's dtype, normalized (the encoder's input), and how to undo the
    /// normalization. Errs (the message) when a finite activation becomes infinite or NaN on
    /// the way: a value over a float16 SAE's 65504, or a row whose norm or spread overflows.
    /// The SAE would give NaN or infinity for such a row, which is never the activation's
    /// reconstruction.
    pub(crate) fn prepare(&self, x: &Tensor) -> std::result::Result<(Tensor, Undo), String> {
        let (xn, undo) = normalize(&x.to_kind(self.kind()), self.config.normalize_activations);
        let broken = xn.isfinite().all().int64_value(&[]) == 0 || !undo.finite();
        if broken && x.isfinite().all().int64_value(&[]) != 0 {
            return Err(format!(
                "the activation (largest magnitude {:e}) overflows the SAE's dtype {:?} (normalization {:?}): \
                 load the SAE with Kind::Float",
                x.abs().max().double_value(&[]),
                self.kind(),
                self.config.normalize_activations
            ));
        }
        Ok((xn, undo))
    }

    /// [`Sae::check_input`], then [`Sae::prepare`]: the encoder's input and the undoing of its
    /// normalization. Errors: `check_input`'s; [`Error::Input`] when the activation overflows
    /// the SAE's dtype; [`Error::Model`] if libtorch fails.
    pub(crate) fn checked_input(&self, x: &Tensor) -> Result<(Tensor, Undo)> {
        self.check_input(x)?;
        catch_quiet(|| self.prepare(x)).map_err(Error::Model)?.map_err(Error::Input)
    }

    /// The reconstruction in `kind` from what [`Sae::prepare`] gave.
    pub(crate) fn reconstruct_prepared(&self, (xn, undo): (Tensor, Undo), kind: Kind) -> Tensor {
        let z = self.encoder.call(xn);
        undo.apply(self.decoder.call(z)).to_kind(kind)
    }

    /// The latents `[.., d_sae]` of `x [.., d_in]` (SAELens `encode`: normalization, `b_dec`,
    /// encoder, activation), in the SAE's dtype. Errors: [`Sae::check_input`]'s;
    /// [`Error::Input`] when the activation overflows the SAE's dtype (a value over 65504 for
    /// a float16 SAE); [`Error::Model`] if libtorch fails.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (xn, _) = self.checked_input(x)?;
        catch_quiet(|| self.encoder.call(xn)).map_err(Error::Model)
    }

    /// `z @ W_dec + b_dec` for latents `z [.., d_sae]` (SAELens `decode`, before it undoes the
    /// input normalization: for `normalize_activations` other than `"none"` this is in the
    /// normalized space; [`Sae::reconstruct`] undoes it). Errors: [`Error::Input`] for another
    /// last dimension or a non-float tensor; [`Error::Model`] if libtorch fails.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        if z.size().last() != Some(&self.config.d_sae) || !z.is_floating_point() {
            return Err(Error::Input(format!(
                "the SAE decodes float latents [.., d_sae = {}], got {:?} {:?}",
                self.config.d_sae,
                z.kind(),
                z.size()
            )));
        }
        catch_quiet(|| self.decoder.call(z.to_kind(self.kind()))).map_err(Error::Model)
    }

    /// The reconstruction of `x [.., d_in]` (the module's forward), in `x`'s dtype. Errors as
    /// [`Sae::encode`].
    pub fn reconstruct(&self, x: &Tensor) -> Result<Tensor> {
        let prepared = self.checked_input(x)?;
        catch_quiet(|| self.reconstruct_prepared(prepared, x.kind())).map_err(Error::Model)
    }
}

impl fmt::Debug for Sae {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sae").field("config", &self.config).finish_non_exhaustive()
    }
}
