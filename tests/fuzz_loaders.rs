//! A fuzzer for the model loaders (issue 14): proptest over mutated `config.json` files,
//! safetensors headers and sharded indexes of the tiny GPT-2, Llama and BERT checkpoints, plus
//! random generation options. Not part of the normal test run (it is `#[ignore]`d, and not in
//! `.ci/run`); run it for a minute with
//!
//! ```text
//! NNSIGHT_FUZZ_SECS=60 cargo test --release --test fuzz_loaders -- --ignored --nocapture
//! ```
//!
//! (`NNSIGHT_FUZZ_SEED=<n>` repeats a run.) It runs in a child process under the same 1 GB
//! data cap as `hostile_inputs.rs`, and checks for every case:
//!
//! - loading returns `Ok` or `Err`: it never panics, never allocates past the cap, and no case
//!   takes more than 30 s (a watchdog aborts the run and prints the case);
//! - when only config fields were changed and the model loads, a forward pass on three tokens
//!   is `Ok` with finite logits, or an `Error::Input` (a sequence longer than a shrunk
//!   `max_position_embeddings`); never NaN, never a panic turned into `Error::Model`;
//! - generation with random `max_new_tokens`, temperature and top-k is `Ok` with ids inside
//!   the vocabulary, or an `Error::Input`.
//!
//! A failing case is shrunk by proptest and printed with its seed; it ends with a count of the
//! errors seen by kind.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::folders::{word_tokenizer, Folder};
use nnsight::models::causal::{CausalLm, CausalLmExt, KvCacheHandle, LoadOptions, Sampling};
use nnsight::models::gpt2::Gpt2;
use nnsight::models::llama::Llama;
use nnsight::tch::{Device, Tensor};
use nnsight::{Bert, Error, Hooked, LanguageModel};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug)]
enum Family {
    Gpt2,
    Llama,
    Bert,
}

/// One edit of the model folder.
#[derive(Clone, Debug)]
enum Mutation {
    /// Set a config field.
    Set(String, Value),
    /// Remove a config field.
    Remove(String),
    /// Edit entry `i % n` of the safetensors header.
    Entry(usize, EntryEdit),
    /// Overwrite the 8-byte header length.
    HeaderLen(u64),
    /// Cut the file to this fraction of its length.
    Truncate(f64),
    /// Overwrite a byte of the first 4 KB (the header).
    Byte(usize, u8),
    /// Shard the checkpoint and name `path` for entry `i % n` of the index.
    Shard(usize, String),
}

#[derive(Clone, Debug)]
enum EntryEdit {
    Shape(Vec<i64>),
    Dtype(String),
    Offsets(u64, u64),
    Drop,
}

#[derive(Clone, Debug)]
struct Case {
    family: Family,
    mutations: Vec<Mutation>,
    max_new_tokens: i64,
    temperature: Option<f64>,
    top_k: Option<i64>,
}

