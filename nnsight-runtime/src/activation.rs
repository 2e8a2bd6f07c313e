//! Values that flow through hook points, and how a batch of several invokes is shared out
//! among them.
//!
//! Several invokes run as one forward pass on their inputs concatenated along the batch. Each
//! tensor of a hook point's value is either **split by rows** (one slice per batch row, on a
//! batch axis) or **shared** (one value that every row uses: a position table, a mask broadcast
//! over the batch, a statistic of the whole batch). The module *declares* which, with a
//! [`Layout`] for its input and for its output (`HookModule::input_layout` / `output_layout`, or
//! per instance with `Hooked::with_layouts`). A module that declares nothing gets
//! [`Layout::Auto`], the dim-0 rule: a tensor whose dim 0 equals the batch size is split on dim 0,
//! any other tensor is shared.
//!
//! What an invoke (a batch group of rows `[start, start + len)`) gets, per tensor:
//! - split by rows: its rows (a view, so in-place edits write through to the model's tensor,
//!   and only to those rows); a swapped value is spliced back between the other invokes' rows;
//! - shared: the whole value (any invoke may read it). When the trace has several invokes, an
//!   invoke's read is a private copy, so that an in-place edit of it is seen (libtorch's version
//!   counter) and refused instead of changing the other invokes' values; a swap that changes it
//!   is refused too. Interventions on a shared value go through the whole batch: a trace with a
//!   single invoke, or statements written outside the invoke blocks ([`Rows::is_all`]).
//!
//! **Dim 0 equal to the batch size by coincidence.** Under [`Layout::Auto`] a shared tensor whose
//! dim 0 happens to equal the batch size (say a `[2, 4]` table with a batch of 2) is taken for
//! rows: each invoke sees and edits one "row" of a value that really belongs to everyone, and
//! nothing can tell. Declaring the module's layout (`Layout::Shared` for that tensor) is the
//! answer; the bundled models declare every hook point.

use std::fmt;

use tch::Tensor;

/// Where the batch rows are in a hook point's value, as the module declares it.
///
/// A layout that is not [`Layout::Tuple`] applies to every tensor of the value (all elements of
/// a tuple, `Vec` or `Option`); `Tuple` gives one layout per tuple element. Plain values
/// (numbers, flags, a KV cache handle) are always shared.
///
/// ```
/// use nnsight_runtime::Layout;
/// // (hidden [batch, seq, hidden], position table [1, seq, hidden])
/// const INPUT: Layout = Layout::Tuple(&[Layout::Batch(0), Layout::Shared]);
/// assert_eq!(INPUT.to_string(), "(batch axis 0, shared)");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The dim-0 rule, for modules that declare nothing: a tensor whose dim 0 equals the batch
    /// size holds the rows on dim 0; any other tensor is shared.
    Auto,
    /// The rows are on axis `k`: `[.., batch (axis k), ..]`.
    Batch(usize),
    /// Axis `k` holds `batch × n` entries, batch-major: row `r` owns entries `r·n .. (r+1)·n`
    /// (the batch flattened with another axis, as in `x.reshape([batch * seq, hidden])`).
    Flattened(usize),
    /// No batch axis: one value for every row of the batch.
    Shared,
    /// One layout per element of a tuple, in order.
    Tuple(&'static [Layout]),
}

impl Layout {
    /// The layout of element `i` of an `n`-tuple: the `Tuple`'s entry, or this layout itself.
    pub fn element(self, i: usize, n: usize) -> Result<Layout, Refusal> {
        match self {
            Layout::Tuple(ls) if ls.len() == n => Ok(ls[i]),
            Layout::Tuple(ls) => Err(Refusal::Layout(format!("a layout of {} elements is declared for a tuple of {n}", ls.len()))),
            other => Ok(other),
        }
    }

