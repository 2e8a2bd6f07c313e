//! Issue 13: "Ordinary Rust that compiles outside the block compiles inside it with the same
//! meaning." A corpus of small `trace!` blocks written the way a researcher writes plain Rust,
//! each checked against the same computation done by hand with tch (no hooks).
//!
//! Tests that do not yet compile or pass on the current macro live in `mod pending`, built only
//! with `--features pending-corpus`.
#![allow(dead_code, non_snake_case, unused_mut, unused_variables, unused_assignments, clippy::all)]

mod common;

use common::tiny::{input, stack, twice, Stack};
use nnsight::prelude::*;
use nnsight::tch::nn;

fn layer(model: &Hooked<Stack>, i: usize, x: &Tensor) -> Tensor {
    nn::Module::forward(model.layers[i].inner(), x)
}

/// The plain forward pass by hand: the output of every layer (before its tanh), after `edit`
/// (given the layer index and the layer's output) changed it; the next layer sees its tanh.
fn run_edit(model: &Hooked<Stack>, x: &Tensor, edit: impl Fn(usize, Tensor) -> Tensor) -> Vec<Tensor> {
    tch::no_grad(|| {
        let mut h = x.shallow_clone();
        let mut outs = Vec::new();
        for i in 0..model.layers.len() {
            let o = edit(i, layer(model, i, &h));
            h = o.tanh();
            outs.push(o);
        }
        outs
    })
}

/// Every layer's output of the plain forward pass.
fn plain(model: &Hooked<Stack>, x: &Tensor) -> Vec<Tensor> {
    run_edit(model, x, |_, o| o)
}

/// Two invokes run as one batch: the plain forward pass of `a` and `b` concatenated (with `edit`),
/// split back into each invoke's rows: `(a's outputs, b's outputs)`.
fn plain_two(model: &Hooked<Stack>, a: &Tensor, b: &Tensor, edit: impl Fn(usize, Tensor) -> Tensor) -> (Vec<Tensor>, Vec<Tensor>) {
    let na = a.size()[0];
    let nb = b.size()[0];
    let outs = run_edit(model, &Tensor::cat(&[a, b], 0), edit);
    (outs.iter().map(|o| o.narrow(0, 0, na)).collect(), outs.iter().map(|o| o.narrow(0, na, nb)).collect())
}

fn close(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.allclose(b, 1e-6, 1e-6, false)
}

fn fclose(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + b.abs())
}

fn norm(t: &Tensor) -> f64 {
    t.norm().double_value(&[])
}

fn fsum(t: &Tensor) -> f64 {
    t.sum(Kind::Float).double_value(&[])
}

/// Generic over anything that borrows a tensor: a researcher's helper.
fn nrm<T: std::borrow::Borrow<Tensor>>(t: T) -> Tensor {
    t.borrow().norm()
}

fn double(t: &Tensor) -> Tensor {
    t * 2.0
}

fn mean_norm(h: &Tensor) -> f64 {
    h.norm().double_value(&[]) / h.size()[1] as f64
}

fn by_value(t: Tensor) -> Tensor {
    t + 1.0
}

/// A generic struct that holds two things, e.g. two activations.
struct Two<T> {
    first: T,
    last: T,
}

/// A plain struct of tensors.
struct Acts {
    first: Tensor,
    last: Tensor,
}

fn cpu() -> (Kind, Device) {
    (Kind::Float, Device::Cpu)
}

#[test]
fn f64_accumulator_over_layers() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 21);
    let total = trace!(model, &x, {
        let mut total = 0.0;
        for l in 0..3 {
            total += model.layers[l].output.norm().double_value(&[]);
        }
        total
    })
    .unwrap();
    let e = plain(&model, &x);
    let want: f64 = e.iter().map(norm).sum();
    assert!(fclose(total, want), "{total} vs {want}");
}

#[test]
fn f64_accumulator_saved_explicitly() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 22);
    let total = trace!(model, &x, {
        let mut total = 0.0;
        for l in 0..3 {
            total += model.layers[l].output.sum(Kind::Float).double_value(&[]);
        }
        total.save()
    })
    .unwrap();
    let e = plain(&model, &x);
    let want: f64 = e.iter().map(fsum).sum();
    assert!(fclose(total, want), "{total} vs {want}");
}

#[test]
fn f64_accumulator_inside_an_invoke() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let (a, b) = (input(1, 23), input(1, 24));
    let total = trace!(model, {
        invoke(&a) {}
        invoke(&b) {
            let mut total = 0.0;
            for l in 0..3 {
                total += model.layers[l].output.norm().double_value(&[]);
            }
            total
        }
    })
    .unwrap();
    let (_, e) = plain_two(&model, &a, &b, |_, o| o);
    let want: f64 = e.iter().map(norm).sum();
    assert!(fclose(total, want), "{total} vs {want}");
}

#[test]
fn tensor_accumulator_add_assign() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 27);
    let acc = trace!(model, &x, {
        let mut acc = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        for l in 0..3 {
            acc += model.layers[l].output;
        }
        acc.save()
    })
    .unwrap();
    let e = plain(&model, &x);
    let want = Tensor::zeros([2, 4], cpu()) + &e[0] + &e[1] + &e[2];
    assert!(acc.equal(&want));
}

#[test]
fn tensor_accumulator_returned_without_save() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 28);
    let acc = trace!(model, &x, {
        let mut acc = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        for l in 0..3 {
            acc += model.layers[l].output;
        }
        acc
    })
    .unwrap();
    let e = plain(&model, &x);
    let want = Tensor::zeros([2, 4], cpu()) + &e[0] + &e[1] + &e[2];
    assert!(acc.equal(&want));
}

#[test]
fn tensor_accumulator_rebound_with_plus() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 29);
    let acc = trace!(model, &x, {
        let mut acc = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        for l in 0..3 {
            acc = acc + model.layers[l].output;
        }
        acc.save()
    })
    .unwrap();
    let e = plain(&model, &x);
    let want = Tensor::zeros([2, 4], cpu()) + &e[0] + &e[1] + &e[2];
    assert!(acc.equal(&want));
}

#[test]
fn tensor_accumulator_weighted_by_a_plain_vec() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 30);
    let weights = vec![0.5, -1.0, 2.0];
    let acc = trace!(model, &x, {
        let mut acc = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        for l in 0..3 {
            acc = acc + model.layers[l].output * weights[l];
        }
        acc.save()
    })
    .unwrap();
    let e = plain(&model, &x);
    let want = Tensor::zeros([2, 4], cpu()) + &e[0] * 0.5 + &e[1] * -1.0 + &e[2] * 2.0;
    assert!(acc.equal(&want));
}

#[test]
fn i64_accumulator_of_sizes() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(3, 31);
    let count = trace!(model, &x, {
        let mut count = 0i64;
        for l in 0..3 {
            count += model.layers[l].output.size()[0];
        }
        count
    })
    .unwrap();
    assert_eq!(count, 9);
}

#[test]
fn f64_product_accumulator() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 32);
    let prod = trace!(model, &x, {
        let mut prod = 1.0;
        for l in 0..3 {
            prod *= model.layers[l].output.mean(Kind::Float).double_value(&[]);
        }
        prod
    })
    .unwrap();
    let e = plain(&model, &x);
    let want = e.iter().fold(1.0, |p, t| p * t.mean(Kind::Float).double_value(&[]));
    assert!(fclose(prod, want), "{prod} vs {want}");
}

#[test]
fn running_max_with_f64_max() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 33);
    let best = trace!(model, &x, {
        let mut best = f64::MIN;
        for l in 0..3 {
            best = best.max(model.layers[l].output.norm().double_value(&[]));
        }
        best
    })
    .unwrap();
    let e = plain(&model, &x);
    let want = e.iter().map(norm).fold(f64::MIN, f64::max);
    assert_eq!(best, want);
}

#[test]
fn nested_loops_accumulate_columns() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 35);
    let total = trace!(model, &x, {
        let mut total = 0.0;
        for l in 0..3 {
            for c in 0..4 {
                total += model.layers[l].output[.., c].sum(Kind::Float).double_value(&[]);
            }
        }
        total
    })
    .unwrap();
    let e = plain(&model, &x);
    let mut want = 0.0;
    for l in 0..3 {
        for c in 0..4i64 {
            want += e[l].i((.., c)).sum(Kind::Float).double_value(&[]);
        }
    }
    assert!(fclose(total, want), "{total} vs {want}");
}

