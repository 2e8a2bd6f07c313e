//! Phi-3 in tch, every submodule hookable: Llama with fused projections.
//!
//! Architecture: Abdin et al. 2024, "Phi-3 Technical Report" (arXiv:2404.14219), as implemented
//! by Hugging Face transformers' `models/phi3/modeling_phi3.py` (`Phi3ForCausalLM`, eager
//! attention, eval mode: no dropout). The differences from [`super::llama`]:
//!
//! - `self_attn.qkv_proj` (no bias) computes queries, keys and values in one projection: its
//!   output is `[q | k | v]` in blocks, `heads * head_dim`, then `kv_heads * head_dim` twice
//!   (not interleaved per head as GPT-NeoX's); the hook points `q`, `k` (and `v`) still give
//!   them separately, and `o_proj` has no bias;
//! - `mlp.gate_up_proj` (no bias) computes gate and up in one projection: `[gate | up]`,
//!   `intermediate_size` each; the MLP is `down_proj(up · act(gate))`;
//! - the rotary embedding may turn only the first `int(head_dim * partial_rotary_factor)` dims of
//!   each head (Phi-4-mini; Phi-3 itself turns all); only the `"default"` rotary type is
//!   implemented, the 128k checkpoints' `longrope` is refused ([`Phi3Config::rotary`]);
//! - `sliding_window`, when set, limits every layer's attention to the last `sliding_window`
//!   positions ([`causal::sliding_window_mask`]; transformers' `create_sliding_window_causal_mask`).
//!
//! Norms, residual wiring and the rotary tables are Llama's:
//!
//! ```text
//! Phi3                                (root, path "")   Input CausalInput, Output logits
//! ├── model                           Phi3Model         Output last hidden state (after norm)
//! │   ├── embed_tokens                nn::Embedding [vocab, hidden]
//! │   ├── rotary_emb                  RotaryEmbedding   (no weights) position ids → (cos, sin)
//! │   ├── layers[i]                   Phi3DecoderLayer  (as LlamaDecoderLayer), Output [batch, seq, hidden]
//! │   │   ├── input_layernorm         RmsNorm
//! │   │   ├── self_attn               Phi3Attention: qkv_proj, o_proj (Linear);
//! │   │   │                           hook points q, k, v, scores, probs, z (HookPoint)
//! │   │   ├── post_attention_layernorm RmsNorm
//! │   │   └── mlp                     Phi3Mlp: gate_up_proj, down_proj (Linear), activation_fn;
//! │   │                               hook point act (up · act(gate))
//! │   └── norm                        RmsNorm
//! └── lm_head                         LmHead (own weight, or embed_tokens' if tie_word_embeddings)
//! ```
//!
//! Shapes: `batch` rows, `seq` new tokens, `past` cached tokens, `hidden` = `hidden_size`.


use tch::{nn, Tensor};
use super::causal::device_map::{to, Mover};

use super::causal::{self, CausalInput, LmHead};
use super::bert::HiddenAct;
use super::llama::{repeat_kv, LayerInput, RmsNorm, RotaryEmbedding, LAYER_INPUT};
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
pub use config::{Phi3Config, Rotary};

/// A Phi3 model with its language-model head (transformers' `Phi3ForCausalLM`).
///
/// Input [`CausalInput`], output logits `[batch, seq, vocab]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Phi3 {
    /// `model`: embeddings, decoder layers, final norm.
    pub model: Hooked<Phi3Model>,
    /// `lm_head`: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub lm_head: Hooked<LmHead>,
    /// The hyper-parameters.
    pub config: Phi3Config,
}

