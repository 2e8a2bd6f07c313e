//! Tiny hand-built tch models for runtime tests.
#![allow(dead_code)]

use nnsight::tch::{nn, Device, Kind, Tensor};
use nnsight::{HookModule, Hooked, ModuleTree};

/// One `Linear(4, 4)` applied twice: a module called twice per forward pass.
#[derive(ModuleTree)]
pub struct Twice {
    pub lin: Hooked<nn::Linear>,
    pub post: Hooked<nn::Linear>,
}

impl HookModule for Twice {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let h = self.lin.call(x);
        let h = self.lin.call(h.relu());
        self.post.call(h)
    }
}

/// A stack of `n` Linear(4, 4) + tanh layers: `layers.0` .. `layers.{n-1}`.
#[derive(ModuleTree)]
pub struct Stack {
    pub layers: Vec<Hooked<nn::Linear>>,
}

impl HookModule for Stack {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.layers.iter().fold(x, |h, l| l.call(h).tanh())
    }
}

/// Builds a seeded `Twice` as a root module (path "").
pub fn twice(vs: &nn::VarStore) -> Hooked<Twice> {
    tch::manual_seed(0);
    let p = vs.root();
    Hooked::with_path(
        "",
        Twice {
            lin: Hooked::new(&(&p / "lin"), nn::linear(&p / "lin", 4, 4, Default::default())),
            post: Hooked::new(&(&p / "post"), nn::linear(&p / "post", 4, 4, Default::default())),
        },
    )
}

/// Builds a seeded `Stack` of `n` layers.
pub fn stack(vs: &nn::VarStore, n: usize) -> Hooked<Stack> {
    tch::manual_seed(1);
    let p = vs.root() / "layers";
    let layers = (0..n).map(|i| Hooked::new(&(&p / i), nn::linear(&p / i, 4, 4, Default::default()))).collect();
    Hooked::with_path("", Stack { layers })
}

/// A seeded input `[rows, 4]`.
pub fn input(rows: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([rows, 4], (Kind::Float, Device::Cpu))
}