#[test]
fn accumulator_with_user_fn_like_the_guide() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 36);
    let (norms, total) = trace!(model, &x, {
        let mut norms = Vec::new();
        let mut total = 0.0;
        for l in 0..3 {
            norms.push(mean_norm(&model.layers[l].output).save());
            total += mean_norm(&model.layers[l].output);
        }
        (norms, total)
    })
    .unwrap();
    let e = plain(&model, &x);
    let want: Vec<f64> = e.iter().map(mean_norm).collect();
    assert_eq!(norms, want);
    assert!(fclose(total, want.iter().sum()));
}

#[test]
fn map_collect_saves_every_layer() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 41);
    let v = trace!(model, &x, {
        let v: Vec<_> = (0..3).map(|l| model.layers[l].output.save()).collect();
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    assert_eq!(v.len(), 3);
    for l in 0..3 {
        assert!(v[l].equal(&e[l]), "layer {l}");
    }
}

#[test]
fn map_collect_with_turbofish() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 42);
    let v = trace!(model, &x, {
        (0..3).map(|l| model.layers[l].output.sum(Kind::Float).save()).collect::<Vec<_>>()
    })
    .unwrap();
    let e = plain(&model, &x);
    for l in 0..3 {
        assert!(v[l].equal(&e[l].sum(Kind::Float)), "layer {l}");
    }
}

#[test]
fn iter_map_over_a_vec_of_indices() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 43);
    let picks = vec![2usize, 0];
    let v = trace!(model, &x, {
        let v: Vec<_> = picks.iter().map(|&l| model.layers[l].output.save()).collect();
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(v[0].equal(&e[2]) && v[1].equal(&e[0]));
}

#[test]
fn enumerate_in_a_for_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 44);
    let out = trace!(model, &x, {
        let mut out = Vec::new();
        for (i, l) in [2usize, 1].iter().enumerate() {
            out.push((i, model.layers[*l].output.save()));
        }
        out
    })
    .unwrap();
    let e = plain(&model, &x);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].0, 0);
    assert_eq!(out[1].0, 1);
    assert!(out[0].1.equal(&e[2]) && out[1].1.equal(&e[1]));
}

#[test]
fn enumerate_in_map() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 45);
    let scales = [1.0, 10.0, 100.0];
    let v = trace!(model, &x, {
        let v: Vec<_> = scales.iter().enumerate().map(|(l, s)| (model.layers[l].output * *s).save()).collect();
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    for l in 0..3 {
        assert!(v[l].equal(&(&e[l] * scales[l])), "layer {l}");
    }
}

#[test]
fn for_each_pushes_into_a_vec() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 46);
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        (0..3).for_each(|l| v.push(model.layers[l].output.sum(Kind::Float).save()));
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    for l in 0..3 {
        assert!(v[l].equal(&e[l].sum(Kind::Float)), "layer {l}");
    }
}

#[test]
fn map_to_f64_values() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 47);
    let norms = trace!(model, &x, {
        let norms: Vec<_> = (0..3).map(|l| model.layers[l].output.norm().double_value(&[]).save()).collect();
        norms
    })
    .unwrap();
    let e = plain(&model, &x);
    let want: Vec<f64> = e.iter().map(norm).collect();
    assert_eq!(norms, want);
}

#[test]
fn reversed_range() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 48);
    let v = trace!(model, &x, {
        (0..3).rev().map(|l| model.layers[l].output.save()).collect::<Vec<_>>()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(v[0].equal(&e[2]) && v[1].equal(&e[1]) && v[2].equal(&e[0]));
}

#[test]
fn zip_with_plain_weights() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 49);
    let total = trace!(model, &x, {
        let mut total = 0.0;
        for (l, w) in (0..3).zip([1.0, 2.0, 3.0]) {
            total += model.layers[l].output.sum(Kind::Float).double_value(&[]) * w;
        }
        total
    })
    .unwrap();
    let e = plain(&model, &x);
    let want = fsum(&e[0]) * 1.0 + fsum(&e[1]) * 2.0 + fsum(&e[2]) * 3.0;
    assert!(fclose(total, want), "{total} vs {want}");
}

#[test]
fn filter_then_map() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 50);
    let v = trace!(model, &x, {
        (0..3usize).filter(|l| l % 2 == 0).map(|l| model.layers[l].output.save()).collect::<Vec<_>>()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert_eq!(v.len(), 2);
    assert!(v[0].equal(&e[0]) && v[1].equal(&e[2]));
}

#[test]
fn step_by_loop_with_i64_layer_index() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 51);
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        for l in (0i64..3).step_by(2) {
            v.push(model.layers[l].output.save());
        }
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(v[0].equal(&e[0]) && v[1].equal(&e[2]));
}

#[test]
fn map_collect_in_the_second_invoke() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let (a, b) = (input(1, 52), input(1, 53));
    let (first, v) = trace!(model, {
        invoke(&a) {
            let first = model.layers[0].output.save();
        }
        invoke(&b) {
            let v: Vec<_> = (0..3).map(|l| model.layers[l].output.save()).collect();
            (first, v)
        }
    })
    .unwrap();
    let (ea, eb) = plain_two(&model, &a, &b, |_, o| o);
    assert!(first.equal(&ea[0]));
    for l in 0..3 {
        assert!(v[l].equal(&eb[l]), "layer {l}");
    }
}

#[test]
fn closure_defined_in_the_block_applied_to_hook_points() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 54);
    let (a, b) = trace!(model, &x, {
        let f = |t: &Tensor| t * 2.0 + 1.0;
        (f(&model.layers[0].output).save(), f(&model.layers[2].output).save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&(&e[0] * 2.0 + 1.0)) && b.equal(&(&e[2] * 2.0 + 1.0)));
}

#[test]
fn closure_defined_outside_the_block() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 55);
    let f = |t: &Tensor| t.abs().sum(Kind::Float);
    let a = trace!(model, &x, {
        f(&model.layers[1].output).save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&f(&e[1])));
}

#[test]
fn relu_in_place_on_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 61);
    let out = trace!(model, &x, {
        model.layers[0].output.relu_();
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 { o.relu() } else { o });
    assert!(out.equal(&e[1]));
    assert!(!out.equal(&plain(&model, &x)[1]), "the edit changes layer 1");
}

#[test]
fn mul_in_place_on_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 62);
    let out = trace!(model, &x, {
        model.layers[1].output.mul_(2.0);
        model.layers[2].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 1 { o * 2.0 } else { o });
    assert!(out.equal(&e[2]));
}

#[test]
fn mul_in_place_on_a_bound_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 63);
    let out = trace!(model, &x, {
        let mut h = model.layers[0].output;
        h.mul_(2.0);
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 { o * 2.0 } else { o });
    assert!(out.equal(&e[1]));
}

#[test]
fn mul_assign_on_a_bound_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 64);
    let out = trace!(model, &x, {
        let mut h = model.layers[0].output;
        h *= 2.0;
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 { o * 2.0 } else { o });
    assert!(out.equal(&e[1]));
}

#[test]
fn add_in_place_of_an_outside_tensor() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 65);
    let steer = Tensor::ones([4], cpu()) * 0.25;
    let out = trace!(model, &x, {
        model.layers[0].output.add_(&steer);
        model.layers[2].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 { o + &steer } else { o });
    assert!(out.equal(&e[2]));
}

#[test]
fn zero_in_place_on_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 66);
    let out = trace!(model, &x, {
        model.layers[0].output.zero_();
        model.layers[1].output.save()
    })
    .unwrap();
    let want = tch::no_grad(|| layer(&model, 1, &x.zeros_like()));
    assert!(out.equal(&want));
}

#[test]
fn clamp_in_place_on_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 67);
    let out = trace!(model, &x, {
        model.layers[0].output.clamp_(-0.1, 0.1);
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 { o.clamp(-0.1, 0.1) } else { o });
    assert!(out.equal(&e[1]));
}

