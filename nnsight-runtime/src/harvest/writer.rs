//! Shards: the calling thread gathers the rows of real tokens of each batch into one byte
//! buffer per column ([`Shard::add`]); a full shard goes to the writer thread, which only writes
//! it to disk and rewrites the manifest.
//!
//! A shard file is written under a temporary name and renamed when complete; the manifest is
//! then rewritten the same way. A run killed at any moment leaves the manifest listing only
//! complete shards, each holding whole batches; a resumed run starts at the batch after the
//! last listed one and overwrites any file a killed run left beyond it.

use std::borrow::Cow;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use safetensors::tensor::{Dtype, View};
use tch::{Kind, Tensor};

use super::input::Prepared;
use super::manifest::{tmp_path, Manifest, ShardEntry};
use crate::error::{Error, Result};

/// One column of a shard file: a `[rows, width]` tensor (a hook point) or a `[rows]` one
/// (`token_id`, `line`, `position`), as little-endian bytes in the file's element type.
struct Column {
    name: String,
    kind: Kind,
    /// `None` for a `[rows]` column; `Some(width)` once the first batch showed it.
    width: Option<i64>,
    bytes: Vec<u8>,
}

impl Column {
    /// `rows [n, width]` in the column's kind. Errors ([`Error::Input`]) when a finite value
    /// does not fit that kind (float16 holds at most 65504 in magnitude): writing `inf` would
    /// be a silently wrong activation. `lines[k]` is the line of row `k`.
    fn convert(&self, rows: &Tensor, lines: impl Fn(i64) -> i64) -> Result<Tensor> {
        let out = rows.to_kind(self.kind);
        if rows.kind() == self.kind || !rows.is_floating_point() {
            return Ok(out);
        }
        let lost = out.isfinite().logical_not().logical_and(&rows.isfinite());
        if lost.any().int64_value(&[]) == 0 {
            return Ok(out);
        }
        let row = lost.any_dim(1, false).nonzero().int64_value(&[0, 0]);
        let largest = rows.abs().max().double_value(&[]);
        Err(Error::Input(format!(
            "hook point `{}`: line {} holds a value of magnitude {largest:e}, which {:?} cannot hold (it would be written as \
             infinity); harvest with dtype float32 or bfloat16",
            self.name,
            lines(row) + 1,
            self.kind
        )))
    }

    /// Appends the elements of `t` (converted to the column's kind).
    fn push(&mut self, t: &Tensor) {
        let t = t.to_kind(self.kind).contiguous();
        let n = t.numel();
        let start = self.bytes.len();
        self.bytes.resize(start + n * self.kind.elt_size_in_bytes(), 0);
        t.copy_data_u8(&mut self.bytes[start..], n);
    }
}

/// The shard being filled, on the calling thread.
pub(crate) struct Shard {
    /// The hook points' columns (in the manifest's order), then `token_id`, `line`, `position`.
    columns: Vec<Column>,
    pub rows: u64,
    sequences: u64,
    first_batch: Option<u64>,
    last_batch: u64,
}

impl Shard {
    /// An empty shard for these hook point names, their values written as `kind`.
    pub(crate) fn new(names: &[String], kind: Kind) -> Shard {
        let point = |n: &String| Column { name: n.clone(), kind, width: Some(0), bytes: Vec::new() };
        let index = |n: &str| Column { name: n.into(), kind: Kind::Int64, width: None, bytes: Vec::new() };
        let mut columns: Vec<Column> = names.iter().map(point).collect();
        columns.extend(["token_id", "line", "position"].map(index));
        Shard { columns, rows: 0, sequences: 0, first_batch: None, last_batch: 0 }
    }

    /// Takes the rows gathered so far, leaving an empty shard with the same columns (and the
    /// buffers' capacity reserved for as many rows again).
    pub(crate) fn take(&mut self) -> Shard {
        let columns = self
            .columns
            .iter()
            .map(|c| Column { name: c.name.clone(), kind: c.kind, width: c.width, bytes: Vec::with_capacity(c.bytes.len()) })
            .collect();
        std::mem::replace(self, Shard { columns, rows: 0, sequences: 0, first_batch: None, last_batch: 0 })
    }

    /// Appends the rows of the real tokens of batch `p` (`attention_mask != 0`), from `values`:
    /// one `[rows, seq, width]` tensor per hook point. Returns the rows added.
    ///
    /// Errors: [`Error::Input`] naming the hook point when a value is not `[rows, seq, width]`,
    /// its width differs from an earlier batch's, or a value does not fit the written dtype.
    /// Every column is checked before any changes: a refused batch leaves the shard as it was
    /// (its earlier rows are still written, every column with the same rows).
    pub(crate) fn add(&mut self, p: &Prepared, values: &[Tensor]) -> Result<u64> {
        let mask = p.attention_mask.view([-1]).ne(0);
        let flat = mask.nonzero().view([-1]);
        let seq = p.attention_mask.size()[1];
        let line_of = |row: i64| p.lines[(flat.int64_value(&[row]) / seq) as usize];
        let points = self.columns.len() - 3;
        let mut gathered = Vec::with_capacity(points);
        for (col, v) in self.columns[..points].iter().zip(values) {
            let size = v.size();
            let width = size.get(2).copied().unwrap_or(0);
            if size.len() != 3 || size[..2] != p.attention_mask.size()[..] || col.width.is_some_and(|w| w != 0 && w != width) {
                return Err(Error::Input(format!(
                    "hook point `{}` holds {size:?}; a harvest needs [batch, seq, width] = [{}, {seq}, {}] values",
                    col.name,
                    p.lines.len(),
                    col.width.filter(|&w| w != 0).map_or("..".into(), |w| w.to_string())
                )));
            }
            gathered.push((width, col.convert(&v.reshape([-1, width]).index_select(0, &flat), line_of)?));
        }
        for (col, (width, rows)) in self.columns[..points].iter_mut().zip(gathered) {
            col.width = Some(width);
            col.push(&rows);
        }
        let lines = Tensor::from_slice(&p.lines).view([-1, 1]).expand([-1, seq], false).reshape([-1]);
        // Position among the row's real tokens (also when padding is on the left).
        let positions = (p.attention_mask.ne(0).cumsum(1, Kind::Int64) - 1).view([-1]);
        let [ids, line, pos] = &mut self.columns[points..] else { unreachable!("three index columns") };
        ids.push(&p.input_ids.view([-1]).index_select(0, &flat));
        line.push(&lines.index_select(0, &flat));
        pos.push(&positions.index_select(0, &flat));
        let rows = flat.size()[0] as u64;
        self.rows += rows;
        self.sequences += p.lines.len() as u64;
        self.first_batch.get_or_insert(p.batch);
        self.last_batch = p.batch;
        Ok(rows)
    }

