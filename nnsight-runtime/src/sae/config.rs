//! An SAE's configuration: SAELens' `cfg.json`, read and checked before any weight is touched.
//!
//! Fields read (SAELens 6 and earlier; `sae_lens/saes/sae.py`, `SAEConfig`):
//!
//! | field | meaning |
//! |---|---|
//! | `architecture` | `"standard"` (ReLU), `"jumprelu"`, `"topk"`; other architectures are refused |
//! | `d_in`, `d_sae` | input width and number of latents |
//! | `k` | TopK: latents kept per row (SAELens 6) |
//! | `activation_fn_str`, `activation_fn_kwargs.k` | before SAELens 6, TopK was `"standard"` with `activation_fn_str = "topk"` |
//! | `apply_b_dec_to_input` | subtract `b_dec` from the input before encoding (default `true`) |
//! | `normalize_activations` | `"none"`, `"constant_norm_rescale"`, `"layer_norm"`; `"expected_average_only_in"` is refused (its factor is not in the folder) |
//! | `hook_name`, `model_name` | where the SAE was trained (top level, or in `metadata` / `meta` since SAELens 6) |
//! | `reshape_activations` | only `"none"` (a `hook_z` SAE is refused) |
//! | `rescale_acts_by_decoder_norm` | TopK: only `false` |

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The encoder's activation function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `latents = relu(pre)`.
    Standard,
    /// `latents = relu(pre) * (pre > threshold)`: a latent keeps its pre-activation only where
    /// it is strictly above its threshold (Rajamanoharan et al. 2024, "Jumping Ahead"; SAELens
    /// `JumpReLUSAE.encode`; Gemma Scope).
    JumpRelu,
    /// `latents = relu` of the `k` largest pre-activations of each row, 0 elsewhere (Gao et al.
    /// 2024; SAELens `TopK`). Ties at the k-th value: libtorch's `topk` picks which.
    TopK {
        /// Latents kept per row.
        k: i64,
    },
}

/// How the input is normalized before encoding, and the reconstruction un-normalized after
/// decoding (SAELens `_setup_activation_normalization`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    /// The input as it is.
    None,
    /// `x * sqrt(d_in) / ||x||` per row; the reconstruction is divided by the same factor. A zero
    /// row stays zero (SAELens divides by its zero norm and gives NaN).
    ConstantNormRescale,
    /// `(x - mean) / (std + 1e-5)` per row (`std` with Bessel's correction, as `torch.std`);
    /// the reconstruction is multiplied by `std` and `mean` added back.
    LayerNorm,
}

/// An SAE's hyper-parameters (see the module docs for where each comes from).
#[derive(Clone, Debug, PartialEq)]
pub struct SaeConfig {
    /// Width of the activations it encodes.
    pub d_in: i64,
    /// Number of latents.
    pub d_sae: i64,
    /// The activation function.
    pub architecture: Architecture,
    /// Whether `b_dec` is subtracted from the input before encoding.
    pub apply_b_dec_to_input: bool,
    /// Input normalization.
    pub normalize_activations: Normalization,
    /// The hook point it was trained on, as its trainer named it (e.g.
    /// `blocks.8.hook_resid_pre`), if the config says.
    pub hook_name: Option<String>,
    /// The model it was trained on, if the config says.
    pub model_name: Option<String>,
}

/// Largest `cfg.json` read (real ones are a few KB).
pub const MAX_CFG_BYTES: u64 = 1 << 20;

