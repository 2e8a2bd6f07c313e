//! The run-time side of activation caches ([`crate::cache`]): which module calls a cache
//! records, recording them (narrowed to the cache's batch group by the same [`Narrow`] that
//! hook reads use), and keeping recorded values what they were when the module returned.
//!
//! A recorded tensor is a view of the model's activation unless a dtype or device conversion
//! (or `copy`) made a new one. Like a saved value (module [`super::saved`]), such a view is
//! copied just before an in-place edit of the trace that overlaps it runs, and its libtorch
//! version counter is checked when the run ends: any other in-place change after it was recorded
//! is [`Error::SavedChanged`] naming the cache entry.

use std::rc::Rc;

use tch::Tensor;

use super::{saved, Interleaver};
use crate::activation::{Activation, Layout, Leaves, Narrow, Refusal};
use crate::cache::{Cache, Request};
use crate::error::{Error, Result};
use crate::graph::{AddrMap, Io, Value};
use crate::proxy::NodeId;

/// One recorded module call.
struct Entry {
    path: Rc<str>,
    io: Io,
    call: usize,
    tensor: Tensor,
    /// The version counter when recorded, for a view of the model's memory; `None` for a
    /// tensor of the cache's own (converted or copied).
    version: Option<i64>,
}

/// The caches of one run and what they recorded so far.
pub(crate) struct Recorder {
    requests: Vec<Request>,
    /// Per module (decided at its first call): its path and the requests that record it.
    wants: AddrMap<(Rc<str>, Vec<usize>)>,
    /// Per request, in call order.
    entries: Vec<Vec<Entry>>,
    /// Whether some entry is a view whose value must be protected.
    watching: bool,
}

impl Recorder {
    pub(crate) fn new(requests: Vec<Request>) -> Self {
        let entries = requests.iter().map(|_| Vec::new()).collect();
        Recorder { requests, wants: AddrMap::default(), entries, watching: false }
    }
}

fn version(t: &Tensor) -> i64 {
    if t.defined() {
        t.f_internal_version().unwrap_or(0)
    } else {
        0
    }
}

/// The first defined tensor of a value, narrowed to `narrow`'s rows (a view; a tensor shared by
/// every row comes whole).
struct FirstTensor {
    narrow: Narrow<'static>,
    found: Option<Tensor>,
}

impl Leaves for FirstTensor {
    fn tensor(&mut self, t: &Tensor, layout: Layout) -> std::result::Result<Tensor, Refusal> {
        if self.found.is_none() && t.defined() {
            self.found = Some(self.narrow.tensor(t, layout)?);
        }
        Ok(t.shallow_clone())
    }
}

