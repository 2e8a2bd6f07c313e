//! The one error type of the library.
//!
//! Every error names what a researcher needs to find the problem: the module path and hook
//! point (`encoder.layer.3.output`), the call index, the invoke (batch group), the node, and the
//! expected and actual shape/dtype where shapes are involved.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

use thiserror::Error;

use crate::tracer::Group;

/// Errors returned by tracing, loading models and tokenizing.
#[derive(Debug, Error)]
pub enum Error {
    /// A module list was indexed past its end (checked before the model runs).
    #[error("index {index} is out of range for module list `{path}` of length {len}")]
    IndexOutOfRange {
        /// Module path of the list, e.g. `encoder.layer`.
        path: String,
        /// The index as written (may be negative, counted from the end).
        index: i64,
        /// Number of modules in the list.
        len: usize,
    },

    /// A hook point that some node needed never received a value.
    #[error("`{point}` (call {call}) was never provided: {reason}")]
    NeverProvided {
        /// Hook point, e.g. `encoder.layer.9.output`.
        point: String,
        /// Call index the node waited for.
        call: usize,
        /// Why, e.g. "the module did not run" or "the module ran 2 time(s)".
        reason: String,
    },

    /// A swap or in-place edit at a hook point needed a value that was not computed yet when the
    /// module ran (for example setting layer 0 from layer 3's output).
    #[error(
        "cannot change `{point}` (call {call}, {invoke}): node {node} is not computed yet when the module runs; \
         its value depends on an activation that comes later in the forward pass"
    )]
    NotReady {
        /// Hook point being changed.
        point: String,
        /// Call index.
        call: usize,
        /// The batch group (an invoke, or all of them).
        invoke: Group,
        /// The node whose value was missing.
        node: String,
    },

    /// A swap, skip or in-place edit written *after* a read, in the same invoke (or both
    /// outside the invokes), of a hook point that the model computes *after* the changed one
    /// (or of the skipped module's output): one forward pass cannot give the read the value
    /// from before the change that the block's order asks for. nnsight raises its out-of-order
    /// error here too. Write the change before the read, or read in a trace of its own.
    #[error(
        "node {node} reads `{point}` (call {call}, {invoke}) before the change of `{changed}` (call {changed_call}, \
         {changed_invoke}) written after it, but the model computes `{point}` after `{changed}`, so one forward pass \
         cannot give the value from before that change: write the change before the read, or make the read in a \
         trace of its own"
    )]
    OutOfOrder {
        /// The read written first, with its source location.
        node: String,
        /// Its hook point, e.g. `model.layers.1.output`.
        point: String,
        /// Its call.
        call: usize,
        /// Its batch group.
        invoke: Group,
        /// The hook point changed, e.g. `model.layers.0.output`.
        changed: String,
        /// The call changed.
        changed_call: usize,
        /// The batch group changed.
        changed_invoke: Group,
    },

    /// A swap's new value does not have the layout of the value it replaces.
    #[error(
        "swap at `{point}` (call {call}, {invoke}) has the wrong layout: expected {expected}, got {actual}"
    )]
    SwapMismatch {
        /// Hook point being swapped.
        point: String,
        /// Call index.
        call: usize,
        /// The batch group (an invoke, or all of them).
        invoke: Group,
        /// Shape, dtype and device of the value being replaced (the invoke's rows).
        expected: String,
        /// Shape, dtype and device of the new value.
        actual: String,
    },

    /// An intervention inside one invoke of several would change a value that every row of the
    /// batch shares (a tensor without a batch axis, or a plain value): an in-place edit of it
    /// or a swap that changes it. Interventions on such values apply to the whole batch.
    #[error(
        "cannot change `{point}` (call {call}) from {invoke}: {what} is shared by all {batch} rows of the batch, so {by} \
         would change every invoke's value. Intervene on the whole batch instead: in a trace with a single invoke, or \
         with statements written outside the invoke blocks (they apply to every row)"
    )]
    SharedChange {
        /// Hook point, e.g. `embeddings.position_embeddings.output`.
        point: String,
        /// Call index.
        call: usize,
        /// The invoke that tried.
        invoke: Group,
        /// The shared value's shape, dtype and device and why it is shared, e.g.
        /// `Tensor[1, 14, 384] Float Cpu (declared shared (no batch axis))`.
        what: String,
        /// Rows in the batch.
        batch: i64,
        /// The intervention, e.g. `the in-place edit by node %3 ... (at src/main.rs:9)`.
        by: String,
    },

    /// A module's declared batch layout does not fit the value at its hook point (a batch axis
    /// that is missing or of another size than the batch).
    #[error("the batch layout declared for `{point}` (call {call}) does not fit its value: {reason} (declared: {layout}; value: {value})")]
    Layout {
        /// Hook point.
        point: String,
        /// Call index.
        call: usize,
        /// The declared layout, e.g. `(batch axis 0, shared)`.
        layout: String,
        /// The value, e.g. `Tensor[6, 4] Float Cpu`.
        value: String,
        /// What does not fit.
        reason: String,
    },

    /// A saved value was changed in place after it was saved, by something the interleaver
    /// cannot undo: an in-place operation in the model's own forward pass, or in intervention
    /// code that is not written as an edit (`h[..] = v` and `h += v` are edits: saved values
    /// they overlap are copied before they run). Saving a copy (`.copy().save()`) keeps the
    /// value of the moment.
    #[error(
        "saved node {node} was changed in place after it was saved, {by}: a saved value must be the value at the moment \
         it was saved. Save a copy instead (`.copy().save()`), which keeps that value"
    )]
    SavedChanged {
        /// The saved node, e.g. `%2 layer.0.output (at src/main.rs:9)`.
        node: String,
        /// Who changed it, e.g. `by the model's forward pass before it reached `layer.1.output` (call 0)`.
        by: String,
    },

    /// An intervention node failed (a tch error or a panic inside the user's code).
    #[error("intervention node {node} failed: {message}")]
    Node {
        /// Node name with the source location of the code that built it.
        node: String,
        /// The panic message or error text.
        message: String,
    },

    /// A saved value was asked for but never computed (its inputs were never provided, the run
    /// stopped early before it, or a condition skipped it).
    #[error("saved node {node} has no value: {reason}")]
    NotComputed {
        /// Node name.
        node: String,
        /// Why.
        reason: String,
    },

    /// The model itself failed or panicked during the traced forward pass.
    #[error("the model's forward pass failed: {0}")]
    Model(String),

    /// Bad input to a trace, an invoke or a model.
    #[error("{0}")]
    Input(String),

    /// Reading or writing a file or folder failed.
    #[error("I/O error on `{path}`: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A model's config.json is missing a field, has a bad value or describes another architecture.
    #[error("bad config `{path}`: {message}")]
    Config {
        /// The config file.
        path: String,
        /// What is wrong.
        message: String,
    },

    /// A checkpoint lacks a weight the architecture needs.
    #[error("checkpoint `{file}` has no tensor `{key}`")]
    MissingWeight {
        /// The safetensors file.
        file: String,
        /// The missing key, e.g. `encoder.layer.0.attention.self.query.weight`.
        key: String,
    },

    /// A checkpoint holds a weight that the model, as its config describes it, does not use
    /// (e.g. q/k/v biases under a config without `attention_bias`, a q/k norm of another family):
    /// loading it anyway would compute something else than the checkpoint's model.
    #[error(
        "checkpoint `{file}` has tensor `{key}`, which the model as config.json describes it does not use ({count} such tensor(s)): check the config (model_type, attention_bias, tie_word_embeddings, ...)"
    )]
    UnusedWeight {
        /// The safetensors file.
        file: String,
        /// The first unused key in sorted order.
        key: String,
        /// How many tensors are unused.
        count: usize,
    },

    /// A checkpoint tensor has another shape than the architecture expects.
    #[error("checkpoint `{file}`: tensor `{key}` has shape {actual:?}, expected {expected:?}")]
    WeightShape {
        /// The safetensors file.
        file: String,
        /// The key.
        key: String,
        /// Shape the config implies.
        expected: Vec<i64>,
        /// Shape in the file.
        actual: Vec<i64>,
    },

    /// A checkpoint tensor has a dtype the model cannot use as a weight (an integer or bool
    /// tensor where a float weight belongs, or a float format libtorch cannot read).
    #[error("checkpoint `{file}`: tensor `{key}` has dtype {dtype}, expected {expected}")]
    WeightDtype {
        /// The safetensors file.
        file: String,
        /// The key.
        key: String,
        /// The dtype in the file (safetensors' name, e.g. `I32`).
        dtype: String,
        /// What the model takes, e.g. `a float type (F32, F16, BF16 or F64)`.
        expected: String,
    },

    /// Building a model from a checked checkpoint failed (allocating the weights on the device
    /// ran out of memory, the device does not exist, ...).
    #[error("cannot load the model from `{path}`: {message}")]
    Load {
        /// The model folder.
        path: String,
        /// What failed.
        message: String,
    },

    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Registering, running or removing a tensor gradient hook failed (see `tensor_hook`): the
    /// message names where the hook was registered.
    #[error("gradient hook: {0}")]
    GradHook(String),

    /// Something the set-up provides is missing (the bundled model, libtorch's CUDA part); the
    /// message says where it was looked for and which command provides it.
    #[error("{0}")]
    Setup(String),

    /// A device that this build or this machine cannot use was asked for (a CUDA device without
    /// a driver or GPU, or with a libtorch built without CUDA), or tensors on different devices
    /// met; the message names the device and what is missing.
    #[error("{0}")]
    Device(String),

    /// An error from libtorch outside any node.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// `Result` with this crate's [`Error`](enum@Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Text of a panic payload (`&str` or `String`), for turning panics into errors. tch's
