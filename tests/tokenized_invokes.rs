//! Invokes tokenized beforehand: a `TextBatch` (from `LanguageModel::tokenize`, or built from the
//! token ids the Python reference recorded), token-id tensors and `Vec<i64>`, alone and beside
//! sentence invokes. Right values: Python nnsight's `save_layer` case (fixtures/minilm.json),
//! and the same trace on the sentences (identical inputs give bit-identical outputs).

mod common;

use common::minilm::{case, close, f, minilm, PARIS, ROME};
use nnsight::prelude::*;
use nnsight::{Error, TextBatch};
use serde_json::Value;

fn sum(t: &Tensor) -> f64 {
    t.sum(Kind::Double).double_value(&[])
}

/// `[rows, seq]` i64 tensor from the fixture's `inputs.<name>` (a list of rows).
fn fixture_ids(name: &str) -> Tensor {
    let all: Value = serde_json::from_str(include_str!("fixtures/minilm.json")).unwrap();
    let rows: Vec<Vec<i64>> = all["inputs"][name]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
        .collect();
    let (n, seq) = (rows.len() as i64, rows[0].len() as i64);
    Tensor::from_slice(&rows.concat()).view([n, seq])
}

#[test]
fn batch_from_the_reference_token_ids_matches_python_nnsight() {
    let model = minilm();
    let want = case("save_layer");
    // The ids, mask and segment ids Python's tokenizer produced; no token strings.
    let batch = TextBatch {
        input_ids: fixture_ids("input_ids"),
        attention_mask: fixture_ids("attention_mask"),
        token_type_ids: fixture_ids("token_type_ids"),
        tokens: Vec::new(),
    };
    assert_eq!(batch.input_ids.size(), vec![2, 14]);
    let h2 = trace!(model, batch, { model.encoder.layer[2].output.save() }).unwrap();
    assert_eq!(h2.size(), vec![2, 14, 384]);
    assert!(close(sum(&h2), f(&want["sum"]), 1e-3), "sum {}", sum(&h2));
    let from_text = trace!(model, [PARIS, ROME], { model.encoder.layer[2].output.save() }).unwrap();
    assert!(h2.equal(&from_text), "the reference ids are what our tokenizer makes of the sentences");
}

#[test]
fn a_batch_tokenized_once_traces_like_its_sentences() {
    let model = minilm();
    let batch = model.tokenize(&[PARIS, ROME]).unwrap();
    for l in [0, 5] {
        let a = trace!(model, &batch, { model.encoder.layer[l].output.save() }).unwrap();
        let b = trace!(model, [PARIS, ROME], { model.encoder.layer[l].output.save() }).unwrap();
        assert!(a.equal(&b), "layer {l}");
    }
    // A swap on the shared batch does not change the batch's tensors.
    let ids_before = batch.input_ids.copy();
    let z = trace!(model, &batch, {
        model.encoder.layer[3].output[..] = 0.0;
        model.encoder.layer[5].output.save()
    })
    .unwrap();
    assert!(close(sum(&z), f(&case("zero_ablation")["sum"]), 1e-3), "zero ablation sum {}", sum(&z));
    assert!(batch.input_ids.equal(&ids_before));
}

#[test]
fn token_ids_are_one_row_each_fully_attended() {
    let model = minilm();
    let paris = model.tokenize(&[PARIS]).unwrap();
    let ids: Vec<i64> = Vec::try_from(paris.input_ids.get(0)).unwrap();
    let alone = trace!(model, PARIS, { model.output.save() }).unwrap();
    let from_vec = trace!(model, ids.clone(), { model.output.save() }).unwrap();
    let from_slice = trace!(model, ids.as_slice(), { model.output.save() }).unwrap();
    let from_1d = trace!(model, &Tensor::from_slice(&ids), { model.output.save() }).unwrap();
    let from_2d = trace!(model, Tensor::from_slice(&ids).view([1, -1]).to_kind(Kind::Int), { model.output.save() }).unwrap();
    for (what, t) in [("Vec<i64>", &from_vec), ("&[i64]", &from_slice), ("[seq] tensor", &from_1d), ("[1, seq] i32 tensor", &from_2d)] {
        assert!(t.equal(&alone), "{what}");
    }
}

#[test]
fn tokenized_and_sentence_invokes_are_padded_together() {
    let model = minilm();
    // ROME is 13 tokens, PARIS 14: the tokenized ROME invoke gets one [PAD] on the right,
    // exactly what tokenizing both sentences together gives.
    let rome = model.tokenize(&[ROME]).unwrap();
    assert_eq!(rome.seq_len(), 13);
    let (r, p) = trace!(model, {
        invoke(&rome) {
            let r = model.output.save();
        }
        invoke(PARIS) {
            (r, model.output.save())
        }
    })
    .unwrap();
    let both = trace!(model, [ROME, PARIS], { model.output.save() }).unwrap();
    assert_eq!(r.size(), vec![1, 14, 384]);
    assert!(r.equal(&both.narrow(0, 0, 1)) && p.equal(&both.narrow(0, 1, 1)));
    // Patching across a tokenized and a sentence invoke: position 1 of layer 4, as in the
    // Python case `two_invoke_patching` (there both invokes were sentences).
    let want = case("two_invoke_patching");
    let paris = model.tokenize(&[PARIS]).unwrap();
    let out = trace!(model, {
        invoke(&paris) {
            let h = model.encoder.layer[4].output[.., 1];
        }
        invoke(ROME) {
            model.encoder.layer[4].output[.., 1] = h;
            model.output.save()
        }
    })
    .unwrap();
    let row1_sum = f(&want["patched_row_sums"][1]);
    assert!(close(sum(&out), row1_sum, 1e-3), "patched row sum {} vs {row1_sum}", sum(&out));
}

