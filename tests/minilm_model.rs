//! The bundled BERT on the real all-MiniLM-L6-v2 checkpoint, checked against values computed
//! elsewhere: `fixtures/minilm.json` (Python nnsight 0.8.1 on transformers/torch) and
//! `fixtures/minilm_numpy.json` (an independent float64 numpy implementation,
//! `fixtures/make_minilm_reference.py`). Loading errors are checked on tiny fake checkpoints
//! written with tch into a temporary folder.
//!
//! The model folder comes from `NNSIGHT_MINILM_DIR` (set by `.cargo/config.toml` after
//! `cargo xtask setup`); without it these tests fail and say so.

mod common;

use std::path::{Path, PathBuf};

use common::minilm::minilm;
use std::sync::atomic::{AtomicUsize, Ordering};

use nnsight::models::bert::mean_pool_normalize;
use nnsight::tch::{nn, Device, Kind, Tensor};
use nnsight::{Bert, BertConfig, Error, HookModule, LanguageModel, Tracer};
use serde_json::{json, Value};

const SENTENCES: [&str; 2] = ["The Eiffel Tower is in the city of Paris.", "The Colosseum is in the city of Rome."];

/// Relative tolerance of the reference values (they are rounded to 6 significant digits).
const REL: f64 = 1e-4;
/// Extra absolute tolerance for sums over many elements.
const SUM_ABS: f64 = 1e-3;

fn python_reference() -> Value {
    serde_json::from_str(include_str!("fixtures/minilm.json")).unwrap()
}

fn numpy_reference() -> Value {
    serde_json::from_str(include_str!("fixtures/minilm_numpy.json")).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(f).collect()
}

fn ints2(v: &Value) -> Vec<Vec<i64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()).collect()
}

fn tensor_ints2(t: &Tensor) -> Vec<Vec<i64>> {
    let t = t.to_kind(Kind::Int64).contiguous();
    let (b, s) = (t.size()[0], t.size()[1]);
    (0..b).map(|i| (0..s).map(|j| t.int64_value(&[i, j])).collect()).collect()
}

fn tensor_floats(t: &Tensor) -> Vec<f64> {
    let t = t.to_kind(Kind::Double).flatten(0, -1);
    (0..t.size()[0]).map(|i| t.double_value(&[i])).collect()
}

/// `|ours - reference| <= abs + rel * |reference|`, with both numbers in the panic message.
fn assert_close(what: &str, ours: f64, reference: f64, rel: f64, abs: f64) {
    let ok = (ours - reference).abs() <= abs + rel * reference.abs();
    eprintln!("{what}: ours {ours:.7} reference {reference:.7} diff {:.2e}", ours - reference);
    assert!(ok, "{what}: ours {ours} vs reference {reference} (rel {rel}, abs {abs})");
}

fn assert_all_close(what: &str, ours: &[f64], reference: &[f64], rel: f64, abs: f64) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths differ");
    for (i, (&a, &r)) in ours.iter().zip(reference).enumerate() {
        assert_close(&format!("{what}[{i}]"), a, r, rel, abs);
    }
}

fn sum(t: &Tensor) -> f64 {
    t.sum(Kind::Double).double_value(&[])
}

// ---------------------------------------------------------------- the real model

