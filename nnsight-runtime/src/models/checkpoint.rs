//! Hugging Face safetensors checkpoints — one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`{"weight_map": {key: shard file}}`) — and loading a model
//! from them.
//!
//! A checkpoint may come from anywhere, so it is read in an order that never allocates more
//! than the files hold:
//!
//! 1. **Headers only** ([`Checkpoint::open`]): each file's 8-byte header length (at most
//!    [`MAX_HEADER_BYTES`] and inside the file) and JSON header. Every entry's dtype, shape and
//!    `data_offsets` must agree and lie inside the file, so no shape is larger than the file.
//!    Files, shards included, are opened through [`ModelDir`]: regular files inside the model
//!    folder only.
//! 2. **A dry run of the model's constructor** ([`load_model`], [`params::dry_run`]): every
//!    weight's name, shape and dtype is compared with the header before anything is allocated.
//!    Errors name the file, the key and both shapes ([`Error::WeightShape`]), the missing key
//!    ([`Error::MissingWeight`]) or the dtype ([`Error::WeightDtype`]: integer weights are
//!    refused).
//! 3. **Build and copy**: the model is built (its weights now sized as the checkpoint's), each
//!    tensor is read from its byte range of its file, converted to the model's dtype and device,
//!    and copied in.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::{nn, Device, Kind, Tensor};

use super::model_dir::{check_name, ModelDir, ModelFile};
use super::params::{self, Planned};
use crate::error::{Error, Result};

/// Largest safetensors header read (the bound the `safetensors` crate uses).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Largest `model.safetensors.index.json` read (real ones are ~100 KB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
const FLOAT_TYPES: &str = "a float type (F32, F16, BF16 or F64)";

/// One tensor as a safetensors header describes it (already checked against the file's length).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The file holding it (the model folder joined with `shard`).
    pub file: PathBuf,
    /// The file's name inside the model folder.
    pub shard: String,
    /// Element type, e.g. `F32`, `BF16` (safetensors' names).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Offset of its first byte in the file.
    pub start: u64,
    /// Its length in bytes (`shape`'s element count times the dtype's size).
    pub len: u64,
}

/// A checkpoint's tensors, from the file headers only (see the module docs).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    dir: ModelDir,
    /// The file that names the checkpoint in errors: `model.safetensors` or the index.
    pub index: PathBuf,
    /// Every tensor, by key.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Sharded checkpoints: the shard the index assigns each key to.
    assigned: BTreeMap<String, String>,
}

