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
//! [`GPU_MIN_WORK`] multiply-adds ([`set_gpu_min_work`]), in f32 with f32
//! accumulation — or, with `--matmul-precision bf16` and a GPU that has
//! bf16 tensor cores ([`gpu_bf16`]), with operands rounded to bf16 as the
//! CPU's bf16 products round them (cuBLAS GemmEx, f32 sums and output), for
//! the same products the CPU would round. A frozen layer's weights `W0` stay on the GPU once its
//! first product has uploaded them (one copy per precision in use, f32 or bf16, for the forward and the
//! backward product, dropped when a merge changes `W0`), and its bias is
//! added there, so only the activations go up and the result comes back;
//! other products send their operands up each time. An adapted layer's
//! pass runs whole on the GPU, dropout masks included (`try_adapted_forward`,
//! `try_adapted_backward`): its input goes up once for the frozen product
//! and the Hydra branches' low-rank products, and its gradients come back as
//! increments to the host's sums. The optimizer step runs there too
//! ([`try_optimizer_step`]: NVRTC-compiled kernels, the CPU's update bit for
//! bit) for steps of at least [`set_gpu_min_work`]` / 16` values. The
//! tail's values stay on the GPU between the ops that run there
//! ([`set_resident_tail`], `resident`): frozen and adapted linear layers,
//! element-wise arithmetic and functions, LayerNormalization, Softmax, reshapes,
//! transposes and attention's batched products (NVRTC kernels and cuBLAS),
//! forward and backward, and pooling's sums and means; the other ops (gathers, the
//! head) run on the CPU, a value crossing once where they read it. A feature
//! cache that fits stays on the GPU too (`model::CacheConfig::gpu_budget`):
//! its records go up once and each batch's boundary tensors are gathered
//! there. f16 weights stay f16 on the GPU and are widened for each product.
//! The parameters live on the host (each GPU step
//! brings them back), so checkpoints, adapter files and the merge are the
//! CPU path's own. A CUDA call that fails mid-run leaves that product (or
//! that layer's whole pass, or the tail's whole forward and backward when
//! values were resident) to the CPU (the result is the same up to
//! rounding), counted in [`stats`] and reported once on stderr.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use crate::{Error, Result};

#[cfg(feature = "cuda")]
mod cuda;
pub(crate) mod resident;

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

/// Keeps the tail's values on the GPU from one op to the next (on by
/// default): linear layers, element-wise arithmetic, GELU, the norms,
/// Softmax, reshapes, transposes and attention's products run there on
/// resident values, forward and backward, and a value crosses the
/// bus only where the other side reads it. Off, each product sends its
/// operands up and brings its result back, and the element-wise ops and
/// norms run on the CPU (the baseline `examples/train_step` compares with).
pub fn set_resident_tail(on: bool) {
    resident::set_on(on);
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
    /// Whether it is a GPU that shares the host's memory (a Jetson's): what
    /// it holds counts against the board's RAM.
    pub integrated: bool,
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
            Ok(DeviceInfo {
                device,
                name: "cpu".to_string(),
                memory_bytes: None,
                integrated: false,
            })
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

/// Whether the GPU in use runs the large products with bf16 operands now:
/// bf16 products asked for (`runtime::set_matmul_precision`) and a GPU with
/// bf16 tensor cores (compute capability 8.0 or later). Always false on the
/// CPU and without the `cuda` feature.
pub fn gpu_bf16() -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::gpu_bf16()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// The device the tail's dense products run on now.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Some(n) = cuda::active_ordinal() {
        return Device::Cuda(n);
    }
    Device::Cpu
}

/// Whether the GPU in use shares the host's memory (an integrated GPU, as
/// on a Jetson): false on the CPU and on a discrete GPU.
pub fn gpu_shares_host_memory() -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::integrated()
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Counters of the GPU path (all zero without the `cuda` feature).
pub mod stats {
    use core::sync::atomic::{AtomicUsize, Ordering};

