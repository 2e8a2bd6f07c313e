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
use nnsight::{trace, Activation, HookModule, Hooked, Layout, Refusal, Rows, Tracer};
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

/// Whether the dim-0 default (`Layout::Auto`) treats `t` as batched: dim 0 equal to the total
/// batch size (every other tensor is shared by all rows).
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
struct Groups {
    total: i64,
    groups: Vec<(i64, i64)>,
    start: i64,
    len: i64,
}

impl Groups {
    /// The group under test as the runtime's `Rows`.
    fn rows(&self) -> Rows {
        Rows::new(self.start, self.len, self.total)
    }
}

fn groups() -> impl Strategy<Value = Groups> {
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
            Groups { total, groups, start, len }
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
fn check_narrow_is_rows<A: Case>(x: &A, lay: &Groups) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let n = x.narrow_batch(Layout::Auto, lay.rows()).expect("the dim-0 default fits every value");
    let (xl, nl) = (leaves(x), leaves(&n));
    assert_eq!(xl.len(), nl.len(), "narrowing changed the structure");
    for (i, (a, b)) in xl.iter().zip(&nl).enumerate() {
        if is_batched(a, t) && l < t {
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
fn check_narrow_is_view<A: Case>(x: &A, lay: &Groups) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let x = deep(x);
    let before = deep(&x);
    let n = x.narrow_batch(Layout::Auto, lay.rows()).unwrap();
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
fn check_round_trip<A: Case>(x: &A, lay: &Groups) {
    let before = deep(x);
    let r = x.shallow().splice_batch(x.narrow_batch(Layout::Auto, lay.rows()).unwrap(), Layout::Auto, lay.rows()).expect("splicing x's own rows back");
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

/// Splicing a new value `y` (same layout as the narrowed rows, fresh data in every batched leaf)
/// gives x's rows outside the group, y's rows inside it (written out with `Tensor::cat` of
/// slices here). Shared tensors and plain values: replaced by y's when the group is every row;
/// otherwise y keeps them as they were and the result has x's. x is not modified.
fn check_splice_new<A: Case>(x: &A, lay: &Groups, seed: u64) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let all = l == t;
    let before = deep(x);
    let n = x.narrow_batch(Layout::Auto, lay.rows()).unwrap();
    let k = Cell::new(0u64);
    let y = n.rebuild(
        &mut |leaf| {
            k.set(k.get() + 1);
            if all || is_batched(leaf, l) && !is_shared_leaf_of(x, leaf, t) {
                rand_tensor(&leaf.size(), leaf.kind(), seed ^ (k.get() << 32))
            } else {
                leaf.shallow_clone()
            }
        },
        &mut |v| if all { v + 1000 } else { v },
    );
    let r = x.shallow().splice_batch(y.shallow(), Layout::Auto, lay.rows()).expect("splicing a value of the right layout");
    let (xl, yl, rl) = (leaves(&before), leaves(&y), leaves(&r));
    assert_eq!(rl.len(), xl.len());
    for (i, ((a, b), got)) in xl.iter().zip(&yl).zip(&rl).enumerate() {
        if is_batched(a, t) && !all {
            let want = Tensor::cat(&[a.narrow(0, 0, s), b.shallow_clone(), a.narrow(0, s + l, t - s - l)], 0);
            assert!(same_bits(got, &want), "leaf {i}: differs from cat(x[..s], y, x[s+l..])");
            assert!(same_bits(&got.narrow(0, 0, s), &a.narrow(0, 0, s)), "leaf {i}: rows before the group changed");
            assert!(same_bits(&got.narrow(0, s, l), b), "leaf {i}: the group's rows are not y");
            assert!(
                same_bits(&got.narrow(0, s + l, t - s - l), &a.narrow(0, s + l, t - s - l)),
                "leaf {i}: rows after the group changed"
            );
        } else if all {
            assert!(same_bits(got, b), "leaf {i}: a group of every row replaces the value whole");
        } else {
            assert!(same_bits(got, a), "leaf {i}: a shared tensor changed");
        }
    }
    let want_plains = if all { plains(&y) } else { plains(&before) };
    assert_eq!(plains(&r), want_plains, "plain values: y's for every row, else unchanged");
    for (i, (a, b)) in leaves(x).iter().zip(&xl).enumerate() {
        assert!(same_bits(a, b), "leaf {i}: splicing modified x");
    }
}

/// Whether `leaf` (a leaf of x narrowed) is one of x's shared tensors (the same storage).
fn is_shared_leaf_of<A: Case>(x: &A, leaf: &Tensor, total: i64) -> bool {
    leaves(x).iter().any(|a| !is_batched(a, total) && a.defined() && leaf.defined() && a.data_ptr() == leaf.data_ptr())
}

/// From a group of some rows only, a new value that changes one shared tensor or one plain value
/// is refused (`Refusal::Shared`) and x is left as it was; from a group of every row it is taken.
fn check_shared_change<A: Case>(x: &A, lay: &Groups, which: Index) {
    let (l, t) = (lay.len, lay.total);
    let n = x.narrow_batch(Layout::Auto, lay.rows()).unwrap();
    let shared: Vec<usize> = leaves(x).iter().enumerate().filter(|(_, a)| !is_batched(a, t) && a.defined()).map(|(i, _)| i).collect();
    let has_plain = !plains(x).is_empty();
    if shared.is_empty() && !has_plain {
        return;
    }
    let change_plain = shared.is_empty() || (has_plain && which.index(2) == 0);
    let target = if shared.is_empty() { usize::MAX } else { shared[which.index(shared.len())] };
    let k = Cell::new(0usize);
    let y = n.rebuild(
        &mut |leaf| {
            let i = k.get();
            k.set(i + 1);
            if !change_plain && i == target {
                (leaf + 1.0).to_kind(leaf.kind()) // + 1 changes every element, also of integer tensors
            } else {
                leaf.shallow_clone()
            }
        },
        &mut |v| if change_plain { v.wrapping_add(1) } else { v },
    );
    let before = deep(x);
    match x.shallow().splice_batch(y, Layout::Auto, lay.rows()) {
        Err(Refusal::Shared(what)) => assert!(l < t, "refused for a group of every row: {what}"),
        Err(other) => panic!("expected a shared-value refusal, got {other:?}"),
        Ok(_) => assert!(l == t, "a group of {l} of {t} rows changed a shared value"),
    }
    for (i, (a, b)) in leaves(x).iter().zip(leaves(&before)).enumerate() {
        assert!(same_bits(a, &b), "leaf {i}: a splice modified x");
    }
}

/// A new value with one leaf of the wrong shape or dtype is an `Err` whose expected string
/// names the rows' layout and whose actual string names the wrong one. (From a group of some
/// rows, only batched leaves are tried: a different shared leaf is a shared-value refusal.)
fn check_mismatch<A: Case>(x: &A, lay: &Groups, which: Index, wrong_dtype: bool) {
    let (l, t) = (lay.len, lay.total);
    let n = x.narrow_batch(Layout::Auto, lay.rows()).unwrap();
    let candidates: Vec<usize> = leaves(x)
        .iter()
        .enumerate()
        .filter(|(_, a)| l == t || is_batched(a, t))
        .map(|(i, _)| i)
        .collect();
    if candidates.is_empty() {
        return;
    }
    let target = candidates[which.index(candidates.len())];
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
    let (expected, actual) = match x.shallow().splice_batch(y, Layout::Auto, lay.rows()) {
        Ok(_) => panic!("a {} in place of {} was accepted", bad.describe(), good.describe()),
        Err(Refusal::Mismatch { expected, actual }) => (expected, actual),
        Err(other) => panic!("expected a layout mismatch, got {other:?}"),
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

fn check_all<A: Case>(x: &A, lay: &Groups, seed: u64, which: Index, wrong_dtype: bool) {
    check_narrow_is_rows(x, lay);
    check_round_trip(x, lay);
    check_splice_new(x, lay, seed);
    check_mismatch(x, lay, which, wrong_dtype);
    check_shared_change(x, lay, which);
    check_narrow_is_view(x, lay);
}

// ----- value types ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn tensor(lay in groups(), a in tspec(3, 1), seed: u64, which: Index, wrong_dtype: bool) {
        check_all(&a.build(lay.total), &lay, seed, which, wrong_dtype);
    }

    #[test]
    fn batched_tensor(lay in groups(), a in batch_tspec(), seed: u64, which: Index, wrong_dtype: bool) {
        check_all(&a.build(lay.total), &lay, seed, which, wrong_dtype);
    }

    #[test]
    fn pair_of_tensors(lay in groups(), a in tspec(3, 1), b in tspec(1, 1), seed: u64, which: Index, wrong_dtype: bool) {
        check_all(&(a.build(lay.total), b.build(lay.total)), &lay, seed, which, wrong_dtype);
    }

    #[test]
    fn option_tensor(lay in groups(), a in proptest::option::of(tspec(3, 1)), seed: u64, which: Index, wrong_dtype: bool) {
        let x = a.map(|a| a.build(lay.total));
        check_all(&x, &lay, seed, which, wrong_dtype);
        // Some where None is (or the reverse) is a structural mismatch.
        let flipped = match &x {
            Some(_) => None,
            None => Some(Tensor::zeros([lay.len], (Kind::Float, Device::Cpu))),
        };
        let err = x.shallow().splice_batch(flipped, Layout::Auto, lay.rows()).unwrap_err();
        let Refusal::Mismatch { expected, .. } = &err else { panic!("{err:?}") };
        prop_assert!(expected.contains(if x.is_some() { "Some" } else { "None" }), "{err:?}");
    }

    #[test]
    fn vec_of_tensors(lay in groups(), specs in proptest::collection::vec(tspec(2, 1), 0..4), seed: u64, which: Index, wrong_dtype: bool) {
        let x: Vec<Tensor> = specs.iter().map(|s| s.build(lay.total)).collect();
        check_all(&x, &lay, seed, which, wrong_dtype);
        // One element more is a structural mismatch.
        let mut longer = x.narrow_batch(Layout::Auto, lay.rows()).unwrap();
        longer.push(Tensor::zeros([lay.len], (Kind::Float, Device::Cpu)));
        let spliced = x.shallow().splice_batch(longer, Layout::Auto, lay.rows());
        prop_assert!(matches!(spliced, Err(Refusal::Mismatch { .. })), "{:?}", spliced.err());
    }

    #[test]
    fn tensor_and_plain_i64(lay in groups(), a in tspec(3, 1), v: i64, seed: u64, which: Index, wrong_dtype: bool) {
        let x = (a.build(lay.total), v);
        check_all(&x, &lay, seed, which, wrong_dtype);
        prop_assert_eq!(x.narrow_batch(Layout::Auto, lay.rows()).unwrap().1, v);
    }

    #[test]
    fn nested(
        lay in groups(),
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
    fn all_groups_in_turn(lay in groups(), a in batch_tspec(), seed: u64) {
        let t = lay.total;
        let x = a.build(t);
        let z = rand_tensor(&x.size(), x.kind(), seed);
        let mut acc = x.shallow_clone();
        for &(s, l) in &lay.groups {
            let rows = Rows::new(s, l, t);
            acc = acc.shallow().splice_batch(acc.narrow_batch(Layout::Auto, rows).unwrap(), Layout::Auto, rows).unwrap();
        }
        prop_assert!(same_bits(&acc, &x));
        for &(s, l) in &lay.groups {
            acc = acc.shallow().splice_batch(z.narrow(0, s, l), Layout::Auto, Rows::new(s, l, t)).unwrap();
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

// ----- declared layouts, value level --------------------------------------------------------

/// A tensor with a declared layout: rows on `axis` with `per_row` entries per batch row
/// (`Batch(axis)` for 1, `Flattened(axis)` otherwise), or shared.
#[derive(Clone, Debug)]
enum Declared {
    Rows { axis: usize, per_row: i64 },
    Shared,
}

#[derive(Clone, Debug)]
struct DSpec {
    declared: Declared,
    /// The other dims (the batch axis is inserted at `axis`).
    dims: Vec<i64>,
    kind: Kind,
    seed: u64,
}

fn dspec() -> impl Strategy<Value = DSpec> {
    let declared = prop_oneof![
        (0usize..=2, 1i64..=3).prop_map(|(axis, per_row)| Declared::Rows { axis, per_row }),
        Just(Declared::Shared),
    ];
    (declared, proptest::collection::vec(1i64..=3, 2), kind(), any::<u64>()).prop_map(|(declared, dims, kind, seed)| DSpec { declared, dims, kind, seed })
}

impl DSpec {
    fn layout(&self) -> Layout {
        match self.declared {
            Declared::Rows { axis, per_row: 1 } => Layout::Batch(axis),
            Declared::Rows { axis, .. } => Layout::Flattened(axis),
            Declared::Shared => Layout::Shared,
        }
    }

    /// A tensor that fits the layout in a batch of `total` (a shared one may have dim 0 equal
    /// to the batch size by coincidence: `dims[0]` ranges over 1..=3).
    fn build(&self, total: i64) -> Tensor {
        let mut shape = self.dims.clone();
        if let Declared::Rows { axis, per_row } = self.declared {
            shape.insert(axis, total * per_row);
        }
        rand_tensor(&shape, self.kind, self.seed)
    }
}

fn leak(ls: Vec<Layout>) -> &'static [Layout] {
    Box::leak(ls.into_boxed_slice())
}

/// Narrowing gives each declared-rows tensor its entries on its axis (a view at the right
/// offset) and every shared tensor whole (also when its dim 0 equals the batch size);
/// splicing fresh rows back gives `cat(before, new, after)` on that axis; a declared batch axis
/// of the wrong size is refused with `Refusal::Layout`.
fn check_declared(specs: &[DSpec], lay: &Groups, seed: u64) {
    let (s, l, t) = (lay.start, lay.len, lay.total);
    let xs: Vec<Tensor> = specs.iter().map(|d| d.build(t)).collect();
    let layout = Layout::Tuple(leak(specs.iter().map(DSpec::layout).collect()));
    let x = (xs[0].shallow_clone(), xs[1].shallow_clone());
    let n = x.narrow_batch(layout, lay.rows()).expect("the layouts fit");
    let parts = [(&xs[0], &n.0, &specs[0]), (&xs[1], &n.1, &specs[1])];
    let mut fresh = Vec::new();
    for (i, (a, b, d)) in parts.iter().enumerate() {
        match d.declared {
            Declared::Rows { axis, per_row } if l < t => {
                let want = a.narrow(axis as i64, s * per_row, l * per_row);
                assert!(same_bits(b, &want), "leaf {i}: not its entries on axis {axis}");
                let elt = a.kind().elt_size_in_bytes() as i64;
                assert_eq!(b.data_ptr() as i64, a.data_ptr() as i64 + s * per_row * a.stride()[axis] * elt, "leaf {i}: not a view");
                fresh.push(rand_tensor(&b.size(), b.kind(), seed ^ i as u64));
            }
            _ => {
                assert_eq!(b.data_ptr(), a.data_ptr(), "leaf {i}: a shared tensor (or every row) was copied");
                assert!(same_bits(a, b));
                fresh.push(if l < t { b.shallow_clone() } else { rand_tensor(&b.size(), b.kind(), seed ^ i as u64) });
            }
        }
    }
    let y = (fresh[0].shallow_clone(), fresh[1].shallow_clone());
    let r = x.shallow().splice_batch(y, layout, lay.rows()).expect("splicing the group's rows");
    for (i, (got, (a, d))) in [&r.0, &r.1].into_iter().zip([(&xs[0], &specs[0]), (&xs[1], &specs[1])]).enumerate() {
        let want = match d.declared {
            Declared::Rows { axis, per_row } if l < t => {
                let (ax, n) = (axis as i64, a.size()[axis]);
                Tensor::cat(&[a.narrow(ax, 0, s * per_row), fresh[i].shallow_clone(), a.narrow(ax, (s + l) * per_row, n - (s + l) * per_row)], ax)
            }
            _ if l < t => a.shallow_clone(),
            _ => fresh[i].shallow_clone(),
        };
        assert!(same_bits(got, &want), "leaf {i}: spliced value");
    }
    // A batch axis of another size is refused.
    if let Declared::Rows { axis, per_row: 1 } = specs[0].declared {
        let total = t.max(2);
        let mut shape = specs[0].dims.clone();
        shape.insert(axis, total + 1);
        let wrong = rand_tensor(&shape, specs[0].kind, seed);
        let err = (wrong, specs[1].build(total)).narrow_batch(layout, Rows::new(0, 1, total)).unwrap_err();
        assert!(matches!(err, Refusal::Layout(_)), "{err:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn declared_layouts(lay in groups(), a in dspec(), b in dspec(), seed: u64) {
        check_declared(&[a, b], &lay, seed);
    }
}

// ----- trace level: hook points of every kind of layout ------------------------------------

/// A `[1, 4]` table shared by every row (its input is ignored).
struct Bias {
    w: Tensor,
}

impl HookModule for Bias {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, _: Tensor) -> Tensor {
        &self.w * 1.0
    }
}

/// `(h, mean of h over the batch [1, 4])`.
struct MeanPair;

impl HookModule for MeanPair {
    type Input = Tensor;
    type Output = (Tensor, Tensor);
    fn forward(&self, h: Tensor) -> (Tensor, Tensor) {
        let m = h.mean_dim(0, true, Kind::Float);
        (h, m)
    }
}

/// A linear layer whose output is transposed: `[4, batch]`, the batch on axis 1.
struct Cols {
    lin: nn::Linear,
}

impl HookModule for Cols {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        nn::Module::forward(&self.lin, &x).tr()
    }
}

/// Hook points of every kind: `rows` `[b, 4]`; `flat`, a `Linear(2, 2)` on the batch
/// flattened to `[2b, 2]`; `bias`, a `[1, 4]` table every row adds; `pair`, `(h, batch mean)`;
/// `cols`, `[4, b]` (batch on axis 1); `head` `[b, 4]`.
struct Mixer {
    rows: Hooked<nn::Linear>,
    flat: Hooked<nn::Linear>,
    bias: Hooked<Bias>,
    pair: Hooked<MeanPair>,
    cols: Hooked<Cols>,
    head: Hooked<nn::Linear>,
}

impl Mixer {
    /// The forward pass; `at(point, value)` may replace each hook point's output (the plain
    /// reference calls the inner modules directly, the traced run goes through `Hooked::call`).
    fn run(&self, x: Tensor, plain: Option<&dyn Fn(Point, Tensor) -> Tensor>) -> Tensor {
        let at = |p: Point, t: Tensor| match plain {
            Some(f) => f(p, t),
            None => t,
        };
        let lin = |h: &Hooked<nn::Linear>, x: Tensor| if plain.is_some() { nn::Module::forward(h.inner(), &x) } else { h.call(x) };
        let h = at(Point::Rows, lin(&self.rows, x)).tanh();
        let b = h.size()[0];
        let h = at(Point::Flat, lin(&self.flat, h.reshape([b * 2, 2]))).reshape([b, 4]);
        let zero = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let bias = if plain.is_some() { self.bias.inner().forward(zero) } else { self.bias.call(zero) };
        let h = h + at(Point::Bias, bias);
        let (h, m) = if plain.is_some() {
            let (h, m) = self.pair.inner().forward(h);
            (at(Point::PairH, h), at(Point::PairMean, m))
        } else {
            self.pair.call(h)
        };
        let h = h + m;
        let c = if plain.is_some() { self.cols.inner().forward(h) } else { self.cols.call(h) };
        let h = at(Point::Cols, c).tr().tanh();
        at(Point::Head, lin(&self.head, h))
    }
}

impl HookModule for Mixer {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.run(x, None)
    }
}

/// Builds the mixer; `declared`: every module declares its layout, else the dim-0 default
/// (except `cols`, whose `[4, b]` the default would misread when `b` is 4: always declared).
fn mixer(vs: &nn::VarStore, declared: bool) -> Hooked<Mixer> {
    tch::manual_seed(7);
    let p = vs.root();
    let lin = |name: &str, i: i64, o: i64, layout: Layout| {
        let h = Hooked::new(&(&p / name), nn::linear(&p / name, i, o, Default::default()));
        if declared { h.with_layouts(layout, layout) } else { h }
    };
    let pair = Hooked::new(&(&p / "pair"), MeanPair);
    let bias = Hooked::new(&(&p / "bias"), Bias { w: Tensor::randn([1, 4], (Kind::Float, Device::Cpu)) });
    let (pair, bias) = if declared {
        (pair.with_layouts(Layout::Batch(0), Layout::Tuple(&[Layout::Batch(0), Layout::Shared])), bias.with_layouts(Layout::Shared, Layout::Shared))
    } else {
        (pair, bias)
    };
    let cols = Hooked::new(&(&p / "cols"), Cols { lin: nn::linear(&p / "cols", 4, 4, Default::default()) })
        .with_layouts(Layout::Batch(0), Layout::Batch(1));
    Hooked::with_path(
        "",
        Mixer {
            rows: lin("rows", 4, 4, Layout::Batch(0)),
            flat: lin("flat", 2, 2, Layout::Flattened(0)),
            bias,
            pair,
            cols,
            head: lin("head", 4, 4, Layout::Batch(0)),
        },
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    Rows,
    Flat,
    Bias,
    PairH,
    PairMean,
    Cols,
    Head,
}

impl Point {
    /// Where a batch group's rows are in this point's tensor: `(axis, entries per row)`, or
    /// `None` when every row shares it (for the dim-0 default, as the default decides).
    fn rows_of(self, declared: bool) -> Option<(i64, i64)> {
        match self {
            Point::Rows | Point::PairH | Point::Head => Some((0, 1)),
            Point::Flat if declared => Some((0, 2)),
            Point::Flat | Point::Bias | Point::PairMean => None,
            Point::Cols => Some((1, 1)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Change {
    /// `h -> 2h + 1` on the group's share.
    Swap,
    /// `h *= -1.5` in place on the group's share.
    Edit,
}

fn point() -> impl Strategy<Value = Point> {
    prop_oneof![
        Just(Point::Rows),
        Just(Point::Flat),
        Just(Point::Bias),
        Just(Point::PairH),
        Just(Point::PairMean),
        Just(Point::Cols),
        Just(Point::Head)
    ]
}

/// The change applied by hand to `t` (the whole value at the point) on `slice` (`None`: all).
fn change_by_hand(t: Tensor, change: Change, slice: Option<(i64, i64, i64)>) -> Tensor {
    let part = |t: &Tensor| match slice {
        Some((axis, start, len)) => t.narrow(axis, start, len),
        None => t.shallow_clone(),
    };
    match change {
        Change::Swap => {
            let out = t.copy();
            let new = part(&t) * 2.0 + 1.0;
            part(&out).copy_(&new);
            out
        }
        Change::Edit => {
            let _ = part(&t).g_mul_scalar_(-1.5);
            t
        }
    }
}

/// Builds and runs a trace with one change at `point`, written in invoke `group` (or outside
/// the invokes for `None`); every invoke saves the model's output, and, before the change, its
/// share of the tensor at `point` (for the pair, through a node that picks the element).
fn mixer_trace(
    model: &Hooked<Mixer>,
    xs: &[Tensor],
    point: Point,
    change: Change,
    group: Option<usize>,
) -> nnsight::Result<(Vec<Tensor>, Vec<Tensor>)> {
    let mut tr = Tracer::new(model);
    let groups: Vec<_> = xs.iter().map(|x| tr.invoke(x)).collect();
    let before: Vec<_> = groups
        .iter()
        .map(|&g| match point {
            Point::Rows => tr.output(g, 0, || Ok(&model.rows)),
            Point::Flat => tr.output(g, 0, || Ok(&model.flat)),
            Point::Bias => tr.output(g, 0, || Ok(&model.bias)),
            Point::Cols => tr.output(g, 0, || Ok(&model.cols)),
            Point::Head => tr.output(g, 0, || Ok(&model.head)),
            Point::PairH | Point::PairMean => {
                let o = tr.output(g, 0, || Ok(&model.pair));
                let first = point == Point::PairH;
                tr.apply1(o, move |(h, m): &(Tensor, Tensor)| if first { h.shallow_clone() } else { m.shallow_clone() })
            }
        })
        .collect();
    let before: Vec<_> = before.into_iter().map(|p| tr.save(p)).collect();
    let g = group.map_or(nnsight::Group::ALL, |i| groups[i]);
    let tensor_change = move |h: &Tensor| match change {
        Change::Swap => h * 2.0 + 1.0,
        Change::Edit => {
            let mut v = h.shallow_clone();
            let _ = v.g_mul_scalar_(-1.5);
            v
        }
    };
    macro_rules! at_tensor {
        ($m:expr) => {{
            let h = tr.output(g, 0, || Ok(&$m));
            let v = tr.apply1(h, tensor_change);
            match change {
                Change::Swap => tr.swap_output(g, 0, || Ok(&$m), v),
                Change::Edit => tr.edits(h, v),
            }
        }};
    }
    match point {
        Point::Rows => at_tensor!(model.rows),
        Point::Flat => at_tensor!(model.flat),
        Point::Bias => at_tensor!(model.bias),
        Point::Cols => at_tensor!(model.cols),
        Point::Head => at_tensor!(model.head),
        Point::PairH | Point::PairMean => {
            let o = tr.output(g, 0, || Ok(&model.pair));
            let first = point == Point::PairH;
            let v = tr.apply1(o, move |(h, m): &(Tensor, Tensor)| {
                if first { (tensor_change(h), m.shallow_clone()) } else { (h.shallow_clone(), tensor_change(m)) }
            });
            match change {
                Change::Swap => tr.swap_output(g, 0, || Ok(&model.pair), v),
                Change::Edit => tr.edits(o, v),
            }
        }
    }
    // The model's outputs, read after the change (read before it, they would be out of order).
    let saved: Vec<_> = groups
        .iter()
        .map(|&g| {
            let o = tr.output(g, 0, || Ok(model));
            tr.save(o)
        })
        .collect();
    tr.finish((saved, before))
}

/// The value at `point` in the plain computation (no hooks, no change).
fn plain_at(model: &Hooked<Mixer>, x: Tensor, point: Point) -> Tensor {
    let seen = std::cell::RefCell::new(None);
    let keep = |p: Point, t: Tensor| {
        if p == point {
            *seen.borrow_mut() = Some(t.copy());
        }
        t
    };
    let _ = tch::no_grad(|| model.inner().run(x, Some(&keep)));
    seen.into_inner().expect("the point runs")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// One change (a swap or an in-place edit) at a hook point of any kind of layout (rows on
    /// axis 0 or 1, a flattened batch, a table or a statistic shared by every row), written in
    /// one random invoke or outside the invokes, with declared layouts or the dim-0 default.
    /// Either the trace is refused — exactly when one invoke among several tries to change a
    /// value every row shares — or every invoke's output is the plain computation (no hooks)
    /// with the change applied by hand to that group's share of the value (to 1e-5; the
    /// changes are 2h + 1 and -1.5h, so a leak is far larger). And the value every invoke saved
    /// at the point before the change (its rows, or the whole shared value) is the plain
    /// value, bitwise: a saved value is the value at the moment it was saved, whoever edits the
    /// activation afterwards (that invoke, another, or a statement outside the invokes).
    #[test]
    fn no_invoke_changes_because_of_another_invoke(
        rows in proptest::collection::vec(1i64..=3, 1..=4),
        group in proptest::option::of(any::<Index>()),
        point in point(),
        swap: bool,
        declared: bool,
        seed: u64,
    ) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = mixer(&vs, declared);
        let xs = invoke_inputs(&rows, seed);
        let group = group.map(|i| i.index(rows.len()));
        let change = if swap { Change::Swap } else { Change::Edit };
        let st = starts(&rows);
        let partial = rows.len() > 1 && group.is_some();
        let share = point.rows_of(declared);
        let got = mixer_trace(&model, &xs, point, change, group);
        prop_assert!(!nnsight::is_tracing());
        if partial && share.is_none() {
            let err = got.expect_err("one invoke among several changed a shared value");
            prop_assert!(matches!(err, nnsight::Error::SharedChange { .. }), "{err}");
            return Ok(());
        }
        let (got, before) = got.unwrap_or_else(|e| panic!("{point:?} {change:?} in {group:?}: {e}"));
        let clean = plain_at(&model, Tensor::cat(&xs, 0), point);
        for (g, b) in before.iter().enumerate() {
            let want = match share {
                Some((axis, per_row)) if rows.len() > 1 => clean.narrow(axis, st[g] * per_row, rows[g] * per_row),
                _ => clean.shallow_clone(),
            };
            prop_assert!(same_bits(b, &want.contiguous()) || b.equal(&want), "invoke {g}'s value saved at {point:?} changed ({change:?} in {group:?}): {b} vs {want}");
        }
        let slice = match (group, share) {
            (Some(k), Some((axis, per_row))) if rows.len() > 1 => Some((axis, st[k] * per_row, rows[k] * per_row)),
            _ => None,
        };
        let by_hand = |p: Point, t: Tensor| if p == point { change_by_hand(t, change, slice) } else { t };
        let want = tch::no_grad(|| model.inner().run(Tensor::cat(&xs, 0), Some(&by_hand)));
        // Within float rounding: a splice makes a contiguous tensor where the by-hand change
        // keeps the model's strides, and a later matmul may then sum in another order.
        for (g, out) in got.iter().enumerate() {
            let diff = (out - want.narrow(0, st[g], rows[g])).abs().max().double_value(&[]);
            prop_assert!(diff <= 1e-5, "invoke {g} differs by {diff} ({point:?} {change:?} in {group:?})");
        }
    }
}
