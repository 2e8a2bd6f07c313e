//! The intervention graph: nodes, their arguments and listeners, and the effects attached to
//! hook points (the reference design's `Graph`, `Node` and `InterventionProtocol` attachment).
//!
//! A node is either a hook-point read (its value comes from a module's input or output at a
//! given call index, narrowed to one invoke's rows) or an apply node (a Rust closure over the
//! values of its argument nodes). Swaps and in-place edits are effects registered at a hook
//! point, processed in the order they were created when the module runs.

use std::any::Any;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::panic::Location;
use std::rc::Rc;

use crate::proxy::NodeId;

/// Hasher for module identities (addresses): one multiply and a shift instead of SipHash, since
/// a traced forward pass looks up every module call. Addresses are not attacker-controlled.
#[derive(Default, Clone, Copy)]
pub(crate) struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        let x = (n as u64 ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by module identity.
pub(crate) type AddrMap<V> = HashMap<usize, V, std::hash::BuildHasherDefault<AddrHasher>>;

/// A node's value while the run lasts.
pub(crate) type Value = Rc<dyn Any>;

/// The type-erased body of an apply node: argument values in, result or error text out.
pub(crate) type NodeFn<'env> = Box<dyn FnMut(&[&dyn Any]) -> Result<Box<dyn Any>, String> + 'env>;

/// Which side of a module call a hook point is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Io {
    /// The module's arguments (`.input` / `.inputs`).
    Input,
    /// The module's result (`.output`).
    Output,
}

impl Io {
    fn word(self) -> &'static str {
        match self {
            Io::Input => "input",
            Io::Output => "output",
        }
    }
}

/// Whole value (`.output`, `.inputs`) or first element (`.input`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Part {
    Whole,
    First,
}

/// What happens at a hook point when the module runs with a given call index.
#[derive(Clone, Copy, Debug)]
pub(crate) enum EffectKind {
    /// Hand the (narrowed) value to a hook node.
    Read(NodeId, Part),
    /// Replace the invoke's rows with the value of a node.
    Swap(NodeId, Part),
    /// An in-place edit node that must have run before the module returns.
    Require(NodeId),
    /// The module returns the node's value without running its forward (`.skip(value)`).
    Skip(NodeId),
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Effect {
    pub call: usize,
    pub group: usize,
    pub kind: EffectKind,
    /// The number of nodes built before the statement that added this effect: nodes with a
    /// smaller id were written before it in the block.
    pub order: usize,
    /// Effects added before this one (their statements were written before it).
    pub seq: usize,
}

/// The hook points of one module that the graph uses.
#[derive(Default)]
pub(crate) struct ModuleEffects {
    pub path: String,
    pub input: Vec<Effect>,
    pub output: Vec<Effect>,
}

impl ModuleEffects {
    pub fn side(&self, io: Io) -> &[Effect] {
        match io {
            Io::Input => &self.input,
            Io::Output => &self.output,
        }
    }
}

pub(crate) enum NodeKind<'env> {
    /// Value provided by the interleaver from a hook point.
    Hook { module: usize, io: Io, call: usize, group: usize },
    /// Gradient of a hook read's tensor in backward pass `pass`, narrowed to the read's invoke.
    /// A pass is one of [`Graph::backward`] (0 = the first built); when the trace has none
    /// (backward inside the user's own functions), the `pass`-th time backward reaches the
    /// tensor. `next`: the pass was picked by position (the first `.backward()` built after
    /// the read), and a read built after the last one refers to the last one
    /// ([`Graph::settle_passes`]).
    Grad { of: NodeId, pass: usize, next: bool },
    /// Value computed by a closure from the argument values.
    Apply(Option<NodeFn<'env>>),
    /// Placeholder for a node whose construction failed (the trace will not run).
    Poison,
    /// An activation cache (`Tracer::cache`): saved, given its value when the run ends.
    Cache,
}

/// One node of the intervention graph.
pub(crate) struct Node<'env> {
    pub label: String,
    pub location: &'static Location<'static>,
    pub kind: NodeKind<'env>,
    /// Value arguments, in order.
    pub args: Vec<NodeId>,
    /// Condition nodes (`bool`): the node is skipped unless all are true.
    pub gates: Vec<NodeId>,
    /// Nodes that have this node as argument or gate (one entry per occurrence).
    pub listeners: Vec<NodeId>,
    /// Swaps that consume this node's value.
    pub swap_uses: usize,
    /// For hook reads: the `.grad` nodes of its tensor. For grad nodes: the nodes whose values
    /// replace the gradient (`x.grad = v`).
    pub grads: Vec<NodeId>,
    pub saved: bool,
    pub stop: bool,
    /// An in-place edit of its first argument (`h[..] = v`, `h += v`; see `Tracer::edits`).
    pub edit: bool,
    /// A merge node (see `Tracer::merge`): its first argument's value when the conditions
    /// after its second all held, else its second's.
    pub merge: bool,
    /// For apply nodes that call `.backward()`: the backward pass they run (see [`Graph::backward`]).
    pub backward: Option<usize>,
}

