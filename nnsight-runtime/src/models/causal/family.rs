//! The glue that every family laid out like transformers' `*ForCausalLM` repeats, written once.
//!
//! Such a family has a root with a `model` (`embed_tokens`, `layers`, final `norm`), an
//! `lm_head` and its `config`, checkpoint keys under `model.`, and a constructor
//! `Family::new(&nn::Path, &Config) -> Result<Family>`. [`causal_family!`] gives it:
//!
//! - [`HookModule`](crate::hook::HookModule): `lm_head(model(input))`, [`CausalInput`] in,
//!   logits `[batch, seq, vocab]` out (then the family's final logit function, if it has one:
//!   Gemma's soft-cap);
//! - [`CausalLm`]: loading through [`check_load`] and [`load_model`]; the limits and special
//!   tokens from the config (`max_position_embeddings`, `vocab_size`, `eos_token_id`,
//!   `pad_token_id`); device and dtype of the token embedding;
//! - [`Decoder`]: where the layers, their attention and MLP (with its `act` hook point), the
//!   final norm and the unembedding are.
//!
//! A family file then holds only what makes it differ: its attention, MLP, norm and layer
//! wiring. GPT-2 and GPT-NeoX name their parts otherwise (`transformer.h`, `gpt_neox.layers`)
//! and write these impls themselves.
//!
//! [`CausalInput`]: super::CausalInput
//! [`CausalLm`]: super::CausalLm
//! [`check_load`]: super::check_load
//! [`load_model`]: super::load_model
//! [`Decoder`]: super::Decoder

/// `causal_family!(Family, Config { layer: L, attn: A, mlp: M, norm: N, embedding: field })`,
/// optionally ending `, logits: function => config_field`: the impls of the module docs.
/// `embedding` names the weight field of `model.embed_tokens` (device and dtype); `logits`
/// applies `function(logits, self.config.config_field)` to the logits of the forward pass
/// and of [`Decoder::unembed`](super::Decoder::unembed).
macro_rules! causal_family {
    (
        $family:ident, $config:ident {
            layer: $layer:ty, attn: $attn:ty, mlp: $mlp:ty, norm: $norm:ty, embedding: $embed:ident
            $(, logits: $finish:path => $field:ident)? $(,)?
        }
    ) => {
        impl $crate::hook::HookModule for $family {
            /// [`CausalInput`]($crate::models::causal::CausalInput).
            type Input = $crate::models::causal::CausalInput;
            /// Logits `[batch, seq, vocab]`.
            type Output = tch::Tensor;
            /// Ids, mask and position ids `[batch, ..]`; the KV cache handle shared.
            fn input_layout(&self) -> $crate::activation::Layout {
                $crate::models::CAUSAL_INPUT
            }
            /// Every tensor `[batch, ..]` (rows on dim 0).
            fn output_layout(&self) -> $crate::activation::Layout {
                $crate::models::ROWS
            }
            fn forward(&self, input: $crate::models::causal::CausalInput) -> tch::Tensor {
                let logits = self.lm_head.call(self.model.call(input));
                $(let logits = $finish(logits, self.config.$field);)?
                logits
            }
        }

        impl $crate::models::causal::CausalLm for $family {
            fn load_with(dir: &std::path::Path, options: &$crate::models::causal::LoadOptions) -> $crate::error::Result<Self> {
                use $crate::models::causal;
                causal::check_load(dir, options)?;
                let config = $config::from_file(&dir.join("config.json"))?;
                causal::load_model(dir, options, &["model."], &causal::Parts::MODEL, |p| $family::new(p, &config))
            }
            fn max_positions(&self) -> i64 {
                self.config.max_position_embeddings
            }
            fn num_layers(&self) -> usize {
                self.model.layers.len()
            }
            fn vocab_size(&self) -> i64 {
                self.config.vocab_size
            }
            fn eos_token_ids(&self) -> Vec<i64> {
                self.config.eos_token_id.as_ref().map($crate::models::causal::TokenIds::to_vec).unwrap_or_default()
            }
            fn pad_token_id(&self) -> Option<i64> {
                self.config.pad_token_id
            }
            fn device(&self) -> tch::Device {
                self.model.embed_tokens.$embed.device()
            }
            fn kind(&self) -> tch::Kind {
                self.model.embed_tokens.$embed.kind()
            }
        }

        /// `model.layers`, `model.layers.{i}.self_attn`, `.mlp`, `.mlp.act`, `model.norm`, `lm_head`.
        impl $crate::models::causal::Decoder for $family {
            type Layer = $layer;
            type Attn = $attn;
            type Mlp = $mlp;
            type MlpAct = $crate::models::point::HookPoint;
            type Norm = $norm;
            fn layers(&self) -> &Vec<$crate::hook::Hooked<$layer>> {
                &self.model.layers
            }
            fn layer_attn(layer: &$crate::hook::Hooked<$layer>) -> &$crate::hook::Hooked<$attn> {
                &layer.self_attn
            }
            fn layer_mlp(layer: &$crate::hook::Hooked<$layer>) -> &$crate::hook::Hooked<$mlp> {
                &layer.mlp
            }
            fn layer_mlp_act(layer: &$crate::hook::Hooked<$layer>) -> &$crate::hook::Hooked<$crate::models::point::HookPoint> {
                &layer.mlp.act
            }
            fn final_norm(&self) -> &$crate::hook::Hooked<$norm> {
                &self.model.norm
            }
            fn unembedding(&self) -> &$crate::hook::Hooked<$crate::models::causal::LmHead> {
                &self.lm_head
            }
            fn final_norm_device(&self) -> tch::Device {
                self.model.norm.weight.device()
            }
            $(
                /// `logits(lm_head(norm(h)))`, as the forward pass ends.
                fn unembed(&self, h: &tch::Tensor) -> tch::Tensor {
                    let h = $crate::models::causal::device_map::to(h.shallow_clone(), self.final_norm_device());
                    $finish(self.unembedding().call(self.final_norm().call(h)), self.config.$field)
                }
            )?
        }
    };
}
pub(crate) use causal_family;
