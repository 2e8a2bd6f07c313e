//! Tiny hand-built tch models for runtime tests.
#![allow(dead_code)]

use nnsight::tch::{nn, Device, Kind, Tensor};
use nnsight::{HookModule, Hooked, ModuleTree};
use std::sync::Mutex;

/// `tch::manual_seed` sets one generator for the whole process, and the tests of a binary run on
/// parallel threads: a test seeding and then drawing could see another test's draws in between.
/// Every seeded draw of these helpers holds this lock, so what they draw depends on the seed only.
static RNG: Mutex<()> = Mutex::new(());

/// Runs `draw` with the process's generator seeded with `seed` and no other seeded draw between.
pub fn seeded<T>(seed: i64, draw: impl FnOnce() -> T) -> T {
    let _held = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    draw()
}

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
    let p = vs.root();
    seeded(0, || {
        Hooked::with_path(
            "",
            Twice {
                lin: Hooked::new(&(&p / "lin"), nn::linear(&p / "lin", 4, 4, Default::default())),
                post: Hooked::new(&(&p / "post"), nn::linear(&p / "post", 4, 4, Default::default())),
            },
        )
    })
}

/// Builds a seeded `Stack` of `n` layers.
pub fn stack(vs: &nn::VarStore, n: usize) -> Hooked<Stack> {
    let p = vs.root() / "layers";
    let layers = seeded(1, || (0..n).map(|i| Hooked::new(&(&p / i), nn::linear(&p / i, 4, 4, Default::default()))).collect());
    Hooked::with_path("", Stack { layers })
}

/// A seeded input `[rows, 4]`.
pub fn input(rows: i64, seed: i64) -> Tensor {
    seeded(seed, || Tensor::randn([rows, 4], (Kind::Float, Device::Cpu)))
}
