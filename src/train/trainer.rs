//! The training loop over a split model: batches (from the feature cache or
//! the live prefix), tail forward, optional new head, loss, tail backward,
//! gradient clipping, optimiser step on adapters and head only.
//!
//! Determinism: the epoch order is a function of (seed, epoch), dropout draws
//! from each adapter's own seeded generator, and every product is
//! single-threaded in a fixed order — the same seed gives a bit-identical
//! adapter on the same machine, and a checkpoint resumes bit-identically.
//! A step whose loss or gradients are not finite is skipped and reported;
//! more than `max_bad_steps` in a row stops training with an error.

use std::time::Instant;

use ndarray::ArrayD;

use super::data::{Dataset, Labels, epoch_order};
use super::loss::Loss;
use super::optim::{Optimizer, OptimizerKind, Schedule, clip_global_norm};
use crate::Tensor;
use crate::error::{Error, Result};
use crate::model::{
    AdaptedModel, BoundaryBatch, CacheConfig, FeatureCache, HeadConfig, LinearHead,
};

/// Everything about a training run besides the model and the data.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Passes over the training data.
    pub epochs: usize,
    /// Samples per step (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Learning-rate floor of the cosine decay.
    pub min_lr: f32,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// SGD or AdamW.
    pub optimizer: OptimizerKind,
    /// Clip gradients to this global norm.
    pub clip_norm: Option<f32>,
    /// The loss.
    pub loss: Loss,
    /// Keep the model's output or train a new head on it.
    pub head: HeadConfig,
    /// Seed of the epoch order and the head's init.
    pub seed: u64,
    /// Feature cache.
    pub cache: CacheConfig,
    /// Refuse to start if the estimated peak memory exceeds this (bytes).
    pub memory_budget: Option<usize>,
    /// Non-finite steps in a row tolerated before training stops.
    pub max_bad_steps: usize,
    /// Stop with [`Error::Diverged`] when an epoch's loss (eval loss when
    /// held-out data is given, else the epoch's mean train loss) exceeds this
    /// many times its value at the start (`max(start, 0.1)`), or is not
    /// finite. `None`: never. With held-out data the start is measured by
    /// one evaluation before the first step.
    pub divergence_factor: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 32,
            lr: 1e-3,
            min_lr: 0.0,
            warmup_steps: 0,
            weight_decay: 1e-4,
            optimizer: OptimizerKind::default(),
            clip_norm: Some(1.0),
            loss: Loss::CrossEntropy { label_smoothing: 0.0 },
            head: HeadConfig::Keep,
            seed: 0,
            cache: CacheConfig::default(),
            memory_budget: None,
            max_bad_steps: 10,
            divergence_factor: Some(10.0),
        }
    }
}

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochMetrics {
    /// 0-based epoch.
    pub epoch: u64,
    /// Mean training loss over the epoch's good steps.
    pub train_loss: f64,
    /// Training accuracy (classification).
    pub train_accuracy: Option<f64>,
    /// Held-out loss.
    pub eval_loss: Option<f64>,
    /// Held-out accuracy.
    pub eval_accuracy: Option<f64>,
    /// Steps skipped for non-finite values.
    pub skipped_steps: usize,
    /// Wall time of the epoch.
    pub seconds: f64,
    /// Samples that went through the frozen backbone during the epoch
    /// (building the feature cache included): 0 once the cache holds them.
    pub prefix_samples: usize,
}

/// Progress reported to the app.
#[derive(Debug)]
pub enum Event<'a> {
    /// A step was taken.
    Step {
        /// Epoch.
        epoch: u64,
        /// Global step.
        step: u64,
        /// Steps in this epoch.
        of: usize,
        /// Batch loss.
        loss: f64,
        /// Learning rate used.
        lr: f32,
    },
    /// A step was skipped.
    Skipped {
        /// Global step.
        step: u64,
        /// Why.
        reason: &'a str,
    },
    /// An epoch ended.
    Epoch(&'a EpochMetrics),
}

