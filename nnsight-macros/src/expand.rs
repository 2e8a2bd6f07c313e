//! Code generation for `trace!`: one block that builds the graph, runs the model once and
//! returns the block's value with saved proxies turned into their values.
//!
//! ```text
//! {
//!     let mut __nn_tr = ManuallyDrop::new(Tracer::new(&model));
//!     let __nn_g0 = __nn_tr.invoke(input);
//!     ...translated statements...
//!     let __nn_value = <tail>;
//!     Tracer::finish(ManuallyDrop::into_inner(__nn_tr), __nn_value)
//! }
//! ```
//! Option `dot = &mut string` stores the intervention graph in Graphviz DOT before the run.
//! Option `cache = &mut Option<Cache>` (with `cache_options = CacheOptions`, default every
//! module) records an activation cache of every row (`Tracer::cache` with `Group::ALL`) and
//! stores it there after a successful run.
//! The tracer sits in a `ManuallyDrop` so closures may borrow variables the block declares
//! after it: it is consumed by `finish` at the end, so it never outlives them. (If the block
//! unwinds while building, the graph leaks instead of being dropped; nothing is hooked then.)

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};

use crate::ast::TraceInput;
use crate::lower::Ctx;

/// Which macro: `trace!` runs the model's forward pass once; `generate!` runs its generation
/// loop (options `max_new_tokens`, `temperature`, `top_k`, `seed`, `stop_at_eos`, and
/// `tokens = &mut Option<Tensor>` to receive the generated ids).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Trace,
    Generate,
    /// `edit!`: the block becomes a persistent edit of the model (`LanguageModel::add_edit`),
    /// replayed into every later trace; nothing runs now.
    Edit,
    /// `scan!`: builds the graph as `trace!` does and returns every problem found
    /// (`Tracer::scan`), without running the model.
    Scan,
}

const GENERATE_OPTIONS: &[&str] = &["max_new_tokens", "temperature", "top_k", "seed", "stop_at_eos"];

pub fn trace(input: TraceInput, mode: Mode) -> TokenStream {
    // `helpers = [sae, probe]`: more roots of module paths (see `paths::set_helpers`).
    let mut names = Vec::new();
    let mut bad = None;
    for (name, value) in &input.options {
        if name == "helpers" {
            let items: Vec<&syn::Expr> = match value {
                syn::Expr::Array(a) => a.elems.iter().collect(),
                syn::Expr::Tuple(t) => t.elems.iter().collect(),
                other => vec![other],
            };
            for it in items {
                match it {
                    syn::Expr::Path(p) if p.path.get_ident().is_some() => names.push(p.path.get_ident().unwrap().to_string()),
                    other => bad = Some(syn::Error::new(syn::spanned::Spanned::span(other), "`helpers = [..]` lists variables that hold helper modules (`Hooked<_>`): `helpers = [sae]`")),
                }
            }
        }
    }
    crate::paths::set_helpers(names);
    let out = match bad {
        Some(e) => e.to_compile_error(),
        None => trace_inner(input, mode),
    };
    crate::paths::set_helpers(Vec::new());
    out
}

