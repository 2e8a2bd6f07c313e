//! GPT-NeoX (EleutherAI's Pythia family) in tch, every submodule hookable.
//!
//! Architecture: Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language
//! Model" (arXiv:2204.06745) and Biderman et al. 2023, "Pythia" (arXiv:2304.01373): pre-norm
//! decoder with LayerNorm (with bias), a fused per-head query/key/value projection, rotary
//! position embeddings (Su et al. 2021, arXiv:2104.09864) on the first `rotary_pct` of each
//! head only, a GELU MLP and, in most checkpoints, the parallel residual
//! `x + attn(ln1(x)) + mlp(ln2(x))`; as implemented by Hugging Face transformers'
//! `models/gpt_neox/modeling_gpt_neox.py` (`GPTNeoXForCausalLM`, eager attention, eval mode: no
//! dropout). Module paths are the checkpoint key prefixes:
//!
//! ```text
//! GptNeoX                              (root, path "")   Input CausalInput, Output logits
//! ├── gpt_neox                         GptNeoXModel      Output last hidden state (after final_layer_norm)
//! │   ├── embed_in                     nn::Embedding [vocab, hidden]
//! │   ├── layers[i]                    GptNeoXLayer      (gpt_neox.layers.0 ..), Output [batch, seq, hidden]
//! │   │   ├── input_layernorm          nn::LayerNorm     before attention
//! │   │   ├── post_attention_layernorm nn::LayerNorm     before the MLP
//! │   │   ├── attention                GptNeoXAttention: query_key_value, dense (Linear);
//! │   │   │                            hook points q, k, scores, probs, z (HookPoint)
//! │   │   └── mlp                      GptNeoXMlp: dense_h_to_4h, act (HiddenAct), dense_4h_to_h
//! │   ├── final_layer_norm             nn::LayerNorm
//! │   └── rotary_emb                   RotaryEmbedding   (no weights) position ids → (cos, sin)
//! └── embed_out                        LmHead (own weight, no bias; `embed_in`'s if tie_word_embeddings)
//! ```
//!
//! transformers 5 names the head `lm_head` in Python but reads and writes the checkpoint key
//! `embed_out.weight` (`conversion_mapping.py`), the key every Pythia checkpoint has; the module
//! here keeps the checkpoint's name. The rotary embedding uses the `rotate_half` convention on
//! the first [`Rotary::ndims`] dims of each head (the rest pass through), base `rope_theta` /
//! `rotary_emb_base`; see [`GptNeoXConfig::rotary`].
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `hidden_size`.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};
use super::causal::device_map::{to, Mover};

use super::act::HiddenAct;
use super::causal::{self, CausalInput, CausalLm, Decoder, KvCacheHandle, LmHead, LoadOptions, TokenIds};
use super::params;
use super::point::{AttentionPoints, HookPoint};

use crate::activation::Layout;
use crate::error::Result;
use crate::hook::{HookModule, Hooked};
use crate::models::linear::Linear;
use crate::models::{CAUSAL_INPUT, ROWS};
use nnsight_macros::ModuleTree;

mod config;
pub use super::causal::rotary::{Rope, RotaryEmbedding};
use super::causal::rotary::apply_rotary;
pub use config::{GptNeoXConfig, Rotary};

/// A GPT-NeoX model with its language-model head (transformers' `GPTNeoXForCausalLM`).
///
/// Input [`CausalInput`], output logits `[batch, seq, vocab]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct GptNeoX {
    /// `gpt_neox`: embeddings, decoder layers, final LayerNorm.
    pub gpt_neox: Hooked<GptNeoXModel>,
    /// `embed_out`: `[batch, seq, hidden]` → `[batch, seq, vocab]` (transformers 5's `lm_head`).
    pub embed_out: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: GptNeoXConfig,
}

