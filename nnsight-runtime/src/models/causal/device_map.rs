//! [`DeviceMap`]: a decoder model's parts on several devices (Hugging Face's
//! `device_map="auto"`), with the activations moved between devices by the model code.
//!
//! A model has three kinds of parts: the **embedding** (token embedding, and GPT-2's position
//! embedding), the **decoder layers** `0 .. num_layers`, and the **head** (the final norm and,
//! unless it is tied to the embedding, the unembedding `lm_head` / `embed_out`). A map puts each
//! part on one device:
//!
//! ```ignore
//! use nnsight::models::causal::{CausalLm, DeviceMap, LoadOptions};
//! use nnsight::models::llama::Llama;
//! use tch::Device;
//!
//! // Layers 0..16 on the first GPU, 16..32 on the second; embedding on the first, head on the last.
//! let mut layers = vec![Device::Cuda(0); 16];
//! layers.extend(vec![Device::Cuda(1); 16]);
//! let opts = LoadOptions { device_map: Some(DeviceMap::layers(layers)), ..Default::default() };
//! let model = Llama::load_with("llama-folder".as_ref(), &opts)?;
//!
//! // Or let the planner balance the parameter bytes over the GPUs.
//! let opts = LoadOptions { device_map: Some(DeviceMap::auto(&[Device::Cuda(0), Device::Cuda(1)])), ..Default::default() };
//! ```
//!
//! **Loading.** Every device of the map is checked ([`super::super::checkpoint::check_device`],
//! [`crate::Error::Device`] naming the device and the part) before `config.json` is read. The
//! model is then built on the CPU, each variable is moved (still zero) to its part's device in
//! place (`Tensor::set_data`, so every module handle — a tied `lm_head` included — sees the
//! moved weight), and only then are the checkpoint's tensors read and copied in, each straight
//! to its device. A map whose layer count differs from the model's is [`crate::Error::Input`]
//! naming both counts, before any weight is read.
//!
//! **Forward.** Each family's forward moves the hidden state and every per-layer input (the
//! attention mask, the rotary `cos` / `sin` tables) to a layer's device before calling it (one
//! copy per tensor and device), then the hidden state to the final norm's device,
//! and [`super::LmHead`] moves its input to its weight's device. The KV cache tensors are made
//! inside each layer's attention, so each layer's cache lives on that layer's device. The logits
//! come back on the unembedding's device; `CausalLm::device()` is the embedding's device (where
//! inputs go), and generation moves each picked token there.
//!
//! **The automatic plan** ([`DeviceMap::auto`]) follows Hugging Face accelerate's
//! `infer_auto_device_map` as used by `device_map="auto"` / `"balanced"`: parts are taken in
//! model order (embedding, layers, head) and devices are filled in the order given, never
//! splitting a layer; without budgets each device's budget is the smallest that fits everything
//! (accelerate's `get_balanced_memory` balances the same way, up to its extra headroom), which
//! for `n` equal layers and equal embedding / head sizes over `k` devices gives `n / k` layers
//! each. With budgets ([`DeviceMap::auto_with_budgets`], accelerate's `max_memory`) each device
//! takes parts until the next does not fit within its budget. The embedding is always on the
//! first device. With tied embeddings the unembedding shares the embedding weight, so it runs on
//! the embedding's device (the final norm's output is moved there), as accelerate keeps tied
//! parameters together; its bytes count once, with the embedding.

use tch::{nn, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::checkpoint::check_device;

/// Where a decoder model's parts go (module docs): an explicit placement or a plan made at
/// load time from the parameter sizes. Set [`super::LoadOptions::device_map`].
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceMap {
    plan: Plan,
}

#[derive(Clone, Debug, PartialEq)]
enum Plan {
    Explicit(Placement),
    Auto { devices: Vec<Device>, budgets: Option<Vec<u64>> },
}

/// A resolved placement: the device of each part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The token (and position) embedding.
    pub embedding: Device,
    /// Decoder layer `i` on `layers[i]`.
    pub layers: Vec<Device>,
    /// The final norm.
    pub final_norm: Device,
    /// Where the unembedding runs: the final norm's device, or the embedding's when the
    /// unembedding is tied to the embedding weight.
    pub unembedding: Device,
}

