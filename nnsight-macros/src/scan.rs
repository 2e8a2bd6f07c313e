//! Read-only questions about expressions: does it mention a proxy, which names does it use or
//! bind, does it call `.backward()`.

use std::collections::HashSet;

use syn::visit::{self, Visit};
use syn::{Expr, Ident, Pat};

use crate::paths::hook_path;

/// Names the block bound to proxies, and the traced model's name.
pub struct Names<'a> {
    pub model: &'a Ident,
    pub proxies: &'a HashSet<String>,
}

/// True when `e` contains a hook point or a proxy name (also inside `vec![..]`).
pub fn mentions_proxy(e: &Expr, names: &Names) -> bool {
    struct V<'a, 'b> {
        names: &'a Names<'b>,
        found: bool,
    }
    impl<'ast> Visit<'ast> for V<'_, '_> {
        fn visit_expr(&mut self, e: &'ast Expr) {
            if self.found {
                return;
            }
            if hook_path(e, self.names.model).is_some() {
                self.found = true;
                return;
            }
            if let Expr::Path(p) = e {
                if let Some(id) = p.path.get_ident() {
                    if self.names.proxies.contains(&id.to_string()) {
                        self.found = true;
                        return;
                    }
                }
            }
            if let Some(items) = macro_args(e) {
                for it in &items {
                    self.visit_expr(it);
                }
                return;
            }
            // `.save()` is always on a proxy (tch's `save` takes a path), seen or not.
            if let Expr::MethodCall(m) = e {
                if is_save_like(&m.method) && m.args.is_empty() {
                    self.found = true;
                    return;
                }
            }
            visit::visit_expr(self, e);
        }
    }
    let mut v = V { names, found: false };
    v.visit_expr(e);
    v.found
}

/// Macros whose arguments are comma-separated expressions: `vec![..]` and the format-like ones.
const EXPR_MACROS: &[&str] = &["vec", "println", "print", "eprintln", "eprint", "format", "assert", "assert_eq", "assert_ne", "panic", "dbg"];

/// The argument expressions of `vec![a, b]`, `println!("{}", a)` and the like.
pub fn macro_args(e: &Expr) -> Option<Vec<Expr>> {
    let Expr::Macro(m) = e else { return None };
    if !EXPR_MACROS.iter().any(|name| m.mac.path.is_ident(name)) {
        return None;
    }
    let parsed = m
        .mac
        .parse_body_with(syn::punctuated::Punctuated::<Expr, syn::Token![,]>::parse_terminated)
        .ok()?;
    Some(parsed.into_iter().collect())
}

/// The elements of a `vec![a, b, ..]` expression.
pub fn vec_macro_items(e: &Expr) -> Option<Vec<Expr>> {
    match e {
        Expr::Macro(m) if m.mac.path.is_ident("vec") => macro_args(e),
        _ => None,
    }
}

/// True when `e` calls a method named `backward` anywhere.
pub fn calls_backward(e: &Expr) -> bool {
    struct V(bool);
    impl<'ast> Visit<'ast> for V {
        fn visit_expr_method_call(&mut self, m: &'ast syn::ExprMethodCall) {
            if m.method == "backward" || m.method == "run_backward" {
                self.0 = true;
            }
            visit::visit_expr_method_call(self, m);
        }
        fn visit_expr_call(&mut self, c: &'ast syn::ExprCall) {
            if let Expr::Path(p) = &*c.func {
                if p.path.segments.last().is_some_and(|s| s.ident == "backward" || s.ident == "run_backward") {
                    self.0 = true;
                }
            }
            visit::visit_expr_call(self, c);
        }
    }
    let mut v = V(false);
    v.visit_expr(e);
    v.0
}

/// Identifiers bound by a pattern.
pub fn pat_idents(p: &Pat, out: &mut Vec<Ident>) {
    struct V<'a>(&'a mut Vec<Ident>);
    impl<'ast> Visit<'ast> for V<'_> {
        fn visit_pat_ident(&mut self, i: &'ast syn::PatIdent) {
            self.0.push(i.ident.clone());
            visit::visit_pat_ident(self, i);
        }
    }
    V(out).visit_pat(p);
}