fn trace_inner(mut input: TraceInput, mode: Mode) -> TokenStream {
    let mut steps = Steps { model: &input.model, mode, errors: Vec::new() };
    for seg in &mut input.segments {
        crate::format::explicit_format_args(&mut seg.stmts);
        for s in &mut seg.stmts {
            syn::visit_mut::VisitMut::visit_stmt_mut(&mut steps, s);
        }
    }
    let steps_errors = steps.errors;
    let mut ctx = Ctx::new(input.model.clone());
    ctx.errors.extend(steps_errors);
    if mode == Mode::Edit {
        return edit(input, ctx);
    }
    let tr = ctx.tr.clone();
    let model = &input.model;
    let mut dot = None;
    let mut grad_option = None;
    let mut tokens = None;
    let mut cache = None;
    let mut cache_options = None;
    let mut gen_options = Vec::new();
    for (name, value) in &input.options {
        let n = name.to_string();
        if n == "helpers" {
            // Read by `trace` above.
        } else if n == "dot" {
            dot = Some(value.clone());
        } else if n == "grad" {
            grad_option = Some(value.clone());
        } else if n == "cache" {
            cache = Some(value.clone());
        } else if n == "cache_options" {
            cache_options = Some((name.clone(), value.clone()));
        } else if mode == Mode::Generate && n == "tokens" {
            tokens = Some(value.clone());
        } else if mode == Mode::Generate && GENERATE_OPTIONS.contains(&n.as_str()) {
            let v = match n.as_str() {
                "temperature" | "top_k" => quote!(::core::option::Option::Some(#value)),
                // Any integer type (`model.steps` counts in `usize`).
                "max_new_tokens" => quote!(::nnsight::__private::IndexArg::into_i64(#value)),
                _ => quote!(#value),
            };
            gen_options.push(quote!(__nn_options.#name = #v;));
        } else {
            let known = match mode {
                Mode::Trace | Mode::Edit | Mode::Scan => "`dot = &mut string`, `grad = true`, `cache = &mut option`, `cache_options = options`, `helpers = [module, ..]`".to_string(),
                Mode::Generate => format!(
                    "{}, `tokens = &mut option`, `dot = &mut string`, `grad = true`, `cache = &mut option`, `cache_options = options`",
                    GENERATE_OPTIONS.join(", ")
                ),
            };
            ctx.errors.push(syn::Error::new(name.span(), format!("unknown option `{name}` (known: {known})")));
        }
    }
    let mut body = TokenStream::new();
    let mut value = quote!(());
    let mut value_span = proc_macro2::Span::call_site();
    let n = input.segments.len();
    let mut invokes = 0usize;
    // Statements outside the invoke blocks address every row of the batch.
    let all = format_ident!("__nn_all");
    if input.segments.iter().any(|s| s.invoke.is_none()) {
        body.extend(quote!(#[allow(unused_variables)] let #all = ::nnsight::Group::ALL;));
    }
    for (i, seg) in input.segments.iter().enumerate() {
        // A `let` looks ahead into the invokes after its own (an accumulator declared before them).
        ctx.later = input.segments[i + 1..].iter().flat_map(|s| s.stmts.iter().cloned()).collect();
        match &seg.invoke {
            Some(inp) => {
                let g = format_ident!("__nn_g{}", invokes);
                invokes += 1;
                body.extend(quote!(let #g = #tr.invoke(#inp);));
                ctx.group = Some(g);
                ctx.in_invoke = true;
            }
            None => {
                ctx.group = Some(all.clone());
                ctx.in_invoke = false;
            }
        }
        let (stmts, tail) = if i + 1 == n { ctx.trace_stmts(&seg.stmts) } else { ctx.stmts(&seg.stmts) };
        body.extend(stmts);
        if let Some((t, _)) = tail {
            if i + 1 == n {
                value_span = seg.stmts.last().map(syn::spanned::Spanned::span).unwrap_or(value_span);
                value = t;
            } else {
                body.extend(quote!(let _ = #t;));
            }
        }
    }
    if invokes == 0 && ctx.nested_invokes == 0 {
        ctx.errors.push(syn::Error::new(
            input.model.span(),
            "a trace needs an input: `trace!(model, input, { .. })` or `invoke(input) { .. }` blocks",
        ));
    }
    if let (None, Some((name, _))) = (&cache, &cache_options) {
        ctx.errors.push(syn::Error::new(name.span(), "`cache_options` needs the option `cache = &mut option` that receives the cache"));
    }
    let grad = match grad_option {
        Some(g) => quote!(if #g { #tr.enable_grad(); }),
        None => quote!(),
    };
    let grad = if ctx.grad { quote!(#tr.enable_grad();) } else { grad };
    let dot = dot.map(|d| quote!(*(#d) = #tr.to_dot();));
    let errors: Vec<TokenStream> = ctx.errors.iter().map(syn::Error::to_compile_error).collect();
    if !errors.is_empty() {
        // Fail soft: only the real errors, and an expression of a plausible type.
        if mode == Mode::Scan {
            return quote!({ #(#errors)* ::std::vec::Vec::<::nnsight::Error>::new() });
        }
        return quote!({ #(#errors)* ::core::result::Result::<_, ::nnsight::Error>::Ok(::nnsight::__private::never()) });
    }
    let finish = match mode {
        Mode::Scan => quote_spanned!(value_span=> { let _ = __nn_value; ::nnsight::Tracer::scan(::core::mem::ManuallyDrop::into_inner(#tr)) }),
        _ => quote_spanned!(value_span=> ::nnsight::Tracer::finish(::core::mem::ManuallyDrop::into_inner(#tr), __nn_value)),
    };
    // With `cache = &mut slot`: the cache ticket is resolved with the block's value.
    let (cache_setup, finish) = match &cache {
        Some(slot) if mode != Mode::Scan => {
            let options = match &cache_options {
                Some((_, o)) => quote!(#o),
                None => quote!(::nnsight::CacheOptions::default()),
            };
            (
                quote!(let __nn_cache = #tr.cache(::nnsight::Group::ALL, #options);),
                quote_spanned!(value_span=> ::nnsight::Tracer::finish(::core::mem::ManuallyDrop::into_inner(#tr), (__nn_value, __nn_cache))
                    .map(|(__nn_v, __nn_c)| { *(#slot) = ::core::option::Option::Some(__nn_c); __nn_v })),
            )
        }
        _ => (quote!(), finish),
    };
    let (setup, traced, after) = match mode {
        Mode::Trace | Mode::Edit | Mode::Scan => (quote!(), quote!(&#model), quote!()),
        Mode::Generate => (
            quote! {
                let __nn_generator = {
                    let mut __nn_options = ::nnsight::GenerateOptions::default();
                    #(#gen_options)*
                    ::nnsight::Generator::new(&#model, __nn_options)
                };
            },
            quote!(&__nn_generator),
            match tokens {
                Some(t) => quote!(*(#t) = __nn_generator.tokens();),
                None => quote!(),
            },
        ),
    };
    quote! {{
        #setup
        #[allow(unused_mut)]
        let mut #tr = ::core::mem::ManuallyDrop::new(::nnsight::Tracer::new(#traced));
        #grad
        #body
        let __nn_value = #value;
        #cache_setup
        #dot
        let __nn_result = #finish;
        #after
        __nn_result
    }}
}

/// `model.steps(range)` in `generate!`: the generation steps in `range` (`Generator::steps`),
/// so a loop can address every step (`model.steps(..)`) or some (`model.steps(1..3)`) without
/// naming `max_new_tokens`. In `trace!` (one forward pass, no steps) it is a compile error.
struct Steps<'a> {
    model: &'a syn::Ident,
    mode: Mode,
    errors: Vec<syn::Error>,
}

impl syn::visit_mut::VisitMut for Steps<'_> {
    fn visit_expr_method_call_mut(&mut self, m: &mut syn::ExprMethodCall) {
        syn::visit_mut::visit_expr_method_call_mut(self, m);
        let on_model = matches!(&*m.receiver, syn::Expr::Path(p) if p.qself.is_none() && p.path.is_ident(self.model));
        if !on_model || m.method != "steps" {
            return;
        }
        match self.mode {
            Mode::Generate => {
                let span = m.method.span();
                *m.receiver = syn::parse_quote_spanned!(span=> __nn_generator);
            }
            Mode::Trace | Mode::Edit | Mode::Scan => self.errors.push(syn::Error::new(
                m.method.span(),
                "`model.steps(..)` counts generation steps: it exists in `generate!`; `trace!` runs one forward pass (address calls of a module with `.at(i)` / `.next()`)",
            )),
        }
    }
}

/// `edit!(model, { .. })`: `model.add_edit(move |tracer, model| { <the block's nodes on every
/// row> })`, returning `Result<(), nnsight::Error>`. The block may not have invokes (an edit
/// applies to every row of every later trace) nor save values (they would have nowhere to go).
fn edit(input: TraceInput, mut ctx: Ctx) -> TokenStream {
    ctx.owned_captures = true;
    let tr = ctx.tr.clone();
    let model = &input.model;
    for (name, _) in &input.options {
        ctx.errors.push(syn::Error::new(name.span(), format!("`edit!` takes no options (`{name}`): it only stores interventions")));
    }
    let mut body = TokenStream::new();
    for seg in &input.segments {
        if seg.invoke.is_some() {
            ctx.errors.push(syn::Error::new(seg.span, "`edit!` applies to every row of every later trace: write its interventions without `invoke`"));
            continue;
        }
        struct Saves(Vec<proc_macro2::Span>);
        impl<'ast> syn::visit::Visit<'ast> for Saves {
            fn visit_expr_method_call(&mut self, m: &'ast syn::ExprMethodCall) {
                if crate::scan::is_save_like(&m.method) && m.method != "stop" {
                    self.0.push(m.method.span());
                }
                syn::visit::visit_expr_method_call(self, m);
            }
        }
        let mut saves = Saves(Vec::new());
        for s in &seg.stmts {
            syn::visit::Visit::visit_stmt(&mut saves, s);
        }
        for sp in saves.0 {
            ctx.errors.push(syn::Error::new(sp, "`edit!` stores interventions for later traces, so a saved value would have nowhere to go: save it in the `trace!` that runs with the edit"));
        }
        ctx.group = Some(format_ident!("__nn_all"));
        let (stmts, tail) = ctx.stmts(&seg.stmts);
        body.extend(stmts);
        if let Some((t, _)) = tail {
            body.extend(quote!(let _ = #t;));
        }
    }
    let errors: Vec<TokenStream> = ctx.errors.iter().map(syn::Error::to_compile_error).collect();
    if !errors.is_empty() {
        return quote!({ #(#errors)* ::core::result::Result::<(), ::nnsight::Error>::Ok(()) });
    }
    quote! {{
        #model.add_edit(move |#tr, #model| {
            #[allow(unused_variables)]
            let __nn_all = ::nnsight::Group::ALL;
            #body
        })
    }}
}
