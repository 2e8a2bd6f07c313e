//! Broken and hostile model folders, tokenizers and options (issue 14): every one is a clear
//! error naming the field, file or option, before any large allocation; nothing panics, hangs
//! or silently gives NaN.
//!
//! Each test runs in its own child process (`common::isolate`): under a 1 GB data-segment cap,
//! so a loader that allocated what a hostile config asks for (terabytes) would fail; within a
//! time limit, so a hang fails; and with its stderr checked for a panic trace. Fixtures are the
//! tiny checkpoints of `fixtures/causal` (and a tiny BERT built here), copied into a temporary
//! folder and altered there.

#[macro_use]
mod common;

use common::folders::{fixture, word_tokenizer, Folder};
use nnsight::models::causal::{CausalLm, CausalLmExt, KvCacheHandle, LoadOptions, Sampling};
use nnsight::models::gpt2::{Gpt2, Gpt2Config};
use nnsight::models::llama::Llama;
use nnsight::prelude::*;
use nnsight::tch::{nn, Kind};
use nnsight::tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use nnsight::tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior};
use nnsight::{Bert, Error, GenerateOptions, LanguageModel};
use serde_json::{json, Value};

// ---------------------------------------------------------------- loaders

fn llama(f: &Folder) -> nnsight::Result<Llama> {
    Llama::load_with(&f.dir(), &LoadOptions::default())
}

fn gpt2(f: &Folder) -> nnsight::Result<Gpt2> {
    Gpt2::load_with(&f.dir(), &LoadOptions::default())
}

fn bert(f: &Folder) -> nnsight::Result<Bert> {
    Bert::load(&f.dir(), Device::Cpu)
}

/// The error of a load that must fail.
fn fails<T>(r: nnsight::Result<T>, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: loaded, expected an error"),
        Err(e) => {
            eprintln!("{what}: {e}");
            e
        }
    }
}

/// `err` is a `WeightShape` for `key` in `model.safetensors` with both shapes.
fn assert_shape_error(err: &Error, key: &str, expected: &[i64], actual: &[i64]) {
    match err {
        Error::WeightShape { file, key: k, expected: e, actual: a } => {
            assert!(file.ends_with("model.safetensors"), "{err}");
            assert_eq!((k.as_str(), e.as_slice(), a.as_slice()), (key, expected, actual), "{err}");
        }
        other => panic!("expected a WeightShape error for `{key}`, got: {other}"),
    }
}

const T12: i64 = 1_000_000_000_000;
const G9: i64 = 1_000_000_000;

// ---------------------------------------------------------------- absurd sizes

