#[path = "support/net.rs"]
mod support;
use nnsight::prelude::*;
use support::net;

fn main() {
    let model = net();
    let _ = edit!(model, {
        let h = model.lin.output.save();
    });
}
