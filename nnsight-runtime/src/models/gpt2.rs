//! GPT-2 in tch, every submodule hookable.
//!
//! Architecture: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", as
//! implemented by Hugging Face transformers' `models/gpt2/modeling_gpt2.py` (`GPT2LMHeadModel`,
//! eager attention, eval mode: no dropout). Module names and nesting follow that file, so every
//! module path is the prefix of its checkpoint keys:
//!
//! ```text
//! Gpt2                          (root, path "")        Input CausalInput, Output logits
//! ├── transformer               Gpt2Transformer        Output last hidden state (after ln_f)
//! │   ├── wte                   nn::Embedding [vocab, hidden]
//! │   ├── wpe                   nn::Embedding [n_positions, hidden]
//! │   ├── h[i]                  Gpt2Block              (transformer.h.0 ..), Output [batch, seq, hidden]
//! │   │   ├── ln_1, ln_2        nn::LayerNorm
//! │   │   ├── attn              Gpt2Attention: c_attn, c_proj (Conv1D); hook points
//! │   │   │                     q, k, scores, probs, z (HookPoint, see super::point)
//! │   │   └── mlp               Gpt2Mlp: c_fc, act, c_proj
//! │   └── ln_f                  nn::LayerNorm
//! └── lm_head                   LmHead, tied to transformer.wte.weight
//! ```
//!
//! A block's output is the hidden-state tensor (no tuple), so `model.transformer.h[5].output * 2.0`
//! works in a trace. Checkpoints saved from `GPT2LMHeadModel` (`transformer.h.0...`) and from
//! the bare `GPT2Model` (`h.0...`, the original `gpt2` checkpoints) both load.
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `n_embd`.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};
use super::causal::device_map::{to, Mover};

use super::act::HiddenAct;
use super::causal::{self, CausalInput, CausalLm, Decoder, KvCacheHandle, LmHead, LoadOptions, TokenIds};
use super::params;
use super::point::{AttentionPoints, HookPoint};
use crate::error::Result;
use crate::activation::Layout;
use crate::hook::{HookModule, Hooked};
use crate::models::{CAUSAL_INPUT, ROWS};
use crate::tree::ModuleTree;
use nnsight_macros::ModuleTree;

mod config;
pub use config::Gpt2Config;

