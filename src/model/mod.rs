//! The adapted model: the one owner of everything a training or inference
//! run holds — the frozen tract backbone, the trainable tail with its
//! adapters, the optional new head, the named parameter registry and the
//! feature caches.
//!
//! `train`, `infer` and `export` all go through it and never re-derive what
//! it knows: parameter order and names come from [`AdaptedModel::params`]
//! (one list for the optimiser, checkpoints, adapter files, hot-swap and
//! export), boundary tensors from [`AdaptedModel::boundary`] (cached once per
//! data set and kept across epochs and calls).
//!
//! Imports run downhill: `onnx` (the split analysis) and `backbone` sit
//! below, `train`, `infer` and `export` above.

pub mod cache;
pub mod head;
pub mod params;

use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::ArrayD;

pub use cache::{CacheConfig, CacheDtype, FeatureCache, Samples, round_boundary};
pub use head::{HeadConfig, LinearHead};
pub use params::{ParamSpec, PreparedAdapter};

use crate::Tensor;
use crate::backbone::{Backbone, Feed};
use crate::error::{Error, Result};
use crate::hydra::HydraConfig;
use crate::onnx::{LinearLayer, OnnxModel, SplitConfig, SplitReport};
use crate::tail::TailGraph;

/// Training memory of the tail, measured on a sample batch.
#[derive(Clone, Copy, Debug)]
pub struct MemoryEstimate {
    /// Frozen tail weights + adapter parameters, gradients and two AdamW moments.
    pub fixed_bytes: usize,
    /// Activations kept for backward, per sample (the tape, the adapters'
    /// saved inputs and `y0` rows).
    pub per_sample_bytes: usize,
}

impl MemoryEstimate {
    /// Bytes at `batch` samples per step.
    pub fn at_batch(&self, batch: usize) -> usize {
        self.fixed_bytes.saturating_add(self.per_sample_bytes.saturating_mul(batch))
    }
}

/// A frozen backbone, a trainable tail, an optional new head, their
/// parameters and feature caches.
#[derive(Debug)]
pub struct AdaptedModel {
    backbone: Backbone,
    tail: TailGraph,
    report: SplitReport,
    layers: Vec<LinearLayer>,
    fingerprint: u64,
    /// The adapter configuration as the user gave it (each layer derives its
    /// own seed from it); what adapter files record.
    adapter_config: HydraConfig,
    caches: Vec<(u64, FeatureCache)>,
    prefix_samples: AtomicUsize,
    /// Memory of the backbone plan: its frozen weights (the model's float
    /// initializers that are not in the tail) and tract's packed copies.
    backbone_bytes: usize,
    /// For a model whose inputs fix the batch at 1: whether the tail was seen
    /// to give each sample of a batch the answer it gives that sample alone.
    batch_checked: bool,
}

/// A batch's boundary tensors ([`AdaptedModel::boundary_batch`]): on the
/// host, and with a GPU in use those the feature cache keeps there.
#[derive(Debug, Default)]
pub struct BoundaryBatch {
    /// The tensors, in the tail's order (private: a GPU copy must stay
    /// what its tensor holds).
    tensors: Vec<Tensor>,
    /// `gpu[k]`: tensor `k`'s values on the GPU (empty: none there).
    gpu: Vec<Option<crate::device::resident::GpuValue>>,
}

impl BoundaryBatch {
    /// The tensors, in the tail's order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// The tensors, the GPU's copies dropped.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }

    /// How many of the tensors are on the GPU too.
    pub fn on_gpu(&self) -> usize {
        self.gpu.iter().flatten().count()
    }

    /// Tensor `k`'s values as the GPU holds them, brought back (`None` when
    /// it is not on the GPU, or the copy back failed): for checks.
    pub fn gpu_copy(&self, k: usize) -> Option<Vec<f32>> {
        let v = self.gpu.get(k)?.as_ref()?;
        crate::device::resident::download(v).ok()
    }
}

impl From<Vec<Tensor>> for BoundaryBatch {
    fn from(tensors: Vec<Tensor>) -> Self {
        BoundaryBatch { tensors, gpu: Vec::new() }
    }
}

