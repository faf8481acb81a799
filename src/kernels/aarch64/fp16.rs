//! aarch64 Advanced SIMD + FEAT_FP16 (Raspberry Pi 5's Cortex-A76, Jetson
//! Orin's Cortex-A78AE): the NEON primitives compiled with `fp16` enabled,
//! one table of its own so that dispatch, `HYDRA_KERNELS=fp16` and the tier
//! tests name this class of CPU.
//!
//! # Where half-precision arithmetic is used: nowhere, by choice
//! Every kernel here accumulates in f32, like the NEON tier; FP16 enters only
//! through the f16↔f32 conversions, which are exact (widening) or a single
//! round-to-nearest-even (narrowing) either way. Native f16 arithmetic
//! (`fmla .8h`) was weighed kernel by kernel against the tier tests'
//! tolerances (`tests/common`: `4·2⁻²⁴·√(k+1) + 2·2⁻²⁴` relative to `Σ|term|`,
//! about 7·10⁻⁶ for k = 768 terms) and against what the kernels are for:
//! - **down/grad products** (`down_f16`, `grad_a_f16`, …): every f16 multiply
//!   and add rounds at 2⁻¹¹ ≈ 4.9·10⁻⁴, so a 768-term dot product of f16
//!   inputs is off by up to 1.7·10⁻⁴ of `Σ|term|`, 25 times the bound
//!   (the test below measures it, under qemu's cortex-a76 in CI), while the
//!   f32-accumulating body stays at 4·10⁻⁸. Weight gradients also routinely
//!   fall below f16's smallest normal (6.1·10⁻⁵) and sums of activations
//!   rise above its largest (65504).
//! - **`merge_f16`** (f16 result): the test allows one f16 rounding of the
//!   final value; an f16 update would add one per rank step, or at least a
//!   second one for the update itself, which exceeds it whenever `s·B·A` is
//!   not tiny next to `W`.
//! - **conversions**: `fcvtl`/`fcvtn` are already base ARMv8; FP16 offers no
//!   faster exact path.
//!
//! The only FP16 widening product that is exact, `fmlal` (f16×f16 into f32),
//! is FEAT_FHM, which neither the Cortex-A76 nor the A78AE has.
//!
//! So on these CPUs the win from FP16 would come only from kernels whose
//! output is f16 at f16 tolerance (inference-only paths); when such a kernel
//! exists, this table is where its `fmla .8h` body goes.

use super::neon::Neon;

crate::kernels::simd::tier_table! {
    tier: crate::kernels::Tier::Fp16,
    simd: Neon,
    #[target_feature(enable = "neon,fp16")]
    tiles: down(4, 4) nn(4, 4) tn(4, 8, 8) vr(16, 4)
    gemm(8, 2)
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use core::arch::aarch64::*;
    use std::io::Write;

    use half::f16;

    use crate::kernels::{Kernels, Tier};
    use crate::rng::Rng;

    /// `Σ x[i]·a[i]` accumulated natively in f16, eight lanes of `fmla .8h`,
    /// the lanes summed in f32 at the end: what an FP16-arithmetic `down_f16`
    /// would compute.
    ///
    /// # Safety
    /// The CPU has NEON and FEAT_FP16; `x.len() == a.len()`, a multiple of 8.
    #[target_feature(enable = "neon,fp16")]
    unsafe fn dot_native_f16(x: &[f16], a: &[f16]) -> f32 {
        debug_assert!(x.len() == a.len() && x.len().is_multiple_of(8));
        // SAFETY: FP16 available (caller); each load reads 8 in-bounds f16.
        unsafe {
            let mut acc = vreinterpretq_f16_u16(vdupq_n_u16(0));
            for j in (0..x.len()).step_by(8) {
                let xv = vreinterpretq_f16_u16(vld1q_u16(x.as_ptr().add(j).cast()));
                let av = vreinterpretq_f16_u16(vld1q_u16(a.as_ptr().add(j).cast()));
                acc = vfmaq_f16(acc, xv, av);
            }
            vaddvq_f32(vcvt_f32_f16(vget_low_f16(acc))) + vaddvq_f32(vcvt_high_f32_f16(acc))
        }
    }

    #[test]
    fn native_f16_accumulation_misses_the_kernel_tolerance() {
        if !Tier::Fp16.is_supported() {
            // The real stderr, past libtest's capture: the log says it did not run.
            let _ =
                writeln!(std::io::stderr(), "no FEAT_FP16 here: native-f16 accuracy not measured");
            return;
        }
        let kernels = Kernels::for_tier(Tier::Fp16).unwrap();
        let d = 768;
        // The kernel tests' bound for a d-term sum, relative to Σ|term|.
        let tol = 4.0 * 2f64.powi(-24) * ((d + 1) as f64).sqrt() + 2.0 * 2f64.powi(-24);
        let mut rng = Rng::new(16);
        let (mut worst_native, mut worst_f32) = (0.0f64, 0.0f64);
        for _ in 0..32 {
            let x: std::vec::Vec<f16> =
                (0..d).map(|_| f16::from_f32(rng.uniform(-1.0, 1.0))).collect();
            // A is f32 in the kernels; give it f16 values so the only
            // difference between the two paths is where they accumulate.
            let a16: std::vec::Vec<f16> =
                (0..d).map(|_| f16::from_f32(rng.uniform(-1.0, 1.0))).collect();
            let a: std::vec::Vec<f32> = a16.iter().map(|h| h.to_f32()).collect();
            let (mut exact, mut scale) = (0.0f64, 0.0f64);
            for (xi, ai) in x.iter().zip(&a) {
                let t = f64::from(xi.to_f32()) * f64::from(*ai);
                exact += t;
                scale += t.abs();
            }
            // SAFETY: FP16 detected above; equal lengths, 768 = 96·8.
            let native = unsafe { dot_native_f16(&x, &a16) };
            let mut u = [0.0f32];
            kernels.down_f16(&x, &a, &mut u, 1, d, 1);
            worst_native = worst_native.max((f64::from(native) - exact).abs() / scale);
            worst_f32 = worst_f32.max((f64::from(u[0]) - exact).abs() / scale);
        }
        let _ = writeln!(
            std::io::stderr(),
            "d={d}: worst error / Σ|term|: native f16 {worst_native:.2e}, \
             f32 accumulation (fp16 tier) {worst_f32:.2e}, bound {tol:.2e}"
        );
        assert!(worst_f32 <= tol, "the tier's f32 accumulation must meet the bound");
        assert!(worst_native > 10.0 * tol, "native f16 would meet the bound: revisit the header");
    }
}