const FIELDS: &[&str] = &[
    "vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "n_positions", "max_position_embeddings",
    "type_vocab_size", "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "hidden_act", "activation_function", "eos_token_id", "bos_token_id", "pad_token_id",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
    "add_cross_attention", "model_type", "architectures", "position_embedding_type", "is_decoder",
];

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop_oneof![
            Just(0i64), Just(-1), Just(1), Just(2), Just(3), Just(4), Just(16), Just(64), Just(1000),
            Just(i64::MAX), Just(i64::MIN), Just(1 << 40), Just(10_000_000), 1i64..300, any::<i64>()
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just(0.0), Just(-1.0), Just(1e-300), Just(1e300), Just(0.5), Just(1e-6), Just(1e-45), Just(3.5e38),
            Just(1.0), -10.0f64..10.0, any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite())
        ]
        .prop_map(|f| json!(f)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        4 => number(),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => prop_oneof![Just("gpt2"), Just("llama"), Just("bert"), Just("silu"), Just("gelu"), Just("1000"), Just("")]
            .prop_map(Value::from),
    ];
    let rope = (
        prop_oneof![Just("default"), Just("linear"), Just("llama3"), Just("yarn"), Just("dynamic")],
        btree_map(
            prop_oneof![Just("factor"), Just("low_freq_factor"), Just("high_freq_factor"),
                        Just("original_max_position_embeddings"), Just("rope_theta"), Just("partial_rotary_factor")]
            .prop_map(String::from),
            number(),
            0..6,
        ),
    )
        .prop_map(|(ty, mut m)| {
            m.insert("rope_type".into(), Value::from(ty));
            Value::Object(m.into_iter().collect())
        });
    prop_oneof![
        6 => leaf.clone(),
        1 => rope,
        1 => vec(leaf, 0..4).prop_map(Value::Array),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let field = prop::sample::select(FIELDS).prop_map(String::from);
    let entry = prop_oneof![
        vec(prop_oneof![Just(0i64), Just(1), Just(64), Just(1000), Just(-1), Just(1 << 40), any::<i64>()], 0..4)
            .prop_map(EntryEdit::Shape),
        prop_oneof![Just("F32"), Just("F16"), Just("BF16"), Just("F64"), Just("I32"), Just("I64"), Just("BOOL"), Just("U8"),
                    Just("F8_E4M3"), Just("Q4"), Just("")]
            .prop_map(|d| EntryEdit::Dtype(d.into())),
        (prop_oneof![Just(0u64), 0u64..1_000_000, any::<u64>()], prop_oneof![Just(0u64), 0u64..1_000_000, any::<u64>()])
            .prop_map(|(a, b)| EntryEdit::Offsets(a, b)),
        Just(EntryEdit::Drop),
    ];
    prop_oneof![
        8 => (field.clone(), value()).prop_map(|(f, v)| Mutation::Set(f, v)),
        1 => field.prop_map(Mutation::Remove),
        3 => (any::<usize>(), entry).prop_map(|(i, e)| Mutation::Entry(i, e)),
        1 => prop_oneof![Just(0u64), Just(1), 2u64..100_000, Just(u64::MAX), Just(1 << 40), any::<u64>()].prop_map(Mutation::HeaderLen),
        1 => (0.0f64..1.0).prop_map(Mutation::Truncate),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Byte(p, b)),
        1 => (any::<usize>(), prop_oneof![Just("/dev/zero"), Just("../x.safetensors"), Just(""), Just("."), Just("sub/.."),
                                          Just("model-00001-of-00002.safetensors"), Just("/etc/passwd"), Just("config.json")])
            .prop_map(|(i, p)| Mutation::Shard(i, p.into())),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(Family::Gpt2), Just(Family::Llama), Just(Family::Bert)],
        vec(mutation(), 1..4),
        prop_oneof![Just(1i64), 1i64..8, Just(0), Just(-1), Just(i64::MAX), Just(200)],
        prop::option::of(prop_oneof![Just(1e-300), Just(5e-324), Just(0.0), Just(-1.0), Just(1e300), Just(f64::NAN), 0.01f64..5.0]),
        prop::option::of(prop_oneof![Just(0i64), Just(1), 1i64..2000, Just(i64::MAX), Just(-3)]),
    )
        .prop_map(|(family, mutations, max_new_tokens, temperature, top_k)| Case { family, mutations, max_new_tokens, temperature, top_k })
}

