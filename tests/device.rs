//! Devices: every public loader puts the model on the device asked for, inputs follow it, and
//! a device this build or machine cannot use is a clear `Error::Device` (naming the device and
//! how to get CUDA), never a panic.
//!
//! Device-parameterised: `NNSIGHT_TEST_DEVICE` picks the device the value checks run on —
//! unset or `cpu`: the CPU; `cuda` or `cuda:N`: that GPU (what `scripts/gpu_check.sh` runs). The
//! values on that device are compared with the same computation on the CPU. The error checks
//! ask for a CUDA index beyond `tch::Cuda::device_count()`, which fails everywhere (on a CPU
//! build that is `Cuda(0)`).
//!
//! `generation_timing` (ignored by default) prints greedy-generation timings on the test device.
use std::path::PathBuf;
use std::time::Instant;

use nnsight::models::auto::{AutoCausalLm, AutoLanguageModel};
use nnsight::models::causal::{CausalLm, CausalLmExt, KvCacheHandle, LoadOptions, Sampling};
use nnsight::models::checkpoint::{check_device, libtorch_cuda_loaded};
use nnsight::models::gpt2::Gpt2;
use nnsight::prelude::*;
use nnsight::sae::Sae;
use nnsight::{Error, LanguageModel};

mod common;

/// The device of the value checks (module docs).
fn test_device() -> Device {
    match std::env::var("NNSIGHT_TEST_DEVICE")
        .unwrap_or_default()
        .trim()
    {
        "" | "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => panic!("NNSIGHT_TEST_DEVICE={other:?}: use cpu, cuda or cuda:N"),
        },
    }
}