/// Parameter bytes of a model's parts, the planner's input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartSizes {
    /// Embedding bytes (with tied embeddings, the unembedding's too: they are one tensor).
    pub embedding: u64,
    /// Bytes of decoder layer `i`.
    pub layers: Vec<u64>,
    /// Final norm bytes, plus the unembedding's unless `tied`.
    pub head: u64,
    /// Whether the unembedding is the embedding weight (it then runs on the embedding's device).
    pub tied: bool,
}

impl DeviceMap {
    /// Explicit placement: the embedding on `embedding`, layer `i` on `layers[i]`, the final
    /// norm and the (untied) unembedding on `head`. `layers` must have one entry per layer of
    /// the model loaded ([`crate::Error::Input`] naming both counts otherwise).
    pub fn new(embedding: Device, layers: Vec<Device>, head: Device) -> DeviceMap {
        DeviceMap { plan: Plan::Explicit(Placement { embedding, layers, final_norm: head, unembedding: head }) }
    }

    /// Layer `i` on `layers[i]`; the embedding on the first layer's device and the head on the
    /// last layer's (the CPU for a model without layers).
    pub fn layers(layers: Vec<Device>) -> DeviceMap {
        let first = layers.first().copied().unwrap_or(Device::Cpu);
        let last = layers.last().copied().unwrap_or(Device::Cpu);
        DeviceMap::new(first, layers, last)
    }

    /// Planned at load time over `devices`, in order, balancing the parameter bytes (module docs,
    /// [`DeviceMap::plan`]). An empty list is [`crate::Error::Input`] when loading.
    pub fn auto(devices: &[Device]) -> DeviceMap {
        DeviceMap { plan: Plan::Auto { devices: devices.to_vec(), budgets: None } }
    }

    /// Planned at load time filling each `(device, budget bytes)` in order up to its budget
    /// (accelerate's `max_memory`). A model that does not fit is [`crate::Error::Input`].
    pub fn auto_with_budgets(devices: &[(Device, u64)]) -> DeviceMap {
        DeviceMap {
            plan: Plan::Auto {
                devices: devices.iter().map(|(d, _)| *d).collect(),
                budgets: Some(devices.iter().map(|(_, b)| *b).collect()),
            },
        }
    }

    /// Every device the map names, with what it holds (`"embedding"`, `"layer 3"`, `"head"`,
    /// `"device 1 of the automatic map"`), in order.
    pub fn named_devices(&self) -> Vec<(String, Device)> {
        match &self.plan {
            Plan::Explicit(p) => {
                let mut out = vec![("embedding".to_string(), p.embedding)];
                out.extend(p.layers.iter().enumerate().map(|(i, d)| (format!("layer {i}"), *d)));
                out.push(("final norm and unembedding".to_string(), p.final_norm));
                out
            }
            Plan::Auto { devices, .. } => {
                devices.iter().enumerate().map(|(i, d)| (format!("device {i} of the automatic map"), *d)).collect()
            }
        }
    }

    /// Checks every device of the map with [`check_device`]: [`crate::Error::Device`] naming the
    /// device and what the map puts there; an automatic map without devices is
    /// [`crate::Error::Input`].
    pub fn check_devices(&self) -> Result<()> {
        if let Plan::Auto { devices, budgets } = &self.plan {
            if devices.is_empty() {
                return Err(Error::Input("the automatic device map names no device".into()));
            }
            if let Some(b) = budgets {
                debug_assert_eq!(b.len(), devices.len());
            }
        }
        let mut checked: Vec<Device> = Vec::new();
        for (what, device) in self.named_devices() {
            if checked.contains(&device) {
                continue;
            }
            check_device(device).map_err(|e| match e {
                Error::Device(m) => Error::Device(format!("device map ({what}): {m}")),
                other => other,
            })?;
            checked.push(device);
        }
        Ok(())
    }

