//! Llama-family decoder in tch, every submodule hookable.
//!
//! Architecture: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"
//! (arXiv:2302.13971) and "Llama 2" (arXiv:2307.09288): pre-norm decoder with RMSNorm (Zhang &
//! Sennrich 2019), rotary position embeddings (Su et al. 2021, arXiv:2104.09864), grouped-query
//! attention (Ainslie et al. 2023, arXiv:2305.13245) and a SwiGLU MLP (Shazeer 2020), as
//! implemented by Hugging Face transformers' `models/llama/modeling_llama.py`
//! (`LlamaForCausalLM`, eager attention). Module paths are the checkpoint key prefixes:
//!
//! ```text
//! Llama                               (root, path "")   Input CausalInput, Output logits
//! ├── model                           LlamaModel        Output last hidden state (after norm)
//! │   ├── embed_tokens                nn::Embedding [vocab, hidden]
//! │   ├── rotary_emb                  RotaryEmbedding   (no weights) position ids → (cos, sin)
//! │   ├── layers[i]                   LlamaDecoderLayer (model.layers.0 ..), Output [batch, seq, hidden]
//! │   │   ├── input_layernorm         RmsNorm
//! │   │   ├── self_attn               LlamaAttention: q_proj, k_proj, v_proj, o_proj (Linear);
//! │   │   │                           hook points q, k, scores, probs, z (HookPoint)
//! │   │   ├── post_attention_layernorm RmsNorm
//! │   │   └── mlp                     LlamaMlp: gate_proj, up_proj, down_proj, act_fn;
//! │   │                               hook point act (act_fn(gate) * up)
//! │   └── norm                        RmsNorm
//! └── lm_head                         LmHead (own weight, or embed_tokens' if tie_word_embeddings)
//! ```
//!
//! The rotary embedding uses transformers' `rotate_half` convention (the two halves of each
//! head, not interleaved pairs), `rope_theta` from the config, and the `"default"`, `"linear"`
//! and `"llama3"` frequency scalings ([`Rope`]).
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `hidden_size`.


use tch::{nn, Kind, Tensor};

use super::act::HiddenAct;
use super::causal::{self, CausalInput, KvCacheHandle, LmHead};
use super::params;
use super::point::{AttentionPoints, HookPoint};

use crate::error::Result;
use crate::activation::Layout;
use crate::hook::{HookModule, Hooked};
use crate::models::{CAUSAL_INPUT, ROWS};
use crate::models::linear::Linear;
use crate::tree::ModuleTree;
use nnsight_macros::ModuleTree;

mod config;
pub use config::LlamaConfig;
pub use super::causal::rotary::{Rope, RotaryEmbedding};
use super::causal::rotary::apply_rotary;
use super::causal::device_map::{to, Mover};

/// A Llama-family model with its language-model head (transformers' `LlamaForCausalLM`).
///
/// Input [`CausalInput`], output logits `[batch, seq, vocab]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Llama {
    /// `model`: embeddings, decoder layers, final norm.
    pub model: Hooked<LlamaModel>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: LlamaConfig,
}

impl Llama {
    /// A model with zero weights as variables under `p` (use `vs.root()`: variable names are
    /// the checkpoint keys, `model.layers.0.self_attn.q_proj.weight`, ...). `lm_head.weight`
    /// is a variable unless `tie_word_embeddings`. Errors: [`crate::Error::Config`] for a config
    /// failing [`LlamaConfig::validate`], [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &LlamaConfig) -> Result<Llama> {
        const WHAT: &str = "<LlamaConfig given to Llama::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pm = p / "model";
            let model = LlamaModel::new(&pm, config)?;
            let tied = config.tie_word_embeddings.then_some(&model.embed_tokens.ws);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.hidden_size);
            Ok(Llama { model: Hooked::new(&pm, model), lm_head, config: config.clone() })
        })
    }
}

causal::causal_family!(Llama, LlamaConfig {
    layer: LlamaDecoderLayer,
    attn: LlamaAttention,
    mlp: LlamaMlp,
    norm: RmsNorm,
    embedding: ws,
});