impl Phi3 {
    /// A model with zero weights as variables under `p` (use `vs.root()`: variable names are
    /// the checkpoint keys). `lm_head.weight` is a variable unless `tie_word_embeddings`.
    /// Errors: [`crate::Error::Config`] for a config failing [`Phi3Config::validate`],
    /// [`crate::Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &Phi3Config) -> Result<Phi3> {
        const WHAT: &str = "<Phi3Config given to Phi3::new>";
        config.validate().map_err(|m| causal::config_error(WHAT, m))?;
        params::building(WHAT, || {
            let pm = p / "model";
            let model = Phi3Model::new(&pm, config)?;
            let tied = config.tie_word_embeddings.then_some(&model.embed_tokens.ws);
            let lm_head = LmHead::new(&(p / "lm_head"), tied, config.vocab_size, config.hidden_size);
            Ok(Phi3 { model: Hooked::new(&pm, model), lm_head, config: config.clone() })
        })
    }
}

super::causal::causal_family!(Phi3, Phi3Config {
    layer: Phi3DecoderLayer,
    attn: Phi3Attention,
    mlp: Phi3Mlp,
    norm: RmsNorm,
    embedding: ws,
});

/// `model`: as [`super::llama::LlamaModel`] with [`Phi3DecoderLayer`]s and, when the config
/// has a `sliding_window`, a sliding-window mask for every layer (transformers' `Phi3Model`).
///
/// Input [`CausalInput`]; output the last hidden state `[batch, seq, hidden]` (after `norm`).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Phi3Model {
    /// `embed_tokens`: `[vocab, hidden]`; ids `[batch, seq]` → `[batch, seq, hidden]`.
    pub embed_tokens: Hooked<nn::Embedding>,
    /// `layers`: `model.layers.0` .. `model.layers.{num_hidden_layers - 1}`.
    pub layers: Vec<Hooked<Phi3DecoderLayer>>,
    /// `norm`: final RMSNorm.
    pub norm: Hooked<RmsNorm>,
    /// `rotary_emb`: cos/sin tables `[batch, seq, rotary_ndims]` for the position ids (no weights).
    pub rotary_emb: Hooked<RotaryEmbedding>,
    /// The config's `sliding_window`: every layer's mask keeps the last this many positions.
    pub sliding_window: Option<i64>,
}

impl Phi3Model {
    /// Zero weights under `p` (`model`).
    pub fn new(p: &nn::Path, c: &Phi3Config) -> Result<Self> {
        let rotary = c.rotary().map_err(|m| causal::config_error("<Phi3Config>", m))?;
        let pl = p / "layers";
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let q = &pl / i;
                Ok(Hooked::new(&q, Phi3DecoderLayer::new(&q, c, i as usize)?))
            })
            .collect::<Result<_>>()?;
        params::buffer(&(p / "rotary_emb"), "inv_freq", rotary.ndims / 2);
        Ok(Phi3Model {
            embed_tokens: causal::embedding(&(p / "embed_tokens"), c.vocab_size, c.hidden_size),
            layers,
            norm: RmsNorm::new(&(p / "norm"), c.hidden_size, c.rms_norm_eps),
            rotary_emb: Hooked::new(&(p / "rotary_emb"), RotaryEmbedding::new(&rotary.rope, rotary.ndims, p.device())),
            sliding_window: c.sliding_window,
        })
    }
}

impl HookModule for Phi3Model {
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
        let mask = match self.sliding_window {
            Some(window) => causal::sliding_window_mask(&attention_mask, seq, window),
            None => causal::causal_mask(&attention_mask, seq),
        };
        let hidden = self.embed_tokens.call(input_ids);
        let (cos, sin) = self.rotary_emb.call((hidden.shallow_clone(), position_ids));
        // Each layer's inputs on its device (a device map; no copies on one device).
        let mut mv = Mover::default();
        let hidden = self.layers.iter().fold(hidden, |h, layer| {
            let d = layer.input_layernorm.weight.device();
            layer.call((to(h, d), mv.to(&mask, d), (mv.to(&cos, d), mv.to(&sin, d)), cache.clone()))
        });
        self.norm.call(to(hidden, self.norm.weight.device()))
    }
}

