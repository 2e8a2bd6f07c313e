//! The interleaver: runs an intervention graph alongside the model's forward pass.
//!
//! While a run is active, a thread-local points at the `Interleaver`. Every
//! [`Hooked::call`](crate::Hooked::call) asks it whether its module is traced (one hash lookup,
//! nothing else for modules nobody asked for). For traced modules it counts the call (counters
//! are per module) and processes the effects registered for that hook point and call index, in
//! creation order: reads hand a batch group's share of the value to hook nodes, which then run
//! every node whose inputs are all there; swaps splice a node's value back into the group's
//! rows; edits must have run before the module returns. A node's value is freed as soon as its
//! last listener has run, unless it is saved.
//!
//! How a value is shared out among batch groups follows the module's declared [`Layout`] (see
//! [`crate::activation`]). A group is one invoke's rows, or every row for statements written
//! outside the invokes ([`Group::ALL`]). When one invoke among several reads a value that every
//! row shares, it gets a private copy whose libtorch version counter is watched (module
//! `shared`): an in-place edit of it is refused with [`Error::SharedChange`] instead of
//! silently changing the other invokes' values.
//!
//! Errors and `.stop()` end the forward pass by unwinding to `Interleaver::run` with a private
//! payload; the thread-local is reset by a guard, so nothing stays hooked whatever happens.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;

use tch::Tensor;
use crate::activation::{self, Activation, Layout, Narrow, Refusal, Rows};
use crate::error::{panic_message, Error, QuietGuard, Result};
use crate::graph::{AddrMap, Effect, EffectKind, Graph, Io, NodeKind, Part, Value};
use crate::hook::{HookModule, Hooked};
use crate::proxy::NodeId;
use crate::tensor_hook::GradHooks;
use crate::tracer::Group;

mod audit;
mod cache;
mod grad;
mod outcome;
mod saved;
mod shared;

pub use audit::HookPointLayout;
pub use outcome::Outcome;

thread_local! {
    static ACTIVE: Cell<*const ()> = const { Cell::new(std::ptr::null()) };
    /// While an intervention node runs (`ACTIVE` is null then): the interleaver, for the calls
    /// of helper modules (`Graph::helpers`), which are traced there.
    static HELPER: Cell<*const ()> = const { Cell::new(std::ptr::null()) };
}

/// Resets the helper pointer when dropped.
struct HelperGuard(*const ());

impl Drop for HelperGuard {
    fn drop(&mut self) {
        HELPER.with(|a| a.set(self.0));
    }
}

/// Payload of the unwind that ends a forward pass early (error or `.stop()`).
struct Interrupt;

/// State of a node's value during a run.
pub(crate) enum Slot {
    Empty,
    Ready(Value),
    Skipped,
    Freed,
    /// Moved out by `Outcome::take` (a saved value of a type that cannot be shared).
    Taken,
}

struct RunState {
    slots: Vec<Slot>,
    waiting: Vec<usize>,
    uses_left: Vec<usize>,
    /// Calls seen so far, per traced module.
    counters: AddrMap<usize>,
    error: Option<Error>,
    stop_requested: Option<NodeId>,
    /// Backward hooks on activation tensors (for `.grad`), removed when the run ends.
    grad_hooks: GradHooks,
    /// The backward pass running now: set while a node marked as calling `.backward()` runs
    /// (read by the backward hooks, on whatever thread libtorch runs them).
    backward_pass: Option<usize>,
    /// Private copies of shared values handed to one invoke among several (see [`shared`]).
    watched: Vec<shared::Watched>,
    /// Saved values whose version counters are watched (see [`saved`]).
    guarded: Vec<saved::Guard>,
    /// Copies of saved values taken before an edit changed their memory (see [`saved`]).
    snapshots: Vec<(NodeId, Value)>,
    /// Copies of values taken just before an edit changed their memory, for the nodes built
    /// before that edit that had not run yet: `(value's node) -> [(edit node, copy)]`.
    pre_edit: std::collections::HashMap<NodeId, Vec<(NodeId, Value)>>,
}

/// Batch layout of a run: each invoke's `(start, rows)` and the total batch size.
#[derive(Clone, Debug)]
pub(crate) struct Batch {
    pub groups: Vec<(i64, i64)>,
    pub total: i64,
}

impl Batch {
    /// The rows of batch group `group` (every row for [`Group::ALL`]).
    pub(crate) fn rows(&self, group: usize) -> Rows {
        match self.groups.get(group) {
            Some(&(start, len)) => Rows::new(start, len, self.total),
            None => Rows::all(self.total),
        }
    }
}

pub(crate) struct Interleaver<'env> {
    graph: RefCell<Graph<'env>>,
    state: RefCell<RunState>,
    batch: Batch,
    /// Autograd on for this run.
    grad: bool,
    /// Set for [`Interleaver::audit`]: every module's hook points are recorded, none changed.
    audit: Option<RefCell<Vec<HookPointLayout>>>,
    /// The activation caches of this run (module [`cache`]).
    cache: RefCell<cache::Recorder>,
}

/// Unwraps a swap's value into the hook point's type; `node` names the node for the error only.
fn activation_from<T: Activation>(v: Value, node: impl FnOnce() -> String) -> Result<T> {
    let rc = v.downcast::<T>().map_err(|_| Error::Node {
        node: node(),
        message: format!("internal: value is not a {}", std::any::type_name::<T>()),
    })?;
    Ok(Rc::try_unwrap(rc).unwrap_or_else(|rc| rc.shallow()))
}

