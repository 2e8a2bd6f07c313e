//! What the decoder-only causal language models ([`super::gpt2`], [`super::llama`]) share:
//! their root input, loading from Hugging Face checkpoint folders, the KV cache, the causal +
//! padding attention mask, position ids from the attention mask, the language-model head and
//! the generation loop ([`CausalLmExt`]).
//!
//! ```ignore
//! use nnsight::models::causal::{CausalLm, CausalLmExt, KvCacheHandle, Sampling};
//! use nnsight::models::gpt2::Gpt2;
//!
//! let model = Gpt2::from_pretrained("gpt2-folder")?;              // Hooked<Gpt2>, path ""
//! let cache = KvCacheHandle::disabled();
//! let logits = model.forward(&ids, &mask, &cache)?;                // [batch, seq, vocab]
//! let out = model.generate(&ids, &mask, 10, &Sampling::Greedy, None)?; // [batch, seq + 10]
//! ```
//!
//! Batches are padded on the LEFT (as transformers and nnsight do for these models): every
//! row's last token is at the last position, so one new token per row can be appended per
//! generation step. Position ids come from the attention mask (`cumsum(mask) - 1`, as
//! transformers' `generate` computes them), so a padded row computes what it computes alone.

mod cache;
mod decoder;
pub mod device_map;
mod family;
mod generate;
pub mod rotary;

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::params;
use crate::activation::Layout;
use crate::error::Result;
use crate::hook::{HookModule, Hooked};
use crate::models::ROWS;
use crate::language_model::{TextBatch, TextModel};
use crate::tree::ModuleTree;

pub use cache::KvCacheHandle;
pub(crate) use family::causal_family;
pub use decoder::{AttnHookPoints, AttnPoint, Decoder};
pub use device_map::{DeviceMap, PartSizes, Placement};
pub(crate) use device_map::Parts;
pub use super::checkpoint::{checkpoint_kind, checkpoint_tensors, kind_of_dtype, load_into, TensorInfo};
pub(crate) use super::validate::config_error;
pub use generate::{CausalLmExt, Eos, Sampling};

/// The root input of a causal LM (and of its `transformer` / `model` body):
/// `(input_ids [batch, seq] i64, attention_mask [batch, past + seq] i64 (1 = token,
/// 0 = padding, covering the cached positions too), position_ids [batch, seq] i64,
/// cache)`. [`position_ids`] computes the third from the second.
pub type CausalInput = (Tensor, Tensor, Tensor, KvCacheHandle);

/// Where to put the weights and in which dtype.
///
/// ```ignore
/// let opts = LoadOptions { device: Device::Cuda(0), dtype: Some(Kind::BFloat16), ..Default::default() };
/// let model = AutoCausalLm::load_with("folder", &opts)?;   // Error::Device where no CUDA
///
/// // Layers split over two GPUs, balancing the parameter bytes (see [`DeviceMap`]).
/// let opts = LoadOptions { device_map: Some(DeviceMap::auto(&[Device::Cuda(0), Device::Cuda(1)])), ..Default::default() };
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// Device of the weights (and of every activation; inputs made by `LanguageModel::tokenize`
    /// follow it). Checked before the weights are read: a device this build or machine cannot use
    /// (`Device::Cuda(i)` without libtorch's CUDA part from `cargo xtask setup --cuda`, without
    /// a GPU and driver, or with `i >= tch::Cuda::device_count()`) is [`crate::Error::Device`]
    /// naming the device (see [`super::checkpoint::check_device`]).
    pub device: Device,
    /// Dtype of the weights: `None` keeps the checkpoint's (the dtype most of its elements
    /// have); `Some(kind)` converts (`Float`, `Half`, `BFloat16` or `Double`).
    pub dtype: Option<Kind>,
    /// Several devices (Hugging Face's `device_map`): the embedding, each decoder layer and the
    /// head on the devices the [`DeviceMap`] gives, overriding `device` (module docs of
    /// [`device_map`]). Decoder families only; `None`: everything on `device`. Each device is
    /// checked first ([`crate::Error::Device`] naming it and the part); a map whose layer count
    /// is not the model's is [`crate::Error::Input`] naming both counts, before any weight is read.
    pub device_map: Option<DeviceMap>,
}

impl Default for LoadOptions {
    /// CPU, the checkpoint's dtype, no device map.
    fn default() -> Self {
        LoadOptions { device: Device::Cpu, dtype: None, device_map: None }
    }
}