#[test]
fn save_after_an_edit_sees_it_and_before_keeps_the_old_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 68);
    let (before, after) = trace!(model, &x, {
        let before = model.layers[0].output.save();
        model.layers[0].output *= 2.0;
        (before, model.layers[0].output.save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(before.equal(&e[0]));
    assert!(after.equal(&(&e[0] * 2.0)));
}

#[test]
fn save_after_an_in_place_method_sees_it() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 69);
    let (before, after) = trace!(model, &x, {
        let before = model.layers[0].output.save();
        model.layers[0].output.mul_(3.0);
        (before, model.layers[0].output.save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(before.equal(&e[0]));
    assert!(after.equal(&(&e[0] * 3.0)));
}

#[test]
fn add_assign_on_a_computed_proxy_is_kept() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 70);
    let h = trace!(model, &x, {
        let mut h = model.layers[0].output * 2.0;
        h += 1.0;
        h.save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(h.equal(&(&e[0] * 2.0 + 1.0)));
}

#[test]
fn sub_assign_a_proxy_from_a_computed_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 71);
    let d = trace!(model, &x, {
        let mut d = model.layers[1].output * 1.0;
        d -= model.layers[0].output;
        d.save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(d.equal(&(&e[1] * 1.0 - &e[0])));
}

#[test]
fn computed_proxy_edited_twice_does_not_touch_the_model() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 72);
    let (h, out) = trace!(model, &x, {
        let mut h = model.layers[0].output + 0.0;
        h *= 2.0;
        h -= 0.5;
        (h.save(), model.layers[1].output.save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(h.equal(&((&e[0] + 0.0) * 2.0 - 0.5)));
    assert!(out.equal(&e[1]), "a copy was edited, not the activation");
}

#[test]
fn in_place_edit_inside_one_invoke_only() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let (a, b) = (input(1, 73), input(1, 74));
    let (oa, ob) = trace!(model, {
        invoke(&a) {
            model.layers[0].output.mul_(2.0);
            let oa = model.layers[1].output.save();
        }
        invoke(&b) {
            (oa, model.layers[1].output.save())
        }
    })
    .unwrap();
    let (ea, eb) = plain_two(&model, &a, &b, |i, o| {
        if i == 0 {
            let _ = o.narrow(0, 0, 1).mul_(2.0);
        }
        o
    });
    assert!(oa.equal(&ea[1]));
    assert!(ob.equal(&eb[1]));
}

#[test]
fn in_place_edits_in_a_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 75);
    let out = trace!(model, &x, {
        for l in 0..2 {
            model.layers[l].output.mul_(0.5);
        }
        model.layers[2].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i < 2 { o * 0.5 } else { o });
    assert!(out.equal(&e[2]));
}

#[test]
fn neg_in_place_via_reference_binding() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 76);
    let out = trace!(model, &x, {
        let mut h = model.layers[0].output;
        h.neg_();
        h *= 1.0;
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 { -o } else { o });
    assert!(out.equal(&e[1]));
}

#[test]
fn tuple_pattern_of_hook_points() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 81);
    let (a, b) = trace!(model, &x, {
        let (a, b) = (model.layers[0].output, model.layers[1].output);
        (a.save(), b.save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&e[0]) && b.equal(&e[1]));
}

#[test]
fn tuple_pattern_then_arithmetic() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 82);
    let s = trace!(model, &x, {
        let (a, b) = (model.layers[0].output, model.layers[2].output);
        (a + b * 2.0).save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(s.equal(&(&e[0] + &e[2] * 2.0)));
}

#[test]
fn vec_macro_of_saved_proxies_returned() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 86);
    let v = trace!(model, &x, {
        vec![model.layers[2].output.save(), model.layers[1].output.save()]
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(v[0].equal(&e[2]) && v[1].equal(&e[1]));
}

#[test]
fn generic_struct_of_saved_proxies() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 87);
    let (a, b) = trace!(model, &x, {
        let t = Two { first: model.layers[0].output.save(), last: model.layers[2].output.save() };
        (t.first, t.last)
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&e[0]) && b.equal(&e[2]));
}

#[test]
fn nested_tuples_returned() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 89);
    let ((a, b), (c, n)) = trace!(model, &x, {
        let a = model.layers[0].output.save();
        let b = model.layers[1].output.save();
        ((a, b), (model.layers[2].output.save(), 7usize))
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&e[0]) && b.equal(&e[1]) && c.equal(&e[2]));
    assert_eq!(n, 7);
}

#[test]
fn block_expression_yields_a_computed_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 90);
    let n = trace!(model, &x, {
        let n = {
            let t = model.layers[0].output;
            t.norm()
        };
        n.save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(n.equal(&e[0].norm()));
}

#[test]
fn block_expression_yields_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 91);
    let h = trace!(model, &x, {
        let h = { model.layers[1].output };
        h.save()
    })
    .unwrap();
    assert!(h.equal(&plain(&model, &x)[1]));
}

#[test]
fn if_on_a_plain_bool_picks_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 101);
    let e = plain(&model, &x);
    for last in [true, false] {
        let h = trace!(model, &x, {
            let h = if last { model.layers[2].output } else { model.layers[0].output };
            h.save()
        })
        .unwrap();
        assert!(h.equal(&e[if last { 2 } else { 0 }]), "last = {last}");
    }
}

#[test]
fn match_on_a_plain_integer_picks_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 102);
    let e = plain(&model, &x);
    for which in 0..4u32 {
        let h = trace!(model, &x, {
            let h = match which {
                0 => model.layers[0].output,
                1 => model.layers[1].output,
                _ => model.layers[2].output,
            };
            (h * 2.0).save()
        })
        .unwrap();
        let want = &e[(which as usize).min(2)] * 2.0;
        assert!(h.equal(&want), "which = {which}");
    }
}

#[test]
fn reference_to_a_hook_point_saved() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 103);
    let h = trace!(model, &x, {
        let h = &model.layers[1].output;
        h.save()
    })
    .unwrap();
    assert!(h.equal(&plain(&model, &x)[1]));
}

#[test]
fn reference_to_a_hook_point_in_arithmetic() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 104);
    let h = trace!(model, &x, {
        let h = &model.layers[1].output;
        (h * 2.0).save()
    })
    .unwrap();
    assert!(h.equal(&(&plain(&model, &x)[1] * 2.0)));
}

#[test]
fn if_on_a_plain_bool_edits() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 106);
    for ablate in [true, false] {
        let out = trace!(model, &x, {
            if ablate {
                model.layers[0].output[.., 0] = 0.0;
            }
            model.layers[1].output.save()
        })
        .unwrap();
        let e = run_edit(&model, &x, |i, o| {
            if i == 0 && ablate {
                let _ = o.i((.., 0)).fill_(0.0);
            }
            o
        });
        assert!(out.equal(&e[1]), "ablate = {ablate}");
    }
}

#[test]
fn match_on_a_plain_mode_whose_arms_edit() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 107);
    for mode in 0..2 {
        let out = trace!(model, &x, {
            match mode {
                0 => model.layers[0].output[.., 0] = 0.0,
                _ => model.layers[0].output *= 2.0,
            }
            model.layers[1].output.save()
        })
        .unwrap();
        let e = run_edit(&model, &x, |i, o| {
            if i != 0 {
                return o;
            }
            if mode == 0 {
                let _ = o.i((.., 0)).fill_(0.0);
                o
            } else {
                o * 2.0
            }
        });
        assert!(out.equal(&e[1]), "mode = {mode}");
    }
}

#[test]
fn match_on_a_plain_mode_with_block_arms() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 108);
    for mode in ["zero", "scale", "none"] {
        let out = trace!(model, &x, {
            match mode {
                "zero" => {
                    model.layers[1].output[..] = 0.0;
                }
                "scale" => {
                    model.layers[1].output.mul_(4.0);
                }
                _ => {}
            }
            model.layers[2].output.save()
        })
        .unwrap();
        let e = run_edit(&model, &x, |i, o| match (i, mode) {
            (1, "zero") => o.zeros_like(),
            (1, "scale") => o * 4.0,
            _ => o,
        });
        assert!(out.equal(&e[2]), "mode = {mode}");
    }
}

#[test]
fn match_on_a_proxy_option_computes_a_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(3, 111);
    let d = trace!(model, &x, {
        let sizes = model.layers[1].output.size();
        let first = match sizes.first() {
            Some(n) => *n * 10,
            None => 0,
        };
        first.save()
    })
    .unwrap();
    assert_eq!(d, 30);
}

#[test]
fn capital_w_used_in_two_statements() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 121);
    let W = common::tiny::seeded(5, || Tensor::randn([4, 4], cpu()));
    let (a, b) = trace!(model, &x, {
        let a = model.layers[0].output.matmul(&W).save();
        let b = model.layers[1].output.matmul(&W).save();
        (a, b)
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&e[0].matmul(&W)) && b.equal(&e[1].matmul(&W)));
}

