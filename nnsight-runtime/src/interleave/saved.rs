//! A saved value is the value at the moment it was saved.
//!
//! A hook read hands out a view of the model's activation, so a later in-place change of that
//! storage would show in a saved value. Two cases:
//! - an in-place edit the interleaver runs (`h[..] = v`, `h += v`: nodes declared with
//!   [`crate::Tracer::edits`]), of the same activation or of one sharing its storage (the next
//!   module's `.input`): before such an edit runs, every saved value whose memory overlaps the
//!   edited tensors is copied, and the copy is what the trace returns. Saved values of other
//!   rows (another invoke's) are not copied: their memory does not overlap.
//! - any other in-place change (an in-place op in the model's own forward pass, or in an
//!   intervention that is not written as an edit): libtorch's version counter of each saved
//!   tensor, which every in-place operation on it or on a view of it bumps, is recorded when the
//!   value is saved and checked after every node, at every hook point with effects and at the
//!   end of the run; a moved counter is [`Error::SavedChanged`], which names the saved node, who
//!   changed it, and the fix (`.copy().save()`).
//!
//! Cost: one version read per saved tensor when it is saved and at each check (a few
//! nanoseconds each); copies only for saved values an edit overlaps.

use std::any::Any;
use std::rc::Rc;

use tch::Tensor;

use super::{Interleaver, Slot};
use crate::activation::Activation;
use crate::error::{Error, Result};
use crate::graph::Value;
use crate::proxy::NodeId;

/// Makes a copy with fresh storage of a value of the type it was made for (`None` for another).
pub(super) type CopyFn = fn(&dyn Any) -> Option<Value>;

/// A saved node's value whose tensors are watched.
pub(super) struct Guard {
    node: NodeId,
    /// Shallow clones of the value's tensors and their versions when it was saved.
    tensors: Vec<(Tensor, i64)>,
    copy: CopyFn,
}

/// [`CopyFn`] for values of type `A`.
pub(super) fn copy_as<A: Activation>(v: &dyn Any) -> Option<Value> {
    v.downcast_ref::<A>().map(|a| Rc::new(a.deep_copy()) as Value)
}

/// The tensors of `a`, shallow clones.
pub(super) fn tensors_of<A: Activation>(a: &A) -> Vec<Tensor> {
    let mut out = Vec::new();
    a.for_each_tensor(&mut |t| out.push(t.shallow_clone()));
    out
}

/// The tensors of a type-erased value and how to copy it, for the value types apply nodes
/// commonly return; `Some((vec![], ..))` for plain values without tensors; `None` for a type
/// this does not know.
pub(super) fn parts_of_any(v: &dyn Any) -> Option<(Vec<Tensor>, CopyFn)> {
    macro_rules! activations {
        ($($t:ty),*) => {
            $(if let Some(a) = v.downcast_ref::<$t>() { return Some((tensors_of(a), copy_as::<$t>)); })*
        };
    }
    activations!(Tensor, (Tensor, Tensor), (Tensor, Tensor, Tensor), Vec<Tensor>, Option<Tensor>);
    fn plain(_: &dyn Any) -> Option<Value> {
        None
    }
    macro_rules! plain {
        ($($t:ty),*) => {
            $(if v.is::<$t>() { return Some((Vec::new(), plain)); })*
        };
    }
    plain!((), f64, f32, i64, i32, u64, u32, usize, bool, String, Vec<i64>, Vec<f64>, Vec<f32>, Vec<usize>, Vec<bool>);
    None
}

/// The bytes `[start, end)` that `t`'s elements span (non-negative strides assumed, as every
/// view of libtorch has); `None` for a tensor without plain memory (sparse, oneDNN, meta).
fn byte_range(t: &Tensor) -> Option<(usize, usize)> {
    if t.is_sparse() || t.is_mkldnn() {
        return None;
    }
    let start = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.data_ptr() as usize)).unwrap_or(0);
    if start == 0 {
        return None;
    }
    let elem = t.kind().elt_size_in_bytes();
    let last: i64 = t.size().iter().zip(t.stride()).map(|(&n, s)| (n - 1) * s.max(0)).sum();
    Some((start, start + (last as usize + 1) * elem))
}

/// Whether two tensors may share memory: their byte ranges on one device intersect (always,
/// to be safe, for a tensor whose memory cannot be located).
pub(super) fn overlaps(a: &Tensor, b: &Tensor) -> bool {
    if !a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0 {
        return false;
    }
    match (byte_range(a), byte_range(b)) {
        (Some((s1, e1)), Some((s2, e2))) => a.device() == b.device() && s1 < e2 && s2 < e1,
        _ => true,
    }
}

fn version(t: &Tensor) -> i64 {
    if t.defined() {
        t.f_internal_version().unwrap_or(0)
    } else {
        0
    }
}

