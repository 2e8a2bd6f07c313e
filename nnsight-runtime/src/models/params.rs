//! How the bundled models create their weights, so that a loader can compare every shape with
//! the checkpoint before anything is allocated.
//!
//! Model constructors create variables only through [`param`], [`embedding`] and
//! [`layer_norm`], and declare other config-sized tensors they compute at build time with
//! [`buffer`]. Normally these are `nn::Path::var`, `nn::embedding` and `nn::layer_norm`.
//! During a [`dry_run`] they allocate nothing: each variable's name and shape go to a check
//! (the loader compares them with the safetensors header), and the constructor gets a stride-0
//! view of a single zero in its place. The first failed check ends the dry run at once
//! (unwinding with a private payload, as the interleaver ends a forward pass early), so a config
//! asking for 10^7 layers stops at the first layer the checkpoint lacks, and a vocabulary of
//! 10^12 stops at the embedding.
//!
//! A constructor that creates a variable some other way (`p.zeros(..)`) is caught by the dry
//! run: the variable appears in its `VarStore`, and [`dry_run`] reports it by name.

use std::cell::RefCell;
use std::panic;

use tch::{nn, Tensor};

use crate::error::{catch_quiet, Error, Result};

/// What a constructor is about to allocate, as the dry run's check sees it.
#[derive(Debug)]
pub enum Planned<'a> {
    /// A variable: its full name (`transformer.h.0.attn.c_attn.weight`) and shape.
    Weight {
        /// Full variable name.
        name: &'a str,
        /// Shape.
        shape: &'a [i64],
    },
    /// A tensor computed from the config at build time (rotary frequency tables): its name and
    /// number of elements.
    Buffer {
        /// Full name.
        name: &'a str,
        /// Number of elements.
        elements: i64,
    },
}

/// The check of a running dry run, and its first error.
struct DryRun {
    check: Box<dyn FnMut(Planned<'_>) -> Result<()>>,
    error: Option<Error>,
}

thread_local! {
    static DRY_RUN: RefCell<Option<DryRun>> = const { RefCell::new(None) };
}

/// Unwind payload that ends a dry run at its first failed check.
struct Stop;

/// Hands `planned` to the running dry run's check; `None` when no dry run is on (allocate for
/// real), `Some(())` when the check passed. A failed check ends the dry run by unwinding.
fn plan(planned: Planned<'_>) -> Option<()> {
    let failed = DRY_RUN.with(|d| {
        let mut d = d.borrow_mut();
        let run = d.as_mut()?;
        match (run.check)(planned) {
            Ok(()) => Some(false),
            Err(e) => {
                run.error.get_or_insert(e);
                Some(true)
            }
        }
    })?;
    if failed {
        panic::resume_unwind(Box::new(Stop));
    }
    Some(())
}

/// A stand-in for a planned weight: one zero seen through a stride-0 view of `shape`.
fn stand_in(p: &nn::Path, shape: &[i64]) -> Tensor {
    Tensor::zeros([], (p.kind(), p.device())).expand(shape, false)
}

/// The variable `name` of `shape` under `p`, initialised by `init` (zeros for weights a
/// checkpoint fills). In a dry run: checked, not allocated.
pub fn param(p: &nn::Path, name: &str, shape: &[i64], init: nn::Init) -> Tensor {
    match plan(Planned::Weight { name: &p.path(name), shape }) {
        Some(()) => stand_in(p, shape),
        None => p.var(name, shape, init),
    }
}

/// `nn::embedding` `[rows, dim]` at `p` (variable `weight`).
pub fn embedding(p: &nn::Path, rows: i64, dim: i64, config: nn::EmbeddingConfig) -> nn::Embedding {
    let shape = [rows, dim];
    match plan(Planned::Weight { name: &p.path("weight"), shape: &shape }) {
        Some(()) => {
            // tch's `Embedding` keeps its config private: build an empty one elsewhere, then
            // give it the stand-in.
            let scratch = nn::VarStore::new(tch::Device::Cpu);
            let mut e = nn::embedding(scratch.root(), 0, 0, config);
            e.ws = stand_in(p, &shape);
            e
        }
        None => nn::embedding(p, rows, dim, config),
    }
}

/// `nn::layer_norm` over `[dim]` at `p` (variables `weight`, `bias` when `elementwise_affine`).
pub fn layer_norm(p: &nn::Path, dim: i64, config: nn::LayerNormConfig) -> nn::LayerNorm {
    if !config.elementwise_affine {
        return nn::layer_norm(p, vec![dim], config);
    }
    let shape = [dim];
    let planned = plan(Planned::Weight { name: &p.path("weight"), shape: &shape })
        .and_then(|()| plan(Planned::Weight { name: &p.path("bias"), shape: &shape }));
    match planned {
        Some(()) => {
            let mut ln = nn::layer_norm(p, vec![dim], nn::LayerNormConfig { elementwise_affine: false, ..config });
            ln.ws = Some(stand_in(p, &shape));
            ln.bs = Some(stand_in(p, &shape));
            ln
        }
        None => nn::layer_norm(p, vec![dim], config),
    }
}

/// Declares a tensor of `elements` numbers that the constructor computes from the config at
/// build time (`p`/`name` names it in errors). A dry run checks it is no larger than the
/// checkpoint; otherwise nothing happens.
pub fn buffer(p: &nn::Path, name: &str, elements: i64) {
    plan(Planned::Buffer { name: &p.path(name), elements });
}

/// Runs a model constructor; a panic in it (tch's, when allocating a weight fails) becomes
/// [`Error::Load`] naming `what` (the model folder, or the config's description).
pub fn building<M>(what: &str, build: impl FnOnce() -> Result<M>) -> Result<M> {
    catch_quiet(build).map_err(|m| Error::Load { path: what.to_string(), message: format!("building the model failed: {m}") })?
}

/// Runs the constructor `build` on a `VarStore` that must stay empty, with every weight
/// handed to `check` instead of being allocated (see the module docs).
///
/// Returns the first error `check` gave, else `build`'s error (or its panic, as
/// [`Error::Load`] naming `path`, the model folder), else an [`Error::Load`] naming a variable
/// that `build` created without going through this module.
pub fn dry_run<T>(
    path: &str,
    check: impl FnMut(Planned<'_>) -> Result<()> + 'static,
    build: impl FnOnce(&nn::Path) -> Result<T>,
) -> Result<()> {
    struct Restore(Option<DryRun>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DRY_RUN.with(|d| *d.borrow_mut() = self.0.take());
        }
    }
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let previous = DRY_RUN.with(|d| d.replace(Some(DryRun { check: Box::new(check), error: None })));
    let restore = Restore(previous);
    let built = catch_quiet(|| build(&vs.root()).map(drop));
    let error = DRY_RUN.with(|d| d.borrow_mut().as_mut().and_then(|r| r.error.take()));
    drop(restore);
    if let Some(e) = error {
        return Err(e);
    }
    let load_error = |message: String| Error::Load { path: path.to_string(), message };
    built.map_err(|m| load_error(format!("building the model failed: {m}")))??;
    let mut stray: Vec<String> = vs.variables().into_keys().collect();
    stray.sort();
    match stray.first() {
        Some(name) => Err(load_error(format!(
            "variable `{name}` was created without `models::params` (use `params::param`), so its shape was not \
             checked against the checkpoint before allocating"
        ))),
        None => Ok(()),
    }
}
