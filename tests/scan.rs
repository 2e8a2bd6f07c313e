//! `scan!`: a trace checked without running the model; every problem found comes back, not
//! only the first. A counter in the model proves it never ran.

mod common;

use std::cell::Cell;

use common::tiny::input;
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::Error;

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

#[derive(ModuleTree)]
struct Net {
    layers: Vec<Hooked<Counted>>,
}

impl HookModule for Net {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.layers.iter().fold(x, |h, l| l.call(h))
    }
}

fn net(vs: &nn::VarStore) -> Hooked<Net> {
    let p = vs.root() / "layers";
    let layers = (0..3)
        .map(|i| Hooked::new(&(&p / i), Counted { lin: nn::linear(&p / i, 4, 4, Default::default()), calls: Cell::new(0) }))
        .collect();
    Hooked::with_path("", Net { layers })
}

fn calls(model: &Hooked<Net>) -> usize {
    model.layers.iter().map(|l| l.calls.get()).sum()
}

#[test]
fn a_good_trace_scans_clean_without_running() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let x = input(2, 1);
    let problems = scan!(model, &x, {
        model.layers[1].output[.., 0] = 0.0;
        model.layers[2].output.save()
    });
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(calls(&model), 0, "scan never runs the model");
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let (a, scalar) = (input(1, 2), Tensor::from(1.0f32));
    let (i, j) = (5usize, -4i64);
    let problems = scan!(model, {
        invoke(&a) {
            let _h = model.layers[i].output.save();          // out of range
            model.layers[j].output *= 2.0;                   // out of range from the end
        }
        invoke(&scalar) {                                     // no batch dimension
            model.layers[0].output.save()
        }
    });
    assert_eq!(calls(&model), 0);
    let index_errors: Vec<&Error> = problems.iter().filter(|e| matches!(e, Error::IndexOutOfRange { .. })).collect();
    assert_eq!(index_errors.len(), 2, "{problems:?}");
    assert!(matches!(index_errors[0], Error::IndexOutOfRange { index: 5, len: 3, .. }));
    assert!(matches!(index_errors[1], Error::IndexOutOfRange { index: -4, len: 3, .. }));
    assert!(
        problems.iter().any(|e| matches!(e, Error::Input(m) if m.contains("batch dimension"))),
        "the scalar invoke is reported too: {problems:?}"
    );
    // The same trace run for real reports the first problem.
    let err = trace!(model, {
        invoke(&a) { model.layers[i].output.save() }
    })
    .unwrap_err();
    assert!(matches!(err, Error::IndexOutOfRange { index: 5, .. }));
}
