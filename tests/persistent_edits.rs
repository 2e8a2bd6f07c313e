//! Persistent edits (`edit!`, `clear_edits`): interventions stored in a language model apply to
//! every later `trace!` and `generate!` until cleared, compose with the trace's own, and leave
//! nothing behind: checked against the same interventions written inline in each trace, and
//! against the outputs before the edits, bit for bit. Tiny GPT-2 of `fixtures/causal`.

use std::collections::HashMap;
use std::path::PathBuf;

use nnsight::models::causal::{CausalLm, LoadOptions};
use nnsight::models::gpt2::Gpt2;
use nnsight::prelude::*;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{Error, LanguageModel};

const PROMPT: &str = "t5 t17 t230 t9 t41 t8";

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
fn an_edit_applies_to_every_later_trace_until_cleared() {
    let model = lm();
    let before = trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap();
    tch::manual_seed(7);
    let steer = Tensor::randn([64], (Kind::Float, Device::Cpu));
    let steer_copy = steer.copy();
    edit!(model, {
        model.transformer.h[0].output[.., 1] = 0.0;               // ablate position 1 after layer 0
        model.transformer.h[1].output += &steer;                   // steer layer 1
    })
    .unwrap();
    assert_eq!(model.edit_count(), 1);
    // The same interventions written in the trace itself.
    let inline = trace!(model, PROMPT, {
        model.lm_head.output.save()
    })
    .unwrap();
    model.clear_edits();
    let by_hand = trace!(model, PROMPT, {
        model.transformer.h[0].output[.., 1] = 0.0;
        model.transformer.h[1].output += &steer_copy;
        model.lm_head.output.save()
    })
    .unwrap();
    assert!(inline.equal(&by_hand), "the edit is what the inline interventions do");
    assert!((&inline - &before).abs().max().double_value(&[]) > 1e-3, "the edit changes the logits");
    // Every later trace gets it, not only the first.
    edit!(model, { model.transformer.h[0].output[.., 1] = 0.0; }).unwrap();
    for _ in 0..3 {
        let again = trace!(model, PROMPT, { model.transformer.h[0].output.save() }).unwrap();
        assert!(again.get(0).get(1).abs().max().double_value(&[]) == 0.0);
    }
    // Cleared: bit-identical to before the edits.
    model.clear_edits();
    assert_eq!(model.edit_count(), 0);
    let after = trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap();
    assert!(after.equal(&before));
}

#[test]
fn edits_compose_with_the_traces_own_interventions_and_invokes() {
    let model = lm();
    edit!(model, { model.transformer.h[0].output *= 0.5; }).unwrap();
    let (a, b) = trace!(model, {
        invoke(PROMPT) { let a = model.transformer.h[1].output.save(); }
        invoke(PROMPT) {
            model.transformer.h[1].output[.., 0] = 1.0;
            (a, model.transformer.h[1].output.save())
        }
    })
    .unwrap();
    model.clear_edits();
    let (a2, b2) = trace!(model, {
        invoke(PROMPT) { model.transformer.h[0].output *= 0.5; let a = model.transformer.h[1].output.save(); }
        invoke(PROMPT) {
            model.transformer.h[0].output *= 0.5;
            model.transformer.h[1].output[.., 0] = 1.0;
            (a, model.transformer.h[1].output.save())
        }
    })
    .unwrap();
    assert!(a.equal(&a2) && b.equal(&b2), "edit on every row, then the invokes' own");
}

#[test]
fn generation_replays_the_edits() {
    let model = lm();
    let ids = vec![5i64, 17, 230, 9];
    let mut plain_tokens = None;
    generate!(model, ids.clone(), max_new_tokens = 4, stop_at_eos = false, tokens = &mut plain_tokens, {}).unwrap();
    edit!(model, { model.transformer.h[1].output *= 3.0; }).unwrap();
    let mut edited_tokens = None;
    let l0 = generate!(model, ids.clone(), max_new_tokens = 4, stop_at_eos = false, tokens = &mut edited_tokens, {
        model.lm_head.output.save()
    })
    .unwrap();
    model.clear_edits();
    let mut inline_tokens = None;
    let l0_inline = generate!(model, ids.clone(), max_new_tokens = 4, stop_at_eos = false, tokens = &mut inline_tokens, {
        model.transformer.h[1].output *= 3.0;
        model.lm_head.output.save()
    })
    .unwrap();
    assert!(l0.equal(&l0_inline), "step 0 of generation with the edit = with the inline edit");
    assert!(edited_tokens.unwrap().equal(&inline_tokens.unwrap()));
    let mut after = None;
    generate!(model, ids, max_new_tokens = 4, stop_at_eos = false, tokens = &mut after, {}).unwrap();
    assert!(after.unwrap().equal(&plain_tokens.unwrap()), "cleared: generation as before");
}

