//! Gemma 3 text decoder in tch, every submodule hookable: Gemma 2 ([`super::gemma2`]) with the
//! differences below.
//!
//! Architecture: Gemma Team 2025, "Gemma 3 Technical Report" (arXiv:2503.19786), text part, as
//! implemented by Hugging Face transformers' `models/gemma3/modeling_gemma3.py`
//! (`Gemma3ForCausalLM`, `model_type` `"gemma3_text"`, eager attention). What differs from
//! Gemma 2:
//!
//! - queries and keys are normalised per head before the rotary embedding, by Gemma RMSNorms of
//!   width `head_dim` (`q_norm`, `k_norm`);
//! - no soft-cap on the attention scores (transformers 5.24's `Gemma3Attention` passes none,
//!   whatever `attn_logit_softcapping` says) and by default none on the logits
//!   (`final_logit_softcapping` null; applied when set, as transformers does);
//! - the layer pattern: `layer_types`, by default five local (sliding-window) layers then one
//!   global layer (`sliding_window_pattern` 6);
//! - two rotary tables: global layers use `rope_parameters.full_attention` (base 1e6 by default,
//!   possibly scaled, e.g. linear factor 8), local layers `rope_parameters.sliding_attention`
//!   (transformers 4: `rope_local_base_freq`, 10000 by default), see
//!   [`Gemma3TextConfig::rope`].
//!
//! Module paths are the checkpoint key prefixes:
//!
//! ```text
//! Gemma3                                (root, path "")   Input CausalInput, Output logits
//! ├── model                             Gemma3TextModel   Output last hidden state (after norm)
//! │   ├── embed_tokens                  ScaledEmbedding [vocab, hidden] (× sqrt(hidden))
//! │   ├── rotary_emb                    RotaryEmbedding   (no weights) global layers' (cos, sin)
//! │   ├── rotary_emb_local              RotaryEmbedding   (no weights) local layers' (cos, sin)
//! │   ├── layers[i]                     Gemma3DecoderLayer, Output [batch, seq, hidden]
//! │   │   ├── input_layernorm           GemmaRmsNorm
//! │   │   ├── self_attn                 Gemma3Attention: q_proj, k_proj, v_proj, o_proj (Linear),
//! │   │   │                             q_norm, k_norm (GemmaRmsNorm [head_dim]);
//! │   │   │                             hook points q, k, scores, probs, z (HookPoint)
//! │   │   ├── post_attention_layernorm  GemmaRmsNorm
//! │   │   ├── pre_feedforward_layernorm GemmaRmsNorm
//! │   │   ├── mlp                       LlamaMlp (GeGLU), hook point act
//! │   │   └── post_feedforward_layernorm GemmaRmsNorm
//! │   └── norm                          GemmaRmsNorm
//! └── lm_head                           LmHead (embed_tokens' weight)
//! ```
//!
//! (`rotary_emb_local` is the name transformers 4.50–4.5x gave the local table; transformers 5
//! keeps both tables in one `rotary_emb` module. Neither has weights.)


use tch::{nn, Tensor};
use super::causal::device_map::{to, Mover};

use super::causal::{self, CausalInput, LmHead};
use super::gemma2::{gemma_mlp, repeat_kv, softcap, GemmaRmsNorm, LayerType, Masks, ScaledEmbedding};
use super::llama::{LayerInput, LlamaMlp, LAYER_INPUT};
use super::params;
use super::point::{AttentionPoints, HookPoint};

use crate::activation::Layout;
use crate::error::Result;
use crate::hook::{HookModule, Hooked};
use crate::models::linear::Linear;
use crate::models::{CAUSAL_INPUT, ROWS};
use nnsight_macros::ModuleTree;

mod config;
pub use config::Gemma3TextConfig;
pub use super::causal::rotary::{Rope, RotaryEmbedding};
use super::causal::rotary::apply_rotary;

/// A Gemma 3 text model with its language-model head (transformers' `Gemma3ForCausalLM`).
///
/// Input [`CausalInput`], output logits `[batch, seq, vocab]` (soft-capped only when the config
/// sets `final_logit_softcapping`).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gemma3 {
    /// `model`: embeddings, decoder layers, final norm.
    pub model: Hooked<Gemma3TextModel>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: Gemma3TextConfig,
}

