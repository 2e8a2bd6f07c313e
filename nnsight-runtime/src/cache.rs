//! Activation caches: the output (and optionally the input) of every module call, or of the
//! modules under chosen path prefixes, recorded in one traced forward pass into a map keyed by
//! module path. TransformerLens' `run_with_cache`, nnsight's `tracer.cache()`.
//!
//! ```ignore
//! use nnsight::prelude::*;   // RunWithCache, CacheOptions, Cache
//!
//! let model = nnsight::bundled::minilm()?;
//! let (out, cache) = model.run_with_cache("Hello world", CacheOptions::only(["encoder.layer.3"]))?;
//! assert_eq!(out.size(), vec![1, 4, 384]);                          // last_hidden_state
//! assert_eq!(cache["encoder.layer.3.attention.self.query"].size(), vec![1, 4, 384]);
//! assert!(cache.keys().all(|k| k.starts_with("encoder.layer.3")));
//! # Ok::<(), nnsight::Error>(())
//! ```
//!
//! **What is recorded.** For each recorded module call, one tensor: the first tensor of the
//! module's output (for the bundled models, the output itself), and with
//! [`CacheOptions::inputs`] the first tensor of its first argument (what `.input` reads). The
//! values are those the model goes on with: after the swaps and in-place edits the same trace
//! makes at that hook point, so an intervention shows in the cache at its module and downstream.
//! A later in-place edit of the trace that overlaps a recorded value (an edit of the next
//! module's `.input`, which is the same tensor) does not change it: it is copied first, as saved
//! values are. The root module (the whole model, path `""`) is not recorded: its output is the
//! model's output, which [`RunWithCache::run_with_cache`] returns.
//!
//! **Modules called several times** (a module applied twice per forward pass, generation steps)
//! keep every call: [`Cache::get`] is call 0, [`Cache::calls`] every call in order
//! (`calls(path)[i]` is call `i`).
//!
//! **In `trace!` and `generate!`**: the option `cache = &mut slot` (`slot: Option<Cache>`),
//! with `cache_options = CacheOptions { .. }`, records every row and fills `slot` after the run.
//!
//! **Invokes.** A cache belongs to one batch group ([`Tracer::cache`]): it holds that invoke's
//! rows of every tensor that is split by rows (the same narrowing as a hook read; a tensor that
//! every row shares comes whole), or the whole batch for [`Group::ALL`].
//!
//! **Memory.** One tensor per recorded module call (and per input, with `inputs`). All 96
//! modules of MiniLM below the root, for a 14-token sentence: `bytes()` is 3.2 MB in f32 (about
//! 230 KB per token); a `[batch, seq, hidden]` output costs `batch × seq × hidden × bytes per element`
//! per module and call. Without a conversion the entries are views of the model's own
//! activations, which the cache keeps alive (nothing is copied); [`Cache::bytes`] adds up the
//! recorded tensors (a tensor recorded under two paths, like a module's output that its parent
//! returns unchanged, counts once per path).

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::hook::{AsModule, HookModule};
use crate::proxy::{NodeId, Saved};
use crate::traced::{IntoInvoke, Traced};
use crate::tracer::{Call, Group, Tracer};
use crate::tree::ModuleTree;

/// What a cache records: which modules, inputs or not, and conversions. `Default` records the
/// output of every module below the root, as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheOptions {
    /// Module-path prefixes: a module is recorded when its path is a prefix or starts with a
    /// prefix followed by `.` (`"encoder.layer.3"` selects layer 3 and its submodules, not
    /// `encoder.layer.30`). Empty: every module. A prefix that matches no module path is
    /// [`Error::Input`] (naming it and the closest paths) before the model runs.
    pub modules: Vec<String>,
    /// Also record each module's first input (`.input`), read with [`Cache::input`].
    pub inputs: bool,
    /// Move every recorded tensor to this device (a copy per tensor on another device).
    pub to_device: Option<Device>,
    /// Convert every recorded tensor to this dtype (a copy per tensor of another dtype):
    /// `Float`, `Half`, `BFloat16` or `Double`; another kind is [`Error::Input`] before the run.
    pub to_kind: Option<Kind>,
    /// Record copies instead of views of the model's activations (needed only for a model
    /// that changes its own activations in place after a module returned them; without it that
    /// is [`Error::SavedChanged`]). Costs a copy per recorded tensor.
    pub copy: bool,
}

impl CacheOptions {
    /// Every module under these path prefixes (see [`CacheOptions::modules`]).
    pub fn only<S: Into<String>>(prefixes: impl IntoIterator<Item = S>) -> Self {
        CacheOptions { modules: prefixes.into_iter().map(Into::into).collect(), ..Default::default() }
    }
}

/// A cache asked for in a trace, with the modules it selects (resolved before the run).
pub(crate) struct Request {
    /// The saved node that receives the [`Cache`] (set by `Tracer::add_cache`).
    pub node: NodeId,
    /// The batch group.
    pub group: usize,
    prefixes: Vec<String>,
    pub inputs: bool,
    pub device: Option<Device>,
    pub kind: Option<Kind>,
    pub copy: bool,
    /// The selected module paths in the model's module order.
    pub order: Vec<String>,
}

