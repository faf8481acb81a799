//! The optimizer step on the GPU: AdamW and SGD as CUDA kernels compiled
//! at run time with NVRTC (loaded like the driver, when first needed), the
//! moments kept on the GPU between steps.
//!
//! The host stays the authority: each step sends the parameters and
//! gradients up and brings the parameters and moments back, written to the
//! host only once every copy has come back, so a failure at any point
//! leaves the host's state as it was for the CPU to step instead. The GPU's
//! moments are a cache of the host's, used while nothing else has changed
//! them (the optimizer drops it on a CPU step or a restore).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use std::sync::Once;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg,
};

use super::{Gpu, active, fell_back, make_current, succeeded};
use crate::device::{Attempt, StepRule, stats};

/// The kernels' CUDA C++ source. Compiled with `--fmad=false` and IEEE
/// division and square root (NVRTC's defaults), each element's update is
/// the CPU's (`train::optim`) operation for operation, so the results are
/// the same bits. A grid-stride loop (64-bit index: it cannot wrap) covers
/// any length.
const SOURCE: &str = r#"
extern "C" __global__ void hydra_adamw(float *p, const float *g, float *m, float *v,
                                       unsigned int n, float lr, float beta1, float beta2,
                                       float c1, float c2, float eps, float wd) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        float gi = g[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mh = mi / c1;
        float vh = vi / c2;
        p[i] -= lr * (mh / (sqrtf(vh) + eps) + wd * p[i]);
    }
}

extern "C" __global__ void hydra_sgd(float *p, const float *g, float *m, unsigned int n,
                                     float lr, float momentum, float wd) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        float mi = momentum * m[i] + g[i];
        m[i] = mi;
        p[i] -= lr * (mi + wd * p[i]);
    }
}
"#;

/// The compiled kernels of one [`Gpu`].
pub(super) struct Kernels {
    adamw: CudaFunction,
    sgd: CudaFunction,
}

/// Compiles and loads [`SOURCE`] on `gpu`, or says why not (no NVRTC
/// library, a compile or load failure; NVRTC panicking included).
pub(super) fn compile(gpu: &Gpu) -> Result<Kernels, String> {
    let module = load(gpu, SOURCE, "optimizer")?;
    let f = |name: &str| module.load_function(name).map_err(|e| format!("{name}: {e}"));
    Ok(Kernels { adamw: f("hydra_adamw")?, sgd: f("hydra_sgd")? })
}

/// Compiles `source` with NVRTC (`--fmad=false`, IEEE division and square
/// root) and loads it on `gpu`, or says why not (no NVRTC library, a
/// compile or load failure; NVRTC panicking included). `what` names the
/// kernels in the message.
pub(super) fn load(gpu: &Gpu, source: &str, what: &str) -> Result<Arc<CudaModule>, String> {
    // SAFETY: only tries to open the shared library (dlopen), calls nothing in it.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc.so) is not here: install the CUDA runtime compiler \
                    (cuda-nvrtc-12-x; JetPack has it)"
            .to_string());
    }
    let build = || -> Result<Arc<CudaModule>, String> {
        let opts = cudarc::nvrtc::CompileOptions {
            fmad: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            ftz: Some(false),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts)
            .map_err(|e| format!("NVRTC could not compile the {what} kernels: {e}"))?;
        gpu.ctx.bind_to_thread().map_err(|e| format!("bind the context: {e}"))?;
        gpu.ctx.load_module(ptx).map_err(|e| format!("load the {what} kernels: {e}"))
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
        .unwrap_or_else(|_| Err("NVRTC failed while compiling (a panic in the loader)".to_string()))
}

/// The moments on the GPU (see `crate::device::OptimizerCache`).
pub(in crate::device) struct OptCache {
    gpu: u64,
    ctx: Arc<CudaContext>,
    m: CudaSlice<f32>,
    v: Option<CudaSlice<f32>>,
}

impl Drop for OptCache {
    fn drop(&mut self) {
        make_current(&self.ctx);
    }
}

/// Flattens tensors into one vector.
fn flat<T: AsRef<[f32]>>(ts: &[T]) -> Vec<f32> {
    let mut out = Vec::with_capacity(ts.iter().map(|t| t.as_ref().len()).sum());
    ts.iter().for_each(|t| out.extend_from_slice(t.as_ref()));
    out
}

/// Writes `src` (flat) back over the tensors `dst`.
fn scatter<T: AsMut<[f32]>>(src: &[f32], dst: &mut [T]) {
    let mut at = 0;
    for d in dst {
        let d = d.as_mut();
        d.copy_from_slice(&src[at..at + d.len()]);
        at += d.len();
    }
}

