//! The GPU side of [`super`]: the CUDA driver and cuBLAS through cudarc,
//! loaded at run time.
//!
//! cudarc panics when a library it calls is missing, so [`activate`] looks
//! for each library first and turns what is missing into an
//! [`Error::Device`]; whatever else the driver could throw during start-up is
//! caught there too, so `--device cuda` on a machine without a GPU is an error
//! message, never a panic.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use std::sync::{Mutex, Once, RwLock};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use super::{Device, DeviceInfo, Layout, stats};
use crate::{Error, Result};

/// One GPU in use: its context, the stream every product runs on, and a
/// cuBLAS handle bound to that stream (one user at a time: the mutex).
struct Gpu {
    ordinal: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    ctx: Arc<CudaContext>,
}

static ACTIVE: RwLock<Option<Arc<Mutex<Gpu>>>> = RwLock::new(None);

fn active() -> Option<Arc<Mutex<Gpu>>> {
    ACTIVE.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn device_error(n: usize, reason: impl Into<String>) -> Error {
    Error::Device { device: Device::Cuda(n).to_string(), reason: reason.into() }
}

pub(super) fn active_ordinal() -> Option<usize> {
    active().map(|g| g.lock().unwrap_or_else(|e| e.into_inner()).ordinal)
}

pub(super) fn deactivate() {
    *ACTIVE.write().unwrap_or_else(|e| e.into_inner()) = None;
}

pub(super) fn activate(n: usize) -> Result<DeviceInfo> {
    let started = std::panic::catch_unwind(|| open(n)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown failure".to_string());
        Err(device_error(n, format!("the CUDA libraries failed while starting: {what}")))
    });
    let (gpu, info) = started?;
    *ACTIVE.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Mutex::new(gpu)));
    Ok(info)
}

fn open(n: usize) -> Result<(Gpu, DeviceInfo)> {
    // SAFETY: only tries to open the shared library (dlopen), calls nothing in it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(device_error(
            n,
            "no CUDA driver library (libcuda.so) found: this machine has no NVIDIA driver \
             (on a Jetson it comes with JetPack); use --device cpu",
        ));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(device_error(
            n,
            "the CUDA driver is here but cuBLAS (libcublas.so) is not: install the CUDA \
             runtime libraries (cuda-libraries-12-x, or JetPack on a Jetson) or add their \
             folder to LD_LIBRARY_PATH",
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| device_error(n, format!("the CUDA driver cannot start: {e}")))?;
    if count <= 0 {
        return Err(device_error(n, "the CUDA driver reports no GPU"));
    }
    if n >= count as usize {
        return Err(device_error(
            n,
            format!("no such GPU: this machine has {count} (cuda:0 to cuda:{})", count - 1),
        ));
    }
    let ctx = CudaContext::new(n)
        .map_err(|e| device_error(n, format!("cannot create a CUDA context: {e}")))?;
    let stream = ctx.default_stream();
    let blas = CudaBlas::new(stream.clone())
        .map_err(|e| device_error(n, format!("cannot start cuBLAS: {e}")))?;
    let name = ctx.name().unwrap_or_else(|_| "CUDA GPU".to_string());
    let memory_bytes = ctx.total_mem().ok();
    let info = DeviceInfo { device: Device::Cuda(n), name, memory_bytes };
    Ok((Gpu { ordinal: n, stream, blas, ctx }, info))
}

/// See `super::try_gemm`. A CUDA failure leaves C untouched and returns
/// `false`, so the CPU computes the product instead.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
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
    let Some(gpu) = active() else { return false };
    if k == 0 || [m, k, n].iter().any(|&d| i32::try_from(d).is_err()) {
        return false;
    }
    let gpu = gpu.lock().unwrap_or_else(|e| e.into_inner());
    match gpu.gemm(m, k, n, alpha, a, sa, b, sb, beta, c, rsc) {
        Ok(()) => {
            stats::GPU_PRODUCTS.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(e) => {
            stats::GPU_FALLBACKS.fetch_add(1, Ordering::Relaxed);
            static SAID: Once = Once::new();
            SAID.call_once(|| {
                eprintln!(
                    "hydra-edge: a product on cuda:{} failed ({e}); such products run on the CPU",
                    gpu.ordinal
                )
            });
            false
        }
    }
}

/// An operand as cuBLAS (column-major) sees it: the uploaded elements, the
/// operation that makes it the logical matrix's transpose, and its leading
/// dimension.
struct Operand {
    data: CudaSlice<f32>,
    op: cublasOperation_t,
    ld: usize,
}

impl Gpu {
    /// Uploads the logical `rows×cols` matrix at `x` with strides `s` as
    /// [`Layout::of`] plans it.
    fn upload(
        &self,
        rows: usize,
        cols: usize,
        x: &[f32],
        s: (usize, usize),
    ) -> Result<Operand, String> {
        let plan = Layout::of(rows, cols, s);
        let data = match plan.extent {
            Some(len) => self.stream.clone_htod(&x[..len]),
            None => self.stream.clone_htod(&Layout::dense_copy(rows, cols, x, s)),
        }
        .map_err(|e| format!("upload: {e}"))?;
        let op = if plan.transpose {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        };
        Ok(Operand { data, op, ld: plan.ld })
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
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
    ) -> Result<(), String> {
        // Products come from whichever thread runs the op (pool workers
        // included): make the context current here, for cuBLAS too.
        self.ctx.bind_to_thread().map_err(|e| format!("bind the context: {e}"))?;
        // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS's first
        // operand is B, its second A, and C comes back dense (ldc = n).
        let (a_op, b_op) = (self.upload(m, k, a, sa)?, self.upload(k, n, b, sb)?);
        let mut dense_c = Vec::with_capacity(m * n);
        if beta != 0.0 {
            for i in 0..m {
                dense_c.extend_from_slice(&c[i * rsc..i * rsc + n]);
            }
        } else {
            dense_c.resize(m * n, 0.0);
        }
        let mut c_dev = self.stream.clone_htod(&dense_c).map_err(|e| format!("upload: {e}"))?;
        let int =
            |v: usize| i32::try_from(v).map_err(|_| format!("dimension {v} over cuBLAS's int"));
        let cfg = GemmConfig {
            transa: b_op.op,
            transb: a_op.op,
            m: int(n)?,
            n: int(m)?,
            k: int(k)?,
            alpha,
            lda: int(b_op.ld)?,
            ldb: int(a_op.ld)?,
            beta,
            ldc: int(n)?,
        };
        // SAFETY: each operand was uploaded with the extent its op and leading
        // dimension reach (`upload`), and C is a dense n×m block of m·n values.
        unsafe { self.blas.gemm(cfg, &b_op.data, &a_op.data, &mut c_dev) }
            .map_err(|e| format!("cuBLAS sgemm: {e:?}"))?;
        self.stream.memcpy_dtoh(&c_dev, &mut dense_c).map_err(|e| format!("download: {e}"))?;
        self.stream.synchronize().map_err(|e| format!("synchronize: {e}"))?;
        for (i, row) in dense_c.chunks_exact(n).enumerate() {
            c[i * rsc..i * rsc + n].copy_from_slice(row);
        }
        Ok(())
    }
}
