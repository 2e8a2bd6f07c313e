//! Reading an SAE folder, which may come from anywhere: SAELens (`cfg.json` +
//! `sae_weights.safetensors`) or Gemma Scope (`params.npz`).
//!
//! As for model checkpoints ([`crate::models::checkpoint`]), files are opened through
//! [`ModelDir`] (regular files inside the folder only), the config is checked first, and every
//! weight's shape and dtype is compared with what the config implies, from the file headers,
//! before any weight is read. Errors name the file and the key.

use std::io::{self, BufReader};
use std::path::Path;

use npyz::npz::NpzArchive;
use npyz::{DType, Order};
use tch::{Device, Kind, Tensor};

use super::config::{Architecture, Normalization, SaeConfig, MAX_CFG_BYTES};
use super::{Sae, SaeWeights};
use crate::error::{Error, Result};
use crate::hook::Hooked;
use crate::models::checkpoint::Checkpoint;
use crate::models::ModelDir;

const CFG: &str = "cfg.json";
const WEIGHTS: &str = "sae_weights.safetensors";
const NPZ: &str = "params.npz";
/// A deflated zip entry is at most ~1032 times smaller than its data; a larger claim is a lie.
const MAX_DEFLATE_RATIO: u64 = 1100;

impl Sae {
    /// Loads the SAE in the folder `dir`, whichever its format: SAELens if it has `cfg.json`,
    /// else Gemma Scope if it has `params.npz` (`dir` may also be the `.npz` file itself).
    /// Weights are loaded as f32 on `device`.
    ///
    /// Errors: those of [`Sae::from_saelens`] and [`Sae::from_gemma_scope`]; [`Error::Io`]
    /// naming the folder when it has neither file.
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Hooked<Sae>> {
        let dir = dir.as_ref();
        if dir.extension().is_some_and(|e| e == "npz") {
            return Sae::from_gemma_scope(dir, device);
        }
        let folder = ModelDir::new(dir)?;
        if folder.exists(CFG) {
            Sae::from_saelens(dir, device)
        } else if folder.exists(NPZ) {
            Sae::from_gemma_scope(dir, device)
        } else {
            Err(Error::Io {
                path: dir.display().to_string(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("not an SAE folder: no `{CFG}` (SAELens) and no `{NPZ}` (Gemma Scope)"),
                ),
            })
        }
    }

    /// Loads a SAELens folder: `cfg.json` (see [`SaeConfig::from_saelens_json`]) and
    /// `sae_weights.safetensors` with `W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
    /// `W_dec [d_sae, d_in]`, `b_dec [d_in]` and, for JumpReLU, `threshold [d_sae]`. Weights are
    /// converted to f32 on `device`.
    ///
    /// Errors, each naming the file (and key): [`Error::Io`] (missing folder or file, a file
    /// that is not a regular file inside the folder, a bad safetensors header),
    /// [`Error::Config`] (see [`SaeConfig::from_saelens_json`]), [`Error::MissingWeight`],
    /// [`Error::WeightShape`] (a shape other than the config implies, found from the header
    /// before anything is read), [`Error::WeightDtype`] (not a float tensor),
    /// [`Error::UnusedWeight`] (a tensor the config does not use, e.g. a `threshold` in a
    /// standard SAE), [`Error::Input`] (a weight holding NaN or infinite values).
    pub fn from_saelens(dir: impl AsRef<Path>, device: Device) -> Result<Hooked<Sae>> {
        let dir = dir.as_ref();
        let folder = ModelDir::new(dir)?;
        let text = folder.read_text(CFG, MAX_CFG_BYTES)?;
        let config = SaeConfig::from_saelens_json(&text, &folder.join(CFG))?;
        let ckpt = Checkpoint::open_file(&folder.join(WEIGHTS))?;
        let shapes = config.weight_shapes();
        for (key, shape) in &shapes {
            ckpt.check(key, shape, &[])?;
        }
        // A tensor the config does not use (a `threshold` beside `"architecture": "standard"`)
        // would load and compute another SAE than the file's.
        ckpt.check_all_used(&shapes.iter().map(|(k, _)| k.to_string()).collect())?;
        let mut read = shapes.iter().map(|(key, shape)| ckpt.read(key, shape));
        let mut next = || read.next().expect("one tensor per shape");
        let w = SaeWeights {
            w_enc: next()?,
            b_enc: next()?,
            w_dec: next()?,
            b_dec: next()?,
            threshold: if config.architecture == Architecture::JumpRelu { Some(next()?) } else { None },
        };
        Sae::from_weights(config, w, Kind::Float, device)
    }

