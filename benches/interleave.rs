//! Overhead of tracing against plain tch, on the real all-MiniLM-L6-v2, the tiny GPT-2 fixture
//! and the tiny model of the Python library's figures; plus micro-benchmarks of the interleaver.
//!
//! Run: `cargo bench --bench interleave` (about 3 to 4 minutes on a quiet 2-core machine), then
//! `python3 benches/report.py` to write BENCHMARKS.md from the results.
//! A filter selects groups: `cargo bench --bench interleave -- 'tiny_linear|micro'`.
//!
//! Two measurements per group of model cases:
//! - criterion, one case after the other (medians: `target/criterion/<group>/<case>/new/estimates.json`);
//! - *paired* runs (after criterion's): rounds that each time every case once, interleaved,
//!   so that load which comes and goes (other builds on a shared 2-core machine) hits both sides
//!   of a ratio alike; per-round times go to `target/interleave-paired/<group>.json` and ratios
//!   are medians over rounds of per-round ratios. `PAIRED_ROUNDS=N` overrides the rounds.
//!   A process's memory layout shifts its MiniLM times by a few hundredths of a millisecond
//!   (more than the rounds' spread), so the time above the plain forward is best taken over
//!   several processes: `PAIRED_TAG=run2 cargo bench --bench interleave -- minilm_b2_t1/paired`
//!   runs only that group's paired rounds (the filter matches no criterion case) into
//!   `<group>.run2.json`; `report.py` takes the median over all runs of a group.
//!
//! Groups (criterion ids `group/case`; every time is per iteration):
//! - `minilm_b2_t1`, `minilm_b2_tall`: MiniLM on the two reference sentences (batch 2, 14
//!   tokens), 1 libtorch thread and all threads. `minilm_b32_t1`, `minilm_b32_tall`: 32
//!   sentences. Cases:
//!   - `plain_forward`: `model.forward(&texts)` (tokenizes, then the root `Hooked::call` under
//!     `no_grad`) — **includes tokenization**, like every `trace!` row;
//!   - `plain_call_pretokenized`: the root `Hooked::call` on an input tokenized once, under
//!     `no_grad` — no tokenization (the apples-to-apples baseline of the Python library's
//!     "plain forward", whose input is tokenized beforehand);
//!   - `plain_keep_all_by_hand`, `plain_swap_all_by_hand`: the forward written out in plain tch
//!     on the pre-tokenized input, keeping every layer's output / multiplying it by 1.0 — the
//!     tensor work of saving / swapping every layer without any trace;
//!   - `tokenize`: `model.tokenize(&texts)` alone;
//!   - `trace_empty`: `trace!` with an empty block (no node at all);
//!   - `trace_read_unsaved`: one node that reads `encoder.layer[5].output` and is never saved;
//!   - `trace_save_1`: saves `encoder.layer[2].output`;
//!   - `trace_save_all`: saves the 6 layer outputs;
//!   - `trace_swap_all`: `encoder.layer[l].output = encoder.layer[l].output * 1.0`, 6 layers,
//!     and saves the last one;
//!   - `trace_empty_pretokenized`, `trace_save_1_pretokenized`, `trace_save_all_pretokenized`,
//!     `trace_swap_all_pretokenized`: the same traces on the batch tokenized once
//!     (`trace!(model, &batch, ..)`), like the Python library's traces of the wrapped
//!     `BertModel`, whose input is tensors tokenized beforehand.
//! - `minilm_b2_t1_kernel`, `minilm_b32_t1_kernel`: the linear layers' kernel. Cases
//!   `plain_call_pretokenized` (the default, `LinearKernel::Auto`: each shape class measured at
//!   first use), `plain_call_pretokenized_libtorch_linear` (the same call with
//!   `set_linear_kernel(LinearKernel::Libtorch)`: libtorch's `linear`, MKL, as PyTorch's
//!   `nn.Linear`) and `plain_call_pretokenized_onednn_linear` (`LinearKernel::OneDnn`: oneDNN
//!   for every eligible call). A group of their own: the first oneDNN forward after an MKL one
//!   runs a few percent slower (caches), which would tax whichever case came next in a round.
//!   The group prints what `Auto` measured and chose for each shape class.
//! - `linear_768_r128_t1`, `linear_768_r1024_t1`: the four linear layers of a 124M GPT-2 /
//!   Llama-sized block (768 -> 2304, 768 -> 768, 768 -> 3072, 3072 -> 768; random weights) on
//!   128 and 1024 rows (batch 1 and 8 x 128 tokens), cases `auto`, `libtorch`, `onednn`.
//! - `minilm_invokes_t1`: 10 sentences: `plain_forward`, `one_invoke_10_sentences`,
//!   `ten_invokes_1_sentence` (each saves `encoder.layer[5].output` of its rows).
//! - `gpt2_t1`: the tiny GPT-2 fixture (2 layers, 64 wide, 7-token prompt, word-level tokenizer):
//!   the same single-pass cases (saving/swapping `transformer.h[l].output`).
//!   `gpt2_generate_t1`: `generate_plain` (`LanguageModel::generate`, 20 new tokens) vs
//!   `generate_traced` (`generate!`, 20 new tokens, `model.lm_head.at(step).output.save()` for
//!   every step). Generation takes token ids: no tokenization on either side.
//! - `tiny_linear_t1`: one `Linear(4, 4)` applied twice, input `[1, 4]` (the Python figures'
//!   model): `plain_forward` (root `Hooked::call` under `no_grad`), `trace_empty`, `trace_save`
//!   (`lin.output`, first call), `trace_swap_save` (`lin.output = lin.output * 1.0`, save the
//!   model output).
//! - `micro`: nanoseconds per hooked call or per node (criterion's time per iteration):
//!   - `direct_forward`: the module's own forward, not through `Hooked::call` (identity module);
//!   - `call_no_trace`: `Hooked::call`, no trace active;
//!   - `call_traced_module_not_in_graph`: a trace is active, this module is not in the graph;
//!   - `call_traced_module_other_call`: the module is in the graph, with a read at another call;
//!   - `call_traced_one_read`: one (unsaved) read at this call of this module;
//!   - `node_run`: per apply node, running a chain of 1,000 nodes `|x| x.shallow_clone()` on a
//!     `[1, 4]` tensor (from the hook value arriving to the last node);
//!   - `node_build_and_run`: per node, the whole trace with that chain (building the graph too);
//!   - `tch_narrow`, `tch_shallow_clone`, `tch_size`: what a read does to a `[1, 4]` tensor;
//!   - `root_call_no_grad` vs `trace_empty`: the identity model's root call under `no_grad`, and
//!     an empty `trace!` of it (the fixed cost of one trace).