impl AdaptedModel {
    /// Splits `model` as `cfg` asks and builds the backbone plan for the tail's boundary.
    pub fn new(model: &OnnxModel, cfg: &SplitConfig) -> Result<AdaptedModel> {
        let s = crate::onnx::split(model, cfg)?;
        let backbone = Backbone::new(model, &s.report.boundary)?;
        // tract keeps each constant weight and, for its matrix products, a
        // packed copy of it: twice the float initializers outside the tail
        // (measured: 140 MiB resident for MiniLM's 78 MB prefix weights).
        let backbone_bytes =
            (model.num_params() * 4).saturating_sub(s.tail.frozen_bytes()).saturating_mul(2);
        Ok(AdaptedModel {
            backbone_bytes,
            backbone,
            tail: s.tail,
            report: s.report,
            layers: s.layers,
            fingerprint: s.fingerprint,
            adapter_config: cfg.adapter.clone(),
            caches: Vec::new(),
            prefix_samples: AtomicUsize::new(0),
            batch_checked: false,
        })
    }

    /// What the split decided.
    pub fn report(&self) -> &SplitReport {
        &self.report
    }

    /// The adapted layers, as found in the model.
    pub fn adapted_layers(&self) -> &[LinearLayer] {
        &self.layers
    }

    /// The adapter configuration the model was built with.
    pub fn adapter_config(&self) -> &HydraConfig {
        &self.adapter_config
    }

    /// Fingerprint of the adapted layers' frozen weights (as in the ONNX
    /// file, f32), written into adapter files so that an adapter is refused on
    /// another base model.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The frozen backbone.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// The trainable tail.
    pub fn tail(&self) -> &TailGraph {
        &self.tail
    }

    /// Mutable [`AdaptedModel::tail`].
    pub fn tail_mut(&mut self) -> &mut TailGraph {
        &mut self.tail
    }

    /// The new head (the tail's last op), if there is one.
    pub fn head(&self) -> Option<&LinearHead> {
        self.tail.head()
    }

    /// Mutable [`AdaptedModel::head`].
    pub fn head_mut(&mut self) -> Option<&mut LinearHead> {
        self.tail.head_mut()
    }

    /// Appends the new head `config` asks for to the tail, sized from the
    /// features the tail computes on `boundary` (a no-op if the head exists or
    /// none is asked for).
    pub fn ensure_head(
        &mut self,
        config: HeadConfig,
        boundary: &[Tensor],
        seed: u64,
    ) -> Result<()> {
        let HeadConfig::New(classes) = config else { return Ok(()) };
        if self.tail.head().is_some() {
            return Ok(());
        }
        self.check_new_head()?;
        let feat = self.tail.forward(boundary.to_vec(), false);
        self.tail.clear_tape();
        let width: usize = feat?.shape().iter().skip(1).product();
        self.tail.set_head(Some(LinearHead::new(width, classes, seed)?));
        Ok(())
    }

    /// Whether a new head can sit on the tail's output: not where the output
    /// has dims that follow an input's length (`[N, seq, V]`), since a head's
    /// width is fixed when it is made.
    pub fn check_new_head(&self) -> Result<()> {
        if self.report.output_follows_input.is_empty() {
            return Ok(());
        }
        Err(Error::Config(format!(
            "a new head needs features of a fixed width, but `{}` has dims that follow the \
             input's length ({}): its head would only fit inputs of the length it was trained \
             on. Put the head on a pooled output (--output-tensor), or keep the model's own \
             output (--head keep)",
            self.report.output,
            self.report.output_follows_input.join(", ")
        )))
    }

    /// Puts `head` at the end of the tail (replacing one there), or removes it.
    pub fn set_head(&mut self, head: Option<LinearHead>) {
        self.tail.set_head(head);
    }

    /// Bytes of frozen weights the backbone plan holds (estimated from the
    /// model's float initializers outside the tail).
    pub fn backbone_bytes(&self) -> usize {
        self.backbone_bytes
    }

    /// Samples that have gone through the frozen backbone so far (a feature
    /// cache that works keeps this flat after it is built).
    pub fn prefix_samples(&self) -> usize {
        self.prefix_samples.load(Ordering::Relaxed)
    }

    /// Runs the frozen prefix: the boundary tensors, in the tail's order.
    pub fn prefix(&self, feed: &Feed) -> Result<Vec<Tensor>> {
        let n = feed.values().next().and_then(|t| t.shape().first().copied()).unwrap_or(0);
        self.prefix_samples.fetch_add(n, Ordering::Relaxed);
        self.backbone.run(feed)
    }

    /// Prefix then tail (no head); the tail keeps its tape for [`AdaptedModel::backward`].
    pub fn forward(&mut self, feed: &Feed, train: bool) -> Result<Tensor> {
        let boundary = self.prefix(feed)?;
        self.tail.forward(boundary, train)
    }

    /// Back-propagates the gradient of the tail's output.
    pub fn backward(&mut self, dy: ArrayD<f32>) -> Result<()> {
        self.tail.backward(dy)
    }

