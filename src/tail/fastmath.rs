//! Branch-free f32 `exp` and `erf` that the compiler vectorises, and the
//! element-wise loops of the tail's ops, split over the thread pool.
//!
//! libm's `exp` and an f64 `erf` per element were a fifth of a MiniLM
//! training step; these run at SIMD width. `exp` is Cephes' `expf`
//! (≤ 1 ulp over the normal range); `erf` is Abramowitz & Stegun 7.1.26 on
//! top of it (|error| ≤ 6e-7, checked against an f64 reference in the
//! tests).

use core::mem::MaybeUninit;

use alloc::vec::Vec;

use crate::parallel;

/// Elements per task handed to the pool.
const CHUNK: usize = 1 << 14;

/// `e^x` in f32: Cephes' range reduction and degree-5 polynomial; 0 below
/// −87 (never a subnormal: they cost ~100× on x86 in every later product),
/// saturates at e^88 above 88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let under = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5·2²³ trick: `floor` is a libm call
    // below SSE4.1 and would keep the loop scalar.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * core::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ from the bits of `t` = 1.5·2²³ + n (exact for |n| < 2²²), so no
    // float → int conversion (Rust's saturating `as` keeps the loop scalar).
    let y = y * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    if under { 0.0 } else { y }
}

/// The error function in f32 (|error| ≤ 6e-7).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_and_gauss(x).0
}

/// `(erf(x), e^(−x²))`: the Gaussian is a by-product of [`erf`], so GELU's
/// derivative (`Φ(x) + x·φ(x)`) needs one `exp`, not two.
#[inline(always)]
pub fn erf_and_gauss(x: f32) -> (f32, f32) {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let mut p = 1.061_405_4f32;
    p = p * t - 1.453_152;
    p = p * t + 1.421_413_7;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let g = exp(-z * z);
    ((1.0 - p * t * g).copysign(x), g)
}

// The loops below are compiled three times: for the baseline target, and
// inside `#[target_feature]` functions for AVX2+FMA and AVX-512F, so `exp`,
// `erf` and the ops' closures (inlined into them) run 8 or 16 lanes wide on
// a CPU that has them. The arithmetic is the same in every version (Rust
// never contracts `a·b + c` into an FMA by itself), so results are
// bit-identical across tiers. The tier follows `kernels::active()`, so
// `HYDRA_KERNELS=scalar` runs the baseline loops.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        #[inline(always)]
        pub(crate) fn $name(kern: &crate::kernels::Kernels, $($arg: $ty),*) {
            #[inline(always)]
            fn base($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) {
                base($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) {
                base($($arg),*)
            }
            match kern.tier() {
                // SAFETY: a `Kernels` table exists only for a tier this CPU
                // runs (`Kernels::for_tier` / `kernels::active`).
                #[cfg(target_arch = "x86_64")]
                crate::kernels::Tier::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                crate::kernels::Tier::Avx2 => unsafe { avx2($($arg),*) },
                _ => base($($arg),*),
            }
        }
    };
    ($(#[$doc:meta])* fn $name:ident<$F:ident: $bound:path>($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        #[inline(always)]
        fn $name<$F: $bound>(kern: &crate::kernels::Kernels, $($arg: $ty),*) {
            #[inline(always)]
            fn base<$F: $bound>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512<$F: $bound>($($arg: $ty),*) {
                base($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2<$F: $bound>($($arg: $ty),*) {
                base($($arg),*)
            }
            match kern.tier() {
                // SAFETY: a `Kernels` table exists only for a tier this CPU
                // runs (`Kernels::for_tier` / `kernels::active`).
                #[cfg(target_arch = "x86_64")]
                crate::kernels::Tier::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                crate::kernels::Tier::Avx2 => unsafe { avx2($($arg),*) },
                _ => base($($arg),*),
            }
        }
    };
}

pub(crate) use multiversion;

multiversion! {
    /// `o[i] = f(x[i])`.
    fn apply1<F: Fn(f32) -> f32>(o: &mut [MaybeUninit<f32>], x: &[f32], f: &F) {
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = MaybeUninit::new(f(x)));
    }
}

multiversion! {
    /// `o[i] = f(a[i], b[i])`.
    fn apply2<F: Fn(f32, f32) -> f32>(o: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32], f: &F) {
        o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = MaybeUninit::new(f(a, b)));
    }
}

multiversion! {
    /// `o[i] = f(a[i], b[i], c[i])`.
    fn apply3<F: Fn(f32, f32, f32) -> f32>(
        o: &mut [MaybeUninit<f32>],
        a: &[f32],
        b: &[f32],
        c: &[f32],
        f: &F
    ) {
        let n = o.len().min(a.len()).min(b.len()).min(c.len());
        let (o, a, b, c) = (&mut o[..n], &a[..n], &b[..n], &c[..n]);
        for i in 0..n {
            o[i] = MaybeUninit::new(f(a[i], b[i], c[i]));
        }
    }
}

