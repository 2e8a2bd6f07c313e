#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let xs = vec![Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)), Tensor::ones([1, 4], (Kind::Float, Device::Cpu))];
    let _ = trace!(model, {
        invoke(&xs[0]) {
            for x in &xs {
                invoke(x) {
                    let _h = model.lin.output.save();
                }
            }
        }
    });
}
