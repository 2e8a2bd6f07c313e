//! Gemma 2 and Gemma 3 (text) against Hugging Face transformers, on tiny random checkpoints made
//! by `fixtures/causal/make_fixtures_gemma.py` (3 layers, hidden 64, vocab 1000, 4 query and 2
//! key/value heads of 16, tied embeddings, `query_pre_attn_scalar` 8, sliding window 4;
//! Gemma 2: layers sliding/full/sliding, attention soft-cap 5, final soft-cap 4; Gemma 3: layers
//! sliding/sliding/full, q_norm/k_norm, rope base 1000 with linear factor 2 for full layers and
//! 100 for sliding ones; transformers 5.24, eager attention, float32). The fixture prompts (up
//! to 7 tokens) plus 10 generated tokens exceed the window. Hand computations read the weights
//! straight from the safetensors file. Loading errors are checked on altered copies written into
//! a temporary folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use nnsight::models::causal::{AttnPoint, CausalLm, CausalLmExt, Decoder, Eos, KvCacheHandle, LoadOptions, Sampling};
use nnsight::models::gemma2::Gemma2;
use nnsight::models::gemma3::Gemma3;
use nnsight::models::llama::LayerInput;
use nnsight::prelude::*;
use nnsight::tch::IndexOp;
use nnsight::{Error, HookModule, LanguageModel, ModuleTree, TextModel};
use serde_json::Value;

mod common;
use common::decoder_fixtures::*;

/// Tolerance on logits against transformers (f32, max abs over every compared entry).
const TOL: f64 = 1e-5;
/// Tolerance between a padded row and its solo run, and between cached and full passes.
const SOLO_TOL: f64 = 1e-5;
/// Tolerance between the model and a hand computation (f32).
const HAND_TOL: f64 = 1e-5;
/// The sliding window of both fixtures.
const WINDOW: i64 = 4;
/// Six tokens: more than the window.
const PROMPT: &str = "t5 t17 t230 t9 t41 t8";

/// The checkpoint's tensors by key, read straight from the safetensors file.
fn weights(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(name).join("model.safetensors")).unwrap().into_iter().collect()
}

// ----- 1. logits -------------------------------------------------------------------------

/// Logits of the fixture's left-padded batch against transformers: every real position's first
/// 8 logits, the picked ids and the max, and the last position's whole vector, within [`TOL`];
/// the vocabulary sums within 1e-3 (transformers summed 1000 f32 terms of |sum| up to ~2000 in
/// f32: its own rounding is ~1e-4; causal_models.rs allows the same). Returns the largest entry
/// difference.
fn check_logits<M: CausalLm>(name: &str) -> f64 {
    let model = load::<M>(name);
    let e = expected(name);
    let logits = model.forward(&ids(&e["input_ids"]), &ids(&e["attention_mask"]), &KvCacheHandle::disabled()).unwrap();
    let picked: Vec<i64> = serde_json::from_value(e["picked_ids"].clone()).unwrap();
    let (mut worst, mut worst_sum) = (0.0f64, 0.0f64);
    for (r, row) in e["logits"]["rows"].as_array().unwrap().iter().enumerate() {
        for p in row["positions"].as_array().unwrap() {
            let pos = p["position"].as_i64().unwrap();
            let v = logits.i((r as i64, pos));
            let vals = vec_of(&v);
            let d = [
                max_diff(&vals[..8], &floats(&p["first"])),
                max_diff(&picked.iter().map(|&i| vals[i as usize]).collect::<Vec<_>>(), &floats(&p["picked"])),
                (vals.iter().cloned().fold(f64::MIN, f64::max) - p["max"].as_f64().unwrap()).abs(),
            ];
            let dmax = d.iter().cloned().fold(0.0, f64::max);
            assert!(dmax < TOL, "{name} row {r} position {pos}: differences {d:?}");
            let (sum, abs_sum): (f64, f64) = (vals.iter().sum(), vals.iter().map(|x| x.abs()).sum());
            let ds = (sum - p["sum"].as_f64().unwrap()).abs().max((abs_sum - p["abs_sum"].as_f64().unwrap()).abs());
            assert!(ds < 1e-3, "{name} row {r} position {pos}: vocabulary sums differ by {ds}");
            assert_eq!(v.argmax(-1, false).int64_value(&[]), p["argmax"].as_i64().unwrap(), "{name} row {r} pos {pos}");
            worst = worst.max(dmax);
            worst_sum = worst_sum.max(ds);
        }
        let d = max_diff(&vec_of(&logits.i((r as i64, -1))), &floats(&row["last"]));
        assert!(d < TOL, "{name} row {r} last position: max difference {d}");
        worst = worst.max(d);
    }
    eprintln!("{name}: largest logit difference to transformers {worst:.2e} (vocabulary sums {worst_sum:.2e})");
    worst
}