impl LoadOptions {
    /// Checks `device` ([`super::checkpoint::check_device`]), or with a `device_map`, which
    /// overrides it, every device of the map ([`DeviceMap::check_devices`]): what each family's
    /// `load_with` does first, before the folder or its `config.json` is read.
    pub fn check_devices(&self) -> Result<()> {
        match &self.device_map {
            Some(map) => map.check_devices(),
            None => super::checkpoint::check_device(self.device),
        }
    }
}

/// A decoder-only causal LM: `Input` = [`CausalInput`], `Output` = logits
/// `[batch, seq, vocab]`. Implemented by [`super::gpt2::Gpt2`] and [`super::llama::Llama`].
///
/// The root's forward calls every submodule through [`Hooked::call`]; run it through its own
/// `Hooked` (path `""`) with [`CausalLmExt::forward`] / [`CausalLmExt::generate`], which check
/// the inputs and call the root once per step.
pub trait CausalLm: HookModule<Input = CausalInput, Output = Tensor> + Sized {
    /// Loads `config.json` and the safetensors checkpoint from the folder `dir`.
    ///
    /// Errors name the file: [`crate::Error::Io`] (missing folder or file), [`crate::Error::Config`]
    /// (another architecture, bad or unsupported value), [`crate::Error::MissingWeight`],
    /// [`crate::Error::WeightShape`]; [`crate::Error::Device`] for a device this build or
    /// machine cannot use (checked first).
    fn load_with(dir: &Path, options: &LoadOptions) -> Result<Self>;

    /// [`CausalLm::load_with`] on the CPU in the checkpoint's dtype, wrapped as the root
    /// module (path `""`).
    fn from_pretrained<P: AsRef<Path>>(dir: P) -> Result<Hooked<Self>> {
        Ok(Hooked::with_path("", Self::load_with(dir.as_ref(), &LoadOptions::default())?))
    }

    /// Longest sequence (cached + new positions) the model accepts (`n_positions`,
    /// `max_position_embeddings`).
    fn max_positions(&self) -> i64;
    /// Number of decoder layers (= KV cache layers).
    fn num_layers(&self) -> usize;
    /// Vocabulary size (last dim of the logits).
    fn vocab_size(&self) -> i64;
    /// The config's `eos_token_id` (one id or a list; empty when unset).
    fn eos_token_ids(&self) -> Vec<i64>;
    /// The config's `pad_token_id`.
    fn pad_token_id(&self) -> Option<i64>;
    /// Device of the weights.
    fn device(&self) -> Device;
    /// Dtype of the weights (and of the hidden states).
    fn kind(&self) -> Kind;

    /// An empty KV cache with one slot per layer.
    fn new_cache(&self) -> KvCacheHandle {
        KvCacheHandle::new(self.num_layers())
    }
}

/// Every causal LM is a text model (`LanguageModel::<Llama>`, `AutoLanguageModel`): ids and mask
/// from the tokenizer, position ids from the mask, no cache; left padding, as transformers and
/// nnsight do for decoder-only models; the pad id the tokenizer lacks is the config's
/// `pad_token_id`, else its first `eos_token_id`.
impl<T: CausalLm + 'static> TextModel for T {
    fn load(dir: &Path, device: Device) -> Result<Self> {
        T::load_with(dir, &LoadOptions { device, ..Default::default() })
    }
    fn text_input(&self, batch: &TextBatch) -> CausalInput {
        text_input(batch)
    }
    fn max_positions(&self) -> Option<i64> {
        Some(CausalLm::max_positions(self))
    }
    fn input_vocab_size(&self) -> Option<i64> {
        Some(self.vocab_size())
    }
    fn fallback_pad_token_id(&self) -> Option<u32> {
        let id = self.pad_token_id().or_else(|| self.eos_token_ids().first().copied())?;
        u32::try_from(id).ok()
    }
    fn padding_left(&self) -> bool {
        true
    }
}

/// The [`CausalInput`] of a tokenized batch (ids, mask, position ids from the mask, no cache),
/// for `LanguageModel::<Gpt2>` / `<Llama>` traces. Either padding side works for one forward
/// pass: position ids count only real tokens.
pub fn text_input(batch: &TextBatch) -> CausalInput {
    let pos = position_ids(&batch.attention_mask, batch.seq_len());
    (batch.input_ids.shallow_clone(), batch.attention_mask.shallow_clone(), pos, KvCacheHandle::disabled())
}

/// `lm_head`: hidden states to vocabulary logits, `x Wᵀ (+ b)` (by [`super::linear::linear`]).
///
/// Input `[batch, seq, hidden]`, output `[batch, seq, vocab]`. With tied embeddings `weight`
/// is the token embedding matrix itself (shared storage).
#[derive(Debug)]
pub struct LmHead {
    /// `[vocab, hidden]`.
    pub weight: Tensor,
    /// `[vocab]`, absent for GPT-2 and Llama.
    pub bias: Option<Tensor>,
}

