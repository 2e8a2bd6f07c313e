//! One entry point for every bundled decoder-only family, picked by the `model_type` of the
//! checkpoint's `config.json`, as transformers' `AutoModelForCausalLM` does.
//!
//! Rust code that names no family is generic over [`Decoder`](crate::models::causal::Decoder) (the residual stream, attention
//! hook points, final norm and unembedding of any family). [`AutoLanguageModel`] (with the
//! tokenizer) and [`AutoCausalLm`] (the bare model) hold one concrete family, and
//! [`with_family!`](crate::with_family) hands it to such generic code: each family's code is
//! compiled separately (no dynamic dispatch inside the forward pass), and a trace over it hooks
//! the family's own modules.
//!
//! ```ignore
//! use nnsight::models::auto::AutoLanguageModel;
//! use nnsight::models::causal::Decoder;
//! use nnsight::prelude::*;
//!
//! // Written once, for every family.
//! fn last_layer_norm<M: Decoder + TextModel>(model: &LanguageModel<M>, prompt: &str) -> nnsight::Result<f64> {
//!     trace!(model, prompt, { model.layers()[-1].output.norm().double_value(&[]) })
//! }
//!
//! let model = AutoLanguageModel::from_pretrained("pythia-70m")?;   // model_type "gpt_neox"
//! let n = nnsight::with_family!(&model, |m| last_layer_norm(m, "Hello"))?;
//! ```
//!
//! Supported `model_type`s: [`SUPPORTED`]. Another one is an [`crate::Error::Config`] naming
//! `config.json` and listing these.

use std::path::Path;

use tch::Device;

use super::causal::{CausalLm, LoadOptions};
use super::gemma2::Gemma2;
use super::gemma3::Gemma3;
use super::gpt2::Gpt2;
use super::gpt_neox::GptNeoX;
use super::llama::Llama;
use super::mistral::Mistral;
use super::olmo2::Olmo2;
use super::phi3::Phi3;
use super::qwen2::Qwen2;
use super::qwen3::Qwen3;
use super::model_dir::ModelDir;
use super::validate::{config_error, MAX_CONFIG_BYTES};
use crate::error::Result;
use crate::hook::Hooked;
use crate::language_model::LanguageModel;
use crate::tree::ModuleTree;


/// How [`Auto`] holds its model: [`Bare`] (`Hooked<M>`, the root module) or [`Text`]
/// (`LanguageModel<M>`, with the tokenizer).
pub trait Holder {
    /// The holder of family `M`.
    type Of<M>;
}

/// [`Auto`] holds `Hooked<M>` (path `""`), as [`CausalLm::from_pretrained`] returns it.
#[derive(Debug)]
pub struct Bare;
impl Holder for Bare {
    type Of<M> = Hooked<M>;
}

/// [`Auto`] holds `LanguageModel<M>`, as [`LanguageModel::from_pretrained`] returns it.
#[derive(Debug)]
pub struct Text;
impl Holder for Text {
    type Of<M> = LanguageModel<M>;
}

// `$d` is a `$` passed in, so that the nested `with_family!` can have metavariables.
macro_rules! families {
    ($d:tt $( $variant:ident ( $ty:ty ) = [$($model_type:literal),+] / $arch:literal ),+ $(,)?) => {
        /// A model of one of the bundled decoder-only families, chosen by `config.json`'s
        /// `model_type`; see the [module docs](self). `H` is how it is held: [`AutoCausalLm`]
        /// (bare) or [`AutoLanguageModel`] (with the tokenizer).
        pub enum Auto<H: Holder> {
            $(
                #[doc = concat!("`model_type` ", $("`", $model_type, "` "),+, "(`", $arch, "`).")]
                $variant(H::Of<$ty>),
            )+
        }

        /// Every supported `model_type`, in the order [`Auto`] lists its families.
        pub const SUPPORTED: &[&str] = &[$($($model_type),+),+];

        /// The family of a `model_type` (or, when a config has none, of an `architectures` entry).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Family { $($variant),+ }

        impl Family {
            fn of(model_type: &str) -> Option<Family> {
                match model_type {
                    $($($model_type)|+ => Some(Family::$variant),)+
                    _ => None,
                }
            }
            fn of_architecture(arch: &str) -> Option<Family> {
                match arch {
                    $($arch => Some(Family::$variant),)+
                    _ => None,
                }
            }
        }

        impl Auto<Bare> {
            /// Loads `dir` (see [`CausalLm::load_with`]) as the family its `config.json` names.
            ///
            /// Errors: [`crate::Error::Device`] first, before anything is read, for a device
            /// (of `options.device` or its device map) this build or machine cannot use;
            /// [`crate::Error::Io`] for a missing folder or `config.json`, [`crate::Error::Config`]
            /// naming `config.json` for JSON that is not an object or a `model_type` that is
            /// not supported (the message lists [`SUPPORTED`]), and every error of the family's
            /// loader.
            pub fn load_with(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<AutoCausalLm> {
                let dir = dir.as_ref();
                options.check_devices()?;
                Ok(match family_of(dir)? {
                    $(Family::$variant => Auto::$variant(Hooked::with_path("", <$ty>::load_with(dir, options)?)),)+
                })
            }
        }

        impl Auto<Text> {
            /// Loads `dir` (see [`LanguageModel::from_pretrained`]: config, weights and
            /// `tokenizer.json`) as the family its `config.json` names, weights on `options.device`
            /// (or as `options.device_map` places them) in `options.dtype`; inputs made by its
            /// tokenizer go to the embedding's device. Errors as [`AutoCausalLm::load_with`], plus the tokenizer's.
            pub fn load_with(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<AutoLanguageModel> {
                let dir = dir.as_ref();
                options.check_devices()?;
                Ok(match family_of(dir)? {
                    $(Family::$variant => {
                        let model = <$ty>::load_with(dir, options)?;
                        // Token ids go where the embedding is (`options.device`, or where a
                        // device map put the embedding).
                        let device = model.device();
                        Auto::$variant(LanguageModel::from_parts(model, crate::language_model::load_tokenizer_from(dir)?, device)?)
                    })+
                })
            }
        }

        impl<H: Holder> Auto<H> {
            /// The family's canonical `model_type` (`"gpt2"`, `"llama"`, ...).
            pub fn model_type(&self) -> &'static str {
                match self {
                    $(Auto::$variant(_) => [$($model_type),+][0],)+
                }
            }
        }

        impl<H: Holder> ModuleTree for Auto<H>
        where
            $(H::Of<$ty>: ModuleTree,)+
        {
            fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str)) {
                match self {
                    $(Auto::$variant(m) => m.visit_modules(f),)+
                }
            }
        }

        impl<H: Holder> std::fmt::Debug for Auto<H> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "Auto({})", self.model_type())
            }
        }

        /// Runs `body` with `$m` bound to the concrete model inside an [`Auto`]
        /// ([`AutoCausalLm`] or [`AutoLanguageModel`], by value or by reference): one arm per
        /// family, so `body` may call code generic over
        /// [`Decoder`](crate::models::causal::Decoder) and every arm is compiled for its own
        /// family.
        ///
        /// ```ignore
        /// let model = AutoLanguageModel::from_pretrained(dir)?;
        /// let lens = nnsight::with_family!(&model, |m| logit_lens(m, prompt))?;
        /// ```
        #[macro_export]
        macro_rules! with_family {
            ($d auto:expr, |$d m:ident| $d body:expr) => {
                match $d auto {
                    $($d crate::models::auto::Auto::$variant($d m) => $d body,)+
                }
            };
        }
    };
}