/// Free variables an expression uses that a `move` closure would capture: single lowercase
/// identifiers in value position, minus names bound inside the expression and minus `skip`.
pub fn free_idents(e: &Expr, skip: &HashSet<String>) -> Vec<Ident> {
    struct V<'a> {
        bound: HashSet<String>,
        skip: &'a HashSet<String>,
        seen: HashSet<String>,
        out: Vec<Ident>,
    }
    impl<'ast> Visit<'ast> for V<'_> {
        fn visit_pat(&mut self, p: &'ast Pat) {
            let mut ids = Vec::new();
            pat_idents(p, &mut ids);
            self.bound.extend(ids.into_iter().map(|i| i.to_string()));
            visit::visit_pat(self, p);
        }
        fn visit_expr_path(&mut self, p: &'ast syn::ExprPath) {
            if let Some(id) = p.path.get_ident() {
                let s = id.to_string();
                // Any case: `W` is as much a variable as `w`. Constructors of the prelude are not.
                let prelude = matches!(s.as_str(), "self" | "Self" | "None" | "Some" | "Ok" | "Err");
                if p.qself.is_none() && !prelude && !self.bound.contains(&s) && !self.skip.contains(&s) && self.seen.insert(s) {
                    self.out.push(id.clone());
                }
            }
        }
        fn visit_expr_call(&mut self, c: &'ast syn::ExprCall) {
            // A function called by name (`nrm(h)`) is not captured: it may be generic.
            if !matches!(&*c.func, Expr::Path(p) if p.path.get_ident().is_some()) {
                self.visit_expr(&c.func);
            }
            for a in &c.args {
                self.visit_expr(a);
            }
        }
        fn visit_expr_macro(&mut self, m: &'ast syn::ExprMacro) {
            if let Some(items) = macro_args(&Expr::Macro(m.clone())) {
                for it in &items {
                    self.visit_expr(it);
                }
                return;
            }
            // Other macros (`format!`, `println!`): any lowercase identifier not after `.`/`::`
            // may be a variable; capturing an extra name is harmless, missing one would move it.
            let mut prev_dot = false;
            let tokens: Vec<proc_macro2::TokenTree> = m.mac.tokens.clone().into_iter().collect();
            for (i, tt) in tokens.iter().enumerate() {
                match tt {
                    proc_macro2::TokenTree::Ident(id) => {
                        let s = id.to_string();
                        let lower = s.chars().next().is_some_and(|c| c.is_lowercase() || c == '_');
                        let is_macro = matches!(tokens.get(i + 1), Some(proc_macro2::TokenTree::Punct(p)) if p.as_char() == '!');
                        if !prev_dot && !is_macro && lower && s != "self" && !self.bound.contains(&s) && !self.skip.contains(&s) && self.seen.insert(s) {
                            self.out.push(id.clone());
                        }
                        prev_dot = false;
                    }
                    proc_macro2::TokenTree::Punct(p) => prev_dot = p.as_char() == '.' || p.as_char() == ':',
                    _ => prev_dot = false,
                }
            }
        }
    }
    let mut v = V { bound: HashSet::new(), skip, seen: HashSet::new(), out: Vec::new() };
    // Names bound anywhere inside (closure parameters, lets, loop and match patterns) first.
    struct B<'a>(&'a mut HashSet<String>);
    impl<'ast> Visit<'ast> for B<'_> {
        fn visit_pat(&mut self, p: &'ast Pat) {
            let mut ids = Vec::new();
            pat_idents(p, &mut ids);
            self.0.extend(ids.into_iter().map(|i| i.to_string()));
        }
    }
    B(&mut v.bound).visit_expr(e);
    v.visit_expr(e);
    v.out
}

/// `.save()`, `.save_if_ran()` and `.stop()`: always on a proxy, whether the macro sees one or not.
pub fn is_save_like(method: &syn::Ident) -> bool {
    method == "save" || method == "stop" || method == "save_if_ran"
}
