//! Lets this crate's tests, examples and benches find libtorch (an rpath, and `libtorch_cuda`
//! kept with a CUDA set-up): see `nnsight-runtime/link_libtorch.rs`.
include!("nnsight-runtime/link_libtorch.rs");

fn main() {
    link_libtorch();
}
