//! GPT-NeoX (Pythia) against Hugging Face transformers and against attention computed by hand,
//! on the tiny random checkpoints made by `fixtures/causal/make_fixtures_gpt_neox.py`
//! (transformers 5.24, eager attention, float32; 2 layers, hidden 64, 4 heads of 16, vocab
//! 1000, rotary base 1000):
//!
//! - `pythia`: `use_parallel_residual = true`, `partial_rotary_factor` 0.25 (4 rotated dims);
//! - `pythia_seq`: `use_parallel_residual = false`, `partial_rotary_factor` 0.5 (8 rotated dims).
//!
//! Each fixture has `expected.json` (the summaries and generations of `make_fixtures.py`) and
//! `logits.safetensors` (transformers' whole logits of the left-padded batch). Loading errors are
//! checked on altered copies written into a temporary folder.

use nnsight::models::causal::{AttnPoint, CausalLm, CausalLmExt, Decoder, KvCacheHandle, LoadOptions, Sampling};
use nnsight::models::gpt_neox::{GptNeoX, Rope, Rotary};
use nnsight::prelude::*;
use serde_json::Value;

mod common;
use common::decoder_fixtures::*;

const FIXTURES: [&str; 2] = ["pythia", "pythia_seq"];

// ----- 1. logits ---------------------------------------------------------------------------

#[test]
fn pythia_logits_match_transformers() {
    check_logits::<GptNeoX>("pythia");
}

#[test]
fn pythia_seq_logits_match_transformers() {
    check_logits::<GptNeoX>("pythia_seq");
}

// ----- 2. greedy generation ------------------------------------------------------------------

#[test]
fn greedy_generation_matches_transformers() {
    for name in FIXTURES {
        check_greedy::<GptNeoX>(name);
    }
}

// ----- 3. padding, KV cache --------------------------------------------------------------------

#[test]
fn padded_rows_match_solo_runs() {
    for name in FIXTURES {
        check_padding::<GptNeoX>(name);
    }
}

#[test]
fn kv_cache_matches_full_forward() {
    for name in FIXTURES {
        check_cache::<GptNeoX>(name);
    }
}

// ----- 4. module paths -------------------------------------------------------------------------

#[test]
fn module_paths_are_the_checkpoint_keys() {
    let model = load::<GptNeoX>("pythia");
    let modules = model.modules();
    let keys: Vec<String> = weights(fixture("pythia").join("model.safetensors")).into_keys().collect();
    // Every weight-bearing module is the prefix of its checkpoint keys ...
    for (path, ty) in &modules {
        if ["Embedding", "LayerNorm", "Linear", "LmHead"].contains(ty) {
            assert!(keys.contains(&format!("{path}.weight")), "module `{path}` ({ty}) has no checkpoint key");
        }
    }
    // ... and every checkpoint key belongs to a module of that path.
    for key in &keys {
        let module = key.rsplit_once('.').unwrap().0;
        assert!(modules.iter().any(|(p, _)| p == module), "checkpoint key `{key}` has no module `{module}`");
    }
    let must_have = [
        ("", "GptNeoX"),
        ("gpt_neox", "GptNeoXModel"),
        ("gpt_neox.embed_in", "Embedding"),
        ("gpt_neox.layers.1", "GptNeoXLayer"),
        ("gpt_neox.layers.0.input_layernorm", "LayerNorm"),
        ("gpt_neox.layers.0.post_attention_layernorm", "LayerNorm"),
        ("gpt_neox.layers.0.attention", "GptNeoXAttention"),
        ("gpt_neox.layers.0.attention.query_key_value", "Linear"),
        ("gpt_neox.layers.0.attention.dense", "Linear"),
        ("gpt_neox.layers.0.mlp", "GptNeoXMlp"),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h", "Linear"),
        ("gpt_neox.layers.0.mlp.act", "HiddenAct"),
        ("gpt_neox.layers.0.mlp.dense_4h_to_h", "Linear"),
        ("gpt_neox.final_layer_norm", "LayerNorm"),
        ("gpt_neox.rotary_emb", "RotaryEmbedding"),
        ("embed_out", "LmHead"),
    ];
    for (path, ty) in must_have {
        assert!(modules.iter().any(|(p, t)| p == path && *t == ty), "no module `{path}` of type {ty}");
    }
    for layer in 0..2 {
        for point in ["q", "k", "scores", "probs", "z"] {
            let path = format!("gpt_neox.layers.{layer}.attention.{point}");
            assert!(modules.iter().any(|(p, t)| *p == path && *t == "HookPoint"), "no hook point `{path}`");
        }
    }
    let tree = model.module_tree();
    assert!(tree.contains("gpt_neox.layers[0].attention.query_key_value"), "{tree}");
    assert!(tree.contains("probs: HookPoint  model.gpt_neox.layers[0].attention.probs"), "{tree}");
    eprintln!("{tree}");
}