    /// Whether every part is declared (no [`Layout::Auto`] anywhere).
    pub fn is_declared(self) -> bool {
        match self {
            Layout::Auto => false,
            Layout::Tuple(ls) => ls.iter().all(|l| l.is_declared()),
            _ => true,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Auto => f.write_str("dim-0 default"),
            Layout::Batch(k) => write!(f, "batch axis {k}"),
            Layout::Flattened(k) => write!(f, "batch flattened into axis {k}"),
            Layout::Shared => f.write_str("shared"),
            Layout::Tuple(ls) => {
                let parts: Vec<String> = ls.iter().map(Layout::to_string).collect();
                write!(f, "({})", parts.join(", "))
            }
        }
    }
}

/// The rows of one batch group: `[start, start + len)` of a batch of `total` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// First row.
    pub start: i64,
    /// Number of rows.
    pub len: i64,
    /// Rows in the whole batch.
    pub total: i64,
}

impl Rows {
    /// Rows `[start, start + len)` of `total`.
    pub fn new(start: i64, len: i64, total: i64) -> Rows {
        Rows { start, len, total }
    }

    /// Every row of a batch of `total`.
    pub fn all(total: i64) -> Rows {
        Rows { start: 0, len: total, total }
    }

    /// Whether these are all the rows (a single invoke, or the whole-batch group): nothing is
    /// narrowed and shared values may be changed.
    pub fn is_all(&self) -> bool {
        self.start == 0 && self.len == self.total
    }
}

/// Why a value cannot be narrowed or spliced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The new value does not have the layout of the rows it replaces (shape, dtype, device,
    /// structure), each described like `Tensor[1, 14, 384] Float Cpu`.
    Mismatch {
        /// What the replaced rows are.
        expected: String,
        /// What the new value is.
        actual: String,
    },
    /// The declared layout does not fit the value (a batch axis that is missing or of another
    /// size, a tuple layout of another length).
    Layout(String),
    /// A leaf shared by every row would change for some rows only; the text describes the leaf
    /// and why it is shared.
    Shared(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Mismatch { expected, actual } => write!(f, "expected {expected}, got {actual}"),
            Refusal::Layout(m) | Refusal::Shared(m) => f.write_str(m),
        }
    }
}

/// How one tensor of a value is shared out among batch rows (see [`split`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// `per_row` entries per batch row on `axis` (1 for [`Layout::Batch`]).
    Rows {
        /// The batch axis.
        axis: usize,
        /// Entries per batch row.
        per_row: i64,
    },
    /// One value for every row; `declared` is false when the dim-0 default decided it (dim 0
    /// is not the batch size).
    Shared {
        /// Declared [`Layout::Shared`] rather than decided by the dim-0 default.
        declared: bool,
    },
}

impl Split {
    /// The layout that says this split for one tensor: `Batch`, `Flattened` or `Shared`.
    pub fn layout(self) -> Layout {
        match self {
            Split::Rows { axis, per_row: 1 } => Layout::Batch(axis),
            Split::Rows { axis, .. } => Layout::Flattened(axis),
            Split::Shared { .. } => Layout::Shared,
        }
    }
}

/// How tensor `t`, whose layout is `layout` (not a tuple), is shared out in a batch of `total`
/// rows. [`Refusal::Layout`] when a declared batch axis does not exist or has another size.
pub fn split(t: &Tensor, layout: Layout, total: i64) -> Result<Split, Refusal> {
    let axis_size = |k: usize, what: &str| -> Result<i64, Refusal> {
        if !t.defined() {
            return Err(Refusal::Layout(format!("an undefined tensor is declared with {what}")));
        }
        let size = t.size();
        size.get(k).copied().ok_or_else(|| Refusal::Layout(format!("a tensor of shape {size:?} has no axis {k} ({what} is declared)")))
    };
    match layout {
        Layout::Auto => {
            let batched = t.defined() && t.dim() > 0 && t.size()[0] == total;
            Ok(if batched { Split::Rows { axis: 0, per_row: 1 } } else { Split::Shared { declared: false } })
        }
        Layout::Batch(k) => {
            let n = axis_size(k, &format!("batch axis {k}"))?;
            if n != total {
                return Err(Refusal::Layout(format!(
                    "axis {k} of {} is declared the batch axis but has size {n}, and the batch has {total} rows",
                    describe_tensor(t)
                )));
            }
            Ok(Split::Rows { axis: k, per_row: 1 })
        }
        Layout::Flattened(k) => {
            let n = axis_size(k, &format!("a batch flattened into axis {k}"))?;
            if n % total != 0 {
                return Err(Refusal::Layout(format!(
                    "axis {k} of {} is declared a flattened batch but its size {n} is not a multiple of the {total} rows of the batch",
                    describe_tensor(t)
                )));
            }
            Ok(Split::Rows { axis: k, per_row: n / total })
        }
        Layout::Shared => Ok(Split::Shared { declared: true }),
        Layout::Tuple(_) => Err(Refusal::Layout(format!("a tuple layout ({layout}) is declared for a tensor ({})", describe_tensor(t)))),
    }
}

