//! The real all-MiniLM-L6-v2 model and the Python nnsight reference values.
#![allow(dead_code)]

use std::path::PathBuf;

use nnsight::{Bert, LanguageModel};
use serde_json::Value;

/// The two reference sentences of `fixtures/minilm.json`.
pub const PARIS: &str = "The Eiffel Tower is in the city of Paris.";
pub const ROME: &str = "The Colosseum is in the city of Rome.";

/// The model folder from `NNSIGHT_MINILM_DIR` (set by `.cargo/config.toml` after
/// `cargo xtask setup`); panics with the fix when it is missing.
pub fn minilm_dir() -> PathBuf {
    const HOW: &str = "run `cargo xtask setup` (it downloads all-MiniLM-L6-v2, and .cargo/config.toml \
                       points NNSIGHT_MINILM_DIR at it)";
    let d = PathBuf::from(std::env::var_os("NNSIGHT_MINILM_DIR").unwrap_or_else(|| panic!("NNSIGHT_MINILM_DIR is not set: {HOW}")));
    assert!(
        d.join("model.safetensors").is_file() && d.join("tokenizer.json").is_file(),
        "NNSIGHT_MINILM_DIR={} does not hold the all-MiniLM-L6-v2 model: {HOW}",
        d.display()
    );
    d
}

/// The model with its tokenizer, on CPU.
pub fn minilm() -> LanguageModel<Bert> {
    LanguageModel::<Bert>::from_pretrained(minilm_dir()).expect("load all-MiniLM-L6-v2")
}

/// `values` of one case in `fixtures/minilm.json` (Python nnsight 0.8.1).
pub fn case(name: &str) -> Value {
    let all: Value = serde_json::from_str(include_str!("../fixtures/minilm.json")).unwrap();
    all["cases"][name]["values"].clone()
}

/// `x` as f64 from a JSON number.
pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Relative tolerance 1e-4, as the reference's README asks; `abs` for sums over many elements.
pub fn close(got: f64, want: f64, abs: f64) -> bool {
    (got - want).abs() <= 1e-4 * want.abs() + abs
}

/// Asserts `got` equals the JSON list `want` within 1e-4 relative (+1e-6 absolute).
pub fn assert_values(got: &[f64], want: &Value, what: &str) {
    let want: Vec<f64> = want.as_array().unwrap().iter().map(f).collect();
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(close(*g, *w, 1e-6), "{what}[{i}]: got {g}, reference {w}");
    }
}
