//! Forward passes and generation on the root module of a causal LM.

use tch::{Device, IndexOp, Kind, Tensor};

use super::{position_ids, CausalLm, KvCacheHandle};
use crate::error::{catch_quiet, Error, Result};
use crate::hook::Hooked;
use crate::interleave::is_tracing;

/// How the next token is chosen from the last position's logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (`argmax`; transformers' `do_sample=False`).
    Greedy,
    /// A draw from `softmax(logits / temperature)` restricted to the `top_k` most likely
    /// tokens (all tokens when `None`), from a generator seeded with `seed` (its own, not
    /// libtorch's global one): the same seed and logits give the same tokens. Computed in f64
    /// as `softmax((logits - max) / temperature)`, so any positive temperature gives finite
    /// probabilities (a tiny one tends to greedy).
    Sample {
        /// Divides the logits; must be positive and finite.
        temperature: f64,
        /// Keep only the `k` most likely tokens; at least 1.
        top_k: Option<i64>,
        /// Seed of the generator.
        seed: u64,
    },
}

/// When rows stop: a row that produced one of `token_ids` is finished, and gets `pad_token_id`
/// from then on; generation ends early when every row is finished (transformers' behaviour).
#[derive(Clone, Debug, PartialEq)]
pub struct Eos {
    /// End-of-sequence ids.
    pub token_ids: Vec<i64>,
    /// Filler for finished rows.
    pub pad_token_id: i64,
}

impl Eos {
    /// The model config's `eos_token_id`, padded with its `pad_token_id` or else the first eos
    /// id (as transformers does); `None` when the config has no eos id.
    pub fn from_config<M: CausalLm>(model: &M) -> Option<Eos> {
        let ids = model.eos_token_ids();
        let pad = model.pad_token_id().or(ids.first().copied())?;
        Some(Eos { token_ids: ids, pad_token_id: pad })
    }
}

/// Checked forward passes and generation on the root module (path `""`) of a causal LM.
/// Implemented for `Hooked<M>` for every [`CausalLm`] `M`.
pub trait CausalLmExt {
    /// One forward pass: logits `[batch, seq, vocab]` of the new tokens.
    ///
    /// `input_ids`: `[batch, seq]` integer ids (left-padded); `attention_mask`:
    /// `[batch, past + seq]` (1 = token, 0 = padding), where `past` is what `cache` holds
    /// (use [`KvCacheHandle::disabled`] for no cache). Position ids are computed from the mask.
    /// Calls the root module once (through [`Hooked::call`], so a trace sees every module);
    /// outside a trace it runs under `no_grad`, and a panic in the model becomes
    /// [`Error::Model`].
    ///
    /// Errors ([`Error::Input`]) before the model runs: `seq` or `batch` 0, ids not 2-d integer,
    /// an id outside the vocabulary (named with its row and position), a mask of another
    /// shape, `past + seq` over the model's `max_positions`, a cache for another number of
    /// layers.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, cache: &KvCacheHandle) -> Result<Tensor>;

    /// Generates up to `max_new_tokens` tokens per row after the (left-padded) prompt
    /// `input_ids` `[batch, seq]` with `attention_mask` `[batch, seq]`.
    ///
    /// Step 0 runs the whole prompt, each later step the one token chosen last, with a KV cache:
    /// the root module is called once per step (so in a trace, call `n` of any module is step
    /// `n`). Returns `[batch, seq + n]` i64 (prompt with its padding, then the new tokens;
    /// `n = max_new_tokens` unless every row hit `eos` earlier), on the model's device.
    /// Errors as [`CausalLmExt::forward`], plus ([`Error::Input`], naming the option)
    /// `max_new_tokens` below 1 (transformers' `GenerationConfig` refuses it too) or with
    /// `seq + max_new_tokens - 1` over `max_positions` (sums checked for overflow),
    /// `temperature` not positive and finite, `top_k` below 1; and
    /// [`Error::Model`] when a step's logits hold NaN (or are all `-inf` when sampling), since
    /// no token can be chosen from them.
    fn generate(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        max_new_tokens: i64,
        sampling: &Sampling,
        eos: Option<&Eos>,
    ) -> Result<Tensor>;
}

