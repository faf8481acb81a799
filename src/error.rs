//! The library's one error type.
//!
//! Every fallible public function returns [`Result`]. Bad input — a wrong
//! shape, a bad configuration, a non-finite value, a kernel tier this CPU
//! cannot run — is reported here, never by a panic.

use alloc::string::String;

/// Everything that can go wrong in hydra-edge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two tensors (or a tensor and a layer) disagree on a dimension.
    #[error("shape mismatch in {context}: expected {expected}, got {got}")]
    Shape {
        /// Where the mismatch was found.
        context: &'static str,
        /// What was expected, in words.
        expected: String,
        /// What was found, in words.
        got: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An input or parameter contains NaN or ±Inf.
    #[error("non-finite value in {0}")]
    NonFinite(&'static str),
    /// `HYDRA_KERNELS` (or a caller) asked for a kernel tier this CPU or build lacks.
    #[error("kernel tier `{tier}` is not available: {reason}")]
    TierUnavailable {
        /// The requested tier.
        tier: String,
        /// Why it cannot run here.
        reason: &'static str,
    },
    /// A name that does not denote any kernel tier.
    #[error("unknown kernel tier `{0}` (expected one of: scalar, avx2, avx512, neon, fp16)")]
    UnknownTier(String),
    /// A model file that cannot be decoded or is inconsistent.
    #[error("invalid ONNX model: {0}")]
    Onnx(String),
    /// An operator the tail engine cannot run (raised when the split is made).
    #[error("unsupported op `{op}` in the trainable tail at node `{node}`: {reason}")]
    UnsupportedOp {
        /// The ONNX op type.
        op: String,
        /// The node's name.
        node: String,
        /// Why (missing op, or an attribute/input form the engine lacks).
        reason: String,
    },
    /// A named thing (tensor, layer, pattern match) that does not exist.
    #[error("{what} `{name}` not found")]
    NotFound {
        /// What kind of thing was looked for.
        what: &'static str,
        /// The name (or pattern) given.
        name: String,
    },
    /// The frozen backbone (tract) failed to build or run.
    #[error("backbone (tract): {0}")]
    Backbone(String),
    /// A tail node failed at run time (shape or value problem).
    #[error("tail node `{node}`: {msg}")]
    Tail {
        /// The node's name.
        node: String,
        /// What went wrong.
        msg: String,
    },
    /// A data file (`.npz`/`.npy`) that is malformed or truncated.
    #[error("invalid data file: {0}")]
    Data(String),
    /// An adapter file that is malformed, truncated, or fails its checksum.
    #[error("corrupt adapter file: {0}")]
    Corrupt(String),
    /// An adapter trained on another base model than the one it is applied to.
    #[error(
        "adapter was trained on a different base model: the adapted weights' fingerprint is \
         {expected:#018x} here but {found:#018x} in the adapter file"
    )]
    FingerprintMismatch {
        /// The fingerprint of the base model at hand.
        expected: u64,
        /// The fingerprint recorded in the adapter file.
        found: u64,
    },
    /// An `embedded_io` stream failed while an adapter file was read or written.
    #[error("adapter stream I/O failed while {context}: {kind:?}")]
    Stream {
        /// What was being read or written.
        context: &'static str,
        /// The stream's error kind.
        kind: embedded_io::ErrorKind,
    },
    /// A training configuration whose estimated peak memory exceeds the budget.
    #[error("estimated peak memory {:.1} MB exceeds the budget of {:.1} MB: {detail}", *estimate as f64 / 1e6, *budget as f64 / 1e6)]
    OverBudget {
        /// Estimated peak, bytes.
        estimate: usize,
        /// The budget, bytes.
        budget: usize,
        /// Where the memory goes.
        detail: String,
    },
    /// Training stopped: too many consecutive steps had non-finite values, or
    /// an epoch's loss rose far above its start. The model holds the diverged
    /// parameters; `Trainer::restore_best` puts the best epoch's back.
    #[error("training diverged: {reason}")]
    Diverged {
        /// What was seen.
        reason: String,
    },
    /// A compute device that was asked for cannot be used: a build without the
    /// `cuda` feature, no CUDA driver or library, no such GPU, or a CUDA call
    /// that failed.
    #[error("device `{device}`: {reason}")]
    Device {
        /// The device as asked for (`cuda:0`).
        device: String,
        /// What is missing or what failed.
        reason: String,
    },
    /// An I/O error, with what was being done.
    #[cfg(feature = "std")]
    // The source is not repeated here: it is `source()`, and a chain printer
    // (`{:#}` in anyhow, or the app's own) shows it once.
    #[error("{context}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;
