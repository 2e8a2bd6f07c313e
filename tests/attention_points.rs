//! The hook points inside attention (`q`, `k`, `scores`, `probs`, `z`) and the MLP (`act`) of
//! the bundled families (issue 15, item 2), checked against attention computed by hand with tch
//! from the checkpoint's own weights (read from the safetensors file, not from the model):
//! GPT-2 and Llama on the tiny fixtures of `fixtures/causal` (4 heads of 16, Llama with 2
//! key/value heads and rotary, theta 1000), BERT on all-MiniLM-L6-v2 (12 heads of 32).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use nnsight::models::causal::{CausalLm, LoadOptions};
use nnsight::models::gpt2::Gpt2;
use nnsight::models::llama::Llama;
use nnsight::prelude::*;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{LanguageModel, ModuleTree, TextModel};

/// Tolerance between the model and the hand computation (f32).
const TOL: f64 = 1e-5;
const PROMPT: &str = "t5 t17 t230 t9 t41 t8";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name)
}

fn lm<M: CausalLm + TextModel>(name: &str) -> LanguageModel<M> {
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let wl = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let model = M::load_with(&fixture(name), &LoadOptions { device: Device::Cpu, dtype: None, ..Default::default() }).unwrap();
    LanguageModel::from_parts(model, tok, Device::Cpu).unwrap()
}

/// The checkpoint's tensors by key, read straight from the safetensors file.
fn weights(file: PathBuf) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(file).unwrap().into_iter().collect()
}

fn diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Softmax over the last dim with `keep` (bool, broadcast to `scores`) masking, written out:
/// `exp(s - max) / sum`, masked keys exactly 0.
fn softmax_by_hand(scores: &Tensor, keep: &Tensor) -> Tensor {
    let s = scores.to_kind(Kind::Double).masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
    let m = s.amax([-1].as_slice(), true);
    let e = (s - m).exp();
    let sum = e.sum_dim_intlist([-1].as_slice(), true, Kind::Double);
    (e / sum).to_kind(Kind::Float)
}

/// Causal keep mask `[1, 1, s, s]`: key j visible to query i when j <= i.
fn causal_keep(s: i64) -> Tensor {
    Tensor::ones([s, s], (Kind::Bool, Device::Cpu)).tril(0).view([1, 1, s, s])
}

/// The checks shared by every family, on one attention module's saved points:
/// probs rows sum to 1 and equal softmax of the scores computed by hand from the saved q, k;
/// the saved scores equal that hand computation where visible; z equals probs v by hand.
fn check_points(what: &str, q: &Tensor, k: &Tensor, v: &Tensor, scores: &Tensor, probs: &Tensor, z: &Tensor, keep: &Tensor, scale: f64) {
    let hand_scores = q.matmul(&k.transpose(-1, -2)) * scale;
    let d_scores = diff(&scores.masked_select(&keep.expand_as(scores)), &hand_scores.masked_select(&keep.expand_as(&hand_scores)));
    assert!(d_scores < TOL, "{what}: scores differ by {d_scores}");
    let rows = probs.sum_dim_intlist([-1].as_slice(), false, Kind::Double);
    let d_rows = (rows - 1.0).abs().max().double_value(&[]);
    assert!(d_rows < TOL, "{what}: probs rows sum to 1 +- {d_rows}");
    let d_probs = diff(probs, &softmax_by_hand(&hand_scores, keep));
    assert!(d_probs < TOL, "{what}: probs differ from softmax(q kᵀ · scale + mask) by {d_probs}");
    let d_z = diff(z, &probs.matmul(v).transpose(1, 2));
    assert!(d_z < TOL, "{what}: z differs from probs v by {d_z}");
    eprintln!("{what}: scores {d_scores:.2e}, rows {d_rows:.2e}, probs {d_probs:.2e}, z {d_z:.2e}");
}