impl<M: CausalLm> CausalLmExt for Hooked<M> {
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, cache: &KvCacheHandle) -> Result<Tensor> {
        let (ids, mask) = check_input(&**self, input_ids, attention_mask, cache, 0)?;
        guarded(|| {
            let pos = position_ids(&mask, ids.size()[1]);
            Ok(self.call((ids, mask, pos, cache.clone())))
        })
    }

    fn generate(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        max_new_tokens: i64,
        sampling: &Sampling,
        eos: Option<&Eos>,
    ) -> Result<Tensor> {
        if max_new_tokens < 1 {
            return Err(Error::Input(format!("`max_new_tokens` must be at least 1, got {max_new_tokens}")));
        }
        check_sampling(sampling)?;
        let model: &M = self;
        let cache = model.new_cache();
        let (ids, mask) = check_input(model, input_ids, attention_mask, &cache, max_new_tokens - 1)?;
        let device = model.device();
        let batch = ids.size()[0];
        guarded(|| {
            let mut rng = SplitMix64(match sampling {
                Sampling::Sample { seed, .. } => *seed,
                Sampling::Greedy => 0,
            });
            let mut sequences = ids.shallow_clone();
            let mut mask = mask;
            let mut step_ids = ids;
            let mut unfinished = Tensor::ones([batch], (Kind::Int64, device));
            for step in 0..max_new_tokens {
                let seq = step_ids.size()[1];
                let pos = position_ids(&mask, seq);
                let logits = self.call((step_ids, mask.shallow_clone(), pos, cache.clone()));
                let mut next = pick(&logits.i((.., -1, ..)), sampling, &mut rng, step)?.to_device(device);
                if let Some(eos) = eos {
                    next = &next * &unfinished + (unfinished.ones_like() - &unfinished) * eos.pad_token_id;
                    let ids = Tensor::from_slice(&eos.token_ids).to_device(device);
                    let hit = Tensor::isin(&next, &ids, false, false).to_kind(Kind::Int64);
                    unfinished = &unfinished * (hit.ones_like() - hit);
                }
                let next = next.unsqueeze(1);
                sequences = Tensor::cat(&[&sequences, &next], 1);
                mask = Tensor::cat(&[&mask, &next.ones_like()], 1);
                step_ids = next;
                if eos.is_some() && unfinished.max().int64_value(&[]) == 0 {
                    break;
                }
            }
            Ok(sequences)
        })
    }
}

/// Runs `f` as the model's forward: directly inside a trace (the interleaver handles errors and
/// gradients), else under `no_grad` with panics turned into [`Error::Model`] (nothing printed).
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    if is_tracing() {
        return f();
    }
    tch::no_grad(|| catch_quiet(f)).unwrap_or_else(|m| Err(Error::Model(m)))
}

/// Checks shapes before the model runs; returns ids and mask as i64 on the model's device.
/// `extra`: positions that will be added later (generation).
fn check_input<M: CausalLm>(
    model: &M,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    cache: &KvCacheHandle,
    extra: i64,
) -> Result<(Tensor, Tensor)> {
    let bad = |m: String| Err(Error::Input(m));
    if !input_ids.defined() || input_ids.dim() != 2 {
        return bad(format!("input_ids must be [batch, seq], got {}", describe(input_ids)));
    }
    if !matches!(input_ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
        return bad(format!("input_ids must hold integer token ids, got {:?}", input_ids.kind()));
    }
    let (batch, seq) = (input_ids.size()[0], input_ids.size()[1]);
    if batch == 0 || seq == 0 {
        return bad(format!("input_ids is empty ([{batch}, {seq}]): give at least one token per row"));
    }
    if cache.is_enabled() && cache.num_layers() != model.num_layers() {
        return bad(format!("the KV cache has {} layers, the model {}", cache.num_layers(), model.num_layers()));
    }
    let past = cache.past_len();
    let total = past + seq;
    if !attention_mask.defined() || attention_mask.size() != [batch, total] {
        return bad(format!(
            "attention_mask must be [batch, cached + new positions] = [{batch}, {total}] ({past} cached), got {}",
            describe(attention_mask)
        ));
    }
    let max = model.max_positions();
    if total.checked_add(extra).is_none_or(|needed| needed > max) {
        if extra > 0 {
            return bad(format!(
                "`max_new_tokens` {} is too many for {total} prompt positions ({past} cached, {seq} new): the model \
                 accepts at most {max} positions, and generation feeds back all but the last new token, so \
                 `max_new_tokens` may be at most {}",
                extra.saturating_add(1),
                (max - total + 1).max(0)
            ));
        }
        return bad(format!("sequence too long: {total} positions ({past} cached, {seq} new); the model accepts at most {max}"));
    }
    let ids = input_ids.to_kind(Kind::Int64).to_device(model.device());
    crate::text_invoke::in_vocabulary("input_ids", &ids, Some(model.vocab_size()), "vocab_size")?;
    Ok((ids, attention_mask.to_kind(Kind::Int64).to_device(model.device())))
}

