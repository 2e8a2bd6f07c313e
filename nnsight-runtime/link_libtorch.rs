/// Tells cargo how the binaries of the crate being built find libtorch, from `$LIBTORCH` (set
/// in `.cargo/config.toml`, pointing at what `cargo xtask setup` made):
///
/// - embeds `$LIBTORCH/lib` as an rpath, so tests, examples and binaries run without
///   `LD_LIBRARY_PATH` (cargo replaces that variable for the programs it starts anyway);
/// - with a CUDA libtorch (its `lib/` has `libtorch_cuda.so`, from `cargo xtask setup --cuda`),
///   links `libtorch_cuda` with `-Wl,--no-as-needed`: no Rust code calls into it, so the default
///   `--as-needed` would drop it and `tch::Cuda::is_available()` would say false (tch's known
///   trap: loading the library is what registers libtorch's CUDA backend). A CPU libtorch adds
///   nothing;
/// - re-runs when `cargo xtask setup` switches the set-up (it touches `$LIBTORCH/.complete`).
///
/// One file shared by this repository's two build scripts (`include!`) and written into a new
/// project's `build.rs` by `cargo xtask new`.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(dir) = std::env::var("LIBTORCH") else { return };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/lib");
    let root = std::path::Path::new(&dir);
    if root.join(".complete").is_file() {
        println!("cargo:rerun-if-changed={dir}/.complete");
    }
    let lib = root.join("lib");
    if lib.join("libtorch_cuda.so").is_file() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
