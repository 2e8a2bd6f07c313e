//! Embeds libtorch's library folder as an rpath in this crate's tests, examples and benches, so
//! they run without LD_LIBRARY_PATH (cargo replaces LD_LIBRARY_PATH for the programs it starts).
//! LIBTORCH comes from `.cargo/config.toml`, pointing at the link `cargo xtask setup` makes.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/lib");
    }
}
