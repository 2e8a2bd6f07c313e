//! `trace!` on tiny tch models; right values from plain tch (the same math without hooks).

mod common;

use common::tiny::{input, stack, twice};
use nnsight::prelude::*;
use nnsight::tch::nn;

fn layer(model: &Hooked<common::tiny::Stack>, i: usize, x: &Tensor) -> Tensor {
    nn::Module::forward(model.layers[i].inner(), x)
}

#[test]
fn save_and_compute_on_proxies() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 11);
    let (h0, s) = trace!(model, &x, {
        let h0 = model.layers[0].output.save();
        let s = (model.layers[1].output.sum(Kind::Float) * 2.0).save();
        (h0, s)
    })
    .unwrap();
    let e0 = tch::no_grad(|| layer(&model, 0, &x));
    let e1 = tch::no_grad(|| layer(&model, 1, &e0.tanh()));
    assert!(h0.equal(&e0));
    assert!(s.allclose(&(e1.sum(Kind::Float) * 2.0), 1e-6, 1e-6, false));
}

#[test]
fn swap_and_inplace_edit() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 12);
    let scale = 3.0;
    let out = trace!(model, &x, {
        model.layers[0].output = model.layers[0].output * scale;
        model.layers[1].output[.., 0] = 0.0;
        model.layers[2].output.save()
    })
    .unwrap();
    let expected = tch::no_grad(|| {
        let h = (layer(&model, 0, &x) * scale).tanh();
        let h1 = layer(&model, 1, &h);
        let _ = h1.i((.., 0)).fill_(0.0);
        layer(&model, 2, &h1.tanh())
    });
    assert!(out.equal(&expected));
}

#[test]
fn two_invokes_patch_and_loops() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let (a, b) = (input(1, 1), input(1, 2));
    let (outs, patched) = trace!(model, {
        invoke(&a) {
            let clean = model.layers[1].output;
            let mut outs = Vec::new();
            for l in 0..3 {
                outs.push(model.layers[l].output.save());
            }
        }
        invoke(&b) {
            model.layers[1].output[.., 1] = clean[.., 1];
            (outs, model.layers[2].output.save())
        }
    })
    .unwrap();
    let x = Tensor::cat(&[&a, &b], 0);
    let clean: Vec<Tensor> = tch::no_grad(|| {
        let mut h = x.shallow_clone();
        (0..3).map(|i| { let o = layer(&model, i, &h); h = o.tanh(); o }).collect()
    });
    for (l, o) in outs.iter().enumerate() {
        assert!(o.equal(&clean[l].narrow(0, 0, 1)), "layer {l}");
    }
    let expected = tch::no_grad(|| {
        let h1 = clean[1].copy();
        let src = h1.i((0..1, 1)).copy();
        h1.i((1..2, 1)).copy_(&src);
        layer(&model, 2, &h1.tanh()).narrow(0, 1, 1)
    });
    assert!(patched.equal(&expected));
}

#[test]
fn next_addresses_later_calls_and_stop_ends_early() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = twice(&vs);
    let x = input(1, 3);
    let (c0, c1) = trace!(model, &x, {
        let c0 = model.lin.output.save();
        let c1 = model.lin.next().output.save();
        c1.stop();
        (c0, c1)
    })
    .unwrap();
    let lin = model.lin.inner();
    let e0 = tch::no_grad(|| nn::Module::forward(lin, &x));
    let e1 = tch::no_grad(|| nn::Module::forward(lin, &e0.relu()));
    assert!(c0.equal(&e0) && c1.equal(&e1));
    // After the stop, `post` never ran: asking for its output is a clear error.
    let err = trace!(model, &x, {
        model.lin.output.stop();
        model.post.output.save()
    })
    .unwrap_err();
    assert!(matches!(err, nnsight::Error::NotComputed { .. }), "{err}");
    assert!(err.to_string().contains("stopped early"), "{err}");
}

#[test]
fn conditional_runs_only_when_true() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 4);
    let out = trace!(model, &x, {
        if model.layers[0].output.sum(Kind::Float).double_value(&[]) > 1e9 {
            model.layers[0].output[..] = 0.0;
        }
        model.layers[1].output.save()
    })
    .unwrap();
    let plain = tch::no_grad(|| layer(&model, 1, &layer(&model, 0, &x).tanh()));
    assert!(out.equal(&plain));
    // The same edit under a condition that holds: layer 1 then sees tanh(0) = 0.
    let out = trace!(model, &x, {
        if model.layers[0].output.sum(Kind::Float).double_value(&[]) > -1e9 {
            model.layers[0].output[..] = 0.0;
        } else {
            model.layers[0].output[..] = 1.0;
        }
        model.layers[1].output.save()
    })
    .unwrap();
    let zeroed = tch::no_grad(|| layer(&model, 1, &x.zeros_like()));
    assert!(out.equal(&zeroed));
}

