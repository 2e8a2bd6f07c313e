//! Checks shared by the decoder-family tests (`families_part2.rs`, `mistral_and_windows.rs`):
//! each fixture of `fixtures/causal` against what transformers recorded (`expected.json`,
//! `logits.safetensors`), padded rows against solo runs, the KV cache against full passes, module
//! paths against checkpoint keys, and loading errors on altered copies in a temporary folder.
#![allow(dead_code, unused_imports)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use nnsight::models::causal::{AttnPoint, CausalLm, CausalLmExt, Decoder, Eos, KvCacheHandle, LoadOptions, Sampling};
use nnsight::prelude::*;
use nnsight::tch::IndexOp;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{Error, LanguageModel, ModuleTree, TextModel};
use serde_json::Value;

/// Tolerance (max abs, f32) against transformers and against the hand computations.
pub const TOL: f64 = 1e-5;
/// Tokenized by the word-level tokenizer below: ids 5, 17, 230, 9, 41, 8 (positions 0..6).
pub const PROMPT: &str = "t5 t17 t230 t9 t41 t8";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name)
}

pub fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap()
}

pub fn ids(v: &Value) -> Tensor {
    let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).unwrap();
    let (b, s) = (rows.len() as i64, rows[0].len() as i64);
    Tensor::from_slice(&rows.concat()).view([b, s])
}