/// GPT-2 with its language-model head (transformers' `GPT2LMHeadModel`).
///
/// Input [`CausalInput`]: `(input_ids [batch, seq], attention_mask [batch, past + seq],
/// position_ids [batch, seq], cache)`. Output: logits `[batch, seq, vocab]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gpt2 {
    /// `transformer`: embeddings, blocks, final LayerNorm.
    pub transformer: Hooked<Gpt2Transformer>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`, weight tied to `wte`.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: Gpt2Config,
}

impl Gpt2 {
    /// A GPT-2 with zero weights as variables under `p` (use `vs.root()`: the variable names are
    /// the checkpoint keys, `transformer.h.0.attn.c_attn.weight`, ...). Errors:
    /// [`crate::Error::Config`] for a config failing [`Gpt2Config::validate`],
    /// [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &Gpt2Config) -> Result<Gpt2> {
        const WHAT: &str = "<Gpt2Config given to Gpt2::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pt = p / "transformer";
            let transformer = Gpt2Transformer::new(&pt, config)?;
            let tied = config.tie_word_embeddings.then_some(&transformer.wte.ws);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.n_embd);
            Ok(Gpt2 { transformer: Hooked::new(&pt, transformer), lm_head, config: config.clone() })
        })
    }
}

impl HookModule for Gpt2 {
    /// [`CausalInput`].
    type Input = CausalInput;
    /// Logits `[batch, seq, vocab]`.
    type Output = Tensor;
    /// Ids, mask and position ids `[batch, ..]`; the KV cache handle shared.
    fn input_layout(&self) -> Layout {
        CAUSAL_INPUT
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, input: CausalInput) -> Tensor {
        self.lm_head.call(self.transformer.call(input))
    }
}

/// The variable names of the parts a [`causal::DeviceMap`] places.
const GPT2_PARTS: causal::Parts = causal::Parts { embedding: &["transformer.wte.", "transformer.wpe."], layers: "transformer.h.", final_norm: "transformer.ln_f.", unembedding: "lm_head." };

impl CausalLm for Gpt2 {
    fn load_with(dir: &Path, options: &LoadOptions) -> Result<Self> {
        causal::check_load(dir, options)?;
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        causal::load_model(dir, options, &["transformer."], &GPT2_PARTS, |p| Gpt2::new(p, &config))
    }
    fn max_positions(&self) -> i64 {
        self.config.n_positions
    }
    fn num_layers(&self) -> usize {
        self.transformer.h.len()
    }
    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }
    fn eos_token_ids(&self) -> Vec<i64> {
        self.config.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
    fn pad_token_id(&self) -> Option<i64> {
        self.config.pad_token_id
    }
    fn device(&self) -> Device {
        self.transformer.wte.ws.device()
    }
    fn kind(&self) -> Kind {
        self.transformer.wte.ws.kind()
    }
}

/// `LanguageModel::<Gpt2>`: ids and mask from the tokenizer, position ids from the mask, no cache.
/// `transformer.h`, `transformer.h.{i}.attn`, `.mlp`, `.mlp.act`, `transformer.ln_f`, `lm_head`.
impl Decoder for Gpt2 {
    type Layer = Gpt2Block;
    type Attn = Gpt2Attention;
    type Mlp = Gpt2Mlp;
    type MlpAct = HiddenAct;
    type Norm = nn::LayerNorm;
    fn layers(&self) -> &Vec<Hooked<Gpt2Block>> {
        &self.transformer.h
    }
    fn layer_attn(layer: &Hooked<Self::Layer>) -> &Hooked<Gpt2Attention> {
        &layer.attn
    }
    fn layer_mlp(layer: &Hooked<Self::Layer>) -> &Hooked<Gpt2Mlp> {
        &layer.mlp
    }
    fn layer_mlp_act(layer: &Hooked<Self::Layer>) -> &Hooked<HiddenAct> {
        &layer.mlp.act
    }
    fn final_norm(&self) -> &Hooked<nn::LayerNorm> {
        &self.transformer.ln_f
    }
    fn unembedding(&self) -> &Hooked<LmHead> {
        &self.lm_head
    }
    fn final_norm_device(&self) -> Device {
        self.transformer.ln_f.ws.as_ref().map_or(self.device(), Tensor::device)
    }
}

/// `transformer`: token + position embeddings, the blocks, the final LayerNorm
/// (transformers' `GPT2Model`).
///
/// Input [`CausalInput`]; output the last hidden state `[batch, seq, hidden]` (after `ln_f`).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gpt2Transformer {
    /// `wte`: `[vocab, hidden]`; ids `[batch, seq]` → `[batch, seq, hidden]`.
    pub wte: Hooked<nn::Embedding>,
    /// `wpe`: `[n_positions, hidden]`; position ids `[batch, seq]` → `[batch, seq, hidden]`.
    pub wpe: Hooked<nn::Embedding>,
    /// `h`: the blocks `transformer.h.0` .. `transformer.h.{n_layer - 1}`.
    pub h: Vec<Hooked<Gpt2Block>>,
    /// `ln_f`: final LayerNorm, `[batch, seq, hidden]` in and out.
    pub ln_f: Hooked<nn::LayerNorm>,
}

impl Gpt2Transformer {
    /// Zero weights under `p` (`transformer`).
    pub fn new(p: &nn::Path, c: &Gpt2Config) -> Result<Self> {
        let ph = p / "h";
        let h = (0..c.n_layer)
            .map(|i| {
                let q = &ph / i;
                Ok(Hooked::new(&q, Gpt2Block::new(&q, c, i)?))
            })
            .collect::<Result<_>>()?;
        Ok(Gpt2Transformer {
            wte: causal::embedding(&(p / "wte"), c.vocab_size, c.n_embd),
            wpe: causal::embedding(&(p / "wpe"), c.n_positions, c.n_embd),
            h,
            ln_f: causal::layer_norm(&(p / "ln_f"), c.n_embd, c.layer_norm_epsilon),
        })
    }
}

impl HookModule for Gpt2Transformer {
    /// [`CausalInput`].
    type Input = CausalInput;
    /// `[batch, seq, hidden]`.
    type Output = Tensor;
    /// Ids, mask and position ids `[batch, ..]`; the KV cache handle shared.
    fn input_layout(&self) -> Layout {
        CAUSAL_INPUT
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, (input_ids, attention_mask, position_ids, cache): CausalInput) -> Tensor {
        // Inputs on the embedding's device (under a device map `LanguageModel` may tokenize
        // onto `LoadOptions::device`; a no-op otherwise).
        let d = self.wte.ws.device();
        let (input_ids, attention_mask, position_ids) = (to(input_ids, d), to(attention_mask, d), to(position_ids, d));
        let seq = input_ids.size()[1];
        let mask = causal::causal_mask(&attention_mask, seq);
        let hidden = self.wte.call(input_ids) + self.wpe.call(position_ids);
        // Each block's inputs on its device (a device map; no copies on one device).
        let mut mv = Mover::default();
        let hidden = self.h.iter().fold(hidden, |h, block| {
            let d = block.mlp.c_fc.weight.device();
            block.call((to(h, d), mv.to(&mask, d), cache.clone()))
        });
        let d = self.ln_f.ws.as_ref().map_or(hidden.device(), Tensor::device);
        self.ln_f.call(to(hidden, d))
    }
}

/// `transformer.h.{i}`: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))` (transformers' `GPT2Block`).
///
/// Input: `(hidden [batch, seq, hidden], mask [batch, 1, seq, past + seq] f32 (see
/// [`causal::causal_mask`]), cache)`. Output: `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gpt2Block {
    /// `ln_1`: LayerNorm before attention.
    pub ln_1: Hooked<nn::LayerNorm>,
    /// `attn`: causal self-attention.
    pub attn: Hooked<Gpt2Attention>,
    /// `ln_2`: LayerNorm before the MLP.
    pub ln_2: Hooked<nn::LayerNorm>,
    /// `mlp`: feed-forward block.
    pub mlp: Hooked<Gpt2Mlp>,
}

