//! Qwen3 (dense) in tch, every submodule hookable: Llama with a per-head RMSNorm on the queries
//! and keys.
//!
//! Architecture: Yang et al. 2025, "Qwen3 Technical Report" (arXiv:2505.09388), as implemented
//! by Hugging Face transformers' `models/qwen3/modeling_qwen3.py` (`Qwen3ForCausalLM`, eager
//! attention). The differences from [`super::llama`]:
//!
//! - `self_attn.q_norm` and `self_attn.k_norm`: RMSNorms over `head_dim` applied to each head of
//!   the projected queries and keys, before rotary (OLMo 2 normalises the whole projection
//!   instead, see [`super::olmo2`]);
//! - `head_dim` is explicit (default 128, not `hidden_size / num_attention_heads`);
//! - `attention_bias` (false in every release) sets biases on q, k, v and o together;
//! - sliding-window layers as for Qwen2 ([`super::qwen2`], [`Qwen3Config::layer_windows`]):
//!   with `use_sliding_window`, the sliding layers see only the last `sliding_window` positions.
//!
//! Embeddings, rotary tables, norms, the SwiGLU MLP and the residual wiring are Llama's modules:
//!
//! ```text
//! Qwen3                               (root, path "")   Input CausalInput, Output logits
//! ├── model                           Qwen3Model        Output last hidden state (after norm)
//! │   ├── embed_tokens                nn::Embedding [vocab, hidden]
//! │   ├── rotary_emb                  RotaryEmbedding   (no weights) position ids → (cos, sin)
//! │   ├── layers[i]                   Qwen3DecoderLayer (as LlamaDecoderLayer), Output [batch, seq, hidden]
//! │   │   ├── input_layernorm         RmsNorm
//! │   │   ├── self_attn               Qwen3Attention: q_proj, k_proj, v_proj, o_proj (Linear),
//! │   │   │                           q_norm, k_norm (RmsNorm over head_dim);
//! │   │   │                           hook points q, k, scores, probs, z (HookPoint)
//! │   │   ├── post_attention_layernorm RmsNorm
//! │   │   └── mlp                     LlamaMlp: gate_proj, up_proj, down_proj, act_fn; hook point act
//! │   └── norm                        RmsNorm
//! └── lm_head                         LmHead (own weight, or embed_tokens' if tie_word_embeddings)
//! ```
//!
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `hidden_size`.


use tch::{nn, Tensor};
use super::causal::device_map::{to, Mover};

use super::causal::{self, CausalInput, LmHead};
use super::llama::{layer_masks, repeat_kv, LayerInput, LlamaConfig, LlamaMlp, RmsNorm, RotaryEmbedding, LAYER_INPUT};
use super::params;
use super::point::{AttentionPoints, HookPoint};

use crate::activation::Layout;
use crate::error::Result;
use crate::hook::{HookModule, Hooked};
use crate::models::causal::rotary::apply_rotary;
use crate::models::linear::Linear;
use crate::models::{CAUSAL_INPUT, ROWS};
use nnsight_macros::ModuleTree;

mod config;
pub use config::Qwen3Config;

/// A Qwen3 model with its language-model head (transformers' `Qwen3ForCausalLM`).
///
/// Input [`CausalInput`], output logits `[batch, seq, vocab]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Qwen3 {
    /// `model`: embeddings, decoder layers, final norm.
    pub model: Hooked<Qwen3Model>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: Qwen3Config,
}

impl Qwen3 {
    /// A model with zero weights as variables under `p` (use `vs.root()`: variable names are
    /// the checkpoint keys). `lm_head.weight` is a variable unless `tie_word_embeddings`.
    /// Errors: [`crate::Error::Config`] for a config failing [`Qwen3Config::validate`],
    /// [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &Qwen3Config) -> Result<Qwen3> {
        const WHAT: &str = "<Qwen3Config given to Qwen3::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        let windows = config.layer_windows().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pm = p / "model";
            let model = Qwen3Model::new(&pm, &config.llama())?.with_windows(windows);
            let tied = config.tie_word_embeddings.then_some(&model.embed_tokens.ws);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.hidden_size);
            Ok(Qwen3 { model: Hooked::new(&pm, model), lm_head, config: config.clone() })
        })
    }
}

