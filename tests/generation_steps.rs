//! Generation steps in `generate!` without naming `max_new_tokens` (`model.steps(..)`,
//! nnsight's `.all()` and `iter[1:3]`), and values of steps that generation never ran
//! (`.save_if_ran()` gives `None`) when it stops early at end-of-sequence. Values are checked
//! against the plain, untraced generation of the tiny GPT-2 of `fixtures/causal` (made by
//! transformers) and against written-out `.at(step)` traces.

use std::collections::HashMap;
use std::path::PathBuf;

use nnsight::models::causal::{CausalLm, LoadOptions};
use nnsight::models::gpt2::Gpt2;
use nnsight::prelude::*;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::LanguageModel;

const PROMPT: [i64; 4] = [17, 254, 3, 998];

fn lm() -> LanguageModel<Gpt2> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal/gpt2");
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let wl = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let model = Gpt2::load_with(&dir, &LoadOptions { device: Device::Cpu, dtype: None, ..Default::default() }).unwrap();
    LanguageModel::from_parts(model, tok, Device::Cpu).unwrap()
}

#[test]
fn steps_loop_covers_every_step_and_equals_written_out_steps() {
    let model = lm();
    let mut tokens = None;
    let all = generate!(model, PROMPT.to_vec(), max_new_tokens = 4, stop_at_eos = false, tokens = &mut tokens, {
        let mut all = Vec::new();
        for s in model.steps(..) {
            all.push(model.lm_head.at(s).output.save());
        }
        all
    })
    .unwrap();
    assert_eq!(all.len(), 4, "one value per step, the loop never named max_new_tokens");
    let written = generate!(model, PROMPT.to_vec(), max_new_tokens = 4, stop_at_eos = false, {
        vec![model.lm_head.at(0).output.save(), model.lm_head.at(1).output.save(), model.lm_head.at(2).output.save(), model.lm_head.at(3).output.save()]
    })
    .unwrap();
    for (s, (a, b)) in all.iter().zip(&written).enumerate() {
        assert!(a.equal(b), "step {s}");
    }
    // Independent: each step's argmax is the token generation produced.
    let tokens = tokens.unwrap();
    for (s, l) in all.iter().enumerate() {
        let next = l.get(0).get(-1).argmax(-1, false).int64_value(&[]);
        assert_eq!(next, tokens.int64_value(&[0, PROMPT.len() as i64 + s as i64]), "step {s}");
    }
}

#[test]
fn a_range_of_steps_is_steered_and_the_others_are_not() {
    let model = lm();
    let plain = generate!(model, PROMPT.to_vec(), max_new_tokens = 4, stop_at_eos = false, {
        let mut h = Vec::new();
        for s in model.steps(..) {
            h.push(model.transformer.h[1].at(s).output.save());
        }
        h
    })
    .unwrap();
    // Steer steps 1 and 2 only; read the layer's output at every step.
    let (steered, range) = generate!(model, PROMPT.to_vec(), max_new_tokens = 4, stop_at_eos = false, {
        for s in model.steps(1..3) {
            model.transformer.h[1].at(s).output *= 0.5;
        }
        let mut h = Vec::new();
        for s in model.steps(..) {
            h.push(model.transformer.h[1].at(s).output.save());
        }
        let r = model.steps(1..3);
        (h, (r.start, r.end))
    })
    .unwrap();
    assert_eq!(range, (1, 3));
    assert!(steered[0].equal(&plain[0]), "step 0 untouched");
    // Step 1: exactly half of what that step computed (its input is the same token as plain's).
    assert!(steered[1].equal(&(&plain[1] * 0.5)), "step 1 halved");
    // A range past the end is clipped to the steps that exist.
    let n = generate!(model, PROMPT.to_vec(), max_new_tokens = 2, stop_at_eos = false, {
        let mut n = 0usize;
        for _ in model.steps(1..100) {
            n += 1;
        }
        n
    })
    .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn steps_that_never_ran_come_back_as_none() {
    let model = lm();
    let eos_id = model.root().eos_token_ids()[0];
    // Step 1 is steered to produce the end-of-sequence token: generation stops after step 1.
    let mut tokens = None;
    let got = generate!(model, PROMPT.to_vec(), max_new_tokens = 8, tokens = &mut tokens, {
        model.lm_head.at(1).output[.., -1, eos_id] = 1e4;
        let mut got = Vec::new();
        for s in model.steps(..) {
            got.push(model.lm_head.at(s).output.save_if_ran());
        }
        got
    })
    .unwrap();
    let tokens = tokens.unwrap();
    assert_eq!(tokens.size()[1], PROMPT.len() as i64 + 2, "two tokens, the second the end of sequence");
    assert_eq!(tokens.int64_value(&[0, -1]), eos_id);
    assert_eq!(got.len(), 8);
    assert!(got[0].is_some() && got[1].is_some(), "the steps that ran come back");
    assert!(got[2..].iter().all(Option::is_none), "the steps that never ran are absent");
    let ran: Vec<Tensor> = got.into_iter().flatten().collect();
    assert_eq!(ran[1].get(0).get(-1).argmax(-1, false).int64_value(&[]), eos_id);
    // Without the stop, every step is there.
    let full = generate!(model, PROMPT.to_vec(), max_new_tokens = 3, stop_at_eos = false, {
        let mut got = Vec::new();
        for s in model.steps(..) {
            got.push(model.lm_head.at(s).output.save_if_ran());
        }
        got
    })
    .unwrap();
    assert!(full.iter().all(Option::is_some));
}
