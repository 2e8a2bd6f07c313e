//! Recognising module paths and hook points in expressions.
//!
//! A module path starts at the traced model's name and goes through fields, list indices and
//! `.next()`: `model.encoder.layer[3]`, `model.lm_head.next()`. A hook point is a module path
//! followed by `.output`, `.input` or `.inputs` — these words always mean hook points (a child
//! module with such a name is spelled `output_`).

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Member};

/// One step of a module path.
#[derive(Clone)]
pub enum Seg {
    Field(Ident),
    Index(Expr),
    Next(Span),
    /// `.at(i)`: call `i` of the module.
    At(Expr, Span),
    /// Any other method call, `model.layers()[3]`, `model.attn_point(3, AttnPoint::Z)`: a method
    /// that returns a reference to a module (generic code over `nnsight::models::causal::Decoder`).
    /// Only inside a hook point (`.output` etc. follows).
    Method(syn::ExprMethodCall),
}

/// Which hook point.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Point {
    Output,
    Input,
    Inputs,
}

/// `model.<segs>.<point>`.
#[derive(Clone)]
pub struct HookPath {
    pub root: Ident,
    pub segs: Vec<Seg>,
    pub point: Point,
    /// Span of the `.output`/`.input`/`.inputs` word.
    pub span: Span,
    /// Span of the whole expression.
    pub full_span: Span,
}

pub fn point_of(m: &Member) -> Option<Point> {
    match m {
        Member::Named(id) if id == "output" => Some(Point::Output),
        Member::Named(id) if id == "input" => Some(Point::Input),
        Member::Named(id) if id == "inputs" => Some(Point::Inputs),
        _ => None,
    }
}

thread_local! {
    /// The helper modules of the `trace!` being expanded (`helpers = [sae]`): roots of module
    /// paths besides the model.
    static HELPERS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sets the helper roots for the expansion in progress (cleared with an empty list).
pub fn set_helpers(names: Vec<String>) {
    HELPERS.with(|h| *h.borrow_mut() = names);
}

/// Whether `id` is a helper root of the expansion in progress.
pub fn is_helper(id: &Ident) -> bool {
    HELPERS.with(|h| h.borrow().iter().any(|n| id == n))
}

/// The module path in `e`, if `e` is one rooted at `model` (no hook point in it) made of
/// fields, indices, `.next()` and `.at(i)`.
pub fn module_chain(e: &Expr, model: &Ident) -> Option<(Ident, Vec<Seg>)> {
    chain(e, model, false)
}

/// [`module_chain`] that also takes method calls (`model.layers()[3]`, `model.attn(3)`), as a
/// hook point's path does: for `.skip(..)` on such a path.
pub fn module_chain_with_methods(e: &Expr, model: &Ident) -> Option<(Ident, Vec<Seg>)> {
    chain(e, model, true)
}

fn chain(e: &Expr, model: &Ident, methods: bool) -> Option<(Ident, Vec<Seg>)> {
    let module_chain = |e: &Expr, model: &Ident| chain(e, model, methods);
    match e {
        Expr::Path(p) if p.qself.is_none() && (p.path.get_ident() == Some(model) || p.path.get_ident().is_some_and(is_helper)) => {
            Some((p.path.get_ident().unwrap().clone(), Vec::new()))
        }
        Expr::Paren(p) => module_chain(&p.expr, model),
        Expr::Field(f) => {
            if point_of(&f.member).is_some() {
                return None;
            }
            let Member::Named(id) = &f.member else { return None };
            let (root, mut segs) = module_chain(&f.base, model)?;
            segs.push(Seg::Field(id.clone()));
            Some((root, segs))
        }
        Expr::Index(i) => {
            let (root, mut segs) = module_chain(&i.expr, model)?;
            segs.push(Seg::Index((*i.index).clone()));
            Some((root, segs))
        }
        Expr::MethodCall(m) if m.method == "next" && m.args.is_empty() && m.turbofish.is_none() => {
            let (root, mut segs) = module_chain(&m.receiver, model)?;
            segs.push(Seg::Next(m.method.span()));
            Some((root, segs))
        }
        Expr::MethodCall(m) if m.method == "at" && m.args.len() == 1 && m.turbofish.is_none() => {
            let (root, mut segs) = module_chain(&m.receiver, model)?;
            segs.push(Seg::At(m.args[0].clone(), m.method.span()));
            Some((root, segs))
        }
        Expr::MethodCall(m) if methods && m.method != "next" && m.method != "at" => {
            let (root, mut segs) = module_chain(&m.receiver, model)?;
            segs.push(Seg::Method(m.clone()));
            Some((root, segs))
        }
        _ => None,
    }
}

/// `e` as a hook point (`model.<module path>.output`), if it is one.
pub fn hook_path(e: &Expr, model: &Ident) -> Option<HookPath> {
    let Expr::Field(f) = e else { return None };
    let point = point_of(&f.member)?;
    let (root, segs) = chain(&f.base, model, true)?;
    Some(HookPath { root, segs, point, span: f.member.span(), full_span: e.span() })
}
