//! Text models with their tokenizer: what `trace!` runs on sentences (nnsight's `LanguageModel`).
//!
//! ```ignore
//! let lm = LanguageModel::<Bert>::from_pretrained(&dir)?;         // config, weights, tokenizer
//! let hidden = lm.forward(&["The Eiffel Tower is in the city of Paris."])?;
//! let h2 = trace!(lm, "The Colosseum is in the city of Rome.", {
//!     lm.encoder.layer[2].output.save()                          // Deref reaches the modules
//! })?;
//! ```
//!
//! Tokenization follows transformers' `tokenizer(texts, padding=True)`: special tokens added,
//! padding to the longest sentence of the batch with the tokenizer's pad token, no truncation.
//! Encoders (BERT) are padded on the right; decoder-only models (GPT-2, Llama) on the left, as
//! nnsight does, so every row's last token is at the last position
//! ([`TextModel::padding_left`]). GPT-2 and Llama tokenizers have no pad token: the model's
//! config supplies one ([`TextModel::fallback_pad_token_id`]). A `tokenizer.json` may carry its
//! own padding (all-MiniLM-L6-v2's pads every sentence to a fixed 128 tokens) and truncation
//! settings; both are replaced on load.

use std::fmt;
use std::ops::Deref;
use std::path::Path;

use tch::{Device, Tensor};
use tokenizers::{Encoding, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer};

use crate::error::{catch_quiet, Error, QuietGuard, Result};
use crate::models::ModelDir;
use crate::hook::{AsModule, HookModule, Hooked};
use crate::interleave::is_tracing;

/// A tokenized batch: every tensor is `[batch, seq]` i64 on the model's device, padded to the
/// longest sentence (on the right, or on the left for [`TextModel::padding_left`] models).
#[derive(Debug)]
pub struct TextBatch {
    /// Token ids `[batch, seq]` (padding positions hold the pad id: `[PAD]` = 0 for BERT, the
    /// config's pad or first end-of-sequence id for GPT-2 / Llama).
    pub input_ids: Tensor,
    /// `[batch, seq]`: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Segment ids `[batch, seq]` (all 0 for single sentences).
    pub token_type_ids: Tensor,
    /// The tokens as strings, one `Vec` of length `seq` per row (`"[CLS]"`, `"the"`, ..., `"[PAD]"`),
    /// as [`LanguageModel::tokenize`] returns them. Not needed to run the model: a batch given
    /// to `trace!` may leave it empty, and the batch the forward pass gets inside a trace of
    /// token-id invokes has it empty.
    pub tokens: Vec<Vec<String>>,
}

impl TextBatch {
    /// Number of rows.
    pub fn batch_size(&self) -> i64 {
        self.input_ids.size()[0]
    }

    /// Number of positions (the longest sentence, in tokens).
    pub fn seq_len(&self) -> i64 {
        self.input_ids.size()[1]
    }
}

/// A model that runs on tokenized text and can be loaded from a Hugging Face folder.
pub trait TextModel: HookModule + Sized + 'static {
    /// Loads config and weights from the checkpoint folder `dir` onto `device`.
    fn load(dir: &Path, device: Device) -> Result<Self>;

    /// The forward's input built from a tokenized batch (tensors already on the model's device).
    /// Build it from the tensors only: inside a trace whose invokes were given as token ids or
    /// as a [`TextBatch`], `batch.tokens` is empty.
    fn text_input(&self, batch: &TextBatch) -> Self::Input;

    /// Longest input, in tokens, the model accepts (e.g. `max_position_embeddings`); `None`
    /// for no limit. Longer inputs are an [`Error::Input`] before the model runs.
    fn max_positions(&self) -> Option<i64> {
        None
    }

    /// Number of token ids the model embeds (`vocab_size`): token ids given to a trace, and
    /// those the tokenizer makes of text, must be in `0..n`, else an [`Error::Input`] naming the
    /// id and its position (and token) before the model runs. `None`: not checked.
    fn input_vocab_size(&self) -> Option<i64> {
        None
    }

    /// Number of segment ids the model embeds (BERT's `type_vocab_size`), checked like
    /// [`TextModel::input_vocab_size`]; `None` for models without segment embeddings.
    fn type_vocab_size(&self) -> Option<i64> {
        None
    }

    /// Pad id used when the tokenizer has neither padding settings nor a `[PAD]` token (GPT-2
    /// and Llama tokenizers: the config's `pad_token_id`, else its first `eos_token_id`).
    /// `None`: no fallback, so sentences of different lengths cannot be batched.
    fn fallback_pad_token_id(&self) -> Option<u32> {
        None
    }

    /// Whether batches are padded on the left (decoder-only models, as transformers and
    /// nnsight do for them: every row's last token is at position `seq - 1`) instead of the
    /// right (encoders). The model must then compute positions from the attention mask.
    fn padding_left(&self) -> bool {
        false
    }
}

