//! The frozen layer's own products (`x·W0ᵀ`, `dy·W0`) — large and dense, so
//! they go to the packed sgemm of `kernels` (or matrixmultiply on the tiers
//! where that is not faster: `Tier::has_fast_sgemm`) — and the storage of
//! `W0` (f32 or f16).

use alloc::vec::Vec;
use half::f16;

use crate::kernels::Kernels;

/// Frozen weights `W0` (out×in, row-major) in their storage type.
#[derive(Clone, Debug, PartialEq)]
pub enum Weights {
    /// f32 storage.
    F32(Vec<f32>),
    /// f16 storage: half the memory; products widen to f32.
    F16(Vec<f16>),
}

impl Weights {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The weights widened to f32 (a copy for f16 storage).
    pub fn to_f32(&self, k: &Kernels) -> Vec<f32> {
        match self {
            Weights::F32(w) => w.clone(),
            Weights::F16(w) => {
                let mut out = alloc::vec![0.0; w.len()];
                k.f16_to_f32(w, &mut out);
                out
            }
        }
    }

    /// The weights as the GPU path uploads them (f16 stays f16).
    #[cfg(feature = "std")]
    pub(crate) fn for_gpu(&self) -> crate::device::W0<'_> {
        match self {
            Weights::F32(w) => crate::device::W0::F32(alloc::borrow::Cow::Borrowed(w)),
            Weights::F16(h) => crate::device::W0::F16(h),
        }
    }

    /// Whether every element is finite.
    pub fn all_finite(&self) -> bool {
        match self {
            Weights::F32(w) => w.iter().all(|v| v.is_finite()),
            Weights::F16(w) => w.iter().all(|v| v.is_finite()),
        }
    }
}

/// `C[m×n] = alpha·A·B + beta·C` with (row, column) strides for A and B;
/// C is dense row-major.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    beta: f32,
    c: &mut [f32],
) {
    assert_eq!(c.len(), m * n, "gemm: C shape");
    gemm_c(m, k, n, alpha, a, sa, b, sb, beta, c, n);
}

/// [`gemm`] into a block of a wider row-major C (row stride `rsc ≥ n`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_c(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    rsc: usize,
) {
    assert!(a.len() >= extent(m, k, (rsa, csa)), "gemm: A too short");
    assert!(b.len() >= extent(k, n, (rsb, csb)), "gemm: B too short");
    assert!(rsc >= n && c.len() >= extent(m, n, (rsc, 1)), "gemm: C too short");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(not(feature = "std"))]
    let bf16 = false;
    #[cfg(feature = "std")]
    // Decided for the whole product before any split, so the result does not
    // depend on the thread count.
    let bf16 = bf16_product(m, k, n);
    #[cfg(feature = "std")]
    {
        record_gemm(m, k, n);
        if crate::device::try_gemm(m, k, n, alpha, a, (rsa, csa), b, (rsb, csb), beta, c, rsc) {
            return;
        }
        // Cut along the longer output side; every element of C is still
        // computed by one sgemm with the same k-order, so the result does
        // not depend on the cut.
        let by_rows = m >= n;
        if let Some(parts) = pool_parts(if by_rows { m } else { n }, m * k * n, bf16) {
            let c_ptr = SendPtr(c.as_mut_ptr());
            crate::parallel::for_each(parts.len(), m * k * n, |i| {
                let r = parts[i].clone();
                let c = c_ptr;
                // SAFETY: the asserts above bound every element of A, B and C
                // the strides can reach; the ranges are disjoint, so each task
                // writes its own rows (or columns) of C.
                unsafe {
                    if by_rows {
                        sgemm_raw(
                            r.len(),
                            k,
                            n,
                            alpha,
                            a.as_ptr().add(r.start * rsa),
                            (rsa, csa),
                            b.as_ptr(),
                            (rsb, csb),
                            beta,
                            c.0.add(r.start * rsc),
                            rsc,
                            bf16,
                        )
                    } else {
                        sgemm_raw(
                            m,
                            k,
                            r.len(),
                            alpha,
                            a.as_ptr(),
                            (rsa, csa),
                            b.as_ptr().add(r.start * csb),
                            (rsb, csb),
                            beta,
                            c.0.add(r.start),
                            rsc,
                            bf16,
                        )
                    }
                }
            });
            return;
        }
    }
    // SAFETY: the asserts above bound every element the strides can reach.
    unsafe {
        sgemm_raw(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            (rsa, csa),
            b.as_ptr(),
            (rsb, csb),
            beta,
            c.as_mut_ptr(),
            rsc,
            bf16,
        )
    }
}

