//! Whether a run trains a new head. The head itself is a tail op
//! ([`LinearHead`](crate::tail::ops::head::LinearHead)), appended as the
//! tail's last node once the feature width is known.

pub use crate::tail::ops::head::{LinearHead, MAX_HEAD_PARAMS};

/// Keep the model's own output, or train a new head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadConfig {
    /// The tail's output is the prediction.
    Keep,
    /// A new linear head with this many outputs on the tail's output.
    New(usize),
}