impl Gpt2Block {
    /// Zero weights under `p` (`transformer.h.{layer_idx}`).
    pub fn new(p: &nn::Path, c: &Gpt2Config, layer_idx: i64) -> Result<Self> {
        let (pa, pm) = (p / "attn", p / "mlp");
        Ok(Gpt2Block {
            ln_1: causal::layer_norm(&(p / "ln_1"), c.n_embd, c.layer_norm_epsilon),
            attn: Hooked::new(&pa, Gpt2Attention::new(&pa, c, layer_idx)),
            ln_2: causal::layer_norm(&(p / "ln_2"), c.n_embd, c.layer_norm_epsilon),
            mlp: Hooked::new(&pm, Gpt2Mlp::new(&pm, c)?),
        })
    }
}

impl HookModule for Gpt2Block {
    /// `(hidden [batch, seq, hidden], mask [batch, 1, seq, past + seq], cache)`.
    type Input = (Tensor, Tensor, KvCacheHandle);
    /// `[batch, seq, hidden]`.
    type Output = Tensor;
    /// Hidden states and mask `[batch, ..]`; the KV cache handle shared.
    fn input_layout(&self) -> Layout {
        Layout::Tuple(&[ROWS, ROWS, Layout::Shared])
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, (hidden, mask, cache): Self::Input) -> Tensor {
        let attn = self.attn.call((self.ln_1.call(hidden.shallow_clone()), mask, cache));
        let hidden = attn + hidden;
        let ff = self.mlp.call(self.ln_2.call(hidden.shallow_clone()));
        hidden + ff
    }
}

