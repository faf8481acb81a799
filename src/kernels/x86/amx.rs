//! Intel AMX-BF16 (Xeon Sapphire Rapids and later): dense products with bf16
//! operands and f32 accumulation, 16×16×32 multiply-adds per `tdpbf16ps`.
//! Reached only when an app asks for bf16 products
//! (`runtime::set_matmul_precision`) and the CPU and the OS allow AMX.
//!
//! Operands are rounded to bf16 (nearest-even; NaN stays NaN, overflow goes
//! to ±∞) while they are packed into tiles: A as 16-row × 32-element tiles,
//! B in the pair layout the instruction reads (row `q` of a B tile holds
//! `(B[2q][j], B[2q+1][j])` for 16 columns `j`), edges padded with zeros.
//! C is computed 32×32 at a time in four accumulator tiles (tmm0–3) from two
//! A tiles (tmm4–5) and two B tiles (tmm6–7). Each element of C is summed
//! along `k` in the same order wherever it falls in its 32×32 block, so a
//! split of C along rows or columns at multiples of 32 gives the same bits as
//! the whole product (whole blocks start from C or the bias, edge blocks add
//! them at the end, so other cuts could round differently). The tile
//! registers are configured at the start of each product and released at its
//! end; the compiler never uses them.

use core::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows of an A (and C) tile.
const MR: usize = 16;
/// Columns of a B (and C) tile.
const NR: usize = 16;
/// Inner-dimension elements per tile row (64 bytes of bf16).
const KR: usize = 32;
/// bf16 elements per packed A tile.
const A_TILE: usize = MR * KR;
/// bf16 pairs (u32) per packed B tile.
const B_TILE: usize = KR / 2 * NR;

/// Whether this CPU has AMX-BF16 and the OS gave this process the tile state
/// (Linux ≥ 5.16 grants it on request). Asked once.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        use core::arch::x86_64::{__cpuid, __cpuid_count};
        // Leaf 7 is read only when leaf 0 says it exists.
        if __cpuid(0).eax < 7 {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
        if !(amx_bf16
            && amx_tile
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw"))
        {
            return false;
        }
        request_tile_state()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only asks the kernel for
    // permission to use the AMX state; it fails cleanly where unsupported.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// `x` rounded to bf16 (nearest-even), in the low 16 bits.
#[inline(always)]
fn bf16(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if b & 0x7fff_ffff > 0x7f80_0000 { (b >> 16) | 0x40 } else { rounded }
}

/// Packing buffers, kept per thread between products.
#[derive(Default)]
struct Buffers {
    a: Vec<u16>,
    b: Vec<u32>,
}

std::thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// A as `mbs` row blocks × `kbs` tiles of 16×32 bf16 (zero-padded): the
/// vector packers for rows or columns of A contiguous, element by element
/// for other strides.
///
/// # Safety
/// `A[i·rsa + p·csa]` valid for `i < m`, `p < k`; `out` holds
/// `mbs·kbs·A_TILE` elements; AVX-512BW present.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_a(
    m: usize,
    k: usize,
    a: *const f32,
    sa: (usize, usize),
    mbs: usize,
    kbs: usize,
    out: &mut [u16],
) {
    assert!(out.len() >= mbs * kbs * A_TILE, "pack_a: buffer");
    // SAFETY: the caller's bounds; `out` checked above.
    unsafe {
        match sa {
            (rsa, 1) => simd::pack_a_rows(m, k, a, rsa, mbs, kbs, out),
            (1, csa) => simd::pack_a_cols(m, k, a, csa, mbs, kbs, out),
            _ => pack_a_scalar(m, k, a, sa, mbs, kbs, out),
        }
    }
}

/// [`pack_a`] element by element (any strides; the vector packers' reference).
///
/// # Safety
/// As [`pack_a`].
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_a_scalar(
    m: usize,
    k: usize,
    a: *const f32,
    (rsa, csa): (usize, usize),
    mbs: usize,
    kbs: usize,
    out: &mut [u16],
) {
    for mb in 0..mbs {
        for r in 0..MR {
            let i = mb * MR + r;
            for kb in 0..kbs {
                let dst = &mut out[(mb * kbs + kb) * A_TILE + r * KR..][..KR];
                if i >= m {
                    dst.fill(0);
                    continue;
                }
                let p0 = kb * KR;
                let len = KR.min(k - p0);
                // SAFETY: i < m and p0 < k (caller's bounds).
                let row = unsafe { a.add(i * rsa + p0 * csa) };
                if csa == 1 {
                    // SAFETY: p0 + len ≤ k elements of row i.
                    let src = unsafe { core::slice::from_raw_parts(row, len) };
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = bf16(s) as u16;
                    }
                } else {
                    for (q, d) in dst[..len].iter_mut().enumerate() {
                        // SAFETY: p0 + q < k.
                        *d = bf16(unsafe { *row.add(q * csa) }) as u16;
                    }
                }
                dst[len..].fill(0);
            }
        }
    }
}

