//! The kernel bodies, written once over [`Simd`] and instantiated per tier.
//!
//! Three register-blocked shapes cover every kernel:
//! - **dot** (`down`): each output is a dot product along the wide dimension;
//!   an `MR×KR` tile of outputs keeps `MR·KR` independent accumulators.
//! - **nn** (`up`, `grad_x`, `merge`): `Y[i, j] += s·Σ_k U[i, k]·M[k, j]`,
//!   vectorised along the wide `j`; a rank-r "inner" loop of broadcasts.
//!   `up` needs `M = Bᵀ`, built 64 columns at a time in a stack buffer.
//! - **tn** (`grad_a`): `dA[k, j] += s·Σ_i P[i, k]·X[i, j]`, vectorised along `j`.
//! - **vr** (`grad_u`, `grad_b`): vectorised along the rank; the rank-wide rows
//!   of the right operand are copied, zero-padded to whole vectors, into a
//!   stack block so the inner loop never needs a partial load.
//!
//! Columns that do not fill a vector are finished by a scalar loop in f32 (or
//! by a lane buffer where rounding must match the vector path bit for bit).
//!
//! Every function here is `unsafe`: callers guarantee the tier's features and
//! the slice shapes (checked in `kernels::Kernels`).

use super::MAX_RANK;
use super::simd::{Elem, MAX_LANES, Simd, vload_partial, vstore_partial};

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

