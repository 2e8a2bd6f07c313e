//! Mistral (with and without `sliding_window`) and Qwen2 / Qwen3 sliding-window layers against
//! Hugging Face transformers, on the tiny random checkpoints made by
//! `fixtures/causal/make_fixtures_mistral.py` (transformers 5.24, eager attention, float32;
//! 2 layers, hidden 64, 4 query heads / 2 key-value heads, vocab 1000, window 4; see its
//! docstring):
//!
//! - `mistral`: sliding_window 4 on both layers, head_dim 32 (not 64 / 4), untied;
//! - `mistral_nowindow`: sliding_window null, tied;
//! - `qwen2_window`: use_sliding_window, window 4, max_window_layers 1 (layer 0 full, layer 1
//!   sliding).
//!
//! The fixture prompts (up to 7 tokens) plus 10 generated tokens exceed the window. Each fixture
//! has `expected.json` and `logits.safetensors` (see make_fixtures_part2.py). Loading errors are
//! checked on altered copies written into a temporary folder.

use std::collections::HashMap;

use nnsight::models::causal::{AttnPoint, CausalLm, CausalLmExt, Decoder, KvCacheHandle, LoadOptions, Sampling};
use nnsight::models::llama::{Llama, LlamaDecoderLayer};
use nnsight::models::mistral::{Mistral, MistralConfig};
use nnsight::models::qwen2::{Qwen2, Qwen2Config};
use nnsight::models::qwen3::Qwen3;
use nnsight::prelude::*;
use nnsight::tch::IndexOp;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{Error, LanguageModel, TextModel};
use serde_json::Value;

mod common;
use common::decoder_fixtures::*;

// ----- 5. the window in the attention probabilities ----------------------------------------------

/// Tokenized to 9 ids (positions 0..8): more than twice the window.
const LONG_PROMPT: &str = "t5 t17 t230 t9 t41 t8 t77 t3 t600";
/// The fixtures' window.
const WINDOW: i64 = 4;

/// `[1, 1, s, s]`: key `j` visible from query `i` (`j <= i`, and `j > i - window` if sliding).
fn visible(s: i64, window: Option<i64>) -> Tensor {
    let i = Tensor::arange(s, (Kind::Int64, Device::Cpu));
    let (q, k) = (i.unsqueeze(1), i.unsqueeze(0));
    let causal = k.le_tensor(&q);
    let keep = match window {
        Some(w) => causal.logical_and(&k.gt_tensor(&(&q - w))),
        None => causal,
    };
    keep.view([1, 1, s, s])
}

/// The `probs` hook point of each layer on a 9-token prompt: exactly 0 outside the layer's
/// window (or the causal triangle for a full layer), > 0 inside it. `windows[l]`: layer `l`'s.
fn check_probs_window<M: Decoder + TextModel>(name: &str, windows: &[Option<i64>]) {
    let model = lm::<M>(name);
    let probs: Vec<Tensor> = trace!(model, LONG_PROMPT, {
        vec![model.attn_point(0, AttnPoint::Probs).output.save(), model.attn_point(1, AttnPoint::Probs).output.save()]
    })
    .unwrap();
    for (l, (p, w)) in probs.iter().zip(windows).enumerate() {
        let s = 9;
        assert_eq!(p.size(), vec![1, 4, s, s], "{name} layer {l}");
        let keep = visible(s, *w).expand_as(p);
        let outside = p.masked_select(&keep.logical_not()).abs().max().double_value(&[]);
        let inside = p.masked_select(&keep).min().double_value(&[]);
        assert_eq!(outside, 0.0, "{name} layer {l} (window {w:?}): weight {outside} outside the window");
        assert!(inside > 0.0, "{name} layer {l} (window {w:?}): zero weight inside the window");
        // Each row sums to 1 over exactly min(i + 1, window) keys.
        let counts = keep.sum_dim_intlist([-1].as_slice(), false, Kind::Int64).i((0, 0));
        let want: Vec<i64> = (0..s).map(|i| w.map_or(i + 1, |w| (i + 1).min(w))).collect();
        assert_eq!(Vec::<i64>::try_from(&counts).unwrap(), want);
        let sums = p.sum_dim_intlist([-1].as_slice(), false, Kind::Double);
        assert!(diff(&sums, &sums.ones_like()) < 1e-5, "{name} layer {l}: probs rows do not sum to 1");
        eprintln!("{name} layer {l} (window {w:?}): probs 0 outside ({outside}), min inside {inside:.2e}");
    }
}

