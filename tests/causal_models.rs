//! GPT-2 and Llama against Hugging Face transformers, on tiny random checkpoints made by
//! `fixtures/causal/make_fixtures.py` (2 layers, hidden 64, vocab 1000; Llama with 4 query and
//! 2 key/value heads; transformers' eager attention in float32, versions in each
//! `expected.json`). Loading errors are checked on altered copies written into a temporary folder.

use nnsight::models::causal::{CausalLm, CausalLmExt, KvCacheHandle, LoadOptions, Sampling};
use nnsight::models::gpt2::Gpt2;
use nnsight::models::llama::{Llama, LlamaConfig, Rope};
use nnsight::tch::{Device, IndexOp, Kind, Tensor};
use nnsight::{AsModule, Error, Hooked, ModuleTree, Traced, Tracer};
use serde_json::Value;

mod common;
// `check_logits` and `check_paths` stay below: the shared ones read a `logits.safetensors`
// these fixtures do not have, and expect `model.layers.*` paths GPT-2 does not have.
use common::decoder_fixtures::{
    altered, check_cache, check_greedy, check_padding, config_altered, expected, fixture, floats, ids, load, logits_of,
    max_diff, vec_of,
};

/// Tolerance on logits against transformers.
const TOL: f64 = 1e-4;
/// Tolerance between a padded row and the same row alone.
const SOLO_TOL: f64 = 1e-5;

/// Logits of the fixture's left-padded batch against transformers: every real position's
/// summaries and the last position's whole vector. Returns the largest difference seen.
fn check_logits<M: CausalLm>(name: &str) -> f64 {
    let model = load::<M>(name);
    let e = expected(name);
    let logits = model.forward(&ids(&e["input_ids"]), &ids(&e["attention_mask"]), &KvCacheHandle::disabled()).unwrap();
    let picked: Vec<i64> = serde_json::from_value(e["picked_ids"].clone()).unwrap();
    let mut worst = 0.0f64;
    for (r, row) in e["logits"]["rows"].as_array().unwrap().iter().enumerate() {
        for p in row["positions"].as_array().unwrap() {
            let pos = p["position"].as_i64().unwrap();
            let v = logits.i((r as i64, pos));
            let vals = vec_of(&v);
            let (sum, abs_sum): (f64, f64) = (vals.iter().sum(), vals.iter().map(|x| x.abs()).sum());
            let d = [
                max_diff(&vals[..8], &floats(&p["first"])),
                max_diff(&picked.iter().map(|&i| vals[i as usize]).collect::<Vec<_>>(), &floats(&p["picked"])),
                (vals.iter().cloned().fold(f64::MIN, f64::max) - p["max"].as_f64().unwrap()).abs(),
                // sums over the 1000-entry vocabulary: f32 accumulation, scaled tolerance
                (sum - p["sum"].as_f64().unwrap()).abs() / 10.0,
                (abs_sum - p["abs_sum"].as_f64().unwrap()).abs() / 10.0,
            ];
            let dmax = d.iter().cloned().fold(0.0, f64::max);
            assert!(dmax < TOL, "{name} row {r} position {pos}: differences {d:?}");
            assert_eq!(v.argmax(-1, false).int64_value(&[]), p["argmax"].as_i64().unwrap(), "{name} row {r} pos {pos}");
            worst = worst.max(dmax);
        }
        let last = vec_of(&logits.i((r as i64, -1)));
        let d = max_diff(&last, &floats(&row["last"]));
        assert!(d < TOL, "{name} row {r} last position: max difference {d}");
        worst = worst.max(d);
    }
    eprintln!("{name}: largest logit difference to transformers {worst:.2e}");
    worst
}

#[test]
fn gpt2_logits_match_transformers() {
    check_logits::<Gpt2>("gpt2");
}

#[test]
fn llama_logits_match_transformers() {
    check_logits::<Llama>("llama");
}

#[test]
fn llama_tied_logits_match_transformers() {
    let model = load::<Llama>("llama_tied");
    assert!(model.config.tie_word_embeddings);
    assert!(model.lm_head.weight.data_ptr() == model.model.embed_tokens.ws.data_ptr(), "lm_head must share embed_tokens");
    check_logits::<Llama>("llama_tied");
}

