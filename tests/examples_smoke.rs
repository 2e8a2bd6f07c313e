//! Smoke test of `examples/logit_lens.rs` and `examples/ioi_patching.rs` on the tiny GPT-2,
//! Llama and GPT-NeoX of `fixtures/causal` (2 blocks, hidden 64, vocab 1000), no download: the test writes a
//! checkpoint folder into a temporary directory (copies of the fixture's `config.json` and
//! `model.safetensors`, and a `tokenizer.json`: word-level over "t0" .. "t999", id = number,
//! without a pad token), runs the examples' own `run` on it (the architecture comes from
//! `model_type`), and checks values computed apart from them: a plain forward pass without
//! hooks, and properties patching must have.

#[path = "../examples/logit_lens.rs"]
#[allow(dead_code)]
mod logit_lens;

#[path = "../examples/ioi_patching.rs"]
#[allow(dead_code)]
mod ioi_patching;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nnsight::models::gpt2::Gpt2;
use nnsight::models::gpt_neox::GptNeoX;
use nnsight::models::llama::Llama;
use nnsight::prelude::*;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::LanguageModel;

const PROMPT: &str = "t11 t402 t7 t93 t5 t250 t61";
/// IOI-shaped prompts for the tiny model: "{A} and {B} ..., {C} gave ... to" as word ids.
const TEMPLATE: &str = "t20 {IO} t30 {S} t40 t41 t42 {S} t50 t51 t52";

/// Fixture folders and their `model_type`.
const MODELS: [(&str, &str); 3] = [("gpt2", "gpt2"), ("llama", "llama"), ("pythia", "gpt_neox")];

/// A checkpoint folder for the examples: the tiny fixture `name` plus a word-level tokenizer.json.
fn tiny_checkpoint(name: &str, tag: &str) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name);
    let dir = std::env::temp_dir().join(format!("nnsight-examples-smoke-{}-{name}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(dir.join("tokenizer.json"), true).unwrap();
    dir
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Logits `[1, seq, vocab]` of a plain forward pass (no trace, no hooks) of the checkpoint.
fn plain_logits(name: &str, dir: &Path, prompt: &str) -> Tensor {
    match name {
        "gpt2" => LanguageModel::<Gpt2>::from_pretrained(dir).unwrap().forward(&[prompt]).unwrap(),
        "llama" => LanguageModel::<Llama>::from_pretrained(dir).unwrap().forward(&[prompt]).unwrap(),
        _ => LanguageModel::<GptNeoX>::from_pretrained(dir).unwrap().forward(&[prompt]).unwrap(),
    }
}

#[test]
fn logit_lens_last_layer_is_the_models_own_prediction() {
    for (name, model_type) in MODELS {
        check_lens(name, model_type);
    }
}

fn check_lens(name: &str, model_type: &str) {
    let dir = tiny_checkpoint(name, "lens");
    let png = dir.join("lens.png");
    let lens = logit_lens::run(&args(&[dir.to_str().unwrap(), PROMPT, png.to_str().unwrap()])).unwrap();
    let seq = PROMPT.split(' ').count();
    assert_eq!(lens.layers, vec!["emb", "0", "1"]);
    assert_eq!(lens.input, PROMPT.split(' ').collect::<Vec<_>>());
    assert!(lens.top_ids.iter().all(|r| r.len() == seq) && lens.probs.iter().flatten().all(|p| (0.0..=1.0).contains(p)));

    assert_eq!(lens.model_type, model_type);
    // Independent: a plain forward pass (no trace, no hooks) of the same prompt.
    let logits = plain_logits(name, &dir, PROMPT); // [1, seq, vocab]
    let probs = logits.softmax(-1, Kind::Double);
    let (p, ids) = probs.max_dim(-1, false);
    let want_ids: Vec<i64> = Vec::try_from(ids.get(0)).unwrap();
    let want_p: Vec<f64> = Vec::try_from(p.get(0)).unwrap();
    let last = lens.top_ids.len() - 1;
    assert_eq!(lens.top_ids[last], want_ids, "lens at the last block = argmax of the model's logits");
    let d = lens.probs[last].iter().zip(&want_p).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(d < 1e-5, "top probabilities differ by {d}");
    // The decoded top tokens are the ids' words.
    assert_eq!(lens.top_tokens[last], want_ids.iter().map(|i| format!("t{i}")).collect::<Vec<_>>());
    // Earlier layers read something else than the output (a random model's layers differ).
    assert_ne!(lens.top_ids[0], lens.top_ids[last]);

    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG was written");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ioi_patching_restores_the_clean_run_where_it_must() {
    for (name, model_type) in MODELS {
        check_ioi(name, model_type);
    }
}

fn check_ioi(name: &str, model_type: &str) {
    let dir = tiny_checkpoint(name, "ioi");
    let r = ioi_patching::run(&args(&[dir.to_str().unwrap(), "--io", "t5", "--s", "t7", "--template", TEMPLATE])).unwrap();
    assert_eq!(r.task.clean, "t20 t5 t30 t7 t40 t41 t42 t7 t50 t51 t52");
    assert_eq!(r.task.corrupt, "t20 t5 t30 t7 t40 t41 t42 t5 t50 t51 t52");
    assert_eq!((r.io, r.s), (5, 7));
    let seq = 11;
    let s2 = 7; // the position where the prompts differ
    assert_eq!(r.seq(), seq);
    assert_eq!(r.ld.len(), 2);
    assert!(r.ld.iter().all(|row| row.len() == seq + 3), "clean, corrupted, one per position, all");

    // Independent: the logit differences from plain forward passes.
    assert_eq!(r.model_type, model_type);
    let ld = |text: &str| {
        let l = plain_logits(name, &dir, text).to_kind(Kind::Double);
        l.double_value(&[0, -1, 5]) - l.double_value(&[0, -1, 7])
    };
    let (clean, corrupt) = (ld(&r.task.clean), ld(&r.task.corrupt));
    assert!((r.clean_ld - clean).abs() < 1e-5 && (r.corrupt_ld - corrupt).abs() < 1e-5);
    let gap = clean - corrupt;
    assert!(gap.abs() > 1e-3, "the corruption must move the metric for the checks below to mean anything: {gap}");

    for l in 0..2 {
        // Each layer's trace has its own clean and corrupted rows: the same values.
        assert!((r.ld[l][0] - clean).abs() < 1e-5 && (r.ld[l][1] - corrupt).abs() < 1e-5, "layer {l}");
        // Before S2 the two runs are the same (causal attention): patching there changes nothing.
        for p in 0..s2 {
            assert!(r.effect(l, Some(p)).abs() < 1e-4, "layer {l} position {p}: {}", r.effect(l, Some(p)));
        }
        // The whole residual stream of any layer, patched: the clean run exactly.
        let all = r.ld[l][2 + seq];
        assert!((all - clean).abs() < 1e-5, "{name} layer {l}: patched LD {all} vs clean {clean}");
        assert!((r.effect(l, None) - 1.0).abs() < 1e-4, "normalized effect 1");
    }
    // At the last block only the last position reaches the last logits: it restores everything,
    // the others nothing.
    assert!((r.effect(1, Some(seq - 1)) - 1.0).abs() < 1e-4);
    assert!((0..seq - 1).all(|p| r.effect(1, Some(p)).abs() < 1e-4), "{:?}", r.ld[1]);
    std::fs::remove_dir_all(&dir).ok();
}