/// Applies the mutations to a fresh copy of the family's fixture.
fn folder(case: &Case) -> Folder {
    let f = match case.family {
        Family::Gpt2 => Folder::copy_of("gpt2"),
        Family::Llama => Folder::copy_of("llama"),
        Family::Bert => Folder::tiny_bert(),
    };
    let file = f.file("model.safetensors");
    for m in &case.mutations {
        let mut bytes = std::fs::read(&file).unwrap_or_default();
        match m {
            Mutation::Set(k, v) => f.set(k, v.clone()),
            Mutation::Remove(k) => f.edit_config(|c| {
                c.remove(k);
            }),
            Mutation::Entry(i, edit) if bytes.len() >= 8 => {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let Some(header) = bytes.get(8..8 + n) else { continue };
                let Ok(Value::Object(mut h)) = serde_json::from_slice::<Value>(header) else { continue };
                let keys: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
                let key = &keys[i % keys.len()];
                match edit {
                    EntryEdit::Shape(s) => h[key]["shape"] = json!(s),
                    EntryEdit::Dtype(d) => h[key]["dtype"] = json!(d),
                    EntryEdit::Offsets(a, b) => h[key]["data_offsets"] = json!([a, b]),
                    EntryEdit::Drop => {
                        h.remove(key);
                    }
                }
                let text = Value::Object(h).to_string();
                let mut out = (text.len() as u64).to_le_bytes().to_vec();
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(&bytes[8 + n..]);
                std::fs::write(&file, out).unwrap();
            }
            Mutation::HeaderLen(len) if bytes.len() >= 8 => {
                bytes[..8].copy_from_slice(&len.to_le_bytes());
                std::fs::write(&file, bytes).unwrap();
            }
            Mutation::Truncate(frac) => {
                bytes.truncate((bytes.len() as f64 * frac) as usize);
                std::fs::write(&file, bytes).unwrap();
            }
            Mutation::Byte(pos, b) if !bytes.is_empty() => {
                let at = pos % bytes.len().min(4096);
                bytes[at] = *b;
                std::fs::write(&file, bytes).unwrap();
            }
            Mutation::Shard(i, path) if file.exists() && Tensor::read_safetensors(&file).is_ok() => {
                let mut map = f.shard();
                let keys: Vec<String> = map.keys().cloned().collect();
                map.insert(keys[i % keys.len()].clone(), json!(path));
                f.write_index(&map);
            }
            _ => {}
        }
    }
    f
}

/// Counts of outcomes, printed at the end.
type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

fn count(tally: &Tally, what: &str) {
    *tally.lock().unwrap().entry(what.to_string()).or_default() += 1;
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::Io { .. } => "Io",
        Error::Config { .. } => "Config",
        Error::MissingWeight { .. } => "MissingWeight",
        Error::WeightShape { .. } => "WeightShape",
        Error::WeightDtype { .. } => "WeightDtype",
        Error::Load { .. } => "Load",
        Error::Input(_) => "Input",
        Error::Model(_) => "Model",
        _ => "other",
    }
}

fn exercise_causal<M: CausalLm>(model: M, case: &Case, config_only: bool, tally: &Tally) -> Result<(), TestCaseError> {
    let model = Hooked::with_path("", model);
    let vocab = model.vocab_size().min(1000);
    let ids = Tensor::from_slice(&[1 % vocab, 5 % vocab, 7 % vocab]).view([1, 3]);
    let mask = ids.ones_like();
    match model.forward(&ids, &mask, &KvCacheHandle::disabled()) {
        Ok(logits) => {
            let finite = logits.isfinite().all().int64_value(&[]) == 1;
            prop_assert!(finite || !config_only, "config-only change gave non-finite logits");
            count(tally, "forward ok");
        }
        Err(e @ Error::Input(_)) => count(tally, &format!("forward {}", kind(&e))),
        Err(e) => prop_assert!(!config_only, "forward failed after a config-only change loaded: {e}"),
    }
    let sampling = match (case.temperature, case.top_k) {
        (None, None) => Sampling::Greedy,
        (t, k) => Sampling::Sample { temperature: t.unwrap_or(1.0), top_k: k, seed: 1 },
    };
    match model.generate(&ids, &mask, case.max_new_tokens, &sampling, None) {
        Ok(out) => {
            let (lo, hi) = (out.min().int64_value(&[]), out.max().int64_value(&[]));
            prop_assert!(lo >= 0 && hi < model.vocab_size(), "generated ids {lo}..{hi} outside the vocabulary");
            count(tally, "generate ok");
        }
        Err(e @ Error::Input(_)) => count(tally, &format!("generate {}", kind(&e))),
        Err(e) => prop_assert!(!config_only, "generation failed after a config-only change loaded: {e}"),
    }
    Ok(())
}

