//! Embeds libtorch's library folder as an rpath in this crate's tests, examples and benches, so
//! they run without LD_LIBRARY_PATH (cargo replaces LD_LIBRARY_PATH for the programs it starts).
//! LIBTORCH comes from `.cargo/config.toml`, pointing at the link `cargo xtask setup` makes.
//!
//! With a CUDA libtorch (`cargo xtask setup --cuda`: its `lib/` has `libtorch_cuda.so`), also
//! links `libtorch_cuda` with `-Wl,--no-as-needed`: no Rust code calls into it, so the default
//! `--as-needed` would drop it and `tch::Cuda::is_available()` would say false (tch's known
//! trap: the library registers libtorch's CUDA backend when it is loaded). With the CPU set-up
//! nothing is added.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/lib");
        let lib = std::path::Path::new(&dir).join("lib");
        // `cargo xtask setup` touches the marker when it points `.nnsight/libtorch` at another
        // tree, so switching between the CPU and the CUDA set-up re-runs this script.
        if std::path::Path::new(&dir).join(".complete").is_file() {
            println!("cargo:rerun-if-changed={dir}/.complete");
        }
        if lib.join("libtorch_cuda.so").is_file() {
            println!("cargo:rustc-link-arg=-L{}", lib.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