    /// Whether no row was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.first_batch.is_none()
    }
}

/// A column's bytes as a safetensors tensor, borrowed (written without another copy).
struct ColumnView<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl View for ColumnView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype(kind: Kind) -> Dtype {
    match kind {
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        _ => Dtype::F32,
    }
}

pub(crate) struct Writer {
    pub dir: PathBuf,
    pub manifest_file: PathBuf,
    /// File name prefix of the shards (`shard` or `shard.I-of-N`).
    pub prefix: String,
    pub manifest: Manifest,
}

impl Writer {
    /// Writes every shard from `rx` until it closes. Returns the manifest as written last, or
    /// the write error (the manifest then lists the shards written before it).
    pub(crate) fn run(mut self, rx: Receiver<Shard>) -> (Manifest, Option<Error>) {
        for shard in rx {
            if let Err(e) = self.write(shard) {
                return (self.manifest, Some(e));
            }
        }
        (self.manifest, None)
    }

    fn write(&mut self, shard: Shard) -> Result<()> {
        let Some(first_batch) = shard.first_batch else { return Ok(()) };
        for (entry, col) in self.manifest.hook_points.iter_mut().zip(&shard.columns) {
            if entry.width == 0 {
                entry.width = col.width.unwrap_or(0);
            }
        }
        let name = format!("{}.{:06}.safetensors", self.prefix, self.manifest.shards.len());
        let file = self.dir.join(&name);
        let rows = shard.rows as usize;
        let views = shard.columns.iter().map(|c| {
            let shape = match c.width {
                Some(w) => vec![rows, w as usize],
                None => vec![rows],
            };
            (c.name.as_str(), ColumnView { dtype: dtype(c.kind), shape, data: &c.bytes })
        });
        write_atomically(&file, views)?;
        self.manifest.shards.push(ShardEntry {
            file: name,
            rows: shard.rows,
            sequences: shard.sequences,
            first_batch,
            last_batch: shard.last_batch,
        });
        self.manifest.tokens += shard.rows;
        self.manifest.sequences += shard.sequences;
        self.manifest.write(&self.manifest_file)
    }
}

/// Writes the tensors as a safetensors file at `file` via a temporary file renamed over it.
fn write_atomically<'a>(file: &Path, views: impl IntoIterator<Item = (&'a str, ColumnView<'a>)>) -> Result<()> {
    let tmp = tmp_path(file);
    safetensors::tensor::serialize_to_file(views, &None, &tmp).map_err(|e| Error::Io {
        path: tmp.display().to_string(),
        source: match e {
            safetensors::SafeTensorError::IoError(io) => io,
            other => io::Error::other(other.to_string()),
        },
    })?;
    std::fs::rename(&tmp, file).map_err(|source| Error::Io { path: file.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows of two positions; the second row's last position is padding (3 real tokens).
    fn batch(index: u64, lines: [i64; 2]) -> Prepared {
        let ids = Tensor::from_slice(&[1i64, 2, 3, 0]).view([2, 2]);
        Prepared {
            batch: index,
            lines: lines.to_vec(),
            attention_mask: ids.ne(0).to_kind(Kind::Int64),
            token_type_ids: ids.zeros_like(),
            input_ids: ids,
        }
    }

    #[test]
    fn a_refused_batch_leaves_every_column_as_it_was() {
        let mut shard = Shard::new(&["a".into(), "b".into()], Kind::Half);
        let ok = Tensor::ones([2, 2, 3], (Kind::Float, tch::Device::Cpu));
        assert_eq!(shard.add(&batch(0, [0, 1]), &[ok.copy(), ok.copy()]).unwrap(), 3);
        let lengths = |s: &Shard| s.columns.iter().map(|c| c.bytes.len()).collect::<Vec<_>>();
        let before = lengths(&shard);
        // Column `a` is fine, `b` holds 1e5 at row 1 (line 10, 0-based 9), position 0.
        let big = ok.copy();
        let _ = big.get(1).get(0).fill_(1.0e5);
        let e = shard.add(&batch(1, [8, 9]), &[ok.copy(), big]).unwrap_err().to_string();
        assert!(e.starts_with("hook point `b`: line 10 holds a value of magnitude 1e5"), "{e}");
        assert_eq!(lengths(&shard), before, "no column took the refused batch's rows");
        assert_eq!((shard.rows, shard.last_batch), (3, 0));
        // The same values in float32 are taken whole.
        let mut f32_shard = Shard::new(&["a".into(), "b".into()], Kind::Float);
        let big = ok.copy();
        let _ = big.get(1).get(0).fill_(1.0e5);
        assert_eq!(f32_shard.add(&batch(1, [8, 9]), &[ok, big]).unwrap(), 3);
    }
}
