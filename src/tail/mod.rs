//! The trainable tail: a small tape-based autodiff engine on `ndarray`.
//!
//! The split (see `onnx`) hands it the nodes on the gradient cone; each
//! becomes a [`TailOp`](ops::TailOp) with forward and backward. Adapted linear
//! layers run as [`HydraLinear`](crate::HydraLinear); frozen linear weights
//! are stored f32 or f16; everything accumulates in f32.

pub mod broadcast;
pub mod fastmath;
pub mod graph;
pub mod ops;

pub use graph::{TailBuilder, TailGraph, ValueId};
