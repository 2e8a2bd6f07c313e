//! Harvesting (`nnsight::harvest` and `examples/harvest.rs`) on the real all-MiniLM-L6-v2:
//! the rows written are the plain forward pass's values at every real token; `--shard i/N`
//! splits exactly; a killed run resumes with no row lost or written twice; bad input stops with
//! an error naming file and line, with the shards before it intact and listed.

mod common;

#[path = "../examples/harvest.rs"]
#[allow(dead_code)]
mod harvest_cmd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nnsight::harvest::{bert_hook_point, harvest, HarvestOptions, HookPoint, Input, Manifest};
use nnsight::tch::{Kind, Tensor};
use nnsight::{edit, Bert, Error, LanguageModel};

/// `n` sentences of different lengths (1 to ~14 words).
fn sentences(n: usize) -> Vec<String> {
    let words = ["the", "tower", "is", "in", "paris", "and", "rome", "has", "a", "very", "old", "colosseum", "near", "river"];
    (0..n).map(|i| (0..1 + (i * 7) % 13).map(|j| words[(i * 3 + j * 5) % words.len()]).collect::<Vec<_>>().join(" ")).collect()
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// MiniLM with libtorch's linear kernel for the whole process: `LinearKernel::Auto` picks per
/// process by timing, so two processes (the kill test's child and parent) could differ in the
/// last bits. Every test sets it before computing anything.
fn minilm() -> LanguageModel<Bert> {
    nnsight::models::linear::set_linear_kernel(nnsight::models::linear::LinearKernel::Libtorch);
    common::minilm::minilm()
}

const POINTS: [&str; 2] = ["encoder.layer.2.output", "output"];

fn options(rows_per_shard: usize) -> HarvestOptions<'static> {
    let mut o = HarvestOptions::new("all-MiniLM-L6-v2");
    o.batch_size = 8;
    o.rows_per_shard = rows_per_shard;
    o
}

fn run(model: &LanguageModel<Bert>, input: &Input, out: &Path, opts: &mut HarvestOptions<'_>) -> nnsight::Result<Manifest> {
    let points: Vec<HookPoint<'_, Bert>> = POINTS.iter().map(|p| bert_hook_point(model, p).unwrap()).collect();
    harvest(model, &points, input, out, opts)
}

/// Every row of a harvest folder's manifest `manifest`, keyed by (line, position):
/// (token id, one vector per hook point). Panics on a duplicate row.
fn rows(out: &Path, manifest: &str) -> BTreeMap<(i64, i64), (i64, Vec<Tensor>)> {
    let m = Manifest::read(&out.join(manifest)).unwrap().unwrap();
    let mut all = BTreeMap::new();
    let mut total = 0u64;
    for s in &m.shards {
        let t: BTreeMap<String, Tensor> = Tensor::read_safetensors(out.join(&s.file)).unwrap().into_iter().collect();
        let n = t["line"].size()[0];
        assert_eq!(n as u64, s.rows, "{}: rows", s.file);
        total += s.rows;
        for r in 0..n {
            let key = (t["line"].int64_value(&[r]), t["position"].int64_value(&[r]));
            let values = m.hook_points.iter().map(|h| t[&h.name].get(r)).collect();
            assert!(all.insert(key, (t["token_id"].int64_value(&[r]), values)).is_none(), "row {key:?} written twice");
        }
    }
    assert_eq!(total, m.tokens, "manifest token count");
    all
}

fn assert_same_rows(a: &BTreeMap<(i64, i64), (i64, Vec<Tensor>)>, b: &BTreeMap<(i64, i64), (i64, Vec<Tensor>)>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, (id, v)) in a {
        let (id2, v2) = &b[k];
        assert_eq!(id, id2, "{k:?}");
        for (x, y) in v.iter().zip(v2) {
            assert!(x.equal(y), "row {k:?} differs");
        }
    }
}

