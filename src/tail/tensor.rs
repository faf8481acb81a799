//! The values that flow through the tail: f32 activations and i64 index or
//! shape tensors (ONNX's INT64; INT32 and BOOL are widened to it), as dynamic
//! `ndarray` arrays.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};

/// A tail value.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    /// Activations and float constants.
    F32(ArrayD<f32>),
    /// Indices, shapes, axes.
    I64(ArrayD<i64>),
}

impl Tensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Tensor::F32(a) => a.len(),
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
            Tensor::I64(a) => a.len() * 8,
        }
    }

    /// The f32 array, or an error naming `what`.
    pub fn f32(&self, what: &str) -> Result<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Ok(a),
            Tensor::I64(_) => Err(type_err(what, "f32", "i64")),
        }
    }

    /// The i64 array, or an error naming `what`.
    pub fn i64(&self, what: &str) -> Result<&ArrayD<i64>> {
        match self {
            Tensor::I64(a) => Ok(a),
            Tensor::F32(_) => Err(type_err(what, "i64", "f32")),
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
}

fn type_err(what: &str, want: &str, got: &str) -> Error {
    Error::Tail { node: String::from(what), msg: format!("expected a {want} tensor, got {got}") }
}

/// Resolves a possibly negative ONNX axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize, node: &str) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a >= rank as i64 {
        return Err(Error::Tail {
            node: String::from(node),
            msg: format!("axis {axis} out of range for rank {rank}"),
        });
    }
    Ok(a as usize)
}

/// Sums `grad` down to `shape` (the inverse of numpy broadcasting): leading
/// axes that `shape` lacks are summed away, axes where `shape` has 1 are
/// summed keeping the axis.
pub fn unbroadcast(grad: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if grad.shape() == shape {
        return grad;
    }
    let mut g = grad;
    while g.ndim() > shape.len() {
        g = g.sum_axis(ndarray::Axis(0));
    }
    for (ax, &d) in shape.iter().enumerate() {
        if d == 1 && g.shape()[ax] != 1 {
            g = g.sum_axis(ndarray::Axis(ax)).insert_axis(ndarray::Axis(ax));
        }
    }
    g
}

/// The broadcast shape of two shapes (numpy rules), or an error.
pub fn broadcast_shape(a: &[usize], b: &[usize], node: &str) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = alloc::vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::Tail {
                    node: String::from(node),
                    msg: format!("shapes {a:?} and {b:?} do not broadcast"),
                });
            }
        };
    }
    Ok(out)
}
