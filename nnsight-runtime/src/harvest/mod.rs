//! Harvesting activations over a text dataset to disk: chosen hook points of every real token,
//! in sharded safetensors files with a manifest, at the speed of the forward pass.
//!
//! ```ignore
//! use nnsight::harvest::{harvest, HarvestOptions, HookPoint, Input};
//! let model = nnsight::bundled::minilm()?;
//! let points = [HookPoint::output("encoder.layer.3.output", &model.encoder.layer[3])];
//! let manifest = harvest(&model, &points, &Input::lines("sentences.txt"), "acts/".as_ref(), &mut HarvestOptions::new("all-MiniLM-L6-v2"))?;
//! ```
//!
//! Two threads: the calling thread reads and tokenizes a batch (the sentences in parallel on
//! rayon's pool, done before the pass starts), runs its forward pass with the
//! hook points saved and copies the rows of real tokens into the shard being filled; a writer
//! thread, fed full shards through a bounded queue ([`HarvestOptions::queue`]), writes each to
//! disk while the forward passes go on. Only the file writes leave the calling thread: on a
//! small machine every core runs libtorch's threads during a forward pass, and a third busy
//! thread (tokenizing ahead, gathering rows) preempts them and stalls the pass for longer than
//! its own work takes (measured on 2 cores: harvest/plain 0.87 with reader and writer threads
//! doing that work). Memory is bounded by `queue + 2` shards (the one being filled, those
//! waiting, the one being written), whatever the dataset's size.
//!
//! **Output** (folder `out`): `manifest.json` ([`Manifest`]) and `shard.000000.safetensors`,
//! ... each holding, for its rows (one per real token, padding dropped), one `[rows, width]`
//! tensor per hook point (named as the hook point) and `token_id`, `line` (0-based input line)
//! and `position` (token position in that line), each `[rows]` i64. A shard holds whole
//! batches and at least [`HarvestOptions::rows_per_shard`] rows (the last one fewer).
//!
//! **Splitting** ([`HarvestOptions::shard`] `(i, n)`, the command's `--shard i/N`): batch `b`
//! (the `b`-th `batch_size` lines kept) belongs to process `b % n`; each process writes
//! `manifest.i-of-n.json` and `shard.i-of-n.*` into the same or its own folder. The union of
//! the `n` processes' rows is the single run's (the same batches run), bit for bit when every
//! process uses the same linear kernel: the default `LinearKernel::Auto` times the kernels in
//! each process and may pick another one, which changes the last bits; set
//! `nnsight::models::linear::set_linear_kernel(LinearKernel::Libtorch)` in every process (and
//! in a run that resumes another) for identical bits.
//!
//! **Resuming**: run again with the same settings into the same folder. The manifest lists only
//! complete shards (each written to a temporary name and renamed before the manifest is
//! rewritten), so a killed run resumes at the batch after the last listed shard: no row is
//! written twice or lost. A folder harvested with other settings is an error naming the setting;
//! so is an input file whose size or modification time changed since the harvest began (the
//! manifest records both, and the input's canonical path, so `data.txt` and `./data.txt` are
//! the same input), and a listed shard file that is missing or not the size its header and the
//! manifest give (the folder is damaged: harvest into another one).
//!
//! **Bad input** stops the harvest with an error naming the file and line (a missing JSONL
//! field, a line that is not JSON, an empty line unless [`HarvestOptions::skip_empty`], a text
//! longer than the model accepts); the batches before it are written and listed, and the
//! manifest records the error. A hook point that does not exist is an error before anything
//! runs ([`bert_hook_point`]); an unwritable output folder is an [`Error::Io`] naming it.

mod input;
mod manifest;
mod points;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use tch::{Kind, Tensor};

pub use input::Input;
pub use manifest::{HookPointEntry, Manifest, ShardEntry, FORMAT};
pub use points::{bert_hook_point, bert_hook_point_names, HookPoint};

use crate::error::{Error, Result};
use crate::language_model::{LanguageModel, TextBatch, TextModel};
use crate::tracer::Tracer;

/// Progress after a batch, for a progress bar ([`HarvestOptions::on_batch`]).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Global index of the batch just run.
    pub batch: u64,
    /// Its sentences.
    pub sequences: u64,
    /// Its rows (real tokens).
    pub tokens: u64,
}

/// Settings of a harvest. [`HarvestOptions::new`] gives the defaults.
pub struct HarvestOptions<'a> {
    /// The model's name for the manifest.
    pub model_name: String,
    /// Sentences per forward pass (default 32).
    pub batch_size: usize,
    /// A shard file is closed once it holds this many rows (default 65,536).
    pub rows_per_shard: usize,
    /// `(i, n)`: harvest batches `b` with `b % n == i` (default `(0, 1)`: all).
    pub shard: (usize, usize),
    /// Element type written: `Kind::Float` (default), `Kind::Half` or `Kind::BFloat16`. A value
    /// the type cannot hold (over 65504 in magnitude for `Kind::Half`) stops the harvest with
    /// [`Error::Input`] naming the hook point and line, rather than being written as infinity.
    pub dtype: Kind,
    /// Skip empty lines (and empty JSONL fields) instead of stopping with an error.
    pub skip_empty: bool,
    /// Full shards that may wait for the writer thread besides the one it writes (default 1);
    /// the calling thread waits when the queue is full.
    pub queue: usize,
    /// Called on the calling thread after each batch's forward pass.
    pub on_batch: Option<Box<dyn FnMut(Progress) + 'a>>,
}

