//! Gemma 2 decoder in tch, every submodule hookable: Llama ([`super::llama`]) with the
//! differences below.
//!
//! Architecture: Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size"
//! (arXiv:2408.00118), as implemented by Hugging Face transformers'
//! `models/gemma2/modeling_gemma2.py` (`Gemma2ForCausalLM`, eager attention). What differs from
//! Llama:
//!
//! - RMSNorm scales by `1 + weight` (weights stored as offsets from 1, zero at init) and
//!   multiplies in f32 before casting back ([`GemmaRmsNorm`]);
//! - the token embeddings are multiplied by `sqrt(hidden_size)`, rounded to the weights' dtype
//!   ([`ScaledEmbedding`]);
//! - four norms per layer: the attention and MLP outputs are normalised too before they are
//!   added to the residual stream (`post_attention_layernorm`, `post_feedforward_layernorm`),
//!   and the MLP's input by `pre_feedforward_layernorm`;
//! - attention scores are scaled by `query_pre_attn_scalar^-0.5` (not `head_dim^-0.5`) and
//!   soft-capped, `tanh(scores / cap) · cap` with `cap = attn_logit_softcapping`, before the mask;
//! - layers alternate between sliding-window attention (a query sees the last `sliding_window`
//!   positions, itself included) and full causal attention, `layer_types`, sliding first;
//! - the MLP is GeGLU: `down(gelu_pytorch_tanh(gate(x)) · up(x))` (Llama's MLP with another
//!   activation, [`LlamaMlp`]);
//! - the logits are soft-capped after `lm_head`: `tanh(logits / cap) · cap` with
//!   `cap = final_logit_softcapping`; `lm_head` is tied to `embed_tokens`.
//!
//! Module paths are the checkpoint key prefixes:
//!
//! ```text
//! Gemma2                                (root, path "")   Input CausalInput, Output capped logits
//! ├── model                             Gemma2Model       Output last hidden state (after norm)
//! │   ├── embed_tokens                  ScaledEmbedding [vocab, hidden] (× sqrt(hidden))
//! │   ├── rotary_emb                    RotaryEmbedding   (no weights) position ids → (cos, sin)
//! │   ├── layers[i]                     Gemma2DecoderLayer (model.layers.0 ..), Output [batch, seq, hidden]
//! │   │   ├── input_layernorm           GemmaRmsNorm
//! │   │   ├── self_attn                 Gemma2Attention: q_proj, k_proj, v_proj, o_proj (Linear);
//! │   │   │                             hook points q, k, scores, probs, z (HookPoint)
//! │   │   ├── post_attention_layernorm  GemmaRmsNorm
//! │   │   ├── pre_feedforward_layernorm GemmaRmsNorm
//! │   │   ├── mlp                       LlamaMlp: gate_proj, up_proj, down_proj, act_fn (GELU tanh);
//! │   │   │                             hook point act (act_fn(gate) * up)
//! │   │   └── post_feedforward_layernorm GemmaRmsNorm
//! │   └── norm                          GemmaRmsNorm
//! └── lm_head                           LmHead (embed_tokens' weight), output before the soft-cap
//! ```
//!
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `hidden_size`.
//! The KV cache keeps every position, also for sliding layers (transformers 5 keeps only the
//! window there): the sliding mask hides the older keys, so the result is the same.


use tch::{nn, Kind, Tensor};
use super::causal::device_map::{to, Mover};

use super::act::HiddenAct;
use super::causal::{self, CausalInput, LmHead};
use super::llama::{LlamaConfig, LlamaMlp, LayerInput, LAYER_INPUT};
use super::params;
use super::point::{AttentionPoints, HookPoint};

use crate::activation::Layout;
use crate::error::Result;
use crate::hook::{HookModule, Hooked};
use crate::models::linear::Linear;
use crate::models::{CAUSAL_INPUT, ROWS};
use crate::tree::ModuleTree;
use nnsight_macros::ModuleTree;