/// Every weight-bearing module path is the prefix of its checkpoint keys.
fn check_paths<M: CausalLm + ModuleTree>(name: &str, must_have: &[(&str, &str)]) {
    let model = load::<M>(name);
    let modules = model.modules();
    let keys: Vec<String> =
        Tensor::read_safetensors(fixture(name).join("model.safetensors")).unwrap().into_iter().map(|(k, _)| k).collect();
    for (path, ty) in &modules {
        let tied = path == "lm_head" && !keys.iter().any(|k| k == "lm_head.weight");
        if ["Embedding", "LayerNorm", "Conv1D", "Linear", "RmsNorm", "LmHead"].contains(ty) && !tied {
            assert!(keys.contains(&format!("{path}.weight")), "{name}: module `{path}` ({ty}) has no checkpoint key");
        }
    }
    for (path, ty) in must_have {
        assert!(modules.iter().any(|(p, t)| p == path && t == ty), "{name}: no module `{path}` of type {ty}");
    }
}

#[test]
fn module_paths_are_the_checkpoint_keys() {
    check_paths::<Gpt2>(
        "gpt2",
        &[("", "Gpt2"), ("transformer.h.1", "Gpt2Block"), ("transformer.h.0.attn.c_attn", "Conv1D"),
          ("transformer.h.0.mlp.act", "HiddenAct"), ("transformer.h.1.attn.probs", "HookPoint"), ("lm_head", "LmHead")],
    );
    check_paths::<Llama>(
        "llama",
        &[("model.layers.1.self_attn.k_proj", "Linear"), ("model.rotary_emb", "RotaryEmbedding"),
          ("model.layers.0.mlp.act_fn", "HiddenAct"), ("model.layers.0.mlp.act", "HookPoint"),
          ("model.layers.1.self_attn.z", "HookPoint"), ("model.norm", "RmsNorm"), ("lm_head", "LmHead")],
    );
    eprintln!("{}", load::<Gpt2>("gpt2").module_tree());
}

#[test]
fn gpt2_greedy_generation_matches_transformers() {
    check_greedy::<Gpt2>("gpt2");
}

#[test]
fn llama_greedy_generation_matches_transformers() {
    check_greedy::<Llama>("llama");
    check_greedy::<Llama>("llama_tied");
}

#[test]
fn gpt2_padded_rows_match_solo_runs() {
    check_padding::<Gpt2>("gpt2");
}

#[test]
fn llama_padded_rows_match_solo_runs() {
    check_padding::<Llama>("llama");
}

/// What the shared `check_cache` does not check: with the cache filled as it fills it (all but
/// the last two positions, then those two), a mask that does not cover the cached positions is
/// refused.
fn check_short_mask_refused<M: CausalLm>(name: &str) {
    let model = load::<M>(name);
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let s = input.size()[1];
    let cache = model.new_cache();
    let _ = model.forward(&input.i((.., ..s - 2)), &mask.i((.., ..s - 2)), &cache).unwrap();
    let _ = model.forward(&input.i((.., s - 2..)), &mask, &cache).unwrap();
    assert_eq!(cache.past_len(), s);
    let err = model.forward(&input.i((.., s - 1..)), &mask.i((.., s - 1..)), &cache).unwrap_err();
    assert!(matches!(err, Error::Input(ref m) if m.contains("attention_mask")), "{err}");
}