/// `model.layers.{i}`: Llama's pre-norm layer, `x + self_attn(input_layernorm(x))`, then
/// `x + mlp(post_attention_layernorm(x))` (transformers' `Phi3DecoderLayer`; its residual
/// dropouts are identities in eval mode).
///
/// Input [`LayerInput`], output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Phi3DecoderLayer {
    /// `input_layernorm`: RMSNorm before attention.
    pub input_layernorm: Hooked<RmsNorm>,
    /// `self_attn`: grouped-query attention with a fused qkv projection.
    pub self_attn: Hooked<Phi3Attention>,
    /// `post_attention_layernorm`: RMSNorm before the MLP.
    pub post_attention_layernorm: Hooked<RmsNorm>,
    /// `mlp`: SwiGLU feed-forward with a fused gate/up projection.
    pub mlp: Hooked<Phi3Mlp>,
}

impl Phi3DecoderLayer {
    /// Zero weights under `p` (`model.layers.{layer_idx}`).
    pub fn new(p: &nn::Path, c: &Phi3Config, layer_idx: usize) -> Result<Self> {
        let (pa, pm) = (p / "self_attn", p / "mlp");
        Ok(Phi3DecoderLayer {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), c.hidden_size, c.rms_norm_eps),
            self_attn: Hooked::new(&pa, Phi3Attention::new(&pa, c, layer_idx)),
            post_attention_layernorm: RmsNorm::new(&(p / "post_attention_layernorm"), c.hidden_size, c.rms_norm_eps),
            mlp: Hooked::new(&pm, Phi3Mlp::new(&pm, c)?),
        })
    }
}