impl Interleaver<'_> {
    /// Starts watching saved node `id`'s value, whose tensors are `tensors` (no-op for a node
    /// that is not saved, or a value without tensors).
    pub(super) fn guard_saved(&self, id: NodeId, tensors: Vec<Tensor>, copy: CopyFn) {
        if tensors.is_empty() || !self.graph.borrow().nodes[id].saved {
            return;
        }
        let tensors = tensors.into_iter().map(|t| {
            let v = version(&t);
            (t, v)
        });
        let guard = Guard { node: id, tensors: tensors.collect(), copy };
        let mut st = self.state.borrow_mut();
        st.guarded.retain(|g| g.node != id);
        st.guarded.push(guard);
    }

    /// [`Interleaver::guard_saved`] for a value of a type known only at run time.
    pub(super) fn guard_saved_any(&self, id: NodeId, v: &Value) {
        if let Some((tensors, copy)) = parts_of_any(&**v) {
            self.guard_saved(id, tensors, copy);
        }
    }

    /// Before an edit node runs on `args`: copies every saved value whose memory the edit may
    /// change (any, when an argument's type is not known), so the saved value stays what it
    /// was, for the trace's result and for every later use in the block. (A change before
    /// this moment was caught by the check at the hook point that runs the edit or after the
    /// node before it.)
    pub(super) fn protect_saved(&self, args: &[Value]) {
        if self.state.borrow().guarded.is_empty() {
            return;
        }
        let mut edited = Vec::new();
        let mut unknown = false;
        for a in args {
            match parts_of_any(&**a) {
                Some((ts, _)) => edited.extend(ts),
                None => unknown = true,
            }
        }
        let mut st = self.state.borrow_mut();
        let guards = std::mem::take(&mut st.guarded);
        for g in guards {
            let hit = unknown || g.tensors.iter().any(|(t, _)| edited.iter().any(|e| overlaps(t, e)));
            let copy = match (&st.slots[g.node], hit) {
                (Slot::Ready(v), true) => (g.copy)(&**v),
                _ => None,
            };
            match copy {
                // From here on the saved node is that copy: nodes and swaps written after the
                // edit that use the saved value get the value it was saved with, as the trace
                // returns it (the edit itself works on the activation it was given).
                Some(c) => {
                    st.slots[g.node] = Slot::Ready(c.clone());
                    st.snapshots.push((g.node, c));
                }
                None => st.guarded.push(g),
            }
        }
    }

    /// Before edit node `edit` runs on `args`: every value whose memory it may change and that a
    /// node built before the edit has not read yet (it waits for a later hook point) is copied,
    /// and that node reads the copy (program order: it was written before the edit).
    pub(super) fn protect_pending(&self, edit: NodeId, args: &[Value]) {
        let mut edited = Vec::new();
        for a in args {
            match parts_of_any(&**a) {
                Some((ts, _)) => edited.extend(ts),
                None => return,
            }
        }
        let g = self.graph.borrow();
        let mut st = self.state.borrow_mut();
        for j in 0..edit {
            let Slot::Ready(v) = &st.slots[j] else { continue };
            let waiting = g.nodes[j].listeners.iter().any(|&l| l < edit && matches!(st.slots[l], Slot::Empty));
            if !waiting {
                continue;
            }
            let Some((tensors, copy)) = parts_of_any(&**v) else { continue };
            if !tensors.iter().any(|t| edited.iter().any(|e| overlaps(t, e))) {
                continue;
            }
            if let Some(c) = copy(&**v) {
                st.pre_edit.entry(j).or_default().push((edit, c));
            }
        }
    }

    /// After an edit node ran: the saved values it did not overlap share a version counter
    /// with what it changed (another invoke's rows of one tensor), so their counters are read
    /// again.
    pub(super) fn refresh_saved(&self) {
        for g in self.state.borrow_mut().guarded.iter_mut() {
            for (t, v) in g.tensors.iter_mut() {
                *v = version(t);
            }
        }
    }

    /// [`Error::SavedChanged`] for the first watched saved value changed in place since it was
    /// saved; `by` says who ran in between.
    pub(super) fn check_saved(&self, by: impl FnOnce() -> String) -> Result<()> {
        let st = self.state.borrow();
        let Some(g) = st.guarded.iter().find(|g| g.tensors.iter().any(|(t, v)| version(t) != *v)) else {
            return Ok(());
        };
        let node = self.node_name(g.node);
        Err(Error::SavedChanged { node, by: by() })
    }

    /// `the node %4 ... (at src/main.rs:9)`, for [`Error::SavedChanged`].
    pub(super) fn by_node(&self, id: NodeId) -> String {
        format!("by node {}", self.node_name(id))
    }

    /// The slots the run leaves, with the copies taken before edits in place of the values.
    pub(super) fn use_snapshots(slots: &mut [Slot], snapshots: Vec<(NodeId, Value)>) {
        for (id, v) in snapshots {
            if let Slot::Ready(_) = slots[id] {
                slots[id] = Slot::Ready(v);
            }
        }
    }
}
