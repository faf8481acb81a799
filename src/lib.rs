//! # hydra-edge
//!
//! An on-device adaptation runtime. A frozen backbone stays as it is; small
//! **Hydra** adapters (a parallel and a sequential low-rank branch on each
//! adapted linear layer, arXiv 2309.06922) are trained where the data lives,
//! then merged back into the weights so inference costs what the base model
//! costs.
//!
//! The layers, bottom up (imports only run downhill):
//! - [`kernels`]: the f16/f32 low-rank SIMD kernels (scalar, AVX2+FMA+F16C,
//!   AVX-512F, NEON, NEON+FP16), selected once at run time, forcible with
//!   `HYDRA_KERNELS`, the packed f32 sgemm and the AMX-BF16 tile product;
//!   [`kernels::stats`] counts which path a run took;
//! - [`hydra`]: [`hydra::HydraLinear`], its three variants (Hydra, LoRA,
//!   SeqLoRA), forward, backward, the exact merge / unmerge and the low-rank
//!   [`hydra::Delta`] that hot-swap folds in; the dense products;
//! - [`adapter`]: the `.hydra` file (no_std + alloc); [`rng`]: seeded init
//!   and dropout;
//! - [`Tensor`] (f32, f16, i64), [`tail`] (the tape-based engine of the
//!   trainable tail), [`parallel`] (the one thread pool shared with tract),
//!   [`device`] (where the tail's dense products run: CPU, or a CUDA GPU with
//!   the `cuda` feature) and [`runtime`] (allocator knobs, and the precision
//!   of the dense products: f32, or bf16 on Intel AMX where the CPU has it);
//! - [`onnx`]: loading, graph index, adaptable layers, the gradient-cone
//!   split and pattern fusion; [`backbone`]: the frozen tract plan;
//! - [`model`]: [`model::AdaptedModel`], the one owner of backbone, tail,
//!   head, the named parameter registry and the feature caches;
//! - [`train`], [`infer`] (one-plan inference, hot-swap on merged weights)
//!   and [`export`] (merged ONNX), each built on `model` alone;
//!   [`fuzz_checks`]: the bodies of the fuzz targets (`fuzz/`,
//!   `tests/fuzz.rs`), one per input path.
//!
//! ## Features
//! - `std` (default): run-time CPU detection, the `HYDRA_KERNELS` override,
//!   the tail engine and the thread pool. Without it the crate is
//!   `no_std + alloc` (kernels, Hydra math and merge, adapter files) and picks
//!   the best tier the compile-time target features allow.
//! - `onnx` (default): tract, the split, the model layer, training,
//!   inference, export.
//! - `cli` (default): the `hydra-edge` binary.
//! - `text`: tokenisation for the real-model study example.
//! - `cuda` (off): [`device::set_device`]`(Device::Cuda(n))` / `--device
//!   cuda[:N]` runs the tail's large dense products as cuBLAS sgemm on an
//!   NVIDIA GPU; the driver and cuBLAS are loaded at run time (cudarc), so
//!   the build needs no CUDA toolkit and a missing GPU is an error, not a crash.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod adapter;
pub mod error;
#[cfg(feature = "onnx")]
pub mod export;
#[cfg(feature = "onnx")]
pub mod fuzz_checks;
pub mod hydra;
#[cfg(feature = "onnx")]
pub mod infer;

#[cfg(feature = "onnx")]
pub mod backbone;
#[cfg(feature = "std")]
pub mod device;
pub mod kernels;
#[cfg(feature = "onnx")]
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;
#[cfg(feature = "std")]
pub mod output;
#[cfg(feature = "std")]
pub mod parallel;
pub mod rng;
#[cfg(feature = "std")]
pub mod runtime;
#[cfg(feature = "std")]
pub mod tail;
#[cfg(feature = "std")]
pub mod tensor;
#[cfg(feature = "onnx")]
pub mod train;

pub use error::{Error, Result};
pub use half::f16;
pub use hydra::{HydraConfig, HydraLinear, Variant};
#[cfg(feature = "std")]
pub use tensor::Tensor;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(all(doctest, feature = "onnx"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
