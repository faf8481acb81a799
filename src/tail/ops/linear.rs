//! Linear layers and batched matrix products.
//!
//! [`Linear`] is every Gemm / MatMul with a constant weight (its constant
//! bias Add fused in) and every 1×1 Conv (a per-pixel linear layer over
//! channels): frozen, or adapted with a [`HydraLinear`]. Its weight is kept
//! once, f32 or f16. [`MatMul`] is the activation × activation product of
//! attention, with numpy batch broadcasting.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, IxDyn};

use super::{TailOp, fail, input};
use crate::Tensor;
use crate::error::{Error, Result};
use crate::hydra::{
    HydraConfig, HydraLinear, Input, Packs, Weights, frozen_backward, frozen_forward, gemm,
};
use crate::kernels;
use crate::tail::broadcast::{broadcast_shape, unbroadcast};

/// How a linear layer's input is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Features on the last axis: `[..., in] → [..., out]`.
    Rows,
    /// Channels on axis 1 (a 1×1 Conv): `[N, in, H, W] → [N, out, H, W]`.
    Channels,
}

#[derive(Debug)]
enum Inner {
    /// `packs`: `w` for bf16 products, built on first use.
    Frozen {
        w: Weights,
        b: Option<Vec<f32>>,
        packs: Packs,
    },
    Adapted(Box<HydraLinear>),
}

/// A linear layer of the tail, frozen or adapted.
#[derive(Debug)]
pub struct Linear {
    op_type: &'static str,
    layout: Layout,
    in_dim: usize,
    out_dim: usize,
    inner: Inner,
}