impl Checkpoint {
    /// The checkpoint in the folder `dir`: `model.safetensors` if the folder has an entry of that
    /// name, else the shards of `model.safetensors.index.json`. Reads headers only.
    ///
    /// Errors ([`Error::Io`], naming the file): neither file exists; a file is not a regular
    /// file inside the folder (a directory, a FIFO, a device, a symlink loop, a path leaving the
    /// folder); a header that is not a safetensors header or disagrees with the file's length;
    /// an index whose `weight_map` is not an object of file names.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let dir = ModelDir::new(dir)?;
        if dir.exists(SINGLE) {
            let tensors = read_header(&dir, SINGLE)?;
            return Ok(Checkpoint { index: dir.join(SINGLE), dir, tensors, assigned: BTreeMap::new() });
        }
        if !dir.exists(INDEX) {
            return Err(Error::Io {
                path: dir.join(SINGLE).display().to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, format!("no {SINGLE} and no {INDEX} in the model folder")),
            });
        }
        let index = dir.join(INDEX);
        let text = dir.read_text(INDEX, MAX_INDEX_BYTES)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| invalid(&index, "no `weight_map` object".to_string()))?;
        let mut assigned = BTreeMap::new();
        for (key, shard) in map {
            let shard = shard.as_str().ok_or_else(|| invalid(&index, format!("`weight_map` gives `{key}` the value {shard}, not a file name")))?;
            check_name(shard).map_err(|m| invalid(&index, format!("`weight_map` names `{shard}` for `{key}`: {m}")))?;
            assigned.insert(key.clone(), shard.to_string());
        }
        let mut shards: Vec<&String> = assigned.values().collect();
        shards.sort_unstable();
        shards.dedup();
        let mut tensors = BTreeMap::new();
        for shard in shards {
            for (key, info) in read_header(&dir, shard)? {
                // Keep only what the index assigns to this shard.
                if assigned.get(&key) == Some(shard) {
                    tensors.insert(key, info);
                }
            }
        }
        Ok(Checkpoint { dir, index, tensors, assigned })
    }

    /// The single safetensors file `file` (opened as [`ModelDir`] opens files in its folder).
    pub fn open_file(file: &Path) -> Result<Checkpoint> {
        let folder = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = file.file_name().and_then(|n| n.to_str()).ok_or_else(|| invalid(file, "not a file name".into()))?;
        let dir = ModelDir::new(folder)?;
        let tensors = read_header(&dir, name)?;
        Ok(Checkpoint { index: dir.join(name), dir, tensors, assigned: BTreeMap::new() })
    }

    /// The floating dtype most of the checkpoint's elements have (f32 when it has none).
    pub fn kind(&self) -> Kind {
        checkpoint_kind(&self.tensors)
    }

    /// Number of elements of its floating-point tensors.
    pub fn elements(&self) -> i64 {
        self.tensors.values().filter(|i| kind_of_dtype(&i.dtype).is_some()).map(|i| numel(&i.shape).unwrap_or(0)).fold(0, i64::saturating_add)
    }

    /// [`Error::UnusedWeight`] for the first tensor (in sorted order) that no weight of the model
    /// took: a checkpoint holding q/k/v biases, q/k norms or other weights the config does not
    /// describe would otherwise load and compute something else than the checkpoint's model.
    /// Buffers transformers saves without them being weights (the causal mask `attn.bias` /
    /// `attention.bias`, `masked_bias`, `rotary_emb.inv_freq`, `position_ids`) and a head saved
    /// beside tied embeddings (`lm_head.weight`, `embed_out.weight`) are allowed.
    pub fn check_all_used(&self, used: &std::collections::HashSet<String>) -> Result<()> {
        const ALLOWED_SUFFIXES: &[&str] =
            &[".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq", "position_ids"];
        const ALLOWED: &[&str] = &["lm_head.weight", "embed_out.weight"];
        let unused: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(k.as_str()) && !ALLOWED.contains(&k.as_str()) && !ALLOWED_SUFFIXES.iter().any(|s| k.ends_with(s)))
            .collect();
        let Some(first) = unused.first() else { return Ok(()) };
        let file = self.tensors[first.as_str()].file.display().to_string();
        Err(Error::UnusedWeight { file, key: first.to_string(), count: unused.len() })
    }

    /// The tensor for the variable `name`: `(key, info)`, if its shape is `shape` and its dtype a
    /// float type. Looked up under `name`, Hugging Face's legacy LayerNorm names (`gamma` /
    /// `beta` for `weight` / `bias`), and each of these with one of `prefixes` added or removed
    /// (`"bert."` for checkpoints saved from `BertForMaskedLM`; `"transformer."` / `"model."` for
    /// the bare `GPT2Model` / `LlamaModel`).
    ///
    /// Errors: [`Error::MissingWeight`] naming the index (or the shard the index assigns the
    /// key to), [`Error::WeightShape`], [`Error::WeightDtype`], each naming the file and key.
    pub fn check(&self, name: &str, shape: &[i64], prefixes: &[&str]) -> Result<(&str, &TensorInfo)> {
        let names = candidates(name, prefixes);
        let Some((key, info)) = names.iter().find_map(|k| self.tensors.get_key_value(k.as_str())) else {
            let (file, key) = match names.iter().find_map(|k| self.assigned.get(k).map(|s| (k, s))) {
                Some((k, shard)) => (self.dir.join(shard), k.clone()),
                None => (self.index.clone(), name.to_string()),
            };
            return Err(Error::MissingWeight { file: file.display().to_string(), key });
        };
        if info.shape != shape {
            return Err(Error::WeightShape {
                file: info.file.display().to_string(),
                key: key.clone(),
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        if kind_of_dtype(&info.dtype).is_none() {
            return Err(Error::WeightDtype {
                file: info.file.display().to_string(),
                key: key.clone(),
                dtype: info.dtype.clone(),
                expected: FLOAT_TYPES.into(),
            });
        }
        Ok((key, info))
    }

    /// The tensor `key`, [`Checkpoint::check`]ed against `shape` (no prefixes) before anything
    /// is read, as stored (its own float dtype), on the CPU. Errors: those of
    /// [`Checkpoint::check`]; [`Error::Io`] when the file cannot be read.
    pub fn read(&self, key: &str, shape: &[i64]) -> Result<Tensor> {
        let (key, info) = self.check(key, shape, &[])?;
        let mut f = self.dir.open(&info.shard)?;
        read_tensor(&mut f, key, info)
    }

    /// Copies the checkpoint's tensors into every variable of `vs`, converting to the variable's
    /// kind and device. Every variable is [`Checkpoint::check`]ed before anything is read; keys
    /// no variable needs (`attn.bias` mask buffers, `rotary_emb.inv_freq`, a pooler) are ignored.
    /// Each file is read only where a needed tensor lies.
    pub fn load_into(&self, vs: &nn::VarStore, prefixes: &[&str]) -> Result<()> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut plan: BTreeMap<&str, Vec<(&str, &TensorInfo, Tensor)>> = BTreeMap::new();
        for (name, var) in vars {
            let (key, info) = self.check(&name, &var.size(), prefixes)?;
            plan.entry(info.shard.as_str()).or_default().push((key, info, var));
        }
        for (shard, wanted) in plan {
            let mut f = self.dir.open(shard)?;
            tch::no_grad(|| -> Result<()> {
                for (key, info, mut var) in wanted {
                    let src = read_tensor(&mut f, key, info)?.f_to_kind(var.kind())?;
                    // A NaN or infinite weight (stored so, or overflowing the chosen dtype) would
                    // give NaN activations without an error further on.
                    if src.f_isfinite()?.f_all()?.int64_value(&[]) == 0 {
                        return Err(Error::Load {
                            path: info.file.display().to_string(),
                            message: format!("tensor `{key}` holds NaN or infinite values (as {:?})", var.kind()),
                        });
                    }
                    var.f_copy_(&src.f_to_device(var.device())?)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// The names a variable's tensor may have in a checkpoint (see [`Checkpoint::check`]).
fn candidates(name: &str, prefixes: &[&str]) -> Vec<String> {
    let mut base = vec![name.to_string()];
    if let Some(stem) = name.strip_suffix(".weight").filter(|s| s.ends_with("LayerNorm")) {
        base.push(format!("{stem}.gamma"));
    }
    if let Some(stem) = name.strip_suffix(".bias").filter(|s| s.ends_with("LayerNorm")) {
        base.push(format!("{stem}.beta"));
    }
    let mut all = base.clone();
    for p in prefixes {
        for b in &base {
            all.push(format!("{p}{b}"));
            all.extend(b.strip_prefix(p).map(str::to_string));
        }
    }
    all
}

/// The bytes of `info` from the open file, as a tensor of the file's dtype.
fn read_tensor(f: &mut ModelFile, key: &str, info: &TensorInfo) -> Result<Tensor> {
    let io = |source: io::Error| Error::Io { path: f.path.display().to_string(), source };
    let kind = kind_of_dtype(&info.dtype).ok_or_else(|| Error::WeightDtype {
        file: info.file.display().to_string(),
        key: key.to_string(),
        dtype: info.dtype.clone(),
        expected: FLOAT_TYPES.into(),
    })?;
    f.file.seek(SeekFrom::Start(info.start)).map_err(io)?;
    let mut bytes = vec![0u8; info.len as usize];
    f.file.read_exact(&mut bytes).map_err(|e| Error::Io {
        path: f.path.display().to_string(),
        source: io::Error::new(e.kind(), format!("reading tensor `{key}`: {e} (the file changed since its header was read?)")),
    })?;
    Ok(Tensor::f_from_data_size(&bytes, &info.shape, kind)?)
}

fn invalid(path: &Path, message: String) -> Error {
    Error::Io { path: path.display().to_string(), source: io::Error::new(io::ErrorKind::InvalidData, message) }
}

/// Bytes per element of a safetensors dtype.
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Element count of `shape`, `None` on overflow.
fn numel(shape: &[i64]) -> Option<i64> {
    shape.iter().try_fold(1i64, |acc, &d| acc.checked_mul(d))
}

/// Key → tensor from the header of the safetensors file `shard`, every entry checked against
/// the file's length (module docs, step 1).
fn read_header(dir: &ModelDir, shard: &str) -> Result<BTreeMap<String, TensorInfo>> {
    let mut f = dir.open(shard)?;
    let path = f.path.clone();
    let bad = |message: String| invalid(&path, message);
    if f.len < 8 {
        return Err(bad(format!("not a safetensors file ({} bytes, too short for a header)", f.len)));
    }
    let mut len = [0u8; 8];
    f.file.read_exact(&mut len).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || header_len > f.len - 8 {
        return Err(bad(format!(
            "not a safetensors file: header length {header_len} is more than the {} bytes after it or the {MAX_HEADER_BYTES} a header may have",
            f.len - 8
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.file.read_exact(&mut header).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(format!("bad safetensors header: {e}")))?;
    let obj = json.as_object().ok_or_else(|| bad("bad safetensors header: not a JSON object".into()))?;
    let data_start = 8 + header_len;
    let data_len = f.len - data_start;
    let mut table = BTreeMap::new();
    for (key, v) in obj {
        if key == "__metadata__" {
            continue;
        }
        let entry = |what: String| bad(format!("bad safetensors header entry for `{key}`: {what}"));
        let dtype = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| entry("no `dtype` string".into()))?;
        let shape: Vec<i64> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().and_then(|d| i64::try_from(d).ok())).collect())
            .ok_or_else(|| entry("`shape` is not a list of sizes".into()))?;
        let offsets: Vec<u64> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect())
            .filter(|o: &Vec<u64>| o.len() == 2)
            .ok_or_else(|| entry("`data_offsets` is not [begin, end]".into()))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end || end > data_len {
            return Err(entry(format!("data_offsets [{begin}, {end}] are not inside the {data_len} bytes of tensor data")));
        }
        if let Some(size) = dtype_size(dtype) {
            let bytes = numel(&shape).and_then(|n| u64::try_from(n).ok()).and_then(|n| n.checked_mul(size));
            if bytes != Some(end - begin) {
                return Err(entry(format!(
                    "shape {shape:?} of {dtype} needs {} bytes, its data_offsets hold {}",
                    bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
                    end - begin
                )));
            }
        }
        let info = TensorInfo { file: f.path.clone(), shard: shard.to_string(), dtype: dtype.to_string(), shape, start: data_start + begin, len: end - begin };
        table.insert(key.clone(), info);
    }
    Ok(table)
}

/// The tensors of the checkpoint in `dir`, by key, from the file headers only (see
/// [`Checkpoint::open`]). Returns the file that names the checkpoint in errors
/// (`model.safetensors` or the index) and the table.
pub fn checkpoint_tensors(dir: &Path) -> Result<(PathBuf, BTreeMap<String, TensorInfo>)> {
    let c = Checkpoint::open(dir)?;
    Ok((c.index, c.tensors))
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
            let n = count.entry(info.dtype.as_str()).or_default();
            *n = n.saturating_add(numel(&info.shape).unwrap_or(0).max(1));
        }
    }
    count.into_iter().max_by_key(|&(d, n)| (n, d)).and_then(|(d, _)| kind_of_dtype(d)).unwrap_or(Kind::Float)
}

/// Copies the tensors of `table` (from [`checkpoint_tensors`]; `index` is the file it returned)
/// into every variable of `vs` (see [`Checkpoint::load_into`]; `prefixes` as in
/// [`Checkpoint::check`]).
pub fn load_into(vs: &nn::VarStore, index: &Path, table: &BTreeMap<String, TensorInfo>, prefixes: &[&str]) -> Result<()> {
    let dir = ModelDir::new(index.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    let c = Checkpoint { dir, index: index.to_path_buf(), tensors: table.clone(), assigned: BTreeMap::new() };
    c.load_into(vs, prefixes)
}

/// Loads the checkpoint in `dir` into the model `build` makes (module docs): headers, a dry run
/// of `build` checking every weight against them, then `build` on a `VarStore` on `device`
/// whose default kind is `dtype` (`None`: the checkpoint's, see [`checkpoint_kind`]), and the
/// copy. `prefixes`: see [`Checkpoint::check`].
///
/// Errors: those of [`Checkpoint::open`] and [`Checkpoint::check`]; `build`'s own (a bad
/// config); [`Error::Input`] for a `dtype` other than Float, Half, BFloat16 or Double;
/// [`Error::Load`] when allocating the weights fails (out of memory); [`Error::Device`] (from
/// [`check_device`], before the checkpoint is opened) for a device this build or machine lacks.
pub fn load_model<M>(
    dir: &Path,
    device: Device,
    dtype: Option<Kind>,
    prefixes: &[&str],
    build: impl Fn(&nn::Path) -> Result<M>,
) -> Result<M> {
    load_checked(dir, device, dtype, prefixes, false, build)
}

/// [`load_model`] that also refuses checkpoint tensors the model does not take
/// ([`Checkpoint::check_all_used`], [`Error::UnusedWeight`]): the decoder families, whose
/// checkpoints hold exactly their model (BERT checkpoints often carry a pooler or a task head,
/// which [`load_model`] ignores).
pub fn load_model_strict<M>(
    dir: &Path,
    device: Device,
    dtype: Option<Kind>,
    prefixes: &[&str],
    build: impl Fn(&nn::Path) -> Result<M>,
) -> Result<M> {
    load_checked(dir, device, dtype, prefixes, true, build)
}

fn load_checked<M>(
    dir: &Path,
    device: Device,
    dtype: Option<Kind>,
    prefixes: &[&str],
    strict: bool,
    build: impl Fn(&nn::Path) -> Result<M>,
) -> Result<M> {
    load_model_placed(dir, device, dtype, prefixes, strict, build, |_, _| Ok(()))
}

/// [`load_model`] (`strict`: [`load_model_strict`]) with `place(vs, model)` run after the model
/// is built on `device` and before any weight is read: it may move the (still zero) variables
/// to other devices in place (a device map, see [`super::causal::DeviceMap`]); each weight is
/// then copied to its variable's device.
pub(crate) fn load_model_placed<M>(
    dir: &Path,
    device: Device,
    dtype: Option<Kind>,
    prefixes: &[&str],
    strict: bool,
    build: impl Fn(&nn::Path) -> Result<M>,
    place: impl FnOnce(&nn::VarStore, &M) -> Result<()>,
) -> Result<M> {
    check_device(device)?;
    let ckpt = Rc::new(Checkpoint::open(dir)?);
    let kind = match dtype {
        None => ckpt.kind(),
        Some(k @ (Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double)) => k,
        Some(k) => return Err(Error::Input(format!("cannot load weights as {k:?}: use Float, Half, BFloat16 or Double"))),
    };
    let folder = dir.display().to_string();
    let (c, owned) = (Rc::clone(&ckpt), prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>());
    let path = folder.clone();
    let used: Rc<std::cell::RefCell<std::collections::HashSet<String>>> = Rc::default();
    let used_in_check = Rc::clone(&used);
    let check = move |planned: Planned<'_>| -> Result<()> {
        match planned {
            Planned::Weight { name, shape } => {
                let prefixes: Vec<&str> = owned.iter().map(String::as_str).collect();
                let (key, _) = c.check(name, shape, &prefixes)?;
                used_in_check.borrow_mut().insert(key.to_string());
                Ok(())
            }
            Planned::Buffer { name, elements } if elements > c.elements() => Err(Error::Load {
                path: path.clone(),
                message: format!(
                    "`{name}` would hold {elements} numbers, more than the whole checkpoint ({}): check the config's sizes",
                    c.elements()
                ),
            }),
            Planned::Buffer { .. } => Ok(()),
        }
    };
    params::dry_run(&folder, check, &build)?;
    if strict {
        ckpt.check_all_used(&used.borrow())?;
    }
    let mut vs = nn::VarStore::new(device);
    vs.set_kind(kind);
    let model = params::building(&folder, || build(&vs.root()))?;
    place(&vs, &model)?;
    ckpt.load_into(&vs, prefixes)?;
    Ok(model)
}

/// Checks that `device` can hold tensors here, before anything is loaded onto it.
///
/// `Device::Cpu` always can. `Device::Cuda(i)` needs a libtorch with its CUDA part linked
/// (`libtorch_cuda.so`, from `cargo xtask setup --cuda`), an NVIDIA driver that finds a GPU, and
/// `i < tch::Cuda::device_count()`. `Device::Mps` needs a libtorch with MPS (macOS). Otherwise
/// [`Error::Device`] naming the device, what is missing and how to get it; nothing panics.
/// Every loader of this crate calls it first (all models through [`load_model`],
/// `LanguageModel::from_pretrained_on` / `from_parts`, `bundled::minilm_on`).
pub fn check_device(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(i) => {
            let available = tch::Cuda::is_available();
            let count = if available { tch::Cuda::device_count().max(0) as usize } else { 0 };
            if i < count {
                return Ok(());
            }
            let why = if count > 0 {
                format!("this machine has {count} CUDA device(s), Cuda(0) to Cuda({})", count - 1)
            } else if !libtorch_cuda_loaded() {
                "this program's libtorch has no CUDA part (libtorch_cuda.so is not loaded: the \
                 CPU set-up leaves it out); run `cargo xtask setup --cuda` in a clone of nnsight-rs \
                 and rebuild, on a machine with an NVIDIA GPU and driver"
                    .to_string()
            } else {
                "libtorch's CUDA part is loaded but finds no GPU (no NVIDIA driver, no device, or \
                 CUDA_VISIBLE_DEVICES hides them); `nvidia-smi` should list a GPU"
                    .to_string()
            };
            Err(Error::Device(format!("cannot use device Cuda({i}): {why}. Device::Cpu works everywhere")))
        }
        Device::Mps if !tch::utils::has_mps() => Err(Error::Device(
            "cannot use device Mps: this libtorch has no MPS support (macOS only). Device::Cpu works everywhere".into(),
        )),
        Device::Vulkan if !tch::utils::has_vulkan() => Err(Error::Device(
            "cannot use device Vulkan: this libtorch has no Vulkan support. Device::Cpu works everywhere".into(),
        )),
        _ => Ok(()),
    }
}

/// Whether `libtorch_cuda.so` is mapped into this process (Linux: `/proc/self/maps`); false
/// where that cannot be read.
pub fn libtorch_cuda_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|m| m.contains("/libtorch_cuda.so"))
}
