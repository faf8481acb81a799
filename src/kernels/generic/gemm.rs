//! Packed single-precision GEMM: `C = α·A·B + β·C`, written once over
//! [`Simd`] and instantiated per tier with its own register tile.
//!
//! The layout is the classic one (Goto & van de Geijn): `B` is packed in
//! blocks of [`KC`]×[`NC`] into panels [`NR`]`= NV·LANES` columns wide, `A` in
//! blocks of [`MC`]×[`KC`] into panels `MR` rows tall, both zero-padded, so the
//! micro-kernel streams two contiguous buffers and keeps an `MR × NV` tile of
//! vector accumulators in registers (AVX-512: 12×2 zmm = 24 of 32 registers;
//! AVX2: 6×2 ymm = 12 of 16; NEON: 8×2 q = 16 of 32).
//!
//! Every element of C is summed along `k` in the same order, in the same
//! vector lane arithmetic, wherever its row and column fall in the tiling:
//! tiles cut by the matrix edge are computed on a zero-padded copy of C with
//! the same vector epilogue. So a product split across threads along its rows
//! or columns gives bit-identical results to the unsplit one.
//!
//! `β = 0` never reads C (it may hold NaN or garbage), as in BLAS.

use alloc::vec::Vec;

use super::super::simd::Simd;

/// Depth of one packed block (a `KC × NR` panel of B stays in L1).
pub(crate) const KC: usize = 256;
/// Rows of A packed per block, before rounding to a multiple of `MR`.
const MC: usize = 144;
/// Columns of B packed per block, before rounding to a multiple of `NR`.
const NC: usize = 1024;

// Packing buffers, reused by each thread across calls (a fresh allocation
// per product costs page faults on every call).
#[cfg(feature = "std")]
std::thread_local! {
    static BUFFERS: core::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { core::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `C[m×n] = α·A[m×k]·B[k×n] + β·C`, with `A(i, p) = a[i·rsa + p·csa]`,
/// `B(p, j) = b[p·rsb + j·csb]`, `C(i, j) = c[i·rsc + j]`.
///
/// # Safety
/// Tier features available; every element the strides reach for `i < m`,
/// `p < k`, `j < n` is valid; C does not alias A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm<S: Simd, const MR: usize, const NV: usize>(
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
    bias: *const f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(bias.is_null() || beta == 0.0, "sgemm: a bias only with β = 0");
    if k == 0 || alpha == 0.0 {
        // SAFETY: C valid for m×n with row stride rsc (caller).
        unsafe { scale_c(m, n, beta, c, rsc, bias) };
        return;
    }
    let nr = NV * S::LANES;
    let kc_max = KC.min(k);
    let mc_max = MC.div_ceil(MR) * MR;
    let nc_max = NC.div_ceil(nr) * nr;
    let a_len = mc_max.min(m.div_ceil(MR) * MR) * kc_max;
    let b_len = nc_max.min(n.div_ceil(nr) * nr) * kc_max;
    // Take the thread's buffers out (no closure: the hot loops must be
    // compiled inside the caller's `target_feature` function), put them back after.
    #[cfg(feature = "std")]
    let (mut pa, mut pb) = BUFFERS.try_with(|cell| cell.take()).unwrap_or_default();
    #[cfg(not(feature = "std"))]
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    if pa.len() < a_len {
        pa.resize(a_len, 0.0);
    }
    if pb.len() < b_len {
        pb.resize(b_len, 0.0);
    }
    // SAFETY: forwarded contract; buffers sized above.
    unsafe {
        blocked::<S, MR, NV>(
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
            bias,
            pa.as_mut_ptr(),
            pb.as_mut_ptr(),
        )
    }
    #[cfg(feature = "std")]
    let _ = BUFFERS.try_with(|cell| cell.replace((pa, pb)));
}

/// `C = β·C` (`β = 0` writes zeros, or the bias row, without reading).
///
/// # Safety
/// C valid for `m×n` with row stride `rsc`; `bias` null or valid for `n`.
unsafe fn scale_c(m: usize, n: usize, beta: f32, c: *mut f32, rsc: usize, bias: *const f32) {
    for i in 0..m {
        for j in 0..n {
            // SAFETY: i < m, j < n (caller).
            unsafe {
                let p = c.add(i * rsc + j);
                *p = if !bias.is_null() {
                    *bias.add(j)
                } else if beta == 0.0 {
                    0.0
                } else {
                    beta * *p
                };
            }
        }
    }
}

/// The three blocking loops around the micro-kernel.
///
/// # Safety
/// As [`sgemm`]; `pa` holds `MC`-rounded × `KC` floats, `pb` `NC`-rounded × `KC`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked<S: Simd, const MR: usize, const NV: usize>(
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
    bias: *const f32,
    pa: *mut f32,
    pb: *mut f32,
) {
    let nr = NV * S::LANES;
    let mc_max = MC.div_ceil(MR) * MR;
    let nc_max = NC.div_ceil(nr) * nr;
    let mut jc = 0;
    while jc < n {
        let nc = nc_max.min(n - jc);
        let mut pc = 0;
        while pc < k {
            let kc = KC.min(k - pc);
            // The first depth block applies β (or starts from the bias);
            // later ones accumulate.
            let beta_here = if pc == 0 { beta } else { 1.0 };
            let bias_here = if pc == 0 { bias } else { core::ptr::null() };
            // SAFETY: B(pc.., jc..) block in bounds (caller); pb sized.
            unsafe { pack_b(kc, nc, nr, b.add(pc * rsb + jc * csb), rsb, csb, pb) };
            let mut ic = 0;
            while ic < m {
                let mc = mc_max.min(m - ic);
                // SAFETY: A(ic.., pc..) block in bounds; pa sized.
                unsafe { pack_a::<MR>(mc, kc, a.add(ic * rsa + pc * csa), rsa, csa, pa) };
                let mut jr = 0;
                while jr < nc {
                    let nr_eff = nr.min(nc - jr);
                    let mut ir = 0;
                    while ir < mc {
                        let mr_eff = MR.min(mc - ir);
                        // SAFETY: panels inside the packed buffers; the C tile
                        // (ic+ir.., jc+jr..) of mr_eff × nr_eff is in bounds.
                        unsafe {
                            micro::<S, MR, NV>(
                                kc,
                                pa.add(ir * kc),
                                pb.add(jr * kc),
                                c.add((ic + ir) * rsc + jc + jr),
                                rsc,
                                mr_eff,
                                nr_eff,
                                alpha,
                                beta_here,
                                if bias_here.is_null() {
                                    bias_here
                                } else {
                                    bias_here.add(jc + jr)
                                },
                            )
                        };
                        ir += MR;
                    }
                    jr += nr;
                }
                ic += mc;
            }
            pc += kc;
        }
        jc += nc;
    }
}

