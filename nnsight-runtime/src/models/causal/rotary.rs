//! Rotary position embeddings (Su et al. 2021, "RoFormer", arXiv:2104.09864) in transformers'
//! `rotate_half` convention: the two halves of each head are rotated together (not interleaved
//! pairs as in the original Meta code). Shared by every rotary family (Llama, GPT-NeoX, Gemma,
//! ...); a table narrower than the head rotates only the head's first dims (GPT-NeoX's
//! `rotary_pct`, see [`apply_rotary`]).

use tch::{Device, Kind, Tensor};

use crate::activation::Layout;
use crate::hook::HookModule;
use crate::models::ROWS;
use crate::tree::ModuleTree;

/// Rotary position embedding parameters (transformers' `ROPE_INIT_FUNCTIONS`).
#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    /// `inv_freq[i] = 1 / theta^(2i / head_dim)`.
    Default {
        /// Base.
        theta: f64,
    },
    /// Default frequencies divided by `factor` (positions interpolated).
    Linear {
        /// Base.
        theta: f64,
        /// Divides every frequency.
        factor: f64,
    },
    /// Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    /// blend between (`_compute_llama3_parameters`).
    Llama3 {
        /// Base.
        theta: f64,
        /// Divisor for long wavelengths.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
    },
}

impl Rope {
    /// The base `theta`.
    pub fn theta(&self) -> f64 {
        match self {
            Rope::Default { theta } | Rope::Linear { theta, .. } | Rope::Llama3 { theta, .. } => *theta,
        }
    }

    /// Applies the scaling to the default inverse frequencies `[head_dim / 2]` f32.
    pub fn scale(&self, inv_freq: &Tensor) -> Tensor {
        match *self {
            Rope::Default { .. } => inv_freq.shallow_clone(),
            Rope::Linear { factor, .. } => inv_freq / factor,
            Rope::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old, .. } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                let long = wavelen.gt(low_wavelen);
                let scaled = (inv_freq / factor).where_self(&long, inv_freq);
                let smooth = ((wavelen.reciprocal() * old) - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
                smoothed.where_self(&medium, &scaled)
            }
        }
    }
}

/// `model.rotary_emb`: cos/sin tables of the rotary position embedding (transformers'
/// `LlamaRotaryEmbedding`), no weights.
///
/// Input `(x, position_ids [batch, seq])` (`x` only gives dtype and device). Output
/// `(cos, sin)`, each `[batch, seq, head_dim]` in `x`'s dtype: angles
/// `position · inv_freq` computed in f32, the `head_dim / 2` frequencies written twice.
#[derive(Debug)]
pub struct RotaryEmbedding {
    /// `[head_dim / 2]` f32: `1 / theta^(2i / head_dim)`, then the config's scaling.
    pub inv_freq: Tensor,
    /// Multiplies cos and sin (1 for the supported scalings).
    pub attention_scaling: f64,
}

impl RotaryEmbedding {
    /// The tables for `rope` and `head_dim` on `device`.
    pub fn new(rope: &Rope, head_dim: i64, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / head_dim as f64;
        let inv_freq = Tensor::pow_scalar(rope.theta(), &exponents).reciprocal();
        RotaryEmbedding { inv_freq: rope.scale(&inv_freq), attention_scaling: 1.0 }
    }
}

/// A leaf: no hooked children.
impl ModuleTree for RotaryEmbedding {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for RotaryEmbedding {
    /// `(x [batch, seq, hidden], position_ids [batch, seq])`.
    type Input = (Tensor, Tensor);
    /// `(cos, sin)`, each `[batch, seq, head_dim]`.
    type Output = (Tensor, Tensor);
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn input_layout(&self) -> Layout {
        ROWS
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, (x, position_ids): (Tensor, Tensor)) -> (Tensor, Tensor) {
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.to_device(x.device());
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos() * self.attention_scaling;
        let sin = emb.sin() * self.attention_scaling;
        (cos.to_kind(x.kind()), sin.to_kind(x.kind()))
    }
}

/// `rotate_half`: `[x1, x2]` → `[-x2, x1]` over the last dim (split in two halves).
pub fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    Tensor::cat(&[&x.narrow(-1, half, half).neg(), &x.narrow(-1, 0, half)], -1)
}

/// `x · cos + rotate_half(x) · sin` (transformers' `apply_rotary_pos_emb` for one tensor).
///
/// `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch, 1, seq, rot]` with `rot <= head_dim`
/// (even). When `rot < head_dim` only the first `rot` dims of each head are rotated and the rest
/// pass through (GPT-NeoX's partial rotary, `modeling_gpt_neox.py`).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let d = x.size()[x.dim() - 1];
    let rot = cos.size()[cos.dim() - 1];
    if rot == d {
        return x * cos + rotate_half(x) * sin;
    }
    let (head, tail) = (x.narrow(-1, 0, rot), x.narrow(-1, rot, d - rot));
    let rotated = &head * cos + rotate_half(&head) * sin;
    Tensor::cat(&[&rotated, &tail], -1)
}
