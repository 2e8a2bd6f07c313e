//! Every decoder family at ~100M parameters (random weights made at bench time, never
//! committed), 1 libtorch thread, batch 1 x 128 tokens: our plain forward against
//! transformers' eager forward, a trace saving every layer against our plain forward, and 20
//! generated tokens with a save at every step against plain generation; on GPT-2 also the
//! activation cache of every module against a by-hand save of every layer.
//!
//! The checkpoints come from `benches/python_models.py` (transformers configs of hidden 768,
//! 12 layers, 12 heads, vocabulary 32,000, eager attention, float32, `torch.manual_seed(0)`), so
//! this bench compiles without Python and, without the data, says how to make it and measures
//! nothing:
//!
//! ```sh
//! PY=/work/venv/bin/python                     # torch + transformers
//! $PY benches/python_models.py make            # target/bench-models/<family>/ (~4.5 GB, 2 minutes)
//! cargo bench --bench models --no-run          # build first, so that no build runs between processes
//! # Transformers' processes and ours alternate, 3 each (on 2 shared cores: ~2.5 minutes each
//! # for transformers', ~4.5 for ours with 10 families):
//! for i in 1 2 3; do
//!   $PY benches/python_models.py time --tag run$i
//!   MODELS_TAG=run$i cargo bench --bench models
//! done
//! $PY benches/python_models.py report --tags run1 run2 run3 --spread   # tables, summary.json
//! ```
//!
//! Options (environment): `MODELS_ROUNDS=N` paired rounds of the forward cases per family
//! (default 8), `MODELS_GEN_ROUNDS=N` of the generation cases (default 4), `MODELS_TAG=x` the
//! results file `target/bench-models/rust.<x>.json` (default `run1`), `MODELS_DIR` the
//! checkpoints' folder (default `<target>/bench-models`). A filter after `--` keeps the
//! families whose folder name contains one of its `|`-separated parts:
//! `cargo bench --bench models -- 'gpt2|llama'`. Without `--bench` (which `cargo bench` passes;
//! `cargo test --all-targets` does not) the binary measures nothing.
//!
//! Per family (a folder whose `config.json` names a `model_type` that
//! `nnsight::models::auto::AutoLanguageModel` supports; others are skipped with a message), the
//! model is loaded in float32 on the CPU and driven through `with_family!` by one generic
//! function over `Decoder` (the code a researcher writes once for every family). Cases:
//! - `plain_forward`: the root `Hooked::call` on the 128 ids (`text_input` of the batch, no KV
//!   cache), under `no_grad`: logits `[1, 128, vocab]`, no trace;
//! - `trace_save_all`: `trace!(model, &ids, ..)` saving `model.layers()[l].output` for every layer;
//! - `generate_plain`: `LanguageModel::generate`, 20 new tokens, greedy, no stop at EOS, KV cache;
//! - `generate_traced`: `generate!` of the same, saving `model.unembedding().at(s).output` (the
//!   logits) at every step `s` of `model.steps(..)`;
//! - GPT-2 only: `cache_all_run_with_cache` (`run_with_cache(&ids, CacheOptions::default())`:
//!   the output of every module below the root) and `cache_all_trace_option` (`trace!` with
//!   `cache = &mut slot` and an empty block): the same cache through the trace option. Their
//!   ratio is taken to `trace_save_all` (the by-hand save of every layer) and to the plain forward.
//!
//! Before timing, each family checks that the trace's output is the plain forward's (bit for
//! bit), that each step's saved logits give the token generation made, and compares its 20
//! generated tokens with those transformers made (`python_reference.json`).
//!
//! Paired rounds (as `benches/interleave.rs`), in two groups per family (the single forward
//! passes, then the two generations): after a warm-up call of every case (besides the checks'
//! calls), each round times every case of the group once, in an order rotated each round, so
//! that load which comes and goes (other builds on a shared 2-core machine) hits both sides of
//! a ratio alike; a ratio is the median over rounds of the per-round ratio. Each call is timed
//! twice: wall clock, and the process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`), which leaves out
//! the time other processes held the CPU (not their effect on caches); minor page faults per
//! call are counted too. Per-round times (ns) go to `target/bench-models/rust.<tag>.json`, which
//! `python_models.py report` reads with transformers' `python.<tag>.json`: ours against
//! transformers is the median over our processes of each process's median plain forward, over
//! the same for transformers' processes (two processes cannot be paired round by round;
//! alternating them spreads slow and quiet periods over both sides).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nnsight::models::auto::AutoLanguageModel;
use nnsight::models::causal::{Decoder, LoadOptions};
use nnsight::prelude::*;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{with_family, Cache, CacheOptions, GenerateOptions, LanguageModel, ModuleTree, RunWithCache, TextBatch, TextModel};