    pub(crate) static GPU_PRODUCTS: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_BF16_PRODUCTS: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_FALLBACKS: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_ADAPTED_PASSES: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_BYTES_UP: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_OPTIMIZER_STEPS: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_TAIL_OPS: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_TAIL_RERUNS: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_CACHE_GATHERS: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static GPU_CACHE_UPLOADS: AtomicUsize = AtomicUsize::new(0);

    /// Boundary tensors of a batch taken from feature-cache records kept on
    /// the GPU (a gather there: only the samples' indices go up).
    pub fn gpu_cache_gathers() -> usize {
        GPU_CACHE_GATHERS.load(Ordering::Relaxed)
    }

    /// Feature caches copied whole to the GPU (each once per GPU it is
    /// kept on).
    pub fn gpu_cache_uploads() -> usize {
        GPU_CACHE_UPLOADS.load(Ordering::Relaxed)
    }

    /// Passes of the tail (forward, or forward and backward) run again on
    /// the CPU after a CUDA call failed with values resident on the GPU.
    pub fn gpu_tail_reruns() -> usize {
        GPU_TAIL_RERUNS.load(Ordering::Relaxed)
    }

    /// Element-wise ops and norms of the tail (forward or backward) run on
    /// the GPU so far, on values resident there.
    pub fn gpu_tail_ops() -> usize {
        GPU_TAIL_OPS.load(Ordering::Relaxed)
    }

    /// Optimizer steps run on the GPU (its kernels) so far.
    pub fn gpu_optimizer_steps() -> usize {
        GPU_OPTIMIZER_STEPS.load(Ordering::Relaxed)
    }
    pub(crate) static GPU_BYTES_DOWN: AtomicUsize = AtomicUsize::new(0);

    /// Bytes sent to the GPU so far (weights, activations, gradients).
    pub fn gpu_bytes_up() -> usize {
        GPU_BYTES_UP.load(Ordering::Relaxed)
    }

    /// Bytes brought back from the GPU so far.
    pub fn gpu_bytes_down() -> usize {
        GPU_BYTES_DOWN.load(Ordering::Relaxed)
    }

    /// Dense products run on the GPU so far.
    pub fn gpu_products() -> usize {
        GPU_PRODUCTS.load(Ordering::Relaxed)
    }

    /// Of those, the ones with bf16 operands (tensor cores).
    pub fn gpu_bf16_products() -> usize {
        GPU_BF16_PRODUCTS.load(Ordering::Relaxed)
    }

    /// Passes (forward or backward) of adapted layers that ran whole on
    /// the GPU, the Hydra branches' low-rank products and gradients
    /// included.
    pub fn gpu_adapted_passes() -> usize {
        GPU_ADAPTED_PASSES.load(Ordering::Relaxed)
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
        if !on_cpu_only()
            && work(&[m, k, n]) >= MIN_WORK.load(core::sync::atomic::Ordering::Relaxed)
        {
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

/// Multiply-adds of a product (saturating: only compared with a threshold).
#[cfg(feature = "cuda")]
fn work(dims: &[usize]) -> usize {
    dims.iter().fold(1usize, |w, &d| w.saturating_mul(d))
}

#[cfg(feature = "cuda")]
std::thread_local! {
    /// Set while this thread computes a product the GPU did not take.
    static CPU_ONLY: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

#[cfg(feature = "cuda")]
fn on_cpu_only() -> bool {
    CPU_ONLY.with(|c| c.get())
}

/// Runs `f` with every product it makes on this thread kept on the CPU: for
/// the CPU route of a frozen product that [`try_frozen`] did not take (it
/// failed, or is too small), which must not try the GPU again product by
/// product through [`try_gemm`].
#[cfg_attr(not(feature = "cuda"), inline(always))]
pub(crate) fn on_cpu<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "cuda")]
    {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                CPU_ONLY.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CPU_ONLY.with(|c| c.replace(true)));
        f()
    }
    #[cfg(not(feature = "cuda"))]
    f()
}

