//! Axis and broadcasting rules shared by the tail's ops (numpy semantics, as
//! ONNX specifies them).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ndarray::ArrayD;

use crate::error::{Error, Result};

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
