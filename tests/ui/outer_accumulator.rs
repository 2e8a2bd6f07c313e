#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let mut total = 0.0;
    let _ = trace!(model, &x, {
        for l in 0..3 {
            total += model.layers[l].output.norm().double_value(&[]);
        }
    });
    println!("{total}");
}