#[test]
fn plain_forward_matches_python_nnsight() {
    let lm = minilm();
    let refv = python_reference();
    let v = &refv["cases"]["plain_forward"]["values"];
    let h = lm.forward(&SENTENCES).unwrap();

    let shape: Vec<i64> = v["shape"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(h.size(), shape);
    assert_eq!(h.kind(), Kind::Float);
    assert_close("sum", sum(&h), f(&v["sum"]), REL, SUM_ABS);
    let rows = floats(&v["row_sums"]);
    assert_close("row_sums[0]", sum(&h.get(0)), rows[0], REL, SUM_ABS);
    assert_close("row_sums[1]", sum(&h.get(1)), rows[1], REL, SUM_ABS);
    let mask = lm.tokenize(&SENTENCES).unwrap().attention_mask;
    let non_pad = sum(&(&h * mask.to_kind(Kind::Float).unsqueeze(-1)));
    assert_close("sum_non_pad_positions", non_pad, f(&v["sum_non_pad_positions"]), REL, SUM_ABS);
    let first5 = |row: i64| tensor_floats(&h.get(row).get(0).narrow(0, 0, 5));
    assert_all_close("token0_first5", &first5(0), &floats(&v["token0_first5"]), REL, 0.0);
    assert_all_close("token0_first5_row1", &first5(1), &floats(&v["token0_first5_row1"]), REL, 0.0);
}

#[test]
fn tokenizer_gives_the_fixture_ids_masks_and_one_pad() {
    let lm = minilm();
    let refv = python_reference();
    let inputs = &refv["inputs"];
    let batch = lm.tokenize(&SENTENCES).unwrap();
    assert_eq!(tensor_ints2(&batch.input_ids), ints2(&inputs["input_ids"]));
    assert_eq!(tensor_ints2(&batch.attention_mask), ints2(&inputs["attention_mask"]));
    assert_eq!(tensor_ints2(&batch.token_type_ids), ints2(&inputs["token_type_ids"]));
    let tokens: Vec<Vec<String>> = serde_json::from_value(inputs["tokens"].clone()).unwrap();
    assert_eq!(batch.tokens, tokens);
    for t in [&batch.input_ids, &batch.attention_mask, &batch.token_type_ids] {
        assert_eq!(t.kind(), Kind::Int64);
        assert_eq!(t.size(), [2, 14]);
    }

    // Padding to the longest sentence of the batch, not tokenizer.json's fixed 128: row 1 has
    // exactly one [PAD] (id 0, mask 0), at the end.
    assert_eq!(batch.tokens[1].iter().filter(|t| *t == "[PAD]").count(), 1);
    assert_eq!(batch.tokens[1][13], "[PAD]");
    assert_eq!(batch.input_ids.int64_value(&[1, 13]), 0);
    assert_eq!(batch.attention_mask.int64_value(&[1, 13]), 0);
    assert_eq!(batch.tokens[0].iter().filter(|t| *t == "[PAD]").count(), 0);

    // One sentence alone is not padded at all.
    let alone = lm.tokenize(&SENTENCES[1..]).unwrap();
    assert_eq!(alone.input_ids.size(), [1, 13]);
    assert_eq!(sum(&alone.attention_mask), 13.0);
}

#[test]
fn padding_does_not_change_a_row() {
    let lm = minilm();
    let batch = lm.forward(&SENTENCES).unwrap();
    for (row, s) in SENTENCES.iter().enumerate() {
        let alone = lm.forward(&[*s]).unwrap();
        let n = alone.size()[1];
        let in_batch = batch.get(row as i64).narrow(0, 0, n);
        let diff = (&alone.get(0) - &in_batch).abs().max().double_value(&[]);
        eprintln!("sentence {row}: alone vs batched max abs diff over {n} real positions {diff:.2e}");
        assert!(diff <= 1e-5, "sentence {row}: alone vs in batch differ by {diff}");
    }
}

#[test]
fn sentence_cosine_similarity_matches_numpy_reference() {
    let lm = minilm();
    let np = numpy_reference();
    let h = lm.forward(&SENTENCES).unwrap();
    let mask = lm.tokenize(&SENTENCES).unwrap().attention_mask;
    let emb = mean_pool_normalize(&h, &mask);
    assert_eq!(emb.size(), [2, 384]);
    let norms = tensor_floats(&emb.norm_scalaropt_dim(2.0, [1i64].as_slice(), false));
    assert_all_close("embedding norms", &norms, &[1.0, 1.0], 0.0, 1e-6);
    let cosine = sum(&(emb.get(0) * emb.get(1)));
    assert_close("cosine similarity", cosine, f(&np["cosine_similarity"]), 0.0, 1e-5);
    let first5 = floats(&np["sentence_embeddings"]["first5"][0]);
    assert_all_close("embedding[0][..5]", &tensor_floats(&emb.get(0).narrow(0, 0, 5)), &first5, 0.0, 1e-5);

    // Mean pooling ignores the [PAD] position: sentence 1 alone gives the same embedding.
    let alone = lm.forward(&SENTENCES[1..]).unwrap();
    let alone_mask = lm.tokenize(&SENTENCES[1..]).unwrap().attention_mask;
    let e1 = mean_pool_normalize(&alone, &alone_mask);
    let diff = (e1.get(0) - emb.get(1)).abs().max().double_value(&[]);
    assert!(diff <= 1e-6, "pooled embedding depends on padding: {diff}");
}

#[test]
fn numpy_reference_agrees_with_python_nnsight() {
    // The two fixtures come from unrelated implementations (numpy float64 vs torch float32).
    let np = numpy_reference();
    let py = python_reference();
    let (n, p) = (&np["last_hidden_state"], &py["cases"]["plain_forward"]["values"]);
    assert_eq!(np["input_ids"], py["inputs"]["input_ids"]);
    assert_eq!(np["attention_mask"], py["inputs"]["attention_mask"]);
    assert_close("numpy vs python sum", f(&n["sum"]), f(&p["sum"]), REL, SUM_ABS);
    assert_all_close("numpy vs python row_sums", &floats(&n["row_sums"]), &floats(&p["row_sums"]), REL, SUM_ABS);
    assert_all_close("numpy vs python token0_first5", &floats(&n["token0_first5"]), &floats(&p["token0_first5"]), REL, 0.0);
}

#[test]
fn traced_run_of_two_invokes_equals_plain_forward() {
    let lm = minilm();
    let py = python_reference();
    let plain = lm.forward(&SENTENCES).unwrap();

    let mut tr = Tracer::new(&lm);
    let g0 = tr.invoke(SENTENCES[0]);
    let g1 = tr.invoke(SENTENCES[1].to_string());
    let out0 = tr.output(g0, 0, || Ok(&lm));
    let out1 = tr.output(g1, 0, || Ok(&lm));
    let l2 = tr.output(g0, 0, || Ok(&lm.encoder.layer[2]));
    let l2b = tr.output(g1, 0, || Ok(&lm.encoder.layer[2]));
    let saved = (tr.save(out0), tr.save(out1), tr.save(l2), tr.save(l2b));
    let (o0, o1, h2a, h2b) = tr.finish(saved).unwrap();

    // Each invoke sees its own row of the batch padded to the longest sentence of the trace.
    assert_eq!(o0.size(), [1, 14, 384]);
    assert_eq!(o1.size(), [1, 14, 384]);
    let traced = Tensor::cat(&[o0, o1], 0);
    assert!(traced.equal(&plain), "traced output differs from plain forward");

    let v = &py["cases"]["save_layer"]["values"];
    let h2 = Tensor::cat(&[&h2a, &h2b], 0);
    assert_close("save_layer sum", sum(&h2), f(&v["sum"]), REL, SUM_ABS);
    assert_close("save_layer mean_abs", h2.abs().mean(Kind::Double).double_value(&[]), f(&v["mean_abs"]), REL, 0.0);
    assert_close("save_layer row0 sum", sum(&h2a), f(&v["row0_only"]["sum"]), REL, SUM_ABS);
}

#[test]
fn language_model_input_errors() {
    let lm = minilm();
    assert!(matches!(lm.tokenize(&[]), Err(Error::Input(_))));
    assert!(matches!(lm.forward(&[]), Err(Error::Input(_))));

    let mut tr = Tracer::new(&lm);
    tr.invoke(Vec::<String>::new());
    let err = tr.finish(()).unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err}");

    let long = "word ".repeat(600);
    let err = lm.forward(&[long.as_str()]).unwrap_err();
    assert!(matches!(err, Error::Input(_)) && err.to_string().contains("512"), "{err}");

    // Several sentences in one invoke: one row each.
    let mut tr = Tracer::new(&lm);
    let g = tr.invoke(SENTENCES);
    let out = tr.output(g, 0, || Ok(&lm));
    let saved = tr.save(out);
    assert_eq!(tr.finish(saved).unwrap().size(), [2, 14, 384]);
}

