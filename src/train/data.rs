//! Training data: named input arrays with a leading sample axis plus labels
//! (class indices) or targets (float arrays), from memory (apps) or from an
//! `.npz` file (the CLI). Batches are rows picked along axis 0; the order of
//! an epoch is a seeded permutation, the last partial batch is kept.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{ArrayD, Axis};

use crate::Tensor;
use crate::backbone::Feed;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// What the model should predict for each sample.
#[derive(Clone, Debug, PartialEq)]
pub enum Labels {
    /// A class index per sample (cross-entropy, accuracy).
    Classes(Vec<usize>),
    /// A float target array per sample, `[N, ...]` (MSE, binary cross-entropy).
    Values(ArrayD<f32>),
}

impl Labels {
    fn len(&self) -> usize {
        match self {
            Labels::Classes(c) => c.len(),
            Labels::Values(v) => v.shape().first().copied().unwrap_or(0),
        }
    }

    fn select(&self, idx: &[usize]) -> Labels {
        match self {
            Labels::Classes(c) => Labels::Classes(idx.iter().map(|&i| c[i]).collect()),
            Labels::Values(v) => Labels::Values(v.select(Axis(0), idx)),
        }
    }
}

/// A labelled dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    inputs: BTreeMap<String, Tensor>,
    labels: Labels,
    len: usize,
    /// Fresh for every data set built (clones share it: same samples).
    id: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl crate::model::Samples for Dataset {
    fn len(&self) -> usize {
        self.len
    }

    fn feed(&self, idx: &[usize]) -> Feed {
        self.inputs.iter().map(|(k, t)| (k.clone(), select(t, idx))).collect()
    }

    fn id(&self) -> u64 {
        self.id
    }
}

fn select(t: &Tensor, idx: &[usize]) -> Tensor {
    match t {
        Tensor::F32(a) => Tensor::F32(a.select(Axis(0), idx)),
        Tensor::F16(a) => Tensor::F16(a.select(Axis(0), idx)),
        Tensor::I64(a) => Tensor::I64(a.select(Axis(0), idx)),
    }
}

impl Dataset {
    /// Inputs keyed by model input name, each `[N, ...]`, and their labels.
    pub fn new(
        inputs: impl IntoIterator<Item = (String, Tensor)>,
        labels: Labels,
    ) -> Result<Dataset> {
        let inputs: BTreeMap<String, Tensor> = inputs.into_iter().collect();
        let len = labels.len();
        if inputs.is_empty() {
            return Err(Error::Config("a dataset needs at least one input array".into()));
        }
        for (name, t) in &inputs {
            if t.shape().first() != Some(&len) {
                return Err(Error::Shape {
                    context: "dataset input",
                    expected: format!("{len} samples (as many as labels) along axis 0 of `{name}`"),
                    got: format!("{:?}", t.shape()),
                });
            }
        }
        Ok(Dataset { inputs, labels, len, id: next_id() })
    }

    /// Loads an `.npz`: every array but `label_key` is a model input; the
    /// `label_key` array holds class indices (integers) or float targets.
    pub fn from_npz(path: &Path, label_key: &str) -> Result<Dataset> {
        Dataset::from_arrays(super::npz::read_npz(path)?, label_key)
    }

    /// Like [`Dataset::from_npz`], from arrays already read.
    pub fn from_arrays(mut arrays: BTreeMap<String, Tensor>, label_key: &str) -> Result<Dataset> {
        let labels = arrays
            .remove(label_key)
            .ok_or_else(|| Error::NotFound { what: "label array", name: label_key.into() })?;
        let labels = match labels {
            Tensor::I64(a) => Labels::Classes(
                a.iter()
                    .map(|&v| {
                        usize::try_from(v)
                            .map_err(|_| Error::Config(format!("negative class label {v}")))
                    })
                    .collect::<Result<_>>()?,
            ),
            Tensor::F32(a) => Labels::Values(a),
            t @ Tensor::F16(_) => Labels::Values(t.to_f32("labels")?.into_owned()),
        };
        Dataset::new(arrays, labels)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The labels.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The input names.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.inputs.keys().map(String::as_str)
    }

    /// The samples `idx` as a model feed and their labels.
    pub fn batch(&self, idx: &[usize]) -> (Feed, Labels) {
        (crate::model::Samples::feed(self, idx), self.labels.select(idx))
    }

    /// The labels of samples `idx`.
    pub fn batch_labels(&self, idx: &[usize]) -> Labels {
        self.labels.select(idx)
    }

    /// The samples `idx` as a new dataset.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let (inputs, labels) = self.batch(idx);
        Dataset { inputs: inputs.into_iter().collect(), labels, len: idx.len(), id: next_id() }
    }

    /// A seeded split into (train, held-out evaluation) with `eval_fraction` of the samples held out.
    pub fn split(&self, eval_fraction: f32, seed: u64) -> (Dataset, Dataset) {
        let order = permutation(self.len, seed);
        let n_eval = ((self.len as f32) * eval_fraction.clamp(0.0, 1.0)).round() as usize;
        let (eval, train) = order.split_at(n_eval.min(self.len));
        (self.subset(train), self.subset(eval))
    }
}

/// A seeded permutation of `0..n` (Fisher–Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// The sample order of `epoch`: a function of the seed and the epoch alone,
/// so a resumed run regenerates it without saving it.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    permutation(n, seed ^ (epoch.wrapping_add(1)).wrapping_mul(0xA076_1D64_78BD_642F))
}
