//! The bodies of the fuzz targets: what must hold for *any* input bytes.
//!
//! Each function takes bytes from outside (a fuzzer, or a seeded mutator on
//! stable Rust), runs them through a whole input path, and returns normally
//! for every input: an error is fine, a panic is a bug (and an allocation
//! the input's size does not justify aborts, which is a bug too). The same
//! functions are driven by `fuzz/` (cargo-fuzz, nightly, unbounded) and by
//! `tests/fuzz.rs` (stable, bounded, seeded: part of `cargo test`), so that
//! every CI run exercises them and a crash found by either reproduces in both.

use crate::Tensor;
use crate::adapter::AdapterFile;
use crate::backbone::Feed;
use crate::model::{AdaptedModel, HeadConfig};
use crate::onnx::layers::linear_layers;
use crate::onnx::{OnnxModel, SplitConfig, Targets};
use crate::train::npz::{parse_npz, write_npz};
use crate::train::{Dataset, TrainConfig, Trainer};

/// Largest input (values) the checks feed a model: declared dims beyond it
/// are the loader's business, not a reason to allocate.
const MAX_FEED_VALUES: usize = 1 << 16;

/// A small feed for `model`'s declared inputs (batch 2, free dims 4), or
/// `None` if a declared shape is larger than [`MAX_FEED_VALUES`].
fn small_feed(model: &OnnxModel) -> Option<Feed> {
    let mut f = Feed::new();
    for name in model.input_names() {
        let dims: Vec<usize> = model
            .input_shape(&name)?
            .iter()
            .enumerate()
            .map(|(i, d)| d.unwrap_or(if i == 0 { 2 } else { 4 }))
            .collect();
        let n = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
        if n > MAX_FEED_VALUES {
            return None;
        }
        let shape = ndarray::IxDyn(&dims);
        let t = if model.input_is_integer(&name) {
            Tensor::I64(ndarray::ArrayD::from_elem(shape, 1))
        } else {
            Tensor::F32(ndarray::ArrayD::from_elem(shape, 0.25))
        };
        f.insert(name, t);
    }
    Some(f)
}

/// How far an input got along its path (so that a seeded run can show it
/// is not stopped at the door by every mutation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reached {
    /// Refused by the first parser.
    Nothing,
    /// Parsed (ONNX: loaded; checkpoint: decoded).
    Parsed,
    /// ONNX: graph index and layer finder passed; checkpoint: model built.
    Analysed,
    /// ONNX: a split and its backbone were built; checkpoint: loaded.
    Built,
    /// ONNX: forward ran; checkpoint: an epoch trained.
    Ran,
}

/// ONNX loader, graph index, layer finder, split (three target choices),
/// the tract backbone, and one forward and backward of the adapted model.
pub fn onnx_model(bytes: &[u8]) -> Reached {
    let Ok(model) = OnnxModel::from_bytes(bytes, None) else { return Reached::Nothing };
    let _ = model.input_names();
    let _ = model.output_names();
    let _ = model.num_params();
    let Ok(g) = model.index() else { return Reached::Parsed };
    if linear_layers(&g).is_err() {
        return Reached::Parsed;
    }
    let mut reached = Reached::Analysed;
    for targets in [Targets::AllLinear, Targets::LastBlocks(1), Targets::None] {
        let cfg = SplitConfig { targets, ..SplitConfig::default() };
        let Ok(mut m) = AdaptedModel::new(&model, &cfg) else { continue };
        reached = reached.max(Reached::Built);
        let Some(feed) = small_feed(&model) else { continue };
        if let Ok(y) = m.forward(&feed, true) {
            reached = Reached::Ran;
            let grad = match y {
                Tensor::F32(a) => a.mapv(|_| 1.0f32),
                _ => continue,
            };
            let _ = m.backward(grad);
        }
        m.tail_mut().clear_tape();
    }
    reached
}

/// The NPZ reader, the data set built from what it returns, and the writer:
/// what the reader accepts writes back to arrays that read back the same.
pub fn npz(bytes: &[u8]) -> Reached {
    let Ok(arrays) = parse_npz(bytes) else { return Reached::Nothing };
    let written = write_npz(&arrays);
    let again = parse_npz(&written).expect("an NPZ we wrote must read back");
    // Bytes, not values: a NaN read back is the same NaN, though not `==`.
    assert!(write_npz(&again) == written, "NPZ round trip");
    if let Ok(d) = Dataset::from_arrays(arrays, "label") {
        let idx: Vec<usize> = (0..d.len().min(3)).collect();
        let _ = d.batch(&idx);
        let _ = d.batch_labels(&idx);
        return Reached::Ran;
    }
    Reached::Parsed
}

/// A checkpoint (or adapter file) applied to `model`, then one epoch of
/// training from wherever it says the run was, on `train`: the load is
/// refused or the epoch finishes (no panic, no endless loop).
pub fn checkpoint(model: &OnnxModel, train: &Dataset, bytes: &[u8]) -> Reached {
    let Ok(file) = AdapterFile::from_bytes(bytes) else { return Reached::Nothing };
    let (cfg, classes) = crate::model::split_config_for(&file);
    let Ok(adapted) = AdaptedModel::new(model, &cfg) else { return Reached::Parsed };
    let head = classes.map_or(HeadConfig::Keep, HeadConfig::New);
    let tc = TrainConfig { epochs: 2, batch_size: 16, head, ..TrainConfig::default() };
    let Ok(mut t) = Trainer::new(adapted, tc) else { return Reached::Parsed };
    if t.load(&file).is_err() {
        return Reached::Analysed;
    }
    // At most the rest of one epoch: a position past its end closes it.
    let before = t.step();
    let mut reached = Reached::Built;
    if let Ok(Some(_)) = t.fit_epoch(train, None, &mut |_| {}) {
        let per_epoch = train.len().div_ceil(16) as u64;
        assert!(t.step().saturating_sub(before) <= per_epoch, "one epoch, at most");
        reached = Reached::Ran;
    }
    let _ = t.adapter_file(true, crate::adapter::DType::F32);
    reached
}

/// The adapter-file reader: whatever the bytes, `from_bytes` returns (never
/// panics, never over-allocates), and what it accepts re-encodes to a file
/// that reads back to the same bytes.
pub fn adapter_file(bytes: &[u8]) -> Reached {
    let Ok(file) = AdapterFile::from_bytes(bytes) else { return Reached::Nothing };
    let encoded = file.to_bytes().expect("a file the reader accepts must encode");
    let again = AdapterFile::from_bytes(&encoded).expect("an encoded file must read back");
    assert!(again.to_bytes().expect("re-encode") == encoded, "adapter round trip");
    Reached::Ran
}
