//! Generation under a trace (`generate!`): the causal LM's generation loop as the traced run.
//!
//! Each invoke is one or more prompts (text, tokenized without padding, or token ids). All
//! prompts of a trace are left-padded together, as transformers and Python nnsight do for
//! decoder-only models, and generated in one loop: step 0 runs the whole prompt, each later step
//! one token with the KV cache, and the root model is called once per step. So call `n` of any
//! module is generation step `n`: `model.lm_head.output` is step 0's logits,
//! `model.lm_head.next().output` step 1's, `model.lm_head.at(k).output` step `k`'s.

use std::cell::{Cell, RefCell};

use tch::Tensor;

use crate::error::{catch_quiet, Error, Result};
use crate::hook::{AsModule, Hooked};
use crate::language_model::{LanguageModel, TextModel};
use crate::models::causal::{CausalLm, CausalLmExt, Eos, Sampling};
use crate::traced::{IntoInvoke, Traced};

/// Settings of a generation (the options of `generate!`).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to generate per prompt (transformers' `max_new_tokens`).
    pub max_new_tokens: i64,
    /// Sample with this temperature instead of greedy decoding.
    pub temperature: Option<f64>,
    /// Sample among the `k` most likely tokens (implies sampling, temperature 1 by default).
    pub top_k: Option<i64>,
    /// Seed of the sampler (sampling only).
    pub seed: u64,
    /// Stop a row at the model's end-of-sequence token, and the loop when all rows stopped.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 20, temperature: None, top_k: None, seed: 0, stop_at_eos: true }
    }
}

impl GenerateOptions {
    /// Greedy unless a temperature or top-k was given.
    pub fn sampling(&self) -> Sampling {
        if self.temperature.is_none() && self.top_k.is_none() {
            Sampling::Greedy
        } else {
            Sampling::Sample { temperature: self.temperature.unwrap_or(1.0), top_k: self.top_k, seed: self.seed }
        }
    }
}

/// One prompt: text (tokenized with the model's tokenizer, special tokens included) or ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<i64>),
}

/// A language model set up to generate: what `generate!` traces. The model's modules are
/// reached through the `LanguageModel` as in `trace!`.
pub struct Generator<'m, M> {
    lm: &'m LanguageModel<M>,
    options: GenerateOptions,
    tokens: RefCell<Option<Tensor>>,
    ended_early: Cell<bool>,
}

impl<'m, M: CausalLm + TextModel> Generator<'m, M> {
    /// A generator for `lm` with `options`.
    pub fn new(lm: &'m LanguageModel<M>, options: GenerateOptions) -> Self {
        Generator { lm, options, tokens: RefCell::new(None), ended_early: Cell::new(false) }
    }

    /// The generation steps in `range` that this generation may run: `range` clipped to
    /// `0..max_new_tokens` (step 0 reads the prompt, step `k` makes new token `k`; call `k` of
    /// a module that runs once per step). In `generate!`, `for s in model.steps(..)` loops
    /// over every step and `model.steps(1..3)` over steps 1 and 2 (nnsight's `.all()` and
    /// `iter[1:3]`) without the block naming `max_new_tokens`. Steps that generation does not
    /// reach (every row ended at end-of-sequence) skip their interventions; save their values
    /// with `.save_if_ran()` to get `None` for them.
    pub fn steps(&self, range: impl std::ops::RangeBounds<usize>) -> std::ops::Range<usize> {
        use std::ops::Bound;
        let max = usize::try_from(self.options.max_new_tokens).unwrap_or(0);
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => max,
        };
        start.min(max)..end.min(max).max(start.min(max))
    }

    /// After a run: the token ids `[batch, prompt + new]` (left-padded prompts, then the
    /// generated tokens; finished rows are filled with the pad id).
    pub fn tokens(&self) -> Option<Tensor> {
        self.tokens.borrow().as_ref().map(Tensor::shallow_clone)
    }

    /// Token ids of every prompt, left-padded: `(input_ids, attention_mask)`, `[batch, seq]`.
    fn batch(&self, invokes: &[Vec<Prompt>]) -> Result<(Tensor, Tensor)> {
        let mut rows: Vec<Vec<i64>> = Vec::new();
        for p in invokes.iter().flatten() {
            rows.push(match p {
                Prompt::Ids(ids) => ids.clone(),
                Prompt::Text(t) => {
                    let enc = catch_quiet(|| self.lm.tokenizer().encode(t.as_str(), true))
                        .map_err(|m| Error::Tokenizer(format!("the tokenizer panicked: {m}")))?
                        .map_err(|e| Error::Tokenizer(e.to_string()))?;
                    enc.get_ids().iter().map(|&i| i as i64).collect()
                }
            });
        }
        if let Some(i) = rows.iter().position(Vec::is_empty) {
            return Err(Error::Input(format!("prompt {i} is empty: generation needs at least one token")));
        }
        let root: &M = self.lm.root();
        let pad = root.pad_token_id().or(root.eos_token_ids().first().copied()).unwrap_or(0);
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let ids: Vec<i64> = rows.iter().flat_map(|r| std::iter::repeat_n(pad, seq - r.len()).chain(r.iter().copied())).collect();
        let mask: Vec<i64> = rows.iter().flat_map(|r| (0..seq).map(move |i| (i >= seq - r.len()) as i64)).collect();
        let shape = [rows.len() as i64, seq as i64];
        let device = self.lm.device();
        Ok((Tensor::from_slice(&ids).view(shape).to_device(device), Tensor::from_slice(&mask).view(shape).to_device(device)))
    }
}

