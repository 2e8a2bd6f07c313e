//! `trace!` on the real all-MiniLM-L6-v2 against the values Python nnsight computes for the same
//! experiments (`fixtures/minilm.json`), and invoke isolation checked against plain runs.

mod common;

use common::minilm::{assert_values, case, close, f, minilm, PARIS, ROME};
use nnsight::prelude::*;

fn sum(t: &Tensor) -> f64 {
    t.sum(Kind::Double).double_value(&[])
}

fn first5(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.narrow(0, 0, 5).to_kind(Kind::Double)).unwrap()
}

#[test]
fn save_layer_matches_python_nnsight() {
    let model = minilm();
    let want = case("save_layer");
    let h2 = trace!(model, [PARIS, ROME], {
        model.encoder.layer[2].output.save()
    })
    .unwrap();
    assert_eq!(h2.size(), vec![2, 14, 384]);
    assert!(close(sum(&h2), f(&want["sum"]), 1e-3), "sum {}", sum(&h2));
    let mean_abs = h2.abs().mean(Kind::Double).double_value(&[]);
    assert!(close(mean_abs, f(&want["mean_abs"]), 0.0), "mean_abs {mean_abs}");
    // row 0 only: the same layer saved from an invoke of the first sentence alone in the batch.
    let row0 = trace!(model, {
        invoke(PARIS) { let r = model.encoder.layer[2].output.save(); }
        invoke(ROME) {}
        r
    })
    .unwrap();
    assert_eq!(row0.size(), vec![1, 14, 384]);
    assert!(close(sum(&row0), f(&want["row0_only"]["sum"]), 1e-3));
    assert!(row0.equal(&h2.narrow(0, 0, 1)));
}

#[test]
fn zero_ablation_matches_python_nnsight() {
    let model = minilm();
    let want = case("zero_ablation");
    let out = trace!(model, [PARIS, ROME], {
        model.encoder.layer[3].output[..] = 0.0;
        model.encoder.layer[5].output.save()
    })
    .unwrap();
    assert_eq!(out.size(), vec![2, 14, 384]);
    assert!(close(sum(&out), f(&want["sum"]), 1e-3), "sum {}", sum(&out));
    assert_values(&first5(&out.get(0).get(0)), &want["cls_first5"], "cls_first5");
    assert_values(&first5(&out.get(1).get(0)), &want["cls_first5_row1"], "cls_first5_row1");
}

#[test]
fn two_invoke_patching_matches_python_nnsight() {
    let model = minilm();
    let want = case("two_invoke_patching");
    let clean = tch::no_grad(|| model.forward(&[PARIS, ROME])).unwrap();
    let (row0, row1) = trace!(model, {
        invoke(PARIS) {
            let paris = model.encoder.layer[4].output;
            let row0 = model.encoder.layer[5].output.save();
        }
        invoke(ROME) {
            model.encoder.layer[4].output[.., 1] = paris[.., 1];
            (row0, model.encoder.layer[5].output.save())
        }
    })
    .unwrap();
    let sums = [sum(&row0), sum(&row1)];
    assert_values(&sums, &want["patched_row_sums"], "patched_row_sums");
    assert!(row0.equal(&clean.narrow(0, 0, 1)), "row 0 must be bit-identical to the clean run");
    let diff = (&row1 - clean.narrow(0, 1, 1)).abs().max().double_value(&[]);
    assert!(close(diff, f(&want["row1_max_abs_diff"]), 1e-6), "row1 max abs diff {diff}");
    assert_values(&first5(&row1.get(0).get(0)), &want["patched_cls_first5_row1"], "patched cls row 1");
}

#[test]
fn ablation_in_one_invoke_leaves_the_other_exactly_as_alone() {
    let model = minilm();
    // Invoke 2 alone, with the same batch shape as below (padding to 14 does not change a row).
    let alone = trace!(model, [ROME], { model.encoder.layer[5].output.save() }).unwrap();
    let (a, b, dims) = trace!(model, {
        invoke([PARIS, PARIS]) {
            let d0 = model.encoder.layer[0].output.size()[0];
            model.encoder.layer[1].output[..] = 0.0;
            let a = model.encoder.layer[5].output.save();
        }
        invoke(ROME) {
            let d1 = model.encoder.layer[0].output.size()[0];
            (a, model.encoder.layer[5].output.save(), (d0.save(), d1.save()))
        }
    })
    .unwrap();
    assert_eq!(dims, (2, 1), "invokes with 2 and 1 inputs see dim 0 of 2 and 1");
    assert_eq!(a.size()[0], 2);
    let n = alone.size()[1];
    let diff = (b.narrow(1, 0, n) - &alone).abs().max().double_value(&[]);
    assert!(diff <= 1e-5, "invoke 2 changed by invoke 1's ablation: {diff}");
}

