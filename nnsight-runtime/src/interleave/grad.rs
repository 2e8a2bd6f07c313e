//! `.grad` during a run: backward hooks on the full-batch activation tensors of hook reads that
//! have grad nodes, handing each invoke its rows of the gradient and splicing swapped rows back.

use std::any::Any;
use std::rc::Rc;

use super::{activation_from, Interleaver, Slot};
use crate::activation::{split, Activation, Layout, Rows};
use crate::error::{Error, QuietGuard, Result};
use crate::graph::Value;
use crate::graph::{Effect, NodeKind};
use crate::proxy::NodeId;

/// The interleaver's address, handed to backward hooks (libtorch wants `Send` closures).
/// Backward hooks run while a node of this run calls `.backward()` on this thread (CPU; on an
/// accelerator libtorch's worker runs them while this thread waits in `backward`), and they are
/// all removed before the interleaver is dropped.
#[derive(Clone, Copy)]
struct InterleaverPtr(*const ());
// SAFETY: see the type's docs: the pointer is only used while the run that owns it waits in
// `backward`, and never after the hooks are removed.
unsafe impl Send for InterleaverPtr {}

impl<'env> Interleaver<'env> {
    /// If hook read `node` has `.grad` nodes, puts a backward hook on the full-batch tensor
    /// `value` (hooking the invoke's narrowed view would miss the gradient: the model uses the
    /// full tensor).
    pub(super) fn watch_grad(&self, node: NodeId, value: &dyn Any, layout: Layout, e: &Effect) -> Result<()> {
        if self.graph.borrow().nodes[node].grads.is_empty() {
            return Ok(());
        }
        let Some(t) = value.downcast_ref::<tch::Tensor>() else {
            return Err(Error::Node {
                node: self.node_name(node),
                message: "`.grad` needs a tensor hook point; this one holds a structured value".into(),
            });
        };
        let ptr = InterleaverPtr(self as *const Interleaver<'env> as *const ());
        let rows = self.batch.rows(e.group);
        // The tensor's own layout (`Batch`, `Flattened` or `Shared`), for its gradient.
        let layout = if rows.is_all() {
            Layout::Auto
        } else {
            split(t, layout, rows.total).map_err(|r| Error::Node { node: self.node_name(node), message: format!("`.grad`: {r}") })?.layout()
        };
        let mut reached = 0usize;
        let hook = move |g: &tch::Tensor| {
            let ptr = ptr;
            // SAFETY: see `InterleaverPtr`.
            let il = unsafe { &*(ptr.0 as *const Interleaver<'static>) };
            // This may be another thread than the run's (an accelerator's backward worker):
            // nothing here may rely on the run's thread-locals. Panics in the nodes it runs
            // are errors of the run, not messages on this thread's stderr.
            let _quiet = QuietGuard::new();
            reached += 1;
            let pass = il.state.borrow().backward_pass.unwrap_or(reached - 1);
            il.on_grad(node, pass, g, rows, layout)
        };
        let mut st = self.state.borrow_mut();
        st.grad_hooks.register(t, hook).map(|_| ())
    }

    /// Backward reached hook read `read` (its `pass`-th time): hand the invoke's rows of the
    /// gradient to its grad nodes, and return the gradient with swapped rows if any `.grad = v`.
    fn on_grad(&self, read: NodeId, pass: usize, g: &tch::Tensor, rows: Rows, layout: Layout) -> Option<tch::Tensor> {
        let grads: Vec<NodeId> = {
            let gr = self.graph.borrow();
            gr.nodes[read]
                .grads
                .iter()
                .copied()
                .filter(|&n| matches!(gr.nodes[n].kind, NodeKind::Grad { pass: p, .. } if p == pass))
                .collect()
        };
        let mut full = g.shallow_clone();
        let mut replaced = false;
        // Every grad node of this pass gets its value first; then the swaps (whose new values
        // may be computed from those gradients) splice their rows in.
        let result = grads
            .iter()
            .try_for_each(|&gn| {
                let own = full.narrow_batch(layout, rows).map_err(|r| Error::Node { node: self.node_name(gn), message: r.to_string() })?;
                let own: Value = Rc::new(own);
                self.guard_saved_any(gn, &own);
                self.provide(gn, own)
            })
            .and_then(|_| {
                for &gn in &grads {
                    let swaps = self.graph.borrow().nodes[gn].grads.clone();
                    for v in swaps {
                        let value = {
                            let st = self.state.borrow();
                            match &st.slots[v] {
                                Slot::Ready(x) => Some(x.clone()),
                                Slot::Skipped => None,
                                _ => {
                                    drop(st);
                                    let gr = self.graph.borrow();
                                    return Err(Error::Node {
                                        node: gr.nodes[v].name(v),
                                        message: format!(
                                            "the new gradient for {} is not computed when backward reaches it",
                                            gr.nodes[gn].name(gn)
                                        ),
                                    });
                                }
                            }
                        };
                        self.release(v);
                        if let Some(x) = value {
                            let new = activation_from::<tch::Tensor>(x, || self.node_name(v))?;
                            full = full.shallow_clone().splice_batch(new, layout, rows).map_err(|r| Error::Node {
                                node: self.node_name(gn),
                                message: format!("the new gradient cannot replace the invoke's rows: {r}"),
                            })?;
                            replaced = true;
                        }
                    }
                }
                Ok(())
            });
        if let Err(e) = result {
            let mut st = self.state.borrow_mut();
            if st.error.is_none() {
                st.error = Some(e);
            }
            return None;
        }
        replaced.then_some(full)
    }
}

