//! The tail's values resident on the GPU: with a GPU in use, the tail graph
//! keeps the values that GPU ops make and read on the GPU, from one op to
//! the next, forward and backward, and moves a value across only where an
//! op on the other side reads it (each value at most once each way).
//!
//! The ops that run on resident values: linear layers (rows layout; `W0`
//! resident as for every frozen product; an adapted layer's whole pass, its
//! branches' inputs kept there for the backward), broadcasting Add, Sub,
//! Mul, Div, Pow, Max and Min (up to [`MAX_RANK`] axes), exact and tanh
//! GELU, Relu, Sigmoid, Tanh, Erf, Sqrt, Exp and Neg, LayerNormalization
//! and Softmax over the last axis, Reshape-like ops, Transpose, attention's
//! batched products (equal batch axes), ReduceSum and ReduceMean over
//! adjacent axes and GlobalAveragePool, and their backward passes (a binary
//! op's gradient into a broadcast input summed there when the axes it is
//! broadcast along are adjacent; Max's and Min's, and Pow's into its
//! exponent, on the CPU). The rest read host copies as before.
//!
//! Every call returns `Err(Failed)` when a CUDA call fails (counted and
//! reported like any GPU failure): the graph then runs the whole pass again
//! on the CPU (see `tail::graph`).

use alloc::vec::Vec;

#[cfg(feature = "cuda")]
use alloc::sync::Arc;

#[cfg(feature = "cuda")]
use super::cuda;
use super::{FrozenPlan, Resident};

/// A CUDA call failed (already counted and reported).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Failed;

/// A dense f32 value on the GPU (shared: a reshape or a pass-through
/// gradient costs no copy). Never made without the `cuda` feature.
#[derive(Clone)]
pub(crate) struct GpuValue {
    #[cfg(feature = "cuda")]
    inner: Arc<cuda::DevValue>,
}

impl GpuValue {
    #[cfg(feature = "cuda")]
    pub(super) fn inner(&self) -> &cuda::DevValue {
        &self.inner
    }

    #[cfg(feature = "cuda")]
    pub(super) fn from_inner(inner: Arc<cuda::DevValue>) -> GpuValue {
        GpuValue { inner }
    }

    /// The buffer's identity (values that share one have the same).
    pub(crate) fn id(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            Arc::as_ptr(&self.inner) as usize
        }
        #[cfg(not(feature = "cuda"))]
        0
    }

    /// Values it holds.
    pub(crate) fn len(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.inner.len()
        }
        #[cfg(not(feature = "cuda"))]
        0
    }
}

impl core::fmt::Debug for GpuValue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "GpuValue({} values)", self.len())
    }
}

#[cfg(feature = "cuda")]
fn wrap(r: Result<Arc<cuda::DevValue>, ()>) -> Result<GpuValue, Failed> {
    r.map(|inner| GpuValue { inner }).map_err(|()| Failed)
}

static ON: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(true);

/// Keeps the tail's values on the GPU between the ops that run there (on,
/// the default), or sends each product's operands up and its result back
/// as before, every element-wise op and norm on the CPU (off: the baseline
/// that benchmarks compare with). See [`super::set_resident_tail`].
pub(crate) fn set_on(on: bool) {
    ON.store(on, core::sync::atomic::Ordering::Relaxed);
}

/// Whether the tail keeps values on the GPU now: one in use, not inside a
/// CPU rerun ([`super::on_cpu`]), f32 products, its kernels compiled, and
/// not turned off ([`set_on`]).
pub(crate) fn active() -> bool {
    #[cfg(feature = "cuda")]
    {
        ON.load(core::sync::atomic::Ordering::Relaxed)
            && !super::on_cpu_only()
            && cuda::is_active()
            && cuda::tail_ready()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// The GPU in use (a number unique to each opening), for caches of values
/// on it.
pub(crate) fn gpu_id() -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        cuda::active_id()
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Whether a frozen product of `dims` is worth the GPU on its own (the
/// products' threshold, [`super::set_gpu_min_work`]).
pub(crate) fn worth(dims: &[usize]) -> bool {
    super::gpu_takes(dims)
}

/// `x` on the GPU.
pub(crate) fn upload(x: &[f32]) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::upload(x))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        Err(Failed)
    }
}

