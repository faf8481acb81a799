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
    #[error("unknown kernel tier `{0}` (expected one of: scalar, avx2, avx512)")]
    UnknownTier(String),
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;
