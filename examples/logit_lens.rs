//! The logit lens (nostalgebraist, 2020, "interpreting GPT: the logit lens") on a Hugging Face
//! checkpoint of any supported family (GPT-2, Llama, ...: see `nnsight::models::auto`).
//!
//! # The method
//!
//! A decoder-only transformer turns its last hidden state into next-token logits with the final
//! norm and the unembedding: `logits = lm_head(ln_f(h_last))`. The logit lens applies the same
//! two maps to the residual stream *after every block* (and to the embeddings before the first),
//! `lm_head(ln_f(h_l))`, reading each layer as if the model stopped there: what would it predict
//! at each position now? In GPT-2 the prediction typically takes shape over the middle layers
//! and sharpens towards the last one, where the lens is the model's own output.
//!
//! # Here
//!
//! ONE `trace!`, written once for every family (generic over `Decoder`): for the input of
//! layer 0 (the embeddings) and the output of every layer, `model.unembed(&h)` (the final norm
//! and the unembedding, `lm_head(ln_f(h))` on GPT-2) inside the trace becomes one graph node
//! (the modules called inside an intervention run untraced, as plain functions), reduced at once
//! to the top token and its probability at every position. Printed per layer: the top token at
//! each position (decoded with the tokenizer) and its probability; written: a PNG heatmap,
//! layers × positions, colour = probability of the top token, with the token text when a
//! TrueType font is found (`NNSIGHT_FONT=/path/to/font.ttf`, else a few usual system paths).
//!
//! Run: `cargo run --release --example logit_lens -- <checkpoint dir> [prompt] [png path]`
//! The folder holds `config.json`, `model.safetensors` and `tokenizer.json` (e.g. a download of
//! `gpt2`); its `model_type` picks the architecture (`AutoLanguageModel`). The PNG goes to
//! `target/logit_lens.png` unless a path is given.

use std::error::Error;
use std::path::{Path, PathBuf};

use nnsight::models::auto::AutoLanguageModel;
use nnsight::models::causal::Decoder;
use nnsight::prelude::*;
use nnsight::{with_family, LanguageModel, TextModel};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

#[path = "common/font.rs"]
mod font;
use font::load_font;

const USAGE: &str = "usage: logit_lens <checkpoint dir with config.json, model.safetensors, tokenizer.json> [prompt] [png path]";
const DEFAULT_PROMPT: &str = "The Eiffel Tower is in the city of";
const DEFAULT_PNG: &str = "target/logit_lens.png";

/// What the lens read: one row per layer (`emb` = the input of block 0, then every block's
/// output), one column per input position.
#[derive(Debug)]
pub struct Lens {
    /// Architecture, for the titles (`gpt2`, `llama`; empty until [`load_and_run`] sets it).
    pub model_type: String,
    /// The prompt.
    pub prompt: String,
    /// The input tokens, decoded one by one.
    pub input: Vec<String>,
    /// Row names: `emb`, `0`, `1`, ...
    pub layers: Vec<String>,
    /// Top token id `[layer][position]`.
    pub top_ids: Vec<Vec<i64>>,
    /// Top token, decoded `[layer][position]`.
    pub top_tokens: Vec<Vec<String>>,
    /// Its probability `[layer][position]`.
    pub probs: Vec<Vec<f64>>,
}

/// Top token of every position: `(probability [batch, seq] f32, id [batch, seq] i64)`.
pub fn top1(logits: &Tensor) -> (Tensor, Tensor) {
    logits.softmax(-1, Kind::Float).max_dim(-1, false)
}

/// The lens on any supported family (generic over [`Decoder`]): one trace; for the embeddings
/// (layer 0's input) and every layer's output `h`, `(probability, id)` of the top token of
/// `unembed(h)` = the final norm then the unembedding (then Gemma 2's final soft-cap), each
/// `[1, seq]`. `model.layers()` is the family's own list (`transformer.h`, `model.layers`,
/// `gpt_neox.layers`).
pub fn lens<M: Decoder + TextModel>(model: &LanguageModel<M>, prompt: &str) -> Result<Lens, Box<dyn Error>> {
    let n_layers = model.layers().len();
    let rows = trace!(model, prompt, {
        // The embeddings are what layer 0 receives.
        let emb = model.layers()[0].input;
        let mut rows = vec![top1(&model.unembed(&emb)).save()];
        for l in 0..n_layers {
            let h = model.layers()[l].output;
            rows.push(top1(&model.unembed(&h)).save());
        }
        rows
    })?;
    decode_lens(model, prompt, rows)
}