#[test]
fn kv_cache_steps_match_full_forward() {
    check_cache::<Gpt2>("gpt2");
    check_short_mask_refused::<Gpt2>("gpt2");
    check_cache::<Llama>("llama");
    check_short_mask_refused::<Llama>("llama");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = load::<Llama>("llama");
    let e = expected("llama");
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let sample = |seed, top_k| Sampling::Sample { temperature: 0.8, top_k, seed };
    let a = model.generate(&input, &mask, 8, &sample(7, Some(20)), None).unwrap();
    let b = model.generate(&input, &mask, 8, &sample(7, Some(20)), None).unwrap();
    assert!(a.equal(&b), "same seed, same tokens");
    let others: Vec<Tensor> = (8..12).map(|s| model.generate(&input, &mask, 8, &sample(s, None), None).unwrap()).collect();
    assert!(others.iter().any(|o| !o.equal(&a)), "other seeds should draw other tokens");
    let k1 = model.generate(&input, &mask, 8, &sample(3, Some(1)), None).unwrap();
    let greedy = model.generate(&input, &mask, 8, &Sampling::Greedy, None).unwrap();
    assert!(k1.equal(&greedy), "top_k = 1 is greedy");
    let bad = model.generate(&input, &mask, 8, &Sampling::Sample { temperature: 0.0, top_k: None, seed: 0 }, None);
    assert!(matches!(bad, Err(Error::Input(_))));
}

#[test]
fn empty_and_overlong_inputs_are_errors() {
    let gpt2 = load::<Gpt2>("gpt2");
    let llama = load::<Llama>("llama");
    let none = KvCacheHandle::disabled();
    let empty = Tensor::zeros([2, 0], (Kind::Int64, Device::Cpu));
    for err in [
        gpt2.forward(&empty, &empty, &none).unwrap_err(),
        llama.forward(&empty, &empty, &none).unwrap_err(),
        gpt2.generate(&empty, &empty, 3, &Sampling::Greedy, None).unwrap_err(),
    ] {
        assert!(matches!(err, Error::Input(ref m) if m.contains("empty")), "{err}");
    }
    let long = Tensor::ones([1, 129], (Kind::Int64, Device::Cpu));
    for err in [gpt2.forward(&long, &long, &none).unwrap_err(), llama.forward(&long, &long, &none).unwrap_err()] {
        assert!(matches!(err, Error::Input(ref m) if m.contains("at most 128")), "{err}");
    }
    // 120 prompt tokens + 10 new need 129 positions.
    let prompt = Tensor::ones([1, 120], (Kind::Int64, Device::Cpu));
    let err = gpt2.generate(&prompt, &prompt, 10, &Sampling::Greedy, None).unwrap_err();
    assert!(matches!(err, Error::Input(ref m) if m.contains("at most 128")), "{err}");
    assert!(gpt2.generate(&prompt, &prompt, 9, &Sampling::Greedy, None).is_ok());
    let oov = Tensor::from_slice(&[5i64, 1000]).view([1, 2]);
    assert!(matches!(gpt2.forward(&oov, &oov.ones_like(), &none), Err(Error::Input(_))));
}

