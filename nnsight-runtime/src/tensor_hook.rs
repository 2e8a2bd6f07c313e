//! Tensor backward hooks and `retain_grad`, which tch does not expose (tch-rs #769, #874).
//!
//! They come from libtorch itself: `csrc/tensor_hooks.cpp`, compiled by this crate's build
//! script, calls `at::Tensor::register_hook`, `remove_hook` and `retain_grad` on the
//! `at::Tensor` that a [`tch::Tensor`] wraps.
//!
//! ```no_run
//! use nnsight_runtime::tensor_hook::register_grad_hook;
//! use tch::{Kind, Tensor};
//!
//! let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
//! let y = &x * 2.0;
//! // Zero the gradient flowing through `y`.
//! let hook = register_grad_hook(&y, |g| Some(g.zeros_like()))?;
//! y.sum(Kind::Float).backward();
//! hook.remove()?;
//! # Ok::<(), nnsight_runtime::Error>(())
//! ```
//!
//! # Threads
//!
//! libtorch's autograd engine runs CPU backward work on the thread that called `backward`, but
//! the work of an accelerator (CUDA, ...) on the engine's worker thread for that device while
//! the calling thread waits. A hook closure therefore may run on another thread than the one
//! that registered it, and it is dropped on whichever thread removes the hook or frees the last
//! reference to the tensor and its graph: closures must be `Send`. Calls of one hook never
//! overlap (the closure sits behind a mutex). Do not remove a hook while a backward pass that
//! reaches it runs on *another* thread: libtorch's hook list is not synchronised.
//!
//! # Lifetimes
//!
//! Closures are `'static`: a handle cannot guarantee that the closure is gone before a borrow
//! ends (it may be leaked with `mem::forget`, and a call in flight on a worker thread keeps the
//! closure alive), so they own what they use (shallow clones of tensors, `Arc`s, channels).
//!
//! # Errors inside hooks
//!
//! Nothing unwinds through libtorch. A panic inside a closure is caught, the gradient is kept
//! unchanged, backward goes on, and the message is stored on the hook: read it with
//! [`GradHook::take_error`] (or [`GradHooks::take_errors`]). A replacement whose shape, dtype or
//! device differs from the gradient's (which libtorch would reject by failing the whole
//! backward pass) is treated the same way.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe, Location};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{panic_message, Error, Result};

type HookFn = dyn FnMut(&Tensor) -> Option<Tensor> + Send + 'static;
type CallFn = unsafe extern "C" fn(*mut c_void, *mut C_tensor) -> *mut C_tensor;
type DropFn = unsafe extern "C" fn(*mut c_void);

