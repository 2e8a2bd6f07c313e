//! The bundled models' linear layer, `y = x Wᵀ + b`, with the CPU kernel chosen by measurement.
//!
//! libtorch's `linear` on CPU f32 tensors calls MKL's `sgemm`, which is what PyTorch's
//! `nn.Linear` runs. libtorch also has oneDNN (`mkldnn_linear`). Which is faster depends on the
//! CPU: MKL picks its AVX2 kernel on AMD CPUs even where AVX-512 is there, and there oneDNN made
//! MiniLM's forward ~1.3x faster (AMD EPYC, `benches/interleave.rs`, group
//! `minilm_b2_t1_kernel`); on an Intel Xeon with AVX-512, MKL is as fast or faster, and
//! oneDNN's fixed cost per call makes it the slower one. So no rule is fixed here: with the
//! default kernel [`LinearKernel::Auto`], the first call of each *shape class* that oneDNN can
//! take times both kernels on that very call and keeps oneDNN for the class only if it was
//! clearly faster (by [`ONE_DNN_MARGIN`], in most of the timed rounds); otherwise, and whenever the measurement is uncertain,
//! the class keeps libtorch's `linear` — PyTorch's result bit for bit. The choice is cached for
//! the process ([`linear_choices`] lists what was measured).
//!
//! A shape class is (rows rounded up to a power of two, `in`, `out`, bias or not, libtorch's
//! thread count). A call is *eligible* for oneDNN ([`one_dnn_eligible`]) when:
//!
//! - CPU, f32 input and weight (other dtypes keep libtorch's own kernels), input `[.., in]`
//!   with 2 to 5 dims, a contiguous `weight [out, in]`, a contiguous bias of `[out]` or none
//!   (anything else goes to `Tensor::linear`, whose error messages name the mismatched sizes);
//! - a layer call big enough that oneDNN's fixed ~40 µs could be repaid: `rows * in * out` >=
//!   4M multiply-adds (smaller calls, e.g. one-token decode steps of small models, always take
//!   libtorch's `linear` and are never timed);
//! - no autograd: grad mode off (`tch::no_grad`), or neither the input nor the weight nor the
//!   bias requires grad, so a trace that takes `.grad` (or trains) runs libtorch's `linear` and
//!   its usual backward.
//!
//! Both kernels compute in f32 with f32 accumulation; they round differently (sums in another
//! order), by ~1e-6 relative on MiniLM's activations. Since the choice is made once per class
//! and process, a plain forward and a trace of the same input take the same kernel and agree
//! bit for bit. A row's result may differ in the last bits between a batch of 1 and a batch of
//! several with either kernel (the blocking depends on the number of rows), and two processes
//! may choose differently for a class whose timings are close (each choice is within rounding
//! of the other; [`LinearKernel::Libtorch`] fixes the result).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{nn, Device, Kind, Tensor};

use crate::activation::Layout;
use crate::hook::{HookModule, Hooked};
use crate::models::ROWS;
use crate::tree::ModuleTree;

/// Which kernel [`linear`] uses on the CPU (process-wide, see [`set_linear_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKernel {
    /// The default: per shape class, the kernel measured faster on this machine at first use
    /// (module docs); libtorch's `linear` unless oneDNN was faster by [`ONE_DNN_MARGIN`].
    Auto,
    /// Always `Tensor::linear` (MKL on CPU): what a plain `tch::nn::Linear` and PyTorch's
    /// `nn.Linear` compute, bit for bit.
    Libtorch,
    /// oneDNN for every eligible call ([`one_dnn_eligible`]), without measuring (the rule the
    /// bundled models used before the measurement; for benchmarks and comparisons).
    OneDnn,
}

static KERNEL: AtomicU8 = AtomicU8::new(0);

/// Sets the kernel of every bundled model's linear layers for the whole process; returns the
/// previous one. [`LinearKernel::Libtorch`] reproduces `tch::nn::Linear` (and PyTorch) exactly.
/// The measurements of [`LinearKernel::Auto`] are kept across changes.
pub fn set_linear_kernel(kernel: LinearKernel) -> LinearKernel {
    let code = match kernel {
        LinearKernel::Auto => 0,
        LinearKernel::Libtorch => 1,
        LinearKernel::OneDnn => 2,
    };
    decode(KERNEL.swap(code, Ordering::Relaxed))
}

