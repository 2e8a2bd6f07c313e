//! BERT encoder in tch, every submodule hookable.
//!
//! Architecture: Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for
//! Language Understanding" (arXiv:1810.04805), as implemented by Hugging Face transformers'
//! `models/bert/modeling_bert.py` (`BertModel` without its pooler, eager attention, eval mode:
//! no dropout). Module names and nesting follow that file, so every module path is the prefix
//! of its Hugging Face checkpoint keys:
//!
//! ```text
//! Bert                                   (root, path "")
//! ├── embeddings                         BertEmbeddings
//! │   ├── word_embeddings                nn::Embedding  [vocab, hidden]
//! │   ├── position_embeddings            nn::Embedding  [max_positions, hidden]
//! │   ├── token_type_embeddings          nn::Embedding  [type_vocab, hidden]
//! │   └── LayerNorm                      nn::LayerNorm
//! └── encoder                            BertEncoder
//!     └── layer[i]                       BertLayer      (encoder.layer.0 .. encoder.layer.N-1)
//!         ├── attention                  BertAttention
//!         │   ├── self_    "self"        BertSelfAttention: query, key, value (Linear);
//!         │   │                          hook points q, k, scores, probs, z (HookPoint)
//!         │   └── output_  "output"      BertSelfOutput:    dense, LayerNorm
//!         ├── intermediate               BertIntermediate:  dense, intermediate_act_fn;
//!         │                              hook point act
//!         └── output_      "output"      BertOutput:        dense, LayerNorm
//! ```
//!
//! Children named `output` or `self` in the checkpoint are fields with a trailing underscore
//! (`output_`, `self_`) because `.output` is the hook point (see [`crate::hook`]); their module
//! paths keep the checkpoint names (`encoder.layer.0.output`, `...attention.self`). So in a
//! trace, `model.encoder.layer[0].output_.dense.output` is the output of the layer's second
//! feed-forward projection, and `model.encoder.layer[0].output` the layer's own output.
//!
//! Shapes below: `batch` rows, `seq` tokens, `hidden` = `config.hidden_size`.
//! Every module's forward matches `modeling_bert.py`'s to float rounding (the reference values
//! in `tests/fixtures/minilm.json` agree within 1e-5 relative).

#![allow(non_snake_case)] // `LayerNorm` fields: the checkpoint key is `embeddings.LayerNorm.weight`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::activation::Layout;
use crate::hook::{HookModule, Hooked};
use crate::models::ROWS;
use crate::models::linear::Linear;
use crate::models::point::{AttentionPoints, HookPoint};
use nnsight_macros::ModuleTree;
use crate::language_model::{TextBatch, TextModel};

/// BERT hyper-parameters, read from a Hugging Face `config.json` with its own field names.
///
/// Missing fields take the defaults of transformers' `BertConfig` (bert-base-uncased); fields
/// this implementation does not use (dropout probabilities, `initializer_range`, ...) are
/// ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    /// Size of the token vocabulary (rows of `embeddings.word_embeddings.weight`).
    pub vocab_size: i64,
    /// Width of the hidden states (`hidden`).
    pub hidden_size: i64,
    /// Number of encoder layers (`encoder.layer.0 ..`).
    pub num_hidden_layers: i64,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: i64,
    /// Width of the feed-forward layer (`intermediate.dense` output).
    pub intermediate_size: i64,
    /// Activation of the feed-forward layer: `"gelu"` (exact, erf), `"gelu_new"` /
    /// `"gelu_pytorch_tanh"` (tanh approximation), `"relu"`, `"silu"` / `"swish"`.
    pub hidden_act: String,
    /// Rows of the position embedding table: the longest input the model accepts.
    pub max_position_embeddings: i64,
    /// Rows of the token type (segment) embedding table.
    pub type_vocab_size: i64,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Id of the padding token (its word embedding gets no gradient, as in PyTorch's
    /// `padding_idx`).
    pub pad_token_id: Option<i64>,
    /// Only `"absolute"` (learned absolute positions) is supported.
    pub position_embedding_type: String,
    /// Hugging Face model type; must be `"bert"` when present.
    pub model_type: Option<String>,
    /// Hugging Face class names the checkpoint was saved from, e.g. `["BertModel"]`.
    pub architectures: Option<Vec<String>>,
    /// Decoder BERT (causal self-attention) is not supported; must be false.
    pub is_decoder: bool,
    /// Cross-attention is not supported; must be false.
    pub add_cross_attention: bool,
}