/// `model`: embeddings, rotary tables, decoder layers, final RMSNorm (transformers' `LlamaModel`).
///
/// Input [`CausalInput`]; output the last hidden state `[batch, seq, hidden]` (after `norm`).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct LlamaModel {
    /// `embed_tokens`: `[vocab, hidden]`; ids `[batch, seq]` → `[batch, seq, hidden]`.
    pub embed_tokens: Hooked<nn::Embedding>,
    /// `layers`: `model.layers.0` .. `model.layers.{num_hidden_layers - 1}`.
    pub layers: Vec<Hooked<LlamaDecoderLayer>>,
    /// `norm`: final RMSNorm.
    pub norm: Hooked<RmsNorm>,
    /// `rotary_emb`: cos/sin tables for the position ids (no weights).
    pub rotary_emb: Hooked<RotaryEmbedding>,
    /// Each layer's sliding window (`None`: full causal attention; always `None` for Llama):
    /// layer `i` sees the last `layer_windows[i]` positions ([`causal::sliding_window_mask`]).
    /// Set by the families whose layers slide (Mistral, Qwen2 / Qwen3 with `use_sliding_window`).
    pub(crate) layer_windows: Vec<Option<i64>>,
}

impl LlamaModel {
    /// Zero weights under `p` (`model`).
    pub fn new(p: &nn::Path, c: &LlamaConfig) -> Result<Self> {
        Self::with_layers(p, c, LlamaDecoderLayer::new)
    }

    /// [`LlamaModel::new`] with the decoder layers built by `layer(path, config, layer_idx)`
    /// (families whose layers are Llama's with other projections, e.g. Qwen2's q/k/v biases).
    pub(crate) fn with_layers(
        p: &nn::Path,
        c: &LlamaConfig,
        layer: impl Fn(&nn::Path, &LlamaConfig, usize) -> Result<LlamaDecoderLayer>,
    ) -> Result<Self> {
        let pl = p / "layers";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let q = &pl / i;
                Ok(Hooked::new(&q, layer(&q, c, i as usize)?))
            })
            .collect::<Result<_>>()?;
        let rope = c.rope().map_err(|m| causal::config_error("<LlamaConfig>", m))?;
        params::buffer(&(p / "rotary_emb"), "inv_freq", c.head_dim() / 2);
        Ok(LlamaModel {
            embed_tokens: causal::embedding(&(p / "embed_tokens"), c.vocab_size, c.hidden_size),
            layers,
            norm: RmsNorm::new(&(p / "norm"), c.hidden_size, c.rms_norm_eps),
            rotary_emb: Hooked::new(&(p / "rotary_emb"), RotaryEmbedding::new(&rope, c.head_dim(), p.device())),
            layer_windows: vec![None; c.num_hidden_layers.max(0) as usize],
        })
    }

    /// This model with layer `i` attending to the last `windows[i]` positions only (`None`:
    /// full causal attention), one entry per layer; each window >= 1.
    pub(crate) fn with_windows(mut self, windows: Vec<Option<i64>>) -> Self {
        assert_eq!(windows.len(), self.layers.len(), "one window per layer");
        self.layer_windows = windows;
        self
    }

    /// Each layer's sliding window (`None`: full causal attention).
    pub fn layer_windows(&self) -> &[Option<i64>] {
        &self.layer_windows
    }
}

impl HookModule for LlamaModel {
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
        let masks = layer_masks(&attention_mask, seq, &self.layer_windows);
        let hidden = self.embed_tokens.call(input_ids);
        let (cos, sin) = self.rotary_emb.call((hidden.shallow_clone(), position_ids));
        // Each layer's inputs on its device (a device map; no copies on one device).
        let mut mv = Mover::default();
        let hidden = self.layers.iter().zip(masks).fold(hidden, |h, (layer, mask)| {
            let d = layer.input_layernorm.weight.device();
            layer.call((to(h, d), mv.to(&mask, d), (mv.to(&cos, d), mv.to(&sin, d)), cache.clone()))
        });
        self.norm.call(to(hidden, self.norm.weight.device()))
    }
}

/// One attention mask per layer: [`causal::causal_mask`] for a `None` window,
/// [`causal::sliding_window_mask`] for `Some(w)` (each computed once and shared by the layers
/// that use it). `windows`: one entry per layer. Each mask `[batch, 1, seq, past + seq]` f32.
pub(crate) fn layer_masks(attention_mask: &Tensor, seq: i64, windows: &[Option<i64>]) -> Vec<Tensor> {
    let mut made: Vec<(Option<i64>, Tensor)> = Vec::new();
    windows
        .iter()
        .map(|&w| {
            if let Some((_, m)) = made.iter().find(|(x, _)| *x == w) {
                return m.shallow_clone();
            }
            let m = match w {
                Some(w) => causal::sliding_window_mask(attention_mask, seq, w),
                None => causal::causal_mask(attention_mask, seq),
            };
            made.push((w, m.shallow_clone()));
            m
        })
        .collect()
}

