//! The crate's value type: what the backbone returns, the feature cache
//! stores and the tail computes on. f32 activations, f16 activations (cached
//! features stay f16 all the way into the f16 kernels, never widened first)
//! and i64 index or shape tensors (ONNX's INT64; INT32 and BOOL are widened
//! to it), as dynamic `ndarray` arrays.

use alloc::borrow::Cow;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use half::f16;
use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};

/// A value.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    /// Activations and float constants.
    F32(ArrayD<f32>),
    /// Activations stored at half precision (cached features).
    F16(ArrayD<f16>),
    /// Indices, shapes, axes.
    I64(ArrayD<i64>),
}

impl Tensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::F16(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Tensor::F32(a) => a.len(),
            Tensor::F16(a) => a.len(),
            Tensor::I64(a) => a.len(),
        }
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of payload.
    pub fn bytes(&self) -> usize {
        match self {
            Tensor::F32(a) => a.len() * 4,
            Tensor::F16(a) => a.len() * 2,
            Tensor::I64(a) => a.len() * 8,
        }
    }

    /// Whether this is a float tensor (f32 or f16).
    pub fn is_float(&self) -> bool {
        !matches!(self, Tensor::I64(_))
    }

    /// The f32 array, or an error naming `what` (an f16 tensor must be
    /// widened first: [`Tensor::to_f32`]).
    pub fn f32(&self, what: &str) -> Result<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Ok(a),
            Tensor::F16(_) => Err(type_err(what, "f32", "f16")),
            Tensor::I64(_) => Err(type_err(what, "f32", "i64")),
        }
    }

    /// The i64 array, or an error naming `what`.
    pub fn i64(&self, what: &str) -> Result<&ArrayD<i64>> {
        match self {
            Tensor::I64(a) => Ok(a),
            Tensor::F32(_) => Err(type_err(what, "i64", "f32")),
            Tensor::F16(_) => Err(type_err(what, "i64", "f16")),
        }
    }

    /// The float values as f32: borrowed for f32, widened (with the active
    /// kernels) for f16.
    pub fn to_f32(&self, what: &str) -> Result<Cow<'_, ArrayD<f32>>> {
        match self {
            Tensor::F32(a) => Ok(Cow::Borrowed(a)),
            Tensor::F16(a) => Ok(Cow::Owned(widen(a))),
            Tensor::I64(_) => Err(type_err(what, "float", "i64")),
        }
    }

    /// This tensor with f16 values widened to f32 (others unchanged).
    pub fn into_f32(self) -> Tensor {
        match self {
            Tensor::F16(a) => Tensor::F32(widen(&a)),
            t => t,
        }
    }

    /// This tensor with f32 values narrowed to f16 (others unchanged).
    pub fn into_f16(self) -> Tensor {
        match self {
            Tensor::F32(a) => {
                let src = a.as_standard_layout();
                let src = src.as_slice().unwrap_or_default();
                let mut h = alloc::vec![f16::ZERO; src.len()];
                crate::kernels::active().f32_to_f16(src, &mut h);
                Tensor::F16(
                    ArrayD::from_shape_vec(a.raw_dim(), h)
                        .unwrap_or_else(|_| unreachable!("same element count as the source")),
                )
            }
            t => t,
        }
    }

    /// The values as i64 (shape or axes inputs given as integers).
    pub fn to_i64_vec(&self, what: &str) -> Result<Vec<i64>> {
        Ok(self.i64(what)?.iter().copied().collect())
    }

    /// A 0-d f32 tensor.
    pub fn scalar(v: f32) -> Tensor {
        Tensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// Rows `rows` along the first axis (which is kept), as an owned tensor.
    ///
    /// # Panics
    /// If the tensor is 0-d or `rows` reaches past the first axis.
    pub fn rows(&self, rows: core::ops::Range<usize>) -> Tensor {
        use ndarray::{Axis, Slice};
        let s = Slice::from(rows);
        match self {
            Tensor::F32(a) => Tensor::F32(a.slice_axis(Axis(0), s).to_owned()),
            Tensor::F16(a) => Tensor::F16(a.slice_axis(Axis(0), s).to_owned()),
            Tensor::I64(a) => Tensor::I64(a.slice_axis(Axis(0), s).to_owned()),
        }
    }
}

fn widen(a: &ArrayD<f16>) -> ArrayD<f32> {
    let src = a.as_standard_layout();
    let src = src.as_slice().unwrap_or_default();
    let mut out = alloc::vec![0.0f32; src.len()];
    crate::kernels::active().f16_to_f32(src, &mut out);
    crate::kernels::stats::count_widened(out.len());
    ArrayD::from_shape_vec(a.raw_dim(), out)
        .unwrap_or_else(|_| unreachable!("same element count as the source"))
}

fn type_err(what: &str, want: &str, got: &str) -> Error {
    Error::Tail { node: String::from(what), msg: format!("expected a {want} tensor, got {got}") }
}