/// One token's text, special tokens kept (`<|endoftext|>`, `<s>`).
pub fn token_text<M: TextModel>(model: &LanguageModel<M>, id: i64) -> Result<String, Box<dyn Error>> {
    model.tokenizer().decode(&[id as u32], false).map_err(|e| e.to_string().into())
}

/// The lens's `(probability, id)` rows with the tokens decoded.
pub fn decode_lens<M: TextModel>(
    model: &LanguageModel<M>,
    prompt: &str,
    rows: Vec<(Tensor, Tensor)>,
) -> Result<Lens, Box<dyn Error>> {
    let batch = model.tokenize(&[prompt])?;
    let ids: Vec<i64> = Vec::try_from(batch.input_ids.get(0))?;
    let mut lens = Lens {
        model_type: String::new(),
        prompt: prompt.to_string(),
        input: ids.iter().map(|&i| token_text(model, i)).collect::<Result<_, _>>()?,
        layers: std::iter::once("emb".to_string()).chain((0..rows.len() - 1).map(|l| l.to_string())).collect(),
        top_ids: Vec::new(),
        top_tokens: Vec::new(),
        probs: Vec::new(),
    };
    for (p, i) in &rows {
        let ids: Vec<i64> = Vec::try_from(i.get(0))?;
        lens.top_tokens.push(ids.iter().map(|&i| token_text(model, i)).collect::<Result<_, _>>()?);
        lens.top_ids.push(ids);
        lens.probs.push(Vec::try_from(p.get(0).to_kind(Kind::Double))?);
    }
    Ok(lens)
}

/// A token as a short quoted string for tables (`" Paris"`), at most `max` characters inside.
pub fn quoted(t: &str, max: usize) -> String {
    let e: String = t.escape_debug().collect();
    match e.char_indices().nth(max) {
        Some((cut, _)) => format!("\"{}…\"", &e[..cut]),
        None => format!("\"{e}\""),
    }
}

/// The table: one line per layer, `"token" probability` per position.
pub fn format_lens(lens: &Lens) -> String {
    let cells: Vec<Vec<String>> = lens
        .top_tokens
        .iter()
        .zip(&lens.probs)
        .map(|(t, p)| t.iter().zip(p).map(|(t, p)| format!("{} {p:.2}", quoted(t, 10))).collect())
        .collect();
    let heads: Vec<String> = lens.input.iter().enumerate().map(|(i, t)| format!("{i}:{}", quoted(t, 10))).collect();
    let width: Vec<usize> =
        (0..heads.len()).map(|p| cells.iter().map(|r| r[p].chars().count()).chain([heads[p].chars().count()]).max().unwrap_or(0)).collect();
    let mut s =
        format!("Logit lens ({}): top next token and its probability, per layer (rows) and input position (columns)\n", lens.model_type);
    s += &format!("prompt: {:?}\n", lens.prompt);
    s += &format!("{:>5} ", "layer");
    for (h, w) in heads.iter().zip(&width) {
        s += &format!(" {h:<w$}");
    }
    s += "\n";
    for (name, row) in lens.layers.iter().zip(&cells) {
        s += &format!("{name:>5} ");
        for (c, w) in row.iter().zip(&width) {
            s += &format!(" {c:<w$}");
        }
        s += "\n";
    }
    s
}

/// Loads the checkpoint in `dir` (the family its `config.json`'s `model_type` names) and runs
/// the lens.
pub fn load_and_run(dir: &Path, prompt: &str) -> Result<Lens, Box<dyn Error>> {
    let model = AutoLanguageModel::from_pretrained(dir)?;
    let mut lens = with_family!(&model, |m| lens(m, prompt))?;
    lens.model_type = model.model_type().to_string();
    Ok(lens)
}

