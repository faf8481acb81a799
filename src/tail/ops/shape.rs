//! Data-movement ops: Reshape, Flatten, Squeeze, Unsqueeze (all "a reshape"
//! whose backward reshapes back), Transpose, Concat, Slice, Gather and Shape.
//! They move f32 activations and i64 shape tensors alike.

use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, Axis, IxDyn, Slice as NdSlice};

use super::{TailOp, fail, input};
use crate::Tensor;
use crate::error::Result;
use crate::tail::broadcast::norm_axis;

fn reshape_tensor(t: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let err = |e: ndarray::ShapeError| {
        fail(alloc::format!("cannot reshape {:?} to {shape:?}: {e}", t.shape()))
    };
    Ok(match t {
        Tensor::F32(a) => Tensor::F32(
            a.as_standard_layout().into_owned().into_shape_with_order(IxDyn(shape)).map_err(err)?,
        ),
        Tensor::F16(a) => Tensor::F16(
            a.as_standard_layout().into_owned().into_shape_with_order(IxDyn(shape)).map_err(err)?,
        ),
        Tensor::I64(a) => Tensor::I64(
            a.as_standard_layout().into_owned().into_shape_with_order(IxDyn(shape)).map_err(err)?,
        ),
    })
}

fn reshape_grad(dy: &ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
    dy.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(|e| fail(alloc::format!("gradient reshape: {e}")))
}

/// What a reshape-like op computes its output shape from.
#[derive(Debug, Clone)]
pub enum ReshapeKind {
    /// ONNX Reshape: target from input 1 (`0` copies, `-1` infers unless `allowzero`).
    Reshape {
        /// ONNX `allowzero`.
        allowzero: bool,
    },
    /// Flatten at `axis` into 2-D.
    Flatten(i64),
    /// Squeeze `axes` (attribute), input 1, or every size-1 axis.
    Squeeze(Option<Vec<i64>>),
    /// Unsqueeze `axes` (attribute) or input 1.
    Unsqueeze(Option<Vec<i64>>),
}

/// Reshape, Flatten, Squeeze, Unsqueeze.
#[derive(Debug)]
pub struct ReshapeLike {
    kind: ReshapeKind,
}

impl ReshapeLike {
    /// The op for `kind`.
    pub fn new(kind: ReshapeKind) -> ReshapeLike {
        ReshapeLike { kind }
    }

    fn target(&self, inputs: &[&Tensor]) -> Result<Vec<usize>> {
        let x = input(inputs, 0)?;
        self.target_of(x.shape(), inputs.get(1..).unwrap_or_default())
    }

