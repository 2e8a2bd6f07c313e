//! Values shared by every row, read by one invoke among several: each such read is a private
//! copy, and its libtorch version counter (which every in-place operation on it or on a view of
//! it bumps) is recorded. A copy whose counter moved was edited in place by that invoke's
//! intervention code: after each node runs, and at the end of the run, that is refused with
//! [`Error::SharedChange`], since changing the real value would change every invoke's rows.

use tch::Tensor;

use super::Interleaver;
use crate::activation::{describe_tensor, shared_reason};
use crate::error::{Error, Result};
use crate::graph::{Effect, Io};
use crate::proxy::NodeId;
use crate::tracer::Group;

/// A copy of a shared tensor handed to one invoke.
pub(super) struct Watched {
    tensor: Tensor,
    version: i64,
    /// Declared shared (rather than by the dim-0 default), for the error.
    declared: bool,
    key: usize,
    io: Io,
    call: usize,
    group: usize,
}

impl Interleaver<'_> {
    /// Starts watching the copies made for read effect `e` at hook point `key`/`io`.
    pub(super) fn watch(&self, copies: Vec<(Tensor, bool)>, key: usize, io: Io, e: &Effect) {
        let mut st = self.state.borrow_mut();
        for (tensor, declared) in copies {
            let version = tensor.f_internal_version().unwrap_or(0);
            st.watched.push(Watched { tensor, version, declared, key, io, call: e.call, group: e.group });
        }
    }

    /// [`Error::SharedChange`] for the first watched copy that was changed in place; `by` is
    /// the node that just ran (`None` at the end of the run).
    pub(super) fn check_shared(&self, by: Option<NodeId>) -> Result<()> {
        let st = self.state.borrow();
        let Some(w) = st.watched.iter().find(|w| w.tensor.f_internal_version().unwrap_or(w.version) != w.version) else {
            return Ok(());
        };
        let g = self.graph.borrow();
        let by = match by {
            Some(id) => format!("the in-place edit by node {}", g.nodes[id].name(id)),
            None => "an in-place edit of the invoke's copy (made after the module ran)".to_string(),
        };
        Err(Error::SharedChange {
            point: g.point_name(w.key, w.io),
            call: w.call,
            invoke: Group(w.group),
            what: format!("{} ({})", describe_tensor(&w.tensor), shared_reason(&w.tensor, w.declared, self.batch.total)),
            batch: self.batch.total,
            by,
        })
    }
}