#[test]
fn index_past_end_is_an_error_before_the_run() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let err = trace!(model, input(1, 1), {
        model.layers[-3].output.save()
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "index -3 is out of range for module list `layers` of length 2");
}

#[test]
fn derived_module_tree_lists_paths() {
    use nnsight::ModuleTree;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let paths: Vec<String> = model.modules().into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, vec!["", "layers.0", "layers.1", "layers.2"]);
    assert_eq!(
        model.module_tree(),
        "model: Stack\n  layers[0]: Linear  model.layers[0]\n  layers[1]: Linear  model.layers[1]\n  layers[2]: Linear  model.layers[2]\n"
    );
}

#[test]
fn dot_option_renders_the_intervention_graph() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(1, 3);
    let mut dot = String::new();
    let _ = trace!(model, &x, dot = &mut dot, {
        model.layers[1].output = model.layers[0].output * 2.0;
        model.layers[2].output.save()
    })
    .unwrap();
    // Two hook reads (green boxes), one apply node, the swap into layers.1.output.
    assert!(dot.starts_with("digraph intervention {"), "{dot}");
    assert_eq!(dot.matches("shape=box,color=green4").count(), 2, "{dot}");
    assert!(dot.contains("label=\"%0 layers.0.output\""), "{dot}");
    assert!(dot.contains("layers.1.output (call 0, invoke 0)"), "{dot}");
    assert!(dot.contains("[color=red,label=\"swap\"]"), "{dot}");
    assert!(dot.contains("style=bold"), "the saved node is bold: {dot}");
}

/// A module that counts its forward calls.
struct Counted {
    lin: Hooked<nn::Linear>,
    calls: std::cell::Cell<usize>,
}

impl HookModule for Counted {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.calls.set(self.calls.get() + 1);
        self.lin.call(x)
    }
}

struct Chain {
    first: Hooked<nn::Linear>,
    second: Hooked<Counted>,
}

impl HookModule for Chain {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.second.call(self.first.call(x))
    }
}

#[test]
fn stop_ends_the_forward_pass_and_the_next_trace_is_plain() {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let model = Hooked::with_path(
        "",
        Chain {
            first: Hooked::new(&(&p / "first"), nn::linear(&p / "first", 4, 4, Default::default())),
            second: Hooked::new(
                &(&p / "second"),
                Counted { lin: Hooked::new(&(&p / "second" / "lin"), nn::linear(&p / "second" / "lin", 4, 4, Default::default())), calls: Default::default() },
            ),
        },
    );
    let x = input(1, 6);
    let plain = tch::no_grad(|| model.call(x.shallow_clone()));
    assert_eq!(model.second.calls.get(), 1);
    let first = trace!(model, &x, {
        model.first.output.stop().save()
    })
    .unwrap();
    assert_eq!(model.second.calls.get(), 1, "no module after the stop ran");
    assert!(first.equal(&tch::no_grad(|| nn::Module::forward(model.first.inner(), &x))));
    let out = trace!(model, &x, { model.output.save() }).unwrap();
    assert_eq!(model.second.calls.get(), 2);
    assert!(out.equal(&plain), "the next trace equals the plain forward");
}

fn trace_through_a_reference(model: &Hooked<common::tiny::Stack>, x: &Tensor) -> Tensor {
    trace!(model, x, { model.layers[1].output.save() }).unwrap()
}

#[test]
fn a_reference_to_a_model_can_be_traced() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 2);
    let direct = trace!(model, &x, { model.layers[1].output.save() }).unwrap();
    assert!(trace_through_a_reference(&model, &x).equal(&direct));
}

#[test]
fn the_same_value_saved_or_returned_twice_comes_out_twice() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 5);
    let (a, b, c, n1, n2) = trace!(model, &x, {
        let h = model.layers[1].output.save();
        let n = model.layers[1].output.size().save();
        (h, model.layers[-2].output.save(), h, n, n)
    })
    .unwrap();
    let want = tch::no_grad(|| layer(&model, 1, &layer(&model, 0, &x).tanh()));
    assert!(a.equal(&want) && b.equal(&want) && c.equal(&want));
    assert_eq!((n1, n2), (vec![2, 4], vec![2, 4]));
}