    /// The output shape for an input of shape `s` (`rest`: the inputs after it).
    fn target_of(&self, s: &[usize], rest: &[&Tensor]) -> Result<Vec<usize>> {
        let len: usize = s.iter().product();
        let second = |what: &str| -> Result<Vec<i64>> { input(rest, 0)?.to_i64_vec(what) };
        match &self.kind {
            ReshapeKind::Reshape { allowzero } => {
                let spec = second("Reshape shape")?;
                let mut out = Vec::with_capacity(spec.len());
                let mut infer = None;
                for (i, &d) in spec.iter().enumerate() {
                    match d {
                        0 if !allowzero => {
                            out.push(*s.get(i).ok_or_else(|| fail("Reshape 0 beyond input rank"))?)
                        }
                        -1 if infer.is_none() => {
                            infer = Some(i);
                            out.push(1);
                        }
                        d if d >= 0 => out.push(d as usize),
                        _ => return Err(fail(alloc::format!("bad Reshape target {spec:?}"))),
                    }
                }
                if let Some(i) = infer {
                    let known: usize = out.iter().product();
                    if known == 0 || !len.is_multiple_of(known) {
                        return Err(fail(alloc::format!(
                            "cannot infer -1 reshaping {s:?} to {spec:?}"
                        )));
                    }
                    out[i] = len / known;
                }
                Ok(out)
            }
            ReshapeKind::Flatten(axis) => {
                let a = if *axis < 0 {
                    (*axis + s.len() as i64).max(0) as usize
                } else {
                    (*axis as usize).min(s.len())
                };
                Ok(vec![s[..a].iter().product(), s[a..].iter().product()])
            }
            ReshapeKind::Squeeze(axes) => {
                let axes = match axes {
                    Some(a) => Some(a.clone()),
                    None if !rest.is_empty() => Some(second("Squeeze axes")?),
                    None => None,
                };
                match axes {
                    None => Ok(s.iter().copied().filter(|&d| d != 1).collect()),
                    Some(axes) => {
                        let axes = axes
                            .iter()
                            .map(|&a| norm_axis(a, s.len(), ""))
                            .collect::<Result<Vec<_>>>()?;
                        if axes.iter().any(|&a| s[a] != 1) {
                            return Err(fail(alloc::format!("Squeeze of a non-1 axis in {s:?}")));
                        }
                        Ok(s.iter()
                            .enumerate()
                            .filter(|(i, _)| !axes.contains(i))
                            .map(|(_, &d)| d)
                            .collect())
                    }
                }
            }
            ReshapeKind::Unsqueeze(axes) => {
                let axes = match axes {
                    Some(a) => a.clone(),
                    None => second("Unsqueeze axes")?,
                };
                let rank = s.len() + axes.len();
                let mut axes =
                    axes.iter().map(|&a| norm_axis(a, rank, "")).collect::<Result<Vec<_>>>()?;
                axes.sort_unstable();
                let mut out = s.to_vec();
                for a in axes {
                    out.insert(a, 1);
                }
                Ok(out)
            }
        }
    }
}

impl TailOp for ReshapeLike {
    fn op_type(&self) -> &'static str {
        match self.kind {
            ReshapeKind::Reshape { .. } => "Reshape",
            ReshapeKind::Flatten(_) => "Flatten",
            ReshapeKind::Squeeze(_) => "Squeeze",
            ReshapeKind::Unsqueeze(_) => "Unsqueeze",
        }
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let target = self.target(inputs)?;
        reshape_tensor(input(inputs, 0)?, &target)
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        Some(super::GpuKind::Reshape)
    }

    fn gpu_target(&self, x: &[usize], rest: &[&Tensor]) -> Result<Vec<usize>> {
        let target = self.target_of(x, rest)?;
        if target.iter().product::<usize>() != x.iter().product::<usize>() {
            return Err(fail(alloc::format!("cannot reshape {x:?} to {target:?}")));
        }
        Ok(target)
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
            out[0] = Some(reshape_grad(dy, input(inputs, 0)?.shape())?);
        }
        Ok(out)
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }
}

/// Transpose by `perm` (default: reverse the axes).
#[derive(Debug)]
pub struct Transpose {
    perm: Option<Vec<usize>>,
}

impl Transpose {
    /// The op with an optional permutation.
    pub fn new(perm: Option<Vec<usize>>) -> Transpose {
        Transpose { perm }
    }

    fn perm(&self, rank: usize) -> Result<Vec<usize>> {
        let p = self.perm.clone().unwrap_or_else(|| (0..rank).rev().collect());
        let mut seen = vec![false; rank];
        if p.len() != rank || p.iter().any(|&a| a >= rank || core::mem::replace(&mut seen[a], true))
        {
            return Err(fail(alloc::format!("bad permutation {p:?} for rank {rank}")));
        }
        Ok(p)
    }
}

