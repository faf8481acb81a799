//! aarch64 Advanced SIMD (NEON): 4 f32 lanes, 32 vector registers (so the
//! larger, AVX-512-sized tiles: up to 16 accumulators plus operands fit),
//! f16 widened by `fcvtl` and narrowed by `fcvtn`, which rounds to nearest
//! even under the default FPCR (Linux's, and what firmware start-up code
//! sets), exactly like `half` and the x86 tiers.
//!
//! Both conversions are base ARMv8 instructions, not FEAT_FP16: this tier
//! needs nothing beyond `neon`, which every aarch64 Linux CPU has. The
//! [`Neon`] primitives are shared with the FP16 tier (see `fp16.rs`).

use core::arch::aarch64::*;

use crate::kernels::simd::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Neon;

// SAFETY: every method is only reached from functions compiled with
// `target_feature(enable = "neon")` (or a superset), called after detection.
unsafe impl Simd for Neon {
    const LANES: usize = 4;
    type V = float32x4_t;
    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        // SAFETY: NEON available (trait contract).
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        // SAFETY: NEON available.
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: NEON available; `p` valid for 4 reads (trait contract).
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: NEON available; `p` valid for 4 writes.
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> float32x4_t {
        // SAFETY: NEON available; `p` valid for 4 f16 reads (8 bytes), read
        // as their bit patterns and widened exactly by `fcvtl`.
        unsafe { vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p.cast()))) }
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut half::f16, v: float32x4_t) {
        // SAFETY: NEON available; `p` valid for 4 f16 writes. `fcvtn` rounds
        // by FPCR.RMode, nearest-even unless the program changed it.
        unsafe { vst1_u16(p.cast(), vreinterpret_u16_f16(vcvt_f16_f32(v))) }
    }
    #[inline(always)]
    unsafe fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available; `fmla` is fused, computing c + a·b.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn hsum(v: float32x4_t) -> f32 {
        // SAFETY: NEON available (`faddp` pairwise across the vector).
        unsafe { vaddvq_f32(v) }
    }
}

crate::kernels::simd::tier_table! {
    tier: crate::kernels::Tier::Neon,
    simd: Neon,
    #[target_feature(enable = "neon")]
    tiles: down(4, 4) nn(4, 4) tn(4, 8, 8) vr(16, 4)
    gemm(8, 2)
}
