//! The tail's values resident on the GPU (see `crate::device::resident`):
//! device buffers that outlive one op, and the kernels that run on them
//! (GELU, broadcasting arithmetic, LayerNormalization, Softmax, permutes,
//! with their backward passes), compiled with NVRTC on first use, and
//! attention's batched products (strided-batched cuBLAS). Linear layers
//! take and give resident values through [`Gpu::frozen`] and the adapted
//! pass (`super::hydra`), with `W0` resident as for every frozen product.

use alloc::string::{String, ToString};
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use std::sync::{Mutex, Once};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::{BufRef, Gpu, Slot, active, counted, make_current, succeeded, with_gpu, with_resident};
use crate::device::{FrozenPlan, stats};

/// The kernels' CUDA C++ source. A grid-stride loop with a 64-bit index
/// covers any length; LayerNormalization and Softmax run one thread per
/// lane (LayerNormalization's moments and backward sums in f64 as the
/// CPU's, `tail::ops::norm`).
const SOURCE: &str = r#"
#define HYDRA_LOOP(i, n) for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
                              i < (n); i += (unsigned long long)blockDim.x * gridDim.x)

// The tail's `pow` (exact for the small integer exponents, as the CPU's).
__device__ float hydra_pow(float x, float p) {
    if (p == 2.0f) return x * x;
    if (p == 1.0f) return x;
    if (p == 0.5f) return sqrtf(x);
    if (p == 3.0f) return x * x * x;
    return powf(x, p);
}

// op: 0 add, 1 subtract, 2 multiply, 3 divide, 4 pow, 5 max, 6 min (ties and
// a NaN `x` give x, as on the CPU), 7 Pow's derivative in its base z·x^(z−1).
__device__ float hydra_binary_f(float x, float z, int op) {
    switch (op) {
    case 0: return x + z;
    case 1: return x - z;
    case 2: return x * z;
    case 3: return x / z;
    case 4: return hydra_pow(x, z);
    case 5: return (x >= z || x != x) ? x : z;
    case 6: return (x <= z || x != x) ? x : z;
    default: return z * hydra_pow(x, z - 1.0f);
    }
}

// e^x as the CPU's (`tail::fastmath::exp`): 0 below −87, e^88 above 88.
__device__ float hydra_exp(float x) {
    return x > 88.0f ? expf(88.0f) : x < -87.0f ? 0.0f : expf(x);
}

// Unary functions (k: 0 Relu, 1 Sigmoid, 2 Tanh, 3 Erf, 4 tanh-GELU, 5 Sqrt,
// 6 Exp, 7 Neg, 8 exact GELU x·Φ(x)) and their derivatives; tanh-GELU in double, as the CPU's
// (in f32, 1 + tanh(u) cancels for x below about −4).
__device__ float hydra_unary_f(float x, int k) {
    switch (k) {
    case 0: return fmaxf(x, 0.0f);
    case 1: return 1.0f / (1.0f + hydra_exp(-x));
    case 2: return tanhf(x);
    case 3: return erff(x);
    case 4: {
        double xd = (double)x;
        return (float)(0.5 * xd * (1.0 + tanh(0.7978845608028654 * (xd + 0.044715 * xd * xd * xd))));
    }
    case 5: return sqrtf(x);
    case 6: return hydra_exp(x);
    case 7: return -x;
    default: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
}

__device__ float hydra_unary_d(float x, int k) {
    switch (k) {
    case 0: return x > 0.0f ? 1.0f : 0.0f;
    case 1: {
        float y = 1.0f / (1.0f + hydra_exp(-x));
        return y * (1.0f - y);
    }
    case 2: {
        float y = tanhf(x);
        return 1.0f - y * y;
    }
    case 3: return 1.1283791670955126f * hydra_exp(-x * x);
    case 4: {
        double xd = (double)x;
        double t = tanh(0.7978845608028654 * (xd + 0.044715 * xd * xd * xd));
        double du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * xd * xd);
        return (float)(0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * du);
    }
    case 5: return 0.5f / sqrtf(x);
    case 6: return hydra_exp(x);
    case 7: return -1.0f;
    default: {
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
        return cdf + x * pdf;
    }
    }
}