impl Gemma3 {
    /// A model with zero weights as variables under `p` (variable names are the checkpoint
    /// keys). Errors: [`crate::Error::Config`] for a config failing
    /// [`Gemma3TextConfig::validate`], [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &Gemma3TextConfig) -> Result<Gemma3> {
        const WHAT: &str = "<Gemma3TextConfig given to Gemma3::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pm = p / "model";
            let model = Gemma3TextModel::new(&pm, config)?;
            let tied = config.tie_word_embeddings.then_some(&model.embed_tokens.weight);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.hidden_size);
            Ok(Gemma3 { model: Hooked::new(&pm, model), lm_head, config: config.clone() })
        })
    }
}

super::causal::causal_family!(Gemma3, Gemma3TextConfig {
    layer: Gemma3DecoderLayer,
    attn: Gemma3Attention,
    mlp: LlamaMlp,
    norm: GemmaRmsNorm,
    embedding: weight,
    logits: softcap => final_logit_softcapping,
});

/// `model`: scaled embeddings, two rotary tables, decoder layers, final RMSNorm (transformers'
/// `Gemma3TextModel`).
///
/// Input [`CausalInput`]; output the last hidden state `[batch, seq, hidden]` (after `norm`).
/// Each layer gets, by its [`LayerType`], the sliding-window mask and `rotary_emb_local`'s
/// tables, or the full causal mask and `rotary_emb`'s.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gemma3TextModel {
    /// `embed_tokens`: `[vocab, hidden]`; ids `[batch, seq]` → `[batch, seq, hidden]`, × `sqrt(hidden)`.
    pub embed_tokens: Hooked<ScaledEmbedding>,
    /// `layers`: `model.layers.0` .. `model.layers.{num_hidden_layers - 1}`.
    pub layers: Vec<Hooked<Gemma3DecoderLayer>>,
    /// `norm`: final RMSNorm.
    pub norm: Hooked<GemmaRmsNorm>,
    /// `rotary_emb`: the global (full-attention) layers' cos/sin tables (no weights).
    pub rotary_emb: Hooked<RotaryEmbedding>,
    /// `rotary_emb_local`: the local (sliding-window) layers' cos/sin tables (no weights).
    pub rotary_emb_local: Hooked<RotaryEmbedding>,
    /// Each layer's attention kind (`layer_types`).
    pub layer_types: Vec<LayerType>,
    /// Window of the local layers (`None` when no layer slides).
    pub sliding_window: Option<i64>,
}

impl Gemma3TextModel {
    /// Zero weights under `p` (`model`).
    pub fn new(p: &nn::Path, c: &Gemma3TextConfig) -> Result<Self> {
        let bad = |m| causal::config_error("<Gemma3TextConfig>", m);
        let layer_types = c.layer_types().map_err(bad)?;
        let pl = p / "layers";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let q = &pl / i;
                Ok(Hooked::new(&q, Gemma3DecoderLayer::new(&q, c, i as usize, layer_types[i as usize])?))
            })
            .collect::<Result<_>>()?;
        let (global, local) = (c.rope(LayerType::Full).map_err(bad)?, c.rope(LayerType::Sliding).map_err(bad)?);
        params::buffer(&(p / "rotary_emb"), "inv_freq", c.head_dim / 2);
        params::buffer(&(p / "rotary_emb_local"), "inv_freq", c.head_dim / 2);
        let sliding = layer_types.contains(&LayerType::Sliding);
        Ok(Gemma3TextModel {
            embed_tokens: ScaledEmbedding::new(&(p / "embed_tokens"), c.vocab_size, c.hidden_size),
            layers,
            norm: GemmaRmsNorm::new(&(p / "norm"), c.hidden_size, c.rms_norm_eps),
            rotary_emb: Hooked::new(&(p / "rotary_emb"), RotaryEmbedding::new(&global, c.head_dim, p.device())),
            rotary_emb_local: Hooked::new(&(p / "rotary_emb_local"), RotaryEmbedding::new(&local, c.head_dim, p.device())),
            layer_types,
            sliding_window: c.sliding_window.filter(|_| sliding),
        })
    }
}

