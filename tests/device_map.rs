//! Device maps (`LoadOptions::device_map`, Hugging Face's `device_map="auto"`): a decoder's
//! layers on several devices, the activations moved between them by the model code.
//!
//! On the CPU: a map putting every part on `Device::Cpu` (explicit, or planned over two CPU
//! entries) gives logits bit-identical to the plain load and the same greedy generation for
//! every decoder family (this runs each family's part names through the placement, and its
//! forward through the per-layer moves); the planner on given sizes; the errors (a device the
//! machine lacks, named with its part; a wrong layer count naming both counts; a missing folder
//! with a missing device reports the device).
//!
//! With `NNSIGHT_TEST_DEVICE=cuda` (`scripts/gpu_check.sh`) and at least two GPUs:
//! `split_over_two_gpus_matches_the_cpu` splits fixtures over `Cuda(0)` and `Cuda(1)`, compares
//! logits, generation and the logit lens with the CPU's and checks where the weights are. With
//! fewer GPUs it prints why it skips.
use std::path::PathBuf;

use nnsight::models::causal::{
    CausalLm, CausalLmExt, Decoder, DeviceMap, KvCacheHandle, LoadOptions, PartSizes, Placement,
    Sampling,
};
use nnsight::models::auto::{AutoCausalLm, AutoLanguageModel};
use nnsight::models::gemma2::Gemma2;
use nnsight::models::gemma3::Gemma3;
use nnsight::models::gpt2::Gpt2;
use nnsight::models::gpt_neox::GptNeoX;
use nnsight::models::llama::Llama;
use nnsight::models::mistral::Mistral;
use nnsight::models::olmo2::Olmo2;
use nnsight::models::phi3::Phi3;
use nnsight::models::qwen2::Qwen2;
use nnsight::models::qwen3::Qwen3;
use nnsight::prelude::*;
use nnsight::Error;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `NNSIGHT_TEST_DEVICE` (as tests/device.rs reads it): whether the CUDA checks are asked for.
fn cuda_asked() -> bool {
    std::env::var("NNSIGHT_TEST_DEVICE")
        .unwrap_or_default()
        .trim()
        .starts_with("cuda")
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

/// Two left-padded rows of ids below `vocab` and their mask.
fn batch(vocab: i64) -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[1i64, 5, 9, 3, 7, 2, 4, 8, 6, 11])
        .remainder(vocab)
        .view([2, 5]);
    let mask = Tensor::from_slice(&[0i64, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 5]);
    (ids, mask)
}

fn load<M: CausalLm>(name: &str, opts: &LoadOptions) -> Hooked<M> {
    let dir = fixture(&format!("causal/{name}"));
    Hooked::with_path(
        "",
        M::load_with(&dir, opts).unwrap_or_else(|e| panic!("{name}: {e}")),
    )
}

/// Logits, greedy generation and the logit lens of layer 0's output under an all-CPU map
/// (explicit and planned) equal the plain load's, bit for bit.
fn all_cpu_map_matches_plain<M: Decoder + 'static>(name: &str) {
    let plain = load::<M>(name, &LoadOptions::default());
    let n = plain.num_layers();
    let (ids, mask) = batch(plain.vocab_size());
    let cache = KvCacheHandle::disabled();
    let want = tch::no_grad(|| plain.forward(&ids, &mask, &cache)).unwrap();
    let want_gen =
        tch::no_grad(|| plain.generate(&ids, &mask, 4, &Sampling::Greedy, None)).unwrap();
    let h = Tensor::randn([2, 5, hidden_size(name)], (plain.kind(), Device::Cpu));
    let want_lens = tch::no_grad(|| plain.unembed(&h));
    let maps = [
        DeviceMap::layers(vec![Device::Cpu; n]),
        DeviceMap::new(Device::Cpu, vec![Device::Cpu; n], Device::Cpu),
        DeviceMap::auto(&[Device::Cpu, Device::Cpu]),
        DeviceMap::auto_with_budgets(&[(Device::Cpu, u64::MAX / 4), (Device::Cpu, u64::MAX / 4)]),
    ];
    for map in maps {
        let opts = LoadOptions {
            device_map: Some(map.clone()),
            ..Default::default()
        };
        let model = load::<M>(name, &opts);
        assert_eq!(model.device(), Device::Cpu, "{name}");
        let got = tch::no_grad(|| model.forward(&ids, &mask, &cache)).unwrap();
        assert!(
            got.equal(&want),
            "{name} {map:?}: logits differ from the plain load's"
        );
        let gen = tch::no_grad(|| model.generate(&ids, &mask, 4, &Sampling::Greedy, None)).unwrap();
        assert!(
            gen.equal(&want_gen),
            "{name} {map:?}: greedy generation differs"
        );
        let lens = tch::no_grad(|| model.unembed(&h));
        assert!(lens.equal(&want_lens), "{name} {map:?}: logit lens differs");
    }
}