/// The whole example on `args` (`<dir> [prompt] [png]`): prints the table, writes the PNG.
pub fn run(args: &[String]) -> Result<Lens, Box<dyn Error>> {
    let dir = PathBuf::from(args.first().ok_or(USAGE)?);
    let prompt = args.get(1).map(String::as_str).unwrap_or(DEFAULT_PROMPT);
    let png = PathBuf::from(args.get(2).map(String::as_str).unwrap_or(DEFAULT_PNG));
    let lens = load_and_run(&dir, prompt)?;
    print!("{}", format_lens(&lens));
    let with_text = heatmap(&png, &lens)?;
    println!("\nHeatmap: {}", png.display());
    if !with_text {
        println!("  (no TrueType font found: drawn without text; set NNSIGHT_FONT=/path/to/font.ttf for labels)");
    }
    Ok(lens)
}

#[allow(dead_code)] // unused where the smoke test includes this file as a module
fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    run(&args).map(drop)
}

/// White (0) to dark blue (1).
fn blues(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * v).round() as u8;
    RGBColor(mix(247, 8), mix(251, 48), mix(255, 107))
}

/// The heatmap PNG: layers (rows, `emb` on top) × positions, colour = probability of the top
/// token, the token and its probability in each cell. Returns whether text could be drawn.
pub fn heatmap(path: &Path, lens: &Lens) -> Result<bool, Box<dyn Error>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let with_text = load_font();
    let (n_rows, seq) = (lens.layers.len() as i32, lens.input.len() as i32);
    let (cw, ch) = (92, 34);
    let (left, top, label_h, bar_h) = (60, 44, 40, 60);
    let width = (left + seq * cw + 20).max(720) as u32; // room for the title
    let height = (top + n_rows * ch + label_h + bar_h) as u32;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let font = |size: i32, color: RGBColor, h: HPos| ("sans-serif", size).into_font().color(&color).pos(Pos::new(h, VPos::Center));
    let short = |t: &str| {
        let t = t.replace('\n', "\\n");
        if t.chars().count() > 11 {
            format!("{}…", t.chars().take(10).collect::<String>())
        } else {
            t
        }
    };
    if with_text {
        let title = format!("logit lens ({}): top token of lm_head(norm(h)) per layer; colour = its probability", lens.model_type);
        root.draw(&Text::new(title, (10, 16), font(15, BLACK, HPos::Left)))?;
    }
    for (r, name) in lens.layers.iter().enumerate() {
        let y = top + r as i32 * ch;
        if with_text {
            root.draw(&Text::new(name.as_str(), (left - 8, y + ch / 2), font(13, BLACK, HPos::Right)))?;
        }
        for p in 0..seq as usize {
            let x = left + p as i32 * cw;
            let v = lens.probs[r][p];
            root.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], blues(v).filled()))?;
            if with_text {
                let ink = if v > 0.55 { WHITE } else { BLACK };
                root.draw(&Text::new(short(&lens.top_tokens[r][p]), (x + cw / 2, y + ch / 2 - 7), font(12, ink, HPos::Center)))?;
                root.draw(&Text::new(format!("{v:.2}"), (x + cw / 2, y + ch / 2 + 8), font(10, ink, HPos::Center)))?;
            }
        }
    }
    let grid_bottom = top + n_rows * ch;
    root.draw(&Rectangle::new([(left, top), (left + seq * cw, grid_bottom)], BLACK.stroke_width(1)))?;
    if with_text {
        for (p, t) in lens.input.iter().enumerate() {
            let x = left + p as i32 * cw + cw / 2;
            root.draw(&Text::new(short(t), (x, grid_bottom + 12), font(12, BLACK, HPos::Center)))?;
            root.draw(&Text::new(format!("{p}"), (x, grid_bottom + 28), font(10, BLACK, HPos::Center)))?;
        }
    }
    // Colour bar 0 .. 1.
    let (bx, by, bw) = (left, grid_bottom + label_h + 12, (seq * cw / 2).max(100));
    for i in 0..bw {
        let v = i as f64 / (bw - 1) as f64;
        root.draw(&Rectangle::new([(bx + i, by), (bx + i + 1, by + 14)], blues(v).filled()))?;
    }
    root.draw(&Rectangle::new([(bx, by), (bx + bw, by + 14)], BLACK.stroke_width(1)))?;
    if with_text {
        root.draw(&Text::new("0", (bx, by + 26), font(11, BLACK, HPos::Center)))?;
        root.draw(&Text::new("1", (bx + bw, by + 26), font(11, BLACK, HPos::Center)))?;
        root.draw(&Text::new("probability of the top token", (bx + bw + 16, by + 7), font(12, BLACK, HPos::Left)))?;
    }
    root.present()?;
    Ok(with_text)
}
