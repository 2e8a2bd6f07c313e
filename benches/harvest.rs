//! Harvest throughput against the plain forward pass on the same batches, and peak memory at two
//! dataset sizes (`nnsight::harvest`, issue 19). Not run in CI.
//!
//! ```sh
//! flock /work/bench.lock cargo bench --bench harvest      # ~3 minutes on a 2-core machine
//! ```
//!
//! Dataset: `N` synthetic English sentences (default 10,240; `NNSIGHT_HARVEST_N`), 5 to ~30
//! words, made by a fixed generator, written to a temporary file. MiniLM, batch 32, hook point
//! `encoder.layer.3.output` (one `[tokens, 384]` f32 tensor; `NNSIGHT_HARVEST_POINTS` for a
//! comma-separated list).
//!
//! - **plain**: the same batches tokenized beforehand (not timed), then the root module's
//!   forward under `no_grad`, one batch after the other: what the model alone costs.
//! - **harvest**: `nnsight::harvest::harvest` end to end on the file (reading, tokenizing,
//!   the traced forward saving the hook point, dropping padding, writing shards and manifest).
//!
//! The two alternate for `ROUNDS` rounds (load on a shared machine hits both alike); the ratio
//! is tokens/s of the harvest over tokens/s of the plain forward in the same round. Then each
//! of two dataset sizes (N/2 and N, both past one shard) is harvested in a fresh child process (this program run
//! again with `--memory-child n`), which reports its peak resident memory (`VmHWM`).
//! Results are printed and written to `target/harvest_bench.json`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use nnsight::harvest::{bert_hook_point, harvest, HarvestOptions, Input};
use nnsight::{Bert, LanguageModel};

const ROUNDS: usize = 3;
const BATCH: usize = 32;

/// Sentence `i` of the synthetic dataset.
fn sentence(i: usize) -> String {
    const SUBJECTS: [&str; 12] = [
        "The old tower", "A small museum", "The river", "Every visitor", "The new bridge", "Our guide",
        "The market square", "A famous painter", "The city council", "Most students", "The night train", "An ancient wall",
    ];
    const VERBS: [&str; 10] = ["stands near", "was built beside", "looks over", "leads to", "was painted by", "crosses", "surrounds", "welcomes", "faces", "follows"];
    const OBJECTS: [&str; 10] = [
        "the cathedral", "a quiet harbour", "the main station", "the royal palace", "a busy street", "the university",
        "the botanical garden", "an old fortress", "the opera house", "a narrow canal",
    ];
    const TAILS: [&str; 8] = [
        "", " in the morning", " during the long winter months", " after the great fire of the last century",
        " while tourists take pictures from every corner of the square", " on weekends",
        " as the sun sets behind the hills and the lights come on one by one", " since the war",
    ];
    let mut x = (i as u64).wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut pick = |n: usize| {
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58476d1ce4e5b9);
        (x >> 33) as usize % n
    };
    format!("{} {} {}{}.", SUBJECTS[pick(12)], VERBS[pick(10)], OBJECTS[pick(10)], TAILS[pick(8)])
}

fn write_dataset(dir: &Path, n: usize) -> std::path::PathBuf {
    let p = dir.join(format!("sentences-{n}.txt"));
    let text: String = (0..n).map(|i| sentence(i) + "\n").collect();
    std::fs::write(&p, text).expect("write the dataset");
    p
}

fn points_env() -> Vec<String> {
    std::env::var("NNSIGHT_HARVEST_POINTS")
        .unwrap_or_else(|_| "encoder.layer.3.output".into())
        .split(',')
        .map(str::to_string)
        .collect()
}

/// Seconds and tokens of one harvest of `file` into a fresh folder under `dir`.
fn time_harvest(model: &LanguageModel<Bert>, file: &Path, dir: &Path, tag: &str) -> (f64, u64) {
    let names = points_env();
    let points: Vec<_> = names.iter().map(|n| bert_hook_point(model, n).expect("hook point")).collect();
    let out = dir.join(format!("acts-{tag}"));
    let _ = std::fs::remove_dir_all(&out);
    let mut opts = HarvestOptions::new("all-MiniLM-L6-v2");
    opts.batch_size = BATCH;
    let t = Instant::now();
    let m = harvest(model, &points, &Input::lines(file), &out, &mut opts).expect("harvest");
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&out);
    (secs, m.tokens)
}