impl Linear {
    /// A frozen layer: `W0` out×in (row-major), optional bias.
    pub fn new(
        op_type: &'static str,
        layout: Layout,
        w: Weights,
        b: Option<Vec<f32>>,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Linear> {
        if w.len() != in_dim * out_dim || b.as_ref().is_some_and(|b| b.len() != out_dim) {
            return Err(Error::Shape {
                context: "tail Linear",
                expected: alloc::format!("{out_dim}×{in_dim} weights"),
                got: alloc::format!("{} weights", w.len()),
            });
        }
        Ok(Linear {
            op_type,
            layout,
            in_dim,
            out_dim,
            inner: Inner::Frozen { w, b, packs: Packs::default() },
        })
    }

    /// Puts a fresh adapter on the layer.
    pub fn adapt(&mut self, config: HydraConfig) -> Result<()> {
        let Inner::Frozen { w, b, .. } = &mut self.inner else {
            return Err(Error::Config(String::from("layer is already adapted")));
        };
        let (w, b) = (core::mem::replace(w, Weights::F32(Vec::new())), b.take());
        match HydraLinear::new(config, w.clone(), b.clone(), self.in_dim, self.out_dim) {
            Ok(h) => {
                self.inner = Inner::Adapted(Box::new(h));
                Ok(())
            }
            Err(e) => {
                self.inner = Inner::Frozen { w, b, packs: Packs::default() };
                Err(e)
            }
        }
    }

    /// The adapter, if the layer has one.
    pub fn adapter(&self) -> Option<&HydraLinear> {
        match &self.inner {
            Inner::Adapted(h) => Some(h),
            Inner::Frozen { .. } => None,
        }
    }

    /// Mutable [`Linear::adapter`].
    pub fn adapter_mut(&mut self) -> Option<&mut HydraLinear> {
        match &mut self.inner {
            Inner::Adapted(h) => Some(h),
            Inner::Frozen { .. } => None,
        }
    }

    /// Input and output widths.
    pub fn dims(&self) -> (usize, usize) {
        (self.in_dim, self.out_dim)
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The frozen weights (W0, or the merged weights while merged).
    pub fn weights(&self) -> &Weights {
        match &self.inner {
            Inner::Frozen { w, .. } => w,
            Inner::Adapted(h) => h.weights(),
        }
    }

    /// Frozen parameter count (weights and bias).
    pub fn frozen_params(&self) -> usize {
        self.in_dim * self.out_dim + self.bias_len()
    }

    /// Bytes of the frozen weights (storage type) and bias.
    pub fn frozen_bytes(&self) -> usize {
        let w = match self.weights() {
            Weights::F32(w) => w.len() * 4,
            Weights::F16(w) => w.len() * 2,
        };
        w + self.bias_len() * 4
    }

    /// Bytes the weights' bf16 packs take once built (both directions,
    /// where bf16 products are on; bf16 products build them on a layer's
    /// first product in each direction).
    pub fn planned_pack_bytes(&self) -> usize {
        Packs::planned_bytes(self.in_dim, self.out_dim)
    }

    /// Whether the layer runs on the GPU's resident values
    /// (`device::resident`): rows layout, frozen or adapted (not merged).
    pub fn resident(&self) -> bool {
        // (A merged adapter's pass is a frozen product on the host path.)
        self.layout == Layout::Rows && !self.adapter().is_some_and(HydraLinear::is_merged)
    }

    /// The layer's forward on a resident value of `rows` rows, `Y` left
    /// there (an adapted layer keeps what its backward needs there too).
    /// `Ok(None)`: not a pass for the GPU (the caller runs
    /// [`TailOp::forward`] on a host copy).
    pub(crate) fn forward_resident(
        &mut self,
        x: &crate::device::resident::GpuValue,
        rows: usize,
        train: bool,
    ) -> core::result::Result<
        Option<crate::device::resident::GpuValue>,
        crate::device::resident::Failed,
    > {
        if self.layout != Layout::Rows {
            return Ok(None);
        }
        let (din, dout) = (self.in_dim, self.out_dim);
        match &mut self.inner {
            Inner::Frozen { w, b, packs } => {
                let (w, b) = (&*w, b.as_deref());
                crate::device::resident::frozen(
                    packs.gpu(),
                    || w.for_gpu(),
                    true,
                    rows,
                    din,
                    dout,
                    x,
                    b,
                )
                .map(Some)
            }
            Inner::Adapted(h) => {
                h.set_training(train);
                h.forward_resident(x, rows, train)
            }
        }
    }

    /// The backward of [`Linear::forward_resident`] for `dY` resident on the
    /// GPU: an adapted layer's gradients, and `dX` there if `want_dx`.
    pub(crate) fn backward_resident(
        &mut self,
        dy: &crate::device::resident::GpuValue,
        rows: usize,
        want_dx: bool,
    ) -> core::result::Result<
        Option<crate::device::resident::GpuValue>,
        crate::device::resident::Failed,
    > {
        let (din, dout) = (self.in_dim, self.out_dim);
        match &mut self.inner {
            Inner::Frozen { w, packs, .. } if want_dx => {
                let w = &*w;
                crate::device::resident::frozen(
                    packs.gpu(),
                    || w.for_gpu(),
                    false,
                    rows,
                    din,
                    dout,
                    dy,
                    None,
                )
                .map(Some)
            }
            Inner::Frozen { .. } => Ok(None),
            Inner::Adapted(h) => h.backward_resident(crate::device::Act::Gpu(dy), want_dx),
        }
    }

    fn bias_len(&self) -> usize {
        match &self.inner {
            Inner::Frozen { b, .. } => b.as_ref().map_or(0, Vec::len),
            Inner::Adapted(h) => h.bias().map_or(0, <[f32]>::len),
        }
    }

    /// `x` as rows `[n, in]` (a contiguous copy for the channel layout).
    fn rows(&self, x: &ArrayD<f32>) -> Result<(Vec<f32>, Vec<usize>)> {
        let s = x.shape();
        match self.layout {
            Layout::Rows => {
                if s.last() != Some(&self.in_dim) {
                    return Err(fail(alloc::format!(
                        "input {s:?} does not end in {}",
                        self.in_dim
                    )));
                }
                Ok((x.as_standard_layout().iter().copied().collect(), s.to_vec()))
            }
            Layout::Channels => {
                if s.len() < 2 || s[1] != self.in_dim {
                    return Err(fail(alloc::format!(
                        "input {s:?} does not have {} channels",
                        self.in_dim
                    )));
                }
                Ok((channels_last(x).into_raw_vec_and_offset().0, s.to_vec()))
            }
        }
    }

    /// Rows `[n, width]` back to the op's layout for input shape `shape`.
    fn unrows(&self, v: Vec<f32>, shape: &[usize], width: usize) -> Result<ArrayD<f32>> {
        match self.layout {
            Layout::Rows => {
                let mut s = shape.to_vec();
                *s.last_mut().ok_or_else(|| fail("rank-0 input"))? = width;
                ArrayD::from_shape_vec(IxDyn(&s), v).map_err(|e| fail(alloc::format!("{e}")))
            }
            Layout::Channels => {
                let mut s = shape.to_vec();
                s[1] = width;
                let mut last: Vec<usize> = s.clone();
                last.remove(1);
                last.push(width);
                let a = ArrayD::from_shape_vec(IxDyn(&last), v)
                    .map_err(|e| fail(alloc::format!("{e}")))?;
                Ok(channels_first(a))
            }
        }
    }
}

/// `[N, C, ...] → [N, ..., C]`, contiguous.
fn channels_last(x: &ArrayD<f32>) -> ArrayD<f32> {
    let r = x.ndim();
    let mut perm: Vec<usize> = vec![0];
    perm.extend(2..r);
    perm.push(1);
    x.view().permuted_axes(IxDyn(&perm)).as_standard_layout().into_owned()
}

/// `[N, ..., C] → [N, C, ...]`, contiguous.
fn channels_first(x: ArrayD<f32>) -> ArrayD<f32> {
    let r = x.ndim();
    let mut perm: Vec<usize> = vec![0, r - 1];
    perm.extend(1..r - 1);
    x.permuted_axes(IxDyn(&perm)).as_standard_layout().into_owned()
}

/// A rows-layout input as it sits on the tape: borrowed when contiguous.
fn rows_of(x: &Tensor) -> Option<Input<'_>> {
    match x {
        Tensor::F32(a) => a.as_slice().map(Input::F32),
        Tensor::F16(a) => a.as_slice().map(Input::F16),
        Tensor::I64(_) => None,
    }
}

impl TailOp for Linear {
    fn op_type(&self) -> &'static str {
        self.op_type
    }

