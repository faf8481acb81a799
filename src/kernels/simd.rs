//! The vector primitives every tier supplies, the storage types the kernels
//! read and write, and the macro that turns the generic bodies into one
//! tier's table of `#[target_feature]` functions.
//!
//! A tier is a zero-sized type implementing [`Simd`]; its methods are
//! `#[inline(always)]` so that, inlined into a `#[target_feature]` wrapper,
//! they compile to that tier's instructions (the matrixmultiply pattern).

use half::f16;

/// Widest vector of any tier, in f32 lanes (sizes the tail buffers).
pub(crate) const MAX_LANES: usize = 16;

/// One ISA tier's f32 vector.
///
/// # Safety
/// Every method may only be called where the tier's CPU features are
/// available, and pointer arguments must be valid for `LANES` elements.
pub(crate) unsafe trait Simd {
    /// f32 lanes per vector.
    const LANES: usize;
    /// The vector type.
    type V: Copy;
    /// All lanes zero.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Loads `LANES` f32 (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// Stores `LANES` f32 (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Loads `LANES` f16 and widens them exactly.
    unsafe fn load_f16(p: *const f16) -> Self::V;
    /// Rounds to f16 (nearest, ties to even) and stores `LANES` of them.
    unsafe fn store_f16(p: *mut f16, v: Self::V);
    /// `a·b + c` (fused where the tier has FMA).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Sum of the lanes.
    unsafe fn hsum(v: Self::V) -> f32;
}

/// A storage type of activations or weights: f32 or f16.
pub(crate) trait Elem: Copy + 'static {
    const ZERO: Self;
    /// Exact widening (portable path, used for tails and the scalar tier).
    fn to_f32(self) -> f32;
    /// Rounding to nearest even (portable path).
    fn from_f32(x: f32) -> Self;
    /// # Safety
    /// As [`Simd::load`].
    unsafe fn vload<S: Simd>(p: *const Self) -> S::V;
    /// # Safety
    /// As [`Simd::store`].
    unsafe fn vstore<S: Simd>(p: *mut Self, v: S::V);
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn vload<S: Simd>(p: *const Self) -> S::V {
        // SAFETY: forwarded precondition.
        unsafe { S::load(p) }
    }
    #[inline(always)]
    unsafe fn vstore<S: Simd>(p: *mut Self, v: S::V) {
        // SAFETY: forwarded precondition.
        unsafe { S::store(p, v) }
    }
}

impl Elem for f16 {
    const ZERO: Self = f16::ZERO;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32_const()
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32_const(x)
    }
    #[inline(always)]
    unsafe fn vload<S: Simd>(p: *const Self) -> S::V {
        // SAFETY: forwarded precondition.
        unsafe { S::load_f16(p) }
    }
    #[inline(always)]
    unsafe fn vstore<S: Simd>(p: *mut Self, v: S::V) {
        // SAFETY: forwarded precondition.
        unsafe { S::store_f16(p, v) }
    }
}

/// Loads `len < LANES` elements, zero-filling the other lanes.
///
/// # Safety
/// `p` valid for `len` reads; tier features available.
#[inline(always)]
pub(crate) unsafe fn vload_partial<S: Simd, E: Elem>(p: *const E, len: usize) -> S::V {
    let mut buf = [E::ZERO; MAX_LANES];
    // SAFETY: `len < LANES ≤ MAX_LANES`, `p` valid for `len` reads.
    unsafe {
        core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
        E::vload::<S>(buf.as_ptr())
    }
}

/// Stores the first `len < LANES` lanes of `v`.
///
/// # Safety
/// `p` valid for `len` writes; tier features available.
#[inline(always)]
pub(crate) unsafe fn vstore_partial<S: Simd, E: Elem>(p: *mut E, v: S::V, len: usize) {
    let mut buf = [E::ZERO; MAX_LANES];
    // SAFETY: as `vload_partial`.
    unsafe {
        E::vstore::<S>(buf.as_mut_ptr(), v);
        core::ptr::copy_nonoverlapping(buf.as_ptr(), p, len);
    }
}