/// Resets the thread-local pointer when dropped, also while unwinding.
struct ActiveGuard(*const ());

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.0));
    }
}

/// True while a traced forward pass runs on this thread (and not inside an intervention).
pub fn is_tracing() -> bool {
    ACTIVE.with(|a| !a.get().is_null())
}

/// Entry point of every hooked module call. See the module docs.
pub(crate) fn module_call<M: HookModule>(m: &Hooked<M>, input: M::Input) -> M::Output {
    let p = ACTIVE.with(Cell::get);
    if p.is_null() {
        let h = HELPER.with(Cell::get);
        if h.is_null() {
            return m.inner().forward(input);
        }
        // SAFETY: `HELPER` is only non-null while `Interleaver::execute` runs a node on this
        // thread with the interleaver alive; its guard resets it when the node returns.
        let il = unsafe { &*(h as *const Interleaver<'static>) };
        if !il.graph.borrow().helpers.contains(&m.key()) {
            return m.inner().forward(input);
        }
        return traced_call(il, m, input);
    }
    // SAFETY: `ACTIVE` is only non-null while `Interleaver::drive` is on this thread's stack
    // with the interleaver alive; the guard resets it before the interleaver is dropped.
    let il = unsafe { &*(p as *const Interleaver<'static>) };
    traced_call(il, m, input)
}

/// A module call the interleaver sees: input hook, skip or forward, output hook.
fn traced_call<M: HookModule>(il: &Interleaver<'_>, m: &Hooked<M>, input: M::Input) -> M::Output {
    let key = m.key();
    match il.enter(key, m.path()) {
        None => located(m.path(), None, || m.inner().forward(input)),
        Some(call) => {
            let input = il.hook(key, Io::Input, call, input, || m.input_layout(), m.path());
            let out = match il.skip_output::<M::Input, M::Output>(key, call, &input, m.output_layout()) {
                Some(out) => out,
                None => located(m.path(), Some(call), || m.inner().forward(input)),
            };
            il.hook(key, Io::Output, call, out, || m.output_layout(), m.path())
        }
    }
}

/// A panic out of a module's own forward code during a traced run (a libtorch shape error, say,
/// after a swap or skip gave the module a value it cannot take), with the innermost module it
/// came from: [`crate::error::panic_message`] writes "in module `path` (call c): message".
pub(crate) struct ModuleFailure {
    pub path: String,
    pub call: Option<usize>,
    pub message: String,
}

/// Runs a module's forward; a panic out of it (not an interrupt, and not one an inner module
/// already located) unwinds on as a [`ModuleFailure`] naming this module. The root (path
/// `""`) adds nothing: its own code is the model's.
fn located<T>(path: &str, call: Option<usize>, forward: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(AssertUnwindSafe(forward)) {
        Ok(v) => v,
        Err(p) if path.is_empty() || p.is::<Interrupt>() || p.is::<ModuleFailure>() => panic::resume_unwind(p),
        Err(p) => panic::resume_unwind(Box::new(ModuleFailure { path: path.to_string(), call, message: panic_message(&*p) })),
    }
}

impl<'env> Interleaver<'env> {
    fn new(mut graph: Graph<'env>, batch: Batch, grad: bool) -> Self {
        graph.settle_passes();
        let cache = RefCell::new(cache::Recorder::new(std::mem::take(&mut graph.caches)));
        let n = graph.nodes.len();
        let waiting = graph.nodes.iter().map(|n| n.args.len() + n.gates.len()).collect();
        let uses_left = graph.nodes.iter().map(|n| n.listeners.len() + n.swap_uses).collect();
        let counters = graph.modules.keys().map(|&k| (k, 0)).collect();
        let state = RunState {
            slots: (0..n).map(|_| Slot::Empty).collect(),
            waiting,
            uses_left,
            counters,
            error: None,
            stop_requested: None,
            grad_hooks: GradHooks::new(),
            backward_pass: None,
            watched: Vec::new(),
            guarded: Vec::new(),
            snapshots: Vec::new(),
            pre_edit: std::collections::HashMap::new(),
        };
        Interleaver { graph: RefCell::new(graph), state: RefCell::new(state), batch, grad, audit: None, cache }
    }

    /// Runs `forward` with this interleaver active on this thread; a panic (or an interrupt)
    /// inside it comes back as `Err(payload)`.
    fn drive(&self, forward: impl FnOnce() -> Result<()>) -> std::thread::Result<Result<()>> {
        let prev = ACTIVE.with(|a| a.replace(self as *const Interleaver<'env> as *const ()));
        let _guard = ActiveGuard(prev);
        let grad = self.grad;
        panic::catch_unwind(AssertUnwindSafe(|| {
            // A guard, not `tch::no_grad(..)`: autograd must come back on also when an
            // error or `.stop()` unwinds out of the forward pass.
            let _no_grad = (!grad).then(tch::no_grad_guard);
            forward()
        }))
    }

    /// Runs `forward` with this graph interleaved. `grad`: keep autograd on (traces that call
    /// `.backward()` or read `.grad`); otherwise the forward runs under `no_grad`.
    /// `lenient` is asked after the forward pass whether hook points that never ran are expected.
    pub(crate) fn run(
        graph: Graph<'env>,
        batch: Batch,
        grad: bool,
        lenient: &dyn Fn() -> bool,
        forward: impl FnOnce() -> Result<()>,
    ) -> Result<Outcome> {
        let il = Interleaver::new(graph, batch, grad);
        let _quiet = QuietGuard::new();
        // Nodes that need no hook value (constants, closures over outside values) run first.
        let roots: Vec<NodeId> = {
            let g = il.graph.borrow();
            (0..g.nodes.len())
                .filter(|&i| matches!(g.nodes[i].kind, NodeKind::Apply(_)) && g.nodes[i].args.is_empty() && g.nodes[i].gates.is_empty())
                .collect()
        };
        for r in roots {
            il.execute(r)?;
            il.settle(r)?;
        }

        let result = il.drive(forward);

        // No backward hook may outlive the run (they point at `il`).
        let removed = il.state.borrow_mut().grad_hooks.remove_all();
        let shared = il.check_shared(None);
        let saved = il.check_saved(|| {
            "after the last hook point with an intervention (by the model's forward pass, or by a backward pass)".to_string()
        });
        let caches = il.take_caches();
        let mut state = il.state.into_inner();
        let mut graph = il.graph.into_inner();
        removed?;
        if let Some(e) = state.error.take() {
            return Err(e);
        }
        let stopped_at = state.stop_requested.map(|id| graph.nodes[id].name(id));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(payload) => {
                if payload.downcast_ref::<Interrupt>().is_none() {
                    return Err(Error::Model(panic_message(&*payload)));
                }
            }
        }
        shared?;
        saved?;
        let caches = caches?;
        if stopped_at.is_none() && !lenient() {
            // A skip of a call that never happened did nothing: an error, as a read of it is.
            for (&module, m) in &graph.modules {
                for e in m.side(Io::Output) {
                    if let EffectKind::Skip(_) = e.kind {
                        let ran = state.counters.get(&module).copied().unwrap_or(0);
                        if e.call >= ran {
                            let reason = if ran == 0 {
                                "the module did not run, so `.skip()` skipped nothing".to_string()
                            } else {
                                format!("the module ran only {ran} time(s) in this run, so `.skip()` skipped nothing")
                            };
                            return Err(Error::NeverProvided { point: graph.point_name(module, Io::Output), call: e.call, reason });
                        }
                    }
                }
            }
            for (id, n) in graph.nodes.iter().enumerate() {
                if let (NodeKind::Grad { of, pass, .. }, Slot::Empty) = (&n.kind, &state.slots[id]) {
                    if let NodeKind::Hook { module, io, call, .. } = graph.nodes[*of].kind {
                        let reason = match graph.backward.get(*pass) {
                            Some(&b) => format!(
                                "the backward pass of node {} never reached it (that node did not run, or its value does not \
                                 depend on this activation). A `.grad` read refers to the first `.backward()` written after it, \
                                 or to the last one when none follows",
                                graph.nodes[b].name(b)
                            ),
                            None => format!(
                                "backward pass {pass} never reached it (call `.backward()` on a value computed from this activation)"
                            ),
                        };
                        return Err(Error::NeverProvided { point: format!("{}.grad", graph.point_name(module, io)), call, reason });
                    }
                }
                if let (NodeKind::Hook { module, io, call, .. }, Slot::Empty) = (&n.kind, &state.slots[id]) {
                    let ran = state.counters.get(module).copied().unwrap_or(0);
                    let mut reason = if ran == 0 {
                        "the module did not run".to_string()
                    } else {
                        format!("the module ran only {ran} time(s) in this run")
                    };
                    if id < graph.edit_nodes {
                        reason.push_str(
                            "; this read belongs to a persistent edit (`edit!`), replayed into every trace of this model: \
                             `model.clear_edits()` removes it",
                        );
                    }
                    return Err(Error::NeverProvided { point: graph.point_name(*module, *io), call: *call, reason });
                }
            }
        }
        // Labels are only needed for errors about saved values.
        let labels = graph.nodes.iter_mut().map(|n| n.saved.then(|| (std::mem::take(&mut n.label), n.location))).collect();
        drop(graph); // intervention closures and their borrows end here
        Interleaver::use_snapshots(&mut state.slots, std::mem::take(&mut state.snapshots));
        for (id, c) in caches {
            state.slots[id] = Slot::Ready(Rc::new(c));
        }
        Ok(Outcome::new(state.slots, labels, stopped_at))
    }

    /// Counts a call of a traced module; `None` for modules the graph does not use.
    fn enter(&self, key: usize, path: &str) -> Option<usize> {
        let mut st = self.state.borrow_mut();
        let c = match st.counters.get_mut(&key) {
            Some(c) => c,
            None if self.audit.is_some() || self.cache_wants(key, path) => st.counters.entry(key).or_insert(0),
            None => return None,
        };
        let call = *c;
        *c += 1;
        Some(call)
    }

    fn interrupt(&self, err: Error) -> ! {
        {
            let mut st = self.state.borrow_mut();
            if st.error.is_none() {
                st.error = Some(err);
            }
        }
        panic::resume_unwind(Box::new(Interrupt))
    }

    /// A module's input or output: processes this call's effects and returns the value the
    /// model goes on with. `layout` is asked only when the call has effects.
    fn hook<A: Activation>(&self, key: usize, io: Io, call: usize, mut act: A, layout: impl FnOnce() -> Layout, path: &str) -> A {
        if let Some(audit) = &self.audit {
            audit.borrow_mut().push(HookPointLayout::new(path, io, call, &act, layout(), self.batch.total));
            return act;
        }
        let effects: Vec<Effect> = {
            let g = self.graph.borrow();
            match g.modules.get(&key) {
                Some(m) => m.side(io).iter().filter(|e| e.call == call).copied().collect(),
                None => Vec::new(),
            }
        };
        let cached = self.cache_records(key, io, path);
        if effects.is_empty() && !cached {
            return act;
        }
        let layout = layout();
        if !effects.is_empty() && !self.state.borrow().guarded.is_empty() {
            let before = || format!("by the model's forward pass before it reached `{}` (call {call})", self.graph.borrow().point_name(key, io));
            if let Err(err) = self.check_saved(before) {
                self.interrupt(err);
            }
        }
        let mut requires = Vec::new();
        let mut changes = Vec::new();
        for e in effects {
            let r = match e.kind {
                EffectKind::Read(node, part) => self.read(node, part, &act, layout, key, io, &e),
                EffectKind::Swap(node, part) => match self.swap_value(node, key, io, &e) {
                    Ok(None) => Ok(()),
                    Err(err) => Err(err),
                    Ok(Some(v)) => {
                        changes.push(e);
                        self.splice(v, node, part, &act, layout, key, io, &e).map(|new_act| act = new_act)
                    }
                },
                EffectKind::Require(node) => {
                    requires.push((node, e));
                    Ok(())
                }
                // Taken before the forward (see `skip_output`).
                EffectKind::Skip(_) => Ok(()),
            };
            if let Err(err) = r {
                self.interrupt(err);
            }
        }
        for (node, e) in requires {
            let (missing, ran) = {
                let st = self.state.borrow();
                (matches!(st.slots[node], Slot::Empty), !matches!(st.slots[node], Slot::Skipped))
            };
            if missing {
                let err = self.not_ready(node, key, io, &e);
                self.interrupt(err);
            }
            if ran {
                changes.push(e);
            }
        }
        for e in changes {
            if let Err(err) = self.check_order(key, io, &e) {
                self.interrupt(err);
            }
        }
        if cached {
            // After this call's swaps and edits: the cache holds what the model goes on with.
            if let Err(err) = self.record(key, io, call, &act, layout, path) {
                self.interrupt(err);
            }
        }
        if self.state.borrow().stop_requested.is_some() {
            panic::resume_unwind(Box::new(Interrupt));
        }
        act
    }

    /// The output a `.skip(value)` gives this call of the module instead of running its
    /// forward, or `None` when nothing skips it (or the `if` around the skip was false).
    ///
    /// The module runs once for the whole batch, so a skip must cover every row: one invoke
    /// holding the whole batch. The value must have the module's output layout for that batch
    /// (rows on the declared axis) and the device (and, for a floating-point input, the dtype)
    /// of the module's input. Otherwise the run stops with [`Error::Input`] or
    /// [`Error::SwapMismatch`], naming the hook point, the call and the invoke.
    fn skip_output<I: Activation, O: Activation>(&self, key: usize, call: usize, input: &I, layout: Layout) -> Option<O> {
        if self.audit.is_some() {
            return None;
        }
        let effects: Vec<Effect> = {
            let g = self.graph.borrow();
            let m = g.modules.get(&key)?;
            m.output.iter().filter(|e| e.call == call && matches!(e.kind, EffectKind::Skip(_))).copied().collect()
        };
        let mut chosen: Option<(Value, NodeId, Effect)> = None;
        for e in effects {
            let EffectKind::Skip(node) = e.kind else { continue };
            match self.swap_value(node, key, Io::Output, &e) {
                Ok(None) => {}
                Ok(Some(v)) => {
                    if let Some((_, _, first)) = &chosen {
                        let point = self.graph.borrow().point_name(key, Io::Output);
                        if first.group == e.group {
                            self.interrupt(Error::Input(format!(
                                "`.skip()` of `{point}` (call {call}) is written twice for {}: one call can return one value; keep one skip",
                                Group(e.group)
                            )));
                        }
                        self.interrupt(Error::Input(format!(
                            "`.skip()` of `{point}` (call {call}) in {} and in {}: a module runs once for the whole batch, so only a trace with one invoke can skip it",
                            Group(first.group),
                            Group(e.group)
                        )));
                    }
                    chosen = Some((v, node, e));
                }
                Err(err) => self.interrupt(err),
            }
        }
        let (v, node, e) = chosen?;
        if let Err(err) = self.check_order(key, Io::Output, &e) {
            self.interrupt(err);
        }
        let point = || self.graph.borrow().point_name(key, Io::Output);
        let rows = self.batch.rows(e.group);
        if !rows.is_all() {
            self.interrupt(Error::Input(format!(
                "`.skip()` of `{}` (call {call}) in {} covers rows {}..{} of a batch of {}: a module runs once for the whole batch, so every row must skip it; skip in a trace with one invoke",
                point(),
                Group(e.group),
                rows.start,
                rows.start + rows.len,
                rows.total
            )));
        }
        let out = match activation_from::<O>(v, || self.node_name(node)) {
            Ok(o) => o,
            Err(err) => self.interrupt(err),
        };
        // What the forward would have been given: its device, and its dtype when floating.
        let mut like: Option<Tensor> = None;
        input.for_each_tensor(&mut |t| {
            if like.is_none() && t.defined() {
                like = Some(t.shallow_clone());
            }
        });
        let mut problem: Option<(String, String)> = None;
        out.for_each_tensor(&mut |t| {
            if problem.is_some() || !t.defined() {
                return;
            }
            if let Some(x) = &like {
                let kind_differs = x.is_floating_point() && t.is_floating_point() && x.kind() != t.kind();
                if x.device() != t.device() || kind_differs {
                    problem = Some((format!("{:?} on {:?} (the module's input)", x.kind(), x.device()), activation::describe_tensor(t)));
                }
            }
        });
        if problem.is_none() {
            let mut check = RowsCheck { total: rows.total, bad: None };
            if let Err(r) = out.map_leaves(layout, &mut check) {
                let reason = match r {
                    Refusal::Layout(m) | Refusal::Shared(m) => m,
                    Refusal::Mismatch { actual, .. } => actual,
                };
                problem = Some((format!("the output layout {layout} for a batch of {}", rows.total), reason));
            } else if let Some(bad) = check.bad {
                problem = Some((format!("{} rows on the batch axis of {layout}", rows.total), bad));
            }
        }
        if let Some((expected, actual)) = problem {
            self.interrupt(Error::SwapMismatch { point: point(), call, invoke: Group(e.group), expected, actual });
        }
        Some(out)
    }

    /// After change `e` (a swap, skip or edit that ran) at `(key, io, e.call)`: an error
    /// ([`Error::OutOfOrder`]) when a read written before it in the same batch group (the same
    /// invoke, or both outside the invokes) waits for a hook point the model has not reached
    /// yet, and the block uses that read's value as one from before the change
    /// ([`observed_before`]): the block says the read comes first, the model would show it the
    /// change. As in nnsight, where each invoke is a program run in order and the invokes run
    /// side by side: across groups the model's order holds (a statement outside the invokes
    /// changes the rows an invoke reads at a later hook point, wherever that read is written).
    /// Changes alone, written in any order, are a set applied in the model's order (a read
    /// that only feeds an edit or swap written before `e` is part of such a change). Reads
    /// replayed from persistent edits are part of the model; reads of the same point and call
    /// were given the value from before the change already.
    fn check_order(&self, key: usize, io: Io, e: &Effect) -> Result<()> {
        let g = self.graph.borrow();
        let st = self.state.borrow();
        for (&k, m) in &g.modules {
            for (side, reads) in [(Io::Input, &m.input), (Io::Output, &m.output)] {
                for r in reads {
                    let EffectKind::Read(node, _) = r.kind else { continue };
                    // Reads replayed from persistent edits are part of the model, except against
                    // those edits' own changes (an `edit!` block is checked like a trace's).
                    let before_change = node < e.order && (node >= g.edit_nodes || e.order <= g.edit_nodes);
                    // At the changed point itself a read written first got the value from before
                    // the change, except before a skip: that value never exists.
                    let same_point = k == key && side == io && r.call == e.call && !matches!(e.kind, EffectKind::Skip(_));
                    // A skipped module's own modules never run: their reads are never provided.
                    let inside_skip = matches!(e.kind, EffectKind::Skip(_)) && m.path.starts_with(&format!("{}.", g.modules[&key].path));
                    let waiting = matches!(st.slots[node], Slot::Empty);
                    if before_change && !same_point && !inside_skip && r.group == e.group && waiting && observed_before(&g, node, (k, side, r.call), e) {
                        return Err(Error::OutOfOrder {
                            node: g.nodes[node].name(node),
                            point: g.point_name(k, side),
                            call: r.call,
                            invoke: Group(r.group),
                            changed: g.point_name(key, io),
                            changed_call: e.call,
                            changed_invoke: Group(e.group),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands read `node` its group's share of `act` (`.output`/`.inputs`, or `.input`).
    #[allow(clippy::too_many_arguments)]
    fn read<A: Activation>(&self, node: NodeId, part: Part, act: &A, layout: Layout, key: usize, io: Io, e: &Effect) -> Result<()> {
        let rows = self.batch.rows(e.group);
        let refused = |r: Refusal, layout: Layout| self.refused(r, key, io, e, layout, &|| act.describe(), String::new);
        let mut copies = Vec::new();
        let mut narrow = Narrow { rows, copies: (!rows.is_all()).then_some(&mut copies) };
        let value: Value = match part {
            Part::Whole => {
                self.watch_grad(node, act as &dyn Any, layout, e)?;
                let own = act.map_leaves(layout, &mut narrow).map_err(|r| refused(r, layout))?;
                self.guard_saved(node, saved::tensors_of(&own), saved::copy_as::<A>);
                Rc::new(own)
            }
            Part::First => {
                let layout = A::first_layout(layout).map_err(|r| refused(r, layout))?;
                self.watch_grad(node, act.first() as &dyn Any, layout, e)?;
                let own = act.first().map_leaves(layout, &mut narrow).map_err(|r| refused(r, layout))?;
                self.guard_saved(node, saved::tensors_of(&own), saved::copy_as::<A::First>);
                Rc::new(own)
            }
        };
        if !copies.is_empty() {
            self.watch(copies, key, io, e);
        }
        self.provide(node, value)
    }

    /// `act` with swap `node`'s value `v` put in place of the group's rows.
    #[allow(clippy::too_many_arguments)]
    fn splice<A: Activation>(&self, v: Value, node: NodeId, part: Part, act: &A, layout: Layout, key: usize, io: Io, e: &Effect) -> Result<A> {
        let rows = self.batch.rows(e.group);
        let by = || format!("the swap with node {}", self.node_name(node));
        // A swap replayed from a persistent edit says so: the trace itself may hold no swap.
        let from_edit = node < self.graph.borrow().edit_nodes;
        let refused = |r: Refusal, layout: Layout| {
            let mut err = self.refused(r, key, io, e, layout, &|| act.describe(), by);
            if let (true, Error::SwapMismatch { actual, .. }) = (from_edit, &mut err) {
                actual.push_str(" from a persistent edit (`edit!`; `model.clear_edits()` removes it)");
            }
            err
        };
        match part {
            Part::Whole => {
                let new = activation_from::<A>(v, || self.node_name(node))?;
                act.shallow().splice_batch(new, layout, rows).map_err(|r| refused(r, layout))
            }
            Part::First => {
                let first_layout = A::first_layout(layout).map_err(|r| refused(r, layout))?;
                let new = activation_from::<A::First>(v, || self.node_name(node))?;
                let first = act.first().shallow().splice_batch(new, first_layout, rows).map_err(|r| refused(r, first_layout))?;
                Ok(act.shallow().with_first(first))
            }
        }
    }

    /// The error for a value that could not be shared out or spliced at a hook point.
    #[allow(clippy::too_many_arguments)]
    fn refused(&self, r: Refusal, key: usize, io: Io, e: &Effect, layout: Layout, value: &dyn Fn() -> String, by: impl FnOnce() -> String) -> Error {
        let point = self.graph.borrow().point_name(key, io);
        match r {
            Refusal::Mismatch { expected, actual } => Error::SwapMismatch { point, call: e.call, invoke: Group(e.group), expected, actual },
            Refusal::Layout(reason) => Error::Layout { point, call: e.call, layout: layout.to_string(), value: value(), reason },
            Refusal::Shared(what) => {
                Error::SharedChange { point, call: e.call, invoke: Group(e.group), what, batch: self.batch.total, by: by() }
            }
        }
    }

    fn node_name(&self, id: NodeId) -> String {
        self.graph.borrow().nodes[id].name(id)
    }

    fn not_ready(&self, node: NodeId, key: usize, io: Io, e: &Effect) -> Error {
        let g = self.graph.borrow();
        Error::NotReady { point: g.point_name(key, io), call: e.call, invoke: Group(e.group), node: g.nodes[node].name(node) }
    }

    /// The value a swap puts in: `None` when a condition skipped it.
    fn swap_value(&self, node: NodeId, key: usize, io: Io, e: &Effect) -> Result<Option<Value>> {
        let v = {
            let st = self.state.borrow();
            match &st.slots[node] {
                Slot::Ready(v) => Some(v.clone()),
                Slot::Skipped => None,
                Slot::Empty | Slot::Freed | Slot::Taken => {
                    drop(st);
                    return Err(self.not_ready(node, key, io, e));
                }
            }
        };
        self.release(node);
        Ok(v)
    }

    /// One use of `id`'s value is done; frees it after the last one unless saved.
    fn release(&self, id: NodeId) {
        let saved = self.graph.borrow().nodes[id].saved;
        let mut st = self.state.borrow_mut();
        st.uses_left[id] = st.uses_left[id].saturating_sub(1);
        if st.uses_left[id] == 0 && !saved {
            if let Slot::Ready(_) = st.slots[id] {
                st.slots[id] = Slot::Freed;
            }
        }
    }

    fn provide(&self, id: NodeId, v: Value) -> Result<()> {
        self.state.borrow_mut().slots[id] = Slot::Ready(v);
        self.settle(id)
    }

    /// `first` has just got a value (or was skipped): run every listener that is now ready.
    fn settle(&self, first: NodeId) -> Result<()> {
        // Ready nodes run in the order the block built them (smallest id first), not level by
        // level: `let n = h.norm()` over a view `h`, written before an edit of the same
        // activation, must run before that edit although it is one step further from the hook.
        let mut ready = std::collections::BinaryHeap::new();
        let mut done = first;
        loop {
            let (listeners, stop, unused, saved) = {
                let g = self.graph.borrow();
                let n = &g.nodes[done];
                (n.listeners.clone(), n.stop, n.listeners.is_empty() && n.swap_uses == 0, n.saved)
            };
            {
                let mut st = self.state.borrow_mut();
                if stop && st.stop_requested.is_none() {
                    st.stop_requested = Some(done);
                }
                if unused && !saved {
                    if let Slot::Ready(_) = st.slots[done] {
                        st.slots[done] = Slot::Freed;
                    }
                }
                for l in listeners {
                    st.waiting[l] -= 1;
                    if st.waiting[l] == 0 {
                        ready.push(std::cmp::Reverse(l));
                    }
                }
            }
            let Some(std::cmp::Reverse(next)) = ready.pop() else { break };
            self.execute(next)?;
            done = next;
        }
        Ok(())
    }

    /// ` (inputs: %0 encoder.layer.5.output = Tensor[1, 14, 384] Float Cpu, ...)` for errors.
    fn describe_inputs(&self, args: &[NodeId], values: &[Value]) -> String {
        if args.is_empty() {
            return String::new();
        }
        let g = self.graph.borrow();
        let parts: Vec<String> = args
            .iter()
            .zip(values)
            .map(|(&a, v)| {
                let what = match v.downcast_ref::<tch::Tensor>() {
                    Some(t) => t.describe(),
                    None => "a non-tensor value".to_string(),
                };
                format!("%{a} {} = {what}", g.nodes[a].label)
            })
            .collect();
        format!(" (inputs: {})", parts.join(", "))
    }

    /// `; its value is for the swap at `layers.0.output` (call 0, invoke 1)` for a node whose
    /// value a swap puts in (for errors), else nothing.
    fn swap_target(&self, id: NodeId) -> String {
        let g = self.graph.borrow();
        if g.nodes[id].swap_uses == 0 {
            return String::new();
        }
        for (&key, m) in &g.modules {
            for io in [Io::Input, Io::Output] {
                for e in m.side(io) {
                    if let EffectKind::Swap(v, _) | EffectKind::Skip(v) = e.kind {
                        if v == id {
                            return format!("; its value is for the swap at `{}` (call {}, {})", g.point_name(key, io), e.call, Group(e.group));
                        }
                    }
                }
            }
        }
        String::new()
    }

    /// A merge node: the value of its first argument if the conditions after the second all
    /// held, else of its second (skipped when the chosen one has no value).
    fn execute_merge(&self, id: NodeId) -> Result<()> {
        let args = self.graph.borrow().nodes[id].args.clone();
        let value = {
            let mut st = self.state.borrow_mut();
            let held = args[2..].iter().all(|&c| matches!(&st.slots[c], Slot::Ready(v) if v.downcast_ref::<bool>() == Some(&true)));
            let value = match (&st.slots[args[0]], &st.slots[args[1]]) {
                (Slot::Ready(v), _) if held => Some(v.clone()),
                (_, Slot::Ready(v)) if !held => Some(v.clone()),
                _ => None,
            };
            st.slots[id] = value.clone().map_or(Slot::Skipped, Slot::Ready);
            value
        };
        if let Some(v) = value {
            self.guard_saved_any(id, &v);
        }
        for a in args {
            self.release(a);
        }
        Ok(())
    }

    /// Runs apply node `id` on its argument values (or marks it skipped), then releases them.
    fn execute(&self, id: NodeId) -> Result<()> {
        if self.graph.borrow().nodes[id].merge {
            return self.execute_merge(id);
        }
        let (args, gates, mut f, edit, backward) = {
            let mut g = self.graph.borrow_mut();
            let n = &mut g.nodes[id];
            let f = match &mut n.kind {
                NodeKind::Apply(f) => f.take(),
                _ => None,
            };
            (n.args.clone(), n.gates.clone(), f, n.edit, n.backward)
        };
        let skip = {
            let st = self.state.borrow();
            let arg_skipped = args.iter().chain(gates.iter()).any(|&a| matches!(st.slots[a], Slot::Skipped));
            let gate_false = gates.iter().any(|&gt| match &st.slots[gt] {
                Slot::Ready(v) => v.downcast_ref::<bool>().map(|b| !*b).unwrap_or(true),
                _ => false,
            });
            arg_skipped || gate_false
        };
        let outcome = if skip {
            Ok(Slot::Skipped)
        } else {
            let values: Result<Vec<Value>> = {
                let st = self.state.borrow();
                // A node built before an edit reads the value as it was before that edit.
                let before_edit = |a: NodeId| {
                    st.pre_edit.get(&a).and_then(|copies| copies.iter().filter(|(e, _)| *e > id).min_by_key(|(e, _)| *e)).map(|(_, v)| v.clone())
                };
                args.iter()
                    .map(|&a| match (&st.slots[a], before_edit(a)) {
                        (Slot::Ready(_), Some(v)) => Ok(v),
                        (Slot::Ready(v), None) => Ok(v.clone()),
                        _ => Err(Error::Node {
                            node: self.node_name(id),
                            message: format!("internal: argument %{a} has no value"),
                        }),
                    })
                    .collect()
            };
            match (values, f.as_mut()) {
                (Err(e), _) => Err(e),
                (Ok(_), None) => Err(Error::Node { node: self.node_name(id), message: "node has no body".into() }),
                (Ok(values), Some(f)) => {
                    if edit {
                        // First copy the saved values whose memory the edit may change, and the
                        // values nodes built before the edit still wait to read.
                        self.protect_saved(&values);
                        self.protect_pending(id, &values);
                        self.protect_cache(&values);
                    }
                    let refs: Vec<&dyn Any> = values.iter().map(|v| &**v).collect();
                    // Modules called inside an intervention run untraced, except helper modules.
                    let prev = ACTIVE.with(|a| a.replace(std::ptr::null()));
                    let _guard = ActiveGuard(prev);
                    let prev_helper = HELPER.with(|a| a.replace(self as *const Interleaver<'env> as *const ()));
                    let _helper_guard = HelperGuard(prev_helper);
                    let failed = |message: String| {
                        let hint = if message.contains("does not require grad") && !self.grad {
                            " — autograd is off in this trace: it turns on when the block calls `.backward()` or reads `.grad`; add the option `grad = true` when backward happens inside your own function"
                        } else if message.contains("backward through the graph a second time") {
                            " — an earlier backward pass in this trace freed the graph: keep it there with `Tensor::run_backward(&[loss], &[] as &[&Tensor], true, false)` (keep_graph = true) instead of `loss.backward()`"
                        } else {
                            ""
                        };
                        Error::Node {
                            node: self.node_name(id),
                            message: format!("{message}{hint}{}{}", self.describe_inputs(&args, &values), self.swap_target(id)),
                        }
                    };
                    let outer = backward.map(|k| self.state.borrow_mut().backward_pass.replace(k));
                    let result = panic::catch_unwind(AssertUnwindSafe(|| f(&refs)));
                    if let Some(outer) = outer {
                        self.state.borrow_mut().backward_pass = outer;
                    }
                    match result {
                        Ok(Ok(v)) => Ok(Slot::Ready(Rc::from(v))),
                        Ok(Err(message)) => Err(failed(message)),
                        // A helper module's hook point stopped the run (its error is recorded).
                        Err(p) if p.downcast_ref::<Interrupt>().is_some() => {
                            Err(self.state.borrow_mut().error.take().unwrap_or_else(|| failed("interrupted by a helper module's hook point".into())))
                        }
                        Err(p) => Err(failed(panic_message(&*p))),
                    }
                }
            }
        };
        if let NodeKind::Apply(slot) = &mut self.graph.borrow_mut().nodes[id].kind {
            *slot = f;
        }
        let slot = outcome?;
        if let Some(e) = self.state.borrow_mut().error.take() {
            return Err(e); // recorded by a backward hook while this node ran
        }
        if !self.state.borrow().watched.is_empty() {
            self.check_shared(Some(id))?;
        }
        if edit {
            self.refresh_saved();
            self.refresh_cache();
        } else if !self.state.borrow().guarded.is_empty() {
            self.check_saved(|| self.by_node(id))?;
        }
        if let Slot::Ready(v) = &slot {
            self.guard_saved_any(id, v);
        }
        self.state.borrow_mut().slots[id] = slot;
        for a in args.iter().chain(gates.iter()) {
            self.release(*a);
        }
        Ok(())
    }
}

/// Checks that every tensor of a skip value has the batch's rows on its declared axis.
struct RowsCheck {
    total: i64,
    bad: Option<String>,
}

impl activation::Leaves for RowsCheck {
    /// Declared rows ([`Layout::Batch`]) and the dim-0 default ([`Layout::Auto`], which for a
    /// value the module never computed cannot tell rows from shared: it asks for rows) must
    /// have the batch's rows; declared [`Layout::Shared`] tensors are taken as they are.
    fn tensor(&mut self, t: &Tensor, layout: Layout) -> std::result::Result<Tensor, Refusal> {
        let axis = match layout {
            Layout::Batch(axis) => Some(axis),
            Layout::Auto if t.defined() => Some(0),
            _ => None,
        };
        if let Some(axis) = axis {
            let rows = t.size().get(axis).copied();
            if self.bad.is_none() && rows != Some(self.total) {
                self.bad = Some(activation::describe_tensor(t));
            }
        }
        Ok(t.shallow_clone())
    }
}

/// Whether the block uses read `read`'s value (of hook point `(module, io, call)`) as one from
/// before `change` (written after the first `change.order` nodes): the read, or a value
/// computed from it by nodes also written before the change, is saved (returned), used by a
/// node written after the change, put in by a swap or skip written after it, or written into
/// another hook point's activation. Values that only feed changes of the read's own hook point
/// written before the change (`l3.output = l3.output * 2.0`) are changes themselves, applied
/// in the model's order.
fn observed_before(g: &Graph, read: NodeId, (module, io, call): (usize, Io, usize), change: &Effect) -> bool {
    let order = change.order;
    // Put in by a swap or skip written after the change, or at another hook point than the
    // read's (the value carried to another activation: `l4.output = l3.output.copy()`).
    let carried = |n: NodeId| {
        g.modules.iter().any(|(&k, m)| {
            [(Io::Input, &m.input), (Io::Output, &m.output)].into_iter().any(|(side, effects)| {
                effects.iter().any(|e| {
                    matches!(e.kind, EffectKind::Swap(v, _) | EffectKind::Skip(v) if v == n)
                        && (e.seq > change.seq || (k, side, e.call) != (module, io, call))
                })
            })
        })
    };
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![(read, None::<NodeId>)];
    while let Some((n, from)) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        let node = &g.nodes[n];
        // An edit reached through its value rather than its target writes the read's value
        // into another activation (`l4.output[..] = l3.output`).
        let edit_value = node.edit && from.is_some_and(|f| node.args.as_slice().first() != Some(&f)) && edit_target(g, n) != Some((module, io, call));
        if n >= order || node.saved || edit_value || (node.swap_uses > 0 && carried(n)) {
            return true;
        }
        stack.extend(node.listeners.iter().map(|&l| (l, Some(n))));
    }
    false
}

/// The hook point an in-place edit node writes into: its target (first argument), followed
/// back through the views taken of it to the hook read.
fn edit_target(g: &Graph, edit: NodeId) -> Option<(usize, Io, usize)> {
    let mut n = *g.nodes[edit].args.as_slice().first()?;
    loop {
        match g.nodes[n].kind {
            NodeKind::Hook { module, io, call, .. } => return Some((module, io, call)),
            _ => n = *g.nodes[n].args.as_slice().first()?,
        }
    }
}
