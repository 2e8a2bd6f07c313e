//! Property tests for batch narrowing (`nnsight::Activation`) and for invoke isolation at trace
//! level.
//!
//! The right values never come from the code under test: they are the original value's own
//! rows (`x.narrow(0, ..)` of plain tch), a `Tensor::cat` of slices written out here, raw
//! pointer arithmetic on strides for "is a view", and, at trace level, the tiny model's layers
//! called directly (no `Hooked::call`) on the concatenated batch. Tensors are compared bitwise
//! (shape, dtype and raw bytes).

mod common;

use std::cell::Cell;

use common::tiny::stack;
use nnsight::tch::{nn, Device, Kind, Tensor};
use nnsight::{trace, Activation, Tracer};
use proptest::prelude::*;
use proptest::sample::Index;

// ----- helpers -----------------------------------------------------------------------------

/// Shape, dtype and raw bytes: bitwise identity (so `-0.0` differs from `0.0`).
fn bits(t: &Tensor) -> (Vec<i64>, Kind, Vec<u8>) {
    let c = t.contiguous();
    let n = c.numel();
    let mut v = vec![0u8; n * c.kind().elt_size_in_bytes()];
    if n > 0 {
        c.copy_data_u8(&mut v, n);
    }
    (c.size(), c.kind(), v)
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    bits(a) == bits(b)
}

/// Deterministic pseudo-random values (xorshift64*) in [-4, 4), so a case is reproducible from
/// its seed and independent of libtorch's global generator (other tests reseed it).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (r >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0
        })
        .collect()
}

fn rand_tensor(shape: &[i64], kind: Kind, seed: u64) -> Tensor {
    let n: i64 = shape.iter().product();
    Tensor::from_slice(&values(n as usize, seed)).reshape(shape).to_kind(kind)
}

/// Whether `narrow_batch` treats `t` as batched: dim 0 equal to the total batch size.
fn is_batched(t: &Tensor, total: i64) -> bool {
    t.defined() && t.dim() > 0 && t.size()[0] == total
}

fn leaves<A: Activation>(a: &A) -> Vec<Tensor> {
    let mut v = Vec::new();
    a.for_each_tensor(&mut |t| v.push(t.shallow_clone()));
    v
}

/// The test's own view of a value's structure: rebuild it leaf by leaf (tensors through `f`,
/// plain `i64`s through `g`), and list its plain values.
trait Case: Activation {
    fn rebuild(&self, f: &mut dyn FnMut(&Tensor) -> Tensor, g: &mut dyn FnMut(i64) -> i64) -> Self;
    fn plains(&self, out: &mut Vec<i64>);
}

impl Case for Tensor {
    fn rebuild(&self, f: &mut dyn FnMut(&Tensor) -> Tensor, _: &mut dyn FnMut(i64) -> i64) -> Self {
        f(self)
    }
    fn plains(&self, _: &mut Vec<i64>) {}
}

impl Case for i64 {
    fn rebuild(&self, _: &mut dyn FnMut(&Tensor) -> Tensor, g: &mut dyn FnMut(i64) -> i64) -> Self {
        g(*self)
    }
    fn plains(&self, out: &mut Vec<i64>) {
        out.push(*self)
    }
}

impl<A: Case, B: Case> Case for (A, B) {
    fn rebuild(&self, f: &mut dyn FnMut(&Tensor) -> Tensor, g: &mut dyn FnMut(i64) -> i64) -> Self {
        (self.0.rebuild(f, g), self.1.rebuild(f, g))
    }
    fn plains(&self, out: &mut Vec<i64>) {
        self.0.plains(out);
        self.1.plains(out);
    }
}

impl<A: Case> Case for Option<A> {
    fn rebuild(&self, f: &mut dyn FnMut(&Tensor) -> Tensor, g: &mut dyn FnMut(i64) -> i64) -> Self {
        self.as_ref().map(|a| a.rebuild(f, g))
    }
    fn plains(&self, out: &mut Vec<i64>) {
        if let Some(a) = self {
            a.plains(out)
        }
    }
}

impl<A: Case> Case for Vec<A> {
    fn rebuild(&self, f: &mut dyn FnMut(&Tensor) -> Tensor, g: &mut dyn FnMut(i64) -> i64) -> Self {
        self.iter().map(|a| a.rebuild(f, g)).collect()
    }
    fn plains(&self, out: &mut Vec<i64>) {
        self.iter().for_each(|a| a.plains(out))
    }
}