mod config;
pub(crate) use config::{validate_common, Common};
pub use config::Gemma2Config;
pub use super::causal::rotary::{Rope, RotaryEmbedding};
use super::causal::rotary::apply_rotary;

/// A Gemma 2 model with its language-model head (transformers' `Gemma2ForCausalLM`).
///
/// Input [`CausalInput`], output logits `[batch, seq, vocab]` after the final soft-cap (the
/// `lm_head` hook point sees them before it).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gemma2 {
    /// `model`: embeddings, decoder layers, final norm.
    pub model: Hooked<Gemma2Model>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`, before the soft-cap.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: Gemma2Config,
}

impl Gemma2 {
    /// A model with zero weights as variables under `p` (use `vs.root()`: variable names are
    /// the checkpoint keys, `model.layers.0.self_attn.q_proj.weight`, ...). `lm_head.weight`
    /// is a variable unless `tie_word_embeddings`. Errors: [`crate::Error::Config`] for a config
    /// failing [`Gemma2Config::validate`], [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &Gemma2Config) -> Result<Gemma2> {
        const WHAT: &str = "<Gemma2Config given to Gemma2::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pm = p / "model";
            let model = Gemma2Model::new(&pm, config)?;
            let tied = config.tie_word_embeddings.then_some(&model.embed_tokens.weight);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.hidden_size);
            Ok(Gemma2 { model: Hooked::new(&pm, model), lm_head, config: config.clone() })
        })
    }
}

super::causal::causal_family!(Gemma2, Gemma2Config {
    layer: Gemma2DecoderLayer,
    attn: Gemma2Attention,
    mlp: LlamaMlp,
    norm: GemmaRmsNorm,
    embedding: weight,
    logits: softcap => final_logit_softcapping,
});

/// `tanh(x / cap) · cap` (Gemma's soft-capping: about `x` for `|x| ≪ cap`, never beyond `±cap`),
/// or `x` unchanged when `cap` is `None`. Computed in `x`'s dtype, as transformers does.
pub fn softcap(x: Tensor, cap: Option<f64>) -> Tensor {
    match cap {
        Some(c) => (x / c).tanh() * c,
        None => x,
    }
}

/// Which attention a layer has (transformers' `layer_types` entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    /// `"sliding_attention"`: causal, restricted to the last `sliding_window` positions.
    Sliding,
    /// `"full_attention"`: causal over every position.
    Full,
}

impl LayerType {
    /// `layer_types` (each `"sliding_attention"` or `"full_attention"`, one per layer), or, when
    /// absent, transformers' default: layer `i` is full when `(i + 1) % pattern == 0`, sliding
    /// otherwise (Gemma 2: pattern 2, sliding first; Gemma 3: `sliding_window_pattern`, 6).
    pub fn parse_all(types: Option<&[String]>, layers: i64, pattern: i64) -> std::result::Result<Vec<LayerType>, String> {
        let Some(types) = types else {
            if pattern <= 0 {
                return Err(format!("`sliding_window_pattern` must be positive, found {pattern}"));
            }
            return Ok((0..layers.max(0)).map(|i| if (i + 1) % pattern == 0 { LayerType::Full } else { LayerType::Sliding }).collect());
        };
        if types.len() as i64 != layers {
            return Err(format!("`layer_types` has {} entries for {layers} layers (`num_hidden_layers`)", types.len()));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(LayerType::Sliding),
                "full_attention" => Ok(LayerType::Full),
                other => Err(format!(
                    "`layer_types` entry \"{other}\" is not supported (supported: \"sliding_attention\", \"full_attention\")"
                )),
            })
            .collect()
    }
}

/// The two attention masks of a forward pass, built once and handed to each layer by its kind.
pub(crate) struct Masks {
    full: Tensor,
    sliding: Option<Tensor>,
}

impl Masks {
    /// [`causal::causal_mask`] and, when `window` is given, [`causal::sliding_window_mask`],
    /// each `[batch, 1, seq, past + seq]`.
    pub(crate) fn new(attention_mask: &Tensor, seq: i64, window: Option<i64>) -> Self {
        Masks {
            full: causal::causal_mask(attention_mask, seq),
            sliding: window.map(|w| causal::sliding_window_mask(attention_mask, seq, w)),
        }
    }

    /// The mask of a layer of kind `ty` (the full mask when there is no window).
    pub(crate) fn get(&self, ty: LayerType) -> Tensor {
        match (ty, &self.sliding) {
            (LayerType::Sliding, Some(m)) => m.shallow_clone(),
            _ => self.full.shallow_clone(),
        }
    }
}

/// `model`: scaled embeddings, rotary tables, decoder layers, final RMSNorm (transformers'
/// `Gemma2Model`).
///
/// Input [`CausalInput`]; output the last hidden state `[batch, seq, hidden]` (after `norm`).
/// Each layer gets the sliding-window mask or the full causal mask by its [`LayerType`].
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gemma2Model {
    /// `embed_tokens`: `[vocab, hidden]`; ids `[batch, seq]` → `[batch, seq, hidden]`, × `sqrt(hidden)`.
    pub embed_tokens: Hooked<ScaledEmbedding>,
    /// `layers`: `model.layers.0` .. `model.layers.{num_hidden_layers - 1}`.
    pub layers: Vec<Hooked<Gemma2DecoderLayer>>,
    /// `norm`: final RMSNorm.
    pub norm: Hooked<GemmaRmsNorm>,
    /// `rotary_emb`: cos/sin tables for the position ids (no weights).
    pub rotary_emb: Hooked<RotaryEmbedding>,
    /// Each layer's attention kind (`layer_types`).
    pub layer_types: Vec<LayerType>,
    /// Window of the sliding layers (`None` when no layer slides).
    pub sliding_window: Option<i64>,
}

impl Gemma2Model {
    /// Zero weights under `p` (`model`).
    pub fn new(p: &nn::Path, c: &Gemma2Config) -> Result<Self> {
        let bad = |m| causal::config_error("<Gemma2Config>", m);
        let layer_types = c.layer_types().map_err(bad)?;
        let pl = p / "layers";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let q = &pl / i;
                Ok(Hooked::new(&q, Gemma2DecoderLayer::new(&q, c, i as usize, layer_types[i as usize])?))
            })
            .collect::<Result<_>>()?;
        let rope = c.rope().map_err(bad)?;
        params::buffer(&(p / "rotary_emb"), "inv_freq", c.head_dim / 2);
        let sliding = layer_types.contains(&LayerType::Sliding);
        Ok(Gemma2Model {
            embed_tokens: ScaledEmbedding::new(&(p / "embed_tokens"), c.vocab_size, c.hidden_size),
            layers,
            norm: GemmaRmsNorm::new(&(p / "norm"), c.hidden_size, c.rms_norm_eps),
            rotary_emb: Hooked::new(&(p / "rotary_emb"), RotaryEmbedding::new(&rope, c.head_dim, p.device())),
            layer_types,
            sliding_window: c.sliding_window.filter(|_| sliding),
        })
    }
}

impl HookModule for Gemma2Model {
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
        let d = self.embed_tokens.weight.device();
        let (input_ids, attention_mask, position_ids) = (to(input_ids, d), to(attention_mask, d), to(position_ids, d));
        let masks = Masks::new(&attention_mask, input_ids.size()[1], self.sliding_window);
        let hidden = self.embed_tokens.call(input_ids);
        let (cos, sin) = self.rotary_emb.call((hidden.shallow_clone(), position_ids));
        // Each layer's inputs on its device (a device map; no copies on one device).
        let mut mv = Mover::default();
        let hidden = self.layers.iter().zip(&self.layer_types).fold(hidden, |h, (layer, &ty)| {
            let d = layer.input_layernorm.weight.device();
            layer.call((to(h, d), mv.to(&masks.get(ty), d), (mv.to(&cos, d), mv.to(&sin, d)), cache.clone()))
        });
        self.norm.call(to(hidden, self.norm.weight.device()))
    }
}

/// `model.layers.{i}`: `x + post_attention_layernorm(self_attn(input_layernorm(x)))`, then
/// `x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))` (transformers'
/// `Gemma2DecoderLayer`).
///
/// Input [`LayerInput`] (the mask is this layer's: sliding-window or full), output
/// `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gemma2DecoderLayer {
    /// `input_layernorm`: RMSNorm before attention.
    pub input_layernorm: Hooked<GemmaRmsNorm>,
    /// `self_attn`: grouped-query causal self-attention with rotary embeddings and a soft-cap.
    pub self_attn: Hooked<Gemma2Attention>,
    /// `post_attention_layernorm`: RMSNorm of the attention output, before the residual add.
    pub post_attention_layernorm: Hooked<GemmaRmsNorm>,
    /// `pre_feedforward_layernorm`: RMSNorm before the MLP.
    pub pre_feedforward_layernorm: Hooked<GemmaRmsNorm>,
    /// `mlp`: GeGLU feed-forward.
    pub mlp: Hooked<LlamaMlp>,
    /// `post_feedforward_layernorm`: RMSNorm of the MLP output, before the residual add.
    pub post_feedforward_layernorm: Hooked<GemmaRmsNorm>,
}