impl HookModule for Gemma3TextModel {
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
        let global = self.rotary_emb.call((hidden.shallow_clone(), position_ids.shallow_clone()));
        let local = self.rotary_emb_local.call((hidden.shallow_clone(), position_ids));
        // Each layer's inputs on its device (a device map; no copies on one device).
        let mut mv = Mover::default();
        let hidden = self.layers.iter().zip(&self.layer_types).fold(hidden, |h, (layer, &ty)| {
            let (cos, sin) = if ty == LayerType::Sliding { &local } else { &global };
            let d = layer.input_layernorm.weight.device();
            layer.call((to(h, d), mv.to(&masks.get(ty), d), (mv.to(cos, d), mv.to(sin, d)), cache.clone()))
        });
        self.norm.call(to(hidden, self.norm.weight.device()))
    }
}

/// `model.layers.{i}`: as Gemma 2's layer ([`super::gemma2::Gemma2DecoderLayer`]), four norms:
/// `x + post_attention_layernorm(self_attn(input_layernorm(x)))`, then
/// `x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))` (transformers'
/// `Gemma3DecoderLayer`).
///
/// Input [`LayerInput`] (this layer's mask and rotary tables), output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gemma3DecoderLayer {
    /// `input_layernorm`: RMSNorm before attention.
    pub input_layernorm: Hooked<GemmaRmsNorm>,
    /// `self_attn`: grouped-query causal self-attention with q/k norms and rotary embeddings.
    pub self_attn: Hooked<Gemma3Attention>,
    /// `post_attention_layernorm`: RMSNorm of the attention output, before the residual add.
    pub post_attention_layernorm: Hooked<GemmaRmsNorm>,
    /// `pre_feedforward_layernorm`: RMSNorm before the MLP.
    pub pre_feedforward_layernorm: Hooked<GemmaRmsNorm>,
    /// `mlp`: GeGLU feed-forward.
    pub mlp: Hooked<LlamaMlp>,
    /// `post_feedforward_layernorm`: RMSNorm of the MLP output, before the residual add.
    pub post_feedforward_layernorm: Hooked<GemmaRmsNorm>,
}

impl Gemma3DecoderLayer {
    /// Zero weights under `p` (`model.layers.{layer_idx}`).
    pub fn new(p: &nn::Path, c: &Gemma3TextConfig, layer_idx: usize, ty: LayerType) -> Result<Self> {
        let (pa, pm) = (p / "self_attn", p / "mlp");
        let norm = |name: &str| GemmaRmsNorm::new(&(p / name), c.hidden_size, c.rms_norm_eps);
        Ok(Gemma3DecoderLayer {
            input_layernorm: norm("input_layernorm"),
            self_attn: Hooked::new(&pa, Gemma3Attention::new(&pa, c, layer_idx, ty)),
            post_attention_layernorm: norm("post_attention_layernorm"),
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm"),
            mlp: Hooked::new(&pm, gemma_mlp(&pm, c.hidden_size, c.intermediate_size, c.activation())?),
            post_feedforward_layernorm: norm("post_feedforward_layernorm"),
        })
    }
}

