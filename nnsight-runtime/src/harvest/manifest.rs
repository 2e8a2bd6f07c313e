//! The manifest of a harvest folder: what was harvested with which settings, and which shard
//! files hold which batches. Rewritten (to a temporary file, then renamed over the old one)
//! after every shard, so at any moment it lists exactly the shards that are complete on disk.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version tag of the manifest format.
pub const FORMAT: &str = "nnsight-harvest/1";

/// A harvest's settings and its shards (`manifest.json`, or `manifest.I-of-N.json` for
/// `--shard I/N`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The model, as the caller named it (a folder, a hub id).
    pub model: String,
    /// The hook points, in the order given; each is a tensor `[rows, width]` in every shard.
    pub hook_points: Vec<HookPointEntry>,
    /// Element type of the hook point tensors (`float32`, `float16`, `bfloat16`).
    pub dtype: String,
    /// The input file (its canonical absolute path when it exists).
    pub input: String,
    /// The input file's size in bytes when the harvest began (0 in manifests written before
    /// this field existed). A resumed harvest refuses an input whose size or modification time
    /// changed: its batches would no longer be the ones already written.
    #[serde(default)]
    pub input_bytes: u64,
    /// The input file's modification time when the harvest began, in nanoseconds since the Unix
    /// epoch (0 when unknown).
    #[serde(default)]
    pub input_modified: u64,
    /// JSONL field holding the text; `None` for plain text, one text per line.
    pub field: Option<String>,
    /// Whether empty lines are skipped (else they are an error).
    pub skip_empty: bool,
    /// Sentences per forward pass. Batch `b` holds the `b`-th `batch_size` kept lines.
    pub batch_size: usize,
    /// This process's share: batches `b` with `b % shard_count == shard_index`.
    pub shard_index: usize,
    /// Number of processes the dataset is split among.
    pub shard_count: usize,
    /// A shard file is closed once it holds at least this many rows (it always ends on a
    /// batch boundary).
    pub rows_per_shard: usize,
    /// Rows (tokens) in the listed shards.
    pub tokens: u64,
    /// Sentences (lines) in the listed shards.
    pub sequences: u64,
    /// The complete shard files, in order.
    pub shards: Vec<ShardEntry>,
    /// True once the whole input was harvested.
    pub complete: bool,
    /// The error that stopped the harvest, if one did (bad input, a failed write); the listed
    /// shards are intact.
    pub error: Option<String>,
}

/// One hook point of a harvest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookPointEntry {
    /// The tensor's name in the shard files.
    pub name: String,
    /// Its last dimension (0 until the first batch ran).
    pub width: i64,
}

/// One shard file. Besides the hook points it holds `token_id`, `line` (0-based line of the
/// input) and `position` (token position in its line's tokenization), each `[rows]` i64.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the harvest folder.
    pub file: String,
    /// Rows (tokens).
    pub rows: u64,
    /// Sentences.
    pub sequences: u64,
    /// First batch it holds (global batch index).
    pub first_batch: u64,
    /// Last batch it holds.
    pub last_batch: u64,
}

impl Manifest {
    /// The batch to start from: one after the last harvested one of this process's share.
    pub fn next_batch(&self) -> u64 {
        self.shards.last().map_or(0, |s| s.last_batch + 1)
    }

    /// The settings (everything but progress) as a comparable value.
    fn settings(&self) -> Manifest {
        Manifest {
            tokens: 0,
            sequences: 0,
            shards: Vec::new(),
            complete: false,
            error: None,
            hook_points: self.hook_points.iter().map(|h| HookPointEntry { name: h.name.clone(), width: 0 }).collect(),
            ..self.clone()
        }
    }

    /// `Ok` if a harvest with the settings of `self` may resume the one of `old`; else
    /// [`Error::Input`] naming the first setting that differs and the manifest file.
    pub fn check_resumable(&self, old: &Manifest, file: &Path) -> Result<()> {
        let (a, b) = (serde_json::to_value(self.settings()), serde_json::to_value(old.settings()));
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else { return Ok(()) };
        if let Some((k, v)) = a.iter().find(|(k, v)| b.get(*k) != Some(*v)) {
            if k == "input_bytes" || k == "input_modified" {
                return Err(Error::Input(format!(
                    "`{}`: the input `{}` changed since this harvest began ({k}: {} then, {v} now), so the batches \
                     already written are not this file's; harvest it into another folder",
                    file.display(),
                    self.input,
                    b.get(k).map_or("absent".to_string(), |x| x.to_string())
                )));
            }
            return Err(Error::Input(format!(
                "`{}` holds a harvest with other settings ({k}: {} there, {v} now); resume with the same settings or use another folder",
                file.display(),
                b.get(k).map_or("absent".to_string(), |x| x.to_string())
            )));
        }
        Ok(())
    }

    /// Checks that every listed shard file is in `dir` with the rows the manifest gives (its
    /// safetensors header's `token_id` shape and its length). Errors: [`Error::Input`] naming
    /// the shard file and what is wrong.
    pub fn check_shards(&self, dir: &Path) -> Result<()> {
        for s in &self.shards {
            let path = dir.join(&s.file);
            check_shard(&path, s.rows).map_err(|why| {
                Error::Input(format!(
                    "`{}` is listed in the manifest with {} rows but {why}; the folder is damaged: harvest into another folder",
                    path.display(),
                    s.rows
                ))
            })?;
        }
        Ok(())
    }

    /// Reads a manifest file (`Ok(None)` if it does not exist). Errors: [`Error::Io`] naming the
    /// file when it cannot be read or is not a manifest.
    pub fn read(file: &Path) -> Result<Option<Manifest>> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Io { path: file.display().to_string(), source }),
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::Io {
            path: file.display().to_string(),
            source: io::Error::new(io::ErrorKind::InvalidData, format!("not a harvest manifest: {e}")),
        })?;
        Ok(Some(m))
    }

    /// Writes the manifest to `file` atomically (a temporary file renamed over it).
    pub fn write(&self, file: &Path) -> Result<()> {
        let tmp = tmp_path(file);
        let io_err = |path: &Path, source: io::Error| Error::Io { path: path.display().to_string(), source };
        let text = serde_json::to_string_pretty(self).map_err(|e| io_err(file, io::Error::other(e)))?;
        std::fs::write(&tmp, text).map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, file).map_err(|e| io_err(file, e))
    }
}

/// `Err(why)` unless `path` is a safetensors file whose `token_id` is `[rows]` and whose
/// length is its header's plus its data's.
fn check_shard(path: &Path, rows: u64) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot be opened ({e})"))?;
    let len = f.metadata().map_err(|e| format!("cannot be read ({e})"))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| format!("is {len} bytes long, not a safetensors file"))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100_000_000 {
        return Err(format!("is not a safetensors file (header of {n} bytes in {len})"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| format!("cannot be read ({e})"))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| format!("has a broken header ({e})"))?;
    let end = header
        .as_object()
        .map(|o| o.values().filter_map(|t| t["data_offsets"][1].as_u64()).max().unwrap_or(0))
        .unwrap_or(0);
    if 8 + n + end != len {
        return Err(format!("is {len} bytes long where its header describes {}", 8 + n + end));
    }
    match header["token_id"]["shape"].as_array().map(|a| a.iter().map(|x| x.as_u64()).collect::<Vec<_>>()) {
        Some(shape) if shape == [Some(rows)] => Ok(()),
        Some(shape) => Err(format!("its `token_id` has shape {shape:?}")),
        None => Err("has no `token_id` tensor".into()),
    }
}

/// `file` with `.tmp` appended.
pub(crate) fn tmp_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}
