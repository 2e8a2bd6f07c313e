//! An SAE as a hookable module: its latents are a hook point (read, ablate, steer), and spliced
//! into MiniLM's residual stream with `nnsight::sae` it gives the by-hand values; with the error
//! term and no edit the model's output is unchanged bit for bit.
//!
//! By-hand values use the formulas of `sae_lens/saes/*.py` written out here with plain tch
//! (`relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec`), not the library's SAE code.

mod common;

use nnsight::prelude::*;
use nnsight::sae::{self, Architecture, Normalization, SaeConfig, SaeWeights};
use nnsight::{Error, Hooked, Sae};

const TEXTS: [&str; 2] = ["The Eiffel Tower is in the city of Paris.", "The Colosseum is in Rome."];

struct Raw {
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
}

/// A random SAE over MiniLM's hidden size (seeded), and its raw weights for the by-hand values.
fn random_sae(architecture: Architecture, norm: Normalization, seed: i64) -> (Hooked<Sae>, Raw) {
    tch::manual_seed(seed);
    let r = |s: &[i64], scale: f64| Tensor::randn(s, (Kind::Float, Device::Cpu)) * scale;
    let raw = Raw { w_enc: r(&[384, 512], 0.08), b_enc: r(&[512], 0.1), w_dec: r(&[512, 384], 0.08), b_dec: r(&[384], 0.1) };
    let config = SaeConfig {
        d_in: 384,
        d_sae: 512,
        architecture,
        apply_b_dec_to_input: true,
        normalize_activations: norm,
        hook_name: Some("encoder.layer.2.output".into()),
        model_name: None,
    };
    let w = SaeWeights { w_enc: raw.w_enc.copy(), b_enc: raw.b_enc.copy(), w_dec: raw.w_dec.copy(), b_dec: raw.b_dec.copy(), threshold: None };
    (Sae::from_weights(config, w, Kind::Float, Device::Cpu).unwrap(), raw)
}

fn by_hand_latents(raw: &Raw, x: &Tensor) -> Tensor {
    ((x - &raw.b_dec).matmul(&raw.w_enc) + &raw.b_enc).relu()
}