impl Default for BertConfig {
    /// transformers' `BertConfig()` defaults (bert-base-uncased).
    fn default() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            position_embedding_type: "absolute".into(),
            model_type: Some("bert".into()),
            architectures: None,
            is_decoder: false,
            add_cross_attention: false,
        }
    }
}

impl BertConfig {
    /// Reads and checks a `config.json`.
    ///
    /// Errors: [`Error::Io`] when the file cannot be read; [`Error::Config`] (naming the file)
    /// when it is not JSON, describes another architecture (`model_type` other than `"bert"`, or
    /// no `model_type` and no `Bert*` class in `architectures`), has a field of the wrong type,
    /// or fails [`BertConfig::validate`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = super::validate::read_config(path, "BERT", &["bert"], "Bert")?;
        let config: BertConfig = super::validate::parse_config(path, json)?;
        config.validate().map_err(|m| super::validate::config_error(&path.display().to_string(), m))?;
        Ok(config)
    }

    /// Checks that the numbers describe a model this implementation can build: positive sizes,
    /// `hidden_size` divisible by `num_attention_heads`, a supported `hidden_act`, absolute
    /// positions, no decoder or cross-attention. The message names the offending field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use super::validate as v;
        v::positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ])?;
        v::non_negative("num_hidden_layers", self.num_hidden_layers)?;
        v::multiple_of(("hidden_size", self.hidden_size), ("num_attention_heads", self.num_attention_heads))?;
        v::positive_finite("layer_norm_eps", self.layer_norm_eps)?;
        HiddenAct::parse(&self.hidden_act)?;
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "`position_embedding_type` \"{}\" is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        if self.is_decoder || self.add_cross_attention {
            return Err("`is_decoder` / `add_cross_attention`: decoder BERT is not supported".into());
        }
        v::token_ids_in_vocab("pad_token_id", self.pad_token_id.as_slice(), self.vocab_size)
    }

    /// Width of one attention head: `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

pub use super::act::HiddenAct;

/// A BERT encoder (`BertModel` without the pooler).
///
/// Input: `(input_ids [batch, seq] i64, attention_mask [batch, seq] i64 (1 = token, 0 = padding),
/// token_type_ids [batch, seq] i64)`. Output: `last_hidden_state [batch, seq, hidden]` f32.
/// Padding must be on the right: position ids are `0..seq` for every row, as in transformers.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct Bert {
    /// `embeddings`: token + position + token type embeddings, then LayerNorm.
    pub embeddings: Hooked<BertEmbeddings>,
    /// `encoder`: the stack of layers.
    pub encoder: Hooked<BertEncoder>,
    /// The hyper-parameters the model was built from.
    pub config: BertConfig,
}

impl Bert {
    /// Builds a BERT with fresh (random) weights as variables under `p` (use `vs.root()` so the
    /// variable names are the checkpoint keys, e.g. `embeddings.word_embeddings.weight`).
    /// Fails with [`Error::Config`] when `config` does not pass [`BertConfig::validate`], and
    /// with [`Error::Load`] when allocating the weights fails.
    pub fn new(p: &nn::Path, config: &BertConfig) -> Result<Bert> {
        const WHAT: &str = "<BertConfig given to Bert::new>";
        config.validate().map_err(|message| Error::Config { path: WHAT.into(), message })?;
        super::params::building(WHAT, || {
            let pe = p / "embeddings";
            let pn = p / "encoder";
            Ok(Bert {
                embeddings: Hooked::new(&pe, BertEmbeddings::new(&pe, config)),
                encoder: Hooked::new(&pn, BertEncoder::new(&pn, config)?),
                config: config.clone(),
            })
        })
    }