pub fn floats(v: &Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

pub fn vec_of(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

pub fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

pub fn diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// The tensors of a safetensors file by key, read straight from the file.
pub fn weights(file: PathBuf) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(file).unwrap().into_iter().collect()
}

pub fn load<M: CausalLm>(name: &str) -> Hooked<M> {
    M::from_pretrained(fixture(name)).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

pub fn lm<M: CausalLm + TextModel>(name: &str) -> LanguageModel<M> {
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let wl = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let model = M::load_with(&fixture(name), &LoadOptions { device: Device::Cpu, dtype: None, ..Default::default() }).unwrap();
    LanguageModel::from_parts(model, tok, Device::Cpu).unwrap()
}

pub fn logits_of<M: CausalLm>(model: &Hooked<M>, name: &str) -> Tensor {
    let e = expected(name);
    model.forward(&ids(&e["input_ids"]), &ids(&e["attention_mask"]), &KvCacheHandle::disabled()).unwrap()
}

/// Largest |a - b| over the real (unpadded) positions of `mask` `[batch, seq]`.
pub fn real_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let keep = mask.ne(0).unsqueeze(-1).expand_as(a);
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().masked_select(&keep).max().double_value(&[])
}

// ----- 1. logits ---------------------------------------------------------------------------

/// Logits of the left-padded batch against transformers' whole logits (every real position,
/// every vocabulary entry), the argmax of every real position and the last position's vector
/// in `expected.json`. Returns the largest difference.
pub fn check_logits<M: CausalLm>(name: &str) -> f64 {
    let model = load::<M>(name);
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let logits = model.forward(&input, &mask, &KvCacheHandle::disabled()).unwrap();
    let reference = weights(fixture(name).join("logits.safetensors"));
    assert!(reference["attention_mask"].equal(&mask), "{name}: logits.safetensors is for another batch");
    let want = &reference["logits"];
    assert_eq!(logits.size(), want.size());
    let mut worst = real_diff(&logits, want, &mask);
    for (r, row) in e["logits"]["rows"].as_array().unwrap().iter().enumerate() {
        for p in row["positions"].as_array().unwrap() {
            let pos = p["position"].as_i64().unwrap();
            let got = logits.i((r as i64, pos)).argmax(-1, false).int64_value(&[]);
            assert_eq!(got, p["argmax"].as_i64().unwrap(), "{name} row {r} position {pos}: argmax");
        }
        worst = worst.max(max_diff(&vec_of(&logits.i((r as i64, -1))), &floats(&row["last"])));
    }
    let scale = want.abs().max().double_value(&[]);
    eprintln!("{name}: largest logit difference to transformers {worst:.2e} (largest |logit| {scale:.2})");
    assert!(worst < TOL, "{name}: logits differ from transformers by {worst}");
    worst
}

// ----- 2. greedy generation ------------------------------------------------------------------

/// 10 greedy tokens of the batch as transformers generated them, and with an eos id (rows stop
/// there and are padded afterwards).
pub fn check_greedy<M: CausalLm>(name: &str) {
    let model = load::<M>(name);
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let n = e["greedy"]["max_new_tokens"].as_i64().unwrap();
    assert_eq!(n, 10);
    let out = model.generate(&input, &mask, n, &Sampling::Greedy, None).unwrap();
    assert_eq!(out.size(), vec![input.size()[0], input.size()[1] + n]);
    assert!(out.equal(&ids(&e["greedy"]["sequences"])), "{name} greedy: got {out:?}");
    let eos = Eos {
        token_ids: vec![e["greedy_eos"]["eos_token_id"].as_i64().unwrap()],
        pad_token_id: e["pad_token_id"].as_i64().unwrap(),
    };
    let out = model.generate(&input, &mask, n, &Sampling::Greedy, Some(&eos)).unwrap();
    assert!(out.equal(&ids(&e["greedy_eos"]["sequences"])), "{name} greedy with eos: got {out:?}");
    eprintln!("{name}: greedy and greedy_eos sequences equal transformers' (min margin {})", e["greedy"]["min_margin"]);
}

// ----- 3. padding, KV cache --------------------------------------------------------------------

/// Every row of the left-padded batch computes what it computes alone: logits of its real
/// positions (1e-5) and its greedy tokens.
pub fn check_padding<M: CausalLm>(name: &str) {
    let model = load::<M>(name);
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let none = KvCacheHandle::disabled();
    let batch = model.forward(&input, &mask, &none).unwrap();
    let generated = model.generate(&input, &mask, 6, &Sampling::Greedy, None).unwrap();
    let s = input.size()[1];
    for (r, prompt) in e["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt: Vec<i64> = serde_json::from_value(prompt.clone()).unwrap();
        let len = prompt.len() as i64;
        let solo_ids = Tensor::from_slice(&prompt).view([1, len]);
        let solo_mask = solo_ids.ones_like();
        let solo = model.forward(&solo_ids, &solo_mask, &none).unwrap();
        let d = diff(&solo, &batch.i((r as i64..r as i64 + 1, s - len..)));
        assert!(d < TOL, "{name}: padded row {r} differs from its solo run by {d}");
        eprintln!("{name}: padded row {r} vs solo: {d:.2e}");
        let g = model.generate(&solo_ids, &solo_mask, 6, &Sampling::Greedy, None).unwrap();
        assert!(g.i((0, len..)).equal(&generated.i((r as i64, s..))), "{name}: row {r} generates differently alone");
    }
}

/// A step with the KV cache gives the logits the full forward pass gives at those positions;
/// generation (which uses the cache) picks the tokens a loop of full forward passes without
/// cache picks.
pub fn check_cache<M: CausalLm>(name: &str) {
    let model = load::<M>(name);
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let s = input.size()[1];
    let none = KvCacheHandle::disabled();
    let full = model.forward(&input, &mask, &none).unwrap();
    let cache = model.new_cache();
    let first = model.forward(&input.i((.., ..s - 2)), &mask.i((.., ..s - 2)), &cache).unwrap();
    assert_eq!(cache.past_len(), s - 2);
    let d0 = real_diff(&first, &full.i((.., ..s - 2)), &mask.i((.., ..s - 2)));
    let step = model.forward(&input.i((.., s - 2..)), &mask, &cache).unwrap();
    assert_eq!(cache.past_len(), s);
    let d1 = real_diff(&step, &full.i((.., s - 2..)), &mask.i((.., s - 2..)));
    assert!(d0 < TOL && d1 < TOL, "{name}: cached steps differ from the full pass by {d0}, {d1}");

    let n = 10;
    let generated = model.generate(&input, &mask, n, &Sampling::Greedy, None).unwrap();
    let (mut seq, mut m) = (input.shallow_clone(), mask.shallow_clone());
    let mut worst_step = 0.0f64;
    for i in 0..n {
        let logits = model.forward(&seq, &m, &none).unwrap();
        let next = logits.i((.., -1)).argmax(-1, true);
        seq = Tensor::cat(&[&seq, &next], 1);
        m = Tensor::cat(&[&m, &next.ones_like()], 1);
        // The same position through the cache: one more cached step.
        if i == 0 {
            let c = model.new_cache();
            let _ = model.forward(&input, &mask, &c).unwrap();
            let cached = model.forward(&next, &m, &c).unwrap();
            let nocache = model.forward(&seq, &m, &none).unwrap();
            worst_step = diff(&cached.i((.., -1)), &nocache.i((.., -1)));
        }
    }
    assert!(worst_step < TOL, "{name}: a cached generation step differs from the full pass by {worst_step}");
    assert!(generated.equal(&seq), "{name}: generate (KV cache) {generated:?} != full-forward greedy {seq:?}");
    eprintln!("{name}: cached steps vs full pass {d0:.2e}, {d1:.2e}, first generated step {worst_step:.2e}; 10 tokens equal");
}

// ----- 4. module paths, Decoder view ---------------------------------------------------------

/// Every weight-bearing module is the prefix of its checkpoint keys (`lm_head` excepted when
/// tied), every checkpoint key belongs to a module of that path, and `must_have` are there.
pub fn check_paths<M: CausalLm + ModuleTree>(name: &str, must_have: &[(&str, &str)]) {
    let model = load::<M>(name);
    let modules = model.modules();
    let keys: Vec<String> = weights(fixture(name).join("model.safetensors")).into_keys().collect();
    for (path, ty) in &modules {
        let tied = path == "lm_head" && !keys.iter().any(|k| k == "lm_head.weight");
        if ["Embedding", "Linear", "RmsNorm", "Olmo2RmsNorm", "LmHead"].contains(ty) && !tied {
            assert!(keys.contains(&format!("{path}.weight")), "{name}: module `{path}` ({ty}) has no checkpoint key");
        }
    }
    for key in &keys {
        let module = key.rsplit_once('.').unwrap().0;
        assert!(modules.iter().any(|(p, _)| p == module), "{name}: checkpoint key `{key}` has no module `{module}`");
    }
    for (path, ty) in must_have {
        assert!(modules.iter().any(|(p, t)| p == path && t == ty), "{name}: no module `{path}` of type {ty}");
    }
    for layer in 0..2 {
        for point in ["q", "k", "scores", "probs", "z"] {
            let path = format!("model.layers.{layer}.self_attn.{point}");
            assert!(modules.iter().any(|(p, t)| *p == path && *t == "HookPoint"), "{name}: no hook point `{path}`");
        }
        let path = format!("model.layers.{layer}.mlp.act");
        assert!(modules.iter().any(|(p, t)| *p == path && *t == "HookPoint"), "{name}: no hook point `{path}`");
    }
    eprintln!("{name}: {} modules, {} checkpoint keys, every key has its module", modules.len(), keys.len());
}

/// `Decoder::layers()[i]` is the typed `model.layers[i]` (same object, same path), the accessors
/// reach the typed modules' paths, and `unembed` of the last layer's output is the logits.
pub fn check_decoder<M: Decoder + TextModel>(name: &str, typed: fn(&M) -> &Vec<Hooked<M::Layer>>) {
    let model = lm::<M>(name);
    assert_eq!(model.layers().len(), 2);
    for i in 0..2 {
        assert!(std::ptr::eq(&model.layers()[i], &typed(&model)[i]), "{name}: layers()[{i}] is another module");
        assert_eq!(model.layers()[i].path(), format!("model.layers.{i}"));
        assert_eq!(model.attn(i).unwrap().path(), format!("model.layers.{i}.self_attn"));
        assert_eq!(model.mlp(i).unwrap().path(), format!("model.layers.{i}.mlp"));
        assert_eq!(model.mlp_act(i).unwrap().path(), format!("model.layers.{i}.mlp.act"));
        for point in [AttnPoint::Q, AttnPoint::K, AttnPoint::Scores, AttnPoint::Probs, AttnPoint::Z] {
            assert_eq!(model.attn_point(i, point).unwrap().path(), format!("model.layers.{i}.self_attn.{}", point.name()));
        }
    }
    assert_eq!(model.final_norm().path(), "model.norm");
    assert_eq!(model.unembedding().path(), "lm_head");
    let plain = tch::no_grad(|| model.forward(&[PROMPT])).unwrap();
    let (lens, logits) = trace!(model, PROMPT, {
        let h = model.layers()[-1].output;
        (model.unembed(&h).save(), model.output.save())
    })
    .unwrap();
    assert!(logits.equal(&plain), "{name}: tracing changed the logits");
    let d = diff(&lens, &logits);
    assert!(d < 1e-6, "{name}: unembed(last layer) differs from the logits by {d}");
    eprintln!("{name}: Decoder view = typed modules; unembed(last layer) vs logits {d:.1e}");
}

// ----- 6. bad input ------------------------------------------------------------------------------

pub static TMP: AtomicUsize = AtomicUsize::new(0);

/// A fresh folder holding `name`'s config as `edit_config` leaves it and the tensors
/// `edit_tensors` makes of its checkpoint.
pub fn altered(
    name: &str,
    edit_config: impl FnOnce(&mut serde_json::Map<String, Value>),
    edit_tensors: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nnsight-decoder-fixture-{}-{}", std::process::id(), TMP.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
    edit_config(cfg.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors = Tensor::read_safetensors(fixture(name).join("model.safetensors")).unwrap();
    edit_tensors(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

pub fn config_altered(name: &str, edit_config: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    altered(name, edit_config, |_| {})
}

/// The message of the [`Error::Config`] loading `dir` gives; it must name config.json.
pub fn config_error<M: CausalLm>(dir: &Path) -> String {
    match M::load_with(dir, &LoadOptions::default()).map(drop).unwrap_err() {
        Error::Config { path, message } => {
            assert!(path.ends_with("config.json"), "the error names {path}, not config.json");
            eprintln!("{path}: {message}");
            message
        }
        other => panic!("expected a Config error, got {other}"),
    }
}

/// Each of `missing` removed from the checkpoint is a `MissingWeight` naming model.safetensors
/// and the key; `misshapen` given `[3, 64]` is a `WeightShape` naming both.
pub fn check_bad_weights<M: CausalLm>(name: &str, missing: &[&str], misshapen: &str) {
    for key in missing {
        let dir = altered(name, |_| {}, |t| t.retain(|(k, _)| k != key));
        match M::load_with(&dir, &LoadOptions::default()).map(drop).unwrap_err() {
            Error::MissingWeight { file, key: k } => {
                assert_eq!(&k, key);
                assert!(file.ends_with("model.safetensors"), "{file}");
            }
            other => panic!("{name}: expected MissingWeight for {key}, got {other}"),
        }
    }
    let dir = altered(name, |_| {}, |t| {
        let v = t.iter_mut().find(|(k, _)| k == misshapen).unwrap_or_else(|| panic!("{name} has no {misshapen}"));
        v.1 = Tensor::zeros([3, 64], (Kind::Float, Device::Cpu));
    });
    let err = M::load_with(&dir, &LoadOptions::default()).map(drop).unwrap_err();
    eprintln!("{name}: {err}");
    match err {
        Error::WeightShape { file, key, actual, .. } => {
            assert_eq!(key, misshapen);
            assert!(file.ends_with("model.safetensors"), "{file}");
            assert_eq!(actual, vec![3, 64]);
        }
        other => panic!("{name}: expected WeightShape, got {other}"),
    }
}