#[test]
fn gemma2_logits_match_transformers() {
    let model = load::<Gemma2>("gemma2");
    assert_eq!(model.config.final_logit_softcapping, Some(4.0));
    assert!(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head must share embed_tokens");
    check_logits::<Gemma2>("gemma2");
}

#[test]
fn gemma3_logits_match_transformers() {
    check_logits::<Gemma3>("gemma3");
}

// ----- 2. greedy generation --------------------------------------------------------------

/// 10 greedy tokens (more than the window) equal transformers', with and without an eos id.
fn check_greedy<M: CausalLm>(name: &str) {
    let model = load::<M>(name);
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let n = e["greedy"]["max_new_tokens"].as_i64().unwrap();
    assert!(input.size()[1] + n > 2 * WINDOW, "the sequences must exceed the sliding window");
    let out = model.generate(&input, &mask, n, &Sampling::Greedy, None).unwrap();
    assert_eq!(out.size(), vec![input.size()[0], input.size()[1] + n]);
    assert!(out.equal(&ids(&e["greedy"]["sequences"])), "{name} greedy: got {out:?}");
    let eos = Eos {
        token_ids: vec![e["greedy_eos"]["eos_token_id"].as_i64().unwrap()],
        pad_token_id: e["pad_token_id"].as_i64().unwrap(),
    };
    let out = model.generate(&input, &mask, n, &Sampling::Greedy, Some(&eos)).unwrap();
    assert!(out.equal(&ids(&e["greedy_eos"]["sequences"])), "{name} greedy with eos: got {out:?}");
    eprintln!("{name}: greedy and greedy-with-eos sequences equal transformers' ({n} new tokens)");
}

#[test]
fn gemma2_greedy_generation_matches_transformers() {
    check_greedy::<Gemma2>("gemma2");
}

#[test]
fn gemma3_greedy_generation_matches_transformers() {
    check_greedy::<Gemma3>("gemma3");
}

// ----- 3. padding and the KV cache -------------------------------------------------------

/// Every row of the left-padded batch computes what it computes alone (logits, greedy tokens).
fn check_padding<M: CausalLm>(name: &str) {
    let model = load::<M>(name);
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let none = KvCacheHandle::disabled();
    let batch = model.forward(&input, &mask, &none).unwrap();
    let generated = model.generate(&input, &mask, 8, &Sampling::Greedy, None).unwrap();
    let s = input.size()[1];
    for (r, prompt) in e["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt: Vec<i64> = serde_json::from_value(prompt.clone()).unwrap();
        let len = prompt.len() as i64;
        let solo_ids = Tensor::from_slice(&prompt).view([1, len]);
        let solo_mask = solo_ids.ones_like();
        let solo = model.forward(&solo_ids, &solo_mask, &none).unwrap();
        let d = max_diff(&vec_of(&solo), &vec_of(&batch.i((r as i64..r as i64 + 1, s - len..))));
        assert!(d < SOLO_TOL, "{name}: padded row {r} differs from its solo run by {d}");
        eprintln!("{name}: padded row {r} vs solo: {d:.2e}");
        let g = model.generate(&solo_ids, &solo_mask, 8, &Sampling::Greedy, None).unwrap();
        assert!(g.i((0, len..)).equal(&generated.i((r as i64, s..))), "{name}: row {r} generates differently alone");
    }
}

#[test]
fn gemma2_padded_rows_match_solo_runs() {
    check_padding::<Gemma2>("gemma2");
}

#[test]
fn gemma3_padded_rows_match_solo_runs() {
    check_padding::<Gemma3>("gemma3");
}

/// The batch plus its greedy continuation (17 tokens, past the window) fed one token at a time
/// through the KV cache gives the logits of one full forward pass at every real position; and a
/// 2-token step after a 15-token prefix too.
fn check_cache<M: CausalLm>(name: &str) {
    let model = load::<M>(name);
    let e = expected(name);
    let seqs = ids(&e["greedy"]["sequences"]);
    let prompt_mask = ids(&e["attention_mask"]);
    let s = seqs.size()[1];
    let mask = Tensor::cat(&[&prompt_mask, &Tensor::ones([3, s - prompt_mask.size()[1]], (Kind::Int64, Device::Cpu))], 1);
    let full = model.forward(&seqs, &mask, &KvCacheHandle::disabled()).unwrap();
    let real = |a: &Tensor, b: &Tensor, m: &Tensor| ((a - b).abs() * m.unsqueeze(-1).to_kind(Kind::Float)).max().double_value(&[]);
    let cache = model.new_cache();
    let mut worst = 0.0f64;
    for t in 0..s {
        let step = model.forward(&seqs.i((.., t..t + 1)), &mask.i((.., ..t + 1)), &cache).unwrap();
        worst = worst.max(real(&step, &full.i((.., t..t + 1)), &mask.i((.., t..t + 1))));
    }
    assert_eq!(cache.past_len(), s);
    assert!(worst < SOLO_TOL, "{name}: token-by-token cached steps differ from the full pass by {worst}");
    let cache = model.new_cache();
    let first = model.forward(&seqs.i((.., ..s - 2)), &mask.i((.., ..s - 2)), &cache).unwrap();
    let step = model.forward(&seqs.i((.., s - 2..)), &mask, &cache).unwrap();
    let d0 = real(&first, &full.i((.., ..s - 2)), &mask.i((.., ..s - 2)));
    let d1 = real(&step, &full.i((.., s - 2..)), &mask.i((.., s - 2..)));
    assert!(d0 < SOLO_TOL && d1 < SOLO_TOL, "{name}: cached steps differ from the full pass by {d0}, {d1}");
    eprintln!("{name}: {s} tokens one at a time through the cache vs full pass: {worst:.2e}; prefix + 2: {d0:.2e}, {d1:.2e}");
}

#[test]
fn gemma2_kv_cache_steps_match_full_forward() {
    check_cache::<Gemma2>("gemma2");
}

#[test]
fn gemma3_kv_cache_steps_match_full_forward() {
    check_cache::<Gemma3>("gemma3");
}

// ----- 4. module paths and the Decoder view ----------------------------------------------

/// Every weight-bearing module path is the prefix of its checkpoint keys, and every checkpoint
/// key is a module's weight; the listed paths exist with their types.
fn check_paths<M: CausalLm + ModuleTree>(name: &str, must_have: &[(&str, &str)]) {
    let model = load::<M>(name);
    let modules = model.modules();
    let keys: Vec<String> =
        Tensor::read_safetensors(fixture(name).join("model.safetensors")).unwrap().into_iter().map(|(k, _)| k).collect();
    let weighted = ["ScaledEmbedding", "Linear", "GemmaRmsNorm"];
    for (path, ty) in &modules {
        if weighted.contains(ty) {
            assert!(keys.contains(&format!("{path}.weight")), "{name}: module `{path}` ({ty}) has no checkpoint key");
        }
    }
    for key in &keys {
        let path = key.strip_suffix(".weight").unwrap();
        assert!(modules.iter().any(|(p, t)| p == path && weighted.contains(t)), "{name}: key {key} has no module");
    }
    for (path, ty) in must_have {
        assert!(modules.iter().any(|(p, t)| p == path && t == ty), "{name}: no module `{path}` of type {ty}");
    }
}

#[test]
fn module_paths_are_the_checkpoint_keys() {
    let common = [
        ("model.embed_tokens", "ScaledEmbedding"),
        ("model.layers.0.input_layernorm", "GemmaRmsNorm"),
        ("model.layers.0.post_attention_layernorm", "GemmaRmsNorm"),
        ("model.layers.0.pre_feedforward_layernorm", "GemmaRmsNorm"),
        ("model.layers.2.post_feedforward_layernorm", "GemmaRmsNorm"),
        ("model.layers.1.self_attn.k_proj", "Linear"),
        ("model.layers.0.self_attn.q", "HookPoint"),
        ("model.layers.0.self_attn.k", "HookPoint"),
        ("model.layers.0.self_attn.scores", "HookPoint"),
        ("model.layers.0.self_attn.probs", "HookPoint"),
        ("model.layers.2.self_attn.z", "HookPoint"),
        ("model.layers.0.mlp.act", "HookPoint"),
        ("model.layers.0.mlp.act_fn", "HiddenAct"),
        ("model.rotary_emb", "RotaryEmbedding"),
        ("model.norm", "GemmaRmsNorm"),
        ("lm_head", "LmHead"),
    ];
    let mut g2 = common.to_vec();
    g2.extend([("", "Gemma2"), ("model", "Gemma2Model"), ("model.layers.1", "Gemma2DecoderLayer"), ("model.layers.1.self_attn", "Gemma2Attention")]);
    check_paths::<Gemma2>("gemma2", &g2);
    let mut g3 = common.to_vec();
    g3.extend([
        ("", "Gemma3"),
        ("model", "Gemma3TextModel"),
        ("model.layers.1", "Gemma3DecoderLayer"),
        ("model.layers.1.self_attn", "Gemma3Attention"),
        ("model.layers.1.self_attn.q_norm", "GemmaRmsNorm"),
        ("model.layers.1.self_attn.k_norm", "GemmaRmsNorm"),
        ("model.rotary_emb_local", "RotaryEmbedding"),
    ]);
    check_paths::<Gemma3>("gemma3", &g3);
    let tree = load::<Gemma2>("gemma2").module_tree();
    assert!(tree.contains("model.layers[0].pre_feedforward_layernorm"), "{tree}");
    assert!(tree.contains("probs: HookPoint  model.model.layers[0].self_attn.probs"), "{tree}");
    eprintln!("{tree}");
}

/// `Decoder::layers()[i]` is `model.model.layers[i]` (the same module, same path); the
/// `Decoder` accessors reach the typed hook points; `unembed` of the last layer's output is the
/// model's logits (Gemma 2: after the final soft-cap).
fn check_decoder<M: Decoder + TextModel>(name: &str, typed_layers: impl Fn(&M) -> Vec<String>) {
    let model = lm::<M>(name);
    let n = model.layers().len();
    assert_eq!(n, 3);
    let typed = typed_layers(&model);
    for (i, layer) in model.layers().iter().enumerate() {
        assert_eq!(layer.path(), typed[i], "{name}: layers()[{i}]");
        assert_eq!(layer.path(), format!("model.layers.{i}"));
        assert_eq!(model.attn(i).unwrap().path(), format!("model.layers.{i}.self_attn"));
        assert_eq!(model.mlp_act(i).unwrap().path(), format!("model.layers.{i}.mlp.act"));
        for (p, s) in [(AttnPoint::Q, "q"), (AttnPoint::K, "k"), (AttnPoint::Scores, "scores"), (AttnPoint::Probs, "probs"), (AttnPoint::Z, "z")] {
            assert_eq!(model.attn_point(i, p).unwrap().path(), format!("model.layers.{i}.self_attn.{s}"));
        }
    }
    assert_eq!(model.final_norm().path(), "model.norm");
    assert_eq!(model.unembedding().path(), "lm_head");
    let plain = tch::no_grad(|| model.forward(&[PROMPT])).unwrap();
    let (lens, logits, head) = trace!(model, PROMPT, {
        let h = model.layers()[-1].output;
        (model.unembed(&h).save(), model.output.save(), model.unembedding().output.save())
    })
    .unwrap();
    assert!(logits.equal(&plain), "{name}: tracing changed the logits");
    let d = diff(&lens, &logits);
    assert!(d < 1e-6, "{name}: unembed(last layer) differs from the logits by {d}");
    eprintln!("{name}: unembed(last layer) vs logits {d:.1e}; |lm_head output - logits| {:.3}", diff(&head, &logits));
}

#[test]
fn gemma2_decoder_view_is_the_typed_model() {
    check_decoder::<Gemma2>("gemma2", |m| m.model.layers.iter().map(|l| l.path().to_string()).collect());
    // lm_head's own output is before the soft-cap: the logits are tanh of it, scaled.
    let model = lm::<Gemma2>("gemma2");
    let (head, logits) = trace!(model, PROMPT, { (model.lm_head.output.save(), model.output.save()) }).unwrap();
    let d = diff(&logits, &((&head / 4.0).tanh() * 4.0));
    assert!(d < 1e-6 && diff(&head, &logits) > 0.1, "final soft-cap: {d}");
}

#[test]
fn gemma3_decoder_view_is_the_typed_model() {
    check_decoder::<Gemma3>("gemma3", |m| m.model.layers.iter().map(|l| l.path().to_string()).collect());
}

// ----- 5. the sliding window, the soft-cap, attention by hand ----------------------------

/// Softmax over the last dim with `keep` masking, written out in f64; masked keys exactly 0.
fn softmax_by_hand(scores: &Tensor, keep: &Tensor) -> Tensor {
    let s = scores.to_kind(Kind::Double).masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
    let m = s.amax([-1].as_slice(), true);
    let e = (s - m).exp();
    let sum = e.sum_dim_intlist([-1].as_slice(), true, Kind::Double);
    (e / sum).to_kind(Kind::Float)
}

/// Keep mask `[1, 1, s, s]`: key j visible to query i when j <= i and (with a window) j > i - window.
fn keep_mask(s: i64, window: Option<i64>) -> Tensor {
    let causal = Tensor::ones([s, s], (Kind::Bool, Device::Cpu)).tril(0);
    let keep = match window {
        Some(w) => causal.logical_and(&Tensor::ones([s, s], (Kind::Bool, Device::Cpu)).triu(-(w - 1))),
        None => causal,
    };
    keep.view([1, 1, s, s])
}

fn split_heads(t: &Tensor, heads: i64) -> Tensor {
    let s = t.size();
    t.view([s[0], s[1], heads, -1]).transpose(1, 2)
}

fn merge(z: &Tensor) -> Tensor {
    let s = z.size();
    z.contiguous().view([s[0], s[1], -1])
}

fn knocked(probs: &Tensor, v: &Tensor, head: i64, key: i64) -> Tensor {
    let p = probs.copy();
    let _ = p.narrow(1, head, 1).narrow(3, key, 1).fill_(0.0);
    p.matmul(v).transpose(1, 2)
}

/// Layer `layer`'s attention points, its input and output, through the generic `Decoder` view.
fn attention_of<M: Decoder + TextModel>(model: &LanguageModel<M>, layer: usize) -> [Tensor; 7]
where
    M::Attn: HookModule<Input = LayerInput>,
{
    let saved = trace!(model, PROMPT, {
        vec![model.attn(layer).input.save(), model.attn_point(layer, AttnPoint::Q).output.save(),
             model.attn_point(layer, AttnPoint::K).output.save(), model.attn_point(layer, AttnPoint::Scores).output.save(),
             model.attn_point(layer, AttnPoint::Probs).output.save(), model.attn_point(layer, AttnPoint::Z).output.save(),
             model.attn(layer).output.save()]
    })
    .unwrap();
    saved.try_into().unwrap()
}

/// For every layer of `name` (kinds `sliding`): probs exactly 0 outside the window and the
/// causal triangle, nonzero inside; scores = softcap(q kᵀ · 8^-0.5) where visible, |scores| ≤
/// cap; probs = softmax by hand; z = probs v with v from the checkpoint's v_proj; the attention
/// output = o_proj(z). Returns the largest |visible score| seen.
fn check_attention<M: Decoder + TextModel>(name: &str, sliding: &[bool], cap: Option<f64>) -> f64
where
    M::Attn: HookModule<Input = LayerInput>,
{
    let model = lm::<M>(name);
    let w = weights(name);
    let s = 6;
    let mut largest = 0.0f64;
    for (layer, &slides) in sliding.iter().enumerate() {
        let [x, q, k, scores, probs, z, out] = attention_of(&model, layer);
        assert_eq!(probs.size(), [1, 4, s, s]);
        let keep = keep_mask(s, slides.then_some(WINDOW));
        let keep4 = keep.expand([1, 4, s, s], false);
        // The window by hand: exactly 0 outside, nonzero inside.
        let outside = probs.masked_select(&keep4.logical_not());
        assert_eq!(outside.abs().max().double_value(&[]), 0.0, "{name} layer {layer}: probs outside the window");
        let inside = probs.masked_select(&keep4);
        assert!(inside.min().double_value(&[]) > 0.0, "{name} layer {layer}: a visible key has probability 0");
        if slides {
            // Query 5 sees keys 2, 3, 4, 5 (the last 4 positions, itself included), not 0 or 1.
            assert_eq!(probs.i((0, 0, 5, ..2)).abs().max().double_value(&[]), 0.0);
            assert!(probs.i((0, .., 5, 2)).min().double_value(&[]) > 0.0);
        } else {
            assert!(probs.i((0, .., 5, 0)).min().double_value(&[]) > 0.0, "{name} layer {layer}: a full layer sees key 0");
        }
        // Scores by hand from the hooked q and k.
        let raw = q.matmul(&k.transpose(-1, -2)) * 8f64.powf(-0.5);
        let hand = match cap {
            Some(c) => (&raw / c).tanh() * c,
            None => raw.shallow_clone(),
        };
        let visible = scores.masked_select(&keep4);
        let d_scores = diff(&visible, &hand.masked_select(&keep4));
        assert!(d_scores < HAND_TOL, "{name} layer {layer}: scores differ from hand by {d_scores}");
        let top = visible.abs().max().double_value(&[]);
        if let Some(c) = cap {
            assert!(top <= c, "{name} layer {layer}: |scores| {top} above the cap {c}");
        }
        largest = largest.max(top);
        let d_probs = diff(&probs, &softmax_by_hand(&hand, &keep));
        assert!(d_probs < HAND_TOL, "{name} layer {layer}: probs differ from hand by {d_probs}");
        // v from the checkpoint, key/value head j serving query heads 2j, 2j + 1.
        let wv = &w[&format!("model.layers.{layer}.self_attn.v_proj.weight")];
        let v = split_heads(&x.matmul(&wv.tr()), 2).repeat_interleave_self_int(2, Some(1), None::<i64>);
        let d_z = diff(&z, &probs.matmul(&v).transpose(1, 2));
        assert!(d_z < HAND_TOL, "{name} layer {layer}: z differs from probs v by {d_z}");
        let wo = &w[&format!("model.layers.{layer}.self_attn.o_proj.weight")];
        let d_out = diff(&out, &merge(&z).matmul(&wo.tr()));
        assert!(d_out < HAND_TOL, "{name} layer {layer}: output differs from o_proj(z) by {d_out}");
        eprintln!("{name} layer {layer} ({}): scores {d_scores:.1e}, probs {d_probs:.1e}, z {d_z:.1e}, out {d_out:.1e}, max |score| {top:.3}",
                  if slides { "sliding" } else { "full" });
    }
    largest
}

#[test]
fn gemma2_sliding_window_and_soft_cap_by_hand() {
    let top = check_attention::<Gemma2>("gemma2", &[true, false, true], Some(5.0));
    // The cap bites: some score is well into tanh's curved part.
    assert!(top > 2.5, "largest |score| {top}: the soft-cap is nearly linear here");
}

#[test]
fn gemma3_sliding_window_by_hand() {
    check_attention::<Gemma3>("gemma3", &[true, true, false], None);
}

// ----- 6. knockout ------------------------------------------------------------------------

/// Head 1 of layer `layer` may not attend to key `key`: the attention output equals o_proj of
/// the knocked-out probs times v, by hand from the checkpoint's weights.
fn check_knockout<M: Decoder + TextModel>(name: &str, layer: usize, key: i64)
where
    M::Attn: HookModule<Input = LayerInput>,
{
    let model = lm::<M>(name);
    let w = weights(name);
    let [x, _, _, _, probs, _, out] = attention_of(&model, layer);
    let ko = trace!(model, PROMPT, {
        model.attn_point(layer, AttnPoint::Probs).output[.., 1, .., key] = 0.0;
        model.attn(layer).output.save()
    })
    .unwrap();
    let wv = &w[&format!("model.layers.{layer}.self_attn.v_proj.weight")];
    let wo = &w[&format!("model.layers.{layer}.self_attn.o_proj.weight")];
    let v = split_heads(&x.matmul(&wv.tr()), 2).repeat_interleave_self_int(2, Some(1), None::<i64>);
    let want = merge(&knocked(&probs, &v, 1, key)).matmul(&wo.tr());
    let d = diff(&ko, &want);
    assert!(d < HAND_TOL, "{name}: knockout differs from hand by {d}");
    assert!(diff(&ko, &out) > 1e-4, "{name}: the knockout must change the output");
    eprintln!("{name}: knockout of head 1, key {key} in layer {layer} vs hand: {d:.1e}");
}

#[test]
fn gemma2_attention_knockout_by_hand() {
    check_knockout::<Gemma2>("gemma2", 0, 3); // sliding layer: key 3 is inside query 5's window
    check_knockout::<Gemma2>("gemma2", 1, 0); // full layer
}

#[test]
fn gemma3_attention_knockout_by_hand() {
    check_knockout::<Gemma3>("gemma3", 2, 0);
}

// ----- 7. bad input -----------------------------------------------------------------------

static TMP: AtomicUsize = AtomicUsize::new(0);

/// A fresh folder holding `name`'s config passed through `edit_config` and the tensors
/// `edit` makes of its checkpoint.
fn altered(name: &str, edit_config: impl FnOnce(&mut Value), edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nnsight-gemma-{}-{}", std::process::id(), TMP.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
    edit_config(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors = Tensor::read_safetensors(fixture(name).join("model.safetensors")).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

fn load_err<M: CausalLm>(dir: &Path) -> Error {
    match M::load_with(dir, &LoadOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("{} loaded", dir.display()),
    }
}

fn check_bad_weights<M: CausalLm>(name: &str, missing: &str) {
    let dir = altered(name, |_| {}, |t| t.retain(|(k, _)| k != missing));
    let err = load_err::<M>(&dir);
    assert!(matches!(err, Error::MissingWeight { ref key, .. } if key == missing), "{err}");
    assert!(err.to_string().contains("model.safetensors") && err.to_string().contains(missing), "{err}");
    let dir = altered(name, |_| {}, |t| {
        let v = t.iter_mut().find(|(k, _)| k == "model.layers.0.self_attn.k_proj.weight").unwrap();
        v.1 = Tensor::zeros([64, 64], (Kind::Float, Device::Cpu)); // 4 kv heads instead of 2
    });
    let err = load_err::<M>(&dir);
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    match err {
        Error::WeightShape { key, expected, actual, .. } => {
            assert_eq!(key, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!((expected, actual), (vec![32, 64], vec![64, 64]));
        }
        other => panic!("{name}: expected WeightShape, got {other}"),
    }
}

/// A bad value is a Config error naming config.json and the key.
fn check_bad_config<M: CausalLm>(name: &str, key: &str, value: Value) {
    let dir = altered(name, |c| { c[key] = value.clone(); }, |_| {});
    let err = load_err::<M>(&dir);
    assert!(
        matches!(err, Error::Config { ref path, ref message } if path.ends_with("config.json") && message.contains(key)),
        "{name} {key} = {value}: {err}"
    );
    eprintln!("{name} {key} = {value}: {err}");
}

#[test]
fn gemma2_bad_checkpoints_and_configs_are_errors() {
    check_bad_weights::<Gemma2>("gemma2", "model.layers.1.pre_feedforward_layernorm.weight");
    check_bad_config::<Gemma2>("gemma2", "sliding_window", 0.into());
    check_bad_config::<Gemma2>("gemma2", "num_key_value_heads", 3.into());
    check_bad_config::<Gemma2>("gemma2", "attn_logit_softcapping", (-1.0).into());
    check_bad_config::<Gemma2>("gemma2", "final_logit_softcapping", 0.0.into());
    check_bad_config::<Gemma2>("gemma2", "query_pre_attn_scalar", 0.0.into());
    check_bad_config::<Gemma2>("gemma2", "layer_types", serde_json::json!(["sliding_attention", "full_attention"]));
    check_bad_config::<Gemma2>("gemma2", "layer_types", serde_json::json!(["sliding_attention", "chunked_attention", "full_attention"]));
    check_bad_config::<Gemma2>("gemma2", "use_bidirectional_attention", true.into());
    check_bad_config::<Gemma2>("gemma2", "hidden_activation", "tanh".into());
    // Another architecture's config.
    let err = Gemma2::load_with(&fixture("gemma3"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Config { ref message, .. } if message.contains("\"gemma3_text\"")), "{err}");
}

#[test]
fn gemma3_bad_checkpoints_and_configs_are_errors() {
    check_bad_weights::<Gemma3>("gemma3", "model.layers.2.self_attn.k_norm.weight");
    check_bad_config::<Gemma3>("gemma3", "sliding_window", 0.into());
    check_bad_config::<Gemma3>("gemma3", "num_key_value_heads", 3.into());
    check_bad_config::<Gemma3>("gemma3", "layer_types", serde_json::json!(["sliding_attention"]));
    check_bad_config::<Gemma3>("gemma3", "rope_parameters", serde_json::json!({"full_attention": {"rope_type": "yarn", "factor": 4.0}}));
    check_bad_config::<Gemma3>("gemma3", "rope_parameters", serde_json::json!({"sliding_attention": {"rope_type": "default", "rope_theta": 0.5}}));
    // transformers 4 spelling: the local base is `rope_local_base_freq`.
    let dir = altered("gemma3", |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.insert("rope_local_base_freq".into(), 0.5.into());
    }, |_| {});
    let err = load_err::<Gemma3>(&dir);
    assert!(matches!(err, Error::Config { ref message, .. } if message.contains("`rope_local_base_freq`")), "{err}");
    eprintln!("gemma3 rope_local_base_freq = 0.5: {err}");
    let err = Gemma3::load_with(&fixture("gemma2"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Config { ref path, .. } if path.ends_with("config.json")), "{err}");
}

/// Older config spellings load to the same model: Gemma 2 with a top-level `rope_theta` and no
/// `layer_types` (transformers 4 configs: sliding first, alternating).
#[test]
fn gemma2_transformers4_config_spelling() {
    let dir = altered("gemma2", |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.remove("layer_types");
        o.insert("rope_theta".into(), 1000.0.into());
    }, |_| {});
    let old = Gemma2::from_pretrained(&dir).unwrap();
    let e = expected("gemma2");
    let run = |m: &Hooked<Gemma2>| m.forward(&ids(&e["input_ids"]), &ids(&e["attention_mask"]), &KvCacheHandle::disabled()).unwrap();
    assert!(run(&old).equal(&run(&load::<Gemma2>("gemma2"))));
}

/// Gemma 3's older spellings load to the same model: transformers 4's `rope_theta`,
/// `rope_scaling` and `rope_local_base_freq` in place of `rope_parameters`, and
/// `sliding_window_pattern` in place of `layer_types`.
#[test]
fn gemma3_transformers4_config_spelling() {
    let dir = altered("gemma3", |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.remove("layer_types");
        o.insert("sliding_window_pattern".into(), 3.into());
        o.insert("rope_theta".into(), 1000.0.into());
        o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 2.0}));
        o.insert("rope_local_base_freq".into(), 100.0.into());
    }, |_| {});
    let old = Gemma3::from_pretrained(&dir).unwrap();
    assert_eq!(old.model.layers.len(), 3);
    let e = expected("gemma3");
    let run = |m: &Hooked<Gemma3>| m.forward(&ids(&e["input_ids"]), &ids(&e["attention_mask"]), &KvCacheHandle::disabled()).unwrap();
    assert!(run(&old).equal(&run(&load::<Gemma3>("gemma3"))));
    // A pattern that makes every layer global changes the logits (the window matters here).
    let dir = altered("gemma3", |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("layer_types");
        o.insert("sliding_window_pattern".into(), 1.into());
    }, |_| {});
    let all_global = Gemma3::from_pretrained(&dir).unwrap();
    assert!(diff(&run(&all_global), &run(&load::<Gemma3>("gemma3"))) > 1e-2);
}