impl SaeConfig {
    /// Parses a SAELens `cfg.json` text; `path` names the file in errors.
    ///
    /// Errors: [`Error::Config`] naming the file and the field: not JSON, a missing or
    /// non-positive `d_in` / `d_sae`, an unknown or unsupported architecture (`gated`,
    /// `batchtopk`, ... are named), TopK without a `k` in `1..=d_sae`, an unsupported
    /// `normalize_activations` or `reshape_activations`.
    pub fn from_saelens_json(text: &str, path: &Path) -> Result<SaeConfig> {
        let bad = |message: String| Error::Config { path: path.display().to_string(), message };
        let json: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let size = |field: &str| -> Result<i64> {
            match obj.get(field) {
                None => Err(bad(format!("no `{field}` field"))),
                Some(v) => v
                    .as_i64()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(format!("`{field}` must be a positive integer, found {v}"))),
            }
        };
        let (d_in, d_sae) = (size("d_in")?, size("d_sae")?);
        let text_field = |field: &str| obj.get(field).and_then(Value::as_str);
        let arch = text_field("architecture").unwrap_or("standard");
        let activation = text_field("activation_fn_str").unwrap_or("relu");
        let architecture = match (arch, activation) {
            ("standard", "relu") => Architecture::Standard,
            ("jumprelu", _) => Architecture::JumpRelu,
            ("topk", _) => Architecture::TopK { k: top_k(obj.get("k"), d_sae).map_err(|m| bad(format!("`k`: {m}")))? },
            ("standard", "topk") => {
                let k = obj.get("activation_fn_kwargs").and_then(|a| a.get("k"));
                Architecture::TopK { k: top_k(k, d_sae).map_err(|m| bad(format!("`activation_fn_kwargs.k`: {m}")))? }
            }
            ("standard", other) => {
                return Err(bad(format!("`activation_fn_str` is {other:?}; supported: \"relu\", \"topk\"")));
            }
            (other, _) => {
                return Err(bad(format!(
                    "architecture {other:?} is not supported; supported: \"standard\", \"jumprelu\", \"topk\""
                )));
            }
        };
        if matches!(architecture, Architecture::TopK { .. }) && obj.get("rescale_acts_by_decoder_norm").and_then(Value::as_bool) == Some(true) {
            return Err(bad("`rescale_acts_by_decoder_norm: true` is not supported".into()));
        }
        let apply_b_dec_to_input = match obj.get("apply_b_dec_to_input") {
            None | Some(Value::Null) => true,
            Some(v) => v.as_bool().ok_or_else(|| bad(format!("`apply_b_dec_to_input` must be true or false, found {v}")))?,
        };
        let normalize_activations = match text_field("normalize_activations").unwrap_or("none") {
            "none" => Normalization::None,
            "constant_norm_rescale" => Normalization::ConstantNormRescale,
            "layer_norm" => Normalization::LayerNorm,
            "expected_average_only_in" => {
                return Err(bad(
                    "`normalize_activations: \"expected_average_only_in\"` needs a dataset-wide scaling factor that the \
                     folder does not hold; fold it into the weights first (SAELens `fold_activation_norm_scaling_factor`: \
                     W_enc * s, W_dec / s, b_dec / s) and set the field to \"none\""
                        .into(),
                ));
            }
            other => {
                return Err(bad(format!(
                    "`normalize_activations` is {other:?}; supported: \"none\", \"constant_norm_rescale\", \"layer_norm\""
                )));
            }
        };
        match text_field("reshape_activations").unwrap_or("none") {
            "none" => {}
            other => return Err(bad(format!("`reshape_activations` is {other:?}; only \"none\" is supported"))),
        }
        let meta = |field: &str| -> Option<String> {
            let nested = |o: Option<&Value>| o.and_then(|m| m.get(field)).and_then(Value::as_str).map(str::to_string);
            text_field(field).map(str::to_string).or_else(|| nested(obj.get("metadata"))).or_else(|| nested(obj.get("meta")))
        };
        let config = SaeConfig {
            d_in,
            d_sae,
            architecture,
            apply_b_dec_to_input,
            normalize_activations,
            hook_name: meta("hook_name"),
            model_name: meta("model_name"),
        };
        Ok(config)
    }

    /// The shapes of the weights this config implies, by key: `W_enc [d_in, d_sae]`,
    /// `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and `threshold [d_sae]` for
    /// JumpReLU.
    pub fn weight_shapes(&self) -> Vec<(&'static str, Vec<i64>)> {
        let mut v = vec![
            ("W_enc", vec![self.d_in, self.d_sae]),
            ("b_enc", vec![self.d_sae]),
            ("W_dec", vec![self.d_sae, self.d_in]),
            ("b_dec", vec![self.d_in]),
        ];
        if self.architecture == Architecture::JumpRelu {
            v.push(("threshold", vec![self.d_sae]));
        }
        v
    }
}

/// A TopK `k`: an integer in `1..=d_sae` (SAELens allows a float with an integer value).
fn top_k(v: Option<&Value>, d_sae: i64) -> std::result::Result<i64, String> {
    let v = v.ok_or("missing")?;
    let k = v.as_i64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as i64));
    match k {
        Some(k) if (1..=d_sae).contains(&k) => Ok(k),
        _ => Err(format!("must be an integer from 1 to d_sae = {d_sae}, found {v}")),
    }
}
