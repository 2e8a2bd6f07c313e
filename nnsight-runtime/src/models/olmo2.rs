//! OLMo 2 in tch, every submodule hookable: Llama with its norms moved after the sublayers and
//! q/k norms over the whole projections.
//!
//! Architecture: OLMo et al. 2024, "2 OLMo 2 Furious" (arXiv:2501.00656), as implemented by
//! Hugging Face transformers' `models/olmo2/modeling_olmo2.py` (`Olmo2ForCausalLM`, eager
//! attention). The differences from [`super::llama`]:
//!
//! - no norm before the sublayers: each layer is `h = x + post_attention_layernorm(self_attn(x))`,
//!   then `h + post_feedforward_layernorm(mlp(h))` (the norms act on the sublayer outputs,
//!   inside the residual);
//! - `self_attn.q_norm` / `k_norm`: RMSNorms over the whole query / key projection
//!   (`heads * head_dim` / `kv_heads * head_dim` wide), before the head split and rotary (Olmo2
//!   normalises each head instead, see [`super::olmo2`]);
//! - the RMSNorm multiplies by its weight before casting back to the input dtype
//!   ([`Olmo2RmsNorm`]; the same as Llama's in f32);
//! - `attention_bias` sets biases on q, k, v and o together; the MLP never has biases.
//!
//! Rotary embedding (as Llama's, incl. its scalings), embeddings and the SwiGLU MLP are Llama's:
//!
//! ```text
//! Olmo2                               (root, path "")   Input CausalInput, Output logits
//! ├── model                           Olmo2Model        Output last hidden state (after norm)
//! │   ├── embed_tokens                nn::Embedding [vocab, hidden]
//! │   ├── rotary_emb                  RotaryEmbedding   (no weights) position ids → (cos, sin)
//! │   ├── layers[i]                   Olmo2DecoderLayer Output [batch, seq, hidden]
//! │   │   ├── self_attn               Olmo2Attention: q_proj, k_proj, v_proj, o_proj (Linear),
//! │   │   │                           q_norm, k_norm (Olmo2RmsNorm over the projection width);
//! │   │   │                           hook points q, k, scores, probs, z (HookPoint)
//! │   │   ├── post_attention_layernorm Olmo2RmsNorm    on the attention output
//! │   │   ├── mlp                     LlamaMlp: gate_proj, up_proj, down_proj, act_fn; hook point act
//! │   │   └── post_feedforward_layernorm Olmo2RmsNorm  on the MLP output
//! │   └── norm                        Olmo2RmsNorm
//! └── lm_head                         LmHead (own weight, or embed_tokens' if tie_word_embeddings)
//! ```
//!
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `hidden_size`.


use tch::{nn, Kind, Tensor};
use super::causal::device_map::{to, Mover};

use super::causal::{self, CausalInput, LmHead};
use super::llama::{repeat_kv, LayerInput, LlamaConfig, LlamaMlp, RotaryEmbedding, LAYER_INPUT};
use super::params;
use super::point::{AttentionPoints, HookPoint};

use crate::activation::Layout;
use crate::error::Result;
use crate::hook::{HookModule, Hooked};
use crate::models::causal::rotary::apply_rotary;
use crate::models::linear::Linear;
use crate::models::{CAUSAL_INPUT, ROWS};
use crate::tree::ModuleTree;
use nnsight_macros::ModuleTree;

mod config;
pub use config::Olmo2Config;

/// An OLMo 2 model with its language-model head (transformers' `Olmo2ForCausalLM`).
///
/// Input [`CausalInput`], output logits `[batch, seq, vocab]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Olmo2 {
    /// `model`: embeddings, decoder layers, final norm.
    pub model: Hooked<Olmo2Model>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: Olmo2Config,
}

impl Olmo2 {
    /// A model with zero weights as variables under `p` (use `vs.root()`: variable names are
    /// the checkpoint keys). `lm_head.weight` is a variable unless `tie_word_embeddings`.
    /// Errors: [`crate::Error::Config`] for a config failing [`Olmo2Config::validate`],
    /// [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &Olmo2Config) -> Result<Olmo2> {
        const WHAT: &str = "<Olmo2Config given to Olmo2::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pm = p / "model";
            let model = Olmo2Model::new(&pm, &config.llama())?;
            let tied = config.tie_word_embeddings.then_some(&model.embed_tokens.ws);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.hidden_size);
            Ok(Olmo2 { model: Hooked::new(&pm, model), lm_head, config: config.clone() })
        })
    }
}

