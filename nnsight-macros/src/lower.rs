//! Translating the block's statements into graph-building calls on the runtime's `Tracer`.
//!
//! - A hook point (`model.x.output`) becomes a hook node: `tracer.output(group, call, || path)`.
//! - `.save()` / `.stop()` on a proxy become `tracer.save(p)` / `tracer.stop(p)`.
//! - Any other expression that mentions a proxy is lifted whole into one apply node: its proxies
//!   become the closure's arguments (real values at run time), so rustc checks every method and
//!   operator against the real types (see [`Ctx::lift`]).
//! - `model.x.output = e` swaps; `p[idx] = e` and `p op= e` edit in place.
//! - `if` on a proxy gates the nodes built in its branches; loops over plain values just run.

use std::collections::HashSet;

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Expr, Ident, Stmt};

use crate::paths::{hook_path, module_chain, HookPath, Point, Seg};
use crate::scan::{calls_backward, mentions_proxy, pat_idents, vec_macro_items, Names};

/// Methods that, called on a plain value with proxy arguments, run while building (they store
/// proxies in a collection) rather than becoming graph nodes.
const BUILD_TIME_METHODS: &[&str] = &["push", "insert", "extend", "push_back", "push_front", "append"];

/// Most proxies one lifted expression may use (the runtime has `apply0` .. `apply8`).
pub(crate) const MAX_ARGS: usize = 8;

pub struct Ctx {
    pub model: Ident,
    pub tr: Ident,
    /// The current batch-group variable: the invoke's, or `Group::ALL` outside invokes.
    pub group: Option<Ident>,
    pub proxies: HashSet<String>,
    pub errors: Vec<syn::Error>,
    pub grad: bool,
    pub(crate) fresh: usize,
}

impl Ctx {
    pub fn new(model: Ident) -> Self {
        Ctx {
            model,
            tr: Ident::new("__nn_tr", Span::call_site()),
            group: None,
            proxies: HashSet::new(),
            errors: Vec::new(),
            grad: false,
            fresh: 0,
        }
    }

    pub(crate) fn fresh(&mut self, base: &str, span: Span) -> Ident {
        self.fresh += 1;
        Ident::new(&format!("__nn_{base}{}", self.fresh), span)
    }

    pub(crate) fn mentions(&self, e: &Expr) -> bool {
        mentions_proxy(e, &Names { model: &self.model, proxies: &self.proxies })
    }

    pub(crate) fn error(&mut self, span: Span, msg: impl std::fmt::Display) -> TokenStream {
        self.errors.push(syn::Error::new(span, msg));
        quote!(())
    }

    // ----- statements -------------------------------------------------------------------

    /// Translates statements; returns the statements and the tail expression (the value of the
    /// last statement when it has no semicolon).
    pub fn stmts(&mut self, stmts: &[Stmt]) -> (TokenStream, Option<TokenStream>) {
        let mut out = TokenStream::new();
        let mut tail = None;
        for (i, s) in stmts.iter().enumerate() {
            let last = i + 1 == stmts.len();
            match s {
                Stmt::Expr(e, None) if last => tail = Some(self.tail_expr(e)),
                _ => out.extend(self.stmt(s)),
            }
        }
        (out, tail)
    }