impl GptNeoX {
    /// A model with zero weights as variables under `p` (use `vs.root()`: variable names are the
    /// checkpoint keys, `gpt_neox.layers.0.attention.query_key_value.weight`, ...).
    /// `embed_out.weight` is a variable unless `tie_word_embeddings`. Errors:
    /// [`crate::Error::Config`] for a config failing [`GptNeoXConfig::validate`],
    /// [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &GptNeoXConfig) -> Result<GptNeoX> {
        const WHAT: &str = "<GptNeoXConfig given to GptNeoX::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pg = p / "gpt_neox";
            let model = GptNeoXModel::new(&pg, config)?;
            let tied = config.tie_word_embeddings.then_some(&model.embed_in.ws);
            let embed_out = LmHead::new(&(p / "embed_out"), tied, config.vocab_size, config.hidden_size);
            Ok(GptNeoX { gpt_neox: Hooked::new(&pg, model), embed_out, config: config.clone() })
        })
    }
}

impl HookModule for GptNeoX {
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
        self.embed_out.call(self.gpt_neox.call(input))
    }
}

/// The variable names of the parts a [`causal::DeviceMap`] places.
const NEOX_PARTS: causal::Parts = causal::Parts { embedding: &["gpt_neox.embed_in."], layers: "gpt_neox.layers.", final_norm: "gpt_neox.final_layer_norm.", unembedding: "embed_out." };

impl CausalLm for GptNeoX {
    /// Checkpoints saved from `GPTNeoXForCausalLM` (`gpt_neox.layers.0...`, `embed_out.weight`)
    /// load; so do keys without the `gpt_neox.` prefix.
    fn load_with(dir: &Path, options: &LoadOptions) -> Result<Self> {
        causal::check_load(dir, options)?;
        let config = GptNeoXConfig::from_file(&dir.join("config.json"))?;
        causal::load_model(dir, options, &["gpt_neox."], &NEOX_PARTS, |p| GptNeoX::new(p, &config))
    }
    fn max_positions(&self) -> i64 {
        self.config.max_position_embeddings
    }
    fn num_layers(&self) -> usize {
        self.gpt_neox.layers.len()
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
        self.gpt_neox.embed_in.ws.device()
    }
    fn kind(&self) -> Kind {
        self.gpt_neox.embed_in.ws.kind()
    }
}

/// `gpt_neox.layers`, `gpt_neox.layers.{i}.attention`, `.mlp`, `.mlp.act`,
/// `gpt_neox.final_layer_norm`, `embed_out`.
impl Decoder for GptNeoX {
    type Layer = GptNeoXLayer;
    type Attn = GptNeoXAttention;
    type Mlp = GptNeoXMlp;
    type MlpAct = HiddenAct;
    type Norm = nn::LayerNorm;
    fn layers(&self) -> &Vec<Hooked<GptNeoXLayer>> {
        &self.gpt_neox.layers
    }
    fn layer_attn(layer: &Hooked<Self::Layer>) -> &Hooked<GptNeoXAttention> {
        &layer.attention
    }
    fn layer_mlp(layer: &Hooked<Self::Layer>) -> &Hooked<GptNeoXMlp> {
        &layer.mlp
    }
    fn layer_mlp_act(layer: &Hooked<Self::Layer>) -> &Hooked<HiddenAct> {
        &layer.mlp.act
    }
    fn final_norm(&self) -> &Hooked<nn::LayerNorm> {
        &self.gpt_neox.final_layer_norm
    }
    fn unembedding(&self) -> &Hooked<LmHead> {
        &self.embed_out
    }
    fn final_norm_device(&self) -> Device {
        self.gpt_neox.final_layer_norm.ws.as_ref().map_or(self.device(), Tensor::device)
    }
}

/// `gpt_neox`: token embedding, decoder layers, final LayerNorm, rotary tables (transformers'
/// `GPTNeoXModel`; no position embedding, positions enter through the rotary embedding only).
///
/// Input [`CausalInput`]; output the last hidden state `[batch, seq, hidden]` (after
/// `final_layer_norm`).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct GptNeoXModel {
    /// `embed_in`: `[vocab, hidden]`; ids `[batch, seq]` → `[batch, seq, hidden]`.
    pub embed_in: Hooked<nn::Embedding>,
    /// `layers`: `gpt_neox.layers.0` .. `gpt_neox.layers.{num_hidden_layers - 1}`.
    pub layers: Vec<Hooked<GptNeoXLayer>>,
    /// `final_layer_norm`: LayerNorm after the last layer, `[batch, seq, hidden]` in and out.
    pub final_layer_norm: Hooked<nn::LayerNorm>,
    /// `rotary_emb`: cos/sin tables `[batch, seq, rotary_ndims]` for the position ids (no weights).
    pub rotary_emb: Hooked<RotaryEmbedding>,
}

