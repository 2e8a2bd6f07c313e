#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = trace!(model, &x, {
        let mut v = Vec::new();
        for layer in model.layers.iter() {
            v.push(layer.output.save());
        }
        v
    });
}