#[test]
fn module_paths_are_checkpoint_key_prefixes() {
    let lm = minilm();
    assert_eq!(lm.path(), "");
    assert_eq!(lm.embeddings.path(), "embeddings");
    assert_eq!(lm.embeddings.LayerNorm.path(), "embeddings.LayerNorm");
    assert_eq!(lm.encoder.layer.len(), 6);
    let l3 = &lm.encoder.layer[3];
    assert_eq!(l3.path(), "encoder.layer.3");
    assert_eq!(l3.attention.self_.query.path(), "encoder.layer.3.attention.self.query");
    assert_eq!(l3.attention.output_.LayerNorm.path(), "encoder.layer.3.attention.output.LayerNorm");
    assert_eq!(l3.intermediate.dense.path(), "encoder.layer.3.intermediate.dense");
    assert_eq!(l3.output_.dense.path(), "encoder.layer.3.output.dense");
    assert_eq!(lm.config.hidden_size, 384);
}

// ---------------------------------------------------------------- bad checkpoints

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("nnsight-minilm-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny_config() -> Value {
    json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 20, "hidden_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
        "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "pad_token_id": 0
    })
}

/// A randomly initialised tiny BERT and its variables, sorted by name.
fn tiny_model() -> (nn::VarStore, Bert, Vec<(String, Tensor)>) {
    let vs = nn::VarStore::new(Device::Cpu);
    let config: BertConfig = serde_json::from_value(tiny_config()).unwrap();
    let bert = Bert::new(&vs.root(), &config).unwrap();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    (vs, bert, vars)
}