/// B as `nbs` column blocks × `kbs` tiles of 16 pairs × 16 columns: the
/// vector packers for rows or columns of B contiguous (a weight matrix used
/// as `W` or `Wᵀ`), element by element for other strides.
///
/// # Safety
/// `B[p·rsb + j·csb]` valid for `p < k`, `j < n`; `out` holds
/// `nbs·kbs·B_TILE` elements; AVX-512BW present.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_b(
    k: usize,
    n: usize,
    b: *const f32,
    sb: (usize, usize),
    nbs: usize,
    kbs: usize,
    out: &mut [u32],
) {
    assert!(out.len() >= nbs * kbs * B_TILE, "pack_b: buffer");
    // SAFETY: the caller's bounds; `out` checked above.
    unsafe {
        match sb {
            (rsb, 1) => simd::pack_b_rows(k, n, b, rsb, nbs, kbs, out),
            (1, csb) => simd::pack_b_cols(k, n, b, csb, nbs, kbs, out),
            _ => pack_b_scalar(k, n, b, sb, nbs, kbs, out),
        }
    }
}

/// [`pack_b`] element by element (any strides; the vector packers' reference).
///
/// # Safety
/// As [`pack_b`].
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b_scalar(
    k: usize,
    n: usize,
    b: *const f32,
    (rsb, csb): (usize, usize),
    nbs: usize,
    kbs: usize,
    out: &mut [u32],
) {
    for nb in 0..nbs {
        let j0 = nb * NR;
        let cols = NR.min(n.saturating_sub(j0));
        for kb in 0..kbs {
            let dst = &mut out[(nb * kbs + kb) * B_TILE..][..B_TILE];
            if cols < NR {
                dst.fill(0);
                if cols == 0 {
                    continue;
                }
            }
            let p0 = kb * KR;
            let pairs = (KR / 2).min((k - p0).div_ceil(2));
            if csb == 1 {
                // Rows of B are contiguous: two rows at a time, 16 columns.
                for q in 0..pairs {
                    let (p, p1) = (p0 + 2 * q, p0 + 2 * q + 1);
                    // SAFETY: p < k and j0 + cols ≤ n.
                    let lo = unsafe { core::slice::from_raw_parts(b.add(p * rsb + j0), cols) };
                    let d = &mut dst[q * NR..q * NR + cols];
                    if p1 < k {
                        // SAFETY: p1 < k.
                        let hi = unsafe { core::slice::from_raw_parts(b.add(p1 * rsb + j0), cols) };
                        for ((d, &l), &h) in d.iter_mut().zip(lo).zip(hi) {
                            *d = bf16(l) | (bf16(h) << 16);
                        }
                    } else {
                        for (d, &l) in d.iter_mut().zip(lo) {
                            *d = bf16(l);
                        }
                    }
                }
            } else {
                // Columns of B (rows of a weight matrix) are read along k.
                for jj in 0..cols {
                    // SAFETY: j0 + jj < n, p0 < k.
                    let col = unsafe { b.add(p0 * rsb + (j0 + jj) * csb) };
                    for q in 0..pairs {
                        // SAFETY: p0 + 2q < k; the pair's second element only
                        // when it is inside k.
                        let lo = bf16(unsafe { *col.add(2 * q * rsb) });
                        let hi = if p0 + 2 * q + 1 < k {
                            bf16(unsafe { *col.add((2 * q + 1) * rsb) })
                        } else {
                            0
                        };
                        dst[q * NR + jj] = lo | (hi << 16);
                    }
                }
            }
            dst[pairs * NR..].fill(0);
        }
    }
}

/// The packers with AVX-512 vectors: 16 elements rounded to bf16 at a time
/// (the same rounding as [`bf16`], bit for bit), and a 16×16 transpose of
/// 32-bit pairs where the operand's contiguous side is not the tile's rows.
mod simd {
    use core::arch::x86_64::*;

    use super::{A_TILE, B_TILE, KR, MR, NR};