fn describe(t: &Tensor) -> String {
    if t.defined() {
        format!("{:?} {:?}", t.size(), t.kind())
    } else {
        "an undefined tensor".into()
    }
}

fn check_sampling(s: &Sampling) -> Result<()> {
    if let Sampling::Sample { temperature, top_k, .. } = s {
        if !temperature.is_finite() || *temperature <= 0.0 {
            return Err(Error::Input(format!("`temperature` must be a positive finite number, got {temperature}")));
        }
        if let Some(k) = top_k.filter(|&k| k < 1) {
            return Err(Error::Input(format!("`top_k` must be at least 1, got {k}")));
        }
    }
    Ok(())
}

/// The next token of every row at generation step `step`: `logits` `[batch, vocab]` →
/// `[batch]` i64. [`Error::Model`] for a row whose logits hold NaN, or (sampling) are all
/// `-inf`: no token can be chosen.
fn pick(logits: &Tensor, sampling: &Sampling, rng: &mut SplitMix64, step: i64) -> Result<Tensor> {
    let logits = logits.to_kind(Kind::Double);
    let no_choice = |rows: Tensor, what: &str| -> Result<()> {
        let rows = rows.nonzero();
        if rows.size()[0] == 0 {
            return Ok(());
        }
        Err(Error::Model(format!("generation step {step}: the logits of row {} {what}; no token can be chosen", rows.int64_value(&[0, 0]))))
    };
    no_choice(logits.isnan().any_dim(-1, false), "hold NaN")?;
    let (temperature, top_k) = match sampling {
        Sampling::Greedy => return Ok(logits.argmax(-1, false)),
        Sampling::Sample { temperature, top_k, .. } => (*temperature, *top_k),
    };
    let vocab = logits.size()[1];
    let (values, indices) = match top_k {
        Some(k) => logits.topk(k.min(vocab), -1, true, true),
        None => (logits.shallow_clone(), Tensor::arange(vocab, (Kind::Int64, logits.device())).expand_as(&logits)),
    };
    let max = values.amax(-1, true);
    no_choice(max.squeeze_dim(-1).isneginf(), "are all -inf")?;
    // Log-space: the largest logit scores 0 (also when it is +inf), the others <= 0, so the
    // softmax is finite for any positive temperature.
    let scaled = ((&values - &max) / temperature).where_self(&values.ne_tensor(&max), &values.zeros_like());
    let probs = scaled.softmax(-1, Kind::Double).to_device(Device::Cpu);
    let indices = indices.to_device(Device::Cpu);
    let mut rows = Vec::with_capacity(probs.size()[0] as usize);
    for r in 0..probs.size()[0] {
        let p: Vec<f64> = Vec::try_from(probs.get(r))?;
        let u = rng.next_f64();
        let mut acc = 0.0;
        let j = p.iter().position(|&q| {
            acc += q;
            u < acc
        });
        // Rounding can leave the sum just under `u`: take the last token with any probability.
        let j = j.or_else(|| p.iter().rposition(|&q| q > 0.0)).unwrap_or(0);
        rows.push(indices.int64_value(&[r, j as i64]));
    }
    Ok(Tensor::from_slice(&rows))
}

/// SplitMix64 (Steele, Lea, Flood 2014): a small seeded generator for sampling.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
