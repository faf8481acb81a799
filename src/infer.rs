//! Inference: a model file as one optimized tract plan ([`Model`]), and
//! hot-swapping among trained adapters on one shared backbone ([`HotSwap`]).
//!
//! Hot-swap keeps the adapted tail unmerged: switching copies the chosen
//! adapter's low-rank tensors into the tail (a few hundred KB at most) — no
//! re-merge, no touch of the frozen weights, so any number of users can share
//! one device and one backbone plan.

use std::path::Path;

use ndarray::ArrayD;

use crate::adapter::AdapterFile;
use crate::backbone::{Backbone, Feed};
use crate::error::{Error, Result};
use crate::onnx::{OnnxModel, SplitModel};
use crate::tail::Tensor;
use crate::train::checkpoint::PreparedAdapter;

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
    split: SplitModel,
    head_classes: Option<usize>,
    adapters: Vec<(String, PreparedAdapter)>,
    active: Option<usize>,
}

impl HotSwap {
    /// Hot-swapping on `split` (whose adapted layers every adapter must
    /// match); `head_classes`: `Some(n)` if the adapters carry a new head.
    pub fn new(split: SplitModel, head_classes: Option<usize>) -> HotSwap {
        HotSwap { split, head_classes, adapters: Vec::new(), active: None }
    }

    /// Adds an adapter (checked now: fingerprint, layers, shapes); returns its index.
    pub fn add(&mut self, name: &str, file: &AdapterFile) -> Result<usize> {
        let p = PreparedAdapter::new(&self.split, file, self.head_classes)?;
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

    /// Makes adapter `i` the active one.
    pub fn activate(&mut self, i: usize) -> Result<()> {
        let (_, p) = self
            .adapters
            .get(i)
            .ok_or_else(|| Error::NotFound { what: "adapter index", name: i.to_string() })?;
        p.apply(&mut self.split);
        self.active = Some(i);
        Ok(())
    }

    /// Runs the model with the active adapter (and its head).
    pub fn run(&mut self, feed: &Feed) -> Result<ArrayD<f32>> {
        let i = self
            .active
            .ok_or_else(|| Error::Config("no active adapter: call activate first".into()))?;
        let out = self.split.forward(feed, false)?;
        self.split.tail_mut().clear_tape();
        let feat = out.f32("tail output")?.clone();
        match &mut self.adapters[i].1.head {
            Some(h) => h.forward(&feat),
            None => Ok(feat),
        }
    }

    /// Runs with adapter `i` (activating it first if needed).
    pub fn run_with(&mut self, i: usize, feed: &Feed) -> Result<ArrayD<f32>> {
        if self.active != Some(i) {
            self.activate(i)?;
        }
        self.run(feed)
    }
}

/// How to rebuild the split an adapter file was trained on: its layers, its
/// output tensor, its adapter configuration; and its head's class count.
pub fn split_config_for(file: &AdapterFile) -> (crate::onnx::SplitConfig, Option<usize>) {
    use crate::onnx::{SplitConfig, Targets};
    let layers: Vec<String> = file.header.layers.iter().map(|l| l.name.clone()).collect();
    let targets = if layers.is_empty() { Targets::None } else { Targets::Names(layers) };
    let output = file.header.metadata.get("output").cloned();
    let classes = file
        .header
        .metadata
        .get("head")
        .and_then(|h| h.strip_prefix("new:"))
        .and_then(|h| h.split(':').next())
        .and_then(|c| c.parse().ok());
    (
        SplitConfig {
            targets,
            output,
            adapter: file.header.config.clone(),
            ..SplitConfig::default()
        },
        classes,
    )
}
