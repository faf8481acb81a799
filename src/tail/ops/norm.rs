//! LayerNormalization and Softmax: per-lane normalisations with their
//! closed-form backward passes (in f64 per lane, so long lanes stay accurate).

use core::mem::MaybeUninit;

use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, Axis, IxDyn};

use super::{TailOp, fail, input};
use crate::Tensor;
use crate::error::Result;
use crate::parallel;
use crate::tail::broadcast::norm_axis;
use crate::tail::fastmath as fm;

/// Views `a` as `[outer, inner]` where `inner` is the product of the axes from `axis` on.
/// (Borrowed when `a` is already contiguous.)
fn lanes(a: &ArrayD<f32>, axis: usize) -> (ndarray::CowArray<'_, f32, IxDyn>, usize) {
    let inner: usize = a.shape()[axis..].iter().product();
    (a.as_standard_layout(), inner.max(1))
}

fm::multiversion! {
    /// LayerNormalization forward over whole lanes of `inner`.
    fn ln_forward_rows(
        src: &[f32],
        out: &mut [MaybeUninit<f32>],
        scale: &[f32],
        bias: &[f32],
        inner: usize,
        eps: f32
    ) {
        for (row, out) in src.chunks_exact(inner).zip(out.chunks_exact_mut(inner)) {
            let (mean, rstd) = moments(row, eps);
            let (mean, rstd) = (mean as f32, rstd as f32);
            for (((o, &v), &s), &b) in out.iter_mut().zip(row).zip(scale).zip(bias) {
                o.write((v - mean) * rstd * s + b);
            }
        }
    }
}

fm::multiversion! {
    /// LayerNormalization backward over whole lanes of `inner`:
    /// `dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))`, `ĝ = dy·scale`.
    fn ln_backward_rows(
        src: &[f32],
        gs: &[f32],
        dx: &mut [MaybeUninit<f32>],
        scale: &[f32],
        inner: usize,
        eps: f32
    ) {
        let nf = inner as f64;
        for ((row, grow), drow) in
            src.chunks_exact(inner).zip(gs.chunks_exact(inner)).zip(dx.chunks_exact_mut(inner))
        {
            let (mean, rstd) = moments(row, eps);
            let (mut sg, mut sgx) = ([0.0f64; 8], [0.0f64; 8]);
            let whole = inner / 8 * 8;
            let (g8s, s8s, x8s) = (
                grow[..whole].chunks_exact(8),
                scale[..whole].chunks_exact(8),
                row[..whole].chunks_exact(8),
            );
            for ((g8, s8), x8) in g8s.zip(s8s).zip(x8s) {
                for l in 0..8 {
                    let gh = f64::from(g8[l]) * f64::from(s8[l]);
                    sg[l] += gh;
                    sgx[l] += gh * ((f64::from(x8[l]) - mean) * rstd);
                }
            }
            for j in whole..inner {
                let gh = f64::from(grow[j]) * f64::from(scale[j]);
                sg[0] += gh;
                sgx[0] += gh * ((f64::from(row[j]) - mean) * rstd);
            }
            let (mg, mgx, mean, rstd) = (
                (sg.iter().sum::<f64>() / nf) as f32,
                (sgx.iter().sum::<f64>() / nf) as f32,
                mean as f32,
                rstd as f32,
            );
            for (((d, &g), &sc), &x) in drow.iter_mut().zip(grow).zip(scale).zip(row) {
                d.write(rstd * (g * sc - mg - (x - mean) * rstd * mgx));
            }
        }
    }
}

/// ONNX LayerNormalization (opset 17): normalise over axes `axis..`, then
/// `·scale + bias`. Scale and bias are constants of the tail.
#[derive(Debug)]
pub struct LayerNorm {
    axis: i64,
    eps: f32,
}

impl LayerNorm {
    /// `axis` (default −1), `eps` (default 1e-5).
    pub fn new(axis: i64, eps: f32) -> LayerNorm {
        LayerNorm { axis, eps }
    }
}