/// The [`Decoder`] view reaches the family's own modules: same objects, same paths.
#[test]
fn decoder_view_is_the_same_modules() {
    let model = load::<GptNeoX>("pythia");
    assert_eq!(model.layers().len(), 2);
    for i in 0..2 {
        assert!(std::ptr::eq(&model.layers()[i], &model.gpt_neox.layers[i]), "layers()[{i}] is another module");
        assert_eq!(model.layers()[i].path(), format!("gpt_neox.layers.{i}"));
        assert!(std::ptr::eq(model.attn(i).unwrap(), &model.gpt_neox.layers[i].attention));
        assert!(std::ptr::eq(model.mlp(i).unwrap(), &model.gpt_neox.layers[i].mlp));
        assert_eq!(model.mlp_act(i).unwrap().path(), format!("gpt_neox.layers.{i}.mlp.act"));
        for point in [AttnPoint::Q, AttnPoint::K, AttnPoint::Scores, AttnPoint::Probs, AttnPoint::Z] {
            assert_eq!(model.attn_point(i, point).unwrap().path(), format!("gpt_neox.layers.{i}.attention.{}", point.name()));
        }
    }
    assert_eq!(model.final_norm().path(), "gpt_neox.final_layer_norm");
    assert_eq!(model.unembedding().path(), "embed_out");
    // unembed(last hidden state before the final norm) = the model's logits.
    let e = expected("pythia");
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let logits = model.forward(&input, &mask, &KvCacheHandle::disabled()).unwrap();
    let model_lm = lm::<GptNeoX>("pythia");
    let saved = trace!(model_lm, PROMPT, { vec![model_lm.layers()[1].output.save(), model_lm.embed_out.output.save()] }).unwrap();
    let [h, l]: [Tensor; 2] = saved.try_into().unwrap();
    let d = diff(&tch::no_grad(|| model_lm.unembed(&h)), &l);
    assert!(d < TOL, "unembed(last layer output) differs from the logits by {d}");
    assert_eq!(logits.size()[2], 1000);
}

// ----- 5. attention by hand: partial rotary, per-head qkv, knockout ----------------------------

/// LayerNorm over the last dim written out (biased variance), in f64.
fn layer_norm_by_hand(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let x = x.to_kind(Kind::Double);
    let mean = x.mean_dim([-1].as_slice(), true, Kind::Double);
    let c = &x - mean;
    let var = (&c * &c).mean_dim([-1].as_slice(), true, Kind::Double);
    (c / (var + eps).sqrt() * w.to_kind(Kind::Double) + b.to_kind(Kind::Double)).to_kind(Kind::Float)
}

/// Partial rotary written out pair by pair: for `j < rot / 2`, dims `j` and `j + rot / 2` of
/// each head at position `p` turn by the angle `p / theta^(2j / rot)`; dims `rot..` are kept.
/// `t`: `[batch, heads, seq, head_dim]`, positions `0..seq`.
fn rotary_by_hand(t: &Tensor, rot: i64, theta: f64) -> Tensor {
    let s = t.size()[2];
    let t = t.to_kind(Kind::Double);
    let out = t.copy();
    let half = rot / 2;
    for j in 0..half {
        let angle = Tensor::arange(s, (Kind::Double, Device::Cpu)) / theta.powf(2.0 * j as f64 / rot as f64);
        let (c, sn) = (angle.cos().view([1, 1, s]), angle.sin().view([1, 1, s]));
        let (a, b) = (t.select(3, j), t.select(3, j + half));
        out.select(3, j).copy_(&(&a * &c - &b * &sn));
        out.select(3, j + half).copy_(&(&b * &c + &a * &sn));
    }
    out.to_kind(Kind::Float)
}

