//! SAE loading (SAELens and Gemma Scope folders), encode/decode against numpy, the semantics of
//! JumpReLU and TopK, and broken SAE folders.
//!
//! Expected values come from `tests/fixtures/sae/make_fixtures.py` (numpy, float64 arithmetic
//! on the float32 weights; each folder's `expected.safetensors`). The Rust side runs float32,
//! hence the 1e-5 tolerance (values are O(1), d_in = 6, d_sae = 10).

use std::path::{Path, PathBuf};

use nnsight::sae::{Architecture, Normalization, SaeConfig, SaeWeights};
use nnsight::tch::{Device, Kind, Tensor};
use nnsight::{Error, Sae};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sae").join(name)
}

fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(name).join("expected.safetensors")).unwrap().into_iter().collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn check_fixture(name: &str, arch: Architecture, norm: Normalization) {
    let sae = Sae::load(fixture(name), Device::Cpu).unwrap();
    assert_eq!(sae.config.architecture, arch, "{name}");
    assert_eq!(sae.config.normalize_activations, norm, "{name}");
    assert_eq!((sae.config.d_in, sae.config.d_sae), (6, 10));
    let e = expected(name);
    let z = sae.encode(&e["x"]).unwrap();
    assert!(max_diff(&z, &e["latents"]) < 1e-5, "{name}: latents differ by {}", max_diff(&z, &e["latents"]));
    // The same latents are zero exactly where numpy's are (no latent at an activation edge).
    assert!(z.eq(0.0).equal(&e["latents"].eq(0.0)), "{name}: different active latents");
    let d = sae.decode(&e["latents"]).unwrap();
    assert!(max_diff(&d, &e["decoded"]) < 1e-5, "{name}: decode differs by {}", max_diff(&d, &e["decoded"]));
    let r = sae.reconstruct(&e["x"]).unwrap();
    assert!(max_diff(&r, &e["recon"]) < 1e-5, "{name}: reconstruction differs by {}", max_diff(&r, &e["recon"]));
}

#[test]
fn saelens_standard() {
    check_fixture("standard", Architecture::Standard, Normalization::None);
    let sae = Sae::load(fixture("standard"), Device::Cpu).unwrap();
    assert!(sae.config.apply_b_dec_to_input);
    assert_eq!(sae.config.hook_name.as_deref(), Some("encoder.layer.2.output"));
}

#[test]
fn saelens_without_b_dec_on_input() {
    check_fixture("standard_no_b_dec", Architecture::Standard, Normalization::None);
    assert!(!Sae::load(fixture("standard_no_b_dec"), Device::Cpu).unwrap().config.apply_b_dec_to_input);
}

#[test]
fn saelens_jumprelu() {
    check_fixture("jumprelu", Architecture::JumpRelu, Normalization::None);
}

#[test]
fn saelens_topk_and_legacy_topk() {
    check_fixture("topk", Architecture::TopK { k: 3 }, Normalization::None);
    check_fixture("topk_legacy", Architecture::TopK { k: 4 }, Normalization::None);
    let legacy = Sae::load(fixture("topk_legacy"), Device::Cpu).unwrap();
    assert_eq!(legacy.config.hook_name.as_deref(), Some("blocks.1.hook_resid_pre"));
    assert_eq!(legacy.config.model_name.as_deref(), Some("tiny"));
}

#[test]
fn saelens_normalizations() {
    check_fixture("layer_norm", Architecture::Standard, Normalization::LayerNorm);
    check_fixture("constant_norm_rescale", Architecture::TopK { k: 3 }, Normalization::ConstantNormRescale);
}

#[test]
fn gemma_scope_npz() {
    check_fixture("gemma_scope", Architecture::JumpRelu, Normalization::None);
    let sae = Sae::load(fixture("gemma_scope/params.npz"), Device::Cpu).unwrap();
    assert!(!sae.config.apply_b_dec_to_input);
}

// ---------------------------------------------------------------- semantics by hand

