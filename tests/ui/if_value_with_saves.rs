#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = trace!(model, &x, {
        if model.lin.output.sum(Kind::Float).double_value(&[]) > 0.0 {
            model.layers[0].output.save()
        } else {
            model.layers[1].output.save()
        }
    });
}
