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
use syn::visit::{self, Visit};
use syn::visit_mut::{self, VisitMut};
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
    /// Names the block declared (`let`, loop and closure patterns), as opposed to variables
    /// from outside the trace.
    pub(crate) locals: HashSet<String>,
    /// Plain variables declared in the block that hold a proxy because the block assigns one
    /// to them later (`let mut total = 0.0; .. total += h.norm()..`): the trace saves them
    /// when the block returns them.
    pub(crate) promoted: HashSet<String>,
    /// For each `if` on a proxy being translated (innermost last): the names declared inside
    /// it. A variable declared before it and assigned inside it gets a merge node.
    pub(crate) gate_scopes: Vec<HashSet<String>>,
    /// The statements of the invokes after the current one (what a `let` looks ahead at).
    pub(crate) later: Vec<Stmt>,
    /// Invokes written inside loops and blocks (see [`crate::ast::INVOKE_LABEL`]).
    pub nested_invokes: usize,
    /// Whether the statements being translated are inside an invoke.
    pub in_invoke: bool,
    /// `edit!`: captured variables are owned by the nodes (copied, cloned, tensors shared),
    /// since the edit is replayed into traces long after its block ran.
    pub owned_captures: bool,
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
            locals: HashSet::new(),
            promoted: HashSet::new(),
            gate_scopes: Vec::new(),
            later: Vec::new(),
            nested_invokes: 0,
            in_invoke: false,
            owned_captures: false,
        }
    }

    fn declare(&mut self, names: impl IntoIterator<Item = String>) {
        for n in names {
            if let Some(scope) = self.gate_scopes.last_mut() {
                scope.insert(n.clone());
            }
            self.locals.insert(n);
        }
    }

    /// Whether `name` is assigned under an `if` on a proxy it was declared before.
    fn assigned_across_gate(&self, name: &str) -> bool {
        self.gate_scopes.last().is_some_and(|scope| !scope.contains(name))
    }

    /// `new`, or a merge of `new` into the variable's old value when assigned across a gate.
    fn merged(&mut self, name: &Expr, new: TokenStream) -> TokenStream {
        let is_across = matches!(name, Expr::Path(p) if p.path.get_ident().is_some_and(|i| self.assigned_across_gate(&i.to_string())));
        if !is_across {
            return new;
        }
        let tr = &self.tr;
        quote_spanned!(name.span()=> { let __nn_new = #new; #tr.merge(__nn_new, #name) })
    }

    /// The variable an assignment target is rooted in (`v` in `v[0].x = ..`).
    fn target_root(e: &Expr) -> Option<&Ident> {
        match e {
            Expr::Path(p) => p.path.get_ident(),
            Expr::Index(i) => Self::target_root(&i.expr),
            Expr::Field(f) => Self::target_root(&f.base),
            Expr::Paren(p) => Self::target_root(&p.expr),
            Expr::Unary(u) => Self::target_root(&u.expr),
            _ => None,
        }
    }

    /// An assignment to a plain variable from before an `if` on a proxy, inside it: it would
    /// happen now, whatever the condition turns out to be.
    fn plain_assign_across_gate(&mut self, left: &Expr) -> Option<TokenStream> {
        if self.gate_scopes.is_empty() || self.mentions(left) || hook_path(left, &self.model).is_some() {
            return None;
        }
        let root = Self::target_root(left)?.to_string();
        if !self.assigned_across_gate(&root) || self.proxies.contains(&root) {
            return None;
        }
        Some(self.error(
            left.span(),
            format!("`{root}` is assigned under an `if` on a proxy, which is decided while the model runs, but the assignment would happen now, whatever the condition. Declare it in the block with `let mut {root} = ..;` before the `if` (it then holds a proxy), or assign a proxy computed with the condition"),
        ))
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
    /// last statement when it has no semicolon) with whether it is a proxy.
    pub fn stmts(&mut self, stmts: &[Stmt]) -> (TokenStream, Option<(TokenStream, bool)>) {
        self.stmts_with(stmts, false)
    }

    /// The trace block's statements: as [`Ctx::stmts`], the tail through [`Ctx::trace_tail`].
    pub fn trace_stmts(&mut self, stmts: &[Stmt]) -> (TokenStream, Option<(TokenStream, bool)>) {
        self.stmts_with(stmts, true)
    }

    fn stmts_with(&mut self, stmts: &[Stmt], top: bool) -> (TokenStream, Option<(TokenStream, bool)>) {
        let mut out = TokenStream::new();
        let mut tail = None;
        for (i, s) in stmts.iter().enumerate() {
            let last = i + 1 == stmts.len();
            match s {
                Stmt::Expr(e, None) if last && top => tail = Some((self.trace_tail(e), false)),
                Stmt::Expr(e, None) if last => tail = Some(self.value_or_stmt(e)),
                Stmt::Local(l) => out.extend(self.local(l, &stmts[i + 1..])),
                _ => out.extend(self.stmt(s)),
            }
        }
        (out, tail)
    }

    fn stmt(&mut self, s: &Stmt) -> TokenStream {
        match s {
            Stmt::Local(l) => self.local(l, &[]),
            Stmt::Expr(e, semi) => {
                let t = self.expr_stmt(e);
                match semi {
                    Some(_) => quote!(#t;),
                    None => t,
                }
            }
            Stmt::Macro(m) => {
                let e = Expr::Macro(syn::ExprMacro { attrs: m.attrs.clone(), mac: m.mac.clone() });
                if !self.mentions(&e) {
                    return m.to_token_stream();
                }
                // A statement: its value (`dbg!` gives its argument back) is dropped in the node.
                let body: Expr = syn::parse_quote_spanned!(e.span()=> { let _ = #e; });
                let t = self.lift(&body, None);
                quote!(#t;)
            }
            Stmt::Item(it) => it.to_token_stream(),
        }
    }

    fn local(&mut self, l: &syn::Local, rest: &[Stmt]) -> TokenStream {
        let mut names = Vec::new();
        pat_idents(&l.pat, &mut names);
        self.declare(names.iter().map(|n| n.to_string()));
        let attrs = &l.attrs;
        let pat = &l.pat;
        let forget = |ctx: &mut Ctx| {
            for n in &names {
                ctx.proxies.remove(&n.to_string());
                ctx.promoted.remove(&n.to_string());
            }
        };
        let Some(init) = &l.init else {
            forget(self);
            return quote!(#(#attrs)* let #pat;);
        };
        if init.diverge.is_some() {
            if self.mentions(&init.expr) {
                return self.error(l.pat.span(), "`let .. else` cannot test a proxy: its value exists only while the model runs; compute a proxy `bool` and use `if` on it");
            }
            forget(self);
            return l.to_token_stream();
        }
        if !self.mentions(&init.expr) {
            forget(self);
            // A plain variable that the block later assigns a proxy to holds a proxy from here.
            let (ident_pat, ty) = match &l.pat {
                syn::Pat::Ident(pi) => (Some(pi), None),
                syn::Pat::Type(pt) => match &*pt.pat {
                    syn::Pat::Ident(pi) => (Some(pi), Some(&pt.ty)),
                    _ => (None, None),
                },
                _ => (None, None),
            };
            if let Some(pi) = ident_pat {
                if pi.mutability.is_some() && pi.subpat.is_none() && self.becomes_proxy(&pi.ident, rest) {
                    let v = self.lift(&init.expr, None);
                    self.proxies.insert(pi.ident.to_string());
                    self.promoted.insert(pi.ident.to_string());
                    // `let mut total: f64 = 0.0;` holds a `Proxy<f64>`.
                    let ty = ty.map(|t| quote_spanned!(t.span()=> : ::nnsight::Proxy<#t>));
                    return quote!(#(#attrs)* #[allow(unused_mut)] let #pi #ty = #v;);
                }
            }
            return l.to_token_stream();
        }
        // `let (a, b) = (x, y);`: element by element (values first, as Rust evaluates them).
        let split = match (&l.pat, &*init.expr) {
            (syn::Pat::Tuple(pt), Expr::Tuple(et)) => Some((&pt.elems, &et.elems)),
            (syn::Pat::Slice(ps), Expr::Array(ea)) => Some((&ps.elems, &ea.elems)),
            _ => None,
        };
        if let Some((pelems, eelems)) = split {
            if pelems.len() == eelems.len() && !pelems.iter().any(|p| matches!(p, syn::Pat::Rest(_))) {
                let (pt, et) = (PatElems(pelems), ExprElems(eelems));
                let mut out = TokenStream::new();
                let mut temps = Vec::new();
                for e in et.iter() {
                    let (v, is_proxy) = self.value(e);
                    let t = self.fresh("elem", e.span());
                    out.extend(quote!(let #t = #v;));
                    temps.push((t, is_proxy));
                }
                for (p, (t, is_proxy)) in pt.iter().zip(temps) {
                    out.extend(self.bind(attrs, p, quote!(#t), is_proxy));
                }
                return out;
            }
        }
        let (value, is_proxy) = self.value(&init.expr);
        if matches!(&*init.expr, Expr::Closure(_)) && builds_graph(&init.expr, &self.model) {
            // A closure that builds the graph borrows the tracer mutably: callable through a
            // `mut` binding only, which the user did not need to write.
            if let syn::Pat::Ident(pi) = &l.pat {
                let id = &pi.ident;
                self.declare([id.to_string()]);
                self.proxies.remove(&id.to_string());
                return quote!(#(#attrs)* #[allow(unused_mut)] let mut #id = #value;);
            }
        }
        self.bind(attrs, &l.pat, value, is_proxy)
    }

    /// `let pat = value;` where `value` is build-time code, a proxy when `is_proxy`.
    fn bind(&mut self, attrs: &[syn::Attribute], pat: &syn::Pat, value: TokenStream, is_proxy: bool) -> TokenStream {
        let mut names = Vec::new();
        pat_idents(pat, &mut names);
        self.declare(names.iter().map(|n| n.to_string()));
        for n in &names {
            self.proxies.remove(&n.to_string());
            self.promoted.remove(&n.to_string());
        }
        let simple = matches!(pat, syn::Pat::Ident(_) | syn::Pat::Wild(_))
            || matches!(pat, syn::Pat::Type(t) if matches!(*t.pat, syn::Pat::Ident(_)));
        if !is_proxy || simple {
            if is_proxy {
                self.proxies.extend(names.iter().map(|n| n.to_string()));
                // `let n: f64 = h.norm().double_value(&[]);` binds a `Proxy<f64>`.
                if let syn::Pat::Type(pt) = pat {
                    let (inner, ty) = (&pt.pat, &pt.ty);
                    if !is_proxy_type(ty) {
                        return quote!(#(#attrs)* let #inner: ::nnsight::Proxy<#ty> = ::core::convert::Into::into(#value););
                    }
                }
            }
            return quote!(#(#attrs)* let #pat = #value;);
        }
        // A proxy of a tuple destructured: one node per element.
        if let syn::Pat::Tuple(pt) = pat {
            let tmp = self.fresh("tuple", pat.span());
            let mut out = quote!(let #tmp = #value;);
            self.proxies.insert(tmp.to_string());
            for (i, p) in pt.elems.iter().enumerate() {
                if matches!(p, syn::Pat::Rest(_)) {
                    return self.error(p.span(), "destructure a proxy of a tuple element by element (`let (a, b) = pair;`), without `..`");
                }
                if matches!(p, syn::Pat::Wild(_)) {
                    continue;
                }
                let index = syn::Index::from(i);
                let field: Expr = syn::parse_quote_spanned!(p.span()=> #tmp.#index);
                let v = self.lift(&field, None);
                out.extend(self.bind(attrs, p, v, true));
            }
            self.proxies.remove(&tmp.to_string());
            return out;
        }
        self.error(pat.span(), "bind a proxy to one name (`let h = ...;`) or destructure a tuple (`let (a, b) = ...;`)")
    }

    /// True when the statements `rest` assign a value computed from a proxy to `name`.
    fn becomes_proxy(&self, name: &Ident, rest: &[Stmt]) -> bool {
        let mut known = self.proxies.clone();
        // Names that will be bound to proxies further on (a few rounds reach chains of lets).
        for _ in 0..3 {
            let mut v = ProxyLets { model: &self.model, known: known.clone(), found: Vec::new() };
            for s in rest.iter().chain(&self.later) {
                v.visit_stmt(s);
            }
            known.extend(v.found);
        }
        let mut v = AssignsProxy { model: &self.model, known: &known, name: name.to_string(), gates: 0, found: false };
        for s in rest.iter().chain(&self.later) {
            v.visit_stmt(s);
        }
        v.found
    }

    fn expr_stmt(&mut self, e: &Expr) -> TokenStream {
        let left = match e {
            Expr::Assign(a) => Some(&*a.left),
            Expr::Binary(b) if is_compound(&b.op) => Some(&*b.left),
            _ => None,
        };
        if let Some(err) = left.and_then(|l| self.plain_assign_across_gate(l)) {
            return err;
        }
        match e {
            Expr::Assign(a) => self.assign(a),
            Expr::Binary(b) if is_compound(&b.op) && self.mentions(&b.left) => self.compound(b),
            Expr::Binary(b) if is_compound(&b.op) && self.mentions(&b.right) => self.plain_target(&b.left),
            Expr::ForLoop(f) => {
                if let Some(err) = self.loop_over_module_list(f) {
                    return err;
                }
                // `for h in [model.a.output, model.b.output]`: a loop over proxies, run now.
                let literal = match &*f.expr {
                    Expr::Reference(r) => &*r.expr,
                    other => other,
                };
                let items = match literal {
                    Expr::Array(a) => Some(a.elems.iter().cloned().collect::<Vec<_>>()),
                    _ => vec_macro_items(literal),
                };
                let mut over_proxies = false;
                let iter = match items {
                    Some(items) if self.mentions(&f.expr) => {
                        let vals: Vec<(TokenStream, bool)> = items.iter().map(|x| self.value(x)).collect();
                        over_proxies = vals.iter().all(|(_, p)| *p);
                        let vals = vals.into_iter().map(|(v, _)| v);
                        quote!([#(#vals),*])
                    }
                    _ if self.mentions(&f.expr) => {
                        return self.error(f.expr.span(), "cannot loop over a proxy: its value exists only while the model runs; loop over plain values (e.g. `for l in 0..6`)");
                    }
                    _ => f.expr.to_token_stream(),
                };
                let saved = self.proxies.clone();
                let mut names = Vec::new();
                pat_idents(&f.pat, &mut names);
                for n in &names {
                    self.proxies.remove(&n.to_string());
                    if over_proxies && matches!(&*f.pat, syn::Pat::Ident(_)) {
                        self.proxies.insert(n.to_string());
                    }
                    self.declare([n.to_string()]);
                }
                let body = self.block(&f.body);
                self.proxies = saved;
                let (label, pat) = (&f.label, &f.pat);
                quote!(#label for #pat in #iter #body)
            }
            Expr::While(w) => {
                if self.mentions(&w.cond) {
                    return self.error(w.cond.span(), "`while` on a proxy cannot work: the loop runs while the intervention graph is built, before the model runs; use `if` on the proxy inside a loop over plain values");
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
            Expr::Block(b) if invoke_input(b).is_some() => self.nested_invoke(b),
            Expr::MethodCall(m) if m.method == "skip" && m.args.len() == 1 && crate::paths::module_chain_with_methods(&m.receiver, &self.model).is_some() => self.skip(m),
            Expr::Block(b) if b.label.is_none() && b.attrs.is_empty() => self.block(&b.block),
            Expr::If(i) => self.if_stmt(i),
            Expr::Match(m) => self.match_expr(m, false).0,
            _ if inplace_root(e).is_some_and(|r| self.is_proxy_root(r)) => self.inplace(e, false),
            _ if self.mentions(e) => self.value(e).0,
            _ => e.to_token_stream(),
        }
    }

    /// `invoke(input) { stmts }` inside a loop or a block (rewritten by the parser into a
    /// labeled block): a new invoke each time it runs, its statements in that invoke's batch
    /// group. Its variables live in its block (collect values in a variable declared before
    /// the loop).
    fn nested_invoke(&mut self, b: &syn::ExprBlock) -> TokenStream {
        let input = invoke_input(b).expect("checked by the caller").clone();
        if self.in_invoke {
            return self.error(b.span(), "an invoke inside an invoke: invokes are not nested; close the first `invoke(..) { .. }` before the next");
        }
        if !self.gate_scopes.is_empty() {
            return self.error(b.span(), "an invoke under an `if` on a proxy cannot work: whether it runs would be known only while the model runs; decide with plain values");
        }
        self.nested_invokes += 1;
        let g = self.fresh("ginv", b.span());
        let body = syn::Block { brace_token: b.block.brace_token, stmts: b.block.stmts[1..].to_vec() };
        let (prev_group, prev_in) = (self.group.replace(g.clone()), self.in_invoke);
        self.in_invoke = true;
        let body = self.block(&body);
        self.group = prev_group;
        self.in_invoke = prev_in;
        let tr = &self.tr;
        quote_spanned!(b.span()=> { let #g = #tr.invoke(#input); #body })
    }

    /// `model.x.skip(value)`: the module returns `value` (its output type, checked by rustc)
    /// without running its forward, at the call `.next()` / `.at(i)` select.
    fn skip(&mut self, m: &syn::ExprMethodCall) -> TokenStream {
        let tr = self.tr.clone();
        let Some((root, segs)) = crate::paths::module_chain_with_methods(&m.receiver, &self.model) else { return quote!(()) };
        let hp = HookPath { root, segs, point: Point::Output, span: m.method.span(), full_span: m.span() };
        let value = self.swap_value(&m.args[0]);
        let Some((path, call)) = self.module_access(&hp) else { return quote!(()) };
        let Some(group) = self.group_of(&hp) else { return self.outside_invoke(m.span()) };
        let method = format_ident!("skip_with", span = m.method.span());
        quote_spanned! {m.span()=> #tr.#method(#group, #call, #path, |#tr| #value) }
    }

    /// A tail expression: a value, or a statement whose value is `()`.
    fn value_or_stmt(&mut self, e: &Expr) -> (TokenStream, bool) {
        match e {
            Expr::MethodCall(m) if m.method == "skip" && m.args.len() == 1 && crate::paths::module_chain_with_methods(&m.receiver, &self.model).is_some() => {
                (self.skip(m), false)
            }
            Expr::Block(b) if invoke_input(b).is_some() => (self.nested_invoke(b), false),
            Expr::ForLoop(_) | Expr::While(_) | Expr::Loop(_) | Expr::Assign(_) => {
                let t = self.expr_stmt(e);
                (quote!({ #t; }), false)
            }
            Expr::Binary(b) if is_compound(&b.op) => {
                let t = self.expr_stmt(e);
                (quote!({ #t; }), false)
            }
            _ => self.value(e),
        }
    }

    /// The block's own tail: like [`Ctx::value_or_stmt`], and a proxy it returns (alone, or in a
    /// tuple or array) is saved, as its plain value is what the block returns.
    pub fn trace_tail(&mut self, e: &Expr) -> TokenStream {
        let tr = self.tr.clone();
        match e {
            Expr::Paren(p) => {
                let t = self.trace_tail(&p.expr);
                quote!((#t))
            }
            Expr::Tuple(t) => {
                let elems: Vec<TokenStream> = t.elems.iter().map(|x| self.trace_tail(x)).collect();
                quote!((#(#elems,)*))
            }
            Expr::Array(a) => {
                let elems: Vec<TokenStream> = a.elems.iter().map(|x| self.trace_tail(x)).collect();
                quote!([#(#elems),*])
            }
            // A proxy the block returns comes out as its value, as the plain Rust would give.
            _ => match self.value_or_stmt(e) {
                (v, true) => quote_spanned!(e.span()=> { let __nn_v = #v; #tr.save(__nn_v) }),
                (v, false) => v,
            },
        }
    }

    /// A nested block: its own scope for proxy names.
    fn block(&mut self, b: &syn::Block) -> TokenStream {
        self.block_value(b).0
    }

    /// A nested block and whether its value is a proxy.
    fn block_value(&mut self, b: &syn::Block) -> (TokenStream, bool) {
        let (saved, promoted) = (self.proxies.clone(), self.promoted.clone());
        let (stmts, tail) = self.stmts(&b.stmts);
        self.proxies = saved;
        self.promoted = promoted;
        let (tail, is_proxy) = tail.unwrap_or_default();
        (quote!({ #stmts #tail }), is_proxy)
    }

    fn if_stmt(&mut self, i: &syn::ExprIf) -> TokenStream {
        if !self.mentions(&i.cond) {
            let cond = &i.cond;
            let then = self.block(&i.then_branch);
            let els = i.else_branch.as_ref().map(|(_, e)| {
                let t = self.expr_stmt(e);
                quote!(else { #t })
            });
            return quote!(if #cond #then #els);
        }
        let whole = Expr::If(i.clone());
        if matches!(&*i.cond, Expr::Let(_)) || !has_effect(&whole, self) {
            if has_effect(&whole, self) {
                return self.error(i.cond.span(), "`if let` on a proxy cannot gate saves or edits: its pattern is matched while the model runs; test a proxy `bool` with `if` (e.g. `if x.is_some()`), or compute a value with `if let` inside one expression");
            }
            // Nothing but computation: one node runs the whole `if` on the real values.
            self.check_jumps(&[Stmt::Expr(whole.clone(), None)]);
            return self.lift(&whole, None);
        }
        self.check_jumps(&i.then_branch.stmts);
        if let Some((_, e)) = &i.else_branch {
            self.check_jumps(&[Stmt::Expr((**e).clone(), None)]);
        }
        let tr = self.tr.clone();
        let c = self.fresh("cond", i.cond.span());
        let (cond, _) = self.value(&i.cond);
        self.gate_scopes.push(HashSet::new());
        let then = self.block(&i.then_branch);
        self.gate_scopes.pop();
        let els = i.else_branch.as_ref().map(|(_, e)| {
            let nc = self.fresh("not", e.span());
            self.gate_scopes.push(HashSet::new());
            let t = self.expr_stmt(e);
            self.gate_scopes.pop();
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

    /// An `if` whose value is used.
    fn if_value(&mut self, i: &syn::ExprIf) -> (TokenStream, bool) {
        if !self.mentions(&i.cond) {
            let cond = &i.cond;
            let (then, is_proxy) = self.block_value(&i.then_branch);
            let els = i.else_branch.as_ref().map(|(_, e)| {
                let (t, _) = self.value_or_stmt(e);
                quote!(else { #t })
            });
            return (quote!(if #cond #then #els), is_proxy);
        }
        let whole = Expr::If(i.clone());
        if !has_value(&whole) {
            return (self.if_stmt(i), false);
        }
        if has_effect(&whole, self) {
            return (self.error(i.if_token.span, "an `if` on a proxy cannot both give a value and save or edit: the branch is chosen while the model runs; compute the value with an `if` that only computes (`let v = if c { a * 2.0 } else { b };`) and save or edit after it"), false);
        }
        self.check_jumps(&[Stmt::Expr(whole.clone(), None)]);
        (self.lift(&owned_expr(&whole), None), true)
    }

    /// A `match`: on a plain value, arms that read, save and edit at build time; on a proxy,
    /// one node that computes (arms that save or edit are an error).
    fn match_expr(&mut self, m: &syn::ExprMatch, want_value: bool) -> (TokenStream, bool) {
        if self.mentions(&m.expr) {
            let whole = Expr::Match(m.clone());
            if has_effect(&whole, self) {
                return (self.error(m.match_token.span, "a `match` on a proxy cannot save or edit in its arms: the arm is chosen while the model runs; compute a proxy `bool` and use `if` on it, or let the `match` only compute a value"), false);
            }
            self.check_jumps(&[Stmt::Expr(whole.clone(), None)]);
            let whole = if want_value { owned_expr(&whole) } else { whole };
            return (self.lift(&whole, None), want_value);
        }
        let mut arms = Vec::new();
        let mut is_proxy = false;
        for arm in &m.arms {
            if let Some((_, g)) = &arm.guard {
                if self.mentions(g) {
                    return (self.error(g.span(), "a `match` guard cannot read a proxy: use `if` on the proxy inside the arm"), false);
                }
            }
            let (saved, promoted) = (self.proxies.clone(), self.promoted.clone());
            let mut names = Vec::new();
            pat_idents(&arm.pat, &mut names);
            for n in &names {
                self.proxies.remove(&n.to_string());
                self.declare([n.to_string()]);
            }
            let body = if want_value {
                let (b, p) = self.value_or_stmt(&arm.body);
                is_proxy |= p;
                b
            } else {
                let b = self.expr_stmt(&arm.body);
                quote!({ #b; })
            };
            self.proxies = saved;
            self.promoted = promoted;
            let (attrs, pat) = (&arm.attrs, &arm.pat);
            let guard = arm.guard.as_ref().map(|(i, g)| quote!(#i #g));
            arms.push(quote!(#(#attrs)* #pat #guard => #body,));
        }
        let scrutinee = &m.expr;
        (quote!(match #scrutinee { #(#arms)* }), is_proxy)
    }

    /// Errors for `break`, `continue`, `return` and `?` that would leave a branch gated on a
    /// proxy: whether they are taken depends on the model's values, but they would run while
    /// the graph is built.
    fn check_jumps(&mut self, stmts: &[Stmt]) {
        let mut v = Jumps { names: Names { model: &self.model, proxies: &self.proxies }, loops: 0, labels: Vec::new(), found: Vec::new() };
        for s in stmts {
            v.visit_stmt(s);
        }
        let found = v.found;
        for (span, what) in found {
            self.errors.push(syn::Error::new(
                span,
                format!("`{what}` inside an `if` on a proxy cannot work: the `if` is decided while the model runs, but `{what}` would act now, while the block builds the intervention graph (before the model runs). Keep the loop or function going and put the rest under the `if` (or under `if !cond`), or compute what you need with a proxy expression"),
            ));
        }
    }

    /// Whether `root` (a hook point or name) is a proxy.
    fn is_proxy_root(&self, root: &Expr) -> bool {
        hook_path(root, &self.model).is_some() || matches!(root, Expr::Path(p) if p.path.get_ident().is_some_and(|i| self.proxies.contains(&i.to_string())))
    }

    /// An in-place tch method (`h.relu_()`, `model.x.output.mul_(2.0)`, `h.i(..).fill_(0.0)`)
    /// on a proxy: an edit of it. In value position only the direct form (`h.relu_()`), whose
    /// value is the edited tensor.
    fn inplace(&mut self, e: &Expr, value: bool) -> TokenStream {
        let root = inplace_root(e).expect("checked").clone();
        if value {
            let direct = matches!(e, Expr::MethodCall(m) if *m.receiver == root);
            if !direct {
                return self.error(e.span(), "use this in-place call as a statement (`h.i((.., 0)).fill_(0.0);`) and read the edited proxy after it");
            }
        }
        let whole = e.clone();
        let target = root.clone();
        self.edit(&root, e.span(), false, move |t| {
            let mut body = whole;
            ReplaceExpr { target: &target, with: syn::parse_quote!(__nn_v) }.visit_expr_mut(&mut body);
            syn::parse_quote!({
                let mut __nn_v = (&&::nnsight::__private::Owned(::core::cell::Cell::new(::core::option::Option::Some(#t)))).__nn_owned();
                let _ = #body;
                __nn_v
            })
        })
    }

    /// `x op= proxy` or `x = proxy` where `x` is not a proxy: a variable from outside the trace,
    /// or one this block declared in a way that cannot hold a proxy.
    fn plain_target(&mut self, left: &Expr) -> TokenStream {
        let name = match left {
            Expr::Path(p) => p.path.get_ident().map(|i| i.to_string()),
            _ => None,
        };
        match name {
            Some(n) if !self.locals.contains(&n) => self.error(
                left.span(),
                format!("`{n}` is declared outside the trace: the model runs when the block ends, so a value computed from activations cannot be stored into it here. Declare it inside the block (`let mut {n} = ..;`) and return it from the block"),
            ),
            Some(n) => self.error(
                left.span(),
                format!("`{n}` would hold a value computed from activations: declare it with `let mut {n} = <initial value>;` in this block, before the loop or branch that assigns it"),
            ),
            None => self.error(left.span(), "cannot store a value computed from activations here: bind it to a variable of the block (`let v = ..;`) and return that"),
        }
    }

    // ----- assignments ------------------------------------------------------------------

    fn assign(&mut self, a: &syn::ExprAssign) -> TokenStream {
        let tr = self.tr.clone();
        if let Some(hp) = hook_path(&a.left, &self.model) {
            if let Some(err) = self.next_twice(&hp, &a.right) {
                return err;
            }
            let value = self.swap_value(&a.right);
            let Some((path, call)) = self.module_access(&hp) else { return quote!(()) };
            let Some(group) = self.group_of(&hp) else { return self.outside_invoke(hp.full_span) };
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
                return self.edit(&ix.expr, a.span(), false, |t| {
                    syn::parse_quote!({
                        ::nnsight::__private::assign(&#t[#idx], #rhs);
                        (&&::nnsight::__private::Owned(::core::cell::Cell::new(::core::option::Option::Some(#t)))).__nn_owned()
                    })
                });
            }
        }
        if let Expr::Path(p) = &*a.left {
            if p.path.get_ident().is_some_and(|id| self.proxies.contains(&id.to_string())) {
                // Rebinding a proxy name to another proxy (or to a value computed now).
                let (v, is_proxy) = self.value(&a.right);
                let v = if is_proxy { v } else { self.lift(&a.right, None) };
                let v = self.merged(&a.left, v);
                let left = &a.left;
                return quote!(#left = #v);
            }
        }
        if self.mentions(&a.left) {
            return self.error(a.left.span(), "cannot assign to this: assign to a hook point (`model.x.output = ..`), to an indexed proxy (`h[.., 0] = ..`) or to a variable");
        }
        if self.mentions(&a.right) {
            let (v, is_proxy) = self.value(&a.right);
            if is_proxy {
                return self.plain_target(&a.left);
            }
            let left = &a.left;
            return quote!(#left = #v);
        }
        a.to_token_stream()
    }

    /// `m.x.next().output = m.x.next().output * 2.0`: each `.next()` moves the module's cursor
    /// one call on, so this reads one call and writes another. A compile error that says so.
    fn next_twice(&mut self, left: &HookPath, right: &Expr) -> Option<TokenStream> {
        fn moves(hp: &HookPath) -> bool {
            hp.segs.iter().any(|s| matches!(s, Seg::Next(_)))
        }
        fn module(hp: &HookPath) -> String {
            hp.segs
                .iter()
                .map(|s| match s {
                    Seg::Field(f) => f.to_string(),
                    Seg::Index(i) => format!("[{}]", i.to_token_stream()),
                    Seg::Method(m) => format!("{}({})", m.method, m.args.to_token_stream()),
                    _ => String::new(),
                })
                .collect::<Vec<_>>()
                .join(".")
        }
        struct V<'a> {
            model: &'a Ident,
            out: Option<HookPath>,
        }
        impl<'ast> Visit<'ast> for V<'_> {
            fn visit_expr(&mut self, e: &'ast Expr) {
                if let Some(hp) = hook_path(e, self.model) {
                    if moves(&hp) && self.out.is_none() {
                        self.out = Some(hp);
                    }
                    return;
                }
                visit::visit_expr(self, e);
            }
        }
        if !moves(left) {
            return None;
        }
        let mut v = V { model: &self.model, out: None };
        v.visit_expr(right);
        let read = v.out?;
        if module(&read) != module(left) {
            return None;
        }
        Some(self.error(
            read.full_span,
            "each `.next()` moves this module's cursor one call on, so this statement would read one call and write the next. Move once, then use the current call: `let h = m.x.next().output; m.x.output = h * 2.0;` (after one `.next()`, `m.x.output` is that same call), or name the call on both sides with `.at(i)`",
        ))
    }

    /// `target op= rhs` on a proxy (or an indexed proxy): an in-place edit; a proxy name is
    /// rebound to the edited value (numbers are not edited in place).
    fn compound(&mut self, b: &syn::ExprBinary) -> TokenStream {
        let (op, rhs) = (&b.op, &b.right);
        let (target, idx) = match &*b.left {
            Expr::Index(ix) => (&*ix.expr, Some(&ix.index)),
            other => (other, None),
        };
        let rebind = idx.is_none() && matches!(target, Expr::Path(_));
        self.edit(target, b.span(), rebind, |t| match idx {
            Some(idx) => syn::parse_quote!({
                let mut __nn_view = ::nnsight::__private::view(&#t[#idx]);
                __nn_view #op #rhs;
                (&&::nnsight::__private::Owned(::core::cell::Cell::new(::core::option::Option::Some(#t)))).__nn_owned()
            }),
            None => syn::parse_quote!({
                let mut __nn_v = (&&::nnsight::__private::Owned(::core::cell::Cell::new(::core::option::Option::Some(#t)))).__nn_owned();
                __nn_v #op #rhs;
                __nn_v
            }),
        })
    }

    /// An edit node over `target` whose body `make_body(target_name)` changes it in place and
    /// gives its value afterwards. `rebind`: the target is a name, bound to the edit after it.
    /// The block's value is the edit node.
    fn edit(&mut self, target: &Expr, span: Span, rebind: bool, make_body: impl FnOnce(&Ident) -> Expr) -> TokenStream {
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
        let rebind = if rebind {
            let v = self.merged(target, quote!(#e));
            Some(quote!(#target = #v;))
        } else {
            None
        };
        quote_spanned! {span=> {
            let #t = #t_val;
            let #e = #lifted;
            #tr.edits(#t, #e);
            #rebind
            #e
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
        match e {
            Expr::If(i) => return self.if_value(i),
            Expr::Match(m) => return self.match_expr(m, true),
            Expr::Block(b) if b.label.is_none() && b.attrs.is_empty() => return self.block_value(&b.block),
            _ => {}
        }
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
            Expr::Reference(r) => {
                let (v, is_proxy) = self.value(&r.expr);
                if is_proxy {
                    // A proxy is a handle: `&h` is `h`.
                    (v, true)
                } else {
                    let m = &r.mutability;
                    (quote!(&#m #v), false)
                }
            }
            Expr::Field(f) if grad_field(e).is_some() => (self.grad_of(f), true),
            Expr::MethodCall(m) if crate::scan::is_save_like(&m.method) && m.args.is_empty() => {
                // Also on a proxy the macro cannot see (`hs[0].save()`): rustc checks it is one.
                let (r, _) = self.value(&m.receiver);
                let method = &m.method;
                // `.save_if_ran()` gives a `SavedIfRan`, not a proxy: nothing more is computed on it.
                let is_proxy = m.method != "save_if_ran";
                (quote_spanned!(m.method.span()=> { let __nn_recv = #r; #tr.#method(__nn_recv) }), is_proxy)
            }
            Expr::MethodCall(m) if m.method == "backward" => {
                self.grad = true;
                (self.lift(e, None), true)
            }
            _ if inplace_root(e).is_some_and(|r| self.is_proxy_root(r)) => (self.inplace(e, true), true),
            Expr::Closure(c) if builds_graph(e, &self.model) => (self.closure(c), false),
            Expr::MethodCall(m) if build_time_chain(e, &self.model) => {
                let recv = if build_time_chain(&m.receiver, &self.model) || !self.mentions(&m.receiver) {
                    self.value(&m.receiver).0
                } else {
                    return (self.error(m.receiver.span(), "a closure that reads hook points runs while the graph is built: call it on plain values (e.g. `(0..6).map(|l| ..)`), not on a proxy"), false);
                };
                let args: Vec<TokenStream> = m.args.iter().map(|a| self.value(a).0).collect();
                let (method, turbofish) = (&m.method, &m.turbofish);
                (quote!(#recv.#method #turbofish (#(#args),*)), false)
            }
            Expr::Call(c) if is_constructor(&c.func) => {
                // `Some(h)`, `Pair(a, b)`: built now, around the proxies.
                let args: Vec<TokenStream> = c.args.iter().map(|a| self.value(a).0).collect();
                let func = &c.func;
                (quote!(#func(#(#args),*)), false)
            }
            Expr::Call(c) if c.args.iter().any(|a| builds_graph(a, &self.model)) => {
                let args: Vec<TokenStream> = c.args.iter().map(|a| self.value(a).0).collect();
                let func = &c.func;
                (quote!(#func(#(#args),*)), false)
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
            Expr::Struct(s) if s.fields.iter().any(|f| self.mentions(&f.expr)) && s.rest.is_none() => {
                let fields: Vec<TokenStream> = s
                    .fields
                    .iter()
                    .map(|f| {
                        let (attrs, member) = (&f.attrs, &f.member);
                        let v = self.value(&f.expr).0;
                        quote!(#(#attrs)* #member: #v)
                    })
                    .collect();
                let path = &s.path;
                (quote!(#path { #(#fields),* }), false)
            }
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

    /// `for layer in model.encoder.layer.iter() { layer.output.. }` (Python's habit): the loop
    /// variable is the module itself, not a path `trace!` can hook. A compile error that shows
    /// the indexed form, when the body reads a hook point of the loop variable.
    fn loop_over_module_list(&mut self, f: &syn::ExprForLoop) -> Option<TokenStream> {
        let mut list = &*f.expr;
        loop {
            list = match list {
                Expr::Reference(r) => &r.expr,
                Expr::Paren(p) => &p.expr,
                Expr::MethodCall(m) if matches!(m.method.to_string().as_str(), "iter" | "into_iter" | "enumerate" | "skip" | "take" | "rev") => &m.receiver,
                _ => break,
            };
        }
        module_chain(list, &self.model)?;
        let mut names = Vec::new();
        pat_idents(&f.pat, &mut names);
        struct V<'a> {
            names: &'a [Ident],
            found: Option<Span>,
        }
        impl<'ast> Visit<'ast> for V<'_> {
            fn visit_expr_field(&mut self, e: &'ast syn::ExprField) {
                if crate::paths::point_of(&e.member).is_some() {
                    if let Expr::Path(p) = &*e.base {
                        if p.path.get_ident().is_some_and(|i| self.names.contains(i)) && self.found.is_none() {
                            self.found = Some(e.member.span());
                        }
                    }
                }
                visit::visit_expr_field(self, e);
            }
        }
        let mut v = V { names: &names, found: None };
        v.visit_block(&f.body);
        let span = v.found?;
        let list = list.to_token_stream().to_string().replace(' ', "");
        Some(self.error(
            span,
            format!("hook points are read through module paths, not module values: loop over indices, `for l in 0..{list}.len() {{ .. {list}[l].output .. }}`"),
        ))
    }

    /// A closure that reads hook points or saves: it runs while the graph is built (called by
    /// `map`, `for_each`, ... on plain values), its body translated like the block's.
    fn closure(&mut self, c: &syn::ExprClosure) -> TokenStream {
        let (saved, promoted) = (self.proxies.clone(), self.promoted.clone());
        for p in &c.inputs {
            let mut names = Vec::new();
            pat_idents(p, &mut names);
            for n in &names {
                self.proxies.remove(&n.to_string());
                self.declare([n.to_string()]);
            }
        }
        let body = match &*c.body {
            Expr::Block(b) if b.label.is_none() => self.block(&b.block),
            other => self.value(other).0,
        };
        self.proxies = saved;
        self.promoted = promoted;
        let (inputs, output) = (&c.inputs, &c.output);
        // Not `move`: the closure borrows the tracer while it builds.
        quote_spanned!(c.or1_token.span=> |#inputs| #output { #body })
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

    /// The batch group of a hook path: a helper module's (`Group::HELPER`: its calls see the
    /// rows they were given), else the invoke's (or every row's outside the invokes).
    fn group_of(&self, hp: &HookPath) -> Option<TokenStream> {
        if hp.root != self.model {
            return Some(quote!(::nnsight::Group::HELPER));
        }
        self.group.as_ref().map(|g| quote!(#g))
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
                Seg::Method(m) => {
                    // The method returns `&Module` or `Result<&Module>`: `*` makes the module the
                    // place (as for indices), an error becomes the trace's.
                    let (method, turbofish, args) = (&m.method, &m.turbofish, &m.args);
                    expr = quote_spanned!(m.method.span()=> (*::nnsight::__private::seg(#expr.#method #turbofish (#args))?));
                }
                Seg::Index(ix) => {
                    let sp = ix.span();
                    expr = quote_spanned!(sp=> (*::nnsight::ModuleList::module_at(&#expr, ::nnsight::__private::IndexArg::into_i64(#ix))?));
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
        let Some(group) = self.group_of(hp) else { return self.outside_invoke(hp.full_span) };
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

/// The input of an invoke written inside a loop or block (the labeled block
/// `'__nn_invoke: { __nn_invoke_input(input); .. }` of [`crate::ast::INVOKE_LABEL`]).
pub(crate) fn invoke_input(b: &syn::ExprBlock) -> Option<&Expr> {
    if b.label.as_ref().is_none_or(|l| l.name.ident != crate::ast::INVOKE_LABEL) {
        return None;
    }
    match b.block.stmts.first() {
        Some(Stmt::Expr(Expr::Call(c), _)) if matches!(&*c.func, Expr::Path(p) if p.path.is_ident(crate::ast::INVOKE_INPUT)) => {
            c.args.first()
        }
        _ => None,
    }
}

/// `x.grad`.
pub(crate) fn grad_field(e: &Expr) -> Option<&syn::ExprField> {
    match e {
        Expr::Field(f) if matches!(&f.member, syn::Member::Named(id) if id == "grad") => Some(f),
        _ => None,
    }
}

struct PatElems<'a>(&'a syn::punctuated::Punctuated<syn::Pat, syn::Token![,]>);
struct ExprElems<'a>(&'a syn::punctuated::Punctuated<Expr, syn::Token![,]>);
impl PatElems<'_> {
    fn iter(&self) -> impl Iterator<Item = &syn::Pat> {
        self.0.iter()
    }
}
impl ExprElems<'_> {
    fn iter(&self) -> impl Iterator<Item = &Expr> {
        self.0.iter()
    }
}

/// `Proxy<..>` or `Saved<..>` written by the user.
fn is_proxy_type(t: &syn::Type) -> bool {
    matches!(t, syn::Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Proxy" || s.ident == "Saved"))
}

/// `e`'s value owned: a tensor reference (a node argument) becomes a handle sharing storage.
fn owned_expr(e: &Expr) -> Expr {
    syn::parse_quote_spanned!(e.span()=> (&&::nnsight::__private::Owned(::core::cell::Cell::new(::core::option::Option::Some(#e)))).__nn_owned())
}

/// The proxy or hook point an in-place tch method call (`name_`) changes: the end of its
/// receiver chain (`h` in `h.i((.., 0)).fill_(0.0)`).
pub(crate) fn inplace_root(e: &Expr) -> Option<&Expr> {
    let Expr::MethodCall(m) = e else { return None };
    let name = m.method.to_string();
    if !name.ends_with('_') || name.starts_with('_') || name.starts_with("f_") {
        return None;
    }
    let mut r = &*m.receiver;
    loop {
        match r {
            Expr::MethodCall(inner) if !matches!(inner.method.to_string().as_str(), "output" | "input" | "inputs") => {
                if inner.method == "next" || inner.method == "at" {
                    return Some(r);
                }
                r = &inner.receiver
            }
            Expr::Paren(p) => r = &p.expr,
            Expr::Index(ix) => r = &ix.expr,
            _ => return Some(r),
        }
    }
}

/// Replaces one sub-expression (compared by tokens) with another.
struct ReplaceExpr<'a> {
    target: &'a Expr,
    with: Expr,
}

impl VisitMut for ReplaceExpr<'_> {
    fn visit_expr_mut(&mut self, e: &mut Expr) {
        if e.to_token_stream().to_string() == self.target.to_token_stream().to_string() {
            *e = self.with.clone();
            return;
        }
        visit_mut::visit_expr_mut(self, e);
    }
}

/// True for a closure (or a call/method chain handing one over) whose body reads hook points,
/// saves or edits: it must run while the graph is built.
pub(crate) fn builds_graph(e: &Expr, model: &Ident) -> bool {
    match e {
        Expr::Closure(c) => {
            struct V<'a> {
                model: &'a Ident,
                found: bool,
            }
            impl<'ast> Visit<'ast> for V<'_> {
                fn visit_expr(&mut self, e: &'ast Expr) {
                    if hook_path(e, self.model).is_some() {
                        self.found = true;
                    }
                    if let Expr::MethodCall(m) = e {
                        if crate::scan::is_save_like(&m.method) {
                            self.found = true;
                        }
                    }
                    if !self.found {
                        visit::visit_expr(self, e);
                    }
                }
            }
            let mut v = V { model, found: false };
            v.visit_expr(&c.body);
            v.found
        }
        Expr::Paren(p) => builds_graph(&p.expr, model),
        Expr::Reference(r) => builds_graph(&r.expr, model),
        _ => false,
    }
}

/// A method chain on plain values that hands a graph-building closure over:
/// `(0..6).map(|l| model.layer[l].output.save()).collect::<Vec<_>>()`.
pub(crate) fn build_time_chain(e: &Expr, model: &Ident) -> bool {
    match e {
        Expr::MethodCall(m) => m.args.iter().any(|a| builds_graph(a, model)) || build_time_chain(&m.receiver, model),
        Expr::Paren(p) => build_time_chain(&p.expr, model),
        _ => false,
    }
}

/// True when the `if`/`match`/block does something to the graph besides computing: saves,
/// stops, swaps, edits, `backward`, or stores proxies in a collection.
pub(crate) fn has_effect(e: &Expr, ctx: &Ctx) -> bool {
    struct V<'a> {
        ctx: &'a Ctx,
        found: bool,
    }
    impl<'ast> Visit<'ast> for V<'_> {
        fn visit_expr(&mut self, e: &'ast Expr) {
            match e {
                Expr::Assign(_) => self.found = true,
                Expr::Binary(b) if is_compound(&b.op) => self.found = true,
                Expr::MethodCall(m) => {
                    let n = m.method.to_string();
                    if matches!(n.as_str(), "save" | "save_if_ran" | "stop" | "backward") || BUILD_TIME_METHODS.contains(&n.as_str()) {
                        self.found = true;
                    }
                    if inplace_root(e).is_some_and(|r| self.ctx.is_proxy_root(r)) {
                        self.found = true;
                    }
                    if n == "skip" && crate::paths::module_chain_with_methods(&m.receiver, &self.ctx.model).is_some() {
                        self.found = true;
                    }
                }
                Expr::Closure(_) => return,
                _ => {}
            }
            if !self.found {
                visit::visit_expr(self, e);
            }
        }
    }
    let mut v = V { ctx, found: false };
    v.visit_expr(e);
    v.found
}

/// True when an `if`/`match` gives a value other than `()` (judged by its branches' tails).
pub(crate) fn has_value(e: &Expr) -> bool {
    fn block(b: &syn::Block) -> bool {
        match b.stmts.last() {
            Some(Stmt::Expr(e, None)) => has_value(e),
            _ => false,
        }
    }
    match e {
        Expr::If(i) => match &i.else_branch {
            None => false,
            Some((_, els)) => block(&i.then_branch) || has_value(els),
        },
        Expr::Block(b) => block(&b.block),
        Expr::Match(m) => m.arms.iter().any(|a| has_value(&a.body)),
        Expr::Assign(_) | Expr::ForLoop(_) | Expr::While(_) | Expr::Loop(_) => false,
        Expr::Tuple(t) if t.elems.is_empty() => false,
        Expr::Binary(b) if is_compound(&b.op) => false,
        Expr::Macro(m) => !["println", "print", "eprintln", "eprint", "assert", "assert_eq", "assert_ne"].iter().any(|n| m.mac.path.is_ident(n)),
        Expr::MethodCall(m) => !BUILD_TIME_METHODS.contains(&m.method.to_string().as_str()),
        _ => true,
    }
}

/// Finds jumps that leave the statements: `return`, `?`, and `break`/`continue` outside the
/// loops inside them (closures are their own world).
struct Jumps<'a> {
    names: Names<'a>,
    loops: usize,
    labels: Vec<String>,
    found: Vec<(Span, &'static str)>,
}

impl<'ast> Visit<'ast> for Jumps<'_> {
    fn visit_expr(&mut self, e: &'ast Expr) {
        let label = |l: &Option<syn::Label>| l.as_ref().map(|l| l.name.ident.to_string());
        match e {
            Expr::Closure(_) | Expr::Async(_) => {}
            Expr::ForLoop(syn::ExprForLoop { label: l, .. }) | Expr::While(syn::ExprWhile { label: l, .. }) | Expr::Loop(syn::ExprLoop { label: l, .. }) => {
                self.loops += 1;
                if let Some(l) = label(l) {
                    self.labels.push(l);
                }
                visit::visit_expr(self, e);
                self.loops -= 1;
                if label(l).is_some() {
                    self.labels.pop();
                }
            }
            Expr::Block(b) if b.label.is_some() => {
                self.labels.push(b.label.as_ref().unwrap().name.ident.to_string());
                visit::visit_expr(self, e);
                self.labels.pop();
            }
            Expr::Break(b) => {
                let escapes = match &b.label {
                    Some(l) => !self.labels.contains(&l.ident.to_string()),
                    None => self.loops == 0,
                };
                if escapes {
                    self.found.push((b.break_token.span, "break"));
                }
                visit::visit_expr(self, e);
            }
            Expr::Continue(c) => {
                let escapes = match &c.label {
                    Some(l) => !self.labels.contains(&l.ident.to_string()),
                    None => self.loops == 0,
                };
                if escapes {
                    self.found.push((c.continue_token.span, "continue"));
                }
            }
            Expr::Return(r) => {
                self.found.push((r.return_token.span, "return"));
                visit::visit_expr(self, e);
            }
            // A `?` on a value computed from activations is part of a node (an error of the
            // trace); one on a plain value would return now.
            Expr::Try(t) if !mentions_proxy(&t.expr, &self.names) => {
                self.found.push((t.question_token.span, "?"));
                visit::visit_expr(self, e);
            }
            _ => visit::visit_expr(self, e),
        }
    }
    fn visit_item(&mut self, _: &'ast syn::Item) {}
}

/// Collects names let-bound to values that mention hook points or `known` proxies.
struct ProxyLets<'a> {
    model: &'a Ident,
    known: HashSet<String>,
    found: Vec<String>,
}

impl<'ast> Visit<'ast> for ProxyLets<'_> {
    fn visit_local(&mut self, l: &'ast syn::Local) {
        if let Some(init) = &l.init {
            if mentions_proxy(&init.expr, &Names { model: self.model, proxies: &self.known }) {
                let mut names = Vec::new();
                pat_idents(&l.pat, &mut names);
                self.found.extend(names.into_iter().map(|n| n.to_string()));
            }
        }
        visit::visit_local(self, l);
    }
}

/// Finds `name = <value computed from a proxy>` or `name op= ..` of one, or any assignment to
/// `name` under an `if` on a proxy.
struct AssignsProxy<'a> {
    model: &'a Ident,
    known: &'a HashSet<String>,
    name: String,
    /// Depth of `if`s on a proxy around the visited expression.
    gates: usize,
    found: bool,
}

impl<'ast> Visit<'ast> for AssignsProxy<'_> {
    fn visit_expr(&mut self, e: &'ast Expr) {
        let names = Names { model: self.model, proxies: self.known };
        if let Expr::If(i) = e {
            if mentions_proxy(&i.cond, &names) {
                self.gates += 1;
                visit::visit_expr(self, e);
                self.gates -= 1;
                return;
            }
        }
        let (left, right) = match e {
            Expr::Assign(a) => (Some(&*a.left), Some(&*a.right)),
            Expr::Binary(b) if is_compound(&b.op) => (Some(&*b.left), Some(&*b.right)),
            _ => (None, None),
        };
        if let (Some(Expr::Path(p)), Some(r)) = (left, right) {
            if p.path.is_ident(&self.name) && (self.gates > 0 || (mentions_proxy(r, &names) && computes(r))) {
                self.found = true;
            }
        }
        visit::visit_expr(self, e);
    }
}

/// True when a value that mentions proxies is computed from them (one node), rather than
/// built around them now (`Some(h)`, `(a, b)`, `vec![..]`, a struct, `h.save()`).
fn computes(e: &Expr) -> bool {
    match e {
        Expr::Tuple(_) | Expr::Array(_) | Expr::Struct(_) => false,
        Expr::Macro(m) if m.mac.path.is_ident("vec") => false,
        Expr::Call(c) => !is_constructor(&c.func),
        Expr::MethodCall(m) => !crate::scan::is_save_like(&m.method),
        Expr::Paren(p) => computes(&p.expr),
        _ => true,
    }
}

/// `Some`, `Ok`, `MyStruct`, `Enum::Variant`: a path whose last segment starts uppercase.
fn is_constructor(func: &Expr) -> bool {
    matches!(func, Expr::Path(p) if p.path.segments.last().is_some_and(|s| s.ident.to_string().starts_with(|c: char| c.is_uppercase())))
}

fn is_compound(op: &syn::BinOp) -> bool {
    use syn::BinOp::*;
    matches!(op, AddAssign(_) | SubAssign(_) | MulAssign(_) | DivAssign(_) | RemAssign(_) | BitAndAssign(_) | BitOrAssign(_) | BitXorAssign(_) | ShlAssign(_) | ShrAssign(_))
}
