//! Adapter files and checkpoints of a [`Trainer`].
//!
//! Tensor names: `{layer}/{parallel|sequential}/{A|B|bias_down|bias_up}`,
//! `head/W`, `head/b`; a checkpoint adds `optimizer/m/{i}`, `optimizer/v/{i}`
//! (always f32, so that a resumed run is bit-identical), the step, epoch,
//! position in the epoch and every adapter's dropout generator state.

use std::collections::BTreeMap;
use std::path::Path;

use super::head::{HeadConfig, LinearHead};
use super::trainer::{TrainConfig, Trainer};
use crate::adapter::{AdapterFile, CheckpointState, DType, Header, LayerEntry, NamedTensor};
use crate::error::{Error, Result};
use crate::hydra::{Branch, HydraLinear};
use crate::onnx::SplitModel;
use crate::rng::Rng;

const PARTS: [&str; 4] = ["A", "B", "bias_down", "bias_up"];

fn branch_tensors<'a>(name: &str, which: &str, b: &'a Branch) -> Vec<(String, &'a [f32])> {
    let parts = [Some(&b.a[..]), Some(&b.b[..]), b.bias_down.as_deref(), b.bias_up.as_deref()];
    PARTS.iter().zip(parts).filter_map(|(p, t)| Some((format!("{name}/{which}/{p}"), t?))).collect()
}

fn adapter_tensors(name: &str, a: &HydraLinear) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (which, b) in [("parallel", a.parallel()), ("sequential", a.sequential())] {
        if let Some(b) = b {
            out.extend(branch_tensors(name, which, b).into_iter().map(|(n, t)| (n, t.to_vec())));
        }
    }
    out
}

