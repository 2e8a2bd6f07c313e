//! Activation patching on the indirect-object-identification (IOI) task (Wang et al., 2022,
//! "Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2 small")
//! on a Hugging Face checkpoint of any supported family (GPT-2, Llama, ...: `nnsight::models::auto`).
//!
//! # The task and the method
//!
//! "When Mary and John went to the store, John gave a drink to" is completed with the
//! *indirect object* " Mary", not the repeated *subject* " John". The metric is the logit
//! difference `logit(IO) − logit(S)` at the last position. The corrupted prompt swaps the name
//! in the second clause ("..., Mary gave a drink to"): now " John" is the right answer and the
//! logit difference flips sign.
//!
//! Activation patching: run the corrupted prompt, but overwrite the residual stream (block
//! `l`'s output) at position `p` with its value from the clean run, and measure how much of the
//! clean logit difference comes back. The normalized effect is
//! `(LD(patched) − LD(corrupt)) / (LD(clean) − LD(corrupt))`: 1 = fully restored, 0 = nothing.
//! In GPT-2 small the information sits at the second-clause name (S2) in the early layers and
//! moves to the last position in the middle layers (the name movers read it there).
//!
//! # Here
//!
//! ONE `trace!` per layer `l`, written once for every family (generic over `Decoder`), two invokes: the clean prompt, then the corrupted prompt
//! `seq + 2` times (one batch row each): row 0 as it is, row `1 + p` with the clean block
//! output at position `p` (`model.layers()[l].output[r, p] = clean[0, p]`, GPT-2's
//! `model.transformer.h[l]`), the last row
//! with it at every position. The IO and S answer tokens are read from the prompts: at the last
//! position where clean and corrupted differ, the clean token is S and the corrupted one IO.
//! Printed: both logit differences and the table of normalized effects, layers × positions, with
//! an `all` column (the whole residual stream patched: must be 1).
//!
//! Run: `cargo run --release --example ioi_patching -- <checkpoint dir> [options]`, the folder
//! with `config.json`, `model.safetensors`, `tokenizer.json` (its `model_type` picks the
//! architecture). Options:
//!
//! - `--io NAME --s NAME`: the names (default Mary, John);
//! - `--template TEXT`: the clean prompt with `{IO}` and `{S}` (default "When {IO} and {S} went
//!   to the store, {S} gave a drink to"); the corrupted prompt has `{IO}` for the last `{S}`;
//! - `--clean TEXT --corrupt TEXT`: both prompts as they are (same number of tokens).

use std::error::Error;
use std::path::PathBuf;

use nnsight::models::auto::AutoLanguageModel;
use nnsight::models::causal::Decoder;
use nnsight::prelude::*;
use nnsight::{with_family, LanguageModel, TextModel};

const USAGE: &str = "usage: ioi_patching <checkpoint dir with config.json, model.safetensors, tokenizer.json> \
                     [--io NAME] [--s NAME] [--template TEXT with {IO} and {S}] [--clean TEXT --corrupt TEXT]";
const DEFAULT_TEMPLATE: &str = "When {IO} and {S} went to the store, {S} gave a drink to";

/// The two prompts and the answer tokens.
#[derive(Clone, Debug)]
pub struct Task {
    /// Clean prompt (answer: IO).
    pub clean: String,
    /// Corrupted prompt, the second-clause name swapped (answer: S).
    pub corrupt: String,
}

impl Task {
    /// From names and a template: the clean prompt fills `{IO}` and `{S}`; the corrupted one puts
    /// IO where the template's last `{S}` is.
    pub fn from_template(template: &str, io: &str, s: &str) -> Result<Task, Box<dyn Error>> {
        let cut = template.rfind("{S}").ok_or("the template needs `{S}` (the subject, repeated in the second clause)")?;
        if !template.contains("{IO}") {
            return Err("the template needs `{IO}` (the indirect object)".into());
        }
        let fill = |t: &str| t.replace("{IO}", io).replace("{S}", s);
        let clean = fill(template);
        let corrupt = format!("{}{io}{}", fill(&template[..cut]), fill(&template[cut + 3..]));
        Ok(Task { clean, corrupt })
    }
}

/// Result of the experiment.
#[derive(Debug)]
pub struct Patching {
    /// Architecture (`gpt2`, `llama`).
    pub model_type: String,
    /// The prompts.
    pub task: Task,
    /// Tokens of the clean prompt; `clean/corrupt` where they differ.
    pub tokens: Vec<String>,
    /// Answer token ids: indirect object, subject.
    pub io: i64,
    /// See `io`.
    pub s: i64,
    /// Their text.
    pub io_text: String,
    /// See `io_text`.
    pub s_text: String,
    /// `logit(IO) − logit(S)` at the last position, clean run (layer 0's trace).
    pub clean_ld: f64,
    /// The same, corrupted run.
    pub corrupt_ld: f64,
    /// Per layer, the logit differences of one trace: `[clean, corrupted, patched at position
    /// 0, .., patched at position seq − 1, patched at every position]` (see [`patch_rows`]).
    pub ld: Vec<Vec<f64>>,
}

