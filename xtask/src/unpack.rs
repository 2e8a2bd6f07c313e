//! Unpacking wheels into a tree in the cache, and recognising a finished tree later.
//!
//! A tree is built in `<cache>/.tmp-<tree>`, checked, given a marker file (`.complete`: format,
//! tree, version and every file with its size) and only then renamed to `<cache>/<tree>`. A tree
//! counts as set up when its marker is there and every listed file still has the listed size,
//! so an interrupted run can never leave something that looks finished.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use zip::ZipArchive;

use crate::spec::{Tree, Wheel};

/// Name of the marker file inside a finished tree.
pub const MARKER: &str = ".complete";
/// First line of every marker; bump it when the layout in `spec.rs` changes so old trees are
/// rebuilt.
const MARKER_HEADER: &str = "nnsight-rs setup marker, format 1";
/// Prefix of the folders a tree is unpacked into before it is complete.
pub const TMP_PREFIX: &str = ".tmp-";
/// Prefix of an old tree moved aside while a new one takes its place.
pub const OLD_PREFIX: &str = ".old-";

/// Checks the tree in `dir` against its marker. `Ok(n)`: complete, with `n` files.
/// `Err`: why it is not (missing, unfinished, other version, a file missing or changed).
pub fn verify(dir: &Path, tree: &Tree) -> Result<usize> {
    let marker = dir.join(MARKER);
    let text = match fs::read_to_string(&marker) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir.exists() {
                bail!("{} has no {MARKER} marker (unfinished)", dir.display());
            }
            bail!("{} does not exist", dir.display());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", marker.display())),
    };
    let mut lines = text.lines();
    ensure!(
        lines.next() == Some(MARKER_HEADER),
        "{} is from another version of setup",
        marker.display()
    );
    ensure!(
        lines.next() == Some(&*format!("tree {}", tree.dir_name)),
        "{} belongs to another tree",
        marker.display()
    );
    let want_version = format!("version {}", tree.version);
    ensure!(
        lines.next() == Some(&*want_version),
        "{} is not {}",
        dir.display(),
        tree.version
    );

    let mut sizes = HashMap::new();
    for line in lines {
        let (size, rel) = line
            .strip_prefix("file ")
            .and_then(|rest| rest.split_once(' '))
            .and_then(|(size, rel)| Some((size.parse::<u64>().ok()?, rel)))
            .with_context(|| format!("{} has a bad line: {line:?}", marker.display()))?;
        let path = dir.join(rel);
        let actual = fs::metadata(&path).map(|m| m.len()).ok();
        ensure!(
            actual == Some(size),
            "{} is missing or changed",
            path.display()
        );
        sizes.insert(rel, size);
    }
    for rel in tree.required {
        ensure!(
            sizes.get(rel).is_some_and(|s| *s > 0),
            "{} lacks {rel}",
            dir.display()
        );
    }
    if let Some(v) = &tree.version_file {
        let written = fs::read_to_string(dir.join(v.write_to)).unwrap_or_default();
        ensure!(
            written.trim() == tree.version,
            "{}/{} is not {}",
            dir.display(),
            v.write_to,
            tree.version
        );
    }
    Ok(sizes.len())
}

/// One file or folder to copy out of a wheel.
struct Entry {
    archive: usize,
    index: usize,
    /// Path inside the tree, `/`-separated.
    dest: String,
    size: u64,
    is_dir: bool,
}

