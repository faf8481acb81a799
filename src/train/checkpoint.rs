//! Adapter files and checkpoints of a [`Trainer`].
//!
//! Tensor names: `{layer}/{parallel|sequential}/{A|B|bias_down|bias_up}`,
//! `head/W`, `head/b`; a checkpoint adds `optimizer/m/{i}`, `optimizer/v/{i}`
//! (always f32, so that a resumed run is bit-identical), the step, epoch,
//! position in the epoch and every adapter's dropout generator state.

use std::collections::BTreeMap;
use std::path::Path;

use super::trainer::{Best, TrainConfig, Trainer};
use crate::adapter::{AdapterFile, CheckpointState, DType, Header, NamedTensor};
use crate::error::{Error, Result};
use crate::model::{AdaptedModel, HeadConfig, PreparedAdapter};
use crate::rng::Rng;

impl Trainer {
    /// The trained adapters (and head) as a file; with `checkpoint`, the
    /// optimiser state and the run's position too.
    pub fn adapter_file(&self, checkpoint: bool, dtype: DType) -> Result<AdapterFile> {
        let model = self.model();
        let mut tensors = model.named_tensors(dtype)?;
        let rngs: Vec<[u64; 4]> = model.tail().adapters().map(|(_, a)| a.rng().state()).collect();
        let mut metadata = BTreeMap::new();
        metadata.insert("output".into(), model.report().output.clone());
        metadata.insert("steps".into(), self.step().to_string());
        metadata
            .insert("loss".into(), serde_json::to_string(&self.config().loss).unwrap_or_default());
        metadata.insert("created_by".into(), format!("hydra-edge {}", env!("CARGO_PKG_VERSION")));
        let head = match model.head() {
            Some(h) => format!("new:{}:{}", h.dims().1, h.dims().0),
            None => "keep".into(),
        };
        metadata.insert("head".into(), head);
        let checkpoint = if checkpoint {
            let mut extra = BTreeMap::new();
            let (epoch, batch) = self.position();
            extra.insert("batch_in_epoch".into(), batch.to_string());
            extra.insert("bad_streak".into(), self.bad_streak().to_string());
            // The divergence reference and the best epoch survive a resume.
            if let Some(s) = self.start_score() {
                extra.insert("start_score".into(), s.to_string());
            }
            if let Some(b) = self.best() {
                extra.insert("best_epoch".into(), b.epoch.to_string());
                extra.insert("best_score".into(), b.score.to_string());
                for (i, t) in b.params.iter().enumerate() {
                    tensors.push(NamedTensor::new(
                        format!("best/{i}"),
                        vec![t.len()],
                        DType::F32,
                        t.clone(),
                    )?);
                }
            }
            if let Some(opt) = self.optimizer() {
                extra.insert("optimizer_steps".into(), opt.steps().to_string());
                let (m, v) = opt.state();
                for (i, t) in m.iter().enumerate() {
                    tensors.push(NamedTensor::new(
                        format!("optimizer/m/{i}"),
                        vec![t.len()],
                        DType::F32,
                        t.clone(),
                    )?);
                }
                for (i, t) in v.iter().enumerate() {
                    tensors.push(NamedTensor::new(
                        format!("optimizer/v/{i}"),
                        vec![t.len()],
                        DType::F32,
                        t.clone(),
                    )?);
                }
            }
            Some(CheckpointState { step: self.step(), epoch, rngs, extra })
        } else {
            None
        };
        let header = Header {
            config: model.adapter_config().clone(),
            layers: model.layer_entries(),
            fingerprint: model.fingerprint(),
            metadata,
            checkpoint,
        };
        Ok(AdapterFile { header, tensors })
    }

    /// Saves the adapters (f32, or f16 to halve the file) atomically.
    pub fn save_adapter(&self, path: &Path, dtype: DType) -> Result<()> {
        self.adapter_file(false, dtype)?.save(path)
    }