#[test]
fn bad_tokenized_input_is_an_error_naming_the_field() {
    let model = minilm();
    let good = model.tokenize(&[PARIS, ROME]).unwrap();
    let with = |f: &dyn Fn(&mut TextBatch)| {
        let mut b = model.tokenize(&[PARIS, ROME]).unwrap();
        f(&mut b);
        b
    };
    let expect = |b: TextBatch, needle: &str| {
        let e = trace!(model, b, { model.output.save() }).unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e:?}");
        assert!(e.to_string().contains(needle), "`{e}` should mention `{needle}`");
    };
    expect(with(&|b| b.input_ids = b.input_ids.to_kind(Kind::Float)), "invoke 0: `input_ids` must be a [batch, seq] tensor of token ids");
    expect(with(&|b| b.attention_mask = b.attention_mask.to_kind(Kind::Float)), "`attention_mask` must be a [batch, seq] tensor of 1 (attend) / 0 (padding)");
    expect(with(&|b| b.attention_mask = b.attention_mask.narrow(1, 0, 5)), "`attention_mask` must have the shape of `input_ids` [2, 14], got Tensor[2, 5]");
    expect(with(&|b| b.token_type_ids = b.token_type_ids.flatten(0, -1)), "`token_type_ids`");
    // The strings are not needed to run the model: a batch whose `tokens` do not match still runs.
    let ok = trace!(model, with(&|b| b.tokens.truncate(1)), { model.output.save() }).unwrap();
    assert_eq!(ok.size(), vec![2, 14, 384]);
    let e = trace!(model, Tensor::zeros([1, 513], (Kind::Int64, Device::Cpu)), { model.output.save() }).unwrap_err();
    assert!(e.to_string().contains("the tokenized input has 513 positions; the model accepts at most 512"), "{e}");
    let e = trace!(model, Vec::<i64>::new(), { model.output.save() }).unwrap_err();
    assert!(e.to_string().contains("must hold at least one id, got Tensor[0]"), "{e}");
    // Ids outside the vocabulary (30522) or segment ids outside type_vocab_size (2): named
    // with their position before the model runs, not an opaque lookup failure inside it.
    let e = trace!(model, vec![101i64, 30522, 102], { model.output.save() }).unwrap_err();
    assert_eq!(e.to_string(), "invoke 0: `input_ids` holds 30522 at row 0, position 1; the model's vocab_size is 30522, so ids must be in 0..30522");
    let e = trace!(model, vec![-1i64, 102], { model.output.save() }).unwrap_err();
    assert!(e.to_string().contains("`input_ids` holds -1 at row 0, position 0"), "{e}");
    expect(with(&|b| { let _ = b.token_type_ids.get(1).get(3).fill_(2); }), "`token_type_ids` holds 2 at row 1, position 3; the model's type_vocab_size is 2");
    // A bool mask is a mask.
    let bool_mask = with(&|b| b.attention_mask = b.attention_mask.to_kind(Kind::Bool));
    assert!(trace!(model, bool_mask, { model.output.save() }).unwrap().equal(&trace!(model, &good, { model.output.save() }).unwrap()));
    // Which invoke was wrong.
    let e = trace!(model, {
        invoke(&good) {}
        invoke(Tensor::ones([1, 4], (Kind::Float, Device::Cpu))) { model.output.save() }
    })
    .unwrap_err();
    assert!(e.to_string().starts_with("invoke 1: `input_ids` must be a [batch, seq] tensor of token ids"), "{e}");
    // The model still works afterwards (nothing stayed hooked).
    let ok = trace!(model, &good, { model.output.save() }).unwrap();
    assert_eq!(ok.size(), vec![2, 14, 384]);
}

#[test]
fn edits_of_the_ids_inside_a_trace_leave_the_callers_tensors_alone() {
    let model = minilm();
    let batch = model.tokenize(&[PARIS, ROME]).unwrap();
    let ids: Vec<i64> = Vec::try_from(batch.input_ids.get(0)).unwrap();
    let ids_tensor = Tensor::from_slice(&ids);
    let before = trace!(model, &batch, { model.output.save() }).unwrap();
    let ids_before = batch.input_ids.copy();
    // In-place edits of the word-embedding lookup's input (the ids tensor itself) and of the
    // segment ids, on the batch and on a borrowed ids tensor.
    let edited = trace!(model, &batch, {
        model.embeddings.word_embeddings.input[.., 1] = 0i64;
        model.embeddings.token_type_embeddings.input[.., 0] = 1i64;
        model.output.save()
    })
    .unwrap();
    assert!(!edited.equal(&before), "the edit changed this trace's output");
    trace!(model, &ids_tensor, {
        model.embeddings.word_embeddings.input[.., 2] = 0i64;
    })
    .unwrap();
    assert!(batch.input_ids.equal(&ids_before) && batch.token_type_ids.equal(&batch.token_type_ids.zeros_like()));
    assert_eq!(Vec::<i64>::try_from(&ids_tensor).unwrap(), ids);
    assert!(trace!(model, &batch, { model.output.save() }).unwrap().equal(&before), "the next trace sees the batch unchanged");
}