/// A text model with its tokenizer, traceable with `trace!` on strings.
///
/// Holds the model as the root hooked module (module path `""`, so `model.output` is the
/// model's own output) and dereferences to it: `lm.encoder.layer[3]` reaches the modules.
/// Each invoke takes one or more sentences (`&str`, `String`, `&[&str]`, `Vec<String>`,
/// `[&str; N]`, ...); all sentences of a trace are tokenized together and padded to the
/// longest of the whole batch (on the right for BERT, on the left for GPT-2 and Llama, whose
/// last position is then every row's last token), so a row's real tokens compute the same
/// values as when run alone.
pub struct LanguageModel<M> {
    root: Hooked<M>,
    tokenizer: Tokenizer,
    device: Device,
    /// Persistent edits (`edit!`), replayed into every trace.
    edits: crate::edits::PersistentEdits<M>,
}

impl<M: TextModel> LanguageModel<M> {
    /// Loads the model (see [`TextModel::load`]) and `tokenizer.json` from the folder `dir`,
    /// on the CPU.
    ///
    /// Errors name the file: [`Error::Io`] for a missing folder or file (or one that is not a
    /// regular file inside the folder, or a `tokenizer.json` over [`MAX_TOKENIZER_BYTES`]),
    /// [`Error::Config`], [`Error::MissingWeight`], [`Error::WeightShape`],
    /// [`Error::WeightDtype`] from the model, [`Error::Tokenizer`] for a `tokenizer.json` the
    /// tokenizers crate cannot read.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_pretrained_on(dir, Device::Cpu)
    }

    /// [`LanguageModel::from_pretrained`] with the weights (and token tensors) on `device`:
    /// every input [`LanguageModel::tokenize`] makes is put on that device.
    ///
    /// A device this build or machine cannot use (`Device::Cuda(i)` without libtorch's CUDA
    /// part, a driver, or with `i` beyond `tch::Cuda::device_count()`) is [`Error::Device`],
    /// naming the device and how to get CUDA, before any file is read (see
    /// [`crate::models::checkpoint::check_device`]).
    pub fn from_pretrained_on(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        crate::models::checkpoint::check_device(device)?;
        let dir = dir.as_ref();
        let folder = ModelDir::new(dir)?;
        let model = M::load(dir, device)?;
        let tokenizer = load_tokenizer(&folder)?;
        Self::from_parts(model, tokenizer, device)
    }

    /// Wraps an already built model and tokenizer. The tokenizer's padding is set to
    /// "longest in batch" on the model's side ([`TextModel::padding_left`]: right for BERT,
    /// left for GPT-2 / Llama) with a pad token from, in order: the tokenizer's padding
    /// settings, its `[PAD]` token, the model's [`TextModel::fallback_pad_token_id`].
    /// Truncation is switched off. `device` is where token tensors go (the model's device);
    /// [`Error::Device`] for one this build or machine cannot use.
    pub fn from_parts(model: M, mut tokenizer: Tokenizer, device: Device) -> Result<Self> {
        crate::models::checkpoint::check_device(device)?;
        let pad = match tokenizer.get_padding() {
            Some(p) => Some((p.pad_id, p.pad_type_id, p.pad_token.clone())),
            None => tokenizer.token_to_id("[PAD]").map(|id| (id, 0, "[PAD]".to_string())).or_else(|| {
                model.fallback_pad_token_id().map(|id| {
                    let token = tokenizer.id_to_token(id).unwrap_or_else(|| "<pad>".to_string());
                    (id, 0, token)
                })
            }),
        };
        let direction = if model.padding_left() { PaddingDirection::Left } else { PaddingDirection::Right };
        tokenizer.with_padding(pad.map(|(pad_id, pad_type_id, pad_token)| PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id,
            pad_token,
        }));
        tokenizer.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(LanguageModel { root: Hooked::with_path("", model), tokenizer, device, edits: Default::default() })
    }

    /// The persistent edits (see [`LanguageModel::add_edit`]).
    pub(crate) fn persistent_edits(&self) -> &crate::edits::PersistentEdits<M> {
        &self.edits
    }

    /// The tokenizer (padding and truncation already set as described on the type).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The root hooked module (module path `""`).
    pub fn root(&self) -> &Hooked<M> {
        &self.root
    }

    /// The device of the model and of the token tensors.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Tokenizes `texts` into one batch: `[batch, seq]` tensors, `batch = texts.len()`,
    /// `seq` = the longest sentence in tokens (special tokens included), padded on the right
    /// (left for [`TextModel::padding_left`] models).
    ///
    /// Errors: [`Error::Input`] for an empty list, a sentence with no tokens (an empty or
    /// whitespace-only text, for tokenizers that add no special tokens: GPT-2's), a sentence
    /// longer than the model accepts, or a token id outside the model's vocabulary (a tokenizer
    /// made for another model), naming the sentence, position, token and id;
    /// [`Error::Tokenizer`] when tokenization fails (or the tokenizer panics).
    pub fn tokenize(&self, texts: &[&str]) -> Result<TextBatch> {
        if texts.is_empty() {
            return Err(Error::Input("nothing to tokenize: give at least one sentence".into()));
        }
        let encodings = catch_quiet(|| self.encode(texts))
            .map_err(|m| Error::Tokenizer(format!("the tokenizer panicked: {m}")))??;
        self.check_encodings(texts, &encodings)?;
        let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        if let Some(max) = self.root.max_positions() {
            if seq as i64 > max {
                return Err(Error::Input(format!(
                    "the longest sentence has {seq} tokens; the model accepts at most {max} (max_position_embeddings)"
                )));
            }
        }
        let flat = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Tensor {
            let v: Vec<i64> = encodings.iter().flat_map(|e| f(e).iter().map(|&x| x as i64)).collect();
            Tensor::from_slice(&v).view([encodings.len() as i64, seq as i64]).to_device(self.device)
        };
        Ok(TextBatch {
            input_ids: flat(|e| e.get_ids()),
            attention_mask: flat(|e| e.get_attention_mask()),
            token_type_ids: flat(|e| e.get_type_ids()),
            tokens: encodings.iter().map(|e| e.get_tokens().to_vec()).collect(),
        })
    }

    /// Every sentence has a token, all rows one length, every id in the model's vocabulary.
    fn check_encodings(&self, texts: &[&str], encodings: &[Encoding]) -> Result<()> {
        if let Some(i) = encodings.iter().position(|e| e.get_attention_mask().iter().all(|&m| m == 0)) {
            return Err(Error::Input(format!(
                "sentence {i} ({:?}) has no tokens: this tokenizer adds no special tokens, so an empty or \
                 whitespace-only text gives the model nothing to run on",
                texts[i]
            )));
        }
        let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        if let Some((i, e)) = encodings.iter().enumerate().find(|(_, e)| e.len() != seq) {
            return Err(Error::Tokenizer(format!(
                "sentence {i} has {} tokens and the longest has {seq}, but the tokenizer has no padding token",
                e.len()
            )));
        }
        let Some(vocab) = self.root.input_vocab_size() else { return Ok(()) };
        for (i, e) in encodings.iter().enumerate() {
            if let Some(pos) = e.get_ids().iter().position(|&id| id as i64 >= vocab) {
                let (id, token) = (e.get_ids()[pos], &e.get_tokens()[pos]);
                let what = if e.get_attention_mask()[pos] == 0 { "the padding token" } else { "token" };
                return Err(Error::Input(format!(
                    "sentence {i}: {what} {token:?} (id {id}) at position {pos} is outside the model's vocabulary \
                     (vocab_size {vocab}): the tokenizer's vocabulary is larger than the model's (a tokenizer for another model?)"
                )));
            }
        }
        Ok(())
    }

    /// The encodings of `texts`, padded as set in [`LanguageModel::from_parts`].
    fn encode(&self, texts: &[&str]) -> Result<Vec<Encoding>> {
        encode_texts(&self.tokenizer, texts).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Plain forward pass (no trace) on `texts` batched as in [`LanguageModel::tokenize`], for
    /// inference: it runs under `no_grad` (for gradients, trace with `.backward()`). For BERT
    /// the result is `last_hidden_state [batch, seq, hidden]`. Errors as
    /// [`LanguageModel::tokenize`]; a panic inside the model becomes [`Error::Model`] (nothing
    /// printed). It runs the model as loaded: persistent edits (`edit!`) apply to `trace!`,
    /// `generate!`, `generate` and the activation cache, not to this plain call.
    pub fn forward(&self, texts: &[&str]) -> Result<M::Output> {
        let batch = self.tokenize(texts)?;
        let input = self.root.text_input(&batch);
        if is_tracing() {
            return Ok(self.root.call(input));
        }
        tch::no_grad(|| catch_quiet(|| self.root.call(input))).map_err(Error::Model)
    }
}

