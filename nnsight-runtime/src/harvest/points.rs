//! The hook points a harvest saves: typed ([`HookPoint::output`] on any module whose value is a
//! tensor) or by name for the bundled BERT ([`bert_hook_point`], what the command line uses).

use tch::Tensor;

use crate::error::{Error, Result};
use crate::hook::{AsModule, HookModule};
use crate::language_model::{LanguageModel, TextModel};
use crate::models::bert::Bert;
use crate::proxy::Proxy;
use crate::tracer::{Group, Tracer};

type Read<'a, M> = dyn Fn(&mut Tracer<'a, LanguageModel<M>>, Group) -> Proxy<Tensor> + 'a;

/// One hook point to harvest: a name (the tensor's key in the shard files and the manifest) and
/// how to read it in a trace. Its value must be `[batch, seq, width]`; one row per real
/// (non-padding) token is kept.
pub struct HookPoint<'a, M: TextModel> {
    name: String,
    read: Box<Read<'a, M>>,
}

impl<'a, M: TextModel> HookPoint<'a, M> {
    /// The output of `module` (first call), saved under `name`:
    /// `HookPoint::output("encoder.layer.3.output", &model.encoder.layer[3])`.
    pub fn output<Mo>(name: impl Into<String>, module: &'a Mo) -> Self
    where
        Mo: AsModule + 'a,
        Mo::Module: HookModule<Output = Tensor>,
    {
        HookPoint { name: name.into(), read: Box::new(move |tr, g| tr.output(g, 0, move || Ok(module))) }
    }

    /// The name it is saved under.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn read(&self, tr: &mut Tracer<'a, LanguageModel<M>>, g: Group) -> Proxy<Tensor> {
        (self.read)(tr, g)
    }
}

/// Every hook point name [`bert_hook_point`] knows for `model`: `embeddings.output`, then per
/// layer `encoder.layer.N.output` (the layer), `.attention.output`, `.attention.self.output`,
/// `.attention.output.output` (the attention's dense + LayerNorm), `.intermediate.output`,
/// `.output.output` (the layer's output block), and `output` (the model's last hidden state).
pub fn bert_hook_point_names(model: &LanguageModel<Bert>) -> Vec<String> {
    let mut v = vec!["embeddings.output".to_string()];
    for l in 0..model.encoder.layer.len() {
        for suffix in ["", ".attention", ".attention.self", ".attention.output", ".intermediate", ".output"] {
            v.push(format!("encoder.layer.{l}{suffix}.output"));
        }
    }
    v.push("output".into());
    v
}

/// The hook point of the bundled BERT named `name` (see [`bert_hook_point_names`]); names are
/// the module path followed by `.output`, as in `trace!` and in error messages.
///
/// Errors: [`Error::Input`] for a name that is not a hook point of this model, listing the
/// valid ones (layer numbers as a range).
pub fn bert_hook_point<'a>(model: &'a LanguageModel<Bert>, name: &str) -> Result<HookPoint<'a, Bert>> {
    let unknown = || {
        Error::Input(format!(
            "`{name}` is not a hook point of this BERT; hook points: embeddings.output, output, and for N in 0..{}: \
             encoder.layer.N.output, encoder.layer.N.attention.output, encoder.layer.N.attention.self.output, \
             encoder.layer.N.attention.output.output, encoder.layer.N.intermediate.output, encoder.layer.N.output.output",
            model.encoder.layer.len()
        ))
    };
    if name == "output" {
        return Ok(HookPoint::output(name, model));
    }
    if name == "embeddings.output" {
        return Ok(HookPoint::output(name, &model.embeddings));
    }
    let rest = name.strip_prefix("encoder.layer.").ok_or_else(unknown)?;
    let (index, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let l: usize = index.parse().map_err(|_| unknown())?;
    let layer = model.encoder.layer.get(l).ok_or_else(unknown)?;
    Ok(match rest {
        "output" => HookPoint::output(name, layer),
        "attention.output" => HookPoint::output(name, &layer.attention),
        "attention.self.output" => HookPoint::output(name, &layer.attention.self_),
        "attention.output.output" => HookPoint::output(name, &layer.attention.output_),
        "intermediate.output" => HookPoint::output(name, &layer.intermediate),
        "output.output" => HookPoint::output(name, &layer.output_),
        _ => return Err(unknown()),
    })
}
