//! aarch64 tiers. Each is reachable only through its `TABLE`, which
//! `kernels::Kernels::for_tier` hands out only after detection succeeded
//! (`is_aarch64_feature_detected!` with `std`, compile-time target features
//! without it).
//!
//! - [`neon`]: Advanced SIMD, 4 f32 lanes, f16 widened and narrowed by
//!   `fcvtl`/`fcvtn` (base ARMv8, so it runs on every aarch64 Linux board,
//!   Raspberry Pi 4's Cortex-A72 included).
//! - [`fp16`]: the same plus FEAT_FP16 (Cortex-A76 in the Raspberry Pi 5,
//!   Cortex-A78AE in the Jetson Orin). Its header says where half-precision
//!   arithmetic is used and why that is nowhere in the current kernel set.

pub(crate) mod fp16;
pub(crate) mod neon;
