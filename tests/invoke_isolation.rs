//! Invokes never leak into each other: every intervention gives the value a plain computation
//! gives, or a clear error. Declared batch layouts, values shared by every row, the whole-batch
//! form (statements outside the invokes), and the declarations of the bundled models.
//!
//! Right values come from plain tch (the models' modules called outside any trace, or by hand),
//! never from the code under test.

mod common;

use std::collections::HashMap;

use common::minilm::{minilm, PARIS, ROME};
use nnsight::models::bert::extended_attention_mask;
use nnsight::models::causal::{CausalLm, LoadOptions};
use nnsight::models::gpt2::Gpt2;
use nnsight::models::llama::Llama;
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{Bert, Error, GenerateOptions, Generator, Group, LanguageModel, Layout, TextModel, Tracer};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

// ----- MiniLM: the position embeddings are one [1, seq, hidden] table for every row ----------

/// MiniLM's last hidden state computed by hand from its modules (no trace active, so no hook
/// runs), with the position embeddings multiplied by `pos_scale`.
fn minilm_by_hand(model: &LanguageModel<Bert>, texts: &[&str], pos_scale: f64) -> Tensor {
    let b = model.tokenize(texts).unwrap();
    tch::no_grad(|| {
        let e = &model.embeddings;
        let seq = b.seq_len();
        let pos = e.position_embeddings.call(Tensor::arange(seq, (Kind::Int64, Device::Cpu)).unsqueeze(0)) * pos_scale;
        let h = e.word_embeddings.call(b.input_ids.shallow_clone()) + e.token_type_embeddings.call(b.token_type_ids.shallow_clone()) + pos;
        let h = e.LayerNorm.call(h);
        model.encoder.call((h, extended_attention_mask(&b.attention_mask, Kind::Float)))
    })
}

#[test]
fn an_invoke_cannot_edit_or_swap_the_shared_position_embeddings() {
    let model = minilm();
    let clean = tch::no_grad(|| model.forward(&[PARIS, ROME])).unwrap();
    let err = trace!(model, {
        invoke(PARIS) { let a = model.encoder.layer[5].output.save(); }
        invoke(ROME) {
            model.embeddings.position_embeddings.output[..] = 0.0;
            a
        }
    })
    .unwrap_err();
    assert!(matches!(err, Error::SharedChange { .. }), "{err}");
    let msg = err.to_string();
    for part in [
        "cannot change `embeddings.position_embeddings.output` (call 0) from invoke 1",
        "Tensor[1, 14, 384] Float Cpu (declared shared (no batch axis))",
        "shared by all 2 rows of the batch",
        "the in-place edit by node",
        "with a single invoke, or with statements written outside the invoke blocks",
    ] {
        assert!(msg.contains(part), "`{part}` missing from: {msg}");
    }
    // A swap at the same point is refused the same way.
    let err = trace!(model, {
        invoke(PARIS) {}
        invoke(ROME) {
            model.embeddings.position_embeddings.output = model.embeddings.position_embeddings.output * 0.0;
        }
    })
    .unwrap_err();
    assert!(err.to_string().contains("so the swap with node"), "{err}");
    assert!(err.to_string().contains("`embeddings.position_embeddings.output` (call 0) from invoke 1"), "{err}");
    // Nothing stays changed: the next plain forward is bit-identical.
    assert!(tch::no_grad(|| model.forward(&[PARIS, ROME])).unwrap().equal(&clean));
}

#[test]
fn every_invoke_reads_the_whole_shared_table() {
    let model = minilm();
    let (p0, p1) = trace!(model, {
        invoke(PARIS) { let p0 = model.embeddings.position_embeddings.output.save(); }
        invoke(ROME) { (p0, model.embeddings.position_embeddings.output.save()) }
    })
    .unwrap();
    // The table's first 14 rows (positions 0..14), read from the weights directly.
    let want = model.embeddings.position_embeddings.ws.narrow(0, 0, 14).unsqueeze(0);
    assert!(p0.equal(&want) && p1.equal(&want));
}

