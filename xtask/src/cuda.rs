//! `cargo xtask setup --cuda`: libtorch 2.13.0 with its CUDA part.
//!
//! The CPU set-up keeps only the CPU libraries of the `torch` wheel. This one keeps every shared
//! library of `torch/lib/` (`libtorch_cuda.so`, `libc10_cuda.so`, ... but not
//! `libtorch_python.so`) and adds the CUDA libraries those need, taken from the wheels the torch
//! wheel itself requires. Which wheels is read from the torch wheel's `METADATA`
//! (`Requires-Dist`), not written down here: every requirement named `nvidia-*` or
//! `cuda-toolkit` (with its extras) whose environment marker holds on x86_64 Linux with
//! Python 3.11, then, the same way, the requirements of those wheels, until nothing new comes.
//! Each is downloaded with `pip download --no-deps` (pip picks the version the requirement
//! allows) into `<cache>/wheels/`, and every `*.so*` directly inside a `nvidia/<x>/lib/` folder of
//! it is copied into the tree's `lib/` (all in one folder: `libtorch_cuda.so` has `$ORIGIN` in
//! its RPATH).
//!
//! The tree is `<cache>/libtorch-2.13.0-cuda`, apart from the CPU tree `<cache>/libtorch-2.13.0`;
//! `setup --cuda` points `.nnsight/libtorch` at it, a later plain `setup` points it back.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::spec::{Pick, Tree, VersionFile, Wheel, LIBTORCH_VERSION, TORCH};
use crate::wheels::{self, Python};

/// Folder of the CUDA libtorch inside the cache.
pub const DIR_NAME: &str = "libtorch-2.13.0-cuda";

/// Platform tags handed to pip for the nvidia wheels (pip takes any wheel built for one of them;
/// pip 23 does not widen a `--platform` to older glibc versions itself, and e.g.
/// `nvidia-nccl-cu13 2.29.7` is tagged `manylinux_2_18` only).
pub const CUDA_PLATFORMS: &[&str] = &[
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_26_x86_64",
    "manylinux_2_25_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_23_x86_64",
    "manylinux_2_22_x86_64",
    "manylinux_2_21_x86_64",
    "manylinux_2_20_x86_64",
    "manylinux_2_19_x86_64",
    "manylinux_2_18_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
];

/// Files the CUDA tree must have (besides whatever the wheels bring).
const REQUIRED: &[&str] = &[
    "build-version",
    "lib/libc10.so",
    "lib/libtorch_cpu.so",
    "lib/libtorch.so",
    "lib/libtorch_cuda.so",
    "lib/libc10_cuda.so",
    "lib/libcudart.so.13",
    "include/ATen/ATen.h",
    "include/torch/csrc/api/include/torch/torch.h",
];

/// The CUDA tree as far as [`crate::unpack::verify`] needs it (marker, version, required
/// files); the picks, known only after reading the wheels, are made by [`tree_for`].
pub static CUDA_TREE: Tree = Tree {
    title: "libtorch 2.13.0 (CUDA)",
    dir_name: DIR_NAME,
    link_name: "libtorch",
    version: LIBTORCH_VERSION,
    picks: &[],
    version_file: Some(VersionFile {
        wheel: &TORCH,
        member: "torch/version.py",
        write_to: "build-version",
    }),
    required: REQUIRED,
};

/// One `Requires-Dist` line: `name[extras] spec ; marker`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    /// Normalized name (lower case, runs of `-_.` as `-`).
    pub name: String,
    /// Extras asked for (normalized).
    pub extras: Vec<String>,
    /// Version specifier without spaces, e.g. `==13.1.1.3.*` or `<14,>=13.0.88`; may be empty.
    pub spec: String,
    /// The environment marker, if any.
    pub marker: Option<String>,
}

impl Requirement {
    /// What is handed to `pip download` (extras left out: --no-deps ignores them).
    pub fn pip_spec(&self) -> String {
        format!("{}{}", self.name, self.spec)
    }
}

/// Lower case, runs of `-`, `_`, `.` as one `-` (PEP 503).
pub fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut sep = false;
    for c in name.trim().chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Parses a requirement (PEP 508, without URLs): `name`, `name[a,b]`, `name==1.*`,