    fn stmt(&mut self, s: &Stmt) -> TokenStream {
        match s {
            Stmt::Local(l) => self.local(l),
            Stmt::Expr(e, semi) => {
                let t = self.expr_stmt(e);
                match semi {
                    Some(_) => quote!(#t;),
                    None => t,
                }
            }
            Stmt::Macro(m) => {
                let e = Expr::Macro(syn::ExprMacro { attrs: m.attrs.clone(), mac: m.mac.clone() });
                let t = if self.mentions(&e) { self.value(&e).0 } else { m.mac.to_token_stream() };
                quote!(#t;)
            }
            Stmt::Item(it) => it.to_token_stream(),
        }
    }

    fn local(&mut self, l: &syn::Local) -> TokenStream {
        let mut names = Vec::new();
        pat_idents(&l.pat, &mut names);
        let attrs = &l.attrs;
        let pat = &l.pat;
        let Some(init) = &l.init else {
            for n in &names {
                self.proxies.remove(&n.to_string());
            }
            return quote!(#(#attrs)* let #pat;);
        };
        if init.diverge.is_some() || !self.mentions(&init.expr) {
            for n in &names {
                self.proxies.remove(&n.to_string());
            }
            return l.to_token_stream();
        }
        let (value, is_proxy) = self.value(&init.expr);
        let simple = matches!(&l.pat, syn::Pat::Ident(_) | syn::Pat::Wild(_))
            || matches!(&l.pat, syn::Pat::Type(t) if matches!(*t.pat, syn::Pat::Ident(_)));
        for n in &names {
            if is_proxy && simple {
                self.proxies.insert(n.to_string());
            } else {
                self.proxies.remove(&n.to_string());
            }
        }
        if is_proxy && !simple {
            return self.error(l.pat.span(), "bind a proxy to one name (`let h = ...;`); destructure it inside an expression instead");
        }
        quote!(#(#attrs)* let #pat = #value;)
    }

    fn expr_stmt(&mut self, e: &Expr) -> TokenStream {
        match e {
            Expr::Assign(a) => self.assign(a),
            Expr::Binary(b) if is_compound(&b.op) && self.mentions(&b.left) => self.compound(b),
            Expr::ForLoop(f) => {
                if self.mentions(&f.expr) {
                    return self.error(f.expr.span(), "cannot loop over a proxy: its value exists only while the model runs; loop over plain values (e.g. `for l in 0..6`)");
                }
                let saved = self.proxies.clone();
                let mut names = Vec::new();
                pat_idents(&f.pat, &mut names);
                for n in &names {
                    self.proxies.remove(&n.to_string());
                }
                let body = self.block(&f.body);
                self.proxies = saved;
                let (label, pat, iter) = (&f.label, &f.pat, &f.expr);
                quote!(#label for #pat in #iter #body)
            }
            Expr::While(w) => {
                if self.mentions(&w.cond) {
                    return self.error(w.cond.span(), "`while` on a proxy is not supported: use `if` on the proxy, or a loop over plain values");
                }
                let body = self.block(&w.body);
                let (label, cond) = (&w.label, &w.cond);
                quote!(#label while #cond #body)
            }
            Expr::Loop(lp) => {
                let body = self.block(&lp.body);
                let label = &lp.label;
                quote!(#label loop #body)
            }
            Expr::Block(b) if b.label.is_none() && b.attrs.is_empty() => self.block(&b.block),
            Expr::If(i) => self.if_expr(i),
            _ if self.mentions(e) => self.value(e).0,
            _ => e.to_token_stream(),
        }
    }

    fn tail_expr(&mut self, e: &Expr) -> TokenStream {
        match e {
            Expr::ForLoop(_) | Expr::While(_) | Expr::Loop(_) | Expr::If(_) | Expr::Assign(_) => {
                let t = self.expr_stmt(e);
                quote!({ #t; })
            }
            _ if self.mentions(e) => self.value(e).0,
            _ => e.to_token_stream(),
        }
    }

    /// A nested block: its own scope for proxy names.
    fn block(&mut self, b: &syn::Block) -> TokenStream {
        let saved = self.proxies.clone();
        let (stmts, tail) = self.stmts(&b.stmts);
        self.proxies = saved;
        quote!({ #stmts #tail })
    }

    fn if_expr(&mut self, i: &syn::ExprIf) -> TokenStream {
        if !self.mentions(&i.cond) {
            let cond = &i.cond;
            let then = self.block(&i.then_branch);
            let els = i.else_branch.as_ref().map(|(_, e)| {
                let t = self.expr_stmt(e);
                quote!(else { #t })
            });
            return quote!(if #cond #then #els);
        }
        let tr = self.tr.clone();
        let c = self.fresh("cond", i.cond.span());
        let (cond, _) = self.value(&i.cond);
        let then = self.block(&i.then_branch);
        let els = i.else_branch.as_ref().map(|(_, e)| {
            let nc = self.fresh("not", e.span());
            let t = self.expr_stmt(e);
            quote! {
                let #nc = #tr.apply1(#c, |c: &bool| !*c);
                #tr.begin_if(#nc);
                #t;
                #tr.end_if();
            }
        });
        quote_spanned! {i.cond.span()=> {
            let #c: ::nnsight::Proxy<bool> = #cond;
            #tr.begin_if(#c);
            #then;
            #tr.end_if();
            #els
        }}
    }

    // ----- assignments ------------------------------------------------------------------

    fn assign(&mut self, a: &syn::ExprAssign) -> TokenStream {
        let tr = self.tr.clone();
        if let Some(hp) = hook_path(&a.left, &self.model) {
            let value = self.swap_value(&a.right);
            let Some((path, call)) = self.module_access(&hp) else { return quote!(()) };
            let Some(group) = self.group.clone() else { return self.outside_invoke(hp.full_span) };
            let method = match hp.point {
                Point::Output => format_ident!("swap_output_with", span = hp.span),
                Point::Input => format_ident!("swap_input_with", span = hp.span),
                Point::Inputs => format_ident!("swap_inputs_with", span = hp.span),
            };
            // The value is built first, inside a closure whose return type the hook point fixes.
            return quote_spanned! {a.span()=>
                #tr.#method(#group, #call, #path, |#tr| #value)
            };
        }
        if let Some(f) = grad_field(&a.left) {
            if self.mentions(&f.base) {
                let value = self.swap_value(&a.right);
                let g = self.grad_of(f);
                let gv = self.fresh("grad", f.member.span());
                return quote_spanned! {a.span()=> {
                    let #gv = #g;
                    let __nn_new = #value;
                    #tr.swap_grad(#gv, __nn_new);
                }};
            }
        }
        if let Expr::Index(ix) = &*a.left {
            if self.mentions(&ix.expr) {
                let (idx, rhs) = (&ix.index, &a.right);
                return self.edit(&ix.expr, a.span(), |t| syn::parse_quote!(::nnsight::__private::assign(&#t[#idx], #rhs)));
            }
        }
        if let Expr::Path(p) = &*a.left {
            if p.path.get_ident().is_some_and(|id| self.proxies.contains(&id.to_string())) {
                // Rebinding a proxy name to another proxy.
                let (v, _) = self.value(&a.right);
                let left = &a.left;
                return quote!(#left = #v);
            }
        }
        if self.mentions(&a.left) {
            return self.error(a.left.span(), "cannot assign to this: assign to a hook point (`model.x.output = ..`) or to an indexed proxy (`h[.., 0] = ..`)");
        }
        let (left, (right, _)) = (&a.left, self.value(&a.right));
        quote!(#left = #right)
    }

    /// `target op= rhs` on a proxy (or an indexed proxy): an in-place edit.
    fn compound(&mut self, b: &syn::ExprBinary) -> TokenStream {
        let (op, rhs) = (&b.op, &b.right);
        let (target, idx) = match &*b.left {
            Expr::Index(ix) => (&*ix.expr, Some(&ix.index)),
            other => (other, None),
        };
        self.edit(target, b.span(), |t| match idx {
            Some(idx) => syn::parse_quote!({ let mut __nn_view = ::nnsight::__private::view(&#t[#idx]); __nn_view #op #rhs; }),
            None => syn::parse_quote!({ let mut __nn_view = ::nnsight::__private::view(#t); __nn_view #op #rhs; }),
        })
    }

    /// An edit node over `target` whose body `make_body(target_name)` changes it in place.
    fn edit(&mut self, target: &Expr, span: Span, make_body: impl FnOnce(&Ident) -> Expr) -> TokenStream {
        let tr = self.tr.clone();
        let (t_val, t_is_proxy) = self.value(target);
        if !t_is_proxy {
            return self.error(target.span(), "only a hook point or a proxy can be edited in place here");
        }
        let t = self.fresh("target", target.span());
        let body = make_body(&t);
        self.proxies.insert(t.to_string());
        let lifted = self.lift(&body, None);
        self.proxies.remove(&t.to_string());
        let e = self.fresh("edit", span);
        quote_spanned! {span=> {
            let #t = #t_val;
            let #e = #lifted;
            #tr.edits(#t, #e);
        }}
    }

    fn swap_value(&mut self, rhs: &Expr) -> TokenStream {
        let direct = hook_path(rhs, &self.model).is_some()
            || matches!(rhs, Expr::Path(p) if p.path.get_ident().is_some_and(|i| self.proxies.contains(&i.to_string())));
        if direct {
            let (v, _) = self.value(rhs);
            quote_spanned!(rhs.span()=> ::nnsight::__private::as_proxy(#v))
        } else {
            self.lift(rhs, Some(quote_spanned!(rhs.span()=> ::nnsight::__private::into_value)))
        }
    }

    fn outside_invoke(&mut self, span: Span) -> TokenStream {
        self.error(span, "hook points are only available inside an invoke: put this in `invoke(<input>) { .. }`")
    }

    // ----- values -----------------------------------------------------------------------

    /// Build-time code for `e`, and whether it evaluates to a proxy.
    pub(crate) fn value(&mut self, e: &Expr) -> (TokenStream, bool) {
        if !self.mentions(e) {
            return (e.to_token_stream(), false);
        }
        if let Some(hp) = hook_path(e, &self.model) {
            return (self.hook_read(&hp), true);
        }
        let tr = self.tr.clone();
        match e {
            Expr::Path(p) if p.path.get_ident().is_some() => (e.to_token_stream(), true),
            Expr::Paren(p) => self.value(&p.expr),
            Expr::Field(f) if grad_field(e).is_some() => (self.grad_of(f), true),
            Expr::MethodCall(m) if (m.method == "save" || m.method == "stop") && m.args.is_empty() => {
                let (r, is_proxy) = self.value(&m.receiver);
                if !is_proxy {
                    return (self.error(m.method.span(), format!("`.{}()` needs a proxy", m.method)), false);
                }
                let method = &m.method;
                (quote_spanned!(m.method.span()=> { let __nn_recv = #r; #tr.#method(__nn_recv) }), true)
            }
            Expr::MethodCall(m) if m.method == "backward" => {
                self.grad = true;
                (self.lift(e, None), true)
            }
            Expr::MethodCall(m)
                if BUILD_TIME_METHODS.contains(&m.method.to_string().as_str())
                    && !self.mentions(&m.receiver)
                    && module_chain(&m.receiver, &self.model).is_none() =>
            {
                let args: Vec<TokenStream> = m.args.iter().map(|a| self.value(a).0).collect();
                let (recv, method, turbofish) = (&m.receiver, &m.method, &m.turbofish);
                (quote!(#recv.#method #turbofish (#(#args),*)), false)
            }
            Expr::Tuple(t) => {
                let elems: Vec<TokenStream> = t.elems.iter().map(|x| self.value(x).0).collect();
                (quote!((#(#elems,)*)), false)
            }
            Expr::Array(a) => {
                let elems: Vec<TokenStream> = a.elems.iter().map(|x| self.value(x).0).collect();
                (quote!([#(#elems),*]), false)
            }
            Expr::Block(b) if b.label.is_none() => (self.block(&b.block), false),
            Expr::Macro(_) if vec_macro_items(e).is_some() => {
                let items = vec_macro_items(e).unwrap();
                let elems: Vec<TokenStream> = items.iter().map(|x| self.value(x).0).collect();
                (quote!(::std::vec![#(#elems),*]), false)
            }
            _ => {
                if calls_backward(e) {
                    self.grad = true;
                }
                (self.lift(e, None), true)
            }
        }
    }

    /// `tracer.grad_next(x)` for `x.grad`: the backward pass is picked at run time (the first
    /// `.backward()` node built after the read, else the last one).
    pub(crate) fn grad_of(&mut self, f: &syn::ExprField) -> TokenStream {
        let tr = self.tr.clone();
        self.grad = true;
        let (x, is_proxy) = self.value(&f.base);
        if !is_proxy {
            return self.error(f.base.span(), "`.grad` needs a hook point or a proxy bound to one");
        }
        quote_spanned!(f.member.span()=> { let __nn_x = #x; #tr.grad_next(__nn_x) })
    }

    /// `(path closure, call selector)` for a hook path's module.
    fn module_access(&mut self, hp: &HookPath) -> Option<(TokenStream, TokenStream)> {
        let mut expr = hp.root.to_token_stream();
        let mut nexts = 0usize;
        let mut at = None;
        let n = hp.segs.len();
        for (i, s) in hp.segs.iter().enumerate() {
            match s {
                Seg::Field(id) => expr = quote!(#expr.#id),
                Seg::Index(ix) => {
                    let sp = ix.span();
                    expr = quote_spanned!(sp=> (*::nnsight::__private::module_at(&#expr, #ix)?));
                }
                Seg::Next(sp) | Seg::At(_, sp) => {
                    if hp.segs[i + 1..n].iter().any(|s| !matches!(s, Seg::Next(_) | Seg::At(..))) {
                        self.errors.push(syn::Error::new(*sp, "`.next()` and `.at(call)` go right before the hook point: `model.x.next().output`"));
                        return None;
                    }
                    match s {
                        Seg::At(e, sp) if at.is_none() && nexts == 0 => at = Some((e.clone(), *sp)),
                        Seg::Next(_) if at.is_none() => nexts += 1,
                        _ => {
                            self.errors.push(syn::Error::new(*sp, "use either `.at(call)` once or `.next()`, not both"));
                            return None;
                        }
                    }
                }
            }
        }
        let call = match at {
            Some((e, sp)) => quote_spanned!(sp=> ::nnsight::__private::call_at(#e)),
            None => quote!(#nexts),
        };
        Some((quote_spanned!(hp.full_span=> || ::core::result::Result::Ok(&#expr)), call))
    }

    pub(crate) fn hook_read(&mut self, hp: &HookPath) -> TokenStream {
        let Some(group) = self.group.clone() else { return self.outside_invoke(hp.full_span) };
        let Some((path, call)) = self.module_access(hp) else { return quote!(()) };
        let tr = &self.tr;
        let method = match hp.point {
            Point::Output => format_ident!("output", span = hp.span),
            Point::Input => format_ident!("input", span = hp.span),
            Point::Inputs => format_ident!("inputs", span = hp.span),
        };
        quote_spanned!(hp.span=> #tr.#method(#group, #call, #path))
    }
}

/// `x.grad`.
pub(crate) fn grad_field(e: &Expr) -> Option<&syn::ExprField> {
    match e {
        Expr::Field(f) if matches!(&f.member, syn::Member::Named(id) if id == "grad") => Some(f),
        _ => None,
    }
}

fn is_compound(op: &syn::BinOp) -> bool {
    use syn::BinOp::*;
    matches!(op, AddAssign(_) | SubAssign(_) | MulAssign(_) | DivAssign(_))
}
