//! The main job: real `trace!` experiments on the real all-MiniLM-L6-v2 sentence encoder.
//!
//! 1. Save every layer's output (the residual stream) for two sentences in one forward pass and
//!    print how similar the two sentences look at each layer (mean-pooled, cosine).
//! 2. Ablation: remove each layer's self-attention (zero its output) and print how the final
//!    sentence-embedding similarity moves.
//! 3. Activation patching across two invokes: copy the Paris sentence's hidden state at its
//!    city token into the Rome sentence's city token at one layer, and print how much closer the
//!    Rome embedding moves to the Paris embedding, layer by layer.
//!
//! Run: `cargo run --release --example tour` (after `cargo xtask setup`).

use std::error::Error;

use nnsight::models::bert::mean_pool_normalize;
use nnsight::prelude::*;
use nnsight::{Bert, LanguageModel};

const PARIS: &str = "The Eiffel Tower is in the city of Paris.";
const ROME: &str = "The Colosseum is in the city of Rome.";

/// Cosine similarity of rows 0 and 1 of `[2, hidden]` unit vectors.
fn cosine(e: &Tensor) -> f64 {
    (e.get(0) * e.get(1)).sum(Kind::Double).double_value(&[])
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::var("NNSIGHT_MINILM_DIR").map_err(|_| "NNSIGHT_MINILM_DIR is not set: run `cargo xtask setup`")?;
    let model = LanguageModel::<Bert>::from_pretrained(&dir)?;
    let batch = model.tokenize(&[PARIS, ROME])?;
    let mask = batch.attention_mask.shallow_clone();
    let n_layers = model.encoder.layer.len();
    println!("all-MiniLM-L6-v2: {n_layers} layers, hidden {}", model.config.hidden_size);
    for (row, toks) in batch.tokens.iter().enumerate() {
        println!("  row {row}: {}", toks.join(" "));
    }

    // 1. Every layer's output in one forward pass, and the final sentence embeddings.
    let (layers, embeddings) = trace!(model, [PARIS, ROME], {
        let mut layers = Vec::new();
        for l in 0..n_layers {
            layers.push(model.encoder.layer[l].output.save());
        }
        let emb = mean_pool_normalize(&model.encoder.layer[-1].output, &mask).save();
        (layers, emb)
    })?;
    let clean_sim = cosine(&embeddings);
    println!("\n1. Residual stream, layer by layer: its Frobenius norm over each sentence's real tokens");
    println!("   (padding left out) and the mean-pooled cosine similarity of the two sentences:");
    println!("   layer  shape         norm (Paris)  norm (Rome)  similarity");
    let real = mask.to_kind(Kind::Float).unsqueeze(-1); // [2, seq, 1]: 1 for tokens, 0 for padding
    for (l, h) in layers.iter().enumerate() {
        let sim = cosine(&mean_pool_normalize(h, &mask));
        let norms = (h * &real).square().sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double).sqrt();
        let shape = format!("{:?}", h.size());
        println!("   {l:<5}  {shape:<12}  {:12.2}  {:11.2}  {sim:10.4}", norms.double_value(&[0]), norms.double_value(&[1]));
    }
    println!("   sentence-embedding similarity: {clean_sim:.4}");

    // 2. Ablation: zero one layer's self-attention output at a time.
    println!("\n2. Ablating self-attention (encoder.layer.N.attention.self output := 0):");
    for l in 0..n_layers {
        let emb = trace!(model, [PARIS, ROME], {
            model.encoder.layer[l].attention.self_.output[..] = 0.0;
            mean_pool_normalize(&model.encoder.layer[-1].output, &mask).save()
        })?;
        let sim = cosine(&emb);
        println!("   layer {l}: similarity {sim:.4} ({:+.4} vs clean)", sim - clean_sim);
    }

    // 3. Activation patching: Paris's city token -> Rome's city token, one layer at a time.
    let city = |row: usize, word: &str| batch.tokens[row].iter().position(|t| t == word).expect("token") as i64;
    let (paris_pos, rome_pos) = (city(0, "paris"), city(1, "rome"));
    let paris_emb = embeddings.get(0);
    println!("\n3. Patching `paris` (position {paris_pos}) into `rome` (position {rome_pos}), per layer:");
    println!("   clean: Rome·Paris similarity {clean_sim:.4}");
    for l in 0..n_layers {
        let rome_emb = trace!(model, {
            invoke(PARIS) {
                let source = model.encoder.layer[l].output;
            }
            invoke(ROME) {
                model.encoder.layer[l].output[.., rome_pos] = source[.., paris_pos];
                mean_pool_normalize(&model.encoder.layer[-1].output, &mask.narrow(0, 1, 1)).save()
            }
        })?;
        let sim = (rome_emb.get(0) * &paris_emb).sum(Kind::Double).double_value(&[]);
        println!("   layer {l}: Rome·Paris similarity {sim:.4} ({:+.4})", sim - clean_sim);
    }
    Ok(())
}
