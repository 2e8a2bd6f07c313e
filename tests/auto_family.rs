//! One entry point for every family (`nnsight::models::auto`) and experiments written once over
//! `Decoder`: the generic paths reach the very modules the family's typed paths reach (checked
//! against the typed trace, bit for bit), `unembed` of the last layer is the model's logits,
//! and an unsupported `model_type` lists the supported ones. Fixtures: the tiny GPT-2 and Llama
//! checkpoints of `fixtures/causal` (transformers-made), copied with a word-level
//! `tokenizer.json` into a temporary folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use nnsight::models::auto::{AutoCausalLm, AutoLanguageModel, SUPPORTED};
use nnsight::models::causal::{AttnPoint, CausalLm, CausalLmExt, Decoder, Sampling};
use nnsight::models::gpt2::Gpt2;
use nnsight::models::llama::Llama;
use nnsight::prelude::*;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{with_family, Error, LanguageModel, ModuleTree, TextModel};

/// Layers of the Gemma fixtures (their config.json).
const L_GEMMA2: usize = 3;
const L_GEMMA3: usize = 3;
const PROMPT: &str = "t5 t17 t230 t9 t41 t8";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name)
}

/// A copy of fixture `name` with a word-level `tokenizer.json` (`t0` .. `t999` → ids 0 .. 999),
/// and `config.json` passed through `edit`.
fn folder(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("nnsight-auto-{}-{}-{name}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture(name).join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let wl = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    dir
}

/// Written once for every family: each layer's output (the residual stream), layer 1's
/// attention probabilities, the logits.
fn read_generic<M: Decoder + TextModel>(model: &LanguageModel<M>) -> nnsight::Result<(Vec<Tensor>, Tensor, Tensor)> {
    let n = model.layers().len();
    trace!(model, PROMPT, {
        let mut hs = Vec::new();
        for l in 0..n {
            hs.push(model.layers()[l].output.save());
        }
        let probs = model.attn_point(1, AttnPoint::Probs).output.save();
        (hs, probs, model.output.save())
    })
}

/// Written once: head 1 of layer 1 may not attend to key 0; the attention's output.
fn knockout_generic<M: Decoder + TextModel>(model: &LanguageModel<M>) -> nnsight::Result<Tensor> {
    trace!(model, PROMPT, {
        model.attn_point(1, AttnPoint::Probs).output[.., 1, .., 0] = 0.0;
        model.attn(1).output.save()
    })
}

/// Written once: the logit lens's last row (the unembedding of the last layer's output).
fn lens_last<M: Decoder + TextModel>(model: &LanguageModel<M>) -> nnsight::Result<(Tensor, Tensor)> {
    trace!(model, PROMPT, {
        let h = model.layers()[-1].output;
        (model.unembed(&h).save(), model.output.save())
    })
}

#[test]
fn model_type_picks_the_family_and_generic_paths_are_the_typed_modules() {
    // GPT-2
    let auto = AutoLanguageModel::from_pretrained(folder("gpt2", |_| {})).unwrap();
    assert_eq!(auto.model_type(), "gpt2");
    let AutoLanguageModel::Gpt2(gpt2) = &auto else { panic!("gpt2 folder loaded as {auto:?}") };
    let (hs, probs, logits) = read_generic(gpt2).unwrap();
    let (tprobs, tlogits) =
        trace!(gpt2, PROMPT, { (gpt2.transformer.h[1].attn.probs.output.save(), gpt2.lm_head.output.save()) }).unwrap();
    assert!(probs.equal(&tprobs) && logits.equal(&tlogits));
    let h1 = trace!(gpt2, PROMPT, { gpt2.transformer.h[1].output.save() }).unwrap();
    assert!(hs[1].equal(&h1), "layers()[1] is transformer.h[1]");
    let ko = knockout_generic(gpt2).unwrap();
    let tko = trace!(gpt2, PROMPT, {
        gpt2.transformer.h[1].attn.probs.output[.., 1, .., 0] = 0.0;
        gpt2.transformer.h[1].attn.output.save()
    })
    .unwrap();
    assert!(ko.equal(&tko), "the generic knockout edits transformer.h[1].attn.probs");
    let plain_attn = trace!(gpt2, PROMPT, { gpt2.transformer.h[1].attn.output.save() }).unwrap();
    assert!((&ko - &plain_attn).abs().max().double_value(&[]) > 1e-4, "the knockout changes the output");

    // Llama
    let auto = AutoLanguageModel::from_pretrained(folder("llama", |_| {})).unwrap();
    assert_eq!(auto.model_type(), "llama");
    let AutoLanguageModel::Llama(llama) = &auto else { panic!("llama folder loaded as {auto:?}") };
    let (hs, probs, _) = read_generic(llama).unwrap();
    let (h0, tprobs) = trace!(llama, PROMPT, {
        (llama.model.layers[0].output.save(), llama.model.layers[1].self_attn.probs.output.save())
    })
    .unwrap();
    assert!(hs[0].equal(&h0) && probs.equal(&tprobs));
    assert_eq!(probs.size(), [1, 4, 6, 6], "[batch, heads, q, k]");
}

#[test]
fn one_experiment_runs_on_every_family_through_with_family() {
    for (name, layers) in [("gpt2", 2usize), ("llama", 2), ("llama_tied", 2), ("pythia", 2), ("pythia_seq", 2), ("gemma2", L_GEMMA2), ("gemma3", L_GEMMA3), ("qwen2", 2), ("qwen3", 2), ("olmo2", 2), ("phi3", 2), ("llama3", 2), ("llama32_tied", 2), ("mistral", 2), ("qwen2_window", 2)] {
        let auto = AutoLanguageModel::from_pretrained(folder(name, |_| {})).unwrap();
        // The logit lens's map on the last layer is the model's own logits, bit for bit.
        let (lens, logits) = with_family!(&auto, |m| lens_last(m)).unwrap();
        assert!(lens.equal(&logits), "{name}: unembed(last layer) != logits");
        let (hs, _, _) = with_family!(&auto, |m| read_generic(m)).unwrap();
        assert_eq!(hs.len(), layers);
        assert_eq!(hs[0].size(), [1, 6, 64], "{name}: [batch, seq, hidden]");
        // The module tree is the family's.
        let tree = auto.modules();
        let want = match auto.model_type() {
            "gpt2" => "transformer.h.1.attn.probs",
            "gpt_neox" => "gpt_neox.layers.1.attention.probs",
            _ => "model.layers.1.self_attn.probs",
        };
        assert_eq!(with_family!(&auto, |m| m.attn_point(1, AttnPoint::Probs).unwrap().path().to_string()), want);
        assert!(tree.iter().any(|(p, _)| p == want), "{name}: {want} missing from the tree");
    }
}

#[test]
fn bare_auto_model_generates_as_the_family_does() {
    let ids = Tensor::from_slice(&[5i64, 17, 230, 9]).view([1, 4]);
    let mask = ids.ones_like();
    for name in ["gpt2", "llama"] {
        let auto = AutoCausalLm::from_pretrained(fixture(name)).unwrap();
        let got = with_family!(&auto, |m| m.generate(&ids, &mask, 5, &Sampling::Greedy, None)).unwrap();
        let want = match name {
            "gpt2" => Gpt2::from_pretrained(fixture(name)).unwrap().generate(&ids, &mask, 5, &Sampling::Greedy, None),
            _ => Llama::from_pretrained(fixture(name)).unwrap().generate(&ids, &mask, 5, &Sampling::Greedy, None),
        }
        .unwrap();
        assert!(got.equal(&want), "{name}: {got:?} vs {want:?}");
        assert_eq!(got.size(), [1, 9]);
    }
}

fn config_error(dir: &Path) -> String {
    match AutoCausalLm::from_pretrained(dir) {
        Err(e @ Error::Config { .. }) => e.to_string(),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn unsupported_or_missing_model_type_is_an_error_listing_the_supported_ones() {
    let dir = folder("llama", |c| c["model_type"] = "mamba".into());
    let msg = config_error(&dir);
    assert!(msg.contains("config.json") && msg.contains("\"mamba\""), "{msg}");
    for t in SUPPORTED {
        assert!(msg.contains(&format!("\"{t}\"")), "{msg} lacks {t}");
    }
    let dir = folder("llama", |c| c["model_type"] = 7.into());
    assert!(config_error(&dir).contains("model_type"));
    let dir = folder("llama", |c| {
        c.as_object_mut().unwrap().remove("model_type");
        c.as_object_mut().unwrap().remove("architectures");
    });
    assert!(config_error(&dir).contains("no `model_type`"));
    // Without model_type, an `architectures` entry names the family (older configs).
    let dir = folder("llama", |c| {
        c.as_object_mut().unwrap().remove("model_type");
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    });
    assert_eq!(AutoCausalLm::from_pretrained(&dir).unwrap().model_type(), "llama");
    // A missing folder is an Io error naming it.
    assert!(matches!(AutoCausalLm::from_pretrained("/nonexistent/nnsight"), Err(Error::Io { .. })));
}

#[test]
fn a_checkpoint_of_another_family_or_conflicting_rope_settings_are_refused() {
    // A Gemma 3 checkpoint relabelled as Llama: its q/k norms and extra layer norms would be
    // dropped silently; they are an error naming the file and a key instead.
    let dir = folder("gemma3", |c| c["model_type"] = "llama".into());
    match AutoCausalLm::from_pretrained(&dir) {
        Err(Error::UnusedWeight { file, key, count }) => {
            assert!(file.ends_with("model.safetensors") && count > 0 && key.starts_with("model.layers."), "{file} {key} {count}");
        }
        other => panic!("expected UnusedWeight, got {:?}", other.map(|m| m.model_type())),
    }
    // `rope_parameters` and a different legacy `rope_scaling`: one would be ignored.
    let dir = folder("llama", |c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    let msg = config_error(&dir);
    assert!(msg.contains("rope_parameters") && msg.contains("rope_scaling"), "{msg}");
}

#[test]
fn a_nan_weight_is_an_error_naming_the_file_and_key() {
    let dir = folder("llama", |_| {});
    let file = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).unwrap();
    let (name, t) = tensors.iter_mut().find(|(n, _)| n == "model.layers.1.mlp.down_proj.weight").unwrap();
    let _ = t.get(0).get(3).fill_(f64::NAN);
    let name = name.clone();
    Tensor::write_safetensors(&tensors, &file).unwrap();
    match AutoCausalLm::from_pretrained(&dir) {
        Err(Error::Load { path, message }) => {
            assert!(path.ends_with("model.safetensors") && message.contains(&name) && message.contains("NaN"), "{path}: {message}");
        }
        other => panic!("expected a Load error, got {:?}", other.map(|m| m.model_type())),
    }
}