super::causal::causal_family!(Olmo2, Olmo2Config {
    layer: Olmo2DecoderLayer,
    attn: Olmo2Attention,
    mlp: LlamaMlp,
    norm: Olmo2RmsNorm,
    embedding: ws,
});

/// `model`: as [`super::llama::LlamaModel`] with [`Olmo2DecoderLayer`]s (transformers'
/// `Olmo2Model`).
///
/// Input [`CausalInput`]; output the last hidden state `[batch, seq, hidden]` (after `norm`).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Olmo2Model {
    /// `embed_tokens`: `[vocab, hidden]`; ids `[batch, seq]` → `[batch, seq, hidden]`.
    pub embed_tokens: Hooked<nn::Embedding>,
    /// `layers`: `model.layers.0` .. `model.layers.{num_hidden_layers - 1}`.
    pub layers: Vec<Hooked<Olmo2DecoderLayer>>,
    /// `norm`: final RMSNorm.
    pub norm: Hooked<Olmo2RmsNorm>,
    /// `rotary_emb`: cos/sin tables `[batch, seq, head_dim]` for the position ids (no weights).
    pub rotary_emb: Hooked<RotaryEmbedding>,
}

impl Olmo2Model {
    /// Zero weights under `p` (`model`); `c` is [`Olmo2Config::llama`].
    pub fn new(p: &nn::Path, c: &LlamaConfig) -> Result<Self> {
        let pl = p / "layers";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let q = &pl / i;
                Ok(Hooked::new(&q, Olmo2DecoderLayer::new(&q, c, i as usize)?))
            })
            .collect::<Result<_>>()?;
        let rope = c.rope().map_err(|m| causal::config_error("<Olmo2Config>", m))?;
        params::buffer(&(p / "rotary_emb"), "inv_freq", c.head_dim() / 2);
        Ok(Olmo2Model {
            embed_tokens: causal::embedding(&(p / "embed_tokens"), c.vocab_size, c.hidden_size),
            layers,
            norm: Olmo2RmsNorm::new(&(p / "norm"), c.hidden_size, c.rms_norm_eps),
            rotary_emb: Hooked::new(&(p / "rotary_emb"), RotaryEmbedding::new(&rope, c.head_dim(), p.device())),
        })
    }
}

impl HookModule for Olmo2Model {
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
        let d = self.embed_tokens.ws.device();
        let (input_ids, attention_mask, position_ids) = (to(input_ids, d), to(attention_mask, d), to(position_ids, d));
        let seq = input_ids.size()[1];
        let mask = causal::causal_mask(&attention_mask, seq);
        let hidden = self.embed_tokens.call(input_ids);
        let (cos, sin) = self.rotary_emb.call((hidden.shallow_clone(), position_ids));
        // Each layer's inputs on its device (a device map; no copies on one device).
        let mut mv = Mover::default();
        let hidden = self.layers.iter().fold(hidden, |h, layer| {
            let d = layer.post_attention_layernorm.weight.device();
            layer.call((to(h, d), mv.to(&mask, d), (mv.to(&cos, d), mv.to(&sin, d)), cache.clone()))
        });
        self.norm.call(to(hidden, self.norm.weight.device()))
    }
}

/// `model.layers.{i}`: `h = x + post_attention_layernorm(self_attn(x))`, then
/// `h + post_feedforward_layernorm(mlp(h))` (transformers' `Olmo2DecoderLayer`; the sublayers
/// read the residual stream unnormalised).
///
/// Input [`LayerInput`], output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Olmo2DecoderLayer {
    /// `self_attn`: grouped-query attention with q/k norms and rotary embeddings.
    pub self_attn: Hooked<Olmo2Attention>,
    /// `post_attention_layernorm`: RMSNorm of the attention output, before it is added.
    pub post_attention_layernorm: Hooked<Olmo2RmsNorm>,
    /// `mlp`: SwiGLU feed-forward (Llama's, no biases).
    pub mlp: Hooked<LlamaMlp>,
    /// `post_feedforward_layernorm`: RMSNorm of the MLP output, before it is added.
    pub post_feedforward_layernorm: Hooked<Olmo2RmsNorm>,
}

