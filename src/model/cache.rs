//! The feature cache: the frozen backbone runs once per sample, and every
//! later epoch reads the boundary tensors back instead of recomputing them.
//!
//! Each sample's rows of the batch-dependent boundary tensors are stored as
//! one fixed-size record — f32 activations as f16 (or f32), integer tensors
//! exactly — in RAM up to a byte budget and in a spill file beyond it.
//! How each boundary tensor depends on the batch is probed by running the
//! prefix at batch sizes 1, 2 and 3 and comparing *values*, not only shapes:
//! a tensor with a batch axis is stored per sample, one that is identical at
//! every batch size is stored once, and an integer tensor of fixed shape whose
//! values move with the batch (a Reshape target built from `Shape(x)`, as
//! many exporters write) is stored as `base + (b − 1)·step`, checked at the
//! third batch size. Anything else is refused with an error naming it. The uncached training path passes
//! its boundary tensors through the same rounding ([`round_boundary`]), so
//! training with and without the cache is bit-identical.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use half::f16;
use ndarray::{ArrayD, Axis, IxDyn};

use super::AdaptedModel;
use crate::Tensor;
use crate::backbone::Feed;
use crate::device::resident::{self as dev, GpuValue};
use crate::error::{Error, Result};
use crate::kernels;

/// What a feature cache is built from: numbered samples that become model
/// feeds, with an identity so that a model keeps one cache per data set.
pub trait Samples {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The samples `idx` as a model feed.
    fn feed(&self, idx: &[usize]) -> Feed;
    /// Identifies the samples: equal ids, equal samples.
    fn id(&self) -> u64;
}

/// Storage type of cached activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheDtype {
    /// Half the memory; what the kernels read fastest.
    #[default]
    F16,
    /// Exact.
    F32,
}

/// Cache settings.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Use the cache (else the prefix runs every epoch).
    pub enabled: bool,
    /// Storage of f32 boundary tensors (applies with or without the cache).
    pub dtype: CacheDtype,
    /// Records kept in RAM, in bytes; the rest spills to a file.
    pub ram_budget: usize,
    /// Folder of the spill file (default: the system temp folder).
    pub spill_dir: Option<PathBuf>,
    /// With a GPU in use: a cache held whole in RAM whose records fit in
    /// this many bytes (one budget for all of a model's caches — training
    /// and held-out data — first come, first served; and in half the GPU's
    /// free memory) is also kept on the GPU, and each batch's features are
    /// gathered there instead of sent up (0: never). On a Jetson, GPU
    /// memory is the board's RAM.
    pub gpu_budget: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            dtype: CacheDtype::F16,
            ram_budget: 256 << 20,
            spill_dir: None,
            gpu_budget: 256 << 20,
        }
    }
}

/// Rounds an f32 boundary tensor to the cache's storage precision: f16
/// storage hands the tail f16 tensors (the f16 kernels read them as they are).
pub fn round_boundary(t: Tensor, dtype: CacheDtype) -> Tensor {
    match dtype {
        CacheDtype::F16 => t.into_f16(),
        CacheDtype::F32 => t.into_f32(),
    }
}

#[derive(Debug)]
enum Slot {
    /// Rows of a batch-dependent tensor: per-sample shape, byte offset in the record.
    PerSample { shape: Vec<usize>, int: bool, offset: usize, count: usize },
    /// A tensor that is the same for every batch, stored once.
    Shared(Tensor),
    /// An integer tensor of fixed shape whose values follow the batch size
    /// (a Reshape target built from `Shape(x)`): `base + (b − 1)·step`.
    Affine { base: ndarray::ArrayD<i64>, step: ndarray::ArrayD<i64> },
}

/// How boundary tensor `j` depends on the batch, from the prefix's outputs at
/// batch sizes 1, 2 and (when the data has them) 3.
fn probe_slot(j: usize, t1: Tensor, t2: Option<&Tensor>, t3: Option<&Tensor>) -> Result<Probe> {
    let s1 = t1.shape().to_vec();
    let Some(t2) = t2 else {
        // One sample: every batch is batch 1.
        return Ok(if s1.first() == Some(&1) { Probe::PerSample(t1) } else { Probe::Shared(t1) });
    };
    let s2 = t2.shape();
    if s1.first() == Some(&1) && s2.first() == Some(&2) && s1[1..] == s2[1..] {
        return Ok(Probe::PerSample(t1));
    }
    let unsupported = |why: &str| {
        Error::Config(format!(
            "boundary tensor {j} ({s1:?} at batch 1, {s2:?} at batch 2) {why}; train without the feature cache"
        ))
    };
    if s1 != s2 {
        return Err(unsupported("changes shape with the batch in an unsupported way"));
    }
    if &t1 == t2 {
        return Ok(Probe::Shared(t1));
    }
    // Same shape, different values: shape arithmetic on the batch size.
    let (Tensor::I64(a1), Tensor::I64(a2)) = (&t1, t2) else {
        return Err(unsupported("has values that depend on the batch but no batch axis"));
    };
    let step = a2 - a1;
    if let Some(t3) = t3 {
        let ok = matches!(t3, Tensor::I64(a3) if a3.shape() == a1.shape()
            && a3.iter().zip(a1).zip(&step).all(|((v3, v1), d)| *v3 == v1 + 2 * d));
        if !ok {
            return Err(unsupported("depends on the batch size in a way that is not linear"));
        }
    }
    Ok(Probe::Affine { base: a1.clone(), step })
}