impl Patching {
    /// Number of positions.
    pub fn seq(&self) -> usize {
        self.tokens.len()
    }

    /// Normalized effect of patching the clean block output of `layer` at `position` (`None`:
    /// at every position) into the corrupted run, against that layer's trace's own clean and
    /// corrupted values.
    pub fn effect(&self, layer: usize, position: Option<usize>) -> f64 {
        let row = &self.ld[layer];
        let (clean, corrupt) = (row[0], row[1]);
        let patched = match position {
            Some(p) => row[2 + p],
            None => row[2 + self.seq()],
        };
        (patched - corrupt) / (clean - corrupt)
    }
}

/// `logit(io) − logit(s)` at the last position, one value per row: `[batch]`. The batch is
/// left-padded, so the last position is every row's last token.
pub fn logit_diff(logits: &Tensor, io: i64, s: i64) -> Tensor {
    let last = logits.select(1, -1).to_kind(Kind::Double);
    last.select(1, io) - last.select(1, s)
}

/// The corrupted rows of one layer's trace, as the positions each one gets from the clean run:
/// none (the corrupted baseline), each position alone, all positions.
pub fn patch_rows(seq: usize) -> Vec<Vec<i64>> {
    let seq = seq as i64;
    let mut rows = vec![vec![]];
    rows.extend((0..seq).map(|p| vec![p]));
    rows.push((0..seq).collect());
    rows
}

/// Any supported family (generic over [`Decoder`]): one trace per layer, two invokes: the clean
/// prompt, then the corrupted prompt once per row of [`patch_rows`]; row `r` gets the clean
/// output of layer `layer` (the residual stream) at its positions. Returns the logit
/// differences `[clean, row 0, row 1, ..]` per layer.
pub fn patch<M: Decoder + TextModel>(model: &LanguageModel<M>, model_type: &str, task: &Task) -> Result<Patching, Box<dyn Error>> {
    let p = Prepared::new(model, task)?;
    let (io, s) = (p.io, p.s);
    let rows = patch_rows(p.tokens.len());
    let corrupted = vec![task.corrupt.clone(); rows.len()];
    let mut ld = Vec::new();
    for layer in 0..model.layers().len() {
        let (clean_ld, patched_ld) = trace!(model, {
            invoke(&task.clean) {
                let clean = model.layers()[layer].output;                    // [1, seq, hidden]
                let clean_ld = logit_diff(&model.output, io, s).save();
            }
            invoke(&corrupted) {
                for (r, positions) in rows.iter().enumerate() {
                    let r = r as i64;
                    for &q in positions {
                        model.layers()[layer].output[r, q] = clean[0, q];
                    }
                }
                (clean_ld, logit_diff(&model.output, io, s).save())
            }
        })?;
        ld.push(Tensor::cat(&[clean_ld, patched_ld], 0));
    }
    p.finish(model, model_type, task, ld)
}

/// Token ids of one prompt (special tokens included, as in the trace).
pub fn ids<M: TextModel>(model: &LanguageModel<M>, text: &str) -> Result<Vec<i64>, Box<dyn Error>> {
    Ok(Vec::try_from(model.tokenize(&[text])?.input_ids.get(0))?)
}

/// One token's text.
pub fn token_text<M: TextModel>(model: &LanguageModel<M>, id: i64) -> Result<String, Box<dyn Error>> {
    model.tokenizer().decode(&[id as u32], false).map_err(|e| e.to_string().into())
}

/// The answer tokens `(io, s)`: at the last position where the prompts differ, the corrupted
/// token is IO and the clean one S. The prompts must have the same number of tokens.
pub fn answer_tokens<M: TextModel>(model: &LanguageModel<M>, task: &Task) -> Result<(i64, i64), Box<dyn Error>> {
    let (a, b) = (ids(model, &task.clean)?, ids(model, &task.corrupt)?);
    if a.len() != b.len() {
        return Err(format!("the clean prompt has {} tokens and the corrupted one {}: positions must line up", a.len(), b.len()).into());
    }
    let p = (0..a.len()).rev().find(|&p| a[p] != b[p]).ok_or("the clean and the corrupted prompt are the same")?;
    Ok((b[p], a[p]))
}

/// What the traces need and the printout shows, read from the prompts (no trace).
pub struct Prepared {
    /// Indirect object token id.
    pub io: i64,
    /// Subject token id.
    pub s: i64,
    /// Tokens of the clean prompt; `clean/corrupt` where they differ.
    pub tokens: Vec<String>,
}

