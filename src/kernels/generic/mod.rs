//! The kernel bodies, written once over [`Simd`] and instantiated per tier.
//!
//! Three register-blocked shapes cover every kernel:
//! - **dot** (`down`): each output is a dot product along the wide dimension;
//!   an `MR×KR` tile of outputs keeps `MR·KR` independent accumulators.
//! - **nn** (`up`, `grad_x`, `merge`): `Y[i, j] += s·Σ_k U[i, k]·M[k, j]`,
//!   vectorised along the wide `j`; a rank-r "inner" loop of broadcasts.
//!   `up` needs `M = Bᵀ`, built 64 columns at a time in a stack buffer.
//! - **tn** (`grad_a`, `grad_b`): `O[k, j] += s·Σ_i P[i, k]·X[i, j]`, vectorised
//!   along the wide `j`; `grad_b` computes `dBᵀ` this way, 64 columns at a time.
//! - **vr** (`grad_u`): vectorised along the rank; the rank-wide rows
//!   of the right operand are copied, zero-padded to whole vectors, into a
//!   stack block so the inner loop never needs a partial load.
//!
//! Columns that do not fill a vector are finished by a scalar loop in f32 (or
//! by a lane buffer where rounding must match the vector path bit for bit).
//!
//! Every function here is `unsafe`: callers guarantee the tier's features and
//! the slice shapes (checked in `kernels::Kernels`).

mod gemm;
mod outer;

pub(crate) use gemm::sgemm;

pub(crate) use outer::{grad_a, grad_b, grad_u};

use super::MAX_RANK;
use super::simd::{Elem, Simd, vload_partial, vstore_partial};

/// Bulk conversion between storage types through the tier's vector path.
///
/// # Safety
/// Tier features available; `src.len() == dst.len()`.
#[inline(always)]
pub(crate) unsafe fn convert<S: Simd, A: Elem, B: Elem>(src: &[A], dst: &mut [B]) {
    let n = src.len();
    let l = S::LANES;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    // SAFETY: every access is below `n`; lengths are equal.
    unsafe {
        while i + 4 * l <= n {
            let v0 = A::vload::<S>(sp.add(i));
            let v1 = A::vload::<S>(sp.add(i + l));
            let v2 = A::vload::<S>(sp.add(i + 2 * l));
            let v3 = A::vload::<S>(sp.add(i + 3 * l));
            B::vstore::<S>(dp.add(i), v0);
            B::vstore::<S>(dp.add(i + l), v1);
            B::vstore::<S>(dp.add(i + 2 * l), v2);
            B::vstore::<S>(dp.add(i + 3 * l), v3);
            i += 4 * l;
        }
        while i + l <= n {
            B::vstore::<S>(dp.add(i), A::vload::<S>(sp.add(i)));
            i += l;
        }
        if i < n {
            // The tail goes through the same instructions as the body, so a
            // value converts identically wherever it sits in the slice.
            let v = vload_partial::<S, A>(sp.add(i), n - i);
            vstore_partial::<S, B>(dp.add(i), v, n - i);
        }
    }
}

/// `U[n×r] = X[n×d]·Aᵀ`.
///
/// # Safety
/// Tier features; `x: n×d`, `a: r×d`, `u: n×r`.
#[inline(always)]
pub(crate) unsafe fn down<S: Simd, X: Elem, const MR: usize, const KR: usize>(
    x: &[X],
    a: &[f32],
    u: &mut [f32],
    n: usize,
    d: usize,
    r: usize,
) {
    let (xp, ap, up) = (x.as_ptr(), a.as_ptr(), u.as_mut_ptr());
    let mut i = 0;
    // SAFETY: tiles stay inside the shapes the caller guarantees.
    unsafe {
        while i + MR <= n {
            down_rows::<S, X, MR, KR>(xp, ap, up, i, d, r);
            i += MR;
        }
        while i < n {
            down_rows::<S, X, 1, KR>(xp, ap, up, i, d, r);
            i += 1;
        }
    }
}

