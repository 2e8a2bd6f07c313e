//! Walking a model's module tree: every hooked module's path and type, as `#[derive(ModuleTree)]`
//! generates it for model structs.

use tch::nn;

use crate::hook::{Hooked, Leaf};

/// A module tree whose hooked modules can be listed (derive it with `#[derive(ModuleTree)]`).
pub trait ModuleTree {
    /// Calls `f(module path, module type)` for every hooked module in this value, parents
    /// before children, in field order.
    fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str));

    /// Every hooked module as `(module path, type name)`, e.g.
    /// `("encoder.layer.0.attention.self", "BertSelfAttention")`; the root's path is `""`.
    fn modules(&self) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        self.visit_modules(&mut |p, t| out.push((p.to_string(), t)));
        out
    }

    /// The tree as text, one module per line, indented by depth (like printing a PyTorch model),
    /// each with the path to write in `trace!` ([`trace_path`]), to copy from:
    ///
    /// ```text
    /// model: Bert
    ///   encoder: BertEncoder  model.encoder
    ///     layer[0]: BertLayer  model.encoder.layer[0]
    ///       attention: BertAttention  model.encoder.layer[0].attention
    ///         self_: BertSelfAttention  model.encoder.layer[0].attention.self_
    /// ```
    fn module_tree(&self) -> String {
        let mut s = String::new();
        let mut ancestors: Vec<String> = Vec::new();
        self.visit_modules(&mut |p, t| {
            while ancestors.last().is_some_and(|a| !(a.is_empty() || p.starts_with(&format!("{a}.")))) {
                ancestors.pop();
            }
            let indent = "  ".repeat(ancestors.len());
            if p.is_empty() {
                s.push_str(&format!("{indent}model: {t}\n"));
            } else {
                let parent = ancestors.last().map_or(0, |a| if a.is_empty() { 0 } else { a.len() + 1 });
                let own = trace_path(&p[parent.min(p.len())..]);
                s.push_str(&format!("{indent}{own}: {t}  model.{}\n", trace_path(p)));
            }
            ancestors.push(p.to_string());
        });
        s
    }
}

/// A module path (checkpoint names, `encoder.layer.0.attention.self`) as it is written in
/// `trace!` after `model.`: list elements indexed (`layer[0]`), and `self`, `output`, `input`
/// and `inputs` with a trailing `_` (`self` is a Rust keyword; the others are hook points).
pub fn trace_path(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
            continue;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(seg);
        if matches!(seg, "self" | "output" | "input" | "inputs") {
            out.push('_');
        }
    }
    out
}

fn short_type_name<M>() -> &'static str {
    let full = std::any::type_name::<M>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

impl<M: ModuleTree> ModuleTree for Hooked<M> {
    fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str)) {
        f(self.path(), short_type_name::<M>());
        self.inner().visit_modules(f);
    }
}

/// A reference to a model lists the model's modules (`trace!` on a `&Model`).
impl<T: ModuleTree + ?Sized> ModuleTree for &T {
    fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str)) {
        (**self).visit_modules(f)
    }
}

impl<T: ModuleTree> ModuleTree for Vec<T> {
    fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str)) {
        self.iter().for_each(|m| m.visit_modules(f))
    }
}

impl<T: ModuleTree> ModuleTree for Option<T> {
    fn visit_modules(&self, f: &mut dyn FnMut(&str, &'static str)) {
        if let Some(m) = self {
            m.visit_modules(f)
        }
    }
}

macro_rules! leaf_tree {
    ($($t:ty),*) => {$(
        impl ModuleTree for $t {
            fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
        }
    )*};
}
leaf_tree!(nn::Linear, nn::LayerNorm, nn::Embedding, nn::Conv1D, nn::Conv2D, nn::Sequential);

impl<M> ModuleTree for Leaf<M> {
    fn visit_modules(&self, _: &mut dyn FnMut(&str, &'static str)) {}
}
