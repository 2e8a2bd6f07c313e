//! `.skip(value)`: a module returns `value` without running its forward (a counter in the
//! module proves it did not run); checked against the forward computed by hand in plain tch,
//! with bad values and partial batches as errors that name the hook point, and nothing left
//! hooked afterwards.

mod common;

use std::cell::Cell;

use common::tiny::{input, stack, Stack};
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::Error;

/// A linear layer that counts its forward calls.
struct Counted {
    lin: nn::Linear,
    calls: Cell<usize>,
}

impl ModuleTree for Counted {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for Counted {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.calls.set(self.calls.get() + 1);
        nn::Module::forward(&self.lin, &x)
    }
}

/// `post(mid(x).relu())`, `mid` counting its calls.
#[derive(ModuleTree)]
struct Net {
    mid: Hooked<Counted>,
    post: Hooked<nn::Linear>,
}

impl HookModule for Net {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.post.call(self.mid.call(x).relu())
    }
}

fn net(vs: &nn::VarStore) -> Hooked<Net> {
    tch::manual_seed(3);
    let p = vs.root();
    let mid = Counted { lin: nn::linear(&p / "mid", 4, 4, Default::default()), calls: Cell::new(0) };
    Hooked::with_path(
        "",
        Net { mid: Hooked::new(&(&p / "mid"), mid), post: Hooked::new(&(&p / "post"), nn::linear(&p / "post", 4, 4, Default::default())) },
    )
}

fn plain_post(model: &Hooked<Net>, h: &Tensor) -> Tensor {
    tch::no_grad(|| nn::Module::forward(model.post.inner(), &h.relu()))
}

#[test]
fn a_skipped_module_does_not_run_and_returns_the_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let x = input(2, 1);
    let (out, seen) = trace!(model, &x, {
        model.mid.skip(model.mid.input * 3.0);
        (model.output.save(), model.mid.output.save())
    })
    .unwrap();
    assert_eq!(model.mid.calls.get(), 0, "mid's forward did not run");
    let want_mid = &x * 3.0;
    assert!(seen.equal(&want_mid), ".output of the skipped module is the value");
    assert!(out.equal(&plain_post(&model, &want_mid)), "the model went on with the value");
    // Afterwards the module runs again, and a plain forward is the untraced one.
    let plain = tch::no_grad(|| model.forward(x.shallow_clone()));
    assert_eq!(model.mid.calls.get(), 1);
    let by_hand = tch::no_grad(|| plain_post(&model, &nn::Module::forward(&model.mid.lin, &x)));
    assert!(plain.equal(&by_hand));
}

#[test]
fn skipping_a_layer_of_a_stack_removes_it() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model: Hooked<Stack> = stack(&vs, 3);
    let x = input(1, 2);
    let out = trace!(model, &x, {
        model.layers[1].skip(model.layers[1].input);
        model.output.save()
    })
    .unwrap();
    // By hand: layer 0, tanh, (layer 1 is the identity on its input), tanh, layer 2, tanh.
    let want = tch::no_grad(|| {
        let h = nn::Module::forward(model.layers[0].inner(), &x).tanh();
        let h = h.tanh();
        nn::Module::forward(model.layers[2].inner(), &h).tanh()
    });
    assert!(out.equal(&want));
}

#[test]
fn a_skip_under_a_false_condition_lets_the_module_run() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let x = input(1, 4);
    let out = trace!(model, &x, {
        if model.mid.input.sum(Kind::Float).double_value(&[]) > 1e9 {
            model.mid.skip(model.mid.input * 0.0);
        }
        model.output.save()
    })
    .unwrap();
    assert_eq!(model.mid.calls.get(), 1, "the condition was false: mid ran");
    assert!(out.equal(&tch::no_grad(|| model.forward(x.shallow_clone()))));
}

#[test]
fn bad_skip_values_are_errors_naming_the_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let x = input(2, 5);
    // Wrong number of rows.
    let err = trace!(model, &x, {
        model.mid.skip(Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)));
        model.output.save()
    })
    .unwrap_err();
    assert!(matches!(&err, Error::SwapMismatch { point, call: 0, .. } if point.contains("mid")), "{err}");
    // Wrong dtype.
    let err = trace!(model, &x, {
        model.mid.skip(model.mid.input.to_kind(Kind::Double));
        model.output.save()
    })
    .unwrap_err();
    assert!(matches!(&err, Error::SwapMismatch { .. }) && err.to_string().contains("Double"), "{err}");
    // Only one of two invokes skips: the module runs once for the batch.
    let (a, b) = (input(1, 6), input(1, 7));
    let err = trace!(model, {
        invoke(&a) { model.mid.skip(model.mid.input); }
        invoke(&b) { model.output.save() }
    })
    .unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("mid") && m.contains("rows 0..1 of a batch of 2")), "{err}");
    // A value of the right rows but the wrong width: the skip cannot know the output's width
    // (the module never runs), so the next module fails; the error names that module.
    let err = trace!(model, &x, {
        model.mid.skip(Tensor::zeros([2, 7], (Kind::Float, Device::Cpu)));
        model.output.save()
    })
    .unwrap_err();
    assert!(matches!(&err, Error::Model(m) if m.starts_with("in module `post`") && m.contains("2x7")), "{err}");
    assert_eq!(model.mid.calls.get(), 0, "no run went past the skip");
    // Nothing stays hooked after the errors.
    let plain = tch::no_grad(|| model.forward(x.shallow_clone()));
    assert_eq!(model.mid.calls.get(), 1);
    assert!(plain.equal(&plain_post(&model, &tch::no_grad(|| nn::Module::forward(&model.mid.lin, &x)))));
    assert!(!nnsight::is_tracing());
}

#[test]
fn a_skip_of_a_call_that_never_happens_or_written_twice_is_an_error() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let x = input(1, 8);
    let err = trace!(model, &x, {
        model.mid.at(1).skip(model.mid.input);
        model.output.save()
    })
    .unwrap_err();
    assert!(matches!(&err, Error::NeverProvided { point, call: 1, reason } if point.contains("mid") && reason.contains("skipped nothing")), "{err}");
    let err = trace!(model, &x, {
        model.mid.skip(model.mid.input);
        model.mid.skip(model.mid.input * 2.0);
        model.output.save()
    })
    .unwrap_err();
    assert!(matches!(&err, Error::Input(m) if m.contains("written twice")), "{err}");
}
