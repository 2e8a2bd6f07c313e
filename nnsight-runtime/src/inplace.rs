//! PyTorch's in-place arithmetic under its own names (`mul_`, `add_`, `sub_`, `div_`) for tch
//! tensors, which spell them `g_mul_scalar_`, `g_mul_`, ... In `trace!`, an in-place method
//! on a hook point or proxy is an edit of it, like `h *= 2.0`.

use tch::{Scalar, Tensor};

/// What `mul_`/`add_`/`sub_`/`div_` take: a number, or a tensor that broadcasts to `self`.
pub trait Operand {
    #[doc(hidden)]
    fn apply(self, t: &mut Tensor, op: Op) -> Tensor;
}

#[doc(hidden)]
#[derive(Clone, Copy)]
pub enum Op {
    Mul,
    Add,
    Sub,
    Div,
}

macro_rules! scalar_operand {
    ($($s:ty => $via:ty),*) => {$(
        impl Operand for $s {
            fn apply(self, t: &mut Tensor, op: Op) -> Tensor {
                let s = Scalar::from(self as $via);
                match op {
                    Op::Mul => t.g_mul_scalar_(s),
                    Op::Add => t.g_add_scalar_(s),
                    Op::Sub => t.g_sub_scalar_(s),
                    Op::Div => t.g_div_scalar_(s),
                }
            }
        }
    )*};
}
scalar_operand!(f64 => f64, f32 => f64, i64 => i64, i32 => i64);

impl Operand for &Tensor {
    fn apply(self, t: &mut Tensor, op: Op) -> Tensor {
        match op {
            Op::Mul => t.g_mul_(self),
            Op::Add => t.g_add_(self),
            Op::Sub => t.g_sub_(self),
            Op::Div => t.g_div_(self),
        }
    }
}

impl Operand for Tensor {
    fn apply(self, t: &mut Tensor, op: Op) -> Tensor {
        Operand::apply(&self, t, op)
    }
}

/// `t.mul_(2.0)`, `t.add_(&v)`, ...: change `t` in place (every element, broadcasting a tensor
/// operand) and return a handle to it, as PyTorch's methods of the same names. Panics with
/// libtorch's message when shapes do not broadcast (inside `trace!`: an error naming the node).
pub trait InPlaceArith {
    /// `self *= x`.
    fn mul_<X: Operand>(&mut self, x: X) -> Tensor;
    /// `self += x`.
    fn add_<X: Operand>(&mut self, x: X) -> Tensor;
    /// `self -= x`.
    fn sub_<X: Operand>(&mut self, x: X) -> Tensor;
    /// `self /= x`.
    fn div_<X: Operand>(&mut self, x: X) -> Tensor;
}

impl InPlaceArith for Tensor {
    fn mul_<X: Operand>(&mut self, x: X) -> Tensor {
        x.apply(self, Op::Mul)
    }
    fn add_<X: Operand>(&mut self, x: X) -> Tensor {
        x.apply(self, Op::Add)
    }
    fn sub_<X: Operand>(&mut self, x: X) -> Tensor {
        x.apply(self, Op::Sub)
    }
    fn div_<X: Operand>(&mut self, x: X) -> Tensor {
        x.apply(self, Op::Div)
    }
}