impl TailOp for LayerNorm {
    fn op_type(&self) -> &'static str {
        "LayerNormalization"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?.f32("LayerNormalization X")?;
        let axis = norm_axis(self.axis, x.ndim(), "")?;
        let (xs, inner) = lanes(x, axis);
        let scale = input(inputs, 1)?.f32("LayerNormalization scale")?;
        let scale =
            scale.broadcast(IxDyn(&x.shape()[axis..])).ok_or_else(|| fail("scale shape"))?;
        let scale: Vec<f32> = scale.iter().copied().collect();
        let bias: Option<Vec<f32>> = match inputs.get(2) {
            Some(b) => {
                let b = b.f32("LayerNormalization bias")?;
                Some(
                    b.broadcast(IxDyn(&x.shape()[axis..]))
                        .ok_or_else(|| fail("bias shape"))?
                        .iter()
                        .copied()
                        .collect(),
                )
            }
            None => None,
        };
        let src = xs.as_slice().unwrap_or_default();
        let eps = self.eps;
        let bias = bias.unwrap_or_else(|| vec![0.0; inner]);
        let rows = rows_per_task(inner);
        let tier = fm::tier();
        // Whole lanes per chunk (`src` is lanes × inner), each written in
        // full (the zips run over `inner` values of scale and bias): the
        // output is never zeroed first.
        if src.is_empty() {
            return Ok(Tensor::F32(ArrayD::zeros(x.raw_dim())));
        }
        if scale.len() != inner || bias.len() != inner || src.len() % inner != 0 {
            return Err(fail("LayerNormalization: scale or bias does not match the lanes"));
        }
        let y = fm::filled(src.len(), rows * inner, |c, out| {
            let src = &src[c * rows * inner..c * rows * inner + out.len()];
            ln_forward_rows(tier, src, out, &scale, &bias, inner, eps);
        });
        Ok(Tensor::F32(
            ArrayD::from_shape_vec(x.raw_dim(), y).map_err(|e| fail(alloc::format!("{e}")))?,
        ))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let mut out = vec![None; inputs.len()];
        if need.iter().skip(1).any(|&n| n) {
            return Err(fail("gradient of LayerNormalization scale/bias (they are frozen)"));
        }
        if !need.first().copied().unwrap_or(false) {
            return Ok(out);
        }
        let x = input(inputs, 0)?.f32("LayerNormalization X")?;
        let axis = norm_axis(self.axis, x.ndim(), "")?;
        let (xs, inner) = lanes(x, axis);
        let scale = input(inputs, 1)?.f32("LayerNormalization scale")?;
        let scale: Vec<f32> = scale
            .broadcast(IxDyn(&x.shape()[axis..]))
            .ok_or_else(|| fail("scale shape"))?
            .iter()
            .copied()
            .collect();
        let g = dy.as_standard_layout();
        let (src, gs) = (xs.as_slice().unwrap_or_default(), g.as_slice().unwrap_or_default());
        if gs.len() != src.len() {
            return Err(fail("LayerNormalization backward: gradient and input sizes differ"));
        }
        let eps = self.eps;
        let rows = rows_per_task(inner);
        let tier = fm::tier();
        if src.is_empty() {
            out[0] = Some(ArrayD::zeros(x.raw_dim()));
            return Ok(out);
        }
        if scale.len() != inner || src.len() % inner != 0 {
            return Err(fail("LayerNormalization backward: scale does not match the lanes"));
        }
        let dx = fm::filled(src.len(), rows * inner, |c, dx| {
            let r = c * rows * inner..c * rows * inner + dx.len();
            ln_backward_rows(tier, &src[r.clone()], &gs[r], dx, &scale, inner, eps);
        });
        out[0] =
            Some(ArrayD::from_shape_vec(x.raw_dim(), dx).map_err(|e| fail(alloc::format!("{e}")))?);
        Ok(out)
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        Some(super::GpuKind::LayerNorm { axis: self.axis, eps: self.eps })
    }
}

/// Lanes per pool task: about 16K elements.
fn rows_per_task(inner: usize) -> usize {
    ((1 << 14) / inner.max(1)).max(1)
}

/// Mean and 1/√(var + eps) of a lane, in f64, summed in 8 interleaved
/// partial sums (independent accumulators the compiler can keep in one
/// vector; a single running sum would stay scalar).
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f64, f64) {
    let n = row.len() as f64;
    let whole = row.len() / 8 * 8;
    let (head, tail) = row.split_at(whole);
    let mut acc = [0.0f64; 8];
    for c in head.chunks_exact(8) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v);
        }
    }
    let mean = (acc.iter().sum::<f64>() + tail.iter().map(|&v| f64::from(v)).sum::<f64>()) / n;
    let mut acc = [0.0f64; 8];
    for c in head.chunks_exact(8) {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = f64::from(v) - mean;
            *a += d * d;
        }
    }
    let rest: f64 = tail.iter().map(|&v| (f64::from(v) - mean) * (f64::from(v) - mean)).sum();
    let var = (acc.iter().sum::<f64>() + rest) / n;
    (mean, 1.0 / (var + f64::from(eps)).sqrt())
}