/// Input of a decoder layer and of its attention: `(hidden [batch, seq, hidden], mask
/// [batch, 1, seq, past + seq] f32 (see [`causal::causal_mask`]), (cos, sin) each
/// [batch, seq, head_dim], cache)`.
pub type LayerInput = (Tensor, Tensor, (Tensor, Tensor), KvCacheHandle);

/// Layout of [`LayerInput`]: hidden states, mask and `(cos, sin)` `[batch, ..]`, the KV cache
/// handle shared by every row.
pub const LAYER_INPUT: Layout = Layout::Tuple(&[ROWS, ROWS, ROWS, Layout::Shared]);

/// `model.layers.{i}`: `x + self_attn(input_layernorm(x))`, then
/// `x + mlp(post_attention_layernorm(x))` (transformers' `LlamaDecoderLayer`).
///
/// Input [`LayerInput`], output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct LlamaDecoderLayer {
    /// `input_layernorm`: RMSNorm before attention.
    pub input_layernorm: Hooked<RmsNorm>,
    /// `self_attn`: grouped-query causal self-attention with rotary embeddings.
    pub self_attn: Hooked<LlamaAttention>,
    /// `post_attention_layernorm`: RMSNorm before the MLP.
    pub post_attention_layernorm: Hooked<RmsNorm>,
    /// `mlp`: SwiGLU feed-forward.
    pub mlp: Hooked<LlamaMlp>,
}

impl LlamaDecoderLayer {
    /// Zero weights under `p` (`model.layers.{layer_idx}`).
    pub fn new(p: &nn::Path, c: &LlamaConfig, layer_idx: usize) -> Result<Self> {
        Self::with_attention(p, c, LlamaAttention::new(&(p / "self_attn"), c, layer_idx))
    }

    /// [`LlamaDecoderLayer::new`] around the attention `self_attn` (built at `{p}.self_attn`).
    pub(crate) fn with_attention(p: &nn::Path, c: &LlamaConfig, self_attn: LlamaAttention) -> Result<Self> {
        let (pa, pm) = (p / "self_attn", p / "mlp");
        Ok(LlamaDecoderLayer {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), c.hidden_size, c.rms_norm_eps),
            self_attn: Hooked::new(&pa, self_attn),
            post_attention_layernorm: RmsNorm::new(&(p / "post_attention_layernorm"), c.hidden_size, c.rms_norm_eps),
            mlp: Hooked::new(&pm, LlamaMlp::new(&pm, c)?),
        })
    }
}

impl HookModule for LlamaDecoderLayer {
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
        let hidden = hidden + attn;
        let ff = self.mlp.call(self.post_attention_layernorm.call(hidden.shallow_clone()));
        hidden + ff
    }
}

/// `model.layers.{i}.self_attn`: grouped-query attention with rotary embeddings and the KV
/// cache (transformers' `LlamaAttention`, eager).
///
/// Input [`LayerInput`] (hidden already normalised). q `[batch, heads, seq, head_dim]`, k and v
/// `[batch, kv_heads, seq, head_dim]`; q and k rotated, k and v appended to cache slot
/// `layer_idx`, k and v repeated `heads / kv_heads` times; output
/// `o_proj(softmax(q kᵀ · head_dim^-0.5 + mask) v)`, `[batch, seq, hidden]`.
///
/// Hook points (identity [`HookPoint`]s, see [`super::point`]; each later stage uses the hooked
/// value): `q` `[batch, heads, seq, head_dim]` after rotary, `k`
/// `[batch, heads, past + seq, head_dim]` after rotary, the cache and `repeat_kv` (editing it
/// changes this step's scores, not what the cache keeps), `scores` and `probs`
/// `[batch, heads, seq, past + seq]` (f32 / model dtype), `z` `[batch, seq, heads, head_dim]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct LlamaAttention {
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

impl LlamaAttention {
    /// Zero weights under `p` (`model.layers.{layer_idx}.self_attn`).
    pub fn new(p: &nn::Path, c: &LlamaConfig, layer_idx: usize) -> Self {
        Self::with_biases(p, c, layer_idx, c.attention_bias, c.attention_bias)
    }

