//! `generate!` on the tiny GPT-2 and Llama checkpoints of `fixtures/causal` (made by
//! `make_fixtures.py` with transformers; greedy generations from transformers).

use std::collections::HashMap;
use std::path::PathBuf;

use nnsight::models::causal::{CausalLm, LoadOptions};
use nnsight::models::gpt2::Gpt2;
use nnsight::models::llama::Llama;
use nnsight::prelude::*;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{LanguageModel, TextModel};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name)
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap()
}

/// A word-level tokenizer over "t0" .. "t999" (id = number), so text prompts map to known ids.
fn tokenizer() -> Tokenizer {
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok
}

fn lm<M: CausalLm + TextModel>(name: &str) -> LanguageModel<M> {
    let model = M::load_with(&fixture(name), &LoadOptions { device: Device::Cpu, dtype: None, ..Default::default() }).unwrap();
    LanguageModel::from_parts(model, tokenizer(), Device::Cpu).unwrap()
}

fn prompts(e: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(e["prompts"].clone()).unwrap()
}

/// transformers' greedy tokens after the padded prompt, per row.
fn greedy_new_tokens(e: &Value) -> Vec<Vec<i64>> {
    let seqs: Vec<Vec<i64>> = serde_json::from_value(e["greedy"]["sequences"].clone()).unwrap();
    let n = e["greedy"]["max_new_tokens"].as_i64().unwrap() as usize;
    seqs.iter().map(|s| s[s.len() - n..].to_vec()).collect()
}

#[test]
fn saving_lm_head_each_step_gives_the_generated_tokens() {
    let model = lm::<Gpt2>("gpt2");
    let e = expected("gpt2");
    let prompt = prompts(&e)[0].clone();
    let mut tokens = None;
    let (s0, s1, s2) = generate!(model, prompt.clone(), max_new_tokens = 3, stop_at_eos = false, tokens = &mut tokens, {
        let s0 = model.lm_head.output.save();
        let s1 = model.lm_head.next().output.save();
        let s2 = model.lm_head.next().output.save();
        (s0, s1, s2)
    })
    .unwrap();
    // Step 0 sees the whole prompt, later steps one token each (KV cache).
    assert_eq!(s0.size(), vec![1, prompt.len() as i64, 1000]);
    assert_eq!(s1.size(), vec![1, 1, 1000]);
    assert_eq!(s2.size(), vec![1, 1, 1000]);
    let tokens = tokens.unwrap();
    let new: Vec<i64> = Vec::try_from(tokens.get(0).narrow(0, prompt.len() as i64, 3)).unwrap();
    let argmax = |t: &Tensor| t.get(0).get(-1).argmax(0, false).int64_value(&[]);
    assert_eq!(new, vec![argmax(&s0), argmax(&s1), argmax(&s2)]);
    assert_eq!(new, greedy_new_tokens(&e)[0][..3].to_vec(), "transformers' greedy tokens");
}

#[test]
fn traced_greedy_generation_matches_transformers_for_both_models() {
    for name in ["gpt2", "llama"] {
        let e = expected(name);
        let want = greedy_new_tokens(&e);
        let p = prompts(&e);
        let mut tokens = None;
        let run = |tokens: &mut Option<Tensor>| -> nnsight::Result<()> {
            match name {
                "gpt2" => {
                    let model = lm::<Gpt2>(name);
                    generate!(model, p.clone(), max_new_tokens = 10, stop_at_eos = false, tokens = tokens, {
                        model.lm_head.output.size().len().save()
                    })
                    .map(drop)
                }
                _ => {
                    let model = lm::<Llama>(name);
                    generate!(model, p.clone(), max_new_tokens = 10, stop_at_eos = false, tokens = tokens, {
                        model.lm_head.output.size().len().save()
                    })
                    .map(drop)
                }
            }
        };
        run(&mut tokens).unwrap();
        let tokens = tokens.unwrap();
        for (row, want) in want.iter().enumerate() {
            let got: Vec<i64> = Vec::try_from(tokens.get(row as i64).narrow(0, tokens.size()[1] - 10, 10)).unwrap();
            assert_eq!(&got, want, "{name} row {row}");
        }
    }
}

