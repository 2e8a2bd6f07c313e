//! Lifting: one expression that mentions proxies becomes one apply node. Every hook point,
//! proxy name, `.save()`d proxy and `.grad` in it becomes a closure argument holding the real
//! value (`&T`); indexing on those values becomes tch's `.i(..)` for tensors (an element copy
//! for `Vec`s); other free variables are captured — copied when `Copy`, borrowed otherwise — and
//! used as `(*x)`, so the expression reads as in an ordinary closure and rustc checks it against
//! the real types.

use std::collections::{HashMap, HashSet};

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::visit_mut::{self, VisitMut};
use syn::{Expr, Ident};

use crate::lower::{grad_field, Ctx, MAX_ARGS};
use crate::paths::hook_path;
use crate::scan::{calls_backward, free_idents, macro_args, mentions_proxy, Names};

impl Ctx {
    /// Lifts `e` into one apply node (see the module docs). `convert` wraps the body (used to
    /// turn a swap's value into the hook point's type).
    pub(crate) fn lift(&mut self, e: &Expr, convert: Option<TokenStream>) -> TokenStream {
        let span = e.span();
        // The node call carries the expression's span, so type errors about its value point there.
        let tr = Ident::new(&self.tr.to_string(), span);
        let mut body = e.clone();
        let mut r = Replacer { ctx: self, leaves: Vec::new(), params: HashSet::new() };
        r.visit_expr_mut(&mut body);
        let Replacer { leaves, params, .. } = r;
        if leaves.len() > MAX_ARGS {
            return self.error(span, format!("this expression uses {} proxies; at most {MAX_ARGS} fit in one node: split it with `let`", leaves.len()));
        }
        let backward = calls_backward(&body);
        if backward {
            self.grad = true;
        }
        let mut skip: HashSet<String> = params.clone();
        skip.extend(self.proxies.iter().cloned());
        let captures = free_idents(&body, &skip);
        // Captured names become fresh bindings: a copy of a `Copy` value, a borrow otherwise
        // (see `nnsight::__private::Cap`); uses read them as a place or take a value.
        let renames: HashMap<String, Ident> =
            captures.iter().map(|c| (c.to_string(), self.fresh("cap", c.span()))).collect();
        UseCaptures { names: &renames, place: false }.visit_expr_mut(&mut body);
        let owned = self.owned_captures;
        let cap_lets = captures.iter().map(|c| {
            let fresh = &renames[&c.to_string()];
            if owned {
                quote!(let #fresh = (&::nnsight::__private::CapOwn(&#c)).__nn_cap();)
            } else {
                quote!(let #fresh = (&::nnsight::__private::Cap(&#c)).__nn_cap();)
            }
        });
        let apply = format_ident!("apply{}", leaves.len());
        let arg_names: Vec<&Ident> = leaves.iter().map(|(p, _)| p).collect();
        let arg_vals: Vec<Ident> = (0..leaves.len()).map(|i| format_ident!("__nn_arg{}", i)).collect();
        let bindings = leaves.iter().zip(&arg_vals).map(|((_, v), a)| quote!(let #a = #v;));
        // `?` inside: an error of this node (so of the trace), with the error's text.
        let body = if has_try(&body) {
            quote_spanned!(span=> match (|| -> ::core::result::Result<_, ::std::boxed::Box<dyn ::std::error::Error + ::core::marker::Send + ::core::marker::Sync>> {
                ::core::result::Result::Ok(#body)
            })() {
                ::core::result::Result::Ok(v) => v,
                ::core::result::Result::Err(e) => ::core::panic!("{}", e),
            })
        } else {
            body.to_token_stream()
        };
        let body = match convert {
            Some(c) => quote_spanned!(span=> #c(#body)),
            None => body,
        };
        // A node that calls `.backward()` is marked as the trace's next backward pass.
        let mark = backward.then(|| quote_spanned!(span=> #tr.backward(&__nn_node);));
        quote_spanned! {span=> {
            #(#bindings)*
            #[allow(unused_imports)]
            use ::nnsight::__private::{CapByCopy as _, CapByRef as _, CapOwnByCopy as _, CapOwnClone as _, CapOwnTensor as _};
            #(#cap_lets)*
            let __nn_node = #tr.#apply(#(#arg_vals,)* move |#(#arg_names),*| {
                #[allow(unused_imports)]
                use ::nnsight::__private::{
                    At as _, OwnClone as _, OwnTensor as _, OwnedAny as _, OwnedTensor as _, ParamByCopy as _, ParamByRef as _,
                    RefOfRef as _, RefOfValue as _, UseCopy as _, UseRef as _, UseTensor as _,
                };
                // Numbers by value, tensors by reference (see `nnsight::__private::Param`).
                #(let #arg_names = (&::nnsight::__private::Param(#arg_names)).__nn_param();)*
                #body
            });
            #mark
            __nn_node
        }}
    }
}

/// The span of a range bound written as a negative literal (`..-1`, `-3..`) in an index.
fn negative_range_bound(index: &Expr) -> Option<proc_macro2::Span> {
    let parts: Vec<&Expr> = match index {
        Expr::Tuple(t) => t.elems.iter().collect(),
        Expr::Paren(p) => match &*p.expr {
            Expr::Tuple(t) => t.elems.iter().collect(),
            other => vec![other],
        },
        other => vec![other],
    };
    parts.into_iter().find_map(|p| match p {
        Expr::Range(r) => [&r.start, &r.end].into_iter().flatten().find(|b| matches!(&***b, Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)))).map(|b| b.span()),
        _ => None,
    })
}

/// True when `e` uses `?` outside the closures inside it.
fn has_try(e: &Expr) -> bool {
    struct V(bool);
    impl<'ast> syn::visit::Visit<'ast> for V {
        fn visit_expr(&mut self, e: &'ast Expr) {
            match e {
                Expr::Try(_) => self.0 = true,
                Expr::Closure(_) | Expr::Async(_) => {}
                _ => syn::visit::visit_expr(self, e),
            }
        }
    }
    let mut v = V(false);
    syn::visit::Visit::visit_expr(&mut v, e);
    v.0
}

/// One part of an index: integer literals become `i64` literals (tch's type; a `Vec` index
/// gives an element whose type is then known), ranges part by part, `..` as it is, anything
/// else through `nnsight::__private::ix` (any integer type, and ranges of them).
fn index_part(e: &Expr) -> Expr {
    fn int_lit(e: &Expr) -> Option<Expr> {
        match e {
            Expr::Lit(syn::ExprLit { lit: syn::Lit::Int(i), .. }) if i.suffix().is_empty() => {
                let v = syn::LitInt::new(&format!("{}i64", i.base10_digits()), i.span());
                Some(syn::parse_quote!(#v))
            }
            Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => int_lit(&u.expr).map(|v| syn::parse_quote!(-#v)),
            Expr::Paren(p) => int_lit(&p.expr),
            _ => None,
        }
    }
    if let Some(v) = int_lit(e) {
        return v;
    }
    if let Expr::Range(r) = e {
        let lit_or_none = |x: &Option<Box<Expr>>| x.as_ref().is_none_or(|x| int_lit(x).is_some());
        if lit_or_none(&r.start) && lit_or_none(&r.end) {
            let start = r.start.as_ref().map(|x| int_lit(x).unwrap());
            let end = r.end.as_ref().map(|x| int_lit(x).unwrap());
            let limits = &r.limits;
            return syn::parse_quote!(#start #limits #end);
        }
    }
    syn::parse_quote_spanned!(e.span()=> ::nnsight::__private::ix(#e))
}

/// Rewrites uses of captured variables: `(*c)` where a place is read (receiver, `&x`, field,
/// index, comparison, format argument), `(&c).__nn_use()` where a value is taken.
struct UseCaptures<'a> {
    names: &'a HashMap<String, Ident>,
    /// Whether the expression being visited is read as a place.
    place: bool,
}

impl UseCaptures<'_> {
    fn with(&mut self, place: bool, e: &mut Expr) {
        let outer = std::mem::replace(&mut self.place, place);
        self.visit_expr_mut(e);
        self.place = outer;
    }
}

impl VisitMut for UseCaptures<'_> {
    fn visit_expr_mut(&mut self, e: &mut Expr) {
        use syn::BinOp::*;
        match e {
            Expr::Path(p) => {
                if let Some(fresh) = p.qself.is_none().then(|| p.path.get_ident()).flatten().and_then(|id| self.names.get(&id.to_string())) {
                    let fresh = Ident::new(&fresh.to_string(), p.span());
                    *e = if self.place {
                        syn::parse_quote_spanned!(fresh.span()=> (*#fresh))
                    } else {
                        syn::parse_quote_spanned!(fresh.span()=> (&#fresh).__nn_use())
                    };
                }
            }
            Expr::MethodCall(m) => {
                self.with(true, &mut m.receiver);
                for a in m.args.iter_mut() {
                    self.with(false, a);
                }
            }
            Expr::Field(f) => self.with(true, &mut f.base),
            Expr::Index(ix) => {
                self.with(true, &mut ix.expr);
                self.with(false, &mut ix.index);
            }
            Expr::Reference(r) => self.with(true, &mut r.expr),
            Expr::Cast(c) => self.with(true, &mut c.expr),
            Expr::Binary(b) if matches!(b.op, Eq(_) | Ne(_) | Lt(_) | Le(_) | Gt(_) | Ge(_)) => {
                self.with(true, &mut b.left);
                self.with(true, &mut b.right);
            }
            Expr::Binary(b) => {
                // `x += ..` on a capture changes the borrowed variable: not a value use.
                let left_place = matches!(b.op, AddAssign(_) | SubAssign(_) | MulAssign(_) | DivAssign(_));
                self.with(left_place, &mut b.left);
                self.with(false, &mut b.right);
            }
            Expr::Assign(a) => {
                self.with(true, &mut a.left);
                self.with(false, &mut a.right);
            }
            Expr::Macro(_) => {
                if let Some(mut items) = macro_args(e) {
                    let Expr::Macro(m) = &*e else { unreachable!() };
                    let path = m.mac.path.clone();
                    for it in items.iter_mut() {
                        match it {
                            // `name = value` in a format macro: the name stays.
                            Expr::Assign(a) if matches!(&*a.left, Expr::Path(_)) => self.with(true, &mut a.right),
                            other => self.with(true, other),
                        }
                    }
                    *e = syn::parse_quote!(#path!(#(#items),*));
                }
            }
            _ => {
                let outer = std::mem::replace(&mut self.place, false);
                visit_mut::visit_expr_mut(self, e);
                self.place = outer;
            }
        }
    }
}

/// Replaces proxy leaves in a lifted expression by closure parameters.
struct Replacer<'a> {
    ctx: &'a mut Ctx,
    /// `(parameter, build-time proxy expression)`, in order.
    leaves: Vec<(Ident, TokenStream)>,
    params: HashSet<String>,
}

impl Replacer<'_> {
    fn leaf(&mut self, e: &mut Expr, value: TokenStream, name: Ident) {
        if self.params.insert(name.to_string()) {
            self.leaves.push((name.clone(), value));
        }
        *e = Expr::Path(syn::ExprPath { attrs: vec![], qself: None, path: name.into() });
    }

    fn mentions_param(&self, e: &Expr) -> bool {
        let names = Names { model: &self.ctx.model, proxies: &self.params };
        mentions_proxy(e, &names)
    }
}

impl VisitMut for Replacer<'_> {
    fn visit_expr_mut(&mut self, e: &mut Expr) {
        if let Some(hp) = hook_path(e, &self.ctx.model) {
            let v = self.ctx.hook_read(&hp);
            let name = self.ctx.fresh("p", hp.span);
            return self.leaf(e, v, name);
        }
        if let Expr::Path(p) = e {
            if let Some(id) = p.path.get_ident() {
                if self.ctx.proxies.contains(&id.to_string()) {
                    let id = id.clone();
                    return self.leaf(e, id.to_token_stream(), id);
                }
            }
            return;
        }
        if let Some(f) = grad_field(e) {
            if self.ctx.mentions(&f.base) {
                let v = self.ctx.grad_of(&f.clone());
                let name = self.ctx.fresh("grad", f.member.span());
                return self.leaf(e, v, name);
            }
        }
        if let Expr::MethodCall(m) = e {
            if crate::scan::is_save_like(&m.method) && m.args.is_empty() {
                let (v, _) = self.ctx.value(e);
                let name = self.ctx.fresh("p", e.span());
                return self.leaf(e, v, name);
            }
        }
        if let Expr::Macro(m) = e {
            let path = m.mac.path.clone();
            // `vec![..]`, `println!(..)`, `assert!(..)`, ...: their arguments are expressions too.
            if let Some(mut items) = macro_args(e) {
                for it in items.iter_mut() {
                    match it {
                        // `name = value` in a format macro: the name stays.
                        Expr::Assign(a) if matches!(&*a.left, Expr::Path(_)) => self.visit_expr_mut(&mut a.right),
                        other => self.visit_expr_mut(other),
                    }
                }
                *e = syn::parse_quote!(#path!(#(#items),*));
            }
            return;
        }
        visit_mut::visit_expr_mut(self, e);
        // A tuple element of a proxy's value (`pair.0`) cannot be moved out of the borrowed
        // value: it becomes an owned handle (shared storage for tensors, a clone otherwise).
        if let Expr::Field(f) = e {
            if matches!(f.member, syn::Member::Unnamed(_)) && self.mentions_param(&f.base) {
                let field = f.clone();
                *e = syn::parse_quote_spanned!(field.span()=> (&::nnsight::__private::Own(&#field)).__nn_own());
                return;
            }
        }
        // `&h` of an argument: the `&T` the plain value's `&h` would be.
        if let Expr::Reference(r) = e {
            if r.mutability.is_none() && matches!(&*r.expr, Expr::Path(p) if p.path.get_ident().is_some_and(|i| self.params.contains(&i.to_string()))) {
                let inner = &r.expr;
                *e = syn::parse_quote_spanned!(r.span()=> (&&::nnsight::__private::RefOf(&#inner)).__nn_ref());
                return;
            }
        }
        // Indexing a real value that came from a proxy is tensor indexing (tch's IndexOp).
        if let Expr::Index(ix) = e {
            if self.mentions_param(&ix.expr) {
                if let Some(span) = negative_range_bound(&ix.index) {
                    self.ctx.errors.push(syn::Error::new(
                        span,
                        "a negative range bound does not count from the end in tch: `..-1` gives an empty slice and `-3..` fails; write the length (`..n - 1`, `n - 3..`) — a single negative index (`-1`) does count from the end",
                    ));
                }
                let base = &ix.expr;
                // Every part through `ix`: `usize` and its ranges index like `i64`.
                let idx: Expr = match &*ix.index {
                    Expr::Tuple(t) => {
                        let parts = t.elems.iter().map(index_part);
                        syn::parse_quote!((#(#parts,)*))
                    }
                    Expr::Paren(p) if matches!(&*p.expr, Expr::Tuple(_)) => {
                        let Expr::Tuple(t) = &*p.expr else { unreachable!() };
                        let parts = t.elems.iter().map(index_part);
                        syn::parse_quote!((#(#parts,)*))
                    }
                    other => index_part(other),
                };
                *e = syn::parse_quote_spanned!(ix.bracket_token.span.join()=> (#base).__nn_at(#idx));
            }
        }
    }
}
