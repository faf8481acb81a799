//! Low-rank kernels: the handful of skinny products that Hydra training and
//! merging spend their time in, in f32 and f16, on every CPU tier.
//!
//! # Layouts
//! Every matrix is dense and row-major: element `(i, j)` of an `R×C` matrix
//! is at index `i*C + j`, so the row stride equals the width. Shapes are passed
//! explicitly (`n` rows of a batch, `d` input width, `m` output width, `r`
//! rank, `1 ≤ r ≤` [`MAX_RANK`]) and checked against the slice lengths at the
//! safe entry points below: a mismatch is a programming error and panics with
//! the shapes in the message. Products accumulate in f32 whatever the storage
//! type; f16 stores round to nearest, ties to even.
//!
//! | kernel                  | computes                      | shapes                          |
//! |-------------------------|-------------------------------|---------------------------------|
//! | [`Kernels::down_f32`]/[`Kernels::down_f16`] | `U = X·Aᵀ`     | X n×d, A r×d, U n×r            |
//! | [`Kernels::up`]         | `Y += s·U·Bᵀ`                 | U n×r, B m×r, Y n×m             |
//! | [`Kernels::grad_u`]     | `dU = dY·B`                   | dY n×m, B m×r, dU n×r           |
//! | [`Kernels::grad_x`]     | `dX += s·dU·A`                | dU n×r, A r×d, dX n×d           |
//! | [`Kernels::grad_a_f32`]/[`Kernels::grad_a_f16`] | `dA += s·dUᵀ·X` | dU n×r, X n×d, dA r×d |
//! | [`Kernels::grad_b`]     | `dB += s·dYᵀ·U`               | dY n×m, U n×r, dB m×r           |
//! | [`Kernels::merge_f32`]/[`Kernels::merge_f16`] | `W += s·B·A` | B m×r, A r×d, W m×d        |
//! | [`Kernels::f16_to_f32`]/[`Kernels::f32_to_f16`] | bulk conversion | equal lengths        |
//!
//! # Tiers and dispatch
//! `scalar` runs everywhere; `avx2` needs AVX2+FMA+F16C; `avx512` needs
//! AVX-512F (plus the AVX2 set); on aarch64 `neon` needs Advanced SIMD
//! (Raspberry Pi 4 class) and `fp16` also FEAT_FP16 (Raspberry Pi 5, Jetson
//! Orin). Detection runs once and its answer is cached ([`active`]);
//! `HYDRA_KERNELS=scalar|avx2|avx512|neon|fp16` forces a tier and fails
//! loudly if the CPU lacks it. [`Kernels::for_tier`] hands out any tier the
//! CPU has, so tests and benches can run every tier on one machine. Without
//! `std` the choice is made from compile-time target features.
//!
//! All tiers share one generic body ([`simd`]); a tier file only supplies the
//! vector primitives and a `#[target_feature]` wrapper per kernel.

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod generic;
pub mod reference;
mod scalar;
mod simd;
#[cfg(feature = "std")]
pub mod stats;
#[cfg(target_arch = "x86_64")]
mod x86;

use core::sync::atomic::{AtomicU8, Ordering};

use alloc::string::ToString;
use half::f16;

use crate::error::{Error, Result};

/// Largest rank the kernels accept (bounds their stack buffers).
pub const MAX_RANK: usize = 64;

/// A kernel tier: one instruction-set level with its own implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Portable Rust, the fallback everywhere.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C, 8 lanes.
    Avx2,
    /// x86-64 AVX-512F, 16 lanes.
    Avx512,
    /// aarch64 Advanced SIMD, 4 lanes; f16 through conversion.
    Neon,
    /// aarch64 Advanced SIMD + FEAT_FP16 (half-precision arithmetic).
    Fp16,
}

impl Tier {
    /// Every tier, from the most portable to the widest.
    pub const ALL: [Tier; 5] = [Tier::Scalar, Tier::Avx2, Tier::Avx512, Tier::Neon, Tier::Fp16];

