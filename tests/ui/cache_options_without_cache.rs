#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = trace!(model, &x, cache_options = CacheOptions::default(), {
        model.lin.output.save()
    });
}
