//! The block as ordinary Rust (issue 13): accumulators, closures, captures, in-place methods,
//! format strings, values of `if`/`match`/blocks, `?`; right values from plain tch by hand.

mod common;
use common::tiny::{input, stack};
use nnsight::prelude::*;
use nnsight::tch::nn;

fn layer(model: &Hooked<common::tiny::Stack>, i: usize, x: &Tensor) -> Tensor {
    nn::Module::forward(model.layers[i].inner(), x)
}
fn hand(model: &Hooked<common::tiny::Stack>, x: &Tensor) -> Vec<Tensor> {
    tch::no_grad(|| {
        let mut outs = vec![];
        let mut h = x.shallow_clone();
        for i in 0..3 { let o = layer(model, i, &h); h = o.tanh(); outs.push(o); }
        outs
    })
}
fn nrm<T: std::borrow::Borrow<Tensor>>(t: T) -> Tensor { t.borrow().norm() }

#[test]
fn accumulators_and_closures() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 11);
    let e = hand(&model, &x);
    let (total, v, acc) = trace!(model, &x, {
        let mut total = 0.0;
        for l in 0..3 { total += model.layers[l].output.norm().double_value(&[]); }
        let v: Vec<_> = (0..3).map(|l| model.layers[l].output.save()).collect();
        let mut acc = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        for l in 0..3 { acc = acc + model.layers[l].output; }
        (total, v, acc)
    }).unwrap();
    let t: f64 = e.iter().map(|o| o.norm().double_value(&[])).sum();
    assert!((total - t).abs() < 1e-9, "{total} {t}");
    assert!(v[2].equal(&e[2]));
    assert!(acc.allclose(&(&e[0] + &e[1] + &e[2]), 1e-6, 1e-6, false));
}

#[test]
fn captures_inplace_format() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 11);
    let e = hand(&model, &x);
    #[allow(non_snake_case)]
    let W = Tensor::eye(4, (Kind::Float, Device::Cpu)) * 2.0;
    let steer = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let idx: usize = 1;
    let (a, b, s, n, c, d) = trace!(model, &x, {
        let a = model.layers[0].output.matmul(&W).save();
        let b = (model.layers[0].output.matmul(&W) + steer).save();
        let h = model.layers[1].output;
        let s = format!("{h:?}");
        let n = nrm(model.layers[1].output).save();
        let c = model.layers[1].output[.., idx].save();
        model.layers[2].output.mul_(2.0);
        let d = model.layers[2].output.save();
        (a, b, s.save(), n, c, d)
    }).unwrap();
    assert!(a.equal(&e[0].matmul(&W)));
    assert!(b.equal(&(e[0].matmul(&W) + &steer)));
    assert_eq!(s, format!("{:?}", e[1]));
    assert!(n.equal(&e[1].norm()));
    assert!(c.equal(&e[1].i((.., 1))));
    assert!(d.equal(&(&e[2] * 2.0)));
}

#[test]
fn values_from_ifs_and_blocks() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 11);
    let e = hand(&model, &x);
    let last = true;
    let (p, q, r, t, u) = trace!(model, &x, {
        let h = if last { model.layers[2].output } else { model.layers[0].output };
        let y = if model.layers[0].output.sum(Kind::Float).double_value(&[]) > 0.0 { model.layers[0].output * 2.0 } else { model.layers[0].output * 3.0 };
        let n = { let t = model.layers[1].output; t.norm() };
        let (a, b) = (model.layers[0].output, model.layers[1].output);
        let mut z = model.layers[0].output * 2.0;
        z += 1.0;
        (h.save(), y.save(), n.save(), (a + b).save(), z.save())
    }).unwrap();
    assert!(p.equal(&e[2]));
    let f = if e[0].sum(Kind::Float).double_value(&[]) > 0.0 { 2.0 } else { 3.0 };
    assert!(q.equal(&(&e[0] * f)));
    assert!(r.equal(&e[1].norm()));
    assert!(t.equal(&(&e[0] + &e[1])));
    assert!(u.equal(&(&e[0] * 2.0 + 1.0)));
}

#[test]
fn try_match_and_negative_index() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 11);
    let e = hand(&model, &x);
    let mode = 1;
    let (s, last, m, d) = trace!(model, &x, {
        let s = model.layers[0].output.f_sum(Kind::Float)?.double_value(&[]);
        let last = model.layers[0].output[.., -1].save();
        let m = match model.layers[0].output.size()[0] { 2 => 1.0, _ => 0.0 };
        match mode {
            0 => model.layers[1].output[.., 0] = 0.0,
            _ => model.layers[1].output *= 2.0,
        }
        (s.save(), last, m.save(), model.layers[1].output.save())
    }).unwrap();
    assert_eq!(s, e[0].sum(Kind::Float).double_value(&[]));
    assert!(last.equal(&e[0].i((.., 3))));
    assert_eq!(m, 1.0);
    assert!(d.equal(&(&e[1] * 2.0)));
    // `?` on an activation's value: an error of the trace, naming the node.
    let r = trace!(model, &x, {
        let s = model.layers[0].output.f_view([7i64])?.sum(Kind::Float).save();
        s
    });
    let err = r.unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
}