/// Estimated peak memory of a training run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryReport {
    /// Feature cache held in RAM.
    pub cache_bytes: usize,
    /// The training set's feature cache's copy on the GPU (a GPU in use and
    /// a cache held whole in RAM that fits `CacheConfig::gpu_budget`); in
    /// the total only where the GPU shares the host's memory (a Jetson).
    pub gpu_cache_bytes: usize,
    /// Activations kept for backward at the configured batch.
    pub activation_bytes: usize,
    /// Frozen tail weights, trainable parameters, gradients, optimiser state.
    pub parameter_bytes: usize,
    /// The frozen backbone plan's weights.
    pub backbone_bytes: usize,
    /// The sum.
    pub total_bytes: usize,
}

/// The best epoch so far, by eval loss when held-out data is given, else by
/// mean train loss.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Best {
    pub(crate) epoch: u64,
    pub(crate) score: f64,
    pub(crate) params: Vec<Vec<f32>>,
}

enum Outcome {
    Done { loss: f64, correct: Option<(usize, usize)> },
    Skipped(&'static str),
}

/// A training run over a split model.
#[derive(Debug)]
pub struct Trainer {
    model: AdaptedModel,
    cfg: TrainConfig,
    opt: Option<Optimizer>,
    /// The memory estimate, made once per training set.
    memory: Option<(u64, crate::device::Device, MemoryReport)>,
    step: u64,
    epoch: u64,
    batch_in_epoch: usize,
    bad_streak: usize,
    /// The loss the divergence check compares with (see `divergence_factor`).
    start_score: Option<f64>,
    best: Option<Best>,
}

impl Trainer {
    /// A trainer; nothing runs until [`Trainer::fit`].
    pub fn new(model: AdaptedModel, cfg: TrainConfig) -> Result<Trainer> {
        if cfg.batch_size == 0 || cfg.epochs == 0 {
            return Err(Error::Config("batch_size and epochs must be at least 1".into()));
        }
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(Error::Config(format!("learning rate {} must be positive", cfg.lr)));
        }
        Ok(Trainer {
            model,
            cfg,
            opt: None,
            memory: None,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            bad_streak: 0,
            start_score: None,
            best: None,
        })
    }

    /// The adapted model (its tail holds the trained adapters, and the new head).
    pub fn model(&self) -> &AdaptedModel {
        &self.model
    }

    /// Mutable [`Trainer::model`].
    pub fn model_mut(&mut self) -> &mut AdaptedModel {
        &mut self.model
    }