/// An SAE whose encoder is the identity (d_in = d_sae = n, no biases), so pre-activations are
/// the input itself.
fn identity_sae(n: i64, architecture: Architecture, threshold: Option<Tensor>) -> nnsight::Hooked<Sae> {
    let config = SaeConfig {
        d_in: n,
        d_sae: n,
        architecture,
        apply_b_dec_to_input: true,
        normalize_activations: Normalization::None,
        hook_name: None,
        model_name: None,
    };
    let eye = Tensor::eye(n, (Kind::Float, Device::Cpu));
    let zeros = Tensor::zeros([n], (Kind::Float, Device::Cpu));
    let w = SaeWeights { w_enc: eye.copy(), b_enc: zeros.copy(), w_dec: eye, b_dec: zeros, threshold };
    Sae::from_weights(config, w, Kind::Float, Device::Cpu).unwrap()
}

#[test]
fn jumprelu_keeps_pre_activation_strictly_above_threshold() {
    let th = Tensor::from_slice(&[0.5f32, 0.5, 0.5, 0.5, -0.25, 0.0]);
    let sae = identity_sae(6, Architecture::JumpRelu, Some(th));
    // At the threshold: dropped; just above: kept as is (not shifted); a negative threshold
    // still gives relu(pre) = 0 for a negative pre-activation; threshold 0 and pre 0: dropped.
    let above = f32::from_bits(0.5f32.to_bits() + 1);
    let x = Tensor::from_slice(&[0.5f32, above, 0.7, 0.2, -0.1, 0.0]).view([1, 6]);
    let z = sae.encode(&x).unwrap();
    let got: Vec<f32> = Vec::try_from(z.view([-1])).unwrap();
    assert_eq!(got, vec![0.0, above, 0.7, 0.0, 0.0, 0.0]);
}

#[test]
fn topk_keeps_k_largest_then_relu() {
    let sae = identity_sae(5, Architecture::TopK { k: 2 }, None);
    let x = Tensor::from_slice(&[0.3f32, 2.0, -1.0, 1.5, 0.1, -1.0, -2.0, 0.5, -3.0, -0.5]).view([2, 5]);
    let z: Vec<f32> = Vec::try_from(sae.encode(&x).unwrap().view([-1])).unwrap();
    // Row 0: 2.0 and 1.5. Row 1: the top two are 0.5 and -0.5, and ReLU makes -0.5 zero.
    assert_eq!(z, vec![0.0, 2.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0]);
}

#[test]
fn topk_ties_keep_exactly_k() {
    let sae = identity_sae(4, Architecture::TopK { k: 2 }, None);
    // Three latents tie at the top: exactly two are kept (libtorch's topk picks which), each
    // with the tied value.
    let x = Tensor::from_slice(&[3.0f32, 1.0, 3.0, 3.0]).view([1, 4]);
    let z: Vec<f32> = Vec::try_from(sae.encode(&x).unwrap().view([-1])).unwrap();
    assert_eq!(z.iter().filter(|&&v| v != 0.0).count(), 2, "{z:?}");
    assert!(z.iter().all(|&v| v == 0.0 || v == 3.0), "{z:?}");
    assert_eq!(z[1], 0.0);
}

// ---------------------------------------------------------------- broken folders

struct Tmp(tempfile::TempDir);

impl Tmp {
    /// A copy of fixture `name`.
    fn copy_of(name: &str) -> Tmp {
        let t = Tmp(tempfile::tempdir().unwrap());
        for entry in std::fs::read_dir(fixture(name)).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, t.0.path().join(p.file_name().unwrap())).unwrap();
        }
        t
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn edit_cfg(&self, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let p = self.path().join("cfg.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        std::fs::write(p, v.to_string()).unwrap();
    }
    /// Rewrites weight `key` of `sae_weights.safetensors` as `edit` makes it.
    fn edit_weight(&self, key: &str, edit: impl Fn(&Tensor) -> Tensor) {
        let p = self.path().join("sae_weights.safetensors");
        let w: Vec<(String, Tensor)> =
            Tensor::read_safetensors(&p).unwrap().into_iter().map(|(k, v)| if k == key { (k, edit(&v)) } else { (k, v) }).collect();
        Tensor::write_safetensors(&w, &p).unwrap();
    }
    fn load_err(&self) -> String {
        match Sae::load(self.path(), Device::Cpu) {
            Ok(_) => panic!("loaded a broken SAE folder"),
            Err(e) => e.to_string(),
        }
    }
}