    /// The first `n` of 16 lanes (all for `n ≥ 16`).
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { (1u16 << n) - 1 }
    }

    /// 16 floats rounded to bf16 (nearest-even; NaN kept, quieted), each in
    /// the low 16 bits of its 32-bit lane.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn bf16x16(v: __m512) -> __m512i {
        let b = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff));
        let nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(nan, rounded, quiet)
    }

    /// `len` (≤ 16) floats from `p` as bf16 in 32-bit lanes, zeros after.
    ///
    /// # Safety
    /// `p[..len]` readable.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load16(p: *const f32, len: usize) -> __m512i {
        if len == 0 {
            return _mm512_setzero_si512();
        }
        // SAFETY: masked-off lanes are not read.
        bf16x16(unsafe { _mm512_maskz_loadu_ps(lanes(len), p) })
    }

    /// `len` (≤ 32) contiguous floats from `p` as 16 bf16 pairs
    /// `(p[2q], p[2q+1])`, zeros after.
    ///
    /// # Safety
    /// `p[..len]` readable.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load_pairs(p: *const f32, len: usize) -> __m512i {
        // SAFETY: `len` bounds both loads (the second reads nothing when
        // len ≤ 16, so its address is never dereferenced).
        let (lo, hi) =
            unsafe { (load16(p, len.min(16)), load16(p.wrapping_add(16), len.saturating_sub(16))) };
        let (lo, hi) = (_mm512_cvtepi32_epi16(lo), _mm512_cvtepi32_epi16(hi));
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }

    /// Rows become columns: `out[j]` lane `i` = `r[i]` lane `j`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn transpose16(r: &[__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + c], 128-bit lane L: rows 4g..4g+4 of column 4L + c.
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
            u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
            u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
            u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
        }
        // Column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
        let mut out = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            let x0 = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
            let x1 = _mm512_shuffle_i32x4::<0xdd>(u[c], u[4 + c]);
            let y0 = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
            let y1 = _mm512_shuffle_i32x4::<0xdd>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_i32x4::<0x88>(x0, y0);
            out[4 + c] = _mm512_shuffle_i32x4::<0x88>(x1, y1);
            out[8 + c] = _mm512_shuffle_i32x4::<0xdd>(x0, y0);
            out[12 + c] = _mm512_shuffle_i32x4::<0xdd>(x1, y1);
        }
        out
    }

    /// 16 bf16 pairs of rows `p` and `p + 1` of a matrix whose rows are
    /// `step` apart and contiguous (`cols` ≤ 16 read, zeros after; rows at or
    /// beyond `k` are zeros).
    ///
    /// # Safety
    /// `base[p·step ..][..cols]` readable for every row `p < k` read.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn row_pair(base: *const f32, step: usize, p: usize, k: usize, cols: usize) -> __m512i {
        // SAFETY: rows below k only, `cols` elements each (caller).
        let (lo, hi) = unsafe {
            (
                if p < k { load16(base.add(p * step), cols) } else { _mm512_setzero_si512() },
                if p + 1 < k {
                    load16(base.add((p + 1) * step), cols)
                } else {
                    _mm512_setzero_si512()
                },
            )
        };
        _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi))
    }

    /// [`super::pack_a`] for rows of A contiguous (`csa = 1`).
    ///
    /// # Safety
    /// As [`super::pack_a`], and `out.len() ≥ mbs·kbs·A_TILE`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_a_rows(
        m: usize,
        k: usize,
        a: *const f32,
        rsa: usize,
        mbs: usize,
        kbs: usize,
        out: &mut [u16],
    ) {
        for mb in 0..mbs {
            for r in 0..MR {
                let i = mb * MR + r;
                for kb in 0..kbs {
                    let p0 = kb * KR;
                    let dst = out[(mb * kbs + kb) * A_TILE + r * KR..][..KR].as_mut_ptr();
                    // SAFETY: row i < m holds k elements from p0 (caller);
                    // `dst` is one 64-byte tile row inside `out`.
                    unsafe {
                        let v = if i < m && p0 < k {
                            load_pairs(a.add(i * rsa + p0), KR.min(k - p0))
                        } else {
                            _mm512_setzero_si512()
                        };
                        _mm512_storeu_si512(dst.cast(), v);
                    }
                }
            }
        }
    }

    /// [`super::pack_a`] for columns of A contiguous (`rsa = 1`, e.g. the
    /// transpose of a row-major matrix): pairs along `k` for 16 rows at a
    /// time, then transposed into tile rows.
    ///
    /// # Safety
    /// As [`super::pack_a_rows`].
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_a_cols(
        m: usize,
        k: usize,
        a: *const f32,
        csa: usize,
        mbs: usize,
        kbs: usize,
        out: &mut [u16],
    ) {
        for mb in 0..mbs {
            let i0 = mb * MR;
            let rows = m.saturating_sub(i0).min(MR);
            for kb in 0..kbs {
                let p0 = kb * KR;
                let mut pairs = [_mm512_setzero_si512(); 16];
                if rows > 0 {
                    for (q, v) in pairs.iter_mut().enumerate() {
                        // SAFETY: column p of A holds rows i0..i0 + rows.
                        *v = unsafe { row_pair(a.wrapping_add(i0), csa, p0 + 2 * q, k, rows) };
                    }
                }
                let t = transpose16(&pairs);
                let tile = out[(mb * kbs + kb) * A_TILE..][..A_TILE].as_mut_ptr();
                for (r, v) in t.iter().enumerate() {
                    // SAFETY: 64 bytes of tile row r inside `out`.
                    unsafe { _mm512_storeu_si512(tile.add(r * KR).cast(), *v) };
                }
            }
        }
    }

    /// [`super::pack_b`] for rows of B contiguous (`csb = 1`, e.g. `W` of a
    /// backward product): two rows of 16 columns make one tile row.
    ///
    /// # Safety
    /// As [`super::pack_b`], and `out.len() ≥ nbs·kbs·B_TILE`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_b_rows(
        k: usize,
        n: usize,
        b: *const f32,
        rsb: usize,
        nbs: usize,
        kbs: usize,
        out: &mut [u32],
    ) {
        for nb in 0..nbs {
            let j0 = nb * NR;
            let cols = n.saturating_sub(j0).min(NR);
            for kb in 0..kbs {
                let p0 = kb * KR;
                let tile = out[(nb * kbs + kb) * B_TILE..][..B_TILE].as_mut_ptr();
                for q in 0..KR / 2 {
                    // SAFETY: rows below k, columns j0..j0 + cols (caller);
                    // 64 bytes of tile row q inside `out`.
                    unsafe {
                        let v = if cols > 0 {
                            row_pair(b.wrapping_add(j0), rsb, p0 + 2 * q, k, cols)
                        } else {
                            _mm512_setzero_si512()
                        };
                        _mm512_storeu_si512(tile.add(q * NR).cast(), v);
                    }
                }
            }
        }
    }

    /// [`super::pack_b`] for columns of B contiguous (`rsb = 1`: `Wᵀ` of a
    /// forward product, each column a row of `W`): 32 elements of a column
    /// are its 16 pairs, and 16 columns are transposed into tile rows.
    ///
    /// # Safety
    /// As [`super::pack_b_rows`].
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_b_cols(
        k: usize,
        n: usize,
        b: *const f32,
        csb: usize,
        nbs: usize,
        kbs: usize,
        out: &mut [u32],
    ) {
        for nb in 0..nbs {
            let j0 = nb * NR;
            let cols = n.saturating_sub(j0).min(NR);
            for kb in 0..kbs {
                let p0 = kb * KR;
                let mut c = [_mm512_setzero_si512(); 16];
                if p0 < k {
                    for (jj, v) in c.iter_mut().enumerate().take(cols) {
                        // SAFETY: column j0 + jj < n holds k elements.
                        *v = unsafe { load_pairs(b.add(p0 + (j0 + jj) * csb), KR.min(k - p0)) };
                    }
                }
                let t = transpose16(&c);
                let tile = out[(nb * kbs + kb) * B_TILE..][..B_TILE].as_mut_ptr();
                for (q, v) in t.iter().enumerate() {
                    // SAFETY: 64 bytes of tile row q inside `out`.
                    unsafe { _mm512_storeu_si512(tile.add(q * NR).cast(), *v) };
                }
            }
        }
    }
}

/// Tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row (u16 little-endian)
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }
}

/// One 32×32 block of C, as the four accumulator tiles store it.
#[repr(C, align(64))]
struct Block([[f32; 2 * NR]; 2 * MR]);

/// `C[m×n] = α·A·B + β·C (+ bias)` with bf16-rounded A and B and f32
/// accumulation (A and B strided, C row-major with row stride `rsc`; `β = 0`
/// never reads C, so C may be uninitialised; `bias`, when given, is a row of
/// `n` added to every row of C in f32).
///
/// # Safety
/// [`available`] returned true; every element `A[i·rsa + p·csa]`,
/// `B[p·rsb + j·csb]`, `C[i·rsc + j]` for `i < m`, `p < k`, `j < n` is valid
/// and C aliases neither A nor B.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    sa: (usize, usize),
    b: *const f32,
    sb: (usize, usize),
    beta: f32,
    c: *mut f32,
    rsc: usize,
    bias: Option<&[f32]>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(bias.is_none_or(|b| b.len() >= n), "amx gemm: bias shorter than n");
    let kbs = k.div_ceil(KR).max(1);
    let nbs = n.div_ceil(2 * NR) * 2;
    BUFFERS.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let Buffers { a: ap, b: bp } = &mut *bufs;
        // Grown, never shrunk: the packers write every element they hand on,
        // so a buffer is not cleared between products.
        let nb = nbs * kbs * B_TILE;
        if bp.len() < nb {
            bp.resize(nb, 0);
        }
        let bp = &mut bp[..nb];
        // SAFETY: caller's bounds; the buffer holds what the packer writes
        // (for k = 0 the single zero tile gives C = β·C).
        unsafe {
            if k == 0 {
                bp.fill(0);
            } else {
                pack_b(k, n, b, sb, nbs, kbs, bp);
            }
            with_packed_a(m, k, a, sa, kbs, ap, |ap| {
                tiles(m, n, kbs, alpha, ap, bp, beta, c, rsc, bias)
            });
        }
    });
}

