//! What one invoke of a [`LanguageModel`] takes, and how a trace's invokes become one batch.
//!
//! An invoke is sentences (tokenized by the trace) or a batch tokenized beforehand: a
//! [`TextBatch`] from [`LanguageModel::tokenize`], or token ids `[batch, seq]` (as Python
//! nnsight accepts `input_ids`). Tokenizing once and tracing many times is what a sweep over
//! layers or positions wants:
//!
//! ```ignore
//! let batch = lm.tokenize(&["The Eiffel Tower is in the city of", "The Colosseum is in"])?;
//! for l in 0..6 {
//!     let h = trace!(lm, &batch, { lm.encoder.layer[l].output.save() })?;
//! }
//! ```
//!
//! All rows of a trace are padded to its longest invoke on the model's side
//! ([`TextModel::padding_left`]), with the tokenizer's pad id, attention mask 0 and the pad type
//! id, so a pre-tokenized invoke beside sentence invokes computes what one tokenization of all
//! the sentences would.

use tch::{Device, Kind, Tensor};
use tokenizers::PaddingDirection;

use crate::activation::Activation;
use crate::error::{Error, Result};
use crate::language_model::{LanguageModel, TextBatch, TextModel};
use crate::traced::{IntoInvoke, Traced};

/// One invoke's input to a [`LanguageModel`].
#[derive(Debug)]
pub enum TextInvoke {
    /// Sentences, one batch row each, tokenized by the trace with the model's tokenizer.
    Sentences(Vec<String>),
    /// Rows tokenized beforehand: `[rows, seq]` i64 tensors on the model's device, checked
    /// (shapes, dtypes, `seq` within the model's limit) when the invoke was made; `tokens` is
    /// empty (strings are not needed by the forward pass).
    Tokens(TextBatch),
}

/// One invoke is one or more sentences, or a tokenized batch; they become that many batch rows.
impl<M: TextModel> Traced for LanguageModel<M> {
    type Invoke = TextInvoke;

    fn replay_edits<'e>(&'e self, tracer: &mut crate::Tracer<'e, Self>) {
        self.replay_into(tracer);
    }

    fn invoke_rows(&self, invoke: &TextInvoke) -> Result<i64> {
        match invoke {
            TextInvoke::Sentences(v) if v.is_empty() => Err(no_sentence()),
            TextInvoke::Sentences(v) => Ok(v.len() as i64),
            TextInvoke::Tokens(b) => Ok(b.batch_size()),
        }
    }

    fn forward_invokes(&self, invokes: &[TextInvoke]) -> Result<()> {
        let batch;
        let batch = match invokes {
            [TextInvoke::Tokens(b)] => b,
            _ => {
                batch = self.batch_invokes(invokes)?;
                &batch
            }
        };
        self.root().call(self.root().text_input(batch));
        Ok(())
    }
}

impl<M: TextModel> LanguageModel<M> {
    /// The invokes' rows as one batch, in order: sentences only as one tokenization, anything
    /// else padded to the longest invoke and concatenated.
    fn batch_invokes(&self, invokes: &[TextInvoke]) -> Result<TextBatch> {
        fn sentences(i: &TextInvoke) -> Option<Vec<&str>> {
            match i {
                TextInvoke::Sentences(v) => Some(v.iter().map(String::as_str).collect()),
                TextInvoke::Tokens(_) => None,
            }
        }
        if invokes.iter().all(|i| matches!(i, TextInvoke::Sentences(_))) {
            return self.tokenize(&invokes.iter().filter_map(sentences).flatten().collect::<Vec<_>>());
        }
        let tokenized = invokes.iter().filter_map(sentences).map(|v| self.tokenize(&v)).collect::<Result<Vec<_>>>()?;
        let mut next_tokenized = tokenized.iter();
        let parts: Vec<&TextBatch> = invokes
            .iter()
            .map(|i| match i {
                TextInvoke::Tokens(b) => b,
                TextInvoke::Sentences(_) => next_tokenized.next().expect("one batch per sentence invoke"),
            })
            .collect();
        let seq = parts.iter().map(|b| b.seq_len()).max().unwrap_or(0);
        let padded = parts.iter().enumerate().map(|(i, b)| self.pad_to(b, seq, i)).collect::<Result<Vec<_>>>()?;
        let cat = |f: fn(&TextBatch) -> &Tensor| Tensor::cat(&padded.iter().map(f).collect::<Vec<_>>(), 0);
        Ok(TextBatch {
            input_ids: cat(|b| &b.input_ids),
            attention_mask: cat(|b| &b.attention_mask),
            token_type_ids: cat(|b| &b.token_type_ids),
            tokens: Vec::new(),
        })
    }

