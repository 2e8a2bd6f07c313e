//! Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`{"weight_map": {key: shard file}}`).
//!
//! Every key and shape is checked from the files' headers (the 8-byte length and the JSON that
//! open a safetensors file) before any tensor is read, so a wrong checkpoint fails fast and
//! nothing is half loaded. Shards are then read one at a time.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{nn, Kind, Tensor};

use crate::error::{Error, Result};

/// One tensor as a safetensors header describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The file holding it.
    pub file: PathBuf,
    /// Element type, e.g. `F32`, `BF16` (safetensors' names).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<i64>,
}

/// The tensors of the checkpoint in `dir`, by key, from the file headers only.
///
/// `model.safetensors` if it exists, else the shards of `model.safetensors.index.json`.
/// Returns the index (file that names the checkpoint in errors) and the table.
/// Errors: [`Error::Io`] when neither file exists or a file cannot be read or parsed.
pub fn checkpoint_tensors(dir: &Path) -> Result<(PathBuf, BTreeMap<String, TensorInfo>)> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        let table = read_header(&single)?;
        return Ok((single, table));
    }
    if !index.is_file() {
        return Err(Error::Io {
            path: single.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors and no model.safetensors.index.json in the model folder",
            ),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|source| Error::Io { path: index.display().to_string(), source })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(&index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid(&index, "no `weight_map` object".to_string()))?;
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut table = BTreeMap::new();
    for shard in shards {
        for (key, info) in read_header(&dir.join(shard))? {
            // Keep only what the index assigns to this shard.
            if map.get(&key).and_then(|v| v.as_str()) == Some(shard) {
                table.insert(key, info);
            }
        }
    }
    Ok((index, table))
}

fn invalid(path: &Path, message: String) -> Error {
    Error::Io { path: path.display().to_string(), source: std::io::Error::new(std::io::ErrorKind::InvalidData, message) }
}

/// Key → (dtype, shape) from the JSON header of one safetensors file.
fn read_header(file: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let io = |source| Error::Io { path: file.display().to_string(), source };
    let mut f = std::fs::File::open(file).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(io)?.len();
    if len > file_len.saturating_sub(8) || len > 100_000_000 {
        return Err(invalid(file, format!("not a safetensors file (header length {len})")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| invalid(file, format!("bad safetensors header: {e}")))?;
    let obj = json.as_object().ok_or_else(|| invalid(file, "bad safetensors header: not an object".into()))?;
    let mut table = BTreeMap::new();
    for (key, v) in obj {
        if key == "__metadata__" {
            continue;
        }
        let dtype = v.get("dtype").and_then(|d| d.as_str());
        let shape = v.get("shape").and_then(|s| s.as_array()).map(|a| a.iter().filter_map(|x| x.as_i64()).collect());
        match (dtype, shape) {
            (Some(dtype), Some(shape)) => {
                table.insert(key.clone(), TensorInfo { file: file.to_path_buf(), dtype: dtype.to_string(), shape });
            }
            _ => return Err(invalid(file, format!("bad safetensors header entry for `{key}`"))),
        }
    }
    Ok(table)
}

/// The tch kind of a safetensors dtype name (floating types only).
pub fn kind_of_dtype(dtype: &str) -> Option<Kind> {
    match dtype {
        "F32" => Some(Kind::Float),
        "F16" => Some(Kind::Half),
        "BF16" => Some(Kind::BFloat16),
        "F64" => Some(Kind::Double),
        _ => None,
    }
}

/// The floating dtype most of the checkpoint's elements have (f32 when it has none).
pub fn checkpoint_kind(table: &BTreeMap<String, TensorInfo>) -> Kind {
    let mut count: HashMap<&str, i64> = HashMap::new();
    for info in table.values() {
        if kind_of_dtype(&info.dtype).is_some() {
            *count.entry(info.dtype.as_str()).or_default() += info.shape.iter().product::<i64>().max(1);
        }
    }
    count.into_iter().max_by_key(|&(d, n)| (n, d)).and_then(|(d, _)| kind_of_dtype(d)).unwrap_or(Kind::Float)
}

/// Copies the checkpoint's tensors into every variable of `vs`, converting to the variable's
/// kind and device.
///
/// A variable `name` is looked up under `name`, then under `name` without each of
/// `strip_prefixes` (checkpoints saved from the bare `GPT2Model` / `LlamaModel` lack the
/// `transformer.` / `model.` prefix of the `...ForCausalLM` keys). Keys no variable needs
/// (`attn.bias` causal-mask buffers, `rotary_emb.inv_freq`) are ignored.
///
/// Errors, checked for all variables before anything is copied: [`Error::MissingWeight`]
/// (file: `model.safetensors` or the index) for the first variable, in sorted order, with no
/// tensor; [`Error::WeightShape`] for a tensor of another shape than the variable's.
pub fn load_into(vs: &nn::VarStore, index: &Path, table: &BTreeMap<String, TensorInfo>, strip_prefixes: &[&str]) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut plan: BTreeMap<PathBuf, Vec<(String, Tensor)>> = BTreeMap::new();
    for (name, var) in vars {
        let key = std::iter::once(name.clone())
            .chain(strip_prefixes.iter().filter_map(|p| name.strip_prefix(p).map(str::to_string)))
            .find(|k| table.contains_key(k))
            .ok_or_else(|| Error::MissingWeight { file: index.display().to_string(), key: name.clone() })?;
        let info = &table[&key];
        if info.shape != var.size() {
            return Err(Error::WeightShape {
                file: info.file.display().to_string(),
                key,
                expected: var.size(),
                actual: info.shape.clone(),
            });
        }
        if kind_of_dtype(&info.dtype).is_none() {
            return Err(invalid(&info.file, format!("tensor `{key}` has dtype {}, expected a float type", info.dtype)));
        }
        plan.entry(info.file.clone()).or_default().push((key, var));
    }
    for (file, wanted) in plan {
        let tensors = Tensor::read_safetensors(&file).map_err(|e| invalid(&file, e.to_string()))?;
        let mut by_name: HashMap<String, Tensor> = tensors.into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for (key, mut var) in wanted {
                let src = by_name.remove(&key).ok_or_else(|| invalid(&file, format!("tensor `{key}` missing")))?;
                var.f_copy_(&src.f_to_kind(var.kind())?.f_to_device(var.device())?)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}