/// Elements a `rows×cols` operand with strides `(rs, cs)` spans.
fn extent(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 }
}

/// How the pool cuts `len` output rows (or columns) of a product of `work`
/// multiply-adds, or `None` to run it whole on this thread (one thread, a
/// small product, or already inside a pool task). bf16 products are cut at
/// whole 32×32 tile blocks: a block's sums start from C or the bias when it
/// is whole and from zero at an edge, so the blocks must not move with the
/// thread count.
#[cfg(feature = "std")]
fn pool_parts(len: usize, work: usize, bf16: bool) -> Option<Vec<core::ops::Range<usize>>> {
    (crate::parallel::threads() > 1
        && work >= crate::parallel::MIN_PARALLEL_GEMM
        && !crate::parallel::in_worker())
    .then(|| crate::parallel::ranges(len, if bf16 { 32 } else { 8 }))
}

/// Whether an `m×k·k×n` product runs with bf16 operands: bf16 products are
/// on (`runtime::set_matmul_precision`) and the product is large enough on
/// every side for 16×16×32 tiles.
#[cfg(feature = "std")]
fn bf16_product(m: usize, k: usize, n: usize) -> bool {
    m >= 16 && n >= 16 && k >= 32 && crate::runtime::bf16_products()
}

/// A new `m×n` matrix written by `part` (the product of `k` terms per
/// element), cut over the pool along the longer output side as `gemm_c`
/// does (at 32-blocks for bf16 products). `part(by_rows, range, c)` must
/// write every element of its rows (or columns) `range` of C, whose first
/// element is at `c` (row stride `n`); nothing is zeroed first.
#[cfg(feature = "std")]
fn fresh(
    (m, k, n): (usize, usize, usize),
    bf16: bool,
    part: impl Fn(bool, core::ops::Range<usize>, *mut f32) + Sync + Send,
) -> Vec<f32> {
    record_gemm(m, k, n);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let cp = SendPtr(c.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let work = m * k * n;
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let parts = pool_parts(len, work, bf16).unwrap_or_else(|| alloc::vec![0..len]);
    crate::parallel::for_each(parts.len(), work, |i| {
        let (r, c) = (parts[i].clone(), cp);
        let at = if by_rows { r.start * n } else { r.start };
        // SAFETY: `r` is inside 0..len, so its block starts inside C's
        // capacity; the ranges are disjoint, so each task has its own block.
        part(by_rows, r, unsafe { c.0.add(at) })
    });
    // SAFETY: the parts cover all of C, and `part` wrote each element.
    unsafe { c.set_len(m * n) };
    c
}

/// `C[m×n] = A[m×k]·B (+ bias)` on AMX into a new matrix, B packed
/// beforehand (k×n): the accumulators start from the bias or from zero, so
/// the output is never zeroed first and no bias rows are written and read
/// back. For the frozen layers' `X·W0ᵀ + b` and `dY·W0`.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
fn amx_new(a: &[f32], m: usize, b: &crate::kernels::PackedB, bias: Option<&[f32]>) -> Vec<f32> {
    let (k, n) = b.dims();
    assert!(a.len() >= m * k && bias.is_none_or(|b| b.len() >= n), "amx_new: operand shapes");
    fresh((m, k, n), true, |by_rows, r, c| {
        // SAFETY: bf16 products are on (so AMX is available); the assert
        // bounds A and the bias, `b` is k×n; `c` is this part's block of C
        // (β = 0 never reads it); column parts start at 32-blocks.
        unsafe {
            if by_rows {
                let a = a.as_ptr().add(r.start * k);
                crate::kernels::amx_gemm_packed(r.len(), 1.0, a, (k, 1), b, (0, n), 0.0, c, n, bias)
            } else {
                let bias = bias.map(|v| &v[r.start..]);
                let cols = (r.start, r.len());
                crate::kernels::amx_gemm_packed(
                    m,
                    1.0,
                    a.as_ptr(),
                    (k, 1),
                    b,
                    cols,
                    0.0,
                    c,
                    n,
                    bias,
                )
            }
        }
    })
}

/// `C[m×n] = A[m×k]·B (+ bias)` on the tier's own sgemm into a new matrix
/// (f32 `B[p·rsb + j·csb]`): the bias is the first depth block's starting
/// value and `β = 0` never reads C, so the output is neither zeroed nor
/// filled with bias rows first (each of those was a pass over the whole
/// output). For the frozen layers' f32 products.
#[cfg(feature = "std")]
fn sgemm_new(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    sb: (usize, usize),
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(
        a.len() >= m * k && b.len() >= extent(k, n, sb) && bias.is_none_or(|v| v.len() >= n),
        "sgemm_new: operand shapes"
    );
    let kernels = crate::kernels::active();
    fresh((m, k, n), false, |by_rows, r, c| {
        let bias = bias.map(|v| &v[if by_rows { 0 } else { r.start }..]);
        let bias = bias.map_or(core::ptr::null(), <[f32]>::as_ptr);
        let (rows, cols, a, b) = if by_rows {
            (r.len(), n, a[r.start * k..].as_ptr(), b.as_ptr())
        } else {
            (m, r.len(), a.as_ptr(), b[r.start * sb.1..].as_ptr())
        };
        // SAFETY: the assert bounds A, B and the bias for this part's rows
        // (or columns); `c` is its block of C, and β = 0 never reads it.
        unsafe { (kernels.sgemm)(rows, k, cols, 1.0, a, (k, 1), b, sb, 0.0, c, n, bias) }
    })
}

/// Whether a frozen f32 product runs through [`sgemm_new`]: f32 weights, the
/// tier's own sgemm (matrixmultiply has no bias start), no GPU.
#[cfg(feature = "std")]
fn sgemm_frozen(w: &Weights) -> bool {
    matches!(w, Weights::F32(_))
        && crate::kernels::active().tier().has_fast_sgemm()
        && crate::device::device() == crate::device::Device::Cpu
}

/// A frozen `W0` packed into AMX bf16 tiles for its two products, `Wᵀ` for
/// `X·W0ᵀ` and `W` for `dY·W0`: built on a layer's first bf16 product and
/// kept (each is half the size of the f32 weights), so the weights are not
/// rounded and re-packed on every product; and, with a GPU in use, `W0`'s
/// copy on the GPU (`device::Resident`). Whoever changes `W0` (merge,
/// unmerge) resets them.
#[derive(Default)]
pub(crate) struct Packs {
    #[cfg(feature = "std")]
    gpu: crate::device::Resident,
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    fwd: std::sync::OnceLock<crate::kernels::PackedB>,
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    bwd: std::sync::OnceLock<crate::kernels::PackedB>,
}

impl Packs {
    /// `W0`'s copy on the GPU.
    #[cfg(feature = "std")]
    pub(crate) fn gpu(&self) -> &crate::device::Resident {
        &self.gpu
    }

    /// Bytes the packs of an out×in `W0` take once built, both directions,
    /// where bf16 products are on (0 otherwise): what a memory estimate
    /// counts before training has built them.
    #[cfg(feature = "std")]
    pub(crate) fn planned_bytes(din: usize, dout: usize) -> usize {
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        {
            // One 32×32 block of bf16 pairs per 32 rows and 32 columns, as
            // `PackedB` lays them out (2 KB); forward and backward alike.
            let blocks = din.div_ceil(32) * dout.div_ceil(32);
            let per = |k: usize, n: usize| if bf16_product(16, k, n) { blocks * 2048 } else { 0 };
            per(din, dout) + per(dout, din)
        }
        #[cfg(not(all(feature = "std", target_arch = "x86_64")))]
        {
            let _ = (din, dout);
            0
        }
    }

    /// Bytes the packs hold (0 until a bf16 product builds them).
    pub(crate) fn bytes(&self) -> usize {
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        {
            [&self.fwd, &self.bwd].iter().filter_map(|p| p.get()).map(|p| p.bytes()).sum()
        }
        #[cfg(not(all(feature = "std", target_arch = "x86_64")))]
        0
    }

    /// Bytes of GPU memory `W0`'s resident copy takes (0 without one).
    pub(crate) fn device_bytes(&self) -> usize {
        #[cfg(feature = "std")]
        {
            self.gpu.device_bytes()
        }
        #[cfg(not(feature = "std"))]
        0
    }
}

impl core::fmt::Debug for Packs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Packs({} bytes, {} on the GPU)", self.bytes(), self.device_bytes())
    }
}