#[test]
fn statements_outside_the_invokes_change_every_row() {
    let model = minilm();
    let (a, b, whole) = trace!(model, {
        invoke(PARIS) { let a = model.encoder.layer[5].output.save(); }
        invoke(ROME) { let b = model.encoder.layer[5].output.save(); }
        model.embeddings.position_embeddings.output[..] = 0.0;
        let whole = model.encoder.layer[5].output.save();
        (a, b, whole)
    })
    .unwrap();
    let want = minilm_by_hand(&model, &[PARIS, ROME], 0.0);
    let clean = minilm_by_hand(&model, &[PARIS, ROME], 1.0);
    assert!(max_diff(&clean, &tch::no_grad(|| model.forward(&[PARIS, ROME])).unwrap()) < 1e-5, "the by-hand forward is the model's");
    assert!(max_diff(&a, &want.narrow(0, 0, 1)) < 1e-5, "invoke 0");
    assert!(max_diff(&b, &want.narrow(0, 1, 1)) < 1e-5, "invoke 1");
    assert_eq!(whole.size(), vec![2, 14, 384], "a read outside the invokes is the whole batch");
    assert!(whole.narrow(0, 0, 1).equal(&a) && whole.narrow(0, 1, 1).equal(&b));
    assert!(max_diff(&want, &clean) > 0.1, "the edit changed the output");
}

#[test]
fn a_single_invoke_may_change_a_shared_value() {
    let model = minilm();
    let out = trace!(model, [PARIS, ROME], {
        model.embeddings.position_embeddings.output[..] = 0.0;
        model.encoder.layer[5].output.save()
    })
    .unwrap();
    assert!(max_diff(&out, &minilm_by_hand(&model, &[PARIS, ROME], 0.0)) < 1e-5);
}

// ----- a user model that flattens the batch before a linear layer --------------------------

/// `lin` sees the batch flattened: `[batch * 3, 4]`.
#[derive(ModuleTree)]
struct Flat {
    lin: Hooked<nn::Linear>,
}

impl HookModule for Flat {
    type Input = Tensor; // [batch, 3, 4]
    type Output = Tensor; // [batch, 3, 4]
    fn forward(&self, x: Tensor) -> Tensor {
        let b = x.size()[0];
        self.lin.call(x.reshape([b * 3, 4])).reshape([b, 3, 4])
    }
}

fn flat(vs: &nn::VarStore, layout: Option<Layout>) -> Hooked<Flat> {
    tch::manual_seed(3);
    let p = vs.root();
    let lin = Hooked::new(&(&p / "lin"), nn::linear(&p / "lin", 4, 4, Default::default()));
    let lin = match layout {
        Some(l) => lin.with_layouts(l, l),
        None => lin,
    };
    Hooked::with_path("", Flat { lin })
}

fn rows3(seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([1, 3, 4], (Kind::Float, Device::Cpu))
}

