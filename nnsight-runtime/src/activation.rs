//! Values that flow through hook points: tensors and structures of tensors.
//!
//! Batch narrowing (the reference design's `InterventionProtocol.intervene` / `concat`): with
//! several invokes batched into one forward pass, each invoke sees only its rows. Every tensor
//! whose dim 0 equals the total batch size is narrowed to `[start, start + len)` on dim 0 (a view,
//! so in-place edits write through to the model's tensor); other tensors and plain values are
//! passed as they are. A swapped value is spliced back between the other invokes' rows.

use tch::Tensor;

/// A value at a hook point (a module's input or output).
///
/// Implemented for [`Tensor`], `Option<T>`, `Vec<T>`, tuples of up to 4 activations, and plain
/// values (`i64`, `f64`, `bool`, `usize`, `()`) which pass through narrowing unchanged.
pub trait Activation: Sized + 'static {
    /// The value of `.input` when this is a module's input tuple: the first element for tuples,
    /// the value itself otherwise.
    type First: Activation;

    /// A copy that shares tensor storage (tch's `shallow_clone`), so edits made through it are
    /// seen by the original.
    fn shallow(&self) -> Self;

    /// Rows `[start, start + len)` of every tensor whose dim 0 is `total` (views, not copies).
    fn narrow_batch(&self, start: i64, len: i64, total: i64) -> Self;

    /// Puts `value` in place of rows `[start, start + len)` of every tensor whose dim 0 is
    /// `total`, keeping the other rows; tensors of other sizes are replaced whole. Fails with a
    /// description of expected and actual layout when `value` does not have the layout of the
    /// rows it replaces (shape, dtype, device, structure).
    fn splice_batch(self, value: Self, start: i64, len: i64, total: i64) -> Result<Self, (String, String)>;

    /// Shapes, dtypes and devices, e.g. `Tensor[2, 14, 384] Float cpu`.
    fn describe(&self) -> String;

    /// The first element (see [`Activation::First`]).
    fn first(&self) -> &Self::First;

    /// This value with its first element replaced.
    fn with_first(self, first: Self::First) -> Self;

    /// Calls `f` on every tensor inside.
    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor));
}

fn describe_tensor(t: &Tensor) -> String {
    if !t.defined() {
        return "undefined Tensor".to_string();
    }
    format!("Tensor{:?} {:?} {:?}", t.size(), t.kind(), t.device())
}

impl Activation for Tensor {
    type First = Tensor;

    fn shallow(&self) -> Self {
        self.shallow_clone()
    }

    fn narrow_batch(&self, start: i64, len: i64, total: i64) -> Self {
        // One invoke covering the whole batch gets the tensor itself (as Python nnsight does);
        // `narrow` costs a libtorch view per read.
        if len != total && self.defined() && self.dim() > 0 && self.size()[0] == total {
            self.narrow(0, start, len)
        } else {
            self.shallow_clone()
        }
    }

    fn splice_batch(self, value: Self, start: i64, len: i64, total: i64) -> Result<Self, (String, String)> {
        let narrowed = self.defined() && self.dim() > 0 && self.size()[0] == total && len != total;
        let expected = if narrowed { self.narrow(0, start, len) } else { self.shallow_clone() };
        let same = value.defined() == expected.defined()
            && (!value.defined()
                || (value.size() == expected.size()
                    && value.kind() == expected.kind()
                    && value.device() == expected.device()));
        if !same {
            return Err((describe_tensor(&expected), describe_tensor(&value)));
        }
        if !narrowed {
            return Ok(value);
        }
        let pre = self.narrow(0, 0, start);
        let post = self.narrow(0, start + len, total - start - len);
        Ok(Tensor::cat(&[&pre, &value, &post], 0))
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
}

macro_rules! plain_activation {
    ($($t:ty),*) => {$(
        impl Activation for $t {
            type First = $t;
            fn shallow(&self) -> Self { self.clone() }
            fn narrow_batch(&self, _: i64, _: i64, _: i64) -> Self { self.clone() }
            fn splice_batch(self, value: Self, _: i64, _: i64, _: i64) -> Result<Self, (String, String)> { Ok(value) }
            fn describe(&self) -> String { format!("{}", stringify!($t)) }
            fn first(&self) -> &Self { self }
            fn with_first(self, first: Self) -> Self { first }
            fn for_each_tensor(&self, _: &mut dyn FnMut(&Tensor)) {}
        }
    )*};
}
plain_activation!(i64, f64, bool, usize, ());

impl<T: Activation> Activation for Option<T> {
    type First = Option<T>;

    fn shallow(&self) -> Self {
        self.as_ref().map(T::shallow)
    }

    fn narrow_batch(&self, start: i64, len: i64, total: i64) -> Self {
        self.as_ref().map(|v| v.narrow_batch(start, len, total))
    }

    fn splice_batch(self, value: Self, start: i64, len: i64, total: i64) -> Result<Self, (String, String)> {
        match (self, value) {
            (Some(a), Some(b)) => a.splice_batch(b, start, len, total).map(Some),
            (None, None) => Ok(None),
            (a, b) => Err((a.describe(), b.describe())),
        }
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
}

impl<T: Activation> Activation for Vec<T> {
    type First = Vec<T>;

    fn shallow(&self) -> Self {
        self.iter().map(T::shallow).collect()
    }

    fn narrow_batch(&self, start: i64, len: i64, total: i64) -> Self {
        self.iter().map(|v| v.narrow_batch(start, len, total)).collect()
    }

    fn splice_batch(self, value: Self, start: i64, len: i64, total: i64) -> Result<Self, (String, String)> {
        if self.len() != value.len() {
            return Err((self.describe(), value.describe()));
        }
        self.into_iter()
            .zip(value)
            .map(|(a, b)| a.splice_batch(b, start, len, total))
            .collect()
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
}

macro_rules! tuple_activation {
    ($A:ident $a:ident $($T:ident $t:ident)*) => {
        impl<$A: Activation, $($T: Activation),*> Activation for ($A, $($T,)*) {
            type First = $A;

            fn shallow(&self) -> Self {
                let ($a, $($t,)*) = self;
                ($a.shallow(), $($t.shallow(),)*)
            }

            fn narrow_batch(&self, start: i64, len: i64, total: i64) -> Self {
                let ($a, $($t,)*) = self;
                ($a.narrow_batch(start, len, total), $($t.narrow_batch(start, len, total),)*)
            }

            fn splice_batch(self, value: Self, start: i64, len: i64, total: i64) -> Result<Self, (String, String)> {
                #[allow(non_snake_case)]
                let (($a, $($t,)*), ($A, $($T,)*)) = (self, value);
                Ok(($a.splice_batch($A, start, len, total)?, $($t.splice_batch($T, start, len, total)?,)*))
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

            fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
                let ($a, $($t,)*) = self;
                $a.for_each_tensor(f);
                $($t.for_each_tensor(f);)*
            }
        }
    };
}
tuple_activation!(A a);
tuple_activation!(A a B b);
tuple_activation!(A a B b C c);
tuple_activation!(A a B b C c D d);
