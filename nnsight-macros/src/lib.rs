//! Procedural macros of nnsight-rs: `trace!`, which turns Rust-like intervention code into an
//! intervention graph that rustc type-checks, run alongside the model's forward pass.
//!
//! Layout: `preprocess` (token rewrite for `x[.., 0]`), `format` (inline format arguments made
//! explicit), `ast` (the macro's model of its input),
//! `paths` (module paths and hook points), `scan` (questions about expressions), `lower`
//! (statement translation), `lift` (expressions into typed apply nodes), `expand` (the generated block). Semantics live in the
//! runtime; everything generated can be written by hand against `nnsight::Tracer`.

use proc_macro::TokenStream;

mod ast;
mod derive;
mod expand;
mod format;
mod lift;
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
    expand::trace(input, expand::Mode::Trace).into()
}

/// Traces a causal language model's generation loop: `generate!(model, prompt,
/// max_new_tokens = 3, { .. })`. The root model runs once per step, so call `n` of a module is
/// step `n` (`model.lm_head.output` step 0, `.next().output` step 1, `.at(k).output` step `k`).
/// Options: `max_new_tokens`, `temperature`, `top_k`, `seed`, `stop_at_eos`,
/// `tokens = &mut Option<Tensor>` (receives the ids `[batch, prompt + new]`), `dot`.
/// Returns `Result<value of the block, nnsight::Error>`.
#[proc_macro]
pub fn generate(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as ast::TraceInput);
    expand::trace(input, expand::Mode::Generate).into()
}

/// Checks a trace without running the model: `scan!(model, input, { .. })` builds the block's
/// intervention graph as `trace!` would and returns `Vec<nnsight::Error>`, every problem found
/// (module paths, list indices, invoke inputs, ...; empty when the trace would start running).
/// It cannot know what needs the model to run: call counts, activation shapes, node values.
#[proc_macro]
pub fn scan(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as ast::TraceInput);
    expand::trace(input, expand::Mode::Scan).into()
}

/// A persistent edit of a language model: `edit!(model, { model.x.output[.., 0] = 0.0; })`
/// stores the block's interventions in `model`, and every later `trace!`, `generate!` and
/// activation cache of it applies them (to every row, before the trace's own block) until
/// `model.clear_edits()`. Returns `Result<(), nnsight::Error>` (an error building the edit,
/// found by trying it once). Variables it uses are moved into it (as by a `move` closure) and
/// kept for every replay: `Copy` values, tensors (sharing storage) and `Clone` values.
#[proc_macro]
pub fn edit(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as ast::TraceInput);
    expand::trace(input, expand::Mode::Edit).into()
}

/// Derives `ModuleTree` for a model struct: the walk over its `Hooked` fields (also inside
/// `Vec`/`Option`), used to list module paths and print the module tree. A module field may not
/// be named `output`, `input` or `inputs` (those are hook points in `trace!`): name it `output_`.
/// Fields that are not modules are skipped; `#[module(skip)]` skips one explicitly;
/// `#[module(crate = "path")]` names the runtime crate when it is not `::nnsight`.
#[proc_macro_derive(ModuleTree, attributes(module))]
pub fn derive_module_tree(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    derive::derive(&input).unwrap_or_else(syn::Error::into_compile_error).into()
}
