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
    /// The input file.
    pub input: String,
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
            return Err(Error::Input(format!(
                "`{}` holds a harvest with other settings ({k}: {} there, {v} now); resume with the same settings or use another folder",
                file.display(),
                b.get(k).map_or("absent".to_string(), |x| x.to_string())
            )));
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

/// `file` with `.tmp` appended.
pub(crate) fn tmp_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}