    /// `b` padded to `seq` positions with the tokenizer's padding (invoke `i`, for errors).
    fn pad_to(&self, b: &TextBatch, seq: i64, i: usize) -> Result<TextBatch> {
        let n = seq - b.seq_len();
        if n == 0 {
            return Ok(TextBatch {
                input_ids: b.input_ids.shallow_clone(),
                attention_mask: b.attention_mask.shallow_clone(),
                token_type_ids: b.token_type_ids.shallow_clone(),
                tokens: Vec::new(),
            });
        }
        let p = self.tokenizer().get_padding().ok_or_else(|| {
            Error::Input(format!(
                "invoke {i} has {} positions and the longest invoke has {seq}, but the tokenizer has no padding token",
                b.seq_len()
            ))
        })?;
        let left = matches!(p.direction, PaddingDirection::Left);
        let rows = b.batch_size();
        let fill = |t: &Tensor, value: i64| {
            let pad = Tensor::full([rows, n], value, (Kind::Int64, t.device()));
            if left {
                Tensor::cat(&[&pad, t], 1)
            } else {
                Tensor::cat(&[t, &pad], 1)
            }
        };
        Ok(TextBatch {
            input_ids: fill(&b.input_ids, p.pad_id as i64),
            attention_mask: fill(&b.attention_mask, 0),
            token_type_ids: fill(&b.token_type_ids, p.pad_type_id as i64),
            tokens: Vec::new(),
        })
    }

    /// A tokenized batch as an invoke: the three tensors converted by [`owned_ids`] (the
    /// invoke's own i64 copies on the model's device, so an in-place edit during the trace never
    /// writes into the caller's tensors; a bool mask is fine), then [`Self::checked_tokens`].
    fn batch_invoke(&self, input_ids: &Tensor, attention_mask: &Tensor, token_type_ids: &Tensor) -> Result<TextInvoke> {
        let device = self.device();
        self.checked_tokens(
            owned_ids(Field::InputIds, input_ids, device)?,
            owned_ids(Field::AttentionMask, attention_mask, device)?,
            owned_ids(Field::TokenTypeIds, token_type_ids, device)?,
        )
    }

    /// Token ids `[rows, seq]` (or `[seq]`, one row) as an invoke: every position attended to,
    /// segment 0.
    fn ids_invoke(&self, ids: &Tensor) -> Result<TextInvoke> {
        if ids.defined() && ids.dim() == 1 && ids.size()[0] == 0 {
            return Err(Error::Input(format!("token ids for an invoke must hold at least one id, got {}", ids.describe())));
        }
        let ids = if ids.defined() && ids.dim() == 1 { ids.unsqueeze(0) } else { ids.shallow_clone() };
        let ids = owned_ids(Field::InputIds, &ids, self.device())?;
        let (mask, types) = (ids.ones_like(), ids.zeros_like());
        self.checked_tokens(ids, mask, types)
    }

    /// Checks converted invoke tensors (`[rows, seq]` i64, see [`owned_ids`]): mask and segment
    /// ids of the ids' shape, `seq` within [`TextModel::max_positions`], ids within the model's
    /// vocabularies ([`TextModel::input_vocab_size`], [`TextModel::type_vocab_size`]). The token
    /// strings are not carried into the forward pass (the invoke's `tokens` is empty).
    fn checked_tokens(&self, ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Result<TextInvoke> {
        let (rows, seq) = (ids.size()[0], ids.size()[1]);
        for (field, t) in [(Field::AttentionMask, &attention_mask), (Field::TokenTypeIds, &token_type_ids)] {
            if t.size() != ids.size() {
                return Err(Error::Input(format!(
                    "`{}` must have the shape of `input_ids` [{rows}, {seq}], got {}",
                    field.name(),
                    t.describe()
                )));
            }
        }
        let root: &M = self.root();
        if let Some(max) = root.max_positions() {
            if seq > max {
                return Err(Error::Input(format!(
                    "the tokenized input has {seq} positions; the model accepts at most {max} (max_position_embeddings)"
                )));
            }
        }
        in_vocabulary("input_ids", &ids, root.input_vocab_size(), "vocab_size")?;
        in_vocabulary("token_type_ids", &token_type_ids, root.type_vocab_size(), "type_vocab_size")?;
        Ok(TextInvoke::Tokens(TextBatch { input_ids: ids, attention_mask, token_type_ids, tokens: Vec::new() }))
    }
}

/// The three tensors of a tokenized invoke, for checks and errors.
#[derive(Clone, Copy, PartialEq)]
enum Field {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::InputIds => "input_ids",
            Field::AttentionMask => "attention_mask",
            Field::TokenTypeIds => "token_type_ids",
        }
    }

    fn holds(self) -> &'static str {
        match self {
            Field::InputIds => "token ids",
            Field::AttentionMask => "1 (attend) / 0 (padding), integer or bool",
            Field::TokenTypeIds => "segment ids",
        }
    }
}

/// `t` as a new `[rows, seq]` i64 tensor on `device` (never sharing `t`'s storage), `rows, seq
/// >= 1`; [`Error::Input`] naming the field otherwise.
fn owned_ids(field: Field, t: &Tensor, device: Device) -> Result<Tensor> {
    let integer = matches!(t.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8);
    let ok_kind = t.defined() && (integer || (field == Field::AttentionMask && t.kind() == Kind::Bool));
    if !ok_kind || t.dim() != 2 || t.size().contains(&0) {
        return Err(Error::Input(format!(
            "`{}` must be a [batch, seq] tensor of {} (batch and seq at least 1), got {}",
            field.name(),
            field.holds(),
            t.describe()
        )));
    }
    Ok(if t.kind() == Kind::Int64 && t.device() == device { t.copy() } else { t.to_device(device).to_kind(Kind::Int64) })
}