/// What a leaf operation sees of a value's tensors (see [`Activation::map_leaves`]).
pub trait Leaves {
    /// A tensor with the layout that applies to it (never [`Layout::Tuple`]); returns the
    /// tensor to put in its place.
    fn tensor(&mut self, t: &Tensor, layout: Layout) -> Result<Tensor, Refusal>;
}

/// What a pairwise leaf operation sees of an old and a new value (see
/// [`Activation::zip_leaves`]).
pub trait LeafPairs {
    /// The old and the new tensor at the same place, with the old one's layout (never
    /// [`Layout::Tuple`]); returns the tensor to put in its place.
    fn tensors(&mut self, old: Tensor, new: Tensor, layout: Layout) -> Result<Tensor, Refusal>;
    /// A leaf that is not a tensor (a number, a flag, a cache handle), always shared by every
    /// row: `same` says whether the new leaf equals the old one, `describe` names it.
    fn plain(&mut self, same: bool, describe: &dyn Fn() -> String) -> Result<(), Refusal>;
}

/// A value at a hook point (a module's input or output).
///
/// Implemented for [`Tensor`], `Option<T>`, `Vec<T>`, tuples of up to 4 activations, and plain
/// values (`i64`, `f64`, `bool`, `usize`, `()`), which are shared by every row. Implement it for
/// your own structured values by visiting their parts in [`map_leaves`](Activation::map_leaves)
/// and [`zip_leaves`](Activation::zip_leaves); the batch logic lives in the leaf operations.
pub trait Activation: Sized + 'static {
    /// The value of `.input` when this is a module's input tuple: the first element for tuples,
    /// the value itself otherwise.
    type First: Activation;

    /// A copy that shares tensor storage (tch's `shallow_clone`), so edits made through it are
    /// seen by the original.
    fn shallow(&self) -> Self;

    /// Shapes, dtypes and devices, e.g. `Tensor[2, 14, 384] Float Cpu`.
    fn describe(&self) -> String;

    /// The first element (see [`Activation::First`]).
    fn first(&self) -> &Self::First;

    /// This value with its first element replaced.
    fn with_first(self, first: Self::First) -> Self;

    /// The layout of [`Activation::first`] within `layout`: element 0 of a tuple layout for
    /// tuples, `layout` itself otherwise.
    fn first_layout(layout: Layout) -> Result<Layout, Refusal> {
        Ok(layout)
    }

    /// Calls `f` on every tensor inside.
    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor));

    /// This value rebuilt with every tensor replaced by `leaves.tensor(t, its layout)`; plain
    /// parts are copied. `layout` is the layout of this value.
    fn map_leaves(&self, layout: Layout, leaves: &mut dyn Leaves) -> Result<Self, Refusal>;

    /// This value and `new`, paired leaf by leaf: tensors through `pairs.tensors`, plain parts
    /// through `pairs.plain` (then taken from `new`). A structural difference (a `None` for a
    /// `Some`, `Vec`s of different lengths) is [`Refusal::Mismatch`].
    fn zip_leaves(self, new: Self, layout: Layout, pairs: &mut dyn LeafPairs) -> Result<Self, Refusal>;

    /// The rows of `rows` of every tensor split by rows (views, not copies); shared tensors and
    /// plain values as they are.
    fn narrow_batch(&self, layout: Layout, rows: Rows) -> Result<Self, Refusal> {
        self.map_leaves(layout, &mut Narrow { rows, copies: None })
    }

    /// This value with `value` put in place of rows `rows`: tensors split by rows get the new
    /// rows between the other rows (a new tensor, the old one is not modified); shared parts are
    /// replaced when `rows` are all rows, and otherwise must stay as they are
    /// ([`Refusal::Shared`]). [`Refusal::Mismatch`] when `value` does not have the layout of the
    /// rows it replaces.
    fn splice_batch(self, value: Self, layout: Layout, rows: Rows) -> Result<Self, Refusal> {
        self.zip_leaves(value, layout, &mut Splice { rows })
    }

    /// A copy with fresh storage for every tensor (plain parts cloned).
    fn deep_copy(&self) -> Self {
        struct Copy;
        impl Leaves for Copy {
            fn tensor(&mut self, t: &Tensor, _: Layout) -> Result<Tensor, Refusal> {
                Ok(if t.defined() { t.copy() } else { t.shallow_clone() })
            }
        }
        self.map_leaves(Layout::Shared, &mut Copy).unwrap_or_else(|_| self.shallow())
    }
}