/// `transformer.h.{i}.attn`: multi-head causal self-attention with the KV cache
/// (transformers' `GPT2Attention`, eager).
///
/// Input: `(hidden [batch, seq, hidden], mask [batch, 1, seq, past + seq], cache)`.
/// `c_attn` gives q, k, v (`[batch, seq, 3 * hidden]`, split in three); k and v are appended to
/// layer `layer_idx` of the cache; output `c_proj(softmax(q kᵀ · scale + mask) v)`,
/// `[batch, seq, hidden]` (transformers returns `(output, weights)`; only the output here).
///
/// Hook points (identity [`HookPoint`]s, see [`super::point`]; each later stage uses the hooked
/// value): `q` `[batch, heads, seq, head_dim]`, `k` `[batch, heads, past + seq, head_dim]`
/// (cached + new), `scores` and `probs` `[batch, heads, seq, past + seq]` (f32 / model dtype),
/// `z` `[batch, seq, heads, head_dim]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gpt2Attention {
    /// `c_attn`: `[batch, seq, hidden]` → `[batch, seq, 3 * hidden]`.
    pub c_attn: Hooked<Conv1D>,
    /// `c_proj`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub c_proj: Hooked<Conv1D>,
    /// `q`: queries after the head split, `[batch, heads, seq, head_dim]`.
    pub q: Hooked<HookPoint>,
    /// `k`: keys after the head split, cached + new, `[batch, heads, past + seq, head_dim]`.
    pub k: Hooked<HookPoint>,
    /// `scores`: `q kᵀ · scaling + mask` in f32, before the softmax, `[batch, heads, seq, past + seq]`.
    pub scores: Hooked<HookPoint>,
    /// `probs`: the softmax of `scores` (model dtype), `[batch, heads, seq, past + seq]`.
    pub probs: Hooked<HookPoint>,
    /// `z`: `probs v`, each head's output before `c_proj`, `[batch, seq, heads, head_dim]`.
    pub z: Hooked<HookPoint>,
    /// Index of the block (the cache slot).
    pub layer_idx: usize,
    /// Number of heads.
    pub num_heads: i64,
    /// `hidden / num_heads`.
    pub head_dim: i64,
    /// Score scale: `head_dim^-0.5` (if `scale_attn_weights`), divided by `layer_idx + 1` (if
    /// `scale_attn_by_inverse_layer_idx`).
    pub scaling: f64,
}

impl Gpt2Attention {
    /// Zero weights under `p` (`transformer.h.{layer_idx}.attn`).
    pub fn new(p: &nn::Path, c: &Gpt2Config, layer_idx: i64) -> Self {
        let head_dim = c.n_embd / c.n_head;
        let mut scaling = if c.scale_attn_weights { (head_dim as f64).powf(-0.5) } else { 1.0 };
        if c.scale_attn_by_inverse_layer_idx {
            scaling /= (layer_idx + 1) as f64;
        }
        Gpt2Attention {
            c_attn: Conv1D::new(&(p / "c_attn"), c.n_embd, 3 * c.n_embd),
            c_proj: Conv1D::new(&(p / "c_proj"), c.n_embd, c.n_embd),
            q: HookPoint::new(p, "q"),
            k: HookPoint::new(p, "k"),
            scores: HookPoint::new(p, "scores"),
            probs: HookPoint::new(p, "probs"),
            z: HookPoint::new(p, "z"),
            layer_idx: layer_idx as usize,
            num_heads: c.n_head,
            head_dim,
            scaling,
        }
    }
}