/// A frozen layer's weights `W0` as the GPU path reads them when it
/// uploads them: f32, or f16 — kept f16 on the GPU (half the memory and
/// half the upload) and widened to f32 there for each product, as the CPU
/// widens its panels, so the product is the same f32 product.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) enum W0<'w> {
    F32(alloc::borrow::Cow<'w, [f32]>),
    F16(&'w [half::f16]),
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl<'w> W0<'w> {
    /// The weights as f32 (f16 widened exactly).
    pub(crate) fn into_f32(self) -> alloc::borrow::Cow<'w, [f32]> {
        match self {
            W0::F32(w) => w,
            W0::F16(h) => alloc::borrow::Cow::Owned(h.iter().map(|v| v.to_f32()).collect()),
        }
    }
}

/// A frozen layer's `W0` kept on the GPU (in the layer's `Packs`): uploaded
/// on the layer's first GPU product (f32, or rounded to bf16 for bf16
/// products: one copy per precision in use) and read by every product after
/// it, forward (`X·W0ᵀ`) and backward (`dY·W0`) alike — one copy serves both
/// through cuBLAS's transpose flag — so the weights cross the bus once, not
/// once per product. Whoever changes `W0` (merge, unmerge) gets a new one
/// with its `Packs`; a copy made on another GPU (or before a switch to the
/// CPU and back) is uploaded again. A switch of device (to the CPU, or to
/// another GPU) frees every copy that no product is using at that moment;
/// one in use goes with its layer's next GPU product, merge, or drop.
#[derive(Default)]
pub(crate) struct Resident {
    #[cfg(feature = "cuda")]
    slot: cuda::Slot,
}

impl Resident {
    /// Bytes of GPU memory the copy holds (0 when there is none).
    pub(crate) fn device_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |r| r.bytes())
        }
        #[cfg(not(feature = "cuda"))]
        0
    }
}

/// A frozen layer's product on the active GPU with `W0` (out×in, row-major)
/// resident in `slot`: forward `Y[rows×out] = X[rows×in]·W0ᵀ (+ bias)`,
/// backward `dX[rows×in] = dY[rows×out]·W0`, into a new matrix. `w0` gives
/// the weights as f32 and is only called to upload them. The bias is added
/// on the GPU (a rank-1 product `bias·1ᵀ` as the sums' start), so no output
/// rows go up, only `X` (or `dY`); `None` leaves the product to the CPU (no
/// GPU, a product under [`set_gpu_min_work`], or a failed CUDA call).
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), inline(always))]
pub(crate) fn try_frozen<'w>(
    slot: &Resident,
    w0: impl FnOnce() -> W0<'w>,
    forward: bool,
    rows: usize,
    din: usize,
    dout: usize,
    x: &[f32],
    bias: Option<&[f32]>,
) -> Option<Vec<f32>> {
    #[cfg(feature = "cuda")]
    {
        let plan = FrozenPlan::of(forward, rows, din, dout);
        if on_cpu_only()
            || work(&[rows, din, dout]) < MIN_WORK.load(core::sync::atomic::Ordering::Relaxed)
            || plan.k == 0
            || x.len() < rows * plan.k
            || bias.is_some_and(|b| !forward || b.len() != dout)
        {
            return None;
        }
        cuda::frozen(&slot.slot, w0, plan, x, bias)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (slot, w0, forward, rows, din, dout, x, bias);
        None
    }
}

/// One Hydra branch as the GPU path reads it (`hydra::Branch` and its
/// config): `A` r×width, `B` out×r, row-major, optional biases `c` (r) and
/// `e` (out), the scale `s`, and the pass's dropout mask on the branch's
/// input (n×width: 0 or 1/(1−p) per element), drawn by the caller.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct LowRank<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub bias_down: Option<&'a [f32]>,
    pub bias_up: Option<&'a [f32]>,
    pub scale: f32,
    pub rank: usize,
    pub mask: Option<&'a [f32]>,
}

/// An adapted layer's forward from the GPU: `Y`, and what backward reads
/// (`Y0` when there is a sequential branch, each branch's `U`, n×r), on the
/// host and, for a backward on the same GPU, `on_gpu`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct AdaptedForward {
    /// `Y` on the host (empty when it stays on the GPU: `y_gpu`).
    pub y: Vec<f32>,
    /// `Y` on the GPU, for a pass on resident values ([`Act::Gpu`]).
    pub y_gpu: Option<resident::GpuValue>,
    pub y0: Option<Vec<f32>>,
    pub u_p: Vec<f32>,
    pub u_s: Vec<f32>,
    pub on_gpu: OnGpu,
}

