//! The key/value cache of a decoder (transformers' `DynamicCache`), as a value that flows
//! through module inputs.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use tch::Tensor;

use crate::activation::{Activation, Layout, LeafPairs, Leaves, Refusal};

/// A shared handle to the keys and values of every attention layer, kept between generation
/// steps (transformers' `DynamicCache`).
///
/// Cloning the handle shares the cache. Each attention layer `i` appends its new keys and
/// values `[batch, kv_heads, seq, head_dim]` (Llama: after the rotary embedding, before the
/// grouped-query repeat) with [`KvCacheHandle::update`] and attends over everything stored.
/// A [`KvCacheHandle::disabled`] handle stores nothing: every forward pass sees only its own
/// tokens (a plain forward, or a trace).
///
/// As a hook-point value it is shared by every row: batch narrowing does not split it (it
/// always holds the whole batch); a swap may replace the handle only from a group of all rows
/// (one invoke among several may only put the same handle back); `describe` shows its length.
#[derive(Clone, Default)]
pub struct KvCacheHandle(Option<Rc<RefCell<Layers>>>);

/// Per layer: `(keys, values)`, or `None` before the first step.
type Layers = Vec<Option<(Tensor, Tensor)>>;

impl KvCacheHandle {
    /// An empty cache for a model with `num_layers` attention layers.
    pub fn new(num_layers: usize) -> Self {
        KvCacheHandle(Some(Rc::new(RefCell::new((0..num_layers).map(|_| None).collect()))))
    }

    /// A handle that caches nothing (`update` returns its arguments).
    pub fn disabled() -> Self {
        KvCacheHandle(None)
    }

    /// Whether this handle stores keys and values.
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Number of layers it has room for (0 when disabled).
    pub fn num_layers(&self) -> usize {
        self.0.as_ref().map_or(0, |c| c.borrow().len())
    }

    /// Number of cached positions (the `seq` of layer 0's keys; 0 when empty or disabled).
    pub fn past_len(&self) -> i64 {
        self.layer(0).map_or(0, |(k, _)| k.size()[2])
    }

    /// The cached `(keys, values)` of layer `layer`, each `[batch, kv_heads, past, head_dim]`.
    pub fn layer(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let c = self.0.as_ref()?.borrow();
        c.get(layer)?.as_ref().map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
    }

    /// Appends `keys`, `values` (`[batch, kv_heads, seq, head_dim]`) to layer `layer` along the
    /// sequence and returns everything cached for it (`[batch, kv_heads, past + seq, head_dim]`).
    /// A disabled handle returns the arguments. Panics if `layer` is past the end.
    pub fn update(&self, layer: usize, keys: Tensor, values: Tensor) -> (Tensor, Tensor) {
        let Some(cache) = &self.0 else { return (keys, values) };
        let mut c = cache.borrow_mut();
        let n = c.len();
        let slot = c.get_mut(layer).unwrap_or_else(|| panic!("KV cache has {n} layers, layer {layer} asked for"));
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &keys], 2), Tensor::cat(&[&pv, &values], 2)),
            None => (keys, values),
        };
        *slot = Some((k.shallow_clone(), v.shallow_clone()));
        (k, v)
    }

    /// Forgets everything cached (the handle stays shared and enabled).
    pub fn clear(&self) {
        if let Some(c) = &self.0 {
            c.borrow_mut().iter_mut().for_each(|s| *s = None);
        }
    }
}

impl fmt::Debug for KvCacheHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Passed through hook points unchanged (see the type's docs).
impl Activation for KvCacheHandle {
    type First = KvCacheHandle;

    fn shallow(&self) -> Self {
        self.clone()
    }

    fn describe(&self) -> String {
        if self.is_enabled() {
            format!("KvCache({} layers, {} cached positions)", self.num_layers(), self.past_len())
        } else {
            "KvCache(disabled)".to_string()
        }
    }

    fn first(&self) -> &Self {
        self
    }

    fn with_first(self, first: Self) -> Self {
        first
    }

    fn for_each_tensor(&self, _: &mut dyn FnMut(&Tensor)) {}

    fn map_leaves(&self, _: Layout, _: &mut dyn Leaves) -> Result<Self, Refusal> {
        Ok(self.clone())
    }

    /// The same handle (or, from a group of all rows, any handle): the cache is shared by every
    /// row, so one invoke among several cannot replace it.
    fn zip_leaves(self, new: Self, _: Layout, pairs: &mut dyn LeafPairs) -> Result<Self, Refusal> {
        let same = match (&self.0, &new.0) {
            (Some(a), Some(b)) => Rc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        pairs.plain(same, &|| self.describe())?;
        Ok(new)
    }
}