/// The pack of `W0` (out×in) for one direction, built on first use:
/// forward packs `Wᵀ` (k = in, n = out), backward `W` (k = out, n = in).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
fn pack<'p>(
    k: &Kernels,
    w: &Weights,
    slot: &'p std::sync::OnceLock<crate::kernels::PackedB>,
    forward: bool,
    din: usize,
    dout: usize,
) -> &'p crate::kernels::PackedB {
    slot.get_or_init(|| {
        let widened;
        let w32: &[f32] = match w {
            Weights::F32(w) => w,
            Weights::F16(_) => {
                widened = w.to_f32(k);
                &widened
            }
        };
        assert!(w32.len() >= din * dout, "pack: W0 shape");
        // SAFETY: only reached with bf16 products on (AMX available); W0 is
        // out×in row-major, so both views stay inside it.
        unsafe {
            if forward {
                crate::kernels::PackedB::new(din, dout, w32.as_ptr(), (1, din))
            } else {
                crate::kernels::PackedB::new(dout, din, w32.as_ptr(), (din, 1))
            }
        }
    })
}

#[cfg(feature = "std")]
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint blocks of one output matrix to pool tasks.
#[cfg(feature = "std")]
unsafe impl Send for SendPtr {}
// SAFETY: as above.
#[cfg(feature = "std")]
unsafe impl Sync for SendPtr {}