/// `name (>=1,<2)`, each optionally followed by `; marker`.
pub fn parse_requirement(text: &str) -> Result<Requirement> {
    let (body, marker) = match text.split_once(';') {
        Some((b, m)) => (
            b.trim(),
            Some(m.trim().to_string()).filter(|m| !m.is_empty()),
        ),
        None => (text.trim(), None),
    };
    let end = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(body.len());
    let name = &body[..end];
    if name.is_empty() {
        bail!("requirement {text:?} has no name");
    }
    let mut rest = body[end..].trim_start();
    let mut extras = Vec::new();
    if let Some(r) = rest.strip_prefix('[') {
        let (inside, after) = r
            .split_once(']')
            .with_context(|| format!("requirement {text:?}: unclosed `[`"))?;
        extras = inside
            .split(',')
            .map(normalize)
            .filter(|e| !e.is_empty())
            .collect();
        rest = after.trim_start();
    }
    if rest.starts_with('@') {
        bail!("requirement {text:?} is a direct URL, which setup does not follow");
    }
    let spec = rest
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    Ok(Requirement {
        name: normalize(name),
        extras,
        spec,
        marker,
    })
}

/// The `Requires-Dist` values of a wheel's `METADATA`.
pub fn requires_dist(metadata: &str) -> Vec<&str> {
    metadata
        .lines()
        .take_while(|l| !l.is_empty()) // the headers end at the first empty line
        .filter_map(|l| l.strip_prefix("Requires-Dist:"))
        .map(str::trim)
        .collect()
}

/// True for the wheels that carry CUDA's libraries (`nvidia-*`) or pull them in
/// (`cuda-toolkit`, through its extras); `cuda-bindings`, `triton` and the Python packages are
/// not needed by libtorch.
pub fn is_cuda_wheel(name: &str) -> bool {
    let n = normalize(name);
    n.starts_with("nvidia-") || n == "cuda-toolkit"
}

/// The CUDA requirements in `metadata` that apply on x86_64 Linux, Python 3.11, with the
/// wheel's `extras` asked for.
pub fn cuda_requirements(metadata: &str, extras: &[String]) -> Result<Vec<Requirement>> {
    let mut out = Vec::new();
    for line in requires_dist(metadata) {
        let req = parse_requirement(line)?;
        if !is_cuda_wheel(&req.name) {
            continue;
        }
        let holds = match &req.marker {
            Some(m) => {
                marker_holds(m, extras).with_context(|| format!("in `Requires-Dist: {line}`"))?
            }
            None => true,
        };
        if holds {
            out.push(req);
        }
    }
    Ok(out)
}

/// The value of a marker variable on the platform setup downloads for.
fn marker_var(name: &str) -> Option<&'static str> {
    Some(match name {
        "python_version" => "3.11",
        "python_full_version" | "implementation_version" => "3.11.0",
        "sys_platform" => "linux",
        "platform_system" => "Linux",
        "platform_machine" => "x86_64",
        "os_name" => "posix",
        "implementation_name" => "cpython",
        "platform_python_implementation" => "CPython",
        "platform_release" | "platform_version" => "",
        _ => return None,
    })
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Str(String),
    Var(String),
    Op(String),
    Open,
    Close,
    And,
    Or,
}

fn tokenize(marker: &str) -> Result<Vec<Tok>> {
    let chars: Vec<char> = marker.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == '\'' || c == '"' {
            let close = chars[i + 1..]
                .iter()
                .position(|&d| d == c)
                .with_context(|| format!("unclosed string in marker {marker:?}"))?;
            out.push(Tok::Str(chars[i + 1..i + 1 + close].iter().collect()));
            i += close + 2;
        } else if "=!<>~".contains(c) {
            let mut j = i;
            while j < chars.len() && "=!<>~".contains(chars[j]) {
                j += 1;
            }
            out.push(Tok::Op(chars[i..j].iter().collect()));
            i = j;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut j = i;
            while j < chars.len()
                && (chars[j].is_ascii_alphanumeric() || chars[j] == '_' || chars[j] == '.')
            {
                j += 1;
            }
            let word: String = chars[i..j].iter().collect();
            i = j;
            match word.as_str() {
                "and" => out.push(Tok::And),
                "or" => out.push(Tok::Or),
                "in" => out.push(Tok::Op("in".into())),
                "not" => {
                    // `not in`
                    let rest: String = chars[i..].iter().collect();
                    let trimmed = rest.trim_start();
                    if let Some(after) = trimmed.strip_prefix("in") {
                        i = chars.len() - after.chars().count();
                        out.push(Tok::Op("not in".into()));
                    } else {
                        bail!("`not` without `in` in marker {marker:?}");
                    }
                }
                _ => out.push(Tok::Var(word)),
            }
        } else {
            bail!("unexpected {c:?} in marker {marker:?}");
        }
    }
    Ok(out)
}

struct MarkerParser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    extras: &'a [String],
    text: &'a str,
}

