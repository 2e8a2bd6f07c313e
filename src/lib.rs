pub use nnsight_runtime::*;
