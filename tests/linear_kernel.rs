//! The bundled models' linear layer (`nnsight::models::linear`): the oneDNN path for CPU f32
//! inference against libtorch's own `linear` (MKL), when each path is taken, the measured
//! default (`Auto`: libtorch's result bit for bit unless oneDNN was measured faster for the
//! shape class), gradients, errors, and the real MiniLM with each kernel against the Python
//! reference values.
//!
//! The kernel choice is process-wide, so every test that depends on it holds `KERNEL_LOCK`.

mod common;

use std::sync::Mutex;

use common::minilm::{assert_values, case, close, minilm, PARIS, ROME};
use nnsight::models::linear::{
    linear, linear_choices, linear_kernel, one_dnn_eligible, set_linear_kernel, uses_one_dnn, Linear, LinearKernel,
    ONE_DNN_MARGIN,
};
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
        assert!(one_dnn_eligible(&x, &w, Some(&b)), "f32 CPU inference may take the oneDNN path");
        assert!(with_kernel(LinearKernel::OneDnn, || uses_one_dnn(&x, &w, Some(&b))));
        let fast = with_kernel(LinearKernel::OneDnn, || linear(&x, &w, Some(&b)));
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
        assert!(!one_dnn_eligible(&x.narrow(0, 0, 8), &w, Some(&b)), "too small a call goes to libtorch");
        assert!(!one_dnn_eligible(&Tensor::randn([3, 4], o), &Tensor::randn([5, 4], o), None), "a tiny layer goes to libtorch");
        assert!(!one_dnn_eligible(&x.view([2i64, 2, 2, 2, 2, 2, 256].as_slice()), &w, None), "more than 5 dims go to libtorch");
        assert!(!one_dnn_eligible(&x, &Tensor::randn([0, 256], o), None), "out = 0 goes to libtorch");
        let strided = Tensor::randn([256, 2], o).select(1, 0);
        assert!(!one_dnn_eligible(&x, &w, Some(&strided)), "a non-contiguous bias goes to libtorch");
        let y = with_kernel(LinearKernel::OneDnn, || linear(&x, &w, Some(&strided)));
        assert!(y.allclose(&x.linear(&w, Some(&strided)), 1e-5, 1e-4, false), "and is right");
        assert!(one_dnn_eligible(&x, &w, Some(&b)));
        assert!(one_dnn_eligible(&x, &w, None));
        assert!(!one_dnn_eligible(&x.to_kind(Kind::Double), &w.to_kind(Kind::Double), None), "f64 goes to libtorch");
        assert!(!one_dnn_eligible(&x.narrow(1, 0, 3), &w, None), "mismatched in-features go to libtorch (its error)");
        assert!(!one_dnn_eligible(&x, &w.tr().contiguous().tr(), None), "a non-contiguous weight goes to libtorch");
        assert!(!one_dnn_eligible(&x.narrow(0, 0, 0), &w, None), "an empty input goes to libtorch");
        assert!(!one_dnn_eligible(&x, &w, Some(&b.narrow(0, 0, 4))), "a bias of the wrong size goes to libtorch");
        assert!(with_kernel(LinearKernel::Libtorch, || !uses_one_dnn(&x, &w, Some(&b))), "Libtorch: never oneDNN");
        assert!(with_kernel(LinearKernel::OneDnn, || uses_one_dnn(&x, &w, Some(&b))), "OneDnn: every eligible call");
        // A non-contiguous input is fine: oneDNN gets a contiguous copy.
        let xt = Tensor::randn([256, 64], o).tr();
        assert!(one_dnn_eligible(&xt, &w, Some(&b)));
        let fast = with_kernel(LinearKernel::OneDnn, || linear(&xt, &w, Some(&b)));
        let rel = max_abs(&(fast - xt.linear(&w, Some(&b)))) / max_abs(&xt.linear(&w, Some(&b)));
        assert!(rel < 1e-6, "{rel:e}");
    });
    // With autograd recording, anything that requires grad keeps the libtorch path.
    let wg = w.copy().set_requires_grad(true);
    assert!(!one_dnn_eligible(&x, &wg, Some(&b)), "a weight that requires grad, grad mode on");
    assert!(!one_dnn_eligible(&x.copy().set_requires_grad(true), &w, None), "an input that requires grad");
    assert!(one_dnn_eligible(&x, &w, Some(&b)), "grad mode on but nothing requires grad");
    assert!(tch::no_grad(|| one_dnn_eligible(&x, &wg, Some(&b))), "grad mode off: the weight's flag does not matter");
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
    let fast = with_kernel(LinearKernel::OneDnn, || lm.forward(&sentences).unwrap());
    let plain = with_kernel(LinearKernel::Libtorch, || lm.forward(&sentences).unwrap());
    let auto = with_kernel(LinearKernel::Auto, || lm.forward(&sentences).unwrap());
    for (name, h) in [("onednn", &fast), ("libtorch", &plain), ("auto", &auto)] {
        let sum = h.sum(Kind::Double).double_value(&[]);
        assert!(close(sum, want["sum"].as_f64().unwrap(), 2e-3), "{name}: sum {sum}");
        let first5: Vec<f64> = Vec::<f64>::try_from(h.get(0).get(0).narrow(0, 0, 5)).unwrap();
        assert_values(&first5, &want["token0_first5"], name);
    }
    let diff = max_abs(&(&fast - &plain));
    assert!(diff > 0.0 && diff < 1e-4, "kernels differ only by rounding: max diff {diff:e}");
    // The default took libtorch's kernel, bit for bit, for every class it did not measure faster
    // with oneDNN: if it chose libtorch everywhere, the whole forward is PyTorch's.
    let minilm_class = |c: &nnsight::models::linear::KernelChoice| [384, 1536].contains(&c.class.in_features);
    if linear_choices().iter().filter(|c| minilm_class(c)).all(|c| !c.chose_one_dnn) {
        assert!(auto.equal(&plain), "Auto chose libtorch for every class: the forward is libtorch's bit for bit");
    } else {
        assert!(max_abs(&(&auto - &plain)) < 1e-4);
    }

    // A trace saving a layer uses the same kernel as the plain forward: its last layer's output
    // is bit-identical to `forward`, with each kernel.
    for (kernel, reference) in [(LinearKernel::OneDnn, &fast), (LinearKernel::Libtorch, &plain), (LinearKernel::Auto, &auto)] {
        let saved = with_kernel(kernel, || trace!(lm, [PARIS, ROME], { lm.encoder.layer[5].output.save() }).unwrap());
        assert!(saved.equal(reference), "{kernel:?}: traced = plain");
    }
}

