//! `cargo xtask new <folder> [--name <crate>]`: a researcher's own crate that depends on this
//! repository, builds against the libtorch in the shared cache, and whose binaries run directly
//! (no `LD_LIBRARY_PATH`): `.cargo/config.toml` sets `LIBTORCH` for tch's build, and `build.rs`
//! embeds libtorch's library folder as an rpath. The bundled model is found by the library in
//! the same cache, so nothing else needs setting.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Writes the crate into `dir` (which must not exist or be empty). `libtorch` is the unpacked
/// libtorch in the cache, `repo` this repository (the path dependency).
pub fn write(dir: &Path, name: &str, libtorch: &Path, repo: &Path) -> Result<()> {
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        bail!("`{name}` is not a crate name: letters, digits, `_` and `-`, starting with a letter (choose one with --name)");
    }
    if dir.exists() && fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?.next().is_some() {
        bail!("{} exists and is not empty; choose a new folder", dir.display());
    }
    let files: [(&str, String); 5] = [
        ("Cargo.toml", cargo_toml(name, repo)),
        (".cargo/config.toml", config_toml(libtorch)),
        ("build.rs", BUILD_RS.to_string()),
        ("src/main.rs", MAIN_RS.to_string()),
        (".gitignore", "/target\n".to_string()),
    ];
    for (rel, text) in files {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("has a parent")).with_context(|| format!("cannot create {}", path.display()))?;
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn cargo_toml(name: &str, repo: &Path) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

[dependencies]
# This clone of nnsight-rs. From a published repository instead:
#   nnsight = {{ git = "https://<host>/<owner>/nnsight-rs" }}
nnsight = {{ path = "{repo}" }}
"#,
        repo = repo.display()
    )
}

fn config_toml(libtorch: &Path) -> String {
    format!(
        r#"# Written by `cargo xtask new`: libtorch from the nnsight-rs set-up cache (shared by every
# project on this machine; `cargo xtask setup` in the nnsight-rs clone fills it).
[env]
LIBTORCH = "{lt}"
LIBTORCH_CXX11_ABI = "1"
"#,
        lt = libtorch.display()
    )
}

/// The new project's `build.rs`: the same libtorch linking as this repository's build scripts.
const BUILD_RS: &str = concat!(
    "//! Lets this crate's binaries find libtorch (LIBTORCH comes from .cargo/config.toml).\n\n",
    include_str!("../../nnsight-runtime/link_libtorch.rs"),
    "\nfn main() {\n    link_libtorch();\n}\n"
);

const MAIN_RS: &str = r#"//! A first experiment: the residual stream of all-MiniLM-L6-v2 at one token, layer by layer,
//! and the same after zeroing layer 2's output there (a zero ablation), in one forward pass.
use nnsight::prelude::*;

fn main() -> Result<(), nnsight::Error> {
    let model = nnsight::bundled::minilm()?;
    let text = "The Eiffel Tower is in the city of Paris."; // token 11 is "paris"
    let (clean, ablated) = trace!(model, {
        invoke(text) {
            let clean: Vec<_> = (0..6).map(|l| model.encoder.layer[l].output[.., 11].norm().save()).collect();
        }
        invoke(text) {
            model.encoder.layer[2].output[.., 11] = 0.0;
            let ablated: Vec<_> = (0..6).map(|l| model.encoder.layer[l].output[.., 11].norm().save()).collect();
            (clean, ablated)
        }
    })?;
    for l in 0..6 {
        let (c, a) = (clean[l].double_value(&[]), ablated[l].double_value(&[]));
        println!("layer {l}: norm at \"paris\" {c:.2} clean, {a:.2} with layer 2 zeroed");
    }
    Ok(())
}
"#;