/// `Tensor[2, 14, 384] Float Cpu`.
pub(crate) fn describe_tensor(t: &Tensor) -> String {
    if !t.defined() {
        return "undefined Tensor".to_string();
    }
    format!("Tensor{:?} {:?} {:?}", t.size(), t.kind(), t.device())
}

/// Why a shared tensor is shared, for errors.
pub(crate) fn shared_reason(t: &Tensor, declared: bool, total: i64) -> String {
    if declared {
        "declared shared (no batch axis)".to_string()
    } else if t.defined() && t.dim() > 0 {
        format!("dim 0 is {}, not the batch size {total}, so the dim-0 default treats it as shared", t.size()[0])
    } else {
        "it has no dim 0, so the dim-0 default treats it as shared".to_string()
    }
}

/// Narrowing to a batch group (see [`Activation::narrow_batch`]). With `copies`, shared tensors
/// are handed out as private copies (also pushed there, with whether they were declared shared),
/// so that an in-place edit of one can be detected; the interleaver does that for reads of one
/// invoke among several.
pub(crate) struct Narrow<'a> {
    pub rows: Rows,
    pub copies: Option<&'a mut Vec<(Tensor, bool)>>,
}

impl Leaves for Narrow<'_> {
    fn tensor(&mut self, t: &Tensor, layout: Layout) -> Result<Tensor, Refusal> {
        let rows = self.rows;
        if rows.is_all() {
            // One group covering the batch gets the tensor itself, as Python nnsight does (no
            // view per read). A declared axis is checked when narrowing is needed.
            if matches!(layout, Layout::Tuple(_)) {
                split(t, layout, rows.total)?;
            }
            return Ok(t.shallow_clone());
        }
        match split(t, layout, rows.total)? {
            Split::Rows { axis, per_row } => Ok(t.narrow(axis as i64, rows.start * per_row, rows.len * per_row)),
            Split::Shared { declared } => match self.copies.as_deref_mut() {
                Some(copies) if t.defined() => {
                    let c = t.copy();
                    copies.push((c.shallow_clone(), declared));
                    Ok(c)
                }
                _ => Ok(t.shallow_clone()),
            },
        }
    }
}

/// Splicing a group's new value into the batch (see [`Activation::splice_batch`]).
pub(crate) struct Splice {
    pub rows: Rows,
}

fn same_layout(a: &Tensor, b: &Tensor) -> bool {
    a.defined() == b.defined() && (!a.defined() || (a.size() == b.size() && a.kind() == b.kind() && a.device() == b.device()))
}

