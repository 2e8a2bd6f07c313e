//! The block's order against the model's order. In one invoke (or among the statements outside
//! the invokes), a read written before a change (swap, skip, in-place edit) must not see it;
//! when the model computes the read's hook point after the changed one, it cannot help seeing
//! it, so the trace fails with `Error::OutOfOrder` naming both hook points (nnsight raises its
//! out-of-order error there too). Written the other way round, as changes alone, or across
//! invokes, the values are the plain computation's in the model's order.
//!
//! Right values come from the tiny stack's layers called by hand (no hooks).

mod common;

use common::minilm::{minilm, PARIS, ROME};
use common::tiny::{input, stack, Stack};
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::{edit, Error, Hooked};

/// Every layer's output (before its tanh) with `edit(i, output)` applied, by hand.
fn by_hand(model: &Hooked<Stack>, x: &Tensor, edit: impl Fn(usize, Tensor) -> Tensor) -> Vec<Tensor> {
    tch::no_grad(|| {
        let mut h = x.shallow_clone();
        let mut outs = Vec::new();
        for i in 0..model.layers.len() {
            let o = edit(i, nn::Module::forward(model.layers[i].inner(), &h));
            h = o.tanh();
            outs.push(o);
        }
        outs
    })
}

fn assert_out_of_order(err: Error, point: &str, changed: &str) {
    let msg = err.to_string();
    match &err {
        Error::OutOfOrder { point: p, changed: c, .. } => assert!(p == point && c == changed, "{msg}"),
        _ => panic!("expected OutOfOrder, got {msg}"),
    }
    assert!(msg.contains("tests/block_order.rs:") && msg.contains("write the change before the read") && msg.contains("one forward pass cannot give the value from before that change"), "{msg}");
}

#[test]
fn a_read_of_a_later_layer_written_before_an_edit_of_an_earlier_one_is_an_error() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 200);
    let plain = tch::no_grad(|| model.call(x.shallow_clone()));

    let err = trace!(model, &x, {
        let h1 = model.layers[1].output.save();
        model.layers[0].output *= 0.0;
        h1
    })
    .unwrap_err();
    assert_out_of_order(err, "layers.1.output", "layers.0.output");
    // A value computed from the read, not saved, is caught the same way.
    let err = trace!(model, &x, {
        let n = model.layers[2].output.norm().double_value(&[]);
        model.layers[0].output[.., 1] = 5.0;
        n
    })
    .unwrap_err();
    assert_out_of_order(err, "layers.2.output", "layers.0.output");
    // A swap and a skip likewise.
    let err = trace!(model, &x, {
        let out = model.output.save();
        model.layers[1].output = model.layers[1].output * 2.0;
        out
    })
    .unwrap_err();
    assert_out_of_order(err, "output", "layers.1.output");
    let err = trace!(model, &x, {
        let h2 = model.layers[2].output.save();
        model.layers[1].skip(model.layers[1].input);
        h2
    })
    .unwrap_err();
    assert_out_of_order(err, "layers.2.output", "layers.1.output");
    // Nothing stays hooked.
    assert!(tch::no_grad(|| model.call(x.shallow_clone())).equal(&plain));
}

#[test]
fn the_same_statements_in_the_models_order_give_the_plain_values() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 201);
    let (h0, h1) = trace!(model, &x, {
        let h0 = model.layers[0].output.save(); // read, then edit the same point: the read keeps its value
        model.layers[0].output *= 0.5;
        (h0, model.layers[1].output.save())
    })
    .unwrap();
    let clean = by_hand(&model, &x, |_, o| o);
    let edited = by_hand(&model, &x, |i, o| if i == 0 { o * 0.5 } else { o });
    assert!(h0.equal(&clean[0]) && h1.equal(&edited[1]));
}

/// Each invoke is a program of its own, run in order; invokes (and the statements outside
/// them) run side by side, so across them the model's order holds — as in nnsight.
#[test]
fn across_invokes_the_models_order_holds() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let (a, b) = (input(1, 202), input(2, 203));
    let (late_a, late_b, late_all) = trace!(model, {
        let late_all = model.layers[2].output.save(); // outside the invokes: every row
        invoke(&a) { let late_a = model.layers[2].output.save(); }
        invoke(&b) {
            model.layers[0].output *= 0.0;
            (late_a, model.layers[2].output.save(), late_all)
        }
    })
    .unwrap();
    // By hand on the same batch of three rows: rows 1..3 (invoke 1) of layer 0 zeroed.
    let x = Tensor::cat(&[&a, &b], 0);
    let want = by_hand(&model, &x, |i, o| if i == 0 { o.index_fill(0, &Tensor::from_slice(&[1i64, 2]), 0.0) } else { o });
    assert!(late_a.equal(&want[2].narrow(0, 0, 1)), "invoke 0 does not see invoke 1's edit");
    assert!(late_b.equal(&want[2].narrow(0, 1, 2)));
    assert!(late_all.equal(&want[2]), "the whole batch sees invoke 1's edit in invoke 1's rows");

    // Outside the invokes, a read and then a change of an earlier layer: one program, out of order.
    let err = trace!(model, {
        invoke(&a) {}
        invoke(&b) {}
        let late = model.layers[2].output.save();
        model.layers[0].output *= 0.0;
        late
    })
    .unwrap_err();
    assert_out_of_order(err, "layers.2.output", "layers.0.output");
}