/// What an adapted layer's GPU forward leaves on the GPU for its backward
/// (kept with the host's copies in the layer's saved state): the branches'
/// inputs `X` and `Y0` (masked, with dropout) and the dropout masks, so
/// that the backward sends only `dY` (and the rank-r tensors) up. Freed when the backward
/// takes it or the saved state is dropped, with its context current; a
/// backward on the CPU or on another GPU uses the host's copies.
#[derive(Default)]
pub(crate) struct OnGpu {
    #[cfg(feature = "cuda")]
    inner: Option<alloc::boxed::Box<cuda::SavedOnGpu>>,
}

impl OnGpu {
    /// Whether it holds the parallel branch's input `X` (if `x`) and the
    /// sequential one's `Y0` (if `y0`).
    pub(crate) fn holds(&self, x: bool, y0: bool) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.inner.as_ref().is_some_and(|s| s.holds(x, y0))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (x, y0);
            false
        }
    }

    /// Bytes of GPU memory it holds.
    pub(crate) fn bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.inner.as_ref().map_or(0, |s| s.bytes())
        }
        #[cfg(not(feature = "cuda"))]
        0
    }
}

impl fmt::Debug for OnGpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OnGpu({} bytes)", self.bytes())
    }
}

/// One branch's gradient *increments* from one backward (the caller adds
/// them to its sums), shaped as the branch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct LowRankGrads {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub bias_down: Option<Vec<f32>>,
    pub bias_up: Option<Vec<f32>>,
}

/// An adapted layer's backward from the GPU.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct AdaptedBackward {
    pub dx: Option<Vec<f32>>,
    /// `dX` on the GPU, for a pass on resident values ([`Act::Gpu`]).
    pub dx_gpu: Option<resident::GpuValue>,
    pub parallel: Option<LowRankGrads>,
    pub sequential: Option<LowRankGrads>,
}

/// What a `try_adapted_*` call did.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug)]
pub(crate) enum Attempt<T> {
    /// The GPU ran it.
    Done(T),
    /// Not for the GPU (none in use, or a pass under [`set_gpu_min_work`]):
    /// the CPU runs it, its frozen product free to try the GPU alone.
    NotTaken,
    /// A CUDA call failed (counted and reported): the CPU runs the whole
    /// pass, under [`on_cpu`].
    Failed,
}

/// An adapted layer's activations (`X` forward, `dY` backward): on the host
/// (sent up, the result brought back), or resident on the GPU (the result
/// left there: `y_gpu`, `dx_gpu`; the branches' inputs must then be the ones
/// the forward kept there, the host's copies are not read).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) enum Act<'a> {
    Host(&'a [f32]),
    Gpu(&'a resident::GpuValue),
}

impl Act<'_> {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn len(&self) -> usize {
        match self {
            Act::Host(x) => x.len(),
            Act::Gpu(v) => v.len(),
        }
    }
}

/// An adapted layer's forward pass whole on the GPU, `X[n×in]` going up
/// once: `Y0 = X·W0ᵀ + b0` with `W0` resident in `slot` (as
/// [`try_frozen`]), then the parallel branch `Y += s·(X·Aᵀ + c)·Bᵀ + s·e`
/// and the sequential one on `Y0` — the math of `HydraLinear::forward`, each
/// branch's input multiplied by its dropout mask where it has one (`Y0`,
/// `U`s and the kept inputs are the masked ones, as the CPU keeps them).
/// With `keep` (training), the branches' inputs stay on the GPU for the
/// backward ([`OnGpu`]).
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), inline(always))]
pub(crate) fn try_adapted_forward<'w>(
    slot: &Resident,
    w0: impl FnOnce() -> W0<'w>,
    bias: Option<&[f32]>,
    x: Act<'_>,
    (n, din, dout): (usize, usize, usize),
    parallel: Option<LowRank<'_>>,
    sequential: Option<LowRank<'_>>,
    keep: bool,
) -> Attempt<AdaptedForward> {
    #[cfg(feature = "cuda")]
    {
        if !adapted_fits(n, din, dout, parallel, sequential)
            || x.len() != n * din
            || bias.is_some_and(|b| b.len() != dout)
        {
            return Attempt::NotTaken;
        }
        let dims = (n, din, dout);
        cuda::adapted_forward(&slot.slot, w0, bias, x, dims, parallel, sequential, keep)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (slot, w0, bias, x, n, din, dout, parallel, sequential, keep);
        Attempt::NotTaken
    }
}