multiversion! {
    /// `o[i] = f(a[i], b[i % b.len()])` over whole rows of `b.len()`.
    fn apply_rows<F: Fn(f32, f32) -> f32>(o: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32], f: &F) {
        for (o, a) in o.chunks_mut(b.len().max(1)).zip(a.chunks(b.len().max(1))) {
            o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = MaybeUninit::new(f(a, b)));
        }
    }
}

/// The active kernel table (its tier picks which copy of a multiversioned
/// loop runs).
pub(crate) fn tier() -> &'static crate::kernels::Kernels {
    crate::kernels::active()
}

/// A vector of `n` f32 that `fill` writes in parallel chunks of `chunk`,
/// with no zeroing pass first (a calloc of a recycled block is a memset: ~10 %
/// of a MiniLM step). `fill(i, o)` must write every element of `o`: each
/// caller hands its loop inputs sliced to exactly `o.len()` (a shorter input
/// panics at the slice, before anything could be left unwritten).
pub(crate) fn filled(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    parallel::chunks_mut(&mut out.spare_capacity_mut()[..n], chunk, n * 8, fill);
    // SAFETY: `fill` wrote all of the first `n` elements (contract above).
    unsafe { out.set_len(n) };
    out
}

/// `out[i] = f(x[i])`, in parallel chunks.
pub fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    filled(x.len(), CHUNK, |c, o| {
        apply1(tier(), o, &x[c * CHUNK..c * CHUNK + o.len()], &f);
    })
}

/// `out[i] = f(a[i], b[i])`, in parallel chunks.
pub fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    debug_assert_eq!(a.len(), b.len());
    filled(a.len(), CHUNK, |c, o| {
        let r = c * CHUNK..c * CHUNK + o.len();
        apply2(tier(), o, &a[r.clone()], &b[r], &f);
    })
}

/// `out[i] = f(a[i], b[i], c[i])`, in parallel chunks.
pub fn map3(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    f: impl Fn(f32, f32, f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    debug_assert!(a.len() == b.len() && a.len() == c.len());
    filled(a.len(), CHUNK, |k, o| {
        let r = k * CHUNK..k * CHUNK + o.len();
        apply3(tier(), o, &a[r.clone()], &b[r.clone()], &c[r], &f);
    })
}

/// `out[i] = f(a[i], b[i % b.len()])`: `b` repeats along `a` (a row vector
/// broadcast over rows, the common bias / scale case).
pub fn map_rows(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    if b.is_empty() {
        // Nothing to pair `a` with: no value is defined, so no loop runs
        // (and `filled` below would be handed chunks nobody writes).
        return alloc::vec![0.0; a.len()];
    }
    let w = b.len();
    let chunk = (CHUNK / w).max(1) * w;
    filled(a.len(), chunk, |c, o| {
        apply_rows(tier(), o, &a[c * chunk..c * chunk + o.len()], b, &f);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loops compiled for AVX2 and AVX-512 give the baseline's bits.
    #[test]
    fn every_tier_computes_the_same_bits() {
        let x: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0137).collect();
        let gelu = |x: f32| 0.5 * x * (1.0 + erf(x * core::f32::consts::FRAC_1_SQRT_2));
        let base = x.iter().map(|&x| gelu(x)).collect::<Vec<_>>();
        for t in crate::kernels::Tier::available() {
            let t = crate::kernels::Kernels::for_tier(t).unwrap();
            let mut o = vec![MaybeUninit::new(0.0f32); x.len()];
            // SAFETY: every element was initialised (zeros, then the loops).
            let done = |o: &[MaybeUninit<f32>]| {
                o.iter().map(|v| unsafe { v.assume_init() }).collect::<Vec<f32>>()
            };
            apply1(t, &mut o, &x, &gelu);
            let o1 = done(&o);
            assert!(o1.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()), "{}", t.tier());
            apply3(t, &mut o, &x, &x, &x, &|a: f32, b: f32, c: f32| exp(a) * b - c);
            let want = x.iter().map(|&a| exp(a) * a - a);
            assert!(
                done(&o).iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}",
                t.tier()
            );
        }
    }

    /// A row vector with nothing in it pairs with nothing: zeros, never
    /// memory no loop wrote.
    #[test]
    fn map_rows_with_an_empty_row_vector_gives_zeros() {
        assert_eq!(map_rows(&[1.0, 2.0, 3.0], &[], |a, b| a + b), vec![0.0; 3]);
        assert_eq!(
            map_rows(&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0], |a, b| a * b),
            vec![1.0, 4.0, 3.0, 8.0]
        );
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        for i in -80_000..=80_000 {
            let x = i as f32 * 1e-3;
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(-86.9).is_normal());
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn erf_matches_the_f64_reference() {
        let mut worst = 0.0f64;
        for i in -9_000..=9_000 {
            let x = i as f32 * 1e-3;
            let want = crate::tail::ops::unary::erf(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - want).abs());
        }
        assert!(worst < 7e-7, "abs error {worst}");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(-30.0), -1.0);
    }
}
