//! Qwen2, Qwen3, Llama 3 (rope_type "llama3", tied 3.2-style), OLMo 2 and Phi-3 against Hugging
//! Face transformers and against computations by hand, on the tiny random checkpoints made by
//! `fixtures/causal/make_fixtures_part2.py` (transformers 5.24, eager attention, float32;
//! 2 layers, hidden 64, 4 query heads / 2 key-value heads, vocab 1000; see its docstring).
//!
//! Each fixture has `expected.json` (the summaries and generations of `make_fixtures.py`) and
//! `logits.safetensors` (transformers' whole logits of the left-padded batch). Loading errors are
//! checked on altered copies written into a temporary folder.


use nnsight::models::causal::{CausalLm, CausalLmExt, LoadOptions, Sampling};
use nnsight::models::llama::Llama;
use nnsight::models::olmo2::Olmo2;
use nnsight::models::phi3::Phi3;
use nnsight::models::qwen2::Qwen2;
use nnsight::models::qwen3::Qwen3;
use nnsight::prelude::*;
use nnsight::tch::IndexOp;
use nnsight::{Error, ModuleTree};
use serde_json::Value;

mod common;
use common::decoder_fixtures::*;

/// Per-head RMSNorm in f64 over the last dim (`x / sqrt(mean(x²) + eps) · w`).
fn rms_by_hand(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let x = x.to_kind(Kind::Double);
    let ms = (&x * &x).mean_dim([-1].as_slice(), true, Kind::Double);
    (x / (ms + eps).sqrt() * w.to_kind(Kind::Double)).to_kind(Kind::Float)
}

/// Rotary written out pair by pair on the first `rot` dims: for `j < rot / 2`, dims `j` and
/// `j + rot / 2` at position `p` turn by `p · inv_freq[j]`; the rest are kept. `t`:
/// `[batch, heads, seq, head_dim]`, positions `0..seq`.
fn rotary_by_hand(t: &Tensor, inv_freq: &[f64]) -> Tensor {
    let s = t.size()[2];
    let t = t.to_kind(Kind::Double);
    let out = t.copy();
    let half = inv_freq.len() as i64;
    for (j, f) in inv_freq.iter().enumerate() {
        let j = j as i64;
        let angle = Tensor::arange(s, (Kind::Double, Device::Cpu)) * *f;
        let (c, sn) = (angle.cos().view([1, 1, s]), angle.sin().view([1, 1, s]));
        let (a, b) = (t.select(3, j), t.select(3, j + half));
        out.select(3, j).copy_(&(&a * &c - &b * &sn));
        out.select(3, j + half).copy_(&(&b * &c + &a * &sn));
    }
    out.to_kind(Kind::Float)
}

/// Default rotary frequencies `theta^(-2j / rot)` for `j < rot / 2`.
fn default_freqs(rot: i64, theta: f64) -> Vec<f64> {
    (0..rot / 2).map(|j| theta.powf(-2.0 * j as f64 / rot as f64)).collect()
}

/// `[b, kv, s, d]` → `[b, kv * groups, s, d]`, each head repeated in place.
fn repeat_heads(x: &Tensor, groups: i64) -> Tensor {
    x.repeat_interleave_self_int(groups, Some(1), None)
}

// ===== Qwen2 =====================================================================================

#[test]
fn qwen2_logits_match_transformers() {
    check_logits::<Qwen2>("qwen2");
}

#[test]
fn qwen2_greedy_matches_transformers() {
    check_greedy::<Qwen2>("qwen2");
}

#[test]
fn qwen2_padded_rows_and_kv_cache() {
    check_padding::<Qwen2>("qwen2");
    check_cache::<Qwen2>("qwen2");
}

#[test]
fn qwen2_module_paths_and_decoder_view() {
    check_paths::<Qwen2>("qwen2", &[
        ("", "Qwen2"),
        ("model", "LlamaModel"),
        ("model.embed_tokens", "Embedding"),
        ("model.rotary_emb", "RotaryEmbedding"),
        ("model.layers.1", "LlamaDecoderLayer"),
        ("model.layers.0.self_attn", "LlamaAttention"),
        ("model.layers.0.self_attn.q_proj", "Linear"),
        ("model.layers.0.self_attn.o_proj", "Linear"),
        ("model.layers.0.mlp", "LlamaMlp"),
        ("model.layers.0.mlp.act_fn", "HiddenAct"),
        ("model.norm", "RmsNorm"),
        ("lm_head", "LmHead"),
    ]);
    fn typed(m: &Qwen2) -> &Vec<Hooked<nnsight::models::llama::LlamaDecoderLayer>> {
        &m.model.layers
    }
    check_decoder::<Qwen2>("qwen2", typed);
    let model = load::<Qwen2>("qwen2");
    let a = &model.model.layers[0].self_attn;
    assert!(a.q_proj.bs.is_some() && a.k_proj.bs.is_some() && a.v_proj.bs.is_some() && a.o_proj.bs.is_none());
    assert_eq!(model.lm_head.weight.data_ptr(), model.model.embed_tokens.ws.data_ptr(), "tied lm_head");
}