const NEW_TOKENS: i64 = 20;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn models_dir() -> PathBuf {
    std::env::var_os("MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| target_dir().join("bench-models"))
}

/// Whether the family folder `name` is selected by the filter given after `--`.
fn selected(name: &str) -> bool {
    match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        None => true,
        Some(f) => f.split('|').any(|part| name.contains(part)),
    }
}

/// A word-level `tokenizer.json` (`t0` .. `t<vocab-1>`) beside the checkpoint, which
/// `AutoLanguageModel` loads; the bench gives token ids, so the tokenizer only has to exist.
fn ensure_tokenizer(dir: &Path, vocab: u32) {
    let path = dir.join("tokenizer.json");
    if path.exists() {
        return;
    }
    let v: std::collections::HashMap<String, u32> = (0..vocab).map(|i| (format!("t{i}"), i)).collect();
    let wl = WordLevel::builder().vocab(v.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(&path, false).unwrap();
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn ids_of(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_i64()).collect()).unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One case: its id and what it runs (the result is dropped inside the timing).
type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn case<'a, R>(name: &'static str, f: impl Fn() -> R + 'a) -> Case<'a> {
    (name, Box::new(move || drop(black_box(f()))))
}

/// The cases of one family, written once over `Decoder`; checks the traced values first.
/// `cache`: add the two cache cases. `reference`: transformers' 20 generated tokens.
fn family_cases<'a, M: Decoder + TextModel + ModuleTree>(
    name: &str,
    model: &'a LanguageModel<M>,
    ids: &'a [i64],
    reference: &[i64],
    cache: bool,
) -> Vec<Case<'a>> {
    let n = model.layers().len();
    let ids_t = Tensor::from_slice(ids).view([1, -1]);
    let batch = TextBatch {
        input_ids: ids_t.shallow_clone(),
        attention_mask: ids_t.ones_like(),
        token_type_ids: ids_t.zeros_like(),
        tokens: Vec::new(),
    };
    let opts = GenerateOptions { max_new_tokens: NEW_TOKENS, stop_at_eos: false, ..Default::default() };

    let plain = move || tch::no_grad(|| model.root().call(model.root().text_input(&batch)));
    let ids_a = ids_t.shallow_clone();
    let save_all = move || {
        trace!(model, &ids_a, {
            let mut v = Vec::new();
            for l in 0..n {
                v.push(model.layers()[l].output.save());
            }
            v
        })
        .unwrap()
    };
    let o = opts.clone();
    let gen_plain = move || model.generate(ids.to_vec(), o.clone()).unwrap();
    let gen_traced = move || {
        generate!(model, ids.to_vec(), max_new_tokens = NEW_TOKENS, stop_at_eos = false, {
            let mut v = Vec::new();
            for s in model.steps(..) {
                v.push(model.unembedding().at(s).output.save());
            }
            v
        })
        .unwrap()
    };

    // Checks: the traced values are the plain ones; the generation is transformers'.
    let logits = plain();
    let (hs, traced_logits) = trace!(model, &ids_t, {
        let mut v = Vec::new();
        for l in 0..n {
            v.push(model.layers()[l].output.save());
        }
        (v, model.output.save())
    })
    .unwrap();
    assert_eq!(hs.len(), n);
    assert!(traced_logits.equal(&logits), "{name}: the trace's output is not the plain forward's");
    assert_eq!(logits.size(), [1, ids.len() as i64, logits.size()[2]]);
    let tokens = gen_plain();
    let steps = gen_traced();
    assert_eq!(steps.len(), NEW_TOKENS as usize, "{name}: one saved value per step");
    let p = ids.len() as i64;
    for (s, l) in steps.iter().enumerate() {
        let next = l.get(0).get(-1).argmax(-1, false).int64_value(&[]);
        assert_eq!(next, tokens.int64_value(&[0, p + s as i64]), "{name}: step {s}'s logits give the generated token");
    }
    let ours: Vec<i64> = (0..NEW_TOKENS).map(|s| tokens.int64_value(&[0, p + s])).collect();
    if reference.is_empty() {
        println!("{name}: no python_reference.json, generation not compared with transformers");
    } else if ours == reference {
        println!("{name}: our 20 generated tokens are transformers' (greedy)");
    } else {
        let same = ours.iter().zip(reference).take_while(|(a, b)| a == b).count();
        println!("{name}: WARNING: generation differs from transformers' after {same} tokens: ours {ours:?}, theirs {reference:?}");
    }

    let mut cases = vec![
        case("plain_forward", plain),
        case("trace_save_all", save_all),
        case("generate_plain", gen_plain),
        case("generate_traced", gen_traced),
    ];
    if cache {
        let (out, c) = model.run_with_cache(&ids_t, CacheOptions::default()).unwrap();
        assert!(out.equal(&logits), "{name}: the output with a cache is the plain forward's");
        let last = model.layers()[n - 1].path().to_string();
        assert!(c.get(&last).is_some_and(|t| t.equal(&hs[n - 1])), "{name}: the cache holds the saved layer output");
        println!("{name}: the cache of every module holds {} modules ({} MB)", c.len(), c.bytes() / 1_000_000);
        let ids_c = ids_t.shallow_clone();
        cases.push(case("cache_all_run_with_cache", move || model.run_with_cache(&ids_c, CacheOptions::default()).unwrap()));
        let ids_d = ids_t.shallow_clone();
        cases.push(case("cache_all_trace_option", move || {
            let mut slot: Option<Cache> = None;
            trace!(model, &ids_d, cache = &mut slot, {}).unwrap();
            slot.unwrap()
        }));
    }
    cases
}