    /// Loads a Hugging Face BERT checkpoint folder: `config.json` and `model.safetensors` (or
    /// shards listed by `model.safetensors.index.json`; keys with or without a `bert.` prefix;
    /// extra keys such as the pooler's are ignored). Weights are loaded as f32 on `device`,
    /// after every shape and dtype was checked against the safetensors headers (see
    /// [`super::checkpoint`]).
    ///
    /// Errors, each naming the file (and key): [`Error::Io`] for a missing folder or file (or
    /// one that is not a regular file inside the folder), [`Error::Config`] for a config that is
    /// not BERT's or is invalid, [`Error::MissingWeight`] for a key the checkpoint lacks,
    /// [`Error::WeightShape`] for a tensor whose shape is not the one the config implies,
    /// [`Error::WeightDtype`] for a tensor that is not floating-point.
    pub fn load(dir: &Path, device: Device) -> Result<Bert> {
        super::check_model_dir(dir)?;
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        super::checkpoint::load_model(dir, device, Some(Kind::Float), &["bert."], |p| Bert::new(p, &config))
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.embeddings.word_embeddings.ws.device()
    }
}

impl HookModule for Bert {
    /// `(input_ids [batch, seq] i64, attention_mask [batch, seq] i64, token_type_ids [batch, seq] i64)`.
    type Input = (Tensor, Tensor, Tensor);
    /// `last_hidden_state [batch, seq, hidden]`.
    type Output = Tensor;
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn input_layout(&self) -> Layout {
        ROWS
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, (input_ids, attention_mask, token_type_ids): Self::Input) -> Tensor {
        let h = self.embeddings.call((input_ids, token_type_ids));
        let mask = extended_attention_mask(&attention_mask, h.kind());
        self.encoder.call((h, mask))
    }
}

/// `LanguageModel::<Bert>`: token ids, attention mask and token type ids straight from the
/// tokenizer; inputs longer than `max_position_embeddings` are refused before the model runs.
impl TextModel for Bert {
    fn load(dir: &Path, device: Device) -> Result<Self> {
        Bert::load(dir, device)
    }

    fn text_input(&self, batch: &TextBatch) -> Self::Input {
        (batch.input_ids.shallow_clone(), batch.attention_mask.shallow_clone(), batch.token_type_ids.shallow_clone())
    }

    fn max_positions(&self) -> Option<i64> {
        Some(self.config.max_position_embeddings)
    }

    fn input_vocab_size(&self) -> Option<i64> {
        Some(self.config.vocab_size)
    }

    fn type_vocab_size(&self) -> Option<i64> {
        Some(self.config.type_vocab_size)
    }
}

/// The additive attention mask transformers builds from a padding mask:
/// `(1 - mask) * finfo(kind).min`, shaped `[batch, 1, 1, seq]` to broadcast over heads and
/// query positions. `attention_mask`: `[batch, seq]`, 1 for tokens to attend to, 0 for padding.
/// Returns 0 where attention is allowed and the dtype's most negative finite value for masked
/// keys (so masked keys get probability 0 after softmax; a padded *query* row is still computed).
pub fn extended_attention_mask(attention_mask: &Tensor, kind: Kind) -> Tensor {
    let min = match kind {
        Kind::Double => f64::MIN,
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535e38,
        _ => f32::MIN as f64,
    };
    let m = attention_mask.to_kind(kind);
    ((m.neg() + 1.0) * min).unsqueeze(1).unsqueeze(2)
}

/// Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the mean of
/// `hidden` over the positions where `attention_mask` is 1, then L2-normalised.
///
/// `hidden`: `[batch, seq, hidden]` (a `last_hidden_state`); `attention_mask`: `[batch, seq]`
/// (1 = token, 0 = padding, any numeric dtype). Returns `[batch, hidden]`, each row of unit
/// length (sentence-transformers' `Pooling(mean)` + `Normalize`: token counts clamped at 1e-9,
/// norms at 1e-12). The cosine similarity of two sentences is then the dot product of their rows.
pub fn mean_pool_normalize(hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
    let kind = hidden.kind();
    let m = attention_mask.to_kind(kind).unsqueeze(-1);
    let summed = (hidden * &m).sum_dim_intlist([1i64].as_slice(), false, kind);
    let counts = m.sum_dim_intlist([1i64].as_slice(), false, kind).clamp_min(1e-9);
    let mean = summed / counts;
    let norm = mean.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
    mean / norm
}