/// [`Error::Input`] when `t` holds an id outside `0..size` (`size` from the config key `key`):
/// the embedding lookup would fail inside the model with no hint of where.
pub(crate) fn in_vocabulary(name: &str, t: &Tensor, size: Option<i64>, key: &str) -> Result<()> {
    let Some(size) = size else { return Ok(()) };
    let (lo, hi) = t.aminmax(None, false);
    let (lo, hi) = (lo.int64_value(&[]), hi.int64_value(&[]));
    if lo >= 0 && hi < size {
        return Ok(());
    }
    let bad = if lo < 0 { lo } else { hi };
    let at = t.eq(bad).nonzero().get(0);
    let (row, pos) = (at.int64_value(&[0]), at.int64_value(&[1]));
    Err(Error::Input(format!(
        "`{name}` holds {bad} at row {row}, position {pos}; the model's {key} is {size}, so ids must be in 0..{size}"
    )))
}

fn no_sentence() -> Error {
    Error::Input("an invoke needs at least one sentence, got an empty list".into())
}

fn sentences<S: AsRef<str>>(texts: impl IntoIterator<Item = S>) -> Result<TextInvoke> {
    let v: Vec<String> = texts.into_iter().map(|s| s.as_ref().to_string()).collect();
    if v.is_empty() {
        return Err(no_sentence());
    }
    Ok(TextInvoke::Sentences(v))
}

macro_rules! text_invokes {
    ($($(#[$doc:meta])* [$($lt:lifetime),*] $t:ty => |$x:ident, $m:ident| $e:expr;)*) => {$(
        $(#[$doc])*
        impl<$($lt,)* M: TextModel> IntoInvoke<LanguageModel<M>> for $t {
            fn into_invoke(self, $m: &LanguageModel<M>) -> Result<TextInvoke> {
                let $x = self;
                $e
            }
        }
    )*};
}
text_invokes! {
    /// One sentence.
    ['a] &'a str => |s, _m| Ok(TextInvoke::Sentences(vec![s.to_string()]));
    /// One sentence.
    [] String => |s, _m| Ok(TextInvoke::Sentences(vec![s]));
    /// One sentence.
    ['a] &'a String => |s, _m| Ok(TextInvoke::Sentences(vec![s.clone()]));
    /// Several sentences, one row each.
    ['a, 'b] &'a [&'b str] => |v, _m| sentences(v);
    /// Several sentences, one row each.
    ['a] &'a [String] => |v, _m| sentences(v);
    /// Several sentences, one row each.
    ['a] Vec<&'a str> => |v, _m| sentences(v);
    /// Several sentences, one row each.
    [] Vec<String> => |v, _m| sentences(v);
    /// Several sentences, one row each.
    ['a] &'a Vec<String> => |v, _m| sentences(v);
    /// Several sentences.
    ['a, 'b] &'a Vec<&'b str> => |v, _m| sentences(v);
    /// A batch tokenized beforehand (e.g. by [`LanguageModel::tokenize`]): its rows. Errors:
    /// [`Error::Input`] naming the field for tensors that are not `[batch, seq]` token ids of
    /// one shape, or more positions than the model accepts. Its `tokens` strings are ignored.
    [] TextBatch => |b, m| m.batch_invoke(&b.input_ids, &b.attention_mask, &b.token_type_ids);
    /// A batch tokenized beforehand, borrowed (the tensors are shared, not copied).
    ['a] &'a TextBatch => |b, m| m.batch_invoke(&b.input_ids, &b.attention_mask, &b.token_type_ids);
    /// Token ids `[batch, seq]` (or `[seq]` for one row) of an integer dtype, every position
    /// attended to (no padding), segment 0 — Python nnsight's `input_ids`.
    [] Tensor => |t, m| m.ids_invoke(&t);
    /// Token ids `[batch, seq]` or `[seq]`, borrowed.
    ['a] &'a Tensor => |t, m| m.ids_invoke(t);
    /// Token ids of one row (no padding).
    [] Vec<i64> => |v, m| m.ids_invoke(&Tensor::from_slice(&v));
    /// Token ids of one row (no padding).
    ['a] &'a [i64] => |v, m| m.ids_invoke(&Tensor::from_slice(v));
}

/// Several sentences, one row each.
impl<M: TextModel, const N: usize> IntoInvoke<LanguageModel<M>> for [&str; N] {
    fn into_invoke(self, _: &LanguageModel<M>) -> Result<TextInvoke> {
        sentences(self)
    }
}

/// Several sentences, one row each.
impl<M: TextModel, const N: usize> IntoInvoke<LanguageModel<M>> for &[&str; N] {
    fn into_invoke(self, _: &LanguageModel<M>) -> Result<TextInvoke> {
        sentences(self)
    }
}
