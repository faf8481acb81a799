//! x86-64 AVX2 + FMA + F16C: 8 f32 lanes, 16 vector registers, hardware
//! f16 conversion (`vcvtph2ps` / `vcvtps2ph`, round to nearest even).

use core::arch::x86_64::*;

use crate::kernels::simd::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

// SAFETY: every method is only reached from functions compiled with
// `target_feature(enable = "avx2,fma,f16c")`, called after detection.
unsafe impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = __m256;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: AVX available (trait contract).
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        // SAFETY: AVX available.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: AVX available; `p` valid for 8 reads (trait contract).
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: AVX available; `p` valid for 8 writes.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> __m256 {
        // SAFETY: F16C available; `p` valid for 8 f16 reads (16 bytes).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut half::f16, v: __m256) {
        // SAFETY: F16C available; `p` valid for 8 f16 writes.
        unsafe { _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: FMA available.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX/SSE available.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
}

crate::kernels::simd::tier_table! {
    tier: crate::kernels::Tier::Avx2,
    simd: Avx2,
    #[target_feature(enable = "avx2,fma,f16c")]
    tiles: down(2, 4) nn(2, 4) tn(2, 4, 8) vr(8, 2)
    gemm(6, 2)
}
