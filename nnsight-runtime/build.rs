//! Lets this crate's tests, examples and benches find libtorch (`link_libtorch.rs`: an rpath,
//! and `libtorch_cuda` kept with a CUDA set-up).
//!
//! Also compiles `csrc/tensor_hooks.cpp`, the C++ shim behind `tensor_hook` (tensor backward
//! hooks and `retain_grad`, which tch does not expose), against libtorch's headers. The libtorch
//! folder comes from torch-sys (`links = "tch"` exports `DEP_TCH_LIBTORCH_LIB`, the lib folder),
//! falling back to `$LIBTORCH/lib`.
use std::path::PathBuf;

include!("link_libtorch.rs");

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/tensor_hooks.cpp");
    println!("cargo:rerun-if-changed=link_libtorch.rs");
    link_libtorch();

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
