//! nnsight-rs: read, patch, steer, ablate and take gradients of activations inside tch models
//! while they run, with the [`trace!`] and [`generate!`] macros. The Rust counterpart of
//! Python's [nnsight](https://nnsight.net).
//!
//! ```
//! use nnsight::prelude::*;
//!
//! let model = nnsight::bundled::minilm()?;   // all-MiniLM-L6-v2 from the set-up's cache
//! let h = trace!(model, "The Eiffel Tower is in the city of Paris.", {
//!     model.encoder.layer[3].attention.self_.output[.., 0] = 0.0;   // ablate position 0
//!     model.encoder.layer[5].output.save()                           // [1, 14, 384]
//! })?;
//! assert_eq!(h.size(), vec![1, 14, 384]);
//! # Ok::<(), nnsight::Error>(())
//! ```
//!
//! Start with the [`guide`]: set-up, tracing, interventions, invokes, gradients, control flow,
//! errors, your own model, the bundled models, loading checkpoints, and how it works. The repository's README has the
//! commands to set up and run the examples and tests, and BENCHMARKS.md the performance figures.

pub use nnsight_macros::{edit, generate, scan, trace};
pub use nnsight_runtime::*;

pub mod guide;

/// Everything an experiment usually needs: `use nnsight::prelude::*;`.
pub mod prelude {
    pub use nnsight_macros::{edit, generate, scan, trace};
    pub use nnsight_runtime::{Cache, CacheOptions, Error, HookModule, Hooked, InPlaceArith, Leaf, ModuleTree, Proxy, RunWithCache, Saved, Tracer};
    pub use tch::{self, Device, IndexOp, Kind, Tensor};
}

/// The README's code, run by `cargo test --doc` (the first experiment must keep working).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
