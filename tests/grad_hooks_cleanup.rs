//! No backward hook outlives its trace: counted with `nnsight::live_grad_hooks()` (alive hook
//! closures in the process). Its own test binary, so no other test registers hooks meanwhile.

mod common;

use common::tiny::{input, stack};
use nnsight::prelude::*;
use nnsight::tch::nn;

#[test]
fn no_backward_hook_remains_after_success_error_or_stop() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 3);
    let x = input(2, 3);
    assert_eq!(nnsight::live_grad_hooks(), 0);

    // Success: one hook on layers.0.output, used by a backward pass.
    let g = trace!(model, &x, {
        let g = model.layers[0].output.grad.save();
        model.output.sum(Kind::Float).backward();
        g
    })
    .unwrap();
    assert_eq!(g.size(), vec![2, 4]);
    assert_eq!(nnsight::live_grad_hooks(), 0, "after a successful trace");

    // Error after the hook was registered (a wrong-shape swap at a later layer).
    let err = trace!(model, &x, {
        let g = model.layers[0].output.grad.save();
        model.layers[2].output = Tensor::zeros([1, 1], (Kind::Float, Device::Cpu));
        model.output.sum(Kind::Float).backward();
        g
    })
    .unwrap_err();
    assert!(matches!(err, nnsight::Error::SwapMismatch { .. }), "{err}");
    assert_eq!(nnsight::live_grad_hooks(), 0, "after a failed trace");

    // Early stop after the hook was registered.
    let _ = trace!(model, &x, {
        let g = model.layers[0].output.grad.save();
        model.layers[1].output.stop();
        g
    });
    assert_eq!(nnsight::live_grad_hooks(), 0, "after a stopped trace");

    // A hook registered by hand is counted, so the count is not trivially zero.
    let t = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let y = &t * 2.0;
    let hook = nnsight::register_grad_hook(&y, |_| None).unwrap();
    assert_eq!(nnsight::live_grad_hooks(), 1);
    hook.remove().unwrap();
    assert_eq!(nnsight::live_grad_hooks(), 0);
}