    /// The placement for a model with these part sizes: the explicit one (its layer count must
    /// be `sizes.layers.len()`, else [`crate::Error::Input`] naming both counts), or the plan.
    /// With `sizes.tied` the unembedding runs on the embedding's device.
    pub fn plan(&self, sizes: &PartSizes) -> Result<Placement> {
        let mut placement = match &self.plan {
            Plan::Explicit(p) => {
                if p.layers.len() != sizes.layers.len() {
                    return Err(Error::Input(format!(
                        "the device map places {} layer(s) but the model has {} layer(s)",
                        p.layers.len(),
                        sizes.layers.len()
                    )));
                }
                p.clone()
            }
            Plan::Auto { devices, budgets } => plan_auto(devices, budgets.as_deref(), sizes)?,
        };
        if sizes.tied {
            placement.unembedding = placement.embedding;
        }
        Ok(placement)
    }
}

/// Next-fit of the parts (embedding, layers, head, in order) into devices with capacity
/// `caps[d]` each: `Some(device index of each part)` or `None` when they do not fit. The
/// embedding must fit on device 0.
fn fill(items: &[u64], caps: &[u64]) -> Option<Vec<usize>> {
    let mut out = Vec::with_capacity(items.len());
    let (mut d, mut load) = (0usize, 0u64);
    for (i, &size) in items.iter().enumerate() {
        while load.saturating_add(size) > caps[d] {
            if i == 0 || d + 1 == caps.len() {
                return None;
            }
            d += 1;
            load = 0;
        }
        load += size;
        out.push(d);
    }
    Some(out)
}

fn plan_auto(devices: &[Device], budgets: Option<&[u64]>, sizes: &PartSizes) -> Result<Placement> {
    if devices.is_empty() {
        return Err(Error::Input("the automatic device map names no device".into()));
    }
    let mut items = vec![sizes.embedding];
    items.extend(&sizes.layers);
    items.push(sizes.head);
    let total = items.iter().try_fold(0u64, |a, &b| a.checked_add(b)).ok_or_else(|| {
        Error::Input(format!("the part sizes of the device map (embedding {}, {} layer(s), head {}) add up past u64::MAX bytes", sizes.embedding, sizes.layers.len(), sizes.head))
    })?;
    let assign = match budgets {
        Some(b) => fill(&items, b).ok_or_else(|| {
            Error::Input(format!(
                "the model ({total} parameter bytes: embedding {}, {} layer(s), head {}) does not fit the device \
                 map's budgets {b:?} (bytes, one per device {devices:?}){}",
                sizes.embedding,
                sizes.layers.len(),
                sizes.head,
                if b.first().is_some_and(|&b0| sizes.embedding > b0) {
                    ": the embedding must fit on the first device"
                } else {
                    ""
                }
            ))
        })?,
        None => {
            // The smallest common capacity next-fit fits into (feasibility grows with it).
            let (mut lo, mut hi) = (0u64, total.max(1));
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if fill(&items, &vec![mid; devices.len()]).is_some() {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            fill(&items, &vec![hi; devices.len()])
                .ok_or_else(|| Error::Input(format!("no device map places parts of {total} bytes on {} device(s)", devices.len())))?
        }
    };
    let n = sizes.layers.len();
    let head = devices[assign[n + 1]];
    Ok(Placement {
        embedding: devices[assign[0]],
        layers: assign[1..=n].iter().map(|&d| devices[d]).collect(),
        final_norm: head,
        unembedding: head,
    })
}

/// Variable name prefixes of a family's parts (the `VarStore` names, which are the module
/// paths): `embedding` (`["model.embed_tokens."]`, GPT-2's `["transformer.wte.",
/// "transformer.wpe."]`), `layers` (`"model.layers."`, followed by the layer index),
/// `final_norm` (`"model.norm."`) and `unembedding` (`"lm_head."`; no variable there means tied).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Parts {
    pub embedding: &'static [&'static str],
    pub layers: &'static str,
    pub final_norm: &'static str,
    pub unembedding: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Embedding,
    Layer(usize),
    FinalNorm,
    Unembedding,
}

