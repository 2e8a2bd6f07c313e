//! Activation caches (`run_with_cache`, `Tracer::cache`) against values computed by hand with
//! plain tch on the tiny models, and against `trace!` saves and the plain forward on MiniLM.

mod common;

use common::tiny::{input, stack, twice, Stack};
use nnsight::tch::{nn, Device, IndexOp, Kind, Tensor};
use nnsight::{Cache, CacheOptions, Error, Group, Hooked, InPlaceArith, ModuleTree, RunWithCache, Tracer};

/// Layer outputs of `Stack` computed with the Linear modules directly (no `Hooked::call`).
fn plain_stack(model: &Hooked<Stack>, x: &Tensor) -> Vec<Tensor> {
    tch::no_grad(|| {
        let mut h = x.shallow_clone();
        let mut outs = vec![];
        for l in &model.layers {
            let o = nn::Module::forward(l.inner(), &h);
            h = o.tanh();
            outs.push(o);
        }
        outs
    })
}

fn lin(l: &Hooked<nn::Linear>, x: &Tensor) -> Tensor {
    tch::no_grad(|| nn::Module::forward(l.inner(), x))
}

#[test]
fn stack_cache_equals_plain_tch_and_output_is_the_plain_forward() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 7);
    let want = plain_stack(&model, &x);
    let plain_out = tch::no_grad(|| model.call(x.shallow_clone()));

    let (out, cache) = model.run_with_cache(&x, CacheOptions::default()).unwrap();
    assert!(out.equal(&plain_out), "the output with a cache is the plain forward's");
    assert_eq!(cache.keys().collect::<Vec<_>>(), ["layers.0", "layers.1", "layers.2"]);
    assert_eq!(cache.len(), 3);
    for (i, w) in want.iter().enumerate() {
        let p = format!("layers.{i}");
        assert!(cache[p.as_str()].equal(w), "{p}");
        assert_eq!(cache.calls(&p).len(), 1);
        assert!(cache.input(&p).is_none(), "inputs are not recorded by default");
    }
    // The iteration order is the module order, every call.
    let it: Vec<(&str, usize)> = cache.iter().map(|(p, ts)| (p, ts.len())).collect();
    assert_eq!(it, [("layers.0", 1), ("layers.1", 1), ("layers.2", 1)]);
    assert_eq!(cache.bytes(), 3 * 2 * 4 * 4, "three [2, 4] f32 tensors");
    assert!(cache.get("").is_none(), "the root is not recorded");

    // Nothing stays hooked: a plain forward afterwards is bit-identical, no hook alive.
    assert!(!nnsight::is_tracing());
    assert_eq!(nnsight::live_grad_hooks(), 0);
    assert!(tch::no_grad(|| model.call(x.shallow_clone())).equal(&plain_out));
}

#[test]
fn twice_keeps_every_call_and_inputs() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = twice(&vs);
    let x = input(3, 5);
    let c0 = lin(&model.lin, &x);
    let r = c0.relu();
    let c1 = lin(&model.lin, &r);
    let post = lin(&model.post, &c1);

    let opts = CacheOptions { inputs: true, ..Default::default() };
    let (out, cache) = model.run_with_cache(&x, opts).unwrap();
    assert!(out.equal(&post));
    assert_eq!(cache.keys().collect::<Vec<_>>(), ["lin", "post"]);
    let calls = cache.calls("lin");
    assert_eq!(calls.len(), 2, "both calls of `lin`");
    assert!(calls[0].equal(&c0) && calls[1].equal(&c1));
    assert!(cache.get("lin").unwrap().equal(&c0), "get is call 0");
    assert!(cache["post"].equal(&post));
    let ins = cache.input_calls("lin");
    assert_eq!(ins.len(), 2);
    assert!(ins[0].equal(&x) && ins[1].equal(&r));
    assert!(cache.input("post").unwrap().equal(&c1));
    assert_eq!(cache.bytes(), 6 * 3 * 4 * 4, "3 outputs and 3 inputs of [3, 4] f32");
}