    fn forward(&mut self, inputs: &[&Tensor], train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?;
        let shape = x.shape().to_vec();
        // Rows layout on a contiguous tape value: the adapter reads the tape's
        // copy (f32 or f16) and keeps none of its own.
        if self.layout == Layout::Rows
            && let Some(rows) = rows_of(x)
        {
            if shape.last() != Some(&self.in_dim) {
                return Err(fail(alloc::format!(
                    "input {shape:?} does not end in {}",
                    self.in_dim
                )));
            }
            let n = rows.len() / self.in_dim;
            let k = kernels::active();
            let y = match (&mut self.inner, rows) {
                (Inner::Frozen { w, b, packs }, Input::F32(r)) => {
                    frozen_forward(k, w, packs, b.as_deref(), r, n, self.in_dim, self.out_dim)
                }
                (Inner::Frozen { w, b, packs }, Input::F16(h)) => {
                    let mut wide = vec![0.0f32; h.len()];
                    k.f16_to_f32(h, &mut wide);
                    kernels::stats::count_widened(wide.len());
                    frozen_forward(k, w, packs, b.as_deref(), &wide, n, self.in_dim, self.out_dim)
                }
                (Inner::Adapted(h), rows) => {
                    h.set_training(train);
                    h.forward_ext(rows, n, false, true)?
                }
            };
            return Ok(Tensor::F32(self.unrows(y, &shape, self.out_dim)?));
        }
        let x = x.to_f32("Linear input")?;
        let (rows, shape) = self.rows(&x)?;
        let n = rows.len() / self.in_dim;
        let y = match &mut self.inner {
            Inner::Frozen { w, b, packs } => frozen_forward(
                kernels::active(),
                w,
                packs,
                b.as_deref(),
                &rows,
                n,
                self.in_dim,
                self.out_dim,
            ),
            Inner::Adapted(h) => {
                h.set_training(train);
                h.forward(Input::F32(&rows), n)?
            }
        };
        Ok(Tensor::F32(self.unrows(y, &shape, self.out_dim)?))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let x = input(inputs, 0)?;
        let want_dx = need.first().copied().unwrap_or(false);
        let dy_std = dy.as_standard_layout();
        let dyr: alloc::borrow::Cow<'_, [f32]> = match self.layout {
            Layout::Rows => alloc::borrow::Cow::Borrowed(dy_std.as_slice().unwrap_or_default()),
            Layout::Channels => {
                alloc::borrow::Cow::Owned(channels_last(dy).into_raw_vec_and_offset().0)
            }
        };
        let n = dyr.len() / self.out_dim;
        let borrowed = if self.layout == Layout::Rows { rows_of(x) } else { None };
        let dx = match &mut self.inner {
            Inner::Frozen { w, packs, .. } => want_dx.then(|| {
                frozen_backward(kernels::active(), w, packs, &dyr, n, self.in_dim, self.out_dim)
            }),
            Inner::Adapted(h) => match borrowed {
                Some(rows) => h.backward_with_input(&dyr, rows, want_dx)?,
                None if want_dx => Some(h.backward(&dyr)?),
                None => {
                    h.backward_params_only(&dyr)?;
                    None
                }
            },
        };
        let mut out = vec![None; inputs.len()];
        if let Some(dx) = dx {
            out[0] = Some(self.unrows(dx, x.shape(), self.in_dim)?);
        }
        Ok(out)
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }

    fn accepts_f16(&self, input: usize) -> bool {
        input == 0
    }

    fn release(&mut self) {
        if let Inner::Adapted(h) = &mut self.inner {
            h.clear_saved();
        }
    }

    fn backward_reads_output(&self) -> bool {
        false
    }

    fn as_linear(&self) -> Option<&Linear> {
        Some(self)
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        self.resident().then_some(super::GpuKind::Linear)
    }

    fn as_linear_mut(&mut self) -> Option<&mut Linear> {
        Some(self)
    }
}