isolated! {
    /// `vocab_size` 10^12 (GPT-2, Llama, BERT): the embedding's shape is compared with the header
    /// before anything is allocated.
    fn vocab_size_of_a_trillion_is_refused_before_allocating() {
        let f = Folder::copy_of("llama");
        f.set("vocab_size", json!(T12));
        assert_shape_error(&fails(llama(&f), "llama"), "model.embed_tokens.weight", &[T12, 64], &[1000, 64]);
        let f = Folder::copy_of("gpt2");
        f.set("vocab_size", json!(T12));
        assert_shape_error(&fails(gpt2(&f), "gpt2"), "transformer.wte.weight", &[T12, 64], &[1000, 64]);
        let f = Folder::tiny_bert();
        f.set("vocab_size", json!(T12));
        assert_shape_error(&fails(bert(&f), "bert"), "embeddings.word_embeddings.weight", &[T12, 8], &[20, 8]);
    }

    /// `hidden_size` 10^9 (GPT-2's `n_embd`): the first weight built is refused.
    fn hidden_size_of_a_billion_is_refused_before_allocating() {
        let f = Folder::copy_of("llama");
        f.set("hidden_size", json!(G9));
        // The first weight the layer builds (its attention, since the builders shared by the
        // Llama-like families take the attention first).
        assert_shape_error(&fails(llama(&f), "llama"), "model.layers.0.self_attn.q_proj.weight", &[64, G9], &[64, 64]);
        let f = Folder::copy_of("gpt2");
        f.set("n_embd", json!(G9));
        assert_shape_error(&fails(gpt2(&f), "gpt2"), "transformer.h.0.ln_1.weight", &[G9], &[64]);
        let f = Folder::tiny_bert();
        f.set("hidden_size", json!(G9));
        assert_shape_error(&fails(bert(&f), "bert"), "embeddings.word_embeddings.weight", &[20, G9], &[20, 8]);
    }

    /// `head_dim` 10^12 (Llama), and the MLP widths of GPT-2 (`n_inner`) and BERT.
    fn head_dim_and_mlp_width_of_a_trillion_are_refused_before_allocating() {
        let f = Folder::copy_of("llama");
        f.set("head_dim", json!(T12));
        assert_shape_error(&fails(llama(&f), "llama"), "model.layers.0.self_attn.q_proj.weight", &[4 * T12, 64], &[64, 64]);
        let f = Folder::copy_of("llama");
        f.set("intermediate_size", json!(T12));
        assert_shape_error(&fails(llama(&f), "llama"), "model.layers.0.mlp.gate_proj.weight", &[T12, 64], &[160, 64]);
        let f = Folder::copy_of("gpt2");
        f.set("n_inner", json!(T12));
        assert_shape_error(&fails(gpt2(&f), "gpt2"), "transformer.h.0.mlp.c_fc.weight", &[64, T12], &[64, 256]);
        let f = Folder::tiny_bert();
        f.set("intermediate_size", json!(T12));
        let err = fails(bert(&f), "bert");
        assert_shape_error(&err, "encoder.layer.0.intermediate.dense.weight", &[T12, 8], &[16, 8]);
        // A head width no weight shows (a model without layers) is bounded by the checkpoint too.
        let f = Folder::copy_of("llama");
        f.edit_config(|c| {
            c.insert("head_dim".into(), json!(T12));
            c.insert("num_hidden_layers".into(), json!(0));
        });
        let err = fails(llama(&f), "llama without layers");
        assert!(matches!(err, Error::Load { .. }) && err.to_string().contains("model.rotary_emb.inv_freq"), "{err}");
    }

    /// `num_hidden_layers` 10^7 (`n_layer`): the first layer the checkpoint lacks stops the load.
    fn ten_million_layers_stop_at_the_first_missing_layer() {
        let missing = |err: &Error, key: &str| match err {
            Error::MissingWeight { file, key: k } => {
                assert!(file.ends_with("model.safetensors") && k == key, "{err}");
            }
            other => panic!("expected MissingWeight `{key}`, got {other}"),
        };
        let f = Folder::copy_of("llama");
        f.set("num_hidden_layers", json!(10_000_000));
        missing(&fails(llama(&f), "llama"), "model.layers.2.self_attn.q_proj.weight");
        let f = Folder::copy_of("gpt2");
        f.set("n_layer", json!(10_000_000));
        missing(&fails(gpt2(&f), "gpt2"), "transformer.h.2.ln_1.weight");
        let f = Folder::tiny_bert();
        f.set("num_hidden_layers", json!(10_000_000));
        missing(&fails(bert(&f), "bert"), "encoder.layer.1.attention.self.query.weight");
    }

    /// Position tables of 10^12 rows (GPT-2's `n_positions`, BERT's `max_position_embeddings`).
    fn position_tables_of_a_trillion_are_refused_before_allocating() {
        let f = Folder::copy_of("gpt2");
        f.set("n_positions", json!(T12));
        assert_shape_error(&fails(gpt2(&f), "gpt2"), "transformer.wpe.weight", &[T12, 64], &[128, 64]);
        let f = Folder::tiny_bert();
        f.set("max_position_embeddings", json!(T12));
        assert_shape_error(&fails(bert(&f), "bert"), "embeddings.position_embeddings.weight", &[T12, 8], &[16, 8]);
    }

    /// Sizes whose products overflow `i64` are config errors naming the fields.
    fn sizes_whose_product_overflows_are_config_errors() {
        let f = Folder::copy_of("llama");
        f.edit_config(|c| {
            c.insert("head_dim".into(), json!(i64::MAX - 1));
        });
        let err = fails(llama(&f), "llama");
        assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("`head_dim`"), "{err}");
        let f = Folder::copy_of("gpt2");
        f.set("n_embd", json!(i64::MAX - 3));
        let err = fails(gpt2(&f), "gpt2");
        assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("`n_embd`"), "{err}");
    }
}

// ---------------------------------------------------------------- files that are not files