/// Softmax along one axis (opset ≥ 13), or — `legacy`, opset < 13 — over
/// all axes from `axis` on, the input coerced to 2-D there.
#[derive(Debug)]
pub struct Softmax {
    axis: i64,
    legacy: bool,
}

impl Softmax {
    /// Softmax along `axis` (`legacy`: opset < 13 semantics).
    pub fn new(axis: i64, legacy: bool) -> Softmax {
        Softmax { axis, legacy }
    }

    /// `(array viewed so that the softmax runs along the returned axis, original shape)`.
    fn arrange(&self, a: &ArrayD<f32>) -> Result<(ArrayD<f32>, usize)> {
        let axis = norm_axis(self.axis, a.ndim(), "")?;
        if !self.legacy || axis + 1 == a.ndim() {
            return Ok((a.to_owned(), axis));
        }
        let outer: usize = a.shape()[..axis].iter().product();
        let inner: usize = a.shape()[axis..].iter().product();
        let flat =
            a.as_standard_layout().into_owned().into_shape_with_order(IxDyn(&[outer, inner]));
        Ok((flat.map_err(|e| fail(alloc::format!("{e}")))?, 1))
    }
}

impl TailOp for Softmax {
    fn op_type(&self) -> &'static str {
        "Softmax"
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        // (Legacy softmax along the last axis is the same lanes.)
        Some(super::GpuKind::Softmax { axis: self.axis })
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?.f32("Softmax input")?;
        let last = norm_axis(self.axis, x.ndim(), "")? + 1 == x.ndim();
        if last && let Some(src) = x.as_slice() {
            // Contiguous lanes along the last axis: the common case (attention).
            let inner = x.shape().last().copied().unwrap_or(1).max(1);
            let rows = rows_per_task(inner);
            let mut y = vec![0.0f32; src.len()];
            parallel::chunks_mut(&mut y, rows * inner, src.len() * 8, |c, out| {
                let src = &src[c * rows * inner..c * rows * inner + out.len()];
                for (row, out) in src.chunks_exact(inner).zip(out.chunks_exact_mut(inner)) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    out.iter_mut().zip(row).for_each(|(o, &v)| *o = fm::exp(v - max));
                    let sum: f32 = out.iter().sum();
                    let inv = 1.0 / sum;
                    out.iter_mut().for_each(|o| *o *= inv);
                }
            });
            return Ok(Tensor::F32(
                ArrayD::from_shape_vec(x.raw_dim(), y).map_err(|e| fail(alloc::format!("{e}")))?,
            ));
        }
        let (mut y, axis) = self.arrange(x)?;
        let axis = Axis(axis);
        for mut lane in y.lanes_mut(axis) {
            let max = lane.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0f64;
            lane.mapv_inplace(|v| {
                let e = (v - max).exp();
                sum += f64::from(e);
                e
            });
            let inv = (1.0 / sum) as f32;
            lane.mapv_inplace(|v| v * inv);
        }
        let y = y.into_shape_with_order(x.raw_dim()).map_err(|e| fail(alloc::format!("{e}")))?;
        Ok(Tensor::F32(y))
    }

    fn backward(
        &mut self,
        _inputs: &[&Tensor],
        output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        if !need.first().copied().unwrap_or(false) {
            return Ok(vec![None]);
        }
        let yo = output.f32("Softmax output")?;
        let last = norm_axis(self.axis, yo.ndim(), "")? + 1 == yo.ndim();
        if last && let (Some(ys), Some(gs)) = (yo.as_slice(), dy.as_slice()) {
            let inner = yo.shape().last().copied().unwrap_or(1).max(1);
            if ys.len() != gs.len() {
                return Err(fail("Softmax backward: gradient and output sizes differ"));
            }
            let rows = rows_per_task(inner);
            let mut dx = vec![0.0f32; ys.len()];
            parallel::chunks_mut(&mut dx, rows * inner, ys.len() * 4, |c, out| {
                let r = c * rows * inner..c * rows * inner + out.len();
                let (ys, gs) = (&ys[r.clone()], &gs[r]);
                for ((y, g), o) in ys
                    .chunks_exact(inner)
                    .zip(gs.chunks_exact(inner))
                    .zip(out.chunks_exact_mut(inner))
                {
                    // dx = y ⊙ (dy − Σ dy⊙y)
                    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                    o.iter_mut().zip(y.iter().zip(g)).for_each(|(o, (&y, &g))| *o = y * (g - dot));
                }
            });
            return Ok(vec![Some(
                ArrayD::from_shape_vec(yo.raw_dim(), dx)
                    .map_err(|e| fail(alloc::format!("{e}")))?,
            )]);
        }
        let (y, axis) = self.arrange(yo)?;
        let (mut dx, _) = self.arrange(dy)?;
        let axis = Axis(axis);
        // dx = y ⊙ (dy − Σ dy⊙y)
        for (mut g, yl) in dx.lanes_mut(axis).into_iter().zip(y.lanes(axis)) {
            let dot: f64 =
                g.iter().zip(yl.iter()).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let dot = dot as f32;
            g.iter_mut().zip(yl.iter()).for_each(|(g, &y)| *g = y * (*g - dot));
        }
        let dx = dx.into_shape_with_order(dy.raw_dim()).map_err(|e| fail(alloc::format!("{e}")))?;
        Ok(vec![Some(dx)])
    }
}