/// Packs `A[mc×kc]` into `MR`-row panels: panel `q` holds, for each `p`, the
/// `MR` values `A(q·MR + i, p)`, zero past row `mc`.
///
/// # Safety
/// A valid for the block; `pa` for `mc.div_ceil(MR)·MR·kc` floats.
#[inline(always)]
unsafe fn pack_a<const MR: usize>(
    mc: usize,
    kc: usize,
    a: *const f32,
    rsa: usize,
    csa: usize,
    pa: *mut f32,
) {
    let mut q = 0;
    while q < mc {
        let rows = MR.min(mc - q);
        // SAFETY: panel `q / MR` starts at q·kc and holds MR·kc floats.
        let dst = unsafe { pa.add(q * kc) };
        if rows == MR && csa == 1 {
            for i in 0..MR {
                // SAFETY: row q+i of the block, kc contiguous values.
                let src = unsafe { a.add((q + i) * rsa) };
                for p in 0..kc {
                    // SAFETY: p < kc, i < MR.
                    unsafe { *dst.add(p * MR + i) = *src.add(p) };
                }
            }
        } else {
            for p in 0..kc {
                for i in 0..MR {
                    let v = if i < rows {
                        // SAFETY: row q+i < mc, column p < kc.
                        unsafe { *a.add((q + i) * rsa + p * csa) }
                    } else {
                        0.0
                    };
                    // SAFETY: p < kc, i < MR.
                    unsafe { *dst.add(p * MR + i) = v };
                }
            }
        }
        q += MR;
    }
}

/// Packs `B[kc×nc]` into `nr`-column panels: panel `q` holds, for each `p`,
/// the `nr` values `B(p, q·nr + j)`, zero past column `nc`.
///
/// # Safety
/// B valid for the block; `pb` for `nc.div_ceil(nr)·nr·kc` floats.
#[inline(always)]
unsafe fn pack_b(
    kc: usize,
    nc: usize,
    nr: usize,
    b: *const f32,
    rsb: usize,
    csb: usize,
    pb: *mut f32,
) {
    let mut q = 0;
    while q < nc {
        let cols = nr.min(nc - q);
        // SAFETY: panel `q / nr` starts at q·kc and holds nr·kc floats.
        let dst = unsafe { pb.add(q * kc) };
        if csb == 1 {
            for p in 0..kc {
                // SAFETY: row p of the block, columns q..q+cols contiguous.
                unsafe {
                    core::ptr::copy_nonoverlapping(b.add(p * rsb + q), dst.add(p * nr), cols);
                    for j in cols..nr {
                        *dst.add(p * nr + j) = 0.0;
                    }
                }
            }
        } else {
            // Column-major B (x·Wᵀ with W row-major): read each column
            // contiguously along p.
            for j in 0..nr {
                if j < cols {
                    // SAFETY: column q+j < nc of the block, rows p < kc.
                    let src = unsafe { b.add((q + j) * csb) };
                    for p in 0..kc {
                        // SAFETY: as above; destination inside the panel.
                        unsafe { *dst.add(p * nr + j) = *src.add(p * rsb) };
                    }
                } else {
                    for p in 0..kc {
                        // SAFETY: destination inside the panel.
                        unsafe { *dst.add(p * nr + j) = 0.0 };
                    }
                }
            }
        }
        q += nr;
    }
}

