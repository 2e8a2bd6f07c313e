//! Helper modules in a trace (`helpers = [sae]`, nnsight's `envoy(x, hook=True)`): an SAE
//! called on a proxy inside the block runs during the model's forward, and its own hook points
//! (the latents) are read and edited in the same trace. Values against the SAE formula written
//! out in plain tch and traces of the model with those values swapped in by hand.

mod common;

use nnsight::prelude::*;
use nnsight::sae::{Architecture, Normalization, SaeConfig, SaeWeights};
use nnsight::{Error, Sae};

const TEXT: &str = "The Eiffel Tower is in the city of Paris.";

struct Raw {
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
}

fn random_sae(seed: i64) -> (Hooked<Sae>, Raw) {
    tch::manual_seed(seed);
    let r = |s: &[i64], scale: f64| Tensor::randn(s, (Kind::Float, Device::Cpu)) * scale;
    let raw = Raw { w_enc: r(&[384, 512], 0.08), b_enc: r(&[512], 0.1), w_dec: r(&[512, 384], 0.08), b_dec: r(&[384], 0.1) };
    let config = SaeConfig {
        d_in: 384,
        d_sae: 512,
        architecture: Architecture::Standard,
        apply_b_dec_to_input: true,
        normalize_activations: Normalization::None,
        hook_name: Some("encoder.layer.2.output".into()),
        model_name: None,
    };
    let w = SaeWeights { w_enc: raw.w_enc.copy(), b_enc: raw.b_enc.copy(), w_dec: raw.w_dec.copy(), b_dec: raw.b_dec.copy(), threshold: None };
    (Sae::from_weights(config, w, Kind::Float, Device::Cpu).unwrap(), raw)
}

fn latents(raw: &Raw, x: &Tensor) -> Tensor {
    ((x - &raw.b_dec).matmul(&raw.w_enc) + &raw.b_enc).relu()
}

fn decode(raw: &Raw, z: &Tensor) -> Tensor {
    z.matmul(&raw.w_dec) + &raw.b_dec
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn sae_latents_are_read_and_edited_in_the_model_trace() {
    let model = common::minilm::minilm();
    let (sae, raw) = random_sae(11);
    let h = trace!(model, TEXT, { model.encoder.layer[2].output.save() }).unwrap();
    let z = latents(&raw, &h);
    let mut ablated = z.copy();
    let _ = ablated.narrow(2, 7, 1).fill_(0.0);
    let _ = &mut ablated;
    let recon_ablated = decode(&raw, &ablated);
    // By hand: the ablated reconstruction swapped into the model.
    let want = trace!(model, TEXT, {
        model.encoder.layer[2].output = recon_ablated.shallow_clone();
        model.encoder.layer[5].output.save()
    })
    .unwrap();

    let (z_read, z_after, out) = trace!(model, TEXT, helpers = [sae], {
        let h = model.encoder.layer[2].output;
        model.encoder.layer[2].output = sae.call(h.shallow_clone());   // the SAE runs in the forward
        let z_read = sae.encoder.output.save();                        // its latents, a hook point
        sae.encoder.output[.., .., 7] = 0.0;                           // feature ablation
        (z_read, sae.decoder.input.save(), model.encoder.layer[5].output.save())
    })
    .unwrap();
    assert!(max_diff(&z_read, &z) < 1e-5, "latents read in the model's trace");
    assert!(max_diff(&z_after, &ablated) < 1e-5, "the decoder saw the edited latents");
    assert!(max_diff(&out, &want) < 1e-5, "the model went on with the ablated reconstruction");
    // Nothing left behind: plain calls give plain values.
    assert!(max_diff(&sae.reconstruct(&h).unwrap(), &decode(&raw, &z)) < 1e-5);
    assert!(!nnsight::is_tracing());
}

#[test]
fn a_helper_called_in_two_invokes_has_two_calls() {
    let model = common::minilm::minilm();
    let (sae, raw) = random_sae(12);
    let other = "The Colosseum is in Rome.";
    let (h0, h1) = trace!(model, {
        invoke(TEXT) { let h0 = model.encoder.layer[2].output.save(); }
        invoke(other) { (h0, model.encoder.layer[2].output.save()) }
    })
    .unwrap();
    let (z0, z1) = trace!(model, helpers = [sae], {
        invoke(TEXT) {
            let r = sae.call(model.encoder.layer[2].output.shallow_clone());
            let z0 = sae.encoder.output.save();                         // call 0: this invoke's rows
            let _ = r.save();
        }
        invoke(other) {
            let r = sae.call(model.encoder.layer[2].output.shallow_clone());
            let _ = r.save();
            (z0, sae.encoder.at(1).output.save())                      // call 1
        }
    })
    .unwrap();
    assert!(max_diff(&z0, &latents(&raw, &h0)) < 1e-5);
    assert!(max_diff(&z1, &latents(&raw, &h1)) < 1e-5);
}

#[test]
fn a_helper_hook_point_that_never_runs_is_an_error_and_model_modules_called_in_nodes_stay_untraced() {
    let model = common::minilm::minilm();
    let (sae, _) = random_sae(13);
    let err = trace!(model, TEXT, helpers = [sae], {
        let _h = model.encoder.layer[2].output.save();
        sae.encoder.output.save()                                       // the SAE is never called
    })
    .unwrap_err();
    assert!(matches!(&err, Error::NeverProvided { point, .. } if point.contains("encoder")), "{err}");
    // A model module called inside an expression runs as a plain function, not a hook point.
    let a = trace!(model, TEXT, helpers = [sae], {
        let h = model.encoder.layer[4].output;
        let again = model.encoder.layer[5].call((h.shallow_clone(), Tensor::zeros([1, 1, 1, 14], (Kind::Float, Device::Cpu))));
        let _ = again.save();
        model.encoder.layer[5].output.save()
    })
    .unwrap();
    let b = trace!(model, TEXT, { model.encoder.layer[5].output.save() }).unwrap();
    assert!(a.equal(&b), "layer 5's output is the model's own call, not the one made in the expression");
}