/// `unwrap` of a libtorch error is shortened to libtorch's own message (no C++ stack frames).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(f) = payload.downcast_ref::<crate::interleave::ModuleFailure>() {
        return match f.call {
            Some(c) => format!("in module `{}` (call {c}): {}", f.path, f.message),
            None => format!("in module `{}`: {}", f.path, f.message),
        };
    }
    let text = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        return "panic with a non-string payload".to_string();
    };
    tidy_libtorch_message(&text)
}

/// A panic's text as an error message. A libtorch error (tch's `unwrap` of
/// `Torch("...")`, or text with libtorch's `Exception raised from` trailer) is cut to its first
/// non-empty line, unescaped: no C++ stack frames, no dispatcher table listing every backend.
/// Any other text (the user's own, e.g. `Input("seq 3 too long")`) comes through whole, only
/// trimmed.
///
/// `called `Result::unwrap()` on an `Err` value: Torch("Could not run 'aten::empty_strided' with
/// arguments from the 'CUDA' backend. ...\n\nCPU: registered at ...")` → `Could not run
/// 'aten::empty_strided' with arguments from the 'CUDA' backend. ...`.
pub(crate) fn tidy_libtorch_message(text: &str) -> String {
    let text = text.trim();
    let body = text.strip_prefix("called `Result::unwrap()` on an `Err` value: ").unwrap_or(text);
    let wrapped = ["Torch(\"", "Shape(\""]
        .iter()
        .find_map(|p| body.strip_prefix(p).and_then(|b| b.strip_suffix("\")")))
        .map(unescape_debug);
    let libtorch = match wrapped {
        Some(inner) => inner,
        None if body.contains("Exception raised from") => body.to_string(),
        None => return body.to_string(),
    };
    let libtorch = match libtorch.find("Exception raised from") {
        Some(i) => &libtorch[..i],
        None => &libtorch[..],
    };
    let line = libtorch.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    // "Could not run 'aten::x' with arguments from the 'CUDA' backend. This could be because
    // ..., [CPU, Meta, ... 40 more backends]." keeps its first sentence.
    let line = match line.find(" This could be because") {
        Some(i) => &line[..i],
        None => line,
    };
    match line.char_indices().nth(MAX_LINE) {
        Some((i, _)) => format!("{} ...", &line[..i]),
        None => line.to_string(),
    }
}