impl Gemma2DecoderLayer {
    /// Zero weights under `p` (`model.layers.{layer_idx}`).
    pub fn new(p: &nn::Path, c: &Gemma2Config, layer_idx: usize, ty: LayerType) -> Result<Self> {
        let (pa, pm) = (p / "self_attn", p / "mlp");
        let norm = |name: &str| GemmaRmsNorm::new(&(p / name), c.hidden_size, c.rms_norm_eps);
        Ok(Gemma2DecoderLayer {
            input_layernorm: norm("input_layernorm"),
            self_attn: Hooked::new(&pa, Gemma2Attention::new(&pa, c, layer_idx, ty)),
            post_attention_layernorm: norm("post_attention_layernorm"),
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm"),
            mlp: Hooked::new(&pm, gemma_mlp(&pm, c.hidden_size, c.intermediate_size, c.activation())?),
            post_feedforward_layernorm: norm("post_feedforward_layernorm"),
        })
    }
}

impl HookModule for Gemma2DecoderLayer {
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
        let attn = self.self_attn.call((self.input_layernorm.call(hidden.shallow_clone()), mask, rope, cache));
        let hidden = hidden + self.post_attention_layernorm.call(attn);
        let ff = self.mlp.call(self.pre_feedforward_layernorm.call(hidden.shallow_clone()));
        hidden + self.post_feedforward_layernorm.call(ff)
    }
}