isolated! {
    /// A FIFO named `model.safetensors` or `config.json`: refused by its type, never opened.
    fn fifo_checkpoint_or_config_is_refused_without_hanging() {
        for (name, file) in [("llama", "model.safetensors"), ("llama", "config.json"), ("gpt2", "model.safetensors")] {
            let f = Folder::copy_of(name);
            f.replace_with_fifo(file);
            let err = if name == "gpt2" { fails(gpt2(&f), file) } else { fails(llama(&f), file) };
            let msg = err.to_string();
            assert!(matches!(err, Error::Io { .. }) && msg.contains(file) && msg.contains("FIFO"), "{msg}");
        }
        let f = Folder::tiny_bert();
        f.replace_with_fifo("model.safetensors");
        let err = fails(bert(&f), "bert");
        assert!(err.to_string().contains("model.safetensors") && err.to_string().contains("FIFO"), "{err}");
    }

    /// A FIFO named `tokenizer.json`.
    fn fifo_tokenizer_is_refused_without_hanging() {
        let f = Folder::copy_of("gpt2");
        f.replace_with_fifo("tokenizer.json");
        let err = fails(LanguageModel::<Gpt2>::from_pretrained(f.dir()), "tokenizer");
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("tokenizer.json") && err.to_string().contains("FIFO"), "{err}");
    }

    /// A directory or a symlink loop named `model.safetensors` is reported as what it is, not as
    /// "no model.safetensors"; a dangling link as not found.
    fn directory_or_symlink_loop_named_model_safetensors() {
        let f = Folder::copy_of("llama");
        std::fs::remove_file(f.file("model.safetensors")).unwrap();
        std::fs::create_dir(f.file("model.safetensors")).unwrap();
        let err = fails(llama(&f), "directory");
        assert!(err.to_string().contains("model.safetensors") && err.to_string().contains("is a directory"), "{err}");
        // The model's config file given instead of its folder.
        let err = Llama::from_pretrained(f.file("config.json")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("is a file, expected a model folder"), "{err}");

        let f = Folder::copy_of("llama");
        std::fs::remove_file(f.file("model.safetensors")).unwrap();
        std::os::unix::fs::symlink("model.safetensors", f.file("model.safetensors")).unwrap();
        let err = fails(llama(&f), "loop");
        assert!(err.to_string().contains("model.safetensors") && err.to_string().contains("symbolic link loop"), "{err}");

        let f = Folder::copy_of("llama");
        std::fs::remove_file(f.file("model.safetensors")).unwrap();
        std::os::unix::fs::symlink("gone.safetensors", f.file("model.safetensors")).unwrap();
        let err = fails(llama(&f), "dangling");
        assert!(err.to_string().contains("model.safetensors") && err.to_string().contains("no such file"), "{err}");

        // A link to a device or out of the folder.
        let f = Folder::copy_of("llama");
        std::fs::remove_file(f.file("model.safetensors")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", f.file("model.safetensors")).unwrap();
        let err = fails(llama(&f), "link to /dev/zero");
        assert!(err.to_string().contains("resolves to `/dev/zero`, outside the model folder"), "{err}");
    }

    /// The index of a sharded checkpoint can only name regular files inside the folder.
    fn sharded_index_names_only_files_inside_the_folder() {
        let f = Folder::copy_of("llama");
        let map = f.shard();
        llama(&f).expect("the sharded copy loads");
        let outside = f.root.path().join("outside.safetensors");
        std::fs::copy(f.file("model-00002-of-00002.safetensors"), &outside).unwrap();
        std::fs::create_dir(f.file("sub")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", f.file("zero.safetensors")).unwrap();
        std::os::unix::fs::symlink(&outside, f.file("out.safetensors")).unwrap();
        f.replace_with_fifo("fifo.safetensors");
        let key = "model.norm.weight";
        assert_eq!(map[key], "model-00002-of-00002.safetensors");
        for (shard, needle) in [
            ("/dev/zero", "`/dev/zero` is an absolute path"),
            (outside.to_str().unwrap(), "is an absolute path"),
            ("../outside.safetensors", "leaves the model folder"),
            ("sub", "is a directory"),
            ("zero.safetensors", "resolves to `/dev/zero`, outside the model folder"),
            ("out.safetensors", "outside the model folder"),
            ("fifo.safetensors", "is a FIFO"),
        ] {
            let mut m = map.clone();
            m.insert(key.into(), json!(shard));
            f.write_index(&m);
            let err = fails(llama(&f), shard);
            assert!(matches!(err, Error::Io { .. }) && err.to_string().contains(needle), "{shard}: {err}");
        }
        let mut m = map.clone();
        m.insert(key.into(), json!(7));
        f.write_index(&m);
        let err = fails(llama(&f), "a number");
        assert!(err.to_string().contains("model.safetensors.index.json") && err.to_string().contains(key), "{err}");
        // A key the index assigns to a shard that lacks it names that shard.
        let mut m = map.clone();
        m.insert(key.into(), json!("model-00001-of-00002.safetensors"));
        f.write_index(&m);
        match fails(llama(&f), "wrong shard") {
            Error::MissingWeight { file, key: k } => assert!(file.ends_with("model-00001-of-00002.safetensors") && k == key),
            other => panic!("{other}"),
        }
    }
}

// ---------------------------------------------------------------- safetensors headers and dtypes

isolated! {
    /// Header lengths and entries that disagree with the file are refused before reading on.
    fn hostile_safetensors_headers_are_refused() {
        let f = Folder::copy_of("llama");
        let header = |json: &str| {
            let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(json.as_bytes());
            bytes.extend_from_slice(&[0u8; 256]);
            bytes
        };
        let with_len = |len: u64| {
            let mut b = len.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with_len(u64::MAX), "header length 18446744073709551615"),
            (with_len(1 << 40), "header length 1099511627776"),
            (with_len(3), "header length 3 is more than the 2 bytes"),
            (b"abc".to_vec(), "too short"),
            (header("not json"), "bad safetensors header"),
            (header(r#"{"a":{"dtype":"F32","shape":[1000000000000,64],"data_offsets":[0,256]}}"#), "needs 256000000000000 bytes"),
            (header(r#"{"a":{"dtype":"F32","shape":[64],"data_offsets":[0,1000000]}}"#), "not inside the 256 bytes"),
            (header(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#), "`shape` is not a list of sizes"),
            (header(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#), "more than 2^64"),
        ];
        for (bytes, needle) in cases {
            std::fs::write(f.file("model.safetensors"), &bytes).unwrap();
            let err = fails(llama(&f), needle);
            assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("model.safetensors"), "{err}");
            assert!(err.to_string().contains(needle), "expected `{needle}` in: {err}");
        }
    }

    /// Integer weights are refused by every loader (BERT accepted `I32` before), naming the file,
    /// key and dtype.
    fn integer_weights_are_refused_by_every_loader() {
        let to_int = |f: &Folder, key: &str, kind: Kind| {
            let mut t = f.tensors();
            let v = t.iter_mut().find(|(k, _)| k == key).unwrap();
            v.1 = v.1.to_kind(kind);
            f.write_tensors(&t);
        };
        let check = |err: Error, key: &str, dtype: &str| match &err {
            Error::WeightDtype { file, key: k, dtype: d, .. } => {
                assert!(file.ends_with("model.safetensors") && k == key && d == dtype, "{err}");
            }
            other => panic!("expected WeightDtype for `{key}`, got {other}"),
        };
        let f = Folder::tiny_bert();
        to_int(&f, "embeddings.word_embeddings.weight", Kind::Int);
        check(fails(bert(&f), "bert"), "embeddings.word_embeddings.weight", "I32");
        let f = Folder::copy_of("gpt2");
        to_int(&f, "transformer.wte.weight", Kind::Int);
        check(fails(gpt2(&f), "gpt2"), "transformer.wte.weight", "I32");
        let f = Folder::copy_of("llama");
        to_int(&f, "model.norm.weight", Kind::Int64);
        check(fails(llama(&f), "llama"), "model.norm.weight", "I64");
        let f = Folder::copy_of("llama");
        to_int(&f, "lm_head.weight", Kind::Bool);
        check(fails(llama(&f), "llama"), "lm_head.weight", "BOOL");
    }
}

// ---------------------------------------------------------------- config values

isolated! {
    /// Epsilons that would turn every activation into NaN (GPT-2 -1 and 0, Llama -1, BERT).
    fn epsilons_that_give_nan_are_config_errors() {
        for (name, field, value) in [
            ("gpt2", "layer_norm_epsilon", json!(-1.0)),
            ("gpt2", "layer_norm_epsilon", json!(0.0)),
            ("llama", "rms_norm_eps", json!(-1.0)),
            ("llama", "rms_norm_eps", json!(0)),
            ("llama", "rms_norm_eps", json!(1e-300)),
        ] {
            let f = Folder::copy_of(name);
            f.set(field, value.clone());
            let err = if name == "gpt2" { fails(gpt2(&f), field).to_string() } else { fails(llama(&f), field).to_string() };
            assert!(err.contains("config.json") && err.contains(&format!("`{field}` must be a positive finite number that float32 holds")), "{err}");
        }
        let f = Folder::tiny_bert();
        f.set("layer_norm_eps", json!(-1.0));
        let err = fails(bert(&f), "bert").to_string();
        assert!(err.contains("`layer_norm_eps` must be a positive finite number"), "{err}");
    }

    /// Rotary settings that would give NaN frequencies: factors of 0 or below, equal llama3
    /// frequency factors, a base of 0.
    fn rope_factors_that_give_nan_are_config_errors() {
        let llama3 = |factor: f64, low: f64, high: f64| {
            json!({"rope_type": "llama3", "rope_theta": 1000.0, "factor": factor, "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": 64})
        };
        for (params, needle) in [
            (json!({"rope_type": "linear", "rope_theta": 1000.0, "factor": 0}), "`rope_parameters.factor` must be a finite number >= 1, found 0"),
            (json!({"rope_type": "linear", "rope_theta": 1000.0, "factor": -2}), "`rope_parameters.factor`"),
            (llama3(0.0, 1.0, 4.0), "`rope_parameters.factor` must be a finite number >= 1, found 0"),
            (llama3(8.0, 0.0, 4.0), "`rope_parameters.low_freq_factor`"),
            (llama3(8.0, 2.0, 2.0), "`rope_parameters.high_freq_factor` 2 must be greater than `low_freq_factor` 2"),
            (json!({"rope_type": "default", "rope_theta": 0.0}), "`rope_theta` must be a finite number >= 1, found 0"),
            (json!({"rope_type": "default", "rope_theta": 1e-300}), "`rope_theta` must be a finite number >= 1"),
        ] {
            let f = Folder::copy_of("llama");
            f.set("rope_parameters", params);
            let err = fails(llama(&f), needle);
            assert!(matches!(err, Error::Config { .. }) && err.to_string().contains(needle), "{err}");
        }
        // transformers 4 spelling.
        let f = Folder::copy_of("llama");
        f.edit_config(|c| {
            c.remove("rope_parameters");
            c.insert("rope_scaling".into(), json!({"type": "linear", "factor": 0.0}));
        });
        let err = fails(llama(&f), "rope_scaling");
        assert!(err.to_string().contains("`rope_scaling.factor` must be a finite number >= 1"), "{err}");
    }

    /// A value of the wrong type names its field.
    fn wrongly_typed_config_values_name_the_field() {
        for (name, field, value) in [
            ("llama", "vocab_size", json!("1000")),
            ("llama", "rms_norm_eps", json!("1e-6")),
            ("llama", "eos_token_id", json!("2")),
            ("gpt2", "n_embd", json!(64.5)),
            ("gpt2", "tie_word_embeddings", json!("yes")),
        ] {
            let f = Folder::copy_of(name);
            f.set(field, value);
            let err = if name == "gpt2" { fails(gpt2(&f), field) } else { fails(llama(&f), field) };
            let msg = err.to_string();
            let why = if field == "eos_token_id" { "expected a token id or a list of token ids" } else { "invalid type" };
            assert!(matches!(err, Error::Config { .. }) && msg.contains(&format!("field `{field}`: {why}")), "{msg}");
        }
    }

    /// Token ids of the config outside the vocabulary are config errors naming the field.
    fn config_token_ids_outside_the_vocabulary_name_the_field() {
        for (name, field, value) in [
            ("llama", "eos_token_id", json!(5000)),
            ("llama", "eos_token_id", json!([2, 1000])),
            ("llama", "bos_token_id", json!(-1)),
            ("gpt2", "pad_token_id", json!(1000)),
            ("gpt2", "eos_token_id", json!(123456)),
        ] {
            let f = Folder::copy_of(name);
            f.set(field, value);
            let err = if name == "gpt2" { fails(gpt2(&f), field) } else { fails(llama(&f), field) };
            let msg = err.to_string();
            assert!(matches!(err, Error::Config { .. }) && msg.contains(&format!("`{field}`")) && msg.contains("outside the vocabulary"), "{msg}");
        }
    }
}

// ---------------------------------------------------------------- generation options

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Tensor {
    let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_slice(&rows.concat()).view([rows.len() as i64, rows[0].len() as i64])
}

fn check_tiny_temperature<M: CausalLm>(name: &str) {
    let model = M::from_pretrained(fixture(name)).unwrap();
    let e = expected(name);
    let (input, mask) = (ids(&e["input_ids"]), ids(&e["attention_mask"]));
    let n = e["greedy"]["max_new_tokens"].as_i64().unwrap();
    let greedy = ids(&e["greedy"]["sequences"]); // transformers, do_sample=False
    for temperature in [1e-300, 5e-324] {
        for top_k in [None, Some(5)] {
            let s = Sampling::Sample { temperature, top_k, seed: 3 };
            let out = model.generate(&input, &mask, n, &s, None).unwrap();
            assert!(out.equal(&greedy), "{name}: temperature {temperature} top_k {top_k:?} must sample transformers' greedy tokens, got {out:?}");
        }
    }
}

isolated! {
    /// A tiny temperature samples the most likely token (the limit of the softmax), never NaN:
    /// the sequences equal transformers' greedy ones.
    fn tiny_temperature_samples_the_greedy_tokens() {
        check_tiny_temperature::<Gpt2>("gpt2");
        check_tiny_temperature::<Llama>("llama");
    }

    /// `max_new_tokens` near `i64::MAX` is refused (no overflow), naming the option and the cap;
    /// bad temperatures and top-k name theirs.
    fn generation_options_are_checked_and_named() {
        let model = Llama::from_pretrained(fixture("llama")).unwrap();
        let p = Tensor::full([1, 125], 5, (Kind::Int64, Device::Cpu));
        let m = p.ones_like();
        for n in [i64::MAX, i64::MAX - 1, i64::MAX / 2, 5] {
            let err = model.generate(&p, &m, n, &Sampling::Greedy, None).unwrap_err();
            assert!(matches!(err, Error::Input(ref s) if s.contains(&format!("`max_new_tokens` {n} is too many")) && s.contains("at most 4")), "{err}");
        }
        assert_eq!(model.generate(&p, &m, 4, &Sampling::Greedy, None).unwrap().size(), vec![1, 129], "125 + 4 - 1 = 128 positions fit");
        let p = Tensor::from_slice(&[5i64, 6, 7]).view([1, 3]);
        let m = p.ones_like();
        let gpt2 = Gpt2::from_pretrained(fixture("gpt2")).unwrap();
        let err = gpt2.generate(&p, &m, i64::MAX, &Sampling::Greedy, None).unwrap_err();
        assert!(err.to_string().contains("`max_new_tokens`"), "{err}");
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = model.generate(&p, &m, 2, &Sampling::Sample { temperature: t, top_k: None, seed: 0 }, None).unwrap_err();
            assert!(err.to_string().contains("`temperature` must be a positive finite number"), "{err}");
        }
        let err = model.generate(&p, &m, 2, &Sampling::Sample { temperature: 1.0, top_k: Some(0), seed: 0 }, None).unwrap_err();
        assert!(err.to_string().contains("`top_k` must be at least 1"), "{err}");
        // No new token at all is refused, as transformers does, by every entry point alike.
        for n in [0, -1, i64::MIN] {
            let err = model.generate(&p, &m, n, &Sampling::Greedy, None).unwrap_err();
            assert!(matches!(err, Error::Input(ref s) if s == &format!("`max_new_tokens` must be at least 1, got {n}")), "{err}");
        }

        // The same through the LanguageModel and generate!.
        let f = Folder::copy_of("llama");
        let lm = LanguageModel::<Llama>::from_pretrained(f.dir()).unwrap();
        let opts = GenerateOptions { max_new_tokens: i64::MAX, ..Default::default() };
        let err = lm.generate("t5 t6", opts).unwrap_err();
        assert!(err.to_string().contains("`max_new_tokens`"), "{err}");
        let err = generate!(lm, "t5 t6", max_new_tokens = i64::MAX, { lm.lm_head.output.save() }).unwrap_err();
        assert!(err.to_string().contains("`max_new_tokens`"), "{err}");
        let err = lm.generate("t5 t6", GenerateOptions { max_new_tokens: 0, ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("`max_new_tokens` must be at least 1, got 0"), "{err}");
        let err = generate!(lm, "t5 t6", max_new_tokens = 0, { lm.lm_head.output.save() }).unwrap_err();
        assert!(err.to_string().contains("`max_new_tokens` must be at least 1, got 0"), "{err}");
        let err = generate!(lm, "t5 t6", max_new_tokens = 2, temperature = 0.0, { lm.lm_head.output.save() }).unwrap_err();
        assert!(err.to_string().contains("`temperature`"), "{err}");
        // NaN logits cannot be sampled or argmaxed: an error naming the step and row.
        let err = generate!(lm, "t5 t6", max_new_tokens = 2, {
            lm.lm_head.output[.., -1, 7] = f64::NAN;
        })
        .unwrap_err();
        assert!(err.to_string().contains("generation step 0: the logits of row 0 hold NaN"), "{err}");
    }
}

// ---------------------------------------------------------------- tokenizers and text

isolated! {
    /// A tokenizer whose vocabulary is larger than the model's: `forward`, `trace!`, `tokenize`
    /// and `generate!` name the token and id (and no panic trace is printed: the harness checks).
    fn tokenizer_with_a_larger_vocabulary_names_the_token() {
        let f = Folder::copy_of("gpt2");
        f.write_tokenizer(&word_tokenizer(2000));
        let lm = LanguageModel::<Gpt2>::from_pretrained(f.dir()).unwrap();
        let needle = "token \"t1500\" (id 1500) at position 1 is outside the model's vocabulary (vocab_size 1000)";
        for err in [
            lm.forward(&["t5 t1500"]).unwrap_err(),
            lm.tokenize(&["t5 t1500"]).unwrap_err(),
            trace!(lm, "t5 t1500", { lm.lm_head.output.save() }).unwrap_err(),
            trace!(lm, {
                invoke("t5 t6") {
                    let a = lm.lm_head.output.save();
                }
                invoke("t5 t1500 t7") {
                    (a, lm.lm_head.output.save())
                }
            })
            .unwrap_err(),
        ] {
            assert!(matches!(err, Error::Input(_)) && err.to_string().contains(needle), "{err}");
        }
        let err = generate!(lm, "t5 t1500", max_new_tokens = 2, { lm.lm_head.output.save() }).unwrap_err();
        assert!(err.to_string().contains("`input_ids` holds 1500 at row 0, position 1; the model's vocab_size is 1000"), "{err}");
        // A padding id outside the vocabulary is named as such.
        let mut tok = word_tokenizer(2000);
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Left,
            pad_to_multiple_of: None,
            pad_id: 1999,
            pad_type_id: 0,
            pad_token: "t1999".into(),
        }));
        f.write_tokenizer(&tok);
        let lm = LanguageModel::<Gpt2>::from_pretrained(f.dir()).unwrap();
        let err = lm.forward(&["t5", "t5 t6"]).unwrap_err();
        assert!(err.to_string().contains("the padding token \"t1999\" (id 1999)"), "{err}");
    }

    /// Empty and whitespace-only text for GPT-2 and Llama (whose tokenizers add no special
    /// tokens here): a clear error naming the sentence.
    fn empty_or_whitespace_text_is_a_clear_error() {
        macro_rules! check {
            ($m:ty, $name:literal) => {{
                let f = Folder::copy_of($name);
                let lm = LanguageModel::<$m>::from_pretrained(f.dir()).unwrap();
                for text in ["", "   ", "\n\t"] {
                    let needle = format!("sentence 0 ({text:?}) has no tokens");
                    for err in [lm.forward(&[text]).unwrap_err(), trace!(lm, text, { lm.lm_head.output.save() }).unwrap_err()] {
                        assert!(matches!(err, Error::Input(_)) && err.to_string().contains(&needle), "{}: {err}", $name);
                    }
                    let err = lm.forward(&["t5 t6", text]).unwrap_err();
                    assert!(err.to_string().contains(&format!("sentence 1 ({text:?}) has no tokens")), "{err}");
                    let err = lm.generate(text, GenerateOptions::default()).unwrap_err();
                    assert!(err.to_string().contains("prompt 0 is empty"), "{err}");
                }
            }};
        }
        check!(Gpt2, "gpt2");
        check!(Llama, "llama");
    }

    /// Panics inside dependencies come back as errors, with nothing printed: the tokenizer's
    /// regex engine (Oniguruma's backtracking limit) and tch on a failed allocation.
    fn panics_in_dependencies_become_errors() {
        // `(a+)+$` on "aaa...ab" backtracks exponentially; Oniguruma stops at its retry limit,
        // and the `onig` crate panics on that error.
        let mut tok = word_tokenizer(1000);
        let split = Split::new(SplitPattern::Regex("(a+)+$".into()), SplitDelimiterBehavior::Isolated, false).unwrap();
        tok.with_pre_tokenizer(Some(split));
        let f = Folder::copy_of("gpt2");
        f.write_tokenizer(&tok);
        let lm = LanguageModel::<Gpt2>::from_pretrained(f.dir()).unwrap();
        let text = format!("{}b", "a".repeat(40));
        for err in [lm.forward(&[text.as_str()]).unwrap_err(), trace!(lm, text.as_str(), { lm.lm_head.output.save() }).unwrap_err()] {
            assert!(matches!(err, Error::Tokenizer(ref m) if m.contains("the tokenizer panicked")), "{err}");
        }
        // tch panics when an allocation fails (here: 256 TB under the 1 GB cap).
        let vs = nn::VarStore::new(Device::Cpu);
        let config = Gpt2Config { vocab_size: T12, n_embd: 64, n_head: 4, n_layer: 1, ..Default::default() };
        let err = fails(Gpt2::new(&vs.root(), &config), "Gpt2::new");
        assert!(matches!(err, Error::Load { .. }), "{err}");
        // 2 GB (which the machine has): the harness's cap makes it fail, so the cases above
        // that pass under the cap allocate less.
        let config = Gpt2Config { vocab_size: 8_000_000, ..config };
        let err = fails(Gpt2::new(&vs.root(), &config), "Gpt2::new, 2 GB");
        assert!(matches!(err, Error::Load { .. }), "{err}");
        // ... or a device does not exist.
        let err = fails(Gpt2::load_with(&fixture("gpt2"), &LoadOptions { device: Device::Cuda(63), dtype: None, ..Default::default() }), "Cuda(63)");
        assert!(matches!(err, Error::Device(_)), "{err}");
        // Still usable afterwards.
        let logits = Gpt2::from_pretrained(fixture("gpt2")).unwrap();
        let x = Tensor::from_slice(&[5i64, 6]).view([1, 2]);
        assert!(logits.forward(&x, &x.ones_like(), &KvCacheHandle::disabled()).unwrap().isfinite().all().int64_value(&[]) == 1);
    }
}

// ---------------------------------------------------------------- edits of integer values

/// Writing a number into token ids (or any integer slice) that the ids cannot hold — a
/// fraction, or a number outside the kind's range — is an error of that node, not a silent
/// truncation (`1.5` became token 1); a whole number in range is written as it is.
#[test]
fn a_fraction_written_into_token_ids_is_an_error_not_a_truncation() {
    let f = Folder::copy_of("llama");
    let lm = LanguageModel::<Llama>::from_pretrained(f.dir()).unwrap();
    let plain = trace!(lm, "t5 t6 t7", { lm.output.save() }).unwrap();
    for bad in [1.5, -0.5, f64::NAN, 1e30] {
        let err = trace!(lm, "t5 t6 t7", {
            lm.model.embed_tokens.input[.., 1] = bad;
            lm.output.save()
        })
        .unwrap_err();
        assert!(matches!(err, Error::Node { .. }), "{err}");
        assert!(err.to_string().contains("cannot be stored in a Int64 slice without changing it"), "{bad}: {err}");
    }
    let swapped = trace!(lm, "t5 t6 t7", {
        lm.model.embed_tokens.input[.., 1] = 9.0;
        lm.output.save()
    })
    .unwrap();
    assert!(swapped.equal(&lm.forward(&["t5 t9 t7"]).unwrap()), "the plain forward of the same ids");
    // Integers are written exactly, whole floats up to the kind's range; 2^63 is refused.
    let ids = trace!(lm, "t5 t6 t7", {
        lm.model.embed_tokens.input[.., 1] = 9007199254740993i64;
        let big = lm.model.embed_tokens.input.copy().save();
        lm.model.embed_tokens.input[.., 1] = 6i64; // a real token again, so the forward runs
        big
    })
    .unwrap();
    assert_eq!(ids.int64_value(&[0, 1]), 9007199254740993);
    let err = trace!(lm, "t5 t6 t7", {
        lm.model.embed_tokens.input[.., 1] = 9223372036854775808.0;
        lm.output.save()
    })
    .unwrap_err();
    assert!(err.to_string().contains("in -9223372036854775808..=9223372036854775807"), "{err}");
    assert!(trace!(lm, "t5 t6 t7", { lm.output.save() }).unwrap().equal(&plain), "nothing stays hooked");
}