impl Parts {
    /// The Llama-style names (`model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`).
    pub(crate) const MODEL: Parts =
        Parts { embedding: &["model.embed_tokens."], layers: "model.layers.", final_norm: "model.norm.", unembedding: "lm_head." };

    fn part_of(&self, name: &str) -> Option<Part> {
        if self.embedding.iter().any(|p| name.starts_with(p)) {
            return Some(Part::Embedding);
        }
        if let Some(rest) = name.strip_prefix(self.layers) {
            let (index, _) = rest.split_once('.')?;
            return index.parse().ok().map(Part::Layer);
        }
        if name.starts_with(self.final_norm) {
            return Some(Part::FinalNorm);
        }
        if name.starts_with(self.unembedding) {
            return Some(Part::Unembedding);
        }
        None
    }
}

/// Places the (still zero) variables of `vs`, a model with `num_layers` layers, by `map`:
/// sizes from the variables, [`DeviceMap::plan`], then each variable moved to its part's device
/// in place. `what`: the model folder, for errors. A variable in no part is [`Error::Load`]
/// (a family whose [`Parts`] miss a name).
pub(crate) fn place(vs: &nn::VarStore, map: &DeviceMap, parts: &Parts, num_layers: usize, what: &str) -> Result<Placement> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut sizes = PartSizes { embedding: 0, layers: vec![0; num_layers], head: 0, tied: true };
    let mut classified = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let part = parts.part_of(&name).filter(|p| !matches!(p, Part::Layer(i) if *i >= num_layers));
        let Some(part) = part else {
            return Err(Error::Load {
                path: what.to_string(),
                message: format!("variable `{name}` belongs to no part of the device map (embedding, layers 0..{num_layers}, head)"),
            });
        };
        let bytes = (var.numel() * var.kind().elt_size_in_bytes()) as u64;
        match part {
            Part::Embedding => sizes.embedding += bytes,
            Part::Layer(i) => sizes.layers[i] += bytes,
            Part::FinalNorm => sizes.head += bytes,
            Part::Unembedding => {
                sizes.head += bytes;
                sizes.tied = false;
            }
        }
        classified.push((part, var));
    }
    let placement = map.plan(&sizes)?;
    tch::no_grad(|| -> Result<()> {
        for (part, mut var) in classified {
            let device = match part {
                Part::Embedding => placement.embedding,
                Part::Layer(i) => placement.layers[i],
                Part::FinalNorm => placement.final_norm,
                Part::Unembedding => placement.unembedding,
            };
            if var.device() != device {
                let moved = var.f_to_device(device)?;
                var.f_set_data(&moved)?;
            }
        }
        Ok(())
    })?;
    Ok(placement)
}

/// `t` on `device` (itself when already there).
pub(crate) fn to(t: Tensor, device: Device) -> Tensor {
    if t.device() == device {
        t
    } else {
        t.to_device(device)
    }
}

/// Moves the per-layer inputs of a forward pass (masks, rotary tables) to each layer's device,
/// copying each tensor once per device.
#[derive(Default)]
pub(crate) struct Mover {
    moved: Vec<(Tensor, Device, Tensor)>,
}

impl Mover {
    /// `t` on `device`: itself when already there, else the copy made the first time.
    pub(crate) fn to(&mut self, t: &Tensor, device: Device) -> Tensor {
        if t.device() == device {
            return t.shallow_clone();
        }
        let found = self.moved.iter().find(|(src, d, _)| {
            *d == device && src.data_ptr() == t.data_ptr() && src.size() == t.size() && src.stride() == t.stride()
        });
        if let Some((_, _, copy)) = found {
            return copy.shallow_clone();
        }
        let copy = t.to_device(device);
        self.moved.push((t.shallow_clone(), device, copy.shallow_clone()));
        copy
    }
}