/// GPT-2 only: `save_every_module_by_hand`, a `trace!` that saves by hand the output of every
/// module the default cache records (185 for 12 layers: per block `h[l]`, `ln_1`, `attn`,
/// `c_attn`, `c_proj`, `q`, `k`, `scores`, `probs`, `z`, `ln_2`, `mlp`, `c_fc`, `act`,
/// `c_proj`; then `transformer`, `wte`, `wpe`, `ln_f`, `lm_head`), so the cache's ratio to it
/// compares the same kept activations (the cache's cost is then its bookkeeping alone). Checks
/// first that every saved tensor is the cache's entry for that path, bit for bit.
fn gpt2_every_module_by_hand<'a>(model: &'a LanguageModel<nnsight::models::gpt2::Gpt2>, ids: &[i64]) -> Vec<Case<'a>> {
    let ids_t = Tensor::from_slice(ids).view([1, -1]);
    let n = model.transformer.h.len();
    let save_all = move |ids: &Tensor| {
        trace!(model, ids, {
            let mut v = Vec::new();
            v.push(("transformer".to_string(), model.transformer.output.save()));
            v.push(("transformer.wte".to_string(), model.transformer.wte.output.save()));
            v.push(("transformer.wpe".to_string(), model.transformer.wpe.output.save()));
            for l in 0..n {
                let p = format!("transformer.h.{l}");
                v.push((p.clone(), model.transformer.h[l].output.save()));
                v.push((format!("{p}.ln_1"), model.transformer.h[l].ln_1.output.save()));
                v.push((format!("{p}.attn"), model.transformer.h[l].attn.output.save()));
                v.push((format!("{p}.attn.c_attn"), model.transformer.h[l].attn.c_attn.output.save()));
                v.push((format!("{p}.attn.c_proj"), model.transformer.h[l].attn.c_proj.output.save()));
                v.push((format!("{p}.attn.q"), model.transformer.h[l].attn.q.output.save()));
                v.push((format!("{p}.attn.k"), model.transformer.h[l].attn.k.output.save()));
                v.push((format!("{p}.attn.scores"), model.transformer.h[l].attn.scores.output.save()));
                v.push((format!("{p}.attn.probs"), model.transformer.h[l].attn.probs.output.save()));
                v.push((format!("{p}.attn.z"), model.transformer.h[l].attn.z.output.save()));
                v.push((format!("{p}.ln_2"), model.transformer.h[l].ln_2.output.save()));
                v.push((format!("{p}.mlp"), model.transformer.h[l].mlp.output.save()));
                v.push((format!("{p}.mlp.c_fc"), model.transformer.h[l].mlp.c_fc.output.save()));
                v.push((format!("{p}.mlp.act"), model.transformer.h[l].mlp.act.output.save()));
                v.push((format!("{p}.mlp.c_proj"), model.transformer.h[l].mlp.c_proj.output.save()));
            }
            v.push(("transformer.ln_f".to_string(), model.transformer.ln_f.output.save()));
            v.push(("lm_head".to_string(), model.lm_head.output.save()));
            v
        })
        .unwrap()
    };
    let (_, cache) = model.run_with_cache(&ids_t, CacheOptions::default()).unwrap();
    let by_hand = save_all(&ids_t);
    assert_eq!(by_hand.len(), cache.len(), "gpt2: the by-hand trace saves every module the cache records");
    for (path, t) in &by_hand {
        assert!(cache.get(path).is_some_and(|c| c.equal(t)), "gpt2: `{path}` by hand is the cache's entry");
    }
    println!("gpt2: the by-hand trace saves the cache's {} modules, bit for bit the same tensors", by_hand.len());
    vec![case("save_every_module_by_hand", move || save_all(&ids_t))]
}