    /// The boundary tensors of samples `idx` of `data`: from its feature
    /// cache (built on first use and kept until [`AdaptedModel::drop_caches`])
    /// when `cache.enabled`, else from the live prefix, rounded the same way.
    pub fn boundary(
        &mut self,
        data: &dyn Samples,
        idx: &[usize],
        cache: &CacheConfig,
        batch: usize,
    ) -> Result<Vec<Tensor>> {
        if !cache.enabled {
            let b = self.prefix(&data.feed(idx))?;
            return Ok(b.into_iter().map(|t| round_boundary(t, cache.dtype)).collect());
        }
        let at = self.cache_for(data, cache, batch)?;
        self.caches[at].1.batch(idx)
    }

    /// [`AdaptedModel::boundary`], and with a GPU in use the tensors that
    /// the feature cache holds there (`CacheConfig::gpu_budget`), gathered
    /// there: [`AdaptedModel::predict_batch`] then sends none of them up.
    pub fn boundary_batch(
        &mut self,
        data: &dyn Samples,
        idx: &[usize],
        cache: &CacheConfig,
        batch: usize,
    ) -> Result<BoundaryBatch> {
        let tensors = self.boundary(data, idx, cache, batch)?;
        // Copies on a GPU no longer in use go first (a change of device
        // frees them too; this drops what is left of them).
        let active = crate::device::resident::active();
        for (_, c) in &mut self.caches {
            c.release_gpu(!active);
        }
        let gpu = if cache.enabled && active {
            let at = self.cache_for(data, cache, batch)?;
            // One budget for all the caches (training and held-out data).
            let others: usize = self
                .caches
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != at)
                .map(|(_, (_, c))| c.gpu_bytes())
                .sum();
            self.caches[at].1.batch_on_gpu(idx, cache.gpu_budget.saturating_sub(others))
        } else {
            Vec::new()
        };
        Ok(BoundaryBatch { tensors, gpu })
    }

    /// The index of `data`'s cache in `dtype`, built now if there is none.
    fn cache_for(
        &mut self,
        data: &dyn Samples,
        cache: &CacheConfig,
        batch: usize,
    ) -> Result<usize> {
        let key = data.id();
        match self.caches.iter().position(|(k, c)| *k == key && c.dtype() == cache.dtype) {
            Some(i) => Ok(i),
            None => {
                let c = FeatureCache::build(self, data, batch, cache)?;
                self.caches.push((key, c));
                Ok(self.caches.len() - 1)
            }
        }
    }

    /// Bytes the feature caches hold on the GPU.
    pub fn cache_gpu_bytes(&self) -> usize {
        self.caches.iter().map(|(_, c)| c.gpu_bytes()).sum()
    }

    /// Whether the samples of `data` are cached.
    pub fn is_cached(&self, data: &dyn Samples) -> bool {
        self.caches.iter().any(|(k, _)| *k == data.id())
    }

    /// Frees every feature cache (RAM and spill files).
    pub fn drop_caches(&mut self) {
        self.caches.clear();
    }

    /// Bytes the feature caches hold in RAM.
    pub fn cache_bytes(&self) -> usize {
        self.caches.iter().map(|(_, c)| c.ram_bytes()).sum()
    }

    /// The tail (its head included) on boundary tensors: the model's
    /// prediction. With `train`, every op keeps what backward needs.
    pub fn predict_boundary(&mut self, boundary: Vec<Tensor>, train: bool) -> Result<ArrayD<f32>> {
        self.predict_batch(BoundaryBatch::from(boundary), train)
    }

    /// [`AdaptedModel::predict_boundary`] on a batch from
    /// [`AdaptedModel::boundary_batch`] (its tensors on the GPU read there).
    pub fn predict_batch(&mut self, batch: BoundaryBatch, train: bool) -> Result<ArrayD<f32>> {
        if self.backbone.fixed_batch() == Some(1) && !self.batch_checked {
            self.check_batching(&batch.tensors)?;
        }
        match self.tail.forward_with(batch.tensors, batch.gpu, train)? {
            Tensor::F32(a) => Ok(a),
            t => Ok(t.to_f32("tail output")?.into_owned()),
        }
    }

    /// A model whose inputs fix the batch at 1 runs batches one sample at a
    /// time through the backbone, but its tail sees the whole batch: an
    /// export that bakes the 1 into a tail reshape (`[1, -1, H]`) would mix
    /// the samples. The first time the tail gets more than one sample, its
    /// answer for the first sample is compared with the answer for that
    /// sample alone; a difference is an error that says to use batch 1.
    fn check_batching(&mut self, boundary: &[Tensor]) -> Result<()> {
        let n = boundary
            .iter()
            .filter(|t| t.is_float())
            .filter_map(|t| t.shape().first().copied())
            .max()
            .unwrap_or(1);
        if n <= 1 {
            return Ok(());
        }
        let first = |t: &Tensor| -> Tensor {
            if t.is_float() && t.shape().first() == Some(&n) { t.rows(0..1) } else { t.clone() }
        };
        let alone = self.tail.forward(boundary.iter().map(first).collect(), false);
        let batched = self.tail.forward(boundary.to_vec(), false);
        let same = match (alone, batched) {
            (Ok(a), Ok(b)) => {
                let (a, b) = (a.into_f32(), b.into_f32());
                let (a, b) = (a.f32("alone")?, b.f32("batched")?);
                let row = a.len();
                a.shape().first() == Some(&1)
                    && b.shape().first() == Some(&n)
                    && b.len() == row * n
                    && {
                        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                        a.iter().zip(b.iter()).all(|(x, y)| (x - y).abs() <= 1e-4 * scale)
                    }
            }
            _ => false,
        };
        if !same {
            return Err(Error::Config(format!(
                "the model's inputs fix the batch at 1, and its tail does not give a sample the same answer in a batch of {n} as alone (an export that reshapes to a batch of 1 inside the graph); train and run it with --batch 1"
            )));
        }
        self.batch_checked = true;
        Ok(())
    }

    /// The gradient of the prediction back through the tail and its head.
    pub fn backward_prediction(&mut self, dy: ArrayD<f32>) -> Result<()> {
        self.tail.backward(dy)
    }

    /// The prediction for a feed (prefix, tail, head), boundary rounded as
    /// `dtype` stores it; keeps no training state.
    pub fn predict(&mut self, feed: &Feed, dtype: CacheDtype) -> Result<ArrayD<f32>> {
        let boundary = self.prefix(feed)?.into_iter().map(|t| round_boundary(t, dtype)).collect();
        let y = self.predict_boundary(boundary, false);
        self.tail.clear_tape();
        y
    }

    /// Measures the tail's training memory on `sample` (any batch size).
    pub fn estimate_memory(&mut self, sample: &Feed) -> Result<MemoryEstimate> {
        let boundary = self.prefix(sample)?;
        self.estimate_memory_on(boundary)
    }

    /// [`AdaptedModel::estimate_memory`] on boundary tensors already computed
    /// (the trainer has them: the prefix runs once at start-up, not twice).
    pub fn estimate_memory_on(&mut self, boundary: Vec<Tensor>) -> Result<MemoryEstimate> {
        // Training mode draws dropout masks: put the generators back afterwards,
        // so that estimating never changes what training does.
        let rngs: Vec<_> = self.tail.adapters().map(|(_, a)| a.rng().clone()).collect();
        let out = self.tail.forward(boundary, true);
        let saved: usize = self.tail.adapters().map(|(_, a)| a.saved_bytes()).sum();
        for ((_, a), r) in self.tail.adapters_mut().zip(rngs) {
            a.set_rng(r);
            a.clear_saved();
        }
        let out = out?;
        let batch = out.shape().first().copied().unwrap_or(1).max(1);
        // Values resident on the GPU count too: on a Jetson its memory is
        // the host's.
        let tape = self.tail.tape_bytes() + self.tail.gpu_tape_bytes();
        self.tail.clear_tape();
        let per_sample = (tape + saved) / batch;
        let trainable = self.tail.trainable_params() * 4;
        // Parameters, gradients and two AdamW moments; with bf16 products,
        // the weights' bf16 packs (from the layers' shapes, whether or not
        // they are built yet).
        let fixed = self.tail.frozen_bytes() + trainable * 4 + self.tail.planned_pack_bytes();
        Ok(MemoryEstimate { fixed_bytes: fixed, per_sample_bytes: per_sample })
    }
}

/// How to rebuild the model an adapter file was trained on: its layers, its
/// output tensor, its adapter configuration; and its head's class count.
pub fn split_config_for(file: &crate::adapter::AdapterFile) -> (SplitConfig, Option<usize>) {
    use crate::onnx::Targets;
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

impl AdaptedModel {
    /// The model `file` was trained on, rebuilt from `onnx`, with the file's
    /// adapters (and head) loaded; refused if the file belongs to another model.
    pub fn from_adapter_file(
        onnx: &OnnxModel,
        file: &crate::adapter::AdapterFile,
    ) -> Result<AdaptedModel> {
        let (cfg, classes) = split_config_for(file);
        let mut m = AdaptedModel::new(onnx, &cfg)?;
        PreparedAdapter::new(&m, file, classes)?.apply(&mut m)?;
        Ok(m)
    }
}