// ===== Mistral ==================================================================================

#[test]
fn mistral_logits_match_transformers() {
    check_logits::<Mistral>("mistral");
    check_logits::<Mistral>("mistral_nowindow");
}

#[test]
fn mistral_greedy_matches_transformers() {
    check_greedy::<Mistral>("mistral");
    check_greedy::<Mistral>("mistral_nowindow");
}

#[test]
fn mistral_padded_rows_and_kv_cache() {
    for name in ["mistral", "mistral_nowindow"] {
        check_padding::<Mistral>(name);
        check_cache::<Mistral>(name);
    }
}

#[test]
fn mistral_module_paths_and_decoder_view() {
    fn typed(m: &Mistral) -> &Vec<Hooked<LlamaDecoderLayer>> {
        &m.model.layers
    }
    for name in ["mistral", "mistral_nowindow"] {
        check_paths::<Mistral>(
            name,
            &[
                ("model", "LlamaModel"),
                ("model.layers.0", "LlamaDecoderLayer"),
                ("model.layers.1.self_attn", "LlamaAttention"),
                ("model.layers.1.self_attn.o_proj", "Linear"),
                ("model.layers.0.mlp", "LlamaMlp"),
                ("model.norm", "RmsNorm"),
                ("lm_head", "LmHead"),
            ],
        );
        check_decoder::<Mistral>(name, typed);
    }
    // No biases anywhere; explicit head_dim 32 (4 heads × 32 = 128 ≠ hidden 64).
    let keys = weights(fixture("mistral").join("model.safetensors"));
    assert!(keys.keys().all(|k| !k.ends_with(".bias")));
    assert_eq!(keys["model.layers.0.self_attn.q_proj.weight"].size(), vec![128, 64]);
    let m = load::<Mistral>("mistral");
    assert_eq!(m.config.head_dim, Some(32));
    assert_eq!(m.model.layer_windows(), &[Some(4), Some(4)]);
    assert_eq!(load::<Mistral>("mistral_nowindow").model.layer_windows(), &[None, None]);
}

#[test]
fn mistral_probs_are_zero_outside_the_window() {
    check_probs_window::<Mistral>("mistral", &[Some(WINDOW), Some(WINDOW)]);
    check_probs_window::<Mistral>("mistral_nowindow", &[None, None]);
    // The window bites: the same checkpoint without it computes other logits past the window,
    // the same ones within it.
    let windowed = logits_of(&load::<Mistral>("mistral"), "mistral");
    let dir = config_altered("mistral", |c| {
        c.insert("sliding_window".into(), Value::Null);
    });
    let full = logits_of(&Mistral::from_pretrained(&dir).unwrap(), "mistral");
    let d_long = diff(&windowed.i((0, WINDOW..)), &full.i((0, WINDOW..)));
    let d_short = diff(&windowed.i((0, ..WINDOW)), &full.i((0, ..WINDOW)));
    assert!(d_long > 1e-3 && d_short < 1e-6, "mistral: window on/off: past it {d_long}, within it {d_short}");
    // A missing `sliding_window` key is transformers' default 4096 (wider than any prompt here).
    let dir = config_altered("mistral", |c| {
        c.remove("sliding_window");
    });
    let m = Mistral::from_pretrained(&dir).unwrap();
    assert_eq!(m.config.sliding_window, Some(4096));
    assert!(diff(&logits_of(&m, "mistral"), &full) < 1e-6);
    eprintln!("mistral: window off changes the logits past it by {d_long:.2e}, within it by {d_short:.1e}");
}