impl HookModule for Phi3DecoderLayer {
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

/// `model.layers.{i}.self_attn`: grouped-query attention with a fused, bias-free `qkv_proj`
/// (transformers' `Phi3Attention`, eager).
///
/// Input [`LayerInput`] (hidden already normalised). `qkv_proj` gives
/// `[batch, seq, (heads + 2 * kv_heads) * head_dim]`, split along the last dim into q
/// (`heads * head_dim`), k and v (`kv_heads * head_dim` each) in that order; then as Llama:
/// heads first, rotary on the first `rotary_ndims` dims of q and k (the rest pass through), cache
/// slot `layer_idx`, `repeat_kv`, `o_proj(softmax(q kᵀ · head_dim^-0.5 + mask) v)`.
///
/// Hook points as [`super::llama::LlamaAttention`]'s — `q` `[batch, heads, seq, head_dim]`
/// after rotary, `k` `[batch, heads, past + seq, head_dim]` after rotary, the cache and
/// `repeat_kv`, `scores`, `probs` `[batch, heads, seq, past + seq]`, `z`
/// `[batch, seq, heads, head_dim]` — plus `v`, the values as `probs` weighs them: cached + new,
/// each key/value head repeated for its query heads, `[batch, heads, past + seq, head_dim]`
/// (editing it changes this step's `z`, not what the cache keeps).
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Phi3Attention {
    /// `qkv_proj`: `[batch, seq, hidden]` → `[batch, seq, (heads + 2 * kv_heads) * head_dim]`,
    /// `[q | k | v]`.
    pub qkv_proj: Hooked<Linear>,
    /// `o_proj`: `[batch, seq, heads * head_dim]` → `[batch, seq, hidden]`.
    pub o_proj: Hooked<Linear>,
    /// `q`: queries after rotary, `[batch, heads, seq, head_dim]`.
    pub q: Hooked<HookPoint>,
    /// `k`: keys after rotary, cached + new, each key/value head repeated for its query heads,
    /// `[batch, heads, past + seq, head_dim]`.
    pub k: Hooked<HookPoint>,
    /// `v`: values, cached + new, each key/value head repeated for its query heads,
    /// `[batch, heads, past + seq, head_dim]`.
    pub v: Hooked<HookPoint>,
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

impl Phi3Attention {
    /// Zero weights under `p` (`model.layers.{layer_idx}.self_attn`).
    pub fn new(p: &nn::Path, c: &Phi3Config, layer_idx: usize) -> Self {
        let (h, hd, heads, kv) = (c.hidden_size, c.head_dim(), c.num_attention_heads, c.kv_heads());
        Phi3Attention {
            qkv_proj: Linear::new(&(p / "qkv_proj"), h, (heads + 2 * kv) * hd, false),
            o_proj: Linear::new(&(p / "o_proj"), heads * hd, h, false),
            q: HookPoint::new(p, "q"),
            k: HookPoint::new(p, "k"),
            v: HookPoint::new(p, "v"),
            scores: HookPoint::new(p, "scores"),
            probs: HookPoint::new(p, "probs"),
            z: HookPoint::new(p, "z"),
            layer_idx,
            num_heads: heads,
            num_key_value_heads: kv,
            head_dim: hd,
        }
    }
}

impl HookModule for Phi3Attention {
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
        // The difference from Llama: one projection, [q | k | v] in blocks.
        let qkv = self.qkv_proj.call(hidden);
        let (q_width, kv_width) = (self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let parts = qkv.split_with_sizes([q_width, kv_width, kv_width], -1);
        let heads = |t: &Tensor| t.view([b, s, -1, self.head_dim]).transpose(1, 2);
        let (q, k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
        let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
        let (q, k) = (apply_rotary(&q, &cos, &sin), apply_rotary(&k, &cos, &sin));
        let (k, v) = cache.update(self.layer_idx, k, v);
        let groups = self.num_heads / self.num_key_value_heads;
        let (k, v) = (repeat_kv(&k, groups), self.v.call(repeat_kv(&v, groups)));
        let points = AttentionPoints { q: &self.q, k: &self.k, scores: &self.scores, probs: &self.probs, z: &self.z };
        let context = points.attend(q, k, &v, &mask, (self.head_dim as f64).powf(-0.5), true);
        self.o_proj.call(context)
    }
}

/// `model.layers.{i}.mlp`: `down_proj(up · activation_fn(gate))` with `[gate | up] =
/// gate_up_proj(x)` (transformers' `Phi3MLP`: `gate, up = gate_up_proj(x).chunk(2, -1)`), no
/// biases.
///
/// Input `[batch, seq, hidden]`, output `[batch, seq, hidden]`.
#[derive(Debug, ModuleTree)]
#[module(crate = "crate")]
pub struct Phi3Mlp {
    /// `gate_up_proj`: `[batch, seq, hidden]` → `[batch, seq, 2 * intermediate]`, `[gate | up]`.
    pub gate_up_proj: Hooked<Linear>,
    /// `down_proj`: `[batch, seq, intermediate]` → `[batch, seq, hidden]`.
    pub down_proj: Hooked<Linear>,
    /// `activation_fn`: the config's `hidden_act` (SiLU) on the gate half, no weights;
    /// `[batch, seq, intermediate]`.
    pub activation_fn: Hooked<HiddenAct>,
    /// `act`: the MLP's activation, `up · activation_fn(gate)`, the input of `down_proj`,
    /// `[batch, seq, intermediate]` (as Llama's `mlp.act`); editing it changes the MLP's output.
    pub act: Hooked<HookPoint>,
}

impl Phi3Mlp {
    /// Zero weights under `p` (`model.layers.{i}.mlp`).
    pub fn new(p: &nn::Path, c: &Phi3Config) -> Result<Self> {
        let act = HiddenAct::parse(&c.hidden_act).map_err(|m| causal::config_error("<Phi3Config>", m))?;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Phi3Mlp {
            gate_up_proj: Linear::new(&(p / "gate_up_proj"), h, 2 * i, false),
            down_proj: Linear::new(&(p / "down_proj"), i, h, false),
            activation_fn: Hooked::new(&(p / "activation_fn"), act),
            act: HookPoint::new(p, "act"),
        })
    }
}

impl HookModule for Phi3Mlp {
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
        let halves = self.gate_up_proj.call(x).chunk(2, -1);
        let gate = self.activation_fn.call(halves[0].shallow_clone());
        self.down_proj.call(self.act.call(&halves[1] * gate))
    }
}