use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use nnsight::models::causal::{CausalLm, LoadOptions};
use nnsight::models::gpt2::Gpt2;
use nnsight::models::linear::{set_linear_kernel, LinearKernel};
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{Bert, Call, GenerateOptions, IntoInvoke, LanguageModel, ModuleList, TextModel};

// ---------------------------------------------------------------------------------------------
// Inputs

#[path = "../examples/common/sentences.rs"]
mod sentences;
use sentences::{sentences32, PARIS, ROME};


fn minilm() -> LanguageModel<Bert> {
    let dir = std::env::var("NNSIGHT_MINILM_DIR")
        .expect("NNSIGHT_MINILM_DIR is not set: run `cargo xtask setup` (.cargo/config.toml points it at the model)");
    LanguageModel::<Bert>::from_pretrained(dir).expect("load all-MiniLM-L6-v2")
}

/// The tiny GPT-2 of tests/fixtures/causal with a word-level tokenizer over "t0".."t999".
fn tiny_gpt2() -> LanguageModel<Gpt2> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal/gpt2");
    let vocab: std::collections::HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let wl = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let model = Gpt2::load_with(&dir, &LoadOptions { device: Device::Cpu, dtype: None, ..Default::default() }).unwrap();
    LanguageModel::from_parts(model, tok, Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Bench-local models

/// Exactly the Python figures' tiny model: one `Linear(4, 4)` applied twice.
struct LinTwice {
    lin: Hooked<nn::Linear>,
}

impl HookModule for LinTwice {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.lin.call(self.lin.call(x))
    }
}

/// A module that returns its input: what a hooked call costs beyond the module itself.
struct Ident;

impl HookModule for Ident {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        x
    }
}

/// Root of the micro-benchmarks. Its forward calls `marker` once, `id` `pre` times untimed,
/// then `id` `calls` times and each of `many` once, adding the time of those calls to `timed`.
struct Looper {
    marker: Hooked<Ident>,
    id: Hooked<Ident>,
    many: Vec<Hooked<Ident>>,
    pre: Cell<u64>,
    calls: Cell<u64>,
    use_many: Cell<bool>,
    timed: Cell<Duration>,
}

impl HookModule for Looper {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let mut x = self.marker.call(x);
        for _ in 0..self.pre.get() {
            x = self.id.call(x);
        }
        let t0 = Instant::now();
        if self.use_many.get() {
            for m in &self.many {
                x = black_box(m.call(black_box(x)));
            }
        } else {
            for _ in 0..self.calls.get() {
                x = black_box(self.id.call(black_box(x)));
            }
        }
        self.timed.set(self.timed.get() + t0.elapsed());
        x
    }
}