/// Whether `new` holds the same values as `old` (the same view of the same storage, or equal
/// elements of the same shape, dtype and device).
fn same_value(old: &Tensor, new: &Tensor) -> bool {
    if !old.defined() || !new.defined() {
        return old.defined() == new.defined();
    }
    if !same_layout(old, new) {
        return false;
    }
    (old.data_ptr() == new.data_ptr() && old.stride() == new.stride()) || old.equal(new)
}

impl LeafPairs for Splice {
    fn tensors(&mut self, old: Tensor, new: Tensor, layout: Layout) -> Result<Tensor, Refusal> {
        let rows = self.rows;
        let mismatch = |expected: &Tensor, new: &Tensor| Refusal::Mismatch { expected: describe_tensor(expected), actual: describe_tensor(new) };
        if rows.is_all() {
            if matches!(layout, Layout::Tuple(_)) {
                split(&old, layout, rows.total)?;
            }
            return if same_layout(&old, &new) { Ok(new) } else { Err(mismatch(&old, &new)) };
        }
        match split(&old, layout, rows.total)? {
            Split::Rows { axis, per_row } => {
                let (a, s, l) = (axis as i64, rows.start * per_row, rows.len * per_row);
                let expected = old.narrow(a, s, l);
                if !same_layout(&expected, &new) {
                    return Err(mismatch(&expected, &new));
                }
                let n = old.size()[axis];
                Ok(Tensor::cat(&[old.narrow(a, 0, s), new, old.narrow(a, s + l, n - s - l)], a))
            }
            Split::Shared { declared } => {
                if same_value(&old, &new) {
                    Ok(old)
                } else {
                    Err(Refusal::Shared(format!("{} ({})", describe_tensor(&old), shared_reason(&old, declared, rows.total))))
                }
            }
        }
    }

    fn plain(&mut self, same: bool, describe: &dyn Fn() -> String) -> Result<(), Refusal> {
        if same || self.rows.is_all() {
            Ok(())
        } else {
            Err(Refusal::Shared(format!("{} (a plain value is shared by every row)", describe())))
        }
    }
}

impl Activation for Tensor {
    type First = Tensor;

    fn shallow(&self) -> Self {
        self.shallow_clone()
    }

    fn describe(&self) -> String {
        describe_tensor(self)
    }

    fn first(&self) -> &Tensor {
        self
    }

    fn with_first(self, first: Tensor) -> Self {
        first
    }

    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
        f(self)
    }

    fn map_leaves(&self, layout: Layout, leaves: &mut dyn Leaves) -> Result<Self, Refusal> {
        leaves.tensor(self, layout)
    }

    fn zip_leaves(self, new: Self, layout: Layout, pairs: &mut dyn LeafPairs) -> Result<Self, Refusal> {
        pairs.tensors(self, new, layout)
    }
}

macro_rules! plain_activation {
    ($($t:ty),*) => {$(
        /// A plain value: shared by every row of the batch.
        impl Activation for $t {
            type First = $t;
            fn shallow(&self) -> Self { self.clone() }
            fn describe(&self) -> String { stringify!($t).to_string() }
            fn first(&self) -> &Self { self }
            fn with_first(self, first: Self) -> Self { first }
            fn for_each_tensor(&self, _: &mut dyn FnMut(&Tensor)) {}
            fn map_leaves(&self, _: Layout, _: &mut dyn Leaves) -> Result<Self, Refusal> { Ok(self.clone()) }
            fn zip_leaves(self, new: Self, _: Layout, pairs: &mut dyn LeafPairs) -> Result<Self, Refusal> {
                pairs.plain(self == new, &|| format!("{} {:?}", stringify!($t), self))?;
                Ok(new)
            }
        }
    )*};
}
plain_activation!(i64, f64, bool, usize, ());

impl<T: Activation> Activation for Option<T> {
    type First = Option<T>;

    fn shallow(&self) -> Self {
        self.as_ref().map(T::shallow)
    }

    fn describe(&self) -> String {
        match self {
            Some(v) => format!("Some({})", v.describe()),
            None => "None".to_string(),
        }
    }

    fn first(&self) -> &Self {
        self
    }