#[test]
fn rows_are_the_plain_forward_values_of_every_real_token() {
    let model = minilm();
    let dir = tempfile::tempdir().unwrap();
    let texts = sentences(37);
    let input = Input::lines(write_lines(dir.path(), "in.txt", &texts));
    let out = dir.path().join("acts");
    let m = run(&model, &input, &out, &mut options(100)).unwrap();
    assert!(m.complete && m.error.is_none());
    assert_eq!(m.sequences, 37);
    assert_eq!(m.hook_points.iter().map(|h| (h.name.as_str(), h.width)).collect::<Vec<_>>(), vec![(POINTS[0], 384), (POINTS[1], 384)]);
    assert_eq!(m.dtype, "float32");
    // Every shard but the last holds at least rows_per_shard rows, and whole batches.
    for (i, s) in m.shards.iter().enumerate() {
        assert!(s.rows >= 100 || i + 1 == m.shards.len(), "{s:?}");
        assert_eq!(s.first_batch, m.shards.get(i.wrapping_sub(1)).map_or(0, |p| p.last_batch + 1));
    }
    let got = rows(&out, "manifest.json");
    // Independent values: the plain forward pass (no trace, no hooks) on the same batches of 8.
    let mut expected_tokens = 0;
    for (b, chunk) in texts.chunks(8).enumerate() {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let batch = model.tokenize(&refs).unwrap();
        let last = model.forward(&refs).unwrap();
        for (r, _) in chunk.iter().enumerate() {
            let line = (b * 8 + r) as i64;
            let len = batch.attention_mask.get(r as i64).sum(Kind::Int64).int64_value(&[]);
            expected_tokens += len;
            for pos in 0..len {
                let (id, v) = &got[&(line, pos)];
                assert_eq!(*id, batch.input_ids.int64_value(&[r as i64, pos]));
                assert!(v[1].equal(&last.get(r as i64).get(pos)), "line {line} position {pos}: last hidden state differs");
            }
        }
    }
    assert_eq!(got.len() as i64, expected_tokens, "one row per real token");
    assert_eq!(m.tokens as i64, expected_tokens);
}

#[test]
fn shards_split_the_dataset_exactly() {
    let model = minilm();
    let dir = tempfile::tempdir().unwrap();
    let input = Input::lines(write_lines(dir.path(), "in.txt", &sentences(45)));
    let single = dir.path().join("single");
    run(&model, &input, &single, &mut options(60)).unwrap();
    let split = dir.path().join("split");
    let mut union = BTreeMap::new();
    for i in 0..3 {
        let mut o = options(60);
        o.shard = (i, 3);
        let m = run(&model, &input, &split, &mut o).unwrap();
        assert!(m.shards.iter().all(|s| s.file.starts_with(&format!("shard.{i}-of-3."))));
        for (k, v) in rows(&split, &format!("manifest.{i}-of-3.json")) {
            assert!(union.insert(k, v).is_none(), "row {k:?} in two shards");
        }
    }
    assert_same_rows(&union, &rows(&single, "manifest.json"));
}

const CHILD_ENV: &str = "NNSIGHT_HARVEST_KILL_CHILD";

/// The run the kill test interrupts: slowed to ~50 ms a batch so it can be killed mid-way.
fn slow_run(input: &Path, out: &Path) -> nnsight::Result<Manifest> {
    let model = minilm();
    let mut o = options(30);
    o.on_batch = Some(Box::new(|_| std::thread::sleep(Duration::from_millis(50))));
    run(&model, &Input::lines(input), out, &mut o)
}

#[test]
fn a_killed_run_resumes_without_losing_or_repeating_rows() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let dir = PathBuf::from(dir);
        slow_run(&dir.join("in.txt"), &dir.join("acts")).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_lines(dir.path(), "in.txt", &sentences(120));
    let out = dir.path().join("acts");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["a_killed_run_resumes_without_losing_or_repeating_rows", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has written two shards (of ~15 batches in all).
    let start = Instant::now();
    let killed_after = loop {
        let shards = Manifest::read(&out.join("manifest.json")).ok().flatten().map_or(0, |m| m.shards.len());
        if shards >= 2 {
            child.kill().unwrap();
            break shards;
        }
        assert!(child.try_wait().unwrap().is_none(), "the child ended before it was killed");
        assert!(start.elapsed() < Duration::from_secs(120), "the child wrote no shards");
        std::thread::sleep(Duration::from_millis(5));
    };
    child.wait().unwrap();
    let interrupted = Manifest::read(&out.join("manifest.json")).unwrap().unwrap();
    assert!(!interrupted.complete, "killed after {killed_after} shards but complete");
    let listed: Vec<String> = interrupted.shards.iter().map(|s| s.file.clone()).collect();
    // Resume in this process, then compare with an uninterrupted run.
    let resumed = slow_run(&dir.path().join("in.txt"), &out).unwrap();
    assert!(resumed.complete);
    assert_eq!(resumed.shards.iter().take(listed.len()).map(|s| s.file.clone()).collect::<Vec<_>>(), listed);
    let clean = dir.path().join("clean");
    run(&minilm(), &Input::lines(dir.path().join("in.txt")), &clean, &mut options(30)).unwrap();
    assert_same_rows(&rows(&out, "manifest.json"), &rows(&clean, "manifest.json"));
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
}