enum Probe {
    PerSample(Tensor),
    Shared(Tensor),
    Affine { base: ndarray::ArrayD<i64>, step: ndarray::ArrayD<i64> },
}

/// Cached boundary tensors of one dataset.
#[derive(Debug)]
pub struct FeatureCache {
    slots: Vec<Slot>,
    dtype: CacheDtype,
    record: usize,
    ram: Vec<u8>,
    ram_records: usize,
    spill: Option<(File, PathBuf)>,
    len: usize,
    /// The records, kept on the GPU in use (see [`FeatureCache::batch_on_gpu`]).
    gpu: Option<dev::GpuRecords>,
    /// The GPU (its `device::resident::gpu_id`) the records are not tried
    /// on again.
    gpu_refused: Option<u64>,
    /// Failed uploads in a row.
    gpu_failures: u8,
}

static SPILL_ID: AtomicU64 = AtomicU64::new(0);

impl FeatureCache {
    /// Runs the prefix over `data` in batches of `batch` and stores the result.
    pub fn build(
        split: &AdaptedModel,
        data: &dyn Samples,
        batch: usize,
        cfg: &CacheConfig,
    ) -> Result<FeatureCache> {
        let n = data.len();
        if n == 0 {
            return Err(Error::Config("cannot cache an empty dataset".into()));
        }
        let batch = batch.max(1);
        let one = split.prefix(&data.feed(&[0]))?;
        let two = if n >= 2 { Some(split.prefix(&data.feed(&[0, 1]))?) } else { None };
        let three = if n >= 3 { Some(split.prefix(&data.feed(&[0, 1, 2]))?) } else { None };
        let elem = |int: bool| {
            if int {
                8
            } else if cfg.dtype == CacheDtype::F16 {
                2
            } else {
                4
            }
        };
        let mut slots = Vec::new();
        let mut record = 0usize;
        for (j, t1) in one.into_iter().enumerate() {
            let t2 = two.as_ref().and_then(|t| t.get(j));
            let t3 = three.as_ref().and_then(|t| t.get(j));
            match probe_slot(j, t1, t2, t3)? {
                Probe::PerSample(t1) => {
                    let int = matches!(t1, Tensor::I64(_));
                    let shape = t1.shape()[1..].to_vec();
                    let count: usize = shape.iter().product();
                    slots.push(Slot::PerSample { shape, int, offset: record, count });
                    record += count * elem(int);
                }
                Probe::Shared(t) => slots.push(Slot::Shared(round_boundary(t, cfg.dtype))),
                Probe::Affine { base, step } => slots.push(Slot::Affine { base, step }),
            }
        }
        let ram_records = cfg.ram_budget.checked_div(record).map_or(n, |r| r.min(n));
        let spill = if ram_records < n {
            let dir = cfg.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
            let path = dir.join(format!(
                "hydra-cache-{}-{}.bin",
                std::process::id(),
                SPILL_ID.fetch_add(1, Ordering::Relaxed)
            ));
            let f = File::options().read(true).write(true).create_new(true).open(&path).map_err(
                |source| Error::Io {
                    context: format!("creating cache spill file {}", path.display()),
                    source,
                },
            )?;
            Some((f, path))
        } else {
            None
        };
        let mut cache = FeatureCache {
            slots,
            dtype: cfg.dtype,
            record,
            ram: Vec::with_capacity(ram_records * record),
            ram_records,
            spill,
            len: 0,
            gpu: None,
            gpu_refused: None,
            gpu_failures: 0,
        };
        let order: Vec<usize> = (0..n).collect();
        for chunk in order.chunks(batch) {
            let out = split.prefix(&data.feed(chunk))?;
            cache.append(&out, chunk.len())?;
        }
        Ok(cache)
    }