/// Whether `path` is `prefix` or below it.
fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty() || path == prefix || (path.len() > prefix.len() && path.starts_with(prefix) && path.as_bytes()[prefix.len()] == b'.')
}

/// Levenshtein distance in bytes (module paths are ASCII).
fn distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, &x) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(x != y)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Request {
    /// Checks `options` against the model's module paths (`modules`, as
    /// [`ModuleTree::modules`] lists them).
    pub(crate) fn new(options: &CacheOptions, modules: &[(String, &'static str)]) -> Result<Request> {
        let paths: Vec<&str> = modules.iter().map(|(p, _)| p.as_str()).filter(|p| !p.is_empty()).collect();
        let prefixes: Vec<String> = options.modules.iter().map(|p| p.trim_end_matches('.').to_string()).collect();
        for (p, given) in prefixes.iter().zip(&options.modules) {
            if paths.iter().any(|path| under(path, p)) {
                continue;
            }
            // Candidates: every path and every list or parent above one (`encoder.layer`).
            let mut cands: Vec<&str> = Vec::new();
            for path in &paths {
                for (i, _) in path.match_indices('.') {
                    cands.push(&path[..i]);
                }
                cands.push(path);
            }
            let mut seen = std::collections::HashSet::new();
            cands.retain(|c| seen.insert(*c));
            cands.sort_by_key(|c| distance(p, c));
            let close: Vec<String> = cands.iter().take(5).map(|c| format!("`{c}`")).collect();
            return Err(Error::Input(format!(
                "cache: no module path is `{given}` or starts with `{p}.`; the closest paths: {} (`model.modules()` lists them all)",
                if close.is_empty() { "none, the model has no modules below the root".to_string() } else { close.join(", ") }
            )));
        }
        if let Some(d @ Device::Cuda(i)) = options.to_device {
            if !tch::Cuda::is_available() || i >= tch::Cuda::device_count() as usize {
                return Err(Error::Device(format!(
                    "cache: `to_device` {d:?} is not available here ({} CUDA device(s) usable by this libtorch)",
                    if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 }
                )));
            }
        }
        if let Some(k) = options.to_kind {
            if !matches!(k, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
                return Err(Error::Input(format!(
                    "cache: `to_kind` {k:?} would truncate activations; convert to Float, Half, BFloat16 or Double"
                )));
            }
        }
        let mut req = Request {
            node: 0,
            group: 0,
            prefixes,
            inputs: options.inputs,
            device: options.to_device,
            kind: options.to_kind,
            copy: options.copy,
            order: Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        req.order = paths.into_iter().filter(|p| req.wants(p) && seen.insert(*p)).map(str::to_string).collect();
        Ok(req)
    }

    /// Whether this cache records the module at `path` (never the root, path `""`).
    pub(crate) fn wants(&self, path: &str) -> bool {
        !path.is_empty() && (self.prefixes.is_empty() || self.prefixes.iter().any(|p| under(path, p)))
    }
}

/// The recorded values of one cache, keyed by module path (`"encoder.layer.3.attention.output"`,
/// the checkpoint names), in the model's module order (parents before children, field order,
/// as [`ModuleTree::modules`] lists them; modules that did not run are absent).
///
/// Each entry is one tensor per module call, e.g. `[batch, seq, hidden]` for a BERT layer's
/// output, with the cache's invoke's rows only. See the [module docs](self) for what is
/// recorded and its memory.
#[derive(Default)]
pub struct Cache {
    order: Vec<String>,
    outputs: HashMap<String, Vec<Tensor>>,
    inputs: HashMap<String, Vec<Tensor>>,
}

impl Cache {
    pub(crate) fn with_order(order: Vec<String>) -> Cache {
        Cache { order, ..Default::default() }
    }

    /// Adds call `_call`'s value (calls arrive in order).
    pub(crate) fn push(&mut self, path: &str, input: bool, _call: usize, t: Tensor) {
        if !input && !self.outputs.contains_key(path) && !self.order.iter().any(|p| p == path) {
            self.order.push(path.to_string()); // a hooked module the module tree does not list
        }
        let map = if input { &mut self.inputs } else { &mut self.outputs };
        map.entry(path.to_string()).or_default().push(t);
    }

    /// Drops the paths that recorded no output from the order.
    pub(crate) fn finish(mut self) -> Cache {
        let outputs = &self.outputs;
        self.order.retain(|p| outputs.contains_key(p));
        self
    }

    /// The output of call 0 of the module at `path` (e.g. `[batch, seq, hidden]`); `None` when
    /// the cache did not record it.
    pub fn get(&self, path: &str) -> Option<&Tensor> {
        self.outputs.get(path).and_then(|v| v.first())
    }

    /// The outputs of every call of the module at `path`, in call order (`[i]` is call `i`);
    /// empty when not recorded.
    pub fn calls(&self, path: &str) -> &[Tensor] {
        self.outputs.get(path).map_or(&[], Vec::as_slice)
    }

    /// The first input (`.input`) of call 0 of the module at `path`; recorded only with
    /// [`CacheOptions::inputs`].
    pub fn input(&self, path: &str) -> Option<&Tensor> {
        self.inputs.get(path).and_then(|v| v.first())
    }

    /// The first inputs of every call of the module at `path`, in call order.
    pub fn input_calls(&self, path: &str) -> &[Tensor] {
        self.inputs.get(path).map_or(&[], Vec::as_slice)
    }

    /// Whether the module at `path` has a recorded output.
    pub fn contains(&self, path: &str) -> bool {
        self.outputs.contains_key(path)
    }

    /// The module paths with a recorded output, in module order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.order.iter().map(String::as_str)
    }

    /// `(path, outputs of every call)` in module order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Tensor])> + '_ {
        self.order.iter().map(|p| (p.as_str(), self.calls(p)))
    }

    /// Number of module paths with a recorded output.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Bytes of every recorded tensor, outputs and inputs of every call (`numel × element
    /// size`; a tensor recorded twice counts twice).
    pub fn bytes(&self) -> usize {
        self.outputs
            .values()
            .chain(self.inputs.values())
            .flatten()
            .filter(|t| t.defined())
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}

/// `cache["path"]`: the output of call 0; panics when not recorded (use [`Cache::get`] to
/// test).
impl std::ops::Index<&str> for Cache {
    type Output = Tensor;
    fn index(&self, path: &str) -> &Tensor {
        self.get(path).unwrap_or_else(|| panic!("the cache has no output of `{path}` (recorded: {} modules)", self.len()))
    }
}

impl<'a> IntoIterator for &'a Cache {
    type Item = (&'a str, &'a [Tensor]);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a [Tensor])> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl std::fmt::Debug for Cache {
    /// `Cache { "encoder.layer.0": [Tensor[1, 4, 384] Float Cpu], .. }`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (p, ts) in self.iter() {
            let d: Vec<String> = ts.iter().map(crate::activation::describe_tensor).collect();
            m.entry(&p, &d);
        }
        m.finish()
    }
}