/// A `k×n` operand B packed into bf16 tiles once, for products that reuse
/// it (a frozen layer's weights: `Wᵀ` forward, `W` backward).
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    kbs: usize,
    tiles: Vec<u32>,
}

impl PackedB {
    /// Packs `B[p·rsb + j·csb]` for `p < k`, `j < n`.
    ///
    /// # Safety
    /// [`available`] returned true; every such element is valid.
    pub(crate) unsafe fn new(k: usize, n: usize, b: *const f32, sb: (usize, usize)) -> PackedB {
        let kbs = k.div_ceil(KR).max(1);
        let nbs = n.div_ceil(2 * NR) * 2;
        let mut tiles = vec![0u32; nbs * kbs * B_TILE];
        if k > 0 && n > 0 {
            // SAFETY: caller's bounds; AVX-512BW comes with `available`.
            unsafe { pack_b(k, n, b, sb, nbs, kbs, &mut tiles) };
        }
        PackedB { k, n, kbs, tiles }
    }

    /// Rows (`k`) and columns (`n`) of B.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.tiles.len() * 4
    }
}

/// [`gemm`] with B packed beforehand, for columns `j0..j0 + cols` of it:
/// `C[m×cols] = α·A·B[:, j0..] + β·C (+ bias)`. The columns start at a
/// 32-column block (`j0` a multiple of 32) and run whole blocks or to the
/// end of B, so a pool's column split gives the bits of the whole product.
///
/// # Safety
/// As [`gemm`] for A (m×k, `k` = B's rows) and C (m×cols).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed(
    m: usize,
    alpha: f32,
    a: *const f32,
    sa: (usize, usize),
    b: &PackedB,
    (j0, cols): (usize, usize),
    beta: f32,
    c: *mut f32,
    rsc: usize,
    bias: Option<&[f32]>,
) {
    assert!(
        j0 % (2 * NR) == 0 && j0 + cols <= b.n && (cols % (2 * NR) == 0 || j0 + cols == b.n),
        "amx gemm_packed: columns {j0}+{cols} of {} not on 32-column blocks",
        b.n
    );
    if m == 0 || cols == 0 {
        return;
    }
    assert!(bias.is_none_or(|v| v.len() >= cols), "amx gemm: bias shorter than n");
    let nbs = cols.div_ceil(2 * NR) * 2;
    let bp = &b.tiles[j0 / NR * b.kbs * B_TILE..][..nbs * b.kbs * B_TILE];
    BUFFERS.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        // SAFETY: caller's bounds for A and C; `bp` holds this column range.
        unsafe {
            with_packed_a(m, b.k, a, sa, b.kbs, &mut bufs.a, |ap| {
                tiles(m, cols, b.kbs, alpha, ap, bp, beta, c, rsc, bias)
            })
        }
    });
}

/// Packs A into `buf` (grown as needed) and hands the packed tiles to `f`.
///
/// # Safety
/// `A[i·rsa + p·csa]` valid for `i < m`, `p < k`; `kbs = max(1, ⌈k/32⌉)`;
/// AVX-512BW present.
unsafe fn with_packed_a<R>(
    m: usize,
    k: usize,
    a: *const f32,
    sa: (usize, usize),
    kbs: usize,
    buf: &mut Vec<u16>,
    f: impl FnOnce(&[u16]) -> R,
) -> R {
    let mbs = m.div_ceil(2 * MR) * 2;
    let na = mbs * kbs * A_TILE;
    if buf.len() < na {
        buf.resize(na, 0);
    }
    let ap = &mut buf[..na];
    if k == 0 {
        ap.fill(0);
    } else {
        // SAFETY: caller's bounds.
        unsafe { pack_a(m, k, a, sa, mbs, kbs, ap) };
    }
    f(ap)
}