#[test]
fn swap_and_edit_in_the_same_trace_show_in_the_cache() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 9);
    let clean = plain_stack(&model, &x);

    // Swap: layers.1's output doubled.
    let mut tr = Tracer::new(&model);
    let g = tr.invoke(&x);
    let h = tr.output(g, 0, || Ok(&model.layers[1]));
    let doubled = tr.apply1(h, |h: &Tensor| h * 2.0);
    tr.swap_output(g, 0, || Ok(&model.layers[1]), doubled);
    let c = tr.cache(g, CacheOptions::default());
    let cache: Cache = tr.finish(c).unwrap();
    let l1 = &clean[1] * 2.0;
    let l2 = lin(&model.layers[2], &l1.tanh());
    assert!(cache["layers.0"].equal(&clean[0]), "upstream unchanged");
    assert!(cache["layers.1"].equal(&l1), "the swapped value");
    assert!(cache["layers.2"].equal(&l2), "downstream of the swap");

    // In-place edit: layers.0's output row 0 zeroed.
    let mut tr = Tracer::new(&model);
    let g = tr.invoke(&x);
    let h = tr.output(g, 0, || Ok(&model.layers[0]));
    let e = tr.apply1(h, |h: &Tensor| {
        let _ = h.i(0).fill_(0.0);
        h.shallow_clone()
    });
    tr.edits(h, e);
    let c = tr.cache(g, CacheOptions::default());
    let cache: Cache = tr.finish(c).unwrap();
    let l0 = clean[0].copy();
    let _ = l0.i(0).fill_(0.0);
    let l1 = lin(&model.layers[1], &l0.tanh());
    assert!(cache["layers.0"].equal(&l0), "the edited value");
    assert!(cache["layers.1"].equal(&l1), "downstream of the edit");
    assert!(cache["layers.2"].equal(&lin(&model.layers[2], &l1.tanh())));
}

#[test]
fn a_later_edit_of_the_same_memory_leaves_the_recorded_value() {
    // Twice: `post`'s input is the very tensor `lin` returned on its second call.
    let vs = nn::VarStore::new(Device::Cpu);
    let model = twice(&vs);
    let x = input(2, 11);
    let c0 = lin(&model.lin, &x);
    let c1 = lin(&model.lin, &c0.relu());

    let mut tr = Tracer::new(&model);
    let g = tr.invoke(&x);
    let pin = tr.input(g, 0, || Ok(&model.post));
    let e = tr.apply1(pin, |t: &Tensor| {
        let _ = t.shallow_clone().fill_(0.0);
        t.shallow_clone()
    });
    tr.edits(pin, e);
    let c = tr.cache(g, CacheOptions { inputs: true, ..Default::default() });
    let cache: Cache = tr.finish(c).unwrap();
    assert!(cache.calls("lin")[1].equal(&c1), "lin's call 1 is what lin returned");
    let zeros = c1.zeros_like();
    assert!(cache.input("post").unwrap().equal(&zeros), "post's input after the edit");
    assert!(cache["post"].equal(&lin(&model.post, &zeros)));
}

#[test]
fn an_in_place_change_that_is_not_an_edit_is_an_error_unless_copied() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 13);
    let clean = plain_stack(&model, &x);
    let run = |copy: bool| {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(&x);
        let h1 = tr.output(g, 0, || Ok(&model.layers[1]));
        let h2 = tr.output(g, 0, || Ok(&model.layers[2]));
        // Runs at layers.2, changes layers.1's output in place without being declared an edit.
        let _ = tr.apply2(h1, h2, |h1: &Tensor, _: &Tensor| {
            let _ = h1.shallow_clone().mul_(2.0);
        });
        let c = tr.cache(g, CacheOptions { copy, ..Default::default() });
        tr.finish(c)
    };
    let err = run(false).unwrap_err();
    assert!(matches!(err, Error::SavedChanged { ref node, .. } if node.contains("layers.1")), "{err}");
    assert!(err.to_string().contains("copy: true"), "{err}");
    // After the failed run nothing is hooked: the plain forward is what it was.
    assert!(!nnsight::is_tracing());
    assert!(tch::no_grad(|| model.call(x.shallow_clone())).equal(&clean[2].tanh()));
    let cache = run(true).unwrap();
    assert!(cache["layers.1"].equal(&clean[1]), "the copy keeps the recorded value");
}

