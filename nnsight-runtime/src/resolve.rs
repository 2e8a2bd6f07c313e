//! What comes out of a trace: the block's value with saved proxies replaced by their values
//! ([`Resolve`]), and what a hook point may be set to ([`SwapValue`]).

use tch::Tensor;

use crate::error::Result;
use crate::interleave::Outcome;
use crate::proxy::{Saved, SavedIfRan};

/// What a hook point holding `T` can be set to: `T` itself (checked by rustc at the
/// assignment in `trace!`).
#[diagnostic::on_unimplemented(
    message = "cannot assign a `{Self}` to a hook point that holds `{T}`",
    label = "the new value is a `{Self}`, the hook point holds `{T}`",
    note = "a swap replaces the whole value; to set elements in place, index the hook point: `model.x.output[.., 0] = 0.0`"
)]
pub trait SwapValue<T> {}
impl<T> SwapValue<T> for T {}

/// Turns what a trace block returns into plain values after the run: [`Saved<T>`] becomes `T`;
/// tuples, `Vec`, `Option` and plain values are converted element by element.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot come out of a trace",
    label = "the trace block returns this",
    note = "a proxy's value is freed after its last use: call `.save()` on it to get its value after the trace"
)]
pub trait Resolve {
    /// The plain value.
    type Output;
    /// Takes the saved values out of a finished run.
    fn resolve(self, run: &mut Outcome) -> Result<Self::Output>;
}

impl<T: 'static> Resolve for Saved<T> {
    type Output = T;
    fn resolve(self, run: &mut Outcome) -> Result<T> {
        run.take(self.trace, self.id)
    }
}

impl<T: 'static> Resolve for SavedIfRan<T> {
    type Output = Option<T>;
    fn resolve(self, run: &mut Outcome) -> Result<Option<T>> {
        run.take_if_ran(self.0.trace, self.0.id)
    }
}

macro_rules! plain_resolve {
    ($($t:ty),*) => {$(
        impl Resolve for $t {
            type Output = $t;
            fn resolve(self, _: &mut Outcome) -> Result<$t> { Ok(self) }
        }
    )*};
}
plain_resolve!((), bool, i32, i64, u32, u64, usize, f32, f64, String, &'static str, Tensor);

impl<R: Resolve> Resolve for Vec<R> {
    type Output = Vec<R::Output>;
    fn resolve(self, run: &mut Outcome) -> Result<Self::Output> {
        self.into_iter().map(|r| r.resolve(run)).collect()
    }
}

impl<R: Resolve> Resolve for Option<R> {
    type Output = Option<R::Output>;
    fn resolve(self, run: &mut Outcome) -> Result<Self::Output> {
        self.map(|r| r.resolve(run)).transpose()
    }
}

macro_rules! tuple_resolve {
    ($($T:ident $t:ident),*) => {
        impl<$($T: Resolve),*> Resolve for ($($T,)*) {
            type Output = ($($T::Output,)*);
            fn resolve(self, run: &mut Outcome) -> Result<Self::Output> {
                let ($($t,)*) = self;
                Ok(($($t.resolve(run)?,)*))
            }
        }
    };
}
tuple_resolve!(A a);
tuple_resolve!(A a, B b);
tuple_resolve!(A a, B b, C c);
tuple_resolve!(A a, B b, C c, D d);
tuple_resolve!(A a, B b, C c, D d, E e);
tuple_resolve!(A a, B b, C c, D d, E e, F f);
tuple_resolve!(A a, B b, C c, D d, E e, F f, G g);
tuple_resolve!(A a, B b, C c, D d, E e, F f, G g, H h);