impl MarkerParser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn or_expr(&mut self) -> Result<bool> {
        let mut v = self.and_expr()?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            let r = self.and_expr()?;
            v = v || r;
        }
        Ok(v)
    }
    fn and_expr(&mut self) -> Result<bool> {
        let mut v = self.atom()?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            let r = self.atom()?;
            v = v && r;
        }
        Ok(v)
    }
    fn atom(&mut self) -> Result<bool> {
        if self.peek() == Some(&Tok::Open) {
            self.pos += 1;
            let v = self.or_expr()?;
            if self.next() != Some(Tok::Close) {
                bail!("unbalanced `(` in marker {:?}", self.text);
            }
            return Ok(v);
        }
        let lhs = self.next();
        let op = match self.next() {
            Some(Tok::Op(op)) => op,
            other => bail!(
                "expected a comparison in marker {:?}, found {other:?}",
                self.text
            ),
        };
        let rhs = self.next();
        // `extra == 'x'`: true when the extra x was asked for.
        let is_extra = |t: &Option<Tok>| matches!(t, Some(Tok::Var(v)) if v == "extra");
        if is_extra(&lhs) || is_extra(&rhs) {
            let other = if is_extra(&lhs) { &rhs } else { &lhs };
            let Some(Tok::Str(value)) = other else {
                bail!(
                    "`extra` compared with a non-string in marker {:?}",
                    self.text
                );
            };
            let asked = self.extras.contains(&normalize(value));
            return match op.as_str() {
                "==" => Ok(asked),
                "!=" => Ok(!asked),
                _ => bail!("`extra {op}` in marker {:?}", self.text),
            };
        }
        let value = |t: &Option<Tok>| -> Result<(String, bool)> {
            match t {
                Some(Tok::Str(s)) => Ok((s.clone(), false)),
                Some(Tok::Var(v)) => Ok((
                    marker_var(v)
                        .with_context(|| {
                            format!("unknown marker variable `{v}` in {:?}", self.text)
                        })?
                        .to_string(),
                    v.contains("version"),
                )),
                other => bail!(
                    "expected a value in marker {:?}, found {other:?}",
                    self.text
                ),
            }
        };
        let (l, lv) = value(&lhs)?;
        let (r, rv) = value(&rhs)?;
        compare(&l, &op, &r, lv || rv)
    }
}

/// Evaluates a PEP 508 environment marker for x86_64 Linux, CPython 3.11, with `extras`.
pub fn marker_holds(marker: &str, extras: &[String]) -> Result<bool> {
    let mut p = MarkerParser {
        toks: tokenize(marker)?,
        pos: 0,
        extras,
        text: marker,
    };
    let v = p.or_expr()?;
    if p.pos != p.toks.len() {
        bail!("trailing tokens in marker {marker:?}");
    }
    Ok(v)
}

fn compare(l: &str, op: &str, r: &str, versions: bool) -> Result<bool> {
    Ok(match op {
        "in" => r.contains(l),
        "not in" => !r.contains(l),
        "==" | "===" if !versions => l == r,
        "!=" if !versions => l != r,
        // PEP 440 semantics (`~=`, `==3.*`) as in a Requires-Dist version clause.
        _ if versions => match op {
            "==" | "===" | "!=" | "<" | "<=" | ">" | ">=" | "~=" => version_matches(&format!("{op}{r}"), l),
            _ => bail!("unknown marker operator `{op}`"),
        },
        "<" => l < r,
        "<=" => l <= r,
        ">" => l > r,
        ">=" => l >= r,
        _ => bail!("unknown marker operator `{op}`"),
    })
}

/// Compares dotted numeric versions (`3.11` < `3.15`, `13.0.3` == `13.0.3.0`); a part that is
/// not a number counts as 0.
pub fn cmp_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<u64> {
        let mut v: Vec<u64> = s
            .split('.')
            .map(|p| {
                p.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap_or(0)
            })
            .collect();
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    };
    let (a, b) = (parts(a), parts(b));
    let n = a.len().max(b.len());
    for i in 0..n {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x.cmp(&y);
        }
    }
    std::cmp::Ordering::Equal
}