fn check(case: &Case, tally: &Tally) -> Result<(), TestCaseError> {
    let f = folder(case);
    let config_only = case.mutations.iter().all(|m| matches!(m, Mutation::Set(..) | Mutation::Remove(_)));
    let opts = LoadOptions::default();
    let loaded = match case.family {
        Family::Gpt2 => Gpt2::load_with(&f.dir(), &opts).map(|m| exercise_causal(m, case, config_only, tally)),
        Family::Llama => Llama::load_with(&f.dir(), &opts).map(|m| exercise_causal(m, case, config_only, tally)),
        Family::Bert => Bert::load(&f.dir(), Device::Cpu).map(|bert| {
            let lm = LanguageModel::from_parts(bert, word_tokenizer(20), Device::Cpu).unwrap();
            match lm.forward(&["t1 t5 t7"]) {
                Ok(h) => {
                    prop_assert!(h.isfinite().all().int64_value(&[]) == 1 || !config_only, "config-only change gave non-finite hidden states");
                    count(tally, "forward ok");
                }
                Err(e @ Error::Input(_)) => count(tally, &format!("forward {}", kind(&e))),
                Err(e) => prop_assert!(!config_only, "forward failed after a config-only change loaded: {e}"),
            }
            Ok(())
        }),
    };
    match loaded {
        Ok(r) => {
            count(tally, "loaded");
            r
        }
        Err(e) => {
            count(tally, &format!("load {}", kind(&e)));
            Ok(())
        }
    }
}

#[test]
#[ignore = "fuzzer: run with `-- --ignored` (NNSIGHT_FUZZ_SECS, default 60)"]
fn fuzz_loaders() {
    let secs: u64 = std::env::var("NNSIGHT_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    common::isolate::run_for("fuzz_loaders", Duration::from_secs(secs + 120), || fuzz(Duration::from_secs(secs)));
}

fn fuzz(budget: Duration) {
    let seed: u64 = std::env::var("NNSIGHT_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("fuzz_loaders: seed {seed} (NNSIGHT_FUZZ_SEED={seed} repeats this run), {budget:?}");
    let tally: Tally = Arc::default();
    let current: Arc<Mutex<(Instant, String)>> = Arc::new(Mutex::new((Instant::now(), String::new())));
    let watch = Arc::clone(&current);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let (since, case) = watch.lock().unwrap().clone();
        if since.elapsed() > Duration::from_secs(30) {
            eprintln!("fuzz_loaders: a case ran for more than 30 s (a hang?): {case}");
            std::process::abort();
        }
    });
    let start = Instant::now();
    let mut cases = 0u64;
    let mut batch = 0u64;
    while start.elapsed() < budget {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..16].copy_from_slice(&batch.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let config = Config { cases: 16, failure_persistence: None, max_shrink_iters: 200, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, rng);
        let result = runner.run(&case(), |c| {
            *current.lock().unwrap() = (Instant::now(), format!("{c:?}"));
            check(&c, &tally)
        });
        if let Err(e) = result {
            panic!("fuzz_loaders: seed {seed}, batch {batch}: {e}");
        }
        cases += 16;
        batch += 1;
    }
    eprintln!("fuzz_loaders: {cases} cases in {:.0} s, no failure; outcomes:", start.elapsed().as_secs_f64());
    for (what, n) in tally.lock().unwrap().iter() {
        eprintln!("fuzz_loaders:   {what}: {n}");
    }
}
