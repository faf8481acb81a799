//! The tail's values resident on the GPU (see `crate::device::resident`):
//! device buffers that outlive one op, and the element-wise and
//! normalisation kernels (GELU, broadcast Add, LayerNormalization, with
//! their backward passes) that run on them, compiled with NVRTC on first
//! use. Frozen linear layers take and give resident values through
//! [`Gpu::frozen`], with `W0` resident as for every frozen product.

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use std::sync::Once;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::{BufRef, Gpu, Slot, active, counted, make_current, succeeded, with_gpu, with_resident};
use crate::device::{FrozenPlan, stats};

/// The kernels' CUDA C++ source. A grid-stride loop with a 64-bit index
/// covers any length; LayerNormalization runs one thread per lane, its
/// moments and backward sums in f64 as the CPU's (`tail::ops::norm`).
const SOURCE: &str = r#"
#define HYDRA_LOOP(i, n) for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
                              i < (n); i += (unsigned long long)blockDim.x * gridDim.x)

extern "C" __global__ void hydra_gelu(const float *x, float *y, unsigned long long n) {
    HYDRA_LOOP(i, n) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

extern "C" __global__ void hydra_gelu_grad(const float *x, const float *dy, float *dx,
                                           unsigned long long n) {
    HYDRA_LOOP(i, n) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}

extern "C" __global__ void hydra_add(const float *a, const float *b, float *y,
                                     unsigned long long n, unsigned long long blen) {
    HYDRA_LOOP(i, n) { y[i] = a[i] + b[i % blen]; }
}

extern "C" __global__ void hydra_layer_norm(const float *x, const float *s, const float *b,
                                            float *y, unsigned long long rows,
                                            unsigned long long width, float eps) {
    HYDRA_LOOP(r, rows) {
        const float *row = x + r * width;
        double mean = 0.0, var = 0.0;
        for (unsigned long long j = 0; j < width; j++) mean += (double)row[j];
        mean /= (double)width;
        for (unsigned long long j = 0; j < width; j++) {
            double d = (double)row[j] - mean;
            var += d * d;
        }
        var /= (double)width;
        float m = (float)mean, rstd = (float)(1.0 / sqrt(var + (double)eps));
        float *out = y + r * width;
        for (unsigned long long j = 0; j < width; j++) out[j] = (row[j] - m) * rstd * s[j] + b[j];
    }
}

extern "C" __global__ void hydra_layer_norm_grad(const float *x, const float *s, const float *dy,
                                                 float *dx, unsigned long long rows,
                                                 unsigned long long width, float eps) {
    HYDRA_LOOP(r, rows) {
        const float *row = x + r * width;
        const float *g = dy + r * width;
        double mean = 0.0, var = 0.0;
        for (unsigned long long j = 0; j < width; j++) mean += (double)row[j];
        mean /= (double)width;
        for (unsigned long long j = 0; j < width; j++) {
            double d = (double)row[j] - mean;
            var += d * d;
        }
        var /= (double)width;
        double rstd = 1.0 / sqrt(var + (double)eps);
        double sg = 0.0, sgx = 0.0;
        for (unsigned long long j = 0; j < width; j++) {
            double gh = (double)g[j] * (double)s[j];
            sg += gh;
            sgx += gh * (((double)row[j] - mean) * rstd);
        }
        float mg = (float)(sg / (double)width), mgx = (float)(sgx / (double)width);
        float m = (float)mean, rs = (float)rstd;
        float *out = dx + r * width;
        for (unsigned long long j = 0; j < width; j++)
            out[j] = rs * (g[j] * s[j] - mg - (row[j] - m) * rs * mgx);
    }
}
"#;

/// The compiled kernels of one [`Gpu`].
pub(super) struct Kernels {
    gelu: CudaFunction,
    gelu_grad: CudaFunction,
    add: CudaFunction,
    layer_norm: CudaFunction,
    layer_norm_grad: CudaFunction,
}

fn compile(gpu: &Gpu) -> Result<Kernels, String> {
    let module = super::optim::load(gpu, SOURCE, "tail")?;
    let f = |name: &str| module.load_function(name).map_err(|e| format!("{name}: {e}"));
    Ok(Kernels {
        gelu: f("hydra_gelu")?,
        gelu_grad: f("hydra_gelu_grad")?,
        add: f("hydra_add")?,
        layer_norm: f("hydra_layer_norm")?,
        layer_norm_grad: f("hydra_layer_norm_grad")?,
    })
}

/// A tail value on the GPU: `len` f32, dense. Freed with its own context
/// current, on whatever thread drops it.
pub(in crate::device) struct DevValue {
    /// The [`Gpu::id`] it is on.
    gpu: u64,
    ctx: Arc<CudaContext>,
    data: CudaSlice<f32>,
}

impl DevValue {
    pub(in crate::device) fn len(&self) -> usize {
        self.data.len()
    }
}

impl Drop for DevValue {
    fn drop(&mut self) {
        make_current(&self.ctx);
    }
}

/// Whether the tail's values can live on the GPU in use: one is active, its
/// tail kernels compile (NVRTC; compiled here on the first call, a failure
/// said once), and products there are f32 (bf16 products take bf16
/// operands, which resident f32 values are not).
pub(in crate::device) fn ready() -> bool {
    let Some(gpu) = active() else { return false };
    let mut gpu = gpu.lock().unwrap_or_else(|e| e.into_inner());
    if gpu.bf16 && crate::runtime::bf16_requested() {
        return false;
    }
    if gpu.tail.is_none() {
        let k = compile(&gpu);
        if let Err(e) = &k {
            static SAID: Once = Once::new();
            SAID.call_once(|| {
                eprintln!("hydra-edge: the tail's element-wise ops and norms stay on the CPU: {e}");
            });
        }
        gpu.tail = Some(k);
    }
    matches!(gpu.tail, Some(Ok(_)))
}

/// `f` on the GPU in use, with its tail kernels; a failure is counted and
/// reported (`fell_back`).
fn with_kernels<T>(f: impl FnOnce(&Gpu, &Kernels) -> Result<T, String>) -> Result<T, ()> {
    with_gpu(|gpu| match &gpu.tail {
        Some(Ok(k)) => f(gpu, k),
        _ => Err("the tail kernels are not loaded".to_string()),
    })
    .map_err(|_| ())
}

impl Gpu {
    fn value(&self, data: CudaSlice<f32>) -> Arc<DevValue> {
        Arc::new(DevValue { gpu: self.id, ctx: self.ctx.clone(), data })
    }

    /// `v`'s buffer, if it is on this GPU.
    fn on_this<'a>(&self, v: &'a DevValue) -> Result<&'a CudaSlice<f32>, String> {
        if v.gpu == self.id {
            Ok(&v.data)
        } else {
            Err("a value on another GPU (the device changed)".to_string())
        }
    }

    fn launch_cfg(n: usize) -> LaunchConfig {
        // 256 threads a block, at most 1024 blocks: the loops stride over the rest.
        let blocks = n.div_ceil(256).clamp(1, 1024) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }
}