/// Batches up to this many sentences are tokenized on the calling thread.
const SERIAL_TOKENIZE_MAX: usize = 16;

/// Largest `tokenizer.json` read (real ones are up to a few tens of MB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

/// Reads `tokenizer.json` of the folder ([`Error::Io`] if missing, not a regular file inside
/// the folder, or too large; [`Error::Tokenizer`] if unreadable).
/// `dir/tokenizer.json`, read as [`LanguageModel::from_pretrained`] reads it.
pub(crate) fn load_tokenizer_from(dir: &Path) -> Result<Tokenizer> {
    load_tokenizer(&ModelDir::new(dir)?)
}

fn load_tokenizer(folder: &ModelDir) -> Result<Tokenizer> {
    let text = folder.read_text("tokenizer.json", MAX_TOKENIZER_BYTES)?;
    let p = folder.join("tokenizer.json").display().to_string();
    catch_quiet(|| text.parse::<Tokenizer>())
        .map_err(|m| Error::Tokenizer(format!("cannot load `{p}`: the tokenizer panicked: {m}")))?
        .map_err(|e| Error::Tokenizer(format!("cannot load `{p}`: {e}")))
}

impl<M> Deref for LanguageModel<M> {
    type Target = Hooked<M>;
    fn deref(&self) -> &Hooked<M> {
        &self.root
    }
}

