//! `.grad` inside `trace!`: gradients of activations read and replaced during `.backward()`.
//! Right values: Python nnsight (`fixtures/minilm.json`, case `grad`) and plain tch autograd on
//! the same computation without hooks.

mod common;

use common::minilm::{assert_values, case, close, f, minilm, PARIS, ROME};
use common::tiny::{input, stack};
use nnsight::prelude::*;
use nnsight::tch::nn;

/// Plain autograd on the tiny stack: the gradient of `loss = sum(final output)` w.r.t. layer
/// `l`'s output, computed by making that output a leaf and running the rest by hand.
fn plain_grad(model: &Hooked<common::tiny::Stack>, x: &Tensor, l: usize) -> Tensor {
    let mut h = x.shallow_clone();
    for i in 0..l {
        h = nn::Module::forward(model.layers[i].inner(), &h).tanh();
    }
    let leaf = nn::Module::forward(model.layers[l].inner(), &h).detach().set_requires_grad(true);
    let mut h = leaf.tanh();
    for i in l + 1..model.layers.len() {
        h = nn::Module::forward(model.layers[i].inner(), &h).tanh();
    }
    let loss = h.sum(Kind::Float);
    loss.backward();
    leaf.grad()
}

#[test]
fn grad_matches_python_nnsight_on_minilm() {
    let model = minilm();
    let want = case("grad");
    let g = trace!(model, PARIS, {
        let g = model.encoder.layer[1].output.grad.save();
        model.encoder.layer[5].output.sum(Kind::Float).backward();
        g
    })
    .unwrap();
    assert_eq!(g.size(), vec![1, 14, 384]);
    let sum = g.sum(Kind::Double).double_value(&[]);
    let norm = g.norm().double_value(&[]);
    assert!(close(sum, f(&want["grad_sum"]), 1e-3), "grad sum {sum}");
    assert!(close(norm, f(&want["grad_norm"]), 0.0), "grad norm {norm}");
    let first5 = Vec::<f64>::try_from(g.get(0).get(0).narrow(0, 0, 5).to_kind(Kind::Double)).unwrap();
    assert_values(&first5, &want["grad_token0_first5"], "grad_token0_first5");
}

#[test]
fn grad_equals_plain_autograd_on_a_tiny_model() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 21);
    let g = trace!(model, &x, {
        let g = model.layers[1].output.grad.save();
        model.layers[2].output.tanh().sum(Kind::Float).backward();
        g
    })
    .unwrap();
    let want = plain_grad(&model, &x, 1);
    assert!(g.allclose(&want, 1e-6, 1e-7, false), "{g:?} vs {want:?}");
}

#[test]
fn grad_of_activation_used_on_two_paths_matches_finite_differences() {
    // Twice applies `lin` twice: its call-0 output feeds call 1 (through relu) — one activation,
    // gradient summed over both uses downstream. Check d loss / d h0 by central differences.
    let vs = nn::VarStore::new(Device::Cpu);
    let model = common::tiny::twice(&vs);
    let x = input(1, 5);
    let g = trace!(model, &x, {
        let g = model.lin.output.grad.save();
        (model.output.sum(Kind::Float) + model.lin.output.pow_tensor_scalar(2).sum(Kind::Float)).backward();
        g
    })
    .unwrap();
    // loss(h0) = sum(post(lin(relu(h0)))) + sum(h0^2), computed without hooks in f64.
    let loss = |h0: &Tensor| -> f64 {
        let h1 = nn::Module::forward(model.lin.inner(), &h0.relu());
        let out = nn::Module::forward(model.post.inner(), &h1);
        (out.sum(Kind::Double) + h0.pow_tensor_scalar(2).sum(Kind::Double)).double_value(&[])
    };
    let h0 = tch::no_grad(|| nn::Module::forward(model.lin.inner(), &x));
    let eps = 1e-3;
    for j in 0..4 {
        let e = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
        let _ = e.i((0, j)).fill_(eps);
        let fd = tch::no_grad(|| (loss(&(&h0 + &e)) - loss(&(&h0 - &e))) / (2.0 * eps));
        let got = g.double_value(&[0, j]);
        assert!((got - fd).abs() < 2e-3, "component {j}: hook {got}, finite differences {fd}");
    }
}