/// `embeddings`: word + token type + position embeddings, then LayerNorm
/// (transformers' `BertEmbeddings`).
///
/// Input: `(input_ids [batch, seq] i64, token_type_ids [batch, seq] i64)`.
/// Output: `[batch, seq, hidden]`. Position ids are `0..seq` (absolute positions, the same for
/// every row; with right padding a real token's position does not depend on the padding), fed
/// to `position_embeddings` as a `[1, seq]` tensor.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct BertEmbeddings {
    /// `word_embeddings`: `[vocab_size, hidden]`; input `[batch, seq]` ids, output `[batch, seq, hidden]`.
    pub word_embeddings: Hooked<nn::Embedding>,
    /// `position_embeddings`: `[max_position_embeddings, hidden]`; input `[1, seq]`, output
    /// `[1, seq, hidden]`, both shared by every row of the batch (declared [`Layout::Shared`]).
    pub position_embeddings: Hooked<nn::Embedding>,
    /// `token_type_embeddings`: `[type_vocab_size, hidden]`; input `[batch, seq]`, output `[batch, seq, hidden]`.
    pub token_type_embeddings: Hooked<nn::Embedding>,
    /// `LayerNorm` over `hidden` (eps `layer_norm_eps`); `[batch, seq, hidden]` in and out.
    pub LayerNorm: Hooked<nn::LayerNorm>,
}

impl BertEmbeddings {
    /// Zero embeddings under `p` (`embeddings`), to be filled from a checkpoint.
    pub fn new(p: &nn::Path, c: &BertConfig) -> Self {
        let emb = |name: &str, rows: i64, padding_idx: i64, layout: Layout| {
            let q = p / name;
            // Zeros, not tch's default N(0, 1): the checkpoint overwrites every value, and
            // drawing ~12M random numbers made loading MiniLM noticeably slower.
            let cfg = nn::EmbeddingConfig { padding_idx, ws_init: nn::Init::Const(0.0), ..Default::default() };
            Hooked::new(&q, super::params::embedding(&q, rows, c.hidden_size, cfg)).with_layouts(layout, layout)
        };
        BertEmbeddings {
            word_embeddings: emb("word_embeddings", c.vocab_size, c.pad_token_id.unwrap_or(-1), ROWS),
            // Positions `0..seq` as `[1, seq]`: one table row per position, shared by every row.
            position_embeddings: emb("position_embeddings", c.max_position_embeddings, -1, Layout::Shared),
            token_type_embeddings: emb("token_type_embeddings", c.type_vocab_size, -1, ROWS),
            LayerNorm: layer_norm(&(p / "LayerNorm"), c),
        }
    }
}

impl HookModule for BertEmbeddings {
    /// `(input_ids [batch, seq] i64, token_type_ids [batch, seq] i64)`.
    type Input = (Tensor, Tensor);
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
    fn forward(&self, (input_ids, token_type_ids): Self::Input) -> Tensor {
        let seq = *input_ids.size().last().unwrap_or(&0);
        let position_ids = Tensor::arange(seq, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let inputs_embeds = self.word_embeddings.call(input_ids);
        let token_type = self.token_type_embeddings.call(token_type_ids);
        let embeddings = inputs_embeds + token_type;
        let embeddings = embeddings + self.position_embeddings.call(position_ids);
        self.LayerNorm.call(embeddings)
    }
}

/// `encoder`: the layers applied in order (transformers' `BertEncoder`).
///
/// Input: `(hidden_states [batch, seq, hidden], extended_attention_mask [batch, 1, 1, seq])` (the
/// additive mask of [`extended_attention_mask`]). Output: the last layer's hidden states
/// `[batch, seq, hidden]`.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct BertEncoder {
    /// `layer`: `encoder.layer.0` .. `encoder.layer.{num_hidden_layers - 1}`.
    pub layer: Vec<Hooked<BertLayer>>,
}

impl BertEncoder {
    /// Fresh layers under `p` (`encoder`).
    pub fn new(p: &nn::Path, c: &BertConfig) -> Result<Self> {
        let pl = p / "layer";
        let layer = (0..c.num_hidden_layers)
            .map(|i| {
                let q = &pl / i;
                Ok(Hooked::new(&q, BertLayer::new(&q, c)?))
            })
            .collect::<Result<_>>()?;
        Ok(BertEncoder { layer })
    }
}

impl HookModule for BertEncoder {
    /// `(hidden_states [batch, seq, hidden], extended_attention_mask [batch, 1, 1, seq])`.
    type Input = (Tensor, Tensor);
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
    fn forward(&self, (hidden, mask): Self::Input) -> Tensor {
        self.layer.iter().fold(hidden, |h, layer| layer.call((h, mask.shallow_clone())))
    }
}