impl GptNeoXModel {
    /// Zero weights under `p` (`gpt_neox`).
    pub fn new(p: &nn::Path, c: &GptNeoXConfig) -> Result<Self> {
        let rotary = c.rotary().map_err(|m| causal::config_error("<GptNeoXConfig>", m))?;
        let pl = p / "layers";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let q = &pl / i;
                Ok(Hooked::new(&q, GptNeoXLayer::new(&q, c, i as usize)?))
            })
            .collect::<Result<_>>()?;
        params::buffer(&(p / "rotary_emb"), "inv_freq", rotary.ndims / 2);
        Ok(GptNeoXModel {
            embed_in: causal::embedding(&(p / "embed_in"), c.vocab_size, c.hidden_size),
            layers,
            final_layer_norm: causal::layer_norm(&(p / "final_layer_norm"), c.hidden_size, c.layer_norm_eps),
            rotary_emb: Hooked::new(&(p / "rotary_emb"), RotaryEmbedding::new(&rotary.rope, rotary.ndims, p.device())),
        })
    }
}

impl HookModule for GptNeoXModel {
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
        let d = self.embed_in.ws.device();
        let (input_ids, attention_mask, position_ids) = (to(input_ids, d), to(attention_mask, d), to(position_ids, d));
        let seq = input_ids.size()[1];
        let mask = causal::causal_mask(&attention_mask, seq);
        let hidden = self.embed_in.call(input_ids);
        let (cos, sin) = self.rotary_emb.call((hidden.shallow_clone(), position_ids));
        // Each layer's inputs on its device (a device map; no copies on one device).
        let mut mv = Mover::default();
        let hidden = self.layers.iter().fold(hidden, |h, layer| {
            let d = layer.mlp.dense_h_to_4h.ws.device();
            layer.call((to(h, d), mv.to(&mask, d), (mv.to(&cos, d), mv.to(&sin, d)), cache.clone()))
        });
        let d = self.final_layer_norm.ws.as_ref().map_or(hidden.device(), Tensor::device);
        self.final_layer_norm.call(to(hidden, d))
    }
}

/// Input of a decoder layer and of its attention: `(hidden [batch, seq, hidden], mask
/// [batch, 1, seq, past + seq] f32 (see [`causal::causal_mask`]), (cos, sin) each
/// [batch, seq, rotary_ndims], cache)`.
pub type LayerInput = (Tensor, Tensor, (Tensor, Tensor), KvCacheHandle);

/// Layout of [`LayerInput`]: hidden states, mask and `(cos, sin)` `[batch, ..]`, the KV cache
/// handle shared by every row.
pub const LAYER_INPUT: Layout = Layout::Tuple(&[ROWS, ROWS, ROWS, Layout::Shared]);

/// `gpt_neox.layers.{i}` (transformers' `GPTNeoXLayer`). With `use_parallel_residual` (every
/// Pythia): `mlp(post_attention_layernorm(x)) + attention(input_layernorm(x)) + x`, both
/// branches reading the layer's input. Without: `a = attention(input_layernorm(x)) + x`, then
/// `mlp(post_attention_layernorm(a)) + a`, as Llama.
///
/// Input [`LayerInput`], output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct GptNeoXLayer {
    /// `input_layernorm`: LayerNorm before attention.
    pub input_layernorm: Hooked<nn::LayerNorm>,
    /// `post_attention_layernorm`: LayerNorm before the MLP (of the layer input when parallel).
    pub post_attention_layernorm: Hooked<nn::LayerNorm>,
    /// `attention`: causal self-attention with partial rotary embeddings.
    pub attention: Hooked<GptNeoXAttention>,
    /// `mlp`: GELU feed-forward.
    pub mlp: Hooked<GptNeoXMlp>,
    /// The config's `use_parallel_residual`.
    pub use_parallel_residual: bool,
}

