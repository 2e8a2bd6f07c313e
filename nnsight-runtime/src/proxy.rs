//! Typed handles to intervention graph nodes.
//!
//! A [`Proxy<T>`] stands for a value of type `T` that will exist while the model runs (an
//! activation, or something computed from activations). A [`Saved<T>`] is a proxy whose value
//! is kept after the run and handed back as a plain `T` when the trace ends.

use std::marker::PhantomData;

/// Index of a node in an intervention graph.
pub type NodeId = usize;

/// A value of type `T` that the intervention graph will compute during the run.
///
/// `Copy`: passing it around only copies the node id. Use it in `trace!` expressions, which
/// become graph nodes that rustc type-checks against the real `T`.
pub struct Proxy<T> {
    pub(crate) id: NodeId,
    /// The trace that made it: a proxy means nothing in another trace's graph.
    pub(crate) trace: u32,
    pub(crate) _t: PhantomData<fn() -> T>,
}

impl<T> Proxy<T> {
    pub(crate) fn new(trace: u32, id: NodeId) -> Self {
        Proxy { id, trace, _t: PhantomData }
    }
}

impl<T> Clone for Proxy<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Proxy<T> {}

impl<T> std::fmt::Debug for Proxy<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy(node {}: {})", self.id, std::any::type_name::<T>())
    }
}

/// A proxy marked with `.save()`: its value outlives the run and comes out of the trace.
pub struct Saved<T> {
    pub(crate) id: NodeId,
    pub(crate) trace: u32,
    pub(crate) _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Saved<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Saved<T> {}

impl<T> std::fmt::Debug for Saved<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Saved(node {}: {})", self.id, std::any::type_name::<T>())
    }
}

/// Anything that refers to a graph node of value type `Value`: [`Proxy`] and [`Saved`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a proxy",
    label = "a plain value here",
    note = "`.save()` and `.stop()` are for values that hook points give in the trace (`model.x.output`) and what is computed from them"
)]
pub trait ProxyRef: Copy {
    /// The type of the node's value.
    type Value: 'static;
    /// The node.
    fn node(&self) -> NodeId;
    /// The trace the node belongs to.
    fn trace_id(&self) -> u32;
    /// Whether this is a [`Saved`] (its value is fixed where it was saved).
    fn is_saved(&self) -> bool {
        false
    }
}

impl<T: 'static> ProxyRef for Proxy<T> {
    type Value = T;
    fn node(&self) -> NodeId {
        self.id
    }
    fn trace_id(&self) -> u32 {
        self.trace
    }
}

impl<T: 'static> ProxyRef for Saved<T> {
    type Value = T;
    fn node(&self) -> NodeId {
        self.id
    }
    fn is_saved(&self) -> bool {
        true
    }
    fn trace_id(&self) -> u32 {
        self.trace
    }
}

/// A saved proxy where a plain one is expected (`let n: f64 = h.norm().save()..` in `trace!`
/// binds a `Proxy<f64>`).
impl<T> From<Saved<T>> for Proxy<T> {
    fn from(s: Saved<T>) -> Proxy<T> {
        Proxy::new(s.trace, s.id)
    }
}

/// A value saved with `.save_if_ran()` ([`crate::Tracer::save_if_ran`]): after the run,
/// `Some(value)`, or `None` when the run ended before computing it (generation stopped at
/// end-of-sequence before that step; a `.stop()`).
#[derive(Debug)]
pub struct SavedIfRan<T>(pub(crate) Saved<T>);

impl<T> Clone for SavedIfRan<T> {
    fn clone(&self) -> Self {
        SavedIfRan(self.0)
    }
}

impl<T> Saved<T> {
    /// The same node as an ordinary proxy.
    pub fn proxy(self) -> Proxy<T> {
        Proxy::new(self.trace, self.id)
    }
}