/// `v` on the host.
pub(crate) fn download(v: &GpuValue) -> Result<Vec<f32>, Failed> {
    #[cfg(feature = "cuda")]
    {
        cuda::download(&v.inner).map_err(|()| Failed)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = v;
        Err(Failed)
    }
}

/// Exact GELU `x·Φ(x)`, or with `dy` its backward `dy·(Φ(x) + x·φ(x))`.
pub(crate) fn gelu(x: &GpuValue, dy: Option<&GpuValue>) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::unary(&x.inner, 8, dy.map(|d| &*d.inner)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, dy);
        Err(Failed)
    }
}

/// Unary function `k` of `x` (0 Relu, 1 Sigmoid, 2 Tanh, 3 Erf, 4
/// tanh-GELU, 5 Sqrt, 6 Exp, 7 Neg), or with `dy` its backward
/// `dy·f'(x)`.
pub(crate) fn unary(x: &GpuValue, k: i32, dy: Option<&GpuValue>) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::unary(&x.inner, k, dy.map(|d| &*d.inner)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, k, dy);
        Err(Failed)
    }
}

/// The most axes [`binary`] and [`permute`] take.
pub(crate) const MAX_RANK: usize = 6;

/// `y = a op b` (`op`: 0 add, 1 subtract, 2 multiply, 3 divide, 4 pow, 5
/// max, 6 min, 7 Pow's derivative in its base `b·a^(b−1)`) over the
/// output shape `dims`, each operand read with its strides `sa`, `sb` (0
/// along an axis it is broadcast over).
pub(crate) fn binary(
    a: &GpuValue,
    b: &GpuValue,
    op: i32,
    dims: &[usize],
    sa: &[usize],
    sb: &[usize],
) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::binary(&a.inner, &b.inner, op, dims, sa, sb))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (a, b, op, dims, sa, sb);
        Err(Failed)
    }
}

/// `x` of shape `dims` with its axes permuted (`out[i] = dims[perm[i]]`).
pub(crate) fn permute(x: &GpuValue, dims: &[usize], perm: &[usize]) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::permute(&x.inner, dims, perm))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, dims, perm);
        Err(Failed)
    }
}

/// `batch` row-major products `C_i[m×n] = op(A_i)·op(B_i)`: `A_i` stored
/// m×k (k×m when `ta`), `B_i` k×n (n×k when `tb`).
pub(crate) fn batched_matmul(
    a: &GpuValue,
    ta: bool,
    b: &GpuValue,
    tb: bool,
    batch: usize,
    mnk: (usize, usize, usize),
) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::batched_matmul(&a.inner, ta, &b.inner, tb, batch, mnk))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (a, ta, b, tb, batch, mnk);
        Err(Failed)
    }
}

/// Softmax over lanes of `width`, or with `dy` (and `x` the forward's
/// output) its backward.
pub(crate) fn softmax(
    x: &GpuValue,
    width: usize,
    dy: Option<&GpuValue>,
) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::softmax(&x.inner, width, dy.map(|d| &*d.inner)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, width, dy);
        Err(Failed)
    }
}

/// LayerNormalization over lanes of `width` (`·scale + bias`), or with
/// `dy` its backward `dx`.
pub(crate) fn layer_norm(
    x: &GpuValue,
    scale: &GpuValue,
    bias: &GpuValue,
    width: usize,
    eps: f32,
    dy: Option<&GpuValue>,
) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::layer_norm(
            &x.inner,
            &scale.inner,
            &bias.inner,
            width,
            eps,
            dy.map(|d| &*d.inner),
        ))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, scale, bias, width, eps, dy);
        Err(Failed)
    }
}

/// `x` seen as `[outer, len, inner]` summed over `len` and scaled by
/// `scale`, or with `grad` (`x` the output's gradient, `outer·inner`
/// values) that gradient spread back over `len`, scaled.
pub(crate) fn reduce(
    x: &GpuValue,
    dims: (usize, usize, usize),
    scale: f32,
    grad: bool,
) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::reduce(&x.inner, dims, scale, grad))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, dims, scale, grad);
        Err(Failed)
    }
}