// ---------------------------------------------------------------------------------------------
// Settings and the paired runs

/// Small samples so that the whole suite takes a few minutes; medians are what we report.
fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(15)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
        .nresamples(2000)
        .without_plots()
        .configure_from_args()
}

/// Whether a group runs, by the filter given after `--` (criterion filters the cases it
/// measures; this skips the groups' set-up and paired runs too): a group runs when its name
/// contains one of the `|`-separated parts, or a part starts with it (`gpt2_t1/trace_save_1`).
fn selected(group: &str) -> bool {
    match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        None => true,
        Some(f) => f.split('|').any(|part| group.contains(part) || part.starts_with(group)),
    }
}

/// One case of a group: its id and what it runs (the result is dropped inside the timing).
type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn case<'a, R>(name: &'static str, f: impl Fn() -> R + 'a) -> Case<'a> {
    (name, Box::new(move || drop(black_box(f()))))
}

/// Criterion measures each case of the group in turn; then the paired runs measure them
/// interleaved (see [`paired`]).
fn run_group(c: &mut Criterion, name: &str, cases: &[Case<'_>], heavy: bool, rounds: usize) {
    if !selected(name) {
        return;
    }
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat);
    if heavy {
        g.sample_size(10).measurement_time(Duration::from_secs(2));
    }
    for (id, f) in cases {
        g.bench_function(*id, |b| b.iter(f));
    }
    g.finish();
    paired(name, cases, rounds);
}

/// Where the paired runs' results go: `<target>/interleave-paired/<group>.json`.
fn paired_dir() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("interleave-paired")
}

