//! `.grad` does not depend on where the read is written (issue 12, case 5): before or after
//! the `.backward()` statement, in the same invoke or another. With several `.backward()`
//! calls a read refers to the first one written after it, or to the last one when none follows.
//! Backward run on another thread (as libtorch does on an accelerator) gives the same values.
//! Right values: plain tch autograd on the modules called by hand, and the Python reference
//! (`fixtures/minilm.json`, case `grad`).

mod common;

use common::minilm::{case, close, f, minilm, PARIS};
use common::tiny::{input, stack, Stack};
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::Error;

/// d sum(scale * final output) / d (layer `l`'s output), per row, by plain autograd on a leaf.
fn plain_grad(model: &Hooked<Stack>, x: &Tensor, l: usize, scale: f64) -> Tensor {
    let mut h = x.shallow_clone();
    for i in 0..l {
        h = nn::Module::forward(model.layers[i].inner(), &h).tanh();
    }
    let leaf = nn::Module::forward(model.layers[l].inner(), &h).detach().set_requires_grad(true);
    let mut h = leaf.tanh();
    for i in l + 1..model.layers.len() {
        h = nn::Module::forward(model.layers[i].inner(), &h).tanh();
    }
    (h.sum(Kind::Float) * scale).backward();
    leaf.grad()
}

/// The tests of this file run one at a time: the last one counts the gradient hooks alive in
/// the whole process, which the others' traces would change meanwhile.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert!(got.allclose(want, 1e-6, 1e-7, false), "{what}: {got} vs {want}");
}

#[test]
fn the_issue_example_on_minilm_a_read_after_backward() {
    let _serial = serial();
    let model = minilm();
    let want = case("grad");
    let g = trace!(model, PARIS, {
        model.encoder.layer[5].output.sum(Kind::Float).backward();
        model.encoder.layer[1].output.grad.save()
    })
    .unwrap();
    assert_eq!(g.size(), vec![1, 14, 384]);
    let (sum, norm) = (g.sum(Kind::Double).double_value(&[]), g.norm().double_value(&[]));
    assert!(close(sum, f(&want["grad_sum"]), 1e-3), "grad sum {sum}");
    assert!(close(norm, f(&want["grad_norm"]), 0.0), "grad norm {norm}");
}

#[test]
fn a_read_before_or_after_backward_is_the_same_gradient() {
    let _serial = serial();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 40);
    let (before, after) = trace!(model, &x, {
        let before = model.layers[1].output.grad.save();
        model.output.sum(Kind::Float).backward();
        let after = model.layers[0].output.grad.save();
        (before, after)
    })
    .unwrap();
    assert_close(&before, &plain_grad(&model, &x, 1, 1.0), "read before");
    assert_close(&after, &plain_grad(&model, &x, 0, 1.0), "read after");
}

#[test]
fn backward_in_one_invoke_and_the_read_in_another() {
    let _serial = serial();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let (x0, x1) = (input(1, 41), input(1, 42));
    let (g0, g1) = trace!(model, {
        invoke(&x0) {
            model.output.sum(Kind::Float).backward();
            let g0 = model.layers[1].output.grad.save();
        }
        invoke(&x1) {
            (g0, model.layers[1].output.grad.save())
        }
    })
    .unwrap();
    assert_close(&g0, &plain_grad(&model, &x0, 1, 1.0), "invoke 0");
    // Invoke 0's loss does not depend on invoke 1's row: its gradient there is exactly zero.
    assert_eq!(g1.size(), vec![1, 4]);
    assert_eq!(g1.abs().max().double_value(&[]), 0.0);

    // The loss written after the invokes covers every row; reads inside either invoke.
    let (g0, g1) = trace!(model, {
        invoke(&x0) { let g0 = model.layers[0].output.grad.save(); }
        invoke(&x1) { let g1 = model.layers[0].output.grad.save(); }
        model.output.sum(Kind::Float).backward();
        (g0, g1)
    })
    .unwrap();
    // Plain autograd on the same batch (one row alone may round differently).
    let want = plain_grad(&model, &Tensor::cat(&[&x0, &x1], 0), 0, 1.0);
    assert_close(&g0, &want.narrow(0, 0, 1), "invoke 0, whole-batch loss");
    assert_close(&g1, &want.narrow(0, 1, 1), "invoke 1, whole-batch loss");
}