/// The default kernel is `Auto`: for each shape class its first call times both kernels and the
/// class keeps libtorch's `linear` (bit for bit) unless oneDNN was faster by `ONE_DNN_MARGIN`.
#[test]
fn auto_is_libtorch_bit_for_bit_unless_measured_faster() {
    let _lock = KERNEL_LOCK.lock().unwrap();
    assert_eq!(linear_kernel(), LinearKernel::Auto, "the default");
    let _g = tch::no_grad_guard();
    tch::manual_seed(11);
    let o = (Kind::Float, Device::Cpu);
    // Shapes of this test's own (in = 320 is no bundled model's), so no other test measured them.
    for (rows, out) in [(48, 320), (48, 1280), (200, 320)] {
        let x = Tensor::randn([rows, 320], o);
        let w = Tensor::randn([out, 320], o) * (1.0 / 320f64.sqrt());
        let b = Tensor::randn([out], o);
        let first = linear(&x, &w, Some(&b));
        let choice = linear_choices()
            .into_iter()
            .find(|c| c.class.in_features == 320 && c.class.out_features == out && c.class.rows == (rows as u64).next_power_of_two() as i64)
            .expect("the first eligible call of a new class is measured and recorded");
        assert!(choice.class.bias && choice.libtorch > std::time::Duration::ZERO && choice.one_dnn > std::time::Duration::ZERO);
        let faster = choice.one_dnn.as_secs_f64() * ONE_DNN_MARGIN < choice.libtorch.as_secs_f64();
        assert!(choice.rounds >= 3 && choice.one_dnn_wins <= choice.rounds);
        assert_eq!(choice.chose_one_dnn, faster && 3 * choice.one_dnn_wins >= 2 * choice.rounds);
        assert_eq!(uses_one_dnn(&x, &w, Some(&b)), choice.chose_one_dnn, "the cached choice is what later calls take");
        let second = linear(&x, &w, Some(&b));
        assert!(second.equal(&first), "the measuring call returns what later calls compute");
        let plain = x.linear(&w, Some(&b));
        if choice.chose_one_dnn {
            let fast = with_kernel(LinearKernel::OneDnn, || linear(&x, &w, Some(&b)));
            assert!(first.equal(&fast), "[{rows}, 320] x [{out}, 320]: oneDNN measured faster, its result");
        } else {
            assert!(first.equal(&plain), "[{rows}, 320] x [{out}, 320]: libtorch chosen, tch's linear bit for bit");
        }
        println!("{choice:?}");
    }
    // Calls too small for oneDNN are never measured and are libtorch's bit for bit.
    let before = linear_choices().len();
    let (x, w) = (Tensor::randn([3, 320], o), Tensor::randn([320, 320], o));
    assert!(linear(&x, &w, None).equal(&x.linear::<Tensor>(&w, None)));
    assert_eq!(linear_choices().len(), before, "no measurement for a 3-row call");
}