/// Lines of JSONL with the text in `text`; line `bad` (0-based) lacks the field.
fn jsonl(n: usize, bad: Option<usize>) -> Vec<String> {
    sentences(n)
        .into_iter()
        .enumerate()
        .map(|(i, s)| if Some(i) == bad { format!("{{\"body\": {s:?}}}") } else { format!("{{\"id\": {i}, \"text\": {s:?}}}") })
        .collect()
}

/// The shards listed are intact (readable, their rows counted) and hold only lines before `line`.
fn intact_before(out: &Path, line: i64) -> Manifest {
    let m = Manifest::read(&out.join("manifest.json")).unwrap().unwrap();
    assert!(!m.complete);
    let r = rows(out, "manifest.json");
    assert!(!r.is_empty(), "no shard written before the bad line");
    assert!(r.keys().all(|&(l, _)| l < line), "a row from the bad line or after it");
    m
}

#[test]
fn bad_input_stops_with_the_line_and_keeps_the_shards_before_it() {
    let model = minilm();
    let dir = tempfile::tempdir().unwrap();

    // JSONL without the field on line 30 (1-based).
    let input = Input::jsonl(write_lines(dir.path(), "a.jsonl", &jsonl(40, Some(29))), "text");
    let out = dir.path().join("a");
    let e = run(&model, &input, &out, &mut options(20)).unwrap_err().to_string();
    assert!(e.contains("a.jsonl") && e.contains("line 30") && e.contains("`text`"), "{e}");
    let m = intact_before(&out, 29);
    assert!(m.error.as_deref().is_some_and(|m| m.contains("line 30")));

    // The same file harvested completely once the field is there: JSONL gives the text rows.
    let good = Input::jsonl(write_lines(dir.path(), "b.jsonl", &jsonl(20, None)), "text");
    let plain = Input::lines(write_lines(dir.path(), "b.txt", &sentences(20)));
    run(&model, &good, &dir.path().join("b1"), &mut options(20)).unwrap();
    run(&model, &plain, &dir.path().join("b2"), &mut options(20)).unwrap();
    assert_same_rows(&rows(&dir.path().join("b1"), "manifest.json"), &rows(&dir.path().join("b2"), "manifest.json"));

    // An empty line 25: an error unless skipped.
    let mut lines = sentences(40);
    lines[24] = "   ".into();
    let input = Input::lines(write_lines(dir.path(), "c.txt", &lines));
    let out = dir.path().join("c");
    let e = run(&model, &input, &out, &mut options(20)).unwrap_err().to_string();
    assert!(e.contains("c.txt") && e.contains("line 25") && e.contains("empty") && e.contains("--skip-empty"), "{e}");
    intact_before(&out, 24);
    let mut skip = options(20);
    skip.skip_empty = true;
    // Another folder: skipping empty lines changes the batches, so it cannot resume `c`.
    let e = run(&model, &input, &out, &mut skip).unwrap_err().to_string();
    assert!(e.contains("skip_empty"), "{e}");
    let out2 = dir.path().join("c2");
    let m = run(&model, &input, &out2, &mut skip).unwrap();
    assert_eq!(m.sequences, 39);
    assert!(rows(&out2, "manifest.json").keys().all(|&(l, _)| l != 24));

    // A hook point that does not exist: an error naming it before anything runs.
    let e = bert_hook_point(&model, "encoder.layer.6.output").err().unwrap().to_string();
    assert!(e.contains("encoder.layer.6.output") && e.contains("0..6"), "{e}");
    let e = bert_hook_point(&model, "encoder.layer.1.mlp.output").err().unwrap().to_string();
    assert!(e.contains("encoder.layer.1.mlp.output"), "{e}");

    // An output folder that cannot be created (a path under a regular file).
    let e = run(&model, &plain, &dir.path().join("b.txt").join("acts"), &mut options(20)).unwrap_err();
    assert!(matches!(e, Error::Io { ref path, .. } if path.contains("b.txt")), "{e}");

    // An input that does not exist.
    let e = run(&model, &Input::lines(dir.path().join("missing.txt")), &dir.path().join("d"), &mut options(20)).unwrap_err();
    assert!(e.to_string().contains("missing.txt"), "{e}");
}

