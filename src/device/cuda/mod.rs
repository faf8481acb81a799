//! The GPU side of [`super`]: the CUDA driver and cuBLAS through cudarc,
//! loaded at run time.
//!
//! cudarc panics when a library it calls is missing, so [`activate`] looks
//! for each library first and turns what is missing into an
//! [`Error::Device`]; whatever else the driver could throw during start-up is
//! caught there too, so `--device cuda` on a machine without a GPU is an error
//! message, never a panic.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, RwLock};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::{Device, DeviceInfo, FrozenPlan, Layout, stats};

use crate::{Error, Result};

mod hydra;
mod optim;
mod tail;
pub(super) use hydra::{SavedOnGpu, adapted_backward, adapted_forward};
pub(super) use optim::{OptCache, step as optimizer_step};
pub(super) use tail::{
    DevValue, Records, accumulate, batched_matmul, binary, download, frozen as frozen_resident,
    gather, layer_norm, memory, permute, ready as tail_ready, records_on, reduce, softmax, unary,
    upload, upload_bytes,
};

/// A resident value's buffer, if it is on `gpu`.
fn resident_slice<'a>(
    gpu: &Gpu,
    v: &'a crate::device::resident::GpuValue,
) -> Result<&'a CudaSlice<f32>, String> {
    tail::on_gpu(gpu, v.inner())
}

/// `data` (on `gpu`) as a resident value.
fn resident_value(gpu: &Gpu, data: CudaSlice<f32>) -> crate::device::resident::GpuValue {
    crate::device::resident::GpuValue::from_inner(tail::value(gpu, data))
}

/// One GPU in use: its context, the stream every product runs on, and a
/// cuBLAS handle bound to that stream (one user at a time: the mutex).
struct Gpu {
    /// Unique per opening ([`OPENED`]).
    id: u64,
    ordinal: usize,
    stream: Arc<CudaStream>,
    /// Dropped by hand (`Drop for Gpu`): cudarc panics when destroying the
    /// handle fails, as it can on a lost device.
    blas: core::mem::ManuallyDrop<CudaBlas>,
    ctx: Arc<CudaContext>,
    /// A column of ones (grown as needed): the bias's rank-1 product.
    ones: Option<CudaSlice<f32>>,
    /// Whether it has bf16 tensor cores (compute capability 8.0 or later).
    bf16: bool,
    /// Whether it shares the host's memory (a Jetson's).
    integrated: bool,
    /// The optimizer's kernels, compiled on first use (or why they are not).
    kernels: Option<Result<optim::Kernels, String>>,
    /// The tail's element-wise kernels, compiled on first use (or why not).
    tail: Option<Result<tail::Kernels, String>>,
}

static ACTIVE: RwLock<Option<Arc<Mutex<Gpu>>>> = RwLock::new(None);

/// Numbers every opened [`Gpu`]: a [`Resident`] copy made on another one
/// (before a switch of device) is uploaded again.
static OPENED: AtomicU64 = AtomicU64::new(0);

/// Where a layer keeps its [`Resident`] copy (shared with [`SLOTS`], which
/// frees the copies when the device changes).
pub(super) type Slot = Arc<SlotCell>;

type SlotCell = Mutex<Option<Box<Resident>>>;

/// Every slot that has held a copy since the last change of device (dead
/// ones are pruned as it grows).
static SLOTS: Mutex<Vec<alloc::sync::Weak<SlotCell>>> = Mutex::new(Vec::new());

/// Remembers `slot` for [`free_resident`].
fn register(slot: &Slot) {
    let mut all = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    if all.iter().any(|w| core::ptr::eq(w.as_ptr(), Arc::as_ptr(slot))) {
        return;
    }
    if all.len() >= 64 && all.len().is_power_of_two() {
        all.retain(|w| w.strong_count() > 0);
    }
    all.push(Arc::downgrade(slot));
}