/// The tile loop over packed operands. A full 32×32 block of C with α = 1
/// goes straight between C and the accumulator tiles, which start from C
/// (β = 1), from the bias row repeated (a stride-0 load; β = 0), or from
/// zero (β = 0, no bias); other blocks pass through a buffer.
///
/// # Safety
/// As [`gemm`]; `ap`/`bp` packed for these `m`, `n`, `kbs`.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles(
    m: usize,
    n: usize,
    kbs: usize,
    alpha: f32,
    ap: &[u16],
    bp: &[u32],
    beta: f32,
    c: *mut f32,
    rsc: usize,
    bias: Option<&[f32]>,
) {
    let cfg = TileConfig::all_full();
    let mut block = Block([[0.0; 2 * NR]; 2 * MR]);
    let stride = 64usize;
    let (mbs, nbs) = (m.div_ceil(2 * MR) * 2, n.div_ceil(2 * NR) * 2);
    let direct = alpha == 1.0 && (beta == 0.0 || (beta == 1.0 && bias.is_none()));
    // SAFETY: AMX is available and permitted (caller); every tile load reads
    // one packed 1 KB tile inside `ap`/`bp` (indices below their lengths by
    // construction); direct loads and stores touch only the 32×32 block of C
    // at (mb·16, nb·16), which is inside C when the block is full; the others
    // write inside `block`.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        for mb in (0..mbs).step_by(2) {
            let a0 = ap.as_ptr().add(mb * kbs * A_TILE);
            let a1 = a0.add(kbs * A_TILE);
            let rows = (m - mb * MR).min(2 * MR);
            for nb in (0..nbs).step_by(2) {
                let b0 = bp.as_ptr().add(nb * kbs * B_TILE);
                let b1 = b0.add(kbs * B_TILE);
                let cols = (n - nb * NR).min(2 * NR);
                let full = direct && rows == 2 * MR && cols == 2 * NR;
                let (out, out_stride) = if full {
                    (c.add(mb * MR * rsc + nb * NR), rsc * 4)
                } else {
                    (block.0.as_mut_ptr().cast::<f32>(), 2 * NR * 4)
                };
                let (c01, c10) = if full { (NR, MR * rsc) } else { (NR, MR * 2 * NR) };
                if let (true, Some(bias)) = (full, bias) {
                    // Each accumulator row starts as its 16 columns of bias.
                    let b = bias.as_ptr().add(nb * NR);
                    asm!(
                        "tileloadd tmm0, [{b0} + {s}]",
                        "tileloadd tmm1, [{b1} + {s}]",
                        "tileloadd tmm2, [{b0} + {s}]",
                        "tileloadd tmm3, [{b1} + {s}]",
                        b0 = in(reg) b,
                        b1 = in(reg) b.add(NR),
                        s = in(reg) 0usize,
                        options(nostack, readonly)
                    );
                } else if full && beta == 1.0 {
                    asm!(
                        "tileloadd tmm0, [{c00} + {s}]",
                        "tileloadd tmm1, [{c01} + {s}]",
                        "tileloadd tmm2, [{c10} + {s}]",
                        "tileloadd tmm3, [{c11} + {s}]",
                        c00 = in(reg) out,
                        c01 = in(reg) out.add(c01),
                        c10 = in(reg) out.add(c10),
                        c11 = in(reg) out.add(c10 + c01),
                        s = in(reg) out_stride,
                        options(nostack, readonly)
                    );
                } else {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                }
                for kb in 0..kbs {
                    asm!(
                        // Loads interleaved with the products: tiles are
                        // not renamed, so a load waits for the last
                        // product that reads the register it overwrites.
                        "tileloadd tmm4, [{a0} + {s}]",
                        "tileloadd tmm6, [{b0} + {s}]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {s}]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {s}]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(kb * A_TILE),
                        a1 = in(reg) a1.add(kb * A_TILE),
                        b0 = in(reg) b0.add(kb * B_TILE),
                        b1 = in(reg) b1.add(kb * B_TILE),
                        s = in(reg) stride,
                        options(nostack, readonly)
                    );
                }
                asm!(
                    "tilestored [{c00} + {s}], tmm0",
                    "tilestored [{c01} + {s}], tmm1",
                    "tilestored [{c10} + {s}], tmm2",
                    "tilestored [{c11} + {s}], tmm3",
                    c00 = in(reg) out,
                    c01 = in(reg) out.add(c01),
                    c10 = in(reg) out.add(c10),
                    c11 = in(reg) out.add(c10 + c01),
                    s = in(reg) out_stride,
                    options(nostack)
                );
                if full {
                    continue;
                }
                // Raw writes: with β = 0, C may be uninitialised memory.
                let zero = [0.0f32; 2 * NR];
                let bias = bias.map_or(&zero[..cols], |b| &b[nb * NR..nb * NR + cols]);
                for (r, acc) in block.0[..rows].iter().enumerate() {
                    let dst = c.add((mb * MR + r) * rsc + nb * NR);
                    for (j, (&v, &b)) in acc.iter().zip(bias).enumerate() {
                        let prev = if beta == 0.0 { 0.0 } else { beta * *dst.add(j) };
                        *dst.add(j) = alpha * v + prev + b;
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::{reference, round_bf16};

    #[test]
    fn bf16_rounding_is_nearest_even_and_keeps_specials() {
        let mut rng = crate::rng::Rng::new(3);
        for _ in 0..10_000 {
            let x = rng.uniform(-1e3, 1e3) * rng.uniform(0.0, 1.0).powi(9);
            assert_eq!(bf16(x) << 16, round_bf16(x).to_bits(), "{x}");
        }
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2.0 * 2f32.powi(-7));
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
    }

    /// The vector packers write the same bits as the element-by-element
    /// ones: rows or columns contiguous, edges on every side, and values that
    /// test the rounding (ties, denormals, overflow, NaN and ∞ of both signs).
    #[test]
    fn vector_packers_match_the_scalar_ones() {
        if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw"))
        {
            eprintln!("no AVX-512BW on this CPU: the packers never run here");
            return;
        }
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-40,
            -3e-39,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            f32::MAX,
            -f32::MAX,
        ];
        let mut rng = crate::rng::Rng::new(21);
        for &(rows, k) in &[(1, 1), (16, 32), (17, 33), (5, 70), (40, 7), (33, 64), (64, 100)] {
            let len = rows * k;
            let v: Vec<f32> =
                (0..len)
                    .map(|i| {
                        if i % 7 == 3 {
                            specials[i % specials.len()]
                        } else {
                            rng.uniform(-3.0, 3.0)
                        }
                    })
                    .collect();
            let kbs = k.div_ceil(KR).max(1);
            let blocks = rows.div_ceil(2 * MR) * 2;
            // The same matrix with rows contiguous, then with columns contiguous.
            let t: Vec<f32> = (0..len).map(|i| v[(i % rows) * k + i / rows]).collect();
            for (data, s) in [(&v, (k, 1)), (&t, (1, rows))] {
                let (mut fast, mut slow) = (
                    vec![0xaaaau16; blocks * kbs * A_TILE],
                    vec![0x5555u16; blocks * kbs * A_TILE],
                );
                // SAFETY: AVX-512BW checked above; `data` is rows×k under `s`.
                unsafe {
                    pack_a(rows, k, data.as_ptr(), s, blocks, kbs, &mut fast);
                    pack_a_scalar(rows, k, data.as_ptr(), s, blocks, kbs, &mut slow);
                }
                assert_eq!(fast, slow, "A {rows}×{k} strides {s:?}");
                // As B: k×n with n = rows (a weight matrix W of `rows` rows is
                // B = Wᵀ with strides (1, k); its transpose is row-major).
                let (n, sb) = (rows, if s.1 == 1 { (1, k) } else { (rows, 1) });
                let (mut fast, mut slow) = (
                    vec![0xaaaa_aaaau32; blocks * kbs * B_TILE],
                    vec![0x5555_5555u32; blocks * kbs * B_TILE],
                );
                // SAFETY: as above; `data` is k×n under `sb`.
                unsafe {
                    pack_b(k, n, data.as_ptr(), sb, blocks, kbs, &mut fast);
                    pack_b_scalar(k, n, data.as_ptr(), sb, blocks, kbs, &mut slow);
                }
                assert_eq!(fast, slow, "B {k}×{n} strides {sb:?}");
            }
        }
    }

    /// Every operand layout the tail uses (row-major, transposed, strided),
    /// edge sizes on every side, α/β, C inside a wider matrix: the AMX
    /// product equals the bf16-operand product summed in f64, to f32
    /// accumulation error (1e-5 of the terms' magnitude).
    #[test]
    fn amx_products_match_bf16_operand_reference() {
        if !available() {
            eprintln!("AMX-BF16 not available on this CPU/OS: nothing to compare");
            return;
        }
        let mut rng = crate::rng::Rng::new(11);
        let shapes = [
            (16, 32, 16),
            (17, 33, 31),
            (64, 32, 64),
            (64, 64, 32),
            (100, 384, 70),
            (33, 1, 40),
            (5, 7, 3),
        ];
        for &(m, k, n) in &shapes {
            for (layout, (ta, tb)) in
                [(false, false), (false, true), (true, false), (true, true)].into_iter().enumerate()
            {
                let sa = if ta { (1, m) } else { (k, 1) };
                let sb = if tb { (1, k) } else { (n, 1) };
                let a: Vec<f32> = (0..m * k).map(|_| rng.uniform(-2.0, 2.0)).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.uniform(-2.0, 2.0)).collect();
                let rsc = n + 3;
                let c0: Vec<f32> = (0..m * rsc).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let cases = [
                    (1.0, 0.0, false),
                    (0.5, 1.0, false),
                    (-1.5, 0.25, false),
                    (1.0, 0.0, true),
                    (0.5, 1.0, true),
                ];
                for (alpha, beta, with_bias) in cases {
                    let bias = with_bias.then_some(&bias[..]);
                    let mut c = c0.clone();
                    // SAFETY: available; every index the strides reach is in bounds.
                    unsafe {
                        gemm(
                            m,
                            k,
                            n,
                            alpha,
                            a.as_ptr(),
                            sa,
                            b.as_ptr(),
                            sb,
                            beta,
                            c.as_mut_ptr(),
                            rsc,
                            bias,
                        )
                    };
                    // The f64 reference over the bf16-rounded operands.
                    let (ra, rb): (Vec<f32>, Vec<f32>) = (
                        a.iter().map(|&v| round_bf16(v)).collect(),
                        b.iter().map(|&v| round_bf16(v)).collect(),
                    );
                    let r = reference::gemm((m, k, n), alpha, &ra, sa, &rb, sb, beta, &c0, rsc);
                    let (want, mag) = (r.value, r.scale);
                    for i in 0..m {
                        for j in 0..n {
                            let plus = bias.map_or(0.0, |b| f64::from(b[j]));
                            let (got, w) = (f64::from(c[i * rsc + j]), want[i * n + j] + plus);
                            assert!(
                                (got - w).abs() <= 1e-5 * (mag[i * n + j] + 1.0),
                                "{m}x{k}x{n} layout {layout} α {alpha} β {beta} bias {with_bias} at ({i},{j}): {got} vs {w}"
                            );
                        }
                        // The padding columns of C are never written.
                        for j in n..rsc {
                            assert_eq!(c[i * rsc + j], c0[i * rsc + j]);
                        }
                    }
                }
            }
        }
    }

    /// A product split into row blocks or column blocks at multiples of 32
    /// (as the thread pool splits bf16 products) gives the same bits as the
    /// whole product: plain (β = 0), accumulating (β = 1) and with a bias.
    #[test]
    fn amx_split_products_are_bit_identical() {
        if !available() {
            eprintln!("AMX-BF16 not available on this CPU/OS: nothing to compare");
            return;
        }
        let (m, k, n) = (72, 200, 80);
        let mut rng = crate::rng::Rng::new(5);
        let a: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        // C[r0..r1, j0..j1] of the product, in place.
        let part = |c: &mut [f32],
                    (r0, r1): (usize, usize),
                    (j0, j1): (usize, usize),
                    beta,
                    bias: Option<&[f32]>| {
            // SAFETY: available; the block is inside A, B and C.
            unsafe {
                gemm(
                    r1 - r0,
                    k,
                    j1 - j0,
                    1.0,
                    a.as_ptr().add(r0 * k),
                    (k, 1),
                    b.as_ptr().add(j0),
                    (n, 1),
                    beta,
                    c.as_mut_ptr().add(r0 * n + j0),
                    n,
                    bias.map(|v| &v[j0..]),
                )
            }
        };
        for (beta, bias) in [(0.0, None), (1.0, None), (0.0, Some(&bias[..]))] {
            let mut whole = c0.clone();
            part(&mut whole, (0, m), (0, n), beta, bias);
            let (mut rows, mut cols) = (c0.clone(), c0.clone());
            for r in [(0, 32), (32, 64), (64, m)] {
                part(&mut rows, r, (0, n), beta, bias);
            }
            for j in [(0, 32), (32, 64), (64, n)] {
                part(&mut cols, (0, m), j, beta, bias);
            }
            assert_eq!(whole, rows, "β {beta}, bias {}", bias.is_some());
            assert_eq!(whole, cols, "β {beta}, bias {}", bias.is_some());
        }
    }

    /// NaN and ∞ in an operand reach C (a NaN loss must not be hidden).
    #[test]
    fn amx_products_propagate_nan_and_inf() {
        if !available() {
            eprintln!("AMX-BF16 not available on this CPU/OS: nothing to compare");
            return;
        }
        let (m, k, n) = (16, 32, 16);
        let mut a = vec![1.0f32; m * k];
        let b = vec![1.0f32; k * n];
        a[3 * k + 5] = f32::NAN;
        a[7 * k] = f32::INFINITY;
        let mut c = vec![0.0f32; m * n];
        // SAFETY: available; in bounds.
        unsafe {
            gemm(m, k, n, 1.0, a.as_ptr(), (k, 1), b.as_ptr(), (n, 1), 0.0, c.as_mut_ptr(), n, None)
        };
        assert!(c[3 * n..4 * n].iter().all(|v| v.is_nan()));
        assert!(c[7 * n..8 * n].iter().all(|v| *v == f32::INFINITY));
        assert!(c[..3 * n].iter().all(|v| *v == 32.0));
    }
}
