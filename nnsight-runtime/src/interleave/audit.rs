//! A run that changes nothing and records, for every hook point of every module call, its value
//! and how the declared layout shares it out among batch rows ([`crate::Tracer::layouts`]):
//! a model author's check of the declarations.

use std::cell::RefCell;
use std::fmt;

use tch::Tensor;

use super::{Batch, Interleaver};
use crate::activation::{describe_tensor, split, Activation, Layout, Leaves, Refusal, Split};
use crate::error::{panic_message, Error, Result};
use crate::graph::{Graph, Io};

/// One hook point of one module call, as a run saw it (see [`crate::Tracer::layouts`]).
#[derive(Clone, Debug)]
pub struct HookPointLayout {
    /// `encoder.layer.0.inputs` (the whole input) or `encoder.layer.0.output`.
    pub point: String,
    /// The module's call index.
    pub call: usize,
    /// The declared layout (`Layout::Auto` where the module declares nothing).
    pub layout: Layout,
    /// The value, e.g. `(Tensor[2, 14, 384] Float Cpu, Tensor[2, 1, 1, 14] Float Cpu)`.
    pub value: String,
    /// Every tensor of the value, in order: its description and how it is shared out in this
    /// run's batch, or why the declared layout does not fit it.
    pub tensors: Vec<(String, Result<Split, Refusal>)>,
}

impl HookPointLayout {
    pub(super) fn new<A: Activation>(path: &str, io: Io, call: usize, act: &A, layout: Layout, total: i64) -> Self {
        struct Record<'a> {
            total: i64,
            out: &'a mut Vec<(String, Result<Split, Refusal>)>,
        }
        impl Leaves for Record<'_> {
            fn tensor(&mut self, t: &Tensor, layout: Layout) -> Result<Tensor, Refusal> {
                self.out.push((describe_tensor(t), split(t, layout, self.total)));
                Ok(t.shallow_clone())
            }
        }
        let mut tensors = Vec::new();
        if let Err(r) = act.map_leaves(layout, &mut Record { total, out: &mut tensors }) {
            tensors.push((act.describe(), Err(r)));
        }
        let word = match io {
            Io::Input => "inputs",
            Io::Output => "output",
        };
        let point = if path.is_empty() { word.to_string() } else { format!("{path}.{word}") };
        HookPointLayout { point, call, layout, value: act.describe(), tensors }
    }

    /// Whether the layout is declared (no dim-0 default anywhere) and fits every tensor.
    pub fn is_declared_and_fits(&self) -> bool {
        self.layout.is_declared() && self.tensors.iter().all(|(_, s)| s.is_ok())
    }
}

impl fmt::Display for HookPointLayout {
    /// `encoder.layer.0.output (call 0): batch axis 0: Tensor[2, 14, 384] Float Cpu rows on axis 0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .tensors
            .iter()
            .map(|(t, s)| match s {
                Ok(Split::Rows { axis, per_row: 1 }) => format!("{t} rows on axis {axis}"),
                Ok(Split::Rows { axis, per_row }) => format!("{t} rows on axis {axis} ({per_row} entries per row)"),
                Ok(Split::Shared { declared: true }) => format!("{t} shared"),
                Ok(Split::Shared { declared: false }) => format!("{t} shared (dim 0 is not the batch size)"),
                Err(r) => format!("{t} does not fit: {r}"),
            })
            .collect();
        write!(f, "{} (call {}): {}: {}", self.point, self.call, self.layout, parts.join(", "))
    }
}

impl Interleaver<'_> {
    /// Runs `forward` once (no autograd, no intervention), recording every hook point.
    pub(crate) fn audit(batch: Batch, forward: impl FnOnce() -> Result<()>) -> Result<Vec<HookPointLayout>> {
        let mut il = Interleaver::new(Graph::default(), batch, false);
        il.audit = Some(RefCell::new(Vec::new()));
        let _quiet = super::QuietGuard::new();
        match il.drive(forward) {
            Ok(Ok(())) => Ok(il.audit.map(RefCell::into_inner).unwrap_or_default()),
            Ok(Err(e)) => Err(e),
            Err(payload) => Err(Error::Model(panic_message(&*payload))),
        }
    }
}