/// `v`'s buffer, if it is on `gpu`.
pub(super) fn on_gpu<'a>(gpu: &Gpu, v: &'a DevValue) -> Result<&'a CudaSlice<f32>, String> {
    gpu.on_this(v)
}

/// `data` (on `gpu`) as a value.
pub(super) fn value(gpu: &Gpu, data: CudaSlice<f32>) -> Arc<DevValue> {
    gpu.value(data)
}

fn tail_op_ran() {
    stats::GPU_TAIL_OPS.fetch_add(1, Ordering::Relaxed);
    succeeded();
}

pub(in crate::device) fn upload(x: &[f32]) -> Result<Arc<DevValue>, ()> {
    with_gpu(|gpu| Ok(gpu.value(gpu.htod(x)?))).map_err(|_| ())
}

pub(in crate::device) fn download(v: &DevValue) -> Result<Vec<f32>, ()> {
    with_gpu(|gpu| gpu.download(gpu.on_this(v)?)).map_err(|_| ())
}

pub(in crate::device) fn gelu(
    x: &DevValue,
    grad_of: Option<&DevValue>,
) -> Result<Arc<DevValue>, ()> {
    let r = with_kernels(|gpu, k| {
        let xs = gpu.on_this(x)?;
        let n = xs.len() as u64;
        let mut y = gpu.stream.alloc_zeros::<f32>(xs.len()).map_err(|e| format!("alloc: {e}"))?;
        match grad_of {
            None => {
                let mut b = gpu.stream.launch_builder(&k.gelu);
                b.arg(xs).arg(&mut y).arg(&n);
                // SAFETY: x and y hold n f32; the arguments match
                // `hydra_gelu(const float *, float *, unsigned long long)`.
                unsafe { b.launch(Gpu::launch_cfg(xs.len())) }
                    .map_err(|e| format!("GELU kernel: {e}"))?;
            }
            Some(dy) => {
                let dys = gpu.on_this(dy)?;
                if dys.len() != xs.len() {
                    return Err("GELU backward: gradient and input sizes differ".to_string());
                }
                let mut b = gpu.stream.launch_builder(&k.gelu_grad);
                b.arg(xs).arg(dys).arg(&mut y).arg(&n);
                // SAFETY: x, dy and dx hold n f32; the arguments match
                // `hydra_gelu_grad`'s in order and type.
                unsafe { b.launch(Gpu::launch_cfg(xs.len())) }
                    .map_err(|e| format!("GELU backward kernel: {e}"))?;
            }
        }
        Ok(gpu.value(y))
    });
    r.inspect(|_| tail_op_ran())
}

