use nnsight::prelude::*;
use nnsight::tch::nn;

struct Net {
    lin: Hooked<nn::Linear>,
    layers: Vec<Hooked<nn::Linear>>,
}

impl HookModule for Net {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let h = self.lin.call(x);
        self.layers.iter().fold(h, |h, l| l.call(h))
    }
}

fn net() -> Hooked<Net> {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let lin = Hooked::new(&(&p / "lin"), nn::linear(&p / "lin", 4, 4, Default::default()));
    let layers = (0..3).map(|i| Hooked::new(&(&p / "layers" / i), nn::linear(&p / "layers" / i, 4, 4, Default::default()))).collect();
    Hooked::with_path("", Net { lin, layers })
}

fn main() {
    let model = net();
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = trace!(model, &x, {
        model.lin.output[:, 0].save()
    });
}