    /// The tier's name, as `HYDRA_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Neon => "neon",
            Tier::Fp16 => "fp16",
        }
    }

    /// Parses a tier name (`scalar`, `avx2`, `avx512`, `neon`, `fp16`).
    pub fn parse(name: &str) -> Result<Tier> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name() == name.trim())
            .ok_or_else(|| Error::UnknownTier(name.to_string()))
    }

    /// Whether this CPU (or, without `std`, this build's target features) can run the tier.
    pub fn is_supported(self) -> bool {
        match self {
            Tier::Scalar => true,
            #[cfg(all(target_arch = "x86_64", feature = "std"))]
            Tier::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(all(target_arch = "x86_64", feature = "std"))]
            Tier::Avx512 => Tier::Avx2.is_supported() && std::is_x86_feature_detected!("avx512f"),
            #[cfg(all(target_arch = "x86_64", not(feature = "std")))]
            Tier::Avx2 => {
                cfg!(all(target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))
            }
            #[cfg(all(target_arch = "x86_64", not(feature = "std")))]
            Tier::Avx512 => cfg!(all(
                target_feature = "avx2",
                target_feature = "fma",
                target_feature = "f16c",
                target_feature = "avx512f"
            )),
            #[cfg(not(target_arch = "x86_64"))]
            Tier::Avx2 | Tier::Avx512 => false,
            #[cfg(all(target_arch = "aarch64", feature = "std"))]
            Tier::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(all(target_arch = "aarch64", feature = "std"))]
            Tier::Fp16 => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("fp16")
            }
            #[cfg(all(target_arch = "aarch64", not(feature = "std")))]
            Tier::Neon => cfg!(target_feature = "neon"),
            #[cfg(all(target_arch = "aarch64", not(feature = "std")))]
            Tier::Fp16 => cfg!(all(target_feature = "neon", target_feature = "fp16")),
            #[cfg(not(target_arch = "aarch64"))]
            Tier::Neon | Tier::Fp16 => false,
        }
    }

    /// The tiers this machine can run, most portable first.
    pub fn available() -> impl Iterator<Item = Tier> {
        Tier::ALL.into_iter().filter(|t| t.is_supported())
    }

    /// Whether the crate's own packed sgemm ([`Kernels::sgemm`]) is the one
    /// the tail's dense products use on this tier. It is where it was
    /// measured to win (`examples/gemm_choice`: AVX-512 ~2× matrixmultiply on
    /// the MiniLM tail's shapes, AVX2 on par); elsewhere (the scalar tier,
    /// and NEON until it is measured on a board rather than under qemu)
    /// matrixmultiply runs them.
    pub fn has_fast_sgemm(self) -> bool {
        matches!(self, Tier::Avx2 | Tier::Avx512)
    }

    /// The widest tier this machine can run.
    pub fn best() -> Tier {
        Tier::available().last().unwrap_or(Tier::Scalar)
    }

    fn table(self) -> &'static Kernels {
        match self {
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => &x86::avx2::TABLE,
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => &x86::avx512::TABLE,
            #[cfg(target_arch = "aarch64")]
            Tier::Neon => &aarch64::neon::TABLE,
            #[cfg(target_arch = "aarch64")]
            Tier::Fp16 => &aarch64::fp16::TABLE,
            _ => &scalar::TABLE,
        }
    }
}

impl core::fmt::Display for Tier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The tier named by `HYDRA_KERNELS`, or the best one detected.
///
/// Errors if the variable names an unknown tier or one this CPU lacks.
pub fn select() -> Result<Tier> {
    #[cfg(feature = "std")]
    if let Ok(name) = std::env::var("HYDRA_KERNELS") {
        let tier = Tier::parse(&name)?;
        if !tier.is_supported() {
            return Err(Error::TierUnavailable {
                tier: tier.name().to_string(),
                reason: "this CPU lacks the instructions it needs (HYDRA_KERNELS)",
            });
        }
        return Ok(tier);
    }
    Ok(Tier::best())
}

/// Whether AMX-BF16 products can run here (see `runtime::set_matmul_precision`).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
pub(crate) fn amx_available() -> bool {
    x86::amx::available()
}

/// `C = α·A·B + β·C (+ bias row)` with bf16-rounded operands on AMX.
///
/// # Safety
/// [`amx_available`] is true; the bounds of [`Kernels::sgemm`] hold; with
/// `β = 0`, C may be uninitialised.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn amx_gemm(
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
    stats::count_bf16_product();
    // SAFETY: the caller's contract.
    unsafe { x86::amx::gemm(m, k, n, alpha, a, sa, b, sb, beta, c, rsc, bias) }
}

/// A product operand packed into AMX bf16 tiles once (frozen weights).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
pub(crate) use x86::amx::PackedB;