#[test]
fn qwen2_bad_weights_are_errors() {
    check_bad_weights::<Qwen2>(
        "qwen2",
        &["model.layers.1.self_attn.k_proj.bias", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"],
        "model.layers.0.self_attn.v_proj.weight",
    );
    // An o_proj bias in the checkpoint (Qwen2 has none): ignoring it would compute another
    // model than the checkpoint's, so it is an error naming the file and the key.
    let dir = altered("qwen2", |_| {}, |t| t.push(("model.layers.0.self_attn.o_proj.bias".into(), Tensor::ones([64], (Kind::Float, Device::Cpu)))));
    match Qwen2::from_pretrained(&dir) {
        Err(nnsight::Error::UnusedWeight { file, key, count: 1 }) => {
            assert!(file.ends_with("model.safetensors") && key == "model.layers.0.self_attn.o_proj.bias", "{file} {key}");
        }
        other => panic!("expected UnusedWeight, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn qwen2_sliding_window_configs() {
    // Sliding window turned on with layers from max_window_layers (1) sliding: accepted (checked
    // against transformers in tests/mistral_and_windows.rs, fixture qwen2_window).
    let dir = config_altered("qwen2", |c| {
        c.remove("layer_types");
        c.insert("use_sliding_window".into(), true.into());
        c.insert("sliding_window".into(), 4.into());
        c.insert("max_window_layers".into(), 1.into());
    });
    assert_eq!(Qwen2::from_pretrained(&dir).unwrap().model.layer_windows(), &[None, Some(4)]);
    // A sliding layer in layer_types with no window (use_sliding_window false): refused.
    let dir = config_altered("qwen2", |c| {
        c.insert("layer_types".into(), serde_json::json!(["full_attention", "sliding_attention"]));
    });
    let m = config_error::<Qwen2>(&dir);
    assert!(m.contains("layer_types[1]") && m.contains("sliding_attention"), "{m}");
    // Turned on but reaching no layer (max_window_layers >= layers): full attention, accepted,
    // as are the Hub's usual settings (off, with a window size and max_window_layers written).
    let reference = logits_of(&load::<Qwen2>("qwen2"), "qwen2");
    for (use_sw, mwl) in [(true, 2), (false, 1)] {
        let dir = config_altered("qwen2", |c| {
            c.remove("layer_types");
            c.insert("use_sliding_window".into(), use_sw.into());
            c.insert("sliding_window".into(), 4.into());
            c.insert("max_window_layers".into(), mwl.into());
        });
        assert!(logits_of(&Qwen2::from_pretrained(&dir).unwrap(), "qwen2").equal(&reference));
    }
    // Other refused values name their key.
    let dir = config_altered("qwen2", |c| {
        c["rope_parameters"]["rope_type"] = "yarn".into();
    });
    let m = config_error::<Qwen2>(&dir);
    assert!(m.contains("rope_parameters") && m.contains("yarn"), "{m}");
    let dir = config_altered("qwen2", |c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    assert!(config_error::<Qwen2>(&dir).contains("num_key_value_heads"));
    let err = Qwen2::load_with(&fixture("llama"), &LoadOptions::default()).map(drop).unwrap_err();
    assert!(matches!(err, Error::Config { ref message, .. } if message.contains("qwen2")), "{err}");
}

/// Layer 1's attention by hand from the checkpoint: q/k/v with their biases, rotary, GQA.
#[test]
fn qwen2_attention_matches_hand_computation() {
    let model = lm::<Qwen2>("qwen2");
    let w = weights(fixture("qwen2").join("model.safetensors"));
    let g = |n: &str| w[&format!("model.layers.1.{n}")].shallow_clone();
    let saved = trace!(model, PROMPT, {
        vec![model.model.layers[0].output.save(), model.model.layers[1].self_attn.q.output.save(),
             model.model.layers[1].self_attn.k.output.save(), model.model.layers[1].self_attn.z.output.save()]
    })
    .unwrap();
    let [h0, q, k, z]: [Tensor; 4] = saved.try_into().unwrap();
    let (b, s, hd) = (1, 6, 16);
    let x = rms_by_hand(&h0, &g("input_layernorm.weight"), 1e-6);
    let proj = |n: &str| (x.matmul(&g(&format!("self_attn.{n}.weight")).tr()) + g(&format!("self_attn.{n}.bias"))).view([b, s, -1, hd]).transpose(1, 2);
    let f = default_freqs(hd, 1000.0);
    let (qh, kh, vh) = (rotary_by_hand(&proj("q_proj"), &f), repeat_heads(&rotary_by_hand(&proj("k_proj"), &f), 2), repeat_heads(&proj("v_proj"), 2));
    let keep = Tensor::ones([s, s], (Kind::Bool, Device::Cpu)).tril(0).view([1, 1, s, s]);
    let scores = (qh.matmul(&kh.transpose(-1, -2)) * 0.25).masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
    let zh = scores.softmax(-1, Kind::Float).matmul(&vh).transpose(1, 2);
    let (dq, dk, dz) = (diff(&q, &qh), diff(&k, &kh), diff(&z, &zh));
    assert!(dq < TOL && dk < TOL && dz < TOL, "qwen2 by hand: q {dq}, k {dk}, z {dz}");
    eprintln!("qwen2 layer 1 by hand: q {dq:.2e}, k {dk:.2e}, z {dz:.2e}");
}

// ===== Llama 3 configurations =====================================================================

const LLAMA3: [&str; 2] = ["llama3", "llama32_tied"];

#[test]
fn llama3_logits_match_transformers() {
    for name in LLAMA3 {
        check_logits::<Llama>(name);
    }
}

#[test]
fn llama3_greedy_matches_transformers() {
    for name in LLAMA3 {
        check_greedy::<Llama>(name);
    }
}

#[test]
fn llama3_padded_rows_and_kv_cache() {
    for name in LLAMA3 {
        check_padding::<Llama>(name);
        check_cache::<Llama>(name);
    }
}

#[test]
fn llama3_module_paths_and_decoder_view() {
    fn typed(m: &Llama) -> &Vec<Hooked<nnsight::models::llama::LlamaDecoderLayer>> {
        &m.model.layers
    }
    for name in LLAMA3 {
        check_paths::<Llama>(name, &[("", "Llama"), ("model.layers.1.self_attn", "LlamaAttention"), ("lm_head", "LmHead")]);
        check_decoder::<Llama>(name, typed);
    }
    let tied = load::<Llama>("llama32_tied");
    assert_eq!(tied.lm_head.weight.data_ptr(), tied.model.embed_tokens.ws.data_ptr(), "tied lm_head");
    let untied = load::<Llama>("llama3");
    assert_eq!(untied.eos_token_ids(), vec![2, 7]);
}

/// The llama3 scaling is read and matters; the transformers 4 spelling (`rope_theta` +
/// `rope_scaling`) gives the same model; bad scaling values name their key.
#[test]
fn llama3_rope_scaling_spellings_and_errors() {
    use nnsight::models::llama::Rope;
    let model = load::<Llama>("llama3");
    assert_eq!(
        model.config.rope().unwrap(),
        Rope::Llama3 { theta: 10000.0, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64.0 }
    );
    let reference = logits_of(&model, "llama3");
    let dir = config_altered("llama3", |c| {
        let p = c.remove("rope_parameters").unwrap();
        c.insert("rope_theta".into(), p["rope_theta"].clone());
        let mut s = p.as_object().unwrap().clone();
        s.remove("rope_theta");
        c.insert("rope_scaling".into(), Value::Object(s));
    });
    let v4 = Llama::from_pretrained(&dir).unwrap();
    assert!(logits_of(&v4, "llama3").equal(&reference), "transformers 4 spelling");
    let dir = config_altered("llama3", |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0});
    });
    let plain = Llama::from_pretrained(&dir).unwrap();
    let d = diff(&logits_of(&plain, "llama3"), &reference);
    assert!(d > 1e-3, "the llama3 scaling must matter ({d})");
    let dir = config_altered("llama3", |c| {
        c["rope_parameters"]["high_freq_factor"] = 0.5.into();
    });
    assert!(config_error::<Llama>(&dir).contains("high_freq_factor"));
    let dir = config_altered("llama3", |c| {
        c["rope_parameters"].as_object_mut().unwrap().remove("original_max_position_embeddings");
    });
    assert!(config_error::<Llama>(&dir).contains("original_max_position_embeddings"));
    let dir = config_altered("llama3", |c| {
        c["rope_parameters"]["rope_type"] = "longrope".into();
    });
    assert!(config_error::<Llama>(&dir).contains("longrope"));
}

#[test]
fn llama3_bad_weights_are_errors() {
    check_bad_weights::<Llama>("llama32_tied", &["model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"], "model.layers.1.mlp.gate_proj.weight");
}

// ===== Qwen3 =====================================================================================

#[test]
fn qwen3_logits_match_transformers() {
    check_logits::<Qwen3>("qwen3");
}

#[test]
fn qwen3_greedy_matches_transformers() {
    check_greedy::<Qwen3>("qwen3");
}

#[test]
fn qwen3_padded_rows_and_kv_cache() {
    check_padding::<Qwen3>("qwen3");
    check_cache::<Qwen3>("qwen3");
}

#[test]
fn qwen3_module_paths_and_decoder_view() {
    check_paths::<Qwen3>("qwen3", &[
        ("", "Qwen3"),
        ("model", "Qwen3Model"),
        ("model.embed_tokens", "Embedding"),
        ("model.rotary_emb", "RotaryEmbedding"),
        ("model.layers.1", "Qwen3DecoderLayer"),
        ("model.layers.0.self_attn", "Qwen3Attention"),
        ("model.layers.0.self_attn.q_norm", "RmsNorm"),
        ("model.layers.1.self_attn.k_norm", "RmsNorm"),
        ("model.layers.0.mlp", "LlamaMlp"),
        ("model.norm", "RmsNorm"),
        ("lm_head", "LmHead"),
    ]);
    fn typed(m: &Qwen3) -> &Vec<Hooked<nnsight::models::qwen3::Qwen3DecoderLayer>> {
        &m.model.layers
    }
    check_decoder::<Qwen3>("qwen3", typed);
}

/// Layer 1's q and k by hand: per-head RMSNorm over head_dim (32, explicit) before rotary.
#[test]
fn qwen3_q_k_norms_match_hand_computation() {
    let model = lm::<Qwen3>("qwen3");
    let w = weights(fixture("qwen3").join("model.safetensors"));
    let g = |n: &str| w[&format!("model.layers.1.{n}")].shallow_clone();
    let saved = trace!(model, PROMPT, {
        vec![model.model.layers[0].output.save(), model.model.layers[1].self_attn.q.output.save(),
             model.model.layers[1].self_attn.k.output.save()]
    })
    .unwrap();
    let [h0, q, k]: [Tensor; 3] = saved.try_into().unwrap();
    let (b, s, hd) = (1, 6, 32);
    assert_eq!(q.size(), [b, 4, s, hd]);
    let x = rms_by_hand(&h0, &g("input_layernorm.weight"), 1e-6);
    let heads = |n: &str, norm: &str| {
        let t = x.matmul(&g(&format!("self_attn.{n}.weight")).tr()).view([b, s, -1, hd]);
        rms_by_hand(&t, &g(&format!("self_attn.{norm}.weight")), 1e-6).transpose(1, 2)
    };
    let f = default_freqs(hd, 1000.0);
    let (qh, kh) = (rotary_by_hand(&heads("q_proj", "q_norm"), &f), repeat_heads(&rotary_by_hand(&heads("k_proj", "k_norm"), &f), 2));
    let (dq, dk) = (diff(&q, &qh), diff(&k, &kh));
    assert!(dq < TOL && dk < TOL, "qwen3 by hand: q {dq}, k {dk}");
    eprintln!("qwen3 layer 1 q/k by hand (norm per head, rotary): q {dq:.2e}, k {dk:.2e}");
}

#[test]
fn qwen3_bad_input_is_refused() {
    check_bad_weights::<Qwen3>(
        "qwen3",
        &["model.layers.1.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight", "lm_head.weight"],
        "model.layers.0.self_attn.k_proj.weight",
    );
    // Sliding layers are accepted (tests/mistral_and_windows.rs), a window below 1 is not ...
    let dir = config_altered("qwen3", |c| {
        c.remove("layer_types");
        c.insert("use_sliding_window".into(), true.into());
        c.insert("sliding_window".into(), 0.into());
        c.insert("max_window_layers".into(), 0.into());
    });
    assert!(config_error::<Qwen3>(&dir).contains("sliding_window"));
    // ... nor a sliding layer with no window (use_sliding_window false).
    let dir = config_altered("qwen3", |c| {
        c.insert("layer_types".into(), serde_json::json!(["sliding_attention", "full_attention"]));
    });
    assert!(config_error::<Qwen3>(&dir).contains("layer_types[0]"));
    // Without head_dim, transformers' default 128 (not 64 / 4): the checkpoint's 32-wide heads
    // then do not fit, named by key.
    let dir = config_altered("qwen3", |c| {
        c.remove("head_dim");
    });
    match Qwen3::load_with(&dir, &LoadOptions::default()).map(drop).unwrap_err() {
        Error::WeightShape { key, .. } => assert!(key.starts_with("model.layers.0.self_attn."), "{key}"),
        other => panic!("expected WeightShape, got {other}"),
    }
    let dir = config_altered("qwen3", |c| {
        c.insert("head_dim".into(), 31.into());
    });
    assert!(config_error::<Qwen3>(&dir).contains("head_dim"));
    let dir = config_altered("qwen3", |c| {
        c["rope_parameters"]["rope_type"] = "dynamic".into();
    });
    assert!(config_error::<Qwen3>(&dir).contains("dynamic"));
    let err = Qwen3::load_with(&fixture("qwen2"), &LoadOptions::default()).map(drop).unwrap_err();
    assert!(matches!(err, Error::Config { ref message, .. } if message.contains("qwen3")), "{err}");
}

// ===== OLMo 2 ====================================================================================

#[test]
fn olmo2_logits_match_transformers() {
    check_logits::<Olmo2>("olmo2");
}

#[test]
fn olmo2_greedy_matches_transformers() {
    check_greedy::<Olmo2>("olmo2");
}

#[test]
fn olmo2_padded_rows_and_kv_cache() {
    check_padding::<Olmo2>("olmo2");
    check_cache::<Olmo2>("olmo2");
}

#[test]
fn olmo2_module_paths_and_decoder_view() {
    check_paths::<Olmo2>("olmo2", &[
        ("", "Olmo2"),
        ("model", "Olmo2Model"),
        ("model.embed_tokens", "Embedding"),
        ("model.rotary_emb", "RotaryEmbedding"),
        ("model.layers.1", "Olmo2DecoderLayer"),
        ("model.layers.0.self_attn", "Olmo2Attention"),
        ("model.layers.0.self_attn.q_norm", "Olmo2RmsNorm"),
        ("model.layers.0.self_attn.k_norm", "Olmo2RmsNorm"),
        ("model.layers.0.post_attention_layernorm", "Olmo2RmsNorm"),
        ("model.layers.1.post_feedforward_layernorm", "Olmo2RmsNorm"),
        ("model.layers.0.mlp", "LlamaMlp"),
        ("model.norm", "Olmo2RmsNorm"),
        ("lm_head", "LmHead"),
    ]);
    let model = load::<Olmo2>("olmo2");
    assert!(!model.modules().iter().any(|(p, _)| p.ends_with("input_layernorm")), "OLMo 2 has no input_layernorm");
    fn typed(m: &Olmo2) -> &Vec<Hooked<nnsight::models::olmo2::Olmo2DecoderLayer>> {
        &m.model.layers
    }
    check_decoder::<Olmo2>("olmo2", typed);
}

/// Layer 1 by hand: attention on the unnormalised residual, q/k norms over the whole
/// projection (64 / 32 wide) before the head split, post-sublayer norms inside the residual.
#[test]
fn olmo2_layer_matches_hand_computation() {
    let model = lm::<Olmo2>("olmo2");
    let w = weights(fixture("olmo2").join("model.safetensors"));
    let g = |n: &str| w[&format!("model.layers.1.{n}")].shallow_clone();
    let saved = trace!(model, PROMPT, {
        vec![model.model.layers[0].output.save(), model.model.layers[1].self_attn.q.output.save(),
             model.model.layers[1].self_attn.k.output.save(), model.model.layers[1].self_attn.output.save(),
             model.model.layers[1].mlp.output.save(), model.model.layers[1].output.save()]
    })
    .unwrap();
    let [h0, q, k, attn, mlp, h1]: [Tensor; 6] = saved.try_into().unwrap();
    let (b, s, hd) = (1, 6, 16);
    let proj = |n: &str, norm: &str| {
        let t = rms_by_hand(&h0.matmul(&g(&format!("self_attn.{n}.weight")).tr()), &g(&format!("self_attn.{norm}.weight")), 1e-6);
        t.view([b, s, -1, hd]).transpose(1, 2)
    };
    let f = default_freqs(hd, 1000.0);
    let (qh, kh) = (rotary_by_hand(&proj("q_proj", "q_norm"), &f), repeat_heads(&rotary_by_hand(&proj("k_proj", "k_norm"), &f), 2));
    let (dq, dk) = (diff(&q, &qh), diff(&k, &kh));
    // Normalising each head instead (Qwen3's way) would not match.
    let per_head = rms_by_hand(&h0.matmul(&g("self_attn.q_proj.weight").tr()).view([b, s, 4, hd]), &g("self_attn.q_norm.weight").view([4, hd]), 1e-6);
    assert!(diff(&rotary_by_hand(&per_head.transpose(1, 2), &f), &q) > 1e-3, "per-head normalisation cannot match");
    let mid = &h0 + rms_by_hand(&attn, &g("post_attention_layernorm.weight"), 1e-6);
    let out = &mid + rms_by_hand(&mlp, &g("post_feedforward_layernorm.weight"), 1e-6);
    let dh = diff(&h1, &out);
    assert!(dq < TOL && dk < TOL && dh < TOL, "olmo2 by hand: q {dq}, k {dk}, layer output {dh}");
    eprintln!("olmo2 layer 1 by hand: q {dq:.2e}, k {dk:.2e}, layer output {dh:.2e}");
}

#[test]
fn olmo2_bad_input_is_refused() {
    check_bad_weights::<Olmo2>(
        "olmo2",
        &["model.layers.1.post_feedforward_layernorm.weight", "model.layers.0.self_attn.k_norm.weight", "lm_head.weight"],
        "model.layers.1.self_attn.q_norm.weight",
    );
    let dir = config_altered("olmo2", |c| {
        c["rope_parameters"]["rope_type"] = "yarn".into();
    });
    let m = config_error::<Olmo2>(&dir);
    assert!(m.contains("rope_parameters") && m.contains("yarn"), "{m}");
    let dir = config_altered("olmo2", |c| {
        c.insert("rms_norm_eps".into(), 0.0.into());
    });
    assert!(config_error::<Olmo2>(&dir).contains("rms_norm_eps"));
    let err = Olmo2::load_with(&fixture("llama"), &LoadOptions::default()).map(drop).unwrap_err();
    assert!(matches!(err, Error::Config { ref message, .. } if message.contains("olmo2")), "{err}");
}

// ===== Phi-3 =====================================================================================

#[test]
fn phi3_logits_match_transformers() {
    check_logits::<Phi3>("phi3");
}

#[test]
fn phi3_greedy_matches_transformers() {
    check_greedy::<Phi3>("phi3");
}

#[test]
fn phi3_padded_rows_and_kv_cache() {
    check_padding::<Phi3>("phi3");
    check_cache::<Phi3>("phi3");
}

#[test]
fn phi3_module_paths_and_decoder_view() {
    check_paths::<Phi3>("phi3", &[
        ("", "Phi3"),
        ("model", "Phi3Model"),
        ("model.embed_tokens", "Embedding"),
        ("model.rotary_emb", "RotaryEmbedding"),
        ("model.layers.1", "Phi3DecoderLayer"),
        ("model.layers.0.input_layernorm", "RmsNorm"),
        ("model.layers.0.self_attn", "Phi3Attention"),
        ("model.layers.0.self_attn.qkv_proj", "Linear"),
        ("model.layers.0.self_attn.o_proj", "Linear"),
        ("model.layers.0.self_attn.v", "HookPoint"),
        ("model.layers.1.mlp", "Phi3Mlp"),
        ("model.layers.1.mlp.gate_up_proj", "Linear"),
        ("model.layers.1.mlp.down_proj", "Linear"),
        ("model.layers.1.mlp.activation_fn", "HiddenAct"),
        ("model.norm", "RmsNorm"),
        ("lm_head", "LmHead"),
    ]);
    fn typed(m: &Phi3) -> &Vec<Hooked<nnsight::models::phi3::Phi3DecoderLayer>> {
        &m.model.layers
    }
    check_decoder::<Phi3>("phi3", typed);
}

/// Layer 1 by hand from `qkv_proj`'s saved output: q = its first 64 columns, k the next 32, v
/// the last 32 (blocks, not per head), partial rotary on the first 8 of 16 dims, GQA; the
/// sliding window (5) in the probs; `mlp.act` = up · silu(gate) from `gate_up_proj`'s halves.
/// Other split orders would not match. A knockout through the `v` point zeroes a head's `z`.
#[test]
fn phi3_fused_projections_split_as_transformers() {
    let model = lm::<Phi3>("phi3");
    let prompt = "t5 t17 t230 t9 t41 t8 t77 t3";
    let saved = trace!(model, prompt, {
        vec![model.model.layers[1].self_attn.qkv_proj.output.save(), model.model.layers[1].self_attn.q.output.save(),
             model.model.layers[1].self_attn.k.output.save(), model.model.layers[1].self_attn.v.output.save(),
             model.model.layers[1].self_attn.probs.output.save(), model.model.layers[1].self_attn.z.output.save(),
             model.model.layers[1].mlp.gate_up_proj.output.save(), model.model.layers[1].mlp.act.output.save()]
    })
    .unwrap();
    let [qkv, q, k, v, probs, z, gate_up, act]: [Tensor; 8] = saved.try_into().unwrap();
    let (b, s, hd) = (1, 8, 16);
    assert_eq!(qkv.size(), [b, s, 128]);
    let heads = |t: Tensor| t.view([b, s, -1, hd]).transpose(1, 2);
    let f = default_freqs(8, 1000.0); // partial_rotary_factor 0.5: 8 rotated dims, frequencies over 8
    let qh = rotary_by_hand(&heads(qkv.narrow(2, 0, 64)), &f);
    let kh = repeat_heads(&rotary_by_hand(&heads(qkv.narrow(2, 64, 32)), &f), 2);
    let vh = repeat_heads(&heads(qkv.narrow(2, 96, 32)), 2);
    let (dq, dk, dv) = (diff(&q, &qh), diff(&k, &kh), diff(&v, &vh));
    assert!(dq < TOL && dk < TOL && dv < TOL, "phi3 split by hand: q {dq}, k {dk}, v {dv}");
    // The dims after the rotated 8 pass through unrotated.
    assert!(diff(&q.narrow(3, 8, 8), &heads(qkv.narrow(2, 0, 64)).narrow(3, 8, 8)) < TOL);
    // Wrong orders: [q | v | k], or per head [q k v] as GPT-NeoX.
    let swapped = repeat_heads(&rotary_by_hand(&heads(qkv.narrow(2, 96, 32)), &f), 2);
    assert!(diff(&k, &swapped) > 1e-3, "the [q | v | k] order cannot match");
    let per_head = qkv.narrow(2, 0, 64).view([b, s, 4, hd]).transpose(1, 2);
    assert!(diff(&rotary_by_hand(&per_head, &default_freqs(16, 1000.0)), &q) > 1e-3, "full rotary cannot match");
    // Sliding window 5: query i sees keys i-4..=i.
    let i = Tensor::arange(s, (Kind::Int64, Device::Cpu));
    let keep = i.unsqueeze(0).le_tensor(&i.unsqueeze(1)).logical_and(&i.unsqueeze(0).gt_tensor(&(i.unsqueeze(1) - 5))).view([1, 1, s, s]);
    let ph = (qh.matmul(&kh.transpose(-1, -2)) * 0.25).masked_fill(&keep.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Double);
    let dp = diff(&probs, &ph);
    let dz = diff(&z, &ph.to_kind(Kind::Float).matmul(&vh).transpose(1, 2));
    assert!(dp < TOL && dz < TOL, "phi3 probs / z by hand: {dp}, {dz}");
    assert_eq!(probs.i((0, 0, 7, ..3)).abs().sum(Kind::Double).double_value(&[]), 0.0, "keys outside the window get 0");
    let (gate, up) = (gate_up.narrow(2, 0, 160), gate_up.narrow(2, 160, 160));
    let da = diff(&act, &(&up * gate.silu()));
    assert!(da < TOL && diff(&act, &(&gate * up.silu())) > 1e-3, "phi3 mlp.act: {da}");
    // Knockout through v: head 3's values zero → its z is zero, the other heads' unchanged.
    let ko = trace!(model, prompt, {
        model.model.layers[1].self_attn.v.output[.., 3] = 0.0;
        model.model.layers[1].self_attn.z.output.save()
    })
    .unwrap();
    assert_eq!(ko.i((.., .., 3)).abs().max().double_value(&[]), 0.0);
    assert!(ko.i((.., .., ..3)).equal(&z.i((.., .., ..3))));
    eprintln!("phi3 layer 1 by hand: q {dq:.2e}, k {dk:.2e}, v {dv:.2e}, probs {dp:.2e}, z {dz:.2e}, act {da:.2e}");
}

#[test]
fn phi3_bad_input_is_refused() {
    check_bad_weights::<Phi3>(
        "phi3",
        &["model.layers.1.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight", "lm_head.weight"],
        "model.layers.0.mlp.down_proj.weight",
    );
    let longrope = serde_json::json!({"rope_type": "longrope", "short_factor": [1.0, 1.0, 1.0, 1.0],
                                      "long_factor": [2.0, 2.0, 2.0, 2.0], "original_max_position_embeddings": 64});
    // transformers 4 spelling (rope_scaling), as the 128k checkpoints have it ...
    let dir = config_altered("phi3", |c| {
        c.insert("rope_scaling".into(), serde_json::json!({"type": "su", "short_factor": [1.0], "long_factor": [2.0]}));
    });
    let m = config_error::<Phi3>(&dir);
    assert!(m.contains("rope_scaling") && m.contains("su") && m.contains("longrope"), "{m}");
    // ... and transformers 5's.
    let dir = config_altered("phi3", |c| {
        c.insert("rope_parameters".into(), longrope.clone());
    });
    let m = config_error::<Phi3>(&dir);
    assert!(m.contains("rope_parameters") && m.contains("longrope"), "{m}");
    let dir = config_altered("phi3", |c| {
        c["rope_parameters"]["rope_type"] = "linear".into();
        c["rope_parameters"]["factor"] = 2.0.into();
    });
    assert!(config_error::<Phi3>(&dir).contains("\"linear\""));
    // 16 * 0.3125 = 5 rotated dims: odd.
    let dir = config_altered("phi3", |c| {
        c["rope_parameters"]["partial_rotary_factor"] = 0.3125.into();
    });
    let m = config_error::<Phi3>(&dir);
    assert!(m.contains("rope_parameters.partial_rotary_factor") && m.contains("even"), "{m}");
    let dir = config_altered("phi3", |c| {
        c["rope_parameters"].as_object_mut().unwrap().remove("partial_rotary_factor");
        c.insert("partial_rotary_factor".into(), 1.5.into());
    });
    assert!(config_error::<Phi3>(&dir).contains("`partial_rotary_factor`"));
    let dir = config_altered("phi3", |c| {
        c.insert("sliding_window".into(), 0.into());
    });
    assert!(config_error::<Phi3>(&dir).contains("sliding_window"));
    let err = Phi3::load_with(&fixture("llama"), &LoadOptions::default()).map(drop).unwrap_err();
    assert!(matches!(err, Error::Config { ref message, .. } if message.contains("phi3")), "{err}");
}

/// Where the rotary settings come from: the top-level `partial_rotary_factor` (Phi-4-mini's
/// spelling) and `rope_theta` give the same model; the fraction, the base and the sliding window
/// are really read.
#[test]
fn phi3_rotary_and_window_settings_are_read() {
    use nnsight::models::llama::Rope;
    let model = load::<Phi3>("phi3");
    assert_eq!(model.config.rotary().unwrap(), nnsight::models::phi3::Rotary { rope: Rope::Default { theta: 1000.0 }, ndims: 8 });
    let reference = logits_of(&model, "phi3");
    let dir = config_altered("phi3", |c| {
        c.remove("rope_parameters");
        c.insert("rope_theta".into(), 1000.0.into());
        c.insert("partial_rotary_factor".into(), 0.5.into());
    });
    assert!(logits_of(&Phi3::from_pretrained(&dir).unwrap(), "phi3").equal(&reference), "top-level spelling");
    for (key, value) in [("partial_rotary_factor", 1.0), ("rope_theta", 10000.0)] {
        let dir = config_altered("phi3", |c| {
            c["rope_parameters"][key] = value.into();
        });
        let d = diff(&logits_of(&Phi3::from_pretrained(&dir).unwrap(), "phi3"), &reference);
        assert!(d > 1e-4, "{key} must matter ({d})");
    }
    let dir = config_altered("phi3", |c| {
        c.insert("sliding_window".into(), Value::Null);
    });
    let d = diff(&logits_of(&Phi3::from_pretrained(&dir).unwrap(), "phi3"), &reference);
    assert!(d > 1e-4, "the sliding window must matter for the 7-token row ({d})");
}

// ===== bf16 ======================================================================================

/// Weights converted to bf16 on load: logits against transformers' own bf16 run of the same
/// weights (`logits_bf16`), and against the f32 logits; generation runs. Returns
/// (difference to transformers' bf16, difference to f32, largest |logit|).
fn check_bf16<M: CausalLm>(name: &str) -> (f64, f64, f64) {
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let reference = weights(fixture(name).join("logits.safetensors"));
    let opts = LoadOptions { device: Device::Cpu, dtype: Some(Kind::BFloat16), ..Default::default() };
    let model = Hooked::with_path("", M::load_with(&fixture(name), &opts).unwrap());
    assert_eq!(model.kind(), Kind::BFloat16);
    let l = logits_of(&model, name);
    assert_eq!(l.kind(), Kind::BFloat16);
    let want = &reference["logits_bf16"];
    assert_eq!(want.kind(), Kind::BFloat16);
    let d_hf = real_diff(&l, want, &mask);
    let d_f32 = real_diff(&l, &reference["logits"], &mask);
    let scale = reference["logits"].abs().max().double_value(&[]);
    let out = model.generate(&input, &mask, 5, &Sampling::Greedy, None).unwrap();
    assert!(out.i((.., ..input.size()[1])).equal(&input), "{name}: the prompt is kept");
    eprintln!("{name} bf16: vs transformers bf16 {d_hf:.3e}, vs f32 {d_f32:.3e} (largest |logit| {scale:.2})");
    (d_hf, d_f32, scale)
}

/// Tolerances, relative to the largest |logit| (about 3.5 here, where one bf16 step is 2^-7 ·
/// 2 ≈ 0.016): against transformers' bf16 run, 2% (about 4 bf16 steps; measured 0.7 to 1.1%:
/// the two sides round a few intermediate results differently, as the bundled Llama already
/// does); against f32, 3% (bf16 keeps 8 significant bits: every weight and intermediate result
/// is rounded by up to 2^-9, adding up over two layers to about 1% of the logit scale; measured
/// 1.1 to 1.9%). A wrong norm, split or rotary gives differences of the order of the logits.
#[test]
fn bf16_logits_match_transformers_bf16() {
    let results = [
        ("qwen2", check_bf16::<Qwen2>("qwen2")),
        ("qwen3", check_bf16::<Qwen3>("qwen3")),
        ("llama3", check_bf16::<Llama>("llama3")),
        ("llama32_tied", check_bf16::<Llama>("llama32_tied")),
        ("olmo2", check_bf16::<Olmo2>("olmo2")),
        ("phi3", check_bf16::<Phi3>("phi3")),
    ];
    for (name, (d_hf, d_f32, scale)) in results {
        assert!(d_hf < 0.02 * scale, "{name}: bf16 logits differ from transformers' bf16 by {d_hf} (scale {scale})");
        assert!(d_f32 < 0.03 * scale, "{name}: bf16 logits differ from f32 by {d_f32} (scale {scale})");
    }
}