impl<M: CausalLm + TextModel> Traced for Generator<'_, M> {
    type Invoke = Vec<Prompt>;

    fn invoke_rows(&self, invoke: &Vec<Prompt>) -> Result<i64> {
        Ok(invoke.len() as i64)
    }

    fn forward_invokes(&self, invokes: &[Vec<Prompt>]) -> Result<()> {
        if self.options.max_new_tokens < 1 {
            return Err(Error::Input(format!("`max_new_tokens` must be at least 1, got {}", self.options.max_new_tokens)));
        }
        let (ids, mask) = self.batch(invokes)?;
        let eos = if self.options.stop_at_eos { Eos::from_config::<M>(self.lm.root()) } else { None };
        let out = self.lm.root().generate(&ids, &mask, self.options.max_new_tokens, &self.options.sampling(), eos.as_ref())?;
        self.ended_early.set(out.size()[1] < ids.size()[1].saturating_add(self.options.max_new_tokens));
        *self.tokens.borrow_mut() = Some(out);
        Ok(())
    }

    fn tolerates_missing(&self) -> bool {
        self.ended_early.get()
    }

    /// The language model's persistent edits, replayed on a tracer of the language model and
    /// taken over.
    fn replay_edits<'e>(&'e self, tracer: &mut crate::Tracer<'e, Self>) {
        if self.lm.edit_count() > 0 {
            tracer.absorb(crate::Tracer::new(self.lm));
        }
    }
}

impl<M: CausalLm + TextModel> AsModule for Generator<'_, M> {
    type Module = M;
    fn as_module(&self) -> &Hooked<M> {
        self.lm.root()
    }
}

/// The language model's module tree (what `Tracer::cache` selects from in a generation).
impl<M: CausalLm + TextModel + crate::tree::ModuleTree> crate::tree::ModuleTree for Generator<'_, M> {
    fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str)) {
        self.lm.root().visit_modules(f)
    }
}

macro_rules! prompt_inputs {
    ($($t:ty => |$v:ident| $e:expr;)*) => {$(
        impl<M: CausalLm + TextModel> IntoInvoke<Generator<'_, M>> for $t {
            fn into_invoke(self, _: &Generator<'_, M>) -> Result<Vec<Prompt>> {
                let $v = self;
                let prompts: Vec<Prompt> = $e;
                if prompts.is_empty() {
                    return Err(Error::Input("an invoke needs at least one prompt".into()));
                }
                Ok(prompts)
            }
        }
    )*};
}
prompt_inputs! {
    &str => |s| vec![Prompt::Text(s.to_string())];
    String => |s| vec![Prompt::Text(s)];
    &String => |s| vec![Prompt::Text(s.clone())];
    Vec<&str> => |v| v.into_iter().map(|s| Prompt::Text(s.to_string())).collect();
    &[&str] => |v| v.iter().map(|s| Prompt::Text(s.to_string())).collect();
    Vec<i64> => |v| vec![Prompt::Ids(v)];
    &[i64] => |v| vec![Prompt::Ids(v.to_vec())];
    Vec<Vec<i64>> => |v| v.into_iter().map(Prompt::Ids).collect();
}

impl<M: CausalLm + TextModel, const N: usize> IntoInvoke<Generator<'_, M>> for [&str; N] {
    fn into_invoke(self, g: &Generator<'_, M>) -> Result<Vec<Prompt>> {
        self.to_vec().into_invoke(g)
    }
}

impl<M: CausalLm + TextModel> LanguageModel<M> {
    /// Generates without a trace: token ids `[batch, prompt + new]` for the prompts, left-padded
    /// together (see [`Generator`]).
    pub fn generate<'m, I: IntoInvoke<Generator<'m, M>>>(&'m self, prompts: I, options: GenerateOptions) -> Result<Tensor> {
        let g = Generator::new(self, options);
        let inv = prompts.into_invoke(&g)?;
        g.forward_invokes(&[inv])?;
        Ok(g.tokens().expect("set by forward_invokes"))
    }

    /// Text of token ids (special tokens skipped), e.g. one row of [`LanguageModel::generate`].
    /// [`Error::Input`] for an id that is no token id (negative, or past `u32`).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| u32::try_from(id).map_err(|_| Error::Input(format!("cannot decode id {id} at position {i}: not a token id"))))
            .collect::<Result<_>>()?;
        catch_quiet(|| self.tokenizer().decode(&ids, true))
            .map_err(|m| Error::Tokenizer(format!("the tokenizer panicked: {m}")))?
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