#[inline(always)]
unsafe fn down_rows<S: Simd, X: Elem, const MR: usize, const KR: usize>(
    x: *const X,
    a: *const f32,
    u: *mut f32,
    i0: usize,
    d: usize,
    r: usize,
) {
    let mut k = 0;
    // SAFETY: forwarded.
    unsafe {
        while k + KR <= r {
            down_tile::<S, X, MR, KR>(x, a, u, i0, k, d, r);
            k += KR;
        }
        while k + 2 <= r {
            down_tile::<S, X, MR, 2>(x, a, u, i0, k, d, r);
            k += 2;
        }
        while k < r {
            down_tile::<S, X, MR, 1>(x, a, u, i0, k, d, r);
            k += 1;
        }
    }
}

#[inline(always)]
unsafe fn down_tile<S: Simd, X: Elem, const MR: usize, const KR: usize>(
    x: *const X,
    a: *const f32,
    u: *mut f32,
    i0: usize,
    k0: usize,
    d: usize,
    r: usize,
) {
    let l = S::LANES;
    // SAFETY: rows i0..i0+MR < n and k0..k0+KR ≤ r; columns stay below d.
    unsafe {
        let mut acc = [[S::zero(); KR]; MR];
        let mut j = 0;
        while j + l <= d {
            let mut av = [S::zero(); KR];
            for (kk, v) in av.iter_mut().enumerate() {
                *v = S::load(a.add((k0 + kk) * d + j));
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                let xv = X::vload::<S>(x.add((i0 + ii) * d + j));
                for (c, &av) in row.iter_mut().zip(av.iter()) {
                    *c = S::fma(xv, av, *c);
                }
            }
            j += l;
        }
        for (ii, row) in acc.iter().enumerate() {
            for (kk, &c) in row.iter().enumerate() {
                let mut sum = S::hsum(c);
                for jj in j..d {
                    sum += (*x.add((i0 + ii) * d + jj)).to_f32() * *a.add((k0 + kk) * d + jj);
                }
                *u.add((i0 + ii) * r + k0 + kk) = sum;
            }
        }
    }
}

