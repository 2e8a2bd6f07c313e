//! Lifting: one expression that mentions proxies becomes one apply node. Every hook point,
//! proxy name, `.save()`d proxy and `.grad` in it becomes a closure argument holding the real
//! value (`&T`); indexing on those values becomes tch's `.i(..)` for tensors (an element copy
//! for `Vec`s); other free variables are captured — copied when `Copy`, borrowed otherwise — and
//! used as `(*x)`, so the expression reads as in an ordinary closure and rustc checks it against
//! the real types.

use std::collections::HashSet;

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
        // Captured names are used as `(*x)`: a place of the variable's own type (see
        // `nnsight::__private::Cap`).
        let cap_names: HashSet<String> = captures.iter().map(|c| c.to_string()).collect();
        DerefCaptures(&cap_names).visit_expr_mut(&mut body);
        let apply = format_ident!("apply{}", leaves.len());
        let arg_names: Vec<&Ident> = leaves.iter().map(|(p, _)| p).collect();
        let arg_vals: Vec<Ident> = (0..leaves.len()).map(|i| format_ident!("__nn_arg{}", i)).collect();
        let bindings = leaves.iter().zip(&arg_vals).map(|((_, v), a)| quote!(let #a = #v;));
        let body = match convert {
            Some(c) => quote_spanned!(span=> #c(#body)),
            None => body.to_token_stream(),
        };
        // A node that calls `.backward()` is marked as the trace's next backward pass.
        let mark = backward.then(|| quote_spanned!(span=> #tr.backward(&__nn_node);));
        quote_spanned! {span=> {
            #(#bindings)*
            #[allow(unused_imports)]
            use ::nnsight::__private::{CapByCopy as _, CapByRef as _};
            #(let #captures = (&::nnsight::__private::Cap(&#captures)).__nn_cap();)*
            let __nn_node = #tr.#apply(#(#arg_vals,)* move |#(#arg_names),*| {
                #[allow(unused_imports)]
                use ::nnsight::__private::{At as _, OwnClone as _, OwnTensor as _, ParamByCopy as _, ParamByRef as _};
                // Numbers by value, tensors by reference (see `nnsight::__private::Param`).
                #(let #arg_names = (&::nnsight::__private::Param(#arg_names)).__nn_param();)*
                #body
            });
            #mark
            __nn_node
        }}
    }
}

/// Rewrites uses of captured variables `x` to `(*x)`.
struct DerefCaptures<'a>(&'a HashSet<String>);

impl VisitMut for DerefCaptures<'_> {
    fn visit_expr_mut(&mut self, e: &mut Expr) {
        if let Expr::Path(p) = e {
            if p.qself.is_none() && p.path.get_ident().is_some_and(|id| self.0.contains(&id.to_string())) {
                let id = p.path.get_ident().unwrap().clone();
                *e = syn::parse_quote_spanned!(id.span()=> (*#id));
            }
            return;
        }
        visit_mut::visit_expr_mut(self, e);
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
            if (m.method == "save" || m.method == "stop") && m.args.is_empty() && self.ctx.mentions(&m.receiver) {
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
                    self.visit_expr_mut(it);
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
        // Indexing a real value that came from a proxy is tensor indexing (tch's IndexOp).
        if let Expr::Index(ix) = e {
            if self.mentions_param(&ix.expr) {
                let (base, idx) = (&ix.expr, &ix.index);
                *e = syn::parse_quote_spanned!(ix.bracket_token.span.join()=> (#base).__nn_at(#idx));
            }
        }
    }
}
