//! Peak resident memory of tracing on the real all-MiniLM-L6-v2, against a plain forward pass.
//!
//! Run: `cargo run --release --example memory_report` (about 10 seconds).
//!
//! Each measurement runs in a fresh child process (this program re-invoked with an argument),
//! so peaks never mix. A child loads the model, runs one plain forward pass as a warm-up
//! (libtorch's lazy set-up, allocator pools), resets its peak (`5` written to
//! `/proc/self/clear_refs` makes `VmHWM` the current `VmRSS`), runs what is measured, and
//! reports `VmHWM` from `/proc/self/status`:
//!
//! - `plain`: `model.forward(&texts)` (32 sentences);
//! - `traced`: a trace on the same sentences saving every layer's output (6 tensors), also
//!   reporting the saved tensors' bytes;
//! - `soak`: resident memory (`VmRSS`) after 50 traces of the reference batch saving every
//!   layer, and after 1,000 (the 950 more should change nothing).
//!
//! Target: traced peak <= (plain peak + saved bytes) x 1.05.

use std::process::Command;

use nnsight::prelude::*;
use nnsight::{Bert, LanguageModel};

#[path = "common/sentences.rs"]
mod sentences;
use sentences::{sentences32, PARIS, ROME};

/// A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of KiB")
}

/// Makes the peak (`VmHWM`) the current resident size. Linux >= 4.0.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn model() -> LanguageModel<Bert> {
    let dir = std::env::var("NNSIGHT_MINILM_DIR")
        .expect("NNSIGHT_MINILM_DIR is not set: run `cargo xtask setup` (.cargo/config.toml points it at the model)");
    LanguageModel::<Bert>::from_pretrained(dir).expect("load all-MiniLM-L6-v2")
}

fn save_every_layer(model: &LanguageModel<Bert>, texts: &[&str]) -> Vec<Tensor> {
    trace!(model, texts, {
        let mut v = Vec::new();
        for l in 0..6 {
            v.push(model.encoder.layer[l].output.save());
        }
        v
    })
    .expect("trace")
}

/// Runs in the child: prints `key=value` pairs on one line.
fn child(what: &str) {
    let model = model();
    let s = sentences32();
    let texts: Vec<&str> = s.iter().map(String::as_str).collect();
    match what {
        "plain" | "traced" => {
            drop(model.forward(&texts).unwrap()); // warm-up
            let reset = reset_peak();
            let base = status_kib("VmRSS:");
            let saved_bytes: usize = if what == "plain" {
                let out = model.forward(&texts).unwrap();
                let hwm = status_kib("VmHWM:");
                println!("RESULT base_kib={base} hwm_kib={hwm} saved_bytes=0 reset={reset} out_bytes={}", bytes(&out));
                return;
            } else {
                let saved = save_every_layer(&model, &texts);
                saved.iter().map(bytes).sum()
            };
            let hwm = status_kib("VmHWM:");
            println!("RESULT base_kib={base} hwm_kib={hwm} saved_bytes={saved_bytes} reset={reset}");
        }
        "soak" => {
            let pair = [PARIS, ROME];
            for _ in 0..50 {
                drop(save_every_layer(&model, &pair));
            }
            let after50 = status_kib("VmRSS:");
            for _ in 50..1000 {
                drop(save_every_layer(&model, &pair));
            }
            let after1000 = status_kib("VmRSS:");
            println!("RESULT after50_kib={after50} after1000_kib={after1000}");
        }
        other => panic!("unknown measurement {other}"),
    }
}

fn bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Runs this program as a child measuring `what`; returns its `key=value` pairs.
fn measure(what: &str) -> std::collections::HashMap<String, String> {
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(exe).arg("--child").arg(what).output().expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child `{what}` failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("RESULT ")).unwrap_or_else(|| panic!("no result from `{what}`: {stdout}"));
    line["RESULT ".len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--child" {
        child(&args[2]);
        return;
    }
    let num = |m: &std::collections::HashMap<String, String>, k: &str| -> f64 { m[k].parse().unwrap() };
    let plain = measure("plain");
    let traced = measure("traced");
    let soak = measure("soak");
    let mib = |kib: f64| kib / 1024.0;
    let (p_hwm, p_base) = (num(&plain, "hwm_kib"), num(&plain, "base_kib"));
    let (t_hwm, t_base) = (num(&traced, "hwm_kib"), num(&traced, "base_kib"));
    let saved_kib = num(&traced, "saved_bytes") / 1024.0;
    let bound = (p_hwm + saved_kib) * 1.05;
    let ratio = t_hwm / (p_hwm + saved_kib);
    let (p_work, t_work) = (p_hwm - p_base, t_hwm - t_base);
    let (s50, s1000) = (num(&soak, "after50_kib"), num(&soak, "after1000_kib"));

    println!("Peak resident memory, all-MiniLM-L6-v2, batch of 32 sentences (release build; each row a fresh process;");
    println!("peak reset after loading the model and one warm-up forward: {}):", if plain["reset"] == "true" { "yes" } else { "NO, peaks include loading" });
    println!();
    println!("| measurement | peak (VmHWM) | resident before the run | peak - before |");
    println!("|---|---|---|---|");
    println!("| plain forward `model.forward(&texts)` | {:.1} MiB | {:.1} MiB | {:.1} MiB |", mib(p_hwm), mib(p_base), mib(p_work));
    println!("| trace saving every layer (6 outputs) | {:.1} MiB | {:.1} MiB | {:.1} MiB |", mib(t_hwm), mib(t_base), mib(t_work));
    println!("| plain forward + saved tensors' bytes ({:.1} MiB) | {:.1} MiB | | {:.1} MiB |", mib(saved_kib), mib(p_hwm + saved_kib), mib(p_work + saved_kib));
    println!();
    println!(
        "traced peak / (plain peak + saved bytes) = {ratio:.3} (target <= 1.05: {}); over the resident size before the run: \
         {:.1} MiB vs {:.1} MiB + {:.1} MiB saved = {:.2}x",
        if t_hwm <= bound { "met" } else { "NOT met" },
        mib(t_work),
        mib(p_work),
        mib(saved_kib),
        t_work / (p_work + saved_kib)
    );
    println!();
    println!("| traces (reference batch of 2, saving every layer) | resident (VmRSS) |");
    println!("|---|---|");
    println!("| after 50 | {:.1} MiB |", mib(s50));
    println!("| after 1,000 | {:.1} MiB ({:+.1} MiB) |", mib(s1000), mib(s1000 - s50));
}