/// Minor page faults of this process so far (`/proc/self/stat`, field 10): memory the allocator
/// had given back to the kernel and takes again.
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().nth(7).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Ratios that survive a busy machine: `rounds` rounds, each timing every case once (a batch of
/// calls lasting >= 2 ms), in an order rotated each round; a case's ratio is the median over
/// rounds of its time / the first case's time in the same round. Load that comes and goes
/// (another engineer's build on a 2-core machine) then hits both sides of a ratio alike, which
/// criterion's one-case-after-the-other runs cannot promise. Printed and written as JSON for
/// `benches/report.py`.
fn paired(group: &str, cases: &[Case<'_>], rounds: usize) {
    let rounds = std::env::var("PAIRED_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(rounds).max(1);
    let reps: Vec<u32> = cases
        .iter()
        .map(|(_, f)| {
            f();
            let t0 = Instant::now();
            f();
            let once = t0.elapsed().as_secs_f64();
            (0.002 / once).ceil().clamp(1.0, 100_000.0) as u32
        })
        .collect();
    let n = cases.len();
    let mut times = vec![Vec::with_capacity(rounds); n];
    let mut faults = vec![0u64; n];
    for r in 0..rounds {
        for k in 0..n {
            let i = (r + k) % n;
            let f0 = minor_faults();
            let t0 = Instant::now();
            for _ in 0..reps[i] {
                (cases[i].1)();
            }
            times[i].push(t0.elapsed().as_secs_f64() / reps[i] as f64);
            faults[i] += minor_faults().saturating_sub(f0);
        }
    }
    let mut json = String::from("{\n");
    println!("paired ({rounds} rounds, interleaved) {group}:");
    for i in 0..n {
        let mut ratios: Vec<f64> = (0..rounds).map(|r| times[i][r] / times[0][r]).collect();
        let ratio = median(&mut ratios);
        let (lo, hi) = (ratios[rounds / 4], ratios[(3 * rounds) / 4]);
        let med_ns = median(&mut times[i].clone()) * 1e9;
        let per_call = faults[i] as f64 / (rounds as f64 * reps[i] as f64);
        println!(
            "  {:<28} median {:>12.0} ns   ratio to {} {ratio:.4} (quartiles {lo:.4} .. {hi:.4})   {per_call:.1} page faults/call",
            cases[i].0, med_ns, cases[0].0
        );
        let per_round: Vec<String> = times[i].iter().map(|t| format!("{:.1}", t * 1e9)).collect();
        json.push_str(&format!(
            "  \"{}\": {{\"reps\": {}, \"minor_faults_per_call\": {per_call:.2}, \"times_ns\": [{}]}}{}\n",
            cases[i].0,
            reps[i],
            per_round.join(", "),
            if i + 1 < n { "," } else { "" }
        ));
    }
    json.push_str("}\n");
    let dir = paired_dir();
    // `PAIRED_TAG=run2` writes `<group>.run2.json` beside the main file: further processes of
    // the same group, which `benches/report.py` combines (see the module docs).
    let file = match std::env::var("PAIRED_TAG") {
        Ok(tag) if !tag.is_empty() => format!("{group}.{tag}.json"),
        _ => format!("{group}.json"),
    };
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join(file), json)) {
        eprintln!("cannot write the paired results to {}: {e}", dir.display());
    }
}

// ---------------------------------------------------------------------------------------------
// MiniLM

/// What the plain-tch-by-hand cases do at each encoder layer.
#[derive(Clone, Copy, PartialEq)]
enum Layers {
    /// Keep every layer's output (the work of saving them, without a trace).
    Keep,
    /// Replace every layer's output with itself times 1.0 (the work of the swaps).
    TimesOne,
}

/// MiniLM's forward written out in plain tch under `no_grad` (embeddings, mask, the layers in
/// turn; no trace), doing `what` at every layer: the baseline that does the same tensor work
/// as a trace saving or swapping every layer. Returns the kept outputs, then the last hidden state.
fn by_hand(model: &LanguageModel<Bert>, input: &(Tensor, Tensor, Tensor), what: Layers) -> Vec<Tensor> {
    tch::no_grad(|| {
        let mut h = model.embeddings.call((input.0.shallow_clone(), input.2.shallow_clone()));
        let mask = nnsight::models::bert::extended_attention_mask(&input.1, h.kind());
        let mut kept = Vec::new();
        for layer in &model.encoder.layer {
            h = layer.call((h, mask.shallow_clone()));
            match what {
                Layers::Keep => kept.push(h.shallow_clone()),
                Layers::TimesOne => h = &h * 1.0,
            }
        }
        kept.push(h);
        kept
    })
}

/// Runs `f` with the linear layers' `kernel` set, restoring the previous one.
fn with_kernel<R>(kernel: LinearKernel, f: impl FnOnce() -> R) -> R {
    let before = set_linear_kernel(kernel);
    let out = f();
    set_linear_kernel(before);
    out
}

/// The root call on the tokenized `texts` with the default linear kernel (`Auto`: measured per
/// shape class at first use), with libtorch's (MKL, PyTorch's) and with oneDNN's.
fn minilm_kernels(c: &mut Criterion, model: &LanguageModel<Bert>, name: &str, texts: &[&str]) {
    if !selected(name) {
        return;
    }
    tch::set_num_threads(1);
    let input = model.root().text_input(&model.tokenize(texts).unwrap());
    let call = || {
        let x = (input.0.shallow_clone(), input.1.shallow_clone(), input.2.shallow_clone());
        tch::no_grad(|| model.root().call(black_box(x)))
    };
    let with_libtorch = || with_kernel(LinearKernel::Libtorch, call);
    let with_one_dnn = || with_kernel(LinearKernel::OneDnn, call);
    let diff = f64::try_from((call() - with_libtorch()).abs().max()).unwrap();
    assert!(diff < 1e-4, "the kernels agree to rounding: max diff {diff}");
    let diff = f64::try_from((with_one_dnn() - with_libtorch()).abs().max()).unwrap();
    assert!(diff < 1e-4, "the kernels agree to rounding: max diff {diff}");
    print_choices(name);
    let cases = [
        case("plain_call_pretokenized", call),
        case("plain_call_pretokenized_libtorch_linear", with_libtorch),
        case("plain_call_pretokenized_onednn_linear", with_one_dnn),
    ];
    let big = texts.len() > 2;
    run_group(c, name, &cases, big, if big { 10 } else { 300 });
}

/// Prints what `LinearKernel::Auto` measured so far (shape class, best times, choice).
fn print_choices(group: &str) {
    for ch in nnsight::models::linear::linear_choices() {
        let k = ch.class;
        println!(
            "{group}: Auto measured [{} rows, {} -> {}] ({} threads): libtorch {:?}, oneDNN {:?}, oneDNN faster in {}/{} rounds -> {}",
            k.rows, k.in_features, k.out_features, k.threads, ch.libtorch, ch.one_dnn, ch.one_dnn_wins, ch.rounds,
            if ch.chose_one_dnn { "oneDNN" } else { "libtorch" }
        );
    }
}

/// The linear layers of a 124M-parameter GPT-2 / Llama-sized block (hidden 768, MLP 3072) on
/// `rows` tokens, random weights made here: `[rows, 768]` through 768 -> 2304 (fused q, k, v),
/// 768 -> 768, 768 -> 3072 and 3072 -> 768, once each per iteration, with each kernel.
fn linear_shapes(c: &mut Criterion, name: &str, rows: i64) {
    if !selected(name) {
        return;
    }
    tch::set_num_threads(1);
    tch::manual_seed(3);
    let o = (Kind::Float, Device::Cpu);
    let layers: Vec<(Tensor, Tensor, Tensor)> = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
        .into_iter()
        .map(|(i, out)| (Tensor::randn([rows, i], o), Tensor::randn([out, i], o) * (1.0 / (i as f64).sqrt()), Tensor::randn([out], o)))
        .collect();
    let all = || {
        tch::no_grad(|| {
            layers.iter().map(|(x, w, b)| nnsight::models::linear::linear(x, w, Some(b))).collect::<Vec<_>>()
        })
    };
    all();
    print_choices(name);
    let cases = [
        case("auto", all),
        case("libtorch", || with_kernel(LinearKernel::Libtorch, all)),
        case("onednn", || with_kernel(LinearKernel::OneDnn, all)),
    ];
    run_group(c, name, &cases, rows > 256, if rows > 256 { 20 } else { 100 });
}

/// A trace saving the 6 layer outputs of MiniLM.
fn save_every_layer(model: &LanguageModel<Bert>, input: impl IntoInvoke<LanguageModel<Bert>>) -> Vec<Tensor> {
    trace!(model, input, {
        let mut v = Vec::new();
        for l in 0..6 {
            v.push(model.encoder.layer[l].output.save());
        }
        v
    })
    .unwrap()
}

/// A trace swapping every layer's output for itself times 1.0, saving the last one.
fn swap_every_layer(model: &LanguageModel<Bert>, input: impl IntoInvoke<LanguageModel<Bert>>) -> Tensor {
    trace!(model, input, {
        for l in 0..6 {
            model.encoder.layer[l].output = model.encoder.layer[l].output * 1.0;
        }
        model.encoder.layer[5].output.save()
    })
    .unwrap()
}

fn minilm_group(c: &mut Criterion, model: &LanguageModel<Bert>, name: &str, texts: &[&str], threads: i32) {
    if !selected(name) {
        return;
    }
    tch::set_num_threads(threads);
    let batch = model.tokenize(texts).unwrap();
    let input = model.root().text_input(&batch);
    let reference = model.forward(texts).unwrap();
    // Each on text (tokenized inside the trace) and on the batch tokenized once (what Python
    // nnsight's figures time: its traces of the wrapped BertModel take tensors tokenized
    // beforehand).
    let save_all = || save_every_layer(model, black_box(texts));
    let swap_all = || swap_every_layer(model, black_box(texts));
    let save_all_pre = || save_every_layer(model, black_box(&batch));
    let swap_all_pre = || swap_every_layer(model, black_box(&batch));
    assert!(save_all()[5].equal(&reference), "layer 5 output = last hidden state");
    assert!(swap_all().equal(&reference), "x * 1.0 swaps leave the output unchanged");
    assert!(save_all_pre()[5].equal(&reference), "pre-tokenized: layer 5 output = last hidden state");
    assert!(swap_all_pre().equal(&reference), "pre-tokenized: x * 1.0 swaps leave the output unchanged");
    assert!(by_hand(model, &input, Layers::Keep)[5].equal(&reference), "by hand: layer 5 output = last hidden state");
    assert!(by_hand(model, &input, Layers::TimesOne)[0].equal(&reference), "by hand: x * 1.0 leaves the output unchanged");
    let cases = [
        case("plain_forward", || model.forward(black_box(texts)).unwrap()),
        case("plain_keep_all_by_hand", || by_hand(model, &input, Layers::Keep)),
        case("plain_swap_all_by_hand", || by_hand(model, &input, Layers::TimesOne)),
        case("plain_call_pretokenized", || {
            let x = (input.0.shallow_clone(), input.1.shallow_clone(), input.2.shallow_clone());
            tch::no_grad(|| model.root().call(black_box(x)))
        }),
        case("tokenize", || model.tokenize(black_box(texts)).unwrap()),
        case("trace_empty", || trace!(model, black_box(texts), {}).unwrap()),
        case("trace_read_unsaved", || {
            trace!(model, black_box(texts), {
                let _unused = model.encoder.layer[5].output;
            })
            .unwrap()
        }),
        case("trace_save_1", || trace!(model, black_box(texts), { model.encoder.layer[2].output.save() }).unwrap()),
        case("trace_save_all", save_all),
        case("trace_swap_all", swap_all),
        case("trace_empty_pretokenized", || trace!(model, black_box(&batch), {}).unwrap()),
        case("trace_save_1_pretokenized", || trace!(model, black_box(&batch), { model.encoder.layer[2].output.save() }).unwrap()),
        case("trace_save_all_pretokenized", save_all_pre),
        case("trace_swap_all_pretokenized", swap_all_pre),
    ];
    let big = texts.len() > 2;
    // Batch 2: 300 rounds, so that the median time above the plain forward (tens of µs on a
    // 9 ms forward) is known to a few hundredths of a ms within this process.
    run_group(c, name, &cases, big, if big { 10 } else { 300 });
}

fn minilm_invokes(c: &mut Criterion, model: &LanguageModel<Bert>, s: &[&str]) {
    let name = "minilm_invokes_t1";
    if !selected(name) {
        return;
    }
    tch::set_num_threads(1);
    let ten = &s[..10];
    let one = || trace!(model, black_box(ten), { model.encoder.layer[5].output.save() }).unwrap();
    let many = || {
        trace!(model, {
            invoke(ten[0]) { let o0 = model.encoder.layer[5].output.save(); }
            invoke(ten[1]) { let o1 = model.encoder.layer[5].output.save(); }
            invoke(ten[2]) { let o2 = model.encoder.layer[5].output.save(); }
            invoke(ten[3]) { let o3 = model.encoder.layer[5].output.save(); }
            invoke(ten[4]) { let o4 = model.encoder.layer[5].output.save(); }
            invoke(ten[5]) { let o5 = model.encoder.layer[5].output.save(); }
            invoke(ten[6]) { let o6 = model.encoder.layer[5].output.save(); }
            invoke(ten[7]) { let o7 = model.encoder.layer[5].output.save(); }
            invoke(ten[8]) { let o8 = model.encoder.layer[5].output.save(); }
            invoke(ten[9]) {
                let o9 = model.encoder.layer[5].output.save();
                vec![o0, o1, o2, o3, o4, o5, o6, o7, o8, o9]
            }
        })
        .unwrap()
    };
    let (a, b) = (one(), many());
    assert!(Tensor::cat(&b, 0).equal(&a), "10 invokes see the rows of the 10-sentence batch");
    let cases = [
        case("plain_forward", || model.forward(black_box(ten)).unwrap()),
        case("one_invoke_10_sentences", one),
        case("ten_invokes_1_sentence", many),
    ];
    run_group(c, name, &cases, true, 20);
}

// ---------------------------------------------------------------------------------------------
// Tiny GPT-2

fn gpt2(c: &mut Criterion) {
    let name = "gpt2_t1";
    if !selected(name) {
        return;
    }
    tch::set_num_threads(1);
    let model = tiny_gpt2();
    let text = "t17 t254 t3 t998 t512 t77 t42";
    let texts = [text];
    let prompt: Vec<i64> = vec![17, 254, 3, 998, 512, 77, 42];
    let batch = model.tokenize(&texts).unwrap();
    let input = model.root().text_input(&batch);
    let reference = model.forward(&texts).unwrap();
    let n_layer = model.transformer.h.len();

    let swap_all = || {
        trace!(model, black_box(text), {
            for l in 0..n_layer {
                model.transformer.h[l].output = model.transformer.h[l].output * 1.0;
            }
            model.output.save()
        })
        .unwrap()
    };
    assert!(swap_all().equal(&reference));
    let options = GenerateOptions { max_new_tokens: 20, stop_at_eos: false, ..Default::default() };
    let plain = || model.generate(black_box(prompt.clone()), options.clone()).unwrap();
    let traced = |tokens: &mut Option<Tensor>| {
        generate!(model, black_box(prompt.clone()), max_new_tokens = 20, stop_at_eos = false, tokens = tokens, {
            let mut v = Vec::new();
            for step in 0..20 {
                v.push(model.lm_head.at(step).output.save());
            }
            v
        })
        .unwrap()
    };
    let mut tokens = None;
    let logits = traced(&mut tokens);
    assert_eq!(logits.len(), 20);
    assert!(tokens.unwrap().equal(&plain()), "traced generation makes the same tokens");

    let cases = [
        case("plain_forward", || model.forward(black_box(&texts)).unwrap()),
        case("plain_call_pretokenized", || {
            let x = (input.0.shallow_clone(), input.1.shallow_clone(), input.2.shallow_clone(), input.3.clone());
            tch::no_grad(|| model.root().call(black_box(x)))
        }),
        case("tokenize", || model.tokenize(black_box(&texts)).unwrap()),
        case("trace_empty", || trace!(model, black_box(text), {}).unwrap()),
        case("trace_read_unsaved", || {
            trace!(model, black_box(text), {
                let _unused = model.transformer.h[1].output;
            })
            .unwrap()
        }),
        case("trace_save_1", || trace!(model, black_box(text), { model.transformer.h[0].output.save() }).unwrap()),
        case("trace_save_all", || {
            trace!(model, black_box(text), {
                let mut v = Vec::new();
                for l in 0..n_layer {
                    v.push(model.transformer.h[l].output.save());
                }
                v
            })
            .unwrap()
        }),
        case("trace_swap_all", swap_all),
    ];
    run_group(c, name, &cases, false, 100);
    let cases = [case("generate_plain", plain), case("generate_traced", || traced(&mut None))];
    run_group(c, "gpt2_generate_t1", &cases, false, 100);
}

// ---------------------------------------------------------------------------------------------
// Tiny Linear(4, 4) x 2 (the Python figures' model)

fn tiny_linear(c: &mut Criterion) {
    let name = "tiny_linear_t1";
    if !selected(name) {
        return;
    }
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let model = Hooked::with_path(
        "",
        LinTwice { lin: Hooked::new(&(&p / "lin"), nn::linear(&p / "lin", 4, 4, Default::default())) },
    );
    let x = Tensor::randn([1, 4], (Kind::Float, Device::Cpu));
    let cases = [
        case("plain_forward", || tch::no_grad(|| model.call(black_box(x.shallow_clone())))),
        case("trace_empty", || trace!(model, black_box(&x), {}).unwrap()),
        case("trace_save", || trace!(model, black_box(&x), { model.lin.output.save() }).unwrap()),
        case("trace_swap_save", || {
            trace!(model, black_box(&x), {
                model.lin.output = model.lin.output * 1.0;
                model.output.save()
            })
            .unwrap()
        }),
    ];
    run_group(c, name, &cases, false, 100);
}

// ---------------------------------------------------------------------------------------------
// Micro-benchmarks of the interleaver

/// Runs `traces` traces built by `build` (which sets up the model's `Looper` counters), and
/// returns the time `Looper` measured around its timed calls, scaled to `iters` iterations of
/// `per_trace` each.
fn timed_traces(model: &Hooked<Looper>, iters: u64, per_trace: u64, mut run: impl FnMut()) -> Duration {
    let traces = iters.div_ceil(per_trace).max(1);
    model.timed.set(Duration::ZERO);
    for _ in 0..traces {
        run();
    }
    let total = model.timed.get();
    total.mul_f64(iters as f64 / (traces * per_trace) as f64)
}

/// One read of `id`'s output followed by `n` apply nodes `|t| t.shallow_clone()`; the last is saved.
fn chain<'e>(tr: &mut Tracer<'e, Hooked<Looper>>, model: &'e Hooked<Looper>, x: &Tensor, n: usize) -> Saved<Tensor> {
    let gr = tr.invoke(x);
    let mut p = tr.output(gr, 0, || Ok(&model.id));
    for _ in 0..n {
        p = tr.apply1(p, |t: &Tensor| t.shallow_clone());
    }
    tr.save(p)
}