/// See `crate::device::try_optimizer_step`; the caller has checked that
/// every tensor list matches and that the total fits in 32 bits.
#[allow(clippy::too_many_arguments)]
pub(in crate::device) fn step(
    cache: &mut Option<Box<OptCache>>,
    rule: StepRule,
    lr: f32,
    wd: f32,
    params: &mut [&mut [f32]],
    grads: &[&[f32]],
    m: &mut [Vec<f32>],
    v: &mut [Vec<f32>],
    total: usize,
) -> Attempt<()> {
    let Some(gpu) = active() else { return Attempt::NotTaken };
    let mut gpu = gpu.lock().unwrap_or_else(|e| e.into_inner());
    if gpu.kernels.is_none() {
        let k = compile(&gpu);
        if let Err(e) = &k {
            static SAID: Once = Once::new();
            SAID.call_once(|| {
                eprintln!("hydra-edge: the optimizer step stays on the CPU: {e}");
            });
        }
        gpu.kernels = Some(k);
    }
    if !matches!(gpu.kernels, Some(Ok(_))) {
        return Attempt::NotTaken;
    }
    let adam = matches!(rule, StepRule::AdamW { .. });
    // A cache from another GPU, or of another length, goes (under its context).
    if cache
        .as_ref()
        .is_some_and(|c| c.gpu != gpu.id || c.m.len() != total || c.v.is_some() != adam)
    {
        *cache = None;
    }
    let run = |cache: &mut Option<Box<OptCache>>, gpu: &Gpu| -> Result<[Vec<f32>; 3], String> {
        gpu.ctx.bind_to_thread().map_err(|e| format!("bind the context: {e}"))?;
        let Some(Ok(k)) = &gpu.kernels else { return Err("no kernels".to_string()) };
        let mut p = gpu.htod(&flat(params))?;
        let g = gpu.htod(&flat(grads))?;
        if cache.is_none() {
            *cache = Some(Box::new(OptCache {
                gpu: gpu.id,
                ctx: gpu.ctx.clone(),
                m: gpu.htod(&flat(m))?,
                v: if adam { Some(gpu.htod(&flat(v))?) } else { None },
            }));
        }
        let Some(c) = cache.as_mut() else { return Err("no moments".to_string()) };
        let n = u32::try_from(total).map_err(|_| "over 2³² parameters".to_string())?;
        // 256 threads a block, at most 1024 blocks: the loop strides over the rest.
        let blocks = total.div_ceil(256).clamp(1, 1024) as u32;
        let cfg =
            LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        match (rule, c.v.as_mut()) {
            (StepRule::AdamW { beta1, beta2, eps, c1, c2 }, Some(v)) => {
                let mut b = gpu.stream.launch_builder(&k.adamw);
                b.arg(&mut p).arg(&g).arg(&mut c.m).arg(v).arg(&n).arg(&lr).arg(&beta1);
                b.arg(&beta2).arg(&c1).arg(&c2).arg(&eps).arg(&wd);
                // SAFETY: p, g, m and v each hold `n` f32 (uploaded from
                // tensors of `total` values, or a cache of that length),
                // and the arguments match the kernel's parameters in order
                // and type (pointers, an unsigned int, f32s).
                unsafe { b.launch(cfg) }.map_err(|e| format!("AdamW kernel: {e}"))?;
            }
            (StepRule::Sgd { momentum }, None) => {
                let mut b = gpu.stream.launch_builder(&k.sgd);
                b.arg(&mut p).arg(&g).arg(&mut c.m).arg(&n).arg(&lr).arg(&momentum).arg(&wd);
                // SAFETY: as above, for the SGD kernel's parameters.
                unsafe { b.launch(cfg) }.map_err(|e| format!("SGD kernel: {e}"))?;
            }
            _ => return Err("moments of another optimizer".to_string()),
        }
        let p = gpu.download(&p)?;
        let m = gpu.download(&c.m)?;
        let v = match &c.v {
            Some(v) => gpu.download(v)?,
            None => Vec::new(),
        };
        Ok([p, m, v])
    };
    match run(cache, &gpu) {
        Ok([new_p, new_m, new_v]) => {
            // Every copy is back: now the host's state changes, all of it.
            scatter(&new_p, params);
            scatter(&new_m, m);
            if adam {
                scatter(&new_v, v);
            }
            stats::GPU_OPTIMIZER_STEPS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            succeeded();
            Attempt::Done(())
        }
        Err(e) => {
            *cache = None;
            fell_back(gpu.ordinal, &e);
            Attempt::Failed
        }
    }
}