/// CPU time of this process so far, ns (`CLOCK_PROCESS_CPUTIME_ID`: every thread of it; with 1
/// libtorch thread the forward runs on the calling thread). Unlike wall-clock time it leaves out
/// the time other processes held the CPU, though not what they do to caches and memory bandwidth.
fn cpu_ns() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into; the clock id is a constant the kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// Minor page faults of this process so far (`/proc/self/stat`, field 10): memory the allocator
/// gave back to the kernel and takes again (a cache keeps every activation alive, so the next
/// forward cannot reuse that memory).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().nth(7).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Warm-up (one call of each case), then `rounds` rounds timing every case once (order rotated
/// each round); returns (wall-clock ns, CPU ns) per round and minor page faults per call. A
/// case's ratio is to the first case.
fn paired(name: &str, cases: &[&Case<'_>], rounds: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<f64>) {
    for (_, f) in cases {
        f();
    }
    let n = cases.len();
    let mut times = vec![Vec::with_capacity(rounds); n];
    let mut cpu = vec![Vec::with_capacity(rounds); n];
    let mut faults = vec![0u64; n];
    for r in 0..rounds {
        for k in 0..n {
            let i = (r + k) % n;
            let (f0, c0, t0) = (minor_faults(), cpu_ns(), Instant::now());
            (cases[i].1)();
            times[i].push(t0.elapsed().as_secs_f64() * 1e9);
            cpu[i].push(cpu_ns() - c0);
            faults[i] += minor_faults().saturating_sub(f0);
        }
    }
    let faults: Vec<f64> = faults.iter().map(|&f| f as f64 / rounds as f64).collect();
    println!("{name}: {rounds} paired rounds");
    for i in 0..n {
        let mut ratios: Vec<f64> = (0..rounds).map(|r| times[i][r] / times[0][r]).collect();
        let ratio = median(&ratios);
        ratios.sort_by(|a, c| a.partial_cmp(c).unwrap());
        let cpu_ratio = median(&(0..rounds).map(|r| cpu[i][r] / cpu[0][r]).collect::<Vec<_>>());
        println!(
            "  {:<26} median {:>9.2} ms   ratio to {:<16} {ratio:.4} (min {:.4}, max {:.4})   CPU time {:>9.2} ms, ratio {cpu_ratio:.4}   {:.0} page faults/call",
            cases[i].0,
            median(&times[i]) / 1e6,
            cases[0].0,
            ratios[0],
            ratios[rounds - 1],
            median(&cpu[i]) / 1e6,
            faults[i],
        );
    }
    (times, cpu, faults)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` / `--all-targets` runs the binary
    // without it: then nothing is measured (a run takes minutes).
    if !std::env::args().any(|a| a == "--bench") {
        println!("models bench: measures only under `cargo bench --bench models` (or with --bench)");
        return;
    }
    tch::set_num_threads(1);
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d).max(1);
    let (rounds, gen_rounds) = (env("MODELS_ROUNDS", 8), env("MODELS_GEN_ROUNDS", 4));
    let tag = std::env::var("MODELS_TAG").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| "run1".into());
    let dir = models_dir();
    let mut folders: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("config.json").exists()).collect(),
        Err(_) => Vec::new(),
    };
    folders.sort();
    if folders.is_empty() {
        println!(
            "models bench: no checkpoints under {} — make them with `python benches/python_models.py make` \
             (torch + transformers); nothing measured",
            dir.display()
        );
        return;
    }
    let started = Instant::now();
    let mut json = serde_json::Map::new();
    for folder in folders {
        let name = folder.file_name().unwrap().to_string_lossy().to_string();
        if !selected(&name) {
            continue;
        }
        let Some(ids) = read_json(&folder.join("input_ids.json")).map(|v| ids_of(&v)) else {
            println!("{name}: no input_ids.json in {}, skipped", folder.display());
            continue;
        };
        let reference = read_json(&folder.join("python_reference.json"));
        let generated = reference.as_ref().map(|r| ids_of(&r["generated"])).unwrap_or_default();
        let config = read_json(&folder.join("config.json")).unwrap_or_default();
        let vocab = config["vocab_size"].as_u64().unwrap_or(32000) as u32;
        ensure_tokenizer(&folder, vocab);
        let t_load = Instant::now();
        let model = match AutoLanguageModel::load_with(&folder, &LoadOptions { device: Device::Cpu, dtype: Some(Kind::Float), ..Default::default() }) {
            Ok(m) => m,
            Err(e) => {
                println!("{name}: not loaded ({e}), skipped");
                continue;
            }
        };
        let params = reference.as_ref().and_then(|r| r["parameters"].as_i64()).unwrap_or(0);
        println!(
            "{name}: model_type {}, {:.1}M parameters, loaded in {:.1} s",
            model.model_type(),
            params as f64 / 1e6,
            t_load.elapsed().as_secs_f64()
        );
        let cache = model.model_type() == "gpt2";
        let mut cases = with_family!(&model, |m| family_cases(&name, m, &ids, &generated, cache));
        if let nnsight::models::auto::Auto::Gpt2(m) = &model {
            cases.extend(gpt2_every_module_by_hand(m, &ids));
        }
        // Two groups of paired rounds: the single forward passes (more rounds: they are shorter),
        // then the two generations.
        let is_gen = |c: &&Case<'_>| c.0.starts_with("generate");
        let fwd: Vec<&Case<'_>> = cases.iter().filter(|c| !is_gen(c)).collect();
        let gen: Vec<&Case<'_>> = cases.iter().filter(is_gen).collect();
        let (mut c, mut c_cpu, mut c_faults) = (serde_json::Map::new(), serde_json::Map::new(), serde_json::Map::new());
        for (group, r) in [(fwd, rounds), (gen, gen_rounds)] {
            let (times, cpu, faults) = paired(&name, &group, r);
            for ((((id, _), t), u), f) in group.iter().zip(&times).zip(&cpu).zip(&faults) {
                c.insert(id.to_string(), serde_json::json!(t.iter().map(|x| x.round()).collect::<Vec<_>>()));
                c_cpu.insert(id.to_string(), serde_json::json!(u.iter().map(|x| x.round()).collect::<Vec<_>>()));
                c_faults.insert(id.to_string(), serde_json::json!(f.round()));
            }
        }
        json.insert(
            name.clone(),
            serde_json::json!({
                "model_type": model.model_type(),
                "python_name": name,
                "parameters": params,
                "layers": with_family!(&model, |m| m.layers().len()),
                "cases": c,
                "cpu_cases": c_cpu,
                "minor_faults_per_call": c_faults,
            }),
        );
    }
    let out = serde_json::json!({
        "tag": tag,
        "threads": tch::get_num_threads(),
        "rounds": rounds,
        "gen_rounds": gen_rounds,
        "seq": 128,
        "new_tokens": NEW_TOKENS,
        "families": json,
    });
    let path = dir.join(format!("rust.{tag}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {} ({:.0} s)", path.display(), started.elapsed().as_secs_f64());
}
