//! The guide: how to use nnsight-rs, chapter by chapter.
//!
//! Each chapter is a markdown file in `docs/guide/` included here as an empty module, so
//! `cargo doc` renders it and `cargo test --doc` runs every example in it (on the real
//! all-MiniLM-L6-v2 from the set-up). Read them in order:
//!
//! 1. [`setup`]: what the set-up fetches and where.
//! 2. [`tracing`]: `trace!`, module paths, the module tree, the intervention graph, caching
//!    every activation (`run_with_cache`).
//! 3. [`interventions`]: swaps and edits, ablation and steering.
//! 4. [`invokes`]: several invokes in one forward pass, activation patching, tokenized inputs,
//!    batch layouts and values every row shares, statements for the whole batch.
//! 5. [`gradients`]: `.grad` and `.backward()` inside a trace.
//! 6. [`control_flow`]: `if`, loops, `.stop()`, your own functions.
//! 7. [`errors`]: what fails at compile time, what at run time, and how errors read.
//! 8. [`own_model`]: making your own tch model traceable.
//! 9. [`models`]: the bundled architectures and `generate!`.
//! 10. [`loading`]: a checkpoint folder from anywhere: what loaders check, and the fuzzer.
//! 11. [`how_it_works`]: deferred execution, batch narrowing, clean-up, the linear kernel.
//! 12. [`sae_and_harvest`]: sparse autoencoders (load, trace, splice into a model) and harvesting activations to disk.
//!
//! A new chapter is a markdown file in `docs/guide/` plus one `chapter!` line below.

macro_rules! chapter {
    ($name:ident, $file:literal) => {
        #[doc = include_str!(concat!("../docs/guide/", $file))]
        pub mod $name {}
    };
}

chapter!(setup, "setup.md");
chapter!(tracing, "tracing.md");
chapter!(interventions, "interventions.md");
chapter!(invokes, "invokes.md");
chapter!(gradients, "gradients.md");
chapter!(control_flow, "control_flow.md");
chapter!(errors, "errors.md");
chapter!(own_model, "own_model.md");
chapter!(models, "models.md");
chapter!(loading, "loading.md");
chapter!(how_it_works, "how_it_works.md");
chapter!(sae_and_harvest, "sae_and_harvest.md");