/// `a + b`, `b` repeated over `a` (its length divides `a`'s).
pub(in crate::device) fn add(a: &DevValue, b: &DevValue) -> Result<Arc<DevValue>, ()> {
    with_kernels(|gpu, k| {
        let (av, bv) = (gpu.on_this(a)?, gpu.on_this(b)?);
        if bv.is_empty() || av.len() % bv.len() != 0 {
            return Err("Add: the second operand does not tile the first".to_string());
        }
        let (n, blen) = (av.len() as u64, bv.len() as u64);
        let mut y = gpu.stream.alloc_zeros::<f32>(av.len()).map_err(|e| format!("alloc: {e}"))?;
        let mut l = gpu.stream.launch_builder(&k.add);
        l.arg(av).arg(bv).arg(&mut y).arg(&n).arg(&blen);
        // SAFETY: a and y hold n f32, b blen ≥ 1 (i % blen < blen); the
        // arguments match `hydra_add`'s in order and type.
        unsafe { l.launch(Gpu::launch_cfg(av.len())) }.map_err(|e| format!("Add kernel: {e}"))?;
        Ok(gpu.value(y))
    })
    .inspect(|_| tail_op_ran())
}

/// LayerNormalization over lanes of `width` (`scale`, `bias` of `width`);
/// with `grad_of = dy`, its backward `dx` instead (`bias` unused).
pub(in crate::device) fn layer_norm(
    x: &DevValue,
    scale: &DevValue,
    bias: &DevValue,
    width: usize,
    eps: f32,
    grad_of: Option<&DevValue>,
) -> Result<Arc<DevValue>, ()> {
    with_kernels(|gpu, k| {
        let (xs, s, b) = (gpu.on_this(x)?, gpu.on_this(scale)?, gpu.on_this(bias)?);
        if width == 0 || xs.len() % width != 0 || s.len() != width || b.len() != width {
            return Err("LayerNormalization: scale or bias does not match the lanes".to_string());
        }
        let rows = xs.len() / width;
        let (r, w) = (rows as u64, width as u64);
        let mut y = gpu.stream.alloc_zeros::<f32>(xs.len()).map_err(|e| format!("alloc: {e}"))?;
        match grad_of {
            None => {
                let mut l = gpu.stream.launch_builder(&k.layer_norm);
                l.arg(xs).arg(s).arg(b).arg(&mut y).arg(&r).arg(&w).arg(&eps);
                // SAFETY: x and y hold rows·width f32, scale and bias width;
                // the arguments match `hydra_layer_norm`'s in order and type.
                unsafe { l.launch(Gpu::launch_cfg(rows)) }
                    .map_err(|e| format!("LayerNormalization kernel: {e}"))?;
            }
            Some(dy) => {
                let g = gpu.on_this(dy)?;
                if g.len() != xs.len() {
                    return Err("LayerNormalization backward: sizes differ".to_string());
                }
                let mut l = gpu.stream.launch_builder(&k.layer_norm_grad);
                l.arg(xs).arg(s).arg(g).arg(&mut y).arg(&r).arg(&w).arg(&eps);
                // SAFETY: x, dy and dx hold rows·width f32, scale width; the
                // arguments match `hydra_layer_norm_grad`'s in order and type.
                unsafe { l.launch(Gpu::launch_cfg(rows)) }
                    .map_err(|e| format!("LayerNormalization backward kernel: {e}"))?;
            }
        }
        Ok(gpu.value(y))
    })
    .inspect(|_| tail_op_ran())
}

/// `acc + inc` (same length), in place when `acc` is not shared.
pub(in crate::device) fn accumulate(
    mut acc: Arc<DevValue>,
    inc: &DevValue,
) -> Result<Arc<DevValue>, ()> {
    with_gpu(|gpu| {
        let x = gpu.on_this(inc)?;
        if Arc::get_mut(&mut acc).is_none() {
            let copy =
                gpu.stream.clone_dtod(gpu.on_this(&acc)?).map_err(|e| format!("copy: {e}"))?;
            acc = gpu.value(copy);
        }
        let Some(a) = Arc::get_mut(&mut acc) else { return Err("shared sum".to_string()) };
        if a.gpu != gpu.id {
            return Err("a value on another GPU (the device changed)".to_string());
        }
        gpu.axpy(1.0, x, &mut a.data)?;
        Ok(())
    })
    .map_err(|_| ())?;
    Ok(acc)
}

/// A frozen layer's product on resident values (see `super::frozen`):
/// forward `X·W0ᵀ (+ bias)` or backward `dY·W0`, the result resident.
pub(in crate::device) fn frozen<'w>(
    slot: &Slot,
    w0: impl FnOnce() -> alloc::borrow::Cow<'w, [f32]>,
    plan: FrozenPlan,
    x: &DevValue,
    bias: Option<&[f32]>,
) -> Result<Arc<DevValue>, ()> {
    if [plan.m, plan.n, plan.k].iter().any(|&d| d == 0 || i32::try_from(d).is_err()) {
        return Err(());
    }
    let ran = with_resident(slot, w0, plan, |gpu, w| {
        if w.is_bf16() {
            return Err("a bf16 product on resident f32 values".to_string());
        }
        let xs = gpu.on_this(x)?;
        let y = gpu.frozen(plan, w, BufRef::F32(xs), bias)?;
        Ok(gpu.value(y))
    });
    match ran {
        Ok((y, bf16)) => {
            counted(bf16);
            Ok(y)
        }
        Err(_) => Err(()),
    }
}
