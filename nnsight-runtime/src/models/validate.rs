//! Reading and checking a model's `config.json`, shared by every model family.
//!
//! A config is checked before any weight is allocated: each family's `validate` combines the
//! checks below, whose messages name the config field and say what was expected
//! (`` `layer_norm_epsilon` must be a positive finite number, found -1 ``). Sizes are then
//! compared with the checkpoint's shapes before the weights are allocated
//! ([`super::checkpoint::load_model`]), so a config cannot make a loader allocate more than the
//! checkpoint holds.
//!
//! ```ignore
//! use nnsight::models::validate as v;
//! v::positive(&[("vocab_size", c.vocab_size), ("hidden_size", c.hidden_size)])?;
//! v::multiple_of(("hidden_size", c.hidden_size), ("num_attention_heads", c.num_attention_heads))?;
//! v::positive_finite("rms_norm_eps", c.rms_norm_eps)?;
//! v::at_least_one("rope_theta", theta)?;
//! let q_out = v::product(&[("num_attention_heads", c.num_attention_heads), ("head_dim", hd)])?;
//! v::token_ids_in_vocab("eos_token_id", &eos, c.vocab_size)?;
//! ```

use std::path::Path;

use serde::de::DeserializeOwned;

use super::model_dir::ModelDir;
use crate::error::{Error, Result};

/// What a check returns: the message names the field.
pub type Check = std::result::Result<(), String>;

/// Largest `config.json` read (real ones are a few KB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Every `(field, value)` is at least 1.
pub fn positive(fields: &[(&str, i64)]) -> Check {
    match fields.iter().find(|(_, v)| *v <= 0) {
        Some((name, v)) => Err(format!("`{name}` must be positive, found {v}")),
        None => Ok(()),
    }
}

/// `value` is at least 0.
pub fn non_negative(field: &str, value: i64) -> Check {
    if value < 0 {
        return Err(format!("`{field}` must not be negative, found {value}"));
    }
    Ok(())
}

/// `value` is a finite number above 0 that float32 holds as such (an epsilon: a negative one
/// gives NaN activations, not an error, further on; one below 1.2e-38 is 0 in float32).
pub fn positive_finite(field: &str, value: f64) -> Check {
    let as_f32 = value as f32;
    if !(value > 0.0 && as_f32.is_normal()) {
        return Err(format!(
            "`{field}` must be a positive finite number that float32 holds ({:e} to {:e}), found {value}",
            f32::MIN_POSITIVE,
            f32::MAX
        ));
    }
    Ok(())
}

/// `value` is a finite number of at least 1 (rotary bases and scaling factors: with both at
/// least 1 every rotary frequency is at most 1, so position × frequency stays finite; a factor
/// of 0 gives NaN frequencies. transformers asks the same of its factors).
pub fn at_least_one(field: &str, value: f64) -> Check {
    if !(value.is_finite() && value >= 1.0) {
        return Err(format!("`{field}` must be a finite number >= 1, found {value}"));
    }
    Ok(())
}

/// `a` is a multiple of `b` (`b` positive), e.g. hidden size and heads.
pub fn multiple_of((a_name, a): (&str, i64), (b_name, b): (&str, i64)) -> Check {
    positive(&[(b_name, b)])?;
    if a % b != 0 {
        return Err(format!("`{a_name}` {a} is not a multiple of `{b_name}` {b}"));
    }
    Ok(())
}

/// The product of the fields, or an error naming them when it overflows `i64` (sizes derived
/// from several fields, such as `num_attention_heads * head_dim`, are shapes of weights).
pub fn product(fields: &[(&str, i64)]) -> std::result::Result<i64, String> {
    fields.iter().try_fold(1i64, |acc, (_, v)| acc.checked_mul(*v)).ok_or_else(|| {
        let names: Vec<String> = fields.iter().map(|(n, v)| format!("`{n}` {v}")).collect();
        format!("{} are too large: their product overflows", names.join(" × "))
    })
}

/// Every id is in `0..vocab_size` (`field`: the config key, e.g. `eos_token_id`).
pub fn token_ids_in_vocab(field: &str, ids: &[i64], vocab_size: i64) -> Check {
    match ids.iter().find(|&&id| id < 0 || id >= vocab_size) {
        Some(id) => Err(format!("`{field}` {id} is outside the vocabulary: ids must be in 0..{vocab_size} (`vocab_size`)")),
        None => Ok(()),
    }
}

/// [`Error::Config`] for `path` (or a description of the config when it came from memory).
pub fn config_error(path: &str, message: impl Into<String>) -> Error {
    Error::Config { path: path.to_string(), message: message.into() }
}

/// Reads the `config.json` at `path` (a regular file of at most [`MAX_CONFIG_BYTES`], opened as
/// [`ModelDir`] opens files) and checks it describes `family`: `model_type` equal to one of
/// `model_types`, or (without `model_type`) an `architectures` entry starting with
/// `arch_prefix`. Returns the JSON for [`parse_config`].
///
/// Errors: [`Error::Io`] (missing, not a regular file, too large), [`Error::Config`] naming the
/// file (not JSON, another architecture).
pub fn read_config(path: &Path, family: &str, model_types: &[&str], arch_prefix: &str) -> Result<serde_json::Value> {
    let p = path.display().to_string();
    let (dir, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(d), Some(n)) => (if d.as_os_str().is_empty() { Path::new(".") } else { d }, n),
        _ => return Err(config_error(&p, "not a file path")),
    };
    let text = ModelDir::new(dir)?.read_text(name, MAX_CONFIG_BYTES)?;
    let bad = |message: String| Error::Config { path: p.clone(), message };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if !json.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    let expected = model_types.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(" or ");
    match json.get("model_type") {
        Some(serde_json::Value::String(t)) if model_types.contains(&t.as_str()) => Ok(json),
        Some(t) => Err(bad(format!("expected a {family} config (model_type {expected}), found model_type {t}"))),
        None => {
            let archs = json.get("architectures").and_then(|a| a.as_array());
            if archs.is_some_and(|a| a.iter().any(|s| s.as_str().is_some_and(|s| s.starts_with(arch_prefix)))) {
                return Ok(json);
            }
            let found = match archs {
                Some(a) => format!("no model_type and architectures {}", serde_json::Value::Array(a.clone())),
                None => "neither model_type nor architectures".to_string(),
            };
            Err(bad(format!("expected a {family} config (model_type {expected}), found {found}")))
        }
    }
}

/// Deserialises a config JSON read by [`read_config`] into `C` (a `#[serde(default)]` struct);
/// [`Error::Config`] naming `path` and, for a value of the wrong type (`"vocab_size": "1000"`),
/// the field.
pub fn parse_config<C: DeserializeOwned>(path: &Path, json: serde_json::Value) -> Result<C> {
    serde_json::from_value::<C>(json.clone()).map_err(|e| {
        // serde_json does not say which field had the wrong type: find it by trying each alone
        // (every field has a default, so a one-field object fails only for a bad value).
        let field = json.as_object().and_then(|o| {
            o.iter().find_map(|(k, v)| {
                let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
                serde_json::from_value::<C>(one).is_err().then(|| k.clone())
            })
        });
        let message = match field {
            Some(k) => format!("field `{k}`: {e}"),
            None => e.to_string(),
        };
        config_error(&path.display().to_string(), message)
    })
}
