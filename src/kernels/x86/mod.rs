//! x86-64 tiers. Each is reachable only through its `TABLE`, which
//! `kernels::Kernels::for_tier` hands out only after detection succeeded.

#[cfg(feature = "std")]
pub(crate) mod amx;
pub(crate) mod avx2;
pub(crate) mod avx512;