/// Changes alone, written in any order, are a set applied in the model's order; a value read
/// before a change and put back by a swap written after it is out of order.
#[test]
fn changes_alone_may_come_in_any_order_but_a_value_carried_across_a_change_may_not() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 204);
    let out = trace!(model, &x, {
        model.layers[2].output = model.layers[2].output * 2.0; // a swap computed from layer 2 ...
        model.layers[1].output[.., 0] = 1.0;                    // ... then edits of earlier layers
        model.layers[0].output *= 0.5;
        model.output.save()
    })
    .unwrap();
    let want = by_hand(&model, &x, |i, o| match i {
        0 => o * 0.5,
        1 => o.index_fill(1, &Tensor::from_slice(&[0i64]), 1.0),
        _ => o * 2.0,
    });
    assert!(out.equal(&want[2].tanh()));

    let err = trace!(model, &x, {
        let clean = model.layers[2].output.copy();
        model.layers[0].output *= 0.0;
        model.layers[2].output = clean; // would put back the ablated value, not the clean one
        model.output.save()
    })
    .unwrap_err();
    assert_out_of_order(err, "layers.2.output", "layers.0.output");
}

/// A value read before a change and written into *another* hook point by a swap or an edit
/// written before that change is carried across it: out of order. A change of the read's own
/// hook point computed from it (`h3[.., 0] = h3[.., 1]`) is a change, applied in the model's
/// order. A read of a module's output written before its `.skip` cannot have the value from
/// before the skip (it never exists): out of order too.
#[test]
fn values_carried_to_another_hook_point_and_reads_before_a_skip_are_out_of_order() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 4);
    let x = input(2, 205);
    let err = trace!(model, &x, {
        model.layers[3].output = model.layers[2].output.copy();
        model.layers[1].output *= 0.0;
        model.output.save()
    })
    .unwrap_err();
    assert_out_of_order(err, "layers.2.output", "layers.1.output");
    let err = trace!(model, &x, {
        model.layers[3].output[..] = model.layers[2].output;
        model.layers[1].output *= 0.0;
        model.output.save()
    })
    .unwrap_err();
    assert_out_of_order(err, "layers.2.output", "layers.1.output");
    let out = trace!(model, &x, {
        model.layers[2].output[.., 0] = model.layers[2].output[.., 1];
        model.layers[1].output *= 0.5;
        model.output.save()
    })
    .unwrap();
    let want = by_hand(&model, &x, |i, o| match i {
        1 => o * 0.5,
        2 => {
            let col = o.narrow(1, 1, 1).copy();
            let _ = o.narrow(1, 0, 1).copy_(&col);
            o
        }
        _ => o,
    });
    assert!(out.equal(&want[3].tanh()));
    let err = trace!(model, &x, {
        let o = model.layers[2].output.save();
        model.layers[2].skip(model.layers[2].input);
        o
    })
    .unwrap_err();
    assert_out_of_order(err, "layers.2.output", "layers.2.output");
}

/// An `edit!` block is checked like a trace's own: its read of a later layer, carried across
/// its own change of an earlier one, fails the traces it is replayed in.
#[test]
fn a_persistent_edit_out_of_order_fails_the_traces_that_replay_it() {
    let model = minilm();
    let plain = trace!(model, &[PARIS, ROME], { model.output.save() }).unwrap();
    edit!(model, {
        let c = model.encoder.layer[3].output.copy();
        model.encoder.layer[1].output *= 0.5;
        model.encoder.layer[4].output = c;
    })
    .unwrap();
    let err = trace!(model, &[PARIS, ROME], { model.output.save() }).unwrap_err();
    model.clear_edits();
    assert!(matches!(&err, Error::OutOfOrder { point, changed, .. } if point == "encoder.layer.3.output" && changed == "encoder.layer.1.output"), "{err}");
    assert!(trace!(model, &[PARIS, ROME], { model.output.save() }).unwrap().equal(&plain));
}

/// A persistent edit is part of the model: its own read of a later layer is not "written
/// before" a trace's change of an earlier one. The trace's change reaches the edit.
#[test]
fn a_persistent_edits_reads_follow_the_model() {
    let model = minilm();
    edit!(model, { model.encoder.layer[4].output *= 2.0; }).unwrap();
    let out = trace!(model, &[PARIS, ROME], {
        model.encoder.layer[1].output[.., 3] = 0.0;
        model.output.save()
    });
    model.clear_edits();
    let out = out.unwrap();
    let expected = trace!(model, &[PARIS, ROME], {
        model.encoder.layer[1].output[.., 3] = 0.0;
        model.encoder.layer[4].output *= 2.0;
        model.output.save()
    })
    .unwrap();
    assert!(out.equal(&expected));
}

/// A saved value is the value at the moment it was saved, for the trace's result and for its
/// later uses in the block alike (a swap of it into another layer put the edited tensor in).
#[test]
fn a_saved_value_used_after_an_edit_is_the_saved_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 4);
    let x = input(2, 206);
    let (a, b, l3) = trace!(model, &x, {
        let a = model.layers[1].output.save();
        model.layers[1].output *= 0.0;
        let b = (a * 1.0).save();
        model.layers[2].output = a;
        (a, b, model.layers[2].output.save())
    })
    .unwrap();
    let clean = by_hand(&model, &x, |_, o| o);
    assert!(a.equal(&clean[1]) && b.equal(&clean[1]) && l3.equal(&clean[1]), "the saved value, not the edited one");
}
