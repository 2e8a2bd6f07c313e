//! The macro's model of its input: the traced model's name, the invokes and their statements.
//!
//! ```text
//! trace!(model, INPUT, { STMTS })                      one invoke
//! trace!(model, { invoke(INPUT) { STMTS } ... STMTS })  several invokes, one forward pass
//! ```

use proc_macro2::{Delimiter, Span, TokenStream, TokenTree};
use syn::parse::{Parse, ParseStream, Parser};
use syn::{Block, Expr, Ident, Stmt, Token};

/// Parsed `trace!` input.
pub struct TraceInput {
    /// The traced model's variable (also the root of module paths in the block).
    pub model: Ident,
    /// The block's parts in order.
    pub segments: Vec<Segment>,
    /// Extra named options after the input, e.g. `max_new_tokens = 3` for `generate!`.
    pub options: Vec<(Ident, Expr)>,
}

/// A run of statements, inside an invoke or between invokes.
pub struct Segment {
    /// `Some(input)` for `invoke(input) { .. }`.
    pub invoke: Option<Expr>,
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

impl Parse for TraceInput {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let model: Ident = input.parse().map_err(|e| {
            syn::Error::new(e.span(), "expected the traced model's variable name first: `trace!(model, input, { ... })`")
        })?;
        if !input.peek(Token![,]) {
            return Err(input.error(format!(
                "the first argument must be a variable holding the model (the block names its modules through it); bind it first: `let model = &{model}...;`"
            )));
        }
        input.parse::<Token![,]>()?;
        let mut first: Option<Expr> = None;
        let mut options = Vec::new();
        // Everything up to the final brace group: an input expression and/or `name = value` options.
        loop {
            if input.peek(syn::token::Brace) && (input.peek2(Token![,]) || is_last_group(input)) {
                break;
            }
            if input.peek(Ident) && input.peek2(Token![=]) && !input.peek3(Token![=]) {
                let name: Ident = input.parse()?;
                input.parse::<Token![=]>()?;
                let value: Expr = input.parse()?;
                options.push((name, value));
            } else if first.is_none() {
                first = Some(input.parse()?);
            } else {
                return Err(input.error("expected `{ ... }`: the intervention block comes last"));
            }
            input.parse::<Token![,]>()?;
        }
        let body: TokenTree = input.parse()?;
        let _ = input.parse::<Option<Token![,]>>()?;
        if !input.is_empty() {
            return Err(input.error("unexpected tokens after the intervention block"));
        }
        let TokenTree::Group(g) = body else { unreachable!("checked by peek") };
        let segments = split_invokes(crate::preprocess::wrap_index_commas(g.stream())?, first)?;
        Ok(TraceInput { model, segments, options })
    }
}

fn is_last_group(input: ParseStream) -> bool {
    let fork = input.fork();
    let _ = fork.parse::<TokenTree>();
    fork.is_empty()
}

/// Splits the block's tokens at `invoke(..) { .. }` statements.
fn split_invokes(tokens: TokenStream, single: Option<Expr>) -> syn::Result<Vec<Segment>> {
    let toks: Vec<TokenTree> = tokens.into_iter().collect();
    let mut segments = Vec::new();
    let mut pending: Vec<TokenTree> = Vec::new();
    let mut i = 0;
    let at_stmt_start = |pending: &[TokenTree]| match pending.last() {
        None => true,
        Some(TokenTree::Punct(p)) => p.as_char() == ';',
        Some(TokenTree::Group(g)) => g.delimiter() == Delimiter::Brace,
        _ => false,
    };
    while i < toks.len() {
        let is_invoke = matches!(&toks[i], TokenTree::Ident(id) if id == "invoke") && at_stmt_start(&pending);
        if !is_invoke {
            pending.push(toks[i].clone());
            i += 1;
            continue;
        }
        let kw_span = toks[i].span();
        if single.is_some() {
            return Err(syn::Error::new(
                kw_span,
                "`invoke` is for the several-inputs form `trace!(model, { invoke(a) { .. } invoke(b) { .. } })`; this trace already has an input",
            ));
        }
        let malformed = || {
            syn::Error::new(kw_span, "malformed invoke: expected `invoke(<input>) { <statements> }`")
        };
        let (Some(TokenTree::Group(args)), Some(TokenTree::Group(body))) = (toks.get(i + 1), toks.get(i + 2)) else {
            return Err(malformed());
        };
        if args.delimiter() != Delimiter::Parenthesis || body.delimiter() != Delimiter::Brace {
            return Err(malformed());
        }
        if args.stream().is_empty() {
            return Err(syn::Error::new(args.span(), "`invoke()` needs an input, e.g. `invoke(\"The Eiffel Tower is in\") { .. }`"));
        }
        if !pending.is_empty() {
            segments.push(stmts_segment(std::mem::take(&mut pending), None)?);
        }
        let input: Expr = syn::parse2(args.stream())?;
        let mut seg = stmts_segment(body.stream().into_iter().collect(), Some(input))?;
        seg.span = kw_span;
        segments.push(seg);
        i += 3;
        if let Some(TokenTree::Punct(p)) = toks.get(i) {
            if p.as_char() == ';' {
                i += 1;
            }
        }
    }
    if !pending.is_empty() || segments.is_empty() {
        // The one-input form has a single segment: the whole block, in invoke 0.
        segments.push(stmts_segment(pending, single)?);
    }
    Ok(segments)
}