extern "C" {
    fn nnsight_hooks_register(
        t: *const C_tensor,
        state: *mut c_void,
        call: CallFn,
        drop: DropFn,
        pos: *mut c_uint,
        weak: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn nnsight_hooks_remove(
        weak: *mut c_void,
        pos: c_uint,
        removed: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn nnsight_hooks_free_weak(weak: *mut c_void);
    fn nnsight_hooks_retain_grad(t: *const C_tensor, err: *mut *mut c_char) -> c_int;
    fn nnsight_hooks_retains_grad(
        t: *const C_tensor,
        out: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn nnsight_hooks_free_error(err: *mut c_char);
}

/// Turns the shim's return code and message into a `Result`.
fn check(rc: c_int, err: *mut c_char) -> std::result::Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    if err.is_null() {
        return Err("unknown libtorch error".to_string());
    }
    // SAFETY: the shim hands back a NUL-terminated malloc'd string, freed right after copying.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .trim()
        .to_string();
    unsafe { nnsight_hooks_free_error(err) };
    Err(msg)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closures of registered hooks that are still alive, in the whole process.
static LIVE_CLOSURES: AtomicUsize = AtomicUsize::new(0);

/// Counts one live closure while it exists (moved into the closure, dropped with it).
struct LiveToken;

impl LiveToken {
    fn new() -> Self {
        LIVE_CLOSURES.fetch_add(1, Ordering::SeqCst);
        LiveToken
    }
}

impl Drop for LiveToken {
    fn drop(&mut self) {
        LIVE_CLOSURES.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many gradient-hook closures registered through this module are alive in the process
/// (registered and neither removed nor freed with their tensor). After a trace ends — also with
/// an error — its hooks are gone, so this is back to what it was before.
pub fn live_grad_hooks() -> usize {
    LIVE_CLOSURES.load(Ordering::SeqCst)
}

thread_local! {
    /// Hooks whose closure is running on this thread (addresses of their `Inner`).
    static RUNNING: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

fn running_here(id: usize) -> bool {
    RUNNING
        .try_with(|r| r.borrow().contains(&id))
        .unwrap_or(false)
}

/// Marks a hook as running on this thread for the guard's lifetime.
struct RunningGuard(usize);

impl RunningGuard {
    fn enter(id: usize) -> Self {
        let _ = RUNNING.try_with(|r| r.borrow_mut().push(id));
        RunningGuard(id)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let _ = RUNNING.try_with(|r| {
            let mut r = r.borrow_mut();
            if let Some(i) = r.iter().rposition(|&x| x == self.0) {
                r.remove(i);
            }
        });
    }
}

/// State shared by libtorch's hook (one strong `Arc`, released by [`drop_hook`]) and the handle.
struct Inner {
    /// The user's closure; `None` once removed or once libtorch dropped the hook.
    closure: Mutex<Option<Box<HookFn>>>,
    /// Set by removal: the closure is not called any more.
    removed: AtomicBool,
    /// Set when libtorch destroyed its side of the hook (no `remove_hook` needed or allowed).
    detached: AtomicBool,
    /// Messages of panics and rejected replacements, oldest first.
    errors: Mutex<Vec<String>>,
    /// Where the hook was registered, for messages.
    location: &'static Location<'static>,
}

impl Inner {
    fn id(&self) -> usize {
        self as *const Inner as usize
    }

    fn record(&self, msg: String) {
        lock(&self.errors).push(format!("hook registered at {}: {msg}", self.location));
    }

    /// Takes the closure out (dropping it outside the lock), unless it is running on this
    /// thread, in which case the call drops it when it returns.
    fn drop_closure(&self) {
        if running_here(self.id()) {
            return;
        }
        let f = lock(&self.closure).take();
        if catch_unwind(AssertUnwindSafe(move || drop(f))).is_err() {
            self.record("the closure panicked while being dropped".to_string());
        }
    }

    /// Runs the closure on `grad`; `Some` only for a valid replacement.
    fn call(&self, grad: &Tensor) -> Option<Tensor> {
        if self.removed.load(Ordering::Acquire) {
            return None;
        }
        if running_here(self.id()) {
            self.record(
                "re-entered during its own call (a backward pass inside the hook reached the same \
                 tensor); the inner call kept the gradient unchanged"
                    .to_string(),
            );
            return None;
        }
        let _running = RunningGuard::enter(self.id());
        let mut slot = lock(&self.closure);
        let f = slot.as_mut()?;
        let out = match catch_unwind(AssertUnwindSafe(|| f(grad))) {
            Ok(out) => out,
            Err(payload) => {
                self.record(format!(
                    "panicked: {}; the gradient was kept unchanged",
                    panic_message(&*payload)
                ));
                None
            }
        };
        if self.removed.load(Ordering::Acquire) {
            // Removed from inside the closure: drop it now that it returned.
            let f = slot.take();
            drop(slot);
            if catch_unwind(AssertUnwindSafe(move || drop(f))).is_err() {
                self.record("the closure panicked while being dropped".to_string());
            }
        } else {
            drop(slot);
        }
        let replacement = out.filter(Tensor::defined)?;
        if !grad.defined() {
            self.record(
                "returned a replacement for an undefined gradient; the gradient was kept".into(),
            );
            return None;
        }
        let layout = |t: &Tensor| {
            let kind = t
                .f_kind()
                .map_or_else(|_| "?".to_string(), |k| format!("{k:?}"));
            format!("{:?} {kind} {:?}", t.size(), t.device())
        };
        let (want, got) = (layout(grad), layout(&replacement));
        if want != got {
            self.record(format!(
                "returned a replacement of layout {got} for a gradient of layout {want}; \
                 the gradient was kept unchanged"
            ));
            return None;
        }
        Some(replacement)
    }
}

/// Called by the C++ hook during backward. Owns `grad`; returns null (keep the gradient) or a
/// tensor whose ownership passes to C++.
unsafe extern "C" fn call_hook(state: *mut c_void, grad: *mut C_tensor) -> *mut C_tensor {
    // SAFETY: `state` is the `Arc<Inner>` pointer given at registration; the C++ side keeps its
    // reference alive for the whole call. `grad` is a fresh heap at::Tensor owned by us.
    let inner = unsafe { &*(state as *const Inner) };
    let grad = unsafe { Tensor::from_ptr(grad) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let out = inner.call(&grad);
        drop(grad);
        out
    }));
    match result {
        Ok(Some(mut t)) => {
            let p = t.as_mut_ptr();
            std::mem::forget(t);
            p
        }
        Ok(None) => ptr::null_mut(),
        Err(payload) => {
            let msg = panic_message(&*payload);
            let _ = catch_unwind(AssertUnwindSafe(|| {
                inner.record(format!(
                    "internal panic: {msg}; the gradient was kept unchanged"
                ))
            }));
            ptr::null_mut()
        }
    }
}

/// Deleter of the C++ side: runs once, when libtorch destroys the hook (removal, or the tensor's
/// autograd metadata and graph being freed) or when registering fails.
unsafe extern "C" fn drop_hook(state: *mut c_void) {
    // SAFETY: `state` came from `Arc::into_raw` at registration and is released exactly once.
    let inner = unsafe { Arc::from_raw(state as *const Inner) };
    let _ = catch_unwind(AssertUnwindSafe(move || {
        inner.detached.store(true, Ordering::Release);
        inner.drop_closure();
        drop(inner);
    }));
}

/// Handle of a registered gradient hook; [`remove`](GradHook::remove) (or dropping the handle)
/// unregisters it and drops the closure.
///
/// Without removal the closure lives as long as libtorch holds the hook: until both the tensor
/// and the graph that uses it are freed. Use [`keep`](GradHook::keep) to leave it registered
/// after the handle is gone.
#[must_use = "dropping a GradHook removes the hook"]
pub struct GradHook {
    inner: Arc<Inner>,
    /// `c10::weak_intrusive_ptr<TensorImpl>` of the hooked tensor (does not keep it alive);
    /// null once removed or kept.
    weak: *mut c_void,
    pos: c_uint,
}

// SAFETY: `Inner` is Send + Sync (closure `Send` behind a mutex). The weak pointer is only
// touched through `&mut self` / `self`, and weak_intrusive_ptr's reference counts are atomic.
unsafe impl Send for GradHook {}
unsafe impl Sync for GradHook {}

impl std::fmt::Debug for GradHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradHook")
            .field("registered_at", &self.inner.location.to_string())
            .field("pos", &self.pos)
            .field("active", &self.is_active())
            .finish()
    }
}

impl GradHook {
    /// Unregisters the hook and drops the closure (if the closure is running on this thread,
    /// right after it returns). If the tensor was already freed while its graph lives on, the
    /// closure is dropped and libtorch's empty hook entry goes with the graph.
    pub fn remove(mut self) -> Result<()> {
        self.remove_impl()
    }

    fn remove_impl(&mut self) -> Result<()> {
        if self.weak.is_null() {
            return Ok(());
        }
        self.inner.removed.store(true, Ordering::Release);
        self.inner.drop_closure();
        let weak = std::mem::replace(&mut self.weak, ptr::null_mut());
        let mut res = Ok(());
        if !self.inner.detached.load(Ordering::Acquire) {
            let (mut removed, mut err) = (0, ptr::null_mut());
            // SAFETY: `weak` came from nnsight_hooks_register and is freed once, below.
            let rc = unsafe { nnsight_hooks_remove(weak, self.pos, &mut removed, &mut err) };
            res = check(rc, err).map_err(|m| {
                Error::GradHook(format!(
                    "cannot remove the hook registered at {}: {m}",
                    self.inner.location
                ))
            });
        }
        // SAFETY: as above.
        unsafe { nnsight_hooks_free_weak(weak) };
        res
    }

    /// Leaves the hook registered for the rest of the tensor's life and forgets the handle.
    /// Errors recorded from then on cannot be read.
    pub fn keep(mut self) {
        let weak = std::mem::replace(&mut self.weak, ptr::null_mut());
        if !weak.is_null() {
            // SAFETY: `weak` came from nnsight_hooks_register and is freed once.
            unsafe { nnsight_hooks_free_weak(weak) };
        }
    }

    /// Whether the closure is still held (not removed, and the tensor and its graph not freed).
    pub fn is_active(&self) -> bool {
        !self.inner.removed.load(Ordering::Acquire)
            && !self.inner.detached.load(Ordering::Acquire)
            && !self.weak.is_null()
    }

    /// The oldest error recorded by the hook (a panic of the closure, a rejected replacement),
    /// removing it; `None` if there is none.
    pub fn take_error(&self) -> Option<Error> {
        let mut errors = lock(&self.inner.errors);
        if errors.is_empty() {
            None
        } else {
            Some(Error::GradHook(errors.remove(0)))
        }
    }

    /// All errors recorded by the hook, oldest first, removing them.
    pub fn take_errors(&self) -> Vec<Error> {
        std::mem::take(&mut *lock(&self.inner.errors))
            .into_iter()
            .map(Error::GradHook)
            .collect()
    }

    /// Where the hook was registered.
    pub fn location(&self) -> &'static Location<'static> {
        self.inner.location
    }
}

impl Drop for GradHook {
    fn drop(&mut self) {
        let _ = self.remove_impl();
    }
}

/// Registers `f` to run when the gradient of `t` is computed during backward. `f` sees the
/// gradient and returns `Some(replacement)` to replace it (same shape, dtype and device) or
/// `None` to keep it. The replacement flows on through the graph and, for a leaf, into
/// `t.grad()`. Several hooks on one tensor run in registration order, each seeing the previous
/// one's result.
///
/// The gradient handed to `f` shares libtorch's storage: do not modify it in place, return a
/// replacement instead (an undefined tensor counts as `None`). The closure runs with grad mode
/// as the backward pass sets it (off unless backward builds a graph), on the thread described
/// in the [module docs](self). Errors: `t` is undefined or does not require grad (the closure is
/// dropped then).
#[track_caller]
pub fn register_grad_hook(
    t: &Tensor,
    f: impl FnMut(&Tensor) -> Option<Tensor> + Send + 'static,
) -> Result<GradHook> {
    let location = Location::caller();
    if !t.defined() {
        return Err(Error::GradHook(format!(
            "cannot register a gradient hook on an undefined tensor (at {location})"
        )));
    }
    let inner = Arc::new(Inner {
        closure: Mutex::new(Some({
            let token = LiveToken::new();
            let mut f = f;
            Box::new(move |g: &Tensor| {
                let _alive = &token;
                f(g)
            })
        })),
        removed: AtomicBool::new(false),
        detached: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        location,
    });
    let state = Arc::into_raw(Arc::clone(&inner)) as *mut c_void;
    let (mut pos, mut weak, mut err) = (0, ptr::null_mut(), ptr::null_mut());
    // SAFETY: `t` is a live tensor; ownership of `state` passes to the shim, which calls
    // `drop_hook` exactly once (right away if registering fails).
    let rc = unsafe {
        nnsight_hooks_register(
            t.as_ptr(),
            state,
            call_hook,
            drop_hook,
            &mut pos,
            &mut weak,
            &mut err,
        )
    };
    check(rc, err).map_err(|m| {
        Error::GradHook(format!(
            "cannot register a gradient hook (at {location}): {m}"
        ))
    })?;
    Ok(GradHook { inner, weak, pos })
}

/// Makes `t.grad()` defined after backward although `t` is not a leaf (a no-op on leaves).
/// Errors: `t` is undefined or does not require grad.
pub fn retain_grad(t: &Tensor) -> Result<()> {
    if !t.defined() {
        return Err(Error::GradHook(
            "retain_grad on an undefined tensor".to_string(),
        ));
    }
    let mut err = ptr::null_mut();
    // SAFETY: `t` is a live tensor.
    let rc = unsafe { nnsight_hooks_retain_grad(t.as_ptr(), &mut err) };
    check(rc, err).map_err(|m| Error::GradHook(format!("retain_grad: {m}")))
}

/// Whether `t` is a non-leaf whose gradient is retained (by [`retain_grad`]).
pub fn retains_grad(t: &Tensor) -> Result<bool> {
    if !t.defined() {
        return Err(Error::GradHook(
            "retains_grad on an undefined tensor".to_string(),
        ));
    }
    let (mut out, mut err) = (0, ptr::null_mut());
    // SAFETY: `t` is a live tensor.
    let rc = unsafe { nnsight_hooks_retains_grad(t.as_ptr(), &mut out, &mut err) };
    check(rc, err).map_err(|m| Error::GradHook(format!("retains_grad: {m}")))?;
    Ok(out != 0)
}

/// The gradient hooks of one trace: dropping the collection (or
/// [`remove_all`](GradHooks::remove_all)) removes every hook and drops every closure, so none
/// outlives the trace.
#[derive(Debug, Default)]
#[must_use = "dropping GradHooks removes its hooks"]
pub struct GradHooks {
    hooks: Vec<GradHook>,
}

impl GradHooks {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// [`register_grad_hook`], keeping the handle here.
    #[track_caller]
    pub fn register(
        &mut self,
        t: &Tensor,
        f: impl FnMut(&Tensor) -> Option<Tensor> + Send + 'static,
    ) -> Result<()> {
        let hook = register_grad_hook(t, f)?;
        self.hooks.push(hook);
        Ok(())
    }

    /// Adds a hook registered elsewhere.
    pub fn push(&mut self, hook: GradHook) {
        self.hooks.push(hook);
    }

    /// Number of hooks held.
    pub fn len(&self) -> usize {
        self.hooks.len()
    }

    /// Whether no hook is held.
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// Errors recorded by all hooks, in registration order of the hooks, oldest first per hook.
    pub fn take_errors(&self) -> Vec<Error> {
        self.hooks.iter().flat_map(GradHook::take_errors).collect()
    }

    /// Removes every hook (latest first); returns the first removal error after trying all.
    pub fn remove_all(&mut self) -> Result<()> {
        let mut first = Ok(());
        while let Some(hook) = self.hooks.pop() {
            if let Err(e) = hook.remove() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl Drop for GradHooks {
    fn drop(&mut self) {
        let _ = self.remove_all();
    }
}
