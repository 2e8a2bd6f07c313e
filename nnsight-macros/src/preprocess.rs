//! Token-level rewrite before parsing: `x[.., 0]` is not Rust syntax, but it is how tensor
//! indexing reads in Python and in the design's examples. An index bracket (one that follows an
//! identifier or a closing `)`/`]`) with top-level commas gets its contents wrapped in
//! parentheses, `x[(.., 0)]`, which syn parses as an index by a tuple (tch's `IndexOp` form).

use proc_macro2::{Delimiter, Group, TokenStream, TokenTree};

const KEYWORDS: &[&str] = &[
    "in", "return", "break", "else", "match", "if", "while", "for", "let", "mut", "ref", "as", "move", "loop",
    "unsafe", "async", "where", "yield", "continue", "static", "const", "dyn", "impl",
];

/// Applies the rewrite to every bracket group in `tokens`, recursively.
pub fn wrap_index_commas(tokens: TokenStream) -> TokenStream {
    let mut out = Vec::new();
    let mut prev_is_expr_end = false;
    for tt in tokens {
        let next_is_expr_end;
        let tt = match tt {
            TokenTree::Group(g) => {
                let inner = wrap_index_commas(g.stream());
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
    out.into_iter().collect()
}

fn has_top_level_comma(ts: &TokenStream) -> bool {
    ts.clone().into_iter().any(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ','))
}
