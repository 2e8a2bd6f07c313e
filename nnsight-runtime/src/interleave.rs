//! The interleaver: runs an intervention graph alongside the model's forward pass.
//!
//! While a run is active, a thread-local points at the [`Interleaver`]. Every
//! [`Hooked::call`](crate::Hooked::call) asks it whether its module is traced (one hash lookup,
//! nothing else for modules nobody asked for). For traced modules it counts the call (counters
//! are per module) and processes the effects registered for that hook point and call index, in
//! creation order: reads hand the invoke's rows to hook nodes, which then run every node whose
//! inputs are all there; swaps splice a node's value back into the invoke's rows; edits must have
//! run before the module returns. A node's value is freed as soon as its last listener has run,
//! unless it is saved.
//!
//! Errors and `.stop()` end the forward pass by unwinding to [`run`] with a private payload;
//! the thread-local is reset by a guard, so nothing stays hooked whatever happens.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe, Location};
use std::rc::Rc;

use crate::activation::Activation;
use crate::error::{panic_message, Error, QuietGuard, Result};
use crate::graph::{node_name, AddrMap, Effect, EffectKind, Graph, Io, NodeKind, Part, Value};
use crate::proxy::NodeId;
use crate::tensor_hook::GradHooks;

mod grad;

thread_local! {
    static ACTIVE: Cell<*const ()> = const { Cell::new(std::ptr::null()) };
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
}


/// Batch layout of a run: each invoke's `(start, rows)` and the total batch size.
#[derive(Clone, Debug)]
pub(crate) struct Batch {
    pub groups: Vec<(i64, i64)>,
    pub total: i64,
}

pub(crate) struct Interleaver<'env> {
    graph: RefCell<Graph<'env>>,
    state: RefCell<RunState>,
    batch: Batch,
    /// Autograd on for this run.
    grad: bool,
}

/// Values left after a run: the saved nodes' values, by node id.
pub struct Outcome {
    slots: Vec<Slot>,
    /// Saved nodes' labels and source locations, for errors (formatted only when one occurs).
    labels: Vec<Option<(String, &'static Location<'static>)>>,
    stopped_at: Option<String>,
    trace: u32,
}

impl Outcome {
    /// Display name of node `id` (see [`crate::graph::node_name`]).
    fn name(&self, id: NodeId) -> String {
        match &self.labels[id] {
            Some((label, location)) => node_name(id, label, location),
            None => format!("%{id}"),
        }
    }

    pub(crate) fn set_trace(&mut self, trace: u32) {
        self.trace = trace;
    }

    /// The value of saved node `id` of trace `trace` (it may be taken several times: tensors
    /// are shared, numbers and strings copied). Errors with [`Error::NotComputed`] when it has
    /// none, and [`Error::Input`] for a node of another trace.
    pub(crate) fn take<T: 'static>(&mut self, trace: u32, id: NodeId) -> Result<T> {
        if trace != self.trace || id >= self.slots.len() {
            return Err(Error::Input(format!(
                "the block returns a saved value of another trace (node %{id}): saved values come out of the trace that saved them"
            )));
        }
        match &self.slots[id] {
            Slot::Ready(v) => {
                // Shared or copied when the type allows (it may be returned twice), else moved.
                if let Some(copy) = v.downcast_ref::<T>().and_then(shallow_any::<T>) {
                    return Ok(copy);
                }
                let Slot::Ready(v) = std::mem::replace(&mut self.slots[id], Slot::Taken) else { unreachable!() };
                value_as::<T>(v, &self.name(id))
            }
            Slot::Taken => Err(Error::NotComputed {
                node: self.name(id),
                reason: format!(
                    "it is returned more than once, and a {} cannot be shared (tensors, numbers, strings and Vecs or pairs of them can): return it once",
                    std::any::type_name::<T>()
                ),
            }),
            Slot::Skipped => Err(Error::NotComputed {
                node: self.name(id),
                reason: "a condition it depends on was false".into(),
            }),
            Slot::Empty => Err(Error::NotComputed {
                node: self.name(id),
                reason: match &self.stopped_at {
                    Some(s) => format!("the run stopped early at {s} before it was computed"),
                    None => "its inputs were never provided".into(),
                },
            }),
            Slot::Freed => Err(Error::NotComputed {
                node: self.name(id),
                reason: "its value was freed after its last use (it was not saved)".into(),
            }),
        }
    }
}

/// Unwraps a node value into `T` (shares tensor storage if others still hold it).
pub(crate) fn value_as<T: 'static>(v: Value, node: &str) -> Result<T> {
    let rc = v.downcast::<T>().map_err(|_| Error::Node {
        node: node.to_string(),
        message: format!("internal: value is not a {}", std::any::type_name::<T>()),
    })?;
    match Rc::try_unwrap(rc) {
        Ok(t) => Ok(t),
        Err(rc) => shallow_any::<T>(&rc).ok_or_else(|| Error::Node {
            node: node.to_string(),
            message: format!(
                "a saved value of type {} is taken more than once; only tensors, numbers, strings and Vecs of them can be: return it once",
                std::any::type_name::<T>()
            ),
        }),
    }
}