/// `encoder.layer.{i}`: self-attention block, then feed-forward block (transformers'
/// `BertLayer`). Its output is the hidden-state tensor itself (no tuple).
///
/// Input: `(hidden_states [batch, seq, hidden], extended_attention_mask [batch, 1, 1, seq])`.
/// Output: `[batch, seq, hidden]` = `output_((intermediate(a), a))` with `a = attention(input)`.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct BertLayer {
    /// `attention`: self-attention with its output projection and residual LayerNorm.
    pub attention: Hooked<BertAttention>,
    /// `intermediate`: first feed-forward projection and activation.
    pub intermediate: Hooked<BertIntermediate>,
    /// `output` (module path `encoder.layer.{i}.output`): second feed-forward projection,
    /// residual and LayerNorm. Named `output_` because `.output` is the hook point.
    pub output_: Hooked<BertOutput>,
}

impl BertLayer {
    /// A fresh layer under `p` (`encoder.layer.{i}`).
    pub fn new(p: &nn::Path, c: &BertConfig) -> Result<Self> {
        let (pa, pi, po) = (p / "attention", p / "intermediate", p / "output");
        Ok(BertLayer {
            attention: Hooked::new(&pa, BertAttention::new(&pa, c)),
            intermediate: Hooked::new(&pi, BertIntermediate::new(&pi, c)?),
            output_: Hooked::new(&po, BertOutput::new(&po, c)),
        })
    }
}

impl HookModule for BertLayer {
    /// `(hidden_states [batch, seq, hidden], extended_attention_mask [batch, 1, 1, seq])`.
    type Input = (Tensor, Tensor);
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
    fn forward(&self, (hidden, mask): Self::Input) -> Tensor {
        let attention_output = self.attention.call((hidden, mask));
        let intermediate_output = self.intermediate.call(attention_output.shallow_clone());
        self.output_.call((intermediate_output, attention_output))
    }
}

/// `encoder.layer.{i}.attention`: self-attention then its output block (transformers'
/// `BertAttention`).
///
/// Input: `(hidden_states [batch, seq, hidden], extended_attention_mask [batch, 1, 1, seq])`.
/// Output: `[batch, seq, hidden]` = `output_((self_(input), hidden_states))`.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct BertAttention {
    /// `self` (module path `...attention.self`): multi-head scaled dot-product attention.
    /// Named `self_` because `self` is a Rust keyword.
    pub self_: Hooked<BertSelfAttention>,
    /// `output` (module path `...attention.output`): projection, residual, LayerNorm.
    /// Named `output_` because `.output` is the hook point.
    pub output_: Hooked<BertSelfOutput>,
}

impl BertAttention {
    /// A fresh attention block under `p` (`encoder.layer.{i}.attention`).
    pub fn new(p: &nn::Path, c: &BertConfig) -> Self {
        let (ps, po) = (p / "self", p / "output");
        BertAttention {
            self_: Hooked::new(&ps, BertSelfAttention::new(&ps, c)),
            output_: Hooked::new(&po, BertSelfOutput::new(&po, c)),
        }
    }
}

impl HookModule for BertAttention {
    /// `(hidden_states [batch, seq, hidden], extended_attention_mask [batch, 1, 1, seq])`.
    type Input = (Tensor, Tensor);
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
    fn forward(&self, (hidden, mask): Self::Input) -> Tensor {
        let self_output = self.self_.call((hidden.shallow_clone(), mask));
        self.output_.call((self_output, hidden))
    }
}