/// The fixture's hidden size (`hidden_size`, GPT-2's `n_embd`), from its config.
fn hidden_size(name: &str) -> i64 {
    let text = std::fs::read_to_string(fixture(&format!("causal/{name}/config.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.get("hidden_size")
        .or_else(|| v.get("n_embd"))
        .and_then(|x| x.as_i64())
        .unwrap()
}

macro_rules! family_tests {
    ($($test:ident: $ty:ty, $name:literal;)*) => {$(
        #[test]
        fn $test() {
            all_cpu_map_matches_plain::<$ty>($name);
        }
    )*};
}

family_tests! {
    all_cpu_map_gpt2: Gpt2, "gpt2";
    all_cpu_map_llama: Llama, "llama";
    all_cpu_map_llama_tied: Llama, "llama_tied";
    all_cpu_map_pythia: GptNeoX, "pythia";
    all_cpu_map_gemma2: Gemma2, "gemma2";
    all_cpu_map_gemma3: Gemma3, "gemma3";
    all_cpu_map_mistral: Mistral, "mistral";
    all_cpu_map_qwen2: Qwen2, "qwen2";
    all_cpu_map_qwen3: Qwen3, "qwen3";
    all_cpu_map_olmo2: Olmo2, "olmo2";
    all_cpu_map_phi3: Phi3, "phi3";
}

const A: Device = Device::Cuda(0);
const B: Device = Device::Cuda(1);
const C: Device = Device::Cuda(2);

fn sizes(embedding: u64, layers: &[u64], head: u64, tied: bool) -> PartSizes {
    PartSizes {
        embedding,
        layers: layers.to_vec(),
        head,
        tied,
    }
}

fn split(p: &Placement, device: Device) -> usize {
    p.layers.iter().filter(|d| **d == device).count()
}

#[test]
fn planner_splits_equal_layers_evenly() {
    let p = DeviceMap::auto(&[A, B])
        .plan(&sizes(0, &[100; 12], 0, false))
        .unwrap();
    assert_eq!(p.layers, [vec![A; 6], vec![B; 6]].concat());
    assert_eq!((p.embedding, p.final_norm, p.unembedding), (A, B, B));
    // Equal embedding and (untied) head: still 6 / 6.
    let p = DeviceMap::auto(&[A, B])
        .plan(&sizes(250, &[100; 12], 250, false))
        .unwrap();
    assert_eq!((split(&p, A), split(&p, B)), (6, 6));
    // Three devices, 12 layers: 4 / 4 / 4, contiguous.
    let p = DeviceMap::auto(&[A, B, C])
        .plan(&sizes(0, &[100; 12], 0, false))
        .unwrap();
    assert_eq!(p.layers, [vec![A; 4], vec![B; 4], vec![C; 4]].concat());
}

#[test]
fn planner_shifts_layers_away_from_a_big_embedding() {
    // Tied: the embedding (600 bytes, the unembedding included) stays on the first device with
    // the unembedding; the final norm (10) goes with the last layer.
    let p = DeviceMap::auto(&[A, B])
        .plan(&sizes(600, &[100; 12], 10, true))
        .unwrap();
    assert_eq!(p.layers, [vec![A; 3], vec![B; 9]].concat(), "{p:?}");
    assert_eq!((p.embedding, p.final_norm, p.unembedding), (A, B, A));
    // Untied, a big head on the last device pulls layers to the first.
    let p = DeviceMap::auto(&[A, B])
        .plan(&sizes(10, &[100; 12], 600, false))
        .unwrap();
    assert_eq!((split(&p, A), split(&p, B)), (9, 3), "{p:?}");
    assert_eq!((p.final_norm, p.unembedding), (B, B));
}

#[test]
fn planner_on_one_device_puts_everything_there() {
    let p = DeviceMap::auto(&[B])
        .plan(&sizes(500, &[100; 5], 500, false))
        .unwrap();
    assert_eq!(
        p,
        Placement {
            embedding: B,
            layers: vec![B; 5],
            final_norm: B,
            unembedding: B
        }
    );
    // More devices than layers: still contiguous, in order.
    let p = DeviceMap::auto(&[A, B, C])
        .plan(&sizes(0, &[100; 2], 0, false))
        .unwrap();
    assert_eq!(p.layers.len(), 2);
    assert!(p.layers[0] == A && p.layers[1] != A, "{p:?}");
}

#[test]
fn planner_with_budgets_fills_devices_in_order() {
    let p = DeviceMap::auto_with_budgets(&[(A, 700), (B, 10_000)])
        .plan(&sizes(0, &[100; 12], 0, false))
        .unwrap();
    assert_eq!((split(&p, A), split(&p, B)), (7, 5));
    let err = DeviceMap::auto_with_budgets(&[(A, 300), (B, 300)])
        .plan(&sizes(0, &[100; 12], 0, false))
        .unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    assert!(err.to_string().contains("does not fit"), "{err}");
    let err = DeviceMap::auto(&[])
        .plan(&sizes(0, &[100; 2], 0, false))
        .unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    // An embedding bigger than the first device's budget: said so.
    let err = DeviceMap::auto_with_budgets(&[(A, 50), (B, u64::MAX)])
        .plan(&sizes(100, &[1; 2], 0, false))
        .unwrap_err();
    assert!(err.to_string().contains("the embedding must fit on the first device"), "{err}");
    // Sizes adding up past u64::MAX: an error, not a panic or a wrapped sum.
    let err = DeviceMap::auto(&[A, B])
        .plan(&sizes(u64::MAX, &[u64::MAX, 5], u64::MAX, false))
        .unwrap_err();
    assert!(matches!(err, Error::Input(ref m) if m.contains("u64::MAX")), "{err:?}");
}

#[test]
fn explicit_map_with_a_wrong_layer_count_names_both_counts() {
    // The planner alone.
    let err = DeviceMap::layers(vec![A; 3])
        .plan(&sizes(0, &[1; 5], 0, false))
        .unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("3 layer(s)") && text.contains("5 layer(s)"),
        "{text}"
    );
    // Loading a fixture.
    let gpt2 = Gpt2::load_with(&fixture("causal/gpt2"), &LoadOptions::default()).unwrap();
    let n = gpt2.num_layers();
    let opts = LoadOptions {
        device_map: Some(DeviceMap::layers(vec![Device::Cpu; n + 3])),
        ..Default::default()
    };
    let err = Gpt2::load_with(&fixture("causal/gpt2"), &opts).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    assert!(
        text.contains(&format!("{} layer(s)", n + 3))
            && text.contains(&format!("has {n} layer(s)")),
        "{text}"
    );
}

#[test]
fn a_missing_device_in_the_map_is_a_device_error_naming_it() {
    let missing = missing_cuda();
    let gpt2 = Gpt2::load_with(&fixture("causal/gpt2"), &LoadOptions::default()).unwrap();
    let n = gpt2.num_layers();
    assert!(n >= 2);
    let mut layers = vec![Device::Cpu; n];
    layers[1] = missing;
    let maps = [
        (DeviceMap::layers(layers), "layer 1"),
        (
            DeviceMap::new(missing, vec![Device::Cpu; n], Device::Cpu),
            "embedding",
        ),
        (DeviceMap::auto(&[Device::Cpu, missing]), "device 1"),
    ];
    for (map, part) in maps {
        let opts = LoadOptions {
            device_map: Some(map),
            ..Default::default()
        };
        for (what, r) in [
            (
                "Gpt2",
                Gpt2::load_with(&fixture("causal/gpt2"), &opts).map(drop),
            ),
            (
                "Llama",
                Llama::load_with(&fixture("causal/llama"), &opts).map(drop),
            ),
            (
                "Gemma2",
                Gemma2::load_with(&fixture("causal/gemma2"), &opts).map(drop),
            ),
        ] {
            let err = r.unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::Device(_)), "{what}: {err:?}");
            assert!(
                text.contains(&format!("{missing:?}")) && text.contains(part),
                "{what}: {text}"
            );
        }
    }
}