/// [`amx_gemm`] with B packed beforehand, for columns `j0..j0 + cols` of it
/// (`j0` a multiple of 32; `cols` whole 32-column blocks or to B's end).
///
/// # Safety
/// As [`amx_gemm`] for A (m × B's rows) and C (m × cols).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn amx_gemm_packed(
    m: usize,
    alpha: f32,
    a: *const f32,
    sa: (usize, usize),
    b: &PackedB,
    cols: (usize, usize),
    beta: f32,
    c: *mut f32,
    rsc: usize,
    bias: Option<&[f32]>,
) {
    stats::count_bf16_product();
    // SAFETY: the caller's contract.
    unsafe { x86::amx::gemm_packed(m, alpha, a, sa, b, cols, beta, c, rsc, bias) }
}

/// An f32 rounded to bf16 as the bf16 products round their operands.
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// The bits of [`round_bf16`]`(x)` as a bf16 (nearest-even; a NaN stays a
/// quiet NaN, ±∞ stays ±∞): what the GPU's bf16 products upload.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return ((b | 0x0040_0000) >> 16) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// 0 = not chosen yet, otherwise 1 + index in `Tier::ALL`.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The kernel table in use, chosen by [`select`] on the first call and cached.
///
/// # Panics
/// If `HYDRA_KERNELS` names an unknown tier or one this CPU cannot run: a
/// forced tier that silently fell back would hide exactly what it was set to
/// test. Call [`select`] first to get that as an `Error` instead.
pub fn active() -> &'static Kernels {
    let cached = ACTIVE.load(Ordering::Relaxed);
    let tier = if cached == 0 {
        let tier = select().unwrap_or_else(|e| panic!("hydra-edge kernels: {e}"));
        let idx = Tier::ALL.iter().position(|&t| t == tier).unwrap_or(0);
        ACTIVE.store(idx as u8 + 1, Ordering::Relaxed);
        tier
    } else {
        Tier::ALL[usize::from(cached - 1)]
    };
    tier.table()
}

/// One tier's kernels. Obtainable only for a tier the CPU supports, which is
/// what makes the safe methods sound.
pub struct Kernels {
    pub(crate) tier: Tier,
    pub(crate) f16_to_f32: ConvertFn<f16, f32>,
    pub(crate) f32_to_f16: ConvertFn<f32, f16>,
    pub(crate) down_f32: DownFn<f32>,
    pub(crate) down_f16: DownFn<f16>,
    pub(crate) up: ScaledFn<f32, f32, f32>,
    pub(crate) grad_u: DownFn<f32>,
    pub(crate) grad_x: ScaledFn<f32, f32, f32>,
    pub(crate) grad_a_f32: ScaledFn<f32, f32, f32>,
    pub(crate) grad_a_f16: ScaledFn<f32, f16, f32>,
    pub(crate) grad_b: ScaledFn<f32, f32, f32>,
    pub(crate) merge_f32: ScaledFn<f32, f32, f32>,
    pub(crate) merge_f16: ScaledFn<f32, f32, f16>,
    pub(crate) sgemm: SgemmFn,
}

/// A tier's packed sgemm `(m, k, n, α, A, (rsa, csa), B, (rsb, csb), β, C,
/// rsc, bias)`: `bias`, null or a row of `n` added to every row of C, only
/// with `β = 0`.
pub(crate) type SgemmFn = unsafe fn(
    usize,
    usize,
    usize,
    f32,
    *const f32,
    (usize, usize),
    *const f32,
    (usize, usize),
    f32,
    *mut f32,
    usize,
    *const f32,
);

/// A tier's bulk conversion.
pub(crate) type ConvertFn<A, B> = unsafe fn(&[A], &mut [B]);
/// A tier's unscaled product `(lhs, rhs, out, three dims)`.
pub(crate) type DownFn<X> = unsafe fn(&[X], &[f32], &mut [f32], usize, usize, usize);
/// A tier's scaled, accumulating product `(lhs, rhs, out, s, three dims)`.
pub(crate) type ScaledFn<A, B, C> = unsafe fn(&[A], &[B], &mut [C], f32, usize, usize, usize);

#[track_caller]
fn check(what: &str, name: &str, len: usize, rows: usize, cols: usize) {
    assert!(
        rows.checked_mul(cols) == Some(len),
        "{what}: {name} has {len} elements, expected {rows}×{cols}"
    );
}

#[track_caller]
fn check_rank(what: &str, r: usize) {
    assert!((1..=MAX_RANK).contains(&r), "{what}: rank {r} outside 1..={MAX_RANK}");
}