impl Interleaver<'_> {
    /// Whether some cache records module `key` (module path `path`); decided at its first call.
    pub(super) fn cache_wants(&self, key: usize, path: &str) -> bool {
        let mut rec = self.cache.borrow_mut();
        if rec.requests.is_empty() {
            return false;
        }
        if let Some((_, reqs)) = rec.wants.get(&key) {
            return !reqs.is_empty();
        }
        let reqs: Vec<usize> = rec.requests.iter().enumerate().filter(|(_, r)| r.wants(path)).map(|(i, _)| i).collect();
        let any = !reqs.is_empty();
        rec.wants.insert(key, (Rc::from(path), reqs));
        any
    }

    /// Whether a cache records this side of module `key` (module path `path`).
    pub(super) fn cache_records(&self, key: usize, io: Io, path: &str) -> bool {
        if self.cache.borrow().requests.is_empty() || !self.cache_wants(key, path) {
            return false;
        }
        let rec = self.cache.borrow();
        match rec.wants.get(&key) {
            Some((_, reqs)) => reqs.iter().any(|&i| io == Io::Output || rec.requests[i].inputs),
            None => false,
        }
    }

    /// Records module `key`'s value `act` (its `io` side, call `call`) in every cache that wants
    /// it: the output's first tensor, or the first input's, narrowed to the cache's rows, then
    /// converted as asked.
    pub(super) fn record<A: Activation>(&self, key: usize, io: Io, call: usize, act: &A, layout: Layout, path: &str) -> Result<()> {
        let mut rec = self.cache.borrow_mut();
        let Some((name, reqs)) = rec.wants.get(&key).map(|(n, r)| (n.clone(), r.clone())) else { return Ok(()) };
        let point = || match io {
            Io::Output => format!("{path}.output"),
            Io::Input => format!("{path}.input"),
        };
        for i in reqs {
            let r = &rec.requests[i];
            if io == Io::Input && !r.inputs {
                continue;
            }
            let mut first = FirstTensor { narrow: Narrow { rows: self.batch.rows(r.group), copies: None }, found: None };
            let refused = |reason: Refusal, layout: Layout| Error::Layout {
                point: point(),
                call,
                layout: layout.to_string(),
                value: act.describe(),
                reason: reason.to_string(),
            };
            match io {
                Io::Output => {
                    act.map_leaves(layout, &mut first).map_err(|e| refused(e, layout))?;
                }
                Io::Input => {
                    let l = A::first_layout(layout).map_err(|e| refused(e, layout))?;
                    act.first().map_leaves(l, &mut first).map_err(|e| refused(e, l))?;
                }
            }
            let Some(mut t) = first.found else { continue };
            let mut own = false;
            if let Some(k) = r.kind {
                if t.kind() != k {
                    t = t.f_to_kind(k)?;
                    own = true;
                }
            }
            if let Some(d) = r.device {
                if t.device() != d {
                    t = t.f_to_device(d).map_err(|e| Error::Device(format!("cache: moving `{}` (call {call}) to {d:?}: {e}", point())))?;
                    own = true;
                }
            }
            if r.copy && !own {
                t = t.copy();
                own = true;
            }
            let version = (!own).then(|| version(&t));
            rec.watching |= version.is_some();
            rec.entries[i].push(Entry { path: name.clone(), io, call, tensor: t, version });
        }
        Ok(())
    }

    /// Before an edit node runs on `args`: copies every recorded view whose memory the edit may
    /// change (every view, when an argument's type is not known).
    pub(super) fn protect_cache(&self, args: &[Value]) {
        let mut rec = self.cache.borrow_mut();
        if !rec.watching {
            return;
        }
        let mut edited = Vec::new();
        let mut unknown = false;
        for a in args {
            match saved::parts_of_any(&**a) {
                Some((ts, _)) => edited.extend(ts),
                None => unknown = true,
            }
        }
        for e in rec.entries.iter_mut().flatten() {
            if e.version.is_some() && (unknown || edited.iter().any(|x| saved::overlaps(&e.tensor, x))) {
                e.tensor = e.tensor.copy();
                e.version = None;
            }
        }
    }

    /// After an edit node ran: views it did not overlap may share a version counter with what it
    /// changed (other rows of one tensor), so their counters are read again.
    pub(super) fn refresh_cache(&self) {
        let mut rec = self.cache.borrow_mut();
        if !rec.watching {
            return;
        }
        for e in rec.entries.iter_mut().flatten() {
            if let Some(v) = e.version.as_mut() {
                *v = version(&e.tensor);
            }
        }
    }

    /// The caches as the run leaves them, by node; [`Error::SavedChanged`] for a recorded view
    /// changed in place after it was recorded.
    pub(super) fn take_caches(&self) -> Result<Vec<(NodeId, Cache)>> {
        let mut rec = self.cache.borrow_mut();
        let requests = std::mem::take(&mut rec.requests);
        let entries = std::mem::take(&mut rec.entries);
        let mut out = Vec::with_capacity(requests.len());
        for (r, entries) in requests.into_iter().zip(entries) {
            if let Some(e) = entries.iter().find(|e| e.version.is_some_and(|v| v != version(&e.tensor))) {
                let side = if e.io == Io::Output { "output" } else { "input" };
                let node = format!("{} (its entry `{}` {side}, call {})", self.node_name(r.node), e.path, e.call);
                return Err(Error::SavedChanged {
                    node,
                    by: "after the cache recorded it, by an in-place operation of the model's forward pass or of intervention code \
                         that is not written as an edit (`CacheOptions { copy: true, .. }` records copies)"
                        .to_string(),
                });
            }
            let mut cache = Cache::with_order(r.order);
            for e in entries {
                cache.push(&e.path, e.io == Io::Input, e.call, e.tensor);
            }
            out.push((r.node, cache.finish()));
        }
        Ok(out)
    }
}
