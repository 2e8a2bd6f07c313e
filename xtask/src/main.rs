//! Developer tasks for nnsight-rs, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! * `setup`  — downloads libtorch 2.13.0 (from the PyPI `torch` wheel) and the
//!   all-MiniLM-L6-v2 model into a cache folder outside the repository, unpacks and verifies
//!   them, and links them into the repository as `.nnsight/libtorch` and `.nnsight/minilm`.
//!   Running it again only checks the trees and refreshes the links.
//! * `setup --cuda` — the same with libtorch's CUDA part: `<cache>/libtorch-2.13.0-cuda`, with
//!   `libtorch_cuda.so` and the CUDA libraries of the wheels the torch wheel requires (see
//!   [`cuda`]), linked as `.nnsight/libtorch` instead of the CPU tree.
//! * `doctor` — prints what is where: cache folder, wheels, trees, links, environment.
//! * `new <folder> [--name <crate>]` — writes a researcher's own crate that depends on this
//!   repository and builds against the cache's libtorch; its binaries run directly.
//!
//! The cache folder is `$NNSIGHT_CACHE`, else `$XDG_CACHE_HOME/nnsight-rs`, else
//! `$HOME/.cache/nnsight-rs`; it is shared by every clone on the machine. This crate must not
//! depend on `tch`: it has to build before libtorch exists.

mod cuda;
mod links;
mod new_project;
mod spec;
mod unpack;
mod wheels;

use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  setup    download libtorch 2.13.0 and the MiniLM model into the cache folder and link them
           as .nnsight/libtorch and .nnsight/minilm (safe to re-run; does nothing when set up)
  setup --cuda
           the same with libtorch's CUDA part (libtorch_cuda.so and the CUDA libraries the torch
           wheel requires, several GB) in <cache>/libtorch-2.13.0-cuda, linked as
           .nnsight/libtorch; a plain `setup` links the CPU libtorch again
  setup --cuda --plan
           only list the CUDA wheels the torch wheel requires (downloads a few kB)
  doctor   print where the cache, wheels, trees and links are, and whether they are complete
  new <folder> [--name <crate>]
           write your own crate there: depends on this clone, builds against the cache's
           libtorch (run setup first), binaries run without LD_LIBRARY_PATH

cache folder: $NNSIGHT_CACHE, else $XDG_CACHE_HOME/nnsight-rs, else $HOME/.cache/nnsight-rs";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes, without anyhow's backtrace (noise for a setup tool).
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["setup"] => setup(false),
        ["setup", "--cuda"] => setup(true),
        ["setup", "--cuda", "--plan"] => cuda_plan(),
        ["doctor"] => doctor(),
        ["new", folder] => new(Path::new(folder), None),
        ["new", folder, "--name", name] => new(Path::new(folder), Some(name)),
        [] | ["help" | "-h" | "--help"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown arguments {args:?}\n\n{USAGE}"),
    }
}

/// `cargo xtask setup [--cuda]`: see the crate docs.
fn setup(cuda: bool) -> Result<()> {
    if std::env::consts::OS != "linux" || std::env::consts::ARCH != "x86_64" {
        bail!(
            "setup downloads x86_64 Linux builds and this is {}/{}; install libtorch {} yourself \
             and set LIBTORCH and LD_LIBRARY_PATH (and NNSIGHT_MINILM_DIR for the model)",
            std::env::consts::OS,
            std::env::consts::ARCH,
            spec::LIBTORCH_VERSION
        );
    }
    let (cache, _) = cache_dir()?;
    fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create the cache folder {}", cache.display()))?;
    let _lock = lock_cache(&cache)?;
    remove_leftovers(&cache)?;

    let wheels_dir = cache.join("wheels");
    let mut python = wheels::Python::from_env();
    if cuda {
        setup_cuda(&cache, &wheels_dir, &mut python)?;
    }
    for tree in spec::TREES {
        if cuda && tree.link_name == "libtorch" {
            continue; // the CUDA tree takes its place
        }
        let dir = cache.join(tree.dir_name);
        match unpack::verify(&dir, tree) {
            Ok(n) => println!(
                "{}: already set up ({n} files in {})",
                tree.title,
                dir.display()
            ),
            Err(why) => {
                if dir.exists() {
                    println!("{}: {why:#}; unpacking again", tree.title);
                }
                fs::create_dir_all(&wheels_dir)
                    .with_context(|| format!("cannot create {}", wheels_dir.display()))?;
                let mut paths = HashMap::new();
                for wheel in tree.wheels() {
                    paths.insert(
                        wheel.requirement,
                        wheels::ensure(&wheels_dir, wheel, &mut python)?,
                    );
                }
                unpack::build(&cache, tree, &paths)?;
            }
        }
    }

    let repo = repo_root();
    for tree in spec::TREES {
        let link = repo.join(".nnsight").join(tree.link_name);
        let dir_name = if cuda && tree.link_name == "libtorch" { cuda::DIR_NAME } else { tree.dir_name };
        let target = cache.join(dir_name);
        if links::point(&link, &target)? {
            println!("linked {} -> {}", link.display(), target.display());
            if tree.link_name == "libtorch" {
                // The build scripts re-run when this marker is newer than their last run
                // (`rerun-if-changed`), so the next build links against the new libtorch.
                touch(&target.join(unpack::MARKER))?;
            }
        } else {
            println!("{} -> {} (unchanged)", link.display(), target.display());
        }
    }
    println!("setup done; builds use .nnsight/libtorch via .cargo/config.toml");
    if cuda {
        println!(
            "CUDA: binaries built from now on link libtorch_cuda; `tch::Cuda::is_available()` is \
             true where an NVIDIA driver finds a GPU. If a build made before still says false, \
             rebuild torch-sys (`cargo clean -p torch-sys`)."
        );
    }
    Ok(())
}