/// `model.layers.{i}.self_attn`: grouped-query attention with rotary embeddings, the KV cache,
/// a soft-cap on the scores and (sliding layers) a sliding window (transformers'
/// `Gemma2Attention`, eager).
///
/// Input [`LayerInput`] (hidden already normalised; the mask is the sliding-window one in a
/// sliding layer). q `[batch, heads, seq, head_dim]`, k and v `[batch, kv_heads, seq, head_dim]`;
/// q and k rotated, k and v appended to cache slot `layer_idx`, k and v repeated
/// `heads / kv_heads` times; output
/// `o_proj(softmax(softcap(q kᵀ · query_pre_attn_scalar^-0.5) + mask) v)`, `[batch, seq, hidden]`,
/// with `softcap(x) = tanh(x / attn_logit_softcapping) · attn_logit_softcapping`.
///
/// Hook points (identity [`HookPoint`]s, see [`super::point`]; each later stage uses the hooked
/// value): `q` `[batch, heads, seq, head_dim]` after rotary, `k`
/// `[batch, heads, past + seq, head_dim]` after rotary, the cache and the key/value-head repeat,
/// `scores` `[batch, heads, seq, past + seq]` f32 after the soft-cap and the mask (visible
/// entries within `±attn_logit_softcapping`, hidden ones `f32::MIN`), `probs` (model dtype; 0
/// for keys outside the window), `z` `[batch, seq, heads, head_dim]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gemma2Attention {
    /// `q_proj`: `[batch, seq, hidden]` → `[batch, seq, heads * head_dim]`.
    pub q_proj: Hooked<Linear>,
    /// `k_proj`: `[batch, seq, hidden]` → `[batch, seq, kv_heads * head_dim]`.
    pub k_proj: Hooked<Linear>,
    /// `v_proj`: `[batch, seq, hidden]` → `[batch, seq, kv_heads * head_dim]`.
    pub v_proj: Hooked<Linear>,
    /// `o_proj`: `[batch, seq, heads * head_dim]` → `[batch, seq, hidden]`.
    pub o_proj: Hooked<Linear>,
    /// `q`: queries after rotary, `[batch, heads, seq, head_dim]`.
    pub q: Hooked<HookPoint>,
    /// `k`: keys after rotary, cached + new, each key/value head repeated for its query heads,
    /// `[batch, heads, past + seq, head_dim]`.
    pub k: Hooked<HookPoint>,
    /// `scores`: `softcap(q kᵀ · query_pre_attn_scalar^-0.5) + mask` in f32, before the softmax,
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
    /// `query_pre_attn_scalar^-0.5`.
    pub scaling: f64,
    /// `attn_logit_softcapping`.
    pub softcap: Option<f64>,
    /// The window of a sliding layer (applied by the mask the layer receives), `None` for a
    /// full-attention layer.
    pub sliding_window: Option<i64>,
}