fn contains_all(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} does not mention {p:?}");
    }
}

#[test]
fn bad_configs_are_named() {
    let t = Tmp::copy_of("standard");
    t.edit_cfg(|c| {
        c.remove("d_in");
    });
    contains_all(&t.load_err(), &["cfg.json", "d_in"]);

    let t = Tmp::copy_of("standard");
    t.edit_cfg(|c| {
        c.insert("architecture".into(), "gated".into());
    });
    contains_all(&t.load_err(), &["cfg.json", "\"gated\"", "not supported"]);

    let t = Tmp::copy_of("standard");
    t.edit_cfg(|c| {
        c.insert("normalize_activations".into(), "expected_average_only_in".into());
    });
    contains_all(&t.load_err(), &["cfg.json", "expected_average_only_in", "fold"]);

    let t = Tmp::copy_of("topk");
    t.edit_cfg(|c| {
        c.insert("k".into(), 11.into());
    });
    contains_all(&t.load_err(), &["cfg.json", "`k`", "d_sae = 10"]);

    let t = Tmp::copy_of("standard");
    t.edit_cfg(|c| {
        c.insert("d_sae".into(), (-3).into());
    });
    contains_all(&t.load_err(), &["d_sae", "positive"]);
}

#[test]
fn weights_that_disagree_with_the_config_are_named_before_reading() {
    // A config that claims a huge d_sae: the header check fails before anything is allocated.
    let t = Tmp::copy_of("standard");
    t.edit_cfg(|c| {
        c.insert("d_sae".into(), 4_000_000_000i64.into());
    });
    let e = Sae::load(t.path(), Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::WeightShape { ref key, .. } if key == "W_enc"), "{e}");
    contains_all(&e.to_string(), &["sae_weights.safetensors", "W_enc", "4000000000"]);

    // JumpReLU config over standard weights: no threshold.
    let t = Tmp::copy_of("standard");
    t.edit_cfg(|c| {
        c.insert("architecture".into(), "jumprelu".into());
    });
    let e = Sae::load(t.path(), Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::MissingWeight { ref key, .. } if key == "threshold"), "{e}");

    // Integer weights.
    let t = Tmp::copy_of("standard");
    t.edit_weight("b_enc", |v| v.to_kind(Kind::Int));
    let e = Sae::load(t.path(), Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::WeightDtype { ref key, .. } if key == "b_enc"), "{e}");

    // A standard config over JumpReLU weights: the threshold would be dropped silently.
    let t = Tmp::copy_of("jumprelu");
    t.edit_cfg(|c| {
        c.insert("architecture".into(), "standard".into());
    });
    let e = Sae::load(t.path(), Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::UnusedWeight { ref key, .. } if key == "threshold"), "{e}");

    // A NaN weight: refused at load, naming it, rather than NaN latents later.
    let t = Tmp::copy_of("standard");
    t.edit_weight("b_enc", |v| v.full_like(f64::NAN));
    let e = Sae::load(t.path(), Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::Input(ref m) if m.contains("b_enc") && m.contains("NaN")), "{e}");
}