#[test]
fn capital_w_used_in_a_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 122);
    let W = common::tiny::seeded(6, || Tensor::randn([4, 2], cpu()));
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        for l in 0..3 {
            v.push(model.layers[l].output.matmul(&W).save());
        }
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    for l in 0..3 {
        assert!(v[l].equal(&e[l].matmul(&W)), "layer {l}");
    }
}

#[test]
fn steer_by_value_then_by_reference() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 123);
    let steer = Tensor::ones([4], cpu()) * 0.3;
    let (out, s2) = trace!(model, &x, {
        model.layers[0].output = model.layers[0].output + steer;
        let s2 = (model.layers[1].output + &steer).save();
        (model.layers[2].output.save(), s2)
    })
    .unwrap();
    // `steer` is still ours after the trace.
    let e = run_edit(&model, &x, |i, o| if i == 0 { o + &steer } else { o });
    assert!(out.equal(&e[2]));
    assert!(s2.equal(&(&e[1] + &steer)));
}

#[test]
fn steer_by_reference_swap() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 124);
    let steer = Tensor::ones([4], cpu()) * -0.2;
    let out = trace!(model, &x, {
        model.layers[1].output = model.layers[1].output + &steer;
        model.layers[2].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 1 { o + &steer } else { o });
    assert!(out.equal(&e[2]));
}

#[test]
fn steer_used_by_value_twice() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 125);
    let steer = Tensor::ones([4], cpu()) * 0.1;
    let (a, b) = trace!(model, &x, {
        let a = (model.layers[0].output + steer).save();
        let b = (model.layers[1].output - steer).save();
        (a, b)
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&(&e[0] + &steer)) && b.equal(&(&e[1] - &steer)));
}

#[test]
fn outside_copy_scalars_of_several_types() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 126);
    let scale = 1.5f64;
    let layer_ix: usize = 2;
    let col: i64 = 3;
    let out = trace!(model, &x, {
        (model.layers[layer_ix].output[.., col] * scale).save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(out.equal(&(e[2].i((.., 3)) * 1.5)));
}

#[test]
fn outside_vec_of_tensors_indexed_in_a_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 127);
    let dirs: Vec<Tensor> = (0..3).map(|i| Tensor::ones([4], cpu()) * (i as f64 + 1.0)).collect();
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        for l in 0..3 {
            v.push((model.layers[l].output * &dirs[l]).sum(Kind::Float).save());
        }
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    for l in 0..3 {
        assert!(v[l].equal(&(&e[l] * &dirs[l]).sum(Kind::Float)), "layer {l}");
    }
}

#[test]
fn generic_borrow_fn_on_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 128);
    let n = trace!(model, &x, {
        nrm(model.layers[1].output).save()
    })
    .unwrap();
    assert!(n.equal(&plain(&model, &x)[1].norm()));
}

#[test]
fn plain_fn_on_a_reference_to_a_binding() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 130);
    let d = trace!(model, &x, {
        let h = model.layers[0].output;
        double(&h).save()
    })
    .unwrap();
    assert!(d.equal(&double(&plain(&model, &x)[0])));
}

#[test]
fn plain_fn_on_a_reference_to_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 131);
    let d = trace!(model, &x, {
        double(&model.layers[1].output).save()
    })
    .unwrap();
    assert!(d.equal(&double(&plain(&model, &x)[1])));
}

#[test]
fn plain_fn_taking_a_tensor_by_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 132);
    let d = trace!(model, &x, {
        by_value(model.layers[1].output * 2.0).save()
    })
    .unwrap();
    assert!(d.equal(&by_value(&plain(&model, &x)[1] * 2.0)));
}

#[test]
fn plain_fn_result_swapped_into_the_model() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 133);
    let out = trace!(model, &x, {
        model.layers[0].output = double(&model.layers[0].output);
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 { double(&o) } else { o });
    assert!(out.equal(&e[1]));
}

#[test]
fn nested_fn_defined_inside_the_block() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 134);
    let d = trace!(model, &x, {
        fn triple(t: &Tensor) -> Tensor {
            t * 3.0
        }
        triple(&model.layers[2].output).save()
    })
    .unwrap();
    assert!(d.equal(&(&plain(&model, &x)[2] * 3.0)));
}

#[test]
fn println_with_an_inline_f64_argument() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 141);
    let n = trace!(model, &x, {
        let n = model.layers[0].output.norm().double_value(&[]);
        println!("{n:.3}");
        n.save()
    })
    .unwrap();
    assert_eq!(n, norm(&plain(&model, &x)[0]));
}

#[test]
fn format_inline_debug_of_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 142);
    let s = trace!(model, &x, {
        let h = model.layers[1].output;
        let s = format!("{h:?}");
        s.save()
    })
    .unwrap();
    let want = format!("{:?}", plain(&model, &x)[1]);
    assert!(!s.contains("Proxy("), "{s}");
    assert_eq!(s, want);
}

#[test]
fn format_inline_display_of_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 143);
    let s = trace!(model, &x, {
        let h = model.layers[1].output;
        let s = format!("{h}");
        s.save()
    })
    .unwrap();
    let want = format!("{}", plain(&model, &x)[1]);
    assert!(!s.contains("Proxy("), "{s}");
    assert_eq!(s, want);
}

#[test]
fn format_inline_precision_of_a_scalar_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 144);
    let s = trace!(model, &x, {
        let n = model.layers[0].output.norm().double_value(&[]);
        format!("norm={n:.3}").save()
    })
    .unwrap();
    assert_eq!(s, format!("norm={:.3}", norm(&plain(&model, &x)[0])));
}

#[test]
fn format_positional_display_of_a_scalar_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 145);
    let s = trace!(model, &x, {
        format!("{} and {:.2}", model.layers[0].output.sum(Kind::Float).double_value(&[]), model.layers[1].output.norm().double_value(&[])).save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert_eq!(s, format!("{} and {:.2}", fsum(&e[0]), norm(&e[1])));
}

#[test]
fn format_with_a_plain_and_a_proxy_inline_argument() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 147);
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        for l in 0..3 {
            let n = model.layers[l].output.norm().double_value(&[]);
            v.push(format!("layer {l}: {n:.4}").save());
        }
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    let want: Vec<String> = (0..3).map(|l| format!("layer {l}: {:.4}", norm(&e[l]))).collect();
    assert_eq!(v, want);
}

#[test]
fn format_in_the_second_invoke() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let (a, b) = (input(1, 149), input(1, 150));
    let s = trace!(model, {
        invoke(&a) {
            let ha = model.layers[0].output;
        }
        invoke(&b) {
            let hb = model.layers[0].output;
            format!("{ha} | {hb}").save()
        }
    })
    .unwrap();
    let (ea, eb) = plain_two(&model, &a, &b, |_, o| o);
    assert_eq!(s, format!("{} | {}", ea[0], eb[0]));
}

#[test]
fn index_with_a_usize_variable() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 161);
    let idx: usize = 2;
    let c = trace!(model, &x, {
        model.layers[0].output[.., idx].save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[0].i((.., 2))));
}

#[test]
fn index_with_an_i64_variable() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 162);
    let idx: i64 = 1;
    let c = trace!(model, &x, {
        model.layers[1].output[.., idx].save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[1].i((.., 1))));
}

#[test]
fn index_with_a_usize_variable_declared_in_the_block() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(3, 163);
    let c = trace!(model, &x, {
        let row: usize = 2;
        let col = 3usize;
        model.layers[0].output[row][col].save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[0].i(2).i(3)));
}

#[test]
fn range_with_a_usize_end() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 164);
    let k: usize = 3;
    let c = trace!(model, &x, {
        model.layers[0].output[.., 0..k].save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[0].i((.., 0..3))));
}

#[test]
fn range_from_an_i64_start() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 165);
    let start: i64 = 1;
    let c = trace!(model, &x, {
        model.layers[1].output[.., start..].save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[1].i((.., 1..))));
}

#[test]
fn negative_single_index_counts_from_the_end() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 167);
    let c = trace!(model, &x, {
        model.layers[0].output[.., -1].save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[0].i((.., 3))));
}

#[test]
fn range_end_from_the_length_minus_one() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 168);
    let n: usize = 4;
    let c = trace!(model, &x, {
        model.layers[0].output[.., ..n - 1].save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[0].i((.., 0..3))));
}