/// Longest libtorch line kept in a message, in characters.
const MAX_LINE: usize = 400;

/// Undoes Rust's `{:?}` escaping of a string (`\n`, `\t`, `\"`, `\'`, `\\`, `\u{..}`).
fn unescape_debug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('u') => {
                let code: String = chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                out.extend(u32::from_str_radix(&code, 16).ok().and_then(char::from_u32));
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

thread_local! {
    /// Set while this thread runs code whose panics become returned errors: the panic hook then
    /// stays quiet instead of printing "thread panicked" for what is reported as an `Err`.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Number of [`QuietGuard::all_threads`] guards alive: while above 0, panics on every thread
/// are quiet (for work handed to a thread pool, whose panics come back to the caller).
static QUIET_ALL: AtomicUsize = AtomicUsize::new(0);

/// Installs (once per process) a panic hook that stays silent for quiet panics (see
/// [`QuietGuard`]) and defers to the previous hook otherwise.
fn install_quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let quiet = QUIET.try_with(Cell::get).unwrap_or(false) || QUIET_ALL.load(Ordering::SeqCst) > 0;
            if !quiet {
                previous(info)
            }
        }));
    });
}

/// Keeps the panic hook quiet while alive, for panics that the code holding it turns into
/// errors (restores the previous setting, also on unwind).
pub(crate) struct QuietGuard {
    previous: bool,
    all_threads: bool,
}