impl LmHead {
    /// The head at `p` (`lm_head`): tied to `embedding` (`[vocab, hidden]`) if given, else a
    /// new variable `lm_head.weight` `[vocab, hidden]`.
    pub fn new(p: &nn::Path, embedding: Option<&Tensor>, vocab: i64, hidden: i64) -> Hooked<LmHead> {
        let weight = match embedding {
            Some(w) => w.shallow_clone(),
            None => params::param(p, "weight", &[vocab, hidden], nn::Init::Const(0.0)),
        };
        Hooked::new(p, LmHead { weight, bias: None })
    }
}

/// A leaf: no hooked children.
impl ModuleTree for LmHead {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}

impl HookModule for LmHead {
    /// `[batch, seq, hidden]`.
    type Input = Tensor;
    /// `[batch, seq, vocab]`.
    type Output = Tensor;
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn input_layout(&self) -> Layout {
        ROWS
    }
    /// Every tensor `[batch, ..]` (rows on dim 0).
    fn output_layout(&self) -> Layout {
        ROWS
    }
    /// The input is first moved to the weight's device (a no-op unless a [`DeviceMap`] puts the
    /// final norm elsewhere, e.g. a tied unembedding on the embedding's device).
    fn forward(&self, x: Tensor) -> Tensor {
        let x = device_map::to(x, self.weight.device());
        super::linear::linear(&x, &self.weight, self.bias.as_ref())
    }
}

/// Position ids from a left- (or right-) padded mask, as transformers' `generate` computes them:
/// `cumsum(mask) - 1`, 1 at padding, last `seq` columns.
///
/// `attention_mask`: `[batch, past + seq]` (1 = token). Returns `[batch, seq]` i64: the real
/// tokens of a row are numbered 0, 1, ... whatever padding precedes them.
pub fn position_ids(attention_mask: &Tensor, seq: i64) -> Tensor {
    let m = attention_mask.to_kind(Kind::Int64);
    let total = m.size()[1];
    let pos = m.cumsum(-1, Kind::Int64) - 1;
    pos.masked_fill(&m.eq(0), 1).narrow(1, total - seq, seq)
}

/// The additive attention mask for `seq` new queries over `past + seq` keys: 0 where key `j`
/// may be seen by query `i` (`j <= past + i` and `attention_mask[b, j] == 1`), `f32::MIN`
/// elsewhere.
///
/// `attention_mask`: `[batch, past + seq]`. Returns `[batch, 1, seq, past + seq]` f32 on the
/// mask's device (scores are masked and soft-maxed in f32 whatever the model's dtype). A query
/// that may see no key (a padding position on the left) gets a uniform softmax, as in
/// transformers' eager attention; masked keys get weight exactly 0.
pub fn causal_mask(attention_mask: &Tensor, seq: i64) -> Tensor {
    let device = attention_mask.device();
    let size = attention_mask.size();
    let (batch, total) = (size[0], size[1]);
    let past = total - seq;
    let q = (Tensor::arange(seq, (Kind::Int64, device)) + past).unsqueeze(1);
    let k = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let causal = k.le_tensor(&q).view([1, 1, seq, total]);
    let keep = attention_mask.ne(0).view([batch, 1, 1, total]).logical_and(&causal);
    Tensor::zeros([batch, 1, seq, total], (Kind::Float, device)).masked_fill(&keep.logical_not(), f32::MIN as f64)
}

/// Eager scaled dot-product attention (transformers' `eager_attention_forward`):
/// `softmax(q kᵀ · scaling + mask) v`, the softmax in f32.
///
/// `q`: `[batch, heads, seq, head_dim]`; `k`, `v`: `[batch, heads, past + seq, head_dim]`
/// (already repeated for grouped-query attention); `mask`: [`causal_mask`]'s
/// `[batch, 1, seq, past + seq]`. Returns `[batch, seq, heads * head_dim]` (heads merged).
///
/// The bundled models compute the same through their attention hook points (`q`, `k`,
/// `scores`, `probs`, `z`; see [`super::point`]); this function is the plain computation.
pub fn eager_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scaling: f64) -> Tensor {
    let size = q.size();
    let (b, s) = (size[0], size[2]);
    let scores = q.matmul(&k.transpose(-1, -2)) * scaling;
    let probs = (scores.to_kind(Kind::Float) + mask).softmax(-1, Kind::Float).to_kind(v.kind());
    probs.matmul(v).transpose(1, 2).contiguous().reshape([b, s, -1])
}