/// `Decoder::layers()[i]` is the very module `model.model.layers[i]` (same address, same path).
#[test]
fn decoder_layers_are_the_model_layers() {
    let g2 = load::<Gemma2>("gemma2");
    let g2: &Gemma2 = &g2;
    let g3 = load::<Gemma3>("gemma3");
    let g3: &Gemma3 = &g3;
    for i in 0..3 {
        assert!(std::ptr::eq(&g2.layers()[i], &g2.model.layers[i]) && std::ptr::eq(g2.attn(i).unwrap(), &g2.model.layers[i].self_attn));
        assert!(std::ptr::eq(&g3.layers()[i], &g3.model.layers[i]) && std::ptr::eq(g3.attn(i).unwrap(), &g3.model.layers[i].self_attn));
        assert!(std::ptr::eq(g2.attn_point(i, AttnPoint::Probs).unwrap(), &g2.model.layers[i].self_attn.probs));
        assert!(std::ptr::eq(g3.attn_point(i, AttnPoint::Scores).unwrap(), &g3.model.layers[i].self_attn.scores));
        assert!(std::ptr::eq(g2.mlp_act(i).unwrap(), &g2.model.layers[i].mlp.act));
    }
    assert!(std::ptr::eq(g2.final_norm(), &g2.model.norm) && std::ptr::eq(g3.unembedding(), &g3.lm_head));
}