/// A CUDA device that does not exist here: `Cuda(device_count)` (`Cuda(0)` without CUDA).
fn missing_cuda() -> Device {
    let n = if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    Device::Cuda(n)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `$LIBTORCH/lib` holds `libtorch_cuda.so` (the set-up with `--cuda`).
fn cuda_libtorch() -> bool {
    std::env::var_os("LIBTORCH")
        .is_some_and(|d| PathBuf::from(d).join("lib/libtorch_cuda.so").is_file())
}

/// The error for a missing device names it and says how to get CUDA.
fn assert_device_error<T>(what: &str, device: Device, r: Result<T, Error>) {
    let err = match r {
        Ok(_) => panic!("{what}: loading onto {device:?} succeeded on a machine without it"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        matches!(err, Error::Device(_)),
        "{what}: expected Error::Device, got {err:?}"
    );
    assert!(
        text.contains(&format!("{device:?}")),
        "{what}: the message names the device: {text}"
    );
    if !tch::Cuda::is_available() {
        assert!(
            text.contains("cargo xtask setup --cuda") || text.contains("driver"),
            "{what}: the message says how to get CUDA: {text}"
        );
    }
}

#[test]
fn cuda_availability_matches_the_libtorch() {
    let available = tch::Cuda::is_available();
    let count = tch::Cuda::device_count();
    eprintln!(
        "tch::Cuda::is_available() = {available}, device_count() = {count}, libtorch_cuda loaded = {}, \
         $LIBTORCH/lib has libtorch_cuda.so = {}",
        libtorch_cuda_loaded(),
        cuda_libtorch()
    );
    if cuda_libtorch() {
        // The CUDA set-up: the build must have linked libtorch_cuda despite --as-needed.
        assert!(libtorch_cuda_loaded(), "libtorch_cuda.so is in $LIBTORCH/lib but not loaded: the --no-as-needed link is missing");
    } else {
        // The CPU set-up: no CUDA part, so no CUDA whatever the machine has.
        assert!(!libtorch_cuda_loaded());
        assert!(!available, "a CPU-only libtorch reports CUDA");
        assert_eq!(count, 0);
    }
    if let Device::Cuda(i) = test_device() {
        assert!(
            available,
            "NNSIGHT_TEST_DEVICE asks for CUDA, which is not available here"
        );
        assert!(
            (i as i64) < count,
            "NNSIGHT_TEST_DEVICE=cuda:{i} but there are {count} devices"
        );
    }
}

#[test]
fn check_device_accepts_cpu_and_refuses_missing_cuda() {
    check_device(Device::Cpu).unwrap();
    check_device(test_device()).unwrap();
    let missing = missing_cuda();
    assert_device_error("check_device", missing, check_device(missing));
    // Far beyond any machine.
    assert_device_error(
        "check_device",
        Device::Cuda(4096),
        check_device(Device::Cuda(4096)),
    );
    if !tch::Cuda::is_available() {
        let text = check_device(Device::Cuda(0)).unwrap_err().to_string();
        assert!(text.contains("cannot use device Cuda(0)"), "{text}");
        assert!(text.contains("Device::Cpu works"), "{text}");
    }
}

/// Every public loading entry refuses a missing CUDA device with the same error.
#[test]
fn every_loader_refuses_a_missing_cuda_device() {
    let d = missing_cuda();
    let gpt2 = fixture("causal/gpt2");
    let opts = LoadOptions {
        device: d,
        dtype: None,
        ..Default::default()
    };
    assert_device_error("Gpt2::load_with", d, Gpt2::load_with(&gpt2, &opts));
    assert_device_error(
        "AutoCausalLm::load_with",
        d,
        AutoCausalLm::load_with(&gpt2, &opts),
    );
    assert_device_error(
        "AutoLanguageModel::load_with",
        d,
        AutoLanguageModel::load_with(&gpt2, &opts),
    );
    assert_device_error(
        "AutoLanguageModel::from_pretrained_on",
        d,
        AutoLanguageModel::from_pretrained_on(&gpt2, d),
    );
    let minilm = common::minilm::minilm_dir();
    assert_device_error(
        "LanguageModel::from_pretrained_on",
        d,
        LanguageModel::<nnsight::models::bert::Bert>::from_pretrained_on(&minilm, d),
    );
    assert_device_error("bundled::minilm_on", d, nnsight::bundled::minilm_on(d));
    // LanguageModel checks the device before the folder; a family's load_with reads config.json
    // first, then checks the device before the weights.
    assert_device_error(
        "LanguageModel::from_pretrained_on (no folder)",
        d,
        LanguageModel::<Gpt2>::from_pretrained_on(fixture("no/such/folder"), d),
    );
    // Sae loading checks the device before converting the weights.
    let sae = Sae::load(fixture("sae/standard"), d);
    assert!(matches!(sae, Err(Error::Device(_))), "Sae::load onto {d:?}: {:?}", sae.map(|_| ()));
}

/// CPU stays the default everywhere.
#[test]
fn cpu_is_the_default() {
    assert_eq!(LoadOptions::default().device, Device::Cpu);
    let model = Gpt2::from_pretrained(fixture("causal/gpt2")).unwrap();
    assert_eq!(model.device(), Device::Cpu);
    let lm = common::minilm::minilm();
    assert_eq!(lm.device(), Device::Cpu);
    assert_eq!(
        lm.tokenize(&["hello"]).unwrap().input_ids.device(),
        Device::Cpu
    );
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let got = got.to_device(Device::Cpu).to_kind(Kind::Float);
    let want = want.to_kind(Kind::Float);
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff <= tol, "{what}: max |device - cpu| = {diff} > {tol}");
}

/// A causal model on the test device, in f32 and (on CUDA) f16 / bf16: the logits and greedy
/// generation match the CPU's.
#[test]
fn causal_model_on_the_test_device() {
    let device = test_device();
    let dir = fixture("causal/gpt2");
    let cpu = Gpt2::from_pretrained(&dir).unwrap();
    let ids = Tensor::from_slice(&[1i64, 5, 9, 3, 7, 2, 4, 8]).view([2, 4]);
    let mask = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    let want = tch::no_grad(|| cpu.forward(&ids, &mask, &KvCacheHandle::disabled())).unwrap();
    let want_gen = tch::no_grad(|| cpu.generate(&ids, &mask, 5, &Sampling::Greedy, None)).unwrap();

    let mut kinds = vec![(None, 1e-4)];
    if device != Device::Cpu {
        kinds.push((Some(Kind::Half), 2e-2));
        kinds.push((Some(Kind::BFloat16), 1e-1));
    }
    for (dtype, tol) in kinds {
        let opts = LoadOptions { device, dtype, ..Default::default() };
        let model = Hooked::with_path("", Gpt2::load_with(&dir, &opts).unwrap());
        assert_eq!(model.device(), device);
        if let Some(k) = dtype {
            assert_eq!(model.kind(), k);
        }
        let (d_ids, d_mask) = (ids.to_device(device), mask.to_device(device));
        let got =
            tch::no_grad(|| model.forward(&d_ids, &d_mask, &KvCacheHandle::disabled())).unwrap();
        assert_eq!(got.device(), device);
        assert_close(
            &got,
            &want,
            tol,
            &format!("gpt2 logits {dtype:?} on {device:?}"),
        );
        if dtype.is_none() {
            let gen = tch::no_grad(|| model.generate(&d_ids, &d_mask, 5, &Sampling::Greedy, None))
                .unwrap();
            assert_eq!(gen.device(), device);
            assert!(
                gen.to_device(Device::Cpu).equal(&want_gen),
                "greedy generation on {device:?} differs from the CPU's"
            );
        }
        // The auto loader honours the same options.
        let auto = AutoCausalLm::load_with(&dir, &opts).unwrap();
        assert_eq!(auto.model_type(), "gpt2");
    }
}

/// A text model on the test device: token tensors follow the model, outputs match the CPU's.
#[test]
fn language_model_on_the_test_device() {
    let device = test_device();
    let dir = common::minilm::minilm_dir();
    let cpu = common::minilm::minilm();
    let text = ["The Eiffel Tower is in Paris.", "Hello"];
    let want = tch::no_grad(|| cpu.forward(&text)).unwrap();

    let lm =
        LanguageModel::<nnsight::models::bert::Bert>::from_pretrained_on(&dir, device).unwrap();
    assert_eq!(lm.device(), device);
    let batch = lm.tokenize(&text).unwrap();
    assert_eq!(
        batch.input_ids.device(),
        device,
        "inputs follow the model's device"
    );
    assert_eq!(batch.attention_mask.device(), device);
    let got = tch::no_grad(|| lm.forward(&text)).unwrap();
    assert_eq!(got.device(), device);
    assert_close(&got, &want, 1e-3, &format!("minilm on {device:?}"));

    let bundled = nnsight::bundled::minilm_on(device).unwrap();
    assert_eq!(bundled.device(), device);
}

/// An SAE loaded onto the test device encodes as on the CPU.
#[test]
fn sae_on_the_test_device() {
    let device = test_device();
    let cpu = Sae::load(fixture("sae/standard"), Device::Cpu).unwrap();
    let sae = Sae::load(fixture("sae/standard"), device).unwrap();
    assert_eq!(sae.device(), device);
    let d_in = cpu.config.d_in;
    let x = Tensor::randn([3, d_in], (Kind::Float, Device::Cpu));
    let want = tch::no_grad(|| cpu.call(x.shallow_clone()));
    let got = tch::no_grad(|| sae.call(x.to_device(device)));
    assert_close(&got, &want, 1e-4, &format!("sae recon on {device:?}"));
}

/// Greedy generation timing on the test device (`cargo test --release --test device --
/// --ignored generation_timing --nocapture`); `scripts/gpu_check.sh` runs it on CUDA.
#[test]
#[ignore]
fn generation_timing() {
    let device = test_device();
    let dir = fixture("causal/gpt2");
    let model = Hooked::with_path(
        "",
        Gpt2::load_with(
            &dir,
            &LoadOptions {
                device,
                dtype: None,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let (batch, prompt, new) = (8i64, 16i64, 32i64);
    let ids = Tensor::randint(50, [batch, prompt], (Kind::Int64, device));
    let mask = Tensor::ones([batch, prompt], (Kind::Int64, device));
    let _ = tch::no_grad(|| model.generate(&ids, &mask, 2, &Sampling::Greedy, None)).unwrap(); // warm-up
    if let Device::Cuda(_) = device {
        tch::Cuda::synchronize(0);
    }
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        let out =
            tch::no_grad(|| model.generate(&ids, &mask, new, &Sampling::Greedy, None)).unwrap();
        assert_eq!(out.size(), [batch, prompt + new]);
    }
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let per = t.elapsed().as_secs_f64() / reps as f64;
    eprintln!(
        "generation_timing on {device:?}: gpt2 fixture, batch {batch}, prompt {prompt}, {new} new tokens: \
         {:.2} ms per generate, {:.0} tokens/s",
        per * 1e3,
        (batch * new) as f64 / per
    );
}