/// `acc + inc` (the same length): a gradient's sum.
pub(crate) fn accumulate(acc: GpuValue, inc: &GpuValue) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::accumulate(acc.inner, &inc.inner))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (acc, inc);
        Err(Failed)
    }
}

/// Bytes kept on the GPU: a feature cache's records, so that a batch's
/// boundary tensors are gathered there ([`gather`]) instead of sent up.
/// Freed when dropped or when the device changes. Never made without the
/// `cuda` feature.
#[cfg_attr(not(feature = "onnx"), allow(dead_code))] // the feature cache's (`model`)
pub(crate) struct GpuRecords {
    #[cfg(feature = "cuda")]
    inner: cuda::Records,
}

#[cfg_attr(not(feature = "onnx"), allow(dead_code))] // the feature cache's (`model`)
impl GpuRecords {
    /// Bytes it holds (0 once freed by a change of device).
    pub(crate) fn len(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            cuda::records_on(&self.inner).map_or(0, |(len, _)| len)
        }
        #[cfg(not(feature = "cuda"))]
        0
    }

    /// Whether it holds the records on the GPU in use now ([`gpu_id`]).
    pub(crate) fn on_gpu_in_use(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            cuda::records_on(&self.inner).is_some_and(|(_, g)| gpu_id() == Some(g))
        }
        #[cfg(not(feature = "cuda"))]
        false
    }
}

impl core::fmt::Debug for GpuRecords {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "GpuRecords({} bytes)", self.len())
    }
}

/// Free and total bytes of memory on the GPU in use.
#[cfg_attr(not(feature = "onnx"), allow(dead_code))] // the feature cache's (`model`)
pub(crate) fn memory() -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    {
        cuda::memory()
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// `bytes` kept on the GPU in use (counted in `stats::gpu_cache_uploads`).
#[cfg_attr(not(feature = "onnx"), allow(dead_code))] // the feature cache's (`model`)
pub(crate) fn upload_records(bytes: &[u8]) -> Result<GpuRecords, Failed> {
    #[cfg(feature = "cuda")]
    {
        let inner = cuda::upload_bytes(bytes).map_err(|()| Failed)?;
        super::stats::GPU_CACHE_UPLOADS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        Ok(GpuRecords { inner })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = bytes;
        Err(Failed)
    }
}

/// Samples `idx` of `recs` (records of `record` bytes) as a dense f32
/// value of `idx.len()·count` values: each sample's `count` values at byte
/// `offset` of its record, stored as f16 (`half`) or f32, little-endian.
#[cfg_attr(not(feature = "onnx"), allow(dead_code))] // the feature cache's (`model`)
pub(crate) fn gather(
    recs: &GpuRecords,
    idx: &[usize],
    record: usize,
    offset: usize,
    count: usize,
    half: bool,
) -> Result<GpuValue, Failed> {
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::gather(&recs.inner, idx, record, offset, count, half))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (recs, idx, record, offset, count, half);
        Err(Failed)
    }
}

/// A frozen layer's product on a resident value, `W0` (out×in, row-major,
/// from `w0` when it must go up) resident in `slot`: forward
/// `X[rows×in]·W0ᵀ (+ bias)`, backward `dY[rows×out]·W0`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn frozen<'w>(
    slot: &Resident,
    w0: impl FnOnce() -> super::W0<'w>,
    forward: bool,
    rows: usize,
    din: usize,
    dout: usize,
    x: &GpuValue,
    bias: Option<&[f32]>,
) -> Result<GpuValue, Failed> {
    let plan = FrozenPlan::of(forward, rows, din, dout);
    if x.len() != rows.saturating_mul(plan.k) || bias.is_some_and(|b| !forward || b.len() != dout) {
        return Err(Failed);
    }
    #[cfg(feature = "cuda")]
    {
        wrap(cuda::frozen_resident(&slot.slot, w0, plan, &x.inner, bias))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (slot, w0, plan, bias);
        Err(Failed)
    }
}