/// Frees every resident copy that no product holds now (a held one is
/// skipped: the lock may be this thread's own, when a failing product gives
/// the GPU up; it is dropped at its next use, its GPU no longer the one in
/// use). Each copy is freed with its own context current (its `Drop`).
fn free_resident() {
    let all = core::mem::take(&mut *SLOTS.lock().unwrap_or_else(|e| e.into_inner()));
    for slot in all.iter().filter_map(alloc::sync::Weak::upgrade) {
        match slot.try_lock() {
            Ok(mut r) => *r = None,
            Err(std::sync::TryLockError::Poisoned(e)) => *e.into_inner() = None,
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }
}

/// A frozen `W0` on the GPU (see `super::Resident`).
/// One copy per precision (a layer whose forward product is bf16-sized
/// and backward not, or the f32 merge check between bf16 steps, would
/// otherwise swap one copy back and forth).
pub(super) struct Resident {
    /// The [`Gpu::id`] it was uploaded to.
    gpu: u64,
    /// Its context, made current to free the copies on whatever thread
    /// drops them (a free without it fails and poisons the context).
    ctx: Arc<CudaContext>,
    f32: Option<Buf>,
    bf16: Option<Buf>,
    /// f16 weights' bits, in place of the f32 copy: widened for each f32
    /// product (`tail::widen`).
    f16: Option<CudaSlice<u16>>,
}

impl Resident {
    pub(super) fn bytes(&self) -> usize {
        let b = |w: &Option<Buf>| match w {
            Some(Buf::F32(w)) => w.len() * 4,
            Some(Buf::Bf16(w)) => w.len() * 2,
            None => 0,
        };
        b(&self.f32) + b(&self.bf16) + self.f16.as_ref().map_or(0, |h| h.len() * 2)
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        // The copies are freed after this, with their context current.
        make_current(&self.ctx);
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // `ones`, the kernels and the cuBLAS handle are freed with their
        // context current, on whichever thread drops the last reference.
        make_current(&self.ctx);
        // SAFETY: `blas` is not used after this (the Gpu is going).
        let blas = unsafe { core::mem::ManuallyDrop::take(&mut self.blas) };
        // A failed destroy (a lost GPU) leaks the handle instead of
        // panicking in whatever product gave the GPU up.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(blas)));
    }
}

/// Makes `ctx` current on this thread, whatever error it has recorded
/// (`bind_to_thread` returns a recorded error instead of binding; it stays
/// recorded here, for the next product to report).
fn make_current(ctx: &CudaContext) {
    // SAFETY: `ctx` is a live context (the Arc keeps it retained).
    let _ = unsafe { cudarc::driver::result::ctx::set_current(ctx.cu_ctx()) };
}

/// Operand elements on the GPU in the precision of a product: f32, or the
/// bits of their bf16 rounding (`kernels::bf16_bits`, as the CPU's bf16
/// products round them).
enum Buf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// A borrowed [`Buf`] (or an f32 device matrix made elsewhere).
#[derive(Clone, Copy)]
enum BufRef<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<u16>),
}

impl Buf {
    fn len(&self) -> usize {
        self.as_ref().len()
    }

    fn is_bf16(&self) -> bool {
        matches!(self, Buf::Bf16(_))
    }

    fn as_ref(&self) -> BufRef<'_> {
        match self {
            Buf::F32(b) => BufRef::F32(b),
            Buf::Bf16(b) => BufRef::Bf16(b),
        }
    }
}

impl BufRef<'_> {
    fn len(&self) -> usize {
        match self {
            BufRef::F32(b) => b.len(),
            BufRef::Bf16(b) => b.len(),
        }
    }

    fn is_bf16(&self) -> bool {
        matches!(self, BufRef::Bf16(_))
    }
}

/// Whether a product `m×k·k×n` on `gpu` takes bf16 operands: bf16 products
/// asked for (`runtime::set_matmul_precision`), tensor cores that have
/// them, and the CPU's bf16 size rule (≥ 16 rows, ≥ 16 columns, ≥ 32
/// terms), so that the same products are rounded on either device.
fn bf16_product(gpu: &Gpu, m: usize, k: usize, n: usize) -> bool {
    gpu.bf16 && crate::runtime::bf16_requested() && m >= 16 && n >= 16 && k >= 32
}

pub(super) fn gpu_bf16() -> bool {
    active().is_some_and(|g| g.lock().unwrap_or_else(|e| e.into_inner()).bf16)
        && crate::runtime::bf16_requested()
}