#[test]
fn a_proxy_of_another_trace_is_an_error_not_a_wrong_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 5);
    let mut stash = Vec::new();
    let _ = trace!(model, &x, {
        stash.push(model.layers[1].output.save());
        0i32
    })
    .unwrap();
    let old = stash[0];
    // Returned from a later trace: refused, even though node ids may coincide.
    let err = trace!(model, &x, {
        let _h = model.layers[0].output.save();
        old
    })
    .unwrap_err();
    assert!(err.to_string().contains("another trace"), "{err}");
    // Used inside a later trace's graph: refused before the model runs.
    let mut tr = nnsight::Tracer::new(&model);
    let _g = tr.invoke(&x);
    let doubled = tr.apply1(old, |h: &Tensor| h * 2.0);
    let s = tr.save(doubled);
    let err = tr.finish(s).unwrap_err();
    assert!(err.to_string().contains("proxy of another trace"), "{err}");
}

/// A module with a tuple output `(x, 2x)`.
struct Pair {
    lin: Hooked<nn::Linear>,
}

impl HookModule for Pair {
    type Input = Tensor;
    type Output = (Tensor, Tensor);
    fn forward(&self, x: Tensor) -> (Tensor, Tensor) {
        let h = self.lin.call(x);
        let d = &h * 2.0;
        (h, d)
    }
}

struct PairNet {
    pair: Hooked<Pair>,
}

impl HookModule for PairNet {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let (a, b) = self.pair.call(x);
        a + b
    }
}

#[test]
fn tuple_outputs_scalar_proxies_and_discarded_values() {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let model = Hooked::with_path(
        "",
        PairNet { pair: Hooked::new(&(&p / "pair"), Pair { lin: Hooked::new(&(&p / "pair" / "lin"), nn::linear(&p / "pair" / "lin", 4, 4, Default::default())) }) },
    );
    let x = input(1, 8);
    let h = tch::no_grad(|| nn::Module::forward(model.pair.lin.inner(), &x));
    let (first, scaled, out) = trace!(model, &x, {
        let first = model.pair.output.0.save();                      // a tuple element
        let k = model.pair.output.1.sum(Kind::Float).double_value(&[]); // a scalar proxy
        let _ = model.pair.output.0.norm();                           // computed, discarded
        model.pair.output.1[..] = 0.0;                                // edit one element in place
        (first, (model.pair.output.0 * k).save(), model.output.save())
    })
    .unwrap();
    assert!(first.equal(&h));
    let k = (&h * 2.0).sum(Kind::Float).double_value(&[]);
    assert!(scaled.allclose(&(&h * k), 1e-6, 1e-6, false));
    assert!(out.equal(&h), "the second element was zeroed in place before the sum");
}

#[test]
fn formatting_macros_and_assertions_run_on_real_values() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 9);
    let (text, n) = trace!(model, &x, {
        println!("layer 0 output: {:?}", model.layers[0].output.size());
        assert_eq!(model.layers[1].output.size(), vec![2, 4], "shape inside the trace");
        (format!("{:?}", model.layers[0].output.size()).save(), model.layers[1].output.size()[1].save())
    })
    .unwrap();
    assert_eq!(text, "[2, 4]");
    assert_eq!(n, 4);
    // A failing assertion inside the block is an error of that node, not a panic.
    let err = trace!(model, &x, {
        assert!(model.layers[0].output.size()[0] == 3, "batch is not 3");
    })
    .unwrap_err();
    assert!(err.to_string().contains("batch is not 3"), "{err}");
}

/// `module_tree()` prints each module with the path written in `trace!`; the printed paths of
/// MiniLM's first self-attention and a GPT-2 block are the ones a trace reads.
#[test]
fn module_tree_prints_trace_paths() {
    let model = common::minilm::minilm();
    let tree = model.module_tree();
    assert!(tree.starts_with("model: Bert\n"), "{tree}");
    assert!(tree.contains("\n        self_: BertSelfAttention  model.encoder.layer[0].attention.self_\n"), "{tree}");
    assert!(tree.contains("  model.encoder.layer[5].output_\n"), "{tree}");
    let q = trace!(model, "Hello", { model.encoder.layer[0].attention.self_.query.output.save() }).unwrap();
    assert_eq!(q.size()[2], 384);
    assert_eq!(nnsight::trace_path("h.0.attn.c_attn"), "h[0].attn.c_attn");
    assert_eq!(nnsight::trace_path("encoder.layer.11.output"), "encoder.layer[11].output_");
}