/// `Y[..., M, N] = A[..., M, K]·B[..., K, N]` for two activations, batch
/// axes broadcast (ONNX MatMul, rank ≥ 2).
#[derive(Debug, Default)]
pub struct MatMul;

/// Batch shape, and A and B contiguous at that batch shape (borrowed when
/// they already are: no copy for the usual equal-batch attention products).
struct Batched<'a> {
    batch: Vec<usize>,
    a: alloc::borrow::Cow<'a, ArrayD<f32>>,
    b: alloc::borrow::Cow<'a, ArrayD<f32>>,
    m: usize,
    k: usize,
    n: usize,
}

fn batched<'a>(a: &'a ArrayD<f32>, b: &'a ArrayD<f32>) -> Result<Batched<'a>> {
    use alloc::borrow::Cow;
    let (ra, rb) = (a.ndim(), b.ndim());
    if ra < 2 || rb < 2 {
        return Err(fail("MatMul of rank-1 operands is not supported in the tail"));
    }
    let (m, k, k2, n) =
        (a.shape()[ra - 2], a.shape()[ra - 1], b.shape()[rb - 2], b.shape()[rb - 1]);
    if k != k2 {
        return Err(fail(alloc::format!(
            "MatMul inner dims differ: {:?} × {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let batch = broadcast_shape(&a.shape()[..ra - 2], &b.shape()[..rb - 2], "")?;
    let full = |extra: [usize; 2]| {
        let mut s = batch.clone();
        s.extend(extra);
        s
    };
    let fit = |x: &'a ArrayD<f32>, extra: [usize; 2]| -> Result<Cow<'a, ArrayD<f32>>> {
        let want = full(extra);
        if x.shape() == want.as_slice() && x.is_standard_layout() {
            return Ok(Cow::Borrowed(x));
        }
        let v = x.broadcast(IxDyn(&want)).ok_or_else(|| fail("MatMul broadcast"))?;
        Ok(Cow::Owned(v.as_standard_layout().into_owned()))
    };
    Ok(Batched { a: fit(a, [m, k])?, b: fit(b, [k, n])?, batch, m, k, n })
}

/// `out[i] = A_i·B_i` (with the given per-item strides of A and B) for every
/// batch item, items spread over the pool.
#[allow(clippy::too_many_arguments)]
fn batched_gemm(
    count: usize,
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    (a_item, sa): (usize, (usize, usize)),
    b: &[f32],
    (b_item, sb): (usize, (usize, usize)),
    out: &mut [f32],
) {
    let item = m * n;
    if item == 0 {
        return;
    }
    crate::parallel::chunks_mut(out, item, count * m * k * n, |i, c| {
        gemm(m, k, n, 1.0, &a[i * a_item..], sa, &b[i * b_item..], sb, 0.0, c);
    });
}

fn slice(a: &ArrayD<f32>) -> &[f32] {
    a.as_slice().unwrap_or_default()
}

impl TailOp for MatMul {
    fn op_type(&self) -> &'static str {
        "MatMul"
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        Some(super::GpuKind::MatMul)
    }

    fn backward_reads_output(&self) -> bool {
        false
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let bt = batched(input(inputs, 0)?.f32("MatMul A")?, input(inputs, 1)?.f32("MatMul B")?)?;
        let (m, k, n) = (bt.m, bt.k, bt.n);
        let count: usize = bt.batch.iter().product();
        let mut y = vec![0.0f32; count * m * n];
        let (a, b) = (slice(&bt.a), slice(&bt.b));
        batched_gemm(count, (m, k, n), a, (m * k, (k, 1)), b, (k * n, (n, 1)), &mut y);
        let mut shape = bt.batch;
        shape.extend([m, n]);
        Ok(Tensor::F32(
            ArrayD::from_shape_vec(IxDyn(&shape), y).map_err(|e| fail(alloc::format!("{e}")))?,
        ))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let (a0, b0) = (input(inputs, 0)?.f32("MatMul A")?, input(inputs, 1)?.f32("MatMul B")?);
        let bt = batched(a0, b0)?;
        let (m, k, n) = (bt.m, bt.k, bt.n);
        let count: usize = bt.batch.iter().product();
        let dy = dy.as_standard_layout();
        let (a, b, g) = (slice(&bt.a), slice(&bt.b), dy.as_slice().unwrap_or_default());
        let shaped = |extra: [usize; 2], v: Vec<f32>| {
            let mut s = bt.batch.clone();
            s.extend(extra);
            ArrayD::from_shape_vec(IxDyn(&s), v).map_err(|e| fail(alloc::format!("{e}")))
        };
        let mut out = vec![None, None];
        if need.first().copied().unwrap_or(false) {
            // dA = dY·Bᵀ
            let mut da = vec![0.0f32; count * m * k];
            batched_gemm(count, (m, n, k), g, (m * n, (n, 1)), b, (k * n, (1, n)), &mut da);
            out[0] = Some(unbroadcast(shaped([m, k], da)?, a0.shape()));
        }
        if need.get(1).copied().unwrap_or(false) {
            // dB = Aᵀ·dY
            let mut db = vec![0.0f32; count * k * n];
            batched_gemm(count, (k, m, n), a, (m * k, (1, k)), g, (m * n, (n, 1)), &mut db);
            out[1] = Some(unbroadcast(shaped([k, n], db)?, b0.shape()));
        }
        Ok(out)
    }
}
