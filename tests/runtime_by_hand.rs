//! The runtime used by hand (what `trace!` expands to), on tiny models whose right values come
//! from plain tch: the same computation written without hooks.

mod common;

use common::tiny::{input, stack, twice};
use nnsight::tch::{nn, Device, Tensor};
use nnsight::{Error, Tracer};

fn plain_stack(model: &nnsight::Hooked<common::tiny::Stack>, x: &Tensor) -> Vec<Tensor> {
    // Layer outputs computed with the Linear modules directly (no Hooked::call).
    let mut h = x.shallow_clone();
    let mut outs = vec![];
    for l in &model.layers {
        let o = nn::Module::forward(l.inner(), &h);
        h = o.tanh();
        outs.push(o);
    }
    outs
}

#[test]
fn save_reads_layer_output_equal_to_plain_tch() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 7);
    let expected = tch::no_grad(|| plain_stack(&model, &x));
    let mut tr = Tracer::new(&model);
    let g = tr.invoke(&x);
    let h1 = tr.output(g, 0, || Ok(&model.layers[1]));
    let s = tr.save(h1);
    let got: Tensor = tr.finish(s).unwrap();
    assert!(got.equal(&expected[1]));
}

#[test]
fn swap_changes_downstream_and_only_its_rows() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let (a, b) = (input(1, 3), input(2, 4));
    let mut tr = Tracer::new(&model);
    let g0 = tr.invoke(&a);
    let g1 = tr.invoke(&b);
    let h = tr.output(g1, 0, || Ok(&model.layers[0]));
    let zero = tr.apply1(h, |h: &Tensor| h.zeros_like());
    tr.swap_output(g1, 0, || Ok(&model.layers[0]), zero);
    let out0 = tr.output(g0, 0, || Ok(&model.layers[2]));
    let out1 = tr.output(g1, 0, || Ok(&model.layers[2]));
    let (s0, s1) = (tr.save(out0), tr.save(out1));
    let (o0, o1): (Tensor, Tensor) = tr.finish((s0, s1)).unwrap();
    // Invoke 0's rows must be bit-identical to the same batch run without the swap.
    let clean = tch::no_grad(|| plain_stack(&model, &Tensor::cat(&[&a, &b], 0)));
    assert!(o0.equal(&clean[2].narrow(0, 0, 1)), "invoke 0 must be untouched");
    // invoke 1: layer 0 output zeroed -> tanh(0) = 0 feeds layer 1
    let expected = tch::no_grad(|| {
        let h = Tensor::zeros([2, 4], (tch::Kind::Float, Device::Cpu));
        let h = nn::Module::forward(model.layers[1].inner(), &h).tanh();
        nn::Module::forward(model.layers[2].inner(), &h)
    });
    assert_eq!(o1.size(), vec![2, 4]);
    assert!(o1.allclose(&expected, 1e-6, 1e-7, false));
}

#[test]
fn call_index_addresses_second_call_of_shared_module() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = twice(&vs);
    let x = input(1, 5);
    let mut tr = Tracer::new(&model);
    let g = tr.invoke(&x);
    let c0 = tr.output(g, 0, || Ok(&model.lin));
    let c1 = tr.output(g, 1, || Ok(&model.lin));
    let (s0, s1) = (tr.save(c0), tr.save(c1));
    let (v0, v1): (Tensor, Tensor) = tr.finish((s0, s1)).unwrap();
    let lin = model.lin.inner();
    let e0 = tch::no_grad(|| nn::Module::forward(lin, &x));
    let e1 = tch::no_grad(|| nn::Module::forward(lin, &e0.relu()));
    assert!(v0.equal(&e0));
    assert!(v1.equal(&e1));
}

#[test]
fn later_layer_into_earlier_layer_is_an_error() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 4);
    let x = input(1, 5);
    let mut tr = Tracer::new(&model);
    let g = tr.invoke(&x);
    let h3 = tr.output(g, 0, || Ok(&model.layers[3]));
    tr.swap_output(g, 0, || Ok(&model.layers[0]), h3);
    let err = tr.finish(()).unwrap_err();
    assert!(matches!(err, Error::NotReady { .. }), "{err}");
    assert!(err.to_string().contains("layers.0.output"), "{err}");
}

#[test]
fn never_provided_call_index_is_reported() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = twice(&vs);
    let mut tr = Tracer::new(&model);
    let g = tr.invoke(input(1, 1));
    let c = tr.output(g, 5, || Ok(&model.lin));
    let s = tr.save(c);
    let err = tr.finish(s).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`lin.output` (call 5) was never provided: the module ran only 2 time(s) in this run"
    );
}

#[test]
fn panic_inside_intervention_becomes_error_and_next_run_is_clean() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 9);
    let plain = tch::no_grad(|| model.call(x.shallow_clone()));
    let mut tr = Tracer::new(&model);
    let g = tr.invoke(&x);
    let h = tr.output(g, 0, || Ok(&model.layers[0]));
    let bad = tr.apply1(h, |h: &Tensor| h.matmul(&Tensor::ones([7, 7], (tch::Kind::Float, Device::Cpu))));
    tr.swap_output(g, 0, || Ok(&model.layers[0]), bad);
    let err = tr.finish(()).unwrap_err();
    assert!(matches!(err, Error::Node { .. }), "{err}");
    let msg = err.to_string();
    // libtorch's own message, the node's source line and its input's layout; no C++ frames.
    assert!(msg.contains("mat1 and mat2 shapes cannot be multiplied (1x4 and 7x7)"), "{msg}");
    assert!(msg.contains("tests/runtime_by_hand.rs"), "{msg}");
    assert!(msg.contains("(inputs: %0 layers.0.output = Tensor[1, 4] Float Cpu)"), "{msg}");
    assert!(!msg.contains("frame #"), "{msg}");
    assert!(!nnsight::is_tracing());
    let again = tch::no_grad(|| model.call(x.shallow_clone()));
    assert!(again.equal(&plain));
}