/// The product on bf16 units when `bf16` (only ever true where
/// `runtime::bf16_products` is), else on the tier's f32 sgemm.
///
/// # Safety
/// Every element `A[i·rsa + p·csa]`, `B[p·rsb + j·csb]` and `C[i·rsc + j]`
/// for `i < m`, `p < k`, `j < n` must be valid, and C must not alias A or B.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_raw(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    (rsa, csa): (usize, usize),
    b: *const f32,
    (rsb, csb): (usize, usize),
    beta: f32,
    c: *mut f32,
    rsc: usize,
    bf16: bool,
) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if bf16 {
        // SAFETY: bf16 is only set where AMX is available (runtime); the
        // caller's bounds are the kernel's.
        unsafe {
            crate::kernels::amx_gemm(
                m,
                k,
                n,
                alpha,
                a,
                (rsa, csa),
                b,
                (rsb, csb),
                beta,
                c,
                rsc,
                None,
            )
        };
        return;
    }
    #[cfg(not(all(feature = "std", target_arch = "x86_64")))]
    let _ = bf16;
    let kernels = crate::kernels::active();
    if kernels.tier().has_fast_sgemm() {
        // SAFETY: the caller's contract is the kernel's.
        unsafe {
            (kernels.sgemm)(
                m,
                k,
                n,
                alpha,
                a,
                (rsa, csa),
                b,
                (rsb, csb),
                beta,
                c,
                rsc,
                core::ptr::null(),
            )
        };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a,
            rsa as isize,
            csa as isize,
            b,
            rsb as isize,
            csb as isize,
            beta,
            c,
            rsc as isize,
            1,
        )
    }
}

