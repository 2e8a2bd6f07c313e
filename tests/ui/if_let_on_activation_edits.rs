#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = trace!(model, &x, {
        if let Some(v) = model.lin.output.f_sum(Kind::Float).ok() {
            model.layers[0].output = model.layers[0].output * v;
        }
    });
}