fn plains<A: Case>(a: &A) -> Vec<i64> {
    let mut v = Vec::new();
    a.plains(&mut v);
    v
}

/// A deep copy (fresh storage for every tensor).
fn deep<A: Case>(a: &A) -> A {
    a.rebuild(&mut |t| t.copy(), &mut |v| v)
}

// ----- generated inputs --------------------------------------------------------------------

/// A batch of `total` rows cut into consecutive groups; the group under test is
/// `[start, start + len)`.
#[derive(Clone, Debug)]
struct Layout {
    total: i64,
    groups: Vec<(i64, i64)>,
    start: i64,
    len: i64,
}

fn layout() -> impl Strategy<Value = Layout> {
    (1i64..=8)
        .prop_flat_map(|total| (Just(total), proptest::collection::vec(any::<bool>(), (total - 1) as usize), any::<Index>()))
        .prop_map(|(total, cuts, pick)| {
            let mut groups = Vec::new();
            let mut start = 0;
            for (i, cut) in cuts.iter().enumerate() {
                if *cut {
                    groups.push((start, i as i64 + 1 - start));
                    start = i as i64 + 1;
                }
            }
            groups.push((start, total - start));
            let (start, len) = groups[pick.index(groups.len())];
            Layout { total, groups, start, len }
        })
}

/// Dim 0 of a generated tensor.
#[derive(Clone, Copy, Debug)]
enum Dim0 {
    /// The total batch size: narrowed.
    Batch,
    /// Another size (never the total): passed through untouched.
    Other(i64),
    /// A 0-dim tensor: passed through untouched.
    Scalar,
}

#[derive(Clone, Debug)]
struct TSpec {
    dim0: Dim0,
    trailing: Vec<i64>,
    kind: Kind,
    /// Built transposed (dim 0 not the outermost in memory): narrowing must still be a view.
    transposed: bool,
    seed: u64,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Float), Just(Kind::Double), Just(Kind::Int64)]
}

/// A tensor spec; `batch_weight` : `other_weight` is how often dim 0 is the batch size.
fn tspec(batch_weight: u32, other_weight: u32) -> impl Strategy<Value = TSpec> {
    let dim0 = prop_oneof![
        batch_weight => Just(Dim0::Batch),
        other_weight => (1i64..=9).prop_map(Dim0::Other),
        1 => Just(Dim0::Scalar),
    ];
    (dim0, proptest::collection::vec(1i64..=3, 0..=2), kind(), any::<bool>(), any::<u64>())
        .prop_map(|(dim0, trailing, kind, transposed, seed)| TSpec { dim0, trailing, kind, transposed, seed })
}

fn batch_tspec() -> impl Strategy<Value = TSpec> {
    tspec(1, 0).prop_map(|mut s| {
        s.dim0 = Dim0::Batch;
        s
    })
}

impl TSpec {
    fn build(&self, total: i64) -> Tensor {
        let d0 = match self.dim0 {
            Dim0::Batch => total,
            // Never equal to the total: shift sizes that collide.
            Dim0::Other(n) if n == total => total + 1,
            Dim0::Other(n) => n,
            Dim0::Scalar => return rand_tensor(&[], self.kind, self.seed),
        };
        if self.transposed && !self.trailing.is_empty() {
            let mut shape = vec![self.trailing[0], d0];
            shape.extend(&self.trailing[1..]);
            rand_tensor(&shape, self.kind, self.seed).transpose(0, 1)
        } else {
            let mut shape = vec![d0];
            shape.extend(&self.trailing);
            rand_tensor(&shape, self.kind, self.seed)
        }
    }
}

// ----- the properties, for any value type --------------------------------------------------

