//! The bundled models' linear layer (`nnsight::models::linear`): the oneDNN path for CPU f32
//! inference against libtorch's own `linear` (MKL), when each path is taken, gradients, errors,
//! and the real MiniLM with either kernel against the Python reference values.
//!
//! The kernel choice is process-wide, so every test that depends on it holds `KERNEL_LOCK`.

mod common;

use std::sync::Mutex;

use common::minilm::{assert_values, case, close, minilm, PARIS, ROME};
use nnsight::models::linear::{linear, linear_kernel, set_linear_kernel, uses_one_dnn, Linear, LinearKernel};
use nnsight::prelude::*;
use tch::{nn, Device, Kind, Tensor};

static KERNEL_LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` with `kernel` set, restoring the previous kernel afterwards.
fn with_kernel<R>(kernel: LinearKernel, f: impl FnOnce() -> R) -> R {
    let before = set_linear_kernel(kernel);
    let out = f();
    set_linear_kernel(before);
    out
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn one_dnn_matches_libtorch_on_minilm_shapes() {
    let _lock = KERNEL_LOCK.lock().unwrap();
    let _g = tch::no_grad_guard();
    tch::manual_seed(7);
    let o = (Kind::Float, Device::Cpu);
    // MiniLM's projections on the reference batch: [2, 14, 384] -> 384 and -> 1536, 1536 -> 384.
    for (rows, i, out) in [(14, 384, 384), (14, 384, 1536), (14, 1536, 384)] {
        let x = Tensor::randn([2, rows, i], o);
        let w = Tensor::randn([out, i], o) * (1.0 / (i as f64).sqrt());
        let b = Tensor::randn([out], o);
        assert!(uses_one_dnn(&x, &w, Some(&b)), "f32 CPU inference takes the oneDNN path");
        let fast = linear(&x, &w, Some(&b));
        let plain = x.linear(&w, Some(&b));
        assert_eq!(fast.size(), vec![2, rows, out]);
        // Both sum `i` f32 products in f32, in different orders: rounding ~ sqrt(i) * 2^-24 * |y|.
        let rel = max_abs(&(&fast - &plain)) / max_abs(&plain);
        assert!(rel < 1e-5, "[2, {rows}, {i}] x [{out}, {i}]: max diff / max |y| = {rel:e}");
    }
}

#[test]
fn libtorch_kernel_is_bit_identical_to_tch_linear() {
    let _lock = KERNEL_LOCK.lock().unwrap();
    let _g = tch::no_grad_guard();
    let vs = nn::VarStore::new(Device::Cpu);
    let reference = nn::linear(vs.root() / "ref", 384, 1536, Default::default());
    let ours = Linear::new(&(vs.root() / "ours"), 384, 1536, true);
    ours.inner().ws.shallow_clone().copy_(&reference.ws);
    ours.inner().bs.as_ref().unwrap().shallow_clone().copy_(reference.bs.as_ref().unwrap());
    let x = Tensor::randn([2, 14, 384], (Kind::Float, Device::Cpu));
    let want = nn::Module::forward(&reference, &x);
    let got = with_kernel(LinearKernel::Libtorch, || ours.call(x.shallow_clone()));
    assert!(got.equal(&want), "LinearKernel::Libtorch computes exactly what tch::nn::Linear does");
    assert_eq!(linear_kernel(), LinearKernel::Auto, "with_kernel restored the default");
}

#[test]
fn which_path_is_taken() {
    let _lock = KERNEL_LOCK.lock().unwrap();
    let o = (Kind::Float, Device::Cpu);
    // Big enough for oneDNN: 64 rows x 256 in x 256 out = 4.2M multiply-adds.
    let x = Tensor::randn([64, 256], o);
    let w = Tensor::randn([256, 256], o);
    let b = Tensor::randn([256], o);
    tch::no_grad(|| {
        assert!(!uses_one_dnn(&x.narrow(0, 0, 8), &w, Some(&b)), "too small a call goes to libtorch");
        assert!(!uses_one_dnn(&Tensor::randn([3, 4], o), &Tensor::randn([5, 4], o), None), "a tiny layer goes to libtorch");
        assert!(!uses_one_dnn(&x.view([2i64, 2, 2, 2, 2, 2, 256].as_slice()), &w, None), "more than 5 dims go to libtorch");
        assert!(!uses_one_dnn(&x, &Tensor::randn([0, 256], o), None), "out = 0 goes to libtorch");
        let strided = Tensor::randn([256, 2], o).select(1, 0);
        assert!(!uses_one_dnn(&x, &w, Some(&strided)), "a non-contiguous bias goes to libtorch");
        let y = linear(&x, &w, Some(&strided));
        assert!(y.allclose(&x.linear(&w, Some(&strided)), 1e-5, 1e-4, false), "and is right");
        assert!(uses_one_dnn(&x, &w, Some(&b)));
        assert!(uses_one_dnn(&x, &w, None));
        assert!(!uses_one_dnn(&x.to_kind(Kind::Double), &w.to_kind(Kind::Double), None), "f64 goes to libtorch");
        assert!(!uses_one_dnn(&x.narrow(1, 0, 3), &w, None), "mismatched in-features go to libtorch (its error)");
        assert!(!uses_one_dnn(&x, &w.tr().contiguous().tr(), None), "a non-contiguous weight goes to libtorch");
        assert!(!uses_one_dnn(&x.narrow(0, 0, 0), &w, None), "an empty input goes to libtorch");
        assert!(!uses_one_dnn(&x, &w, Some(&b.narrow(0, 0, 4))), "a bias of the wrong size goes to libtorch");
        assert!(with_kernel(LinearKernel::Libtorch, || !uses_one_dnn(&x, &w, Some(&b))));
        // A non-contiguous input is fine: oneDNN gets a contiguous copy.
        let xt = Tensor::randn([256, 64], o).tr();
        assert!(uses_one_dnn(&xt, &w, Some(&b)));
        let rel = max_abs(&(linear(&xt, &w, Some(&b)) - xt.linear(&w, Some(&b)))) / max_abs(&xt.linear(&w, Some(&b)));
        assert!(rel < 1e-6, "{rel:e}");
    });
    // With autograd recording, anything that requires grad keeps the libtorch path.
    let wg = w.copy().set_requires_grad(true);
    assert!(!uses_one_dnn(&x, &wg, Some(&b)), "a weight that requires grad, grad mode on");
    assert!(!uses_one_dnn(&x.copy().set_requires_grad(true), &w, None), "an input that requires grad");
    assert!(uses_one_dnn(&x, &w, Some(&b)), "grad mode on but nothing requires grad");
    assert!(tch::no_grad(|| uses_one_dnn(&x, &wg, Some(&b))), "grad mode off: the weight's flag does not matter");
}

#[test]
fn gradients_flow_through_the_libtorch_path() {
    let _lock = KERNEL_LOCK.lock().unwrap();
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([3, 4], o).set_requires_grad(true);
    let w = Tensor::randn([5, 4], o).set_requires_grad(true);
    let b = Tensor::randn([5], o);
    linear(&x, &w, Some(&b)).sum(Kind::Float).backward();
    // d/dx sum(x Wᵀ + b) = every row is the column sums of W; d/dW = every row is sum over rows of x.
    let want_x = w.detach().sum_dim_intlist([0i64].as_slice(), true, Kind::Float).expand([3, 4], false);
    let want_w = x.detach().sum_dim_intlist([0i64].as_slice(), true, Kind::Float).expand([5, 4], false);
    assert!(max_abs(&(x.grad() - want_x)) < 1e-5);
    assert!(max_abs(&(w.grad() - want_w)) < 1e-5);
}

#[test]
fn mismatched_shapes_give_libtorchs_error_naming_the_sizes() {
    let _lock = KERNEL_LOCK.lock().unwrap();
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([2, 5], o);
    let w = Tensor::randn([6, 4], o);
    let err = std::panic::catch_unwind(|| tch::no_grad(|| linear(&x, &w, None))).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("2x5") && msg.contains("4x6"), "{msg}");
}

/// The real model with either kernel reproduces Python nnsight's values (`fixtures/minilm.json`),
/// and the two kernels agree closely with each other.
#[test]
fn minilm_matches_the_reference_with_either_kernel() {
    let _lock = KERNEL_LOCK.lock().unwrap();
    let lm = minilm();
    let sentences = [PARIS, ROME];
    let want = case("plain_forward");
    let fast = with_kernel(LinearKernel::Auto, || lm.forward(&sentences).unwrap());
    let plain = with_kernel(LinearKernel::Libtorch, || lm.forward(&sentences).unwrap());
    for (name, h) in [("auto", &fast), ("libtorch", &plain)] {
        let sum = h.sum(Kind::Double).double_value(&[]);
        assert!(close(sum, want["sum"].as_f64().unwrap(), 2e-3), "{name}: sum {sum}");
        let first5: Vec<f64> = Vec::<f64>::try_from(h.get(0).get(0).narrow(0, 0, 5)).unwrap();
        assert_values(&first5, &want["token0_first5"], name);
    }
    let diff = max_abs(&(&fast - &plain));
    assert!(diff > 0.0 && diff < 1e-4, "kernels differ only by rounding: max diff {diff:e}");

    // A trace saving a layer uses the same kernel as the plain forward: its last layer's output
    // is bit-identical to `forward`, with either kernel.
    for (kernel, reference) in [(LinearKernel::Auto, &fast), (LinearKernel::Libtorch, &plain)] {
        let saved = with_kernel(kernel, || trace!(lm, [PARIS, ROME], { lm.encoder.layer[5].output.save() }).unwrap());
        assert!(saved.equal(reference), "{kernel:?}: traced = plain");
    }
}