/// Instantiates the generic kernels for one tier and builds its `TABLE`.
///
/// `tiles` fixes the register blocking of each kernel family, chosen per
/// tier from its register count: `down(rows, ranks)`, `nn(rows, vectors)`,
/// `tn(vectors for 4, 2, 1 ranks)`, `vr(outputs for 1 vector, outputs for 4 vectors)`,
/// `gemm(rows, vectors)` (the packed sgemm's micro-tile).
macro_rules! tier_table {
    (
        tier: $tier:expr,
        simd: $S:ty,
        $(#[$attr:meta])*
        tiles: down($dm:literal, $dk:literal) nn($nm:literal, $nv:literal)
               tn($t4:literal, $t2:literal, $t1:literal) vr($vr1:literal, $vr4:literal)
               gemm($gm:literal, $gv:literal)
    ) => {
        use half::f16;
        use $crate::kernels::generic as g;
        use $crate::kernels::Kernels;

        $(#[$attr])*
        /// # Safety
        /// Tier features available; lengths checked by `Kernels`.
        unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
            // SAFETY: forwarded precondition.
            unsafe { g::convert::<$S, f16, f32>(src, dst) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
            // SAFETY: forwarded precondition.
            unsafe { g::convert::<$S, f32, f16>(src, dst) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn down_f32(x: &[f32], a: &[f32], u: &mut [f32], n: usize, d: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::down::<$S, f32, $dm, $dk>(x, a, u, n, d, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn down_f16(x: &[f16], a: &[f32], u: &mut [f32], n: usize, d: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::down::<$S, f16, $dm, $dk>(x, a, u, n, d, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn up(u: &[f32], b: &[f32], y: &mut [f32], s: f32, n: usize, m: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::up::<$S, $nm, $nv>(u, b, y, s, n, m, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn grad_u(dy: &[f32], b: &[f32], du: &mut [f32], n: usize, m: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::grad_u::<$S, $vr1, $vr4>(dy, b, du, n, m, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn grad_x(du: &[f32], a: &[f32], dx: &mut [f32], s: f32, n: usize, d: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::grad_x::<$S, $nm, $nv>(du, a, dx, s, n, d, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn grad_a_f32(du: &[f32], x: &[f32], da: &mut [f32], s: f32, n: usize, d: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::grad_a::<$S, f32, $t4, $t2, $t1>(du, x, da, s, n, d, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn grad_a_f16(du: &[f32], x: &[f16], da: &mut [f32], s: f32, n: usize, d: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::grad_a::<$S, f16, $t4, $t2, $t1>(du, x, da, s, n, d, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn grad_b(dy: &[f32], u: &[f32], db: &mut [f32], s: f32, n: usize, m: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::grad_b::<$S, $t4, $t2, $t1>(dy, u, db, s, n, m, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn merge_f32(b: &[f32], a: &[f32], w: &mut [f32], s: f32, m: usize, d: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::merge::<$S, f32, $nm, $nv>(b, a, w, s, m, d, r) }
        }
        $(#[$attr])*
        /// # Safety
        /// As above.
        unsafe fn merge_f16(b: &[f32], a: &[f32], w: &mut [f16], s: f32, m: usize, d: usize, r: usize) {
            // SAFETY: forwarded precondition.
            unsafe { g::merge::<$S, f16, $nm, $nv>(b, a, w, s, m, d, r) }
        }

        $(#[$attr])*
        /// # Safety
        /// Tier features available; strides checked by `Kernels::sgemm`.
        #[allow(clippy::too_many_arguments)]
        unsafe fn sgemm(
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
            bias: *const f32,
        ) {
            // SAFETY: forwarded precondition.
            unsafe { g::sgemm::<$S, $gm, $gv>(m, k, n, alpha, a, sa, b, sb, beta, c, rsc, bias) }
        }

        pub(crate) static TABLE: Kernels = Kernels {
            tier: $tier,
            f16_to_f32,
            f32_to_f16,
            down_f32,
            down_f16,
            up,
            grad_u,
            grad_x,
            grad_a_f32,
            grad_a_f16,
            grad_b,
            merge_f32,
            merge_f16,
            sgemm,
        };
    };
}
pub(crate) use tier_table;
