#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = (|| {
        trace!(model, &x, {
            if model.lin.output.sum(Kind::Float).double_value(&[]) > 0.0 {
                return Err(Error::Input("positive".into()));
            }
            model.lin.output = model.lin.output * 2.0;
        })
    })();
}
