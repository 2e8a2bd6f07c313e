//! Attribution patching on the real all-MiniLM-L6-v2: a gradient-based estimate of activation
//! patching for every (layer, position) at once, checked against true activation patching.
//!
//! # The method
//!
//! *Activation patching* asks how much one activation matters: run a **corrupted** input, but
//! overwrite one activation (here: layer `l`'s output at token position `p`) with its value from
//! the **clean** run, and measure how far a metric moves back towards its clean value. That is
//! one forward pass per (layer, position).
//!
//! *Attribution patching* (Neel Nanda, 2023, "Attribution Patching: Activation Patching At
//! Industrial Scale"; Syed, Rager & Conmy, 2023, "Attribution Patching Outperforms Automated
//! Circuit Discovery") replaces each of those passes by the first-order Taylor term around the
//! corrupted run. With `a` an activation, `M` the metric and `Δa = a_clean − a_corrupt`:
//!
//! ```text
//! M(patched) − M(corrupt)  ≈  ∂M/∂a |corrupt · (a_clean − a_corrupt)
//! score(l, p) = Σ_h  grad_corrupt[l, p, h] · (act_clean[l, p, h] − act_corrupt[l, p, h])
//! ```
//!
//! so a single forward pass over both inputs and one backward pass give the estimate for every
//! (layer, position) together.
//!
//! # Here
//!
//! The model is a sentence encoder, so the metric is the cosine similarity between the run's
//! sentence embedding (mean-pooled, normalized last hidden state) and the clean sentence's
//! embedding: 1 for the clean run, lower for the corrupted one. One `trace!` with two invokes
//! (clean, corrupted) saves every layer's output in both, and the `.grad` of every layer's
//! output in the corrupted invoke after `.backward()` on the corrupted invoke's metric.
//!
//! # The output
//!
//! - the metric for the clean and the corrupted run, and the gap between them;
//! - the ten (layer, position) pairs with the largest |attribution score|, each with the true
//!   patching effect `M(patched) − M(corrupt)` beside it (one trace per pair; all 6 × 14 pairs
//!   are patched, which takes a few seconds on CPU), and the correlation of the two over all
//!   pairs. A positive score: patching that activation to its clean value moves the corrupted
//!   embedding back towards the clean one, by about that much cosine similarity;
//! - a PNG with both maps as heatmaps (layers × positions, red = towards clean, blue = away),
//!   written to `target/attribution_patching.png` or to the path given as first argument. Token
//!   labels need a TrueType font: `NNSIGHT_FONT=/path/to/font.ttf`, else a few usual system
//!   paths are tried, else the PNG has no text and the legend is printed here.
//!
//! Run: `cargo run --release --example attribution_patching` (after `cargo xtask setup`).

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use nnsight::models::bert::mean_pool_normalize;
use nnsight::prelude::*;
use nnsight::{Bert, LanguageModel};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

#[path = "common/font.rs"]
mod font;
use font::load_font;

const CLEAN: &str = "The Eiffel Tower is in the city of Paris.";
const CORRUPT: &str = "The Eiffel Tower is in the city of Rome.";
const TOP: usize = 10;

/// Cosine similarity of a `[1, hidden]` unit embedding with the `[hidden]` unit `target`.
fn similarity(emb: &Tensor, target: &Tensor) -> f64 {
    (emb.get(0) * target).sum(Kind::Double).double_value(&[])
}

/// Pearson correlation of two equally long series.
fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

/// Spearman rank correlation: Pearson on the ranks (no ties expected in float scores).
fn spearman(x: &[f64], y: &[f64]) -> f64 {
    let ranks = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        for (rank, &i) in idx.iter().enumerate() {
            r[i] = rank as f64;
        }
        r
    };
    pearson(&ranks(x), &ranks(y))
}