#[test]
fn with_two_backward_passes_a_read_refers_to_the_next_one_written_or_the_last() {
    let _serial = serial();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 43).set_requires_grad(true);
    let (first, second, last) = trace!(model, &x, {
        let first = model.layers[0].output.grad.save();
        // Pass 0 keeps the autograd graph so that pass 1 can go through it again.
        Tensor::run_backward(&[model.output.sum(Kind::Float)], &[&x], true, false);
        let second = model.layers[0].output.grad.save();
        (model.output.sum(Kind::Float) * 3.0).backward();
        let last = model.layers[0].output.grad.save();
        (first, second, last)
    })
    .unwrap();
    let g = plain_grad(&model, &x.detach(), 0, 1.0);
    assert_close(&first, &g, "written before pass 0");
    assert_close(&second, &(&g * 3.0), "written between: pass 1");
    assert_close(&last, &(&g * 3.0), "written after every pass: the last one");
}

/// A second backward through a graph the first freed: libtorch's error, with the way to keep
/// the graph (the test above is that way, giving the by-hand values).
#[test]
fn a_second_backward_through_a_freed_graph_says_how_to_keep_it() {
    let _serial = serial();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 44).set_requires_grad(true);
    let err = trace!(model, &x, {
        model.output.sum(Kind::Float).backward();
        (model.output.sum(Kind::Float) * 3.0).backward();
        model.layers[0].output.grad.save()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("second time") && err.contains("run_backward") && err.contains("keep_graph"), "{err}");
    assert!(!nnsight::is_tracing());
}

#[test]
fn a_pass_that_does_not_reach_the_activation_is_named_in_the_error() {
    let _serial = serial();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(1, 44);
    let err = trace!(model, &x, {
        let g = model.layers[2].output.grad.save();
        model.layers[0].output.sum(Kind::Float).backward();
        g
    })
    .unwrap_err();
    assert!(matches!(err, Error::NeverProvided { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("`layers.2.output.grad` (call 0) was never provided: the backward pass of node %"), "{msg}");
    assert!(msg.contains("(at tests/grad_order.rs:"), "{msg}");
    assert!(msg.contains("refers to the first `.backward()` written after it, or to the last one when none follows"), "{msg}");
}

/// Runs `loss.backward()` on a new thread while this one waits, as libtorch runs backward
/// hooks on an accelerator's worker thread.
mod other_thread {
    use nnsight::prelude::*;

    pub fn backward(loss: &Tensor) {
        let loss = loss.shallow_clone();
        std::thread::spawn(move || loss.backward()).join().expect("backward thread");
    }
}

#[test]
fn backward_hooks_on_another_thread_give_the_same_values() {
    let _serial = serial();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 45);
    let hooks_before = nnsight::live_grad_hooks();
    let (g1, g0) = trace!(model, &x, {
        let g1 = model.layers[1].output.grad.save();
        other_thread::backward(&model.output.sum(Kind::Float));
        let g0 = (model.layers[0].output.grad * 2.0).save();
        (g1, g0)
    })
    .unwrap();
    assert_close(&g1, &plain_grad(&model, &x, 1, 1.0), "layer 1");
    assert_close(&g0, &(plain_grad(&model, &x, 0, 1.0) * 2.0), "a node over layer 0's gradient");

    // A gradient replaced from the other thread reaches the parameters: layer 0 gets none.
    for (_, mut t) in vs.variables() {
        t.zero_grad();
    }
    trace!(model, &x, {
        model.layers[1].output.grad = model.layers[1].output.grad.zeros_like();
        other_thread::backward(&model.output.sum(Kind::Float));
    })
    .unwrap();
    for (k, t) in vs.variables() {
        let zero = t.grad().abs().max().double_value(&[]) == 0.0;
        assert_eq!(zero, !k.starts_with("layers.2"), "{k}");
    }

    // A failing node on the other thread is the trace's error; no hook remains.
    let err = trace!(model, &x, {
        let bad = model.layers[1].output.grad.reshape([7]).save();
        other_thread::backward(&model.output.sum(Kind::Float));
        bad
    })
    .unwrap_err();
    assert!(matches!(err, Error::Node { .. }), "{err}");
    assert!(err.to_string().contains("shape '[7]' is invalid for input of size 8"), "{err}");
    assert_eq!(nnsight::live_grad_hooks(), hooks_before);
}