impl Node<'_> {
    /// Display name used in errors: `%3 encoder.layer.2.output (at src/main.rs:12)`.
    pub fn name(&self, id: NodeId) -> String {
        node_name(id, &self.label, self.location)
    }
}

/// `encoder.layer.1.output.grad`, with ` [backward 2]` for a pass after the first.
pub(crate) fn grad_label(of: &str, pass: usize) -> String {
    if pass > 0 {
        format!("{of}.grad [backward {pass}]")
    } else {
        format!("{of}.grad")
    }
}

/// `%{id} {label} (at {file}:{line})`: how errors name a node.
pub(crate) fn node_name(id: NodeId, label: &str, location: &Location<'_>) -> String {
    format!("%{id} {label} (at {}:{})", location.file(), location.line())
}

/// All nodes and hook-point effects built by one trace.
#[derive(Default)]
pub(crate) struct Graph<'env> {
    pub nodes: Vec<Node<'env>>,
    /// Effects per module (keyed by the module's identity).
    pub modules: AddrMap<ModuleEffects>,
    /// Apply nodes that call `.backward()`, in the order they were built: backward pass `k`
    /// is the one node `backward[k]` runs.
    pub backward: Vec<NodeId>,
    /// Activation caches asked for (`Tracer::cache`), recorded at every matching module call.
    pub caches: Vec<crate::cache::Request>,
    /// Helper modules (`helpers = [sae]` in `trace!`): modules outside the model whose hook
    /// points the block uses; their calls inside the block's own expressions are traced.
    pub helpers: std::collections::HashSet<usize>,
    /// Nodes `0..edit_nodes` were replayed from the model's persistent edits (`edit!`).
    pub edit_nodes: usize,
    /// How many effects were added so far ([`Effect::seq`]).
    pub effects_added: usize,
}

impl<'env> Graph<'env> {
    pub fn add(
        &mut self,
        label: String,
        location: &'static Location<'static>,
        kind: NodeKind<'env>,
        args: Vec<NodeId>,
        gates: Vec<NodeId>,
    ) -> NodeId {
        let id = self.nodes.len();
        for &a in args.iter().chain(gates.iter()) {
            self.nodes[a].listeners.push(id);
        }
        self.nodes.push(Node {
            label,
            location,
            kind,
            args,
            gates,
            listeners: Vec::new(),
            swap_uses: 0,
            grads: Vec::new(),
            saved: false,
            stop: false,
            edit: false,
            merge: false,
            backward: None,
        });
        id
    }

    /// Marks apply node `id` as one that calls `.backward()`: the next backward pass.
    pub fn add_backward(&mut self, id: NodeId) {
        if self.nodes[id].backward.is_none() && matches!(self.nodes[id].kind, NodeKind::Apply(_)) {
            self.nodes[id].backward = Some(self.backward.len());
            self.backward.push(id);
        }
    }