/// `dA[r×d] += s·dUᵀ·X`, `dU` n×r, `X` n×d.
///
/// # Safety
/// Tier features; shapes as documented.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn grad_a<S: Simd, X: Elem, const KR: usize, const NV: usize>(
    du: &[f32],
    x: &[X],
    da: &mut [f32],
    s: f32,
    n: usize,
    d: usize,
    r: usize,
) {
    let l = S::LANES;
    let (pp, xp, ap) = (du.as_ptr(), x.as_ptr(), da.as_mut_ptr());
    // SAFETY: every tile is inside `r × d`; rows of X below n.
    unsafe {
        let mut j = 0;
        // Column strips outermost: a strip of X (n rows × NV·l) stays in
        // cache while every block of ranks sweeps it.
        while j < d {
            let width = if j + NV * l <= d {
                NV * l
            } else if j + l <= d {
                l
            } else {
                d - j
            };
            let mut k = 0;
            while k < r {
                let ranks = if k + KR <= r { KR } else { 1 };
                match (ranks == KR, width) {
                    (true, wd) if wd == NV * l => tn_tile::<S, X, KR, NV>(pp, xp, ap, s, n, d, r, k, j),
                    (false, wd) if wd == NV * l => tn_tile::<S, X, 1, NV>(pp, xp, ap, s, n, d, r, k, j),
                    (true, wd) if wd == l => tn_tile::<S, X, KR, 1>(pp, xp, ap, s, n, d, r, k, j),
                    (false, wd) if wd == l => tn_tile::<S, X, 1, 1>(pp, xp, ap, s, n, d, r, k, j),
                    _ => {
                        for kk in k..k + ranks {
                            for jj in j..j + width {
                                let mut acc = 0.0f32;
                                for i in 0..n {
                                    acc += *pp.add(i * r + kk) * (*xp.add(i * d + jj)).to_f32();
                                }
                                *ap.add(kk * d + jj) += s * acc;
                            }
                        }
                    }
                }
                k += ranks;
            }
            j += width;
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tn_tile<S: Simd, X: Elem, const KR: usize, const NV: usize>(
    p: *const f32,
    x: *const X,
    da: *mut f32,
    s: f32,
    n: usize,
    d: usize,
    r: usize,
    k0: usize,
    j0: usize,
) {
    let l = S::LANES;
    // SAFETY: the tile `k0..k0+KR × j0..j0+NV·l` is in bounds (caller).
    unsafe {
        let mut acc = [[S::zero(); NV]; KR];
        for i in 0..n {
            let mut xv = [S::zero(); NV];
            for (v, xvv) in xv.iter_mut().enumerate() {
                *xvv = X::vload::<S>(x.add(i * d + j0 + v * l));
            }
            for (kk, row) in acc.iter_mut().enumerate() {
                let pv = S::splat(*p.add(i * r + k0 + kk));
                for (c, &xvv) in row.iter_mut().zip(xv.iter()) {
                    *c = S::fma(pv, xvv, *c);
                }
            }
        }
        let sv = S::splat(s);
        for (kk, row) in acc.iter().enumerate() {
            for (v, &c) in row.iter().enumerate() {
                let dst = da.add((k0 + kk) * d + j0 + v * l);
                S::store(dst, S::fma(sv, c, S::load(dst)));
            }
        }
    }
}

/// Stack block for the zero-padded rank-wide rows of `vr` (16 KiB).
const VR_BLOCK: usize = 4096;

/// `Out[o, :r] += s·Σ_t Q[o·qo + t·qt]·R[t, :r]` for `o < nout`, `t < nterms`.
///
/// # Safety
/// Tier features; `out: nout×r`, `rr: nterms×r`, Q addresses in bounds.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn vr<S: Simd, const OR1: usize, const OR4: usize>(
    out: *mut f32,
    q: *const f32,
    qo: usize,
    qt: usize,
    rr: *const f32,
    nout: usize,
    nterms: usize,
    r: usize,
    s: f32,
) {
    let l = S::LANES;
    let nvec = r.div_ceil(l);
    let rpad = nvec * l;
    let tb = VR_BLOCK / rpad;
    let mut buf = [0.0f32; VR_BLOCK];
    let mut t0 = 0;
    // SAFETY: `buf` holds `tb` padded rows; tiles stay inside `nout × r`.
    unsafe {
        while t0 < nterms {
            let nt = tb.min(nterms - t0);
            for t in 0..nt {
                let src = rr.add((t0 + t) * r);
                let dst = buf.as_mut_ptr().add(t * rpad);
                core::ptr::copy_nonoverlapping(src, dst, r);
                core::ptr::write_bytes(dst.add(r), 0, rpad - r);
            }
            let block = VrBlock { out, q, qo, qt, buf: buf.as_ptr(), rpad, r, t0, nt, s };
            let mut v = 0;
            while v < nvec {
                let four = v + 4 <= nvec;
                let mut o = 0;
                while o < nout {
                    if four && o + OR4 <= nout {
                        block.tile::<S, OR4, 4>(o, v);
                        o += OR4;
                    } else if four {
                        block.tile::<S, 1, 4>(o, v);
                        o += 1;
                    } else if o + OR1 <= nout {
                        block.tile::<S, OR1, 1>(o, v);
                        o += OR1;
                    } else {
                        block.tile::<S, 1, 1>(o, v);
                        o += 1;
                    }
                }
                v += if four { 4 } else { 1 };
            }
            t0 += nt;
        }
    }
}

/// One block of terms of [`vr`], with its padded right operand.
struct VrBlock {
    out: *mut f32,
    q: *const f32,
    qo: usize,
    qt: usize,
    buf: *const f32,
    rpad: usize,
    r: usize,
    t0: usize,
    nt: usize,
    s: f32,
}

impl VrBlock {
    /// Outputs `o0..o0+OR`, rank vectors `v0..v0+NV`.
    #[inline(always)]
    unsafe fn tile<S: Simd, const OR: usize, const NV: usize>(&self, o0: usize, v0: usize) {
        let l = S::LANES;
        // SAFETY: outputs and vectors in range (caller); partial lanes masked.
        unsafe {
            let mut acc = [[S::zero(); NV]; OR];
            for t in 0..self.nt {
                let mut rv = [S::zero(); NV];
                for (v, rvv) in rv.iter_mut().enumerate() {
                    *rvv = S::load(self.buf.add(t * self.rpad + (v0 + v) * l));
                }
                for (oo, row) in acc.iter_mut().enumerate() {
                    let qv = *self.q.add((o0 + oo) * self.qo + (self.t0 + t) * self.qt);
                    let qv = S::splat(qv);
                    for (c, &rvv) in row.iter_mut().zip(rv.iter()) {
                        *c = S::fma(qv, rvv, *c);
                    }
                }
            }
            let sv = S::splat(self.s);
            for (oo, row) in acc.iter().enumerate() {
                for (v, &c) in row.iter().enumerate() {
                    let col = (v0 + v) * l;
                    let dst = self.out.add((o0 + oo) * self.r + col);
                    let width = l.min(self.r - col);
                    if width == l {
                        S::store(dst, S::fma(sv, c, S::load(dst)));
                    } else {
                        let old = vload_partial::<S, f32>(dst, width);
                        vstore_partial::<S, f32>(dst, S::fma(sv, c, old), width);
                    }
                }
            }
        }
    }
}

/// `dU[n×r] = dY[n×m]·B[m×r]`.
///
/// # Safety
/// Tier features; shapes as documented.
#[inline(always)]
pub(crate) unsafe fn grad_u<S: Simd, const OR1: usize, const OR4: usize>(
    dy: &[f32],
    b: &[f32],
    du: &mut [f32],
    n: usize,
    m: usize,
    r: usize,
) {
    du.fill(0.0);
    // SAFETY: out = dU (n×r), Q(o=i, t=c) = dY[i·m + c], R = B (m×r).
    unsafe { vr::<S, OR1, OR4>(du.as_mut_ptr(), dy.as_ptr(), m, 1, b.as_ptr(), n, m, r, 1.0) }
}

/// `dB[m×r] += s·dYᵀ·U`, `dY` n×m, `U` n×r.
///
/// # Safety
/// Tier features; shapes as documented.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn grad_b<S: Simd, const OR1: usize, const OR4: usize>(
    dy: &[f32],
    u: &[f32],
    db: &mut [f32],
    s: f32,
    n: usize,
    m: usize,
    r: usize,
) {
    // SAFETY: out = dB (m×r), Q(o=c, t=i) = dY[i·m + c], R = U (n×r).
    unsafe { vr::<S, OR1, OR4>(db.as_mut_ptr(), dy.as_ptr(), 1, m, u.as_ptr(), m, n, r, s) }
}

// The padded rows of `vr` are at most MAX_RANK wide, so a block holds at least 64 of them.
const _: () = assert!(VR_BLOCK >= 64 * MAX_RANK && MAX_RANK % MAX_LANES == 0);