#[test]
fn prefixes_select_exactly_the_paths_below_them() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 12);
    let x = input(1, 3);
    let want = plain_stack(&model, &x);
    let (_, cache) = model.run_with_cache(&x, CacheOptions::only(["layers.1"])).unwrap();
    assert_eq!(cache.keys().collect::<Vec<_>>(), ["layers.1"], "not layers.10 or layers.11");
    assert!(cache["layers.1"].equal(&want[1]));
    let (_, cache) = model.run_with_cache(&x, CacheOptions::only(["layers.11", "layers.2", "layers.11."])).unwrap();
    assert_eq!(cache.keys().collect::<Vec<_>>(), ["layers.2", "layers.11"], "module order, each once");
    let (_, cache) = model.run_with_cache(&x, CacheOptions::only(["layers"])).unwrap();
    assert_eq!(cache.len(), 12);
}

#[test]
fn a_prefix_that_matches_nothing_is_an_error_naming_close_paths() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(1, 3);
    for bad in ["layer.1", "layers.1x", "layers.3"] {
        let err = model.run_with_cache(&x, CacheOptions::only(["layers.0", bad])).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Input(_)), "{msg}");
        assert!(msg.contains(&format!("`{bad}`")), "names the prefix: {msg}");
        assert!(msg.contains("`layers.1`") || msg.contains("`layers.2`"), "lists close paths: {msg}");
    }
    // A bad group is an error too, and nothing ran.
    let mut tr = Tracer::new(&model);
    tr.invoke(&x);
    let c = tr.cache(Group(3), CacheOptions::default());
    assert!(matches!(tr.finish(c), Err(Error::Input(ref m)) if m.contains("invoke 3")));
    assert!(!nnsight::is_tracing());
}

#[test]
fn kind_conversion_is_to_kind_of_the_plain_value() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 17);
    let want = plain_stack(&model, &x);
    let opts = CacheOptions { to_kind: Some(Kind::Double), to_device: Some(Device::Cpu), ..Default::default() };
    let (out, cache) = model.run_with_cache(&x, opts).unwrap();
    assert_eq!(out.kind(), Kind::Float, "the model's output is not converted");
    for (i, w) in want.iter().enumerate() {
        let c = &cache[format!("layers.{i}").as_str()];
        assert_eq!(c.kind(), Kind::Double);
        assert!(c.equal(&w.to_kind(Kind::Double)));
    }
    assert_eq!(cache.bytes(), 3 * 2 * 4 * 8);
    let (_, half) = model.run_with_cache(&x, CacheOptions { to_kind: Some(Kind::Half), ..Default::default() }).unwrap();
    assert!(half["layers.2"].equal(&want[2].to_kind(Kind::Half)));
    // A kind that would truncate the activations is refused before the run.
    for k in [Kind::Int64, Kind::Bool, Kind::Uint8] {
        let r = model.run_with_cache(&x, CacheOptions { to_kind: Some(k), ..Default::default() });
        assert!(matches!(r, Err(Error::Input(ref m)) if m.contains("to_kind") && m.contains(&format!("{k:?}"))), "{k:?}");
    }
    assert!(!nnsight::is_tracing());
}

#[test]
fn each_invoke_cache_holds_its_rows() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let (a, b) = (input(2, 1), input(3, 2));
    // The batch of both, computed by hand, narrowed to each invoke's rows.
    let batch = plain_stack(&model, &Tensor::cat(&[&a, &b], 0));
    let mut tr = Tracer::new(&model);
    let g0 = tr.invoke(&a);
    let g1 = tr.invoke(&b);
    // Invoke 1's layers.0 output zeroed: only invoke 1's cache sees it.
    let h = tr.output(g1, 0, || Ok(&model.layers[0]));
    let z = tr.apply1(h, |h: &Tensor| h.zeros_like());
    tr.swap_output(g1, 0, || Ok(&model.layers[0]), z);
    let (c0, c1, call) = (tr.cache(g0, CacheOptions::default()), tr.cache(g1, CacheOptions::default()), tr.cache(Group::ALL, CacheOptions::default()));
    let (c0, c1, call): (Cache, Cache, Cache) = tr.finish((c0, c1, call)).unwrap();
    for i in 0..3 {
        let p = format!("layers.{i}");
        assert!(c0[p.as_str()].equal(&batch[i].narrow(0, 0, 2)), "invoke 0, {p}");
        assert_eq!(c1[p.as_str()].size(), [3, 4]);
        assert_eq!(call[p.as_str()].size(), [5, 4]);
    }
    assert!(c1["layers.0"].equal(&Tensor::zeros([3, 4], (Kind::Float, Device::Cpu))));
    let l1 = lin(&model.layers[1], &Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)));
    assert!(c1["layers.1"].allclose(&l1, 1e-6, 1e-7, false), "invoke 1 downstream of its swap");
    assert!(call["layers.0"].narrow(0, 2, 3).equal(&c1["layers.0"]), "the whole batch holds both");
}

