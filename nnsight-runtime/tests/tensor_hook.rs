//! Tensor backward hooks and retain_grad through the libtorch shim (`tensor_hook`), checked
//! against values computed by hand.
//!
//! Running example: x = [1, 2, 3] (leaf, requires grad), w = [4, 5, 6], h = x * w = [4, 10, 18],
//! y = sum(h * h). Then dy/dh = 2h = [8, 20, 36] and dy/dx = 2h * w = [32, 100, 216].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nnsight_runtime::tensor_hook::{
    register_grad_hook, retain_grad, retains_grad, GradHook, GradHooks,
};
use nnsight_runtime::Error;
use tch::{Kind, Tensor};

fn vals(t: &Tensor) -> Vec<f32> {
    assert!(t.defined(), "tensor is undefined");
    Vec::<f32>::try_from(t.reshape(-1)).unwrap()
}

fn leaf() -> Tensor {
    Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true)
}

fn weights() -> Tensor {
    Tensor::from_slice(&[4.0f32, 5.0, 6.0])
}

/// Counts drops of the value it is moved into (a hook closure).
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counter() -> (Arc<AtomicUsize>, DropCounter) {
    let n = Arc::new(AtomicUsize::new(0));
    (n.clone(), DropCounter(n))
}

/// A closure that records each gradient it sees, counts its calls and its drop.
#[allow(clippy::type_complexity)]
fn recorder() -> (
    Arc<Mutex<Vec<Vec<f32>>>>,
    Arc<AtomicUsize>,
    impl FnMut(&Tensor) -> Option<Tensor> + Send + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (dropped, guard) = counter();
    let s = seen.clone();
    let f = move |g: &Tensor| {
        let _ = &guard;
        s.lock().unwrap().push(vals(g));
        None
    };
    (seen, dropped, f)
}

#[test]
fn hook_sees_the_gradient_of_an_intermediate() {
    let x = leaf();
    let h = &x * weights();
    let (seen, _, f) = recorder();
    let hook = register_grad_hook(&h, f).unwrap();
    (&h * &h).sum(Kind::Float).backward();
    assert_eq!(*seen.lock().unwrap(), vec![vec![8.0, 20.0, 36.0]]);
    // Keeping the gradient leaves plain autograd's result.
    assert_eq!(vals(&x.grad()), [32.0, 100.0, 216.0]);
    assert!(hook.take_error().is_none());
    hook.remove().unwrap();
}

#[test]
fn hook_on_a_leaf_sees_its_gradient() {
    let x = leaf();
    let (seen, _, f) = recorder();
    let _hook = register_grad_hook(&x, f).unwrap();
    let h = &x * weights();
    (&h * &h).sum(Kind::Float).backward();
    assert_eq!(*seen.lock().unwrap(), vec![vec![32.0, 100.0, 216.0]]);
}

#[test]
fn replacement_reaches_the_leaf_grad() {
    // Doubling dy/dh doubles dy/dx: [64, 200, 432].
    let x = leaf();
    let h = &x * weights();
    let _hook = register_grad_hook(&h, |g| Some(g * 2.0)).unwrap();
    (&h * &h).sum(Kind::Float).backward();
    assert_eq!(vals(&x.grad()), [64.0, 200.0, 432.0]);

    // Zeroing it zeroes dy/dx.
    let x = leaf();
    let h = &x * weights();
    let _hook = register_grad_hook(&h, |g| Some(g.zeros_like())).unwrap();
    (&h * &h).sum(Kind::Float).backward();
    assert_eq!(vals(&x.grad()), [0.0, 0.0, 0.0]);

    // On the leaf itself: the replacement is what gets accumulated into .grad().
    let x = leaf();
    let _hook = register_grad_hook(&x, |g| Some(g - 1.0)).unwrap();
    let h = &x * weights();
    (&h * &h).sum(Kind::Float).backward();
    assert_eq!(vals(&x.grad()), [31.0, 99.0, 215.0]);
}

#[test]
fn hooks_on_one_tensor_chain_in_registration_order() {
    // First hook adds 1 to dy/dh = [8, 20, 36]; the second sees [9, 21, 37] and doubles it;
    // dy/dx = [18, 42, 74] * w = [72, 210, 444].
    let x = leaf();
    let h = &x * weights();
    let mut hooks = GradHooks::new();
    hooks.register(&h, |g| Some(g + 1.0)).unwrap();
    let (seen, _, f) = recorder();
    hooks.register(&h, f).unwrap();
    hooks.register(&h, |g| Some(g * 2.0)).unwrap();
    (&h * &h).sum(Kind::Float).backward();
    assert_eq!(*seen.lock().unwrap(), vec![vec![9.0, 21.0, 37.0]]);
    assert_eq!(vals(&x.grad()), [72.0, 210.0, 444.0]);
    assert!(hooks.take_errors().is_empty());
}