#[test]
fn a_flattened_batch_is_shared_unless_declared() {
    let vs = nn::VarStore::new(Device::Cpu);
    let (x0, x1) = (rows3(10), rows3(11));
    let plain = |m: &Hooked<Flat>| tch::no_grad(|| nn::Module::forward(m.lin.inner(), &Tensor::cat(&[&x0, &x1], 0).reshape([6, 4])));

    // Undeclared: `[6, 4]` with a batch of 2 is shared (dim 0 is not the batch size).
    let m = flat(&vs, None);
    let err = trace!(m, {
        invoke(&x0) { m.lin.output[..] = 0.0; }
        invoke(&x1) { m.output.save() }
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("cannot change `lin.output` (call 0) from invoke 0"), "{msg}");
    assert!(msg.contains("Tensor[6, 4] Float Cpu (dim 0 is 6, not the batch size 2, so the dim-0 default treats it as shared)"), "{msg}");
    // Reading it is allowed, and gives the whole tensor (documented).
    let seen = trace!(m, {
        invoke(&x0) {}
        invoke(&x1) { m.lin.output.save() }
    })
    .unwrap();
    assert!(seen.equal(&plain(&m)));

    // Declared `Flattened(0)`: each invoke has its 3 rows of `[6, 4]`.
    let m = flat(&vs, Some(Layout::Flattened(0)));
    let (out0, out1, seen1) = trace!(m, {
        invoke(&x0) {
            m.lin.output[..] = 0.0;
            let out0 = m.output.save();
        }
        invoke(&x1) { (out0, m.output.save(), m.lin.output.save()) }
    })
    .unwrap();
    let clean = plain(&m);
    assert!(seen1.equal(&clean.narrow(0, 3, 3)), "invoke 1 sees its rows 3..6");
    assert!(out1.equal(&clean.narrow(0, 3, 3).reshape([1, 3, 4])), "invoke 1 unchanged");
    assert!(out0.equal(&Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu))), "invoke 0 zeroed");

    // Declared `Batch(0)`, which does not fit `[6, 4]`: an error naming the hook point.
    let m = flat(&vs, Some(Layout::Batch(0)));
    let err = trace!(m, {
        invoke(&x0) { let h = m.lin.output.save(); }
        invoke(&x1) { h }
    })
    .unwrap_err();
    assert!(matches!(err, Error::Layout { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "the batch layout declared for `lin.output` (call 0) does not fit its value: axis 0 of Tensor[6, 4] Float Cpu is declared \
         the batch axis but has size 6, and the batch has 2 rows (declared: batch axis 0; value: Tensor[6, 4] Float Cpu)"
    );
}

// ----- a tuple output with a statistic of the whole batch ---------------------------------

/// `(h [batch, 4], mean of h over the batch [1, 4])`.
struct Stats;

impl HookModule for Stats {
    type Input = Tensor;
    type Output = (Tensor, Tensor);
    fn forward(&self, h: Tensor) -> (Tensor, Tensor) {
        let m = h.mean_dim(0, true, Kind::Float);
        (h, m)
    }
}

#[derive(ModuleTree)]
struct Net {
    pre: Hooked<nn::Linear>,
    #[module(skip)]
    st: Hooked<Stats>,
    post: Hooked<nn::Linear>,
}

impl HookModule for Net {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let (h, m) = self.st.call(self.pre.call(x));
        self.post.call(h + m)
    }
}

fn net(vs: &nn::VarStore, declared: bool) -> Hooked<Net> {
    tch::manual_seed(4);
    let p = vs.root();
    let st = Hooked::new(&(&p / "st"), Stats);
    let st = if declared { st.with_layouts(Layout::Batch(0), Layout::Tuple(&[Layout::Batch(0), Layout::Shared])) } else { st };
    Hooked::with_path(
        "",
        Net {
            pre: Hooked::new(&(&p / "pre"), nn::linear(&p / "pre", 4, 4, Default::default())),
            st,
            post: Hooked::new(&(&p / "post"), nn::linear(&p / "post", 4, 4, Default::default())),
        },
    )
}

/// `post(h + m)` by hand, with `m` the batch mean of `h = pre(x)` or `fixed`.
fn net_by_hand(m: &Hooked<Net>, x: &Tensor, fixed: Option<f64>) -> Tensor {
    tch::no_grad(|| {
        let h = nn::Module::forward(m.pre.inner(), x);
        let mean = match fixed {
            Some(v) => Tensor::full([1, 4], v, (Kind::Float, Device::Cpu)),
            None => h.mean_dim(0, true, Kind::Float),
        };
        nn::Module::forward(m.post.inner(), &(h + mean))
    })
}

