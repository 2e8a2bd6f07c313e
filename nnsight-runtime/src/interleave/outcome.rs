//! What a run leaves: the saved nodes' values, handed back by [`Outcome::take`].

use std::any::Any;
use std::panic::Location;
use std::rc::Rc;

use super::Slot;
use crate::error::{Error, Result};
use crate::graph::{node_name, Value};
use crate::proxy::NodeId;

/// Values left after a run: the saved nodes' values, by node id.
pub struct Outcome {
    slots: Vec<Slot>,
    /// Saved nodes' labels and source locations, for errors (formatted only when one occurs).
    labels: Vec<Option<(String, &'static Location<'static>)>>,
    stopped_at: Option<String>,
    trace: u32,
}

impl Outcome {
    pub(super) fn new(slots: Vec<Slot>, labels: Vec<Option<(String, &'static Location<'static>)>>, stopped_at: Option<String>) -> Self {
        Outcome { slots, labels, stopped_at, trace: 0 }
    }

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

    /// [`Outcome::take`], with `None` for a node the run never reached (its slot is still
    /// empty: generation ended early, or a `.stop()`; a run that misses a hook point for any
    /// other reason has already failed with `Error::NeverProvided`).
    pub(crate) fn take_if_ran<T: 'static>(&mut self, trace: u32, id: NodeId) -> Result<Option<T>> {
        if trace == self.trace && matches!(self.slots.get(id), Some(Slot::Empty)) {
            return Ok(None);
        }
        self.take(trace, id).map(Some)
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
                    Some(s) => format!("the run stopped early at {s} before it was computed (`.save_if_ran()` gives `None` instead)"),
                    None => "its inputs were never provided (a generation step after every row ended at end-of-sequence: save it with `.save_if_ran()` to get `None` for such steps)".into(),
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
fn value_as<T: 'static>(v: Value, node: &str) -> Result<T> {
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
pub(super) fn shallow_any<T: 'static>(v: &T) -> Option<T> {
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