/// The backward of [`try_adapted_forward`] whole on the GPU for `dY[n×out]`:
/// each branch's gradient increments (`dB = s·dYᵀ·U`, `de = s·Σ dY`,
/// `dU = dY·B`, `dc = s·Σ dU`, `dA = s·dUᵀ·input`) and, if `want_dx`,
/// `dX = (dY + mask_s ⊙ s_s·dU_s·A_s)·W0 + mask_p ⊙ s_p·dU_p·A_p`. `x` (the
/// parallel branch's input), `y0` and the `u`s are the forward's (masked as
/// it kept them), on the host; `on_gpu` what
/// the forward left on the GPU (used in their place where it holds them).
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), inline(always))]
pub(crate) fn try_adapted_backward<'w>(
    slot: &Resident,
    w0: impl FnOnce() -> W0<'w>,
    dy: Act<'_>,
    (n, din, dout): (usize, usize, usize),
    parallel: Option<(LowRank<'_>, &[f32], &[f32])>,
    sequential: Option<(LowRank<'_>, &[f32], &[f32])>,
    want_dx: bool,
    on_gpu: OnGpu,
) -> Attempt<AdaptedBackward> {
    #[cfg(feature = "cuda")]
    {
        let (p, s) = (parallel.map(|p| p.0), sequential.map(|s| s.0));
        // On resident values the branches' inputs are the ones the forward
        // kept on the GPU (no host copies).
        let resident = matches!(dy, Act::Gpu(_));
        let inputs_fit = |b: Option<(LowRank<'_>, &[f32], &[f32])>, width: usize| {
            b.is_none_or(|(l, x, u)| {
                (x.len() == n * width || resident && x.is_empty()) && u.len() == n * l.rank
            })
        };
        if !adapted_fits(n, din, dout, p, s)
            || dy.len() != n * dout
            || !inputs_fit(parallel, din)
            || !inputs_fit(sequential, dout)
        {
            return Attempt::NotTaken;
        }
        let dims = (n, din, dout);
        cuda::adapted_backward(&slot.slot, w0, dy, dims, parallel, sequential, want_dx, on_gpu)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (slot, w0, dy, n, din, dout, parallel, sequential, want_dx, on_gpu);
        Attempt::NotTaken
    }
}

/// One optimizer update rule, as the GPU's kernels take it (see
/// `train::optim::OptimizerKind`); AdamW's bias corrections `c1`, `c2` are
/// the step's, computed by the caller.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(all(feature = "cuda", feature = "onnx")), allow(dead_code))]
pub(crate) enum StepRule {
    Sgd { momentum: f32 },
    AdamW { beta1: f32, beta2: f32, eps: f32, c1: f32, c2: f32 },
}

/// An optimizer's moments on the GPU between its steps there: a cache of
/// the host's (which stay the authority), kept while nothing else changes
/// them. Its owner drops it ([`OptimizerCache::clear`]) when the host's
/// moments change otherwise (a CPU step, a restore). Cloning gives an
/// empty cache; any two compare equal (they hold no state of their own).
#[derive(Default)]
#[cfg_attr(not(feature = "onnx"), allow(dead_code))]
pub(crate) struct OptimizerCache {
    #[cfg(feature = "cuda")]
    inner: Option<alloc::boxed::Box<cuda::OptCache>>,
}

impl OptimizerCache {
    /// Drops the moments on the GPU.
    #[cfg_attr(not(feature = "onnx"), allow(dead_code))]
    pub(crate) fn clear(&mut self) {
        #[cfg(feature = "cuda")]
        {
            self.inner = None;
        }
    }
}

impl Clone for OptimizerCache {
    fn clone(&self) -> Self {
        OptimizerCache::default()
    }
}

impl PartialEq for OptimizerCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for OptimizerCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(feature = "cuda")]
        let on = self.inner.is_some();
        #[cfg(not(feature = "cuda"))]
        let on = false;
        write!(f, "OptimizerCache({})", if on { "on the GPU" } else { "empty" })
    }
}

