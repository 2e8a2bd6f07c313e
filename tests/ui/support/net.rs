// A tiny traced model for the compile-fail cases: `lin`, then three `layers`.
use nnsight::prelude::*;
use nnsight::tch::nn;

pub struct Net {
    pub lin: Hooked<nn::Linear>,
    pub layers: Vec<Hooked<nn::Linear>>,
}

impl HookModule for Net {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let h = self.lin.call(x);
        self.layers.iter().fold(h, |h, l| l.call(h))
    }
}

pub fn net() -> Hooked<Net> {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let lin = Hooked::new(&(&p / "lin"), nn::linear(&p / "lin", 4, 4, Default::default()));
    let layers = (0..3).map(|i| Hooked::new(&(&p / "layers" / i), nn::linear(&p / "layers" / i, 4, 4, Default::default()))).collect();
    Hooked::with_path("", Net { lin, layers })
}
