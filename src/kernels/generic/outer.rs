//! The kernels whose reduction runs over the batch (`grad_a`, `grad_b`: the
//! **tn** shape) or over the wide dimension with rank-wide vectors
//! (`grad_u`: the **vr** shape); see the parent module for the overview.

use crate::kernels::MAX_RANK;
use crate::kernels::simd::{Elem, MAX_LANES, Simd, vload_partial, vstore_partial};

/// The operands of one **tn** product: `O[k, j] += s·Σ_i P[i, k]·X[i, j]`
/// for `k < r`, `j < w`, `i < n`, with row strides `ldp`, `ldx`, `ldo`.
struct Tn<X> {
    p: *const f32,
    ldp: usize,
    x: *const X,
    ldx: usize,
    o: *mut f32,
    ldo: usize,
    n: usize,
    w: usize,
    r: usize,
    s: f32,
}

impl<X: Elem> Tn<X> {
    /// Runs the product: ranks in groups of 4, then 2, then 1, each group
    /// with as many column vectors as keep the tier's accumulators busy
    /// (`NV4`, `NV2`, `NV1` vectors for 4, 2, 1 ranks), so that a rank-2
    /// adapter still has enough independent FMA chains.
    ///
    /// # Safety
    /// Tier features; every addressed element in bounds.
    #[inline(always)]
    unsafe fn run<S: Simd, const NV4: usize, const NV2: usize, const NV1: usize>(&self) {
        let l = S::LANES;
        let k4 = self.r / 4 * 4;
        // SAFETY: each tile covers ranks below r and columns below w.
        unsafe {
            // Column strips outermost for the groups of 4: a strip of X
            // (n rows × NV4 vectors) stays in cache while every group sweeps it.
            let mut j = 0;
            while k4 > 0 && j + NV4 * l <= self.w {
                for k in (0..k4).step_by(4) {
                    self.tile::<S, 4, NV4>(k, j);
                }
                j += NV4 * l;
            }
            while k4 > 0 && j + l <= self.w {
                for k in (0..k4).step_by(4) {
                    self.tile::<S, 4, 1>(k, j);
                }
                j += l;
            }
            self.scalar_cols(0, k4, j);
            let mut k = k4;
            if k + 2 <= self.r {
                self.group::<S, 2, NV2>(k);
                k += 2;
            }
            if k < self.r {
                self.group::<S, 1, NV1>(k);
            }
        }
    }

    /// Ranks `k0..k0+RT` (the 1 or 2 left over after the groups of 4) over
    /// every column: strips of `NV` vectors, then single vectors, then a scalar tail.
    #[inline(always)]
    unsafe fn group<S: Simd, const RT: usize, const NV: usize>(&self, k0: usize) {
        let l = S::LANES;
        let mut j = 0;
        // SAFETY: strips stay below `w`; the tail is scalar.
        unsafe {
            while j + NV * l <= self.w {
                self.tile::<S, RT, NV>(k0, j);
                j += NV * l;
            }
            while j + l <= self.w {
                self.tile::<S, RT, 1>(k0, j);
                j += l;
            }
            self.scalar_cols(k0, k0 + RT, j);
        }
    }

    /// Ranks `k0..k1`, columns `j0..w`, one element at a time.
    #[inline(always)]
    unsafe fn scalar_cols(&self, k0: usize, k1: usize, j0: usize) {
        // SAFETY: ranks below r, columns below w (caller).
        unsafe {
            for kk in k0..k1 {
                for jj in j0..self.w {
                    let mut acc = 0.0f32;
                    for i in 0..self.n {
                        acc += *self.p.add(i * self.ldp + kk)
                            * (*self.x.add(i * self.ldx + jj)).to_f32();
                    }
                    *self.o.add(kk * self.ldo + jj) += self.s * acc;
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<S: Simd, const RT: usize, const NV: usize>(&self, k0: usize, j0: usize) {
        let l = S::LANES;
        // SAFETY: the tile `k0..k0+RT × j0..j0+NV·l` is in bounds (caller).
        unsafe {
            let mut acc = [[S::zero(); NV]; RT];
            for i in 0..self.n {
                let mut xv = [S::zero(); NV];
                for (v, xvv) in xv.iter_mut().enumerate() {
                    *xvv = X::vload::<S>(self.x.add(i * self.ldx + j0 + v * l));
                }
                for (kk, row) in acc.iter_mut().enumerate() {
                    let pv = S::splat(*self.p.add(i * self.ldp + k0 + kk));
                    for (c, &xvv) in row.iter_mut().zip(xv.iter()) {
                        *c = S::fma(pv, xvv, *c);
                    }
                }
            }
            let sv = S::splat(self.s);
            for (kk, row) in acc.iter().enumerate() {
                for (v, &c) in row.iter().enumerate() {
                    let dst = self.o.add((k0 + kk) * self.ldo + j0 + v * l);
                    S::store(dst, S::fma(sv, c, S::load(dst)));
                }
            }
        }
    }
}

/// `dA[r×d] += s·dUᵀ·X`, `dU` n×r, `X` n×d.
///
/// # Safety
/// Tier features; shapes as documented.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn grad_a<
    S: Simd,
    X: Elem,
    const NV4: usize,
    const NV2: usize,
    const NV1: usize,
>(
    du: &[f32],
    x: &[X],
    da: &mut [f32],
    s: f32,
    n: usize,
    d: usize,
    r: usize,
) {
    let (p, ldp, x, ldx, o, ldo, w) = (du.as_ptr(), r, x.as_ptr(), d, da.as_mut_ptr(), d, d);
    // SAFETY: shapes guaranteed by the caller.
    unsafe { Tn { p, ldp, x, ldx, o, ldo, n, w, r, s }.run::<S, NV4, NV2, NV1>() }
}

/// Output columns of `dBᵀ` computed per block of `grad_b`.
const GB_BLOCK: usize = 64;

/// `dB[m×r] += s·dYᵀ·U`, `dY` n×m, `U` n×r.
///
/// Computed as `dBᵀ = s·Uᵀ·dY` with the **tn** product — vectorised along the
/// wide `m`, so every lane is used even at rank 1 or 2 — into a stack block of
/// 64 columns, then added back transposed.
///
/// # Safety
/// Tier features; shapes as documented.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn grad_b<S: Simd, const NV4: usize, const NV2: usize, const NV1: usize>(
    dy: &[f32],
    u: &[f32],
    db: &mut [f32],
    s: f32,
    n: usize,
    m: usize,
    r: usize,
) {
    debug_assert!(r <= MAX_RANK);
    let mut tmp = [0.0f32; MAX_RANK * GB_BLOCK];
    let mut c0 = 0;
    while c0 < m {
        let w = GB_BLOCK.min(m - c0);
        tmp[..r * GB_BLOCK].fill(0.0);
        let (p, ldp, o, ldo) = (u.as_ptr(), r, tmp.as_mut_ptr(), GB_BLOCK);
        // SAFETY: columns `c0..c0+w` of dY; `tmp` holds r×GB_BLOCK.
        unsafe {
            let x = dy.as_ptr().add(c0);
            Tn { p, ldp, x, ldx: m, o, ldo, n, w, r, s }.run::<S, NV4, NV2, NV1>();
        }
        for c in 0..w {
            for k in 0..r {
                db[(c0 + c) * r + k] += tmp[k * GB_BLOCK + c];
            }
        }
        c0 += w;
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

// The padded rows of `vr` are at most MAX_RANK wide, so a block holds at least 64 of them.
const _: () = assert!(VR_BLOCK >= 64 * MAX_RANK && MAX_RANK.is_multiple_of(MAX_LANES));
