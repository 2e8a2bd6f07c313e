#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = trace!(model, &x, {
        match model.lin.output.size()[0] {
            1 => model.layers[0].output[.., 0] = 0.0,
            _ => {}
        }
    });
}
