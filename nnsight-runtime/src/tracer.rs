//! Building an intervention graph and running it: the API `trace!` expands to, usable by hand.
//!
//! ```ignore
//! let mut tr = Tracer::new(&model);
//! let g = tr.invoke(input);                                   // batch group 0
//! let h = tr.output(g, 0, || Ok(&model.layers[1]));          // Proxy<Tensor>: layer 1's output
//! let doubled = tr.apply1(h, |h: &Tensor| h * 2.0);          // a node over the real value
//! tr.swap_output(g, 0, || Ok(&model.layers[1]), doubled);    // layer 1's output := doubled
//! let out = tr.output(g, 0, || Ok(&model.layers[2]));
//! let saved = tr.save(out);
//! let value: Tensor = tr.finish(saved)?;                      // runs the model once
//! ```
//!
//! Construction never fails on the spot: a bad module index or invoke input is recorded and
//! returned by [`Tracer::finish`] before the model runs, so building code has no early returns.

use std::panic::Location;

use tch::Tensor;

use crate::activation::Activation;
use crate::error::{Error, Result};
use crate::graph::{EffectKind, Graph, Io, NodeKind, Part};
use crate::hook::{AsModule, HookModule, Hooked};
use crate::interleave::{Batch, HookPointLayout, Interleaver};
use crate::proxy::{NodeId, Proxy, ProxyRef, Saved, SavedIfRan};
use crate::resolve::{Resolve, SwapValue};
use crate::traced::{IntoInvoke, Traced};

/// Which call of a module a hook point addresses. Each module has a cursor, starting at call 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Move the module's cursor `n` calls further, then use it (`.next()` in `trace!` is
    /// `Next(1)`; `Next(0)` is the current call). Converted from a plain `usize`.
    Next(usize),
    /// Call `i` exactly, leaving the cursor alone (`.at(i)` in `trace!`, e.g. generation step
    /// `i`).
    At(usize),
}

impl From<usize> for Call {
    fn from(n: usize) -> Call {
        Call::Next(n)
    }
}


/// A batch group: the rows of one invoke (`Group(i)` for invoke `i`), or every row of the
/// batch ([`Group::ALL`], what `trace!` statements written outside the invoke blocks use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group(pub usize);

impl Group {
    /// Every row of the batch, whatever the invokes: reads see the whole batch, swaps and edits
    /// change every row, also of values that all rows share.
    pub const ALL: Group = Group(usize::MAX);

    /// A hook point of a helper module (`trace!(.., helpers = [sae], ..)`): a module outside the
    /// model that the block itself calls on a proxy (an SAE, a probe, a lens). Its calls happen
    /// inside the block's expressions, on whatever rows they were given, so its hook points see
    /// every row of each call; the module is marked as a helper, whose calls inside the block's
    /// expressions are traced (other modules called there run untraced).
    pub const HELPER: Group = Group(usize::MAX - 1);
}

impl std::fmt::Display for Group {
    /// `invoke 2`, or `all invokes` for [`Group::ALL`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Group::ALL {
            f.write_str("all invokes")
        } else if *self == Group::HELPER {
            f.write_str("a helper module's call")
        } else {
            write!(f, "invoke {}", self.0)
        }
    }
}

/// Builds one trace's intervention graph, then runs it with the model.
pub struct Tracer<'env, M: ?Sized + Traced> {
    model: &'env M,
    graph: Graph<'env>,
    invokes: Vec<M::Invoke>,
    error: Option<Error>,
    /// Errors recorded after the first (a run reports the first; [`Tracer::scan`] all).
    more_errors: Vec<Error>,
    gates: Vec<NodeId>,
    cursors: std::collections::HashMap<usize, usize>,
    /// Hook reads by `(module, io, part, call, group)`: reading the same point twice gives the
    /// same node (one value, one backward hook) until a swap there makes a new value.
    reads: std::collections::HashMap<(usize, Io, Part, usize, usize), NodeId>,
    grad: bool,
    /// This trace's identity, carried by its proxies.
    trace: u32,
    /// For a node that in-place edits changed: `(target, edit)`, the target's newest edit and
    /// what it edited (see [`Tracer::edits`] and [`Tracer::save`]).
    edits: std::collections::HashMap<NodeId, NodeId>,
    edit_of: std::collections::HashMap<NodeId, NodeId>,
}