fn active() -> Option<Arc<Mutex<Gpu>>> {
    ACTIVE.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn device_error(n: usize, reason: impl Into<String>) -> Error {
    Error::Device { device: Device::Cuda(n).to_string(), reason: reason.into() }
}

pub(super) fn is_active() -> bool {
    ACTIVE.read().unwrap_or_else(|e| e.into_inner()).is_some()
}

pub(super) fn active_id() -> Option<u64> {
    active().map(|g| g.lock().unwrap_or_else(|e| e.into_inner()).id)
}

pub(super) fn integrated() -> bool {
    active().is_some_and(|g| g.lock().unwrap_or_else(|e| e.into_inner()).integrated)
}

pub(super) fn active_ordinal() -> Option<usize> {
    active().map(|g| g.lock().unwrap_or_else(|e| e.into_inner()).ordinal)
}

pub(super) fn deactivate() {
    *ACTIVE.write().unwrap_or_else(|e| e.into_inner()) = None;
    free_resident();
    tail::free_records();
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
    FAILED_IN_A_ROW.store(0, Ordering::Relaxed);
    // Copies on the GPU used before (if any) are of no use now: freed with
    // no GPU in use (so none is uploaded meanwhile), then the new one goes in.
    deactivate();
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
    let integrated = ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_INTEGRATED)
        .is_ok_and(|v| v != 0);
    let info = DeviceInfo { device: Device::Cuda(n), name, memory_bytes, integrated };
    let bf16 = ctx.compute_capability().is_ok_and(|(major, _)| major >= 8);
    let id = OPENED.fetch_add(1, Ordering::Relaxed);
    let blas = core::mem::ManuallyDrop::new(blas);
    Ok((
        Gpu {
            id,
            ordinal: n,
            stream,
            blas,
            ctx,
            ones: None,
            bf16,
            integrated,
            kernels: None,
            tail: None,
        },
        info,
    ))
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
    if [m, k, n].iter().any(|&d| d == 0 || i32::try_from(d).is_err()) {
        return false;
    }
    let gpu = gpu.lock().unwrap_or_else(|e| e.into_inner());
    match gpu.gemm(m, k, n, alpha, a, sa, b, sb, beta, c, rsc) {
        Ok(bf16) => {
            counted(bf16);
            true
        }
        Err(e) => {
            fell_back(gpu.ordinal, &e);
            false
        }
    }
}

/// Failed GPU products since the last one that ran.
static FAILED_IN_A_ROW: AtomicUsize = AtomicUsize::new(0);

/// After this many failed products in a row the GPU is given up for the
/// run (a lost device, memory that stays full): every product would
/// otherwise pay a failing upload before its CPU run.
const GIVE_UP_AFTER: usize = 8;

/// Counts a product the GPU ran.
fn counted(bf16: bool) {
    stats::GPU_PRODUCTS.fetch_add(1, Ordering::Relaxed);
    if bf16 {
        stats::GPU_BF16_PRODUCTS.fetch_add(1, Ordering::Relaxed);
    }
    succeeded();
}

/// Ends a run of failures: the GPU works (any product, pass or step).
fn succeeded() {
    FAILED_IN_A_ROW.store(0, Ordering::Relaxed);
}

/// Counts a product that a failed CUDA call left to the CPU, says so once
/// per process, and gives the GPU up after [`GIVE_UP_AFTER`] in a row.
fn fell_back(ordinal: usize, e: &str) {
    stats::GPU_FALLBACKS.fetch_add(1, Ordering::Relaxed);
    static SAID: Once = Once::new();
    SAID.call_once(|| {
        eprintln!("hydra-edge: a GPU call on cuda:{ordinal} failed ({e}); that work ran on the CPU")
    });
    if FAILED_IN_A_ROW.fetch_add(1, Ordering::Relaxed) + 1 >= GIVE_UP_AFTER {
        FAILED_IN_A_ROW.store(0, Ordering::Relaxed);
        eprintln!(
            "hydra-edge: {GIVE_UP_AFTER} products in a row failed on cuda:{ordinal} (last: {e}); \
             the rest of this run uses the CPU"
        );
        deactivate();
    }
}