impl Prepared {
    /// Answer tokens and column labels.
    pub fn new<M: TextModel>(model: &LanguageModel<M>, task: &Task) -> Result<Prepared, Box<dyn Error>> {
        let (io, s) = answer_tokens(model, task)?;
        let (clean_ids, corrupt_ids) = (ids(model, &task.clean)?, ids(model, &task.corrupt)?);
        let mut tokens = Vec::with_capacity(clean_ids.len());
        for (&a, &b) in clean_ids.iter().zip(&corrupt_ids) {
            let t = token_text(model, a)?;
            tokens.push(if a == b { t } else { format!("{t}/{}", token_text(model, b)?.trim_start()) });
        }
        Ok(Prepared { io, s, tokens })
    }

    /// The result from the per-layer logit differences `[clean, corrupted rows..]`.
    pub fn finish<M: TextModel>(
        self,
        model: &LanguageModel<M>,
        model_type: &str,
        task: &Task,
        ld: Vec<Tensor>,
    ) -> Result<Patching, Box<dyn Error>> {
        let ld: Vec<Vec<f64>> = ld.into_iter().map(Vec::<f64>::try_from).collect::<Result<_, _>>()?;
        Ok(Patching {
            model_type: model_type.to_string(),
            task: task.clone(),
            io_text: token_text(model, self.io)?,
            s_text: token_text(model, self.s)?,
            tokens: self.tokens,
            io: self.io,
            s: self.s,
            clean_ld: ld[0][0],
            corrupt_ld: ld[0][1],
            ld,
        })
    }
}

/// The printout: prompts, logit differences, the effect table.
pub fn format_patching(r: &Patching) -> String {
    let mut out = format!("IOI activation patching ({}), residual stream = block outputs\n", r.model_type);
    out += &format!("  clean:     {:?}\n  corrupted: {:?}\n", r.task.clean, r.task.corrupt);
    out += &format!("  IO = {:?} (id {}), S = {:?} (id {})\n", r.io_text, r.io, r.s_text, r.s);
    out += &format!("  logit(IO) - logit(S) at the last position: clean {:+.4}, corrupted {:+.4}\n", r.clean_ld, r.corrupt_ld);
    out += "\nNormalized patching effect (LD(patched) - LD(corrupt)) / (LD(clean) - LD(corrupt)),\n";
    out += "clean block output patched into the corrupted run at one (layer, position):\n";
    let mut heads: Vec<String> = r.tokens.iter().map(|t| format!("{t:?}")).collect();
    heads.push("all".into());
    let width: Vec<usize> = heads.iter().map(|h| h.chars().count().max(6)).collect();
    out += &format!("{:>5} ", "layer");
    for (h, w) in heads.iter().zip(&width) {
        out += &format!(" {h:>w$}");
    }
    out += "\n";
    for l in 0..r.ld.len() {
        out += &format!("{l:>5} ");
        let cells = (0..r.seq()).map(Some).chain([None]);
        for (p, w) in cells.zip(&width) {
            let e = r.effect(l, p);
            let e = if e.abs() < 5e-4 { 0.0 } else { e }; // no "-0.000"
            out += &format!(" {:>w$}", format!("{e:+.3}"));
        }
        out += "\n";
    }
    out += "(all: the whole residual stream of that layer patched, which must restore the clean run: 1)\n";
    out
}

/// Parses `args` (`<dir> [options]`, see the file's docs): the folder and the task.
pub fn parse_args(args: &[String]) -> Result<(PathBuf, Task), Box<dyn Error>> {
    let dir = PathBuf::from(args.first().ok_or(USAGE)?);
    let (mut io, mut s, mut template) = ("Mary".to_string(), "John".to_string(), DEFAULT_TEMPLATE.to_string());
    let (mut clean, mut corrupt) = (None, None);
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--io" => io = value()?,
            "--s" => s = value()?,
            "--template" => template = value()?,
            "--clean" => clean = Some(value()?),
            "--corrupt" => corrupt = Some(value()?),
            _ => return Err(format!("unknown argument {flag:?}\n{USAGE}").into()),
        }
    }
    let task = match (clean, corrupt) {
        (Some(clean), Some(corrupt)) => Task { clean, corrupt },
        (None, None) => Task::from_template(&template, &io, &s)?,
        _ => return Err("give both --clean and --corrupt, or neither".into()),
    };
    Ok((dir, task))
}

/// The whole example on `args`: prints and returns the result.
pub fn run(args: &[String]) -> Result<Patching, Box<dyn Error>> {
    let (dir, task) = parse_args(args)?;
    // The family named by config.json's model_type; one generic `patch` for all of them.
    let model = AutoLanguageModel::from_pretrained(&dir)?;
    let r = with_family!(&model, |m| patch(m, model.model_type(), &task))?;
    print!("{}", format_patching(&r));
    Ok(r)
}

#[allow(dead_code)] // unused where the smoke test includes this file as a module
fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    run(&args).map(drop)
}