impl<'a> HarvestOptions<'a> {
    /// Defaults, with `model_name` for the manifest.
    pub fn new(model_name: impl Into<String>) -> Self {
        HarvestOptions {
            model_name: model_name.into(),
            batch_size: 32,
            rows_per_shard: 65_536,
            shard: (0, 1),
            dtype: Kind::Float,
            skip_empty: false,
            queue: 1,
            on_batch: None,
        }
    }

    /// The manifest's and shards' file names in the output folder.
    fn names(&self) -> (String, String) {
        match self.shard {
            (_, 1) => ("manifest.json".into(), "shard".into()),
            (i, n) => (format!("manifest.{i}-of-{n}.json"), format!("shard.{i}-of-{n}")),
        }
    }
}

fn dtype_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Float => Some("float32"),
        Kind::Half => Some("float16"),
        Kind::BFloat16 => Some("bfloat16"),
        _ => None,
    }
}

/// Harvests `points` of `model` over `input` into the folder `out` (module docs), resuming a
/// harvest with the same settings found there. Returns the final manifest.
///
/// Errors: [`Error::Input`] for bad options (no hook points, two with one name, a batch size,
/// shard size or queue of 0, `shard.0 >= shard.1`, a dtype other than f32/f16/bf16), for a
/// folder holding a harvest with other settings, and for bad input lines (module docs: the
/// shards before it are kept and the manifest records the error); [`Error::Io`] naming the path
/// for an input that cannot be read and an output folder or file that cannot be written;
/// errors of the forward pass (the trace's, naming the hook point).
pub fn harvest<'a, M: TextModel>(
    model: &'a LanguageModel<M>,
    points: &[HookPoint<'a, M>],
    input: &Input,
    out: &Path,
    opts: &mut HarvestOptions<'_>,
) -> Result<Manifest> {
    let dtype = check_options(points, opts)?;
    if out.as_os_str().is_empty() {
        return Err(Error::Input("the output folder is an empty path; name a folder (`.` for this one)".into()));
    }
    let (manifest_name, prefix) = opts.names();
    let manifest_file = out.join(&manifest_name);
    std::fs::create_dir_all(out).map_err(|source| Error::Io { path: out.display().to_string(), source })?;
    let (input_bytes, input_modified) = fingerprint(&input.path);
    let fresh = Manifest {
        format: manifest::FORMAT.into(),
        model: opts.model_name.clone(),
        hook_points: points.iter().map(|p| HookPointEntry { name: p.name().to_string(), width: 0 }).collect(),
        dtype: dtype.into(),
        input: canonical(&input.path),
        input_bytes,
        input_modified,
        field: input.field.clone(),
        skip_empty: opts.skip_empty,
        batch_size: opts.batch_size,
        shard_index: opts.shard.0,
        shard_count: opts.shard.1,
        rows_per_shard: opts.rows_per_shard,
        tokens: 0,
        sequences: 0,
        shards: Vec::new(),
        complete: false,
        error: None,
    };
    let manifest = match Manifest::read(&manifest_file)? {
        Some(old) => {
            // As written by an older version (the path as given, no fingerprint), or before any
            // shard was written: compared by the canonical path only.
            let legacy = old.input_bytes == 0 && old.input_modified == 0;
            let unchecked = legacy || old.shards.is_empty();
            let seen = Manifest {
                input: canonical(Path::new(&old.input)),
                input_bytes: if unchecked { input_bytes } else { old.input_bytes },
                input_modified: if unchecked { input_modified } else { old.input_modified },
                ..old.clone()
            };
            fresh.check_resumable(&seen, &manifest_file)?;
            old.check_shards(out)?;
            if old.complete {
                return Ok(old);
            }
            Manifest { error: None, input: fresh.input.clone(), input_bytes, input_modified, ..old }
        }
        None => fresh,
    };
    // Written now: an unwritable folder fails before any work.
    manifest.write(&manifest_file)?;
    let plan = input::Plan {
        input: input.clone(),
        skip_empty: opts.skip_empty,
        batch_size: opts.batch_size,
        shard_index: opts.shard.0 as u64,
        shard_count: opts.shard.1 as u64,
        start_batch: manifest.next_batch(),
        max_tokens: model.root().max_positions(),
    };
    let writer = writer::Writer { dir: out.to_path_buf(), manifest_file: manifest_file.clone(), prefix, manifest: manifest.clone() };
    let names: Vec<String> = points.iter().map(|p| p.name().to_string()).collect();
    let tokenizer = model.tokenizer();
    let rows_per_shard = opts.rows_per_shard as u64;
    let (run_error, (mut manifest, write_error)) = std::thread::scope(|s| {
        let (shard_tx, shard_rx) = sync_channel(opts.queue);
        let writer = s.spawn(move || writer.run(shard_rx));
        let mut reader = input::Reader::new(&plan, tokenizer);
        let mut shard = writer::Shard::new(&names, opts.dtype);
        let mut run_error = None;
        loop {
            let step = reader.next_batch().and_then(|p| match p {
                Some(p) => forward(model, points, &p).and_then(|values| shard.add(&p, &values)).map(|rows| Some((p, rows))),
                None => Ok(None),
            });
            match step {
                Ok(Some((p, tokens))) => {
                    if let Some(f) = opts.on_batch.as_mut() {
                        f(Progress { batch: p.batch, sequences: p.lines.len() as u64, tokens });
                    }
                    if shard.rows >= rows_per_shard && shard_tx.send(shard.take()).is_err() {
                        break; // the writer failed; its error comes from its join
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    run_error = Some(e);
                    break;
                }
            }
        }
        // The batches before an error are written too (the last shard, part-filled).
        if !shard.is_empty() {
            let _ = shard_tx.send(shard.take());
        }
        drop(shard_tx);
        let written = writer.join().unwrap_or_else(|_| (manifest.clone(), Some(Error::Model("the writer thread panicked".into()))));
        (run_error, written)
    });
    let error = run_error.or(write_error);
    match error {
        None => {
            manifest.complete = true;
            manifest.write(&manifest_file)?;
            Ok(manifest)
        }
        Some(e) => {
            manifest.error = Some(e.to_string());
            // Best effort: the manifest on disk already lists the complete shards.
            let _ = manifest.write(&manifest_file);
            Err(e)
        }
    }
}

/// `path` made absolute and resolved (symbolic links, `.`, `..`) when it exists, else as given.
fn canonical(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

/// The input file's size and modification time (ns since the Unix epoch); `(0, 0)` when it
/// cannot be read (the reader then reports why).
fn fingerprint(path: &Path) -> (u64, u64) {
    let Ok(meta) = std::fs::metadata(path) else { return (0, 0) };
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    (meta.len(), modified)
}

/// Checks the options; returns the dtype's manifest name.
fn check_options<M: TextModel>(points: &[HookPoint<'_, M>], opts: &HarvestOptions<'_>) -> Result<&'static str> {
    let bad = |m: String| Err(Error::Input(m));
    if points.is_empty() {
        return bad("a harvest needs at least one hook point".into());
    }
    for (i, p) in points.iter().enumerate() {
        if points[..i].iter().any(|q| q.name() == p.name()) {
            return bad(format!("hook point `{}` is given twice", p.name()));
        }
        if ["token_id", "line", "position"].contains(&p.name()) {
            return bad(format!("`{}` is a column of every shard; name the hook point otherwise", p.name()));
        }
    }
    if opts.batch_size == 0 || opts.rows_per_shard == 0 || opts.queue == 0 {
        return bad("batch size, rows per shard and queue depth must be at least 1".into());
    }
    let (i, n) = opts.shard;
    if n == 0 || i >= n {
        return bad(format!("shard {i}/{n}: the index must be below the count (0-based: 0/2 and 1/2 split in two)"));
    }
    dtype_name(opts.dtype).map_or_else(|| bad(format!("dtype {:?}: harvests write float32, float16 or bfloat16", opts.dtype)), Ok)
}

/// One batch through the model with the hook points saved: one `[rows, seq, width]` tensor
/// per hook point, on the CPU.
fn forward<'a, M: TextModel>(model: &'a LanguageModel<M>, points: &[HookPoint<'a, M>], p: &input::Prepared) -> Result<Vec<Tensor>> {
    let device = model.device();
    let batch = TextBatch {
        input_ids: p.input_ids.to_device(device),
        attention_mask: p.attention_mask.to_device(device),
        token_type_ids: p.token_type_ids.to_device(device),
        tokens: Vec::new(),
    };
    let mut tr = Tracer::new(model);
    let g = tr.invoke(&batch);
    let saved: Vec<_> = points.iter().map(|h| {
        let v = h.read(&mut tr, g);
        tr.save(v)
    }).collect();
    let values: Vec<Tensor> = tr.finish(saved)?;
    let to_cpu = |t: Tensor| if t.device() == tch::Device::Cpu { t } else { t.to_device(tch::Device::Cpu) };
    Ok(values.into_iter().map(to_cpu).collect())
}

/// Every shard file of a harvest folder's manifest, in order (`out.join(file)`).
pub fn shard_files(out: &Path, manifest: &Manifest) -> Vec<PathBuf> {
    manifest.shards.iter().map(|s| out.join(&s.file)).collect()
}