/// One optimizer step on the GPU in use: `params`, `grads`, `m` (and `v`
/// for AdamW) are matching lists of tensors. The parameters and gradients
/// go up, the kernel updates them with the moments (from `cache`, or sent
/// up), and the parameters and moments come back to the host — written only
/// once all of it is back, so on `Failed` (or `NotTaken`: no GPU, a step of
/// fewer than [`set_gpu_min_work`]` / 16` values, no NVRTC) the host's
/// state is untouched for the CPU to step.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), inline(always))]
#[cfg_attr(not(feature = "onnx"), allow(dead_code))]
pub(crate) fn try_optimizer_step(
    cache: &mut OptimizerCache,
    rule: StepRule,
    lr: f32,
    wd: f32,
    params: &mut [&mut [f32]],
    grads: &[&[f32]],
    m: &mut [Vec<f32>],
    v: &mut [Vec<f32>],
) -> Attempt<()> {
    #[cfg(feature = "cuda")]
    {
        let total: usize = params.iter().map(|p| p.len()).sum();
        let adam = matches!(rule, StepRule::AdamW { .. });
        let same = |l: &[usize]| {
            l.len() == params.len() && l.iter().zip(params.iter()).all(|(a, p)| *a == p.len())
        };
        let lens = |t: &[Vec<f32>]| t.iter().map(Vec::len).collect::<Vec<_>>();
        if total == 0
            || u32::try_from(total).is_err()
            || !gpu_takes(&[total, 16])
            || !same(&grads.iter().map(|g| g.len()).collect::<Vec<_>>())
            || !same(&lens(m))
            || (adam && !same(&lens(v)))
        {
            return Attempt::NotTaken;
        }
        cuda::optimizer_step(&mut cache.inner, rule, lr, wd, params, grads, m, v, total)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cache, rule, lr, wd, params, grads, m, v);
        Attempt::NotTaken
    }
}

/// Whether a GPU is in use for products of `dims` multiply-adds (a cheap
/// check, for work that only the GPU route needs done first).
#[cfg_attr(not(feature = "cuda"), inline(always))]
pub(crate) fn gpu_takes(dims: &[usize]) -> bool {
    #[cfg(feature = "cuda")]
    {
        !on_cpu_only()
            && work(dims) >= MIN_WORK.load(core::sync::atomic::Ordering::Relaxed)
            && cuda::is_active()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dims;
        false
    }
}

/// Whether an adapted layer's pass goes to the GPU: one in use, a frozen
/// product of at least [`set_gpu_min_work`], and branches whose tensors
/// match the layer (anything else is the CPU path's to report).
#[cfg(feature = "cuda")]
fn adapted_fits(
    n: usize,
    din: usize,
    dout: usize,
    parallel: Option<LowRank<'_>>,
    sequential: Option<LowRank<'_>>,
) -> bool {
    let fits = |b: Option<LowRank<'_>>, width: usize| {
        b.is_none_or(|b| {
            b.rank > 0
                && b.a.len() == b.rank * width
                && b.b.len() == dout * b.rank
                && b.bias_down.is_none_or(|c| c.len() == b.rank)
                && b.bias_up.is_none_or(|e| e.len() == dout)
                && b.mask.is_none_or(|m| {
                    // Masks go through element-wise cuBLAS calls of one
                    // int length.
                    Some(m.len()) == n.checked_mul(width) && i32::try_from(m.len()).is_ok()
                })
        })
    };
    !on_cpu_only()
        && n > 0
        && din > 0
        && dout > 0
        && work(&[n, din, dout]) >= MIN_WORK.load(core::sync::atomic::Ordering::Relaxed)
        && fits(parallel, din)
        && fits(sequential, dout)
}