#[test]
fn saving_and_swapping_back_is_bitwise_neutral() {
    let model = minilm();
    let (h3, plain) = trace!(model, [PARIS, ROME], {
        (model.encoder.layer[3].output.save(), model.encoder.layer[5].output.save())
    })
    .unwrap();
    let again = trace!(model, [PARIS, ROME], {
        model.encoder.layer[3].output = h3.shallow_clone();
        model.encoder.layer[5].output.save()
    })
    .unwrap();
    assert!(again.equal(&plain));
}

#[test]
fn cross_invoke_patch_equals_patch_from_an_earlier_trace() {
    let model = minilm();
    let clean = trace!(model, {
        invoke(PARIS) { let c = model.encoder.layer[4].output.save(); }
        invoke(ROME) {}
        c
    })
    .unwrap();
    let from_earlier = trace!(model, {
        invoke(PARIS) {}
        invoke(ROME) {
            model.encoder.layer[4].output[.., 1] = clean.get(0).get(1);
            model.encoder.layer[5].output.save()
        }
    })
    .unwrap();
    let cross = trace!(model, {
        invoke(PARIS) { let c = model.encoder.layer[4].output; }
        invoke(ROME) {
            model.encoder.layer[4].output[.., 1] = c[.., 1];
            model.encoder.layer[5].output.save()
        }
    })
    .unwrap();
    assert!(cross.equal(&from_earlier));
}

#[test]
fn module_that_never_runs_is_reported_and_the_next_trace_works() {
    let model = minilm();
    // The embeddings' LayerNorm runs once per forward pass: call 1 never happens.
    let err = trace!(model, PARIS, { model.embeddings.LayerNorm.next().output.save() }).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`embeddings.LayerNorm.output` (call 1) was never provided: the module ran only 1 time(s) in this run"
    );
    let plain = tch::no_grad(|| model.forward(&[PARIS])).unwrap();
    let traced = trace!(model, PARIS, { model.encoder.layer[5].output.save() }).unwrap();
    assert!(traced.equal(&plain));
}

#[test]
fn module_tree_lists_every_hook_point_by_checkpoint_name() {
    use nnsight::ModuleTree;
    let model = minilm();
    let modules = model.modules();
    // Hand count: root, embeddings (+4 children), encoder, and per layer: the layer, attention,
    // attention.self (+query, key, value, and the hook points q, k, scores, probs, z),
    // attention.output (+dense, LayerNorm), intermediate (+dense, intermediate_act_fn, the hook
    // point act), output (+dense, LayerNorm) = 21 per layer.
    assert_eq!(modules.len(), 1 + 5 + 1 + 6 * 21);
    assert_eq!(modules[0], ("".to_string(), "Bert"));
    assert!(modules.contains(&("encoder.layer.5.attention.self".to_string(), "BertSelfAttention")));
    assert!(modules.contains(&("encoder.layer.0.output.LayerNorm".to_string(), "LayerNorm")));
    // Every leaf module path is the prefix of a checkpoint key (`<path>.weight`).
    let vars = nnsight::tch::Tensor::read_safetensors(common::minilm::minilm_dir().join("model.safetensors")).unwrap();
    let keys: Vec<String> = vars.into_iter().map(|(k, _)| k).collect();
    for (path, ty) in &modules {
        if ["Linear", "LayerNorm", "Embedding"].contains(ty) {
            assert!(keys.contains(&format!("{path}.weight")), "{path} has no weight in the checkpoint");
        }
    }
}

#[test]
fn swap_with_wrong_shape_names_module_and_both_layouts() {
    let model = minilm();
    let err = trace!(model, "Paris", {
        model.encoder.layer[1].output = Tensor::zeros([1, 2], (Kind::Float, Device::Cpu));
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "swap at `encoder.layer.1.output` (call 0, invoke 0) has the wrong layout: expected Tensor[1, 3, 384] Float Cpu, got Tensor[1, 2] Float Cpu"
    );
}

#[test]
fn inputs_of_a_two_argument_module_and_swapping_the_first() {
    let model = minilm();
    let want = case("zero_ablation");
    let (input, mask_shape, prev) = trace!(model, [PARIS, ROME], {
        let input = model.encoder.layer[2].input.save();             // hidden_states
        let mask_shape = model.encoder.layer[2].inputs.1.size().save(); // extended attention mask
        (input, mask_shape, model.encoder.layer[1].output.save())
    })
    .unwrap();
    assert!(input.equal(&prev), "layer 2's first input is layer 1's output");
    assert_eq!(mask_shape, vec![2, 1, 1, 14]);
    // Zeroing layer 4's first input is what zeroing layer 3's output does downstream.
    let out = trace!(model, [PARIS, ROME], {
        model.encoder.layer[4].input = model.encoder.layer[4].input.zeros_like();
        model.encoder.layer[5].output.save()
    })
    .unwrap();
    assert!(close(sum(&out), f(&want["sum"]), 1e-3), "sum {}", sum(&out));
}