#[test]
fn trace_option_cache_records_every_row_after_the_blocks_interventions() {
    use nnsight::prelude::*;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let (a, b) = (input(1, 21), input(2, 22));
    let clean = plain_stack(&model, &Tensor::cat(&[&a, &b], 0));
    let mut c: Option<Cache> = None;
    let out = trace!(model, cache = &mut c, {
        invoke(&a) {
            model.layers[1].output[.., 0] = 0.0;
        }
        invoke(&b) {
            model.layers[2].output.save()
        }
    })
    .unwrap();
    let c = c.expect("the option receives the cache");
    assert_eq!(c.keys().collect::<Vec<_>>(), ["layers.0", "layers.1", "layers.2"]);
    assert!(c["layers.0"].equal(&clean[0]), "every row: [3, 4]");
    let l1 = clean[1].copy();
    let _ = l1.i((0, 0)).fill_(0.0);
    assert!(c["layers.1"].equal(&l1), "the edit of invoke 0's rows shows");
    assert!(c["layers.2"].narrow(0, 1, 2).equal(&out), "invoke 1's rows are what it saved");
    assert!(c["layers.2"].narrow(0, 1, 2).equal(&clean[2].narrow(0, 1, 2)), "invoke 1 untouched");

    // cache_options selects; a bad prefix is the trace's error, and the slot stays empty.
    let mut c: Option<Cache> = None;
    let _ = trace!(model, &a, cache = &mut c, cache_options = CacheOptions::only(["layers.2"]), { model.layers[0].output.save() }).unwrap();
    assert_eq!(c.unwrap().keys().collect::<Vec<_>>(), ["layers.2"]);
    let mut c: Option<Cache> = None;
    let err = trace!(model, &a, cache = &mut c, cache_options = CacheOptions::only(["layer"]), { model.layers[0].output.save() });
    assert!(matches!(err, Err(Error::Input(ref m)) if m.contains("`layer`") && m.contains("`layers`")), "{err:?}");
    assert!(c.is_none());
}

#[test]
fn an_early_stop_keeps_what_ran_and_a_missing_device_is_an_error() {
    use nnsight::prelude::*;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 23);
    let clean = plain_stack(&model, &x);
    let mut c: Option<Cache> = None;
    let _ = trace!(model, &x, cache = &mut c, {
        model.layers[1].output.stop();
    })
    .unwrap();
    let c = c.unwrap();
    assert_eq!(c.keys().collect::<Vec<_>>(), ["layers.0", "layers.1"], "layers.2 never ran");
    assert!(c["layers.1"].equal(&clean[1]));
    if !tch::Cuda::is_available() {
        let opts = CacheOptions { to_device: Some(Device::Cuda(0)), ..Default::default() };
        let err = model.run_with_cache(&x, opts).unwrap_err();
        assert!(matches!(err, Error::Device(ref m) if m.contains("Cuda(0)")), "{err}");
    }
    assert!(tch::no_grad(|| model.call(x.shallow_clone())).equal(&clean[2].tanh()));
}

mod minilm {
    use super::*;
    use crate::common::minilm::{minilm, PARIS};
    use nnsight::prelude::*;

    /// One linear kernel for the whole binary, so that separate runs compute bit for bit alike.
    fn model() -> nnsight::LanguageModel<nnsight::Bert> {
        nnsight::models::linear::set_linear_kernel(nnsight::models::linear::LinearKernel::Libtorch);
        minilm()
    }