    fn append(&mut self, out: &[Tensor], rows: usize) -> Result<()> {
        let k = kernels::active();
        let mut buf = vec![0u8; self.record * rows];
        for (slot, t) in self.slots.iter().zip(out) {
            let Slot::PerSample { offset, count, .. } = slot else { continue };
            for r in 0..rows {
                let rec = &mut buf[r * self.record + offset..];
                match t {
                    Tensor::I64(a) => {
                        for (i, v) in a.index_axis(Axis(0), r).iter().enumerate() {
                            rec[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                    Tensor::F16(a) => {
                        for (i, v) in a.index_axis(Axis(0), r).iter().enumerate() {
                            if self.dtype == CacheDtype::F16 {
                                rec[i * 2..i * 2 + 2].copy_from_slice(&v.to_le_bytes());
                            } else {
                                rec[i * 4..i * 4 + 4].copy_from_slice(&v.to_f32().to_le_bytes());
                            }
                        }
                    }
                    Tensor::F32(a) => {
                        let row: Vec<f32> = a.index_axis(Axis(0), r).iter().copied().collect();
                        if self.dtype == CacheDtype::F16 {
                            let mut h = vec![f16::ZERO; *count];
                            k.f32_to_f16(&row, &mut h);
                            h.iter().enumerate().for_each(|(i, v)| {
                                rec[i * 2..i * 2 + 2].copy_from_slice(&v.to_le_bytes())
                            });
                        } else {
                            row.iter().enumerate().for_each(|(i, v)| {
                                rec[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes())
                            });
                        }
                    }
                }
            }
        }
        for r in 0..rows {
            let rec = &buf[r * self.record..(r + 1) * self.record];
            if self.len < self.ram_records {
                self.ram.extend_from_slice(rec);
            } else if let Some((f, path)) = &mut self.spill {
                f.write_all(rec).map_err(|source| Error::Io {
                    context: format!("writing cache spill file {}", path.display()),
                    source,
                })?;
            }
            self.len += 1;
        }
        Ok(())
    }

    /// Storage type of the cached activations.
    pub fn dtype(&self) -> CacheDtype {
        self.dtype
    }

    /// Samples cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held in RAM.
    pub fn ram_bytes(&self) -> usize {
        self.ram.len()
    }

    /// Bytes of records kept on the GPU (0 when none are).
    pub fn gpu_bytes(&self) -> usize {
        self.gpu.as_ref().map_or(0, dev::GpuRecords::len)
    }

    /// The float boundary tensors of samples `idx` (one per slot, `None`
    /// for the others and whenever the GPU does not serve them) gathered on
    /// the GPU in use from the records kept there, so that a batch's
    /// features need not go up: the tail's values are resident there
    /// (`device::resident::active`), the whole cache is in RAM (nothing
    /// spilled) and its records fit in `budget` bytes (what the model's
    /// other caches leave of `CacheConfig::gpu_budget`) and in half the
    /// GPU's free memory. They go up on the first such batch and stay until
    /// the cache is dropped or the device changes. Each value equals what
    /// the host's tensor becomes when sent up (f16 widened exactly).
    ///
    /// Best effort: a failed CUDA call (counted and said) leaves the tensor
    /// to the host path; a cache that can never fit (spilled, or over
    /// `budget` alone) or whose upload failed twice on this GPU is not
    /// tried again there. `idx` must be valid ([`FeatureCache::batch`]
    /// checks).
    pub(crate) fn batch_on_gpu(&mut self, idx: &[usize], budget: usize) -> Vec<Option<GpuValue>> {
        let none = || (0..self.slots.len()).map(|_| None).collect();
        if self.gpu.as_ref().is_some_and(|g| !g.on_gpu_in_use()) {
            self.gpu = None;
        }
        let Some(id) = dev::gpu_id().filter(|_| dev::active()) else { return none() };
        let floats = self
            .slots
            .iter()
            .any(|s| matches!(s, Slot::PerSample { int: false, count, .. } if *count > 0));
        if idx.is_empty() || idx.iter().any(|&i| i >= self.len) || !floats {
            return none();
        }
        if self.gpu.is_none() {
            if self.gpu_refused == Some(id) {
                return none();
            }
            if self.spill.is_some() || self.ram.is_empty() || self.ram.len() > budget {
                self.gpu_refused = Some(id);
                return none();
            }
            // Memory others hold now may be freed later: asked again.
            if dev::memory().is_none_or(|(free, _)| self.ram.len() > free / 2) {
                return none();
            }
            match dev::upload_records(&self.ram) {
                Ok(g) => {
                    self.gpu = Some(g);
                    self.gpu_failures = 0;
                }
                Err(dev::Failed) => {
                    self.gpu_failures += 1;
                    if self.gpu_failures >= 2 {
                        self.gpu_refused = Some(id);
                    }
                    return none();
                }
            }
        }
        let Some(recs) = &self.gpu else { return none() };
        let half = self.dtype == CacheDtype::F16;
        self.slots
            .iter()
            .map(|slot| match slot {
                Slot::PerSample { int: false, offset, count, .. } if *count > 0 => {
                    dev::gather(recs, idx, self.record, *offset, *count, half).ok()
                }
                _ => None,
            })
            .collect()
    }

    /// Frees the records' copy on a GPU that is not the one in use (or on
    /// any GPU when `all`).
    pub(crate) fn release_gpu(&mut self, all: bool) {
        if all || self.gpu.as_ref().is_some_and(|g| !g.on_gpu_in_use()) {
            self.gpu = None;
        }
    }

    /// Bytes of a sample's record when built from boundary tensors `out`
    /// at a batch of `batch` (each tensor with that many rows stored per
    /// sample: integers as 8 bytes, floats as `dtype`), and whether one of
    /// them is a float (what [`FeatureCache::batch_on_gpu`] gathers): an
    /// estimate before the cache exists (a tensor of `batch` rows that the
    /// cache would find shared is counted per sample).
    pub fn record_bytes(out: &[Tensor], batch: usize, dtype: CacheDtype) -> (usize, bool) {
        let (mut bytes, mut floats) = (0usize, false);
        for t in out {
            if batch == 0 || t.shape().first() != Some(&batch) {
                continue;
            }
            let per = t.len() / batch;
            let elem = match (t, dtype) {
                (Tensor::I64(_), _) => 8,
                (_, CacheDtype::F16) => 2,
                (_, CacheDtype::F32) => 4,
            };
            floats |= !matches!(t, Tensor::I64(_)) && per > 0;
            bytes = bytes.saturating_add(per.saturating_mul(elem));
        }
        (bytes, floats)
    }

    /// Bytes in the spill file.
    pub fn spilled_bytes(&self) -> usize {
        (self.len - self.len.min(self.ram_records)) * self.record
    }

    /// The boundary tensors of samples `idx`, in the tail's order.
    pub fn batch(&mut self, idx: &[usize]) -> Result<Vec<Tensor>> {
        let mut recs = vec![0u8; self.record * idx.len()];
        for (r, &i) in idx.iter().enumerate() {
            if i >= self.len {
                return Err(Error::Config(format!(
                    "sample {i} is not in the cache ({} samples)",
                    self.len
                )));
            }
            let dst = &mut recs[r * self.record..(r + 1) * self.record];
            if i < self.ram_records {
                dst.copy_from_slice(&self.ram[i * self.record..(i + 1) * self.record]);
            } else if let Some((f, path)) = &mut self.spill {
                let at = ((i - self.ram_records) * self.record) as u64;
                f.seek(SeekFrom::Start(at)).and_then(|_| f.read_exact(dst)).map_err(|source| {
                    Error::Io {
                        context: format!("reading cache spill file {}", path.display()),
                        source,
                    }
                })?;
            }
        }
        let b = idx.len();
        self.slots
            .iter()
            .map(|slot| match slot {
                Slot::Shared(t) => Ok(t.clone()),
                Slot::Affine { base, step } => Ok(Tensor::I64(base + &(step * (b as i64 - 1)))),
                Slot::PerSample { shape, int, offset, count } => {
                    let mut dims = vec![b];
                    dims.extend_from_slice(shape);
                    let bytes = |r: usize, size: usize| {
                        &recs[r * self.record + offset..r * self.record + offset + count * size]
                    };
                    let err = |e: ndarray::ShapeError| Error::Config(e.to_string());
                    // Row by row into one vector: an exact-size loop per
                    // record that the compiler vectorises (a flat_map over all
                    // records was ~1 % of a MiniLM step).
                    if *int {
                        let mut v: Vec<i64> = Vec::with_capacity(b * count);
                        for r in 0..b {
                            v.extend(bytes(r, 8).chunks_exact(8).map(|c| {
                                i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                            }));
                        }
                        Ok(Tensor::I64(ArrayD::from_shape_vec(IxDyn(&dims), v).map_err(err)?))
                    } else if self.dtype == CacheDtype::F16 {
                        let mut h: Vec<f16> = Vec::with_capacity(b * count);
                        for r in 0..b {
                            h.extend(
                                bytes(r, 2)
                                    .chunks_exact(2)
                                    .map(|c| f16::from_le_bytes([c[0], c[1]])),
                            );
                        }
                        Ok(Tensor::F16(ArrayD::from_shape_vec(IxDyn(&dims), h).map_err(err)?))
                    } else {
                        let mut v: Vec<f32> = Vec::with_capacity(b * count);
                        for r in 0..b {
                            v.extend(
                                bytes(r, 4)
                                    .chunks_exact(4)
                                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                            );
                        }
                        Ok(Tensor::F32(ArrayD::from_shape_vec(IxDyn(&dims), v).map_err(err)?))
                    }
                }
            })
            .collect()
    }
}

impl Drop for FeatureCache {
    fn drop(&mut self) {
        if let Some((_, path)) = self.spill.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
