//! # nnsight-rs
//!
//! Read, patch, steer and take gradients of the activations inside a neural network while it
//! runs on libtorch (via `tch`): the Rust counterpart of the Python library nnsight.
//!
//! Write intervention code in a [`trace!`] block next to a model call; the block becomes an
//! intervention graph that rustc type-checks, run interleaved with the model's forward pass.
//! See the README for a tour.

pub use nnsight_macros::trace;
pub use nnsight_runtime::*;

/// Everything an experiment usually needs: `use nnsight::prelude::*;`.
pub mod prelude {
    pub use nnsight_macros::trace;
    pub use nnsight_runtime::{Error, HookModule, Hooked, Leaf, Proxy, Saved, Tracer};
    pub use tch::{self, Device, IndexOp, Kind, Tensor};
}