fn write_checkpoint(dir: &Path, config: &Value, tensors: &[(String, Tensor)]) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    Tensor::write_safetensors(tensors, dir.join("model.safetensors")).unwrap();
}

fn tiny_input() -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::from_slice(&[1i64, 5, 7, 2, 9, 3, 0, 0]).view([2, 4]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 0, 0]).view([2, 4]);
    (ids, mask, Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu)))
}

fn load_err(dir: &Path) -> Error {
    match Bert::load(dir, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn tiny_checkpoint_round_trips_with_and_without_bert_prefix() {
    let (_vs, bert, vars) = tiny_model();
    let expected = tch::no_grad(|| bert.forward(tiny_input()));
    assert_eq!(vars.len(), 5 + 16, "3 embeddings + LayerNorm (5 tensors) and 16 per layer");
    for prefix in ["", "bert."] {
        let dir = TempDir::new("roundtrip");
        let named: Vec<(String, Tensor)> = vars.iter().map(|(k, t)| (format!("{prefix}{k}"), t.shallow_clone())).collect();
        write_checkpoint(dir.path(), &tiny_config(), &named);
        let loaded = Bert::load(dir.path(), Device::Cpu).unwrap();
        let got = tch::no_grad(|| loaded.forward(tiny_input()));
        assert!(got.equal(&expected), "prefix {prefix:?}: loaded model computes something else");
    }
}

#[test]
fn missing_model_folder_is_an_io_error_naming_it() {
    let dir = TempDir::new("missing");
    let missing = dir.path().join("no-such-model");
    let err = load_err(&missing);
    let msg = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{msg}");
    assert!(msg.contains("no-such-model"), "{msg}");
    let err = LanguageModel::<Bert>::from_pretrained(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("no-such-model"), "{err}");

    // A folder without model.safetensors: the error names that file.
    write_checkpoint(dir.path(), &tiny_config(), &tiny_model().2);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn gpt2_config_is_refused_naming_file_and_model_type() {
    let dir = TempDir::new("gpt2");
    let config = json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 8, "n_layer": 1});
    write_checkpoint(dir.path(), &config, &tiny_model().2);
    let err = load_err(dir.path());
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, Error::Config { .. }), "{msg}");
    assert!(msg.contains("config.json"), "{msg}");
    assert!(msg.contains(r#"expected a BERT config (model_type "bert"), found model_type "gpt2""#), "{msg}");
}

#[test]
fn bad_config_values_are_config_errors() {
    for (field, value, needle) in [
        ("hidden_act", json!("mish"), "hidden_act"),
        ("num_attention_heads", json!(3), "num_attention_heads"),
        ("position_embedding_type", json!("relative_key"), "position_embedding_type"),
        ("hidden_size", json!("eight"), "hidden_size"),
    ] {
        let dir = TempDir::new("badcfg");
        let mut config = tiny_config();
        config[field] = value;
        write_checkpoint(dir.path(), &config, &tiny_model().2);
        let err = load_err(dir.path());
        let msg = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{msg}");
        assert!(msg.contains("config.json") && msg.contains(needle), "{field}: {msg}");
    }
}

#[test]
fn checkpoint_missing_a_key_is_refused_naming_file_and_key() {
    let dir = TempDir::new("missingkey");
    let key = "encoder.layer.0.attention.self.value.bias";
    let vars: Vec<(String, Tensor)> = tiny_model().2.into_iter().filter(|(k, _)| k != key).collect();
    write_checkpoint(dir.path(), &tiny_config(), &vars);
    let err = load_err(dir.path());
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(&err, Error::MissingWeight { key: k, .. } if k == key), "{msg}");
    assert!(msg.contains("model.safetensors") && msg.contains(key), "{msg}");
}