/// `narrow_batch` gives, for every batched tensor, rows `[s, s + l)` as a view of the same
/// storage (pointer arithmetic on the stride), and every other tensor untouched (same storage,
/// same shape); plain values are kept.
fn check_narrow_is_rows<A: Case>(x: &A, lay: &Layout) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let n = x.narrow_batch(s, l, t);
    let (xl, nl) = (leaves(x), leaves(&n));
    assert_eq!(xl.len(), nl.len(), "narrowing changed the structure");
    for (i, (a, b)) in xl.iter().zip(&nl).enumerate() {
        if is_batched(a, t) {
            assert_eq!(b.size()[0], l, "leaf {i}: dim 0 of the narrowed tensor");
            assert_eq!(&b.size()[1..], &a.size()[1..], "leaf {i}: trailing dims");
            assert!(same_bits(b, &a.narrow(0, s, l)), "leaf {i}: narrowed rows differ from x's rows");
            let elt = a.kind().elt_size_in_bytes() as i64;
            let want = a.data_ptr() as i64 + s * a.stride()[0] * elt;
            assert_eq!(b.data_ptr() as i64, want, "leaf {i}: not a view into x's storage at row {s}");
            assert_eq!(b.stride(), a.stride(), "leaf {i}: strides");
        } else {
            assert_eq!(b.size(), a.size(), "leaf {i}: a non-batch tensor was reshaped");
            assert_eq!(b.data_ptr(), a.data_ptr(), "leaf {i}: a non-batch tensor was copied");
            assert!(same_bits(a, b), "leaf {i}: a non-batch tensor changed");
        }
    }
    assert_eq!(plains(&n), plains(x), "plain values must pass through");
}

/// An in-place edit of the narrowed value shows up in x's rows `[s, s + l)` and nowhere else.
fn check_narrow_is_view<A: Case>(x: &A, lay: &Layout) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let x = deep(x);
    let before = deep(&x);
    let n = x.narrow_batch(s, l, t);
    for (a, b) in leaves(&x).iter().zip(leaves(&n)) {
        if is_batched(a, t) {
            let mut b = b;
            let _ = b.fill_(77.0);
        }
    }
    for (i, (a, old)) in leaves(&x).iter().zip(leaves(&before)).enumerate() {
        if is_batched(a, t) {
            let filled = Tensor::full(a.narrow(0, s, l).size(), 77.0, (a.kind(), Device::Cpu));
            assert!(same_bits(&a.narrow(0, s, l), &filled), "leaf {i}: the edit did not reach x's rows");
            assert!(same_bits(&a.narrow(0, 0, s), &old.narrow(0, 0, s)), "leaf {i}: rows before the group changed");
            assert!(
                same_bits(&a.narrow(0, s + l, t - s - l), &old.narrow(0, s + l, t - s - l)),
                "leaf {i}: rows after the group changed"
            );
        } else {
            assert!(same_bits(a, &old), "leaf {i}: a non-batch tensor changed");
        }
    }
}

/// `x.splice_batch(x.narrow_batch(..), ..) == x`, bitwise, and x itself is not modified.
fn check_round_trip<A: Case>(x: &A, lay: &Layout) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let before = deep(x);
    let r = x.shallow().splice_batch(x.narrow_batch(s, l, t), s, l, t).expect("splicing x's own rows back");
    let (xl, rl) = (leaves(&before), leaves(&r));
    assert_eq!(xl.len(), rl.len());
    for (i, (a, b)) in xl.iter().zip(&rl).enumerate() {
        assert!(same_bits(a, b), "leaf {i}: round trip changed the value");
    }
    assert_eq!(plains(&r), plains(&before));
    for (i, (a, b)) in leaves(x).iter().zip(&xl).enumerate() {
        assert!(same_bits(a, b), "leaf {i}: splicing modified x");
    }
}

