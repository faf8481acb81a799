//! The `.hydra` adapter file: trained adapters (and checkpoints) on disk.
//!
//! A small, self-checking binary container: a JSON header that says what the
//! adapter is and which base model it belongs to, then the tensors, then a
//! CRC-32 over everything before it. It is read and written through
//! [`embedded_io`]'s `Read`/`Write`, so the same code runs in firmware
//! (`no_std + alloc`) and in apps; with the `std` feature [`AdapterFile::save`]
//! and [`AdapterFile::load`] add atomic file helpers.
//!
//! # Layout (all integers little-endian)
//!
//! | field | bytes |
//! | --- | --- |
//! | magic `HYDRAEDG` | 8 |
//! | format version ([`FORMAT_VERSION`]) | u32 |
//! | header length `h` (≤ [`MAX_HEADER_LEN`]) | u32 |
//! | header: [`Header`] as UTF-8 JSON | `h` |
//! | tensor count (≤ [`MAX_TENSORS`]) | u32 |
//! | per tensor: name length `n` (≤ [`MAX_NAME_LEN`]) | u16 |
//! | · name, UTF-8 | `n` |
//! | · dtype: 0 = f32, 1 = f16 | u8 |
//! | · rank `k` (≤ [`MAX_TENSOR_RANK`]) | u8 |
//! | · dims, outermost first | `k` × u64 |
//! | · payload, row-major, f32 or f16 | elements × 4 or 2 |
//! | CRC-32 (IEEE) of every preceding byte | u32 |
//!
//! # Why it is built so
//!
//! - **The reader never panics and never allocates on a length it has not
//!   checked.** Every length is bounded by a fixed sane maximum and, when the
//!   total size is known ([`AdapterFile::from_bytes`], [`AdapterFile::load`]),
//!   by the bytes that remain; over a stream of unknown length buffers grow
//!   only as bytes actually arrive. Element counts are multiplied with
//!   overflow checks. Any single-byte change is caught (by a bound, by the
//!   parser or by the CRC), and so is any truncation.
//! - **JSON for the header**, because it is small, evolves (unknown fields
//!   are ignored, missing config fields take defaults) and can be read by a
//!   person; **raw little-endian for the tensors**, because they are most of
//!   the bytes.
//! - **Tensors are `f32` in memory whatever their storage**: `dtype` only says
//!   how they travel. f16 storage rounds to nearest even (the `half` crate's
//!   bulk conversion, which uses F16C where the CPU has it).
//! - **A fingerprint of the base model's adapted weights** ([`fingerprint`])
//!   is in the header so that an adapter is refused on another backbone
//!   ([`AdapterFile::check_fingerprint`]).
//! - A checkpoint is the same file with [`Header::checkpoint`] set; optimizer
//!   moments and the like travel as ordinary named tensors.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hydra::HydraConfig;

#[cfg(feature = "std")]
mod file;
mod read;
mod write;

#[cfg(feature = "std")]
pub use file::clean_temp_files;

/// The first eight bytes of every adapter file.
pub const MAGIC: [u8; 8] = *b"HYDRAEDG";
/// The layout version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest header, in bytes (16 MiB).
pub const MAX_HEADER_LEN: usize = 16 << 20;
/// Longest tensor name, in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Highest tensor rank.
pub const MAX_TENSOR_RANK: usize = 8;
/// Most tensors in one file.
pub const MAX_TENSORS: usize = 1 << 20;
/// Most elements in one tensor (2³², i.e. 16 GiB of f32): far beyond any
/// adapter, low enough that a hostile count is refused outright.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 32;

/// How a tensor is stored on disk (in memory it is always `f32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 4-byte IEEE single, exact.
    F32,
    /// 2-byte IEEE half, rounded to nearest even on write.
    F16,
}

impl DType {
    /// Bytes per element on disk.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
        }
    }

    fn from_code(code: u8) -> Option<DType> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            _ => None,
        }
    }
}

/// One adapted layer: its name in the base model and its `out×in` shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    /// The layer's (weight's) name in the base model.
    pub name: String,
    /// Input width (columns of `W0`).
    pub in_dim: usize,
    /// Output width (rows of `W0`).
    pub out_dim: usize,
}

/// What a checkpoint adds to an adapter: where training stood.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Raw states of the run's generators ([`crate::rng::Rng::state`]).
    pub rngs: Vec<[u64; 4]>,
    /// Anything else the trainer needs to resume (schedule position, …).
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// The file's self-description (stored as JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The adapter configuration shared by the adapted layers.
    pub config: HydraConfig,
    /// The adapted layers, in order.
    pub layers: Vec<LayerEntry>,
    /// [`fingerprint`] of the base model's adapted weights.
    pub fingerprint: u64,
    /// Free-form training metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// `Some` for a checkpoint; optimizer state travels as tensors.
    #[serde(default)]
    pub checkpoint: Option<CheckpointState>,
}

/// A named tensor: row-major `f32` data of the given shape.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Unique within a file.
    pub name: String,
    /// Dimensions, outermost first (`[]` is a scalar).
    pub shape: Vec<usize>,
    /// Storage on disk.
    pub dtype: DType,
    /// The values; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

impl NamedTensor {
    /// A tensor, checked: `data.len()` must be the product of `shape`.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        dtype: DType,
        data: Vec<f32>,
    ) -> Result<NamedTensor> {
        let t = NamedTensor { name: name.into(), shape, dtype, data };
        write::check_tensor(&t)?;
        Ok(t)
    }
}