#[test]
fn hook_on_a_tensor_used_twice_sees_the_summed_gradient() {
    // y = sum(3h) + sum(h * h): dy/dh = 3 + 2h = [11, 23, 39], seen once.
    let x = leaf();
    let h = &x * weights();
    let (seen, _, f) = recorder();
    let _hook = register_grad_hook(&h, f).unwrap();
    let y = (&h * 3.0).sum(Kind::Float) + (&h * &h).sum(Kind::Float);
    y.backward();
    assert_eq!(*seen.lock().unwrap(), vec![vec![11.0, 23.0, 39.0]]);
    // dy/dx = [11, 23, 39] * w = [44, 115, 234].
    assert_eq!(vals(&x.grad()), [44.0, 115.0, 234.0]);
}

#[test]
fn retain_grad_defines_the_grad_of_a_non_leaf() {
    let x = leaf();
    let h = &x * weights();
    let h2 = &x * weights();
    assert!(!retains_grad(&h).unwrap());
    retain_grad(&h).unwrap();
    assert!(retains_grad(&h).unwrap());
    ((&h * &h).sum(Kind::Float) + (&h2 * &h2).sum(Kind::Float)).backward();
    assert_eq!(vals(&h.grad()), [8.0, 20.0, 36.0]);
    // Without retain_grad a non-leaf's .grad() stays undefined.
    assert!(!h2.grad().defined());
    // A leaf is a no-op; a tensor without requires_grad is an error.
    retain_grad(&x).unwrap();
    assert!(matches!(retain_grad(&weights()), Err(Error::GradHook(_))));
}

#[test]
fn panic_in_the_closure_is_reported_and_backward_completes() {
    let x = leaf();
    let h = &x * weights();
    let (dropped, guard) = counter();
    let hook = register_grad_hook(&h, move |_| {
        let _ = &guard;
        panic!("boom in hook")
    })
    .unwrap();
    let line = line!() - 5;
    let y = (&h * &h).sum(Kind::Float);
    let grads = Tensor::run_backward(&[&y], &[&x], true, false);
    // The gradient went on unchanged.
    assert_eq!(vals(&grads[0]), [32.0, 100.0, 216.0]);
    let err = hook.take_error().expect("the panic is recorded");
    let msg = err.to_string();
    assert!(msg.contains("boom in hook"), "{msg}");
    assert!(
        msg.contains(&format!("tests/tensor_hook.rs:{line}")),
        "{msg}"
    );
    assert!(msg.contains("panicked"), "{msg}");
    assert!(hook.take_error().is_none());
    // The hook stays registered; a second backward records a second panic.
    y.backward();
    assert_eq!(vals(&x.grad()), [32.0, 100.0, 216.0]);
    assert_eq!(hook.take_errors().len(), 1);
    assert_eq!(dropped.load(Ordering::SeqCst), 0);
    hook.remove().unwrap();
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
}

#[test]
fn replacement_of_the_wrong_shape_is_reported_and_ignored() {
    let x = leaf();
    let h = &x * weights();
    let hook = register_grad_hook(&h, |_| {
        Some(Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)))
    })
    .unwrap();
    (&h * &h).sum(Kind::Float).backward();
    assert_eq!(vals(&x.grad()), [32.0, 100.0, 216.0]);
    let msg = hook
        .take_error()
        .expect("the bad replacement is recorded")
        .to_string();
    assert!(msg.contains("[2]") && msg.contains("[3]"), "{msg}");
}

#[test]
fn hook_on_a_tensor_without_requires_grad_is_an_error_and_frees_the_closure() {
    let (dropped, guard) = counter();
    let res = register_grad_hook(&weights(), move |_| {
        let _ = &guard;
        None
    });
    let err = res.expect_err("libtorch refuses hooks on tensors that do not require grad");
    let msg = err.to_string();
    assert!(matches!(err, Error::GradHook(_)));
    assert!(msg.contains("require"), "{msg}");
    assert_eq!(dropped.load(Ordering::SeqCst), 1);

    assert!(register_grad_hook(&Tensor::new(), |_| None).is_err());
}

#[test]
fn removal_drops_the_closure_and_it_is_not_called_again() {
    let x = leaf();
    let h = &x * weights();
    let (seen, dropped, f) = recorder();
    let hook = register_grad_hook(&h, f).unwrap();
    assert!(hook.is_active());
    assert_eq!(dropped.load(Ordering::SeqCst), 0);
    hook.remove().unwrap();
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    (&h * &h).sum(Kind::Float).backward();
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(vals(&x.grad()), [32.0, 100.0, 216.0]);

    // Dropping the handle removes too; a replacing hook then no longer applies.
    let x = leaf();
    let h = &x * weights();
    let (dropped, guard) = counter();
    drop(register_grad_hook(&h, move |g| {
        let _ = &guard;
        Some(g.zeros_like())
    }));
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    (&h * &h).sum(Kind::Float).backward();
    assert_eq!(vals(&x.grad()), [32.0, 100.0, 216.0]);
}