/// The CUDA libtorch tree (see [`cuda`]): checked, else resolved from the torch wheel's
/// requirements, downloaded and unpacked.
fn setup_cuda(cache: &Path, wheels_dir: &Path, python: &mut wheels::Python) -> Result<()> {
    let tree = &cuda::CUDA_TREE;
    let dir = cache.join(tree.dir_name);
    match unpack::verify(&dir, tree) {
        Ok(n) => {
            println!("{}: already set up ({n} files in {})", tree.title, dir.display());
            return Ok(());
        }
        Err(why) if dir.exists() => println!("{}: {why:#}; unpacking again", tree.title),
        Err(_) => {}
    }
    fs::create_dir_all(wheels_dir).with_context(|| format!("cannot create {}", wheels_dir.display()))?;
    let torch = wheels::ensure(wheels_dir, &spec::TORCH, python)?;
    println!("{}: resolving the CUDA wheels the torch wheel requires (its METADATA)", tree.title);
    let resolved = cuda::resolve(&torch, wheels_dir, python)?;
    for (req, path) in &resolved {
        println!("  {:<36} {}", req.pip_spec(), path.display());
    }
    let (full, paths) = cuda::tree_for(&torch, &resolved)?;
    unpack::build(cache, full, &paths)?;
    Ok(())
}

/// `cargo xtask setup --cuda --plan`: lists the CUDA wheels the torch wheel requires (only the
/// torch wheel and the few-kB `cuda-toolkit` wheel are downloaded); changes no tree or link.
fn cuda_plan() -> Result<()> {
    let (cache, _) = cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| format!("cannot create the cache folder {}", cache.display()))?;
    let _lock = lock_cache(&cache)?;
    let wheels_dir = cache.join("wheels");
    fs::create_dir_all(&wheels_dir).with_context(|| format!("cannot create {}", wheels_dir.display()))?;
    let mut python = wheels::Python::from_env();
    let torch = wheels::ensure(&wheels_dir, &spec::TORCH, &mut python)?;
    let plan = cuda::plan(&torch, &wheels_dir, &mut python)?;
    println!("`setup --cuda` downloads these {} wheels (and what their METADATA requires in turn):", plan.len());
    for (req, via) in &plan {
        match via {
            Some(v) => println!("  {:<36} (from {}[{}])", req.pip_spec(), v.name, v.extras.join(",")),
            None => println!("  {:<36} (from torch)", req.pip_spec()),
        }
    }
    Ok(())
}

/// Sets the modification time of `path` to now.
fn touch(path: &Path) -> Result<()> {
    let f = File::options().append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.set_modified(std::time::SystemTime::now()).with_context(|| format!("cannot touch {}", path.display()))?;
    Ok(())
}

