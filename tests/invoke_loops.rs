//! Invokes written in loops inside `trace!` (nnsight's `for p in prompts: with tracer.invoke(p)`):
//! one invoke per iteration, values collected across iterations, each checked against a plain
//! tch forward pass of the batch by hand.

mod common;

use common::tiny::{input, stack, Stack};
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::Error;

/// Layer `i`'s linear map (before its tanh), untraced.
fn layer(model: &Hooked<Stack>, i: usize, x: &Tensor) -> Tensor {
    nn::Module::forward(model.layers[i].inner(), x)
}

/// The plain forward of `x` `[rows, 4]`: every layer's linear output.
fn plain(model: &Hooked<Stack>, x: &Tensor) -> Vec<Tensor> {
    tch::no_grad(|| {
        let mut h = x.shallow_clone();
        (0..3)
            .map(|i| {
                let o = layer(model, i, &h);
                h = o.tanh();
                o
            })
            .collect()
    })
}

#[test]
fn one_invoke_per_iteration_and_saves_collected_across_them() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let inputs = [input(1, 1), input(2, 2), input(1, 3)];
    let outs = trace!(model, {
        let mut outs = Vec::new();
        for x in &inputs {
            invoke(x) {
                outs.push(model.layers[1].output.save());
            }
        }
        outs
    })
    .unwrap();
    let batch = Tensor::cat(&inputs, 0);
    let want = &plain(&model, &batch)[1];
    assert_eq!(outs.len(), 3);
    let rows = [(0, 1), (1, 2), (3, 1)];
    for (o, (start, n)) in outs.iter().zip(rows) {
        assert!(o.equal(&want.narrow(0, start, n)), "rows {start}..{}", start + n);
    }
}

#[test]
fn edits_in_loop_invokes_touch_only_their_rows() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let inputs = [input(1, 4), input(1, 5), input(1, 6)];
    let (looped, written_out) = trace!(model, {
        let mut outs = Vec::new();
        for (i, x) in inputs.iter().enumerate() {
            invoke(x) {
                model.layers[0].output[.., 0] = i as f64;
                outs.push(model.layers[2].output.save());
            }
        }
        (outs, ())
    })
    .unwrap();
    let () = written_out;
    // The same edits, the invokes written out by hand.
    let by_hand = trace!(model, {
        invoke(&inputs[0]) { model.layers[0].output[.., 0] = 0.0; let a = model.layers[2].output.save(); }
        invoke(&inputs[1]) { model.layers[0].output[.., 0] = 1.0; let b = model.layers[2].output.save(); }
        invoke(&inputs[2]) { model.layers[0].output[.., 0] = 2.0; vec![a, b, model.layers[2].output.save()] }
    })
    .unwrap();
    // And by hand in plain tch.
    let x = Tensor::cat(&inputs, 0);
    let want = tch::no_grad(|| {
        let h0 = layer(&model, 0, &x);
        for r in 0..3 {
            let _ = h0.get(r).get(0).fill_(r as f64);
        }
        let h1 = layer(&model, 1, &h0.tanh());
        layer(&model, 2, &h1.tanh())
    });
    for r in 0..3 {
        assert!(looped[r].equal(&by_hand[r]), "row {r}: loop vs written-out invokes");
        assert!(looped[r].equal(&want.narrow(0, r as i64, 1)), "row {r}: loop vs plain tch");
    }
}

#[test]
fn accumulator_across_loop_invokes_and_statements_before_the_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let inputs = [input(1, 7), input(1, 8)];
    let scale = 0.5;
    let total = trace!(model, {
        let mut total = 0.0;
        for x in &inputs {
            invoke(x) {
                total += model.layers[2].output.sum(Kind::Double).double_value(&[]) * scale;
            }
        }
        total
    })
    .unwrap();
    let want = plain(&model, &Tensor::cat(&inputs, 0))[2].sum(Kind::Double).double_value(&[]) * scale;
    assert!((total - want).abs() < 1e-12, "{total} vs {want}");
}

#[test]
fn a_loop_that_runs_no_invoke_is_an_error_not_a_panic() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let inputs: Vec<Tensor> = Vec::new();
    let r = trace!(model, {
        let mut outs = Vec::new();
        for x in &inputs {
            invoke(x) {
                outs.push(model.layers[1].output.save());
            }
        }
        outs
    });
    match r {
        Err(e @ Error::Input(_)) => assert!(e.to_string().contains("invoke"), "{e}"),
        other => panic!("expected an input error, got {other:?}"),
    }
    // Nothing stays hooked: a later trace works.
    let x = input(1, 9);
    let h = trace!(model, &x, { model.layers[0].output.save() }).unwrap();
    assert!(h.equal(&plain(&model, &x)[0]));
}
