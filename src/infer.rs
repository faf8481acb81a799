//! Inference: a model file as one optimized tract plan ([`Model`]), and
//! hot-swapping among trained adapters on one shared backbone ([`HotSwap`]).
//!
//! Hot-swap keeps one backbone and one tail for any number of adapters: a
//! switch takes the previous adapter's low-rank delta out of the tail's
//! frozen weights and folds the next one in (a rank-r update per layer, no
//! re-export), so each run then costs what the base model costs. Training
//! keeps the unmerged path.

use std::path::Path;

use ndarray::ArrayD;

use crate::Tensor;
use crate::adapter::AdapterFile;
use crate::backbone::{Backbone, Feed};
use crate::error::{Error, Result};
use crate::hydra::Delta;
use crate::model::{AdaptedModel, CacheDtype, PreparedAdapter};
use crate::onnx::OnnxModel;

/// A model ready to run: every output of the ONNX file, by one tract plan.
#[derive(Debug, Clone)]
pub struct Model {
    backbone: Backbone,
}

impl Model {
    /// Loads and optimizes `path` (external data resolved from its folder).
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Model::from_onnx(&OnnxModel::load(path)?)
    }

    /// Optimizes an already loaded model.
    pub fn from_onnx(model: &OnnxModel) -> Result<Model> {
        Ok(Model { backbone: Backbone::new(model, &model.output_names())? })
    }

    /// The outputs [`Model::run`] returns, in order.
    pub fn output_names(&self) -> &[String] {
        self.backbone.output_names()
    }

    /// The model's inputs.
    pub fn input_names(&self) -> &[String] {
        self.backbone.input_names()
    }

    /// Runs the model on `feed`.
    pub fn run(&self, feed: &Feed) -> Result<Vec<Tensor>> {
        self.backbone.run(feed)
    }
}

/// One backbone, several adapters, switched per call.
#[derive(Debug)]
pub struct HotSwap {
    model: AdaptedModel,
    head_classes: Option<usize>,
    adapters: Vec<(String, PreparedAdapter)>,
    active: Option<usize>,
    /// The active adapter's per-layer deltas, folded into the weights.
    merged: Vec<Delta>,
}

impl HotSwap {
    /// Hot-swapping on `model` (whose adapted layers every adapter must
    /// match); `head_classes`: `Some(n)` if the adapters carry a new head.
    pub fn new(model: AdaptedModel, head_classes: Option<usize>) -> HotSwap {
        HotSwap { model, head_classes, adapters: Vec::new(), active: None, merged: Vec::new() }
    }

    /// Adds an adapter (checked now: fingerprint, layers, shapes); returns its index.
    pub fn add(&mut self, name: &str, file: &AdapterFile) -> Result<usize> {
        let p = PreparedAdapter::new(&self.model, file, self.head_classes)?;
        self.adapters.push((name.to_string(), p));
        Ok(self.adapters.len() - 1)
    }

    /// Loads and adds a `.hydra` file.
    pub fn add_file(&mut self, name: &str, path: &Path) -> Result<usize> {
        self.add(name, &AdapterFile::load(path)?)
    }

    /// Names of the adapters, by index.
    pub fn names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The active adapter.
    pub fn active(&self) -> Option<usize> {
        self.active
    }

    /// Makes adapter `i` the active one: the previous adapter's low-rank
    /// delta is taken out of the shared frozen weights and adapter `i`'s is
    /// folded in, so every later run costs what the base model costs.
    pub fn activate(&mut self, i: usize) -> Result<()> {
        let (_, p) = self
            .adapters
            .get(i)
            .ok_or_else(|| Error::NotFound { what: "adapter index", name: i.to_string() })?;
        let previous = std::mem::take(&mut self.merged);
        for ((_, a), d) in self.model.tail_mut().adapters_mut().zip(&previous) {
            a.unmerge_delta(d)?;
        }
        self.active = None;
        p.apply(&mut self.model)?;
        let mut merged = Vec::new();
        for (_, a) in self.model.tail_mut().adapters_mut() {
            let d = a.delta()?;
            a.merge_delta(&d)?;
            merged.push(d);
        }
        self.merged = merged;
        self.active = Some(i);
        Ok(())
    }

    /// Runs the model with the active adapter (and its head).
    pub fn run(&mut self, feed: &Feed) -> Result<ArrayD<f32>> {
        if self.active.is_none() {
            return Err(Error::Config("no active adapter: call activate first".into()));
        }
        self.model.predict(feed, CacheDtype::F32)
    }

    /// Runs with adapter `i` (activating it first if needed).
    pub fn run_with(&mut self, i: usize, feed: &Feed) -> Result<ArrayD<f32>> {
        if self.active != Some(i) {
            self.activate(i)?;
        }
        self.run(feed)
    }
}
