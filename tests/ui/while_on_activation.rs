#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = trace!(model, &x, {
        let mut l = 0;
        while model.layers[l].output.sum(Kind::Float).double_value(&[]) > 0.0 {
            l += 1;
        }
    });
}