impl Trainer {
    /// The trained adapters (and head) as a file; with `checkpoint`, the
    /// optimiser state and the run's position too.
    pub fn adapter_file(&self, checkpoint: bool, dtype: DType) -> Result<AdapterFile> {
        let tail = self.model().tail();
        let mut tensors = Vec::new();
        let mut layers = Vec::new();
        let mut rngs = Vec::new();
        let mut config = None;
        for (name, a) in tail.adapters() {
            layers.push(LayerEntry {
                name: name.to_string(),
                in_dim: a.in_dim(),
                out_dim: a.out_dim(),
            });
            config.get_or_insert_with(|| a.config().clone());
            rngs.push(a.rng().state());
            for (n, t) in adapter_tensors(name, a) {
                tensors.push(NamedTensor::new(n, vec![t.len()], dtype, t)?);
            }
        }
        // A head-only run has no adapter: its config is recorded as the default.
        let config = config.unwrap_or_default();
        let mut metadata = BTreeMap::new();
        metadata.insert("output".into(), tail.output_name().to_string());
        metadata.insert("steps".into(), self.step().to_string());
        metadata
            .insert("loss".into(), serde_json::to_string(&self.config().loss).unwrap_or_default());
        metadata.insert("created_by".into(), format!("hydra-edge {}", env!("CARGO_PKG_VERSION")));
        match self.head() {
            Some(h) => {
                let (i, o) = h.dims();
                metadata.insert("head".into(), format!("new:{o}:{i}"));
                tensors.push(NamedTensor::new("head/W", vec![o, i], dtype, h.w.clone())?);
                tensors.push(NamedTensor::new("head/b", vec![o], dtype, h.b.clone())?);
            }
            None => {
                metadata.insert("head".into(), "keep".into());
            }
        }
        let checkpoint = if checkpoint {
            let mut extra = BTreeMap::new();
            let (epoch, batch) = self.position();
            extra.insert("batch_in_epoch".into(), batch.to_string());
            extra.insert("bad_streak".into(), self.bad_streak().to_string());
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
            config,
            layers,
            fingerprint: self.model().fingerprint(),
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
    pub fn resume(split: SplitModel, cfg: TrainConfig, path: &Path) -> Result<Trainer> {
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
        let get = |name: &str, len: usize| tensor(file, name, len);
        let num = |k: &str| -> Result<usize> {
            let cp = file.header.checkpoint.as_ref();
            cp.and_then(|cp| cp.extra.get(k))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::Corrupt(format!("checkpoint lacks `{k}`")))
        };
        // Validate the checkpoint part too before changing anything.
        if let Some(cp) = &file.header.checkpoint {
            num("batch_in_epoch")?;
            num("bad_streak")?;
            if cp.rngs.len() != self.model().tail().adapters().count() {
                return Err(Error::Corrupt(
                    "checkpoint needs a generator state per adapter".into(),
                ));
            }
        }
        let head = prepared.head.clone();
        prepared.apply(self.model_mut());
        *self.head_mut() = head;
        if let Some(cp) = &file.header.checkpoint {
            let (batch, bad) = (num("batch_in_epoch")?, num("bad_streak")?);
            for ((_, a), s) in self.model_mut().tail_mut().adapters_mut().zip(&cp.rngs) {
                a.set_rng(Rng::from_state(*s));
            }
            self.set_position(cp.step, cp.epoch, batch, bad);
            if let Ok(t) = num("optimizer_steps") {
                self.ensure_state(None);
                let lens = self.param_lens();
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

fn tensor<'f>(file: &'f AdapterFile, name: &str, len: usize) -> Result<&'f NamedTensor> {
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

/// An adapter file checked against a split model and laid out in the
/// model's parameter order, ready to be copied in (hot-swapping is this copy).
#[derive(Clone, Debug)]
pub struct PreparedAdapter {
    params: Vec<Vec<f32>>,
    /// The file's new head, if it has one.
    pub head: Option<LinearHead>,
}

impl PreparedAdapter {
    /// Checks `file` against `model` (fingerprint, layers, shapes, head) without changing anything.
    /// `want_head`: `Some(classes)` if a new head is expected, `None` to keep the model's output.
    pub fn new(
        model: &SplitModel,
        file: &AdapterFile,
        want_head: Option<usize>,
    ) -> Result<PreparedAdapter> {
        file.check_fingerprint(model.fingerprint())?;
        let want: Vec<LayerEntry> = model
            .tail()
            .adapters()
            .map(|(n, a)| LayerEntry {
                name: n.to_string(),
                in_dim: a.in_dim(),
                out_dim: a.out_dim(),
            })
            .collect();
        if want != file.header.layers {
            return Err(Error::Config(format!(
                "the adapter file's layers {:?} are not this model's adapted layers {:?}",
                file.header.layers.iter().map(|l| &l.name).collect::<Vec<_>>(),
                want.iter().map(|l| &l.name).collect::<Vec<_>>()
            )));
        }
        let mut params = Vec::new();
        for (name, a) in model.tail().adapters() {
            for (n, t) in adapter_tensors(name, a) {
                params.push(tensor(file, &n, t.len())?.data.clone());
            }
        }
        let head = match (file.header.metadata.get("head").map(String::as_str), want_head) {
            (Some("keep") | None, None) => None,
            (Some(h), Some(c)) if h.starts_with("new:") => {
                let dims: Vec<usize> = h[4..].split(':').filter_map(|s| s.parse().ok()).collect();
                let [o, i] = dims[..] else {
                    return Err(Error::Corrupt(format!("bad head entry `{h}`")));
                };
                if o != c {
                    return Err(Error::Config(format!(
                        "the file's head has {o} outputs, the configuration {c}"
                    )));
                }
                let mut head = LinearHead::new(i, o, 0);
                head.w.copy_from_slice(&tensor(file, "head/W", o * i)?.data);
                head.b.copy_from_slice(&tensor(file, "head/b", o)?.data);
                Some(head)
            }
            (h, c) => {
                return Err(Error::Config(format!(
                    "the file's head ({h:?}) does not match the configuration (new head: {c:?})"
                )));
            }
        };
        Ok(PreparedAdapter { params, head })
    }

    /// Copies the adapter's parameters into the model's adapters.
    pub fn apply(&self, model: &mut SplitModel) {
        let mut it = self.params.iter();
        for (_, a) in model.tail_mut().adapters_mut() {
            for (p, _) in a.params_and_grads() {
                if let Some(src) = it.next() {
                    p.copy_from_slice(src);
                }
            }
        }
    }
}
