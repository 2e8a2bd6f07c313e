//! The links `<repo>/.nnsight/<name>` -> `<cache>/<tree>` that `.cargo/config.toml` points
//! `LIBTORCH`, `LD_LIBRARY_PATH` and `NNSIGHT_MINILM_DIR` at.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Makes `link` a symbolic link to `target`, replacing an existing link atomically (a new link
/// is created next to it and renamed over it). Refuses to replace a real file or folder.
/// Returns false when the link already pointed at `target`.
pub fn point(link: &Path, target: &Path) -> Result<bool> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(false);
    }
    if let Ok(meta) = fs::symlink_metadata(link) {
        if !meta.file_type().is_symlink() {
            bail!(
                "{} is a real {}, not a link; move it away so setup can link it to {}",
                link.display(),
                if meta.is_dir() { "folder" } else { "file" },
                target.display()
            );
        }
    }
    let dir = link.parent().expect("link has a parent");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = link.file_name().expect("link has a name").to_string_lossy();
    let fresh = dir.join(format!(".{name}.new"));
    let _ = fs::remove_file(&fresh);
    symlink(target, &fresh).with_context(|| format!("cannot create link {}", fresh.display()))?;
    fs::rename(&fresh, link).with_context(|| format!("cannot replace {}", link.display()))?;
    Ok(true)
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "setup supports Linux only",
    ))
}