#[test]
fn config_of_another_architecture_is_an_error() {
    let err = Gpt2::load_with(&fixture("llama"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Config { ref message, .. } if message.contains("\"llama\"")), "{err}");
    let err = Llama::load_with(&fixture("gpt2"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Config { ref path, .. } if path.ends_with("config.json")), "{err}");
    eprintln!("{err}");
    let err = Gpt2::load_with(&fixture("no-such-model"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn missing_key_and_wrong_shape_are_errors() {
    let dir = altered("gpt2", |_| {}, |t| t.retain(|(k, _)| k != "transformer.h.1.mlp.c_fc.bias"));
    let err = Gpt2::load_with(&dir, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::MissingWeight { ref key, .. } if key == "transformer.h.1.mlp.c_fc.bias"), "{err}");
    let dir = altered("llama", |_| {}, |t| t.retain(|(k, _)| k != "lm_head.weight"));
    let err = Llama::load_with(&dir, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::MissingWeight { ref key, .. } if key == "lm_head.weight"), "{err}");
    let dir = altered("llama", |_| {}, |t| {
        let v = t.iter_mut().find(|(k, _)| k == "model.layers.0.self_attn.k_proj.weight").unwrap();
        v.1 = Tensor::zeros([64, 64], (Kind::Float, Device::Cpu)); // 4 kv heads instead of 2
    });
    let err = Llama::load_with(&dir, &LoadOptions::default()).unwrap_err();
    match err {
        Error::WeightShape { key, expected, actual, .. } => {
            assert_eq!(key, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!((expected, actual), (vec![32, 64], vec![64, 64]));
        }
        other => panic!("expected WeightShape, got {other}"),
    }
}

#[test]
fn sharded_and_unprefixed_checkpoints_load() {
    // Two shards and an index, as save_pretrained(max_shard_size=...) writes them.
    let dir = config_altered("llama", |_| {});
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let tensors = Tensor::read_safetensors(fixture("llama").join("model.safetensors")).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|(k, _)| k.contains("layers.0") || k.contains("embed"));
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", &a), ("model-00002-of-00002.safetensors", &b)] {
        Tensor::write_safetensors(part, dir.join(file)).unwrap();
        part.iter().for_each(|(k, _)| {
            map.insert(k.clone(), Value::String(file.into()));
        });
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = Llama::from_pretrained(&dir).unwrap();
    assert!(logits_of(&sharded, "llama").equal(&logits_of(&load::<Llama>("llama"), "llama")));

    // A bare GPT2Model checkpoint (keys without `transformer.`), like the original `gpt2`.
    let dir = altered("gpt2", |_| {}, |t| t.iter_mut().for_each(|(k, _)| *k = k.trim_start_matches("transformer.").to_string()));
    let bare = Gpt2::from_pretrained(&dir).unwrap();
    assert!(logits_of(&bare, "gpt2").equal(&logits_of(&load::<Gpt2>("gpt2"), "gpt2")));
}

#[test]
fn dtypes_kept_or_converted() {
    let f32_logits = logits_of(&load::<Gpt2>("gpt2"), "gpt2");
    let scale = f32_logits.abs().max().double_value(&[]);
    // Convert on load.
    let opts = LoadOptions { device: Device::Cpu, dtype: Some(Kind::BFloat16), ..Default::default() };
    let bf16 = Hooked::with_path("", Gpt2::load_with(&fixture("gpt2"), &opts).unwrap());
    assert_eq!(bf16.kind(), Kind::BFloat16);
    let l = logits_of(&bf16, "gpt2");
    assert_eq!(l.kind(), Kind::BFloat16);
    let d = (l.to_kind(Kind::Float) - &f32_logits).abs().max().double_value(&[]);
    assert!(d < 0.05 * scale, "bf16 logits off by {d} (scale {scale})");
    eprintln!("gpt2 bf16 vs f32: {d:.3} (largest |logit| {scale:.2})");
    // Keep the checkpoint's dtype: an f16 checkpoint loads as f16.
    let dir = altered("llama", |_| {}, |t| t.iter_mut().for_each(|(_, v)| *v = v.to_kind(Kind::Half)));
    let f16 = Llama::from_pretrained(&dir).unwrap();
    assert_eq!(f16.kind(), Kind::Half);
    let l = logits_of(&f16, "llama");
    let reference = logits_of(&load::<Llama>("llama"), "llama");
    let d = (l.to_kind(Kind::Float) - &reference).abs().max().double_value(&[]);
    let scale = reference.abs().max().double_value(&[]);
    assert!(d < 0.02 * scale, "f16 logits off by {d} (scale {scale})");
    eprintln!("llama f16 vs f32: {d:.4} (largest |logit| {scale:.2})");
    let opts = LoadOptions { device: Device::Cpu, dtype: Some(Kind::Float), ..Default::default() };
    assert_eq!(Llama::load_with(&dir, &opts).unwrap().kind(), Kind::Float);
}

#[test]
fn llama_config_spellings_and_rope_scalings() {
    // transformers 4 spelling: top-level rope_theta, rope_scaling null.
    let dir = config_altered("llama", |o| {
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), 1000.0.into());
        o.insert("rope_scaling".into(), Value::Null);
    });
    let v4 = Llama::from_pretrained(&dir).unwrap();
    assert_eq!(v4.config.rope().unwrap(), Rope::Default { theta: 1000.0 });
    assert!(logits_of(&v4, "llama").equal(&logits_of(&load::<Llama>("llama"), "llama")));

    let mut c = LlamaConfig { rope_theta: Some(500000.0), ..Default::default() };
    c.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}));
    assert!(matches!(c.rope(), Ok(Rope::Llama3 { factor, .. }) if factor == 8.0));
    c.rope_scaling = Some(serde_json::json!({"type": "yarn", "factor": 4.0}));
    assert!(c.rope().unwrap_err().contains("yarn"));
}

