//! What `trace!` can run: a model that batches its invokes' inputs and runs one forward pass
//! ([`Traced`]), and what can be given as an invoke's input ([`IntoInvoke`]).

use tch::Tensor;

use crate::error::{Error, Result};
use crate::hook::{HookModule, Hooked};

/// A model that `trace!` can run: it batches the invokes' inputs and runs its forward pass.
pub trait Traced {
    /// One invoke's input in the model's own form (token ids, a tensor, ...).
    type Invoke;
    /// The number of batch rows this invoke contributes.
    fn invoke_rows(&self, invoke: &Self::Invoke) -> Result<i64>;
    /// Runs one forward pass on all invokes batched along dim 0, in order. Hooked modules called
    /// inside are seen by the active trace.
    fn forward_invokes(&self, invokes: &[Self::Invoke]) -> Result<()>;

    /// After the run: `true` when hook points that never ran are expected (generation that
    /// stopped at an end-of-sequence token before the last step); their interventions are then
    /// skipped instead of being an [`Error::NeverProvided`].
    fn tolerates_missing(&self) -> bool {
        false
    }

    /// Adds this model's persistent edits (`edit!`, see [`crate::LanguageModel::add_edit`]) to a
    /// new trace's graph; called by [`crate::Tracer::new`] before the block builds anything.
    /// Default: none.
    fn replay_edits<'e>(&'e self, _tracer: &mut crate::Tracer<'e, Self>) {}
}

/// What can be given to `trace!`/`invoke` as an input for model `M`.
pub trait IntoInvoke<M: ?Sized + Traced> {
    /// Converts (e.g. tokenizes) the input.
    fn into_invoke(self, model: &M) -> Result<M::Invoke>;
}

/// Tensor models: one invoke is a tensor whose dim 0 is its batch rows.
impl<M: HookModule<Input = Tensor>> Traced for Hooked<M> {
    type Invoke = Tensor;
    fn invoke_rows(&self, invoke: &Tensor) -> Result<i64> {
        if invoke.dim() == 0 {
            return Err(Error::Input(format!(
                "input to `{}` must have a batch dimension, got a scalar tensor",
                display_path(self.path())
            )));
        }
        Ok(invoke.size()[0])
    }
    fn forward_invokes(&self, invokes: &[Tensor]) -> Result<()> {
        if let Some((i, t)) = invokes.iter().enumerate().find(|(_, t)| t.size()[1..] != invokes[0].size()[1..] || t.kind() != invokes[0].kind()) {
            return Err(Error::Input(format!(
                "invokes of `{}` are batched on dim 0, so they must agree on the other dims and dtype: invoke 0 is {}, invoke {i} is {}",
                display_path(self.path()),
                crate::Activation::describe(&invokes[0]),
                crate::Activation::describe(t)
            )));
        }
        let x = if invokes.len() == 1 { invokes[0].shallow_clone() } else { Tensor::f_cat(invokes, 0)? };
        self.call(x);
        Ok(())
    }
}

impl<M: HookModule<Input = Tensor>> IntoInvoke<Hooked<M>> for Tensor {
    fn into_invoke(self, _: &Hooked<M>) -> Result<Tensor> {
        Ok(self)
    }
}

/// The tensor is shared, not copied (inputs of tensor models can be large): with a single
/// invoke, an in-place edit of the root's input writes into it; pass `x.copy()` to keep `x`.
impl<M: HookModule<Input = Tensor>> IntoInvoke<Hooked<M>> for &Tensor {
    fn into_invoke(self, _: &Hooked<M>) -> Result<Tensor> {
        Ok(self.shallow_clone())
    }
}

fn display_path(p: &str) -> &str {
    if p.is_empty() {
        "<root>"
    } else {
        p
    }
}


/// Traces the model behind a handle: a reference (`trace!(m, ..)` with `m: &Model`) or a
/// locked `Mutex` (threads that share one model: `let m = shared.lock().unwrap(); trace!(m, ..)`).
macro_rules! traced_through {
    ($($handle:ty),*) => {$(
        impl<T: Traced + ?Sized> Traced for $handle {
            type Invoke = T::Invoke;
            fn invoke_rows(&self, invoke: &Self::Invoke) -> Result<i64> {
                (**self).invoke_rows(invoke)
            }
            fn forward_invokes(&self, invokes: &[Self::Invoke]) -> Result<()> {
                (**self).forward_invokes(invokes)
            }
            fn tolerates_missing(&self) -> bool {
                (**self).tolerates_missing()
            }
            /// The model's own persistent edits, replayed on a tracer of the model and taken over.
            fn replay_edits<'e>(&'e self, tracer: &mut crate::Tracer<'e, Self>) {
                tracer.absorb(crate::Tracer::new(&**self));
            }
        }
    )*};
}
traced_through!(&T, std::sync::MutexGuard<'_, T>);

impl<'a, T: Traced + ?Sized, X: IntoInvoke<T>> IntoInvoke<&'a T> for X {
    fn into_invoke(self, model: &&'a T) -> Result<T::Invoke> {
        self.into_invoke(*model)
    }
}

impl<T: Traced + ?Sized, X: IntoInvoke<T>> IntoInvoke<std::sync::MutexGuard<'_, T>> for X {
    fn into_invoke(self, model: &std::sync::MutexGuard<'_, T>) -> Result<T::Invoke> {
        self.into_invoke(&**model)
    }
}