families! {
    $
    Gpt2(Gpt2) = ["gpt2"] / "GPT2LMHeadModel",
    Llama(Llama) = ["llama"] / "LlamaForCausalLM",
    GptNeoX(GptNeoX) = ["gpt_neox"] / "GPTNeoXForCausalLM",
    Gemma2(Gemma2) = ["gemma2"] / "Gemma2ForCausalLM",
    Gemma3(Gemma3) = ["gemma3_text"] / "Gemma3ForCausalLM",
    Qwen2(Qwen2) = ["qwen2"] / "Qwen2ForCausalLM",
    Qwen3(Qwen3) = ["qwen3"] / "Qwen3ForCausalLM",
    Olmo2(Olmo2) = ["olmo2"] / "Olmo2ForCausalLM",
    Phi3(Phi3) = ["phi3"] / "Phi3ForCausalLM",
    Mistral(Mistral) = ["mistral"] / "MistralForCausalLM",
}

/// A bare model of any supported family (`Hooked<M>`, path `""`); see [`Auto`].
pub type AutoCausalLm = Auto<Bare>;

/// A model of any supported family with its tokenizer (`LanguageModel<M>`); see [`Auto`].
pub type AutoLanguageModel = Auto<Text>;

impl Auto<Bare> {
    /// [`AutoCausalLm::load_with`] on the CPU in the checkpoint's dtype.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<AutoCausalLm> {
        Self::load_with(dir, &LoadOptions::default())
    }
}

impl Auto<Text> {
    /// [`AutoLanguageModel::load_with`] on the CPU in the checkpoint's dtype.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<AutoLanguageModel> {
        Self::load_with(dir, &LoadOptions::default())
    }

    /// [`AutoLanguageModel::load_with`] on `device` in the checkpoint's dtype.
    pub fn from_pretrained_on(dir: impl AsRef<Path>, device: Device) -> Result<AutoLanguageModel> {
        Self::load_with(dir, &LoadOptions { device, dtype: None, ..Default::default() })
    }
}

/// The family `dir/config.json` names: its `model_type`, else (older configs) an
/// `architectures` entry.
fn family_of(dir: &Path) -> Result<Family> {
    let path = dir.join("config.json").display().to_string();
    let text = ModelDir::new(dir)?.read_text("config.json", MAX_CONFIG_BYTES)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| config_error(&path, format!("not valid JSON: {e}")))?;
    let Some(obj) = json.as_object() else { return Err(config_error(&path, "not a JSON object")) };
    let supported = SUPPORTED.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
    match obj.get("model_type") {
        Some(serde_json::Value::String(t)) => Family::of(t).ok_or_else(|| {
            config_error(&path, format!("model_type \"{t}\" is not supported; the supported model types are {supported}"))
        }),
        Some(other) => Err(config_error(&path, format!("`model_type` must be a string, found {other}"))),
        None => obj
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.iter().filter_map(|s| s.as_str()).find_map(Family::of_architecture))
            .ok_or_else(|| {
                config_error(&path, format!("no `model_type` (and no known `architectures` entry); the supported model types are {supported}"))
            }),
    }
}