static NEXT_TRACE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

impl<'env, M: ?Sized + Traced> Tracer<'env, M> {
    /// A tracer for `model` with no invokes yet; the model's persistent edits (if any, see
    /// [`Traced::replay_edits`]) are already in its graph.
    pub fn new(model: &'env M) -> Self {
        let mut tracer = Tracer {
            model,
            graph: Graph::default(),
            invokes: Vec::new(),
            error: None,
            more_errors: Vec::new(),
            gates: Vec::new(),
            cursors: Default::default(),
            reads: Default::default(),
            grad: false,
            edits: Default::default(),
            edit_of: Default::default(),
            trace: NEXT_TRACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        model.replay_edits(&mut tracer);
        tracer.graph.edit_nodes = tracer.graph.nodes.len();
        tracer.cursors.clear();
        tracer
    }

    /// Takes over the graph `other` built (its nodes, effects and errors) into this tracer,
    /// which must not have built anything yet: how a generation's tracer gets the persistent
    /// edits replayed on its language model's tracer. `.next()` positions start afresh.
    pub(crate) fn absorb<N: ?Sized + Traced>(&mut self, other: Tracer<'env, N>) {
        self.graph = other.graph;
        self.error = other.error;
        self.more_errors = other.more_errors;
        self.gates = other.gates;
        self.cursors.clear();
        self.reads = other.reads;
        self.grad = other.grad;
        self.trace = other.trace;
        self.edits = other.edits;
        self.edit_of = other.edit_of;
    }

    /// The error building recorded so far, if any, taken out (checked when an edit is added).
    pub(crate) fn take_building_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        } else {
            self.more_errors.push(e);
        }
    }

    /// Adds an invoke (its rows are appended to the batch) and returns its batch group.
    pub fn invoke<I: IntoInvoke<M>>(&mut self, input: I) -> Group {
        let g = Group(self.invokes.len());
        match input.into_invoke(self.model) {
            Ok(inv) => self.invokes.push(inv),
            Err(Error::Input(msg)) => self.fail(Error::Input(format!("invoke {}: {msg}", g.0))),
            Err(e) => self.fail(e),
        }
        g
    }

    /// Keeps autograd on during the run (needed for `.backward()` and `.grad`). Off by default:
    /// traces that only read and patch run under `no_grad`.
    pub fn enable_grad(&mut self) {
        self.grad = true;
    }

    /// Resolves a module path (recording its error) and the call index it addresses.
    fn module<Mo: AsModule + 'env>(
        &mut self,
        call: Call,
        path: impl FnOnce() -> Result<&'env Mo>,
    ) -> Option<(&'env Hooked<Mo::Module>, usize)> {
        match path() {
            Ok(m) => {
                let h = m.as_module();
                let c = self.cursors.entry(h.key()).or_insert(0);
                let index = match call {
                    Call::Next(n) => {
                        *c += n;
                        *c
                    }
                    Call::At(i) => i,
                };
                Some((h, index))
            }
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    fn poison<T>(&mut self, label: &str) -> Proxy<T> {
        let id = self.graph.add(label.into(), Location::caller(), NodeKind::Poison, vec![], vec![]);
        Proxy::new(self.trace, id)
    }

    /// The node of `p` in this graph; a proxy of another trace is recorded as an error (and a
    /// placeholder node stands in for it).
    fn node<P: ProxyRef>(&mut self, p: &P) -> NodeId {
        if p.trace_id() == self.trace && p.node() < self.graph.nodes.len() {
            return p.node();
        }
        self.fail(Error::Input(format!(
            "a proxy of another trace (node %{}) is used here: proxies exist only inside the trace that made them; \
             use the value it saved (a plain tensor after that trace) instead",
            p.node()
        )));
        self.poison::<()>("<proxy of another trace>").id
    }

    /// A proxy of this trace for node `id`.
    fn proxy<T>(&self, id: NodeId) -> Proxy<T> {
        Proxy::new(self.trace, id)
    }

    /// [`Group::HELPER`] marks module `key` as a helper and becomes [`Group::ALL`] (a helper's
    /// call sees the rows it was given); other groups stay.
    fn helper_group(&mut self, group: Group, key: usize) -> Group {
        if group == Group::HELPER {
            self.graph.helpers.insert(key);
            Group::ALL
        } else {
            group
        }
    }

    /// Records an error when `group` is not one of this trace's invokes (or [`Group::ALL`],
    /// [`Group::HELPER`]).
    fn check_group(&mut self, group: Group) -> bool {
        if group == Group::ALL || group == Group::HELPER {
            return true;
        }
        if group.0 < self.invokes.len() || self.error.is_some() {
            return group.0 < self.invokes.len();
        }
        self.fail(Error::Input(format!("invoke {} does not exist: this trace has {} invoke(s)", group.0, self.invokes.len())));
        false
    }

    /// After a swap, skip or edit of `(module, io, call)` in `group`: reads of that point
    /// written later get new nodes (which see the change), in this group and in every group
    /// whose rows overlap it — the whole batch ([`Group::ALL`]) overlaps each invoke. Reusing
    /// an earlier read there would give the value from before the change.
    fn forget_reads(&mut self, module: usize, io: Io, call: usize, group: usize) {
        let overlaps = |g: usize| g == group || g == Group::ALL.0 || group == Group::ALL.0;
        self.reads.retain(|&(k, i, _, c, g), _| !(k == module && i == io && c == call && overlaps(g)));
    }

    #[track_caller]
    fn read<Mo: AsModule + 'env, T>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        io: Io,
        part: Part,
        path: impl FnOnce() -> Result<&'env Mo>,
    ) -> Proxy<T> {
        let Some((h, call)) = self.module(call.into(), path) else { return self.poison("<bad module path>") };
        let group = self.helper_group(group, h.key());
        let key = (h.key(), io, part, call, group.0);
        if let Some(&id) = self.reads.get(&key) {
            return self.proxy(id);
        }
        if !self.check_group(group) {
            return self.poison("<bad invoke>");
        }
        let word = match (io, part) {
            (Io::Output, _) => "output",
            (Io::Input, Part::First) => "input",
            (Io::Input, Part::Whole) => "inputs",
        };
        let label = if h.path().is_empty() { word.to_string() } else { format!("{}.{word}", h.path()) };
        let label = if self.invokes.len() > 1 || group.0 > 0 { format!("{label} [{group}]") } else { label };
        let label = if call > 0 { format!("{label} [call {call}]") } else { label };
        let id = self.graph.add(
            label,
            Location::caller(),
            NodeKind::Hook { module: h.key(), io, call, group: group.0 },
            vec![],
            vec![],
        );
        self.graph.add_effect(h.key(), h.path(), io, call, group.0, EffectKind::Read(id, part));
        self.reads.insert(key, id);
        self.proxy(id)
    }

    /// The module's output (`model.x.output`) at the call `call` selects (see [`Call`]; a plain
    /// `0` means the module's current call).
    #[track_caller]
    pub fn output<Mo: AsModule + 'env>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
    ) -> Proxy<<Mo::Module as HookModule>::Output> {
        self.read(group, call, Io::Output, Part::Whole, path)
    }

    /// The module's whole input (`model.x.inputs`), e.g. `(hidden_states, attention_mask)`.
    #[track_caller]
    pub fn inputs<Mo: AsModule + 'env>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
    ) -> Proxy<<Mo::Module as HookModule>::Input> {
        self.read(group, call, Io::Input, Part::Whole, path)
    }

    /// The module's first input (`model.x.input`).
    #[track_caller]
    pub fn input<Mo: AsModule + 'env>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
    ) -> Proxy<<<Mo::Module as HookModule>::Input as Activation>::First> {
        self.read(group, call, Io::Input, Part::First, path)
    }

    fn swap<Mo: AsModule + 'env>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        io: Io,
        part: Part,
        path: impl FnOnce() -> Result<&'env Mo>,
        value: NodeId,
    ) {
        if !self.check_group(group) {
            return;
        }
        let Some((h, call)) = self.module(call.into(), path) else { return };
        let group = self.helper_group(group, h.key());
        // Reads after this swap see the new value: they get new nodes.
        self.forget_reads(h.key(), io, call, group.0);
        self.graph.nodes[value].swap_uses += 1;
        self.graph.add_effect(h.key(), h.path(), io, call, group.0, EffectKind::Swap(value, part));
    }

    /// Replaces the invoke's rows of the module's output with `value` (`model.x.output = v`).
    /// At run time a value whose shape, dtype or device differs from what it replaces is
    /// [`Error::SwapMismatch`]; a value not yet computed when the module runs is [`Error::NotReady`].
    pub fn swap_output<Mo: AsModule + 'env, P>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
        value: P,
    ) where
        P: ProxyRef<Value = <Mo::Module as HookModule>::Output>,
    {
        let v = self.node(&value);
        self.swap(group, call, Io::Output, Part::Whole, path, v)
    }

    /// Replaces the module's whole input (`model.x.inputs = v`).
    pub fn swap_inputs<Mo: AsModule + 'env, P>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
        value: P,
    ) where
        P: ProxyRef<Value = <Mo::Module as HookModule>::Input>,
    {
        let v = self.node(&value);
        self.swap(group, call, Io::Input, Part::Whole, path, v)
    }

    /// Replaces the module's first input (`model.x.input = v`).
    pub fn swap_input<Mo: AsModule + 'env, P>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
        value: P,
    ) where
        P: ProxyRef<Value = <<Mo::Module as HookModule>::Input as Activation>::First>,
    {
        let v = self.node(&value);
        self.swap(group, call, Io::Input, Part::First, path, v)
    }

    /// Like [`Tracer::swap_output`], with the new value built by `value` (called first, so a
    /// value read from this module's current call is taken before `.next()` moves on). The
    /// value's type is fixed by the module, which lets rustc check what is assigned.
    pub fn swap_output_with<Mo: AsModule + 'env, V: SwapValue<<Mo::Module as HookModule>::Output> + 'static>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
        value: impl FnOnce(&mut Self) -> Proxy<V>,
    ) {
        let v = value(self);
        let v = self.node(&v);
        self.swap(group, call, Io::Output, Part::Whole, path, v)
    }

    /// `model.x.skip(value)`: at the call `call` selects, the module returns `value` without
    /// running its forward (its children do not run either); reads of its `.output` see `value`.
    /// Its input hook point still runs, so `value` may be computed from it
    /// (`model.layer[3].skip(model.layer[3].input)` removes a layer). `value` is built by the
    /// closure first, as for [`Tracer::swap_output_with`]; its type is the module's output type.
    ///
    /// At run time the module runs once for the whole batch, so the skip must cover every row
    /// (a trace with one invoke), and `value` must have the module's output layout for that
    /// batch and the device (and, for a floating-point input, the dtype) of the module's input;
    /// otherwise [`Error::Input`] or [`Error::SwapMismatch`], naming the hook point, call and
    /// invoke. A skip under an `if` on a proxy that is false lets the module run.
    #[track_caller]
    pub fn skip_with<Mo: AsModule + 'env, V: SwapValue<<Mo::Module as HookModule>::Output> + 'static>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
        value: impl FnOnce(&mut Self) -> Proxy<V>,
    ) {
        let v = value(self);
        let v = self.node(&v);
        if !self.check_group(group) {
            return;
        }
        let Some((h, call)) = self.module(call.into(), path) else { return };
        let group = self.helper_group(group, h.key());
        self.forget_reads(h.key(), Io::Output, call, group.0);
        self.graph.nodes[v].swap_uses += 1;
        self.graph.add_effect(h.key(), h.path(), Io::Output, call, group.0, EffectKind::Skip(v));
    }

    /// [`Tracer::swap_inputs`] with the value built by `value` (see [`Tracer::swap_output_with`]).
    pub fn swap_inputs_with<Mo: AsModule + 'env, V: SwapValue<<Mo::Module as HookModule>::Input> + 'static>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
        value: impl FnOnce(&mut Self) -> Proxy<V>,
    ) {
        let v = value(self);
        let v = self.node(&v);
        self.swap(group, call, Io::Input, Part::Whole, path, v)
    }

    /// [`Tracer::swap_input`] with the value built by `value` (see [`Tracer::swap_output_with`]).
    pub fn swap_input_with<Mo: AsModule + 'env, V: SwapValue<<<Mo::Module as HookModule>::Input as Activation>::First> + 'static>(
        &mut self,
        group: Group,
        call: impl Into<Call>,
        path: impl FnOnce() -> Result<&'env Mo>,
        value: impl FnOnce(&mut Self) -> Proxy<V>,
    ) {
        let v = value(self);
        let v = self.node(&v);
        self.swap(group, call, Io::Input, Part::First, path, v)
    }

    /// Declares `edit` (a node that changes `target`'s value in place, e.g. `h[.., 0] = 0.0`) as
    /// an edit of `target`; when its value is of `target`'s type, it is `target`'s value
    /// afterwards. When `target` is a
    /// hook read, or an edit of one, the edit must run before that module returns, else the run
    /// fails with [`Error::NotReady`]. Saved values whose memory the edit changes are copied just
    /// before it runs, so they keep the value they had when saved; a `save` of `target` written
    /// after the edit saves the edited value ([`Tracer::save`]), and a read of the hook point
    /// written after it is a new node, which sees the edited value.
    pub fn edits<P: ProxyRef, E: ProxyRef>(&mut self, target: P, edit: E) {
        let (target, edit) = (self.node(&target), self.node(&edit));
        self.graph.nodes[edit].edit = true;
        // Only an edit whose value is the target's value (what `trace!` builds) can stand for
        // the target in a later save; one that gives `()` (by hand) leaves saves alone.
        if std::any::TypeId::of::<P::Value>() == std::any::TypeId::of::<E::Value>() {
            self.edits.insert(target, edit);
        }
        self.edit_of.insert(edit, target);
        let mut root = target;
        while let Some(&t) = self.edit_of.get(&root) {
            root = t;
        }
        if let NodeKind::Hook { module, io, call, group, .. } = self.graph.nodes[root].kind {
            self.forget_reads(module, io, call, group);
            let path = self.graph.modules.get(&module).map(|m| m.path.clone()).unwrap_or_default();
            self.graph.add_effect(module, &path, io, call, group, EffectKind::Require(edit));
        }
    }

    /// The gradient of a hook point's tensor (`x.grad`) in backward pass `pass` (0 for the first
    /// `.backward()` called in the trace, 1 for the second, ...), narrowed to the invoke's rows.
    /// `x` must be a hook read (`model.m.output`, `.input`); its tensor gets a libtorch backward
    /// hook while the trace runs (on the full batch tensor, so narrowing cannot lose it).
    /// Turns autograd on for the run.
    #[track_caller]
    pub fn grad<P: ProxyRef<Value = Tensor>>(&mut self, x: P, pass: usize) -> Proxy<Tensor> {
        self.grad_node(x, pass, false)
    }

    /// `x.grad` as `trace!` writes it: the gradient in the backward pass of the first
    /// `.backward()` node built after this read ([`Tracer::backward`]), or of the last one when
    /// the read is built after all of them — so with a single `.backward()` the read may be
    /// written before or after it, in any invoke. When the trace marks no `.backward()` node
    /// (backward inside a function of your own), the first time backward reaches the tensor.
    #[track_caller]
    pub fn grad_next<P: ProxyRef<Value = Tensor>>(&mut self, x: P) -> Proxy<Tensor> {
        let pass = self.graph.backward.len();
        self.grad_node(x, pass, true)
    }

    /// Marks `p`'s node (an apply node) as one that calls `.backward()`: the trace's next
    /// backward pass, which [`Tracer::grad_next`] reads refer to. `trace!` marks every node
    /// whose code calls `.backward()`.
    pub fn backward<P: ProxyRef>(&mut self, p: &P) {
        let id = self.node(p);
        self.grad = true;
        self.graph.add_backward(id);
    }

    #[track_caller]
    fn grad_node<P: ProxyRef<Value = Tensor>>(&mut self, x: P, pass: usize, next: bool) -> Proxy<Tensor> {
        self.grad = true;
        let of = self.node(&x);
        if !matches!(self.graph.nodes[of].kind, NodeKind::Hook { .. }) {
            self.fail(Error::Input(format!(
                "`.grad` is available on hook points (`model.x.output`), not on node {}",
                self.graph.nodes[of].name(of)
            )));
            return self.poison("<bad .grad>");
        }
        let label = crate::graph::grad_label(&self.graph.nodes[of].label, pass);
        let id = self.graph.add(label, Location::caller(), NodeKind::Grad { of, pass, next }, vec![], vec![]);
        self.graph.nodes[of].grads.push(id);
        self.proxy(id)
    }

    /// Replaces a gradient (`x.grad = v`): when backward reaches the hook point, the invoke's
    /// rows of the gradient flowing on are `value`'s. A different shape/dtype is an error.
    pub fn swap_grad<P: ProxyRef<Value = Tensor>>(&mut self, grad: Proxy<Tensor>, value: P) {
        let (grad, value) = (self.node(&grad), self.node(&value));
        if !matches!(self.graph.nodes[grad].kind, NodeKind::Grad { .. }) {
            self.fail(Error::Input("`swap_grad` needs a proxy made by `.grad`".into()));
            return;
        }
        self.graph.nodes[value].swap_uses += 1;
        self.graph.nodes[grad].grads.push(value);
    }

    /// Keeps the value after the run; `finish` hands it back. The value is the one `p` has at
    /// this point of the block: after the in-place edits of `p` built before this call
    /// ([`Tracer::edits`]), before those built after it. An edit built under an `if` on a proxy
    /// that this call is not inside leaves the value undecided until the run: that is
    /// [`Error::Input`] naming the node (save inside the `if`, or save before the edit).
    #[track_caller]
    pub fn save<P: ProxyRef>(&mut self, p: P) -> Saved<P::Value> {
        let mut id = self.node(&p);
        // A `Saved` saved again keeps the value it was saved with.
        while let Some(&e) = self.edits.get(&id).filter(|_| !p.is_saved()) {
            if !self.graph.nodes[e].gates.iter().all(|g| self.gates.contains(g)) {
                let name = self.graph.nodes[id].name(id);
                self.fail(Error::Input(format!(
                    "`.save()` of {name} at {}: an in-place edit of it made under an `if` on a proxy may or may not run; save inside that `if`, or save before the edit",
                    Location::caller()
                )));
                break;
            }
            id = e;
        }
        self.graph.nodes[id].saved = true;
        Saved { id, trace: self.trace, _t: std::marker::PhantomData }
    }

    /// [`Tracer::save`] for a value that may legitimately never be computed: after the run it
    /// gives `Some(value)`, or `None` when the run ended before reaching it — generation that
    /// stopped at end-of-sequence before this step, or a `.stop()` earlier in the forward pass
    /// (`.save_if_ran()` in `trace!` / `generate!`). A plain `.save()` of such a value is an
    /// [`crate::Error::NotComputed`] instead, and fails the whole trace.
    #[track_caller]
    pub fn save_if_ran<P: ProxyRef>(&mut self, p: P) -> SavedIfRan<P::Value> {
        SavedIfRan(self.save(p))
    }

    /// What a variable holds after an `if` on a proxy that may have assigned it: `new`'s value
    /// when the conditions of the `if`s this is built in all held, else `old`'s. The node is built outside every
    /// `if`, so it runs whichever way the branches went. `trace!` builds one for each
    /// assignment under such an `if` to a variable declared before it.
    #[track_caller]
    pub fn merge<P: ProxyRef, Q: ProxyRef<Value = P::Value>>(&mut self, new: P, old: Q) -> Proxy<P::Value> {
        // The `if` conditions around this point decide, not whether `new` ran: `new` may have
        // been computed before the `if`.
        let mut args = vec![self.node(&new), self.node(&old)];
        args.extend(self.gates.iter().copied());
        let unused: crate::graph::NodeFn<'env> = Box::new(|_| Err("internal: a merge node has no body".into()));
        let id = self.graph.add("merge".to_string(), Location::caller(), NodeKind::Apply(Some(unused)), args, Vec::new());
        self.graph.nodes[id].merge = true;
        self.proxy(id)
    }

    /// The traced model (for `Tracer::cache`, module `crate::cache`).
    pub(crate) fn model(&self) -> &'env M {
        self.model
    }

    /// Adds an activation cache for `group` (see `Tracer::cache`): a saved node that the run
    /// gives the recorded values. An `Err` request is recorded like any building error.
    #[track_caller]
    pub(crate) fn add_cache(&mut self, group: Group, request: Result<crate::cache::Request>) -> Saved<crate::cache::Cache> {
        let ok = self.check_group(group);
        let id = self.graph.add("cache".to_string(), Location::caller(), NodeKind::Cache, vec![], vec![]);
        self.graph.nodes[id].saved = true;
        match request {
            Ok(mut r) if ok => {
                r.node = id;
                r.group = group.0;
                self.graph.caches.push(r);
            }
            Ok(_) => {}
            Err(e) => self.fail(e),
        }
        Saved { id, trace: self.trace, _t: std::marker::PhantomData }
    }

    /// Ends the forward pass as soon as this node has its value (early stop); values already
    /// computed stay valid.
    pub fn stop<P: ProxyRef>(&mut self, p: P) -> P {
        let id = self.node(&p);
        self.graph.nodes[id].stop = true;
        p
    }

    /// Nodes created until [`Tracer::end_if`] run only when `cond` is true (`if` on a proxy).
    pub fn begin_if<P: ProxyRef<Value = bool>>(&mut self, cond: P) {
        let id = self.node(&cond);
        self.gates.push(id);
    }

    /// Ends the innermost [`Tracer::begin_if`].
    pub fn end_if(&mut self) {
        self.gates.pop();
    }

    /// Renders the graph built so far in Graphviz DOT.
    pub fn to_dot(&self) -> String {
        self.graph.to_dot()
    }

    /// Number of nodes built so far.
    pub fn node_count(&self) -> usize {
        self.graph.nodes.len()
    }

    #[track_caller]
    fn add_apply(&mut self, label: &str, args: Vec<NodeId>, f: crate::graph::NodeFn<'env>) -> NodeId {
        let gates = self.gates.clone();
        self.graph.add(label.to_string(), Location::caller(), NodeKind::Apply(Some(f)), args, gates)
    }

    /// Checks the trace without running the model (`scan!`): every problem found while the
    /// graph was built — module paths and list indices, `.at(i)` / `.next()` misuse, invokes
    /// that cannot be converted (tokenization, ids outside the vocabulary, sequences over the
    /// model's length, empty inputs), invoke groups that do not exist, misuse of saves and
    /// edits — then the batch the invokes would form. Empty when the trace would start running.
    ///
    /// What it cannot know without running the model: how many times a module is called (so
    /// whether `.at(i)` exists), the shapes, dtypes and layouts of activations (so whether a
    /// swap's value fits, or an index is in range), and anything a node computes.
    pub fn scan(self) -> Vec<Error> {
        let mut this = self;
        let mut errors: Vec<Error> = this.error.take().into_iter().collect();
        errors.append(&mut this.more_errors);
        // The invokes that could be converted: do they form a batch?
        if !this.invokes.is_empty() || errors.is_empty() {
            if let Err(e) = this.batch() {
                errors.push(e);
            }
        }
        errors
    }

    /// Runs the model once with the graph interleaved, then resolves `value` (saved proxies
    /// become their values). Errors recorded while building come out first, before the model
    /// runs; then run-time errors (see [`Error`]).
    pub fn finish<R: Resolve>(self, value: R) -> Result<R::Output> {
        let mut this = self;
        let batch = this.batch()?;
        let model = this.model;
        let invokes = this.invokes;
        let self_trace = this.trace;
        let mut outcome = Interleaver::run(this.graph, batch, this.grad, &|| model.tolerates_missing(), || {
            model.forward_invokes(&invokes)
        })?;
        outcome.set_trace(self_trace);
        value.resolve(&mut outcome)
    }

    /// Runs the model once on the invokes without intervening, and lists every hook point of
    /// every module call: its value and how its declared layout shares it out among this
    /// batch's rows ([`HookPointLayout`]). A model author's check of the layouts declared with
    /// [`HookModule::input_layout`] / [`Hooked::with_layouts`]: run it with two invokes and
    /// look for `Layout::Auto` and for layouts that do not fit
    /// ([`HookPointLayout::is_declared_and_fits`]).
    pub fn layouts(mut self) -> Result<Vec<HookPointLayout>> {
        let batch = self.batch()?;
        let (model, invokes) = (self.model, self.invokes);
        Interleaver::audit(batch, || model.forward_invokes(&invokes))
    }

    /// The rows of every invoke, once building succeeded.
    fn batch(&mut self) -> Result<Batch> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.invokes.is_empty() {
            return Err(Error::Input("a trace needs at least one input (invoke)".into()));
        }
        let mut groups = Vec::with_capacity(self.invokes.len());
        let mut total = 0;
        for inv in &self.invokes {
            let rows = self.model.invoke_rows(inv)?;
            groups.push((total, rows));
            total += rows;
        }
        Ok(Batch { groups, total })
    }
}