/// Knockout of key `key` for head `head` and z of head `head` zeroed, by hand: the attention
/// output from `probs`/`v` with the edit, projected by `proj`.
fn knocked(probs: &Tensor, v: &Tensor, head: i64, key: i64) -> Tensor {
    let p = probs.copy();
    let _ = p.narrow(1, head, 1).narrow(3, key, 1).fill_(0.0);
    p.matmul(v).transpose(1, 2)
}

fn zero_head(z: &Tensor, head: i64) -> Tensor {
    let z = z.copy();
    let _ = z.narrow(2, head, 1).fill_(0.0);
    z
}

fn merge(z: &Tensor) -> Tensor {
    let s = z.size();
    z.contiguous().view([s[0], s[1], -1])
}

// ----- GPT-2 -----------------------------------------------------------------------------

#[test]
fn gpt2_points_match_attention_by_hand() {
    let model = lm::<Gpt2>("gpt2");
    let w = weights(fixture("gpt2").join("model.safetensors"));
    let (wa, ba) = (&w["transformer.h.1.attn.c_attn.weight"], &w["transformer.h.1.attn.c_attn.bias"]);
    let (wp, bp) = (&w["transformer.h.1.attn.c_proj.weight"], &w["transformer.h.1.attn.c_proj.bias"]);
    let plain = tch::no_grad(|| model.forward(&[PROMPT])).unwrap();
    let saved = trace!(model, PROMPT, {
        vec![model.transformer.h[1].attn.input.save(), model.transformer.h[1].attn.q.output.save(), model.transformer.h[1].attn.k.output.save(),
             model.transformer.h[1].attn.scores.output.save(), model.transformer.h[1].attn.probs.output.save(), model.transformer.h[1].attn.z.output.save(),
             model.transformer.h[1].attn.output.save(), model.transformer.h[1].mlp.act.output.save(), model.transformer.h[1].mlp.input.save(), model.lm_head.output.save()]
    })
    .unwrap();
    let [x, q, k, scores, probs, z, out, act, mlp_in, logits]: [Tensor; 10] = saved.try_into().unwrap();
    // Nothing edited: bit-identical to the plain forward.
    assert!(logits.equal(&plain), "GPT-2 logits changed by tracing the points");
    let (b, s) = (1, 6);
    assert_eq!(q.size(), [b, 4, s, 16]);
    assert_eq!(scores.size(), [b, 4, s, s]);
    assert_eq!(z.size(), [b, s, 4, 16]);
    assert_eq!(act.size(), [b, s, 256]);
    // q, k, v from the checkpoint's c_attn (Conv1D: x W + b), split into heads.
    let qkv = x.matmul(wa) + ba;
    let heads = |t: &Tensor| t.view([b, s, 4, 16]).transpose(1, 2);
    let parts = qkv.split(64, 2);
    assert!(diff(&q, &heads(&parts[0])) < TOL && diff(&k, &heads(&parts[1])) < TOL, "GPT-2 q/k");
    let v = heads(&parts[2]);
    check_points("GPT-2 h.1", &q, &k, &v, &scores, &probs, &z, &causal_keep(s), 0.25);
    let proj = |z: &Tensor| merge(z).matmul(wp) + bp;
    assert!(diff(&out, &proj(&z)) < TOL, "GPT-2 attn output = c_proj(z)");
    // act: gelu_new(c_fc(ln_2(x))), from the saved MLP input.
    let act_hand = (mlp_in.matmul(&w["transformer.h.1.mlp.c_fc.weight"]) + &w["transformer.h.1.mlp.c_fc.bias"]).gelu("tanh");
    assert!(diff(&act, &act_hand) < TOL, "GPT-2 mlp.act");

    // Knockout: head 2 may not attend to key 1.
    let ko = trace!(model, PROMPT, {
        model.transformer.h[1].attn.probs.output[.., 2, .., 1] = 0.0;
        model.transformer.h[1].attn.output.save()
    })
    .unwrap();
    let want = proj(&knocked(&probs, &v, 2, 1));
    let d = diff(&ko, &want);
    assert!(d < TOL, "GPT-2 knockout differs from hand by {d}");
    assert!(diff(&ko, &out) > 1e-4, "the knockout must change the output");
    // z of head 3 zeroed.
    let zo = trace!(model, PROMPT, {
        model.transformer.h[1].attn.z.output[.., .., 3] = 0.0;
        model.transformer.h[1].attn.output.save()
    })
    .unwrap();
    let d = diff(&zo, &proj(&zero_head(&z, 3)));
    assert!(d < TOL, "GPT-2 z edit differs from hand by {d}");
    assert!(diff(&zo, &out) > 1e-4, "the z edit must change the output");
}