/// `exp(s - max) / sum` over the last dim, keys where `keep` is false exactly 0.
fn softmax_by_hand(scores: &Tensor, keep: &Tensor) -> Tensor {
    let s = scores.to_kind(Kind::Double).masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
    let m = s.amax([-1].as_slice(), true);
    let e = (s - m).exp();
    let sum = e.sum_dim_intlist([-1].as_slice(), true, Kind::Double);
    (e / sum).to_kind(Kind::Float)
}

/// Layer 1's attention of `name` computed by hand from the checkpoint's weights (read from the
/// safetensors file) and the saved output of layer 0: LayerNorm, the per-head fused qkv,
/// partial rotary, softmax, and a knockout of key `KEY` for head `HEAD` through the `probs`
/// hook point.
fn check_attention_by_hand(name: &str, rot: i64) {
    const HEAD: i64 = 2;
    const KEY: i64 = 1;
    let model = lm::<GptNeoX>(name);
    let w = weights(fixture(name).join("model.safetensors"));
    let g = |n: &str| w[&format!("gpt_neox.layers.1.{n}")].shallow_clone();
    let plain = tch::no_grad(|| model.forward(&[PROMPT])).unwrap();
    let saved = trace!(model, PROMPT, {
        vec![model.gpt_neox.layers[0].output.save(), model.gpt_neox.layers[1].attention.q.output.save(),
             model.gpt_neox.layers[1].attention.k.output.save(), model.gpt_neox.layers[1].attention.scores.output.save(),
             model.gpt_neox.layers[1].attention.probs.output.save(), model.gpt_neox.layers[1].attention.z.output.save(),
             model.gpt_neox.layers[1].attention.output.save(), model.gpt_neox.layers[1].mlp.act.output.save(),
             model.embed_out.output.save()]
    })
    .unwrap();
    let [h0, q, k, scores, probs, z, out, act, logits]: [Tensor; 9] = saved.try_into().unwrap();
    assert!(logits.equal(&plain), "{name}: logits changed by tracing the points");
    let (b, s, nh, hd) = (1, 6, 4, 16);
    assert_eq!(q.size(), [b, nh, s, hd]);
    assert_eq!(k.size(), [b, nh, s, hd]);
    assert_eq!(scores.size(), [b, nh, s, s]);
    assert_eq!(z.size(), [b, s, nh, hd]);
    assert_eq!(act.size(), [b, s, 160]);

    let x = layer_norm_by_hand(&h0, &g("input_layernorm.weight"), &g("input_layernorm.bias"), 1e-5);
    let qkv = x.matmul(&g("attention.query_key_value.weight").tr()) + g("attention.query_key_value.bias");
    // Per head [q | k | v]: [b, s, heads, 3 * head_dim].
    let per_head = qkv.view([b, s, nh, 3 * hd]).transpose(1, 2);
    let (q_raw, k_raw, v) = (per_head.narrow(3, 0, hd), per_head.narrow(3, hd, hd), per_head.narrow(3, 2 * hd, hd));
    let (q_hand, k_hand) = (rotary_by_hand(&q_raw, rot, 1000.0), rotary_by_hand(&k_raw, rot, 1000.0));
    let dq = diff(&q, &q_hand);
    let dk = diff(&k, &k_hand);
    assert!(dq < TOL && dk < TOL, "{name}: q/k after partial rotary differ from hand by {dq}, {dk}");
    // Only the first `rot` dims turn: the rest are the projection's, and the rotated ones are not.
    assert!(diff(&q.narrow(3, rot, hd - rot), &q_raw.narrow(3, rot, hd - rot)) < TOL, "{name}: dims {rot}.. must pass through");
    assert!(diff(&q.narrow(3, 0, rot), &q_raw.narrow(3, 0, rot)) > 1e-3, "{name}: dims ..{rot} must be rotated");
    // Rotating the whole head instead would be wrong, and so would an all-q/all-k/all-v split.
    assert!(diff(&q, &rotary_by_hand(&q_raw, hd, 1000.0)) > 1e-3, "{name}: whole-head rotary cannot match");
    let blocked = qkv.narrow(2, 0, nh * hd).view([b, s, nh, hd]).transpose(1, 2);
    assert!(diff(&rotary_by_hand(&blocked, rot, 1000.0), &q) > 1e-3, "{name}: the all-q-first layout cannot match");

    let keep = Tensor::ones([s, s], (Kind::Bool, Device::Cpu)).tril(0).view([1, 1, s, s]);
    let hand_scores = q_hand.matmul(&k_hand.transpose(-1, -2)) * 0.25; // head_dim^-0.5
    let probs_hand = softmax_by_hand(&hand_scores, &keep);
    let ds = diff(&scores.masked_select(&keep.expand_as(&scores)), &hand_scores.masked_select(&keep.expand_as(&hand_scores)));
    let dp = diff(&probs, &probs_hand);
    assert!(ds < TOL && dp < TOL, "{name}: scores / probs differ from hand by {ds}, {dp}");
    let dense = |z: &Tensor| z.contiguous().view([b, s, nh * hd]).matmul(&g("attention.dense.weight").tr()) + g("attention.dense.bias");
    let z_hand = probs_hand.matmul(&v).transpose(1, 2);
    let dz = diff(&z, &z_hand);
    let dout = diff(&out, &dense(&z_hand));
    assert!(dz < TOL && dout < TOL, "{name}: z / attention output differ from hand by {dz}, {dout}");
    // act = gelu(dense_h_to_4h(post_attention_layernorm(.))): the LayerNorm reads the layer
    // input (parallel residual) or the input plus the attention output (sequential).
    let mlp_in = if name == "pythia" { h0.shallow_clone() } else { &h0 + &out };
    let ln2 = layer_norm_by_hand(&mlp_in, &g("post_attention_layernorm.weight"), &g("post_attention_layernorm.bias"), 1e-5);
    let act_hand = (ln2.matmul(&g("mlp.dense_h_to_4h.weight").tr()) + g("mlp.dense_h_to_4h.bias")).gelu("none");
    let da = diff(&act, &act_hand);
    assert!(da < TOL, "{name}: mlp.act differs from hand by {da}");

    // Knockout: head HEAD may not attend to key KEY.
    let ko = trace!(model, PROMPT, {
        model.gpt_neox.layers[1].attention.probs.output[.., HEAD, .., KEY] = 0.0;
        model.gpt_neox.layers[1].attention.output.save()
    })
    .unwrap();
    let p = probs_hand.copy();
    let _ = p.narrow(1, HEAD, 1).narrow(3, KEY, 1).fill_(0.0);
    let want = dense(&p.matmul(&v).transpose(1, 2));
    let dko = diff(&ko, &want);
    assert!(dko < TOL, "{name}: knockout differs from hand by {dko}");
    assert!(diff(&ko, &out) > 1e-4, "{name}: the knockout must change the output");
    eprintln!(
        "{name} layer 1 by hand: q {dq:.2e}, k {dk:.2e}, scores {ds:.2e}, probs {dp:.2e}, z {dz:.2e}, out {dout:.2e}, \
         act {da:.2e}, knockout {dko:.2e}"
    );
}