#[test]
fn index_assign_with_a_usize_variable() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 169);
    let idx: usize = 1;
    let out = trace!(model, &x, {
        model.layers[0].output[.., idx] = 0.0;
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| {
        if i == 0 {
            let _ = o.i((.., 1)).fill_(0.0);
        }
        o
    });
    assert!(out.equal(&e[1]));
}

#[test]
fn index_assign_in_a_usize_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 170);
    let out = trace!(model, &x, {
        for c in 0..2usize {
            model.layers[0].output[.., c] = 0.0;
        }
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| {
        if i == 0 {
            let _ = o.i((.., 0..2)).fill_(0.0);
        }
        o
    });
    assert!(out.equal(&e[1]));
}

#[test]
fn index_assign_from_another_hook_point_with_a_variable() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 171);
    let idx: usize = 3;
    let out = trace!(model, &x, {
        model.layers[1].output[.., idx] = model.layers[0].output[.., idx];
        model.layers[2].output.save()
    })
    .unwrap();
    let e0 = plain(&model, &x)[0].copy();
    let e = run_edit(&model, &x, |i, o| {
        if i == 1 {
            o.i((.., 3)).copy_(&e0.i((.., 3)));
        }
        o
    });
    assert!(out.equal(&e[2]));
}

#[test]
fn index_with_an_expression_of_a_variable() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 172);
    let idx: usize = 1;
    let c = trace!(model, &x, {
        (model.layers[0].output[.., idx + 1] - model.layers[0].output[.., idx - 1]).save()
    })
    .unwrap();
    let e = &plain(&model, &x)[0];
    assert!(c.equal(&(e.i((.., 2)) - e.i((.., 0)))));
}

#[test]
fn index_assign_in_the_second_invoke_with_a_variable() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let (a, b) = (input(1, 173), input(1, 174));
    let pos: usize = 2;
    let out = trace!(model, {
        invoke(&a) {
            let clean = model.layers[0].output;
        }
        invoke(&b) {
            model.layers[0].output[.., pos] = clean[.., pos];
            model.layers[1].output.save()
        }
    })
    .unwrap();
    let (_, e) = plain_two(&model, &a, &b, |i, o| {
        if i == 0 {
            let src = o.i((0..1, 2)).copy();
            o.i((1..2, 2)).copy_(&src);
        }
        o
    });
    assert!(out.equal(&e[1]));
}

#[test]
fn index_a_computed_proxy_with_a_loop_variable() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 175);
    let v = trace!(model, &x, {
        let h = model.layers[1].output * 2.0;
        let mut v = Vec::new();
        for c in 0..4usize {
            v.push(h[.., c].sum(Kind::Float).double_value(&[]).save());
        }
        v
    })
    .unwrap();
    let e = &plain(&model, &x)[1] * 2.0;
    let want: Vec<f64> = (0..4i64).map(|c| e.i((.., c)).sum(Kind::Float).double_value(&[])).collect();
    assert_eq!(v, want);
}

#[test]
fn if_on_a_proxy_condition_edits_when_true() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 181);
    let s0 = fsum(&plain(&model, &x)[0]);
    // Thresholds just below and above the real sum: the edit runs in the first trace only.
    for (t, taken) in [(s0 - 1e-3, true), (s0 + 1e-3, false)] {
        let out = trace!(model, &x, {
            if model.layers[0].output.sum(Kind::Float).double_value(&[]) > t {
                model.layers[0].output *= 2.0;
            }
            model.layers[1].output.save()
        })
        .unwrap();
        let e = run_edit(&model, &x, |i, o| if i == 0 && taken { o * 2.0 } else { o });
        assert!(out.equal(&e[1]), "t = {t}");
    }
}

#[test]
fn if_on_a_proxy_condition_with_else_edits() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 182);
    let out = trace!(model, &x, {
        if model.layers[0].output.sum(Kind::Float).double_value(&[]) > 0.0 {
            model.layers[0].output[.., 0] = 0.0;
        } else {
            model.layers[0].output[.., 1] = 0.0;
        }
        model.layers[1].output.save()
    })
    .unwrap();
    let col = if fsum(&plain(&model, &x)[0]) > 0.0 { 0 } else { 1 };
    let e = run_edit(&model, &x, |i, o| {
        if i == 0 {
            let _ = o.i((.., col)).fill_(0.0);
        }
        o
    });
    assert!(out.equal(&e[1]));
}

#[test]
fn value_if_on_a_proxy_condition() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 183);
    let e = plain(&model, &x);
    let m = e[0].mean(Kind::Float).double_value(&[]);
    for t in [m - 1e-3, m + 1e-3] {
        let y = trace!(model, &x, {
            let h = model.layers[0].output;
            let y = if h.mean(Kind::Float).double_value(&[]) > t { h * 2.0 } else { h * 3.0 };
            y.save()
        })
        .unwrap();
        let want = if m > t { &e[0] * 2.0 } else { &e[0] * 3.0 };
        assert!(y.equal(&want), "t = {t}");
    }
}

#[test]
fn else_if_chain_on_a_proxy_with_edits() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 185);
    let n = norm(&plain(&model, &x)[0]);
    for (lo, hi) in [(n - 1.0, n + 1.0), (n + 1.0, n + 2.0), (n - 2.0, n - 1.0)] {
        let out = trace!(model, &x, {
            let n = model.layers[0].output.norm().double_value(&[]);
            if n < lo {
                model.layers[0].output *= 0.5;
            } else if n < hi {
                model.layers[0].output *= 2.0;
            } else {
                model.layers[0].output *= 4.0;
            }
            model.layers[1].output.save()
        })
        .unwrap();
        let k = if n < lo { 0.5 } else if n < hi { 2.0 } else { 4.0 };
        let e = run_edit(&model, &x, |i, o| if i == 0 { o * k } else { o });
        assert!(out.equal(&e[1]), "lo = {lo}, hi = {hi}");
    }
}

#[test]
fn negated_proxy_condition() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 186);
    let out = trace!(model, &x, {
        if !(model.layers[0].output.max().double_value(&[]) > 1e9) {
            model.layers[0].output[..] = 1.0;
        }
        model.layers[1].output.save()
    })
    .unwrap();
    let want = tch::no_grad(|| layer(&model, 1, &x.ones_like().tanh()));
    assert!(out.equal(&want));
}

#[test]
fn plain_and_proxy_condition_combined() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 187);
    for enabled in [true, false] {
        let out = trace!(model, &x, {
            if enabled && model.layers[0].output.abs().sum(Kind::Float).double_value(&[]) > 0.0 {
                model.layers[0].output.zero_();
            }
            model.layers[1].output.save()
        })
        .unwrap();
        let e = run_edit(&model, &x, |i, o| if i == 0 && enabled { o.zeros_like() } else { o });
        assert!(out.equal(&e[1]), "enabled = {enabled}");
    }
}

#[test]
fn proxy_condition_in_a_loop_edits_each_layer() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 188);
    let out = trace!(model, &x, {
        for l in 0..3 {
            if model.layers[l].output.mean(Kind::Float).double_value(&[]) < 0.0 {
                model.layers[l].output.neg_();
            }
        }
        model.output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |_, o| if o.mean(Kind::Float).double_value(&[]) < 0.0 { -o } else { o });
    assert!(out.equal(&e[2].tanh()));
    assert!(!out.equal(&plain(&model, &x)[2].tanh()), "some layer was flipped");
}

#[test]
fn proxy_bool_variable_as_condition() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 189);
    let out = trace!(model, &x, {
        let big = model.layers[0].output.norm().double_value(&[]) > 0.0;
        if big {
            model.layers[0].output *= -1.0;
        }
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 && norm(&o) > 0.0 { o * -1.0 } else { o });
    assert!(out.equal(&e[1]));
}

#[test]
fn value_match_on_a_proxy_integer() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 190);
    let y = trace!(model, &x, {
        let h = model.layers[0].output;
        let k = h.argmax(None, false).int64_value(&[]);
        let y = match k {
            0 | 1 => h * 10.0,
            _ => h * 100.0,
        };
        y.save()
    })
    .unwrap();
    let e = &plain(&model, &x)[0];
    let want = match e.argmax(None, false).int64_value(&[]) {
        0 | 1 => e * 10.0,
        _ => e * 100.0,
    };
    assert!(y.equal(&want));
}