#[test]
fn from_weights_checks_k_and_finiteness_as_loading_does() {
    let n = 8;
    let eye = Tensor::eye(n, (Kind::Float, Device::Cpu));
    let zeros = Tensor::zeros([n], (Kind::Float, Device::Cpu));
    let build = |architecture: Architecture, w_enc: Tensor, w_dec: Tensor, kind: Kind| {
        let config = SaeConfig {
            d_in: n,
            d_sae: n,
            architecture,
            apply_b_dec_to_input: false,
            normalize_activations: Normalization::None,
            hook_name: None,
            model_name: None,
        };
        let w = SaeWeights { w_enc, b_enc: zeros.copy(), w_dec, b_dec: zeros.copy(), threshold: None };
        Sae::from_weights(config, w, kind, Device::Cpu).map(drop)
    };
    for k in [0, 9, -1] {
        let e = build(Architecture::TopK { k }, eye.copy(), eye.copy(), Kind::Float).unwrap_err();
        assert!(matches!(e, Error::Input(ref m) if m.contains("from 1 to d_sae = 8")), "k {k}: {e}");
    }
    build(Architecture::TopK { k: 8 }, eye.copy(), eye.copy(), Kind::Float).unwrap();
    let e = build(Architecture::Standard, eye.copy(), &eye * f64::NAN, Kind::Float).unwrap_err();
    assert!(matches!(e, Error::Input(ref m) if m.contains("W_dec") && m.contains("NaN")), "{e}");
    // Finite in f32, infinite in f16: refused for that kind.
    let e = build(Architecture::Standard, &eye * 1e6, eye.copy(), Kind::Half).unwrap_err();
    assert!(matches!(e, Error::Input(ref m) if m.contains("W_enc") && m.contains("Half")), "{e}");
}

#[test]
fn bad_npz_files_are_named() {
    let write_npz = |t: &Tmp, arrays: &[(&str, Tensor)]| {
        use std::io::Write;
        let f = std::fs::File::create(t.path().join("params.npz")).unwrap();
        let mut z = zip_writer(f);
        for (name, a) in arrays {
            z.start_file(format!("{name}.npy"), stored()).unwrap();
            z.write_all(&npy_bytes(a)).unwrap();
        }
        z.finish().unwrap();
    };
    let arr = |shape: &[i64]| Tensor::ones(shape, (Kind::Float, Device::Cpu));
    let t = Tmp(tempfile::tempdir().unwrap());
    write_npz(&t, &[("W_enc", arr(&[6, 10])), ("W_dec", arr(&[10, 6])), ("b_enc", arr(&[10])), ("b_dec", arr(&[6]))]);
    let e = Sae::load(t.path(), Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::MissingWeight { ref key, .. } if key == "threshold"), "{e}");
    contains_all(&e.to_string(), &["params.npz", "threshold"]);

    write_npz(&t, &[("W_enc", arr(&[6, 10])), ("W_dec", arr(&[6, 10])), ("b_enc", arr(&[10])), ("b_dec", arr(&[6])), ("threshold", arr(&[10]))]);
    let e = Sae::load(t.path(), Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::WeightShape { ref key, ref expected, .. } if key == "W_dec" && expected == &vec![10, 6]), "{e}");

    std::fs::write(t.path().join("params.npz"), b"not a zip file at all").unwrap();
    contains_all(&Sae::load(t.path(), Device::Cpu).unwrap_err().to_string(), &["params.npz", "zip"]);

    // A header claiming far more data than its entry holds: refused before reading.
    let mut huge = npy_bytes(&arr(&[6, 10]));
    let header = String::from_utf8_lossy(&huge[10..]).to_string();
    let patched = header.replacen("(6, 10)", "(600000, 100000)", 1);
    huge.truncate(10);
    huge.extend_from_slice(patched.as_bytes());
    {
        use std::io::Write;
        let mut z = zip_writer(std::fs::File::create(t.path().join("params.npz")).unwrap());
        z.start_file("W_enc.npy", stored()).unwrap();
        z.write_all(&huge).unwrap();
        z.finish().unwrap();
    }
    let e = Sae::load(t.path(), Device::Cpu).unwrap_err();
    contains_all(&e.to_string(), &["params.npz", "W_enc", "600000"]);

    let empty = Tmp(tempfile::tempdir().unwrap());
    contains_all(&Sae::load(empty.path(), Device::Cpu).unwrap_err().to_string(), &["cfg.json", "params.npz"]);
}

fn stored() -> zip::write::FileOptions {
    zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored)
}

fn zip_writer(f: std::fs::File) -> zip::ZipWriter<std::fs::File> {
    zip::ZipWriter::new(f)
}

/// A float32 C-order `.npy` file (format 1.0) holding `t`.
fn npy_bytes(t: &Tensor) -> Vec<u8> {
    let shape = t.size();
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    let v: Vec<f32> = Vec::try_from(t.contiguous().view([-1])).unwrap();
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}