/// A config's `eos_token_id` / `bos_token_id`: one id or a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "expected a token id or a list of token ids")]
pub enum TokenIds {
    /// One id.
    One(i64),
    /// Several ids (Llama 3 lists several end tokens).
    Many(Vec<i64>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// What every family's `load_with` does first, before `config.json` is read: the devices
/// ([`LoadOptions::check_devices`]), then that `dir` is a folder ([`crate::Error::Io`]).
pub(crate) fn check_load(dir: &Path, options: &LoadOptions) -> Result<()> {
    options.check_devices()?;
    super::check_model_dir(dir)
}

/// Loads a checkpoint folder into a model built by `build` (see
/// [`super::checkpoint::load_model_strict`]: every weight is checked against the safetensors headers
/// (and a checkpoint tensor the model does not take is [`crate::Error::UnusedWeight`])
/// before any is allocated). `strip_prefixes`: key prefixes the checkpoint may lack
/// (`transformer.`, `model.`), see [`super::checkpoint::Checkpoint::check`]. With
/// `options.device_map` the model is built on the CPU and its variables are placed by the map
/// (`parts`: the family's variable names, see [`device_map::place`]) before the weights are read.
/// The devices are checked by the caller first ([`check_load`]).
pub(crate) fn load_model<M: CausalLm>(
    dir: &Path,
    options: &LoadOptions,
    strip_prefixes: &[&str],
    parts: &Parts,
    build: impl Fn(&nn::Path) -> Result<M>,
) -> Result<M> {
    let Some(map) = &options.device_map else {
        return super::checkpoint::load_model_strict(dir, options.device, options.dtype, strip_prefixes, build);
    };
    let what = dir.display().to_string();
    let place = |vs: &nn::VarStore, model: &M| device_map::place(vs, map, parts, model.num_layers(), &what).map(drop);
    super::checkpoint::load_model_placed(dir, Device::Cpu, options.dtype, strip_prefixes, true, build, place)
}

/// `nn::LayerNorm` over `[dim]` at `p` (variables `weight`, `bias`), input and output `[batch, ..]`.
pub(crate) fn layer_norm(p: &nn::Path, dim: i64, eps: f64) -> Hooked<nn::LayerNorm> {
    let cfg = nn::LayerNormConfig { eps, ..Default::default() };
    Hooked::new(p, params::layer_norm(p, dim, cfg)).with_layouts(ROWS, ROWS)
}

/// `nn::Embedding` `[rows, dim]` at `p` (variable `weight`, zero until loaded); ids `[batch, seq]`
/// (token ids, or GPT-2's position ids) in, `[batch, seq, dim]` out.
pub(crate) fn embedding(p: &nn::Path, rows: i64, dim: i64) -> Hooked<nn::Embedding> {
    let cfg = nn::EmbeddingConfig { ws_init: nn::Init::Const(0.0), ..Default::default() };
    Hooked::new(p, params::embedding(p, rows, dim, cfg)).with_layouts(ROWS, ROWS)
}

/// [`causal_mask`] restricted to a sliding window (Gemma 2 / 3's local layers, Mistral's
/// `sliding_window`): 0 where key `j` may be seen by query `i` — `j <= past + i`,
/// `j > past + i - window` (the last `window` positions, the query's own included) and
/// `attention_mask[b, j] == 1` — and `f32::MIN` elsewhere.
///
/// The window counts positions of the (left-padded) sequence, as transformers'
/// `sliding_window_overlay` (`kv_idx > q_idx - sliding_window`, on cache positions) does; with
/// left padding only, a row sees the same real keys as it does alone. `attention_mask`:
/// `[batch, past + seq]`; `window` >= 1. Returns `[batch, 1, seq, past + seq]` f32.
pub fn sliding_window_mask(attention_mask: &Tensor, seq: i64, window: i64) -> Tensor {
    let device = attention_mask.device();
    let size = attention_mask.size();
    let (batch, total) = (size[0], size[1]);
    let past = total - seq;
    let q = (Tensor::arange(seq, (Kind::Int64, device)) + past).unsqueeze(1);
    let k = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let visible = k.le_tensor(&q).logical_and(&k.gt_tensor(&(&q - window))).view([1, 1, seq, total]);
    let keep = attention_mask.ne(0).view([batch, 1, 1, total]).logical_and(&visible);
    Tensor::zeros([batch, 1, seq, total], (Kind::Float, device)).masked_fill(&keep.logical_not(), f32::MIN as f64)
}