/// Assignments under an `if` on a proxy take effect only when the condition holds at run time.
#[test]
fn assignments_under_an_if_on_a_proxy_follow_the_condition() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 11);
    let e = hand(&model, &x);
    // The middle of the three layer sums: both branches are taken, whatever the seeded weights.
    let mut sorted: Vec<f64> = e.iter().map(|t| t.sum(Kind::Float).double_value(&[])).collect();
    sorted.sort_by(f64::total_cmp);
    let thr = sorted[1];
    let (count, last, scaled) = trace!(model, &x, {
        let mut count = 0;
        let mut last = -1i64;
        let mut scaled = model.layers[0].output * 1.0;
        for l in 0..3 {
            if model.layers[l].output.sum(Kind::Float).double_value(&[]) >= thr {
                count += 1;
                last = l as i64;
            } else {
                scaled = scaled * 2.0;
            }
        }
        (count, last, scaled)
    })
    .unwrap();
    let sums: Vec<f64> = e.iter().map(|t| t.sum(Kind::Float).double_value(&[])).collect();
    let want_count = sums.iter().filter(|&&s| s >= thr).count() as i32;
    let want_last = sums.iter().rposition(|&s| s >= thr).map_or(-1, |i| i as i64);
    let below = sums.iter().filter(|&&s| s < thr).count() as i32;
    assert_eq!((count, last), (want_count, want_last));
    assert!(scaled.equal(&(&e[0] * 1.0 * 2f64.powi(below))), "below {below}");
    assert!(want_count >= 1 && below >= 1, "both branches taken for this input: {sums:?}");
}

/// The fix the compile error for `.next()` on both sides of a swap suggests: one `.next()`,
/// then the current call; the swap doubles the module's second call, by hand.
#[test]
fn next_once_then_the_current_call_is_the_same_call() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = common::tiny::twice(&vs);
    let x = input(2, 21);
    let out = trace!(model, &x, {
        let h = model.lin.next().output;
        model.lin.output = h * 2.0;
        model.post.output
    })
    .unwrap();
    let want = tch::no_grad(|| {
        let h0 = nn::Module::forward(model.lin.inner(), &x);
        let h1 = nn::Module::forward(model.lin.inner(), &h0.relu()) * 2.0;
        nn::Module::forward(model.post.inner(), &h1)
    });
    assert!(out.equal(&want));
}

/// A value computed from a view of an activation, written before an in-place edit of that
/// activation, is computed before the edit (program order), also when it is one node further
/// from the hook than the edit; so is a condition, and a copy kept to restore the value later.
#[test]
fn values_written_before_an_edit_see_the_activation_before_it() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 11);
    let e = hand(&model, &x);
    let (n, flag, restored) = trace!(model, &x, {
        let h = model.layers[0].output[.., 1];
        let n = h.norm().double_value(&[]);
        let big = h.abs().max().double_value(&[]) > -1.0; // always true before the edit
        model.layers[0].output[.., 1] = 0.0;
        let keep = model.layers[1].output[.., 2] * 1.0; // after the layer-0 edit (see below)
        model.layers[1].output[.., 2] = 0.0;
        let mut flag = 0;
        if big {
            flag = 1;
        }
        model.layers[2].output[.., 2] = keep;
        (n, flag, model.layers[2].output)
    })
    .unwrap();
    assert_eq!(n, e[0].i((.., 1)).norm().double_value(&[]));
    assert_eq!(flag, 1);
    // By hand: layer 0's column 1 zeroed, layer 1's column 2 zeroed, layer 2's column 2 set to
    // the clean-path value of layer 1's column 2 (computed after the layer-0 edit, before its own).
    let want = tch::no_grad(|| {
        let h0 = layer(&model, 0, &x);
        let _ = h0.i((.., 1)).fill_(0.0);
        let h1 = layer(&model, 1, &h0.tanh());
        let keep = h1.i((.., 2)) * 1.0;
        let _ = h1.i((.., 2)).fill_(0.0);
        let h2 = layer(&model, 2, &h1.tanh());
        h2.i((.., 2)).copy_(&keep);
        h2
    });
    assert!(restored.equal(&want));
    // Written before the layer-0 edit, `keep` (layer 1, computed after layer 0) could only be
    // the edited path's value: out of order, as in nnsight.
    let err = trace!(model, &x, {
        let keep = model.layers[1].output[.., 2] * 1.0;
        model.layers[0].output[.., 1] = 0.0;
        model.layers[2].output[.., 2] = keep;
    })
    .unwrap_err();
    assert!(matches!(err, nnsight::Error::OutOfOrder { .. }), "{err}");
}

/// A node built before an edit that also waits for a later hook point cannot have the values
/// from before the edit for both: the edit runs first, at the earlier hook point. An error
/// (as nnsight's out-of-order error); the same statements with the edit first compute.
#[test]
fn a_read_built_before_an_edit_that_waits_for_a_later_hook_is_out_of_order() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 12);
    let err = trace!(model, &x, {
        let h = model.layers[0].output[.., 1];
        let d = h - model.layers[1].output[.., 1];
        model.layers[0].output[.., 1] = 0.0;
        d
    })
    .unwrap_err();
    match &err {
        nnsight::Error::OutOfOrder { point, changed, .. } => assert!(point == "layers.1.output" && changed == "layers.0.output", "{err}"),
        other => panic!("expected OutOfOrder, got {other}"),
    }
    let (d, after) = trace!(model, &x, {
        let h = model.layers[0].output[.., 1];
        let clean = h.copy();
        model.layers[0].output[.., 1] = 0.0;
        let d = clean - model.layers[1].output[.., 1];
        let after = h * 1.0; // built after the edit: the edited memory, as tch's aliasing gives
        (d, after)
    })
    .unwrap();
    let (want_d, want_after) = tch::no_grad(|| {
        let h0 = layer(&model, 0, &x);
        let clean = h0.i((.., 1)).copy();
        let _ = h0.i((.., 1)).fill_(0.0);
        let h1 = layer(&model, 1, &h0.tanh());
        (&clean - h1.i((.., 1)), h0.i((.., 1)) * 1.0)
    });
    assert!(d.equal(&want_d), "{d:?} {want_d:?}");
    assert!(after.equal(&want_after));
}