impl GptNeoXLayer {
    /// Zero weights under `p` (`gpt_neox.layers.{layer_idx}`).
    pub fn new(p: &nn::Path, c: &GptNeoXConfig, layer_idx: usize) -> Result<Self> {
        let (pa, pm) = (p / "attention", p / "mlp");
        Ok(GptNeoXLayer {
            input_layernorm: causal::layer_norm(&(p / "input_layernorm"), c.hidden_size, c.layer_norm_eps),
            post_attention_layernorm: causal::layer_norm(&(p / "post_attention_layernorm"), c.hidden_size, c.layer_norm_eps),
            attention: Hooked::new(&pa, GptNeoXAttention::new(&pa, c, layer_idx)?),
            mlp: Hooked::new(&pm, GptNeoXMlp::new(&pm, c)?),
            use_parallel_residual: c.use_parallel_residual,
        })
    }
}

impl HookModule for GptNeoXLayer {
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
        let attn = self.attention.call((self.input_layernorm.call(hidden.shallow_clone()), mask, rope, cache));
        if self.use_parallel_residual {
            let ff = self.mlp.call(self.post_attention_layernorm.call(hidden.shallow_clone()));
            ff + attn + hidden
        } else {
            let attn = attn + hidden;
            let ff = self.mlp.call(self.post_attention_layernorm.call(attn.shallow_clone()));
            ff + attn
        }
    }
}

/// `gpt_neox.layers.{i}.attention`: multi-head causal self-attention with partial rotary
/// embeddings and the KV cache (transformers' `GPTNeoXAttention`, eager).
///
/// Input [`LayerInput`] (hidden already normalised). `query_key_value` gives
/// `[batch, seq, 3 * hidden]` laid out per head: viewed as `[batch, seq, heads, 3 * head_dim]`,
/// each head's slice is its query, key and value (`head_dim` each), so q, k, v are
/// `[batch, heads, seq, head_dim]`. The first `rotary_ndims` dims of q and k are rotated (the
/// rest pass through); k and v are appended to cache slot `layer_idx`; output
/// `dense(softmax(q kᵀ · head_dim^-0.5 + mask) v)`, `[batch, seq, hidden]`.
///
/// Hook points (identity [`HookPoint`]s, see [`super::point`]; each later stage uses the hooked
/// value): `q` `[batch, heads, seq, head_dim]` after rotary, `k`
/// `[batch, heads, past + seq, head_dim]` after rotary and the cache (editing it changes this
/// step's scores, not what the cache keeps), `scores` and `probs`
/// `[batch, heads, seq, past + seq]` (f32 / model dtype), `z` `[batch, seq, heads, head_dim]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct GptNeoXAttention {
    /// `query_key_value`: `[batch, seq, hidden]` → `[batch, seq, 3 * hidden]`, per head
    /// `[q | k | v]` (weight `[3 * hidden, hidden]`, bias `[3 * hidden]` if `attention_bias`).
    pub query_key_value: Hooked<Linear>,
    /// `dense`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub dense: Hooked<Linear>,
    /// `q`: queries after rotary, `[batch, heads, seq, head_dim]`.
    pub q: Hooked<HookPoint>,
    /// `k`: keys after rotary, cached + new, `[batch, heads, past + seq, head_dim]`.
    pub k: Hooked<HookPoint>,
    /// `scores`: `q kᵀ · head_dim^-0.5 + mask` in f32, before the softmax,
    /// `[batch, heads, seq, past + seq]`.
    pub scores: Hooked<HookPoint>,
    /// `probs`: the softmax of `scores` (model dtype), `[batch, heads, seq, past + seq]`.
    pub probs: Hooked<HookPoint>,
    /// `z`: `probs v`, each head's output before `dense`, `[batch, seq, heads, head_dim]`.
    pub z: Hooked<HookPoint>,
    /// Index of the layer (the cache slot).
    pub layer_idx: usize,
    /// Number of heads.
    pub num_heads: i64,
    /// `hidden / num_heads`.
    pub head_dim: i64,
    /// Rotated dims at the start of each head (`int(head_dim * rotary_pct)`).
    pub rotary_ndims: i64,
}