/// A float16 harvest of a value float16 cannot hold (|x| > 65504) stops with an error naming
/// the hook point and line, instead of writing infinity; the value itself is what the float32
/// harvest writes, and the rows below the limit convert as `Tensor::to_kind` does.
#[test]
fn a_value_float16_cannot_hold_is_an_error_not_infinity() {
    let model = minilm();
    let dir = tempfile::tempdir().unwrap();
    let input = Input::lines(write_lines(dir.path(), "in.txt", &sentences(12)));
    let mut half = options(1000);
    half.dtype = Kind::Half;
    let m = run(&model, &input, &dir.path().join("f16"), &mut half).unwrap();
    assert_eq!(m.dtype, "float16");
    let full = rows(&dir.path().join("f16"), "manifest.json");
    run(&model, &input, &dir.path().join("f32"), &mut options(1000)).unwrap();
    for (k, (_, v)) in rows(&dir.path().join("f32"), "manifest.json") {
        assert!(full[&k].1[0].equal(&v[0].to_kind(Kind::Half)), "{k:?}");
    }

    // A persistent edit puts 1e6 at row 3 (line 4, 1-based), position 2, of each batch of 8.
    edit!(model, { model.encoder.layer[2].output[3, 2, 0] = 1.0e6; }).unwrap();
    let out = dir.path().join("edited");
    let e = run(&model, &input, &out, &mut half).unwrap_err();
    model.clear_edits();
    let text = e.to_string();
    assert!(matches!(e, Error::Input(_)), "{e:?}");
    assert!(text.contains("`encoder.layer.2.output`") && text.contains("line 4") && text.contains("1e6") && text.contains("float32"), "{text}");
    let m = Manifest::read(&out.join("manifest.json")).unwrap().unwrap();
    assert!(!m.complete && m.shards.is_empty() && m.error.as_deref() == Some(text.as_str()), "{m:?}");
    // float32 holds it: the edit's value is written as it is.
    let out = dir.path().join("edited32");
    edit!(model, { model.encoder.layer[2].output[3, 2, 0] = 1.0e6; }).unwrap();
    run(&model, &input, &out, &mut options(1000)).unwrap();
    model.clear_edits();
    let r = rows(&out, "manifest.json");
    assert_eq!(r[&(3, 2)].1[0].double_value(&[0]), 1.0e6);
}