#[test]
fn closure_is_dropped_when_the_tensor_is_freed() {
    // A leaf without a graph: freeing it frees the hook, with the handle still held.
    let x = leaf();
    let (seen, dropped, f) = recorder();
    let hook = register_grad_hook(&x, f).unwrap();
    drop(x);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    assert!(!hook.is_active());
    hook.remove().unwrap();
    assert!(seen.lock().unwrap().is_empty());

    // An intermediate: freed with the tensor and the graph that holds it.
    let x = leaf();
    let h = &x * weights();
    let (seen, dropped, f) = recorder();
    let hook = register_grad_hook(&h, f).unwrap();
    let y = (&h * &h).sum(Kind::Float);
    drop(h);
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        0,
        "the graph of y still holds h's hook"
    );
    y.backward();
    assert_eq!(*seen.lock().unwrap(), vec![vec![8.0, 20.0, 36.0]]);
    drop(y);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    assert!(!hook.is_active());
    drop(hook);
    assert_eq!(vals(&x.grad()), [32.0, 100.0, 216.0]);
}

#[test]
fn kept_hook_lives_until_the_tensor_is_freed() {
    let x = leaf();
    let (dropped, guard) = counter();
    register_grad_hook(&x, move |g| {
        let _ = &guard;
        Some(g * 10.0)
    })
    .unwrap()
    .keep();
    assert_eq!(dropped.load(Ordering::SeqCst), 0);
    (&x * weights()).sum(Kind::Float).backward();
    assert_eq!(vals(&x.grad()), [40.0, 50.0, 60.0]);
    drop(x);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
}

#[test]
fn grad_hooks_drop_removes_every_hook() {
    let x = leaf();
    let h = &x * weights();
    let mut hooks = GradHooks::new();
    let mut probes = Vec::new();
    for t in [&x, &h, &h] {
        let (seen, dropped, f) = recorder();
        hooks.register(t, f).unwrap();
        probes.push((seen, dropped));
    }
    let (zdrop, guard) = counter();
    hooks
        .register(&h, move |g| {
            let _ = &guard;
            Some(g.zeros_like())
        })
        .unwrap();
    assert_eq!(hooks.len(), 4);
    drop(hooks);
    for (_, dropped) in &probes {
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
    assert_eq!(zdrop.load(Ordering::SeqCst), 1);
    (&h * &h).sum(Kind::Float).backward();
    for (seen, _) in &probes {
        assert!(seen.lock().unwrap().is_empty());
    }
    assert_eq!(vals(&x.grad()), [32.0, 100.0, 216.0]);

    // remove_all empties the collection the same way.
    let x = leaf();
    let mut hooks = GradHooks::new();
    let (seen, dropped, f) = recorder();
    hooks.register(&x, f).unwrap();
    hooks.remove_all().unwrap();
    assert!(hooks.is_empty());
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    (&x * weights()).sum(Kind::Float).backward();
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn hook_may_remove_itself_while_running() {
    let x = leaf();
    let h = &x * weights();
    let slot: Arc<Mutex<Option<GradHook>>> = Arc::new(Mutex::new(None));
    let (dropped, guard) = counter();
    let calls = Arc::new(AtomicUsize::new(0));
    let (s, c) = (slot.clone(), calls.clone());
    let hook = register_grad_hook(&h, move |g| {
        let _ = &guard;
        c.fetch_add(1, Ordering::SeqCst);
        let me = s.lock().unwrap().take().expect("handle stored");
        me.remove().unwrap();
        Some(g * 2.0)
    })
    .unwrap();
    *slot.lock().unwrap() = Some(hook);
    let y = (&h * &h).sum(Kind::Float);
    let grads = Tensor::run_backward(&[&y], &[&x], true, false);
    // The call that removed the hook still applies its result; the closure is dropped after it.
    assert_eq!(vals(&grads[0]), [64.0, 200.0, 432.0]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    assert!(slot.lock().unwrap().is_none());
    y.backward();
    assert_eq!(vals(&x.grad()), [32.0, 100.0, 216.0]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn backward_on_another_thread_runs_the_hook() {
    let x = leaf();
    let h = &x * weights();
    let (seen, _, f) = recorder();
    let hook = register_grad_hook(&h, f).unwrap();
    let y = (&h * &h).sum(Kind::Float);
    std::thread::spawn(move || y.backward()).join().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![vec![8.0, 20.0, 36.0]]);
    // The handle can be removed from another thread too.
    std::thread::spawn(move || hook.remove().unwrap())
        .join()
        .unwrap();
}