impl HookModule for Gemma3DecoderLayer {
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

/// `model.layers.{i}.self_attn`: grouped-query attention with per-head q/k RMSNorm, rotary
/// embeddings (this layer kind's tables), the KV cache and (local layers) a sliding window
/// (transformers' `Gemma3Attention`, eager).
///
/// Input [`LayerInput`] (hidden already normalised). q `[batch, heads, seq, head_dim]`, k and v
/// `[batch, kv_heads, seq, head_dim]`; q and k normalised over `head_dim` (`q_norm`, `k_norm`)
/// then rotated, k and v appended to cache slot `layer_idx`, repeated `heads / kv_heads` times;
/// output `o_proj(softmax(q kᵀ · query_pre_attn_scalar^-0.5 + mask) v)`, `[batch, seq, hidden]`.
///
/// Hook points (identity [`HookPoint`]s, see [`super::point`]): `q` `[batch, heads, seq,
/// head_dim]` after `q_norm` and rotary, `k` `[batch, heads, past + seq, head_dim]` after
/// `k_norm`, rotary, the cache and the key/value-head repeat, `scores`
/// `[batch, heads, seq, past + seq]` f32 after the mask (no soft-cap), `probs` (model dtype; 0
/// for keys outside the window), `z` `[batch, seq, heads, head_dim]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Gemma3Attention {
    /// `q_proj`: `[batch, seq, hidden]` → `[batch, seq, heads * head_dim]`.
    pub q_proj: Hooked<Linear>,
    /// `k_proj`: `[batch, seq, hidden]` → `[batch, seq, kv_heads * head_dim]`.
    pub k_proj: Hooked<Linear>,
    /// `v_proj`: `[batch, seq, hidden]` → `[batch, seq, kv_heads * head_dim]`.
    pub v_proj: Hooked<Linear>,
    /// `o_proj`: `[batch, seq, heads * head_dim]` → `[batch, seq, hidden]`.
    pub o_proj: Hooked<Linear>,
    /// `q_norm`: Gemma RMSNorm over each query head, `[batch, heads, seq, head_dim]`.
    pub q_norm: Hooked<GemmaRmsNorm>,
    /// `k_norm`: Gemma RMSNorm over each key head, `[batch, kv_heads, seq, head_dim]`.
    pub k_norm: Hooked<GemmaRmsNorm>,
    /// `q`: queries after `q_norm` and rotary, `[batch, heads, seq, head_dim]`.
    pub q: Hooked<HookPoint>,
    /// `k`: keys after `k_norm` and rotary, cached + new, each key/value head repeated for its
    /// query heads, `[batch, heads, past + seq, head_dim]`.
    pub k: Hooked<HookPoint>,
    /// `scores`: `q kᵀ · query_pre_attn_scalar^-0.5 + mask` in f32, before the softmax,
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
    /// The window of a local layer (applied by the mask the layer receives), `None` for a
    /// global layer.
    pub sliding_window: Option<i64>,
}

impl Gemma3Attention {
    /// Zero weights under `p` (`model.layers.{layer_idx}.self_attn`).
    pub fn new(p: &nn::Path, c: &Gemma3TextConfig, layer_idx: usize, ty: LayerType) -> Self {
        let (h, hd, kv, heads) = (c.hidden_size, c.head_dim, c.num_key_value_heads, c.num_attention_heads);
        let bias = c.attention_bias;
        Gemma3Attention {
            q_proj: Linear::new(&(p / "q_proj"), h, heads * hd, bias),
            k_proj: Linear::new(&(p / "k_proj"), h, kv * hd, bias),
            v_proj: Linear::new(&(p / "v_proj"), h, kv * hd, bias),
            o_proj: Linear::new(&(p / "o_proj"), heads * hd, h, bias),
            q_norm: GemmaRmsNorm::new(&(p / "q_norm"), hd, c.rms_norm_eps),
            k_norm: GemmaRmsNorm::new(&(p / "k_norm"), hd, c.rms_norm_eps),
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
            sliding_window: c.sliding_window.filter(|_| ty == LayerType::Sliding),
        }
    }
}

impl HookModule for Gemma3Attention {
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
        let q = self.q_norm.call(heads(self.q_proj.call(hidden.shallow_clone())));
        let k = self.k_norm.call(heads(self.k_proj.call(hidden.shallow_clone())));
        let v = heads(self.v_proj.call(hidden));
        let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
        let (q, k) = (apply_rotary(&q, &cos, &sin), apply_rotary(&k, &cos, &sin));
        let (k, v) = cache.update(self.layer_idx, k, v);
        let groups = self.num_heads / self.num_key_value_heads;
        let (k, v) = (repeat_kv(&k, groups), repeat_kv(&v, groups));
        let points = AttentionPoints { q: &self.q, k: &self.k, scores: &self.scores, probs: &self.probs, z: &self.z };
        let context = points.attend(q, k, &v, &mask, self.scaling, true);
        self.o_proj.call(context)
    }
}