/// Whether `version` satisfies `spec` (comma-separated clauses; `==X.*` prefix match; other
/// operators numerically). An empty spec allows every version.
pub fn version_matches(spec: &str, version: &str) -> bool {
    use std::cmp::Ordering::*;
    spec.split(',').filter(|c| !c.is_empty()).all(|clause| {
        let op_len = clause
            .find(|c: char| c.is_ascii_alphanumeric())
            .unwrap_or(clause.len());
        let (op, want) = clause.split_at(op_len);
        if let Some(prefix) = want.strip_suffix(".*") {
            let matches = {
                let (p, v): (Vec<&str>, Vec<&str>) =
                    (prefix.split('.').collect(), version.split('.').collect());
                v.len() >= p.len() && p.iter().zip(&v).all(|(a, b)| cmp_versions(a, b) == Equal)
            };
            return if op == "!=" { !matches } else { matches };
        }
        let o = cmp_versions(version, want);
        match op {
            "==" | "===" => o == Equal,
            "!=" => o != Equal,
            "<" => o == Less,
            "<=" => o != Greater,
            ">" => o == Greater,
            ">=" => o != Less,
            "~=" => {
                o != Less && {
                    // ~=X.Y.Z: >= X.Y.Z and == X.Y.*
                    let parts: Vec<&str> = want.split('.').collect();
                    let prefix = parts[..parts.len().saturating_sub(1).max(1)].join(".");
                    version_matches(&format!("=={prefix}.*"), version)
                }
            }
            _ => false,
        }
    })
}

/// `(distribution, version)` from a wheel file name `dist-version-...whl`.
pub fn wheel_name_version(file: &str) -> Option<(String, String)> {
    let stem = file.strip_suffix(".whl")?;
    let mut parts = stem.split('-');
    let dist = parts.next()?;
    let version = parts.next()?;
    Some((normalize(dist), version.to_string()))
}