/// `a` with its axes permuted (`out.shape[i] = a.shape[p[i]]`), contiguous.
/// When the last axis stays last (attention's `[B, S, H, D] ↔ [B, H, S, D]`)
/// the copy moves whole rows of it at a time, otherwise element by element.
pub(crate) fn permute<T: Copy>(a: ndarray::ArrayViewD<'_, T>, p: &[usize]) -> ArrayD<T> {
    let rank = a.ndim();
    let view = a.clone().permuted_axes(IxDyn(p));
    let run = view.shape().last().copied().unwrap_or(1);
    let src = match a.as_slice() {
        Some(s) if rank >= 2 && p[rank - 1] == rank - 1 && run >= 4 => s,
        Some(s) if rank >= 2 && p[rank - 1] != rank - 1 => {
            let out = transpose_blocked(s, a.shape(), p);
            return ArrayD::from_shape_vec(IxDyn(view.shape()), out)
                .expect("permute: shape and length agree");
        }
        _ => return view.as_standard_layout().into_owned(),
    };
    let shape: Vec<usize> = view.shape().to_vec();
    // Signed: a length-1 axis may carry any stride (even a negative one) in
    // a standard-layout array; it never moves `off` outside the data.
    let strides: Vec<isize> = view.strides().to_vec();
    let outer = &shape[..rank - 1];
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; rank - 1];
    let mut off = 0isize;
    for _ in 0..total / run.max(1) {
        let o = off as usize;
        out.extend_from_slice(&src[o..o + run]);
        // Odometer over the leading axes, keeping `off` = Σ idx·stride.
        for ax in (0..rank - 1).rev() {
            idx[ax] += 1;
            off += strides[ax];
            if idx[ax] < outer[ax] {
                break;
            }
            off -= strides[ax] * outer[ax] as isize;
            idx[ax] = 0;
        }
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).expect("permute: shape and length agree")
}

/// [`permute`] of a row-major `src` when its last axis moves (attention's
/// `Kᵀ`, `[B,S,H,D] → [B,H,D,S]`, and back): for every index of the other
/// axes, a 2-D transpose between the input's last axis (contiguous in `src`)
/// and the output's last axis, in 16×16 blocks so both sides' cache lines are
/// reused (element by element it was ~1.5 ns per value, ~1.5 ms of a MiniLM
/// step).
fn transpose_blocked<T: Copy>(src: &[T], shape: &[usize], p: &[usize]) -> Vec<T> {
    const B: usize = 16;
    let rank = shape.len();
    let strides = |dims: &[usize]| {
        let mut st = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            st[i] = st[i + 1] * dims[i + 1];
        }
        st
    };
    let out_shape: Vec<usize> = p.iter().map(|&ax| shape[ax]).collect();
    let (in_st, out_st) = (strides(shape), strides(&out_shape));
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    // x runs along the output's last axis (input axis p[rank-1]), y along the
    // input's last axis (output axis j).
    let j = p.iter().position(|&ax| ax == rank - 1).expect("p is a permutation");
    let (nx, ny) = (shape[p[rank - 1]], shape[rank - 1]);
    let (sx, sy) = (in_st[p[rank - 1]], out_st[j]);
    let others: Vec<usize> = (0..rank).filter(|&q| q != j && q != rank - 1).collect();
    let o = &mut out.spare_capacity_mut()[..total];
    let mut idx = vec![0usize; others.len()];
    loop {
        let base_in: usize = others.iter().zip(&idx).map(|(&q, &i)| i * in_st[p[q]]).sum();
        let base_out: usize = others.iter().zip(&idx).map(|(&q, &i)| i * out_st[q]).sum();
        for x0 in (0..nx).step_by(B) {
            for y0 in (0..ny).step_by(B) {
                for y in y0..(y0 + B).min(ny) {
                    let row = &mut o[base_out + y * sy..];
                    for x in x0..(x0 + B).min(nx) {
                        row[x].write(src[base_in + x * sx + y]);
                    }
                }
            }
        }
        // Odometer over the other axes.
        let mut t = others.len();
        loop {
            if t == 0 {
                // Every (others, x, y) index was written exactly once: the
                // map from them to output offsets is a bijection onto 0..total.
                // SAFETY: all `total` elements of the capacity are written.
                unsafe { out.set_len(total) };
                return out;
            }
            t -= 1;
            idx[t] += 1;
            if idx[t] < out_shape[others[t]] {
                break;
            }
            idx[t] = 0;
        }
    }
}

