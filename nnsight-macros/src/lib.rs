//! Procedural macros of nnsight-rs: `trace!`, which turns Rust-like intervention code into an
//! intervention graph that rustc type-checks, run alongside the model's forward pass.
//!
//! Layout: `preprocess` (token rewrite for `x[.., 0]`), `ast` (the macro's model of its input),
//! `paths` (module paths and hook points), `scan` (questions about expressions), `lower`
//! (statement translation and lifting), `expand` (the generated block). Semantics live in the
//! runtime; everything generated can be written by hand against `nnsight::Tracer`.

use proc_macro::TokenStream;

mod ast;
mod expand;
mod lower;
mod paths;
mod preprocess;
mod scan;

/// Traces a model: builds the intervention graph written in the block, runs the model once
/// with it, and returns `Result<value of the block, nnsight::Error>`. See the `nnsight` crate
/// docs for the syntax.
#[proc_macro]
pub fn trace(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as ast::TraceInput);
    expand::trace(input).into()
}