impl HookModule for Gpt2Attention {
    /// `(hidden [batch, seq, hidden], mask [batch, 1, seq, past + seq], cache)`.
    type Input = (Tensor, Tensor, KvCacheHandle);
    /// `[batch, seq, hidden]`.
    type Output = Tensor;
    /// Hidden states and mask `[batch, ..]`; the KV cache handle shared.
    fn input_layout(&self) -> Layout {
        Layout::Tuple(&[ROWS, ROWS, Layout::Shared])
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, (hidden, mask, cache): Self::Input) -> Tensor {
        let size = hidden.size();
        let (b, s, width) = (size[0], size[1], size[2]);
        let qkv = self.c_attn.call(hidden).split(width, 2);
        let heads = |t: &Tensor| t.view([b, s, self.num_heads, self.head_dim]).transpose(1, 2);
        let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
        let (k, v) = cache.update(self.layer_idx, k, v);
        let context = self.points().attend(q, k, &v, &mask, self.scaling, true);
        self.c_proj.call(context)
    }
}

impl Gpt2Attention {
    fn points(&self) -> AttentionPoints<'_> {
        AttentionPoints { q: &self.q, k: &self.k, scores: &self.scores, probs: &self.probs, z: &self.z }
    }
}

/// `transformer.h.{i}.mlp`: `c_proj(act(c_fc(x)))` (transformers' `GPT2MLP`).
///
/// Input `[batch, seq, hidden]`, output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gpt2Mlp {
    /// `c_fc`: `[batch, seq, hidden]` → `[batch, seq, inner]`.
    pub c_fc: Hooked<Conv1D>,
    /// `act`: the config's `activation_function` (GELU tanh approximation for GPT-2), no weights;
    /// its output `[batch, seq, inner]` is the MLP's activation (TransformerLens' `hook_post`),
    /// as `mlp.act` of the other bundled families.
    pub act: Hooked<HiddenAct>,
    /// `c_proj`: `[batch, seq, inner]` → `[batch, seq, hidden]`.
    pub c_proj: Hooked<Conv1D>,
}

impl Gpt2Mlp {
    /// Zero weights under `p` (`transformer.h.{i}.mlp`).
    pub fn new(p: &nn::Path, c: &Gpt2Config) -> Result<Self> {
        let act = HiddenAct::parse(&c.activation_function)
            .map_err(|m| causal::config_error("<Gpt2Config>", m.replace("hidden_act", "activation_function")))?;
        Ok(Gpt2Mlp {
            c_fc: Conv1D::new(&(p / "c_fc"), c.n_embd, c.inner()),
            act: Hooked::new(&(p / "act"), act),
            c_proj: Conv1D::new(&(p / "c_proj"), c.inner(), c.n_embd),
        })
    }
}

impl HookModule for Gpt2Mlp {
    /// `[batch, seq, hidden]`.
    type Input = Tensor;
    /// `[batch, seq, hidden]`.
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
        self.c_proj.call(self.act.call(self.c_fc.call(x)))
    }
}

/// GPT-2's "Conv1D" (transformers' `pytorch_utils.Conv1D`): a linear layer whose weight is
/// stored transposed, `[in, out]`: `y = x W + b`.
///
/// Input `[..., in]`, output `[..., out]`.
#[derive(Debug)]
pub struct Conv1D {
    /// `[in, out]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

impl Conv1D {
    /// Zero variables `weight [in, out]`, `bias [out]` under `p`.
    pub fn new(p: &nn::Path, in_dim: i64, out_dim: i64) -> Hooked<Conv1D> {
        let zeros = nn::Init::Const(0.0);
        let weight = params::param(p, "weight", &[in_dim, out_dim], zeros);
        Hooked::new(p, Conv1D { weight, bias: params::param(p, "bias", &[out_dim], zeros) })
    }
}

/// A leaf: no hooked children.
impl ModuleTree for Conv1D {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for Conv1D {
    /// `[..., in]`.
    type Input = Tensor;
    /// `[..., out]`.
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
        let mut shape = x.size();
        let in_dim = shape.pop().unwrap_or(0);
        shape.push(self.weight.size()[1]);
        self.bias.addmm(&x.reshape([-1, in_dim]), &self.weight).view(shape.as_slice())
    }
}
