//! The frozen layer's own products (`x·W0ᵀ`, `dy·W0`) — large and dense, so
//! they go to `matrixmultiply` — and the storage of `W0` (f32 or f16).

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

    /// Whether every element is finite.
    pub fn all_finite(&self) -> bool {
        match self {
            Weights::F32(w) => w.iter().all(|v| v.is_finite()),
            Weights::F16(w) => w.iter().all(|v| v.is_finite()),
        }
    }

    /// Runs `f` on an f32 view, widening f16 storage into a temporary.
    pub(crate) fn with_f32<R>(&self, k: &Kernels, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            Weights::F32(w) => f(w),
            Weights::F16(_) => f(&self.to_f32(k)),
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
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
) {
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 }
    };
    assert!(a.len() >= extent(m, k, rsa, csa), "gemm: A too short");
    assert!(b.len() >= extent(k, n, rsb, csb), "gemm: B too short");
    assert_eq!(c.len(), m * n, "gemm: C shape");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(feature = "std")]
    {
        record_gemm(m, k, n);
        if crate::parallel::threads() > 1
            && m * k * n >= crate::parallel::MIN_PARALLEL_GEMM
            && !crate::parallel::in_worker()
        {
            let c_ptr = SendPtr(c.as_mut_ptr());
            // Cut along the longer output side; every element of C is still
            // computed by one sgemm with the same k-order, so the result does
            // not depend on the cut.
            let by_rows = m >= n;
            let parts = crate::parallel::ranges(if by_rows { m } else { n }, 8);
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
                            c.0.add(r.start * n),
                            n,
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
                            n,
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
            n,
        )
    }
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
) {
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

#[cfg(feature = "std")]
fn record_gemm(m: usize, k: usize, n: usize) {
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
    old
}

/// `Y[n×out] = X[n×in]·W0ᵀ (+ b)` for a frozen layer.
#[cfg(feature = "std")]
pub(crate) fn frozen_forward(
    k: &Kernels,
    w: &Weights,
    b: Option<&[f32]>,
    x: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    let mut y = alloc::vec![0.0f32; n * dout];
    w.with_f32(k, |w| gemm(n, din, dout, 1.0, x, (din, 1), w, (1, din), 0.0, &mut y));
    if let Some(b) = b {
        y.chunks_exact_mut(dout).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    y
}

/// `dX[n×in] = dY[n×out]·W0` for a frozen layer.
#[cfg(feature = "std")]
pub(crate) fn frozen_backward(
    k: &Kernels,
    w: &Weights,
    dy: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    let mut dx = alloc::vec![0.0f32; n * din];
    w.with_f32(k, |w| gemm(n, dout, din, 1.0, dy, (dout, 1), w, (din, 1), 0.0, &mut dx));
    dx
}