extern "C" __global__ void hydra_unary(const float *x, float *y, unsigned long long n, int k) {
    HYDRA_LOOP(i, n) { y[i] = hydra_unary_f(x[i], k); }
}

// dx = dy·f'(x) (Relu: dy where x > 0, else 0).
extern "C" __global__ void hydra_unary_grad(const float *x, const float *dy, float *dx,
                                            unsigned long long n, int k) {
    HYDRA_LOOP(i, n) {
        dx[i] = k == 0 ? (x[i] > 0.0f ? dy[i] : 0.0f) : dy[i] * hydra_unary_d(x[i], k);
    }
}

extern "C" __global__ void hydra_binary(const float *a, const float *b, float *y,
                                        unsigned long long n, int op, int rank,
                                        unsigned long long d0, unsigned long long d1,
                                        unsigned long long d2, unsigned long long d3,
                                        unsigned long long d4, unsigned long long d5,
                                        unsigned long long a0, unsigned long long a1,
                                        unsigned long long a2, unsigned long long a3,
                                        unsigned long long a4, unsigned long long a5,
                                        unsigned long long b0, unsigned long long b1,
                                        unsigned long long b2, unsigned long long b3,
                                        unsigned long long b4, unsigned long long b5) {
    const unsigned long long d[6] = {d0, d1, d2, d3, d4, d5};
    const unsigned long long sa[6] = {a0, a1, a2, a3, a4, a5};
    const unsigned long long sb[6] = {b0, b1, b2, b3, b4, b5};
    HYDRA_LOOP(i, n) {
        unsigned long long r = i, oa = 0, ob = 0;
        for (int k = rank - 1; k >= 0; k--) {
            unsigned long long c = r % d[k];
            r /= d[k];
            oa += c * sa[k];
            ob += c * sb[k];
        }
        y[i] = hydra_binary_f(a[oa], b[ob], op);
    }
}

extern "C" __global__ void hydra_permute(const float *x, float *y, unsigned long long n, int rank,
                                         unsigned long long d0, unsigned long long d1,
                                         unsigned long long d2, unsigned long long d3,
                                         unsigned long long d4, unsigned long long d5,
                                         unsigned long long s0, unsigned long long s1,
                                         unsigned long long s2, unsigned long long s3,
                                         unsigned long long s4, unsigned long long s5) {
    const unsigned long long d[6] = {d0, d1, d2, d3, d4, d5};
    const unsigned long long st[6] = {s0, s1, s2, s3, s4, s5};
    HYDRA_LOOP(i, n) {
        unsigned long long r = i, o = 0;
        for (int k = rank - 1; k >= 0; k--) {
            o += (r % d[k]) * st[k];
            r /= d[k];
        }
        y[i] = x[o];
    }
}

extern "C" __global__ void hydra_softmax(const float *x, float *y, unsigned long long rows,
                                         unsigned long long width) {
    HYDRA_LOOP(r, rows) {
        const float *row = x + r * width;
        float *out = y + r * width;
        // (-FLT_MAX: NVRTC has no <math.h> and its INFINITY; a lane of
        // -inf gives NaN either way, as on the CPU.)
        float m = -3.402823466e+38f;
        for (unsigned long long j = 0; j < width; j++) m = fmaxf(m, row[j]);
        float sum = 0.0f;
        for (unsigned long long j = 0; j < width; j++) {
            out[j] = expf(row[j] - m);
            sum += out[j];
        }
        float inv = 1.0f / sum;
        for (unsigned long long j = 0; j < width; j++) out[j] *= inv;
    }
}