// ----- Llama -----------------------------------------------------------------------------

fn rotate_half(x: &Tensor) -> Tensor {
    let h = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, h, h), x.narrow(3, 0, h)], 3)
}

#[test]
fn llama_points_match_attention_by_hand() {
    let model = lm::<Llama>("llama");
    let w = weights(fixture("llama").join("model.safetensors"));
    let key = |n: &str| &w[&format!("model.layers.1.self_attn.{n}.weight")];
    let plain = tch::no_grad(|| model.forward(&[PROMPT])).unwrap();
    let saved = trace!(model, PROMPT, {
        vec![model.model.layers[1].self_attn.input.save(), model.model.layers[1].self_attn.q.output.save(), model.model.layers[1].self_attn.k.output.save(),
             model.model.layers[1].self_attn.scores.output.save(), model.model.layers[1].self_attn.probs.output.save(), model.model.layers[1].self_attn.z.output.save(),
             model.model.layers[1].self_attn.output.save(), model.model.layers[1].mlp.act.output.save(), model.model.layers[1].mlp.input.save(), model.lm_head.output.save()]
    })
    .unwrap();
    let [x, q, k, scores, probs, z, out, act, mlp_in, logits]: [Tensor; 10] = saved.try_into().unwrap();
    assert!(logits.equal(&plain), "Llama logits changed by tracing the points");
    let (b, s, hd) = (1, 6, 16);
    assert_eq!(k.size(), [b, 4, s, hd], "k has the query heads (after repeat_kv)");
    assert_eq!(act.size(), [b, s, 160]);
    // Rotary by hand: theta 1000, positions 0..s, rotate_half convention.
    let inv = Tensor::from_slice(&(0..hd / 2).map(|i| 1.0f32 / 1000f32.powf(2.0 * i as f32 / hd as f32)).collect::<Vec<_>>());
    let freqs = Tensor::arange(s, (Kind::Float, Device::Cpu)).unsqueeze(1) * inv.unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], 1).view([1, 1, s, hd]);
    let (cos, sin) = (emb.cos(), emb.sin());
    let split = |t: Tensor| t.view([b, s, -1, hd]).transpose(1, 2);
    let rope = |t: &Tensor| t * &cos + rotate_half(t) * &sin;
    let q_hand = rope(&split(x.matmul(&key("q_proj").tr())));
    // Key/value head j serves query heads 2j and 2j + 1.
    let rep = |t: Tensor| t.repeat_interleave_self_int(2, Some(1), None::<i64>);
    let k_hand = rep(rope(&split(x.matmul(&key("k_proj").tr()))));
    let v = rep(split(x.matmul(&key("v_proj").tr())));
    assert!(diff(&q, &q_hand) < TOL, "Llama q after rotary: {}", diff(&q, &q_hand));
    assert!(diff(&k, &k_hand) < TOL, "Llama k after rotary: {}", diff(&k, &k_hand));
    check_points("Llama layers.1", &q, &k, &v, &scores, &probs, &z, &causal_keep(s), 0.25);
    let proj = |z: &Tensor| merge(z).matmul(&key("o_proj").tr());
    assert!(diff(&out, &proj(&z)) < TOL, "Llama self_attn output = o_proj(z)");
    let mw = |n: &str| w[&format!("model.layers.1.mlp.{n}.weight")].tr();
    let act_hand = mlp_in.matmul(&mw("gate_proj")).silu() * mlp_in.matmul(&mw("up_proj"));
    assert!(diff(&act, &act_hand) < TOL, "Llama mlp.act = silu(gate) * up");

    let ko = trace!(model, PROMPT, {
        model.model.layers[1].self_attn.probs.output[.., 1, .., 0] = 0.0;
        model.model.layers[1].self_attn.output.save()
    })
    .unwrap();
    let d = diff(&ko, &proj(&knocked(&probs, &v, 1, 0)));
    assert!(d < TOL, "Llama knockout differs from hand by {d}");
    assert!(diff(&ko, &out) > 1e-4, "the knockout must change the output");
    let zo = trace!(model, PROMPT, {
        model.model.layers[1].self_attn.z.output[.., .., 0] = 0.0;
        model.model.layers[1].self_attn.output.save()
    })
    .unwrap();
    let d = diff(&zo, &proj(&zero_head(&z, 0)));
    assert!(d < TOL, "Llama z edit differs from hand by {d}");
    assert!(diff(&zo, &out) > 1e-4, "the z edit must change the output");
}