/// Splicing a new value `y` (same layout as the narrowed rows, fresh data) gives x's rows
/// outside the group, y's rows inside it (written out with `Tensor::cat` of slices here);
/// non-batch tensors and plain values are replaced whole by y's; x is not modified.
fn check_splice_new<A: Case>(x: &A, lay: &Layout, seed: u64) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let before = deep(x);
    let n = x.narrow_batch(s, l, t);
    let k = Cell::new(0u64);
    let y = n.rebuild(
        &mut |leaf| {
            k.set(k.get() + 1);
            rand_tensor(&leaf.size(), leaf.kind(), seed ^ (k.get() << 32))
        },
        &mut |v| v + 1000,
    );
    let r = x.shallow().splice_batch(y.shallow(), s, l, t).expect("splicing a value of the right layout");
    let (xl, yl, rl) = (leaves(&before), leaves(&y), leaves(&r));
    assert_eq!(rl.len(), xl.len());
    for (i, ((a, b), got)) in xl.iter().zip(&yl).zip(&rl).enumerate() {
        if is_batched(a, t) {
            let want = Tensor::cat(&[a.narrow(0, 0, s), b.shallow_clone(), a.narrow(0, s + l, t - s - l)], 0);
            assert!(same_bits(got, &want), "leaf {i}: differs from cat(x[..s], y, x[s+l..])");
            assert!(same_bits(&got.narrow(0, 0, s), &a.narrow(0, 0, s)), "leaf {i}: rows before the group changed");
            assert!(same_bits(&got.narrow(0, s, l), b), "leaf {i}: the group's rows are not y");
            assert!(
                same_bits(&got.narrow(0, s + l, t - s - l), &a.narrow(0, s + l, t - s - l)),
                "leaf {i}: rows after the group changed"
            );
        } else {
            assert!(same_bits(got, b), "leaf {i}: a non-batch tensor must be replaced whole");
        }
    }
    assert_eq!(plains(&r), plains(&y), "plain values come from the new value");
    for (i, (a, b)) in leaves(x).iter().zip(&xl).enumerate() {
        assert!(same_bits(a, b), "leaf {i}: splicing modified x");
    }
}

/// A new value with one leaf of the wrong shape or dtype is an `Err` whose expected string
/// names the rows' layout and whose actual string names the wrong one.
fn check_mismatch<A: Case>(x: &A, lay: &Layout, which: Index, wrong_dtype: bool) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let n = x.narrow_batch(s, l, t);
    let count = leaves(&n).len();
    if count == 0 {
        return;
    }
    let target = which.index(count);
    let k = Cell::new(0usize);
    let mut good = None;
    let mut bad = None;
    let y = n.rebuild(
        &mut |leaf| {
            let i = k.get();
            k.set(i + 1);
            if i != target {
                return leaf.copy();
            }
            let b = if wrong_dtype {
                let other = if leaf.kind() == Kind::Float { Kind::Double } else { Kind::Float };
                leaf.to_kind(other)
            } else {
                let mut shape = leaf.size();
                match shape.last_mut() {
                    Some(d) => *d += 1,
                    None => shape.push(2),
                }
                Tensor::zeros(shape.as_slice(), (leaf.kind(), Device::Cpu))
            };
            good = Some(leaf.shallow_clone());
            bad = Some(b.shallow_clone());
            b
        },
        &mut |v| v,
    );
    let (good, bad) = (good.unwrap(), bad.unwrap());
    let before = deep(x);
    let (expected, actual) = match x.shallow().splice_batch(y, s, l, t) {
        Ok(_) => panic!("a {} in place of {} was accepted", bad.describe(), good.describe()),
        Err(e) => e,
    };
    let (gs, bs) = (format!("{:?}", good.size()), format!("{:?}", bad.size()));
    assert!(expected.contains(&gs), "expected `{expected}` does not name the shape {gs}");
    assert!(actual.contains(&bs), "actual `{actual}` does not name the shape {bs}");
    if wrong_dtype {
        let (gk, bk) = (format!("{:?}", good.kind()), format!("{:?}", bad.kind()));
        assert!(expected.contains(&gk), "expected `{expected}` does not name the dtype {gk}");
        assert!(actual.contains(&bk), "actual `{actual}` does not name the dtype {bk}");
    }
    for (i, (a, b)) in leaves(x).iter().zip(leaves(&before)).enumerate() {
        assert!(same_bits(a, &b), "leaf {i}: a failed splice modified x");
    }
}

fn check_all<A: Case>(x: &A, lay: &Layout, seed: u64, which: Index, wrong_dtype: bool) {
    check_narrow_is_rows(x, lay);
    check_round_trip(x, lay);
    check_splice_new(x, lay, seed);
    check_mismatch(x, lay, which, wrong_dtype);
    check_narrow_is_view(x, lay);
}