/// The device is checked before the folder is looked at: a missing folder with a missing
/// device reports the device.
#[test]
fn a_missing_device_is_reported_before_a_missing_folder() {
    let missing = missing_cuda();
    let dir = fixture("no/such/folder");
    let opts = LoadOptions {
        device: missing,
        ..Default::default()
    };
    let map = LoadOptions {
        device_map: Some(DeviceMap::layers(vec![missing; 2])),
        ..Default::default()
    };
    for opts in [opts, map] {
        let results = [
            ("Gpt2", Gpt2::load_with(&dir, &opts).map(drop)),
            ("Llama", Llama::load_with(&dir, &opts).map(drop)),
            ("GptNeoX", GptNeoX::load_with(&dir, &opts).map(drop)),
            ("Gemma2", Gemma2::load_with(&dir, &opts).map(drop)),
            ("Gemma3", Gemma3::load_with(&dir, &opts).map(drop)),
            ("Mistral", Mistral::load_with(&dir, &opts).map(drop)),
            ("Qwen2", Qwen2::load_with(&dir, &opts).map(drop)),
            ("Qwen3", Qwen3::load_with(&dir, &opts).map(drop)),
            ("Olmo2", Olmo2::load_with(&dir, &opts).map(drop)),
            ("Phi3", Phi3::load_with(&dir, &opts).map(drop)),
            ("AutoCausalLm", AutoCausalLm::load_with(&dir, &opts).map(drop)),
            ("AutoLanguageModel", AutoLanguageModel::load_with(&dir, &opts).map(drop)),
        ];
        for (what, r) in results {
            let err = r.unwrap_err();
            assert!(matches!(err, Error::Device(_)), "{what}: {err:?}");
            assert!(
                err.to_string().contains(&format!("{missing:?}")),
                "{what}: {err}"
            );
        }
    }
}

