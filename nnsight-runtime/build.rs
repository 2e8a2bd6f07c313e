//! Embeds libtorch's library folder as an rpath in this crate's tests, examples and benches, so
//! they run without LD_LIBRARY_PATH (cargo replaces LD_LIBRARY_PATH for the programs it starts).
//! LIBTORCH comes from `.cargo/config.toml`, pointing at the link `cargo xtask setup` makes.
//!
//! Also compiles `csrc/tensor_hooks.cpp`, the C++ shim behind `tensor_hook` (tensor backward
//! hooks and `retain_grad`, which tch does not expose), against libtorch's headers. The libtorch
//! folder comes from torch-sys (`links = "tch"` exports `DEP_TCH_LIBTORCH_LIB`, the lib folder),
//! falling back to `$LIBTORCH/lib`.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/tensor_hooks.cpp");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/lib");
        let lib = PathBuf::from(&dir).join("lib");
        // `cargo xtask setup` touches the marker when it points `.nnsight/libtorch` at another
        // tree (CPU <-> CUDA), so switching re-runs this script.
        if PathBuf::from(&dir).join(".complete").is_file() {
            println!("cargo:rerun-if-changed={dir}/.complete");
        }
        // A CUDA libtorch (`cargo xtask setup --cuda`): link libtorch_cuda into this crate's
        // tests and examples with --no-as-needed, else the linker drops it (no Rust code uses
        // its symbols) and `tch::Cuda::is_available()` is false. The CPU set-up adds nothing.
        if lib.join("libtorch_cuda.so").is_file() {
            println!("cargo:rustc-link-arg=-L{}", lib.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }

    let lib_dir = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("LIBTORCH").map(|d| PathBuf::from(d).join("lib")))
        .expect("neither DEP_TCH_LIBTORCH_LIB (from torch-sys) nor LIBTORCH is set");
    let include = lib_dir.join("..").join("include");
    // torch-sys builds with the CXX11 ABI unless told otherwise; match it.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/tensor_hooks.cpp")
        .compile("nnsight_tensor_hooks");
}