/// Seconds and real tokens of the plain forward over the same batches, tokenized beforehand.
fn time_plain(model: &LanguageModel<Bert>, texts: &[String]) -> (f64, u64) {
    use nnsight::TextModel;
    let batches: Vec<_> = texts
        .chunks(BATCH)
        .map(|c| model.tokenize(&c.iter().map(String::as_str).collect::<Vec<_>>()).expect("tokenize"))
        .collect();
    let tokens: i64 = batches.iter().map(|b| b.attention_mask.sum(nnsight::tch::Kind::Int64).int64_value(&[])).sum();
    let t = Instant::now();
    nnsight::tch::no_grad(|| {
        for b in &batches {
            let out = model.root().call(model.root().text_input(b));
            let _ = std::hint::black_box(out);
        }
    });
    (t.elapsed().as_secs_f64(), tokens as u64)
}

fn vm_hwm_kib() -> i64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

fn memory_child(n: usize) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let file = write_dataset(dir.path(), n);
    let model = nnsight::bundled::minilm().expect("MiniLM");
    let (secs, tokens) = time_harvest(&model, &file, dir.path(), "memory");
    println!("{{\"sentences\": {n}, \"tokens\": {tokens}, \"seconds\": {secs:.3}, \"vm_hwm_kib\": {}}}", vm_hwm_kib());
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--memory-child") {
        memory_child(args[i + 1].parse().expect("size"));
        return;
    }
    let n: usize = std::env::var("NNSIGHT_HARVEST_N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_240);
    let dir = tempfile::tempdir().expect("temporary folder");
    let file = write_dataset(dir.path(), n);
    let texts: Vec<String> = (0..n).map(sentence).collect();
    println!("sentences 0 and {}: {:?} {:?}", n - 1, texts[0], texts[n - 1]);
    let model = nnsight::bundled::minilm().expect("MiniLM");
    // Warm-up: libtorch's lazy set-up, oneDNN's kernels, the file cache.
    time_plain(&model, &texts[..BATCH * 4]);
    let mut rounds = Vec::new();
    for r in 0..ROUNDS {
        let (ps, pt) = time_plain(&model, &texts);
        let (hs, ht) = time_harvest(&model, &file, dir.path(), &format!("r{r}"));
        assert_eq!(pt, ht, "the harvest and the plain forward saw different tokens");
        let ratio = (ht as f64 / hs) / (pt as f64 / ps);
        println!("round {r}: plain {:.0} tokens/s ({ps:.2} s), harvest {:.0} tokens/s ({hs:.2} s), ratio {ratio:.3}", pt as f64 / ps, ht as f64 / hs);
        rounds.push((ps, hs, pt, ratio));
    }
    let ratio = median(rounds.iter().map(|r| r.3).collect());
    println!("{n} sentences, {} tokens, batch {BATCH}, hook points {:?}: median ratio {ratio:.3} (target >= 0.95)", rounds[0].2, points_env());
    let exe = std::env::current_exe().expect("bench binary");
    let mut memory = Vec::new();
    // Both sizes past one shard (65,536 rows): a part-filled shard would make the smaller look
    // cheaper, whatever the dataset's effect.
    for size in [n / 2, n] {
        let out = Command::new(&exe).args(["--memory-child", &size.to_string()]).output().expect("run the memory child");
        let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
        println!("memory, {size} sentences: {line}");
        memory.push(line);
    }
    let json = format!(
        "{{\"sentences\": {n}, \"batch\": {BATCH}, \"hook_points\": {:?}, \"rounds\": [{}], \"median_ratio\": {ratio:.4}, \"memory\": [{}]}}\n",
        points_env(),
        rounds
            .iter()
            .map(|(ps, hs, t, r)| format!("{{\"plain_s\": {ps:.3}, \"harvest_s\": {hs:.3}, \"tokens\": {t}, \"ratio\": {r:.4}}}"))
            .collect::<Vec<_>>()
            .join(", "),
        memory.join(", ")
    );
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").into());
    let _ = std::fs::write(Path::new(&target).join("harvest_bench.json"), json);
}