/// See `super::try_frozen`: uploads `W0` into `slot` when it has no copy
/// for the GPU in use in the product's precision, then runs the product
/// there. A CUDA failure returns `None` (the CPU computes it) and drops the
/// copy.
pub(super) fn frozen<'w>(
    slot: &Slot,
    w0: impl FnOnce() -> crate::device::W0<'w>,
    plan: FrozenPlan,
    x: &[f32],
    bias: Option<&[f32]>,
) -> Option<Vec<f32>> {
    if [plan.m, plan.n, plan.k].iter().any(|&d| d == 0 || i32::try_from(d).is_err()) {
        return None;
    }
    with_resident(slot, w0, plan, |gpu, w| {
        let x = x
            .get(..elems(plan.n, plan.k)?)
            .ok_or("the activations are shorter than their shape")?;
        let x = gpu.upload_as(x, w.is_bf16())?;
        let y = gpu.frozen(plan, w, x.as_ref(), bias)?;
        gpu.download(&y)
    })
    .ok()
    .map(|(y, bf16)| {
        counted(bf16);
        y
    })
}

/// `rows·cols` elements, or an error where that overflows (a 32-bit target).
fn elems(rows: usize, cols: usize) -> Result<usize, String> {
    rows.checked_mul(cols).ok_or_else(|| format!("{rows}×{cols} elements overflow"))
}

/// Runs `f` on the GPU in use with its context current; a failure is
/// counted and reported ([`fell_back`]) and returns `Err` (`Err(None)`: no
/// GPU in use, nothing tried).
fn with_gpu<T>(f: impl FnOnce(&mut Gpu) -> Result<T, String>) -> Result<T, Option<String>> {
    let gpu = active().ok_or(None)?;
    let mut gpu = gpu.lock().unwrap_or_else(|e| e.into_inner());
    let ran = match gpu.ctx.bind_to_thread() {
        Ok(()) => f(&mut gpu),
        Err(e) => Err(format!("bind the context: {e}")),
    };
    ran.map_err(|e| {
        fell_back(gpu.ordinal, &e);
        Some(e)
    })
}

/// Runs `f` on the GPU in use with its context current and the frozen
/// `W0` of `slot` resident in the precision `plan`'s product takes there
/// (uploaded from `w0` if the slot has no copy for this GPU in it).
/// Returns `f`'s result and whether the product is bf16; a failure drops
/// the copy, is counted and reported ([`fell_back`]) and returns `Err`
/// (`Err(None)`: no GPU in use, nothing tried).
fn with_resident<'w, T>(
    slot: &Slot,
    w0: impl FnOnce() -> crate::device::W0<'w>,
    plan: FrozenPlan,
    f: impl FnOnce(&mut Gpu, &Buf) -> Result<T, String>,
) -> Result<(T, bool), Option<String>> {
    let gpu = active().ok_or(None)?;
    let shared = slot;
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    let mut gpu = gpu.lock().unwrap_or_else(|e| e.into_inner());
    let bf16 = bf16_product(&gpu, plan.n, plan.k, plan.m);
    let run = |slot: &mut Option<Box<Resident>>, gpu: &mut Gpu| -> Result<T, String> {
        // Copies made on another GPU (or before a switch) go first, freed
        // under their own context; then this GPU's context is current.
        if slot.as_ref().is_some_and(|r| r.gpu != gpu.id) {
            *slot = None;
        }
        gpu.ctx.bind_to_thread().map_err(|e| format!("bind the context: {e}"))?;
        if slot.is_none() {
            register(shared);
        }
        let r = slot.get_or_insert_with(|| {
            Box::new(Resident {
                gpu: gpu.id,
                ctx: gpu.ctx.clone(),
                f32: None,
                bf16: None,
                f16: None,
            })
        });
        let len = elems(plan.m, plan.k)?;
        if bf16 && r.bf16.is_none() || !bf16 && r.f32.is_none() && r.f16.is_none() {
            let up = |e: String| format!("upload W0: {e}");
            match w0() {
                // f16 weights stay f16 where the widening kernel is there.
                crate::device::W0::F16(h) if !bf16 && tail::compiled(gpu) => {
                    let h = h.get(..len).ok_or("W0 is shorter than its layer's shape")?;
                    let bits: Vec<u16> = h.iter().map(|v| v.to_bits()).collect();
                    r.f16 = Some(gpu.htod(&bits).map_err(up)?);
                }
                w => {
                    let w = w.into_f32();
                    let w = w.get(..len).ok_or("W0 is shorter than its layer's shape")?;
                    let copy = if bf16 { &mut r.bf16 } else { &mut r.f32 };
                    *copy = Some(gpu.upload_as(w, bf16).map_err(up)?);
                }
            }
        }
        let widened;
        let w = match (bf16, &r.bf16, &r.f32, &r.f16) {
            (true, Some(w), _, _) | (false, _, Some(w), _) => w,
            (false, _, None, Some(h)) => {
                widened = Buf::F32(tail::widen(gpu, h)?);
                &widened
            }
            _ => return Err("no resident W0".to_string()),
        };
        f(gpu, w)
    };
    match run(&mut slot, &mut gpu) {
        Ok(t) => Ok((t, bf16)),
        Err(e) => {
            *slot = None;
            fell_back(gpu.ordinal, &e);
            Err(Some(e))
        }
    }
}

