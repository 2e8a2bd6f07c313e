#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let xs = vec![Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)), Tensor::ones([1, 4], (Kind::Float, Device::Cpu))];
    let _ = trace!(model, {
        invoke(&xs[0]) {
            let big = model.lin.output.sum(Kind::Float).double_value(&[]) > 0.0;
        }
        for x in &xs {
            if big {
                invoke(x) {
                    let _h = model.lin.output.save();
                }
            }
        }
    });
}