fn by_hand_decode(raw: &Raw, z: &Tensor) -> Tensor {
    z.matmul(&raw.w_dec) + &raw.b_dec
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn latents_are_a_hook_point_of_the_sae() {
    let (sae, raw) = random_sae(Architecture::Standard, Normalization::None, 1);
    let x = Tensor::randn([3, 5, 384], (Kind::Float, Device::Cpu));
    let (z, z_after, recon, steered_recon) = trace!(sae, &x, {
        let z = sae.encoder.output.copy().save();      // a copy: the edits below are in place
        sae.encoder.output[.., .., 7] = 0.0;            // ablate feature 7
        sae.encoder.output[.., .., 11] = 4.0;           // steer feature 11
        (z, sae.decoder.input.save(), sae.output.save(), sae.decoder.output.save())
    })
    .unwrap();
    assert!(max_diff(&z, &by_hand_latents(&raw, &x)) < 1e-5);
    let edited = by_hand_latents(&raw, &x);
    let _ = edited.narrow(2, 7, 1).fill_(0.0);
    let _ = edited.narrow(2, 11, 1).fill_(4.0);
    assert!(max_diff(&z_after, &edited) < 1e-5);
    assert!(max_diff(&recon, &by_hand_decode(&raw, &edited)) < 1e-5);
    assert!(recon.equal(&steered_recon), "no normalization: the decoder's output is the reconstruction");
    // The trace left nothing behind: a plain call gives the plain reconstruction.
    assert!(max_diff(&sae.reconstruct(&x).unwrap(), &by_hand_decode(&raw, &by_hand_latents(&raw, &x))) < 1e-5);
}

#[test]
fn splice_with_error_term_leaves_the_model_output_unchanged_bit_for_bit() {
    let model = common::minilm::minilm();
    let plain = model.forward(&TEXTS).unwrap();
    for (arch, norm) in [
        (Architecture::Standard, Normalization::None),
        (Architecture::TopK { k: 20 }, Normalization::LayerNorm),
        (Architecture::Standard, Normalization::ConstantNormRescale),
    ] {
        let (sae, _) = random_sae(arch, norm, 2);
        let out = trace!(model, &TEXTS, {
            model.encoder.layer[2].output = sae::splice(&sae, &model.encoder.layer[2].output);
            model.output.save()
        })
        .unwrap();
        assert!(out.equal(&plain), "{arch:?} {norm:?}: spliced output differs from the plain forward by {}", max_diff(&out, &plain));
    }
}

#[test]
fn a_zero_ablated_row_spliced_stays_the_plain_value_under_every_normalization() {
    // A zero row (position 1 zero-ablated before the splice): SAELens' constant-norm rescale
    // divides by its zero norm; the splice must still give back exactly the activation.
    let model = common::minilm::minilm();
    let ablated_plain = trace!(model, &TEXTS, {
        model.encoder.layer[2].output[.., 1] = 0.0;
        model.output.save()
    })
    .unwrap();
    for norm in [Normalization::None, Normalization::ConstantNormRescale, Normalization::LayerNorm] {
        let (sae, _) = random_sae(Architecture::Standard, norm, 4);
        let out = trace!(model, &TEXTS, {
            model.encoder.layer[2].output[.., 1] = 0.0;
            model.encoder.layer[2].output = sae::splice(&sae, &model.encoder.layer[2].output);
            model.output.save()
        })
        .unwrap();
        assert!(out.isfinite().all().int64_value(&[]) == 1, "{norm:?}: NaN after splicing a zero row");
        assert!(out.equal(&ablated_plain), "{norm:?}: differs by {}", max_diff(&out, &ablated_plain));
        let zero = Tensor::zeros([2, 384], (Kind::Float, Device::Cpu));
        assert!(sae::splice(&sae, &zero).equal(&zero), "{norm:?}");
    }
}

#[test]
fn reconstruction_and_edited_splices_give_the_by_hand_values() {
    let model = common::minilm::minilm();
    let (sae, raw) = random_sae(Architecture::Standard, Normalization::None, 3);
    let batch = model.tokenize(&TEXTS).unwrap();
    let h = trace!(model, &batch, { model.encoder.layer[2].output.save() }).unwrap();
    let z = by_hand_latents(&raw, &h);
    let recon = by_hand_decode(&raw, &z);
    let ablated = z.copy();
    let _ = ablated.narrow(2, 5, 1).fill_(0.0);
    let spliced_ablation = &h + (by_hand_decode(&raw, &ablated) - &recon);

    // Expected outputs: the by-hand values swapped in.
    let want = |v: &Tensor| trace!(model, &batch, { model.encoder.layer[2].output = v.shallow_clone(); model.output.save() }).unwrap();
    let (got_recon, got_ablation, latents) = trace!(model, {
        invoke(&batch) {
            model.encoder.layer[2].output = sae::reconstruct(&sae, &model.encoder.layer[2].output);
            let a = model.output.save();
        }
        invoke(&batch) {
            let l = sae::latents(&sae, &model.encoder.layer[2].output).save();
            model.encoder.layer[2].output = sae::splice_edited(&sae, &model.encoder.layer[2].output, |z| {
                let _ = z.narrow(-1, 5, 1).fill_(0.0);
            });
            (a, model.output.save(), l)
        }
    })
    .unwrap();
    assert!(max_diff(&latents, &z) < 1e-5);
    assert!(max_diff(&got_recon, &want(&recon)) < 1e-4, "reconstruction: {}", max_diff(&got_recon, &want(&recon)));
    assert!(max_diff(&got_ablation, &want(&spliced_ablation)) < 1e-4);
    assert!(max_diff(&got_recon, &model.forward(&TEXTS).unwrap()) > 1e-2, "the reconstruction must change the output");
}

/// The SAE traced inside a node of the model's trace: its latents hook point edited there.
fn steered(sae: &Hooked<Sae>, h: &Tensor, f: i64, value: f64) -> Tensor {
    trace!(sae, h, {
        sae.encoder.output[.., .., f] = value;
        sae.output.save()
    })
    .expect("the SAE's trace")
}

#[test]
fn an_sae_trace_runs_inside_the_model_trace() {
    let model = common::minilm::minilm();
    let (sae, raw) = random_sae(Architecture::Standard, Normalization::None, 4);
    let batch = model.tokenize(&TEXTS).unwrap();
    let (h, out) = trace!(model, &batch, {
        let h = model.encoder.layer[1].output.save();
        model.encoder.layer[1].output = steered(&sae, &model.encoder.layer[1].output, 9, 3.0);
        (h, model.output.save())
    })
    .unwrap();
    let z = by_hand_latents(&raw, &h);
    let _ = z.narrow(2, 9, 1).fill_(3.0);
    let v = by_hand_decode(&raw, &z);
    let want = trace!(model, &batch, { model.encoder.layer[1].output = v.shallow_clone(); model.output.save() }).unwrap();
    assert!(max_diff(&out, &want) < 1e-4);
}

#[test]
fn an_sae_of_another_width_is_an_error_of_its_node_and_nothing_stays_hooked() {
    let model = common::minilm::minilm();
    let small = Sae::load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sae/standard"), Device::Cpu).unwrap();
    let e = trace!(model, &TEXTS, {
        model.encoder.layer[2].output = sae::splice(&small, &model.encoder.layer[2].output);
        model.output.save()
    })
    .unwrap_err();
    assert!(matches!(e, Error::Node { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("d_in = 6") && msg.contains("384"), "{msg}");
    // Plain calls report the same as a returned error.
    let x = Tensor::zeros([2, 384], (Kind::Float, Device::Cpu));
    assert!(small.encode(&x).unwrap_err().to_string().contains("d_in = 6"));
    assert!(small.reconstruct(&Tensor::zeros([2, 6], (Kind::Int64, Device::Cpu))).is_err());
    assert!(model.forward(&TEXTS).unwrap().equal(&common::minilm::minilm().forward(&TEXTS).unwrap()));
}

/// A float16 SAE given an activation it cannot hold (a value over 65504, or a row whose norm
/// overflows under constant-norm rescaling) refuses it, naming the value and the fix, instead
/// of returning NaN or infinity; the same SAE in float32 gives the by-hand value.
#[test]
fn an_activation_a_float16_sae_cannot_hold_is_an_error_not_nan() {
    let (sae, raw) = random_sae(Architecture::Standard, Normalization::None, 6);
    let half = |norm| {
        let w = SaeWeights { w_enc: raw.w_enc.copy(), b_enc: raw.b_enc.copy(), w_dec: raw.w_dec.copy(), b_dec: raw.b_dec.copy(), threshold: None };
        let mut config = sae.config.clone();
        config.normalize_activations = norm;
        Sae::from_weights(config, w, Kind::Half, Device::Cpu).unwrap()
    };
    let x = Tensor::randn([2, 384], (Kind::Float, Device::Cpu));
    let _ = x.get(1).get(5).fill_(1.0e5);
    let h = half(Normalization::None);
    for e in [h.encode(&x).unwrap_err(), h.reconstruct(&x).unwrap_err()] {
        assert!(matches!(e, Error::Input(ref m) if m.contains("largest magnitude 1e5") && m.contains("Half") && m.contains("Kind::Float")), "{e}");
    }
    // A float32 SAE holds it: the by-hand value.
    let expected = by_hand_decode(&raw, &by_hand_latents(&raw, &x));
    let scale = expected.abs().max().double_value(&[]);
    assert!(max_diff(&sae.reconstruct(&x).unwrap(), &expected) <= 1e-5 * scale, "float32 SAE");
    // Values that each fit float16 but whose norm (3400 * sqrt(384) = 66626) does not: the
    // constant-norm rescale would divide by infinity and encode a zero row.
    let y = Tensor::full([1, 384], 3400.0, (Kind::Float, Device::Cpu));
    assert!(half(Normalization::None).encode(&y).is_ok(), "3400 fits float16");
    let e = half(Normalization::ConstantNormRescale).encode(&y).unwrap_err();
    assert!(e.to_string().contains("ConstantNormRescale"), "{e}");

    // Inside a trace the splice's node fails with the same message, and nothing stays hooked.
    let model = common::minilm::minilm();
    let e = trace!(model, &TEXTS, {
        model.encoder.layer[2].output[0, 1, 3] = 1.0e5;
        model.encoder.layer[2].output = sae::splice(&h, &model.encoder.layer[2].output);
        model.output.save()
    })
    .unwrap_err();
    assert!(matches!(e, Error::Node { ref message, .. } if message.contains("overflows the SAE's dtype Half")), "{e}");
    assert!(model.forward(&TEXTS).unwrap().equal(&common::minilm::minilm().forward(&TEXTS).unwrap()));
}