fn micro(c: &mut Criterion) {
    if !selected("micro") {
        return;
    }
    tch::set_num_threads(1);
    const MANY: usize = 64;
    const CHAIN: usize = 1000;
    let model = Hooked::with_path(
        "",
        Looper {
            marker: Hooked::with_path("marker", Ident),
            id: Hooked::with_path("id", Ident),
            many: (0..MANY).map(|i| Hooked::with_path(format!("many.{i}"), Ident)).collect(),
            pre: Cell::new(0),
            calls: Cell::new(0),
            use_many: Cell::new(false),
            timed: Cell::new(Duration::ZERO),
        },
    );
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let mut g = c.benchmark_group("micro");
    g.warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_millis(700));

    let mut slot = Some(x.shallow_clone());
    g.bench_function("direct_forward", |b| {
        b.iter(|| {
            let t = slot.take().unwrap();
            slot = Some(black_box(HookModule::forward(model.id.inner(), black_box(t))));
        })
    });
    g.bench_function("call_no_trace", |b| {
        b.iter(|| {
            let t = slot.take().unwrap();
            slot = Some(black_box(model.id.call(black_box(t))));
        })
    });

    // What a read does to a tensor, in libtorch (through tch): `narrow` (a view), `shallow_clone`,
    // and `size` (a `Vec` from the C API).
    g.bench_function("tch_narrow", |b| b.iter(|| black_box(&x).narrow(0, 0, 1)));
    g.bench_function("tch_shallow_clone", |b| b.iter(|| black_box(&x).shallow_clone()));
    g.bench_function("tch_size", |b| b.iter(|| black_box(&x).size()));

    // A whole trace with no node, on the identity model (which calls `marker` once): the fixed
    // cost of a trace, beside the same root call under `no_grad` without a trace.
    model.pre.set(0);
    model.calls.set(0);
    model.use_many.set(false);
    g.bench_function("root_call_no_grad", |b| b.iter(|| tch::no_grad(|| model.call(black_box(x.shallow_clone())))));
    g.bench_function("trace_empty", |b| b.iter(|| trace!(model, black_box(&x), {}).unwrap()));

    // A trace is active; `id` is not in the graph (only `marker` is).
    g.bench_function("call_traced_module_not_in_graph", |b| {
        b.iter_custom(|iters| {
            model.pre.set(0);
            model.calls.set(iters);
            model.use_many.set(false);
            timed_traces(&model, iters, iters, || {
                let mut tr = Tracer::new(&model);
                let gr = tr.invoke(&x);
                let _ = tr.output(gr, 0, || Ok(&model.marker));
                tr.finish(()).unwrap();
            })
        })
    });

    // `id` is in the graph, read at call 0 (untimed); the timed calls 1.. have no effect.
    g.bench_function("call_traced_module_other_call", |b| {
        b.iter_custom(|iters| {
            model.pre.set(1);
            model.calls.set(iters);
            model.use_many.set(false);
            timed_traces(&model, iters, iters, || {
                let mut tr = Tracer::new(&model);
                let gr = tr.invoke(&x);
                let _ = tr.output(gr, Call::At(0), || Ok(&model.id));
                tr.finish(()).unwrap();
            })
        })
    });

    // 64 modules called once each, each with one unsaved read of its output.
    g.bench_function("call_traced_one_read", |b| {
        b.iter_custom(|iters| {
            model.pre.set(0);
            model.use_many.set(true);
            timed_traces(&model, iters, MANY as u64, || {
                let mut tr = Tracer::new(&model);
                let gr = tr.invoke(&x);
                for i in 0..MANY {
                    let _ = tr.output(gr, 0, || model.many.module_at(i as i64));
                }
                tr.finish(()).unwrap();
            })
        })
    });

    // A chain of 1,000 apply nodes from `id`'s output; timed: the call of `id` (its read and
    // the whole chain run inside it).
    g.bench_function("node_run", |b| {
        b.iter_custom(|iters| {
            model.pre.set(0);
            model.calls.set(1);
            model.use_many.set(false);
            timed_traces(&model, iters, CHAIN as u64, || {
                let mut tr = Tracer::new(&model);
                let s = chain(&mut tr, &model, &x, CHAIN);
                let _ = black_box(tr.finish(s).unwrap());
            })
        })
    });
    g.bench_function("node_build_and_run", |b| {
        b.iter_custom(|iters| {
            model.pre.set(0);
            model.calls.set(1);
            model.use_many.set(false);
            let traces = iters.div_ceil(CHAIN as u64).max(1);
            let t0 = Instant::now();
            for _ in 0..traces {
                let mut tr = Tracer::new(&model);
                let s = chain(&mut tr, &model, &x, CHAIN);
                let _ = black_box(tr.finish(s).unwrap());
            }
            t0.elapsed().mul_f64(iters as f64 / (traces * CHAIN as u64) as f64)
        })
    });
    g.finish();
}

fn main() {
    let all_threads = tch::get_num_threads();
    let mut c = criterion();
    let model = minilm();
    let s32 = sentences32();
    let s32: Vec<&str> = s32.iter().map(String::as_str).collect();
    tiny_linear(&mut c);
    micro(&mut c);
    gpt2(&mut c);
    minilm_group(&mut c, &model, "minilm_b2_t1", &[PARIS, ROME], 1);
    minilm_kernels(&mut c, &model, "minilm_b2_t1_kernel", &[PARIS, ROME]);
    minilm_kernels(&mut c, &model, "minilm_b32_t1_kernel", &s32);
    linear_shapes(&mut c, "linear_768_r128_t1", 128);
    linear_shapes(&mut c, "linear_768_r1024_t1", 1024);
    minilm_group(&mut c, &model, "minilm_b2_tall", &[PARIS, ROME], all_threads);
    minilm_invokes(&mut c, &model, &s32);
    minilm_group(&mut c, &model, "minilm_b32_t1", &s32, 1);
    minilm_group(&mut c, &model, "minilm_b32_tall", &s32, all_threads);
    tch::set_num_threads(all_threads);
    println!("libtorch threads: 1 for *_t1 groups, {all_threads} for *_tall groups");
    c.final_summary();
}