    /// The model, handed back (for inference or export after training).
    pub fn into_model(self) -> AdaptedModel {
        self.model
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The new head, if one is trained.
    pub fn head(&self) -> Option<&LinearHead> {
        self.model.head()
    }

    /// Steps taken (including skipped ones).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Current epoch (0-based) and the next batch within it.
    pub fn position(&self) -> (u64, usize) {
        (self.epoch, self.batch_in_epoch)
    }

    pub(crate) fn set_position(&mut self, step: u64, epoch: u64, batch: usize, bad: usize) {
        (self.step, self.epoch, self.batch_in_epoch, self.bad_streak) = (step, epoch, batch, bad);
    }

    pub(crate) fn optimizer(&self) -> Option<&Optimizer> {
        self.opt.as_ref()
    }

    pub(crate) fn optimizer_mut(&mut self) -> &mut Option<Optimizer> {
        &mut self.opt
    }

    pub(crate) fn bad_streak(&self) -> usize {
        self.bad_streak
    }

    /// The loss at the start of training that divergence is judged against.
    pub fn start_score(&self) -> Option<f64> {
        self.start_score
    }

    /// `(epoch, score)` of the best epoch so far: lowest eval loss when
    /// held-out data is given, else lowest mean train loss.
    pub fn best_epoch(&self) -> Option<(u64, f64)> {
        self.best.as_ref().map(|b| (b.epoch, b.score))
    }

    pub(crate) fn best(&self) -> Option<&Best> {
        self.best.as_ref()
    }

    pub(crate) fn set_scores(&mut self, start: Option<f64>, best: Option<Best>) {
        (self.start_score, self.best) = (start, best);
    }

    /// Puts the best epoch's parameters back into the model (after a
    /// diverged or overfitted run); `false` if no epoch has finished.
    pub fn restore_best(&mut self) -> Result<bool> {
        let Some(best) = &self.best else { return Ok(false) };
        let (params, _) = self.model.params_and_grads();
        if params.len() != best.params.len()
            || params.iter().zip(&best.params).any(|(p, b)| p.len() != b.len())
        {
            return Err(Error::Config(
                "the best epoch's parameters no longer fit the model".into(),
            ));
        }
        for (p, b) in params.into_iter().zip(&best.params) {
            p.copy_from_slice(b);
        }
        Ok(true)
    }

    fn schedule(&self, n: usize) -> Schedule {
        let per_epoch = n.div_ceil(self.cfg.batch_size) as u64;
        Schedule {
            base: self.cfg.lr,
            min: self.cfg.min_lr,
            warmup: self.cfg.warmup_steps,
            total: per_epoch * self.cfg.epochs as u64,
        }
    }

    /// Creates the head (sized from the features of `boundary`, on first
    /// sight) and the optimiser.
    pub(crate) fn ensure_state(&mut self, boundary: Option<&[Tensor]>) -> Result<()> {
        if let Some(b) = boundary {
            self.model.ensure_head(self.cfg.head, b, self.cfg.seed)?;
        }
        if self.opt.is_none() {
            let lens: Vec<usize> = self.model.params().iter().map(|p| p.len()).collect();
            self.opt = Some(Optimizer::new(self.cfg.optimizer, self.cfg.weight_decay, &lens));
        }
        Ok(())
    }

    /// Estimates peak memory for training on `train` (runs one forward on a
    /// first batch; made once per training set and remembered).
    pub fn estimate_memory(&mut self, train: &Dataset) -> Result<MemoryReport> {
        use crate::model::Samples;
        if let Some((id, device, m)) = self.memory
            && id == train.id()
            && device == crate::device::device()
        {
            return Ok(m);
        }
        if train.is_empty() {
            return Err(Error::Config("empty training set".into()));
        }
        let idx: Vec<usize> = (0..train.len().min(self.cfg.batch_size)).collect();
        // Sizes do not depend on values: a non-finite sample must not stop the estimate.
        let feed: crate::backbone::Feed = train
            .batch(&idx)
            .0
            .into_iter()
            .map(|(k, t)| match t {
                Tensor::F32(a) => (k, Tensor::F32(a.mapv(|v| if v.is_finite() { v } else { 0.0 }))),
                t => (k, t),
            })
            .collect();
        let boundary = self.model.prefix(&feed)?;
        let (record, floats) =
            FeatureCache::record_bytes(&boundary, idx.len(), self.cfg.cache.dtype);
        let m = self.model.estimate_memory_on(boundary.clone())?;
        let head = match (self.cfg.head, self.model.head()) {
            // Not created yet: weights, gradients, two moments (once created
            // it is one of the tail's trainable parameters, counted above).
            (HeadConfig::New(c), None) => {
                let out = self.model.tail_mut().forward(boundary, false)?;
                self.model.tail_mut().clear_tape();
                let feat: usize = out.shape()[1..].iter().product();
                feat.saturating_mul(c).saturating_add(c).saturating_mul(16)
            }
            _ => 0,
        };
        let whole = record.saturating_mul(train.len());
        let cache = if self.cfg.cache.enabled { whole.min(self.cfg.cache.ram_budget) } else { 0 };
        // As `FeatureCache::batch_on_gpu` decides for the training set's
        // cache (a held-out set's cache takes from the same budget).
        let gpu_cache = if self.cfg.cache.enabled
            && floats
            && crate::device::resident::active()
            && whole <= self.cfg.cache.ram_budget
            && whole <= self.cfg.cache.gpu_budget
            && crate::device::resident::memory().is_some_and(|(free, _)| whole <= free / 2)
        {
            whole
        } else {
            0
        };
        let activation = m.per_sample_bytes.saturating_mul(self.cfg.batch_size);
        let params = m.fixed_bytes.saturating_add(head);
        let backbone = self.model.backbone_bytes();
        let report = MemoryReport {
            cache_bytes: cache,
            gpu_cache_bytes: gpu_cache,
            activation_bytes: activation,
            parameter_bytes: params,
            backbone_bytes: backbone,
            // GPU memory is RAM only where the GPU shares it (a Jetson).
            total_bytes: cache
                .saturating_add(if crate::device::gpu_shares_host_memory() { gpu_cache } else { 0 })
                .saturating_add(activation)
                .saturating_add(params)
                .saturating_add(backbone),
        };
        self.memory = Some((train.id(), crate::device::device(), report));
        Ok(report)
    }

    /// Trains for the configured epochs (resuming where a checkpoint left off).
    pub fn fit(
        &mut self,
        train: &Dataset,
        eval: Option<&Dataset>,
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<Vec<EpochMetrics>> {
        self.fit_until(train, eval, None, on)
    }

    /// Like [`Trainer::fit`], stopping once `max_steps` steps have been taken.
    /// The feature caches live in the model: calling this once per epoch
    /// builds them once.
    pub fn fit_until(
        &mut self,
        train: &Dataset,
        eval: Option<&Dataset>,
        max_steps: Option<u64>,
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<Vec<EpochMetrics>> {
        self.fit_inner(train, eval, max_steps, self.cfg.epochs, on)
    }

    /// Finishes the current epoch (from wherever a checkpoint left it) and
    /// returns its figures; `None` once all epochs are done. Always makes
    /// progress: a position past the end of the epoch (a checkpoint taken with
    /// another batch size or data set) just closes the epoch.
    pub fn fit_epoch(
        &mut self,
        train: &Dataset,
        eval: Option<&Dataset>,
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<Option<EpochMetrics>> {
        if self.epoch as usize >= self.cfg.epochs {
            return Ok(None);
        }
        let last = self.epoch as usize + 1;
        Ok(self.fit_inner(train, eval, None, last, on)?.pop())
    }

    fn fit_inner(
        &mut self,
        train: &Dataset,
        eval: Option<&Dataset>,
        max_steps: Option<u64>,
        epochs: usize,
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<Vec<EpochMetrics>> {
        let report = self.estimate_memory(train)?;
        if let Some(budget) = self.cfg.memory_budget
            && report.total_bytes > budget
        {
            return Err(Error::OverBudget {
                estimate: report.total_bytes,
                budget,
                detail: format!(
                    "cache {:.1} MB (+ {:.1} MB on the GPU) + activations {:.1} MB (batch {}) + parameters/optimizer {:.1} MB + backbone {:.1} MB",
                    report.cache_bytes as f64 / 1e6,
                    report.gpu_cache_bytes as f64 / 1e6,
                    report.activation_bytes as f64 / 1e6,
                    self.cfg.batch_size,
                    report.parameter_bytes as f64 / 1e6,
                    report.backbone_bytes as f64 / 1e6
                ),
            });
        }
        let schedule = self.schedule(train.len());
        let mut out = Vec::new();
        let eval = eval.filter(|e| !e.is_empty());
        while (self.epoch as usize) < epochs.min(self.cfg.epochs) {
            let t0 = Instant::now();
            let prefix0 = self.model.prefix_samples();
            // The divergence reference with held-out data: one evaluation before the first step.
            if let Some(e) = eval
                && self.cfg.divergence_factor.is_some()
                && self.start_score.is_none()
                && self.step == 0
            {
                self.start_score = Some(self.evaluate_with(e, self.cfg.cache.enabled)?.0);
            }
            let order = epoch_order(train.len(), self.cfg.seed, self.epoch);
            let batches: Vec<&[usize]> = order.chunks(self.cfg.batch_size).collect();
            let (mut loss_sum, mut good, mut skipped) = (0.0f64, 0usize, 0usize);
            let (mut right, mut judged) = (0usize, 0usize);
            while self.batch_in_epoch < batches.len() {
                if max_steps.is_some_and(|m| self.step >= m) {
                    return Ok(out);
                }
                let idx = batches[self.batch_in_epoch];
                let boundary =
                    self.model.boundary_batch(train, idx, &self.cfg.cache, self.cfg.batch_size)?;
                let labels = train.batch_labels(idx);
                let lr = schedule.lr(self.step);
                match self.train_batch(boundary, &labels, lr)? {
                    Outcome::Done { loss, correct } => {
                        self.bad_streak = 0;
                        if eval.is_none() && self.start_score.is_none() && self.step == 0 {
                            self.start_score = Some(loss);
                        }
                        loss_sum += loss;
                        good += 1;
                        if let Some((c, j)) = correct {
                            right += c;
                            judged += j;
                        }
                        on(Event::Step {
                            epoch: self.epoch,
                            step: self.step,
                            of: batches.len(),
                            loss,
                            lr,
                        });
                    }
                    Outcome::Skipped(reason) => {
                        self.bad_streak += 1;
                        skipped += 1;
                        on(Event::Skipped { step: self.step, reason });
                        if self.bad_streak > self.cfg.max_bad_steps {
                            return Err(Error::Diverged {
                                reason: format!(
                                    "{} consecutive steps had a non-finite loss or gradient",
                                    self.bad_streak
                                ),
                            });
                        }
                    }
                }
                // A checkpoint may say anything: never overflow.
                self.step = self.step.saturating_add(1);
                self.batch_in_epoch += 1;
            }
            let (eval_loss, eval_accuracy) = match eval {
                Some(e) => {
                    let (l, a) = self.evaluate_with(e, self.cfg.cache.enabled)?;
                    (Some(l), a)
                }
                None => (None, None),
            };
            let m = EpochMetrics {
                epoch: self.epoch,
                train_loss: if good > 0 { loss_sum / good as f64 } else { f64::NAN },
                train_accuracy: (judged > 0).then(|| right as f64 / judged as f64),
                eval_loss,
                eval_accuracy,
                skipped_steps: skipped,
                seconds: t0.elapsed().as_secs_f64(),
                prefix_samples: self.model.prefix_samples() - prefix0,
            };
            on(Event::Epoch(&m));
            let (score, what) = match m.eval_loss {
                Some(l) => (l, "eval loss"),
                None => (m.train_loss, "train loss"),
            };
            // An epoch whose steps were all skipped has no loss: the
            // non-finite streak judges it, not this check.
            let judged = good > 0 || eval.is_some();
            if let (Some(f), true) = (self.cfg.divergence_factor, judged) {
                let start = *self.start_score.get_or_insert(score);
                let num =
                    |v: f64| if v.abs() < 1e5 { format!("{v:.4}") } else { format!("{v:.3e}") };
                if !score.is_finite() {
                    return Err(Error::Diverged {
                        reason: format!("epoch {}'s {what} is {score}", m.epoch + 1),
                    });
                }
                if score > f * start.max(0.1) {
                    return Err(Error::Diverged {
                        reason: format!(
                            "epoch {}'s {what} {} is over {f}× the {} at the start",
                            m.epoch + 1,
                            num(score),
                            num(start)
                        ),
                    });
                }
            }
            if judged && score.is_finite() && self.best.as_ref().is_none_or(|b| score < b.score) {
                let params = self.model.param_values().into_iter().map(<[f32]>::to_vec).collect();
                self.best = Some(Best { epoch: m.epoch, score, params });
            }
            out.push(m);
            self.epoch = self.epoch.saturating_add(1);
            self.batch_in_epoch = 0;
        }
        Ok(out)
    }

    fn train_batch(
        &mut self,
        boundary: BoundaryBatch,
        labels: &Labels,
        lr: f32,
    ) -> Result<Outcome> {
        self.ensure_state(Some(boundary.tensors()))?;
        // The head is the tail's last op: the tail's output is the prediction.
        let logits = match self.model.predict_batch(boundary, true) {
            Err(Error::NonFinite(_)) => return Ok(Outcome::Skipped("non-finite activations")),
            r => r?,
        };
        if logits.iter().any(|v| !v.is_finite()) {
            self.model.tail_mut().clear_tape();
            return Ok(Outcome::Skipped("non-finite output"));
        }
        let lo = self.cfg.loss.compute(&logits, labels)?;
        if !lo.loss.is_finite() {
            self.model.tail_mut().clear_tape();
            return Ok(Outcome::Skipped("non-finite loss"));
        }
        self.model.zero_grad();
        let back = self.model.backward_prediction(lo.grad);
        self.model.tail_mut().clear_tape();
        match back {
            Err(Error::NonFinite(_)) => return Ok(Outcome::Skipped("non-finite gradient")),
            r => r?,
        }
        let opt =
            self.opt.as_mut().ok_or_else(|| Error::Config("optimizer not initialised".into()))?;
        let (mut params, grads) = self.model.params_and_grads();
        if grads.iter().any(|g| g.iter().any(|v| !v.is_finite())) {
            return Ok(Outcome::Skipped("non-finite gradient"));
        }
        let mut grads: Vec<Vec<f32>> = grads.into_iter().map(<[f32]>::to_vec).collect();
        if let Some(c) = self.cfg.clip_norm {
            clip_global_norm(&mut grads, c);
        }
        let grad_refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        opt.step(&mut params, &grad_refs, lr);
        Ok(Outcome::Done { loss: lo.loss, correct: lo.correct })
    }

    /// Mean loss and accuracy on `data` (dropout off), computing the prefix live.
    pub fn evaluate(&mut self, data: &Dataset) -> Result<(f64, Option<f64>)> {
        self.evaluate_with(data, false)
    }

    /// Like [`Trainer::evaluate`], through the feature cache when it is
    /// enabled (the data set's cache is built once and kept).
    pub fn evaluate_cached(&mut self, data: &Dataset) -> Result<(f64, Option<f64>)> {
        self.evaluate_with(data, self.cfg.cache.enabled)
    }

    fn evaluate_with(&mut self, data: &Dataset, cached: bool) -> Result<(f64, Option<f64>)> {
        let (mut loss, mut n, mut right, mut judged) = (0.0f64, 0usize, 0usize, 0usize);
        let order: Vec<usize> = (0..data.len()).collect();
        let cache = CacheConfig { enabled: cached, ..self.cfg.cache.clone() };
        for idx in order.chunks(self.cfg.batch_size) {
            let boundary = self.model.boundary_batch(data, idx, &cache, self.cfg.batch_size)?;
            let logits = self.predict_boundary(boundary)?;
            let lo = self.cfg.loss.compute(&logits, &data.batch_labels(idx))?;
            loss += lo.loss * idx.len() as f64;
            n += idx.len();
            if let Some((c, j)) = lo.correct {
                right += c;
                judged += j;
            }
        }
        if n == 0 {
            return Err(Error::Config("nothing to evaluate: the data set is empty".into()));
        }
        Ok((loss / n as f64, (judged > 0).then(|| right as f64 / judged as f64)))
    }

    fn predict_boundary(&mut self, boundary: BoundaryBatch) -> Result<ArrayD<f32>> {
        self.ensure_state(Some(boundary.tensors()))?;
        let y = self.model.predict_batch(boundary, false);
        self.model.tail_mut().clear_tape();
        y
    }

    /// The model's prediction (head output, or the tail's output) for a feed.
    pub fn predict(&mut self, feed: &crate::backbone::Feed) -> Result<ArrayD<f32>> {
        let dtype = self.cfg.cache.dtype;
        let boundary = self
            .model
            .prefix(feed)?
            .into_iter()
            .map(|t| crate::model::round_boundary(t, dtype))
            .collect::<Vec<_>>();
        self.predict_boundary(boundary.into())
    }
}