    fn with_first(self, first: Self) -> Self {
        first
    }

    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
        if let Some(v) = self {
            v.for_each_tensor(f)
        }
    }

    fn map_leaves(&self, layout: Layout, leaves: &mut dyn Leaves) -> Result<Self, Refusal> {
        self.as_ref().map(|v| v.map_leaves(layout, leaves)).transpose()
    }

    fn zip_leaves(self, new: Self, layout: Layout, pairs: &mut dyn LeafPairs) -> Result<Self, Refusal> {
        match (self, new) {
            (Some(a), Some(b)) => a.zip_leaves(b, layout, pairs).map(Some),
            (None, None) => Ok(None),
            (a, b) => Err(Refusal::Mismatch { expected: a.describe(), actual: b.describe() }),
        }
    }
}

impl<T: Activation> Activation for Vec<T> {
    type First = Vec<T>;

    fn shallow(&self) -> Self {
        self.iter().map(T::shallow).collect()
    }

    fn describe(&self) -> String {
        let parts: Vec<String> = self.iter().map(T::describe).collect();
        format!("[{}]", parts.join(", "))
    }

    fn first(&self) -> &Self {
        self
    }

    fn with_first(self, first: Self) -> Self {
        first
    }

    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
        self.iter().for_each(|v| v.for_each_tensor(f))
    }

    fn map_leaves(&self, layout: Layout, leaves: &mut dyn Leaves) -> Result<Self, Refusal> {
        self.iter().map(|v| v.map_leaves(layout, leaves)).collect()
    }

    fn zip_leaves(self, new: Self, layout: Layout, pairs: &mut dyn LeafPairs) -> Result<Self, Refusal> {
        if self.len() != new.len() {
            return Err(Refusal::Mismatch { expected: self.describe(), actual: new.describe() });
        }
        self.into_iter().zip(new).map(|(a, b)| a.zip_leaves(b, layout, pairs)).collect()
    }
}

macro_rules! tuple_activation {
    ($n:literal; $A:ident $a:ident $($T:ident $t:ident $i:literal)*) => {
        impl<$A: Activation, $($T: Activation),*> Activation for ($A, $($T,)*) {
            type First = $A;

            fn shallow(&self) -> Self {
                let ($a, $($t,)*) = self;
                ($a.shallow(), $($t.shallow(),)*)
            }

            fn describe(&self) -> String {
                let ($a, $($t,)*) = self;
                let parts: Vec<String> = vec![$a.describe(), $($t.describe()),*];
                format!("({})", parts.join(", "))
            }

            fn first(&self) -> &$A {
                &self.0
            }

            fn with_first(self, first: $A) -> Self {
                let (_, $($t,)*) = self;
                (first, $($t,)*)
            }

            fn first_layout(layout: Layout) -> Result<Layout, Refusal> {
                layout.element(0, $n)
            }

            fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
                let ($a, $($t,)*) = self;
                $a.for_each_tensor(f);
                $($t.for_each_tensor(f);)*
            }

            fn map_leaves(&self, layout: Layout, leaves: &mut dyn Leaves) -> Result<Self, Refusal> {
                let ($a, $($t,)*) = self;
                Ok(($a.map_leaves(layout.element(0, $n)?, leaves)?, $($t.map_leaves(layout.element($i, $n)?, leaves)?,)*))
            }

            fn zip_leaves(self, new: Self, layout: Layout, pairs: &mut dyn LeafPairs) -> Result<Self, Refusal> {
                #[allow(non_snake_case)]
                let (($a, $($t,)*), ($A, $($T,)*)) = (self, new);
                Ok((
                    $a.zip_leaves($A, layout.element(0, $n)?, pairs)?,
                    $($t.zip_leaves($T, layout.element($i, $n)?, pairs)?,)*
                ))
            }
        }
    };
}
tuple_activation!(1; A a);
tuple_activation!(2; A a B b 1);
tuple_activation!(3; A a B b 1 C c 2);
tuple_activation!(4; A a B b 1 C c 2 D d 3);
