//! Where the trainable tail's dense products run: the CPU (always) or, with
//! the `cuda` feature, an NVIDIA GPU through cuBLAS. One process-wide knob,
//! like the thread count: [`set_device`] (the CLI's `--device cpu|cuda[:N]`).
//!
//! With `cuda`, the CUDA driver and cuBLAS are loaded when a GPU is first
//! asked for (cudarc's dynamic loading), so a `cuda` build compiles without a
//! CUDA toolkit and starts on a machine without a GPU; asking for `cuda`
//! there is an [`Error::Device`] that names what is missing. Without the
//! feature, asking for `cuda` is the same error, saying how to build it in.
//!
//! What runs on the GPU: every dense product of the tail (`x·Wᵀ`, `dy·W`, the
//! gradients `dyᵀ·x`, attention's batched products) at or above
//! [`GPU_MIN_WORK`] multiply-adds ([`set_gpu_min_work`]), in f32 with f32 accumulation; operands go
//! up and the result comes back per product. The element-wise ops, norms,
//! the Hydra low-rank kernels and the optimizer stay on the CPU, and the
//! parameters never leave the host, so checkpoints, adapter files and the
//! merge are the CPU path's own. A CUDA call that fails mid-run leaves that
//! product to the CPU (the result is the same up to rounding), counted in
//! [`stats`] and reported once on stderr.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use crate::{Error, Result};

#[cfg(feature = "cuda")]
mod cuda;

/// Products smaller than this many multiply-adds stay on the CPU even when a
/// GPU is selected (the default of [`set_gpu_min_work`]): below it the
/// copies cost more than the product.
pub const GPU_MIN_WORK: usize = 1 << 22;

static MIN_WORK: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(GPU_MIN_WORK);

/// Sends products of at least `work` multiply-adds to the GPU (0: every
/// product, as the GPU tests do to cover every product of a small model).
pub fn set_gpu_min_work(work: usize) {
    MIN_WORK.store(work, core::sync::atomic::Ordering::Relaxed);
}

/// A compute device for the tail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The CPU (the kernels of the active tier and the thread pool).
    #[default]
    Cpu,
    /// CUDA GPU number `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device> {
        let bad = || {
            Error::Config(alloc::format!(
                "unknown device `{s}` (expected `cpu`, `cuda` or `cuda:N`)"
            ))
        };
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            t => match t.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    n.parse().map(Device::Cuda).map_err(|_| bad())
                }
                _ => Err(bad()),
            },
        }
    }
}

/// What [`set_device`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device now in use.
    pub device: Device,
    /// Its name (`cpu`, or the GPU's name as the driver reports it).
    pub name: String,
    /// Its total memory in bytes (GPUs only).
    pub memory_bytes: Option<usize>,
}

/// Runs the tail's dense products on `device` from now on, for the whole
/// process. `Device::Cpu` always succeeds; `Device::Cuda(n)` needs the `cuda`
/// feature, a CUDA driver, cuBLAS and a GPU number `n`, and otherwise is an
/// [`Error::Device`] naming what is missing (the previous device stays).
pub fn set_device(device: Device) -> Result<DeviceInfo> {
    match device {
        Device::Cpu => {
            #[cfg(feature = "cuda")]
            cuda::deactivate();
            Ok(DeviceInfo { device, name: "cpu".to_string(), memory_bytes: None })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => cuda::activate(n),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::Device {
            device: device.to_string(),
            reason: "this build has no GPU support; rebuild with `--features cuda`".to_string(),
        }),
    }
}

/// The device the tail's dense products run on now.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Some(n) = cuda::active_ordinal() {
        return Device::Cuda(n);
    }
    Device::Cpu
}

/// Counters of the GPU path (all zero without the `cuda` feature).
pub mod stats {
    use core::sync::atomic::{AtomicUsize, Ordering};

    pub(crate) static GPU_PRODUCTS: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_FALLBACKS: AtomicUsize = AtomicUsize::new(0);

    /// Dense products run on the GPU so far.
    pub fn gpu_products() -> usize {
        GPU_PRODUCTS.load(Ordering::Relaxed)
    }

    /// Products that a failed CUDA call left to the CPU so far.
    pub fn gpu_fallbacks() -> usize {
        GPU_FALLBACKS.load(Ordering::Relaxed)
    }
}

