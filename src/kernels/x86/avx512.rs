//! x86-64 AVX-512F: 16 f32 lanes, 32 vector registers (so larger tiles than
//! AVX2), f16 conversion by `vcvtph2ps`/`vcvtps2ph` on zmm.

use core::arch::x86_64::*;

use crate::kernels::simd::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

// SAFETY: every method is only reached from functions compiled with
// `target_feature(enable = "avx512f,avx2,fma,f16c")`, called after detection.
unsafe impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: AVX-512F available (trait contract).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: AVX-512F available; `p` valid for 16 reads.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: AVX-512F available; `p` valid for 16 writes.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> __m512 {
        // SAFETY: AVX-512F available; `p` valid for 16 f16 reads (32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut half::f16, v: __m512) {
        // SAFETY: AVX-512F available; `p` valid for 16 f16 writes.
        unsafe { _mm256_storeu_si256(p.cast(), _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_reduce_add_ps(v) }
    }
}

crate::kernels::simd::tier_table! {
    tier: crate::kernels::Tier::Avx512,
    simd: Avx512,
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    tiles: down(4, 4) nn(4, 4) tn(4, 8, 8) vr(16, 4)
    gemm(12, 2)
}