impl Olmo2DecoderLayer {
    /// Zero weights under `p` (`model.layers.{layer_idx}`).
    pub fn new(p: &nn::Path, c: &LlamaConfig, layer_idx: usize) -> Result<Self> {
        let (pa, pm) = (p / "self_attn", p / "mlp");
        Ok(Olmo2DecoderLayer {
            self_attn: Hooked::new(&pa, Olmo2Attention::new(&pa, c, layer_idx)),
            post_attention_layernorm: Olmo2RmsNorm::new(&(p / "post_attention_layernorm"), c.hidden_size, c.rms_norm_eps),
            mlp: Hooked::new(&pm, LlamaMlp::new(&pm, c)?),
            post_feedforward_layernorm: Olmo2RmsNorm::new(&(p / "post_feedforward_layernorm"), c.hidden_size, c.rms_norm_eps),
        })
    }
}

impl HookModule for Olmo2DecoderLayer {
    /// [`LayerInput`].
    type Input = LayerInput;
    /// `[batch, seq, hidden]`.
    type Output = Tensor;
    /// Hidden states, mask and `(cos, sin)` `[batch, ..]`; the KV cache handle shared.
    fn input_layout(&self) -> Layout {
        LAYER_INPUT
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, (hidden, mask, rope, cache): LayerInput) -> Tensor {
        let attn = self.self_attn.call((hidden.shallow_clone(), mask, rope, cache));
        let hidden = hidden + self.post_attention_layernorm.call(attn);
        let ff = self.mlp.call(hidden.shallow_clone());
        hidden + self.post_feedforward_layernorm.call(ff)
    }
}

/// `model.layers.{i}.self_attn`: Llama's grouped-query attention with `q_norm` / `k_norm` over
/// the whole projections (transformers' `Olmo2Attention`, eager).
///
/// Input [`LayerInput`] (the layer input itself: no norm before attention). q
/// `[batch, seq, heads * head_dim]` through `q_norm`, k `[batch, seq, kv_heads * head_dim]`
/// through `k_norm` (all heads normalised together), then as Llama: head split, rotary, cache
/// slot `layer_idx`, `repeat_kv`, `o_proj(softmax(q kᵀ · head_dim^-0.5 + mask) v)`.
///
/// Hook points as [`super::llama::LlamaAttention`]'s: `q` `[batch, heads, seq, head_dim]` after
/// the norm and rotary, `k` `[batch, heads, past + seq, head_dim]` after the norm, rotary, the
/// cache and `repeat_kv`, `scores`, `probs` `[batch, heads, seq, past + seq]`, `z`
/// `[batch, seq, heads, head_dim]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Olmo2Attention {
    /// `q_proj`: `[batch, seq, hidden]` → `[batch, seq, heads * head_dim]`.
    pub q_proj: Hooked<Linear>,
    /// `k_proj`: `[batch, seq, hidden]` → `[batch, seq, kv_heads * head_dim]`.
    pub k_proj: Hooked<Linear>,
    /// `v_proj`: `[batch, seq, hidden]` → `[batch, seq, kv_heads * head_dim]`.
    pub v_proj: Hooked<Linear>,
    /// `o_proj`: `[batch, seq, heads * head_dim]` → `[batch, seq, hidden]`.
    pub o_proj: Hooked<Linear>,
    /// `q_norm`: RMSNorm over `heads * head_dim`, `[batch, seq, heads * head_dim]` in and out.
    pub q_norm: Hooked<Olmo2RmsNorm>,
    /// `k_norm`: RMSNorm over `kv_heads * head_dim`, `[batch, seq, kv_heads * head_dim]` in and out.
    pub k_norm: Hooked<Olmo2RmsNorm>,
    /// `q`: queries after norm and rotary, `[batch, heads, seq, head_dim]`.
    pub q: Hooked<HookPoint>,
    /// `k`: keys after norm and rotary, cached + new, each key/value head repeated for its
    /// query heads, `[batch, heads, past + seq, head_dim]`.
    pub k: Hooked<HookPoint>,
    /// `scores`: `q kᵀ · head_dim^-0.5 + mask` in f32, before the softmax,
    /// `[batch, heads, seq, past + seq]`.
    pub scores: Hooked<HookPoint>,
    /// `probs`: the softmax of `scores` (model dtype), `[batch, heads, seq, past + seq]`.
    pub probs: Hooked<HookPoint>,
    /// `z`: `probs v`, each head's output before `o_proj`, `[batch, seq, heads, head_dim]`.
    pub z: Hooked<HookPoint>,
    /// Index of the layer (the cache slot).
    pub layer_idx: usize,
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads (divides `num_heads`).
    pub num_key_value_heads: i64,
    /// Width of a head.
    pub head_dim: i64,
}