impl Gemma2Attention {
    /// Zero weights under `p` (`model.layers.{layer_idx}.self_attn`).
    pub fn new(p: &nn::Path, c: &Gemma2Config, layer_idx: usize, ty: LayerType) -> Self {
        let (h, hd, kv, heads) = (c.hidden_size, c.head_dim, c.num_key_value_heads, c.num_attention_heads);
        let bias = c.attention_bias;
        Gemma2Attention {
            q_proj: Linear::new(&(p / "q_proj"), h, heads * hd, bias),
            k_proj: Linear::new(&(p / "k_proj"), h, kv * hd, bias),
            v_proj: Linear::new(&(p / "v_proj"), h, kv * hd, bias),
            o_proj: Linear::new(&(p / "o_proj"), heads * hd, h, bias),
            q: HookPoint::new(p, "q"),
            k: HookPoint::new(p, "k"),
            scores: HookPoint::new(p, "scores"),
            probs: HookPoint::new(p, "probs"),
            z: HookPoint::new(p, "z"),
            layer_idx,
            num_heads: heads,
            num_key_value_heads: kv,
            head_dim: hd,
            scaling: c.query_pre_attn_scalar.powf(-0.5),
            softcap: c.attn_logit_softcapping,
            sliding_window: c.sliding_window.filter(|_| ty == LayerType::Sliding),
        }
    }
}

impl HookModule for Gemma2Attention {
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
        let q = heads(self.q_proj.call(hidden.shallow_clone()));
        let k = heads(self.k_proj.call(hidden.shallow_clone()));
        let v = heads(self.v_proj.call(hidden));
        let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
        let (q, k) = (apply_rotary(&q, &cos, &sin), apply_rotary(&k, &cos, &sin));
        let (k, v) = cache.update(self.layer_idx, k, v);
        let groups = self.num_heads / self.num_key_value_heads;
        let (k, v) = (repeat_kv(&k, groups), repeat_kv(&v, groups));
        let points = AttentionPoints { q: &self.q, k: &self.k, scores: &self.scores, probs: &self.probs, z: &self.z };
        let context = points.attend_softcapped(q, k, &v, &mask, self.scaling, self.softcap);
        self.o_proj.call(context)
    }
}