/// `Y[i, j] += s·Σ_k U[i, k]·M[k, j]` for `i < n`, `j < w`, with row strides
/// `ldy`, `ldu`, `ldm`.
///
/// # Safety
/// Tier features; every addressed element in bounds.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn nn<S: Simd, Y: Elem, const MR: usize, const NV: usize>(
    y: *mut Y,
    ldy: usize,
    u: *const f32,
    ldu: usize,
    m: *const f32,
    ldm: usize,
    n: usize,
    w: usize,
    r: usize,
    s: f32,
) {
    let l = S::LANES;
    let mut i = 0;
    // SAFETY: forwarded; each tile is inside `n × w`.
    unsafe {
        while i < n {
            let rows = if i + MR <= n { MR } else { 1 };
            let mut j = 0;
            while j + NV * l <= w {
                if rows == MR {
                    nn_tile::<S, Y, MR, NV>(y, ldy, u, ldu, m, ldm, i, j, r, s);
                } else {
                    nn_tile::<S, Y, 1, NV>(y, ldy, u, ldu, m, ldm, i, j, r, s);
                }
                j += NV * l;
            }
            while j + l <= w {
                if rows == MR {
                    nn_tile::<S, Y, MR, 1>(y, ldy, u, ldu, m, ldm, i, j, r, s);
                } else {
                    nn_tile::<S, Y, 1, 1>(y, ldy, u, ldu, m, ldm, i, j, r, s);
                }
                j += l;
            }
            for ii in i..i + rows {
                for jj in j..w {
                    let yp = y.add(ii * ldy + jj);
                    let mut acc = (*yp).to_f32();
                    for k in 0..r {
                        acc += s * *u.add(ii * ldu + k) * *m.add(k * ldm + jj);
                    }
                    *yp = Y::from_f32(acc);
                }
            }
            i += rows;
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn nn_tile<S: Simd, Y: Elem, const MR: usize, const NV: usize>(
    y: *mut Y,
    ldy: usize,
    u: *const f32,
    ldu: usize,
    m: *const f32,
    ldm: usize,
    i0: usize,
    j0: usize,
    r: usize,
    s: f32,
) {
    let l = S::LANES;
    // SAFETY: the tile `i0..i0+MR × j0..j0+NV·l` is in bounds (caller).
    unsafe {
        let mut acc = [[S::zero(); NV]; MR];
        for (ii, row) in acc.iter_mut().enumerate() {
            for (v, c) in row.iter_mut().enumerate() {
                *c = Y::vload::<S>(y.add((i0 + ii) * ldy + j0 + v * l));
            }
        }
        for k in 0..r {
            let mut mv = [S::zero(); NV];
            for (v, mvv) in mv.iter_mut().enumerate() {
                *mvv = S::load(m.add(k * ldm + j0 + v * l));
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                let uv = S::splat(s * *u.add((i0 + ii) * ldu + k));
                for (c, &mvv) in row.iter_mut().zip(mv.iter()) {
                    *c = S::fma(uv, mvv, *c);
                }
            }
        }
        for (ii, row) in acc.iter().enumerate() {
            for (v, &c) in row.iter().enumerate() {
                Y::vstore::<S>(y.add((i0 + ii) * ldy + j0 + v * l), c);
            }
        }
    }
}

/// Columns of `Bᵀ` built per block of `up`.
const UP_BLOCK: usize = 64;

/// `Y[n×m] += s·U[n×r]·Bᵀ`, `B` m×r.
///
/// # Safety
/// Tier features; shapes as documented, `r ≤ MAX_RANK`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn up<S: Simd, const MR: usize, const NV: usize>(
    u: &[f32],
    b: &[f32],
    y: &mut [f32],
    s: f32,
    n: usize,
    m: usize,
    r: usize,
) {
    debug_assert!(r <= MAX_RANK);
    let mut bt = [0.0f32; MAX_RANK * UP_BLOCK];
    let mut c0 = 0;
    while c0 < m {
        let w = UP_BLOCK.min(m - c0);
        for k in 0..r {
            for c in 0..w {
                bt[k * UP_BLOCK + c] = b[(c0 + c) * r + k];
            }
        }
        // SAFETY: `Y[:, c0..c0+w]` and `bt[..r][..w]` are in bounds.
        unsafe {
            nn::<S, f32, MR, NV>(
                y.as_mut_ptr().add(c0),
                m,
                u.as_ptr(),
                r,
                bt.as_ptr(),
                UP_BLOCK,
                n,
                w,
                r,
                s,
            );
        }
        c0 += w;
    }
}

/// `dX[n×d] += s·dU[n×r]·A[r×d]`.
///
/// # Safety
/// Tier features; shapes as documented.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn grad_x<S: Simd, const MR: usize, const NV: usize>(
    du: &[f32],
    a: &[f32],
    dx: &mut [f32],
    s: f32,
    n: usize,
    d: usize,
    r: usize,
) {
    // SAFETY: shapes guaranteed by the caller.
    unsafe { nn::<S, f32, MR, NV>(dx.as_mut_ptr(), d, du.as_ptr(), r, a.as_ptr(), d, n, d, r, s) }
}

/// `W[m×d] += s·B[m×r]·A[r×d]`, W stored f32 or f16 (rounded once per element).
///
/// # Safety
/// Tier features; shapes as documented.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn merge<S: Simd, W: Elem, const MR: usize, const NV: usize>(
    b: &[f32],
    a: &[f32],
    w: &mut [W],
    s: f32,
    m: usize,
    d: usize,
    r: usize,
) {
    // SAFETY: shapes guaranteed by the caller.
    unsafe { nn::<S, W, MR, NV>(w.as_mut_ptr(), d, b.as_ptr(), r, a.as_ptr(), d, m, d, r, s) }
}