macro_rules! applies {
    ($($name:ident: $($P:ident $p:ident $i:tt),*;)*) => {$(
        impl<'env, M: ?Sized + Traced> Tracer<'env, M> {
            /// A node computing `f` over the proxies' real values once they exist.
            #[track_caller]
            #[allow(unused_variables, unused_mut, clippy::too_many_arguments)]
            pub fn $name<$($P: ProxyRef,)* R: 'static>(
                &mut self,
                $($p: $P,)*
                mut f: impl FnMut($(&$P::Value),*) -> R + 'env,
            ) -> Proxy<R> {
                let args = vec![$(self.node(&$p)),*];
                let body = move |vals: &[&dyn std::any::Any]| -> std::result::Result<Box<dyn std::any::Any>, String> {
                    $(let $p = vals[$i].downcast_ref::<$P::Value>().ok_or_else(|| {
                        format!("internal: argument {} is not a {}", $i, std::any::type_name::<$P::Value>())
                    })?;)*
                    Ok(Box::new(f($($p),*)))
                };
                let id = self.add_apply("apply", args, Box::new(body));
                self.proxy(id)
            }
        }
    )*};
}
applies! {
    apply0: ;
    apply1: P0 p0 0;
    apply2: P0 p0 0, P1 p1 1;
    apply3: P0 p0 0, P1 p1 1, P2 p2 2;
    apply4: P0 p0 0, P1 p1 1, P2 p2 2, P3 p3 3;
    apply5: P0 p0 0, P1 p1 1, P2 p2 2, P3 p3 3, P4 p4 4;
    apply6: P0 p0 0, P1 p1 1, P2 p2 2, P3 p3 3, P4 p4 4, P5 p5 5;
    apply7: P0 p0 0, P1 p1 1, P2 p2 2, P3 p3 3, P4 p4 4, P5 p5 5, P6 p6 6;
    apply8: P0 p0 0, P1 p1 1, P2 p2 2, P3 p3 3, P4 p4 4, P5 p5 5, P6 p6 6, P7 p7 7;
}