#[test]
fn pythia_attention_and_knockout_match_hand_computation() {
    check_attention_by_hand("pythia", 4);
}

#[test]
fn pythia_seq_attention_and_knockout_match_hand_computation() {
    check_attention_by_hand("pythia_seq", 8);
}

// ----- 6. bad input ------------------------------------------------------------------------------

#[test]
fn missing_and_misshapen_weights_are_errors() {
    for key in ["gpt_neox.layers.1.mlp.dense_h_to_4h.bias", "embed_out.weight", "gpt_neox.final_layer_norm.weight"] {
        let dir = altered("pythia", |_| {}, |t| t.retain(|(k, _)| k != key));
        match GptNeoX::load_with(&dir, &LoadOptions::default()).unwrap_err() {
            Error::MissingWeight { file, key: k } => {
                assert_eq!(k, key);
                assert!(file.ends_with("model.safetensors"), "{file}");
            }
            other => panic!("expected MissingWeight for {key}, got {other}"),
        }
    }
    let qkv = "gpt_neox.layers.0.attention.query_key_value.weight";
    let dir = altered("pythia", |_| {}, |t| {
        let v = t.iter_mut().find(|(k, _)| k == qkv).unwrap();
        v.1 = Tensor::zeros([128, 64], (Kind::Float, Device::Cpu)); // q and k only
    });
    let err = GptNeoX::load_with(&dir, &LoadOptions::default()).unwrap_err();
    eprintln!("{err}");
    match err {
        Error::WeightShape { file, key, expected, actual } => {
            assert_eq!(key, qkv);
            assert!(file.ends_with("model.safetensors"), "{file}");
            assert_eq!((expected, actual), (vec![192, 64], vec![128, 64]));
        }
        other => panic!("expected WeightShape, got {other}"),
    }
}