/// An operand as cuBLAS (column-major) sees it: the uploaded elements, the
/// operation that makes it the logical matrix's transpose, and its leading
/// dimension.
struct Operand {
    data: Buf,
    op: cublasOperation_t,
    ld: usize,
}

impl Gpu {
    /// `x` on the GPU (counted in `stats::gpu_bytes_up`).
    fn htod<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>, String> {
        let d = self.stream.clone_htod(x).map_err(|e| format!("upload: {e}"))?;
        stats::GPU_BYTES_UP.fetch_add(core::mem::size_of_val(x), Ordering::Relaxed);
        Ok(d)
    }

    /// `y` into `out` (the same length), after the stream has run (counted
    /// in `stats::gpu_bytes_down`).
    fn dtoh_into(&self, y: &CudaSlice<f32>, out: &mut [f32]) -> Result<(), String> {
        if out.len() != y.len() {
            return Err("download into a buffer of another length".to_string());
        }
        self.stream.memcpy_dtoh(y, out).map_err(|e| format!("download: {e}"))?;
        self.stream.synchronize().map_err(|e| format!("synchronize: {e}"))?;
        stats::GPU_BYTES_DOWN.fetch_add(out.len() * 4, Ordering::Relaxed);
        Ok(())
    }

    /// `x` on the GPU as f32, or rounded to bf16 when `bf16`.
    fn upload_as(&self, x: &[f32], bf16: bool) -> Result<Buf, String> {
        if bf16 {
            let bits: Vec<u16> = x.iter().map(|&v| crate::kernels::bf16_bits(v)).collect();
            self.htod(&bits).map(Buf::Bf16)
        } else {
            self.htod(x).map(Buf::F32)
        }
    }

    /// `C = α·op(A)·op(B) + β·C` (cuBLAS's column-major terms, `cfg`) with
    /// A and B in one precision: sgemm for f32, GemmEx with bf16 inputs and
    /// f32 sums and output for bf16.
    ///
    /// # Safety
    /// The operands must hold every element `cfg` reaches (cuBLAS reads
    /// device memory unchecked).
    unsafe fn gemm_buf(
        &self,
        cfg: GemmConfig<f32>,
        a: BufRef<'_>,
        b: BufRef<'_>,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), String> {
        match (a, b) {
            // SAFETY: the caller's contract.
            (BufRef::F32(a), BufRef::F32(b)) => {
                unsafe { self.blas.gemm(cfg, a, b, c) }.map_err(|e| format!("cuBLAS sgemm: {e:?}"))
            }
            (BufRef::Bf16(a), BufRef::Bf16(b)) => {
                let (ap, _ra) = a.device_ptr(&self.stream);
                let (bp, _rb) = b.device_ptr(&self.stream);
                let (cp, _rc) = c.device_ptr_mut(&self.stream);
                let (alpha, beta) = (&cfg.alpha as *const f32, &cfg.beta as *const f32);
                // SAFETY: the caller's contract; α and β are f32 on the host,
                // as CUBLAS_COMPUTE_32F and the handle's (default, host)
                // pointer mode read them; the handle runs on `self.stream`.
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *self.blas.handle(),
                        cfg.transa,
                        cfg.transb,
                        cfg.m,
                        cfg.n,
                        cfg.k,
                        alpha.cast(),
                        ap as *const core::ffi::c_void,
                        cudaDataType::CUDA_R_16BF,
                        cfg.lda,
                        bp as *const core::ffi::c_void,
                        cudaDataType::CUDA_R_16BF,
                        cfg.ldb,
                        beta.cast(),
                        cp as *mut core::ffi::c_void,
                        cudaDataType::CUDA_R_32F,
                        cfg.ldc,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(|e| format!("cuBLAS GemmEx (bf16): {e:?}"))
            }
            _ => Err("operands in two precisions".to_string()),
        }
    }