    /// Loads a Gemma Scope SAE: `params.npz` in the folder `path` (or the `.npz` file `path`)
    /// with `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]`,
    /// `threshold [d_sae]`, each a float32 or float64 array in C order. A JumpReLU SAE without
    /// input normalization and without `b_dec` subtracted from the input (Gemma Scope's
    /// reference code; SAELens loads it so). Weights are converted to f32 on `device`.
    ///
    /// Every array's header is read and checked (shape consistent with `W_enc`'s, dtype, size
    /// within its zip entry) before any data is read. Errors, naming the file and the key:
    /// [`Error::Io`] (missing file, not a zip, a bad `.npy` header, a size the entry cannot
    /// hold), [`Error::MissingWeight`], [`Error::WeightShape`], [`Error::WeightDtype`].
    pub fn from_gemma_scope(path: impl AsRef<Path>, device: Device) -> Result<Hooked<Sae>> {
        let path = path.as_ref();
        let (dir, name) = match path.extension().is_some_and(|e| e == "npz") {
            true => (
                path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")),
                path.file_name().and_then(|n| n.to_str()).unwrap_or(NPZ),
            ),
            false => (path, NPZ),
        };
        let folder = ModelDir::new(dir)?;
        let file = folder.open(name)?;
        let shown = file.path.display().to_string();
        let io_err = |e: io::Error| Error::Io { path: shown.clone(), source: e };
        let mut npz = NpzArchive::new(BufReader::new(file.file)).map_err(|e| io_err(annotate(e, "not a .npz (zip) archive")))?;
        let w_enc_shape = array_shape(&mut npz, "W_enc", &shown)?;
        let (d_in, d_sae) = match w_enc_shape[..] {
            [d_in, d_sae] if d_in > 0 && d_sae > 0 => (d_in, d_sae),
            _ => {
                return Err(Error::WeightShape { file: shown, key: "W_enc".into(), expected: vec![-1, -1], actual: w_enc_shape });
            }
        };
        let config = SaeConfig {
            d_in,
            d_sae,
            architecture: Architecture::JumpRelu,
            apply_b_dec_to_input: false,
            normalize_activations: Normalization::None,
            hook_name: None,
            model_name: None,
        };
        let shapes = config.weight_shapes();
        for (key, shape) in &shapes {
            let actual = array_shape(&mut npz, key, &shown)?;
            if &actual != shape {
                return Err(Error::WeightShape { file: shown, key: key.to_string(), expected: shape.clone(), actual });
            }
        }
        let mut read = |key: &str| read_array(&mut npz, key, &shown);
        let w = SaeWeights {
            w_enc: read("W_enc")?,
            b_enc: read("b_enc")?,
            w_dec: read("W_dec")?,
            b_dec: read("b_dec")?,
            threshold: Some(read("threshold")?),
        };
        Sae::from_weights(config, w, Kind::Float, device)
    }
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Element size of the float dtypes read from `.npy` (`<f4`, `>f8`, ...).
fn float_size(dtype: &DType) -> Option<u64> {
    match dtype {
        DType::Plain(t) => match t.to_string().as_str() {
            "<f4" | ">f4" => Some(4),
            "<f8" | ">f8" => Some(8),
            _ => None,
        },
        _ => None,
    }
}

/// The shape of array `key` from its `.npy` header, after checking its dtype, order and that
/// its data fits in its zip entry.
fn array_shape<R: io::Read + io::Seek>(npz: &mut NpzArchive<R>, key: &str, file: &str) -> Result<Vec<i64>> {
    let entry = format!("{key}.npy");
    let io_err = |e: io::Error| Error::Io { path: file.to_string(), source: annotate(e, &format!("array `{key}`")) };
    let (size, compressed) = match npz.zip_archive().by_name(&entry) {
        Ok(f) => (f.size(), f.compressed_size()),
        Err(zip::result::ZipError::FileNotFound) => return Err(Error::MissingWeight { file: file.into(), key: key.into() }),
        Err(e) => return Err(io_err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))),
    };
    let npy = npz.by_name(key).map_err(io_err)?.ok_or_else(|| Error::MissingWeight { file: file.into(), key: key.into() })?;
    let dtype = npy.dtype();
    let Some(elem) = float_size(&dtype) else {
        return Err(Error::WeightDtype {
            file: file.into(),
            key: key.into(),
            dtype: dtype.descr(),
            expected: "float32 or float64 ('<f4', '<f8')".into(),
        });
    };
    if npy.order() != Order::C {
        return Err(io_err(io::Error::new(io::ErrorKind::InvalidData, "stored in Fortran order; save it in C order".to_string())));
    }
    let shape: Option<Vec<i64>> = npy.shape().iter().map(|&d| i64::try_from(d).ok()).collect();
    let bytes = npy.shape().iter().try_fold(elem, |acc, &d| acc.checked_mul(d));
    match (shape, bytes) {
        (Some(shape), Some(bytes)) if bytes <= size && size <= compressed.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(4096) => Ok(shape),
        _ => Err(io_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("its header's shape {:?} needs more data than its zip entry of {size} bytes holds", npy.shape()),
        ))),
    }
}

/// Array `key` (already checked by [`array_shape`]) as an f32 or f64 tensor on the CPU.
fn read_array<R: io::Read + io::Seek>(npz: &mut NpzArchive<R>, key: &str, file: &str) -> Result<Tensor> {
    let io_err = |e: io::Error| Error::Io { path: file.to_string(), source: annotate(e, &format!("reading array `{key}`")) };
    let npy = npz.by_name(key).map_err(io_err)?.ok_or_else(|| Error::MissingWeight { file: file.into(), key: key.into() })?;
    let shape: Vec<i64> = npy.shape().iter().map(|&d| d as i64).collect();
    let t = if float_size(&npy.dtype()) == Some(4) {
        Tensor::from_slice(&npy.into_vec::<f32>().map_err(io_err)?)
    } else {
        Tensor::from_slice(&npy.into_vec::<f64>().map_err(io_err)?)
    };
    Ok(t.f_reshape(&shape)?)
}
