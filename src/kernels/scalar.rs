//! The portable tier: one f32 "lane", plain Rust, no target features. It is
//! the fallback on every CPU and the baseline every benchmark is measured
//! against. Its f16 conversions are the bit-exact software ones of `half`.

use super::simd::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Scalar;

// SAFETY: plain Rust, valid on every CPU.
unsafe impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;
    #[inline(always)]
    unsafe fn zero() -> f32 {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: caller guarantees `p` is valid for one read.
        unsafe { p.read() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        // SAFETY: caller guarantees `p` is valid for one write.
        unsafe { p.write(v) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> f32 {
        // SAFETY: as `load`.
        unsafe { p.read().to_f32_const() }
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut half::f16, v: f32) {
        // SAFETY: as `store`.
        unsafe { p.write(half::f16::from_f32_const(v)) }
    }
    #[inline(always)]
    unsafe fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn hsum(v: f32) -> f32 {
        v
    }
}

super::simd::tier_table! {
    tier: crate::kernels::Tier::Scalar,
    simd: Scalar,
    tiles: down(2, 4) nn(2, 4) tn(2, 4, 8) vr(4, 2)
    gemm(4, 4)
}