#[test]
fn the_batch_statistic_of_a_tuple_output_is_shared() {
    let vs = nn::VarStore::new(Device::Cpu);
    let xs: Vec<Tensor> = (0..3).map(|i| common::tiny::input(1, 20 + i)).collect();
    let x = Tensor::cat(&xs, 0);
    for declared in [false, true] {
        let m = net(&vs, declared);
        let err = trace!(m, {
            invoke(&xs[0]) {}
            invoke(&xs[1]) { m.st.output.1[..] = 5.0; }
            invoke(&xs[2]) { m.st.output.1.save() }
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot change `st.output` (call 0) from invoke 1: Tensor[1, 4] Float Cpu"), "{msg}");

        // Written outside the invokes, the edit applies to every row.
        let (o0, o2) = trace!(m, {
            invoke(&xs[0]) { let o0 = m.output.save(); }
            invoke(&xs[1]) {}
            invoke(&xs[2]) { let o2 = m.output.save(); }
            m.st.output.1[..] = 5.0;
            (o0, o2)
        })
        .unwrap();
        let want = net_by_hand(&m, &x, Some(5.0));
        assert!(max_diff(&o0, &want.narrow(0, 0, 1)) < 1e-6 && max_diff(&o2, &want.narrow(0, 2, 1)) < 1e-6, "declared {declared}");

        // A swap that changes only the invoke's own rows (element 0) keeps the shared mean.
        let (o0, o1) = trace!(m, {
            invoke(&xs[0]) {
                m.st.output = (m.st.output.0 * 2.0, m.st.output.1);
                let o0 = m.output.save();
            }
            invoke(&xs[1]) { let o1 = m.output.save(); }
            invoke(&xs[2]) { (o0, o1) }
        })
        .unwrap();
        let clean = net_by_hand(&m, &x, None);
        let (h, mean) = tch::no_grad(|| {
            let h = nn::Module::forward(m.pre.inner(), &x);
            let mean = h.mean_dim(0, true, Kind::Float);
            (h, mean)
        });
        let want0 = tch::no_grad(|| nn::Module::forward(m.post.inner(), &(h.narrow(0, 0, 1) * 2.0 + &mean)));
        assert!(max_diff(&o0, &want0) < 1e-6, "invoke 0: its rows doubled, the mean of the clean batch");
        assert!(o1.equal(&clean.narrow(0, 1, 1)), "invoke 1 unchanged");
    }
}

// ----- dim 0 equal to the batch size by coincidence -----------------------------------------

/// Every row is multiplied by one `[2, 4]` table (`h @ tableᵀ`): the table belongs to every
/// row, but its dim 0 is 2, like a batch of two.
struct Table {
    w: Tensor,
}

impl HookModule for Table {
    type Input = Tensor; // ignored
    type Output = Tensor; // [2, 4], shared
    fn forward(&self, _: Tensor) -> Tensor {
        &self.w * 1.0
    }
}

#[derive(ModuleTree)]
struct Projector {
    #[module(skip)]
    table: Hooked<Table>,
}

impl HookModule for Projector {
    type Input = Tensor; // [batch, 4]
    type Output = Tensor; // [batch, 2]
    fn forward(&self, x: Tensor) -> Tensor {
        let t = self.table.call(Tensor::zeros([1], (Kind::Float, Device::Cpu)));
        x.matmul(&t.tr())
    }
}

#[test]
fn dim_0_equal_to_the_batch_size_by_coincidence_needs_a_declaration() {
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0]).view([2, 4]);
    let (x0, x1) = (common::tiny::input(1, 30), common::tiny::input(1, 31));
    let undeclared = Hooked::with_path("", Projector { table: Hooked::with_path("table", Table { w: w.shallow_clone() }) });
    // The dim-0 rule takes the [2, 4] table for two rows: invoke 0 sees "its row" [1, 4], and
    // its edit reaches the row every invoke uses. This is the documented hazard.
    let (seen, out1) = trace!(undeclared, {
        invoke(&x0) {
            let seen = undeclared.table.output.save();
            undeclared.table.output[..] = 0.0;
        }
        invoke(&x1) { (seen, undeclared.output.save()) }
    })
    .unwrap();
    assert_eq!(seen.size(), vec![1, 4]);
    let zero_row0 = Tensor::cat(&[w.narrow(0, 0, 1).zeros_like(), w.narrow(0, 1, 1)], 0);
    assert!(out1.equal(&x1.matmul(&zero_row0.tr())), "the coincidence: invoke 1 computed with the edited table");

    // Declared shared: every invoke reads the whole table, and an invoke's edit is refused.
    let declared = Hooked::with_path(
        "",
        Projector { table: Hooked::with_path("table", Table { w: w.shallow_clone() }).with_layouts(Layout::Shared, Layout::Shared) },
    );
    let seen = trace!(declared, {
        invoke(&x0) { let seen = declared.table.output.save(); }
        invoke(&x1) { seen }
    })
    .unwrap();
    assert!(seen.equal(&w));
    let err = trace!(declared, {
        invoke(&x0) { declared.table.output[..] = 0.0; }
        invoke(&x1) { declared.output.save() }
    })
    .unwrap_err();
    assert!(err.to_string().contains("Tensor[2, 4] Float Cpu (declared shared (no batch axis)) is shared by all 2 rows"), "{err}");
}

