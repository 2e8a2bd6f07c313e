//! Bundled model architectures, written in tch with every submodule hookable.
//!
//! Each model family lives in its own file, with a `Config` deserialised from the checkpoint's
//! `config.json` (the checkpoint's own field names) and modules built under `tch::nn::Path`s
//! whose dotted names are the Hugging Face safetensors keys, so the module path a user writes
//! in `trace!` (`encoder.layer.0.attention.self.query`) is the checkpoint key prefix.
//!
//! Every hook point declares its batch layout (see [`crate::activation`]): [`ROWS`] for values
//! `[batch, ..]`, [`Layout::Shared`] for values every row shares (BERT's position embeddings
//! `[1, seq, hidden]`, the KV cache handle). `nnsight::Tracer::layouts` lists them for a run.
//!
//! [`linear`] is the linear layer they share (oneDNN for CPU f32 inference, libtorch's `linear`
//! otherwise).
//!
//! [`load_safetensors`] fills a `VarStore` from a safetensors checkpoint, checking every name
//! and shape first (tch's own `VarStore::load` would silently broadcast a wrongly shaped tensor).

pub mod bert;
pub mod causal;
pub mod gpt2;
pub mod linear;
pub mod llama;

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Tensor};

use crate::activation::Layout;
use crate::error::{Error, Result};

/// The batch layout of most of the bundled models' hook points: every tensor `[batch, ..]`,
/// rows on dim 0 (hidden states `[batch, seq, hidden]`, token ids and masks `[batch, seq]`,
/// attention masks `[batch, 1, q, k]`, rotary tables `[batch, seq, head_dim]`).
pub const ROWS: Layout = Layout::Batch(0);

/// The batch layout of [`causal::CausalInput`]: ids, mask and position ids `[batch, ..]`, the
/// KV cache handle shared by every row.
pub const CAUSAL_INPUT: Layout = Layout::Tuple(&[ROWS, ROWS, ROWS, Layout::Shared]);

/// Copies the tensors of the safetensors checkpoint `file` into the variables of `vs`.
///
/// Every variable of `vs` (e.g. `encoder.layer.0.attention.self.query.weight`) must be in the
/// file under its own name, or under its name with one of `prefixes` in front (`"bert."` for
/// checkpoints saved from `BertForMaskedLM` and friends); Hugging Face's legacy LayerNorm names
/// (`gamma`/`beta` for `weight`/`bias`) are accepted too. Checkpoint tensors that no variable
/// needs (a pooler, a task head, `position_ids` buffers) are ignored. Tensors are converted to
/// the variable's dtype (f32 for the bundled models) and device.
///
/// Errors, each naming the file and the key: [`Error::Io`] when the file cannot be read or
/// parsed, [`Error::MissingWeight`] for a variable with no tensor in the file (the first
/// missing name in sorted order), [`Error::WeightShape`] for a tensor whose shape differs from
/// the variable's. Nothing is copied unless every check passes.
pub fn load_safetensors(vs: &nn::VarStore, file: &Path, prefixes: &[&str]) -> Result<()> {
    let file_name = file.display().to_string();
    if let Err(source) = std::fs::metadata(file) {
        return Err(Error::Io { path: file_name, source });
    }
    let tensors = Tensor::read_safetensors(file).map_err(|e| Error::Io {
        path: file_name.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let by_name: HashMap<String, Tensor> = tensors.into_iter().collect();

    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));

    let mut plan = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let src = find_tensor(&by_name, &name, prefixes)
            .ok_or_else(|| Error::MissingWeight { file: file_name.clone(), key: name.clone() })?;
        if src.1.size() != var.size() {
            return Err(Error::WeightShape {
                file: file_name.clone(),
                key: src.0,
                expected: var.size(),
                actual: src.1.size(),
            });
        }
        plan.push((var, src.1));
    }
    tch::no_grad(|| -> Result<()> {
        for (mut var, src) in plan {
            let src = src.f_to_kind(var.kind())?.f_to_device(var.device())?;
            var.f_copy_(&src)?;
        }
        Ok(())
    })
}

/// The checkpoint tensor for variable `name`: `(key in the file, tensor)`.
fn find_tensor<'a>(by_name: &'a HashMap<String, Tensor>, name: &str, prefixes: &[&str]) -> Option<(String, &'a Tensor)> {
    let mut candidates = vec![name.to_string()];
    if let Some(stem) = name.strip_suffix(".weight").filter(|s| s.ends_with("LayerNorm")) {
        candidates.push(format!("{stem}.gamma"));
    }
    if let Some(stem) = name.strip_suffix(".bias").filter(|s| s.ends_with("LayerNorm")) {
        candidates.push(format!("{stem}.beta"));
    }
    let prefixed: Vec<String> =
        prefixes.iter().flat_map(|p| candidates.iter().map(move |c| format!("{p}{c}"))).collect();
    candidates.extend(prefixed);
    candidates.into_iter().find_map(|k| by_name.get(&k).map(|t| (k, t)))
}

/// [`Error::Io`] unless `dir` is an existing folder.
pub(crate) fn check_model_dir(dir: &Path) -> Result<()> {
    let p = dir.display().to_string();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Io {
            path: p,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a folder (expected a model folder)"),
        }),
        Err(e) => Err(Error::Io {
            path: p,
            source: std::io::Error::new(e.kind(), format!("model folder not found ({e})")),
        }),
    }
}