    /// Uploads the logical `rows×cols` matrix at `x` with strides `s` as
    /// [`Layout::of`] plans it (rounded to bf16 when `bf16`).
    fn upload(
        &self,
        rows: usize,
        cols: usize,
        x: &[f32],
        s: (usize, usize),
        bf16: bool,
    ) -> Result<Operand, String> {
        let plan = Layout::of(rows, cols, s);
        let data = match plan.extent {
            Some(len) => self.upload_as(&x[..len], bf16),
            None => self.upload_as(&Layout::dense_copy(rows, cols, x, s), bf16),
        }?;
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
    ) -> Result<bool, String> {
        // Products come from whichever thread runs the op (pool workers
        // included): make the context current here, for cuBLAS too.
        self.ctx.bind_to_thread().map_err(|e| format!("bind the context: {e}"))?;
        // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS's first
        // operand is B, its second A, and C comes back dense (ldc = n).
        let bf16 = bf16_product(self, m, k, n);
        let (a_op, b_op) = (self.upload(m, k, a, sa, bf16)?, self.upload(k, n, b, sb, bf16)?);
        // C goes up (β ≠ 0) and comes back as it is when its rows are
        // contiguous, else through a dense copy.
        let dense = rsc == n;
        let mut dense_c = Vec::new();
        let mut c_dev = if beta != 0.0 {
            if dense {
                self.htod(&c[..m * n])?
            } else {
                dense_c.reserve_exact(m * n);
                for i in 0..m {
                    dense_c.extend_from_slice(&c[i * rsc..i * rsc + n]);
                }
                self.htod(&dense_c)?
            }
        } else {
            // β = 0 never reads C: zeroed on the GPU, nothing goes up.
            self.stream.alloc_zeros(m * n).map_err(|e| format!("alloc: {e}"))?
        };
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
        unsafe { self.gemm_buf(cfg, b_op.data.as_ref(), a_op.data.as_ref(), &mut c_dev) }?;
        if dense {
            self.dtoh_into(&c_dev, &mut c[..m * n])?;
        } else {
            dense_c.resize(m * n, 0.0);
            self.dtoh_into(&c_dev, &mut dense_c)?;
            for (i, row) in dense_c.chunks_exact(n).enumerate() {
                c[i * rsc..i * rsc + n].copy_from_slice(row);
            }
        }
        Ok(bf16)
    }

