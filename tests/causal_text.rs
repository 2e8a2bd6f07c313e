//! `trace!` on text batches of the tiny GPT-2 and Llama fixtures (`fixtures/causal`): prompts of
//! different lengths are padded on the LEFT (as nnsight does for decoder-only models) with the
//! tokenizer's pad token, or, when the tokenizer has none (GPT-2 and Llama tokenizers), with the
//! config's `pad_token_id` / first `eos_token_id`; every row then computes what it computes
//! alone. The tokenizers are word-level over "t0" .. "t999" (id = number), built here.

use std::collections::HashMap;
use std::path::PathBuf;

use nnsight::models::causal::{CausalLm, LoadOptions};
use nnsight::models::gpt2::Gpt2;
use nnsight::models::llama::Llama;
use nnsight::prelude::*;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer};
use nnsight::{LanguageModel, TextModel};

/// Tolerance between a padded row and the same prompt alone.
const SOLO_TOL: f64 = 1e-5;

const LONG: &str = "t5 t17 t230 t9 t41 t8";
const SHORT: &str = "t77 t3";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name)
}

/// Word-level over "t0" .. "t999", no padding settings and no `[PAD]` token.
fn tokenizer() -> Tokenizer {
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok
}

/// The same with its own padding settings: pad "t999", on the right (the model's side wins).
fn tokenizer_with_pad() -> Tokenizer {
    let mut tok = tokenizer();
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id: 999,
        pad_type_id: 0,
        pad_token: "t999".into(),
    }));
    tok
}

fn lm<M: CausalLm + TextModel>(name: &str, tok: Tokenizer) -> LanguageModel<M> {
    let model = M::load_with(&fixture(name), &LoadOptions { device: Device::Cpu, dtype: None, ..Default::default() }).unwrap();
    LanguageModel::from_parts(model, tok, Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Checks the batch layout and that both rows' real positions equal each prompt run alone.
/// `run(texts)` is a `trace!` on the model returning `model.lm_head.output` (logits).
fn check_rows<M: TextModel>(model: &LanguageModel<M>, pad_id: i64, run: impl Fn(&[&str]) -> Tensor) {
    let batch = model.tokenize(&[LONG, SHORT]).unwrap();
    let ids: Vec<Vec<i64>> = Vec::try_from(&batch.input_ids).unwrap();
    let mask: Vec<Vec<i64>> = Vec::try_from(&batch.attention_mask).unwrap();
    assert_eq!(ids[0], vec![5, 17, 230, 9, 41, 8]);
    assert_eq!(ids[1], vec![pad_id, pad_id, pad_id, pad_id, 77, 3], "left padding with the pad id");
    assert_eq!(mask[1], vec![0, 0, 0, 0, 1, 1]);

    let both = run(&[LONG, SHORT]);
    assert_eq!(both.size(), vec![2, 6, 1000]);
    let long = run(&[LONG]);
    let short = run(&[SHORT]);
    // The last position is every row's last token.
    let d_last = max_diff(&both.get(0).get(-1), &long.get(0).get(-1)).max(max_diff(&both.get(1).get(-1), &short.get(0).get(-1)));
    assert!(d_last < SOLO_TOL, "last-position logits differ from the prompts alone by {d_last}");
    // Every real position too.
    let d_all = max_diff(&both.get(0), &long.get(0)).max(max_diff(&both.get(1).narrow(0, 4, 2), &short.get(0)));
    assert!(d_all < SOLO_TOL, "real positions differ from the prompts alone by {d_all}");
}

#[test]
fn gpt2_batch_without_pad_token_uses_eos_and_pads_left() {
    let model = lm::<Gpt2>("gpt2", tokenizer());
    assert_eq!(model.root().fallback_pad_token_id(), Some(2), "config: pad_token_id null, eos_token_id 2");
    let pad = model.tokenizer().get_padding().expect("padding set").clone();
    assert_eq!((pad.pad_id, pad.pad_token.as_str()), (2, "t2"));
    assert!(matches!(pad.direction, PaddingDirection::Left));
    check_rows(&model, 2, |texts| trace!(model, texts, { model.lm_head.output.save() }).unwrap());
}

#[test]
fn gpt2_tokenizer_pad_token_is_kept_and_padding_goes_left() {
    let model = lm::<Gpt2>("gpt2", tokenizer_with_pad());
    check_rows(&model, 999, |texts| trace!(model, texts, { model.lm_head.output.save() }).unwrap());
}

#[test]
fn llama_batch_without_pad_token_uses_eos_and_pads_left() {
    let model = lm::<Llama>("llama", tokenizer());
    assert_eq!(model.root().fallback_pad_token_id(), Some(2));
    check_rows(&model, 2, |texts| trace!(model, texts, { model.lm_head.output.save() }).unwrap());
}

#[test]
fn two_invokes_of_different_lengths_see_their_own_last_token_at_minus_one() {
    let model = lm::<Gpt2>("gpt2", tokenizer());
    let (a, b) = trace!(model, {
        invoke(LONG) {
            let a = model.lm_head.output[.., -1].save();
        }
        invoke(SHORT) {
            (a, model.lm_head.output[.., -1].save())
        }
    })
    .unwrap();
    let alone = |t: &str| trace!(model, t, { model.lm_head.output[.., -1].save() }).unwrap();
    let d = max_diff(&a, &alone(LONG)).max(max_diff(&b, &alone(SHORT)));
    assert!(d < SOLO_TOL, "{d}");
    // A patch written at the last position of the short invoke lands on its last real token.
    let patched = trace!(model, {
        invoke(LONG) {
            let h = model.transformer.h[1].output;
        }
        invoke(SHORT) {
            model.transformer.h[1].output[.., -1] = h[.., -1];
            model.lm_head.output[.., -1].save()
        }
    })
    .unwrap();
    let d = max_diff(&patched, &alone(LONG));
    assert!(d < SOLO_TOL, "patching the last block's last position copies the long prompt's prediction: {d}");
}

#[test]
fn token_id_invokes_are_padded_on_the_left_beside_sentences() {
    let model = lm::<Gpt2>("gpt2", tokenizer());
    // SHORT as ids (2 positions) and LONG as text (6): the ids row gets 4 pad ids (2) on the
    // left, as tokenizing both sentences together does.
    let (s, l) = trace!(model, {
        invoke(vec![77i64, 3]) {
            let s = model.lm_head.output.save();
        }
        invoke(LONG) {
            (s, model.lm_head.output.save())
        }
    })
    .unwrap();
    let both = trace!(model, [SHORT, LONG], { model.lm_head.output.save() }).unwrap();
    assert_eq!(s.size(), vec![1, 6, 1000]);
    assert!(s.equal(&both.narrow(0, 0, 1)) && l.equal(&both.narrow(0, 1, 1)));
    let alone = trace!(model, SHORT, { model.lm_head.output.save() }).unwrap();
    let d = max_diff(&s.get(0).narrow(0, 4, 2), &alone.get(0));
    assert!(d < SOLO_TOL, "the padded ids row's real positions equal the prompt alone: {d}");
}
