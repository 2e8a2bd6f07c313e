//! Format strings with inline arguments (`println!("{h:?}")`, `{n:.3}`, `{x:w$}`): the names
//! they use are made explicit (`println!("{h:?}", h = h)`) before the block is translated, so
//! a proxy named only inside a string is seen, and printed with its real value at run time.

use std::collections::HashSet;

use proc_macro2::TokenStream;
use quote::quote;
use syn::punctuated::Punctuated;
use syn::visit_mut::{self, VisitMut};
use syn::{Expr, Stmt, Token};

/// Format macros and the position of their format string.
const FORMAT_MACROS: &[(&str, usize)] =
    &[("println", 0), ("print", 0), ("eprintln", 0), ("eprint", 0), ("format", 0), ("panic", 0), ("write", 1), ("writeln", 1)];

/// Rewrites every format macro in `stmts`.
pub fn explicit_format_args(stmts: &mut [Stmt]) {
    for s in stmts {
        Rewrite.visit_stmt_mut(s);
    }
}

struct Rewrite;

impl VisitMut for Rewrite {
    fn visit_macro_mut(&mut self, m: &mut syn::Macro) {
        let Some(&(_, pos)) = FORMAT_MACROS.iter().find(|(n, _)| m.path.is_ident(n)) else { return };
        let Ok(mut args) = m.parse_body_with(Punctuated::<Expr, Token![,]>::parse_terminated) else { return };
        for a in args.iter_mut() {
            self.visit_expr_mut(a);
        }
        let Some(Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(fmt), .. })) = args.iter().nth(pos) else {
            m.tokens = quote!(#args);
            return;
        };
        let mut named: HashSet<String> = args
            .iter()
            .filter_map(|a| match a {
                Expr::Assign(a) => match &*a.left {
                    Expr::Path(p) => p.path.get_ident().map(|i| i.to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let span = fmt.span();
        let mut extra: Vec<TokenStream> = Vec::new();
        for name in inline_names(&fmt.value()) {
            if named.insert(name.clone()) {
                let id = syn::Ident::new(&name, span);
                extra.push(quote!(#id = #id));
            }
        }
        if !args.empty_or_trailing() {
            args.push_punct(Default::default());
        }
        m.tokens = quote!(#args #(#extra),*);
    }

    fn visit_expr_mut(&mut self, e: &mut Expr) {
        visit_mut::visit_expr_mut(self, e);
    }
}

/// The variable names a format string uses inline: `{name}`, `{name:..}`, and `name$` in a
/// width or precision.
fn inline_names(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '{' {
            if chars.get(i + 1) == Some(&'{') {
                i += 2;
                continue;
            }
            let end = chars[i..].iter().position(|&c| c == '}').map_or(chars.len(), |p| i + p);
            let inner: String = chars[i + 1..end].iter().collect();
            let (arg, spec) = inner.split_once(':').unwrap_or((inner.as_str(), ""));
            if is_ident(arg.trim()) {
                out.push(arg.trim().to_string());
            }
            // `name$` in the spec.
            for part in spec.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$')) {
                if let Some(name) = part.strip_suffix('$') {
                    if is_ident(name) {
                        out.push(name.to_string());
                    }
                }
            }
            i = end + 1;
        } else {
            i += 1;
        }
    }
    out
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_alphabetic() || f == '_') && c.all(|c| c.is_alphanumeric() || c == '_') && s != "_"
}

#[cfg(test)]
mod tests {
    use super::inline_names;

    #[test]
    fn names_in_format_strings() {
        assert_eq!(inline_names("{h:?} {} {0} {{x}} {n:.3} {v:w$.p$}"), ["h", "n", "v", "w", "p"]);
    }
}
