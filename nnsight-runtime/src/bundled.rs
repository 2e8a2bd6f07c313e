//! Where the set-up puts what it downloads, and the bundled model: all-MiniLM-L6-v2.
//!
//! The set-up command downloads libtorch and the all-MiniLM-L6-v2 sentence encoder (a 6-layer
//! BERT, hidden size 384) once per machine into a cache folder shared by every project:
//!
//! 1. `$NNSIGHT_CACHE`, if set;
//! 2. else `$XDG_CACHE_HOME/nnsight-rs`;
//! 3. else `$HOME/.cache/nnsight-rs`.
//!
//! [`minilm_dir`] finds the model: the folder named by `$NNSIGHT_MINILM_DIR` if that variable is
//! set, else `<cache>/all-MiniLM-L6-v2`. [`minilm`] loads it. When it is not there, the error
//! ([`Error::Setup`]) says where it looked and which command provides it; nothing panics.
//!
//! ```no_run
//! # use nnsight_runtime as nnsight;
//! let model = nnsight::bundled::minilm()?;   // LanguageModel<Bert>, on the CPU
//! # Ok::<(), nnsight::Error>(())
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::language_model::LanguageModel;
use crate::models::bert::Bert;

/// The command that fills the cache, named in every error of this module (run in a clone of
/// nnsight-rs; the cache it fills is shared by every project on the machine).
pub const SETUP_COMMAND: &str = "cargo xtask setup";

/// Folder name of the model inside the cache.
pub const MINILM_DIR_NAME: &str = "all-MiniLM-L6-v2";

/// Files a complete model folder has (the set-up checks them all; these are what loading reads).
const MINILM_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// The cache folder the set-up downloads into (see the module docs for the rule), whether or not
/// it exists yet. [`Error::Setup`] when none of `NNSIGHT_CACHE`, `XDG_CACHE_HOME`, `HOME` is set.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("NNSIGHT_CACHE") {
        return Ok(d);
    }
    if let Some(x) = var("XDG_CACHE_HOME") {
        return Ok(x.join("nnsight-rs"));
    }
    if let Some(h) = var("HOME") {
        return Ok(h.join(".cache").join("nnsight-rs"));
    }
    Err(Error::Setup(
        "cannot choose the set-up cache folder: none of NNSIGHT_CACHE, XDG_CACHE_HOME, HOME is set".into(),
    ))
}

/// The all-MiniLM-L6-v2 folder: `$NNSIGHT_MINILM_DIR` if set, else `<cache>/all-MiniLM-L6-v2`.
///
/// Errors ([`Error::Setup`]): the folder named by the variable, or the cache's folder when the
/// variable is unset, lacks one of `config.json`, `model.safetensors`, `tokenizer.json`; the
/// message names the folder, the file and the command that downloads the model.
pub fn minilm_dir() -> Result<PathBuf> {
    match std::env::var_os("NNSIGHT_MINILM_DIR").filter(|v| !v.is_empty()) {
        Some(d) => {
            let d = PathBuf::from(d);
            check_minilm(&d).map_err(|missing| {
                Error::Setup(format!(
                    "NNSIGHT_MINILM_DIR={} does not hold all-MiniLM-L6-v2 ({missing}); point it at the folder \
                     `{SETUP_COMMAND}` made ({}), or unset it to use that folder",
                    d.display(),
                    cache_dir().map(|c| c.join(MINILM_DIR_NAME).display().to_string()).unwrap_or_else(|_| "<cache>/all-MiniLM-L6-v2".into())
                ))
            })?;
            Ok(d)
        }
        None => {
            let d = cache_dir()?.join(MINILM_DIR_NAME);
            check_minilm(&d).map_err(|missing| {
                Error::Setup(format!(
                    "the bundled model all-MiniLM-L6-v2 is not set up: {missing} (NNSIGHT_MINILM_DIR is unset, so it \
                     was looked for in the set-up cache); run `{SETUP_COMMAND}` in a clone of nnsight-rs to download it \
                     into that cache (once per machine)"
                ))
            })?;
            Ok(d)
        }
    }
}

/// `Err(what is missing)` unless `dir` has every file of [`MINILM_FILES`].
fn check_minilm(dir: &Path) -> std::result::Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("{} does not exist", dir.display()));
    }
    match MINILM_FILES.iter().find(|f| !dir.join(f).is_file()) {
        Some(f) => Err(format!("{} has no {f}", dir.display())),
        None => Ok(()),
    }
}

/// The bundled all-MiniLM-L6-v2 with its tokenizer, on the CPU in f32: [`minilm_dir`], then
/// [`LanguageModel::from_pretrained`]. Errors: [`Error::Setup`] when the model is not there,
/// else those of loading.
pub fn minilm() -> Result<LanguageModel<Bert>> {
    LanguageModel::from_pretrained(minilm_dir()?)
}

/// [`minilm`] with the weights (f32) and token tensors on `device`. [`Error::Device`] for a
/// device this build or machine cannot use (e.g. `Device::Cuda(0)` without
/// `cargo xtask setup --cuda` or without a GPU), checked before the model folder is looked for.
pub fn minilm_on(device: tch::Device) -> Result<LanguageModel<Bert>> {
    crate::models::checkpoint::check_device(device)?;
    LanguageModel::from_pretrained_on(minilm_dir()?, device)
}
