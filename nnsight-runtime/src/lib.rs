//! Runtime of nnsight-rs: the intervention graph, the interleaver that runs it alongside a tch
//! model's forward pass, hook points for tch modules, and the bundled models.
//!
//! The design follows nnsight's intervention module (deferred, data-driven execution of an
//! intervention graph; counter-based injection per module and call; batch narrowing across
//! invokes): see the guide chapter "How it works" (`nnsight::guide::how_it_works`).

pub mod activation;
pub mod bundled;
pub mod cache;
pub mod edits;
pub mod error;
pub mod generation;
pub mod graph;
pub mod harvest;
pub mod hook;
pub mod inplace;
pub mod interleave;
pub mod language_model;
pub mod models;
pub mod proxy;
pub mod resolve;
pub mod sae;
pub mod tensor_hook;
pub mod text_invoke;
pub mod traced;
pub mod tracer;
pub mod tree;

pub use cache::{Cache, CacheOptions, RunWithCache};
pub use activation::{Activation, LeafPairs, Leaves, Layout, Refusal, Rows, Split};
pub use error::{Error, Result};
pub use generation::{GenerateOptions, Generator, Prompt};
pub use graph::Io;
pub use hook::{AsModule, HookModule, Hooked, Leaf, ModuleList};
pub use inplace::InPlaceArith;
pub use interleave::{is_tracing, HookPointLayout, Outcome};
pub use language_model::{LanguageModel, TextBatch, TextModel};
pub use models::bert::{Bert, BertConfig};
pub use proxy::{NodeId, Proxy, ProxyRef, Saved, SavedIfRan};
pub use text_invoke::TextInvoke;
pub use tensor_hook::{live_grad_hooks, register_grad_hook, retain_grad, retains_grad, GradHook, GradHooks};
pub use resolve::{Resolve, SwapValue};
pub use sae::{Sae, SaeConfig};
pub use traced::{IntoInvoke, Traced};
pub use tracer::{Call, Group, Tracer};
pub use tree::{trace_path, ModuleTree};
pub use nnsight_macros::ModuleTree;
pub use tch;
pub use tokenizers;
#[doc(hidden)]
pub mod private;
#[doc(hidden)]
pub use private as __private;