#[test]
fn steering_at_step_one_changes_step_one_onwards_only() {
    let model = lm::<Gpt2>("gpt2");
    let p = prompts(&expected("gpt2"))[1].clone();
    let plain = generate!(model, p.clone(), max_new_tokens = 3, stop_at_eos = false, {
        (model.lm_head.at(0).output.save(), model.lm_head.at(1).output.save(), model.lm_head.at(2).output.save())
    })
    .unwrap();
    let steered = generate!(model, p.clone(), max_new_tokens = 3, stop_at_eos = false, {
        // Block 0 (block 1 feeds ln_f, which would undo a pure rescaling).
        model.transformer.h[0].at(1).output = model.transformer.h[0].at(1).output * 4.0;
        (model.lm_head.at(0).output.save(), model.lm_head.at(1).output.save(), model.lm_head.at(2).output.save())
    })
    .unwrap();
    assert!(steered.0.equal(&plain.0), "step 0 must not change");
    assert!(!steered.1.allclose(&plain.1, 1e-5, 1e-5, false), "step 1 must change");
    assert!(!steered.2.allclose(&plain.2, 1e-5, 1e-5, false), "step 2 sees step 1's cache");
}

#[test]
fn next_moves_through_steps_as_in_the_design_example() {
    // `h[1].next().output = h[1].output * 2.0`: the right side is read first (step 0), then
    // `.next()` moves to step 1, whose output becomes twice step 0's output (shape [1, 1, 64]
    // vs step 0's [1, seq, 64] -> a clear layout error, not a silent broadcast).
    let model = lm::<Gpt2>("gpt2");
    let p = prompts(&expected("gpt2"))[2].clone(); // one token: step 0 and 1 both have seq 1
    let (s0, s1) = generate!(model, p, max_new_tokens = 2, stop_at_eos = false, {
        model.transformer.h[1].next().output = model.transformer.h[1].output * 2.0;
        (model.transformer.h[1].at(0).output.save(), model.transformer.h[1].at(1).output.save())
    })
    .unwrap();
    assert!(s1.equal(&(&s0 * 2.0)));
    let err = generate!(model, vec![5i64, 6, 7], max_new_tokens = 2, stop_at_eos = false, {
        model.transformer.h[1].next().output = model.transformer.h[1].output * 2.0;
    })
    .unwrap_err();
    assert!(err.to_string().contains("swap at `transformer.h.1.output` (call 1"), "{err}");
}

#[test]
fn steps_after_eos_are_not_errors_and_asking_for_them_is() {
    let model = lm::<Gpt2>("gpt2");
    let e = expected("gpt2");
    let p = prompts(&e)[0].clone();
    // Make the first generated token the end of sequence: transformers' greedy first token.
    let first = greedy_new_tokens(&e)[0][0];
    let eos: Vec<i64> = model.root().eos_token_ids();
    // Steer step 0 so that the eos token wins, then generation stops after step 0.
    let eos_id = eos[0];
    let mut tokens = None;
    let r = generate!(model, p.clone(), max_new_tokens = 5, tokens = &mut tokens, {
        model.lm_head.at(0).output[.., -1, eos_id] = 1e4;
        for step in 0..5 {
            model.transformer.h[0].at(step).output *= 1.0;   // every step: fine when skipped
        }
        model.lm_head.at(0).output.argmax(-1, false).save()
    })
    .unwrap();
    assert_ne!(first, eos_id);
    assert_eq!(r.int64_value(&[0, (p.len() - 1) as i64]), eos_id);
    assert_eq!(tokens.unwrap().size()[1], p.len() as i64 + 1, "stopped after one token");
    let err = generate!(model, p.clone(), max_new_tokens = 5, {
        model.lm_head.at(0).output[.., -1, eos_id] = 1e4;
        model.lm_head.at(3).output.save()
    })
    .unwrap_err();
    assert!(matches!(err, nnsight::Error::NotComputed { .. }), "{err}");
}
