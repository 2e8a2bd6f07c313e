//! Hook points for tch modules.
//!
//! tch has no forward hooks on modules (tch-rs issue #218), so modules become traceable by
//! routing their forward pass through [`Hooked::call`]. A `Hooked<M>` carries the module's dotted
//! path (the `tch::nn::Path` it was built under, which is the Hugging Face checkpoint key prefix,
//! e.g. `encoder.layer.0.attention.self.query`). Outside a trace `call` is one thread-local read
//! and a direct call of the module's forward; inside a trace the interleaver sees the module's
//! input and output and may read, edit or replace them.
//!
//! Naming rule: in `trace!`, `.input`, `.inputs` and `.output` always mean hook points. A child
//! module whose checkpoint name is `output`, `input` or a Rust keyword (BERT's `layer.N.output`,
//! `attention.self`) is stored in a field with a trailing underscore (`output_`, `self_`); its
//! module path keeps the checkpoint name.

use std::fmt;
use std::ops::Deref;

use tch::{nn, Tensor};

use crate::activation::{Activation, Layout};
use crate::error::{Error, Result};

/// A module whose forward pass can be traced: typed input and output, and where their batch
/// rows are.
///
/// `Input` is everything the forward takes, as one value (a tuple for several arguments, e.g.
/// `(hidden_states [batch, seq, hidden], attention_mask [batch, 1, 1, seq])`); in `trace!`,
/// `.inputs` is the whole tuple and `.input` its first element.
///
/// The layouts say how a batch of several invokes is shared out (see
/// [`crate::activation`]): which tensors hold one slice per batch row, on which axis, and which
/// are shared by every row. Declare them whenever a value is not `[batch, ..]` on dim 0:
///
/// ```
/// use nnsight_runtime::{HookModule, Layout};
/// use tch::Tensor;
///
/// /// `(h [batch, 4], mean over the batch [1, 4])`.
/// struct Stats;
/// impl HookModule for Stats {
///     type Input = Tensor;
///     type Output = (Tensor, Tensor);
///     fn forward(&self, h: Tensor) -> (Tensor, Tensor) {
///         let m = h.mean_dim(0, true, tch::Kind::Float);
///         (h, m)
///     }
///     fn output_layout(&self) -> Layout {
///         Layout::Tuple(&[Layout::Batch(0), Layout::Shared])
///     }
/// }
/// ```
pub trait HookModule {
    /// The forward's arguments as one value.
    type Input: Activation;
    /// The forward's result.
    type Output: Activation;
    /// The module's own computation. Call it through [`Hooked::call`] so traces can see it.
    fn forward(&self, input: Self::Input) -> Self::Output;
    /// Where the batch rows are in the input; default [`Layout::Auto`] (the dim-0 rule).
    fn input_layout(&self) -> Layout {
        Layout::Auto
    }
    /// Where the batch rows are in the output; default [`Layout::Auto`] (the dim-0 rule).
    fn output_layout(&self) -> Layout {
        Layout::Auto
    }
}

/// A module with its dotted module path, whose forward goes through the interleaver.
///
/// Dereferences to the module, so field access (`model.encoder.layer`) reaches the children.
pub struct Hooked<M> {
    path: String,
    inner: M,
    /// Layouts of this instance's input and output, in place of the type's declaration.
    layouts: Option<(Layout, Layout)>,
}

impl<M> Hooked<M> {
    /// Wraps `inner`, built under the tch path `path` (its components joined with `.` become the
    /// module path).
    pub fn new(path: &nn::Path, inner: M) -> Self {
        Self::with_path(path.components().collect::<Vec<_>>().join("."), inner)
    }

    /// Wraps `inner` under an explicit module path (empty for a root model).
    pub fn with_path(path: impl Into<String>, inner: M) -> Self {
        Hooked { path: path.into(), inner, layouts: None }
    }

    /// This module with its own batch layouts for input and output, overriding what its type
    /// declares (see [`HookModule::input_layout`]). For a module type used in several ways,
    /// e.g. an `nn::Embedding` that embeds token ids `[batch, seq]` in one place and a position
    /// table `[1, seq]` shared by every row in another:
    /// `Hooked::new(&p, emb).with_layouts(Layout::Shared, Layout::Shared)`.
    pub fn with_layouts(mut self, input: Layout, output: Layout) -> Self {
        self.layouts = Some((input, output));
        self
    }

