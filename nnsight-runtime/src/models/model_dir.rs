//! The model folder, and the only way loaders open files in it.
//!
//! Checkpoints, configs and tokenizers come from anywhere, so every file a loader reads goes
//! through [`ModelDir`], which opens a file only when:
//!
//! - its name is relative and stays inside the folder (no absolute path, no `..`): a sharded
//!   checkpoint's index names its shards, and could otherwise name `/dev/zero` or `../../x`;
//! - it resolves (symbolic links followed) to a path inside the folder. One exception keeps the
//!   Hugging Face hub cache working: in a snapshot folder `<repo>/snapshots/<revision>/`, files
//!   are links into `<repo>/blobs/`, which is allowed too;
//! - it is a regular file. The type is checked before opening (opening a FIFO for reading
//!   blocks until a writer comes; a device such as `/dev/zero` never ends), and again on the
//!   opened file, which is opened non-blocking so a file swapped in between cannot block either;
//! - for text files ([`ModelDir::read_text`]), it is no larger than a bound.
//!
//! Every refusal is an [`Error::Io`] naming the path and what it is (a directory, a FIFO, a
//! device, a symlink loop, outside the folder).

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// A model folder whose files can be opened safely (see the module docs).
#[derive(Clone, Debug)]
pub struct ModelDir {
    /// The folder as given (used in messages).
    dir: PathBuf,
    /// Canonical folders files may resolve into: the folder itself, and a hub cache's `blobs/`.
    roots: Vec<PathBuf>,
}

/// A regular file of a [`ModelDir`], opened for reading.
#[derive(Debug)]
pub struct ModelFile {
    /// The folder joined with the file's name (for messages).
    pub path: PathBuf,
    /// The open file.
    pub file: File,
    /// Its length in bytes.
    pub len: u64,
}

impl ModelDir {
    /// The folder `dir`: [`Error::Io`] unless it is an existing folder (symbolic links followed).
    pub fn new(dir: &Path) -> Result<ModelDir> {
        let io = |kind: io::ErrorKind, message: String| Error::Io { path: dir.display().to_string(), source: io::Error::new(kind, message) };
        let canonical = std::fs::canonicalize(dir).map_err(|e| io(e.kind(), format!("model folder not found ({})", describe_os_error(&e))))?;
        let meta = std::fs::metadata(&canonical).map_err(|e| io(e.kind(), e.to_string()))?;
        if meta.is_file() {
            return Err(io(io::ErrorKind::InvalidInput, "is a file, expected a model folder (the folder that holds config.json)".into()));
        }
        if !meta.is_dir() {
            return Err(io(io::ErrorKind::InvalidInput, format!("{}, expected a model folder", file_type(&meta))));
        }
        let mut roots = vec![canonical.clone()];
        // Hugging Face hub cache: `<repo>/snapshots/<revision>/<file>` links to `<repo>/blobs/<hash>`.
        if let Some(repo) = canonical.parent().filter(|s| s.file_name().is_some_and(|n| n == "snapshots")).and_then(Path::parent) {
            roots.push(repo.join("blobs"));
        }
        Ok(ModelDir { dir: dir.to_path_buf(), roots })
    }

    /// The folder as given.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The folder joined with `name` (no checks: for messages and for [`ModelDir::exists`]).
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether the folder has an entry `name` of any kind (a directory, a FIFO, a dangling or
    /// looping link count too, so that opening it reports what it is instead of "not found").
    pub fn exists(&self, name: &str) -> bool {
        std::fs::symlink_metadata(self.join(name)).is_ok()
    }

    /// Opens the regular file `name` inside the folder, after the checks of the module docs.
    pub fn open(&self, name: &str) -> Result<ModelFile> {
        let path = self.join(name);
        let err = |kind: io::ErrorKind, message: String| Error::Io { path: path.display().to_string(), source: io::Error::new(kind, message) };
        check_name(name).map_err(|m| err(io::ErrorKind::InvalidInput, m))?;
        let canonical = std::fs::canonicalize(&path).map_err(|e| err(e.kind(), describe_os_error(&e)))?;
        if !self.roots.iter().any(|r| canonical.starts_with(r)) {
            return Err(err(
                io::ErrorKind::PermissionDenied,
                format!(
                    "resolves to `{}`, outside the model folder; only files inside it are read (link or copy the whole folder instead)",
                    canonical.display()
                ),
            ));
        }
        let meta = std::fs::metadata(&canonical).map_err(|e| err(e.kind(), describe_os_error(&e)))?;
        if !meta.is_file() {
            return Err(err(io::ErrorKind::InvalidInput, format!("{}, expected a regular file", file_type(&meta))));
        }
        let file = open_nonblocking(&canonical).map_err(|e| err(e.kind(), describe_os_error(&e)))?;
        let meta = file.metadata().map_err(|e| err(e.kind(), e.to_string()))?;
        if !meta.is_file() {
            return Err(err(io::ErrorKind::InvalidInput, format!("{}, expected a regular file", file_type(&meta))));
        }
        Ok(ModelFile { path, file, len: meta.len() })
    }

    /// The text of the file `name` (opened by [`ModelDir::open`]); [`Error::Io`] when it is
    /// larger than `max_len` bytes or not UTF-8.
    pub fn read_text(&self, name: &str, max_len: u64) -> Result<String> {
        let f = self.open(name)?;
        let err = |kind: io::ErrorKind, message: String| Error::Io { path: f.path.display().to_string(), source: io::Error::new(kind, message) };
        if f.len > max_len {
            return Err(err(io::ErrorKind::InvalidData, format!("{} bytes, more than the {max_len} a file of this kind may have", f.len)));
        }
        let mut text = String::new();
        // `take`: a file that grew since it was measured is still read only up to the bound.
        (&f.file).take(max_len + 1).read_to_string(&mut text).map_err(|e| err(e.kind(), e.to_string()))?;
        if text.len() as u64 > max_len {
            return Err(err(io::ErrorKind::InvalidData, format!("more than the {max_len} bytes a file of this kind may have")));
        }
        Ok(text)
    }
}

/// `Err(message)` unless `name` is a relative path of ordinary components (no `..`, no root).
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let p = Path::new(name);
    if name.is_empty() {
        return Err("an empty file name".into());
    }
    if p.is_absolute() || p.has_root() {
        return Err(format!("`{name}` is an absolute path; only files inside the model folder are read"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir | Component::Prefix(_) | Component::RootDir)) {
        return Err(format!("`{name}` leaves the model folder (`..`); only files inside it are read"));
    }
    Ok(())
}

/// "a directory", "a FIFO (named pipe)", ...
fn file_type(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "is a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "is a FIFO (named pipe)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "is a device";
        }
        if t.is_socket() {
            return "is a socket";
        }
    }
    "is not a regular file"
}

/// The OS error with a plainer word for the cases a user meets here.
fn describe_os_error(e: &io::Error) -> String {
    #[cfg(unix)]
    if e.raw_os_error() == Some(libc::ELOOP) {
        return "a symbolic link loop (too many levels of symbolic links)".into();
    }
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or folder".into(),
        _ => e.to_string(),
    }
}

/// Opens for reading without blocking on a FIFO (the file type is checked right after).
fn open_nonblocking(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NONBLOCK);
    }
    o.open(path)
}