fn weight_device(t: &Tensor) -> Device {
    t.device()
}

/// On two GPUs: each fixture split over `Cuda(0)` and `Cuda(1)` gives the CPU's logits (f32,
/// 1e-4 as tests/device.rs), greedy generation and logit lens; the weights are where the map
/// says and the logits on the unembedding's device.
#[test]
fn split_over_two_gpus_matches_the_cpu() {
    if !cuda_asked() {
        println!("split_over_two_gpus_matches_the_cpu: skipped (NNSIGHT_TEST_DEVICE is not cuda)");
        return;
    }
    let count = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    if count < 2 {
        println!("split_over_two_gpus_matches_the_cpu: skipped ({count} CUDA device(s), 2 needed)");
        return;
    }
    fn check<M: Decoder + 'static>(name: &str, layer_weight: impl Fn(&M, usize) -> Tensor) {
        let cpu = load::<M>(name, &LoadOptions::default());
        let n = cpu.num_layers();
        let (ids, mask) = batch(cpu.vocab_size());
        let cache = KvCacheHandle::disabled();
        let want = tch::no_grad(|| cpu.forward(&ids, &mask, &cache)).unwrap();
        let want_gen =
            tch::no_grad(|| cpu.generate(&ids, &mask, 4, &Sampling::Greedy, None)).unwrap();
        let h = Tensor::randn([2, 5, hidden_size(name)], (cpu.kind(), Device::Cpu));
        let want_lens = tch::no_grad(|| cpu.unembed(&h));
        let half = n / 2;
        let layers: Vec<Device> = (0..n).map(|i| if i < half { A } else { B }).collect();
        for map in [DeviceMap::layers(layers.clone()), DeviceMap::auto(&[A, B])] {
            let opts = LoadOptions {
                device_map: Some(map.clone()),
                ..Default::default()
            };
            let model = load::<M>(name, &opts);
            assert_eq!(
                model.device(),
                A,
                "{name}: the input device is the embedding's"
            );
            if map == DeviceMap::layers(layers.clone()) {
                for (i, want) in layers.iter().enumerate() {
                    assert_eq!(
                        weight_device(&layer_weight(&model, i)),
                        *want,
                        "{name}: layer {i}'s weight"
                    );
                }
            }
            assert_eq!(
                weight_device(&layer_weight(&model, n - 1)),
                B,
                "{name}: the last layer is on Cuda(1)"
            );
            assert_eq!(model.final_norm_device(), B, "{name}: final norm");
            let diff = |got: &Tensor, want: &Tensor| {
                (got.to_device(Device::Cpu) - want)
                    .abs()
                    .max()
                    .double_value(&[])
            };
            let got = tch::no_grad(|| model.forward(&ids.to_device(A), &mask.to_device(A), &cache))
                .unwrap();
            assert_eq!(
                got.device(),
                model.unembedding().weight.device(),
                "{name}: logits on the unembedding's device"
            );
            assert!(
                diff(&got, &want) <= 1e-4,
                "{name} {map:?}: max |split - cpu| = {}",
                diff(&got, &want)
            );
            let gen =
                tch::no_grad(|| model.generate(&ids, &mask, 4, &Sampling::Greedy, None)).unwrap();
            assert_eq!(gen.device(), A);
            assert!(
                gen.to_device(Device::Cpu).equal(&want_gen),
                "{name} {map:?}: greedy generation differs"
            );
            let lens = tch::no_grad(|| model.unembed(&h.to_device(A)));
            assert!(
                diff(&lens, &want_lens) <= 1e-4,
                "{name} {map:?}: logit lens differs"
            );
        }
    }
    check::<Gpt2>("gpt2", |m, i| {
        m.transformer.h[i].mlp.c_fc.weight.shallow_clone()
    });
    check::<Llama>("llama", |m, i| {
        m.model.layers[i].input_layernorm.weight.shallow_clone()
    });
    check::<Llama>("llama_tied", |m, i| {
        m.model.layers[i].input_layernorm.weight.shallow_clone()
    });
    check::<GptNeoX>("pythia", |m, i| {
        m.gpt_neox.layers[i].mlp.dense_h_to_4h.ws.shallow_clone()
    });
    check::<Gemma2>("gemma2", |m, i| {
        m.model.layers[i].input_layernorm.weight.shallow_clone()
    });
    check::<Gemma3>("gemma3", |m, i| {
        m.model.layers[i].input_layernorm.weight.shallow_clone()
    });
    check::<Qwen3>("qwen3", |m, i| {
        m.model.layers[i].input_layernorm.weight.shallow_clone()
    });
    check::<Olmo2>("olmo2", |m, i| {
        m.model.layers[i]
            .post_attention_layernorm
            .weight
            .shallow_clone()
    });
    check::<Phi3>("phi3", |m, i| {
        m.model.layers[i].input_layernorm.weight.shallow_clone()
    });
}

