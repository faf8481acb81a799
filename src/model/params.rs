//! The named parameter registry: every trainable tensor of an
//! [`AdaptedModel`], in one order, with one name and shape each. The
//! optimiser's state, checkpoints, adapter files, hot-swap and export all read
//! this list; nothing else enumerates parameters.
//!
//! Names follow PEFT's habit of naming the layer in the key, so that a file
//! can be checked against a model: `{layer}/{parallel|sequential}/{A|B|bias_down|bias_up}`
//! for adapters (tail order, parallel branch first), then `head/W`, `head/b`.

use std::collections::BTreeMap;

use super::AdaptedModel;
use super::head::LinearHead;
use crate::adapter::{AdapterFile, LayerEntry, NamedTensor};
use crate::error::{Error, Result};
use crate::hydra::{Branch, HydraLinear};

/// One trainable tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Its name in files and checkpoints.
    pub name: String,
    /// The adapted layer (node name); `None` for the new head.
    pub layer: Option<String>,
    /// Its shape (row-major).
    pub shape: Vec<usize>,
}

impl ParamSpec {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const PARTS: [&str; 4] = ["A", "B", "bias_down", "bias_up"];

/// `(name, shape)` of each tensor of one branch, in parameter order.
fn branch_specs(
    layer: &str,
    which: &str,
    b: &Branch,
    k: usize,
    out: usize,
) -> Vec<(String, Vec<usize>)> {
    let r = b.b.len() / out.max(1);
    let shapes = [
        Some(vec![r, k]),
        Some(vec![out, r]),
        b.bias_down.as_ref().map(|_| vec![r]),
        b.bias_up.as_ref().map(|_| vec![out]),
    ];
    PARTS
        .iter()
        .zip(shapes)
        .filter_map(|(p, s)| Some((format!("{layer}/{which}/{p}"), s?)))
        .collect()
}

fn adapter_specs(layer: &str, a: &HydraLinear) -> Vec<ParamSpec> {
    let mut out = Vec::new();
    for (which, b, k) in
        [("parallel", a.parallel(), a.in_dim()), ("sequential", a.sequential(), a.out_dim())]
    {
        if let Some(b) = b {
            out.extend(
                branch_specs(layer, which, b, k, a.out_dim())
                    .into_iter()
                    .map(|(name, shape)| ParamSpec { name, layer: Some(layer.to_string()), shape }),
            );
        }
    }
    out
}

impl AdaptedModel {
    /// Every trainable tensor, in the one order everything uses.
    pub fn params(&self) -> Vec<ParamSpec> {
        let mut out: Vec<ParamSpec> =
            self.tail.adapters().flat_map(|(n, a)| adapter_specs(n, a)).collect();
        if let Some(h) = self.tail.head() {
            let (i, o) = h.dims();
            out.push(ParamSpec { name: "head/W".into(), layer: None, shape: vec![o, i] });
            out.push(ParamSpec { name: "head/b".into(), layer: None, shape: vec![o] });
        }
        out
    }

    /// The values of [`AdaptedModel::params`], in order.
    pub fn param_values(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = Vec::new();
        for (_, a) in self.tail.adapters() {
            for b in [a.parallel(), a.sequential()].into_iter().flatten() {
                out.extend(b.tensors());
            }
        }
        if let Some(h) = self.tail.head() {
            out.extend([&h.w[..], &h.b[..]]);
        }
        out
    }

    /// Every parameter with its gradient, in [`AdaptedModel::params`] order.
    pub fn params_and_grads(&mut self) -> (Vec<&mut [f32]>, Vec<&[f32]>) {
        self.tail.params_and_grads()
    }

    /// Zeroes every gradient (adapters and head).
    pub fn zero_grad(&mut self) {
        self.tail.zero_grad();
    }

    /// The adapted layers as an adapter file lists them.
    pub fn layer_entries(&self) -> Vec<LayerEntry> {
        self.tail
            .adapters()
            .map(|(n, a)| LayerEntry {
                name: n.to_string(),
                in_dim: a.in_dim(),
                out_dim: a.out_dim(),
            })
            .collect()
    }

    /// The parameters as named tensors for an adapter file (f32 or f16).
    pub fn named_tensors(&self, dtype: crate::adapter::DType) -> Result<Vec<NamedTensor>> {
        self.params()
            .into_iter()
            .zip(self.param_values())
            .map(|(s, v)| NamedTensor::new(s.name, s.shape, dtype, v.to_vec()))
            .collect()
    }
}

/// An adapter file checked against a model and laid out in the model's
/// parameter order, ready to be copied in.
#[derive(Clone, Debug)]
pub struct PreparedAdapter {
    values: Vec<Vec<f32>>,
    /// `(features, classes)` of the file's new head, if it has one.
    head: Option<(usize, usize)>,
    metadata: BTreeMap<String, String>,
}

/// `file`'s tensor `name` with exactly `len` values.
pub(crate) fn tensor<'f>(file: &'f AdapterFile, name: &str, len: usize) -> Result<&'f NamedTensor> {
    let t = file
        .tensor(name)
        .ok_or_else(|| Error::NotFound { what: "adapter tensor", name: name.into() })?;
    if t.data.len() != len {
        return Err(Error::Shape {
            context: "adapter tensor",
            expected: format!("{len} values for `{name}`"),
            got: format!("{}", t.data.len()),
        });
    }
    Ok(t)
}

/// `new:{classes}:{features}` of an adapter file's head entry, checked.
fn head_dims(entry: &str) -> Result<(usize, usize)> {
    let dims: Vec<usize> =
        entry.strip_prefix("new:").unwrap_or("").split(':').map_while(|s| s.parse().ok()).collect();
    match dims[..] {
        [o, i] if o > 0 && i > 0 && o.checked_mul(i).is_some_and(|n| n <= 1 << 28) => Ok((i, o)),
        _ => Err(Error::Corrupt(format!("bad head entry `{entry}`"))),
    }
}

