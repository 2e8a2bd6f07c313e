use nnsight::prelude::*;
use nnsight::tch::nn;

struct Net {
    lin: Hooked<nn::Linear>,
    scale: f64,
}

impl HookModule for Net {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.lin.call(x) * self.scale
    }
}

fn main() {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let model = Hooked::with_path("", Net { lin: Hooked::new(&(&p / "lin"), nn::linear(&p / "lin", 4, 4, Default::default())), scale: 1.0 });
    let x = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    let _ = trace!(model, &x, {
        let h = model.lin.output.save();
        let rows: i64 = h.size()[0];
        for _ in 0..rows {}
        h
    });
}