#[test]
fn two_invokes_each_get_their_own_rows_of_the_gradient() {
    let model = minilm();
    let alone = trace!(model, ROME, {
        let g = model.encoder.layer[1].output.grad.save();
        model.encoder.layer[5].output.sum(Kind::Float).backward();
        g
    })
    .unwrap();
    let (g0, g1) = trace!(model, {
        invoke(PARIS) {
            let g0 = model.encoder.layer[1].output.grad.save();
        }
        invoke(ROME) {
            let g1 = model.encoder.layer[1].output.grad.save();
            model.encoder.layer[5].output[.., ..13].sum(Kind::Float).backward();
            (g0, g1)
        }
    })
    .unwrap();
    // Loss depends on invoke 2's rows only (positions 0..13 are ROME's real tokens).
    assert_eq!(g0.size(), vec![1, 14, 384]);
    assert_eq!(g0.abs().max().double_value(&[]), 0.0, "invoke 1 rows get zero gradient");
    let alone_rows = trace!(model, ROME, {
        let g = model.encoder.layer[1].output.grad.save();
        model.encoder.layer[5].output.sum(Kind::Float).backward();
        g
    })
    .unwrap();
    assert!(alone.equal(&alone_rows));
    let diff = (g1.narrow(1, 0, 13) - alone.narrow(1, 0, 13)).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "invoke 2 gradient differs from its single-invoke gradient by {diff}");
}

#[test]
fn replacing_a_gradient_reaches_parameters() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 8);
    let zero_grads = |vs: &nn::VarStore| {
        for (_, mut t) in vs.variables() {
            t.zero_grad();
        }
    };
    let param_grads = |vs: &nn::VarStore| -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, t)| (k, t.grad().copy())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    // Plain backward without hooks.
    zero_grads(&vs);
    let out = model.call(x.shallow_clone());
    out.sum(Kind::Float).backward();
    let plain = param_grads(&vs);
    // Replacing the gradient with itself: bit-identical parameter gradients.
    zero_grads(&vs);
    trace!(model, &x, {
        model.layers[1].output.grad = model.layers[1].output.grad.shallow_clone();
        model.output.sum(Kind::Float).backward();
    })
    .unwrap();
    let same = param_grads(&vs);
    for ((k, a), (_, b)) in plain.iter().zip(&same) {
        assert!(a.equal(b), "{k} changed");
    }
    // Replacing it with zeros: layers 0 and 1 get no gradient, layer 2 keeps its own.
    zero_grads(&vs);
    trace!(model, &x, {
        model.layers[1].output.grad = model.layers[1].output.grad.zeros_like();
        model.output.sum(Kind::Float).backward();
    })
    .unwrap();
    for (k, g) in param_grads(&vs) {
        let zero = g.abs().max().double_value(&[]) == 0.0;
        assert_eq!(zero, !k.starts_with("layers.2"), "{k}");
    }
}

#[test]
fn grad_of_activation_no_backward_reaches_is_an_error_and_no_hook_remains() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(1, 2).set_requires_grad(true);
    let err = trace!(model, &x, {
        let g = model.layers[2].output.grad.save();
        model.layers[0].output.sum(Kind::Float).backward();
        g
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("`layers.2.output.grad` (call 0) was never provided: the backward pass of node %3 apply (at tests/grad.rs:"),
        "{msg}"
    );
    assert!(msg.ends_with("never reached it (that node did not run, or its value does not depend on this activation). A `.grad` read refers to the first `.backward()` written after it, or to the last one when none follows"), "{msg}");
    // After the trace no backward hook remains: a second backward through the same autograd
    // graph (kept alive with keep_graph) runs no intervention code and gives plain gradients.
    let (h, g) = trace!(model, &x, {
        let g = model.layers[1].output.grad.save();
        let h = model.output.save();
        // Gradient w.r.t. the input (so backward passes through layer 1), keeping the graph.
        Tensor::run_backward(&[model.output.sum(Kind::Float)], &[&x], true, false);
        (h, g)
    })
    .unwrap();
    assert!(!nnsight::is_tracing());
    let again = Tensor::run_backward(&[h.sum(Kind::Float)], &[&x], false, false);
    assert_eq!(again[0].size(), vec![1, 4]);
    let want = plain_grad(&model, &x.detach(), 1);
    assert!(g.allclose(&want, 1e-6, 1e-7, false));
}

#[test]
fn second_backward_pass_is_addressed_separately() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 4).set_requires_grad(true);
    let (g0, g1) = trace!(model, &x, {
        let g0 = model.layers[0].output.grad.save();
        // Pass 0 keeps the autograd graph so that pass 1 can go through it again.
        Tensor::run_backward(&[model.layers[1].output.sum(Kind::Float)], &[&x], true, false);
        let g1 = model.layers[0].output.grad.save();
        (model.layers[1].output.sum(Kind::Float) * 2.0).backward();
        (g0, g1)
    })
    .unwrap();
    // d sum(layer1(tanh(h0))) / d h0 by plain autograd on a leaf copy of h0.
    let h0 = nn::Module::forward(model.layers[0].inner(), &x.detach()).detach().set_requires_grad(true);
    nn::Module::forward(model.layers[1].inner(), &h0.tanh()).sum(Kind::Float).backward();
    let want = h0.grad();
    assert!(g0.allclose(&want, 1e-6, 1e-7, false));
    assert!(g1.allclose(&(&want * 2.0), 1e-6, 1e-7, false));
}
