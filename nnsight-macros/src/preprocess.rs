//! Token-level rewrite before parsing: `x[.., 0]` is not Rust syntax, but it is how tensor
//! indexing reads in Python and in the design's examples. An index bracket (one that follows an
//! identifier or a closing `)`/`]`) with top-level commas gets its contents wrapped in
//! parentheses, `x[(.., 0)]`, which syn parses as an index by a tuple (tch's `IndexOp` form).

use proc_macro2::{Delimiter, Group, TokenStream, TokenTree};

const KEYWORDS: &[&str] = &[
    "in", "return", "break", "else", "match", "if", "while", "for", "let", "mut", "ref", "as", "move", "loop",
    "unsafe", "async", "where", "yield", "continue", "static", "const", "dyn", "impl",
];

/// Applies the rewrite to every bracket group in `tokens`, recursively. Python spellings that
/// are not Rust get an error that teaches the Rust one: a slice `x[:, 0]` and a module named
/// `self` (`attention.self`).
pub fn wrap_index_commas(tokens: TokenStream) -> syn::Result<TokenStream> {
    let mut out = Vec::new();
    let mut prev_is_expr_end = false;
    let mut prev_dot = false;
    for tt in tokens {
        if let TokenTree::Ident(i) = &tt {
            if prev_dot && i == "self" {
                return Err(syn::Error::new(i.span(), "a module named `self` (Python's `attention.self`) is spelled `self_` in Rust, where `self` is a keyword: `model.encoder.layer[0].attention.self_.query.output`"));
            }
        }
        prev_dot = matches!(&tt, TokenTree::Punct(p) if p.as_char() == '.');
        let next_is_expr_end;
        let tt = match tt {
            TokenTree::Group(g) => {
                let inner = wrap_index_commas(g.stream())?;
                if g.delimiter() == Delimiter::Bracket && prev_is_expr_end {
                    if let Some(span) = python_slice_colon(&inner) {
                        return Err(syn::Error::new(span, "Python slice syntax: in Rust a range is written with `..`: `x[.., 0]` for `x[:, 0]`, `x[1..3]` for `x[1:3]`; for `x[:-1]` write `x[..n - 1]` with the length `n` (a negative range end gives an empty slice in tch; see the README's indexing rules)"));
                    }
                }
                let inner = if g.delimiter() == Delimiter::Bracket && prev_is_expr_end && has_top_level_comma(&inner) {
                    let mut paren = Group::new(Delimiter::Parenthesis, inner);
                    paren.set_span(g.span());
                    TokenStream::from(TokenTree::Group(paren))
                } else {
                    inner
                };
                next_is_expr_end = matches!(g.delimiter(), Delimiter::Parenthesis | Delimiter::Bracket);
                let mut ng = Group::new(g.delimiter(), inner);
                ng.set_span(g.span());
                TokenTree::Group(ng)
            }
            TokenTree::Ident(i) => {
                next_is_expr_end = !KEYWORDS.contains(&i.to_string().as_str());
                TokenTree::Ident(i)
            }
            other => {
                next_is_expr_end = false;
                other
            }
        };
        prev_is_expr_end = next_is_expr_end;
        out.push(tt);
    }
    Ok(out.into_iter().collect())
}

/// The span of a lone `:` at the top level of an index (`x[:, 0]`, `x[1:3]`), not `::`.
fn python_slice_colon(ts: &TokenStream) -> Option<proc_macro2::Span> {
    let toks: Vec<TokenTree> = ts.clone().into_iter().collect();
    for (i, t) in toks.iter().enumerate() {
        if let TokenTree::Punct(p) = t {
            if p.as_char() != ':' {
                continue;
            }
            let colon = |t: Option<&TokenTree>| matches!(t, Some(TokenTree::Punct(q)) if q.as_char() == ':');
            let joint_before = colon(i.checked_sub(1).map(|j| &toks[j])) && matches!(&toks[i - 1], TokenTree::Punct(q) if q.spacing() == proc_macro2::Spacing::Joint);
            let joint_after = p.spacing() == proc_macro2::Spacing::Joint && colon(toks.get(i + 1));
            if !joint_before && !joint_after {
                return Some(p.span());
            }
        }
    }
    None
}

fn has_top_level_comma(ts: &TokenStream) -> bool {
    ts.clone().into_iter().any(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ','))
}