// ----- the whole-batch form on a tiny model -----------------------------------------------

#[test]
fn reads_and_swaps_outside_the_invokes_address_the_whole_batch() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = common::tiny::stack(&vs, 3);
    let (a, b) = (common::tiny::input(1, 40), common::tiny::input(2, 41));
    let x = Tensor::cat(&[&a, &b], 0);
    let layer = |i: usize, h: &Tensor| nn::Module::forward(model.layers[i].inner(), h);
    let (before, out_a, out_b, whole) = trace!(model, {
        let before = model.layers[0].output.save();          // before any invoke
        invoke(&a) { let out_a = model.output.save(); }
        invoke(&b) { let out_b = model.output.save(); }
        model.layers[1].output = model.layers[1].output * 2.0;
        (before, out_a, out_b, model.output.save())
    })
    .unwrap();
    let want = tch::no_grad(|| {
        let h0 = layer(0, &x);
        let h1 = layer(1, &h0.tanh()) * 2.0;
        (h0, layer(2, &h1.tanh()).tanh())
    });
    assert!(before.equal(&want.0));
    assert!(whole.equal(&want.1));
    assert!(out_a.equal(&want.1.narrow(0, 0, 1)) && out_b.equal(&want.1.narrow(0, 1, 2)));
}

/// A read of a hook point written after an invoke changed it sees the change, also when the
/// same point was read before the change in an overlapping group: the whole batch after an
/// invoke's edit or swap, and an invoke after a whole-batch edit. (The second read had reused
/// the first read's node and gave the value from before the change.)
#[test]
fn a_read_after_a_change_in_an_overlapping_group_sees_the_change() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = common::tiny::stack(&vs, 2);
    let (a, b) = (common::tiny::input(1, 42), common::tiny::input(2, 43));
    let x = Tensor::cat(&[&a, &b], 0);
    let layer = |i: usize, h: &Tensor| nn::Module::forward(model.layers[i].inner(), h);
    let h0 = tch::no_grad(|| layer(0, &x));
    // Rows 1..3 are invoke 1's.
    let zeroed_b = h0.copy();
    let _ = zeroed_b.narrow(0, 1, 2).fill_(0.0);

    // The whole batch, before and after invoke 1's in-place edit.
    let (before, after, n_before) = trace!(model, {
        let before = model.layers[0].output.save();
        let n_before = model.layers[0].output.abs().sum(Kind::Float).double_value(&[]);
        invoke(&a) {}
        invoke(&b) { model.layers[0].output[..] = 0.0; }
        (before, model.layers[0].output.save(), n_before)
    })
    .unwrap();
    assert!(before.equal(&h0), "the read before the edit");
    assert!(after.equal(&zeroed_b), "the read after invoke 1's edit");
    assert_eq!(n_before, h0.abs().sum(Kind::Float).double_value(&[]));

    // The same with a swap in invoke 0, and a value computed from the first read.
    let doubled_a = h0.copy();
    let _ = doubled_a.narrow(0, 0, 1).mul_(2.0);
    let (before, after) = trace!(model, {
        let before = model.layers[0].output.sum(Kind::Float).save();
        invoke(&a) { model.layers[0].output = model.layers[0].output * 2.0; }
        invoke(&b) {}
        (before, model.layers[0].output.save())
    })
    .unwrap();
    assert!(before.equal(&h0.sum(Kind::Float)) && after.equal(&doubled_a));

    // An invoke's read, a whole-batch edit, the invoke's read again (`trace!` cannot go back
    // into an invoke after the whole-batch statements; the Tracer can).
    let mut tr = Tracer::new(&model);
    let (_, gb) = (tr.invoke(&a), tr.invoke(&b));
    let first = tr.output(gb, 0, || Ok(&model.layers[0]));
    let first = tr.save(first);
    let whole = tr.output(Group::ALL, 0, || Ok(&model.layers[0]));
    let zero = tr.apply1(whole, |h: &Tensor| {
        let _ = h.shallow_clone().fill_(0.0);
        h.shallow_clone()
    });
    tr.edits(whole, zero);
    let second = tr.output(gb, 0, || Ok(&model.layers[0]));
    let second = tr.save(second);
    let (first, second): (Tensor, Tensor) = tr.finish((first, second)).unwrap();
    assert!(first.equal(&h0.narrow(0, 1, 2)), "invoke 1's read before the edit");
    assert!(second.equal(&h0.narrow(0, 1, 2).zeros_like()), "invoke 1's read after the whole-batch edit");
    // And nothing stays hooked.
    assert!(tch::no_grad(|| model.call(x.shallow_clone())).equal(&tch::no_grad(|| layer(1, &h0.tanh()).tanh())));
}

