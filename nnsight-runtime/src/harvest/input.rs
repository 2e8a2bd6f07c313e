//! Reading the dataset: lines of plain text or one field of JSONL, grouped into batches, the
//! batches of this process's share tokenized (in parallel on rayon's pool for more than a few
//! sentences) on the calling thread between two forward passes (module docs of `harvest`).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use tch::Tensor;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Where the texts come from.
#[derive(Clone, Debug)]
pub struct Input {
    /// A text file: one text per line, or one JSON object per line when `field` is set.
    pub path: PathBuf,
    /// JSONL: the field of each line's object that holds the text (a string).
    pub field: Option<String>,
}

impl Input {
    /// Plain text, one text per line.
    pub fn lines(path: impl Into<PathBuf>) -> Input {
        Input { path: path.into(), field: None }
    }

    /// JSONL, the text in `field` of every line's object.
    pub fn jsonl(path: impl Into<PathBuf>, field: impl Into<String>) -> Input {
        Input { path: path.into(), field: Some(field.into()) }
    }
}

/// One tokenized batch of the process's share.
pub(crate) struct Prepared {
    /// Global batch index.
    pub batch: u64,
    /// 0-based input line of each row.
    pub lines: Vec<i64>,
    /// `[rows, seq]` i64.
    pub input_ids: Tensor,
    /// `[rows, seq]` i64, 1 for real tokens.
    pub attention_mask: Tensor,
    /// `[rows, seq]` i64.
    pub token_type_ids: Tensor,
}

/// What the reader needs to know.
pub(crate) struct Plan {
    pub input: Input,
    pub skip_empty: bool,
    pub batch_size: usize,
    pub shard_index: u64,
    pub shard_count: u64,
    /// Batches before this one were harvested already (resume).
    pub start_batch: u64,
    /// Longest tokenization the model accepts.
    pub max_tokens: Option<i64>,
}

/// The batches of this process's share, one at a time ([`Reader::next_batch`]).
pub(crate) struct Reader<'a> {
    plan: &'a Plan,
    tokenizer: &'a Tokenizer,
    /// `None` until the file is opened (at the first batch, so that an unreadable input is
    /// an error of the run, recorded in the manifest).
    lines: Option<Lines<BufReader<File>>>,
    /// Lines read so far.
    line: usize,
    /// Global index of the next batch formed.
    batch: u64,
    done: bool,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(plan: &'a Plan, tokenizer: &'a Tokenizer) -> Reader<'a> {
        Reader { plan, tokenizer, lines: None, line: 0, batch: 0, done: false }
    }

    /// The next batch of this process's share, tokenized; `None` at the end of the input.
    pub(crate) fn next_batch(&mut self) -> Result<Option<Prepared>> {
        loop {
            let Some(rows) = self.next_rows()? else { return Ok(None) };
            let batch = self.batch;
            self.batch += 1;
            if batch % self.plan.shard_count == self.plan.shard_index && batch >= self.plan.start_batch {
                return prepare(self.plan, self.tokenizer, batch, rows).map(Some);
            }
        }
    }

    /// The `(line, text)` of the next `batch_size` kept lines (fewer at the end).
    fn next_rows(&mut self) -> Result<Option<Vec<(i64, String)>>> {
        if self.done {
            return Ok(None);
        }
        let path = &self.plan.input.path;
        let shown = path.display().to_string();
        if self.lines.is_none() {
            self.lines = Some(BufReader::new(open_input(path)?).lines());
        }
        let lines = self.lines.as_mut().expect("opened above");
        let mut rows = Vec::with_capacity(self.plan.batch_size);
        while rows.len() < self.plan.batch_size {
            let Some(line) = lines.next() else {
                self.done = true;
                break;
            };
            let n = self.line;
            self.line += 1;
            let line = line.map_err(|e| Error::Io { path: shown.clone(), source: io::Error::new(e.kind(), format!("line {}: {e}", n + 1)) })?;
            if let Some(text) = text_of(&line, self.plan, &shown, n)? {
                rows.push((n as i64, text));
            }
        }
        Ok((!rows.is_empty()).then_some(rows))
    }
}