#[test]
fn mistral_bad_input_is_refused() {
    check_bad_weights::<Mistral>(
        "mistral",
        &["model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"],
        "model.layers.0.self_attn.k_proj.weight",
    );
    for (key, value) in [("sliding_window", Value::from(0)), ("sliding_window", Value::from(-3))] {
        let dir = config_altered("mistral", |c| {
            c.insert(key.into(), value.clone());
        });
        let m = config_error::<Mistral>(&dir);
        assert!(m.contains("sliding_window"), "{m}");
    }
    let dir = config_altered("mistral", |c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    let m = config_error::<Mistral>(&dir);
    assert!(m.contains("num_key_value_heads") && m.contains("num_attention_heads"), "{m}");
    let dir = config_altered("mistral", |c| {
        c.insert("head_dim".into(), 31.into());
    });
    assert!(config_error::<Mistral>(&dir).contains("head_dim"));
    let dir = config_altered("mistral", |c| {
        c.insert("sliding_window".into(), "four".into());
    });
    assert!(config_error::<Mistral>(&dir).contains("sliding_window"));
    // Another family's folder is refused by model_type, and Mistral's by the others.
    let err = Mistral::load_with(&fixture("llama"), &LoadOptions::default()).map(drop).unwrap_err();
    assert!(matches!(err, Error::Config { ref message, .. } if message.contains("mistral")), "{err}");
    let err = Llama::load_with(&fixture("mistral"), &LoadOptions::default()).map(drop).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    // The config validated when built by hand too.
    let bad = MistralConfig { sliding_window: Some(0), ..MistralConfig::default() };
    assert!(bad.validate().unwrap_err().contains("sliding_window"));
    let vs = nnsight::tch::nn::VarStore::new(Device::Cpu);
    let tiny = MistralConfig { num_hidden_layers: 0, vocab_size: 10, hidden_size: 8, num_attention_heads: 2, num_key_value_heads: Some(3), ..MistralConfig::default() };
    assert!(matches!(Mistral::new(&vs.root(), &tiny), Err(Error::Config { .. })));
}

// ===== Qwen2 with sliding layers ==================================================================

#[test]
fn qwen2_window_logits_and_greedy_match_transformers() {
    check_logits::<Qwen2>("qwen2_window");
    check_greedy::<Qwen2>("qwen2_window");
}

#[test]
fn qwen2_window_padded_rows_and_kv_cache() {
    check_padding::<Qwen2>("qwen2_window");
    check_cache::<Qwen2>("qwen2_window");
}

#[test]
fn qwen2_window_module_paths_and_decoder_view() {
    fn typed(m: &Qwen2) -> &Vec<Hooked<LlamaDecoderLayer>> {
        &m.model.layers
    }
    check_paths::<Qwen2>("qwen2_window", &[("model.layers.1.self_attn.q_proj", "Linear"), ("lm_head", "LmHead")]);
    check_decoder::<Qwen2>("qwen2_window", typed);
    // layer_types ["full_attention", "sliding_attention"] as transformers 5 wrote them.
    assert_eq!(load::<Qwen2>("qwen2_window").model.layer_windows(), &[None, Some(4)]);
}

#[test]
fn qwen2_window_probs_are_zero_outside_the_window() {
    check_probs_window::<Qwen2>("qwen2_window", &[None, Some(WINDOW)]);
}

#[test]
fn qwen2_window_configs_resolve_as_transformers() {
    let windows = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| -> Vec<Option<i64>> {
        let dir = config_altered("qwen2_window", |c| edit(c));
        Qwen2::from_pretrained(&dir).unwrap().model.layer_windows().to_vec()
    };
    // Without layer_types: layers max_window_layers.. slide when use_sliding_window.
    assert_eq!(windows(&|c| { c.remove("layer_types"); }), vec![None, Some(4)]);
    assert_eq!(windows(&|c| { c.remove("layer_types"); c.insert("max_window_layers".into(), 0.into()); }), vec![Some(4), Some(4)]);
    assert_eq!(windows(&|c| { c.remove("layer_types"); c.insert("max_window_layers".into(), 2.into()); }), vec![None, None]);
    assert_eq!(windows(&|c| { c.remove("layer_types"); c.insert("use_sliding_window".into(), false.into()); }), vec![None, None]);
    // layer_types rules over max_window_layers.
    assert_eq!(
        windows(&|c| { c.insert("layer_types".into(), serde_json::json!(["sliding_attention", "full_attention"])); }),
        vec![Some(4), None]
    );
    // Refused, naming the key.
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("sliding_window", Box::new(|c| { c.insert("sliding_window".into(), 0.into()); })),
        ("layer_types[1]", Box::new(|c| { c.insert("use_sliding_window".into(), false.into()); })),
        ("layer_types[1]", Box::new(|c| { c.insert("sliding_window".into(), Value::Null); })),
        ("layer_types[0]", Box::new(|c| { c.insert("layer_types".into(), serde_json::json!(["chunked_attention", "full_attention"])); })),
        ("layer_types", Box::new(|c| { c.insert("layer_types".into(), serde_json::json!(["full_attention"])); })),
        ("num_key_value_heads", Box::new(|c| { c.insert("num_key_value_heads".into(), 3.into()); })),
    ];
    for (key, edit) in cases {
        let m = config_error::<Qwen2>(&config_altered("qwen2_window", |c| edit(c)));
        assert!(m.contains(key), "expected `{key}` in: {m}");
    }
    let bad = Qwen2Config { use_sliding_window: true, sliding_window: Some(0), ..Qwen2Config::default() };
    assert!(bad.validate().unwrap_err().contains("sliding_window"));
}