// ----- value types ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn tensor(lay in layout(), a in tspec(3, 1), seed: u64, which: Index, wrong_dtype: bool) {
        check_all(&a.build(lay.total), &lay, seed, which, wrong_dtype);
    }

    #[test]
    fn batched_tensor(lay in layout(), a in batch_tspec(), seed: u64, which: Index, wrong_dtype: bool) {
        check_all(&a.build(lay.total), &lay, seed, which, wrong_dtype);
    }

    #[test]
    fn pair_of_tensors(lay in layout(), a in tspec(3, 1), b in tspec(1, 1), seed: u64, which: Index, wrong_dtype: bool) {
        check_all(&(a.build(lay.total), b.build(lay.total)), &lay, seed, which, wrong_dtype);
    }

    #[test]
    fn option_tensor(lay in layout(), a in proptest::option::of(tspec(3, 1)), seed: u64, which: Index, wrong_dtype: bool) {
        let x = a.map(|a| a.build(lay.total));
        check_all(&x, &lay, seed, which, wrong_dtype);
        // Some where None is (or the reverse) is a structural mismatch.
        let flipped = match &x {
            Some(_) => None,
            None => Some(Tensor::zeros([lay.len], (Kind::Float, Device::Cpu))),
        };
        let err = x.shallow().splice_batch(flipped, lay.start, lay.len, lay.total).unwrap_err();
        prop_assert!(err.0.contains(if x.is_some() { "Some" } else { "None" }), "{err:?}");
    }

    #[test]
    fn vec_of_tensors(lay in layout(), specs in proptest::collection::vec(tspec(2, 1), 0..4), seed: u64, which: Index, wrong_dtype: bool) {
        let x: Vec<Tensor> = specs.iter().map(|s| s.build(lay.total)).collect();
        check_all(&x, &lay, seed, which, wrong_dtype);
        // One element more is a structural mismatch.
        let mut longer = x.narrow_batch(lay.start, lay.len, lay.total);
        longer.push(Tensor::zeros([lay.len], (Kind::Float, Device::Cpu)));
        prop_assert!(x.shallow().splice_batch(longer, lay.start, lay.len, lay.total).is_err());
    }

    #[test]
    fn tensor_and_plain_i64(lay in layout(), a in tspec(3, 1), v: i64, seed: u64, which: Index, wrong_dtype: bool) {
        let x = (a.build(lay.total), v);
        check_all(&x, &lay, seed, which, wrong_dtype);
        prop_assert_eq!(x.narrow_batch(lay.start, lay.len, lay.total).1, v);
    }

    #[test]
    fn nested(
        lay in layout(),
        a in tspec(1, 1),
        b in proptest::option::of(tspec(2, 1)),
        c in proptest::collection::vec(tspec(1, 1), 0..3),
        v: i64,
        seed: u64,
        which: Index,
        wrong_dtype: bool,
    ) {
        let t = lay.total;
        let x = ((a.build(t), v), (b.map(|b| b.build(t)), c.iter().map(|c| c.build(t)).collect::<Vec<_>>()));
        check_all(&x, &lay, seed, which, wrong_dtype);
    }

    /// Every group of the layout narrowed and spliced back in turn leaves x bitwise as it was;
    /// splicing each group's rows from another value `z` in turn builds `z`.
    #[test]
    fn all_groups_in_turn(lay in layout(), a in batch_tspec(), seed: u64) {
        let t = lay.total;
        let x = a.build(t);
        let z = rand_tensor(&x.size(), x.kind(), seed);
        let mut acc = x.shallow_clone();
        for &(s, l) in &lay.groups {
            acc = acc.shallow().splice_batch(acc.narrow_batch(s, l, t), s, l, t).unwrap();
        }
        prop_assert!(same_bits(&acc, &x));
        for &(s, l) in &lay.groups {
            acc = acc.shallow().splice_batch(z.narrow(0, s, l), s, l, t).unwrap();
        }
        prop_assert!(same_bits(&acc, &z));
    }
}

// ----- trace level ---------------------------------------------------------------------------

/// The tiny stack run with plain tch (each `Linear` called directly, no hooks) on the whole
/// batch; `swap`: `(layer, rows)` whose output rows become `2h + 1` before the next layer.
fn plain_stack(model: &nnsight::Hooked<common::tiny::Stack>, x: &Tensor, swap: Option<(usize, i64, i64)>) -> Tensor {
    tch::no_grad(|| {
        let mut h = x.shallow_clone();
        for (i, l) in model.layers.iter().enumerate() {
            let mut o = nn::Module::forward(l.inner(), &h);
            if let Some((j, s, n)) = swap {
                if i == j {
                    let total = o.size()[0];
                    let rows = o.narrow(0, s, n) * 2.0 + 1.0;
                    o = Tensor::cat(&[o.narrow(0, 0, s), rows, o.narrow(0, s + n, total - s - n)], 0);
                }
            }
            h = o.tanh();
        }
        h
    })
}