// ----- 8. bf16 ----------------------------------------------------------------------------

/// Loaded as bf16: logits close to f32's and generation runs. bf16 keeps 8 significant bits
/// (relative rounding 2^-9 ≈ 0.2% per stored value); over 3 layers of about ten rounded
/// products each, errors of a few percent of the logit scale are expected, so the bound is 5% of
/// the largest |logit| (as for GPT-2 in causal_models.rs).
fn check_bf16<M: CausalLm>(name: &str) {
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let none = KvCacheHandle::disabled();
    let f32_logits = load::<M>(name).forward(&input, &mask, &none).unwrap();
    let opts = LoadOptions { device: Device::Cpu, dtype: Some(Kind::BFloat16), ..Default::default() };
    let bf16 = Hooked::with_path("", M::load_with(&fixture(name), &opts).unwrap());
    assert_eq!(bf16.kind(), Kind::BFloat16);
    let l = bf16.forward(&input, &mask, &none).unwrap();
    assert_eq!(l.kind(), Kind::BFloat16);
    let scale = f32_logits.abs().max().double_value(&[]);
    // Real positions only (a padding position attends to nothing real).
    let m = mask.unsqueeze(-1).to_kind(Kind::Float);
    let d = ((l.to_kind(Kind::Float) - &f32_logits).abs() * m).max().double_value(&[]);
    assert!(d < 0.05 * scale, "{name}: bf16 logits off by {d} (scale {scale})");
    let out = bf16.generate(&input, &mask, 10, &Sampling::Greedy, None).unwrap();
    assert_eq!(out.size(), [3, input.size()[1] + 10]);
    let agree = out.i((.., input.size()[1]..)).eq_tensor(&ids(&e["greedy"]["sequences"]).i((.., input.size()[1]..)));
    let agree = agree.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    eprintln!("{name} bf16 vs f32: {d:.4} (largest |logit| {scale:.2}); bf16 greedy tokens equal to f32's: {:.0}%", agree * 100.0);
}