#[test]
fn bad_configs_are_errors_naming_the_key() {
    // 16 * 0.3125 = 5 rotary dims: odd. transformers 5 spelling ...
    let dir = altered("pythia", |c| {
        c["rope_parameters"]["partial_rotary_factor"] = 0.3125.into();
    }, |_| {});
    let m = config_error::<GptNeoX>(&dir);
    assert!(m.contains("rope_parameters.partial_rotary_factor") && m.contains("even"), "{m}");
    // ... and transformers 4 / Hub spelling.
    let dir = altered("pythia", |c| {
        c.remove("rope_parameters");
        c.insert("rotary_pct".into(), 0.3125.into());
    }, |_| {});
    let m = config_error::<GptNeoX>(&dir);
    assert!(m.contains("rotary_pct") && m.contains("even"), "{m}");
    let dir = altered("pythia", |c| {
        c["rope_parameters"]["partial_rotary_factor"] = 1.5.into();
    }, |_| {});
    assert!(config_error::<GptNeoX>(&dir).contains("partial_rotary_factor"));
    // 64 is not a multiple of 5 heads.
    let dir = altered("pythia", |c| {
        c.insert("num_attention_heads".into(), 5.into());
    }, |_| {});
    let m = config_error::<GptNeoX>(&dir);
    assert!(m.contains("hidden_size") && m.contains("num_attention_heads"), "{m}");
    let dir = altered("pythia", |c| {
        c["rope_parameters"]["rope_type"] = "yarn".into();
    }, |_| {});
    assert!(config_error::<GptNeoX>(&dir).contains("yarn"));
    let dir = altered("pythia", |c| {
        c.insert("layer_norm_eps".into(), (-1.0).into());
    }, |_| {});
    assert!(config_error::<GptNeoX>(&dir).contains("layer_norm_eps"));
    // Another family's config.
    let err = GptNeoX::load_with(&fixture("llama"), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Config { ref path, ref message } if path.ends_with("config.json") && message.contains("gpt_neox")), "{err}");
}