/// Word-level over "t0" .. "t999" (as tests/causal_text.rs).
fn tokenizer() -> nnsight::tokenizers::Tokenizer {
    use nnsight::tokenizers::models::wordlevel::WordLevel;
    use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
    let vocab: std::collections::HashMap<String, u32> =
        (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .unwrap();
    let mut tok = nnsight::tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok
}

/// A `trace!` of a GPT-2 `LanguageModel` (tokens made on `tokens_on`) saving layer 1's output
/// and the logits, for two left-padded prompts.
fn traced_gpt2(opts: &LoadOptions, tokens_on: Device) -> (Tensor, Tensor) {
    let model = Gpt2::load_with(&fixture("causal/gpt2"), opts).unwrap();
    let lm = nnsight::LanguageModel::from_parts(model, tokenizer(), tokens_on).unwrap();
    let texts = ["t5 t17 t230 t9", "t77 t3"];
    trace!(lm, &texts[..], {
        (lm.transformer.h[1].output.save(), lm.lm_head.output.save())
    })
    .unwrap()
}

/// Traces see each layer's output on its device and give the plain load's values (here all on
/// the CPU; on two GPUs in `trace_over_two_gpus_matches_the_cpu`).
#[test]
fn trace_with_an_all_cpu_map_matches_plain() {
    let (h, logits) = traced_gpt2(&LoadOptions::default(), Device::Cpu);
    let n = Gpt2::load_with(&fixture("causal/gpt2"), &LoadOptions::default())
        .unwrap()
        .num_layers();
    let opts = LoadOptions {
        device_map: Some(DeviceMap::layers(vec![Device::Cpu; n])),
        ..Default::default()
    };
    let (h2, logits2) = traced_gpt2(&opts, Device::Cpu);
    assert!(h2.equal(&h) && logits2.equal(&logits));
}

/// On two GPUs: tokens made on the CPU (`LanguageModel`'s device) reach the embedding on
/// `Cuda(0)`; layer 1 (on `Cuda(1)`) is saved there; values as on the CPU.
#[test]
fn trace_over_two_gpus_matches_the_cpu() {
    let count = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    if !cuda_asked() || count < 2 {
        println!("trace_over_two_gpus_matches_the_cpu: skipped (NNSIGHT_TEST_DEVICE not cuda, or {count} CUDA device(s), 2 needed)");
        return;
    }
    let (h, logits) = traced_gpt2(&LoadOptions::default(), Device::Cpu);
    let n = Gpt2::load_with(&fixture("causal/gpt2"), &LoadOptions::default())
        .unwrap()
        .num_layers();
    assert!(n >= 2);
    let layers: Vec<Device> = (0..n).map(|i| if i < 1 { A } else { B }).collect();
    let opts = LoadOptions {
        device_map: Some(DeviceMap::layers(layers)),
        ..Default::default()
    };
    for tokens_on in [Device::Cpu, A] {
        let (h2, logits2) = traced_gpt2(&opts, tokens_on);
        assert_eq!(h2.device(), B, "layer 1's output on its device");
        assert_eq!(
            logits2.device(),
            A,
            "GPT-2's tied unembedding runs on the embedding's device"
        );
        let diff =
            |a: &Tensor, b: &Tensor| (a.to_device(Device::Cpu) - b).abs().max().double_value(&[]);
        assert!(
            diff(&h2, &h) <= 1e-4 && diff(&logits2, &logits) <= 1e-4,
            "tokens on {tokens_on:?}"
        );
    }
}