extern "C" __global__ void hydra_softmax_grad(const float *y, const float *dy, float *dx,
                                              unsigned long long rows, unsigned long long width) {
    HYDRA_LOOP(r, rows) {
        const float *yr = y + r * width;
        const float *g = dy + r * width;
        float *out = dx + r * width;
        float dot = 0.0f;
        for (unsigned long long j = 0; j < width; j++) dot += yr[j] * g[j];
        for (unsigned long long j = 0; j < width; j++) out[j] = yr[j] * (g[j] - dot);
    }
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
__device__ float hydra_half_to_float(unsigned int h) {
    unsigned int s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0) {
        // Zero or subnormal: m·2⁻²⁴, exact in f32.
        float v = (float)m * 5.9604644775390625e-8f;
        return s ? -v : v;
    }
    bits = e == 31 ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112u) << 23) | (m << 13));
    union { unsigned int u; float f; } c;
    c.u = bits;
    return c.f;
}

// Rows of the feature cache's records (`record` bytes each, resident) to a
// dense f32 batch: element j of sample r is the `half` (f16) or f32 value
// at byte `offset` of record idx[r], little-endian, read byte by byte (a
// record need not be aligned).
extern "C" __global__ void hydra_gather(const unsigned char *recs, const unsigned long long *idx,
                                        float *y, unsigned long long n, unsigned long long count,
                                        unsigned long long record, unsigned long long offset,
                                        int half) {
    HYDRA_LOOP(i, n) {
        unsigned long long r = i / count, j = i % count;
        const unsigned char *p = recs + idx[r] * record + offset;
        if (half) {
            y[i] = hydra_half_to_float((unsigned int)p[2 * j] | ((unsigned int)p[2 * j + 1] << 8));
        } else {
            const unsigned char *q = p + 4 * j;
            union { unsigned int u; float f; } c;
            c.u = (unsigned int)q[0] | ((unsigned int)q[1] << 8) | ((unsigned int)q[2] << 16) |
                  ((unsigned int)q[3] << 24);
            y[i] = c.f;
        }
    }
}

// A sum over the middle axis of [outer, len, inner], scaled (a mean's
// 1/len, or 1): y[o, i] = scale·Σ_l x[o, l, i], the terms in order (the
// CPU's order may differ: equal up to rounding). One thread per output.
extern "C" __global__ void hydra_reduce(const float *x, float *y, unsigned long long outer,
                                        unsigned long long len, unsigned long long inner,
                                        float scale) {
    HYDRA_LOOP(j, outer * inner) {
        unsigned long long o = j / inner, i = j % inner;
        const float *p = x + o * len * inner + i;
        float sum = 0.0f;
        for (unsigned long long l = 0; l < len; l++) sum += p[l * inner];
        y[j] = sum * scale;
    }
}

// Its backward: dx[o, l, i] = scale·dy[o, i].
extern "C" __global__ void hydra_reduce_grad(const float *dy, float *dx, unsigned long long outer,
                                             unsigned long long len, unsigned long long inner,
                                             float scale) {
    HYDRA_LOOP(j, outer * len * inner) {
        unsigned long long i = j % inner, o = j / (len * inner);
        dx[j] = dy[o * inner + i] * scale;
    }
}

// f16 weights (their bits) widened to f32, exactly.
extern "C" __global__ void hydra_widen(const unsigned short *h, float *y, unsigned long long n) {
    HYDRA_LOOP(i, n) {
        y[i] = hydra_half_to_float((unsigned int)h[i]);
    }
}
"#;

/// The compiled kernels of one [`Gpu`].
pub(super) struct Kernels {
    binary: CudaFunction,
    permute: CudaFunction,
    softmax: CudaFunction,
    softmax_grad: CudaFunction,
    layer_norm: CudaFunction,
    layer_norm_grad: CudaFunction,
    gather: CudaFunction,
    widen: CudaFunction,
    reduce: CudaFunction,
    reduce_grad: CudaFunction,
    unary: CudaFunction,
    unary_grad: CudaFunction,
}