/// The Hub's Pythia spelling (`rotary_pct`, `rotary_emb_base`, transformers 4) gives the same
/// model as transformers 5's `rope_parameters`; the base and the fraction are really read.
#[test]
fn rotary_config_spellings() {
    let v5 = load::<GptNeoX>("pythia");
    assert_eq!(v5.config.rotary().unwrap(), Rotary { rope: Rope::Default { theta: 1000.0 }, ndims: 4 });
    let reference = logits_of(&v5, "pythia");
    let dir = altered("pythia", |c| {
        c.remove("rope_parameters");
        c.insert("rotary_pct".into(), 0.25.into());
        c.insert("rotary_emb_base".into(), 1000.into());
        c.insert("rope_scaling".into(), Value::Null);
    }, |_| {});
    let v4 = GptNeoX::from_pretrained(&dir).unwrap();
    assert!(logits_of(&v4, "pythia").equal(&reference), "rotary_pct / rotary_emb_base spelling");
    // No rotary settings at all: transformers' defaults, 0.25 and 10000.
    let dir = altered("pythia", |c| {
        c.remove("rope_parameters");
    }, |_| {});
    let defaults = GptNeoX::from_pretrained(&dir).unwrap();
    assert_eq!(defaults.config.rotary().unwrap(), Rotary { rope: Rope::Default { theta: 10000.0 }, ndims: 4 });
    assert!(diff(&logits_of(&defaults, "pythia"), &reference) > 1e-4, "the base must matter");
    let dir = altered("pythia", |c| {
        c["rope_parameters"]["partial_rotary_factor"] = 0.5.into();
    }, |_| {});
    let half = GptNeoX::from_pretrained(&dir).unwrap();
    assert_eq!(half.gpt_neox.layers[0].attention.rotary_ndims, 8);
    assert!(diff(&logits_of(&half, "pythia"), &reference) > 1e-4, "the rotary fraction must matter");
}

/// `tie_word_embeddings`: `embed_out` is `embed_in`'s weight, and a checkpoint without
/// `embed_out.weight` loads.
#[test]
fn tied_embeddings_share_the_weight() {
    let dir = altered("pythia", |c| {
        c.insert("tie_word_embeddings".into(), true.into());
    }, |t| t.retain(|(k, _)| k != "embed_out.weight"));
    let tied = GptNeoX::from_pretrained(&dir).unwrap();
    assert!(tied.embed_out.weight.data_ptr() == tied.gpt_neox.embed_in.ws.data_ptr(), "embed_out must share embed_in");
}

// ----- 7. bf16 -------------------------------------------------------------------------------------

/// Weights converted to bf16 on load: logits close to the f32 ones and generation runs.
///
/// Tolerance: 3% of the largest |logit|. bf16 keeps 8 significant bits, so every weight and
/// every intermediate result is rounded by up to 2^-9 ≈ 0.2% of its size; over two layers
/// (LayerNorms, 64- and 160-wide sums, softmax) and the 64-wide unembedding these add to about
/// 1% of the logit scale (the run prints the measured value). A wrong layout, rotary or
/// residual gives differences of the order of the logits themselves.
#[test]
fn bf16_logits_close_to_f32_and_generate_runs() {
    for name in FIXTURES {
        let e = expected(name);
        let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
        let f32_logits = logits_of(&load::<GptNeoX>(name), name);
        let scale = f32_logits.abs().max().double_value(&[]);
        let opts = LoadOptions { device: Device::Cpu, dtype: Some(Kind::BFloat16), ..Default::default() };
        let bf16 = Hooked::with_path("", GptNeoX::load_with(&fixture(name), &opts).unwrap());
        assert_eq!(bf16.kind(), Kind::BFloat16);
        let l = logits_of(&bf16, name);
        assert_eq!(l.kind(), Kind::BFloat16);
        let d = real_diff(&l, &f32_logits, &mask);
        eprintln!("{name} bf16 vs f32: {d:.4} (largest |logit| {scale:.2}, {:.2}%)", 100.0 * d / scale);
        assert!(d < 0.03 * scale, "{name}: bf16 logits off by {d} (scale {scale})");
        let out = bf16.generate(&input, &mask, 5, &Sampling::Greedy, None).unwrap();
        assert_eq!(out.size(), vec![3, input.size()[1] + 5]);
        assert!(out.i((.., ..input.size()[1])).equal(&input), "the prompt is kept");
        let new = out.i((.., input.size()[1]..));
        assert!(new.ge(0).all().int64_value(&[]) == 1 && new.lt(1000).all().int64_value(&[]) == 1);
    }
}