impl QuietGuard {
    /// Quiet for panics on the current thread.
    pub(crate) fn new() -> Self {
        install_quiet_panic_hook();
        QuietGuard { previous: QUIET.with(|q| q.replace(true)), all_threads: false }
    }

    /// Quiet for panics on every thread (work on a thread pool, e.g. batch tokenization).
    pub(crate) fn all_threads() -> Self {
        let mut g = Self::new();
        QUIET_ALL.fetch_add(1, Ordering::SeqCst);
        g.all_threads = true;
        g
    }
}

impl Drop for QuietGuard {
    fn drop(&mut self) {
        QUIET.with(|q| q.set(self.previous));
        if self.all_threads {
            QUIET_ALL.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Runs `f`; a panic inside it (ours, tch's on a libtorch error or failed allocation, a
/// dependency's) becomes `Err(message)` and prints nothing.
pub(crate) fn catch_quiet<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let _quiet = QuietGuard::new();
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
}

#[cfg(test)]
mod tests {
    use super::tidy_libtorch_message;

    /// tch's panic on `.to_device(Device::Cuda(0))` with a CPU-only libtorch 2.13: 11,061
    /// characters, `\n` escaped by `{:?}` (the dispatcher table lists every backend with the
    /// file that registers it). See `tests/fixtures/README.md`.
    const CUDA_ON_CPU: &str = include_str!("../tests/fixtures/libtorch_cuda_on_cpu_build.txt");
    /// A dtype error with libtorch's C++ stack frames (`cumprod` of a bool tensor).
    const BOOL_FRAMES: &str = include_str!("../tests/fixtures/libtorch_bool_with_frames.txt");

    #[test]
    fn a_dispatcher_table_is_cut_to_its_first_sentence() {
        assert!(CUDA_ON_CPU.len() > 10_000 && CUDA_ON_CPU.contains("\\nCPU: registered at"));
        assert_eq!(
            tidy_libtorch_message(CUDA_ON_CPU),
            "Could not run 'aten::empty_strided' with arguments from the 'CUDA' backend."
        );
    }

    #[test]
    fn stack_frames_go_and_escapes_are_undone() {
        assert_eq!(tidy_libtorch_message(BOOL_FRAMES), "\"cumprod_out_cpu\" not implemented for 'Bool'");
        // The same text as tch's `Display` (real newlines, no `Torch("..")` around it).
        let display = "Internal torch error: shape '[7]' is invalid for input of size 8\nException raised from infer_size_impl at x.cpp:1\nframe #0: f";
        assert_eq!(tidy_libtorch_message(display), "Internal torch error: shape '[7]' is invalid for input of size 8");
    }

    #[test]
    fn the_users_own_text_comes_through_whole() {
        for text in [
            "called `Result::unwrap()` on an `Err` value: Input(\"seq 3 too long\")",
            "Input(\"seq 3 too long\")",
            "my own message (with \\n and a closing \")",
            "called `Result::unwrap()` on an `Err` value: Shape(\"x\") and more",
        ] {
            let whole = text.strip_prefix("called `Result::unwrap()` on an `Err` value: ").unwrap_or(text);
            assert_eq!(tidy_libtorch_message(text), whole);
        }
    }

    #[test]
    fn a_long_line_is_cut_at_a_char_boundary() {
        let long = format!("Torch(\"{}\")", "é".repeat(1000));
        let long = format!("called `Result::unwrap()` on an `Err` value: {long}");
        let out = tidy_libtorch_message(&long);
        assert_eq!(out, format!("{} ...", "é".repeat(super::MAX_LINE)));
    }
}