fn stmts_segment(toks: Vec<TokenTree>, invoke: Option<Expr>) -> syn::Result<Segment> {
    let ts: TokenStream = nested_invokes(toks.into_iter().collect());
    let span = ts.clone().into_iter().next().map(|t| t.span()).unwrap_or_else(Span::call_site);
    let stmts = Block::parse_within.parse2(ts)?;
    Ok(Segment { invoke, stmts, span })
}

/// Label of the block an invoke inside a loop (or any nested block) becomes; see [`nested_invokes`].
pub const INVOKE_LABEL: &str = "__nn_invoke";
/// Its first statement: `__nn_invoke_input(<input>);`.
pub const INVOKE_INPUT: &str = "__nn_invoke_input";

/// Rewrites every `invoke(<input>) { <stmts> }` inside a nested brace group (a loop's body, an
/// `if`'s branch, a block) into the labeled block `'__nn_invoke: { __nn_invoke_input(<input>);
/// <stmts> }`, which is Rust syntax (so the lowering's look-ahead sees its statements) and
/// which the lowering turns into a new invoke each time it runs: `for p in &prompts {
/// invoke(p) { .. } }` adds one invoke per prompt. Top-level invokes are split by
/// [`split_invokes`] instead.
fn nested_invokes(tokens: TokenStream) -> TokenStream {
    let toks: Vec<TokenTree> = tokens.into_iter().collect();
    let mut out: Vec<TokenTree> = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let at_stmt_start = match out.last() {
            None => true,
            Some(TokenTree::Punct(p)) => p.as_char() == ';',
            Some(TokenTree::Group(g)) => g.delimiter() == Delimiter::Brace,
            _ => false,
        };
        if let (true, TokenTree::Ident(id), Some(TokenTree::Group(args)), Some(TokenTree::Group(body))) =
            (at_stmt_start, &toks[i], toks.get(i + 1), toks.get(i + 2))
        {
            if id == "invoke" && args.delimiter() == Delimiter::Parenthesis && body.delimiter() == Delimiter::Brace {
                let span = id.span();
                let mut label = proc_macro2::Punct::new('\'', proc_macro2::Spacing::Joint);
                label.set_span(span);
                let mut colon = proc_macro2::Punct::new(':', proc_macro2::Spacing::Alone);
                colon.set_span(span);
                let name = proc_macro2::Ident::new(INVOKE_LABEL, span);
                let input = proc_macro2::Ident::new(INVOKE_INPUT, span);
                let inner = nested_invokes(body.stream());
                let args = args.clone();
                let block: TokenStream = quote::quote_spanned!(span=> { #input #args; #inner });
                out.push(TokenTree::Punct(label));
                out.push(TokenTree::Ident(name));
                out.push(TokenTree::Punct(colon));
                out.extend(block);
                i += 3;
                continue;
            }
        }
        match &toks[i] {
            TokenTree::Group(g) => {
                let mut ng = proc_macro2::Group::new(g.delimiter(), nested_invokes(g.stream()));
                ng.set_span(g.span());
                out.push(TokenTree::Group(ng));
            }
            t => out.push(t.clone()),
        }
        i += 1;
    }
    out.into_iter().collect()
}