impl TailOp for Transpose {
    fn op_type(&self) -> &'static str {
        "Transpose"
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        Some(super::GpuKind::Transpose)
    }

    fn gpu_perm(&self, rank: usize) -> Result<Vec<usize>> {
        self.perm(rank)
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?;
        let p = self.perm(x.shape().len())?;
        Ok(match x {
            Tensor::F32(a) => Tensor::F32(permute(a.view(), &p)),
            Tensor::F16(a) => Tensor::F16(permute(a.view(), &p)),
            Tensor::I64(a) => Tensor::I64(permute(a.view(), &p)),
        })
    }

    fn backward(
        &mut self,
        _inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        if !need.first().copied().unwrap_or(false) {
            return Ok(vec![None]);
        }
        let p = self.perm(dy.ndim())?;
        let mut inv = vec![0; p.len()];
        for (i, &a) in p.iter().enumerate() {
            inv[a] = i;
        }
        Ok(vec![Some(permute(dy.view(), &inv))])
    }
}

/// Concatenation along `axis`.
#[derive(Debug)]
pub struct Concat {
    axis: i64,
}

impl Concat {
    /// Concat along `axis`.
    pub fn new(axis: i64) -> Concat {
        Concat { axis }
    }
}

impl TailOp for Concat {
    fn op_type(&self) -> &'static str {
        "Concat"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let first = input(inputs, 0)?;
        let axis = Axis(norm_axis(self.axis, first.shape().len(), "")?);
        let err = |e: ndarray::ShapeError| fail(alloc::format!("Concat: {e}"));
        if matches!(first, Tensor::I64(_)) {
            let views = inputs
                .iter()
                .map(|t| t.i64("Concat input").map(|a| a.view()))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::I64(ndarray::concatenate(axis, &views).map_err(err)?));
        }
        let views = inputs
            .iter()
            .map(|t| t.f32("Concat input").map(|a| a.view()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::F32(ndarray::concatenate(axis, &views).map_err(err)?))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let axis = norm_axis(self.axis, dy.ndim(), "")?;
        let mut start = 0usize;
        let mut out = Vec::with_capacity(inputs.len());
        for (i, t) in inputs.iter().enumerate() {
            let len = t.shape()[axis];
            out.push(
                need.get(i).copied().unwrap_or(false).then(|| {
                    dy.slice_axis(Axis(axis), NdSlice::from(start..start + len)).to_owned()
                }),
            );
            start += len;
        }
        Ok(out)
    }
}

/// ONNX Slice: `starts`, `ends`, `axes`, `steps` from inputs 1–4 (opset ≥ 10)
/// or from attributes (older opsets).
#[derive(Debug)]
pub struct Slice {
    attrs: Option<SliceAttrs>,
}

/// Opset < 10 Slice attributes: `(starts, ends, axes)`.
pub type SliceAttrs = (Vec<i64>, Vec<i64>, Option<Vec<i64>>);

impl Slice {
    /// `attrs`: `(starts, ends, axes)` for opset < 10, else `None`.
    pub fn new(attrs: Option<SliceAttrs>) -> Slice {
        Slice { attrs }
    }