/// A second owned copy of a value that is still held elsewhere: tensors share their storage
/// (`shallow_clone`); numbers, strings and `Vec`s of them are cloned. `None` for other types.
fn shallow_any<T: 'static>(v: &T) -> Option<T> {
    let any: &dyn Any = v;
    let boxed: Box<dyn Any> = if let Some(t) = any.downcast_ref::<tch::Tensor>() {
        Box::new(t.shallow_clone())
    } else if let Some(ts) = any.downcast_ref::<Vec<tch::Tensor>>() {
        Box::new(ts.iter().map(tch::Tensor::shallow_clone).collect::<Vec<_>>())
    } else if let Some((a, b)) = any.downcast_ref::<(tch::Tensor, tch::Tensor)>() {
        Box::new((a.shallow_clone(), b.shallow_clone()))
    } else if let Some(t) = any.downcast_ref::<Option<tch::Tensor>>() {
        Box::new(t.as_ref().map(tch::Tensor::shallow_clone))
    } else {
        macro_rules! cloned {
            ($($t:ty),*) => {
                $(if let Some(x) = any.downcast_ref::<$t>() { return Some(*(Box::new(x.clone()) as Box<dyn Any>).downcast::<T>().ok()?); })*
            };
        }
        cloned!(f64, f32, i64, i32, u64, u32, usize, bool, String, Vec<i64>, Vec<f64>, Vec<f32>, Vec<usize>, Vec<bool>);
        return None;
    };
    boxed.downcast::<T>().ok().map(|b| *b)
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
pub(crate) fn module_call<I: Activation, O: Activation>(key: usize, input: I, f: impl FnOnce(I) -> O) -> O {
    let p = ACTIVE.with(Cell::get);
    if p.is_null() {
        return f(input);
    }
    // SAFETY: `ACTIVE` is only non-null while `Interleaver::run` is on this thread's stack with
    // the interleaver alive; the guard resets it before the interleaver is dropped.
    let il = unsafe { &*(p as *const Interleaver<'static>) };
    match il.enter(key) {
        None => f(input),
        Some(call) => {
            let input = il.hook(key, Io::Input, call, input);
            let out = f(input);
            il.hook(key, Io::Output, call, out)
        }
    }
}

impl<'env> Interleaver<'env> {
    fn new(graph: Graph<'env>, batch: Batch, grad: bool) -> Self {
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
        };
        Interleaver { graph: RefCell::new(graph), state: RefCell::new(state), batch, grad }
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

        let result = {
            let prev = ACTIVE.with(|a| a.replace(&il as *const Interleaver<'env> as *const ()));
            let _guard = ActiveGuard(prev);
            panic::catch_unwind(AssertUnwindSafe(|| {
                // A guard, not `tch::no_grad(..)`: autograd must come back on also when an
                // error or `.stop()` unwinds out of the forward pass.
                let _no_grad = (!grad).then(tch::no_grad_guard);
                forward()
            }))
        };

        // No backward hook may outlive the run (they point at `il`).
        let removed = il.state.borrow_mut().grad_hooks.remove_all();
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
        if stopped_at.is_none() && !lenient() {
            for (id, n) in graph.nodes.iter().enumerate() {
                if let (NodeKind::Grad { of, pass }, Slot::Empty) = (&n.kind, &state.slots[id]) {
                    if let NodeKind::Hook { module, io, call, .. } = graph.nodes[*of].kind {
                        return Err(Error::NeverProvided {
                            point: format!("{}.grad", graph.point_name(module, io)),
                            call,
                            reason: format!(
                                "backward pass {pass} never reached it (call `.backward()` on a value computed from this activation)"
                            ),
                        });
                    }
                }
                if let (NodeKind::Hook { module, io, call, .. }, Slot::Empty) = (&n.kind, &state.slots[id]) {
                    let ran = state.counters.get(module).copied().unwrap_or(0);
                    let reason = if ran == 0 {
                        "the module did not run".to_string()
                    } else {
                        format!("the module ran only {ran} time(s) in this run")
                    };
                    return Err(Error::NeverProvided { point: graph.point_name(*module, *io), call: *call, reason });
                }
            }
        }
        // Labels are only needed for errors about saved values.
        let labels = graph.nodes.iter_mut().map(|n| n.saved.then(|| (std::mem::take(&mut n.label), n.location))).collect();
        drop(graph); // intervention closures and their borrows end here
        Ok(Outcome { slots: state.slots, labels, stopped_at, trace: 0 })
    }

    /// Counts a call of a traced module; `None` for modules the graph does not use.
    fn enter(&self, key: usize) -> Option<usize> {
        let mut st = self.state.borrow_mut();
        let c = st.counters.get_mut(&key)?;
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

    fn hook<A: Activation>(&self, key: usize, io: Io, call: usize, mut act: A) -> A {
        let effects: Vec<Effect> = {
            let g = self.graph.borrow();
            match g.modules.get(&key) {
                Some(m) => m.side(io).iter().filter(|e| e.call == call).copied().collect(),
                None => return act,
            }
        };
        if effects.is_empty() {
            return act;
        }
        let total = self.batch.total;
        let mut requires = Vec::new();
        for e in effects {
            let (start, len) = self.batch.groups[e.group];
            let r = match e.kind {
                EffectKind::Read(node, Part::Whole) => self
                    .watch_grad(node, &act as &dyn Any, &e)
                    .and_then(|_| self.provide(node, Rc::new(act.narrow_batch(start, len, total)))),
                EffectKind::Read(node, Part::First) => self
                    .watch_grad(node, act.first() as &dyn Any, &e)
                    .and_then(|_| self.provide(node, Rc::new(act.first().narrow_batch(start, len, total)))),
                EffectKind::Swap(node, part) => match self.swap_value(node, key, io, &e) {
                    Ok(None) => Ok(()),
                    Err(err) => Err(err),
                    Ok(Some(v)) => {
                        let spliced = match part {
                            Part::Whole => activation_from::<A>(v, || self.node_name(node))
                                .and_then(|new| self.splice(act.shallow(), new, key, io, &e)),
                            Part::First => activation_from::<A::First>(v, || self.node_name(node))
                                .and_then(|new| self.splice(act.first().shallow(), new, key, io, &e))
                                .map(|first| act.shallow().with_first(first)),
                        };
                        spliced.map(|new_act| act = new_act)
                    }
                },
                EffectKind::Require(node) => {
                    requires.push((node, e));
                    Ok(())
                }
            };
            if let Err(err) = r {
                self.interrupt(err);
            }
        }
        for (node, e) in requires {
            let missing = matches!(self.state.borrow().slots[node], Slot::Empty);
            if missing {
                let err = self.not_ready(node, key, io, &e);
                self.interrupt(err);
            }
        }
        if self.state.borrow().stop_requested.is_some() {
            panic::resume_unwind(Box::new(Interrupt));
        }
        act
    }


    fn splice<T: Activation>(&self, old: T, new: T, key: usize, io: Io, e: &Effect) -> Result<T> {
        let (start, len) = self.batch.groups[e.group];
        old.splice_batch(new, start, len, self.batch.total).map_err(|(expected, actual)| Error::SwapMismatch {
            point: self.graph.borrow().point_name(key, io),
            call: e.call,
            invoke: e.group,
            expected,
            actual,
        })
    }

    fn node_name(&self, id: NodeId) -> String {
        self.graph.borrow().nodes[id].name(id)
    }

    fn not_ready(&self, node: NodeId, key: usize, io: Io, e: &Effect) -> Error {
        let g = self.graph.borrow();
        Error::NotReady { point: g.point_name(key, io), call: e.call, invoke: e.group, node: g.nodes[node].name(node) }
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
        let mut queue = VecDeque::from([first]);
        while let Some(done) = queue.pop_front() {
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
            }
            for l in listeners {
                let ready = {
                    let mut st = self.state.borrow_mut();
                    st.waiting[l] -= 1;
                    st.waiting[l] == 0
                };
                if ready {
                    self.execute(l)?;
                    queue.push_back(l);
                }
            }
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

    /// Runs apply node `id` on its argument values (or marks it skipped), then releases them.
    fn execute(&self, id: NodeId) -> Result<()> {
        let (args, gates, mut f) = {
            let mut g = self.graph.borrow_mut();
            let n = &mut g.nodes[id];
            let f = match &mut n.kind {
                NodeKind::Apply(f) => f.take(),
                _ => None,
            };
            (n.args.clone(), n.gates.clone(), f)
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
                args.iter()
                    .map(|&a| match &st.slots[a] {
                        Slot::Ready(v) => Ok(v.clone()),
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
                    let refs: Vec<&dyn Any> = values.iter().map(|v| &**v).collect();
                    // Modules called inside an intervention run untraced.
                    let prev = ACTIVE.with(|a| a.replace(std::ptr::null()));
                    let _guard = ActiveGuard(prev);
                    let failed = |message: String| {
                        let hint = if message.contains("does not require grad") && !self.grad {
                            " — autograd is off in this trace: it turns on when the block calls `.backward()` or reads `.grad`; add the option `grad = true` when backward happens inside your own function"
                        } else {
                            ""
                        };
                        Error::Node {
                            node: self.node_name(id),
                            message: format!("{message}{hint}{}", self.describe_inputs(&args, &values)),
                        }
                    };
                    match panic::catch_unwind(AssertUnwindSafe(|| f(&refs))) {
                        Ok(Ok(v)) => Ok(Slot::Ready(Rc::from(v))),
                        Ok(Err(message)) => Err(failed(message)),
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
        self.state.borrow_mut().slots[id] = slot;
        for a in args.iter().chain(gates.iter()) {
            self.release(*a);
        }
        Ok(())
    }
}
