use nnsight::prelude::*;
use nnsight::tch::nn;

#[derive(ModuleTree)]
struct Block {
    dense: Hooked<nn::Linear>,
    output: Hooked<nn::Linear>,
    scale: f64,
}

fn main() {}