/// Unpacks `tree` from `wheels` (requirement -> wheel file) into `<cache>/<tree.dir_name>`,
/// replacing whatever unfinished tree was there. Returns the tree's path.
pub fn build(
    cache: &Path,
    tree: &Tree,
    wheels: &HashMap<&'static str, PathBuf>,
) -> Result<PathBuf> {
    let dest = cache.join(tree.dir_name);
    let tmp = cache.join(format!("{TMP_PREFIX}{}", tree.dir_name));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }

    // Open every wheel once and work out what to copy before writing anything.
    let used = tree.wheels();
    let mut archives = Vec::new();
    for w in &used {
        let path = &wheels[w.requirement];
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let archive = ZipArchive::new(file)
            .with_context(|| format!("{} is not a readable zip", path.display()))?;
        archives.push((path.clone(), archive));
    }
    let archive_of = |w: &Wheel| {
        used.iter()
            .position(|u| u.requirement == w.requirement)
            .unwrap()
    };

    let mut entries = Vec::new();
    for pick in tree.picks {
        let a = archive_of(pick.wheel);
        let (path, archive) = &mut archives[a];
        let mut found = Vec::new();
        for index in 0..archive.len() {
            let file = archive.by_index_raw(index)?;
            let Some(rest) = file.name().strip_prefix(pick.from) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            if let Some(only) = pick.only {
                if !only.contains(&rest) {
                    continue;
                }
            }
            ensure!(
                file.enclosed_name().is_some() && is_plain_relative(rest),
                "{} has an unsafe member name {:?}",
                path.display(),
                file.name()
            );
            found.push(rest.trim_end_matches('/').to_string());
            entries.push(Entry {
                archive: a,
                index,
                dest: format!("{}{}", pick.to, rest.trim_end_matches('/')),
                size: file.size(),
                is_dir: file.is_dir(),
            });
        }
        match pick.only {
            Some(only) => {
                for name in only {
                    ensure!(
                        found.iter().any(|f| f == name),
                        "wheel {} lacks {}{name}",
                        path.display(),
                        pick.from
                    );
                }
            }
            None => ensure!(
                !found.is_empty(),
                "wheel {} lacks the folder {}",
                path.display(),
                pick.from
            ),
        }
    }

    // The version, checked before the (slow) unpacking.
    let version_file = match &tree.version_file {
        Some(v) => {
            let (path, archive) = &mut archives[archive_of(v.wheel)];
            let mut text = String::new();
            archive
                .by_name(v.member)
                .with_context(|| format!("wheel {} lacks {}", path.display(), v.member))?
                .read_to_string(&mut text)?;
            let found = python_version(&text)
                .with_context(|| format!("no __version__ in {} of {}", v.member, path.display()))?;
            let plus = format!("{}+", tree.version);
            ensure!(
                found == tree.version || found.starts_with(&plus),
                "{} is version {found}, expected {}",
                path.display(),
                tree.version
            );
            Some((v.write_to, found))
        }
        None => None,
    };

    let files = entries.iter().filter(|e| !e.is_dir).count();
    let total: u64 = entries.iter().map(|e| e.size).sum();
    println!(
        "{}: unpacking {files} files ({}) into {}",
        tree.title,
        HumanBytes(total),
        dest.display()
    );
    let bar = ProgressBar::new(total)
        .with_message(tree.dir_name)
        .with_style(
            ProgressStyle::with_template("{msg} [{wide_bar}] {bytes}/{total_bytes} {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );

    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut listed = BTreeMap::new();
    for e in &entries {
        let out = tmp.join(&e.dest);
        if e.is_dir {
            fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let (path, archive) = &mut archives[e.archive];
        let member = archive.by_index(e.index)?;
        let mut writer =
            File::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
        // Reading to the end also checks the member's CRC.
        let written = io::copy(&mut bar.wrap_read(member), &mut writer)
            .with_context(|| format!("cannot unpack {} from {}", e.dest, path.display()))?;
        ensure!(
            written == e.size,
            "{} unpacked to {written} bytes, expected {}",
            e.dest,
            e.size
        );
        listed.insert(e.dest.clone(), written);
    }
    bar.finish_and_clear();

    if let Some((write_to, found)) = version_file {
        println!("{}: wheel version {found}", tree.title);
        let text = format!("{}\n", tree.version);
        fs::write(tmp.join(write_to), &text)?;
        listed.insert(write_to.to_string(), text.len() as u64);
    }

    for rel in tree.required {
        let size = fs::metadata(tmp.join(rel)).map(|m| m.len()).unwrap_or(0);
        ensure!(
            size > 0 && listed.contains_key(*rel),
            "unpacked {} lacks {rel} (or it is empty)",
            tree.title
        );
    }

    // The marker goes in last: its presence means everything above succeeded.
    let mut marker = format!(
        "{MARKER_HEADER}\ntree {}\nversion {}\n",
        tree.dir_name, tree.version
    );
    for (rel, size) in &listed {
        marker.push_str(&format!("file {size} {rel}\n"));
    }
    let mut f = File::create(tmp.join(MARKER))?;
    f.write_all(marker.as_bytes())?;
    f.sync_all()?;
    verify(&tmp, tree).context("freshly unpacked tree failed verification")?;

    // Swap into place: an old or unfinished tree is moved aside first (rename cannot replace a
    // non-empty folder), then the finished one is renamed in.
    if fs::symlink_metadata(&dest).is_ok() {
        let old = cache.join(format!("{OLD_PREFIX}{}", tree.dir_name));
        if old.exists() {
            fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
        fs::rename(&dest, &old).with_context(|| format!("cannot move {} aside", dest.display()))?;
        fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    fs::rename(&tmp, &dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    let n = verify(&dest, tree)?;
    println!("{}: ready, {n} files in {}", tree.title, dest.display());
    Ok(dest)
}

/// The value of `__version__ = '...'` in a Python file.
fn python_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("__version__"))?;
    let value = line.split_once('=')?.1.trim();
    let value = value.trim_matches(|c| c == '\'' || c == '"');
    (!value.is_empty()).then(|| value.to_string())
}

/// True when `rel` is a relative path made only of plain names (no `..`, no root).
fn is_plain_relative(rel: &str) -> bool {
    Path::new(rel)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
}