/// Checkpoints as the Hub's Pythia ones are: extra buffers (`attention.bias` causal mask,
/// `attention.masked_bias`, `attention.rotary_emb.inv_freq`) are ignored; keys without the
/// `gpt_neox.` prefix (a bare `GPTNeoXModel` plus `embed_out`) load too.
#[test]
fn legacy_buffers_and_unprefixed_keys_load() {
    let reference = logits_of(&load::<GptNeoX>("pythia"), "pythia");
    let dir = altered("pythia", |_| {}, |t| {
        for l in 0..2 {
            let p = format!("gpt_neox.layers.{l}.attention");
            t.push((format!("{p}.bias"), Tensor::ones([1, 1, 128, 128], (Kind::Bool, Device::Cpu)).tril(0)));
            t.push((format!("{p}.masked_bias"), Tensor::from(-1e9f32)));
            t.push((format!("{p}.rotary_emb.inv_freq"), Tensor::from_slice(&[1.0f32, 0.03])));
        }
    });
    let legacy = GptNeoX::from_pretrained(&dir).unwrap();
    assert!(logits_of(&legacy, "pythia").equal(&reference), "extra buffers must not change the model");
    let dir = altered("pythia", |_| {}, |t| t.iter_mut().for_each(|(k, _)| *k = k.trim_start_matches("gpt_neox.").to_string()));
    let bare = GptNeoX::from_pretrained(&dir).unwrap();
    assert!(logits_of(&bare, "pythia").equal(&reference), "keys without `gpt_neox.`");
    // rotary_pct 0: no rotary at all (positions then enter nowhere); loads and runs.
    let dir = altered("pythia", |c| {
        c["rope_parameters"]["partial_rotary_factor"] = 0.0.into();
    }, |_| {});
    let none = GptNeoX::from_pretrained(&dir).unwrap();
    assert_eq!(none.gpt_neox.layers[1].attention.rotary_ndims, 0);
    let l = logits_of(&none, "pythia");
    assert!(l.isfinite().all().int64_value(&[]) == 1 && diff(&l, &reference) > 1e-4);
}

/// `generate!` with the KV cache (`.next()` moves each point to step 1): step 1 has q for the
/// one new token, k for the cached and the new positions, and its probs are the softmax of its
/// q kᵀ / 4 by hand (the new token sees every key); the generated tokens are the greedy ones.
#[test]
fn hook_points_with_the_kv_cache_during_generation() {
    let model = lm::<GptNeoX>("pythia");
    let prompt: Vec<i64> = vec![5, 17, 230, 9];
    let s = prompt.len() as i64;
    let saved = generate!(model, prompt.clone(), max_new_tokens = 2, stop_at_eos = false, {
        vec![model.gpt_neox.layers[0].attention.k.output.save(), model.gpt_neox.layers[0].attention.q.next().output.save(),
             model.gpt_neox.layers[0].attention.k.next().output.save(), model.gpt_neox.layers[0].attention.probs.next().output.save(),
             model.gpt_neox.layers[0].attention.z.next().output.save()]
    })
    .unwrap();
    let [k0, q1, k1, probs1, z1]: [Tensor; 5] = saved.try_into().unwrap();
    assert_eq!(k0.size(), [1, 4, s, 16]);
    assert_eq!(q1.size(), [1, 4, 1, 16]);
    assert_eq!(k1.size(), [1, 4, s + 1, 16]);
    assert_eq!(probs1.size(), [1, 4, 1, s + 1]);
    assert_eq!(z1.size(), [1, 1, 4, 16]);
    assert!(k1.narrow(2, 0, s).equal(&k0), "step 1's keys start with the cached step-0 keys");
    let keep = Tensor::ones([1, 1, 1, s + 1], (Kind::Bool, Device::Cpu));
    let d = diff(&probs1, &softmax_by_hand(&(q1.matmul(&k1.transpose(-1, -2)) * 0.25), &keep));
    assert!(d < TOL, "step 1 probs differ from softmax(q kᵀ / 4) by {d}");
}