super::causal::causal_family!(Qwen3, Qwen3Config {
    layer: Qwen3DecoderLayer,
    attn: Qwen3Attention,
    mlp: LlamaMlp,
    norm: RmsNorm,
    embedding: ws,
});

/// `model`: as [`super::llama::LlamaModel`] with [`Qwen3DecoderLayer`]s (transformers'
/// `Qwen3Model`).
///
/// Input [`CausalInput`]; output the last hidden state `[batch, seq, hidden]` (after `norm`).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Qwen3Model {
    /// `embed_tokens`: `[vocab, hidden]`; ids `[batch, seq]` → `[batch, seq, hidden]`.
    pub embed_tokens: Hooked<nn::Embedding>,
    /// `layers`: `model.layers.0` .. `model.layers.{num_hidden_layers - 1}`.
    pub layers: Vec<Hooked<Qwen3DecoderLayer>>,
    /// `norm`: final RMSNorm.
    pub norm: Hooked<RmsNorm>,
    /// `rotary_emb`: cos/sin tables `[batch, seq, head_dim]` for the position ids (no weights).
    pub rotary_emb: Hooked<RotaryEmbedding>,
    /// Each layer's sliding window (`None`: full causal attention; see
    /// [`Qwen3Config::layer_windows`]): layer `i` sees the last `layer_windows[i]` positions.
    pub layer_windows: Vec<Option<i64>>,
}

impl Qwen3Model {
    /// Zero weights under `p` (`model`); `c` is [`Qwen3Config::llama`].
    pub fn new(p: &nn::Path, c: &LlamaConfig) -> Result<Self> {
        let pl = p / "layers";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let q = &pl / i;
                Ok(Hooked::new(&q, Qwen3DecoderLayer::new(&q, c, i as usize)?))
            })
            .collect::<Result<_>>()?;
        let rope = c.rope().map_err(|m| causal::config_error("<Qwen3Config>", m))?;
        params::buffer(&(p / "rotary_emb"), "inv_freq", c.head_dim() / 2);
        Ok(Qwen3Model {
            embed_tokens: causal::embedding(&(p / "embed_tokens"), c.vocab_size, c.hidden_size),
            layers,
            norm: RmsNorm::new(&(p / "norm"), c.hidden_size, c.rms_norm_eps),
            rotary_emb: Hooked::new(&(p / "rotary_emb"), RotaryEmbedding::new(&rope, c.head_dim(), p.device())),
            layer_windows: vec![None; c.num_hidden_layers.max(0) as usize],
        })
    }

    /// This model with layer `i` attending to the last `windows[i]` positions only (`None`:
    /// full causal attention), one entry per layer; each window >= 1.
    pub fn with_windows(mut self, windows: Vec<Option<i64>>) -> Self {
        assert_eq!(windows.len(), self.layers.len(), "one window per layer");
        self.layer_windows = windows;
        self
    }
}

impl HookModule for Qwen3Model {
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

/// `model.layers.{i}`: Llama's pre-norm layer, `x + self_attn(input_layernorm(x))`, then
/// `x + mlp(post_attention_layernorm(x))`, around a [`Qwen3Attention`].
///
/// Input [`LayerInput`], output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Qwen3DecoderLayer {
    /// `input_layernorm`: RMSNorm before attention.
    pub input_layernorm: Hooked<RmsNorm>,
    /// `self_attn`: grouped-query attention with q/k norms and rotary embeddings.
    pub self_attn: Hooked<Qwen3Attention>,
    /// `post_attention_layernorm`: RMSNorm before the MLP.
    pub post_attention_layernorm: Hooked<RmsNorm>,
    /// `mlp`: SwiGLU feed-forward (Llama's).
    pub mlp: Hooked<LlamaMlp>,
}