    #[test]
    fn every_module_equals_a_save_and_the_output_is_the_plain_forward() {
        let model = model();
        let plain = model.forward(&[PARIS]).unwrap();
        let (out, cache) = model.run_with_cache(PARIS, CacheOptions::default()).unwrap();
        assert!(out.equal(&plain), "output with a cache == plain forward");
        let paths: Vec<String> = model.modules().into_iter().map(|(p, _)| p).filter(|p| !p.is_empty()).collect();
        assert_eq!(cache.keys().collect::<Vec<_>>(), paths, "every module below the root, in module order");
        // Independent values: the same hook points saved with trace!.
        let saved = trace!(model, PARIS, {
            let mut v = Vec::new();
            for l in 0..6 {
                v.push((
                    model.encoder.layer[l].output.save(),
                    model.encoder.layer[l].attention.self_.query.output.save(),
                    model.encoder.layer[l].intermediate.output.save(),
                ));
            }
            (model.embeddings.output.save(), v)
        })
        .unwrap();
        assert!(cache["embeddings"].equal(&saved.0));
        for (l, (o, q, i)) in saved.1.iter().enumerate() {
            assert!(cache[format!("encoder.layer.{l}").as_str()].equal(o), "layer {l}");
            assert!(cache[format!("encoder.layer.{l}.attention.self.query").as_str()].equal(q), "layer {l} query");
            assert!(cache[format!("encoder.layer.{l}.intermediate").as_str()].equal(i), "layer {l} intermediate");
        }
        assert!(cache["encoder.layer.5"].equal(&plain), "last layer == last_hidden_state");
        let seq = plain.size()[1] as usize;
        assert_eq!(cache["encoder.layer.0.intermediate"].size(), [1, seq as i64, 1536]);
        assert!(cache.bytes() > 0);
        // Afterwards the plain forward is bit-identical, nothing hooked.
        assert!(model.forward(&[PARIS]).unwrap().equal(&plain));
        assert!(!nnsight::is_tracing());
        assert_eq!(nnsight::live_grad_hooks(), 0);
    }

    #[test]
    fn an_edit_of_the_next_input_leaves_the_cached_output_and_prefixes_select() {
        let model = model();
        let clean = trace!(model, PARIS, { model.encoder.layer[0].output.save() }).unwrap();
        let (edited_q, zero_in) = trace!(model, PARIS, {
            model.encoder.layer[1].input.mul_(0.0);
            (model.encoder.layer[1].attention.self_.query.output.save(), model.encoder.layer[1].input.save())
        })
        .unwrap();
        assert_eq!(zero_in.abs().sum(Kind::Float).double_value(&[]), 0.0);
        // The same edit by hand with a cache of layers 0 and 1.
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(PARIS);
        let h = tr.input(g, 0, || Ok(&model.encoder.layer[1]));
        let e = tr.apply1(h, |h: &Tensor| {
            let _ = h.shallow_clone().mul_(0.0);
            h.shallow_clone()
        });
        tr.edits(h, e);
        let c = tr.cache(g, CacheOptions { inputs: true, ..CacheOptions::only(["encoder.layer.0", "encoder.layer.1"]) });
        let cache: Cache = tr.finish(c).unwrap();
        assert!(cache["encoder.layer.0"].equal(&clean), "layer 0's output as it returned it");
        assert!(cache.input("encoder.layer.1").unwrap().equal(&zero_in), "layer 1's input after the edit");
        assert!(cache["encoder.layer.1.attention.self.query"].equal(&edited_q), "downstream of the edit");
        assert!(cache.keys().all(|k| k.starts_with("encoder.layer.0") || k.starts_with("encoder.layer.1")));
        assert!(cache.keys().any(|k| k == "encoder.layer.1.output.dense"));
        let err = model.run_with_cache(PARIS, CacheOptions::only(["encoder.layers.3"])).unwrap_err();
        assert!(err.to_string().contains("`encoder.layer.3`"), "{err}");
    }