#[test]
fn an_edit_that_cannot_be_built_is_refused_and_not_kept() {
    let model = lm();
    let layer = 7usize; // the model has 2 layers
    let err = edit!(model, { model.transformer.h[layer].output *= 0.0; }).unwrap_err();
    assert!(matches!(&err, Error::IndexOutOfRange { len: 2, .. }), "{err}");
    assert_eq!(model.edit_count(), 0);
    let out = trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap();
    assert!(out.equal(&model.forward(&[PROMPT]).unwrap()));
}

/// Generic code over the model behind a reference (as `with_family!` hands it) sees the edits.
fn last_logits_through_a_reference<M: nnsight::TextModel>(model: &LanguageModel<M>) -> Tensor
where
    M: nnsight::HookModule<Output = Tensor>,
{
    trace!(model, PROMPT, { model.output.save() }).unwrap()
}

#[test]
fn edits_apply_through_references_and_locked_mutexes() {
    let model = lm();
    let before = last_logits_through_a_reference(&model);
    edit!(model, { model.transformer.h[1].output *= 0.0; }).unwrap();
    let by_value = trace!(model, PROMPT, { model.output.save() }).unwrap();
    let through_ref = last_logits_through_a_reference(&model);
    assert!(through_ref.equal(&by_value), "the edit applies through `&model`");
    assert!(!through_ref.equal(&before));
    let shared = std::sync::Mutex::new(model);
    let guard = shared.lock().unwrap();
    let through_guard = trace!(guard, PROMPT, { guard.lm_head.output.save() }).unwrap();
    assert!(through_guard.equal(&by_value), "the edit applies through a MutexGuard");
    guard.clear_edits();
    assert!(trace!(guard, PROMPT, { guard.lm_head.output.save() }).unwrap().equal(&before));
}

#[test]
fn an_edit_that_panics_while_built_is_refused_and_not_kept() {
    use nnsight::models::causal::{AttnPoint, Decoder};
    let model = lm();
    // An out-of-range layer through the generic accessors is an error, not a panic.
    let err = edit!(model, { model.attn_point(99, AttnPoint::Probs).output *= 0.0; }).unwrap_err();
    assert!(matches!(&err, Error::IndexOutOfRange { index: 99, len: 2, .. }), "{err}");
    assert_eq!(model.edit_count(), 0);
    let err = trace!(model, PROMPT, { model.attn(7).output.save() }).unwrap_err();
    assert!(matches!(&err, Error::IndexOutOfRange { index: 7, .. }), "{err}");
    let last = trace!(model, PROMPT, { model.attn(-1).output.save() }).unwrap();
    let typed = trace!(model, PROMPT, { model.transformer.h[1].attn.output.save() }).unwrap();
    assert!(last.equal(&typed), "attn(-1) is the last layer's attention");
}

#[test]
fn an_edit_reading_a_call_that_never_happens_says_it_is_the_edit() {
    let model = lm();
    let before = trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap();
    // Builds (the call count is known only when the model runs), then every trace fails.
    edit!(model, { model.transformer.h[1].at(1).output[.., 0] = 0.0; }).unwrap();
    let err = trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap_err();
    match &err {
        Error::NeverProvided { point, call: 1, reason } => {
            assert_eq!(point, "transformer.h.1.output");
            assert!(reason.contains("persistent edit") && reason.contains("clear_edits"), "{err}");
        }
        other => panic!("expected NeverProvided naming the edit, got {other}"),
    }
    // The same mistake in the trace's own block does not blame an edit.
    model.clear_edits();
    let err = trace!(model, PROMPT, {
        model.transformer.h[1].at(1).output[.., 0] = 0.0;
        model.lm_head.output.save()
    })
    .unwrap_err();
    assert!(matches!(&err, Error::NeverProvided { reason, .. } if !reason.contains("persistent edit")), "{err}");
    let after = trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap();
    assert!(after.equal(&before));
}

/// A persistent swap of the wrong shape fails every later trace with the swap's layouts, and
/// the error says the value comes from a persistent edit (the trace itself holds no swap).
#[test]
fn a_persistent_swap_of_the_wrong_shape_says_it_is_the_edit() {
    let model = lm();
    let before = trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap();
    edit!(model, { model.transformer.h[0].output = Tensor::zeros([1, 2, 64], (Kind::Float, Device::Cpu)); }).unwrap();
    let err = trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap_err();
    model.clear_edits();
    match &err {
        Error::SwapMismatch { point, actual, .. } => {
            assert_eq!(point, "transformer.h.0.output");
            assert!(actual.starts_with("Tensor[1, 2, 64] Float Cpu from a persistent edit") && actual.contains("clear_edits"), "{err}");
        }
        other => panic!("expected SwapMismatch naming the edit, got {other}"),
    }
    // The same swap in the trace's own block does not blame an edit.
    let err = trace!(model, PROMPT, {
        model.transformer.h[0].output = Tensor::zeros([1, 2, 64], (Kind::Float, Device::Cpu));
        model.lm_head.output.save()
    })
    .unwrap_err();
    assert!(matches!(&err, Error::SwapMismatch { actual, .. } if !actual.contains("persistent edit")), "{err}");
    assert!(trace!(model, PROMPT, { model.lm_head.output.save() }).unwrap().equal(&before));
}