    /// Saves a checkpoint atomically: a killed process leaves the old file or the new one.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        self.adapter_file(true, DType::F32)?.save(path)
    }

    /// A trainer continuing from the checkpoint at `path`.
    pub fn resume(split: AdaptedModel, cfg: TrainConfig, path: &Path) -> Result<Trainer> {
        let file = AdapterFile::load(path)?;
        let mut t = Trainer::new(split, cfg)?;
        t.load(&file)?;
        Ok(t)
    }

    /// Loads adapters (and head; with a checkpoint, the run's state) from `file`.
    /// Refused unless the file was trained on this base model and these layers.
    pub fn load(&mut self, file: &AdapterFile) -> Result<()> {
        let want_head = match self.config().head {
            HeadConfig::Keep => None,
            HeadConfig::New(c) => Some(c),
        };
        let prepared = PreparedAdapter::new(self.model(), file, want_head)?;
        let get = |name: &str, len: usize| crate::model::params::tensor(file, name, len);
        let num = |k: &str| -> Result<usize> {
            let cp = file.header.checkpoint.as_ref();
            cp.and_then(|cp| cp.extra.get(k))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::Corrupt(format!("checkpoint lacks a valid `{k}`")))
        };
        // Validate the checkpoint part too before changing anything.
        if let Some(cp) = &file.header.checkpoint {
            num("batch_in_epoch")?;
            num("bad_streak")?;
            // Optional (a checkpoint taken before the first step has none),
            // but when present it must parse: never drop the state silently.
            for k in ["optimizer_steps", "best_epoch"] {
                if cp.extra.contains_key(k) {
                    num(k)?;
                }
            }
            if cp.rngs.len() != self.model().tail().adapters().count() {
                return Err(Error::Corrupt(
                    "checkpoint needs a generator state per adapter".into(),
                ));
            }
        }
        prepared.apply(self.model_mut())?;
        if let Some(cp) = &file.header.checkpoint {
            let (batch, bad) = (num("batch_in_epoch")?, num("bad_streak")?);
            for ((_, a), s) in self.model_mut().tail_mut().adapters_mut().zip(&cp.rngs) {
                a.set_rng(Rng::from_state(*s));
            }
            self.set_position(cp.step, cp.epoch, batch, bad);
            let score = |k: &str| -> Result<Option<f64>> {
                cp.extra
                    .get(k)
                    .map(|v| {
                        v.parse::<f64>()
                            .map_err(|_| Error::Corrupt(format!("checkpoint lacks a valid `{k}`")))
                    })
                    .transpose()
            };
            let start = score("start_score")?;
            let best = match (num("best_epoch").ok(), score("best_score")?) {
                (Some(epoch), Some(score)) => {
                    let lens: Vec<usize> = prepared_lens(self);
                    let params = (0..lens.len())
                        .map(|i| get(&format!("best/{i}"), lens[i]).map(|t| t.data.clone()))
                        .collect::<Result<Vec<_>>>()?;
                    Some(Best { epoch: epoch as u64, score, params })
                }
                _ => None,
            };
            self.set_scores(start, best);
            if let Ok(t) = num("optimizer_steps") {
                self.ensure_state(None)?;
                let lens: Vec<usize> = self.model().params().iter().map(|p| p.len()).collect();
                let read = |kind: &str| -> Result<Vec<Vec<f32>>> {
                    (0..lens.len())
                        .map(|i| {
                            get(&format!("optimizer/{kind}/{i}"), lens[i]).map(|t| t.data.clone())
                        })
                        .collect()
                };
                let m = read("m")?;
                let v =
                    if file.tensor("optimizer/v/0").is_some() { read("v")? } else { Vec::new() };
                let opt = self
                    .optimizer_mut()
                    .as_mut()
                    .ok_or_else(|| Error::Config("optimizer".into()))?;
                if !opt.restore(m, v, t as u64) {
                    return Err(Error::Config(
                        "the checkpoint's optimizer state does not fit this configuration".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Lengths of the model's parameters, in registry order (the head included
/// once the file's head has been applied).
fn prepared_lens(t: &Trainer) -> Vec<usize> {
    t.model().params().iter().map(|p| p.len()).collect()
}
