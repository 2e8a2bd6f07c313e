//! The MLP activations every family shares, as transformers' `ACT2FN` names them in
//! `config.json` (`hidden_act`, `hidden_activation`, `activation_function`).

use tch::Tensor;

use crate::activation::Layout;
use crate::hook::HookModule;
use crate::models::ROWS;
use crate::tree::ModuleTree;

/// A feed-forward activation (BERT's `intermediate.intermediate_act_fn`, GPT-2's and GPT-NeoX's
/// `mlp.act`, the gated MLPs' `act_fn`; transformers' `ACT2FN`).
///
/// A hookable module without weights: Input and Output are tensors of the same shape
/// `[batch, seq, intermediate_size]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenAct {
    /// `"gelu"`: exact GELU, `x * Φ(x)` with the erf (PyTorch `gelu(approximate="none")`).
    Gelu,
    /// `"gelu_new"`, `"gelu_pytorch_tanh"`: GELU's tanh approximation.
    GeluTanh,
    /// `"relu"`.
    Relu,
    /// `"silu"`, `"swish"`: `x * sigmoid(x)`.
    Silu,
}

impl HiddenAct {
    /// Parses a config's `hidden_act`; the error lists the supported names.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(HiddenAct::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(HiddenAct::GeluTanh),
            "relu" => Ok(HiddenAct::Relu),
            "silu" | "swish" => Ok(HiddenAct::Silu),
            other => Err(format!(
                "`hidden_act` \"{other}\" is not supported (supported: \"gelu\", \"gelu_new\", \
                 \"gelu_pytorch_tanh\", \"relu\", \"silu\", \"swish\")"
            )),
        }
    }
}

impl ModuleTree for HiddenAct {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for HiddenAct {
    type Input = Tensor;
    type Output = Tensor;
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn input_layout(&self) -> Layout {
        ROWS
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, x: Tensor) -> Tensor {
        match self {
            HiddenAct::Gelu => x.gelu("none"),
            HiddenAct::GeluTanh => x.gelu("tanh"),
            HiddenAct::Relu => x.relu(),
            HiddenAct::Silu => x.silu(),
        }
    }
}