    /// `x.grad` reads built after the last `.backward()` refer to that last pass (before the
    /// run: only then is the number of passes known).
    pub fn settle_passes(&mut self) {
        let Some(last) = self.backward.len().checked_sub(1) else { return };
        for id in 0..self.nodes.len() {
            if let NodeKind::Grad { of, pass, next: true } = self.nodes[id].kind {
                if pass > last {
                    self.nodes[id].kind = NodeKind::Grad { of, pass: last, next: true };
                    self.nodes[id].label = grad_label(&self.nodes[of].label, last);
                }
            }
        }
    }

    pub fn module_mut(&mut self, key: usize, path: &str) -> &mut ModuleEffects {
        self.modules.entry(key).or_insert_with(|| ModuleEffects { path: path.to_string(), ..Default::default() })
    }

    pub fn add_effect(&mut self, key: usize, path: &str, io: Io, call: usize, group: usize, kind: EffectKind) {
        let effect = Effect { call, group, kind, order: self.nodes.len(), seq: self.effects_added };
        self.effects_added += 1;
        let m = self.module_mut(key, path);
        match io {
            Io::Input => m.input.push(effect),
            Io::Output => m.output.push(effect),
        }
    }

    /// `encoder.layer.3.output` for a hook node's module and side.
    pub fn point_name(&self, module: usize, io: Io) -> String {
        let path = self.modules.get(&module).map(|m| m.path.as_str()).unwrap_or("?");
        if path.is_empty() {
            io.word().to_string()
        } else {
            format!("{path}.{}", io.word())
        }
    }

    /// The graph in Graphviz DOT: hook reads as green boxes, apply nodes as ellipses, saved
    /// nodes bold, swaps and edits as red edges into the hook point they change.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph intervention {\n  rankdir=TB;\n  node [fontname=\"monospace\"];\n");
        for (id, n) in self.nodes.iter().enumerate() {
            let (shape, color) = match n.kind {
                NodeKind::Hook { .. } => ("box", "green4"),
                NodeKind::Grad { .. } => ("box", "blue"),
                NodeKind::Apply(_) => ("ellipse", "black"),
                NodeKind::Poison => ("octagon", "red"),
                NodeKind::Cache => ("box3d", "green4"),
            };
            let style = if n.saved { ",style=bold" } else { "" };
            let label = n.label.replace('"', "\\\"");
            let stop = if n.stop { "\\n(stop)" } else { "" };
            let _ = writeln!(s, "  n{id} [label=\"%{id} {label}{stop}\",shape={shape},color={color}{style}];");
            for a in &n.args {
                let _ = writeln!(s, "  n{a} -> n{id};");
            }
            if let NodeKind::Grad { of, .. } = n.kind {
                let _ = writeln!(s, "  n{of} -> n{id} [style=dotted,label=\"grad\"];");
            }
            if matches!(n.kind, NodeKind::Grad { .. }) {
                for v in &n.grads {
                    let _ = writeln!(s, "  n{v} -> n{id} [color=red,label=\"swap grad\"];");
                }
            }
            for g in &n.gates {
                let _ = writeln!(s, "  n{g} -> n{id} [style=dashed,label=\"if\"];");
            }
        }
        let mut modules: Vec<_> = self.modules.iter().collect();
        modules.sort_by_key(|(_, m)| m.path.clone());
        for (k, m) in modules {
            for io in [Io::Input, Io::Output] {
                for e in m.side(io) {
                    let (from, what) = match e.kind {
                        EffectKind::Swap(v, _) => (v, "swap"),
                        EffectKind::Require(v) => (v, "edit"),
                        EffectKind::Skip(v) => (v, "skip"),
                        EffectKind::Read(..) => continue,
                    };
                    let point = format!("p{k}_{}_{}_{}", io.word(), e.call, e.group);
                    let _ = writeln!(
                        s,
                        "  {point} [label=\"{} (call {}, invoke {})\",shape=cds,color=red];\n  n{from} -> {point} [color=red,label=\"{what}\"];",
                        self.point_name(*k, io),
                        e.call,
                        e.group
                    );
                }
            }
        }
        s.push_str("}\n");
        s
    }
}