impl Kernels {
    /// The table of `tier`, or an error if this CPU cannot run it.
    pub fn for_tier(tier: Tier) -> Result<&'static Kernels> {
        if tier.is_supported() {
            Ok(tier.table())
        } else {
            Err(Error::TierUnavailable {
                tier: tier.name().to_string(),
                reason: "this CPU lacks the instructions it needs",
            })
        }
    }

    /// Which tier this table implements.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// `dst[i] = src[i]` widened exactly (NaN payloads kept, quieted).
    #[track_caller]
    pub fn f16_to_f32(&self, src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "f16_to_f32: length mismatch");
        // SAFETY: the table exists only for a supported tier; lengths checked.
        unsafe { (self.f16_to_f32)(src, dst) }
    }

    /// `dst[i] = round_to_nearest_even(src[i])`; overflow gives ±Inf, NaN stays NaN.
    #[track_caller]
    pub fn f32_to_f16(&self, src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len(), "f32_to_f16: length mismatch");
        // SAFETY: as above.
        unsafe { (self.f32_to_f16)(src, dst) }
    }

    /// `C[m×n] = α·A[m×k]·B[k×n] + β·C` with strided A and B
    /// (`A(i, p) = a[i·rsa + p·csa]`, `B(p, j) = b[p·rsb + j·csb]`) and C
    /// row-major with row stride `rsc ≥ n`; `β = 0` never reads C. Packed,
    /// register-blocked, single-threaded (callers split it: see
    /// `hydra::gemm`); each element of C is summed along `k` in one order
    /// wherever it falls in the tiling, so a split along rows or columns is
    /// bit-identical to the whole product.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        &self,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: &[f32],
        sa: (usize, usize),
        b: &[f32],
        sb: (usize, usize),
        beta: f32,
        c: &mut [f32],
        rsc: usize,
    ) {
        let extent = |rows: usize, cols: usize, rs: usize, cs: usize| -> Option<usize> {
            if rows == 0 || cols == 0 {
                Some(0)
            } else {
                (rows - 1).checked_mul(rs)?.checked_add((cols - 1).checked_mul(cs)?)?.checked_add(1)
            }
        };
        assert!(extent(m, k, sa.0, sa.1).is_some_and(|e| a.len() >= e), "sgemm: A too short");
        assert!(extent(k, n, sb.0, sb.1).is_some_and(|e| b.len() >= e), "sgemm: B too short");
        assert!(
            rsc >= n && extent(m, n, rsc, 1).is_some_and(|e| c.len() >= e),
            "sgemm: C too short"
        );
        // SAFETY: supported tier; every element the strides reach is inside
        // its slice (asserted); `c` is a unique borrow, so it aliases neither.
        unsafe {
            (self.sgemm)(
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
                core::ptr::null(),
            )
        }
    }

    /// `U[n×r] = X[n×d]·Aᵀ` with `A` r×d.
    #[track_caller]
    pub fn down_f32(&self, x: &[f32], a: &[f32], u: &mut [f32], n: usize, d: usize, r: usize) {
        check_down("down_f32", x.len(), a.len(), u.len(), n, d, r);
        // SAFETY: supported tier; every length matches its shape.
        unsafe { (self.down_f32)(x, a, u, n, d, r) }
    }

    /// `U[n×r] = X[n×d]·Aᵀ` with f16 activations, f32 accumulation.
    #[track_caller]
    pub fn down_f16(&self, x: &[f16], a: &[f32], u: &mut [f32], n: usize, d: usize, r: usize) {
        check_down("down_f16", x.len(), a.len(), u.len(), n, d, r);
        #[cfg(feature = "std")]
        stats::count_f16_call();
        // SAFETY: as above.
        unsafe { (self.down_f16)(x, a, u, n, d, r) }
    }

    /// `Y[n×m] += s·U[n×r]·Bᵀ` with `B` m×r.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn up(&self, u: &[f32], b: &[f32], y: &mut [f32], s: f32, n: usize, m: usize, r: usize) {
        check_rank("up", r);
        check("up", "U", u.len(), n, r);
        check("up", "B", b.len(), m, r);
        check("up", "Y", y.len(), n, m);
        // SAFETY: as above.
        unsafe { (self.up)(u, b, y, s, n, m, r) }
    }

    /// `dU[n×r] = dY[n×m]·B[m×r]` (overwrites `dU`).
    #[track_caller]
    pub fn grad_u(&self, dy: &[f32], b: &[f32], du: &mut [f32], n: usize, m: usize, r: usize) {
        check_rank("grad_u", r);
        check("grad_u", "dY", dy.len(), n, m);
        check("grad_u", "B", b.len(), m, r);
        check("grad_u", "dU", du.len(), n, r);
        // SAFETY: as above.
        unsafe { (self.grad_u)(dy, b, du, n, m, r) }
    }

    /// `dX[n×d] += s·dU[n×r]·A[r×d]`.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn grad_x(
        &self,
        du: &[f32],
        a: &[f32],
        dx: &mut [f32],
        s: f32,
        n: usize,
        d: usize,
        r: usize,
    ) {
        check_rank("grad_x", r);
        check("grad_x", "dU", du.len(), n, r);
        check("grad_x", "A", a.len(), r, d);
        check("grad_x", "dX", dx.len(), n, d);
        // SAFETY: as above.
        unsafe { (self.grad_x)(du, a, dx, s, n, d, r) }
    }

    /// `dA[r×d] += s·dUᵀ·X` with `dU` n×r, `X` n×d (f32).
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn grad_a_f32(
        &self,
        du: &[f32],
        x: &[f32],
        da: &mut [f32],
        s: f32,
        n: usize,
        d: usize,
        r: usize,
    ) {
        check_grad_a("grad_a_f32", du.len(), x.len(), da.len(), n, d, r);
        // SAFETY: as above.
        unsafe { (self.grad_a_f32)(du, x, da, s, n, d, r) }
    }

    /// `dA[r×d] += s·dUᵀ·X` with f16 activations.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn grad_a_f16(
        &self,
        du: &[f32],
        x: &[f16],
        da: &mut [f32],
        s: f32,
        n: usize,
        d: usize,
        r: usize,
    ) {
        check_grad_a("grad_a_f16", du.len(), x.len(), da.len(), n, d, r);
        #[cfg(feature = "std")]
        stats::count_f16_call();
        // SAFETY: as above.
        unsafe { (self.grad_a_f16)(du, x, da, s, n, d, r) }
    }

    /// `dB[m×r] += s·dYᵀ·U` with `dY` n×m, `U` n×r.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn grad_b(
        &self,
        dy: &[f32],
        u: &[f32],
        db: &mut [f32],
        s: f32,
        n: usize,
        m: usize,
        r: usize,
    ) {
        check_rank("grad_b", r);
        check("grad_b", "dY", dy.len(), n, m);
        check("grad_b", "U", u.len(), n, r);
        check("grad_b", "dB", db.len(), m, r);
        // SAFETY: as above.
        unsafe { (self.grad_b)(dy, u, db, s, n, m, r) }
    }

    /// `W[m×d] += s·B[m×r]·A[r×d]` (the rank-r merge update), W in f32.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn merge_f32(
        &self,
        b: &[f32],
        a: &[f32],
        w: &mut [f32],
        s: f32,
        m: usize,
        d: usize,
        r: usize,
    ) {
        check_merge("merge_f32", b.len(), a.len(), w.len(), m, d, r);
        // SAFETY: as above.
        unsafe { (self.merge_f32)(b, a, w, s, m, d, r) }
    }

    /// `W[m×d] += s·B·A` with W stored f16: each element is widened, updated
    /// in f32 and rounded once.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn merge_f16(
        &self,
        b: &[f32],
        a: &[f32],
        w: &mut [f16],
        s: f32,
        m: usize,
        d: usize,
        r: usize,
    ) {
        check_merge("merge_f16", b.len(), a.len(), w.len(), m, d, r);
        // SAFETY: as above.
        unsafe { (self.merge_f16)(b, a, w, s, m, d, r) }
    }
}

#[track_caller]
fn check_down(what: &str, x: usize, a: usize, u: usize, n: usize, d: usize, r: usize) {
    check_rank(what, r);
    check(what, "X", x, n, d);
    check(what, "A", a, r, d);
    check(what, "U", u, n, r);
}

#[track_caller]
fn check_grad_a(what: &str, du: usize, x: usize, da: usize, n: usize, d: usize, r: usize) {
    check_rank(what, r);
    check(what, "dU", du, n, r);
    check(what, "X", x, n, d);
    check(what, "dA", da, r, d);
}

#[track_caller]
fn check_merge(what: &str, b: usize, a: usize, w: usize, m: usize, d: usize, r: usize) {
    check_rank(what, r);
    check(what, "B", b, m, r);
    check(what, "A", a, r, d);
    check(what, "W", w, m, d);
}
