//! Expand, IsNaN and Where: what exporters put on the value path around
//! masks (`Where(IsNaN(softmax), 0, softmax)` in PyTorch's attention export,
//! `Expand` of a norm to the shape of what it divides). The condition of a
//! `Where` and the target shape of an `Expand` are frozen inputs (integer
//! tensors); gradients flow to the values only.

use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, IxDyn, Zip};

use super::{TailOp, fail, input};
use crate::Tensor;
use crate::error::Result;
use crate::tail::broadcast::{broadcast_shape, unbroadcast};

/// `Expand(x, shape)`: `x` broadcast to the numpy broadcast of its shape and
/// `shape` (ONNX's bidirectional rule). Backward sums back to `x`'s shape.
#[derive(Debug, Default)]
pub struct Expand;

fn target(inputs: &[&Tensor]) -> Result<Vec<usize>> {
    let x = input(inputs, 0)?;
    let dims = input(inputs, 1)?.to_i64_vec("Expand shape")?;
    let dims: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| fail(alloc::format!("Expand to dim {d}"))))
        .collect::<Result<_>>()?;
    broadcast_shape(x.shape(), &dims, "")
}

impl TailOp for Expand {
    fn op_type(&self) -> &'static str {
        "Expand"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let shape = target(inputs)?;
        let too_big =
            shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none_or(|n| n > 1 << 31);
        if too_big {
            return Err(fail(alloc::format!("Expand to {shape:?} is too large")));
        }
        let view_err = || fail("Expand: shapes do not broadcast");
        Ok(match input(inputs, 0)? {
            Tensor::F32(a) => {
                Tensor::F32(a.broadcast(IxDyn(&shape)).ok_or_else(view_err)?.to_owned())
            }
            Tensor::F16(a) => {
                Tensor::F16(a.broadcast(IxDyn(&shape)).ok_or_else(view_err)?.to_owned())
            }
            Tensor::I64(a) => {
                Tensor::I64(a.broadcast(IxDyn(&shape)).ok_or_else(view_err)?.to_owned())
            }
        })
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let mut out = vec![None; inputs.len()];
        if need.first().copied().unwrap_or(false) {
            out[0] = Some(unbroadcast(dy.clone(), input(inputs, 0)?.shape()));
        }
        Ok(out)
    }

    fn backward_reads_output(&self) -> bool {
        false
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }
}

/// `IsNaN(x)`: 1 where `x` is NaN, else 0 (an integer mask; no gradient).
#[derive(Debug, Default)]
pub struct IsNan;

impl TailOp for IsNan {
    fn op_type(&self) -> &'static str {
        "IsNaN"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?.to_f32("IsNaN input")?;
        Ok(Tensor::I64(x.mapv(|v| i64::from(v.is_nan()))))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        _dy: &ArrayD<f32>,
        _need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        Ok(vec![None; inputs.len()])
    }

    fn backward_reads_output(&self) -> bool {
        false
    }

    fn differentiable(&self, _input: usize) -> bool {
        false
    }
}

/// `Where(cond, a, b)`: `a` where `cond` is non-zero, else `b` (all three
/// broadcast). The gradient goes to `a` where `cond` holds, to `b` elsewhere.
#[derive(Debug, Default)]
pub struct Where;

fn cond_of(t: &Tensor) -> Result<ArrayD<bool>> {
    Ok(match t {
        Tensor::I64(c) => c.mapv(|v| v != 0),
        t => t.to_f32("Where condition")?.mapv(|v| v != 0.0),
    })
}

fn shape3(inputs: &[&Tensor]) -> Result<Vec<usize>> {
    let s = broadcast_shape(input(inputs, 0)?.shape(), input(inputs, 1)?.shape(), "")?;
    broadcast_shape(&s, input(inputs, 2)?.shape(), "")
}

impl TailOp for Where {
    fn op_type(&self) -> &'static str {
        "Where"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let shape = IxDyn(&shape3(inputs)?);
        let c = cond_of(input(inputs, 0)?)?;
        let c = c.broadcast(shape.clone()).ok_or_else(|| fail("Where: condition shape"))?;
        let (a, b) = (input(inputs, 1)?, input(inputs, 2)?);
        if let (Tensor::I64(a), Tensor::I64(b)) = (a, b) {
            let a = a.broadcast(shape.clone()).ok_or_else(|| fail("Where: shapes"))?;
            let b = b.broadcast(shape.clone()).ok_or_else(|| fail("Where: shapes"))?;
            let mut y = ArrayD::<i64>::zeros(shape);
            Zip::from(&mut y)
                .and(&c)
                .and(&a)
                .and(&b)
                .for_each(|y, &c, &a, &b| *y = if c { a } else { b });
            return Ok(Tensor::I64(y));
        }
        let (a, b) = (a.to_f32("Where value")?, b.to_f32("Where value")?);
        let a = a.broadcast(shape.clone()).ok_or_else(|| fail("Where: shapes"))?;
        let b = b.broadcast(shape.clone()).ok_or_else(|| fail("Where: shapes"))?;
        let mut y = ArrayD::<f32>::zeros(shape);
        Zip::from(&mut y)
            .and(&c)
            .and(&a)
            .and(&b)
            .for_each(|y, &c, &a, &b| *y = if c { a } else { b });
        Ok(Tensor::F32(y))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let mut out = vec![None; inputs.len()];
        let c = cond_of(input(inputs, 0)?)?;
        let c = c.broadcast(dy.raw_dim()).ok_or_else(|| fail("Where: condition shape"))?;
        for (k, when) in [(1usize, true), (2, false)] {
            if need.get(k).copied().unwrap_or(false) {
                let mut g = dy.clone();
                Zip::from(&mut g).and(&c).for_each(|g, &c| {
                    if c != when {
                        *g = 0.0;
                    }
                });
                out[k] = Some(unbroadcast(g, input(inputs, k)?.shape()));
            }
        }
        Ok(out)
    }

    fn backward_reads_output(&self) -> bool {
        false
    }

    fn differentiable(&self, input: usize) -> bool {
        input > 0
    }
}