/// Shapes `(m, k, n)` of every dense product while recording (benchmarks
/// replay them to compare the tail with plain sgemm on the same work).
#[cfg(feature = "std")]
static GEMM_LOG: std::sync::Mutex<Option<Vec<(usize, usize, usize)>>> = std::sync::Mutex::new(None);

/// Whether [`GEMM_LOG`] records: checked without the lock on every product.
#[cfg(feature = "std")]
static RECORDING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

#[cfg(feature = "std")]
pub(crate) fn record_gemm(m: usize, k: usize, n: usize) {
    if !RECORDING.load(core::sync::atomic::Ordering::Relaxed) {
        return;
    }
    if let Ok(mut g) = GEMM_LOG.lock()
        && let Some(v) = g.as_mut()
    {
        v.push((m, k, n));
    }
}

/// Starts (`true`) or stops recording the shapes of dense products; stopping
/// returns what was recorded since the start.
#[cfg(feature = "std")]
pub fn record_gemm_shapes(on: bool) -> Vec<(usize, usize, usize)> {
    let mut g = GEMM_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let old = g.take().unwrap_or_default();
    if on {
        *g = Some(Vec::new());
    }
    RECORDING.store(on, core::sync::atomic::Ordering::Relaxed);
    old
}

/// Rows of an f16 `W` widened per panel: about 256 KB of f32, so a panel
/// stays in cache while the product streams over it.
fn panel_rows(din: usize) -> usize {
    ((1usize << 16) / din.max(1)).clamp(8, 1024) / 8 * 8
}

/// `Y[n×out] = X[n×in]·Wᵀ + beta·Y` (W out×in in its storage type). f16
/// weights are an f16 GEMM: widened one panel of rows at a time into a small
/// reused buffer, never into a full f32 copy, and never kept.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_x_wt(
    k: &Kernels,
    w: &Weights,
    x: &[f32],
    y: &mut [f32],
    n: usize,
    din: usize,
    dout: usize,
    beta: f32,
) {
    match w {
        Weights::F32(w) => gemm(n, din, dout, 1.0, x, (din, 1), w, (1, din), beta, y),
        Weights::F16(h) => {
            let p = panel_rows(din);
            let mut panel = alloc::vec![0.0f32; p.min(dout) * din];
            for j0 in (0..dout).step_by(p) {
                let rows = p.min(dout - j0);
                let buf = &mut panel[..rows * din];
                k.f16_to_f32(&h[j0 * din..(j0 + rows) * din], buf);
                gemm_c(n, din, rows, 1.0, x, (din, 1), buf, (1, din), beta, &mut y[j0..], dout);
            }
        }
    }
}

/// `dX[n×in] = dY[n×out]·W + beta·dX`, f16 weights widened per panel of
/// rows (the panels split the inner dimension; they accumulate into dX).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_dy_w(
    k: &Kernels,
    w: &Weights,
    dy: &[f32],
    dx: &mut [f32],
    n: usize,
    din: usize,
    dout: usize,
    beta: f32,
) {
    match w {
        Weights::F32(w) => gemm(n, dout, din, 1.0, dy, (dout, 1), w, (din, 1), beta, dx),
        Weights::F16(h) => {
            let p = panel_rows(din);
            let mut panel = alloc::vec![0.0f32; p.min(dout) * din];
            for (i, j0) in (0..dout).step_by(p).enumerate() {
                let rows = p.min(dout - j0);
                let buf = &mut panel[..rows * din];
                k.f16_to_f32(&h[j0 * din..(j0 + rows) * din], buf);
                let b = if i == 0 { beta } else { 1.0 };
                gemm(n, rows, din, 1.0, &dy[j0..], (dout, 1), buf, (din, 1), b, dx);
            }
            if dout == 0 && beta == 0.0 {
                dx.fill(0.0);
            }
        }
    }
}