/// The column-major (cuBLAS) call for a frozen product: row-major
/// `Y = X·W0ᵀ` is column-major `Yᵀ = W0·Xᵀ`, where the row-major out×in
/// `W0` read column-major with `ld = in` is `W0ᵀ` (so `op = T` gives `W0`)
/// and row-major `X` is `Xᵀ` (`op = N`); backward `dXᵀ = W0ᵀ·dYᵀ` reads
/// both as they are. `m×n` is the output seen column-major (`n` = rows).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrozenPlan {
    /// `op(W0)` is the transpose (forward).
    pub transpose_w: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Leading dimension of `W0` (its row length, `in`).
    pub ldw: usize,
    /// Leading dimension of the activations `X` / `dY` (= `k`) and of the
    /// output (= `m`).
    pub ldx: usize,
    pub ldc: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl FrozenPlan {
    pub(crate) fn of(forward: bool, rows: usize, din: usize, dout: usize) -> FrozenPlan {
        let (m, k) = if forward { (dout, din) } else { (din, dout) };
        FrozenPlan { transpose_w: forward, m, n: rows, k, ldw: din, ldx: k, ldc: m }
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
        // cuBLAS's own argument checks (it refuses a call that breaks them).
        assert!(lda >= (if ta { k } else { m }).max(1), "lda {lda}");
        assert!(ldb >= (if tb { n } else { k }).max(1), "ldb {ldb}");
        assert!(ldc >= m.max(1), "ldc {ldc}");
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

    /// The two calls `cuda.rs` makes for a frozen layer with `W0` resident
    /// (the bias as a rank-1 product `bias·1ᵀ`, then the product with β = 1,
    /// `blas_sgemm` for cuBLAS) give the row-major `X·W0ᵀ + b` and `dY·W0`
    /// of the CPU path, on the W0 buffer as the layer stores it.
    #[test]
    fn the_frozen_plan_computes_the_layer_products_from_one_w0_copy() {
        let mut rng = Rng::new(3);
        for (rows, din, dout) in [(7, 5, 3), (1, 9, 4), (6, 4, 11)] {
            let mut v = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
            let (w0, x, dy, b) = (v(dout * din), v(rows * din), v(rows * dout), v(dout));
            // Forward, with and without the bias.
            for bias in [Some(&b[..]), None] {
                let p = FrozenPlan::of(true, rows, din, dout);
                let mut got = vec![f32::NAN; p.m * p.n];
                let mut beta = 0.0;
                if let Some(b) = bias {
                    let ones = vec![1.0f32; p.n + 3];
                    blas_sgemm(
                        (false, false),
                        (p.m, p.n, 1),
                        1.0,
                        b,
                        p.m,
                        &ones,
                        1,
                        0.0,
                        &mut got,
                        p.ldc,
                    );
                    beta = 1.0;
                }
                let tr = (p.transpose_w, false);
                blas_sgemm(tr, (p.m, p.n, p.k), 1.0, &w0, p.ldw, &x, p.ldx, beta, &mut got, p.ldc);
                let mut want: Vec<f32> =
                    (0..rows * dout).map(|i| bias.map_or(0.0, |b| b[i % dout])).collect();
                let wb = if bias.is_some() { 1.0 } else { 0.0 };
                crate::hydra::gemm(
                    rows,
                    din,
                    dout,
                    1.0,
                    &x,
                    (din, 1),
                    &w0,
                    (1, din),
                    wb,
                    &mut want,
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-5, "forward {rows}×{din}→{dout}: {g} vs {w}");
                }
            }
            let p = FrozenPlan::of(false, rows, din, dout);
            let mut got = vec![f32::NAN; p.m * p.n];
            let tr = (p.transpose_w, false);
            blas_sgemm(tr, (p.m, p.n, p.k), 1.0, &w0, p.ldw, &dy, p.ldx, 0.0, &mut got, p.ldc);
            let mut want = vec![0.0; rows * din];
            crate::hydra::gemm(rows, dout, din, 1.0, &dy, (dout, 1), &w0, (din, 1), 0.0, &mut want);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5, "backward {rows}×{din}→{dout}: {g} vs {w}");
            }
        }
    }
}