fn invoke_inputs(rows: &[i64], seed: u64) -> Vec<Tensor> {
    rows.iter().enumerate().map(|(i, &r)| rand_tensor(&[r, 4], Kind::Float, seed + i as u64)).collect()
}

fn starts(rows: &[i64]) -> Vec<i64> {
    rows.iter().scan(0, |acc, &r| {
        let s = *acc;
        *acc += r;
        Some(s)
    }).collect()
}

/// Checks the per-invoke outputs `got` of a traced run with a swap in invoke `k` at layer `j`.
fn check_isolation(model: &nnsight::Hooked<common::tiny::Stack>, xs: &[Tensor], rows: &[i64], k: usize, j: usize, got: &[Tensor]) {
    let batch = Tensor::cat(xs, 0);
    let st = starts(rows);
    let clean = plain_stack(model, &batch, None);
    let swapped = plain_stack(model, &batch, Some((j, st[k], rows[k])));
    assert_eq!(got.len(), rows.len());
    for (g, out) in got.iter().enumerate() {
        let clean_rows = clean.narrow(0, st[g], rows[g]);
        if g == k {
            assert!(!out.equal(&clean_rows), "the swap in invoke {k} did not change its rows");
            assert!(out.allclose(&swapped.narrow(0, st[g], rows[g]), 1e-6, 1e-7, false), "invoke {k}: not the hand-swapped rows");
        } else {
            assert!(same_bits(out, &clean_rows), "invoke {g} changed by the swap in invoke {k}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// 1..4 invokes (by hand, as `trace!` expands), a swap `h -> 2h + 1` of one layer's output in
    /// one random invoke: that invoke's final rows are the hand-swapped plain computation, every
    /// other invoke's rows are bitwise those of the same batch run without hooks and no swap.
    #[test]
    fn swap_in_one_invoke_changes_only_its_rows(
        rows in proptest::collection::vec(1i64..=3, 1..=4),
        k in any::<Index>(),
        j in 0usize..3,
        seed: u64,
    ) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let k = k.index(rows.len());
        let xs = invoke_inputs(&rows, seed);
        let mut tr = Tracer::new(&model);
        let groups: Vec<_> = xs.iter().map(|x| tr.invoke(x)).collect();
        let h = tr.output(groups[k], 0, || Ok(&model.layers[j]));
        let v = tr.apply1(h, |h: &Tensor| h * 2.0 + 1.0);
        tr.swap_output(groups[k], 0, || Ok(&model.layers[j]), v);
        let saved: Vec<_> = groups.iter().map(|&g| {
            let o = tr.output(g, 0, || Ok(&model));
            tr.save(o)
        }).collect();
        let got: Vec<Tensor> = tr.finish(saved).unwrap();
        check_isolation(&model, &xs, &rows, k, j, &got);
        prop_assert!(!nnsight::is_tracing());
    }

    /// The same with `trace!` and three invoke blocks; the swap sits in the invoke picked at
    /// random (a plain `if` around it).
    #[test]
    fn trace_macro_swap_in_one_of_three_invokes(
        rows in proptest::collection::vec(1i64..=3, 3),
        k in 0usize..3,
        j in 0usize..3,
        seed: u64,
    ) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = stack(&vs, 3);
        let xs = invoke_inputs(&rows, seed);
        let (a, b, c) = (&xs[0], &xs[1], &xs[2]);
        let (o0, o1, o2) = trace!(model, {
            invoke(a) {
                if k == 0 { model.layers[j].output = model.layers[j].output * 2.0 + 1.0; }
                let o0 = model.output.save();
            }
            invoke(b) {
                if k == 1 { model.layers[j].output = model.layers[j].output * 2.0 + 1.0; }
                let o1 = model.output.save();
            }
            invoke(c) {
                if k == 2 { model.layers[j].output = model.layers[j].output * 2.0 + 1.0; }
                (o0, o1, model.output.save())
            }
        })
        .unwrap();
        check_isolation(&model, &xs, &rows, k, j, &[o0, o1, o2]);
    }
}