/// The shared libraries to take from the torch wheel's `torch/lib/`: every `*.so*` directly in
/// it except `libtorch_python.so` (Python bindings).
pub fn torch_lib_files(members: &[String]) -> Vec<String> {
    let mut out: Vec<String> = members
        .iter()
        .filter_map(|m| m.strip_prefix("torch/lib/"))
        .filter(|f| !f.contains('/') && f.contains(".so") && *f != "libtorch_python.so")
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The shared libraries of an nvidia wheel: for every folder `nvidia/<...>/lib/`, the `*.so*`
/// files directly in it (folder -> file names). Headers, static libraries, binaries are left.
pub fn cuda_lib_files(members: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in members {
        if !m.starts_with("nvidia/") || m.ends_with('/') {
            continue;
        }
        let Some((folder, file)) = m.rsplit_once('/') else {
            continue;
        };
        if !folder.ends_with("/lib") || !file.contains(".so") {
            continue;
        }
        out.entry(format!("{folder}/"))
            .or_default()
            .push(file.to_string());
    }
    for files in out.values_mut() {
        files.sort();
        files.dedup();
    }
    out
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn zip_members(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a readable zip", path.display()))?;
    Ok(archive.file_names().map(str::to_string).collect())
}

/// The `METADATA` of a wheel (`<dist>-<version>.dist-info/METADATA`).
fn wheel_metadata(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a readable zip", path.display()))?;
    let name = archive
        .file_names()
        .find(|n| n.ends_with(".dist-info/METADATA") && n.matches('/').count() == 1)
        .map(str::to_string)
        .with_context(|| format!("{} has no .dist-info/METADATA", path.display()))?;
    let mut text = String::new();
    archive.by_name(&name)?.read_to_string(&mut text)?;
    Ok(text)
}

/// A wheel in `wheels_dir` for `req` (highest matching version), if one is there and opens as
/// a zip.
fn find_cached(wheels_dir: &Path, req: &Requirement) -> Option<PathBuf> {
    let mut found: Vec<(String, PathBuf)> = fs::read_dir(wheels_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().to_string();
            let (dist, version) = wheel_name_version(&file)?;
            (dist == req.name && version_matches(&req.spec, &version)).then(|| (version, e.path()))
        })
        .filter(|(_, p)| p.is_file() && zip_members(p).is_ok())
        .collect();
    found.sort_by(|a, b| cmp_versions(&a.0, &b.0));
    found.pop().map(|(_, p)| p)
}

/// A checked copy of the wheel `req` names in `wheels_dir`, downloaded with pip if missing.
fn ensure(wheels_dir: &Path, req: &Requirement, python: &mut Python) -> Result<PathBuf> {
    if let Some(p) = find_cached(wheels_dir, req) {
        println!("{}: using downloaded {}", req.pip_spec(), p.display());
        return Ok(p);
    }
    let scratch = wheels_dir.join(format!("{}{}", wheels::DOWNLOAD_PREFIX, req.name));
    wheels::pip_download(python, &req.pip_spec(), CUDA_PLATFORMS, &scratch)?;
    let got = fs::read_dir(&scratch)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip left no wheel in {}", scratch.display()))?;
    zip_members(&got).with_context(|| format!("downloaded {} is damaged", got.display()))?;
    let dest = wheels_dir.join(got.file_name().expect("a file"));
    fs::rename(&got, &dest)
        .with_context(|| format!("cannot move {} to {}", got.display(), dest.display()))?;
    fs::remove_dir_all(&scratch).ok();
    Ok(dest)
}

/// Reads the torch wheel's CUDA requirements and theirs, downloading each wheel (breadth first;
/// a name already resolved is not fetched again, but new extras of it are followed).
/// Returns `(requirement, wheel file)` in resolution order.
pub fn resolve(
    torch_wheel: &Path,
    wheels_dir: &Path,
    python: &mut Python,
) -> Result<Vec<(Requirement, PathBuf)>> {
    let torch_meta = wheel_metadata(torch_wheel)?;
    let mut queue: VecDeque<Requirement> = cuda_requirements(&torch_meta, &[])?.into();
    let mut done: Vec<(Requirement, PathBuf)> = Vec::new();
    let mut extras_done: HashMap<String, BTreeSet<String>> = HashMap::new();
    while let Some(req) = queue.pop_front() {
        let seen = extras_done.entry(req.name.clone()).or_default();
        let new_extras: Vec<String> = req
            .extras
            .iter()
            .filter(|e| !seen.contains(*e))
            .cloned()
            .collect();
        let path = match done.iter().find(|(r, _)| r.name == req.name) {
            Some((_, p)) if new_extras.is_empty() => {
                let _ = p;
                continue;
            }
            Some((_, p)) => p.clone(),
            None => {
                let p = ensure(wheels_dir, &req, python)?;
                done.push((req.clone(), p.clone()));
                p
            }
        };
        seen.extend(new_extras.iter().cloned());
        let all_extras: Vec<String> = seen.iter().cloned().collect();
        let meta = wheel_metadata(&path)?;
        for r in cuda_requirements(&meta, &all_extras)? {
            queue.push_back(r);
        }
    }
    Ok(done)
}

/// `setup --cuda --plan`: what the torch wheel requires, with `cuda-toolkit`'s extras expanded
/// (that wheel is a few kB and is downloaded); the big nvidia wheels are not downloaded, so
/// their own requirements (read from their METADATA during the set-up) are not listed.
pub fn plan(
    torch_wheel: &Path,
    wheels_dir: &Path,
    python: &mut Python,
) -> Result<Vec<(Requirement, Option<Requirement>)>> {
    let mut out = Vec::new();
    for req in cuda_requirements(&wheel_metadata(torch_wheel)?, &[])? {
        if req.name == "cuda-toolkit" {
            let path = ensure(wheels_dir, &req, python)?;
            for sub in cuda_requirements(&wheel_metadata(&path)?, &req.extras)? {
                if !out
                    .iter()
                    .any(|(r, _): &(Requirement, Option<Requirement>)| r.name == sub.name)
                {
                    out.push((sub, Some(req.clone())));
                }
            }
        } else {
            out.push((req, None));
        }
    }
    Ok(out)
}

/// The tree to unpack: torch's libraries and headers plus the CUDA libraries of `cuda`
/// (a file name already taken from an earlier wheel is not taken again).
pub fn tree_for(
    torch_wheel: &Path,
    cuda: &[(Requirement, PathBuf)],
) -> Result<(&'static Tree, HashMap<&'static str, PathBuf>)> {
    let mut picks = Vec::new();
    let mut paths = HashMap::new();
    let torch_libs = torch_lib_files(&zip_members(torch_wheel)?);
    if !torch_libs.iter().any(|f| f == "libtorch_cuda.so") {
        bail!(
            "{} has no torch/lib/libtorch_cuda.so: not a CUDA build of torch",
            torch_wheel.display()
        );
    }
    let only: &'static [&'static str] = Box::leak(
        torch_libs
            .into_iter()
            .map(leak)
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    picks.push(Pick {
        wheel: &TORCH,
        from: "torch/lib/",
        to: "lib/",
        only: Some(only),
    });
    picks.push(Pick {
        wheel: &TORCH,
        from: "torch/include/",
        to: "include/",
        only: None,
    });
    paths.insert(TORCH.requirement, torch_wheel.to_path_buf());
    let mut taken: BTreeSet<String> = only.iter().map(|s| s.to_string()).collect();
    for (req, path) in cuda {
        let wheel: &'static Wheel = Box::leak(Box::new(Wheel {
            requirement: leak(req.pip_spec()),
            file_prefix: leak(format!("{}-", req.name.replace('-', "_"))),
            platforms: CUDA_PLATFORMS,
        }));
        let mut used = false;
        for (folder, files) in cuda_lib_files(&zip_members(path)?) {
            let files: Vec<&'static str> = files
                .into_iter()
                .filter(|f| taken.insert(f.clone()))
                .map(leak)
                .collect();
            if files.is_empty() {
                continue;
            }
            used = true;
            picks.push(Pick {
                wheel,
                from: leak(folder),
                to: "lib/",
                only: Some(Box::leak(files.into_boxed_slice())),
            });
        }
        if used {
            paths.insert(wheel.requirement, path.clone());
        }
    }
    let tree = Box::leak(Box::new(Tree {
        title: CUDA_TREE.title,
        dir_name: DIR_NAME,
        link_name: CUDA_TREE.link_name,
        version: LIBTORCH_VERSION,
        picks: Box::leak(picks.into_boxed_slice()),
        version_file: Some(VersionFile {
            wheel: &TORCH,
            member: "torch/version.py",
            write_to: "build-version",
        }),
        required: REQUIRED,
    }));
    Ok((tree, paths))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Requires-Dist lines of torch 2.13.0's METADATA (copied from the wheel).
    const TORCH_META: &str = "Metadata-Version: 2.4
