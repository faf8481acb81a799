//! ReduceMean, ReduceSum and GlobalAveragePool. Backward broadcasts the
//! gradient back over the reduced axes (divided by their size for means).

use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, Axis, IxDyn};

use super::{TailOp, fail, input};
use crate::Tensor;
use crate::error::Result;
use crate::tail::broadcast::norm_axis;

/// Mean or sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceKind {
    /// ReduceMean.
    Mean,
    /// ReduceSum.
    Sum,
    /// ReduceL2: the Euclidean norm.
    L2,
}

/// ReduceMean / ReduceSum with axes from the attribute (older opsets) or the
/// second input (ReduceSum ≥ 13, ReduceMean ≥ 18).
#[derive(Debug)]
pub struct Reduce {
    kind: ReduceKind,
    axes: Option<Vec<i64>>,
    keepdims: bool,
    noop_with_empty_axes: bool,
}

impl Reduce {
    /// `axes`: `Some` from the attribute, `None` to read input 1.
    pub fn new(
        kind: ReduceKind,
        axes: Option<Vec<i64>>,
        keepdims: bool,
        noop_with_empty_axes: bool,
    ) -> Reduce {
        Reduce { kind, axes, keepdims, noop_with_empty_axes }
    }

    /// The sorted, normalised axes to reduce for an input of rank `rank`
    /// (empty = identity).
    fn axes(&self, inputs: &[&Tensor], rank: usize) -> Result<Vec<usize>> {
        self.axes_of(inputs.get(1).copied(), rank)
    }

    /// [`Reduce::axes`] with the axes input (if any) given alone.
    fn axes_of(&self, axes_input: Option<&Tensor>, rank: usize) -> Result<Vec<usize>> {
        let raw = match (&self.axes, axes_input) {
            (Some(a), _) => a.clone(),
            (None, Some(t)) => t.to_i64_vec("reduce axes")?,
            (None, None) => Vec::new(),
        };
        if raw.is_empty() {
            return Ok(if self.noop_with_empty_axes { Vec::new() } else { (0..rank).collect() });
        }
        let mut axes = raw.iter().map(|&a| norm_axis(a, rank, "")).collect::<Result<Vec<_>>>()?;
        axes.sort_unstable();
        axes.dedup();
        Ok(axes)
    }
}

/// Sums `x` over `axes` (sorted), keeping them as size-1 axes.
fn sum_keep(x: &ArrayD<f32>, axes: &[usize]) -> ArrayD<f32> {
    let mut y = x.to_owned();
    for &a in axes {
        y = y.sum_axis(Axis(a)).insert_axis(Axis(a));
    }
    y
}

impl TailOp for Reduce {
    fn op_type(&self) -> &'static str {
        match self.kind {
            ReduceKind::Mean => "ReduceMean",
            ReduceKind::Sum => "ReduceSum",
            ReduceKind::L2 => "ReduceL2",
        }
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?.f32("reduce input")?;
        let axes = self.axes(inputs, x.ndim())?;
        let mut y = if self.kind == ReduceKind::L2 {
            sum_keep(&x.mapv(|v| v * v), &axes).mapv(f32::sqrt)
        } else {
            sum_keep(x, &axes)
        };
        if self.kind == ReduceKind::Mean {
            let count: usize = axes.iter().map(|&a| x.shape()[a]).product();
            let inv = 1.0 / count.max(1) as f32;
            y.mapv_inplace(|v| v * inv);
        }
        if !self.keepdims {
            for &a in axes.iter().rev() {
                y = y.index_axis_move(Axis(a), 0);
            }
        }
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
        if !need.first().copied().unwrap_or(false) {
            return Ok(out);
        }
        let x = input(inputs, 0)?.f32("reduce input")?;
        let axes = self.axes(inputs, x.ndim())?;
        let mut g = dy.to_owned();
        if !self.keepdims {
            for &a in &axes {
                g = g.insert_axis(Axis(a));
            }
        }
        if self.kind == ReduceKind::L2 {
            // d‖x‖/dx = x / ‖x‖ (0 where the norm is 0).
            let mut y = _output.f32("ReduceL2 output")?.to_owned();
            if !self.keepdims {
                for &a in &axes {
                    y = y.insert_axis(Axis(a));
                }
            }
            let gy = ndarray::Zip::from(&g)
                .and(&y)
                .map_collect(|&g, &y| if y > 0.0 { g / y } else { 0.0 });
            let gy = gy.broadcast(x.raw_dim()).ok_or_else(|| fail("reduce gradient shape"))?;
            out[0] = Some(ndarray::Zip::from(&gy).and(x).map_collect(|&g, &x| g * x));
            return Ok(out);
        }
        let scale = match self.kind {
            ReduceKind::Mean => {
                1.0 / axes.iter().map(|&a| x.shape()[a]).product::<usize>().max(1) as f32
            }
            ReduceKind::Sum | ReduceKind::L2 => 1.0,
        };
        let full = g
            .broadcast(x.raw_dim())
            .ok_or_else(|| fail("reduce gradient shape"))?
            .mapv(|v| v * scale);
        out[0] = Some(full);
        Ok(out)
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        (self.kind != ReduceKind::L2).then_some(super::GpuKind::Reduce)
    }

    fn gpu_reduce(&self, x: &[usize], rest: &[&Tensor]) -> Result<super::ReducePlan> {
        let axes = self.axes_of(rest.first().copied(), x.len())?;
        reduce_plan(x, &axes, self.kind == ReduceKind::Mean, self.keepdims)
    }
}