/// `cargo xtask new`: see [`new_project`].
fn new(folder: &Path, name: Option<&str>) -> Result<()> {
    let (cache, _) = cache_dir()?;
    let cpu = spec::TREES.iter().find(|t| t.link_name == "libtorch").expect("libtorch is a tree");
    // The libtorch this clone builds against: the CUDA one after `setup --cuda`.
    let linked_cuda = fs::read_link(repo_root().join(".nnsight").join("libtorch"))
        .is_ok_and(|t| t.file_name().is_some_and(|n| n == cuda::DIR_NAME));
    let tree: &spec::Tree = if linked_cuda { &cuda::CUDA_TREE } else { cpu };
    let libtorch = cache.join(tree.dir_name);
    if let Err(why) = unpack::verify(&libtorch, tree) {
        bail!("libtorch is not set up in {} ({why:#}): run `cargo xtask setup` first", libtorch.display());
    }
    let name = match name {
        Some(n) => n.to_string(),
        None => folder
            .file_name()
            .map(|n| n.to_string_lossy().replace(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'), "_"))
            .context("give the crate a name with --name")?,
    };
    new_project::write(folder, &name, &libtorch, &repo_root())?;
    println!("wrote the crate `{name}` in {}", folder.display());
    println!("next: cd {} && cargo run --release   (the binary then runs on its own: target/release/{name})", folder.display());
    Ok(())
}

/// `cargo xtask doctor`: prints what is where; changes nothing.
fn doctor() -> Result<()> {
    let repo = repo_root();
    println!(
        "platform:     {}/{}",
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    println!("repository:   {}", repo.display());
    match cache_dir() {
        Ok((cache, why)) => {
            println!("cache folder: {} ({why})", cache.display());
            let wheels_dir = cache.join("wheels");
            for wheel in spec::WHEELS {
                let state = match wheels::find_cached(&wheels_dir, wheel) {
                    None => "not downloaded".to_string(),
                    Some(p) => match wheels::check(&p, wheel) {
                        Ok(()) => format!("{}", p.display()),
                        Err(e) => format!("{} (unusable: {e:#})", p.display()),
                    },
                };
                println!("  wheel {:<28} {state}", wheel.requirement);
            }
            for tree in spec::TREES.iter().copied().chain([&cuda::CUDA_TREE]) {
                let dir = cache.join(tree.dir_name);
                match unpack::verify(&dir, tree) {
                    Ok(n) => println!(
                        "  {:<34} complete, {n} files in {}",
                        tree.title,
                        dir.display()
                    ),
                    Err(_) if tree.dir_name == cuda::DIR_NAME && !dir.exists() => println!(
                        "  {:<34} not set up (optional: `cargo xtask setup --cuda`)",
                        tree.title
                    ),
                    Err(e) => println!("  {:<34} NOT READY: {e:#}", tree.title),
                }
            }
        }
        Err(e) => println!("cache folder: {e:#}"),
    }
    for tree in spec::TREES {
        let link = repo.join(".nnsight").join(tree.link_name);
        let state = match fs::read_link(&link) {
            Ok(t) if t.exists() => format!("-> {}", t.display()),
            Ok(t) => format!("-> {} (DANGLING)", t.display()),
            Err(_) if link.exists() => "a real folder, not a link".to_string(),
            Err(_) => "missing (run `cargo xtask setup`)".to_string(),
        };
        println!("link .nnsight/{:<8} {state}", tree.link_name);
    }
    // Under `cargo xtask` these include the defaults from .cargo/config.toml; a value set in
    // the shell overrides those defaults for every cargo command. (LD_LIBRARY_PATH is not shown:
    // cargo replaces it for the programs it runs; the crates embed $LIBTORCH/lib as an rpath.)
    for var in [
        "LIBTORCH",
        "NNSIGHT_MINILM_DIR",
        "NNSIGHT_CACHE",
        "NNSIGHT_PYTHON",
    ] {
        println!(
            "env {var:<19} {}",
            std::env::var(var).unwrap_or_else(|_| "(unset)".into())
        );
    }
    match wheels::Python::from_env().pip_version() {
        Ok(v) => println!("pip:          {v}"),
        Err(e) => println!("pip:          {e:#}"),
    }
    Ok(())
}

/// The cache folder (absolute) and which rule chose it.
fn cache_dir() -> Result<(PathBuf, &'static str)> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let (dir, why) = if let Some(d) = var("NNSIGHT_CACHE") {
        (PathBuf::from(d), "from $NNSIGHT_CACHE")
    } else if let Some(x) = var("XDG_CACHE_HOME") {
        (Path::new(&x).join("nnsight-rs"), "from $XDG_CACHE_HOME")
    } else if let Some(h) = var("HOME") {
        (
            Path::new(&h).join(".cache").join("nnsight-rs"),
            "from $HOME",
        )
    } else {
        bail!("cannot choose a cache folder: set NNSIGHT_CACHE (or HOME)");
    };
    let dir =
        std::path::absolute(&dir).with_context(|| format!("bad cache folder {}", dir.display()))?;
    Ok((dir, why))
}

/// The repository root: the folder above this crate.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the repository")
        .to_path_buf()
}

/// Takes an exclusive lock on `<cache>/.lock`, waiting for another setup using the same cache
/// (another clone, a parallel CI job) to finish. Released when the file is dropped.
fn lock_cache(cache: &Path) -> Result<File> {
    let path = cache.join(".lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            println!(
                "waiting for another `cargo xtask setup` using {} ...",
                cache.display()
            );
            file.lock()
                .with_context(|| format!("cannot lock {}", path.display()))?;
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    Ok(file)
}

/// Removes scratch folders left by an interrupted run. Only called while holding the cache
/// lock, so nothing else can be using them.
fn remove_leftovers(cache: &Path) -> Result<()> {
    let spots = [
        (cache.to_path_buf(), unpack::TMP_PREFIX),
        (cache.to_path_buf(), unpack::OLD_PREFIX),
        (cache.join("wheels"), wheels::DOWNLOAD_PREFIX),
    ];
    for (dir, prefix) in spots {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                let path = entry.path();
                println!("removing {} (left by an interrupted run)", path.display());
                fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    }
    Ok(())
}