#[test]
fn shadow_a_proxy_with_a_plain_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 201);
    let (first, scaled) = trace!(model, &x, {
        let h = model.layers[0].output.save();
        let first = h;
        let h = 2.0;
        (first, (model.layers[1].output * h).save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(first.equal(&e[0]) && scaled.equal(&(&e[1] * 2.0)));
}

#[test]
fn shadow_a_plain_value_with_a_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 202);
    let h = trace!(model, &x, {
        let h = 3.0;
        let h = model.layers[1].output * h;
        h.save()
    })
    .unwrap();
    assert!(h.equal(&(&plain(&model, &x)[1] * 3.0)));
}

#[test]
fn shadow_a_proxy_in_an_inner_block() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 203);
    let (inner, outer) = trace!(model, &x, {
        let h = model.layers[0].output;
        let inner = {
            let h = 5i64;
            h * 2
        };
        (inner, h.save())
    })
    .unwrap();
    assert_eq!(inner, 10);
    assert!(outer.equal(&plain(&model, &x)[0]));
}

#[test]
fn vec_push_in_nested_loops() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 206);
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        for l in 0..3 {
            for c in 0..4i64 {
                v.push(model.layers[l].output[.., c].save());
            }
        }
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    assert_eq!(v.len(), 12);
    for l in 0..3 {
        for c in 0..4 {
            assert!(v[l * 4 + c].equal(&e[l].i((.., c as i64))), "{l} {c}");
        }
    }
}

#[test]
fn vec_with_capacity_and_extend() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 207);
    let v = trace!(model, &x, {
        let mut v = Vec::with_capacity(3);
        v.push(model.layers[0].output.save());
        v.extend((1..3).map(|l| model.layers[l].output.save()));
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    for l in 0..3 {
        assert!(v[l].equal(&e[l]), "layer {l}");
    }
}

#[test]
fn mut_binding_reassigned_to_another_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 209);
    let (a, b) = trace!(model, &x, {
        let mut h = model.layers[0].output;
        let a = h.sum(Kind::Float).save();
        h = model.layers[2].output;
        (a, h.sum(Kind::Float).save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&e[0].sum(Kind::Float)) && b.equal(&e[2].sum(Kind::Float)));
}

#[test]
fn mut_binding_reassigned_in_a_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 210);
    let h = trace!(model, &x, {
        let mut h = model.layers[0].output;
        for l in 1..3 {
            h = h + model.layers[l].output;
        }
        h.save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(h.equal(&(&e[0] + &e[1] + &e[2])));
}

#[test]
fn method_chain_with_closures_of_plain_values() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 212);
    let v = trace!(model, &x, {
        let flat = Vec::<f64>::try_from(model.layers[0].output.flatten(0, -1).to_kind(Kind::Double)).unwrap();
        let pos = flat.iter().filter(|v| **v > 0.0).count();
        pos.save()
    })
    .unwrap();
    let flat = Vec::<f64>::try_from(plain(&model, &x)[0].flatten(0, -1).to_kind(Kind::Double)).unwrap();
    assert_eq!(v, flat.iter().filter(|v| **v > 0.0).count());
}

#[test]
fn proxy_compared_with_an_outside_saved_tensor() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let (x, y) = (input(2, 213), input(2, 214));
    let clean = trace!(model, &x, { model.layers[1].output.save() }).unwrap();
    let diff = trace!(model, &y, {
        (model.layers[1].output - &clean).abs().max().save()
    })
    .unwrap();
    let want = (&plain(&model, &y)[1] - &plain(&model, &x)[1]).abs().max();
    assert!(diff.equal(&want));
}

#[test]
fn assert_inside_the_block_on_real_values() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 215);
    let h = trace!(model, &x, {
        let h = model.layers[0].output;
        assert_eq!(h.size(), vec![2, 4]);
        assert!(h.isfinite().all().int64_value(&[]) == 1, "finite");
        h.save()
    })
    .unwrap();
    assert!(h.equal(&plain(&model, &x)[0]));
}

#[test]
fn twice_called_module_next_in_a_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = twice(&vs);
    let x = input(1, 216);
    let (c0, c1) = trace!(model, &x, {
        let c0 = model.lin.output.save();
        let c1 = model.lin.next().output.save();
        (c0, c1)
    })
    .unwrap();
    let lin = model.lin.inner();
    let e0 = tch::no_grad(|| nn::Module::forward(lin, &x));
    let e1 = tch::no_grad(|| nn::Module::forward(lin, &e0.relu()));
    assert!(c0.equal(&e0) && c1.equal(&e1));
}

#[test]
fn unit_statements_and_a_trailing_tuple_of_plain_and_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 217);
    let (label, h, k) = trace!(model, &x, {
        let label = String::from("layer1");
        let k = 3usize * 2;
        (label, model.layers[1].output.save(), k)
    })
    .unwrap();
    assert_eq!(label, "layer1");
    assert_eq!(k, 6);
    assert!(h.equal(&plain(&model, &x)[1]));
}

#[test]
fn minilm_map_collect_last_layer_is_the_forward() {
    let model = common::minilm::minilm();
    let text = "Hello world";
    let v = trace!(model, text, {
        let v: Vec<_> = (0..6).map(|l| model.encoder.layer[l].output.save()).collect();
        v
    })
    .unwrap();
    let want = tch::no_grad(|| model.forward(&[text])).unwrap();
    assert_eq!(v.len(), 6);
    assert!(v[5].equal(&want));
}

#[test]
fn minilm_reference_and_format_of_size() {
    let model = common::minilm::minilm();
    let text = "Hello world";
    let (s, total) = trace!(model, text, {
        let h = &model.encoder.layer[5].output;
        let s = format!("{:?}", h.size());
        let mut total = 0.0;
        for l in [5usize] {
            total += model.encoder.layer[l].output.norm().double_value(&[]);
        }
        (s.save(), total)
    })
    .unwrap();
    let want = tch::no_grad(|| model.forward(&[text])).unwrap();
    assert_eq!(s, format!("{:?}", want.size()));
    assert!(fclose(total, want.norm().double_value(&[])));
}

#[test]
fn while_loop_on_a_plain_counter() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 221);
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        let mut l = 0;
        while l < 3 {
            v.push(model.layers[l].output.save());
            l += 1;
        }
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    assert_eq!(v.len(), 3);
    for l in 0..3 {
        assert!(v[l].equal(&e[l]), "layer {l}");
    }
}

#[test]
fn loop_with_break_on_a_plain_counter() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 222);
    let total = trace!(model, &x, {
        let mut total = 0.0;
        let mut l = 0;
        loop {
            if l == 2 {
                break;
            }
            total += model.layers[l].output.sum(Kind::Float).double_value(&[]);
            l += 1;
        }
        total
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(fclose(total, fsum(&e[0]) + fsum(&e[1])));
}

#[test]
fn tensor_stack_of_hook_points() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 225);
    let s = trace!(model, &x, {
        Tensor::stack(&[model.layers[0].output, model.layers[1].output], 0).save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(s.equal(&Tensor::stack(&[&e[0], &e[1]], 0)));
}

#[test]
fn index_with_a_value_derived_from_a_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 228);
    let c = trace!(model, &x, {
        let n = model.layers[0].output.size()[1];
        model.layers[1].output[.., n - 1].save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[1].i((.., 3))));
}

#[test]
fn explicit_index_op_method_on_a_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 229);
    let c = trace!(model, &x, {
        model.layers[0].output.i((.., 1..3)).save()
    })
    .unwrap();
    assert!(c.equal(&plain(&model, &x)[0].i((.., 1..3))));
}

#[test]
fn index_assign_through_a_bound_hook_point() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 230);
    let out = trace!(model, &x, {
        let mut h = model.layers[0].output;
        h[.., 2] = 0.0;
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| {
        if i == 0 {
            let _ = o.i((.., 2)).fill_(0.0);
        }
        o
    });
    assert!(out.equal(&e[1]));
}

#[test]
fn const_item_inside_the_block_as_a_layer_index() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 231);
    let h = trace!(model, &x, {
        const L: usize = 1;
        model.layers[L].output.save()
    })
    .unwrap();
    assert!(h.equal(&plain(&model, &x)[1]));
}

#[test]
fn vec_proxy_of_sizes_destructured() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(3, 232);
    let (b, d) = trace!(model, &x, {
        let sizes = model.layers[0].output.size();
        let (b, d) = (sizes[0], sizes[1]);
        (b.save(), d.save())
    })
    .unwrap();
    assert_eq!((b, d), (3, 4));
}