/// `encoder.layer.{i}.attention.self`: multi-head scaled dot-product self-attention, eager
/// (transformers' `BertSelfAttention` with `eager_attention_forward`).
///
/// Input: `(hidden_states [batch, seq, hidden], extended_attention_mask [batch, 1, 1, seq])`.
/// Output: the context `[batch, seq, hidden]`: per head
/// `softmax(Q Kᵀ · head_dim^-0.5 + mask) V` (softmax in f32), heads merged back
/// (`[batch, heads, seq, head_dim]` → `[batch, seq, heads * head_dim]`).
///
/// Hook points (identity [`HookPoint`]s, see [`crate::models::point`]; each later stage uses
/// the hooked value): `q`, `k` `[batch, heads, seq, head_dim]` after the head split, `scores`
/// (`Q Kᵀ · head_dim^-0.5 + mask`) and `probs` `[batch, heads, seq, seq]`, `z`
/// `[batch, seq, heads, head_dim]`.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct BertSelfAttention {
    /// `query`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub query: Hooked<Linear>,
    /// `key`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub key: Hooked<Linear>,
    /// `value`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub value: Hooked<Linear>,
    /// `q`: queries after the head split, `[batch, heads, seq, head_dim]`.
    pub q: Hooked<HookPoint>,
    /// `k`: keys after the head split, `[batch, heads, seq, head_dim]`.
    pub k: Hooked<HookPoint>,
    /// `scores`: `Q Kᵀ · head_dim^-0.5 + mask`, before the softmax, `[batch, heads, seq, seq]`
    /// (padding keys get the mask's large negative value).
    pub scores: Hooked<HookPoint>,
    /// `probs`: the softmax of `scores`, `[batch, heads, seq, seq]`.
    pub probs: Hooked<HookPoint>,
    /// `z`: `probs V`, each head's output before the heads are merged, `[batch, seq, heads, head_dim]`.
    pub z: Hooked<HookPoint>,
    /// Number of heads.
    pub num_attention_heads: i64,
    /// Width of one head (`hidden / heads`).
    pub attention_head_size: i64,
}

impl BertSelfAttention {
    /// Fresh projections under `p` (`encoder.layer.{i}.attention.self`).
    pub fn new(p: &nn::Path, c: &BertConfig) -> Self {
        BertSelfAttention {
            query: linear(p, "query", c.hidden_size, c.hidden_size),
            key: linear(p, "key", c.hidden_size, c.hidden_size),
            value: linear(p, "value", c.hidden_size, c.hidden_size),
            q: HookPoint::new(p, "q"),
            k: HookPoint::new(p, "k"),
            scores: HookPoint::new(p, "scores"),
            probs: HookPoint::new(p, "probs"),
            z: HookPoint::new(p, "z"),
            num_attention_heads: c.num_attention_heads,
            attention_head_size: c.head_dim(),
        }
    }
}

impl HookModule for BertSelfAttention {
    /// `(hidden_states [batch, seq, hidden], extended_attention_mask [batch, 1, 1, seq])`.
    type Input = (Tensor, Tensor);
    /// Context `[batch, seq, hidden]`, heads merged.
    type Output = Tensor;
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn input_layout(&self) -> Layout {
        ROWS
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    fn forward(&self, (hidden, mask): Self::Input) -> Tensor {
        let size = hidden.size();
        let (b, s) = (size[0], size[1]);
        let heads = |t: Tensor| t.view([b, s, -1, self.attention_head_size]).transpose(1, 2);
        let q = heads(self.query.call(hidden.shallow_clone()));
        let k = heads(self.key.call(hidden.shallow_clone()));
        let v = heads(self.value.call(hidden));
        let scaling = (self.attention_head_size as f64).powf(-0.5);
        let points = AttentionPoints { q: &self.q, k: &self.k, scores: &self.scores, probs: &self.probs, z: &self.z };
        points.attend(q, k, &v, &mask, scaling, false)
    }
}

/// `encoder.layer.{i}.attention.output`: projection, residual, LayerNorm (transformers'
/// `BertSelfOutput`).
///
/// Input: `(hidden_states [batch, seq, hidden] (the attention context), input_tensor
/// [batch, seq, hidden] (the attention block's input, the residual))`.
/// Output: `LayerNorm(dense(hidden_states) + input_tensor)`, `[batch, seq, hidden]`.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct BertSelfOutput {
    /// `dense`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub dense: Hooked<Linear>,
    /// `LayerNorm` over `hidden`.
    pub LayerNorm: Hooked<nn::LayerNorm>,
}

impl BertSelfOutput {
    /// Fresh weights under `p` (`encoder.layer.{i}.attention.output`).
    pub fn new(p: &nn::Path, c: &BertConfig) -> Self {
        BertSelfOutput {
            dense: linear(p, "dense", c.hidden_size, c.hidden_size),
            LayerNorm: layer_norm(&(p / "LayerNorm"), c),
        }
    }
}

impl HookModule for BertSelfOutput {
    /// `(hidden_states [batch, seq, hidden], input_tensor [batch, seq, hidden])`.
    type Input = (Tensor, Tensor);
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
    fn forward(&self, (hidden, input_tensor): Self::Input) -> Tensor {
        let h = self.dense.call(hidden);
        self.LayerNorm.call(h + input_tensor)
    }
}