/// The GPU's plan for reducing `x` over `axes` (sorted): adjacent axes
/// only, at least one.
fn reduce_plan(
    x: &[usize],
    axes: &[usize],
    mean: bool,
    keepdims: bool,
) -> Result<super::ReducePlan> {
    let (Some(&first), Some(&last)) = (axes.first(), axes.last()) else {
        return Err(fail("no axes to reduce"));
    };
    if last >= x.len() || last - first + 1 != axes.len() {
        return Err(fail("the reduced axes are not adjacent"));
    }
    let len: usize = x[first..=last].iter().product();
    let mut out_shape = x[..first].to_vec();
    if keepdims {
        out_shape.extend(core::iter::repeat_n(1, axes.len()));
    }
    out_shape.extend_from_slice(&x[last + 1..]);
    Ok(super::ReducePlan {
        outer: x[..first].iter().product(),
        len,
        inner: x[last + 1..].iter().product(),
        // As the CPU scales its sums (`1 / count` in f32).
        scale: if mean { 1.0 / len.max(1) as f32 } else { 1.0 },
        out_shape,
    })
}

/// Mean over every axis after the first two: `[N, C, ...] → [N, C, 1, ...]`.
#[derive(Debug, Default)]
pub struct GlobalAveragePool;

impl TailOp for GlobalAveragePool {
    fn op_type(&self) -> &'static str {
        "GlobalAveragePool"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?.f32("GlobalAveragePool input")?;
        if x.ndim() < 3 {
            return Err(fail("GlobalAveragePool needs [N, C, spatial...]"));
        }
        let axes: Vec<usize> = (2..x.ndim()).collect();
        let count: usize = x.shape()[2..].iter().product();
        let inv = 1.0 / count.max(1) as f32;
        Ok(Tensor::F32(sum_keep(x, &axes).mapv(|v| v * inv)))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        if !need.first().copied().unwrap_or(false) {
            return Ok(vec![None]);
        }
        let x = input(inputs, 0)?.f32("GlobalAveragePool input")?;
        let count: usize = x.shape()[2..].iter().product();
        let inv = 1.0 / count.max(1) as f32;
        let g = dy.broadcast(IxDyn(x.shape())).ok_or_else(|| fail("pool gradient shape"))?;
        Ok(vec![Some(g.mapv(|v| v * inv))])
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        Some(super::GpuKind::Reduce)
    }

    fn gpu_reduce(&self, x: &[usize], _rest: &[&Tensor]) -> Result<super::ReducePlan> {
        if x.len() < 3 {
            return Err(fail("GlobalAveragePool needs [N, C, spatial...]"));
        }
        let axes: Vec<usize> = (2..x.len()).collect();
        reduce_plan(x, &axes, true, true)
    }
}