Name: torch
Version: 2.13.0
Requires-Dist: filelock
Requires-Dist: typing-extensions>=4.10.0
Requires-Dist: setuptools>=77.0.3
Requires-Dist: sympy>=1.13.3
Requires-Dist: networkx>=2.5.1
Requires-Dist: jinja2
Requires-Dist: fsspec>=0.8.5
Requires-Dist: cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3; platform_system == \"Linux\"
Requires-Dist: cuda-bindings<14,>=13.0.3; platform_system == \"Linux\" and python_version < \"3.15\"
Requires-Dist: nvidia-cudnn-cu13==9.20.0.48; platform_system == \"Linux\"
Requires-Dist: nvidia-cusparselt-cu13==0.8.1; platform_system == \"Linux\"
Requires-Dist: nvidia-nccl-cu13==2.29.7; platform_system == \"Linux\"
Requires-Dist: nvidia-nvshmem-cu13==3.4.5; platform_system == \"Linux\"
Requires-Dist: triton==3.7.1; platform_system == \"Linux\" and python_version < \"3.15\"
Requires-Dist: optree>=0.13.0; extra == \"optree\"
Requires-Dist: pyyaml; extra == \"pyyaml\"

Requires-Dist: not-a-header==1; this is the description
";

    /// Part of cuda-toolkit 13.0.3.0's METADATA (copied from the wheel).
    const TOOLKIT_META: &str = "Name: cuda-toolkit
