#![doc = include_str!("../README.md")]

pub use nnsight_macros::{generate, trace};
pub use nnsight_runtime::*;

/// Everything an experiment usually needs: `use nnsight::prelude::*;`.
pub mod prelude {
    pub use nnsight_macros::{generate, trace};
    pub use nnsight_runtime::{Error, HookModule, Hooked, Leaf, ModuleTree, Proxy, Saved, Tracer};
    pub use tch::{self, Device, IndexOp, Kind, Tensor};
}
