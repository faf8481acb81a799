//! # hydra-edge
//!
//! An on-device adaptation runtime. A frozen backbone stays as it is; small
//! **Hydra** adapters (a parallel and a sequential low-rank branch on each
//! adapted linear layer, arXiv 2309.06922) are trained where the data lives,
//! then merged back into the weights so inference costs what the base model
//! costs.
//!
//! What is built so far:
//! - [`kernels`]: the f16/f32 low-rank SIMD kernels (scalar, AVX2+FMA+F16C,
//!   AVX-512F), selected once at run time, forcible with `HYDRA_KERNELS`;
//! - [`hydra`]: [`hydra::HydraLinear`], its three variants (Hydra, LoRA,
//!   SeqLoRA), forward, backward and the exact merge / unmerge;
//! - [`rng`]: the small seeded generator that makes initialisation and
//!   dropout reproducible.
//!
//! ## Features
//! - `std` (default): run-time CPU detection and the `HYDRA_KERNELS` override.
//!   Without it the crate is `no_std + alloc` and picks the best tier the
//!   compile-time target features allow.
//! - `onnx`, `cli` (default): reserved for the ONNX split and the CLI.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod adapter;
pub mod error;
#[cfg(feature = "onnx")]
pub mod export;
pub mod hydra;
#[cfg(feature = "onnx")]
pub mod infer;

#[cfg(feature = "onnx")]
pub mod backbone;
pub mod kernels;
#[cfg(feature = "onnx")]
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;
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
