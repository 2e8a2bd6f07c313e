//! # nnsight-rs
//!
//! Read, patch, steer and take gradients of the activations inside a neural network while it
//! runs on libtorch (via `tch`): the Rust counterpart of the Python library nnsight.
//!
//! Write intervention code in a [`trace!`] block next to a model call; the block becomes an
//! intervention graph that rustc type-checks, run interleaved with the model's forward pass.
//! See the README for a tour.
//!
//! ```
//! let t = nnsight::tch::Tensor::ones([2], (nnsight::tch::Kind::Float, nnsight::tch::Device::Cpu));
//! assert_eq!(t.sum(nnsight::tch::Kind::Float).double_value(&[]), 2.0);
//! ```

pub use nnsight_macros::trace;
pub use nnsight_runtime::*;

/// Everything an experiment usually needs: `use nnsight::prelude::*;`.
pub mod prelude {
    pub use nnsight_macros::trace;
    pub use nnsight_runtime::{Error, HookModule, Hooked, Leaf, ModuleTree, Proxy, Saved, Tracer};
    pub use tch::{self, Device, IndexOp, Kind, Tensor};
}
