//! The bundled models' linear layer, `y = x Wᵀ + b`, with a faster CPU kernel for inference.
//!
//! libtorch's `linear` on CPU f32 tensors calls MKL's `sgemm`, and MKL picks its AVX2 kernel on
//! AMD CPUs even where AVX-512 is there. libtorch's oneDNN (`mkldnn_linear`) picks the widest
//! kernel the CPU has. On the 2-core AMD EPYC (AVX-512) the benchmarks run on, MiniLM's
//! feed-forward projection `[28, 384] x [384, 1536]` took ~0.28 ms with oneDNN against ~0.41 ms
//! with MKL, and the whole forward pass is ~1.35x faster (`benches/interleave.rs`, group
//! `minilm_b2_t1_kernel`). [`linear`] takes the oneDNN path when it is safe and otherwise calls
//! `Tensor::linear`:
//!
//! - CPU, f32 input and weight (other dtypes keep libtorch's own kernels), input `[.., in]`
//!   with 2 to 5 dims, a contiguous `weight [out, in]`, a contiguous bias of `[out]` or none
//!   (anything else goes to `Tensor::linear`, whose error messages name the mismatched sizes);
//! - a layer call big enough to repay oneDNN's fixed ~40 µs: `rows * in * out` >= 4M
//!   multiply-adds (MiniLM's projections on the 28-token reference batch qualify; one-token
//!   decode steps of small models and batch-1 calls of 384-wide layers do not);
//! - no autograd: grad mode off (`tch::no_grad`), or neither the input nor the weight nor the
//!   bias requires grad, so a trace that takes `.grad` (or trains) runs libtorch's `linear` and
//!   its usual backward;
//! - the kernel is [`LinearKernel::Auto`] (the default; see [`set_linear_kernel`]).
//!
//! Both kernels compute in f32 with f32 accumulation; they round differently (sums in another
//! order), by ~1e-6 relative on MiniLM's activations. A row's result may differ in the last bits
//! between a batch of 1 and a batch of several with either kernel (the blocking depends on the
//! number of rows).

use std::sync::atomic::{AtomicU8, Ordering};

use tch::{nn, Device, Kind, Tensor};

use crate::activation::Layout;
use crate::hook::{HookModule, Hooked};
use crate::models::ROWS;
use crate::tree::ModuleTree;

/// Which kernel [`linear`] uses on the CPU (process-wide, see [`set_linear_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKernel {
    /// oneDNN for CPU f32 inference where its conditions hold (module docs), else `Tensor::linear`.
    Auto,
    /// Always `Tensor::linear` (MKL on CPU): what a plain `tch::nn::Linear` and PyTorch's
    /// `nn.Linear` compute, bit for bit.
    Libtorch,
}

static KERNEL: AtomicU8 = AtomicU8::new(0);

/// Sets the kernel of every bundled model's linear layers for the whole process; returns the
/// previous one. [`LinearKernel::Libtorch`] reproduces `tch::nn::Linear` (and PyTorch) exactly.
pub fn set_linear_kernel(kernel: LinearKernel) -> LinearKernel {
    let code = match kernel {
        LinearKernel::Auto => 0,
        LinearKernel::Libtorch => 1,
    };
    decode(KERNEL.swap(code, Ordering::Relaxed))
}

fn decode(code: u8) -> LinearKernel {
    match code {
        0 => LinearKernel::Auto,
        _ => LinearKernel::Libtorch,
    }
}

/// The kernel set by [`set_linear_kernel`] (default [`LinearKernel::Auto`]).
pub fn linear_kernel() -> LinearKernel {
    decode(KERNEL.load(Ordering::Relaxed))
}

/// Whether autograd records operations right now (`torch::autograd::GradMode::is_enabled`).
fn grad_enabled() -> bool {
    // libtorch exposes the mode only through its setter, which returns the previous value.
    // SAFETY: plain FFI calls on a thread-local flag; the second restores what the first read.
    unsafe {
        let was = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(was);
        was != 0
    }
}

/// oneDNN costs a fixed ~40 µs per call (conversions, primitive look-up); it wins from about
/// 4M multiply-adds (`rows * in * out`) on the benchmark machine: 384x384 layers from ~24 rows,
/// 384x1536 and 768x768 from ~6 rows, 2048x2048 at 1 row.
const MIN_MULTIPLY_ADDS: i64 = 4_000_000;

/// Whether `x [.., in]` times `weight [out, in]` (sizes as given) is worth oneDNN's fixed cost.
fn big_enough(x: &Tensor, out: i64, inf: i64) -> bool {
    if out == 0 || inf == 0 {
        return false;
    }
    let rows = x.numel() as i64 / inf;
    rows > 0 && rows.saturating_mul(inf).saturating_mul(out) >= MIN_MULTIPLY_ADDS
}

/// Whether [`linear`] takes the oneDNN path for these arguments, in the current grad mode and
/// with the current [`linear_kernel`] (the conditions in the module docs).
pub fn uses_one_dnn(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    if linear_kernel() != LinearKernel::Auto || weight.dim() != 2 {
        return false;
    }
    let w = weight.size();
    let (out, inf) = (w[0], w[1]);
    x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && weight.kind() == Kind::Float
        && weight.device() == Device::Cpu
        && (2..=5).contains(&x.dim())
        && weight.is_contiguous()
        && x.size().last() == Some(&inf)
        && big_enough(x, out, inf)
        && bias.is_none_or(|b| b.kind() == Kind::Float && b.is_contiguous() && b.size() == [out])
        && (!grad_enabled()
            || !(x.requires_grad() || weight.requires_grad() || bias.is_some_and(|b| b.requires_grad())))
        && tch::utils::has_mkldnn()
}

/// `x Wᵀ + b`: `x [.., in]`, `weight [out, in]`, `bias [out]`; returns `[.., out]`.
///
/// oneDNN where the module docs' conditions hold, `Tensor::linear` otherwise. Shape and dtype
/// mismatches are libtorch's errors (a panic, caught at the trace's boundary like any other).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    if uses_one_dnn(x, weight, bias) {
        x.to_mkldnn().mkldnn_linear(weight, bias).to_dense(None, false)
    } else {
        x.linear(weight, bias)
    }
}

/// A linear layer: variables `weight [out, in]` (`ws`) and `bias [out]` (`bs`), as
/// `tch::nn::Linear` and in Hugging Face checkpoints. Input `[.., in]`, output `[.., out]`,
/// computed by [`linear`].
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub ws: Tensor,
    /// `[out]`, if the layer has a bias.
    pub bs: Option<Tensor>,
}

impl Linear {
    /// Zero variables `weight [out, in]` and, if `bias`, `bias [out]` under `p`, wrapped as the
    /// hooked module at `p` (the checkpoint's values are copied in afterwards).
    pub fn new(p: &nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Hooked<Linear> {
        let zeros = nn::Init::Const(0.0);
        let ws = super::params::param(p, "weight", &[out_dim, in_dim], zeros);
        let bs = bias.then(|| super::params::param(p, "bias", &[out_dim], zeros));
        Hooked::new(p, Linear { ws, bs })
    }
}

/// A leaf: no hooked children.
impl ModuleTree for Linear {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for Linear {
    /// `[.., in]`.
    type Input = Tensor;
    /// `[.., out]`.
    type Output = Tensor;
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn input_layout(&self) -> Layout {
        ROWS
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, x: Tensor) -> Tensor {
        linear(&x, &self.ws, self.bs.as_ref())
    }
}