    /// The dotted module path, e.g. `encoder.layer.3`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The wrapped module.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// Identity of this module during a trace: the address of its `path` field. (The module's
    /// own address is not enough: a parent and its first child can share it. Two `path` fields
    /// never overlap.) The model is borrowed for the whole trace, so it cannot move.
    pub(crate) fn key(&self) -> usize {
        &self.path as *const String as usize
    }
}

impl<M: HookModule> Hooked<M> {
    /// Runs the module's forward, letting an active trace see and change its input and output.
    pub fn call(&self, input: M::Input) -> M::Output {
        crate::interleave::module_call(self, input)
    }

    /// The batch layout of this module's input: [`Hooked::with_layouts`]'s, else the type's.
    pub fn input_layout(&self) -> Layout {
        match self.layouts {
            Some((input, _)) => input,
            None => self.inner.input_layout(),
        }
    }

    /// The batch layout of this module's output: [`Hooked::with_layouts`]'s, else the type's.
    pub fn output_layout(&self) -> Layout {
        match self.layouts {
            Some((_, output)) => output,
            None => self.inner.output_layout(),
        }
    }
}

impl<M> Deref for Hooked<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.inner
    }
}

impl<M: fmt::Debug> fmt::Debug for Hooked<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooked").field("path", &self.path).field("module", &self.inner).field("layouts", &self.layouts).finish()
    }
}

/// Lets hooked single-tensor modules be used like any tch module (`xs.apply(&self.dense)`).
impl<M> nn::Module for Hooked<M>
where
    M: HookModule<Input = Tensor, Output = Tensor> + fmt::Debug + Send,
{
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.call(xs.shallow_clone())
    }
}

macro_rules! tch_leaf {
    ($($t:ty),*) => {$(
        impl HookModule for $t {
            type Input = Tensor;
            type Output = Tensor;
            fn forward(&self, input: Tensor) -> Tensor {
                nn::Module::forward(self, &input)
            }
        }
    )*};
}
tch_leaf!(nn::Linear, nn::LayerNorm, nn::Embedding, nn::Conv1D, nn::Conv2D, nn::Sequential);

/// Makes any `tch::nn::Module` hookable: `Hooked::new(&(p / "act"), Leaf(nn::func(|x| x.gelu("none"))))`.
#[derive(Debug)]
pub struct Leaf<M>(pub M);

impl<M: nn::Module> HookModule for Leaf<M> {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, input: Tensor) -> Tensor {
        self.0.forward(&input)
    }
}

/// Something `trace!` can put hook points on: a [`Hooked`] module, or a model wrapper that holds
/// one as its root (e.g. [`crate::LanguageModel`]).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a traceable module, so it has no `.input`/`.output` hook points",
    label = "not a module wrapped in `Hooked<_>`",
    note = "only fields of type `Hooked<M>` (and the traced model itself) have hook points"
)]
pub trait AsModule {
    /// The module type.
    type Module: HookModule;
    /// The hooked module.
    fn as_module(&self) -> &Hooked<Self::Module>;
}

impl<M: HookModule> AsModule for Hooked<M> {
    type Module = M;
    fn as_module(&self) -> &Hooked<M> {
        self
    }
}

impl<T: AsModule + ?Sized> AsModule for &T {
    type Module = T::Module;
    fn as_module(&self) -> &Hooked<T::Module> {
        (**self).as_module()
    }
}

/// A list of hooked modules that `trace!` can index (`model.encoder.layer[3]`, `h[-1]`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a list of modules, so it cannot be indexed in a module path",
    label = "indexed here",
    note = "module lists are `Vec<Hooked<M>>` fields; to index a tensor, index the hook point's value (`.output[..]`)"
)]
pub trait ModuleList {
    /// Element type.
    type Item;
    /// Element `index` (negative counts from the end, as in Python), or
    /// [`Error::IndexOutOfRange`] naming the list's module path.
    fn module_at(&self, index: i64) -> Result<&Self::Item>;
}

impl<M> ModuleList for Vec<Hooked<M>> {
    type Item = Hooked<M>;
    fn module_at(&self, index: i64) -> Result<&Hooked<M>> {
        let len = self.len();
        let i = if index < 0 { index + len as i64 } else { index };
        if i < 0 || i >= len as i64 {
            let path = self
                .first()
                .map(|m| m.path().rsplit_once('.').map(|(p, _)| p.to_string()).unwrap_or_default())
                .unwrap_or_else(|| "<empty list>".to_string());
            return Err(Error::IndexOutOfRange { path, index, len });
        }
        Ok(&self[i as usize])
    }
}