#[test]
fn resuming_refuses_a_changed_input_or_damaged_shards() {
    let model = minilm();
    let dir = tempfile::tempdir().unwrap();
    let lines = sentences(40);
    let file = write_lines(dir.path(), "in.txt", &lines);

    // A harvest stopped after its first shards (an error at line 33), then resumed under
    // another spelling of the same path: accepted, and the rows are those of one clean run.
    let mut broken = lines.clone();
    broken[32] = String::new();
    std::fs::write(&file, broken.join("\n") + "\n").unwrap();
    let out = dir.path().join("a");
    assert!(run(&model, &Input::lines(&file), &out, &mut options(20)).is_err());
    assert!(!Manifest::read(&out.join("manifest.json")).unwrap().unwrap().shards.is_empty());
    // The input changed (line 33 fixed): refused, naming the input and the change.
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let e = run(&model, &Input::lines(&file), &out, &mut options(20)).unwrap_err().to_string();
    assert!(e.contains("in.txt") && e.contains("changed since this harvest began"), "{e}");

    // Same file, unchanged, under `dir/./in.txt`: resumes; the union is one clean run's rows.
    let out = dir.path().join("b");
    let mut o = options(20);
    let mut seen = 0;
    o.on_batch = Some(Box::new(move |_| {
        seen += 1;
        assert!(seen < 3, "stop after two batches"); // a panic stops the harvest, like a kill
    }));
    assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&model, &Input::lines(&file), &out, &mut o))).is_err());
    let dotted = dir.path().join(".").join("in.txt");
    run(&model, &Input::lines(&dotted), &out, &mut options(20)).unwrap();
    let clean = dir.path().join("clean");
    run(&model, &Input::lines(&file), &clean, &mut options(20)).unwrap();
    assert_same_rows(&rows(&out, "manifest.json"), &rows(&clean, "manifest.json"));

    // A listed shard deleted, or cut short: refused, naming it (also for a complete harvest).
    let m = Manifest::read(&clean.join("manifest.json")).unwrap().unwrap();
    let first = clean.join(&m.shards[0].file);
    let bytes = std::fs::read(&first).unwrap();
    std::fs::write(&first, &bytes[..bytes.len() - 4]).unwrap();
    let e = run(&model, &Input::lines(&file), &clean, &mut options(20)).unwrap_err().to_string();
    assert!(e.contains(&m.shards[0].file) && e.contains("damaged"), "{e}");
    std::fs::remove_file(&first).unwrap();
    let e = run(&model, &Input::lines(&file), &clean, &mut options(20)).unwrap_err().to_string();
    assert!(e.contains(&m.shards[0].file) && e.contains("cannot be opened"), "{e}");

    // An empty output path is refused rather than taken as the working directory.
    let e = run(&model, &Input::lines(&file), Path::new(""), &mut options(20)).unwrap_err();
    assert!(matches!(e, Error::Input(ref m) if m.contains("empty path")), "{e}");
}

#[test]
fn a_text_too_long_is_named_by_its_own_line_within_a_batch() {
    let model = minilm();
    let dir = tempfile::tempdir().unwrap();
    let mut lines = sentences(6);
    lines[3] = vec!["word"; 600].join(" "); // 602 tokens with [CLS] and [SEP]; MiniLM takes 512
    let file = write_lines(dir.path(), "long.txt", &lines);
    let e = run(&model, &Input::lines(&file), &dir.path().join("o"), &mut options(20)).unwrap_err().to_string();
    assert!(e.contains("line 4: 602 tokens") && e.contains("at most 512"), "{e}");

    // A JSONL line that is valid JSON but not an object says what it is.
    let file = write_lines(dir.path(), "arr.jsonl", &["[\"text\"]".to_string()]);
    let e = run(&model, &Input::jsonl(&file, "text"), &dir.path().join("p"), &mut options(20)).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("not a JSON object but an array"), "{e}");
}

#[test]
fn the_command_line_harvests_and_resumes() {
    drop(minilm());
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "in.txt", &sentences(20));
    let out = dir.path().join("acts");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--hook", "encoder.layer.1.output", "--quiet"];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect()
    };
    let m = harvest_cmd::run(&args(&["--batch-size", "4", "--rows-per-shard", "30", "--dtype", "f16"])).unwrap();
    assert!(m.complete);
    assert_eq!((m.dtype.as_str(), m.batch_size, m.sequences), ("float16", 4, 20));
    let t: BTreeMap<String, Tensor> = Tensor::read_safetensors(out.join(&m.shards[0].file)).unwrap().into_iter().collect();
    assert_eq!(t["encoder.layer.1.output"].kind(), Kind::Half);
    // Again: the harvest is complete, nothing is redone.
    assert_eq!(harvest_cmd::run(&args(&["--batch-size", "4", "--rows-per-shard", "30", "--dtype", "f16"])).unwrap(), m);
    // Other settings into the same folder: refused, naming the setting.
    let e = harvest_cmd::run(&args(&["--batch-size", "8", "--rows-per-shard", "30", "--dtype", "f16"])).unwrap_err();
    assert!(e.contains("batch_size"), "{e}");
    let e = harvest_cmd::run(&args(&["--shard", "2/2"])).unwrap_err();
    assert!(e.contains("--shard"), "{e}");
    let e = harvest_cmd::run(&["--input".into(), input.display().to_string(), "--out".into(), out.display().to_string(), "--hook".into(), "nope".into()]).unwrap_err();
    assert!(e.contains("`nope` is not a hook point"), "{e}");
}
