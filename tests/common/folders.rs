//! Model folders for the hostile-input tests and the loader fuzzer: copies of the tiny
//! checkpoints of `fixtures/causal` (and a tiny BERT built here) in a temporary folder, to alter.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nnsight::tch::{nn, Device, Tensor};
use nnsight::tokenizers::models::wordlevel::WordLevel;
use nnsight::tokenizers::pre_tokenizers::whitespace::Whitespace;
use nnsight::tokenizers::Tokenizer;
use nnsight::{Bert, BertConfig};
use serde_json::{json, Value};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal").join(name)
}

/// A temporary folder holding a model folder `model/` (so that `..` from it stays inside the
/// temporary folder).
pub struct Folder {
    pub root: tempfile::TempDir,
}

impl Folder {
    pub fn empty() -> Folder {
        let root = tempfile::Builder::new().prefix("nnsight-hostile-").tempdir().unwrap();
        std::fs::create_dir(root.path().join("model")).unwrap();
        Folder { root }
    }

    /// A copy of the causal fixture `name` (config and checkpoint), with a word-level tokenizer.
    pub fn copy_of(name: &str) -> Folder {
        let f = Folder::empty();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture(name).join(file), f.file(file)).unwrap();
        }
        f.write_tokenizer(&word_tokenizer(1000));
        f
    }

    /// A tiny BERT (1 layer, hidden 8, vocab 20) with its config.
    pub fn tiny_bert() -> Folder {
        let f = Folder::empty();
        let config = json!({
            "model_type": "bert", "vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16,
            "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0
        });
        std::fs::write(f.file("config.json"), config.to_string()).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        Bert::new(&vs.root(), &serde_json::from_value::<BertConfig>(config).unwrap()).unwrap();
        let tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        f.write_tensors(&tensors);
        f
    }

    pub fn dir(&self) -> PathBuf {
        self.root.path().join("model")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    pub fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let mut c: Value = serde_json::from_str(&std::fs::read_to_string(self.file("config.json")).unwrap()).unwrap();
        edit(c.as_object_mut().unwrap());
        std::fs::write(self.file("config.json"), c.to_string()).unwrap();
    }

    pub fn set(&self, field: &str, value: Value) {
        self.edit_config(|c| {
            c.insert(field.into(), value);
        });
    }

    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        Tensor::read_safetensors(self.file("model.safetensors")).unwrap()
    }

    pub fn write_tensors(&self, tensors: &[(String, Tensor)]) {
        Tensor::write_safetensors(tensors, self.file("model.safetensors")).unwrap();
    }

    pub fn write_tokenizer(&self, tok: &Tokenizer) {
        tok.save(self.file("tokenizer.json"), false).unwrap();
    }

    pub fn replace_with_fifo(&self, name: &str) {
        let _ = std::fs::remove_file(self.file(name));
        let path = std::ffi::CString::new(self.file(name).to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo only creates the file.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0, "mkfifo");
    }

    /// The checkpoint split into two shards and an index, as `save_pretrained` writes them.
    pub fn shard(&self) -> serde_json::Map<String, Value> {
        let tensors = self.tensors();
        std::fs::remove_file(self.file("model.safetensors")).unwrap();
        let (a, b): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|(k, _)| k.contains("layers.0") || k.contains("embed"));
        let mut map = serde_json::Map::new();
        for (file, part) in [("model-00001-of-00002.safetensors", &a), ("model-00002-of-00002.safetensors", &b)] {
            Tensor::write_safetensors(part, self.file(file)).unwrap();
            for (k, _) in part.iter() {
                map.insert(k.clone(), Value::String(file.into()));
            }
        }
        self.write_index(&map);
        map
    }

    pub fn write_index(&self, map: &serde_json::Map<String, Value>) {
        let index = json!({"metadata": {}, "weight_map": map});
        std::fs::write(self.file("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// Word-level over "t0" .. "t{n-1}" (id = number), no special tokens, no padding settings.
pub fn word_tokenizer(n: u32) -> Tokenizer {
    let vocab: HashMap<String, u32> = (0..n).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("t0".into()).build().unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok
}