/// Whether a frozen product `m×k·k×n` runs on AMX with packed weights into
/// a fresh output (bf16 products on, no GPU).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
fn amx_frozen(m: usize, k: usize, n: usize) -> bool {
    bf16_product(m, k, n) && crate::device::device() == crate::device::Device::Cpu
}

/// `Y[n×out] = X[n×in]·W0ᵀ (+ b)` for a frozen layer (a bias whose length
/// is not `out` is no bias); with bf16 products, on `packs`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn frozen_forward(
    k: &Kernels,
    w: &Weights,
    packs: &Packs,
    b: Option<&[f32]>,
    x: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    let b = b.filter(|b| b.len() == dout);
    #[cfg(feature = "std")]
    {
        if let Some(y) =
            crate::device::try_frozen(&packs.gpu, || w.for_gpu(), true, n, din, dout, x, b)
        {
            record_gemm(n, din, dout);
            return y;
        }
        crate::device::on_cpu(|| frozen_forward_cpu(k, w, packs, b, x, n, din, dout))
    }
    #[cfg(not(feature = "std"))]
    frozen_forward_cpu(k, w, packs, b, x, n, din, dout)
}

/// [`frozen_forward`] on the CPU (the bias already matched to `out`).
#[allow(clippy::too_many_arguments)]
fn frozen_forward_cpu(
    k: &Kernels,
    w: &Weights,
    packs: &Packs,
    b: Option<&[f32]>,
    x: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    #[cfg(not(all(feature = "std", target_arch = "x86_64")))]
    let _ = packs;
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if amx_frozen(n, din, dout) {
        let p = pack(k, w, &packs.fwd, true, din, dout);
        return amx_new(x, n, p, b);
    }
    #[cfg(feature = "std")]
    if let (true, Weights::F32(w)) = (sgemm_frozen(w), w) {
        return sgemm_new((n, din, dout), x, w, (1, din), b);
    }
    let (mut y, beta) = bias_rows(b, n, dout);
    gemm_x_wt(k, w, x, &mut y, n, din, dout, beta);
    y
}

/// `n` rows of the bias (`β = 1` for the product that adds to them), or `n`
/// rows of zeros (`β = 0`): the bias goes in with the product's own store,
/// not in a second pass over the output.
pub(crate) fn bias_rows(b: Option<&[f32]>, n: usize, dout: usize) -> (Vec<f32>, f32) {
    match b {
        Some(b) if b.len() == dout && dout > 0 => {
            let mut y = Vec::with_capacity(n * dout);
            for _ in 0..n {
                y.extend_from_slice(b);
            }
            (y, 1.0)
        }
        _ => (alloc::vec![0.0f32; n * dout], 0.0),
    }
}

/// `dX[n×in] = dY[n×out]·W0` for a frozen layer (with bf16 products, on
/// `packs` into a fresh matrix, never zeroed).
#[allow(clippy::too_many_arguments)]
pub(crate) fn frozen_backward(
    k: &Kernels,
    w: &Weights,
    packs: &Packs,
    dy: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    #[cfg(feature = "std")]
    {
        if let Some(dx) =
            crate::device::try_frozen(&packs.gpu, || w.for_gpu(), false, n, din, dout, dy, None)
        {
            record_gemm(n, dout, din);
            return dx;
        }
        crate::device::on_cpu(|| frozen_backward_cpu(k, w, packs, dy, n, din, dout))
    }
    #[cfg(not(feature = "std"))]
    frozen_backward_cpu(k, w, packs, dy, n, din, dout)
}