fn main() -> Result<(), Box<dyn Error>> {
    let png = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/attribution_patching.png"));
    let dir = std::env::var("NNSIGHT_MINILM_DIR").map_err(|_| "NNSIGHT_MINILM_DIR is not set: run `cargo xtask setup`")?;
    let model = LanguageModel::<Bert>::from_pretrained(&dir)?;
    let n_layers = model.encoder.layer.len();

    // Both sentences must have the same number of tokens, so that positions line up.
    let (clean_tok, corrupt_tok) = (model.tokenize(&[CLEAN])?, model.tokenize(&[CORRUPT])?);
    let seq = clean_tok.seq_len();
    if corrupt_tok.seq_len() != seq {
        let n = corrupt_tok.seq_len();
        return Err(format!("clean has {seq} tokens, corrupted {n}: pick a corruption of the same length").into());
    }
    let tokens: Vec<String> = clean_tok.tokens[0]
        .iter()
        .zip(&corrupt_tok.tokens[0])
        .map(|(a, b)| if a == b { a.clone() } else { format!("{a}/{b}") })
        .collect();
    let mask = clean_tok.attention_mask.shallow_clone(); // all ones, [1, seq]: no padding
    println!("all-MiniLM-L6-v2: {n_layers} layers, hidden {}, {seq} tokens", model.config.hidden_size);
    println!("  clean:     {CLEAN}\n  corrupted: {CORRUPT}");
    println!("  tokens:    {}", tokens.join(" "));

    // The clean sentence embedding, once, as a plain tensor.
    let clean_emb = mean_pool_normalize(&model.forward(&[CLEAN])?, &mask).get(0);

    // One trace, two invokes: activations of both runs, gradients of the corrupted run.
    let t = Instant::now();
    let (clean_acts, corrupt_acts, grads, corrupt_metric) = trace!(model, {
        invoke(CLEAN) {
            let mut clean_acts = Vec::new();
            for l in 0..n_layers {
                clean_acts.push(model.encoder.layer[l].output.save());
            }
        }
        invoke(CORRUPT) {
            let mut corrupt_acts = Vec::new();
            let mut grads = Vec::new();
            for l in 0..n_layers {
                corrupt_acts.push(model.encoder.layer[l].output.save());
                grads.push(model.encoder.layer[l].output.grad.save());
            }
            let metric = (mean_pool_normalize(&model.encoder.layer[-1].output, &mask).get(0) * &clean_emb).sum(Kind::Float);
            metric.backward();
            (clean_acts, corrupt_acts, grads, metric.save())
        }
    })?;
    let attribution_s = t.elapsed().as_secs_f64();
    let corrupt_metric = corrupt_metric.double_value(&[]);
    println!("\nmetric = cos(sentence embedding, clean embedding)");
    println!("  clean run 1.0000, corrupted run {corrupt_metric:.4}, gap {:.4}", 1.0 - corrupt_metric);

    // score[l][p] = Σ_h grad_corrupt · (act_clean − act_corrupt), all in one go per layer.
    let attr: Vec<Vec<f64>> = (0..n_layers)
        .map(|l| {
            let s = (&grads[l] * (&clean_acts[l] - &corrupt_acts[l])).sum_dim_intlist([2i64].as_slice(), false, Kind::Double);
            Vec::<f64>::try_from(s.get(0)).expect("scores")
        })
        .collect();

    // True activation patching: one trace per (layer, position), clean value into the corrupted run.
    let t = Instant::now();
    let mut truth = vec![vec![0.0; seq as usize]; n_layers];
    #[allow(clippy::needless_range_loop)] // l also selects the layer inside the trace
    for l in 0..n_layers {
        for p in 0..seq {
            let emb = tch::no_grad(|| {
                trace!(model, CORRUPT, {
                    model.encoder.layer[l].output[.., p] = clean_acts[l].get(0).get(p);
                    mean_pool_normalize(&model.encoder.layer[-1].output, &mask).save()
                })
            })?;
            truth[l][p as usize] = similarity(&emb, &clean_emb) - corrupt_metric;
        }
    }
    let patching_s = t.elapsed().as_secs_f64();
    // Cross-check of the patching traces at the last layer, where the effect can be computed
    // by hand from the saved activations.
    let last = n_layers - 1;
    let by_hand_err = (0..seq)
        .map(|p| {
            let h = corrupt_acts[last].copy();
            h.get(0).get(p).copy_(&clean_acts[last].get(0).get(p)); // a view: writes into h
            (similarity(&mean_pool_normalize(&h, &mask), &clean_emb) - corrupt_metric - truth[last][p as usize]).abs()
        })
        .fold(0.0, f64::max);

    let cells: Vec<(usize, usize)> = (0..n_layers).flat_map(|l| (0..seq as usize).map(move |p| (l, p))).collect();
    let mut ranked = cells.clone();
    ranked.sort_by(|a, b| attr[b.0][b.1].abs().total_cmp(&attr[a.0][a.1].abs()));
    let top: Vec<(usize, usize)> = ranked[..TOP].to_vec();
    println!("\nTop {TOP} (layer, position) by |attribution|; true = M(patched) − M(corrupt):");
    println!("  {:>5} {:>3}  {:<12} {:>11} {:>11}", "layer", "pos", "token", "attribution", "true");
    for &(l, p) in &top {
        println!("  {l:>5} {p:>3}  {:<12} {:>+11.5} {:>+11.5}", tokens[p], attr[l][p], truth[l][p]);
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = cells.iter().map(|&(l, p)| (attr[l][p], truth[l][p])).unzip();
    println!("\nAgreement over all {} (layer, position) pairs:", cells.len());
    println!("  Pearson {:.4}, Spearman {:.4}", pearson(&xs, &ys), spearman(&xs, &ys));
    println!("  per layer (Pearson over positions):");
    for l in 0..n_layers {
        let r = pearson(&attr[l], &truth[l]);
        let (sa, st): (f64, f64) = (attr[l].iter().sum(), truth[l].iter().sum());
        println!("    layer {l}: r {r:+.4}   sum attribution {sa:+.4}   sum true {st:+.4}");
    }
    let miss = |&(l, p): &(usize, usize)| (attr[l][p] - truth[l][p]).abs();
    let &(wl, wp) = cells.iter().max_by(|a, b| miss(a).total_cmp(&miss(b))).expect("cells");
    println!(
        "  largest disagreement: layer {wl}, position {wp} ({}): attribution {:+.4}, true {:+.4}\n  \
         (the linear estimate is off where the patch is a large step through non-linear parts)",
        tokens[wp], attr[wl][wp], truth[wl][wp]
    );
    println!("\nTime: attribution (1 forward + 1 backward) {attribution_s:.3} s, true patching ({} traces) {patching_s:.2} s", cells.len());
    println!("Check: last-layer patching traces vs the same patch by hand: max difference {by_hand_err:.1e}");

    let with_text = heatmap(&png, &tokens, &attr, &truth, &top)?;
    println!("\nHeatmap: {}", png.display());
    if !with_text {
        println!("  (no TrueType font found: drawn without text; set NNSIGHT_FONT=/path/to/font.ttf for labels)");
        let scale = attr.iter().chain(&truth).flatten().fold(0.0f64, |m, v| m.max(v.abs()));
        println!("  top panel: attribution, bottom panel: true patching; colour blue −{scale:.3} .. white 0 .. red +{scale:.3}");
        println!("  outlined: top {TOP} by |attribution|; rows: layer 0 (top) .. {last}; columns: positions");
        for (p, t) in tokens.iter().enumerate() {
            println!("    {p:>2} {t}");
        }
    }
    Ok(())
}

/// Red for positive, blue for negative, white at 0; `v` in [-1, 1].
fn diverging(v: f64) -> RGBColor {
    let v = v.clamp(-1.0, 1.0);
    let fade = |c: u8, t: f64| (255.0 + (c as f64 - 255.0) * t).round() as u8;
    if v >= 0.0 {
        RGBColor(fade(178, v), fade(24, v), fade(43, v))
    } else {
        RGBColor(fade(33, -v), fade(102, -v), fade(172, -v))
    }
}

/// Two heatmaps (attribution, true patching) on one colour scale; the top cells outlined.
/// Returns whether text could be drawn.
fn heatmap(
    path: &PathBuf,
    tokens: &[String],
    attr: &[Vec<f64>],
    truth: &[Vec<f64>],
    top: &[(usize, usize)],
) -> Result<bool, Box<dyn Error>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let with_text = load_font();
    let (n_layers, seq) = (attr.len() as i32, tokens.len() as i32);
    let (cw, ch) = (78, 34); // cell size
    let (left, top_margin, label_h, panel_gap, bar_h) = (90, 50, 34, 50, 70);
    let panel_h = n_layers * ch;
    let width = (left + seq * cw + 30) as u32;
    let height = (top_margin + 2 * (panel_h + label_h) + panel_gap + bar_h) as u32;
    let scale = attr.iter().chain(truth).flatten().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);

    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let font = |size: i32, h: HPos, v: VPos| ("sans-serif", size).into_font().color(&BLACK).pos(Pos::new(h, v));
    if with_text {
        root.draw(&Text::new(
            format!("MiniLM: metric change from patching clean → corrupted (\"{CLEAN}\" → \"{CORRUPT}\")"),
            (10, 18),
            font(15, HPos::Left, VPos::Center),
        ))?;
    }
    let panels = [
        ("attribution patching: grad · (clean − corrupt)", attr),
        ("true activation patching: M(patched) − M(corrupt)", truth),
    ];
    for (panel, (title, data)) in panels.into_iter().enumerate() {
        let y0 = top_margin + panel as i32 * (panel_h + label_h + panel_gap);
        if with_text {
            root.draw(&Text::new(title, (left, y0 - 12), font(14, HPos::Left, VPos::Center)))?;
        }
        for l in 0..n_layers {
            let y = y0 + l * ch;
            if with_text {
                root.draw(&Text::new(format!("layer {l}"), (left - 8, y + ch / 2), font(13, HPos::Right, VPos::Center)))?;
            }
            for p in 0..seq {
                let x = left + p * cw;
                let v = data[l as usize][p as usize];
                root.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], diverging(v / scale).filled()))?;
                if top.contains(&(l as usize, p as usize)) {
                    root.draw(&Rectangle::new([(x + 1, y + 1), (x + cw - 2, y + ch - 2)], BLACK.stroke_width(2)))?;
                }
                if with_text {
                    root.draw(&Text::new(format!("{:+.3}", v), (x + cw / 2, y + ch / 2), font(11, HPos::Center, VPos::Center)))?;
                }
            }
        }
        root.draw(&Rectangle::new([(left, y0), (left + seq * cw, y0 + panel_h)], BLACK.stroke_width(1)))?;
        if with_text {
            for (p, t) in tokens.iter().enumerate() {
                let x = left + p as i32 * cw + cw / 2;
                root.draw(&Text::new(t.as_str(), (x, y0 + panel_h + 10), font(12, HPos::Center, VPos::Center)))?;
                root.draw(&Text::new(format!("{p}"), (x, y0 + panel_h + 25), font(10, HPos::Center, VPos::Center)))?;
            }
        }
    }
    // Colour bar: −scale .. +scale.
    let (bx, by, bw) = (left, height as i32 - bar_h + 20, seq * cw / 2);
    for i in 0..bw {
        let v = 2.0 * i as f64 / (bw - 1) as f64 - 1.0;
        root.draw(&Rectangle::new([(bx + i, by), (bx + i + 1, by + 16)], diverging(v).filled()))?;
    }
    root.draw(&Rectangle::new([(bx, by), (bx + bw, by + 16)], BLACK.stroke_width(1)))?;
    if with_text {
        root.draw(&Text::new(format!("{:+.3}", -scale), (bx, by + 28), font(11, HPos::Center, VPos::Center)))?;
        root.draw(&Text::new("0", (bx + bw / 2, by + 28), font(11, HPos::Center, VPos::Center)))?;
        root.draw(&Text::new(format!("{:+.3}", scale), (bx + bw, by + 28), font(11, HPos::Center, VPos::Center)))?;
        root.draw(&Text::new(
            "red: towards the clean embedding; outlined: top by |attribution|",
            (bx + bw + 20, by + 8),
            font(12, HPos::Left, VPos::Center),
        ))?;
    }
    root.present()?;
    Ok(with_text)
}