fn open_input(path: &Path) -> Result<File> {
    let err = |source: io::Error| Error::Io { path: path.display().to_string(), source };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }
    File::open(path).map_err(err)
}

/// The text of line `n` (0-based), `None` for an empty line that is skipped.
fn text_of(line: &str, plan: &Plan, file: &str, n: usize) -> Result<Option<String>> {
    let at = || format!("`{file}` line {}", n + 1);
    let empty = |what: &str| -> Result<Option<String>> {
        if plan.skip_empty {
            Ok(None)
        } else {
            Err(Error::Input(format!(
                "{}: {what}; skip empty lines with --skip-empty (HarvestOptions::skip_empty) or remove them",
                at()
            )))
        }
    };
    if line.trim().is_empty() {
        return empty("the line is empty");
    }
    let Some(field) = &plan.input.field else { return Ok(Some(line.to_string())) };
    let json: serde_json::Value =
        serde_json::from_str(line).map_err(|e| Error::Input(format!("{}: not a JSON object ({e})", at())))?;
    if !json.is_object() {
        return Err(Error::Input(format!("{}: not a JSON object but {}", at(), json_kind(&json))));
    }
    match json.get(field) {
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => empty(&format!("field `{field}` is empty")),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::Input(format!("{}: field `{field}` is not a string but {other}", at()))),
        None => Err(Error::Input(format!("{}: no field `{field}` in this line's object", at()))),
    }
}

/// Tokenizes and sends batch `batch` if it belongs to this process and was not harvested yet;
/// `false` when the receiver is gone.
fn prepare(plan: &Plan, tokenizer: &Tokenizer, batch: u64, rows: Vec<(i64, String)>) -> Result<Prepared> {
    let lines: Vec<i64> = rows.iter().map(|(n, _)| *n).collect();
    let texts: Vec<String> = rows.into_iter().map(|(_, t)| t).collect();
    // In parallel (rayon) for batches of more than a few sentences, between two forward passes:
    // the pool's threads are done before the next pass starts. (On a reader thread running
    // beside the forward pass they took its CPU: harvest/plain 0.84 on 2 cores.)
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encodings = crate::language_model::encode_texts(tokenizer, &refs).map_err(|e| Error::Tokenizer(format!("batch {batch}: {e}")))?;
    let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
    if let Some(max) = plan.max_tokens {
        // Each text's own tokens (the tokenizer padded every row to the batch's longest).
        let real = |e: &tokenizers::Encoding| e.get_attention_mask().iter().filter(|&&m| m != 0).count();
        if let Some((e, line)) = encodings.iter().zip(&lines).find(|(e, _)| real(e) as i64 > max) {
            return Err(Error::Input(format!(
                "`{}` line {}: {} tokens, the model accepts at most {max}",
                plan.input.path.display(),
                line + 1,
                real(e)
            )));
        }
        if seq as i64 > max {
            return Err(Error::Input(format!(
                "`{}` lines {}-{}: the tokenizer pads them to {seq} tokens, the model accepts at most {max} (its padding settings)",
                plan.input.path.display(),
                lines.first().map_or(0, |l| l + 1),
                lines.last().map_or(0, |l| l + 1)
            )));
        }
    }
    let flat = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Result<Tensor> {
        let mut v = Vec::with_capacity(encodings.len() * seq);
        for e in &encodings {
            let ids = f(e);
            if ids.len() != seq {
                return Err(Error::Tokenizer(format!("batch {batch}: rows of different lengths (the tokenizer has no padding)")));
            }
            v.extend(ids.iter().map(|&x| x as i64));
        }
        Ok(Tensor::from_slice(&v).view([encodings.len() as i64, seq as i64]))
    };
    Ok(Prepared {
        batch,
        lines,
        input_ids: flat(|e| e.get_ids())?,
        attention_mask: flat(|e| e.get_attention_mask())?,
        token_type_ids: flat(|e| e.get_type_ids())?,
    })
}

/// What a JSON value is, for messages.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
