//! Bundled model architectures, written in tch with every submodule hookable.
//!
//! Each model family lives in its own file, with a `Config` deserialised from the checkpoint's
//! `config.json` (the checkpoint's own field names) and modules built under `tch::nn::Path`s
//! whose dotted names are the Hugging Face safetensors keys, so the module path a user writes
//! in `trace!` (`encoder.layer.0.attention.self.query`) is the checkpoint key prefix.
//!
//! Every hook point declares its batch layout (see [`crate::activation`]): [`ROWS`] for values
//! `[batch, ..]`, [`Layout::Shared`] for values every row shares (BERT's position embeddings
//! `[1, seq, hidden]`, the KV cache handle). `nnsight::Tracer::layouts` lists them for a run.
//!
//! [`linear`] is the linear layer they share (libtorch's `linear`, or oneDNN for CPU f32 inference
//! where it was measured faster on the machine).
//!
//! [`load_safetensors`] fills a `VarStore` from a safetensors checkpoint, checking every name
//! and shape first (tch's own `VarStore::load` would silently broadcast a wrongly shaped tensor).

pub mod act;
pub mod auto;
pub mod bert;
pub mod causal;
pub mod checkpoint;
pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod gpt_neox;
pub mod linear;
pub mod llama;
pub mod mistral;
pub mod model_dir;
pub mod olmo2;
pub mod params;
pub mod phi3;
pub mod point;
pub mod qwen2;
pub mod qwen3;
pub mod validate;

use std::path::Path;

use tch::nn;

use crate::activation::Layout;
use crate::error::Result;

pub use model_dir::ModelDir;

/// The batch layout of most of the bundled models' hook points: every tensor `[batch, ..]`,
/// rows on dim 0 (hidden states `[batch, seq, hidden]`, token ids and masks `[batch, seq]`,
/// attention masks `[batch, 1, q, k]`, rotary tables `[batch, seq, head_dim]`).
pub const ROWS: Layout = Layout::Batch(0);

/// The batch layout of [`causal::CausalInput`]: ids, mask and position ids `[batch, ..]`, the
/// KV cache handle shared by every row.
pub const CAUSAL_INPUT: Layout = Layout::Tuple(&[ROWS, ROWS, ROWS, Layout::Shared]);

/// Copies the tensors of the safetensors checkpoint `file` into the variables of `vs`.
///
/// Every variable of `vs` (e.g. `encoder.layer.0.attention.self.query.weight`) must be in the
/// file under its own name, or under its name with one of `prefixes` in front (`"bert."` for
/// checkpoints saved from `BertForMaskedLM` and friends) or removed; Hugging Face's legacy
/// LayerNorm names (`gamma`/`beta` for `weight`/`bias`) are accepted too. Checkpoint tensors
/// that no variable needs (a pooler, a task head, `position_ids` buffers) are ignored. Tensors
/// are converted to the variable's dtype and device. `file` is opened as [`ModelDir`] opens
/// files (a regular file inside its folder), and read as in [`checkpoint`].
///
/// Errors, each naming the file and the key: [`crate::Error::Io`] when the file cannot be read
/// or is not a safetensors file, [`crate::Error::MissingWeight`] for a variable with no tensor
/// in the file (the first missing name in sorted order), [`crate::Error::WeightShape`] for a
/// tensor whose shape differs from the variable's, [`crate::Error::WeightDtype`] for a tensor
/// that is not floating-point. Nothing is copied unless every check passes.
pub fn load_safetensors(vs: &nn::VarStore, file: &Path, prefixes: &[&str]) -> Result<()> {
    let table = checkpoint::Checkpoint::open_file(file)?;
    table.load_into(vs, prefixes)
}

/// [`crate::Error::Io`] unless `dir` is an existing folder.
pub(crate) fn check_model_dir(dir: &Path) -> Result<()> {
    ModelDir::new(dir).map(drop)
}