/// [`frozen_backward`] on the CPU.
fn frozen_backward_cpu(
    k: &Kernels,
    w: &Weights,
    packs: &Packs,
    dy: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    #[cfg(not(all(feature = "std", target_arch = "x86_64")))]
    let _ = packs;
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if amx_frozen(n, dout, din) {
        let p = pack(k, w, &packs.bwd, false, din, dout);
        return amx_new(dy, n, p, None);
    }
    #[cfg(feature = "std")]
    if let (true, Weights::F32(w)) = (sgemm_frozen(w), w) {
        return sgemm_new((n, dout, din), dy, w, (din, 1), None);
    }
    let mut dx = alloc::vec![0.0f32; n * din];
    gemm_dy_w(k, w, dy, &mut dx, n, din, dout, 0.0);
    dx
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    /// The frozen f32 products into fresh matrices (the bias as the sums'
    /// start, nothing zeroed) give the bits of the plain route — bias rows
    /// then a β = 1 product, zeros then a β = 0 product — on edge shapes,
    /// split over the pool along rows and along columns.
    #[test]
    fn fresh_frozen_products_equal_the_plain_route() {
        let k = crate::kernels::active();
        let mut rng = crate::rng::Rng::new(4);
        let mut v = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
        let _g = crate::parallel::TEST_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        for threads in [1, 2] {
            crate::parallel::set_threads(threads).unwrap();
            for (n, din, dout) in [(37, 45, 70), (150, 100, 170), (300, 80, 90)] {
                let (x, w, b, dy) = (v(n * din), v(dout * din), v(dout), v(n * dout));
                let packs = Packs::default();
                let w32 = Weights::F32(w.clone());
                for bias in [Some(&b[..]), None] {
                    let got = frozen_forward(k, &w32, &packs, bias, &x, n, din, dout);
                    let (mut want, beta) = bias_rows(bias, n, dout);
                    gemm(n, din, dout, 1.0, &x, (din, 1), &w, (1, din), beta, &mut want);
                    assert_eq!(got, want, "{n}×{din}→{dout}, bias {}", bias.is_some());
                }
                let got = frozen_backward(k, &w32, &packs, &dy, n, din, dout);
                let mut want = vec![0.0f32; n * din];
                gemm(n, dout, din, 1.0, &dy, (dout, 1), &w, (din, 1), 0.0, &mut want);
                assert_eq!(got, want, "{n}×{din}→{dout} backward");
            }
        }
        crate::parallel::set_threads(1).unwrap();
    }

    /// f16 weights through the panel GEMMs equal f32 products of the same
    /// (f16-rounded) weights, across several panels and a short last one.
    #[test]
    fn f16_panel_products_match_the_widened_weights() {
        let k = crate::kernels::active();
        let (n, din, dout) = (5, 40, 3 * panel_rows(40) + 7);
        let mut rng = crate::rng::Rng::new(9);
        let mut v = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
        let (x, dy, w) = (v(n * din), v(n * dout), v(dout * din));
        let mut h = vec![f16::ZERO; w.len()];
        k.f32_to_f16(&w, &mut h);
        let (w16, w32) =
            (Weights::F16(h.clone()), Weights::F32(h.iter().map(|v| v.to_f32()).collect()));
        let close = |a: &[f32], b: &[f32]| {
            a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs()))
        };
        let (mut y16, mut y32) = (vec![0.5f32; n * dout], vec![0.5f32; n * dout]);
        gemm_x_wt(k, &w16, &x, &mut y16, n, din, dout, 1.0);
        gemm_x_wt(k, &w32, &x, &mut y32, n, din, dout, 1.0);
        assert!(close(&y16, &y32));
        let (mut d16, mut d32) = (vec![0.25f32; n * din], vec![0.25f32; n * din]);
        gemm_dy_w(k, &w16, &dy, &mut d16, n, din, dout, 1.0);
        gemm_dy_w(k, &w32, &dy, &mut d32, n, din, dout, 1.0);
        assert!(close(&d16, &d32));
        gemm_dy_w(k, &w16, &dy, &mut d16, n, din, dout, 0.0);
        gemm_dy_w(k, &w32, &dy, &mut d32, n, din, dout, 0.0);
        assert!(close(&d16, &d32));
    }
}