#[test]
fn gemma2_bf16_close_to_f32() {
    check_bf16::<Gemma2>("gemma2");
}

#[test]
fn gemma3_bf16_close_to_f32() {
    check_bf16::<Gemma3>("gemma3");
}

// ----- Gemma 3: rotary by layer kind ----------------------------------------------------

fn rotate_half(x: &Tensor) -> Tensor {
    let h = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, h, h), x.narrow(3, 0, h)], 3)
}

/// Gemma's RMSNorm by hand: x / sqrt(mean(x²) + 1e-6) · (1 + w).
fn gemma_norm(x: &Tensor, w: &Tensor) -> Tensor {
    let var = x.pow_tensor_scalar(2).mean_dim([-1].as_slice(), true, Kind::Float);
    x * (var + 1e-6).rsqrt() * (w + 1.0)
}

/// q of a sliding layer is q_norm then rotary with base 100 (`rope_local_base_freq`), of a full
/// layer rotary with base 1000 and frequencies halved (linear scaling, factor 2), by hand from
/// the checkpoint's q_proj and q_norm weights.
#[test]
fn gemma3_q_norm_and_rope_by_layer_kind_by_hand() {
    let model = lm::<Gemma3>("gemma3");
    let w = weights("gemma3");
    let (s, hd) = (6, 16);
    for (layer, base, factor) in [(0usize, 100f32, 1f32), (2, 1000.0, 2.0)] {
        let [x, q, ..] = attention_of(&model, layer);
        let inv = Tensor::from_slice(&(0..hd / 2).map(|i| 1.0 / base.powf(2.0 * i as f32 / hd as f32) / factor).collect::<Vec<_>>());
        let freqs = Tensor::arange(s, (Kind::Float, Device::Cpu)).unsqueeze(1) * inv.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1).view([1, 1, s, hd]);
        let wq = &w[&format!("model.layers.{layer}.self_attn.q_proj.weight")];
        let qn = gemma_norm(&split_heads(&x.matmul(&wq.tr()), 4), &w[&format!("model.layers.{layer}.self_attn.q_norm.weight")]);
        let hand = &qn * emb.cos() + rotate_half(&qn) * emb.sin();
        let d = diff(&q, &hand);
        assert!(d < HAND_TOL, "gemma3 layer {layer}: q differs from q_norm + rotary(base {base}, factor {factor}) by {d}");
        eprintln!("gemma3 layer {layer}: q vs hand (base {base}, factor {factor}): {d:.1e}");
    }
}
