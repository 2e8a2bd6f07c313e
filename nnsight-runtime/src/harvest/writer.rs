//! The writer thread: takes each batch's saved hook point values, keeps the rows of real
//! tokens, and writes them to shard files, rewriting the manifest after every shard.
//!
//! A shard file is written under a temporary name and renamed when complete; the manifest is
//! then rewritten the same way. A run killed at any moment leaves the manifest listing only
//! complete shards, each holding whole batches; a resumed run starts at the batch after the
//! last listed one and overwrites any file a killed run left beyond it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use tch::{Kind, Tensor};

use super::manifest::{tmp_path, Manifest, ShardEntry};
use crate::error::{Error, Result};

/// One batch's values, as the forward pass saved them.
pub(crate) struct Saved {
    pub batch: u64,
    /// 0-based input line of each row.
    pub lines: Vec<i64>,
    /// `[rows, seq]` i64.
    pub input_ids: Tensor,
    /// `[rows, seq]`, 1 for real tokens.
    pub attention_mask: Tensor,
    /// One `[rows, seq, width]` tensor per hook point, in the manifest's order.
    pub values: Vec<Tensor>,
}

/// The shard being filled.
#[derive(Default)]
struct Pending {
    parts: Vec<Vec<Tensor>>,
    token_ids: Vec<Tensor>,
    lines: Vec<Tensor>,
    positions: Vec<Tensor>,
    rows: u64,
    sequences: u64,
    first_batch: Option<u64>,
    last_batch: u64,
}

pub(crate) struct Writer {
    pub dir: PathBuf,
    pub manifest_file: PathBuf,
    /// File name prefix of the shards (`shard` or `shard.I-of-N`).
    pub prefix: String,
    pub manifest: Manifest,
    pub kind: Kind,
}

impl Writer {
    /// Writes every batch from `rx` until it closes, then the last partial shard. Returns the
    /// manifest as written last, or the write error (the manifest then lists the shards
    /// written before it).
    pub(crate) fn run(mut self, rx: Receiver<Saved>) -> (Manifest, Option<Error>) {
        let mut pending = Pending::default();
        for saved in rx {
            if let Err(e) = self.add(&mut pending, saved) {
                return (self.manifest, Some(e));
            }
            if pending.rows >= self.manifest.rows_per_shard as u64 {
                if let Err(e) = self.flush(&mut pending) {
                    return (self.manifest, Some(e));
                }
            }
        }
        let err = self.flush(&mut pending).err();
        (self.manifest, err)
    }

    fn add(&mut self, p: &mut Pending, s: Saved) -> Result<()> {
        let mask = s.attention_mask.view([-1]).ne(0);
        let flat = mask.nonzero().view([-1]);
        let seq = s.attention_mask.size()[1];
        if p.parts.is_empty() {
            p.parts = (0..s.values.len()).map(|_| Vec::new()).collect();
        }
        for (i, v) in s.values.iter().enumerate() {
            let size = v.size();
            if size.len() != 3 || size[..2] != s.attention_mask.size()[..] {
                let name = &self.manifest.hook_points[i].name;
                return Err(Error::Input(format!(
                    "hook point `{name}` holds {size:?}; a harvest needs [batch, seq, width] = [{}, {seq}, ..] values",
                    s.lines.len()
                )));
            }
            let width = size[2];
            let entry = &mut self.manifest.hook_points[i];
            if entry.width == 0 {
                entry.width = width;
            }
            p.parts[i].push(v.reshape([-1, width]).index_select(0, &flat).to_kind(self.kind));
        }
        let lines = Tensor::from_slice(&s.lines).view([-1, 1]).expand([-1, seq], false).reshape([-1]);
        // Position among the row's real tokens (also when padding is on the left).
        let positions = (s.attention_mask.ne(0).cumsum(1, Kind::Int64) - 1).view([-1]);
        p.token_ids.push(s.input_ids.view([-1]).index_select(0, &flat));
        p.lines.push(lines.index_select(0, &flat));
        p.positions.push(positions.index_select(0, &flat));
        p.rows += flat.size()[0] as u64;
        p.sequences += s.lines.len() as u64;
        p.first_batch.get_or_insert(s.batch);
        p.last_batch = s.batch;
        Ok(())
    }

    fn flush(&mut self, p: &mut Pending) -> Result<()> {
        let Some(first_batch) = p.first_batch else { return Ok(()) };
        let pending = std::mem::take(p);
        let name = format!("{}.{:06}.safetensors", self.prefix, self.manifest.shards.len());
        let file = self.dir.join(&name);
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (h, parts) in self.manifest.hook_points.iter().zip(&pending.parts) {
            tensors.push((h.name.clone(), Tensor::cat(parts, 0)));
        }
        tensors.push(("token_id".into(), Tensor::cat(&pending.token_ids, 0)));
        tensors.push(("line".into(), Tensor::cat(&pending.lines, 0)));
        tensors.push(("position".into(), Tensor::cat(&pending.positions, 0)));
        write_atomically(&file, &tensors)?;
        self.manifest.shards.push(ShardEntry {
            file: name,
            rows: pending.rows,
            sequences: pending.sequences,
            first_batch,
            last_batch: pending.last_batch,
        });
        self.manifest.tokens += pending.rows;
        self.manifest.sequences += pending.sequences;
        self.manifest.write(&self.manifest_file)
    }
}

/// Writes `tensors` as a safetensors file at `file` via a temporary file renamed over it.
fn write_atomically(file: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = tmp_path(file);
    Tensor::write_safetensors(tensors, &tmp)
        .map_err(|e| Error::Io { path: tmp.display().to_string(), source: io::Error::other(e.to_string()) })?;
    std::fs::rename(&tmp, file).map_err(|source| Error::Io { path: file.display().to_string(), source })
}