// ----- BERT (all-MiniLM-L6-v2) ------------------------------------------------------------

#[test]
fn bert_points_match_attention_by_hand() {
    let model = common::minilm::minilm();
    let w = weights(common::minilm::minilm_dir().join("model.safetensors"));
    let get = |n: &str| {
        w.get(n).or_else(|| w.get(&format!("bert.{n}"))).unwrap_or_else(|| panic!("no {n}")).shallow_clone()
    };
    let lin = |x: &Tensor, n: &str| x.matmul(&get(&format!("{n}.weight")).tr()) + get(&format!("{n}.bias"));
    let sentence = common::minilm::PARIS;
    let plain = tch::no_grad(|| model.forward(&[sentence])).unwrap();
    let saved = trace!(model, sentence, {
        vec![model.encoder.layer[2].attention.self_.input.save(), model.encoder.layer[2].attention.self_.q.output.save(), model.encoder.layer[2].attention.self_.k.output.save(),
             model.encoder.layer[2].attention.self_.scores.output.save(), model.encoder.layer[2].attention.self_.probs.output.save(), model.encoder.layer[2].attention.self_.z.output.save(),
             model.encoder.layer[2].attention.self_.output.save(), model.encoder.layer[2].intermediate.act.output.save(), model.encoder.layer[2].intermediate.input.save(), model.output.save()]
    })
    .unwrap();
    let [x, q, k, scores, probs, z, out, act, inter_in, last]: [Tensor; 10] = saved.try_into().unwrap();
    assert!(last.equal(&plain), "MiniLM output changed by tracing the points");
    let s = x.size()[1];
    let (b, hd) = (1, 32);
    let p = "encoder.layer.2.attention.self";
    let split = |t: Tensor| t.view([b, s, 12, hd]).transpose(1, 2);
    let (q_hand, k_hand, v) =
        (split(lin(&x, &format!("{p}.query"))), split(lin(&x, &format!("{p}.key"))), split(lin(&x, &format!("{p}.value"))));
    assert!(diff(&q, &q_hand) < TOL && diff(&k, &k_hand) < TOL, "BERT q/k");
    // One sentence, no padding: every key visible.
    let keep = Tensor::ones([1, 1, s, s], (Kind::Bool, Device::Cpu));
    check_points("BERT layer.2", &q, &k, &v, &scores, &probs, &z, &keep, (hd as f64).powf(-0.5));
    assert!(diff(&out, &merge(&z)) < TOL, "BERT self output = merged z");
    let act_hand = lin(&inter_in, "encoder.layer.2.intermediate.dense").gelu("none");
    assert!(diff(&act, &act_hand) < TOL, "BERT intermediate.act");

    let ko = trace!(model, sentence, {
        model.encoder.layer[2].attention.self_.probs.output[.., 5, .., 3] = 0.0;
        model.encoder.layer[2].attention.self_.output.save()
    })
    .unwrap();
    let d = diff(&ko, &merge(&knocked(&probs, &v, 5, 3)));
    assert!(d < TOL, "BERT knockout differs from hand by {d}");
    assert!(diff(&ko, &out) > 1e-4, "the knockout must change the output");
    let zo = trace!(model, sentence, {
        model.encoder.layer[2].attention.self_.z.output[.., .., 7] = 0.0;
        model.encoder.layer[2].attention.output.save()
    })
    .unwrap();
    // attention.output = LayerNorm(dense(z merged) + x), by hand.
    let po = "encoder.layer.2.attention.output";
    let pre = lin(&merge(&zero_head(&z, 7)), &format!("{po}.dense")) + &x;
    let want = pre.layer_norm([384].as_slice(), Some(&get(&format!("{po}.LayerNorm.weight"))),
                              Some(&get(&format!("{po}.LayerNorm.bias"))), 1e-12, false);
    let d = diff(&zo, &want);
    assert!(d < TOL, "BERT z edit differs from hand by {d}");
}