    /// A frozen product with `W0` resident (`w`, out×in row-major) as
    /// `plan` lays it out, into a new device matrix: `x` holds `plan.n` rows
    /// of `plan.k` in `w`'s precision, the bias (forward only) `plan.m`
    /// values, in f32.
    fn frozen(
        &mut self,
        p: FrozenPlan,
        w: &Buf,
        x: BufRef<'_>,
        bias: Option<&[f32]>,
    ) -> Result<CudaSlice<f32>, String> {
        let int =
            |v: usize| i32::try_from(v).map_err(|_| format!("dimension {v} over cuBLAS's int"));
        if x.len() < elems(p.n, p.k)? || x.is_bf16() != w.is_bf16() {
            return Err("the activations do not match the product".to_string());
        }
        let mut y =
            self.stream.alloc_zeros::<f32>(elems(p.m, p.n)?).map_err(|e| format!("alloc: {e}"))?;
        let mut beta = 0.0;
        if let Some(b) = bias {
            // Y starts as the bias in every row: column-major bias (m×1)
            // times a row of n ones (ld 1), with β = 0.
            let b = b.get(..p.m).ok_or("the bias is shorter than the output")?;
            let b = self.htod(b)?;
            self.ensure_ones(p.n)?;
            let Some(ones) = self.ones.as_ref() else { return Err("no ones".to_string()) };
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: int(p.m)?,
                n: int(p.n)?,
                k: 1,
                alpha: 1.0f32,
                lda: int(p.m)?,
                ldb: 1,
                beta: 0.0,
                ldc: int(p.ldc)?,
            };
            // SAFETY: the bias holds m values (m×1, ld m), `ones` at least n
            // (1×n, ld 1), Y m·n (m×n, ld m).
            unsafe { self.blas.gemm(cfg, &b, ones, &mut y) }
                .map_err(|e| format!("cuBLAS sgemm (bias): {e:?}"))?;
            beta = 1.0;
        }
        let cfg = GemmConfig {
            transa: if p.transpose_w {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            },
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int(p.m)?,
            n: int(p.n)?,
            k: int(p.k)?,
            alpha: 1.0f32,
            lda: int(p.ldw)?,
            ldb: int(p.ldx)?,
            beta,
            ldc: int(p.ldc)?,
        };
        if w.len() < elems(p.m, p.k)? {
            return Err("the resident W0 is shorter than the product".to_string());
        }
        // SAFETY: W0 holds in·out = m·k values read with ld = in (k×m
        // transposed forward, m×k backward: `FrozenPlan::of`), X at least
        // n·k values (k×n, ld k, checked above), Y m·n (m×n, ld m).
        unsafe { self.gemm_buf(cfg, w.as_ref(), x, &mut y) }?;
        Ok(y)
    }

    /// A column of at least `n` ones in [`Gpu::ones`].
    fn ensure_ones(&mut self, n: usize) -> Result<(), String> {
        if self.ones.as_ref().is_none_or(|o| o.len() < n) {
            let ones = alloc::vec![1.0f32; n];
            self.ones = Some(self.htod(&ones)?);
        }
        Ok(())
    }

    /// The device matrix `y` on the host, after the stream has run.
    fn download(&self, y: &CudaSlice<f32>) -> Result<Vec<f32>, String> {
        let mut out = alloc::vec![0.0f32; y.len()];
        self.dtoh_into(y, &mut out)?;
        Ok(out)
    }

    /// Row-major `C[m×n] = α·op(A)·op(B) + β·C` on dense f32 device
    /// matrices: `A` stored m×k (k×m when `ta`: `op(A)` is its transpose),
    /// `B` stored k×n (n×k when `tb`), `C` m×n. The extents are checked
    /// here, so this is safe to call with any buffers.
    #[allow(clippy::too_many_arguments)]
    fn rm(
        &self,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: &CudaSlice<f32>,
        ta: bool,
        b: &CudaSlice<f32>,
        tb: bool,
        beta: f32,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), String> {
        let fits = |len: usize, r: usize, c: usize| r.checked_mul(c).is_some_and(|rc| len >= rc);
        if !fits(a.len(), m, k) || !fits(b.len(), k, n) || !fits(c.len(), m, n) {
            return Err(format!("operands too short for a {m}×{k}·{k}×{n} product"));
        }
        if m == 0 || n == 0 || k == 0 {
            return Err(format!("empty product {m}×{k}·{k}×{n}"));
        }
        let int =
            |v: usize| i32::try_from(v).map_err(|_| format!("dimension {v} over cuBLAS's int"));
        let op = |t: bool| {
            if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N }
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and
        // a dense row-major matrix read column-major (ld = its row length)
        // is its transpose: cuBLAS's first operand is B (op N unless `tb`,
        // ld = B's stored row length), its second A, C has ld n.
        let cfg = GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: int(n)?,
            n: int(m)?,
            k: int(k)?,
            alpha,
            lda: int(if tb { k } else { n })?,
            ldb: int(if ta { m } else { k })?,
            beta,
            ldc: int(n)?,
        };
        // SAFETY: B holds k·n values, read as n×k (ld n) or k×n (ld k)
        // column-major; A m·k, read as k×m (ld k) or m×k (ld m); C m·n, read
        // and written as n×m (ld n): all checked above.
        unsafe { self.blas.gemm(cfg, b, a, c) }.map_err(|e| format!("cuBLAS sgemm: {e:?}"))
    }
}
