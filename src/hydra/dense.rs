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
pub(crate) fn gemm(
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
    // SAFETY: the asserts above bound every element the strides can reach.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
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