/// The new points are in the module tree under the same names in every family.
#[test]
fn points_are_in_the_module_tree() {
    let gpt2 = lm::<Gpt2>("gpt2");
    let llama = lm::<Llama>("llama");
    let bert = common::minilm::minilm();
    let has = |m: &[(String, &'static str)], path: &str, ty: &str| {
        assert!(m.iter().any(|(p, t)| p == path && *t == ty), "no `{path}` of type {ty}");
    };
    let (g, l, b) = (gpt2.modules(), llama.modules(), bert.modules());
    for point in ["q", "k", "scores", "probs", "z"] {
        has(&g, &format!("transformer.h.1.attn.{point}"), "HookPoint");
        has(&l, &format!("model.layers.1.self_attn.{point}"), "HookPoint");
        has(&b, &format!("encoder.layer.1.attention.self.{point}"), "HookPoint");
    }
    has(&g, "transformer.h.0.mlp.act", "HiddenAct");
    has(&l, "model.layers.0.mlp.act", "HookPoint");
    has(&b, "encoder.layer.0.intermediate.act", "HookPoint");
    assert!(bert.module_tree().contains("  probs: HookPoint  model.encoder.layer[0].attention.self_.probs\n"));
}

/// With the KV cache during generation (`.next()` moves each point to step 1): step 1 has q for the one new token, k for the cached
/// and the new positions, scores/probs `[batch, heads, 1, past + 1]`; step 1's k starts with
/// step 0's keys, and its probs are the softmax of its q kᵀ by hand (the new token sees all).
#[test]
fn points_with_the_kv_cache_during_generation() {
    let model = lm::<Llama>("llama");
    let prompt: Vec<i64> = vec![5, 17, 230, 9];
    let s = prompt.len() as i64;
    let saved = generate!(model, prompt, max_new_tokens = 2, stop_at_eos = false, {
        vec![model.model.layers[0].self_attn.k.output.save(), model.model.layers[0].self_attn.q.next().output.save(),
             model.model.layers[0].self_attn.k.next().output.save(), model.model.layers[0].self_attn.scores.next().output.save(),
             model.model.layers[0].self_attn.probs.next().output.save(), model.model.layers[0].self_attn.z.next().output.save()]
    })
    .unwrap();
    let [k0, q1, k1, scores1, probs1, z1]: [Tensor; 6] = saved.try_into().unwrap();
    assert_eq!(k0.size(), [1, 4, s, 16]);
    assert_eq!(q1.size(), [1, 4, 1, 16]);
    assert_eq!(k1.size(), [1, 4, s + 1, 16]);
    assert_eq!(scores1.size(), [1, 4, 1, s + 1]);
    assert_eq!(probs1.size(), [1, 4, 1, s + 1]);
    assert_eq!(z1.size(), [1, 1, 4, 16]);
    assert!(k1.narrow(2, 0, s).equal(&k0), "step 1's keys start with the cached step-0 keys");
    let keep = Tensor::ones([1, 1, 1, s + 1], (Kind::Bool, Device::Cpu));
    let d = diff(&probs1, &softmax_by_hand(&(q1.matmul(&k1.transpose(-1, -2)) * 0.25), &keep));
    assert!(d < TOL, "step 1 probs differ from softmax(q kᵀ / 4) by {d}");
}