impl GptNeoXAttention {
    /// Zero weights under `p` (`gpt_neox.layers.{layer_idx}.attention`).
    pub fn new(p: &nn::Path, c: &GptNeoXConfig, layer_idx: usize) -> Result<Self> {
        let rotary = c.rotary().map_err(|m| causal::config_error("<GptNeoXConfig>", m))?;
        let (h, bias) = (c.hidden_size, c.attention_bias);
        Ok(GptNeoXAttention {
            query_key_value: Linear::new(&(p / "query_key_value"), h, 3 * h, bias),
            dense: Linear::new(&(p / "dense"), h, h, bias),
            q: HookPoint::new(p, "q"),
            k: HookPoint::new(p, "k"),
            scores: HookPoint::new(p, "scores"),
            probs: HookPoint::new(p, "probs"),
            z: HookPoint::new(p, "z"),
            layer_idx,
            num_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            rotary_ndims: rotary.ndims,
        })
    }

    fn points(&self) -> AttentionPoints<'_> {
        AttentionPoints { q: &self.q, k: &self.k, scores: &self.scores, probs: &self.probs, z: &self.z }
    }
}

impl HookModule for GptNeoXAttention {
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
        // Per head [q | k | v]: [batch, seq, heads, 3 * head_dim] → [batch, heads, seq, 3 * head_dim].
        let qkv = self.query_key_value.call(hidden).view([b, s, self.num_heads, 3 * self.head_dim]).transpose(1, 2);
        let parts = qkv.split(self.head_dim, -1);
        let (q, k, v) = (&parts[0], &parts[1], &parts[2]);
        let (q, k) = if self.rotary_ndims > 0 {
            let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
            (apply_rotary(q, &cos, &sin), apply_rotary(k, &cos, &sin))
        } else {
            (q.shallow_clone(), k.shallow_clone())
        };
        let (k, v) = cache.update(self.layer_idx, k, v.shallow_clone());
        let context = self.points().attend(q, k, &v, &mask, (self.head_dim as f64).powf(-0.5), true);
        self.dense.call(context)
    }
}

/// `gpt_neox.layers.{i}.mlp`: `dense_4h_to_h(act(dense_h_to_4h(x)))` (transformers'
/// `GPTNeoXMLP`).
///
/// Input `[batch, seq, hidden]`, output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct GptNeoXMlp {
    /// `dense_h_to_4h`: `[batch, seq, hidden]` → `[batch, seq, intermediate]`.
    pub dense_h_to_4h: Hooked<Linear>,
    /// `act`: the config's `hidden_act` (exact GELU for Pythia), no weights; its output
    /// `[batch, seq, intermediate]` is the MLP's activation (TransformerLens' `hook_post`), as
    /// `mlp.act` of the other bundled families. It is transformers' own `mlp.act` module.
    pub act: Hooked<HiddenAct>,
    /// `dense_4h_to_h`: `[batch, seq, intermediate]` → `[batch, seq, hidden]`.
    pub dense_4h_to_h: Hooked<Linear>,
}

impl GptNeoXMlp {
    /// Zero weights under `p` (`gpt_neox.layers.{i}.mlp`).
    pub fn new(p: &nn::Path, c: &GptNeoXConfig) -> Result<Self> {
        let act = HiddenAct::parse(&c.hidden_act).map_err(|m| causal::config_error("<GptNeoXConfig>", m))?;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(GptNeoXMlp {
            dense_h_to_4h: Linear::new(&(p / "dense_h_to_4h"), h, i, true),
            act: Hooked::new(&(p / "act"), act),
            dense_4h_to_h: Linear::new(&(p / "dense_4h_to_h"), i, h, true),
        })
    }
}

impl HookModule for GptNeoXMlp {
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
        self.dense_4h_to_h.call(self.act.call(self.dense_h_to_4h.call(x)))
    }
}