Version: 13.0.3.0
Provides-Extra: all
Requires-Dist: nvidia-cublas==13.1.1.3.*; (sys_platform == 'linux' and platform_machine == 'aarch64' or sys_platform == 'linux' and platform_machine == 'x86_64' or sys_platform == 'win32' and platform_machine == 'AMD64') and extra == 'all'
Provides-Extra: cublas
Requires-Dist: nvidia-cublas==13.1.1.3.*; (sys_platform == 'linux' and platform_machine == 'aarch64' or sys_platform == 'linux' and platform_machine == 'x86_64' or sys_platform == 'win32' and platform_machine == 'AMD64') and extra == 'cublas'
Requires-Dist: nvidia-cuda-nvrtc==13.0.88.*; (sys_platform == 'linux' and platform_machine == 'aarch64' or sys_platform == 'linux' and platform_machine == 'x86_64' or sys_platform == 'win32' and platform_machine == 'AMD64') and extra == 'cublas'
Provides-Extra: cufile
Requires-Dist: nvidia-cufile==1.15.1.6.*; (sys_platform == 'linux' and platform_machine == 'aarch64' or sys_platform == 'linux' and platform_machine == 'x86_64') and extra == 'cufile'
Provides-Extra: opencl
Requires-Dist: nvidia-cuda-opencl==13.0.85.*; (sys_platform == 'linux' and platform_machine == 'x86_64' or sys_platform == 'win32' and platform_machine == 'AMD64') and extra == 'opencl'
Provides-Extra: cusparse
Requires-Dist: nvidia-nvjitlink<14,>=13.0.88; (sys_platform == 'linux' and platform_machine == 'aarch64' or sys_platform == 'linux' and platform_machine == 'x86_64' or sys_platform == 'win32' and platform_machine == 'AMD64') and extra == 'cusparse'
";

    fn names(reqs: &[Requirement]) -> Vec<String> {
        reqs.iter().map(Requirement::pip_spec).collect()
    }

    #[test]
    fn parses_requirements() {
        let r =
            parse_requirement("cuda-toolkit[cublas, CUDART]==13.0.3; platform_system == \"Linux\"")
                .unwrap();
        assert_eq!(r.name, "cuda-toolkit");
        assert_eq!(r.extras, ["cublas", "cudart"]);
        assert_eq!(r.spec, "==13.0.3");
        assert_eq!(r.marker.as_deref(), Some("platform_system == \"Linux\""));
        let r = parse_requirement("Nvidia_NVJitLink (<14, >=13.0.88)").unwrap();
        assert_eq!(
            (r.name.as_str(), r.spec.as_str(), r.marker),
            ("nvidia-nvjitlink", "<14,>=13.0.88", None)
        );
        assert_eq!(parse_requirement("jinja2").unwrap().spec, "");
        assert!(parse_requirement("pkg @ https://x/y.whl").is_err());
        assert!(parse_requirement("[x]").is_err());
    }

    #[test]
    fn torch_cuda_requirements() {
        let reqs = cuda_requirements(TORCH_META, &[]).unwrap();
        assert_eq!(
            names(&reqs),
            [
                "cuda-toolkit==13.0.3",
                "nvidia-cudnn-cu13==9.20.0.48",
                "nvidia-cusparselt-cu13==0.8.1",
                "nvidia-nccl-cu13==2.29.7",
                "nvidia-nvshmem-cu13==3.4.5"
            ]
        );
        assert_eq!(reqs[0].extras.len(), 11);
    }

    #[test]
    fn extras_select_toolkit_wheels() {
        let extras: Vec<String> = ["cublas", "cufile", "cusparse"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let reqs = cuda_requirements(TOOLKIT_META, &extras).unwrap();
        assert_eq!(
            names(&reqs),
            [
                "nvidia-cublas==13.1.1.3.*",
                "nvidia-cuda-nvrtc==13.0.88.*",
                "nvidia-cufile==1.15.1.6.*",
                "nvidia-nvjitlink<14,>=13.0.88"
            ]
        );
        assert!(
            cuda_requirements(TOOLKIT_META, &[]).unwrap().is_empty(),
            "no extra, no wheel"
        );
    }

    #[test]
    fn markers() {
        let none: &[String] = &[];
        assert!(marker_holds(
            "platform_system == \"Linux\" and python_version < \"3.15\"",
            none
        )
        .unwrap());
        assert!(!marker_holds("python_version >= '3.12'", none).unwrap());
        assert!(marker_holds("python_version > '3.9'", none).unwrap());
        // `~=3.9` is `>= 3.9, == 3.*`; `~=3.9.1` is `>= 3.9.1, == 3.9.*` (PEP 440).
        assert!(marker_holds("python_version ~= '3.9'", none).unwrap());
        assert!(!marker_holds("python_version ~= '3.9.1'", none).unwrap());
        assert!(!marker_holds("python_version ~= '3.12'", none).unwrap());
        assert!(marker_holds("python_version == '3.*'", none).unwrap());
        assert!(!marker_holds("python_version != '3.*'", none).unwrap());
        assert!(!marker_holds(
            "sys_platform == 'win32' or platform_machine == 'aarch64'",
            none
        )
        .unwrap());
        assert!(marker_holds(
            "(sys_platform == 'win32' or sys_platform == 'linux') and 'x86' in platform_machine",
            none
        )
        .unwrap());
        assert!(marker_holds("platform_machine not in 'arm64 aarch64'", none).unwrap());
        assert!(marker_holds("extra == 'Cu-Blas'", &["cu-blas".to_string()]).unwrap());
        assert!(!marker_holds("extra == 'all'", &["cublas".to_string()]).unwrap());
        assert!(marker_holds("nonsense ==", none).is_err());
        assert!(marker_holds("unknown_var == 'x'", none).is_err());
        assert!(marker_holds("(python_version < '4'", none).is_err());
    }

    #[test]
    fn versions() {
        assert!(version_matches("==13.0.3", "13.0.3.0"));
        assert!(version_matches("==13.1.1.3.*", "13.1.1.3"));
        assert!(version_matches("==13.1.1.3.*", "13.1.1.3.post1"));
        assert!(!version_matches("==13.1.1.3.*", "13.1.1.30"));
        assert!(version_matches("<14,>=13.0.88", "13.2.51"));
        assert!(!version_matches("<14,>=13.0.88", "14.0.1"));
        assert!(!version_matches("<14,>=13.0.88", "13.0.39"));
        assert!(version_matches("", "1.0"));
        assert_eq!(
            wheel_name_version("nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"),
            Some(("nvidia-cuda-runtime".to_string(), "13.0.96".to_string()))
        );
    }

    #[test]
    fn selects_library_files() {
        let members: Vec<String> = [
            "torch/lib/",
            "torch/lib/libc10.so",
            "torch/lib/libc10_cuda.so",
            "torch/lib/libtorch_cuda.so",
            "torch/lib/libtorch_python.so",
            "torch/lib/libgomp.so.1",
            "torch/lib/libshm/libshm.h",
            "torch/include/ATen/ATen.h",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            torch_lib_files(&members),
            [
                "libc10.so",
                "libc10_cuda.so",
                "libgomp.so.1",
                "libtorch_cuda.so"
            ]
        );

        let members: Vec<String> = [
            "nvidia/cu13/lib/",
            "nvidia/cu13/lib/libcublas.so.13",
            "nvidia/cu13/lib/libcublasLt.so.13",
            "nvidia/cu13/lib/libcublas_static.a",
            "nvidia/cu13/include/cublas.h",
            "nvidia/cu13/bin/nvcc",
            "nvidia/cudnn/lib/libcudnn.so.9",
            "nvidia/cudnn/lib/stubs/libcuda.so",
            "nvidia/__init__.py",
            "nvidia_cublas-13.1.1.3.dist-info/METADATA",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let picked = cuda_lib_files(&members);
        assert_eq!(picked.len(), 2);
        assert_eq!(
            picked["nvidia/cu13/lib/"],
            ["libcublas.so.13", "libcublasLt.so.13"]
        );
        assert_eq!(picked["nvidia/cudnn/lib/"], ["libcudnn.so.9"]);
    }

    #[test]
    fn names_normalize() {
        assert_eq!(normalize("Nvidia_CUDA.runtime"), "nvidia-cuda-runtime");
        assert!(is_cuda_wheel("nvidia-cudnn-cu13") && is_cuda_wheel("cuda_toolkit"));
        assert!(!is_cuda_wheel("cuda-bindings") && !is_cuda_wheel("triton"));
    }

    /// End to end on real wheels, without network: the torch wheel and the two nvidia wheels
    /// the CPU set-up already downloaded (`<cache>/wheels/`) are unpacked as a CUDA tree into a
    /// scratch cache, which then passes [`crate::unpack::verify`] with [`CUDA_TREE`]. Ignored by
    /// default (about 1 GB written): `cargo test -p xtask -- --ignored`.
    #[test]
    #[ignore]
    fn unpacks_a_cuda_tree_from_cached_wheels() {
        let home = std::env::var_os("NNSIGHT_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nnsight-rs"))
            })
            .expect("NNSIGHT_CACHE or HOME");
        let wheels_dir = home.join("wheels");
        let torch =
            crate::wheels::find_cached(&wheels_dir, &TORCH).expect("run `cargo xtask setup` first");
        let runtime = parse_requirement("nvidia-cuda-runtime==13.0.96.*").unwrap();
        let cupti = parse_requirement("nvidia-cuda-cupti==13.0.85.*").unwrap();
        let cuda: Vec<(Requirement, PathBuf)> = [runtime, cupti]
            .into_iter()
            .map(|r| {
                let p = find_cached(&wheels_dir, &r).expect("the CPU set-up's nvidia wheels");
                (r, p)
            })
            .collect();
        let (tree, paths) = tree_for(&torch, &cuda).unwrap();
        let scratch =
            std::env::temp_dir().join(format!("nnsight-cuda-tree-test-{}", std::process::id()));
        fs::create_dir_all(&scratch).unwrap();
        let built = crate::unpack::build(&scratch, tree, &paths);
        let verified = built
            .as_ref()
            .map(|_| crate::unpack::verify(&scratch.join(DIR_NAME), &CUDA_TREE));
        let has = |f: &str| scratch.join(DIR_NAME).join("lib").join(f).is_file();
        let files = [
            "libtorch_cuda.so",
            "libc10_cuda.so",
            "libcudart.so.13",
            "libcupti.so.13",
            "libtorch_cpu.so",
        ]
        .map(has);
        let python = has("libtorch_python.so");
        fs::remove_dir_all(&scratch).ok();
        let n = verified
            .expect("unpacked")
            .expect("verifies as the CUDA tree");
        assert!(
            files.iter().all(|&f| f),
            "lib/ has the CUDA libraries: {files:?}"
        );
        assert!(!python, "libtorch_python.so is left out");
        eprintln!("CUDA tree from cached wheels: {n} files");
    }

    /// Metadata headers stop at the first empty line (the description may quote anything).
    #[test]
    fn headers_only() {
        assert!(!requires_dist(TORCH_META)
            .iter()
            .any(|r| r.starts_with("not-a-header")));
    }
}