    /// Per axis `(start, end, step)` in ndarray's convention.
    fn ranges(&self, inputs: &[&Tensor]) -> Result<Vec<NdSlice>> {
        let shape = input(inputs, 0)?.shape().to_vec();
        let (starts, ends, axes, steps) = match &self.attrs {
            Some((s, e, a)) => (s.clone(), e.clone(), a.clone(), None),
            None => {
                let get = |i: usize, what: &str| -> Result<Option<Vec<i64>>> {
                    inputs.get(i).map(|t| t.to_i64_vec(what)).transpose()
                };
                let s = get(1, "Slice starts")?.ok_or_else(|| fail("Slice needs starts"))?;
                let e = get(2, "Slice ends")?.ok_or_else(|| fail("Slice needs ends"))?;
                (s, e, get(3, "Slice axes")?, get(4, "Slice steps")?)
            }
        };
        let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Err(fail("Slice starts/ends/axes/steps lengths differ"));
        }
        let mut out: Vec<NdSlice> = shape.iter().map(|_| NdSlice::from(..)).collect();
        for i in 0..starts.len() {
            let ax = norm_axis(axes[i], shape.len(), "")?;
            let dim = shape[ax] as i64;
            let step = steps[i];
            if step == 0 {
                return Err(fail("Slice step 0"));
            }
            let fix = |v: i64| if v < 0 { v + dim } else { v };
            let (s, e) = (fix(starts[i].max(-i64::MAX)), fix(ends[i].max(-i64::MAX)));
            out[ax] = if step > 0 {
                let s = s.clamp(0, dim);
                let e = e.clamp(0, dim).max(s);
                NdSlice::new(s as isize, Some(e as isize), step as isize)
            } else {
                let s = s.clamp(-1, dim - 1);
                let e = e.clamp(-1, dim - 1).min(s);
                NdSlice::new((e + 1) as isize, Some((s + 1) as isize), step as isize)
            };
        }
        Ok(out)
    }
}

impl TailOp for Slice {
    fn op_type(&self) -> &'static str {
        "Slice"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let r = self.ranges(inputs)?;
        Ok(match input(inputs, 0)? {
            Tensor::F32(a) => Tensor::F32(a.slice_each_axis(|ax| r[ax.axis.index()]).to_owned()),
            Tensor::F16(a) => Tensor::F16(a.slice_each_axis(|ax| r[ax.axis.index()]).to_owned()),
            Tensor::I64(a) => Tensor::I64(a.slice_each_axis(|ax| r[ax.axis.index()]).to_owned()),
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
            let r = self.ranges(inputs)?;
            let mut dx = ArrayD::<f32>::zeros(IxDyn(input(inputs, 0)?.shape()));
            dx.slice_each_axis_mut(|ax| r[ax.axis.index()]).assign(dy);
            out[0] = Some(dx);
        }
        Ok(out)
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }
}

/// ONNX Gather along `axis` with i64 indices of any rank.
#[derive(Debug)]
pub struct Gather {
    axis: i64,
}

impl Gather {
    /// Gather along `axis`.
    pub fn new(axis: i64) -> Gather {
        Gather { axis }
    }

    fn plan(&self, inputs: &[&Tensor]) -> Result<(usize, Vec<usize>, Vec<usize>)> {
        let data = input(inputs, 0)?.shape().to_vec();
        let idx = input(inputs, 1)?;
        let axis = norm_axis(self.axis, data.len(), "")?;
        let dim = data[axis] as i64;
        let flat = idx
            .to_i64_vec("Gather indices")?
            .into_iter()
            .map(|i| {
                let j = if i < 0 { i + dim } else { i };
                if (0..dim).contains(&j) {
                    Ok(j as usize)
                } else {
                    Err(fail(alloc::format!("index {i} out of 0..{dim}")))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out_shape = data[..axis].to_vec();
        out_shape.extend_from_slice(idx.shape());
        out_shape.extend_from_slice(&data[axis + 1..]);
        Ok((axis, flat, out_shape))
    }
}

impl TailOp for Gather {
    fn op_type(&self) -> &'static str {
        "Gather"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let (axis, idx, shape) = self.plan(inputs)?;
        let picked = match input(inputs, 0)? {
            Tensor::F32(a) => Tensor::F32(a.select(Axis(axis), &idx)),
            Tensor::F16(a) => Tensor::F16(a.select(Axis(axis), &idx)),
            Tensor::I64(a) => Tensor::I64(a.select(Axis(axis), &idx)),
        };
        reshape_tensor(&picked, &shape)
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
            let (axis, idx, _) = self.plan(inputs)?;
            let data = input(inputs, 0)?.shape().to_vec();
            let mut picked_shape = data.clone();
            picked_shape[axis] = idx.len();
            let g = reshape_grad(dy, &picked_shape)?;
            let mut dx = ArrayD::<f32>::zeros(IxDyn(&data));
            for (j, &i) in idx.iter().enumerate() {
                let mut dst = dx.index_axis_mut(Axis(axis), i);
                dst += &g.index_axis(Axis(axis), j);
            }
            out[0] = Some(dx);
        }
        Ok(out)
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }
}

/// ONNX Shape (with opset-15 `start`/`end`): the input's dims as i64.
#[derive(Debug)]
pub struct Shape {
    start: i64,
    end: Option<i64>,
}

impl Shape {
    /// Dims `start..end` of the input.
    pub fn new(start: i64, end: Option<i64>) -> Shape {
        Shape { start, end }
    }
}

impl TailOp for Shape {
    fn op_type(&self) -> &'static str {
        "Shape"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let s = input(inputs, 0)?.shape();
        let r = s.len() as i64;
        let fix = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let (a, b) = (fix(self.start), fix(self.end.unwrap_or(r)));
        let dims: Vec<i64> = s[a..b.max(a)].iter().map(|&d| d as i64).collect();
        Ok(Tensor::I64(
            ArrayD::from_shape_vec(IxDyn(&[dims.len()]), dims)
                .map_err(|e| fail(alloc::format!("{e}")))?,
        ))
    }