/// Llama's `repeat_kv` (grouped-query attention), shared with Gemma 3.
pub(crate) use super::llama::repeat_kv;

/// Gemma's GeGLU MLP `model.layers.{i}.mlp`: Llama's gated MLP ([`LlamaMlp`]: `gate_proj`,
/// `up_proj`, `down_proj`, no biases, hook point `act` at the input of `down_proj`) with the
/// config's `hidden_activation` (`gelu_pytorch_tanh`) in place of SiLU:
/// `down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))` (transformers' `Gemma2MLP`).
pub(crate) fn gemma_mlp(p: &nn::Path, hidden: i64, intermediate: i64, act: &str) -> Result<LlamaMlp> {
    HiddenAct::parse(act).map_err(|m| causal::config_error("<Gemma config>", m))?;
    let c = LlamaConfig {
        hidden_size: hidden,
        intermediate_size: intermediate,
        hidden_act: act.to_string(),
        mlp_bias: false,
        ..LlamaConfig::default()
    };
    LlamaMlp::new(p, &c)
}

/// `model.embed_tokens`: token embeddings times `sqrt(hidden_size)` (transformers'
/// `Gemma2TextScaledWordEmbedding`: `embedding(ids) * embed_scale.to(weight.dtype)`, the scale
/// rounded to the weights' dtype first).
///
/// Input ids `[batch, seq]` i64, output `[batch, seq, hidden]` in the weights' dtype.
#[derive(Debug)]
pub struct ScaledEmbedding {
    /// `[vocab, hidden]` (also `lm_head`'s weight when tied).
    pub weight: Tensor,
    /// `sqrt(hidden_size)`.
    pub scale: f64,
}

impl ScaledEmbedding {
    /// Variable `weight [vocab, hidden]` under `p` (zero until loaded), scale `sqrt(hidden)`.
    pub fn new(p: &nn::Path, vocab: i64, hidden: i64) -> Hooked<ScaledEmbedding> {
        let weight = params::param(p, "weight", &[vocab, hidden], nn::Init::Const(0.0));
        Hooked::new(p, ScaledEmbedding { weight, scale: (hidden as f64).sqrt() })
    }
}

/// A leaf: no hooked children.
impl ModuleTree for ScaledEmbedding {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for ScaledEmbedding {
    /// Ids `[batch, seq]`.
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
    fn forward(&self, ids: Tensor) -> Tensor {
        // `torch.tensor(sqrt(hidden))` is f32; `.to(weight.dtype)` rounds it once more.
        let scale = Tensor::from(self.scale as f32).to_kind(self.weight.kind()).double_value(&[]);
        Tensor::embedding(&self.weight, &ids, -1, false, false) * scale
    }
}

/// Gemma's RMSNorm (transformers' `Gemma2RMSNorm`, `Gemma3RMSNorm`): in f32,
/// `x / sqrt(mean(x²) + eps) · (1 + weight)`, then cast back to the input dtype. Unlike Llama's
/// [`super::llama::RmsNorm`] the weight is an offset from 1 (zero at init) and the product is
/// taken in f32 before the cast.
///
/// Input and output `[..., dim]` (`dim` = hidden, or head_dim for Gemma 3's `q_norm`/`k_norm`).
#[derive(Debug)]
pub struct GemmaRmsNorm {
    /// `[dim]`.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl GemmaRmsNorm {
    /// Variable `weight [dim]` under `p` (zeros until loaded).
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Hooked<GemmaRmsNorm> {
        Hooked::new(p, GemmaRmsNorm { weight: params::param(p, "weight", &[dim], nn::Init::Const(0.0)), eps })
    }
}

/// A leaf: no hooked children.
impl ModuleTree for GemmaRmsNorm {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for GemmaRmsNorm {
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
        let normed = x * (variance + self.eps).rsqrt();
        (normed * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
    }
}