fn decode(code: u8) -> LinearKernel {
    match code {
        0 => LinearKernel::Auto,
        1 => LinearKernel::Libtorch,
        _ => LinearKernel::OneDnn,
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

/// oneDNN costs a fixed ~40 µs per call (conversions, primitive look-up); below about 4M
/// multiply-adds (`rows * in * out`) it cannot win, so smaller calls are neither timed nor sent
/// to it.
const MIN_MULTIPLY_ADDS: i64 = 4_000_000;

/// How much faster oneDNN must have been for [`LinearKernel::Auto`] to choose it: its best time
/// times this factor below libtorch's best time (10%: closer timings are within the noise of a
/// shared machine, and then PyTorch's own result is kept).
pub const ONE_DNN_MARGIN: f64 = 1.10;

/// Whether `x [.., in]` times `weight [out, in]` (sizes as given) could repay oneDNN's fixed cost.
fn big_enough(x: &Tensor, out: i64, inf: i64) -> bool {
    if out == 0 || inf == 0 {
        return false;
    }
    let rows = x.numel() as i64 / inf;
    rows > 0 && rows.saturating_mul(inf).saturating_mul(out) >= MIN_MULTIPLY_ADDS
}

/// Whether oneDNN can take this call at all (the conditions in the module docs), whatever the
/// kernel setting: CPU f32, well-formed shapes, >= 4M multiply-adds, nothing recording a gradient.
pub fn one_dnn_eligible(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    if weight.dim() != 2 {
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

/// A shape class: rows rounded up to a power of two, `in`, `out`, bias or not, thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShapeClass {
    /// The call's rows (product of the input's leading dims) rounded up to a power of two.
    pub rows: i64,
    /// In-features.
    pub in_features: i64,
    /// Out-features.
    pub out_features: i64,
    /// Whether the call has a bias.
    pub bias: bool,
    /// libtorch's intra-op thread count when measured (`tch::get_num_threads`).
    pub threads: i32,
}

/// What [`LinearKernel::Auto`] measured for one [`ShapeClass`] at its first call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelChoice {
    /// The class.
    pub class: ShapeClass,
    /// Best time of libtorch's `linear` on the call over the rounds (after one warm-up call).
    pub libtorch: Duration,
    /// Best time of oneDNN on the call over the rounds (after one warm-up call).
    pub one_dnn: Duration,
    /// Paired rounds timed.
    pub rounds: u32,
    /// Rounds in which oneDNN was the faster.
    pub one_dnn_wins: u32,
    /// Whether oneDNN was chosen: `one_dnn * ONE_DNN_MARGIN < libtorch` and oneDNN faster in at
    /// least two thirds of the rounds.
    pub chose_one_dnn: bool,
}

static CHOICES: Mutex<Option<HashMap<ShapeClass, KernelChoice>>> = Mutex::new(None);

/// Every choice [`LinearKernel::Auto`] has made in this process, with its timings (sorted by
/// class), e.g. to report which kernel a model's layers run on this machine.
pub fn linear_choices() -> Vec<KernelChoice> {
    let guard = CHOICES.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<KernelChoice> = guard.iter().flat_map(|m| m.values().copied()).collect();
    v.sort_by_key(|c| (c.class.in_features, c.class.out_features, c.class.rows, c.class.bias, c.class.threads));
    v
}

fn shape_class(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> ShapeClass {
    let w = weight.size();
    let rows = (x.numel() as i64 / w[1]).max(1);
    ShapeClass {
        rows: (rows as u64).next_power_of_two() as i64,
        in_features: w[1],
        out_features: w[0],
        bias: bias.is_some(),
        threads: tch::get_num_threads(),
    }
}

fn one_dnn(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    x.to_mkldnn().mkldnn_linear(weight, bias).to_dense(None, false)
}

fn timed(f: impl Fn() -> Tensor) -> (Duration, Tensor) {
    let start = Instant::now();
    let y = f();
    (start.elapsed(), y)
}

/// Times both kernels on this call and returns the choice with the chosen kernel's output.
///
/// One warm-up call each, then paired rounds (libtorch, oneDNN, alternating which goes first)
/// until at least [`MIN_ROUNDS`] rounds and either [`MAX_ROUNDS`] rounds or [`MEASURE_BUDGET`]
/// spent. oneDNN is chosen only if its best time times [`ONE_DNN_MARGIN`] is below libtorch's
/// best time *and* it was the faster one in at least two thirds of the rounds: a load that
/// comes and goes on a shared machine rarely fakes both, and when it does not settle the
/// question, libtorch (PyTorch's result) is kept.
fn measure(class: ShapeClass, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> (KernelChoice, Tensor) {
    let lib = || x.linear(weight, bias);
    let dnn = || one_dnn(x, weight, bias);
    let start = Instant::now();
    drop(timed(lib));
    drop(timed(dnn));
    let (mut best_lib, mut best_dnn) = (Duration::MAX, Duration::MAX);
    let (mut y_lib, mut y_dnn) = (None, None);
    let (mut rounds, mut dnn_wins) = (0u32, 0u32);
    while rounds < MIN_ROUNDS || (rounds < MAX_ROUNDS && start.elapsed() < MEASURE_BUDGET) {
        let ((t_lib, a), (t_dnn, b)) = if rounds % 2 == 0 {
            let l = timed(lib);
            (l, timed(dnn))
        } else {
            let d = timed(dnn);
            (timed(lib), d)
        };
        best_lib = best_lib.min(t_lib);
        best_dnn = best_dnn.min(t_dnn);
        dnn_wins += u32::from(t_dnn < t_lib);
        rounds += 1;
        (y_lib, y_dnn) = (Some(a), Some(b));
    }
    let chose_one_dnn =
        best_dnn.as_secs_f64() * ONE_DNN_MARGIN < best_lib.as_secs_f64() && 3 * dnn_wins >= 2 * rounds;
    let choice = KernelChoice { class, libtorch: best_lib, one_dnn: best_dnn, rounds, one_dnn_wins: dnn_wins, chose_one_dnn };
    let y = if chose_one_dnn { y_dnn } else { y_lib };
    (choice, y.unwrap_or_else(lib))
}

/// Fewest paired rounds of a measurement.
const MIN_ROUNDS: u32 = 3;
/// Most paired rounds of a measurement.
const MAX_ROUNDS: u32 = 15;
/// Time after which a measurement stops adding rounds (past [`MIN_ROUNDS`]).
const MEASURE_BUDGET: Duration = Duration::from_millis(30);

/// The cached choice for the call's class; measures it (on this call) if the class is new,
/// returning the chosen kernel's output too.
fn choose(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> (bool, Option<Tensor>) {
    let class = shape_class(x, weight, bias);
    // Held while measuring: one measurement per class, and no two measurements at once.
    let mut guard = CHOICES.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(c) = map.get(&class) {
        return (c.chose_one_dnn, None);
    }
    let (choice, y) = tch::no_grad(|| measure(class, x, weight, bias));
    map.insert(class, choice);
    (choice.chose_one_dnn, Some(y))
}

/// Whether [`linear`] takes the oneDNN path for these arguments, in the current grad mode and
/// with the current [`linear_kernel`]: never with `Libtorch`; for eligible calls
/// ([`one_dnn_eligible`]) always with `OneDnn`, and with `Auto` when the call's shape class was
/// measured faster with oneDNN (measuring it now, on these arguments, if it is new).
pub fn uses_one_dnn(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    match linear_kernel() {
        LinearKernel::Libtorch => false,
        LinearKernel::OneDnn => one_dnn_eligible(x, weight, bias),
        LinearKernel::Auto => one_dnn_eligible(x, weight, bias) && choose(x, weight, bias).0,
    }
}

/// `x Wᵀ + b`: `x [.., in]`, `weight [out, in]`, `bias [out]`; returns `[.., out]`.
///
/// oneDNN where [`uses_one_dnn`] says so, `Tensor::linear` otherwise. Shape and dtype
/// mismatches are libtorch's errors (a panic, caught at the trace's boundary like any other).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    match linear_kernel() {
        LinearKernel::Libtorch => x.linear(weight, bias),
        LinearKernel::OneDnn if one_dnn_eligible(x, weight, bias) => one_dnn(x, weight, bias),
        LinearKernel::Auto if one_dnn_eligible(x, weight, bias) => match choose(x, weight, bias) {
            (_, Some(y)) => y,
            (true, None) => one_dnn(x, weight, bias),
            (false, None) => x.linear(weight, bias),
        },
        _ => x.linear(weight, bias),
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