    fn backward(
        &mut self,
        _inputs: &[&Tensor],
        _output: &Tensor,
        _dy: &ArrayD<f32>,
        _need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        Ok(vec![None])
    }

    fn differentiable(&self, _input: usize) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row-copying permute equals ndarray's element-wise one for every
    /// permutation of a rank-4 array (rows kept or not), and for rank 2/3.
    #[test]
    fn permute_matches_the_elementwise_copy() {
        // Small axes, and axes longer than the 16×16 blocks of the
        // last-axis-moves path with partial blocks on every side.
        let shapes: [&[usize]; 6] =
            [&[2, 3, 4, 5], &[3, 8], &[2, 1, 6], &[2, 37, 3, 20], &[33, 17], &[17, 1, 40]];
        for shape in shapes {
            let n: usize = shape.iter().product();
            let a =
                ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|v| v as f32).collect()).unwrap();
            let rank = shape.len();
            let mut perms = vec![(0..rank).collect::<Vec<usize>>()];
            // All permutations by repeated swaps (small ranks only).
            let mut i = 0;
            while i < perms.len() && perms.len() < 24 {
                for x in 0..rank {
                    for y in x + 1..rank {
                        let mut q = perms[i].clone();
                        q.swap(x, y);
                        if !perms.contains(&q) {
                            perms.push(q);
                        }
                    }
                }
                i += 1;
            }
            for p in perms {
                let want = a.view().permuted_axes(IxDyn(&p)).as_standard_layout().into_owned();
                let got = permute(a.view(), &p);
                assert_eq!(got.shape(), want.shape(), "{shape:?} {p:?}");
                assert_eq!(got.as_slice().unwrap(), want.as_slice().unwrap(), "{shape:?} {p:?}");
            }
        }
        // A length-1 axis may carry a negative stride in a standard-layout array.
        let mut a =
            ArrayD::from_shape_vec(IxDyn(&[1, 4, 5]), (0..20).map(|v| v as f32).collect()).unwrap();
        a.invert_axis(Axis(0));
        let want = a.view().permuted_axes(IxDyn(&[1, 0, 2])).as_standard_layout().into_owned();
        assert_eq!(permute(a.view(), &[1, 0, 2]), want);
        let want = a.view().permuted_axes(IxDyn(&[2, 0, 1])).as_standard_layout().into_owned();
        assert_eq!(permute(a.view(), &[2, 0, 1]), want);
        // A non-contiguous input takes the element-wise path.
        let a =
            ArrayD::from_shape_vec(IxDyn(&[4, 6]), (0..24).map(|v| v as f32).collect()).unwrap();
        let t = a.view().reversed_axes();
        assert_eq!(permute(t, &[1, 0]), a);
    }
}