/// `C = alpha·A·B + beta·C` on the active GPU, if there is one and the
/// product is worth it; `false` leaves it to the caller (the CPU). Operands
/// as in `hydra::dense::gemm_c`: (row, column) strides for A and B, C
/// row-major with row stride `rsc`, all extents checked by the caller.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), inline(always))]
pub(crate) fn try_gemm(
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
) -> bool {
    #[cfg(feature = "cuda")]
    {
        if m * k * n >= MIN_WORK.load(core::sync::atomic::Ordering::Relaxed) {
            return cuda::gemm(m, k, n, alpha, a, sa, b, sb, beta, c, rsc);
        }
        false
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (m, k, n, alpha, a, sa, b, sb, beta, c, rsc);
        false
    }
}

/// How a logical `rows×cols` operand with (row, column) strides goes to a
/// column-major BLAS such as cuBLAS, which wants `op(M)` to be the operand's
/// *transpose* (row-major `C = A·B` is column-major `Cᵀ = Bᵀ·Aᵀ`): row-major
/// memory already is the transpose (`op = N`, `ld = row stride`),
/// column-major memory is the matrix itself (`op = T`, `ld = column
/// stride`), and anything else is copied densely row-major first.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// `op = T` (else `N`).
    pub transpose: bool,
    /// Leading dimension.
    pub ld: usize,
    /// `Some(len)`: upload the first `len` elements as they are; `None`: a
    /// dense row-major copy ([`Layout::dense_copy`]).
    pub extent: Option<usize>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Layout {
    pub(crate) fn of(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> Layout {
        if cs == 1 && rs >= cols {
            Layout { transpose: false, ld: rs, extent: Some((rows - 1) * rs + cols) }
        } else if rs == 1 && cs >= rows {
            Layout { transpose: true, ld: cs, extent: Some((cols - 1) * cs + rows) }
        } else {
            Layout { transpose: false, ld: cols, extent: None }
        }
    }

    pub(crate) fn dense_copy(
        rows: usize,
        cols: usize,
        x: &[f32],
        (rs, cs): (usize, usize),
    ) -> Vec<f32> {
        let mut dense = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            dense.extend((0..cols).map(|j| x[i * rs + j * cs]));
        }
        dense
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Column-major `C = α·op(A)·op(B) + β·C` as the BLAS reference defines
    /// it (`op(A)` m×k, `op(B)` k×n, C m×n with leading dimension `ldc`).
    #[allow(clippy::too_many_arguments)]
    fn blas_sgemm(
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        for j in 0..n {
            for i in 0..m {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                    let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                    s += f64::from(av) * f64::from(bv);
                }
                let cv = &mut c[i + j * ldc];
                *cv = alpha * s as f32 + if beta == 0.0 { 0.0 } else { beta * *cv };
            }
        }
    }

    /// The planned call (the one `cuda.rs` makes, with `blas_sgemm` for
    /// cuBLAS) gives the CPU's row-major product for every operand layout.
    #[test]
    fn the_column_major_plan_computes_the_row_major_product() {
        let (m, k, n) = (5, 7, 3);
        let mut rng = Rng::new(2);
        let a: Vec<f32> = (0..m * k * 3).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let b: Vec<f32> = (0..k * n * 3).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let a_layouts = [(k, 1), (1, m), (3 * k, 3), (k + 2, 1), (1, m + 1)];
        let b_layouts = [(n, 1), (1, k), (1, 3 * k), (n + 1, 1), (2, 2 * k + 1)];
        let mut planned = 0;
        for sa in a_layouts {
            for sb in b_layouts {
                for (alpha, beta) in [(1.0, 0.0), (-0.5, 2.0)] {
                    let mut want = c0.clone();
                    crate::hydra::gemm(m, k, n, alpha, &a, sa, &b, sb, beta, &mut want);
                    let (pa, pb) = (Layout::of(m, k, sa), Layout::of(k, n, sb));
                    let ua = pa
                        .extent
                        .map_or_else(|| Layout::dense_copy(m, k, &a, sa), |l| a[..l].to_vec());
                    let ub = pb
                        .extent
                        .map_or_else(|| Layout::dense_copy(k, n, &b, sb), |l| b[..l].to_vec());
                    planned += usize::from(pa.extent.is_some()) + usize::from(pb.extent.is_some());
                    let mut got = c0.clone();
                    blas_sgemm(
                        (pb.transpose, pa.transpose),
                        (n, m, k),
                        alpha,
                        &ub,
                        pb.ld,
                        &ua,
                        pa.ld,
                        beta,
                        &mut got,
                        n,
                    );
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-5, "{sa:?} {sb:?}: {g} vs {w}");
                    }
                }
            }
        }
        // Most layouts go up as they are; the odd strides are copied.
        assert!(planned >= 30, "{planned}");
    }
}