/// An adapter (or checkpoint) file in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterFile {
    /// What the adapter is.
    pub header: Header,
    /// Its parameters (and, in a checkpoint, optimizer state).
    pub tensors: Vec<NamedTensor>,
}

/// Why an internal read or write stopped: the stream failed (kept as is so
/// that the std helpers can report the real `std::io::Error`), or the data
/// or the file did not pass a check.
pub(crate) enum Fail<E> {
    Io(E),
    Format(Error),
}

impl<E> From<Error> for Fail<E> {
    fn from(e: Error) -> Self {
        Fail::Format(e)
    }
}

impl<E: embedded_io::Error> Fail<E> {
    fn into_error(self, context: &'static str) -> Error {
        match self {
            Fail::Io(e) => Error::Stream { context, kind: e.kind() },
            Fail::Format(e) => e,
        }
    }
}

pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

impl AdapterFile {
    /// Writes the file to `w` (and flushes it). Fails without writing
    /// anything if a tensor's length disagrees with its shape or a limit of
    /// the format is exceeded.
    pub fn write_to<W: embedded_io::Write>(&self, w: &mut W) -> Result<()> {
        write::write_file(self, w).map_err(|e| e.into_error("writing an adapter file"))
    }

    /// Reads one file from `r`, stopping right after its checksum (so a file
    /// can sit inside a longer stream). Whatever the bytes, this returns an
    /// `Error` rather than panicking; a stream failure is [`Error::Stream`].
    pub fn read_from<R: embedded_io::Read>(r: &mut R) -> Result<AdapterFile> {
        read::read_file(r, None)
            .map(|(file, _)| file)
            .map_err(|e| e.into_error("reading an adapter file"))
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        match write::write_file(self, &mut out) {
            Ok(()) => Ok(out),
            Err(Fail::Format(e)) => Err(e),
            Err(Fail::Io(never)) => match never {},
        }
    }

    /// Parses a whole file; bytes after the checksum are an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<AdapterFile> {
        let mut rest = bytes;
        let (file, _) = match read::read_file(&mut rest, Some(bytes.len() as u64)) {
            Ok(ok) => ok,
            Err(Fail::Format(e)) => return Err(e),
            Err(Fail::Io(never)) => match never {},
        };
        if !rest.is_empty() {
            return Err(corrupt(alloc::format!(
                "{} unexpected bytes after the checksum",
                rest.len()
            )));
        }
        Ok(file)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `Ok` if this adapter was trained on the base model whose adapted
    /// weights have fingerprint `expected` (see [`fingerprint`]).
    pub fn check_fingerprint(&self, expected: u64) -> Result<()> {
        if self.header.fingerprint == expected {
            Ok(())
        } else {
            Err(Error::FingerprintMismatch { expected, found: self.header.fingerprint })
        }
    }

    /// Writes the file atomically: to a temporary file in the same
    /// directory, flushed and fsynced, then renamed over `path`, then the
    /// directory fsynced. A process killed at any moment leaves the old file
    /// or the new one (plus, at worst, a stale `.NAME.tmp.*` file beside it,
    /// which [`AdapterFile::load`] never looks at; see [`clean_temp_files`]).
    #[cfg(feature = "std")]
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        file::save(self, path)
    }

    /// Reads the file at `path`; bytes after the checksum are an error.
    #[cfg(feature = "std")]
    pub fn load(path: &std::path::Path) -> Result<AdapterFile> {
        file::load(path)
    }

    /// Roughly the encoded size, to size buffers (never trusted for bounds).
    fn encoded_len_hint(&self) -> usize {
        let tensors: usize = self
            .tensors
            .iter()
            .map(|t| 12 + t.name.len() + 8 * t.shape.len() + t.data.len() * t.dtype.size())
            .sum();
        256 + 64 * self.header.layers.len() + tensors
    }
}

/// Checks that a header holds only values that survive a JSON round trip
/// (JSON has no NaN or infinity), on write and again on read.
pub(crate) fn check_header(h: &Header) -> Result<()> {
    for (name, b) in [("parallel", &h.config.parallel), ("sequential", &h.config.sequential)] {
        if !b.scale.is_finite() || !b.dropout.is_finite() {
            return Err(Error::Config(alloc::format!(
                "adapter header: {name} branch scale {} / dropout {} must be finite",
                b.scale,
                b.dropout
            )));
        }
    }
    Ok(())
}

/// A fingerprint of the base model's adapted weights, stored in every
/// adapter so that it is refused on another backbone.
///
/// FNV-1a (64-bit) over, for each `(name, W0)` in order: the name's length
/// (u64 LE), its UTF-8 bytes, the weight count (u64 LE) and the weights' f32
/// bit patterns (LE). The lengths make the byte stream unambiguous, so moving
/// a byte between a name and its weights changes the result. It guards
/// against mistakes (the wrong model, a re-exported or fine-tuned one), not
/// against someone crafting a collision.
pub fn fingerprint<'a>(layers: impl IntoIterator<Item = (&'a str, &'a [f32])>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn eat(h: &mut u64, bytes: &[u8]) {
        for &b in bytes {
            *h = (*h ^ u64::from(b)).wrapping_mul(PRIME);
        }
    }
    let mut h = OFFSET;
    for (name, w) in layers {
        eat(&mut h, &(name.len() as u64).to_le_bytes());
        eat(&mut h, name.as_bytes());
        eat(&mut h, &(w.len() as u64).to_le_bytes());
        for x in w {
            eat(&mut h, &x.to_le_bytes());
        }
    }
    h
}