/// ONNX BatchNormalization in inference form: `y = (x − mean)/√(var + ε)·scale
/// + bias` per channel (axis 1) with constant statistics, folded at build
/// time into `y = x·m + c`. Frozen: backward is `dx = dy·m`.
#[derive(Debug)]
pub struct BatchNorm {
    mul: Vec<f32>,
    add: Vec<f32>,
}

impl BatchNorm {
    /// From the four constant per-channel inputs and ε; errors if their
    /// lengths differ or a variance is negative.
    pub fn new(
        scale: &[f32],
        bias: &[f32],
        mean: &[f32],
        var: &[f32],
        epsilon: f32,
    ) -> Result<BatchNorm> {
        let c = scale.len();
        if bias.len() != c || mean.len() != c || var.len() != c || c == 0 {
            return Err(fail(alloc::format!(
                "BatchNormalization: scale, bias, mean and var have {}, {}, {}, {} values",
                c,
                bias.len(),
                mean.len(),
                var.len()
            )));
        }
        let mut mul = Vec::with_capacity(c);
        let mut add = Vec::with_capacity(c);
        for i in 0..c {
            let v = f64::from(var[i]) + f64::from(epsilon);
            if v.is_nan() || v <= 0.0 {
                return Err(fail(alloc::format!(
                    "BatchNormalization: var + ε = {v} at channel {i}"
                )));
            }
            let m = f64::from(scale[i]) / v.sqrt();
            mul.push(m as f32);
            add.push((f64::from(bias[i]) - f64::from(mean[i]) * m) as f32);
        }
        Ok(BatchNorm { mul, add })
    }

    /// `[N, C, rest…]` with `C` = the channel count, as (N, C, rest).
    fn dims(&self, shape: &[usize]) -> Result<(usize, usize, usize)> {
        if shape.len() < 2 || shape[1] != self.mul.len() {
            return Err(fail(alloc::format!(
                "BatchNormalization: input {shape:?} does not have {} channels on axis 1",
                self.mul.len()
            )));
        }
        Ok((shape[0], shape[1], shape[2..].iter().product()))
    }

    fn apply(&self, x: &ArrayD<f32>, shift: bool) -> Result<ArrayD<f32>> {
        let (n, c, rest) = self.dims(x.shape())?;
        let xs = x.as_standard_layout();
        let xs = xs.as_slice().unwrap_or_default();
        let mut out = vec![0.0f32; xs.len()];
        for (i, (o, v)) in out.chunks_mut(rest.max(1)).zip(xs.chunks(rest.max(1))).enumerate() {
            let ch = i % c;
            let (m, a) = (self.mul[ch], if shift { self.add[ch] } else { 0.0 });
            o.iter_mut().zip(v).for_each(|(o, &v)| *o = v * m + a);
        }
        debug_assert_eq!(out.len(), n * c * rest);
        ArrayD::from_shape_vec(IxDyn(x.shape()), out).map_err(|e| fail(alloc::format!("{e}")))
    }
}

impl TailOp for BatchNorm {
    fn op_type(&self) -> &'static str {
        "BatchNormalization"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        Ok(Tensor::F32(self.apply(input(inputs, 0)?.f32("BatchNormalization input")?, true)?))
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
            out[0] = Some(self.apply(dy, false)?);
        }
        Ok(out)
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }

    fn backward_reads_output(&self) -> bool {
        false
    }
}