impl Qwen3DecoderLayer {
    /// Zero weights under `p` (`model.layers.{layer_idx}`).
    pub fn new(p: &nn::Path, c: &LlamaConfig, layer_idx: usize) -> Result<Self> {
        let (pa, pm) = (p / "self_attn", p / "mlp");
        Ok(Qwen3DecoderLayer {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), c.hidden_size, c.rms_norm_eps),
            self_attn: Hooked::new(&pa, Qwen3Attention::new(&pa, c, layer_idx)),
            post_attention_layernorm: RmsNorm::new(&(p / "post_attention_layernorm"), c.hidden_size, c.rms_norm_eps),
            mlp: Hooked::new(&pm, LlamaMlp::new(&pm, c)?),
        })
    }
}

impl HookModule for Qwen3DecoderLayer {
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

/// `model.layers.{i}.self_attn`: Llama's grouped-query attention with `q_norm` / `k_norm` on
/// each head (transformers' `Qwen3Attention`, eager).
///
/// Input [`LayerInput`] (hidden already normalised). q `[batch, seq, heads, head_dim]` through
/// `q_norm`, k `[batch, seq, kv_heads, head_dim]` through `k_norm` (each head normalised over
/// its `head_dim`, one weight shared by the heads), then as Llama: heads first, rotary, cache
/// slot `layer_idx`, `repeat_kv`, `o_proj(softmax(q kᵀ · head_dim^-0.5 + mask) v)`.
///
/// Hook points as [`super::llama::LlamaAttention`]'s: `q` `[batch, heads, seq, head_dim]` after
/// the norm and rotary, `k` `[batch, heads, past + seq, head_dim]` after the norm, rotary, the
/// cache and `repeat_kv`, `scores`, `probs` `[batch, heads, seq, past + seq]`, `z`
/// `[batch, seq, heads, head_dim]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Qwen3Attention {
    /// `q_proj`: `[batch, seq, hidden]` → `[batch, seq, heads * head_dim]`.
    pub q_proj: Hooked<Linear>,
    /// `k_proj`: `[batch, seq, hidden]` → `[batch, seq, kv_heads * head_dim]`.
    pub k_proj: Hooked<Linear>,
    /// `v_proj`: `[batch, seq, hidden]` → `[batch, seq, kv_heads * head_dim]`.
    pub v_proj: Hooked<Linear>,
    /// `o_proj`: `[batch, seq, heads * head_dim]` → `[batch, seq, hidden]`.
    pub o_proj: Hooked<Linear>,
    /// `q_norm`: RMSNorm over `head_dim`, `[batch, seq, heads, head_dim]` in and out.
    pub q_norm: Hooked<RmsNorm>,
    /// `k_norm`: RMSNorm over `head_dim`, `[batch, seq, kv_heads, head_dim]` in and out.
    pub k_norm: Hooked<RmsNorm>,
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

impl Qwen3Attention {
    /// Zero weights under `p` (`model.layers.{layer_idx}.self_attn`).
    pub fn new(p: &nn::Path, c: &LlamaConfig, layer_idx: usize) -> Self {
        let (h, hd, kv, bias) = (c.hidden_size, c.head_dim(), c.kv_heads(), c.attention_bias);
        Qwen3Attention {
            q_proj: Linear::new(&(p / "q_proj"), h, c.num_attention_heads * hd, bias),
            k_proj: Linear::new(&(p / "k_proj"), h, kv * hd, bias),
            v_proj: Linear::new(&(p / "v_proj"), h, kv * hd, bias),
            o_proj: Linear::new(&(p / "o_proj"), c.num_attention_heads * hd, h, bias),
            q_norm: RmsNorm::new(&(p / "q_norm"), hd, c.rms_norm_eps),
            k_norm: RmsNorm::new(&(p / "k_norm"), hd, c.rms_norm_eps),
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

impl HookModule for Qwen3Attention {
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
        let split = |t: Tensor| t.view([b, s, -1, self.head_dim]);
        // The difference from Llama: each head normalised before it moves in front.
        let q = self.q_norm.call(split(self.q_proj.call(hidden.shallow_clone()))).transpose(1, 2);
        let k = self.k_norm.call(split(self.k_proj.call(hidden.shallow_clone()))).transpose(1, 2);
        let v = split(self.v_proj.call(hidden)).transpose(1, 2);
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