#[test]
fn if_on_a_proxy_condition_inside_the_second_invoke() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let (a, b) = (input(1, 233), input(1, 234));
    let (oa, ob) = trace!(model, {
        invoke(&a) {
            let oa = model.layers[1].output.save();
        }
        invoke(&b) {
            if model.layers[0].output.norm().double_value(&[]) > 0.0 {
                model.layers[0].output *= 3.0;
            }
            (oa, model.layers[1].output.save())
        }
    })
    .unwrap();
    let (ea, eb) = plain_two(&model, &a, &b, |i, o| {
        if i == 0 && norm(&o.narrow(0, 1, 1)) > 0.0 {
            let _ = o.narrow(0, 1, 1).mul_(3.0);
        }
        o
    });
    assert!(oa.equal(&ea[1]));
    assert!(ob.equal(&eb[1]));
}

#[test]
fn to_kind_double_and_plain_f64_math() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 236);
    let r = trace!(model, &x, {
        let a = model.layers[0].output.to_kind(Kind::Double).norm().double_value(&[]);
        let b = model.layers[1].output.to_kind(Kind::Double).norm().double_value(&[]);
        (a / b).sqrt().save()
    })
    .unwrap();
    let e = plain(&model, &x);
    let want = (e[0].to_kind(Kind::Double).norm().double_value(&[]) / e[1].to_kind(Kind::Double).norm().double_value(&[])).sqrt();
    assert_eq!(r, want);
}

#[test]
fn in_place_on_a_copy_leaves_the_model_alone() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 243);
    let (c, out) = trace!(model, &x, {
        let mut c = model.layers[0].output.copy();
        c.mul_(2.0);
        (c.save(), model.layers[1].output.save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(c.equal(&(&e[0] * 2.0)));
    assert!(out.equal(&e[1]));
}

#[test]
fn edit_a_copy_then_swap_it_in() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 244);
    let out = trace!(model, &x, {
        let mut h = model.layers[0].output.copy();
        h[.., 0] = 0.0;
        model.layers[0].output = h;
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| {
        if i == 0 {
            let _ = o.i((.., 0)).fill_(0.0);
        }
        o
    });
    assert!(out.equal(&e[1]));
}

#[test]
fn shadowed_binding_swapped_in() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 245);
    let out = trace!(model, &x, {
        let h = model.layers[0].output;
        let h = h * 2.0;
        model.layers[0].output = h;
        model.layers[1].output.save()
    })
    .unwrap();
    let e = run_edit(&model, &x, |i, o| if i == 0 { o * 2.0 } else { o });
    assert!(out.equal(&e[1]));
}

#[test]
fn two_proxies_in_one_method_call() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 247);
    let m = trace!(model, &x, {
        model.layers[0].output.matmul(&model.layers[1].output.tr()).save()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(m.equal(&e[0].matmul(&e[1].tr())));
}

#[test]
fn iter_product_of_a_size_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(3, 248);
    let n = trace!(model, &x, {
        model.layers[0].output.size().iter().product::<i64>().save()
    })
    .unwrap();
    assert_eq!(n, 12);
}

#[test]
fn loop_bound_from_the_module_list_length() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 250);
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        for l in 0..model.layers.len() {
            v.push(model.layers[l].output.save());
        }
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    assert_eq!(v.len(), 3);
    for l in 0..3 {
        assert!(v[l].equal(&e[l]), "layer {l}");
    }
}

#[test]
fn last_layer_by_length_minus_one() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 251);
    let n_layers = model.layers.len();
    let h = trace!(model, &x, {
        model.layers[n_layers - 1].output.save()
    })
    .unwrap();
    assert!(h.equal(&plain(&model, &x)[2]));
}

#[test]
fn first_input_equals_the_outside_input() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 252);
    let (i0, d) = trace!(model, &x, {
        (model.layers[0].input.save(), (model.layers[1].input - x.tanh()).abs().sum(Kind::Float).save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(i0.equal(&x));
    assert!(d.equal(&(e[0].tanh() - x.tanh()).abs().sum(Kind::Float)));
}

#[test]
fn swap_one_layer_output_into_another() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 253);
    let out = trace!(model, &x, {
        let h0 = model.layers[0].output;
        model.layers[1].output = h0 * 1.0;
        model.layers[2].output.save()
    })
    .unwrap();
    let e0 = plain(&model, &x)[0].copy();
    let e = run_edit(&model, &x, |i, o| if i == 1 { &e0 * 1.0 } else { o });
    assert!(out.equal(&e[2]));
}

#[test]
fn match_picking_a_hook_point_chained_directly() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 255);
    let e = plain(&model, &x);
    for which in [0usize, 1] {
        let h = trace!(model, &x, {
            match which {
                0 => model.layers[0].output,
                _ => model.layers[2].output,
            }
            .save()
        })
        .unwrap();
        assert!(h.equal(&e[if which == 0 { 0 } else { 2 }]), "which = {which}");
    }
}

#[test]
fn f64_accumulator_across_two_invokes() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let (a, b) = (input(1, 25), input(1, 26));
    let total = trace!(model, {
        let mut total = 0.0;
        invoke(&a) {
            total += model.layers[1].output.sum(Kind::Float).double_value(&[]);
        }
        invoke(&b) {
            total += model.layers[0].output.sum(Kind::Float).double_value(&[]);
            total
        }
    })
    .unwrap();
    let (ea, eb) = plain_two(&model, &a, &b, |_, o| o);
    let want = fsum(&ea[1]) + fsum(&eb[0]);
    assert!(fclose(total, want), "{total} vs {want}");
}

#[test]
fn running_max_with_if_on_the_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 34);
    let (best, at) = trace!(model, &x, {
        let mut best = f64::MIN;
        let mut at = 0usize;
        for l in 0..3 {
            let n = model.layers[l].output.norm().double_value(&[]);
            if n > best {
                best = n;
                at = l;
            }
        }
        (best, at)
    })
    .unwrap();
    let e = plain(&model, &x);
    let norms: Vec<f64> = e.iter().map(norm).collect();
    let mut want = (f64::MIN, 0usize);
    for (l, &n) in norms.iter().enumerate() {
        if n > want.0 {
            want = (n, l);
        }
    }
    assert_eq!((best, at), want);
}

#[test]
fn loop_over_an_array_of_hook_points() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 56);
    let v = trace!(model, &x, {
        let mut v = Vec::new();
        for h in [model.layers[0].output, model.layers[2].output] {
            v.push(h.sum(Kind::Float).save());
        }
        v
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(v[0].equal(&e[0].sum(Kind::Float)) && v[1].equal(&e[2].sum(Kind::Float)));
}

#[test]
fn array_of_hook_points_indexed_by_constant() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 83);
    let (a, b) = trace!(model, &x, {
        let hs = [model.layers[0].output, model.layers[1].output];
        (hs[0].save(), hs[1].save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&e[0]) && b.equal(&e[1]));
}

#[test]
fn array_pattern_of_hook_points() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 84);
    let (a, b) = trace!(model, &x, {
        let [a, b] = [model.layers[1].output, model.layers[2].output];
        ((a * 2.0).save(), b.save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&(&e[1] * 2.0)) && b.equal(&e[2]));
}

#[test]
fn vec_macro_of_hook_points_into_iter() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 85);
    let v = trace!(model, &x, {
        let hs = vec![model.layers[0].output, model.layers[2].output];
        hs.into_iter().map(|h| h.save()).collect::<Vec<_>>()
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(v[0].equal(&e[0]) && v[1].equal(&e[2]));
}

#[test]
fn option_of_a_hook_point_from_a_plain_bool() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 105);
    let e = plain(&model, &x);
    for want_it in [true, false] {
        let got = trace!(model, &x, {
            let h = if want_it { Some(model.layers[1].output) } else { None };
            h.map(|t| t.save())
        })
        .unwrap();
        match got {
            Some(t) => assert!(want_it && t.equal(&e[1])),
            None => assert!(!want_it),
        }
    }
}

#[test]
fn match_on_size_of_a_proxy_as_a_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    for (rows, want) in [(2i64, 1.0), (3, 0.0)] {
        let x = input(rows, 109);
        let s = trace!(model, &x, {
            let s = match model.layers[0].output.size()[0] {
                2 => 1.0,
                _ => 0.0,
            };
            s
        })
        .unwrap();
        assert_eq!(s, want, "rows = {rows}");
    }
}