#[test]
fn qwen2_window_bad_weights_are_errors() {
    check_bad_weights::<Qwen2>(
        "qwen2_window",
        &["model.layers.1.self_attn.k_proj.bias", "model.layers.0.post_attention_layernorm.weight"],
        "model.layers.1.self_attn.v_proj.weight",
    );
}

// ===== Qwen3 with sliding layers ==================================================================

/// The `qwen3` checkpoint (make_fixtures_part2.py) with `use_sliding_window`, window 4 and
/// `max_window_layers` 1: layer 1 slides. Same code path as Qwen2's (checked against
/// transformers above); here: the windows resolve, layer 1's probs are 0 outside the window
/// and layer 0's are not, the logits within the window are the full-attention ones and differ
/// past it, padded rows = solo and the KV cache = the full pass.
#[test]
fn qwen3_sliding_window_layers() {
    let dir = config_altered("qwen3", |c| {
        c.remove("layer_types");
        c.insert("use_sliding_window".into(), true.into());
        c.insert("sliding_window".into(), 4.into());
        c.insert("max_window_layers".into(), 1.into());
    });
    let windowed = Qwen3::from_pretrained(&dir).unwrap();
    assert_eq!(windowed.model.layer_windows, vec![None, Some(4)]);
    let full = logits_of(&load::<Qwen3>("qwen3"), "qwen3");
    let got = logits_of(&windowed, "qwen3");
    let d_long = diff(&got.i((0, WINDOW..)), &full.i((0, WINDOW..)));
    let d_short = diff(&got.i((0, ..WINDOW)), &full.i((0, ..WINDOW)));
    assert!(d_long > 1e-3 && d_short < 1e-6, "qwen3: window on/off: past it {d_long}, within it {d_short}");

    // Probs through a LanguageModel over the altered folder.
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let wl = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let model = LanguageModel::from_parts(Qwen3::load_with(&dir, &LoadOptions::default()).unwrap(), tok, Device::Cpu).unwrap();
    let probs: Vec<Tensor> = trace!(model, LONG_PROMPT, {
        vec![model.attn_point(0, AttnPoint::Probs).output.save(), model.attn_point(1, AttnPoint::Probs).output.save()]
    })
    .unwrap();
    for (l, w) in [(0usize, None), (1, Some(WINDOW))] {
        let keep = visible(9, w).expand_as(&probs[l]);
        assert_eq!(probs[l].masked_select(&keep.logical_not()).abs().max().double_value(&[]), 0.0, "qwen3 layer {l}");
        assert!(probs[l].masked_select(&keep).min().double_value(&[]) > 0.0, "qwen3 layer {l}");
    }
    // KV cache and padding: cached greedy = a loop of full passes; a padded row = its solo run.
    let e = expected("qwen3");
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let none = KvCacheHandle::disabled();
    let generated = windowed.generate(&input, &mask, 10, &Sampling::Greedy, None).unwrap();
    let (mut seq, mut m) = (input.shallow_clone(), mask.shallow_clone());
    for _ in 0..10 {
        let next = windowed.forward(&seq, &m, &none).unwrap().i((.., -1)).argmax(-1, true);
        seq = Tensor::cat(&[&seq, &next], 1);
        m = Tensor::cat(&[&m, &next.ones_like()], 1);
    }
    assert!(generated.equal(&seq), "qwen3 window: generate (KV cache) != full-forward greedy");
    let batch = windowed.forward(&seq, &m, &none).unwrap();
    let solo = windowed.forward(&seq.i((1..2, 4..)), &m.i((1..2, 4..)), &none).unwrap();
    let d = diff(&solo, &batch.i((1..2, 4..)));
    assert!(d < TOL, "qwen3 window: padded row differs from its solo run by {d}");
    eprintln!("qwen3 window: past it {d_long:.2e}, within {d_short:.1e}; padded vs solo {d:.2e}; cached greedy = full");
}