impl PreparedAdapter {
    /// Checks `file` against `model` (fingerprint, layers, shapes, head)
    /// without changing anything. `want_head`: `Some(classes)` if a new head
    /// is expected, `None` to keep the model's output.
    pub fn new(
        model: &AdaptedModel,
        file: &AdapterFile,
        want_head: Option<usize>,
    ) -> Result<PreparedAdapter> {
        file.check_fingerprint(model.fingerprint())?;
        // The math must be the one the file was trained with (a scale or a
        // variant changed in between gives silently different outputs).
        let (a, b) = (&file.header.config, model.adapter_config());
        let branch = |x: &crate::hydra::BranchConfig, y: &crate::hydra::BranchConfig| {
            (x.rank, x.scale.to_bits(), x.bias) == (y.rank, y.scale.to_bits(), y.bias)
        };
        let uses = |v: crate::hydra::Variant| (v.has_parallel(), v.has_sequential());
        let same = a.variant == b.variant
            && (!uses(a.variant).0 || branch(&a.parallel, &b.parallel))
            && (!uses(a.variant).1 || branch(&a.sequential, &b.sequential));
        if !model.layer_entries().is_empty() && !same {
            return Err(Error::Config(format!(
                "the adapter file was trained as {:?} (parallel r={} s={}, sequential r={} s={}); this model is configured as {:?} (parallel r={} s={}, sequential r={} s={})",
                a.variant,
                a.parallel.rank,
                a.parallel.scale,
                a.sequential.rank,
                a.sequential.scale,
                b.variant,
                b.parallel.rank,
                b.parallel.scale,
                b.sequential.rank,
                b.sequential.scale
            )));
        }
        let want = model.layer_entries();
        if want != file.header.layers {
            return Err(Error::Config(format!(
                "the adapter file's layers {:?} are not this model's adapted layers {:?}",
                file.header
                    .layers
                    .iter()
                    .map(|l| (&l.name, l.in_dim, l.out_dim))
                    .collect::<Vec<_>>(),
                want.iter().map(|l| (&l.name, l.in_dim, l.out_dim)).collect::<Vec<_>>()
            )));
        }
        let head = match (file.header.metadata.get("head").map(String::as_str), want_head) {
            (Some("keep") | None, None) => None,
            (Some(h), Some(c)) if h.starts_with("new:") => {
                let (i, o) = head_dims(h)?;
                if o != c {
                    return Err(Error::Config(format!(
                        "the file's head has {o} outputs, the configuration {c}"
                    )));
                }
                Some((i, o))
            }
            (h, c) => {
                return Err(Error::Config(format!(
                    "the file's head ({h:?}) does not match the configuration (new head: {c:?})"
                )));
            }
        };
        let mut specs: Vec<ParamSpec> =
            model.params().into_iter().filter(|s| s.layer.is_some()).collect();
        if let Some((i, o)) = head {
            specs.push(ParamSpec { name: "head/W".into(), layer: None, shape: vec![o, i] });
            specs.push(ParamSpec { name: "head/b".into(), layer: None, shape: vec![o] });
        }
        let values = specs
            .iter()
            .map(|s| {
                let t = tensor(file, &s.name, s.len())?;
                if t.shape != s.shape {
                    return Err(Error::Shape {
                        context: "adapter tensor",
                        expected: format!("shape {:?} for `{}`", s.shape, s.name),
                        got: format!("{:?}", t.shape),
                    });
                }
                Ok(t.data.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        // Nothing else may ride along: a tensor this model has no place for
        // means the file is not what it claims (only a checkpoint carries
        // the optimizer's moments and the best epoch, one per parameter).
        let optimizer_slot = |name: &str| {
            file.header.checkpoint.is_some()
                && ["optimizer/m/", "optimizer/v/", "best/"].iter().any(|p| {
                    name.strip_prefix(p)
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| i < specs.len())
                })
        };
        if let Some(t) = file
            .tensors
            .iter()
            .find(|t| !specs.iter().any(|s| s.name == t.name) && !optimizer_slot(&t.name))
        {
            return Err(Error::Corrupt(format!(
                "the file holds tensor `{}`, which this model has no place for",
                t.name
            )));
        }
        if let Some(s) = specs.iter().zip(&values).find(|(_, v)| v.iter().any(|x| !x.is_finite())) {
            return Err(Error::Corrupt(format!(
                "adapter tensor `{}` holds NaN or infinite values",
                s.0.name
            )));
        }
        Ok(PreparedAdapter { values, head, metadata: file.header.metadata.clone() })
    }

    /// `(features, classes)` of the file's head, if it has one.
    pub fn head_dims(&self) -> Option<(usize, usize)> {
        self.head
    }

    /// The file's metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Copies the parameters into `model` (its adapters, and its head, which
    /// is created or replaced to match the file's).
    pub fn apply(&self, model: &mut AdaptedModel) -> Result<()> {
        match self.head {
            Some((i, o)) if model.head().map(LinearHead::dims) != Some((i, o)) => {
                model.set_head(Some(LinearHead::new(i, o, 0)?));
            }
            Some(_) => {}
            None => model.set_head(None),
        }
        let (params, _) = model.params_and_grads();
        if params.len() != self.values.len() {
            return Err(Error::Config(format!(
                "the adapter has {} tensors, the model {}",
                self.values.len(),
                params.len()
            )));
        }
        for (p, v) in params.into_iter().zip(&self.values) {
            if p.len() != v.len() {
                return Err(Error::Config("adapter tensor length changed".into()));
            }
            p.copy_from_slice(v);
        }
        Ok(())
    }
}
