//! A saved value is the value at the moment it was saved (issue 12, case 4).
//!
//! An in-place edit written after a save (of the same activation, of the next module's `.input`
//! that shares its storage, or of another invoke's rows) leaves the saved value as it was; an
//! in-place op of the model's own forward pass after the save is an `Error::SavedChanged` that
//! names the node and the fix, and `.copy().save()` keeps the value. Right values come from the
//! modules called by hand, outside any trace.

mod common;

use common::tiny::{input, stack};
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::Error;

/// `b(a(x))`: `b`'s input is `a`'s output tensor itself (same storage).
#[derive(ModuleTree)]
struct Chain {
    a: Hooked<nn::Linear>,
    b: Hooked<nn::Linear>,
}

impl HookModule for Chain {
    type Input = Tensor; // [batch, 4]
    type Output = Tensor; // [batch, 4]
    fn forward(&self, x: Tensor) -> Tensor {
        self.b.call(self.a.call(x))
    }
}

fn chain(vs: &nn::VarStore) -> Hooked<Chain> {
    tch::manual_seed(5);
    let p = vs.root();
    let a = Hooked::new(&(&p / "a"), nn::linear(&p / "a", 4, 4, Default::default()));
    let b = Hooked::new(&(&p / "b"), nn::linear(&p / "b", 4, 4, Default::default()));
    Hooked::with_path("", Chain { a, b })
}

/// `b(relu(a(x)))` where the ReLU is applied in place to `a`'s output after `a` returned.
#[derive(ModuleTree)]
struct InPlace {
    a: Hooked<nn::Linear>,
    b: Hooked<nn::Linear>,
}

impl HookModule for InPlace {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let mut h = self.a.call(x);
        let _ = h.relu_();
        self.b.call(h)
    }
}

fn by_hand(l: &Hooked<nn::Linear>, x: &Tensor) -> Tensor {
    tch::no_grad(|| nn::Module::forward(l.inner(), x))
}

#[test]
fn an_edit_after_a_save_leaves_the_saved_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 30);
    let (before, after, out) = trace!(model, &x, {
        let before = model.layers[0].output.save();
        model.layers[0].output[.., 1] = 5.0;
        let after = model.layers[0].output.save();
        (before, after, model.output.save())
    })
    .unwrap();
    let clean = by_hand(&model.layers[0], &x);
    assert!(before.equal(&clean), "saved before the edit: {before:?} vs {clean:?}");
    let edited = clean.copy();
    let _ = edited.narrow(1, 1, 1).fill_(5.0);
    assert!(after.equal(&edited), "saved after the edit sees it: {after:?} vs {edited:?}");
    let h = by_hand(&model.layers[2], &by_hand(&model.layers[1], &edited.tanh()).tanh()).tanh();
    assert!(out.allclose(&h, 1e-6, 1e-7, false), "the model ran on the edited value");
}

#[test]
fn a_compound_edit_after_a_save_leaves_the_saved_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 31);
    let (h, out) = trace!(model, &x, {
        let h = model.layers[1].output.save();
        model.layers[1].output += 1.0;
        (h, model.output.save())
    })
    .unwrap();
    let clean = by_hand(&model.layers[1], &by_hand(&model.layers[0], &x).tanh());
    assert!(h.equal(&clean));
    assert!(out.allclose(&(clean + 1.0).tanh(), 1e-6, 1e-7, false));
}

#[test]
fn an_edit_of_the_next_modules_input_leaves_the_saved_output() {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = chain(&vs);
    let x = input(2, 32);
    let (a, out) = trace!(m, &x, {
        let a = m.a.output.save();
        m.b.input[..] = 0.0;
        (a, m.output.save())
    })
    .unwrap();
    assert!(a.equal(&by_hand(&m.a, &x)), "a.output shares its storage with b.input but was saved before the edit");
    let want = by_hand(&m.b, &Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)));
    assert!(out.allclose(&want, 1e-6, 1e-7, false));
}

#[test]
fn another_invokes_edit_leaves_this_invokes_saved_rows() {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = chain(&vs);
    let (x0, x1) = (input(1, 33), input(1, 34));
    let (a0, out0, out1) = trace!(m, {
        invoke(&x0) {
            let a0 = m.a.output.save();
            let out0 = m.output.save();
        }
        invoke(&x1) {
            m.a.output[..] = 0.0;
            (a0, out0, m.output.save())
        }
    })
    .unwrap();
    // The same rows computed in one batch of 2, as in the trace: a batch of 1 may take another
    // matmul kernel and differ in the last bits.
    let both = Tensor::cat(&[&x0, &x1], 0);
    assert!(a0.equal(&by_hand(&m.a, &both).narrow(0, 0, 1)));
    assert!(out0.allclose(&by_hand(&m.b, &by_hand(&m.a, &x0)), 1e-6, 1e-7, false));
    assert!(out1.allclose(&by_hand(&m.b, &Tensor::zeros([1, 4], (Kind::Float, Device::Cpu))), 1e-6, 1e-7, false));
}

#[test]
fn an_in_place_op_of_the_model_after_a_save_is_an_error_with_the_fix() {
    tch::manual_seed(6);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let m = Hooked::with_path(
        "",
        InPlace {
            a: Hooked::new(&(&p / "a"), nn::linear(&p / "a", 4, 4, Default::default())),
            b: Hooked::new(&(&p / "b"), nn::linear(&p / "b", 4, 4, Default::default())),
        },
    );
    let x = input(3, 35);
    let err = trace!(m, &x, { m.a.output.save() }).unwrap_err();
    assert!(matches!(err, Error::SavedChanged { .. }), "{err}");
    let msg = err.to_string();
    for part in ["saved node %0 a.output (at tests/saved_values.rs:", "was changed in place after it was saved", "`.copy().save()`"] {
        assert!(msg.contains(part), "`{part}` missing from: {msg}");
    }
    // Reading `b.input` too: the change is caught when the forward pass reaches it.
    let err = trace!(m, &x, {
        let a = m.a.output.save();
        let _ = m.b.input.sum(Kind::Float);
        a
    })
    .unwrap_err();
    assert!(err.to_string().contains("by the model's forward pass before it reached `b.input` (call 0)"), "{err}");
    // The fix the message names: a copy keeps the value of the moment.
    let a = trace!(m, &x, { m.a.output.copy().save() }).unwrap();
    assert!(a.equal(&by_hand(&m.a, &x)));
    // A value the model changes in place but nobody saved is no error.
    let out = trace!(m, &x, { m.output.save() }).unwrap();
    assert!(out.allclose(&by_hand(&m.b, &by_hand(&m.a, &x).relu()), 1e-6, 1e-7, false));
}