#[test]
fn if_let_on_a_value_derived_from_a_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 110);
    let d = trace!(model, &x, {
        let d = if let Some(&d) = model.layers[0].output.size().last() { d } else { -1 };
        d
    })
    .unwrap();
    assert_eq!(d, 4);
}

#[test]
fn generic_borrow_fn_on_a_reference() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 129);
    let n = trace!(model, &x, {
        let h = model.layers[2].output;
        nrm(&h).save()
    })
    .unwrap();
    assert!(n.equal(&plain(&model, &x)[2].norm()));
}

#[test]
fn format_string_returned_without_save() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 146);
    let s = trace!(model, &x, {
        let h = model.layers[0].output;
        let s = format!("{h}");
        s
    })
    .unwrap();
    assert_eq!(s, format!("{}", plain(&model, &x)[0]));
}

#[test]
fn println_and_dbg_of_a_proxy_then_save() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 148);
    let h = trace!(model, &x, {
        let h = model.layers[1].output;
        println!("h = {h}");
        dbg!(&h);
        h.save()
    })
    .unwrap();
    assert!(h.equal(&plain(&model, &x)[1]));
}

#[test]
fn value_if_on_a_proxy_condition_gives_a_plain_f64() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 184);
    let y = trace!(model, &x, {
        let y = if model.layers[1].output.sum(Kind::Float).double_value(&[]) > 0.0 { 1.0 } else { -1.0 };
        y
    })
    .unwrap();
    let want = if fsum(&plain(&model, &x)[1]) > 0.0 { 1.0 } else { -1.0 };
    assert_eq!(y, want);
}

#[test]
fn option_filled_in_a_loop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 204);
    let last = trace!(model, &x, {
        let mut last = None;
        for l in 0..3 {
            last = Some(model.layers[l].output.save());
        }
        last.unwrap()
    })
    .unwrap();
    assert!(last.equal(&plain(&model, &x)[2]));
}

#[test]
fn option_of_a_saved_proxy_returned() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 205);
    let got = trace!(model, &x, {
        let mut found = None;
        for l in 0..3usize {
            if l == 1 {
                found = Some(model.layers[l].output.save());
            }
        }
        found
    })
    .unwrap();
    assert!(got.unwrap().equal(&plain(&model, &x)[1]));
}

#[test]
fn typed_let_bindings() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 211);
    let (n, d) = trace!(model, &x, {
        let n: f64 = model.layers[0].output.norm().double_value(&[]);
        let d: Vec<i64> = model.layers[1].output.size();
        (n.save(), d.save())
    })
    .unwrap();
    assert_eq!(n, norm(&plain(&model, &x)[0]));
    assert_eq!(d, vec![2, 4]);
}

#[test]
fn struct_pattern_destructuring() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 227);
    let (a, b) = trace!(model, &x, {
        let Two { first, last } = Two { first: model.layers[0].output, last: model.layers[2].output };
        (first.save(), last.save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(a.equal(&e[0]) && b.equal(&e[2]));
}

#[test]
fn closure_capturing_a_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 235);
    let v = trace!(model, &x, {
        let base = model.layers[0].output;
        let rel = |l: usize| (model.layers[l].output - &base).save();
        vec![rel(1), rel(2)]
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(v[0].equal(&(&e[1] - &e[0])) && v[1].equal(&(&e[2] - &e[0])));
}

#[test]
fn typed_f64_accumulator() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 241);
    let total = trace!(model, &x, {
        let mut total: f64 = 0.0;
        for l in 0..3 {
            total += model.layers[l].output.norm().double_value(&[]);
        }
        total
    })
    .unwrap();
    let want: f64 = plain(&model, &x).iter().map(norm).sum();
    assert!(fclose(total, want), "{total} vs {want}");
}

#[test]
fn unary_neg_and_reference_arithmetic() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 246);
    let (n, s) = trace!(model, &x, {
        ((-model.layers[0].output).save(), (&model.layers[0].output + &model.layers[1].output).save())
    })
    .unwrap();
    let e = plain(&model, &x);
    assert!(n.equal(&(-&e[0])) && s.equal(&(&e[0] + &e[1])));
}


/// Forms that do not compile yet (compile errors, never wrong values): arithmetic on proxies
/// kept in your own containers, iterator folds over proxies, plain structs of tensors as the
/// block's value, `&mut` to a hook point. Built with `--features pending-corpus`.
#[cfg(feature = "pending-corpus")]
mod unsupported_yet {
    use super::*;

    #[test]
    fn plain_struct_of_tensors_returned() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let x = input(2, 88);
        let acts: Acts = trace!(model, &x, {
            Acts { first: model.layers[0].output.save(), last: model.layers[2].output.save() }
        })
        .unwrap();
        let e = plain(&model, &x);
        assert!(acts.first.equal(&e[0]) && acts.last.equal(&e[2]));
    }

    #[test]
    fn tuple_field_access_on_a_tuple_of_proxies() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let x = input(2, 92);
        let s = trace!(model, &x, {
            let pair = (model.layers[0].output, model.layers[1].output);
            (pair.0 - pair.1).save()
        })
        .unwrap();
        let e = plain(&model, &x);
        assert!(s.equal(&(&e[0] - &e[1])));
    }

    #[test]
    fn vec_of_computed_proxies_summed_later() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let x = input(2, 208);
        let s = trace!(model, &x, {
            let mut parts = Vec::new();
            for l in 0..3 {
                parts.push(model.layers[l].output.sum(Kind::Float));
            }
            (parts[0] + parts[1] + parts[2]).save()
        })
        .unwrap();
        let e = plain(&model, &x);
        assert!(s.equal(&(e[0].sum(Kind::Float) + e[1].sum(Kind::Float) + e[2].sum(Kind::Float))));
    }

    #[test]
    fn iterator_sum_of_f64_values() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let x = input(2, 223);
        let total = trace!(model, &x, {
            let total: f64 = (0..3).map(|l| model.layers[l].output.norm().double_value(&[])).sum();
            total
        })
        .unwrap();
        let e = plain(&model, &x);
        let want: f64 = e.iter().map(norm).sum();
        assert!(fclose(total, want), "{total} vs {want}");
    }

    #[test]
    fn iterator_fold_of_f64_values() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let x = input(2, 224);
        let total = trace!(model, &x, {
            (0..3).fold(0.0, |acc, l| acc + model.layers[l].output.sum(Kind::Float).double_value(&[])).save()
        })
        .unwrap();
        let e = plain(&model, &x);
        let want = e.iter().fold(0.0, |acc, t| acc + fsum(t));
        assert!(fclose(total, want), "{total} vs {want}");
    }

    #[test]
    fn tensor_cat_of_a_vec_built_in_a_loop() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let x = input(2, 226);
        let s = trace!(model, &x, {
            let mut parts = Vec::new();
            for l in 0..3 {
                parts.push(model.layers[l].output);
            }
            Tensor::cat(&parts, 1).save()
        })
        .unwrap();
        let e = plain(&model, &x);
        assert!(s.equal(&Tensor::cat(&e, 1)));
    }

    #[test]
    fn typed_vec_of_tensors_pushed_with_saves() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let x = input(2, 242);
        let v = trace!(model, &x, {
            let mut v: Vec<Tensor> = Vec::new();
            for l in 0..3 {
                v.push(model.layers[l].output.save());
            }
            v
        })
        .unwrap();
        let e = plain(&model, &x);
        for l in 0..3 {
            assert!(v[l].equal(&e[l]), "layer {l}");
        }
    }

    #[test]
    fn mutable_reference_to_a_hook_point() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 2);
        let x = input(2, 249);
        let out = trace!(model, &x, {
            let h = &mut model.layers[0].output;
            *h *= 2.0;
            model.layers[1].output.save()
        })
        .unwrap();
        let e = run_edit(&model, &x, |i, o| if i == 0 { o * 2.0 } else { o });
        assert!(out.equal(&e[1]));
    }

    #[test]
    fn if_let_on_a_plain_option_holding_a_hook_point() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let x = input(2, 254);
        let e = plain(&model, &x);
        for pick in [Some(2usize), None] {
            let h = trace!(model, &x, {
                let chosen = pick.map(|l| model.layers[l].output);
                if let Some(h) = chosen {
                    (h * 2.0).save()
                } else {
                    model.layers[0].output.save()
                }
            })
            .unwrap();
            let want = match pick {
                Some(l) => &e[l] * 2.0,
                None => e[0].shallow_clone(),
            };
            assert!(h.equal(&want), "pick = {pick:?}");
        }
    }

}