fn compile(gpu: &Gpu) -> Result<Kernels, String> {
    let module = super::optim::load(gpu, SOURCE, "tail")?;
    let f = |name: &str| module.load_function(name).map_err(|e| format!("{name}: {e}"));
    Ok(Kernels {
        binary: f("hydra_binary")?,
        permute: f("hydra_permute")?,
        softmax: f("hydra_softmax")?,
        softmax_grad: f("hydra_softmax_grad")?,
        layer_norm: f("hydra_layer_norm")?,
        layer_norm_grad: f("hydra_layer_norm_grad")?,
        gather: f("hydra_gather")?,
        widen: f("hydra_widen")?,
        reduce: f("hydra_reduce")?,
        reduce_grad: f("hydra_reduce_grad")?,
        unary: f("hydra_unary")?,
        unary_grad: f("hydra_unary_grad")?,
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
    compiled(&mut gpu)
}

/// Whether `gpu`'s tail kernels are there (compiled here on the first call;
/// a failure said once).
pub(super) fn compiled(gpu: &mut Gpu) -> bool {
    if gpu.tail.is_none() {
        let k = compile(gpu);
        if let Err(e) = &k {
            static SAID: Once = Once::new();
            SAID.call_once(|| {
                eprintln!(
                    "hydra-edge: the tail's element-wise ops and norms stay on the CPU, and f16 \
                     weights go to the GPU as f32: {e}"
                );
            });
        }
        gpu.tail = Some(k);
    }
    matches!(gpu.tail, Some(Ok(_)))
}

/// f16 weights' bits `h` (on `gpu`) widened to f32 in a new buffer, for
/// one product.
pub(super) fn widen(gpu: &Gpu, h: &CudaSlice<u16>) -> Result<CudaSlice<f32>, String> {
    let Some(Ok(k)) = &gpu.tail else { return Err("the tail kernels are not loaded".to_string()) };
    let n = h.len();
    let mut y = gpu.stream.alloc_zeros::<f32>(n).map_err(|e| format!("alloc: {e}"))?;
    let n64 = n as u64;
    let mut l = gpu.stream.launch_builder(&k.widen);
    l.arg(h).arg(&mut y).arg(&n64);
    // SAFETY: h holds n u16 and y n f32; the arguments match `hydra_widen`'s
    // (two pointers, a u64).
    unsafe { l.launch(Gpu::launch_cfg(n)) }.map_err(|e| format!("widen kernel: {e}"))?;
    Ok(y)
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

/// Unary function `k` of `x` (0 Relu, 1 Sigmoid, 2 Tanh, 3 Erf, 4
/// tanh-GELU, 5 Sqrt, 6 Exp, 7 Neg, 8 exact GELU), or with `dy` its
/// backward `dy·f'(x)`.
pub(in crate::device) fn unary(
    x: &DevValue,
    k: i32,
    grad_of: Option<&DevValue>,
) -> Result<Arc<DevValue>, ()> {
    with_kernels(|gpu, kern| {
        let xs = gpu.on_this(x)?;
        if !(0..9).contains(&k) {
            return Err("unary: no such function".to_string());
        }
        let n = xs.len() as u64;
        let mut y = gpu.stream.alloc_zeros::<f32>(xs.len()).map_err(|e| format!("alloc: {e}"))?;
        match grad_of {
            None => {
                let mut b = gpu.stream.launch_builder(&kern.unary);
                b.arg(xs).arg(&mut y).arg(&n).arg(&k);
                // SAFETY: x and y hold n f32; the arguments match
                // `hydra_unary(const float *, float *, unsigned long long, int)`.
                unsafe { b.launch(Gpu::launch_cfg(xs.len())) }
                    .map_err(|e| format!("unary kernel: {e}"))?;
            }
            Some(dy) => {
                let dys = gpu.on_this(dy)?;
                if dys.len() != xs.len() {
                    return Err("unary backward: gradient and input sizes differ".to_string());
                }
                let mut b = gpu.stream.launch_builder(&kern.unary_grad);
                b.arg(xs).arg(dys).arg(&mut y).arg(&n).arg(&k);
                // SAFETY: x, dy and dx hold n f32; the arguments match
                // `hydra_unary_grad`'s in order and type.
                unsafe { b.launch(Gpu::launch_cfg(xs.len())) }
                    .map_err(|e| format!("unary backward kernel: {e}"))?;
            }
        }
        Ok(gpu.value(y))
    })
    .inspect(|_| tail_op_ran())
}

/// `x` seen as `[outer, len, inner]` summed over `len` and scaled, or with
/// `grad` (`x` then the output's gradient, `outer·inner` values) that
/// gradient spread back over `len`, scaled.
pub(in crate::device) fn reduce(
    x: &DevValue,
    (outer, len, inner): (usize, usize, usize),
    scale: f32,
    grad: bool,
) -> Result<Arc<DevValue>, ()> {
    with_kernels(|gpu, k| {
        let xs = gpu.on_this(x)?;
        let small = outer.checked_mul(inner).ok_or("overflow")?;
        let big = small.checked_mul(len).ok_or("overflow")?;
        let (n_in, n_out) = if grad { (small, big) } else { (big, small) };
        if xs.len() != n_in || n_out == 0 {
            return Err("reduce: the input's size is not the plan's".to_string());
        }
        let (o64, l64, i64_) = (outer as u64, len as u64, inner as u64);
        let mut y = gpu.stream.alloc_zeros::<f32>(n_out).map_err(|e| format!("alloc: {e}"))?;
        let mut l = gpu.stream.launch_builder(if grad { &k.reduce_grad } else { &k.reduce });
        l.arg(xs).arg(&mut y).arg(&o64).arg(&l64).arg(&i64_).arg(&scale);
        // SAFETY: forward, x holds outer·len·inner f32 and y outer·inner;
        // backward, the other way round (checked above); every index the
        // kernels form is below those counts; the arguments match
        // `hydra_reduce` / `hydra_reduce_grad` (two pointers, three u64, a
        // float).
        unsafe { l.launch(Gpu::launch_cfg(n_out)) }.map_err(|e| format!("reduce kernel: {e}"))?;
        Ok(gpu.value(y))
    })
    .inspect(|_| tail_op_ran())
}

// The most axes the element-wise kernels index (one constant for both sides).
use crate::device::resident::MAX_RANK;

/// `y = a op b` over `dims` (at most [`MAX_RANK`] axes), each operand read
/// with its own strides (0 along a broadcast axis); `op`: 0 add, 1
/// subtract, 2 multiply, 3 divide, 4 pow, 5 max, 6 min, 7 Pow's derivative
/// in its base (`b·a^(b−1)`).
pub(in crate::device) fn binary(
    a: &DevValue,
    b: &DevValue,
    op: i32,
    dims: &[usize],
    sa: &[usize],
    sb: &[usize],
) -> Result<Arc<DevValue>, ()> {
    with_kernels(|gpu, k| {
        let (av, bv) = (gpu.on_this(a)?, gpu.on_this(b)?);
        let rank = dims.len();
        if rank == 0
            || rank > MAX_RANK
            || sa.len() != rank
            || sb.len() != rank
            || !(0..8).contains(&op)
        {
            return Err("binary: bad shape".to_string());
        }
        let n: usize = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or("overflow")?;
        // Every element each operand is read at lies inside it.
        let last = |s: &[usize]| -> Option<usize> {
            dims.iter()
                .zip(s)
                .try_fold(0usize, |o, (&d, &st)| o.checked_add(d.checked_sub(1)?.checked_mul(st)?))
        };
        if n == 0
            || last(sa).is_none_or(|o| o >= av.len())
            || last(sb).is_none_or(|o| o >= bv.len())
        {
            return Err("binary: the operands are shorter than their strides reach".to_string());
        }
        let pad = |v: &[usize]| {
            let mut p = [1u64; MAX_RANK];
            v.iter().enumerate().for_each(|(i, &x)| p[i] = x as u64);
            p
        };
        let (d, a_s, b_s) = (pad(dims), pad(sa), pad(sb));
        let (n64, rank32) = (n as u64, rank as i32);
        let mut y = gpu.stream.alloc_zeros::<f32>(n).map_err(|e| format!("alloc: {e}"))?;
        let mut l = gpu.stream.launch_builder(&k.binary);
        l.arg(av).arg(bv).arg(&mut y).arg(&n64).arg(&op).arg(&rank32);
        for v in d.iter().chain(&a_s).chain(&b_s) {
            l.arg(v);
        }
        // SAFETY: y holds n f32; every offset Σ cₖ·sₖ with cₖ < dₖ is at most
        // the `last` one checked above, inside a and b; the arguments match
        // `hydra_binary`'s in order and type (pointers, u64, two ints, 18 u64).
        unsafe { l.launch(Gpu::launch_cfg(n)) }.map_err(|e| format!("binary kernel: {e}"))?;
        Ok(gpu.value(y))
    })
    .inspect(|_| tail_op_ran())
}

/// `x` (dense, `in_dims`) with its axes permuted by `perm`
/// (`out.shape[i] = in_dims[perm[i]]`).
pub(in crate::device) fn permute(
    x: &DevValue,
    in_dims: &[usize],
    perm: &[usize],
) -> Result<Arc<DevValue>, ()> {
    with_kernels(|gpu, k| {
        let xs = gpu.on_this(x)?;
        let rank = in_dims.len();
        let mut seen = [false; MAX_RANK];
        if rank == 0
            || rank > MAX_RANK
            || perm.len() != rank
            || perm.iter().any(|&p| p >= rank || core::mem::replace(&mut seen[p], true))
        {
            return Err("permute: not a permutation of the value's axes".to_string());
        }
        let n: usize =
            in_dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or("overflow")?;
        if n == 0 || n != xs.len() {
            return Err("permute: the value does not have its shape".to_string());
        }
        // Row-major strides of the input, read in the output's axis order.
        let mut strides = [0usize; MAX_RANK];
        let mut acc = 1;
        for i in (0..rank).rev() {
            strides[i] = acc;
            acc *= in_dims[i];
        }
        let (mut d, mut st) = ([1u64; MAX_RANK], [0u64; MAX_RANK]);
        for (i, &p) in perm.iter().enumerate() {
            d[i] = in_dims[p] as u64;
            st[i] = strides[p] as u64;
        }
        let (n64, rank32) = (n as u64, rank as i32);
        let mut y = gpu.stream.alloc_zeros::<f32>(n).map_err(|e| format!("alloc: {e}"))?;
        let mut l = gpu.stream.launch_builder(&k.permute);
        l.arg(xs).arg(&mut y).arg(&n64).arg(&rank32);
        for v in d.iter().chain(&st) {
            l.arg(v);
        }
        // SAFETY: x and y hold n f32 (checked); a permutation of x's
        // row-major strides reaches only offsets below n; the arguments
        // match `hydra_permute`'s in order and type.
        unsafe { l.launch(Gpu::launch_cfg(n)) }.map_err(|e| format!("permute kernel: {e}"))?;
        Ok(gpu.value(y))
    })
    .inspect(|_| tail_op_ran())
}

/// `batch` row-major products `C_i[m×n] = op(A_i)·op(B_i)` of dense
/// stacks: `A_i` stored m×k (k×m when `ta`, `op` its transpose), `B_i`
/// k×n (n×k when `tb`); one strided-batched cuBLAS call.
#[allow(clippy::too_many_arguments)]
pub(in crate::device) fn batched_matmul(
    a: &DevValue,
    ta: bool,
    b: &DevValue,
    tb: bool,
    batch: usize,
    (m, n, k): (usize, usize, usize),
) -> Result<Arc<DevValue>, ()> {
    use cudarc::cublas::sys::cublasOperation_t;
    use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
    with_gpu(|gpu| {
        let (av, bv) = (gpu.on_this(a)?, gpu.on_this(b)?);
        let size = |x: usize, y: usize| x.checked_mul(y).and_then(|v| v.checked_mul(batch));
        let (la, lb, lc) = (size(m, k), size(k, n), size(m, n));
        if [m, n, k, batch].contains(&0) || la != Some(av.len()) || lb != Some(bv.len()) {
            return Err("batched product: the operands do not have its shape".to_string());
        }
        let lc = lc.ok_or("overflow")?;
        let int =
            |v: usize| i32::try_from(v).map_err(|_| format!("dimension {v} over cuBLAS's int"));
        let op = |t: bool| {
            if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N }
        };
        // As `Gpu::rm`, item by item: cuBLAS's first operand is B.
        let gemm = GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: int(n)?,
            n: int(m)?,
            k: int(k)?,
            alpha: 1.0f32,
            lda: int(if tb { k } else { n })?,
            ldb: int(if ta { m } else { k })?,
            beta: 0.0,
            ldc: int(n)?,
        };
        let stride = |v: usize| i64::try_from(v).map_err(|_| "stride over i64".to_string());
        let cfg = StridedBatchedConfig {
            gemm,
            batch_size: int(batch)?,
            stride_a: stride(k * n)?,
            stride_b: stride(m * k)?,
            stride_c: stride(m * n)?,
        };
        let mut c = gpu.stream.alloc_zeros::<f32>(lc).map_err(|e| format!("alloc: {e}"))?;
        // SAFETY: B holds batch·k·n values, each item read as n×k (ld n)
        // or k×n (ld k) column-major at stride k·n; A batch·m·k at stride
        // m·k; C batch·m·n written at stride m·n (ld n): all checked above.
        unsafe { gpu.blas.gemm_strided_batched(cfg, bv, av, &mut c) }
            .map_err(|e| format!("cuBLAS batched sgemm: {e:?}"))?;
        Ok(gpu.value(c))
    })
    .inspect(|_| counted(false))
    .map_err(|_| ())
}

/// Softmax over lanes of `width`; with `grad_of = dy` and `x` the forward's
/// output `y`, its backward `y ⊙ (dy − Σ dy⊙y)`.
pub(in crate::device) fn softmax(
    x: &DevValue,
    width: usize,
    grad_of: Option<&DevValue>,
) -> Result<Arc<DevValue>, ()> {
    with_kernels(|gpu, k| {
        let xs = gpu.on_this(x)?;
        if width == 0 || xs.is_empty() || xs.len() % width != 0 {
            return Err("Softmax: the lanes do not tile the value".to_string());
        }
        let rows = xs.len() / width;
        let (r, w) = (rows as u64, width as u64);
        let mut y = gpu.stream.alloc_zeros::<f32>(xs.len()).map_err(|e| format!("alloc: {e}"))?;
        match grad_of {
            None => {
                let mut l = gpu.stream.launch_builder(&k.softmax);
                l.arg(xs).arg(&mut y).arg(&r).arg(&w);
                // SAFETY: x and y hold rows·width f32; the arguments match
                // `hydra_softmax`'s in order and type.
                unsafe { l.launch(Gpu::launch_cfg(rows)) }
                    .map_err(|e| format!("Softmax kernel: {e}"))?;
            }
            Some(dy) => {
                let g = gpu.on_this(dy)?;
                if g.len() != xs.len() {
                    return Err("Softmax backward: sizes differ".to_string());
                }
                let mut l = gpu.stream.launch_builder(&k.softmax_grad);
                l.arg(xs).arg(g).arg(&mut y).arg(&r).arg(&w);
                // SAFETY: y, dy and dx hold rows·width f32; the arguments
                // match `hydra_softmax_grad`'s in order and type.
                unsafe { l.launch(Gpu::launch_cfg(rows)) }
                    .map_err(|e| format!("Softmax backward kernel: {e}"))?;
            }
        }
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
    w0: impl FnOnce() -> crate::device::W0<'w>,
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

/// Bytes on the GPU (the feature cache's records, kept there between
/// batches). Freed with its own context current.
pub(in crate::device) struct DevBytes {
    gpu: u64,
    ctx: Arc<CudaContext>,
    data: CudaSlice<u8>,
}

impl Drop for DevBytes {
    fn drop(&mut self) {
        make_current(&self.ctx);
    }
}

/// Where a feature cache keeps its records on the GPU: emptied by a change
/// of device ([`free_records`]), so that a copy on a GPU no longer in use
/// (and its context) does not outlive the switch.
pub(in crate::device) type Records = Arc<Mutex<Option<DevBytes>>>;

/// Every [`Records`] made since the last change of device.
static RECORDS: Mutex<Vec<Weak<Mutex<Option<DevBytes>>>>> = Mutex::new(Vec::new());

/// Frees every feature cache's records on the GPU (one being read at this
/// moment — a failing gather giving the GPU up — goes at its next use: its
/// GPU is no longer the one in use).
pub(super) fn free_records() {
    let all = core::mem::take(&mut *RECORDS.lock().unwrap_or_else(|e| e.into_inner()));
    for r in all.iter().filter_map(Weak::upgrade) {
        match r.try_lock() {
            Ok(mut r) => *r = None,
            Err(std::sync::TryLockError::Poisoned(e)) => *e.into_inner() = None,
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }
}

/// Bytes `r` holds on the GPU, and the [`Gpu::id`] of that GPU.
pub(in crate::device) fn records_on(r: &Records) -> Option<(usize, u64)> {
    r.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|b| (b.data.len(), b.gpu))
}

/// Free and total bytes of the GPU in use.
pub(in crate::device) fn memory() -> Option<(usize, usize)> {
    with_gpu(|_| cudarc::driver::result::mem_get_info().map_err(|e| format!("memory info: {e}")))
        .ok()
}

/// `bytes` on the GPU in use, kept until dropped or the device changes.
pub(in crate::device) fn upload_bytes(bytes: &[u8]) -> Result<Records, ()> {
    let b = with_gpu(|gpu| {
        let data = gpu.htod(bytes)?;
        Ok(DevBytes { gpu: gpu.id, ctx: gpu.ctx.clone(), data })
    })
    .map_err(|_| ())?;
    let r = Arc::new(Mutex::new(Some(b)));
    let mut all = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
    if all.len() >= 16 && all.len().is_power_of_two() {
        all.retain(|w| w.strong_count() > 0);
    }
    all.push(Arc::downgrade(&r));
    Ok(r)
}

/// Samples `idx` of resident records (`record` bytes each) as a dense f32
/// `idx.len()×count` value: each sample's `count` values at byte `offset`
/// of its record, f16 (`half`) or f32. Only the indices go up. Arguments
/// that do not fit the records are refused before any CUDA call (not
/// counted as a GPU failure).
pub(in crate::device) fn gather(
    recs: &Records,
    idx: &[usize],
    record: usize,
    offset: usize,
    count: usize,
    half: bool,
) -> Result<Arc<DevValue>, ()> {
    let recs = recs.lock().unwrap_or_else(|e| e.into_inner());
    let Some(recs) = recs.as_ref() else { return Err(()) };
    let elem = if half { 2 } else { 4 };
    let span = count.checked_mul(elem).and_then(|b| b.checked_add(offset));
    let fits = |&i: &usize| {
        i.checked_add(1).and_then(|e| e.checked_mul(record)).is_some_and(|e| e <= recs.data.len())
    };
    let Some(n) = idx.len().checked_mul(count) else { return Err(()) };
    if n == 0 || span.is_none_or(|s| s > record) || !idx.iter().all(fits) {
        return Err(());
    }
    with_kernels(|gpu, k| {
        if recs.gpu != gpu.id {
            return Err("records on another GPU (the device changed)".to_string());
        }
        let ids: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
        let ids = gpu.htod(&ids)?;
        let (n64, c64, r64, o64, h32) =
            (n as u64, count as u64, record as u64, offset as u64, i32::from(half));
        let mut y = gpu.stream.alloc_zeros::<f32>(n).map_err(|e| format!("alloc: {e}"))?;
        let mut l = gpu.stream.launch_builder(&k.gather);
        l.arg(&recs.data).arg(&ids).arg(&mut y).arg(&n64).arg(&c64).arg(&r64).arg(&o64).arg(&h32);
        // SAFETY: y holds n = len(idx)·count f32; every byte read,
        // idx[r]·record + offset + j·elem + elem−1 for j < count, lies in
        // record idx[r] (offset + count·elem ≤ record), which lies inside
        // the records (checked above); the arguments match `hydra_gather`'s
        // in order and type (three pointers, four u64, an int).
        unsafe { l.launch(Gpu::launch_cfg(n)) }.map_err(|e| format!("gather kernel: {e}"))?;
        Ok(gpu.value(y))
    })
    .inspect(|_| {
        stats::GPU_CACHE_GATHERS.fetch_add(1, Ordering::Relaxed);
        succeeded();
    })
}
