//! Error texts (issue 12, cases 6 and 7): the user's own error text comes through whole; a
//! libtorch error is cut to its first meaningful sentence, without the dispatcher table or C++
//! stack frames, and the message still names the node, the hook point it read with its layout,
//! and the swap its value was for.

mod common;

use common::tiny::{input, stack};
use nnsight::prelude::*;
use nnsight::tch::nn;
use nnsight::Error;

/// A check of the user's own that fails with the user's own text.
fn check_len(h: &Tensor) -> Result<Tensor, Error> {
    Err(Error::Input(format!("seq {} too long", h.size()[0] + 2)))
}

#[test]
fn the_users_own_error_text_comes_through_whole() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 60);
    let err = trace!(model, &x, {
        let h = check_len(&model.layers[0].output).unwrap();
        h.save()
    })
    .unwrap_err();
    assert!(matches!(err, Error::Node { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("intervention node %1 apply (at tests/error_text.rs:"), "{msg}");
    assert!(msg.ends_with(r#") failed: Input("seq 3 too long") (inputs: %0 layers.0.output = Tensor[1, 4] Float Cpu)"#), "{msg}");
}

#[test]
fn a_device_error_in_a_swap_names_node_point_and_layouts_without_the_dispatcher_table() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 61);
    let err = trace!(model, &x, {
        model.layers[0].output = model.layers[0].output.to_device(Device::Cuda(0));
    })
    .unwrap_err();
    let msg = err.to_string();
    if tch::Cuda::is_available() {
        // With a GPU the value exists, and the swap refuses it with both layouts.
        assert!(matches!(err, Error::SwapMismatch { .. }), "{msg}");
        assert!(msg.contains("expected Tensor[1, 4] Float Cpu, got Tensor[1, 4] Float Cuda(0)"), "{msg}");
        return;
    }
    // A CPU-only libtorch: 11,000 characters of dispatcher table from libtorch, cut to one sentence.
    assert!(matches!(err, Error::Node { .. }), "{msg}");
    assert!(msg.starts_with("intervention node %1 apply (at tests/error_text.rs:"), "{msg}");
    assert!(
        msg.ends_with(
            ") failed: Could not run 'aten::empty_strided' with arguments from the 'CUDA' backend. \
             (inputs: %0 layers.0.output = Tensor[1, 4] Float Cpu); its value is for the swap at `layers.0.output` (call 0, invoke 0)"
        ),
        "{msg}"
    );
    assert!(msg.len() < 300 && !msg.contains("registered at") && !msg.contains("\\n"), "{msg}");
}

#[test]
fn an_op_on_a_sparse_tensor_is_one_sentence() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(2, 62);
    let err = trace!(model, &x, {
        model.layers[0].output.to_sparse(None::<nnsight::tch::Layout>, None::<&[i64]>, None::<i64>).view([8]).save()
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.ends_with(
            ") failed: Could not run 'aten::view' with arguments from the 'SparseCPU' backend. \
             (inputs: %0 layers.0.output = Tensor[2, 4] Float Cpu)"
        ),
        "{msg}"
    );
}

#[test]
fn a_dtype_error_loses_its_stack_frames() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = stack(&vs, 2);
    let x = input(1, 63);
    let err = trace!(model, &x, {
        model.layers[1].output.to_kind(Kind::Bool).cumprod(1, Kind::Bool).save()
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.ends_with(r#") failed: "cumprod_out_cpu" not implemented for 'Bool' (inputs: %0 layers.1.output = Tensor[1, 4] Float Cpu)"#),
        "{msg}"
    );
}

#[test]
fn an_index_out_of_range_names_the_call_and_invoke_its_input_came_from_when_not_the_first() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = common::tiny::twice(&vs);
    let (a, b) = (input(1, 64), input(2, 65));
    let err = trace!(model, {
        invoke(&a) {
            let fine = model.lin.output.save();
        }
        invoke(&b) {
            let _first = model.lin.output.save();
            let bad = model.lin.next().output.i((.., 9)).save();
            (fine, bad)
        }
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Node { .. }), "{msg}");
    assert!(msg.contains("index 9 out of range for tensor of size [2, 4] at dimension 1"), "{msg}");
    assert!(msg.ends_with("(inputs: %2 lin.output [invoke 1] [call 1] = Tensor[2, 4] Float Cpu)"), "{msg}");
}