impl<M: fmt::Debug> fmt::Debug for LanguageModel<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LanguageModel").field("root", &self.root).field("device", &self.device).finish_non_exhaustive()
    }
}

impl<M: TextModel + crate::tree::ModuleTree> crate::tree::ModuleTree for LanguageModel<M> {
    fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str)) {
        self.root().visit_modules(f)
    }
}

impl<M: TextModel> AsModule for LanguageModel<M> {
    type Module = M;
    fn as_module(&self) -> &Hooked<M> {
        &self.root
    }
}

/// `texts` encoded and padded as the tokenizer's padding says: batches of up to
/// `SERIAL_TOKENIZE_MAX` sentences one by one on this thread (`encode_serial`), larger ones in
/// parallel on rayon's pool (`Tokenizer::encode_batch`).
pub(crate) fn encode_texts(tokenizer: &Tokenizer, texts: &[&str]) -> tokenizers::Result<Vec<Encoding>> {
    if texts.len() <= SERIAL_TOKENIZE_MAX {
        // Small batches: `encode_batch` and `tokenizers::utils::padding::pad_encodings` hand
        // even two sentences to rayon's thread pool, which costs ~0.1 ms here and, on a 2-core
        // machine, slows the forward pass after it by another ~0.2 ms while the pool's idle
        // threads spin.
        encode_serial(tokenizer, texts)
    } else {
        // The tokenizers crate encodes on rayon's pool: its panics come back here, and must
        // not print on the pool's threads either.
        let _quiet = QuietGuard::all_threads();
        tokenizer.encode_batch(texts.to_vec(), true)
    }
}

/// `texts` encoded one after the other on this thread and padded as the tokenizer's padding
/// says, without rayon (whose idle threads spin and take CPU from a forward pass on a small
/// machine).
pub(crate) fn encode_serial<S: AsRef<str>>(tokenizer: &Tokenizer, texts: &[S]) -> tokenizers::Result<Vec<Encoding>> {
    let mut encodings = texts.iter().map(|t| tokenizer.encode(t.as_ref(), true)).collect::<tokenizers::Result<Vec<_>>>()?;
    if let Some(p) = tokenizer.get_padding() {
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let target = match (&p.strategy, p.pad_to_multiple_of) {
            (PaddingStrategy::Fixed(n), _) => *n,
            (PaddingStrategy::BatchLongest, Some(m)) if m > 0 => longest.div_ceil(m) * m,
            (PaddingStrategy::BatchLongest, _) => longest,
        };
        for e in &mut encodings {
            e.pad(target, p.pad_id, p.pad_type_id, &p.pad_token, p.direction);
        }
    }
    Ok(encodings)
}