impl<'env, M: ?Sized + Traced + ModuleTree> Tracer<'env, M> {
    /// Records an activation cache of batch group `group` (an invoke, or [`Group::ALL`]) in
    /// this trace's run: the output (and with `options.inputs` the first input) of every call
    /// of every selected module, after this trace's interventions, narrowed to the group's rows
    /// (see [`crate::cache`]). Hand the returned ticket to [`Tracer::finish`] (alone or in a
    /// tuple) to get the [`Cache`]. In `trace!` and `generate!`, the option
    /// `cache = &mut slot` (an `Option<Cache>`, with `cache_options = ..`) calls this with
    /// [`Group::ALL`] and stores the cache in `slot` after a successful run.
    ///
    /// Errors, from `finish` before the model runs: [`Error::Input`] for a prefix that matches
    /// no module path (naming it and the closest paths) or a group that is not an invoke,
    /// [`Error::Device`] for a CUDA `to_device` this machine lacks. While running: a declared
    /// layout that does not fit ([`Error::Layout`]), and [`Error::SavedChanged`] for a recorded
    /// view that was changed in place afterwards by something other than an edit.
    ///
    /// ```ignore
    /// let mut tr = Tracer::new(&model);
    /// let g = tr.invoke(x);
    /// let cache = tr.cache(g, CacheOptions::default());
    /// let cache: Cache = tr.finish(cache)?;
    /// ```
    #[track_caller]
    pub fn cache(&mut self, group: Group, options: CacheOptions) -> Saved<Cache> {
        let request = Request::new(&options, &self.model().modules());
        self.add_cache(group, request)
    }
}

/// `model.run_with_cache(input, options)` for every traceable model with a module tree (the
/// bundled models, `Hooked` tensor models of your own).
pub trait RunWithCache: Traced + ModuleTree + AsModule + Sized {
    /// Runs the model once on `input` and returns its output (bit-identical to a plain forward
    /// pass: e.g. `last_hidden_state [1, seq, hidden]` for BERT) with an activation cache of
    /// the modules `options` selects ([`Tracer::cache`]; errors as there, and as a trace's).
    /// Runs under `no_grad`.
    fn run_with_cache<I: IntoInvoke<Self>>(&self, input: I, options: CacheOptions) -> Result<(<Self::Module as HookModule>::Output, Cache)> {
        let mut tr = Tracer::new(self);
        let g = tr.invoke(input);
        let out = tr.output(g, Call::At(0), || Ok(self));
        let out = tr.save(out);
        let cache = tr.cache(g, options);
        tr.finish((out, cache))
    }
}

impl<T: Traced + ModuleTree + AsModule> RunWithCache for T {}