/// `encoder.layer.{i}.intermediate`: first feed-forward projection and activation
/// (transformers' `BertIntermediate`).
///
/// Input: `[batch, seq, hidden]`. Output: `intermediate_act_fn(dense(x))`,
/// `[batch, seq, intermediate_size]`.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct BertIntermediate {
    /// `dense`: `[batch, seq, hidden]` → `[batch, seq, intermediate_size]`.
    pub dense: Hooked<Linear>,
    /// `intermediate_act_fn`: the config's `hidden_act` (exact GELU for MiniLM/BERT), no weights.
    pub intermediate_act_fn: Hooked<HiddenAct>,
    /// `act`: the MLP's activation `intermediate_act_fn(dense(x))`, `[batch, seq,
    /// intermediate_size]` (TransformerLens' `hook_post`; the same point as `mlp.act` of GPT-2
    /// and Llama). Editing it changes the block's output.
    pub act: Hooked<HookPoint>,
}

impl BertIntermediate {
    /// Fresh weights under `p` (`encoder.layer.{i}.intermediate`); [`Error::Config`] for an
    /// unsupported `hidden_act`.
    pub fn new(p: &nn::Path, c: &BertConfig) -> Result<Self> {
        let act = HiddenAct::parse(&c.hidden_act)
            .map_err(|message| Error::Config { path: "<BertConfig>".into(), message })?;
        Ok(BertIntermediate {
            dense: linear(p, "dense", c.hidden_size, c.intermediate_size),
            intermediate_act_fn: Hooked::new(&(p / "intermediate_act_fn"), act),
            act: HookPoint::new(p, "act"),
        })
    }
}

impl HookModule for BertIntermediate {
    /// `[batch, seq, hidden]`.
    type Input = Tensor;
    /// `[batch, seq, intermediate_size]`.
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
        self.act.call(self.intermediate_act_fn.call(self.dense.call(x)))
    }
}

/// `encoder.layer.{i}.output`: second feed-forward projection, residual, LayerNorm
/// (transformers' `BertOutput`).
///
/// Input: `(hidden_states [batch, seq, intermediate_size] (the intermediate activations),
/// input_tensor [batch, seq, hidden] (the attention block's output, the residual))`.
/// Output: `LayerNorm(dense(hidden_states) + input_tensor)`, `[batch, seq, hidden]`.
#[derive(Debug)]
#[derive(ModuleTree)]
#[module(crate = "crate")]
pub struct BertOutput {
    /// `dense`: `[batch, seq, intermediate_size]` → `[batch, seq, hidden]`.
    pub dense: Hooked<Linear>,
    /// `LayerNorm` over `hidden`.
    pub LayerNorm: Hooked<nn::LayerNorm>,
}

impl BertOutput {
    /// Fresh weights under `p` (`encoder.layer.{i}.output`).
    pub fn new(p: &nn::Path, c: &BertConfig) -> Self {
        BertOutput {
            dense: linear(p, "dense", c.intermediate_size, c.hidden_size),
            LayerNorm: layer_norm(&(p / "LayerNorm"), c),
        }
    }
}

impl HookModule for BertOutput {
    /// `(hidden_states [batch, seq, intermediate_size], input_tensor [batch, seq, hidden])`.
    type Input = (Tensor, Tensor);
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
    fn forward(&self, (hidden, input_tensor): Self::Input) -> Tensor {
        let h = self.dense.call(hidden);
        self.LayerNorm.call(h + input_tensor)
    }
}

/// [`Linear`] named `name` under `p` (zero variables `weight [out, in]`, `bias [out]`).
fn linear(p: &nn::Path, name: &str, in_dim: i64, out_dim: i64) -> Hooked<Linear> {
    Linear::new(&(p / name), in_dim, out_dim, true)
}

/// `nn::LayerNorm` over `hidden_size` at `p` (variables `weight`, `bias`, as in the checkpoint).
fn layer_norm(p: &nn::Path, c: &BertConfig) -> Hooked<nn::LayerNorm> {
    let cfg = nn::LayerNormConfig { eps: c.layer_norm_eps, ..Default::default() };
    Hooked::new(p, super::params::layer_norm(p, c.hidden_size, cfg)).with_layouts(ROWS, ROWS)
}
