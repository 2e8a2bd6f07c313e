//! Harvest activations of a BERT model over a text dataset into sharded safetensors files plus a
//! manifest (`nnsight::harvest`), with a progress bar.
//!
//! ```sh
//! cargo run --release --example harvest -- --input sentences.txt --out acts \
//!     --hook encoder.layer.3.output --hook embeddings.output
//! cargo run --release --example harvest -- --input data.jsonl --field text --out acts \
//!     --hook encoder.layer.5.output --shard 0/4      # process 0 of 4 (e.g. a Slurm array)
//! ```
//!
//! The model is the set-up's all-MiniLM-L6-v2 unless `--model <BERT folder>` is given. Run the
//! same command again to resume an interrupted harvest. `--help` lists every option.

use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};
use indicatif::{ProgressBar, ProgressStyle};
use nnsight::harvest::{bert_hook_point, harvest, HarvestOptions, Input, Manifest};
use nnsight::tch::Kind;
use nnsight::{Bert, LanguageModel};

fn command() -> Command {
    Command::new("harvest")
        .about("Save chosen hook points of every token of a text dataset to sharded safetensors files")
        .arg(Arg::new("input").long("input").required(true).value_name("FILE").help("text file, one text per line (or JSONL with --field)"))
        .arg(Arg::new("field").long("field").value_name("NAME").help("JSONL: the field holding the text"))
        .arg(Arg::new("out").long("out").required(true).value_name("DIR").help("output folder (created; resumed if it holds a harvest)"))
        .arg(Arg::new("hook").long("hook").required(true).action(ArgAction::Append).value_name("POINT").help("hook point to save, e.g. encoder.layer.3.output (repeat for several)"))
        .arg(Arg::new("model").long("model").value_name("DIR").help("BERT folder (default: the set-up's all-MiniLM-L6-v2)"))
        .arg(Arg::new("batch-size").long("batch-size").default_value("32").value_parser(clap::value_parser!(usize)))
        .arg(Arg::new("rows-per-shard").long("rows-per-shard").default_value("65536").value_parser(clap::value_parser!(usize)))
        .arg(Arg::new("shard").long("shard").default_value("0/1").value_name("I/N").help("harvest batches b with b % N == I"))
        .arg(Arg::new("dtype").long("dtype").default_value("f32").value_parser(["f32", "f16", "bf16"]))
        .arg(Arg::new("skip-empty").long("skip-empty").action(ArgAction::SetTrue).help("skip empty lines instead of stopping"))
        .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue).help("no progress bar"))
}

/// `I/N` as `(I, N)`.
fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("--shard {s:?}: expected I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Runs the command on `args` (without the program name); returns the final manifest or the
/// error's text.
pub fn run(args: &[String]) -> Result<Manifest, String> {
    let m = command().try_get_matches_from(std::iter::once("harvest".to_string()).chain(args.iter().cloned())).map_err(|e| e.to_string())?;
    let s = |k: &str| m.get_one::<String>(k).cloned();
    let (model, name) = match s("model") {
        Some(dir) => (LanguageModel::<Bert>::from_pretrained(&dir).map_err(|e| e.to_string())?, dir),
        None => (nnsight::bundled::minilm().map_err(|e| e.to_string())?, "sentence-transformers/all-MiniLM-L6-v2".to_string()),
    };
    let points = m
        .get_many::<String>("hook")
        .into_iter()
        .flatten()
        .map(|h| bert_hook_point(&model, h))
        .collect::<nnsight::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let input = Input { path: PathBuf::from(s("input").unwrap_or_default()), field: s("field") };
    let mut opts = HarvestOptions::new(name);
    opts.batch_size = *m.get_one("batch-size").unwrap_or(&32);
    opts.rows_per_shard = *m.get_one("rows-per-shard").unwrap_or(&65_536);
    opts.shard = parse_shard(&s("shard").unwrap_or_default())?;
    opts.dtype = match s("dtype").as_deref() {
        Some("f16") => Kind::Half,
        Some("bf16") => Kind::BFloat16,
        _ => Kind::Float,
    };
    opts.skip_empty = m.get_flag("skip-empty");
    let bar = if m.get_flag("quiet") { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {pos} sentences, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let mut tokens = 0u64;
    let started = std::time::Instant::now();
    let b = bar.clone();
    opts.on_batch = Some(Box::new(move |p| {
        tokens += p.tokens;
        b.inc(p.sequences);
        b.set_message(format!("{tokens} tokens, {:.0} tokens/s", tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)));
    }));
    let out = PathBuf::from(s("out").unwrap_or_default());
    let result = harvest(&model, &points, &input, &out, &mut opts);
    bar.finish();
    result.map_err(|e| e.to_string())
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(m) => println!("{} tokens of {} sentences in {} shards", m.tokens, m.sequences, m.shards.len()),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