impl Olmo2Attention {
    /// Zero weights under `p` (`model.layers.{layer_idx}.self_attn`).
    pub fn new(p: &nn::Path, c: &LlamaConfig, layer_idx: usize) -> Self {
        let (h, hd, kv, bias) = (c.hidden_size, c.head_dim(), c.kv_heads(), c.attention_bias);
        let (q_width, kv_width) = (c.num_attention_heads * hd, kv * hd);
        Olmo2Attention {
            q_proj: Linear::new(&(p / "q_proj"), h, q_width, bias),
            k_proj: Linear::new(&(p / "k_proj"), h, kv_width, bias),
            v_proj: Linear::new(&(p / "v_proj"), h, kv_width, bias),
            o_proj: Linear::new(&(p / "o_proj"), q_width, h, bias),
            q_norm: Olmo2RmsNorm::new(&(p / "q_norm"), q_width, c.rms_norm_eps),
            k_norm: Olmo2RmsNorm::new(&(p / "k_norm"), kv_width, c.rms_norm_eps),
            q: HookPoint::new(p, "q"),
            k: HookPoint::new(p, "k"),
            scores: HookPoint::new(p, "scores"),
            probs: HookPoint::new(p, "probs"),
            z: HookPoint::new(p, "z"),
            layer_idx,
            num_heads: c.num_attention_heads,
            num_key_value_heads: kv,
            head_dim: hd,
        }
    }
}

impl HookModule for Olmo2Attention {
    /// [`LayerInput`].
    type Input = LayerInput;
    /// `[batch, seq, hidden]`.
    type Output = Tensor;
    /// Hidden states, mask and `(cos, sin)` `[batch, ..]`; the KV cache handle shared.
    fn input_layout(&self) -> Layout {
        LAYER_INPUT
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, (hidden, mask, (cos, sin), cache): LayerInput) -> Tensor {
        let size = hidden.size();
        let (b, s) = (size[0], size[1]);
        let heads = |t: Tensor| t.view([b, s, -1, self.head_dim]).transpose(1, 2);
        // The difference from Llama: the whole projections normalised before the head split.
        let q = heads(self.q_norm.call(self.q_proj.call(hidden.shallow_clone())));
        let k = heads(self.k_norm.call(self.k_proj.call(hidden.shallow_clone())));
        let v = heads(self.v_proj.call(hidden));
        let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
        let (q, k) = (apply_rotary(&q, &cos, &sin), apply_rotary(&k, &cos, &sin));
        let (k, v) = cache.update(self.layer_idx, k, v);
        let groups = self.num_heads / self.num_key_value_heads;
        let (k, v) = (repeat_kv(&k, groups), repeat_kv(&v, groups));
        let points = AttentionPoints { q: &self.q, k: &self.k, scores: &self.scores, probs: &self.probs, z: &self.z };
        let context = points.attend(q, k, &v, &mask, (self.head_dim as f64).powf(-0.5), true);
        self.o_proj.call(context)
    }
}

/// OLMo 2's RMSNorm (transformers' `Olmo2RMSNorm`): in f32, `weight · x / sqrt(mean(x²) + eps)`,
/// then cast to the input dtype. Llama's [`super::llama::RmsNorm`] casts before multiplying by
/// the weight; in f32 the two are the same.
///
/// Input and output `[..., dim]`.
#[derive(Debug)]
pub struct Olmo2RmsNorm {
    /// `[dim]`.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl Olmo2RmsNorm {
    /// Variable `weight [dim]` under `p` (ones until loaded).
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Hooked<Olmo2RmsNorm> {
        Hooked::new(p, Olmo2RmsNorm { weight: params::param(p, "weight", &[dim], nn::Init::Const(1.0)), eps })
    }
}

/// A leaf: no hooked children.
impl ModuleTree for Olmo2RmsNorm {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for Olmo2RmsNorm {
    /// `[..., dim]`.
    type Input = Tensor;
    /// `[..., dim]`.
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
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        (&self.weight * (x * (variance + self.eps).rsqrt())).to_kind(kind)
    }
}
