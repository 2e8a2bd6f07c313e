//! Persistent edits: interventions that apply to every later trace of a [`LanguageModel`]
//! until cleared (nnsight's `model.edit()` / `model.clear_edits()`).
//!
//! `edit!(model, { model.transformer.h[0].output[.., 0] = 0.0; })` lowers its block into a
//! closure that builds those nodes, and stores it in the model. [`crate::Tracer::new`] replays
//! every stored edit into each new trace's graph before the trace's own block (through
//! [`crate::Traced::replay_edits`]), for `trace!`, `generate!` and the activation cache alike,
//! so the edits compose with the trace's own interventions: they come first, on every row
//! ([`crate::Group::ALL`]). A plain `model.forward(..)` outside any trace runs without them.
//! [`LanguageModel::clear_edits`] removes them; nothing else was changed in the model, so
//! its outputs are then bit-identical to those before the edits.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;

use crate::error::{Error, Result};
use crate::language_model::{LanguageModel, TextModel};
use crate::tracer::Tracer;

/// One persistent edit: builds its nodes into a trace of the model.
pub type EditFn<M> = dyn for<'e> Fn(&mut Tracer<'e, LanguageModel<M>>, &'e LanguageModel<M>) + Send;

/// A stored edit (a `Box<EditFn<M>>`), `Send` so that the model stays `Send`.
type Stored = Box<dyn Any + Send>;

/// The persistent edits of a [`LanguageModel`], in the order they were added. Each is a
/// `Box<EditFn<M>>` (held as `dyn Any`: the type names `LanguageModel<M>`, which is only
/// traceable for a [`TextModel`]).
pub struct PersistentEdits<M> {
    edits: RefCell<Vec<Stored>>,
    _model: PhantomData<fn() -> M>,
}

impl<M> Default for PersistentEdits<M> {
    fn default() -> Self {
        PersistentEdits { edits: RefCell::new(Vec::new()), _model: PhantomData }
    }
}

impl<M> PersistentEdits<M> {
    pub(crate) fn len(&self) -> usize {
        self.edits.borrow().len()
    }
}

impl<M: TextModel> LanguageModel<M> {
    /// Adds a persistent edit: `edit` builds intervention nodes (as the block of `edit!`
    /// does) into every later trace of this model, before the trace's own block, on every row.
    /// Use `edit!(model, { .. })` rather than calling this by hand.
    ///
    /// The edit is tried once on an empty trace: an error while building it (a module index out
    /// of range, a misuse the macro could not see) is returned, and the edit is not kept.
    pub fn add_edit<F>(&self, edit: F) -> Result<()>
    where
        F: for<'e> Fn(&mut Tracer<'e, LanguageModel<M>>, &'e LanguageModel<M>) + Send + 'static,
    {
        let boxed: Box<EditFn<M>> = Box::new(edit);
        self.persistent_edits().edits.borrow_mut().push(Box::new(boxed));
        // Tried once: an error or a panic while building refuses the edit (it is not kept).
        let tried = crate::error::catch_quiet(|| Tracer::new(self).take_building_error());
        let error = match tried {
            Ok(None) => return Ok(()),
            Ok(Some(Error::Input(m))) => Error::Input(format!("edit!: {m}")),
            Ok(Some(other)) => other,
            Err(panic) => Error::Input(format!("edit!: building the edit panicked: {panic}")),
        };
        self.persistent_edits().edits.borrow_mut().pop();
        Err(error)
    }

    /// Removes every persistent edit: later traces run without them (the model's weights were
    /// never changed, so its outputs are bit-identical to those before the edits).
    pub fn clear_edits(&self) {
        self.persistent_edits().edits.borrow_mut().clear();
    }

    /// How many persistent edits later traces replay.
    pub fn edit_count(&self) -> usize {
        self.persistent_edits().len()
    }

    /// Replays every persistent edit into `tracer` (see [`crate::Traced::replay_edits`]).
    pub(crate) fn replay_into<'e>(&'e self, tracer: &mut Tracer<'e, LanguageModel<M>>) {
        // The list is taken out while it is replayed (an edit may trace the model, or add or
        // clear edits), and put back, before anything added meanwhile, even if one panics.
        struct PutBack<'a>(&'a RefCell<Vec<Stored>>, Vec<Stored>);
        impl Drop for PutBack<'_> {
            fn drop(&mut self) {
                let mut list = self.0.borrow_mut();
                let added = std::mem::take(&mut *list);
                *list = std::mem::take(&mut self.1);
                list.extend(added);
            }
        }
        let cell = &self.persistent_edits().edits;
        let taken = PutBack(cell, std::mem::take(&mut *cell.borrow_mut()));
        for e in &taken.1 {
            if let Some(f) = e.downcast_ref::<Box<EditFn<M>>>() {
                f(tracer, self);
            }
        }
    }
}