    /// [`LlamaAttention::new`] with biases on q, k and v if `qkv_bias`, on o if `o_bias`
    /// (Llama's `attention_bias` sets both; Qwen2 has the first only).
    pub(crate) fn with_biases(p: &nn::Path, c: &LlamaConfig, layer_idx: usize, qkv_bias: bool, o_bias: bool) -> Self {
        let (h, hd, kv) = (c.hidden_size, c.head_dim(), c.kv_heads());
        LlamaAttention {
            q_proj: linear(p, "q_proj", h, c.num_attention_heads * hd, qkv_bias),
            k_proj: linear(p, "k_proj", h, kv * hd, qkv_bias),
            v_proj: linear(p, "v_proj", h, kv * hd, qkv_bias),
            o_proj: linear(p, "o_proj", c.num_attention_heads * hd, h, o_bias),
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

impl HookModule for LlamaAttention {
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
        let context = points.attend(q, k, &v, &mask, (self.head_dim as f64).powf(-0.5), true);
        self.o_proj.call(context)
    }
}

/// `[batch, kv_heads, n, d]` → `[batch, kv_heads * groups, n, d]`, each head repeated `groups`
/// times in place (transformers' `repeat_kv`).
pub(crate) fn repeat_kv(x: &Tensor, groups: i64) -> Tensor {
    if groups == 1 {
        return x.shallow_clone();
    }
    let s = x.size();
    x.unsqueeze(2).expand([s[0], s[1], groups, s[2], s[3]], false).reshape([s[0], s[1] * groups, s[2], s[3]])
}

/// `model.layers.{i}.mlp`: `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (transformers'
/// `LlamaMLP`, SwiGLU with `hidden_act = "silu"`).
///
/// Input `[batch, seq, hidden]`, output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct LlamaMlp {
    /// `gate_proj`: `[batch, seq, hidden]` → `[batch, seq, intermediate]`.
    pub gate_proj: Hooked<Linear>,
    /// `up_proj`: `[batch, seq, hidden]` → `[batch, seq, intermediate]`.
    pub up_proj: Hooked<Linear>,
    /// `down_proj`: `[batch, seq, intermediate]` → `[batch, seq, hidden]`.
    pub down_proj: Hooked<Linear>,
    /// `act_fn`: the config's `hidden_act` (SiLU), no weights; `[batch, seq, intermediate]`.
    pub act_fn: Hooked<HiddenAct>,
    /// `act`: the MLP's activation, `act_fn(gate_proj(x)) * up_proj(x)`, the input of
    /// `down_proj`, `[batch, seq, intermediate]` (TransformerLens' `hook_post` of a gated MLP);
    /// editing it changes the MLP's output.
    pub act: Hooked<HookPoint>,
}

impl LlamaMlp {
    /// Zero weights under `p` (`model.layers.{i}.mlp`).
    pub fn new(p: &nn::Path, c: &LlamaConfig) -> Result<Self> {
        let act = HiddenAct::parse(&c.hidden_act).map_err(|m| causal::config_error("<LlamaConfig>", m))?;
        let (h, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(LlamaMlp {
            gate_proj: linear(p, "gate_proj", h, i, bias),
            up_proj: linear(p, "up_proj", h, i, bias),
            down_proj: linear(p, "down_proj", i, h, bias),
            act_fn: Hooked::new(&(p / "act_fn"), act),
            act: HookPoint::new(p, "act"),
        })
    }
}

impl HookModule for LlamaMlp {
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
        let gate = self.act_fn.call(self.gate_proj.call(x.shallow_clone()));
        self.down_proj.call(self.act.call(gate * self.up_proj.call(x)))
    }
}

/// Root-mean-square LayerNorm (transformers' `LlamaRMSNorm`): in f32,
/// `x / sqrt(mean(x²) + eps)`, cast back to the input dtype, times `weight`.
///
/// Input and output `[..., hidden]`.
#[derive(Debug)]
pub struct RmsNorm {
    /// `[hidden]`.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// Variable `weight [dim]` under `p` (ones until loaded).
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Hooked<RmsNorm> {
        Hooked::new(p, RmsNorm { weight: params::param(p, "weight", &[dim], nn::Init::Const(1.0)), eps })
    }
}

/// A leaf: no hooked children.
impl ModuleTree for RmsNorm {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for RmsNorm {
    /// `[..., hidden]`.
    type Input = Tensor;
    /// `[..., hidden]`.
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
        &self.weight * normed.to_kind(kind)
    }
}

/// [`Linear`] named `name` under `p` with zero weights (`weight [out, in]`, `bias [out]` if `bias`).
fn linear(p: &nn::Path, name: &str, in_dim: i64, out_dim: i64, bias: bool) -> Hooked<Linear> {
    Linear::new(&(p / name), in_dim, out_dim, bias)
}