// ----- the bundled models declare every hook point ----------------------------------------

/// Word-level over "t0" .. "t999" (id = number), as in `causal_text.rs`.
fn word_tokenizer() -> Tokenizer {
    let vocab: HashMap<String, u32> = (0..1000u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok
}

fn causal<M: CausalLm + TextModel>(name: &str) -> LanguageModel<M> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name);
    let model = M::load_with(&dir, &LoadOptions { device: Device::Cpu, dtype: None, ..Default::default() }).unwrap();
    LanguageModel::from_parts(model, word_tokenizer(), Device::Cpu).unwrap()
}

/// Every hook point of the run is declared (no dim-0 default) and its declaration fits.
fn assert_all_declared(what: &str, points: &[nnsight::HookPointLayout]) {
    assert!(!points.is_empty(), "{what}: no hook point recorded");
    let bad: Vec<String> = points.iter().filter(|p| !p.is_declared_and_fits()).map(|p| p.to_string()).collect();
    assert!(bad.is_empty(), "{what}: undeclared or misfit hook points:\n{}", bad.join("\n"));
}

#[test]
fn the_bundled_models_declare_every_hook_point() {
    use nnsight::{ModuleTree, Split, Tracer};
    let model = minilm();
    for texts in [&[PARIS, ROME][..], &["a", "b c", "d e f"]] {
        let mut tr = Tracer::new(&model);
        for t in texts {
            tr.invoke(*t);
        }
        let points = tr.layouts().unwrap();
        assert_all_declared("MiniLM", &points);
        // Every module called once: an input and an output for each.
        assert_eq!(points.len(), 2 * model.modules().len());
        let pos = points.iter().find(|p| p.point == "embeddings.position_embeddings.output").unwrap();
        assert_eq!(pos.tensors[0].1, Ok(Split::Shared { declared: true }));
        let layer = points.iter().find(|p| p.point == "encoder.layer.3.inputs").unwrap();
        assert!(layer.tensors.iter().all(|(_, s)| *s == Ok(Split::Rows { axis: 0, per_row: 1 })), "{layer}");
    }

    let gpt2 = causal::<Gpt2>("gpt2");
    let llama = causal::<Llama>("llama");
    let prompts: [Vec<i64>; 2] = [vec![5, 17, 230, 9], vec![77, 3]];
    let mut tr = Tracer::new(&gpt2);
    for p in &prompts {
        tr.invoke(p.clone());
    }
    assert_all_declared("GPT-2", &tr.layouts().unwrap());
    let mut tr = Tracer::new(&llama);
    for p in &prompts {
        tr.invoke(p.clone());
    }
    assert_all_declared("Llama", &tr.layouts().unwrap());

    // Generation: later steps run with the KV cache (one new position per row).
    let options = GenerateOptions { max_new_tokens: 3, stop_at_eos: false, ..Default::default() };
    let g = Generator::new(&gpt2, options.clone());
    let mut tr = Tracer::new(&g);
    for p in &prompts {
        tr.invoke(p.clone());
    }
    let points = tr.layouts().unwrap();
    assert!(points.iter().any(|p| p.call == 2), "three generation steps");
    assert_all_declared("GPT-2 generation", &points);
    let g = Generator::new(&llama, options);
    let mut tr = Tracer::new(&g);
    for p in &prompts {
        tr.invoke(p.clone());
    }
    assert_all_declared("Llama generation", &tr.layouts().unwrap());
}