/// The micro-kernel: an `MR × NV·LANES` tile of `α·Apanel·Bpanel + β·C`,
/// stored to the `mr_eff × nr_eff` corner of the C tile.
///
/// # Safety
/// Tier features available; panels hold `kc·MR` and `kc·NV·LANES` floats; the
/// C tile is valid for `mr_eff ≤ MR` rows of `nr_eff ≤ NV·LANES` columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    pa: *const f32,
    pb: *const f32,
    c: *mut f32,
    rsc: usize,
    mr_eff: usize,
    nr_eff: usize,
    alpha: f32,
    beta: f32,
    bias: *const f32,
) {
    let l = S::LANES;
    let nr = NV * l;
    const TILE: usize = 16 * 64;
    // The edge-tile buffer below holds any tier's tile (AVX-512: 12×32).
    assert!(MR * nr <= TILE, "sgemm tile {MR}×{nr} exceeds the edge buffer");
    // SAFETY: tier features available (caller); every read is inside a panel.
    unsafe {
        let mut acc = [[S::zero(); NV]; MR];
        let (mut ap, mut bp) = (pa, pb);
        for _ in 0..kc {
            let mut bv = [S::zero(); NV];
            for (v, bvv) in bv.iter_mut().enumerate() {
                *bvv = S::load(bp.add(v * l));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = S::splat(*ap.add(i));
                for (cv, bvv) in row.iter_mut().zip(bv.iter()) {
                    *cv = S::fma(av, *bvv, *cv);
                }
            }
            ap = ap.add(MR);
            bp = bp.add(nr);
        }
        let va = S::splat(alpha);
        if mr_eff == MR && nr_eff == nr {
            if bias.is_null() {
                epilogue::<S, MR, NV>(&acc, c, rsc, va, beta);
            } else {
                // The bias row read as a C of row stride 0: the same
                // arithmetic as β = 1 on rows holding the bias.
                epilogue_from::<S, MR, NV>(&acc, c, rsc, bias, 0, va, S::splat(1.0));
            }
        } else {
            // An edge tile: the same epilogue on a zero-padded copy of C (or
            // of the bias rows), so edge elements round exactly as interior
            // ones do.
            let mut tile = [0.0f32; TILE];
            let t = tile.as_mut_ptr();
            let beta = if bias.is_null() {
                if beta != 0.0 {
                    for i in 0..mr_eff {
                        core::ptr::copy_nonoverlapping(c.add(i * rsc), t.add(i * nr), nr_eff);
                    }
                }
                beta
            } else {
                for i in 0..mr_eff {
                    core::ptr::copy_nonoverlapping(bias, t.add(i * nr), nr_eff);
                }
                1.0
            };
            epilogue::<S, MR, NV>(&acc, t, nr, va, beta);
            for i in 0..mr_eff {
                core::ptr::copy_nonoverlapping(t.add(i * nr), c.add(i * rsc), nr_eff);
            }
        }
    }
}

/// `C tile = α·acc + β·C tile` (`β = 0`: `α·acc`, C unread).
///
/// # Safety
/// Tier features available; the tile valid for `MR` rows of `NV·LANES`.
#[inline(always)]
unsafe fn epilogue<S: Simd, const MR: usize, const NV: usize>(
    acc: &[[S::V; NV]; MR],
    c: *mut f32,
    rsc: usize,
    va: S::V,
    beta: f32,
) {
    let l = S::LANES;
    // SAFETY: as the contract says.
    unsafe {
        if beta == 0.0 {
            for (i, row) in acc.iter().enumerate() {
                for (v, cv) in row.iter().enumerate() {
                    S::store(c.add(i * rsc + v * l), S::fma(va, *cv, S::zero()));
                }
            }
        } else {
            epilogue_from::<S, MR, NV>(acc, c, rsc, c, rsc, va, S::splat(beta));
        }
    }
}

/// `C tile = α·acc + β·old` with `old` read from its own rows (row stride
/// `rso`: C itself, or a bias row with stride 0).
///
/// # Safety
/// Tier features available; C and `old` valid for `MR` rows of `NV·LANES`.
#[inline(always)]
unsafe fn epilogue_from<S: Simd, const MR: usize, const NV: usize>(
    acc: &[[S::V; NV]; MR],
    c: *mut f32,
    rsc: usize,
    old: *const f32,
    rso: usize,
    va: S::V,
    vb: S::V,
) {
    let l = S::LANES;
    // SAFETY: as the contract says.
    unsafe {
        for (i, row) in acc.iter().enumerate() {
            for (v, cv) in row.iter().enumerate() {
                let o = S::fma(vb, S::load(old.add(i * rso + v * l)), S::zero());
                S::store(c.add(i * rsc + v * l), S::fma(va, *cv, o));
            }
        }
    }
}