    #[test]
    fn trace_option_cache_on_minilm() {
        let model = model();
        let mut c = None;
        let h = trace!(model, PARIS, cache = &mut c, cache_options = CacheOptions::only(["encoder.layer.2"]), {
            model.encoder.layer[2].attention.self_.query.output[.., 0] = 0.0;
            model.encoder.layer[2].output.save()
        })
        .unwrap();
        let c: Cache = c.unwrap();
        assert!(c["encoder.layer.2"].equal(&h));
        let q = &c["encoder.layer.2.attention.self.query"];
        assert_eq!(q.i((.., 0)).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(q.i((.., 1)).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

mod generation {
    use std::collections::HashMap;

    use super::*;
    use nnsight::models::causal::{CausalLm, LoadOptions};
    use nnsight::models::gpt2::Gpt2;
    use nnsight::prelude::*;
    use nnsight::tokenizers::models::wordlevel::WordLevel;
    use nnsight::tokenizers::Tokenizer;
    use nnsight::{GenerateOptions, Generator, LanguageModel, TextModel};

    fn lm<M: CausalLm + TextModel>(name: &str) -> LanguageModel<M> {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name);
        let model = M::load_with(&dir, &LoadOptions { device: Device::Cpu, dtype: None, ..Default::default() }).unwrap();
        let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
        let wl = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
        LanguageModel::from_parts(model, Tokenizer::new(wl), Device::Cpu).unwrap()
    }

    #[test]
    fn every_generation_step_is_a_call() {
        let model = lm::<Gpt2>("gpt2");
        let prompt: Vec<i64> = vec![11, 42, 7, 300];
        let options = GenerateOptions { max_new_tokens: 3, stop_at_eos: false, ..Default::default() };
        let plain_tokens = model.generate(prompt.clone(), options.clone()).unwrap();
        // Independent values: each step saved by generate!.
        let (heads, blocks) = generate!(model, prompt.clone(), max_new_tokens = 3, stop_at_eos = false, {
            (
                (model.lm_head.at(0).output.save(), model.lm_head.at(1).output.save(), model.lm_head.at(2).output.save()),
                (model.transformer.h[1].at(0).output.save(), model.transformer.h[1].at(2).output.save()),
            )
        })
        .unwrap();

        let gen = Generator::new(&model, options);
        let mut tr = Tracer::new(&gen);
        let g = tr.invoke(prompt.clone());
        let c = tr.cache(g, CacheOptions::only(["lm_head", "transformer.h.1"]));
        let cache: Cache = tr.finish(c).unwrap();
        assert!(gen.tokens().unwrap().equal(&plain_tokens), "the generated tokens are the plain generation's");
        let steps = cache.calls("lm_head");
        assert_eq!(steps.len(), 3, "one call per generation step");
        assert_eq!(steps[0].size(), [1, 4, 1000]);
        assert_eq!(steps[1].size(), [1, 1, 1000]);
        assert!(steps[0].equal(&heads.0) && steps[1].equal(&heads.1) && steps[2].equal(&heads.2));
        let h1 = cache.calls("transformer.h.1");
        assert_eq!(h1.len(), 3);
        assert!(h1[0].equal(&blocks.0) && h1[2].equal(&blocks.1));
        assert!(cache.keys().all(|k| k == "lm_head" || k.starts_with("transformer.h.1")));
        assert!(cache.contains("transformer.h.1.attn"));
    }

    #[test]
    fn generate_option_cache_keeps_every_step() {
        let model = lm::<Gpt2>("gpt2");
        let mut c = None;
        let (s0, s2) = generate!(model, vec![5i64, 6, 7], max_new_tokens = 3, stop_at_eos = false, cache = &mut c,
            cache_options = CacheOptions::only(["lm_head"]), {
            (model.lm_head.at(0).output.save(), model.lm_head.at(2).output.save())
        })
        .unwrap();
        let c: Cache = c.unwrap();
        assert_eq!(c.calls("lm_head").len(), 3);
        assert!(c.calls("lm_head")[0].equal(&s0) && c.calls("lm_head")[2].equal(&s2));
    }

    #[test]
    fn a_full_cache_of_generation_runs_on_both_architectures() {
        let options = GenerateOptions { max_new_tokens: 3, stop_at_eos: false, ..Default::default() };
        fn check<M: CausalLm + TextModel + ModuleTree>(model: &LanguageModel<M>, options: &GenerateOptions) {
            let plain = model.generate(vec![3i64, 9, 27], options.clone()).unwrap();
            let gen = Generator::new(model, options.clone());
            let mut tr = Tracer::new(&gen);
            let g = tr.invoke(vec![3i64, 9, 27]);
            let c = tr.cache(g, CacheOptions::default());
            let cache: Cache = tr.finish(c).unwrap();
            assert!(gen.tokens().unwrap().equal(&plain));
            assert_eq!(cache.calls("lm_head").len(), 3);
            let paths = model.modules().into_iter().filter(|(p, _)| !p.is_empty()).count();
            assert!(cache.len() > 0 && cache.len() <= paths);
            assert!(cache.iter().all(|(_, calls)| calls.len() >= 3), "every module ran at every step");
        }
        check(&lm::<Gpt2>("gpt2"), &options);
        check(&lm::<nnsight::models::llama::Llama>("llama"), &options);
    }
}