/// A causal LM driven by generation, the way `generate!` can run it: one invoke is one prompt,
/// prompts are left-padded together, `forward_invokes` generates `steps` tokens.
struct Generating {
    root: Hooked<Gpt2>,
    steps: i64,
}

impl AsModule for Generating {
    type Module = Gpt2;
    fn as_module(&self) -> &Hooked<Gpt2> {
        &self.root
    }
}

fn left_pad(prompts: &[Vec<i64>]) -> (Tensor, Tensor) {
    let s = prompts.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> = prompts.iter().flat_map(|p| std::iter::repeat_n(0, s - p.len()).chain(p.iter().copied())).collect();
    let mask: Vec<i64> = prompts.iter().flat_map(|p| (0..s).map(move |i| (i >= s - p.len()) as i64)).collect();
    let shape = [prompts.len() as i64, s as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape))
}

impl Traced for Generating {
    type Invoke = Vec<i64>;
    fn invoke_rows(&self, _: &Vec<i64>) -> nnsight::Result<i64> {
        Ok(1)
    }
    fn forward_invokes(&self, invokes: &[Vec<i64>]) -> nnsight::Result<()> {
        let (ids, mask) = left_pad(invokes);
        self.root.generate(&ids, &mask, self.steps, &Sampling::Greedy, None).map(drop)
    }
}

impl nnsight::IntoInvoke<Generating> for Vec<i64> {
    fn into_invoke(self, _: &Generating) -> nnsight::Result<Vec<i64>> {
        Ok(self)
    }
}

#[test]
fn traced_generation_sees_one_call_per_step_per_invoke_rows() {
    let model = Generating { root: load::<Gpt2>("gpt2"), steps: 3 };
    let e = expected("gpt2");
    let prompts: Vec<Vec<i64>> = serde_json::from_value(e["prompts"].clone()).unwrap();
    let mut tr = Tracer::new(&model);
    let g0 = tr.invoke(prompts[0].clone());
    let g1 = tr.invoke(prompts[1].clone());
    let step0 = tr.output(g1, 0, || Ok(&model.root.lm_head));
    let step2 = tr.output(g1, 2, || Ok(&model.root.lm_head));
    let h0 = tr.output(g0, 1, || Ok(&model.root.transformer.h[1]));
    let (s0, s2, sh) = (tr.save(step0), tr.save(step2), tr.save(h0));
    let (step0, step2, h0): (Tensor, Tensor, Tensor) = tr.finish((s0, s2, sh)).unwrap();
    // Invoke 1's rows only: step 0 is its whole (padded) prompt, later steps one token.
    assert_eq!(step0.size(), vec![1, 7, 1000]);
    assert_eq!(step2.size(), vec![1, 1, 1000]);
    assert_eq!(h0.size(), vec![1, 1, 64]);
    // The real positions equal the solo run of that prompt.
    let p = &prompts[1];
    let solo_ids = Tensor::from_slice(p).view([1, p.len() as i64]);
    let solo = model.root.forward(&solo_ids, &solo_ids.ones_like(), &KvCacheHandle::disabled()).unwrap();
    let d = max_diff(&vec_of(&solo), &vec_of(&step0.i((.., 7 - p.len() as i64..))));
    assert!(d < SOLO_TOL, "traced step 0 of invoke 1 differs from its solo run by {d}");
    // Greedy token at step 2 is the one transformers generated third.
    let greedy = ids(&e["greedy"]["sequences"]);
    assert_eq!(step2.argmax(-1, false).int64_value(&[0, 0]), greedy.int64_value(&[1, 7 + 2]));

    // Asking for a step that never runs names the module and call.
    let mut tr = Tracer::new(&model);
    let g = tr.invoke(prompts[2].clone());
    let late = tr.output(g, 3, || Ok(&model.root.lm_head));
    let s = tr.save(late);
    let err = tr.finish(s).unwrap_err();
    assert!(matches!(err, Error::NeverProvided { ref point, call: 3, .. } if point.starts_with("lm_head")), "{err}");
}