#[test]
fn wrongly_shaped_tensor_is_refused_naming_file_key_and_shapes() {
    let dir = TempDir::new("shape");
    let key = "encoder.layer.0.intermediate.dense.weight";
    let vars: Vec<(String, Tensor)> = tiny_model()
        .2
        .into_iter()
        .map(|(k, t)| if k == key { (k, Tensor::zeros([16, 4], (Kind::Float, Device::Cpu))) } else { (k, t) })
        .collect();
    write_checkpoint(dir.path(), &tiny_config(), &vars);
    let err = load_err(dir.path());
    let msg = err.to_string();
    eprintln!("{msg}");
    match &err {
        Error::WeightShape { key: k, expected, actual, .. } => {
            assert_eq!(k, key);
            assert_eq!(expected, &[16, 8]);
            assert_eq!(actual, &[16, 4]);
        }
        other => panic!("expected WeightShape, got {other}"),
    }
    assert!(msg.contains("model.safetensors") && msg.contains(key), "{msg}");

    // A broadcastable shape (which tch's VarStore::load would copy silently) is refused too.
    let key = "embeddings.LayerNorm.weight";
    let vars: Vec<(String, Tensor)> = tiny_model()
        .2
        .into_iter()
        .map(|(k, t)| if k == key { (k, Tensor::ones([1], (Kind::Float, Device::Cpu))) } else { (k, t) })
        .collect();
    write_checkpoint(dir.path(), &tiny_config(), &vars);
    assert!(matches!(load_err(dir.path()), Error::WeightShape { key: k, .. } if k == key));
}

#[test]
fn corrupt_safetensors_is_an_error_not_a_panic() {
    let dir = TempDir::new("corrupt");
    write_checkpoint(dir.path(), &tiny_config(), &tiny_model().2);
    std::fs::write(dir.path().join("model.safetensors"), b"not a safetensors file").unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}
