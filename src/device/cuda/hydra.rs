//! An adapted layer's pass whole on the GPU (see `super::super::
//! try_adapted_forward`): the frozen product with `W0` resident and the
//! Hydra branches' low-rank products and gradients, as row-major cuBLAS
//! products ([`Gpu::rm`]) on the activations uploaded once.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, DevicePtr, DevicePtrMut};

use super::{BufRef, Gpu, counted, succeeded, with_gpu, with_resident};
use crate::device::{
    Act, AdaptedBackward, AdaptedForward, Attempt, FrozenPlan, LowRank, LowRankGrads, OnGpu, stats,
};

/// See `crate::device::OnGpu`.
pub(in crate::device) struct SavedOnGpu {
    /// The [`Gpu::id`] it is on.
    gpu: u64,
    /// Its context, current while the buffers are freed (`Drop`).
    ctx: Arc<CudaContext>,
    x: Option<CudaSlice<f32>>,
    y0: Option<CudaSlice<f32>>,
    /// The branches' dropout masks (parallel, sequential).
    mask_p: Option<CudaSlice<f32>>,
    mask_s: Option<CudaSlice<f32>>,
}

impl SavedOnGpu {
    pub(in crate::device) fn bytes(&self) -> usize {
        [&self.x, &self.y0, &self.mask_p, &self.mask_s]
            .iter()
            .map(|b| b.as_ref().map_or(0, |b| b.len() * 4))
            .sum()
    }

    pub(in crate::device) fn holds(&self, x: bool, y0: bool) -> bool {
        (!x || self.x.is_some()) && (!y0 || self.y0.is_some())
    }

    /// `x` or `y0` if it is on `gpu` with `len` values.
    fn take(
        slot: &mut Option<CudaSlice<f32>>,
        on: Option<u64>,
        gpu: &Gpu,
        len: usize,
    ) -> Option<CudaSlice<f32>> {
        // A buffer of another GPU stays in place, to be freed with its own
        // context current (`Drop`), not under this one.
        if on == Some(gpu.id) && slot.as_ref().is_some_and(|b| b.len() == len) {
            slot.take()
        } else {
            None
        }
    }
}

impl Drop for SavedOnGpu {
    fn drop(&mut self) {
        super::make_current(&self.ctx);
    }
}

/// A branch's tensors on the GPU.
struct DevBranch {
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    c: Option<CudaSlice<f32>>,
    e: Option<CudaSlice<f32>>,
    /// The dropout mask on the branch's input, if any.
    mask: Option<CudaSlice<f32>>,
    scale: f32,
    rank: usize,
}

impl Gpu {
    fn up(&self, x: &[f32]) -> Result<CudaSlice<f32>, String> {
        self.htod(x)
    }

    /// A copy of `x` on the GPU.
    fn dev_copy(&self, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>, String> {
        self.stream.clone_dtod(x).map_err(|e| format!("copy: {e}"))
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, String> {
        self.stream.alloc_zeros(len).map_err(|e| format!("alloc: {e}"))
    }

    fn branch(&self, l: &LowRank<'_>) -> Result<DevBranch, String> {
        Ok(DevBranch {
            a: self.up(l.a)?,
            b: self.up(l.b)?,
            c: l.bias_down.map(|c| self.up(c)).transpose()?,
            e: l.bias_up.map(|e| self.up(e)).transpose()?,
            mask: l.mask.map(|m| self.up(m)).transpose()?,
            scale: l.scale,
            rank: l.rank,
        })
    }

    /// [`Gpu::branch`] with the dropout mask the forward kept on this GPU
    /// (`kept`, `len` values) in place of uploading `l.mask` again.
    fn branch_with_mask(
        &self,
        l: &LowRank<'_>,
        kept: Option<&mut Option<CudaSlice<f32>>>,
        on: Option<u64>,
        len: usize,
    ) -> Result<DevBranch, String> {
        let kept = match (l.mask, kept) {
            (Some(_), Some(k)) => SavedOnGpu::take(k, on, self, len),
            _ => None,
        };
        match kept {
            Some(mask) => {
                let mut br = self.branch(&LowRank { mask: None, ..*l })?;
                br.mask = Some(mask);
                Ok(br)
            }
            None => self.branch(l),
        }
    }

    /// `mask ⊙ a`, element by element, into a new matrix (cuBLAS dgmm:
    /// `diag(mask)·a` with `a` as one column).
    fn masked(&self, a: &CudaSlice<f32>, mask: &CudaSlice<f32>) -> Result<CudaSlice<f32>, String> {
        let len = a.len();
        if mask.len() != len {
            return Err("a dropout mask of another length".to_string());
        }
        let m = i32::try_from(len).map_err(|_| format!("{len} elements over cuBLAS's int"))?;
        let mut out = self.zeros(len)?;
        let (ap, _ra) = a.device_ptr(&self.stream);
        let (xp, _rx) = mask.device_ptr(&self.stream);
        let (cp, _rc) = out.device_ptr_mut(&self.stream);
        // SAFETY: A, the mask and C each hold `len` f32 (m×1, ld m, unit
        // stride); the handle runs on `self.stream`.
        unsafe {
            cudarc::cublas::sys::cublasSdgmm(
                *self.blas.handle(),
                cudarc::cublas::sys::cublasSideMode_t::CUBLAS_SIDE_LEFT,
                m,
                1,
                ap as *const f32,
                m,
                xp as *const f32,
                1,
                cp as *mut f32,
                m,
            )
        }
        .result()
        .map_err(|e| format!("cuBLAS dgmm: {e:?}"))?;
        drop((_ra, _rx, _rc));
        Ok(out)
    }

    /// `y += alpha·x` (cuBLAS axpy).
    pub(super) fn axpy(
        &self,
        alpha: f32,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), String> {
        let len = x.len();
        if y.len() != len {
            return Err("axpy of two lengths".to_string());
        }
        let n = i32::try_from(len).map_err(|_| format!("{len} elements over cuBLAS's int"))?;
        let (xp, _rx) = x.device_ptr(&self.stream);
        let (yp, _ry) = y.device_ptr_mut(&self.stream);
        // SAFETY: x and y each hold `len` f32 (unit stride); α is on the
        // host, as the handle's (default) pointer mode reads it.
        unsafe {
            cudarc::cublas::sys::cublasSaxpy_v2(
                *self.blas.handle(),
                n,
                &alpha,
                xp as *const f32,
                1,
                yp as *mut f32,
                1,
            )
        }
        .result()
        .map_err(|e| format!("cuBLAS axpy: {e:?}"))
    }

    /// `dx += mask ⊙ (s·dU·A)` for a branch (`A` r×width): straight into
    /// `dx` without a mask, through a temporary with one.
    fn grad_x(
        &self,
        br: &DevBranch,
        du: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        (n, width): (usize, usize),
    ) -> Result<(), String> {
        let dims = (n, width, br.rank);
        match &br.mask {
            None => self.rm(dims, br.scale, du, false, &br.a, false, 1.0, dx),
            Some(mask) => {
                let mut t = self.zeros(n * width)?;
                self.rm(dims, br.scale, du, false, &br.a, false, 0.0, &mut t)?;
                self.axpy(1.0, &self.masked(&t, mask)?, dx)
            }
        }
    }

    /// `y[n×out] += s·(x·Aᵀ + c)·Bᵀ + s·e` for a branch over `x[n×width]`;
    /// returns `U = x·Aᵀ + c` (n×r).
    fn branch_forward(
        &self,
        br: &DevBranch,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        (n, width, out): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>, String> {
        let (r, s) = (br.rank, br.scale);
        let ones = self.ones.as_ref().ok_or("no ones")?;
        let mut u = self.zeros(n * r)?;
        self.rm((n, r, width), 1.0, x, false, &br.a, true, 0.0, &mut u)?;
        if let Some(c) = &br.c {
            self.rm((n, r, 1), 1.0, ones, false, c, false, 1.0, &mut u)?;
        }
        self.rm((n, out, r), s, &u, false, &br.b, true, 1.0, y)?;
        if let Some(e) = &br.e {
            self.rm((n, out, 1), s, ones, false, e, false, 1.0, y)?;
        }
        Ok(u)
    }

    /// A branch's gradient increments for `dY[n×out]`, with `U` (n×r) and
    /// its input `x[n×width]` from the forward; returns them with
    /// `dU = dY·B` (n×r, unscaled), still on the GPU.
    #[allow(clippy::type_complexity)]
    fn branch_backward(
        &self,
        br: &DevBranch,
        dy: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        (n, width, out): (usize, usize, usize),
    ) -> Result<(LowRankGrads, CudaSlice<f32>), String> {
        let (r, s) = (br.rank, br.scale);
        let ones = self.ones.as_ref().ok_or("no ones")?;
        // dB = s·dYᵀ·U, de = s·Σ dY.
        let mut gb = self.zeros(out * r)?;
        self.rm((out, r, n), s, dy, true, u, false, 0.0, &mut gb)?;
        let ge = match &br.e {
            Some(_) => {
                let mut ge = self.zeros(out)?;
                self.rm((1, out, n), s, ones, false, dy, false, 0.0, &mut ge)?;
                Some(ge)
            }
            None => None,
        };
        // dU = dY·B, dc = s·Σ dU, dA = s·dUᵀ·x.
        let mut du = self.zeros(n * r)?;
        self.rm((n, r, out), 1.0, dy, false, &br.b, false, 0.0, &mut du)?;
        let gc = match &br.c {
            Some(_) => {
                let mut gc = self.zeros(r)?;
                self.rm((1, r, n), s, ones, false, &du, false, 0.0, &mut gc)?;
                Some(gc)
            }
            None => None,
        };
        let mut ga = self.zeros(r * width)?;
        self.rm((r, width, n), s, &du, true, x, false, 0.0, &mut ga)?;
        let down = |v: Option<CudaSlice<f32>>| v.map(|v| self.download(&v)).transpose();
        let grads = LowRankGrads {
            a: self.download(&ga)?,
            b: self.download(&gb)?,
            bias_down: down(gc)?,
            bias_up: down(ge)?,
        };
        Ok((grads, du))
    }
}

/// See `super::super::try_adapted_forward`.
#[allow(clippy::too_many_arguments)]
pub(in crate::device) fn adapted_forward<'w>(
    slot: &super::Slot,
    w0: impl FnOnce() -> crate::device::W0<'w>,
    bias: Option<&[f32]>,
    x: Act<'_>,
    (n, din, dout): (usize, usize, usize),
    parallel: Option<LowRank<'_>>,
    sequential: Option<LowRank<'_>>,
    keep: bool,
) -> Attempt<AdaptedForward> {
    if [n, din, dout].iter().any(|&d| i32::try_from(d).is_err()) {
        return Attempt::NotTaken;
    }
    let plan = FrozenPlan::of(true, n, din, dout);
    let ran = with_resident(slot, w0, plan, |gpu, w| {
        gpu.ensure_ones(n)?;
        // X from the host goes up; a resident one is read where it is (and
        // copied only to be kept unmasked for the backward).
        let mut x_up = match x {
            Act::Host(x) => Some(gpu.up(x)?),
            Act::Gpu(_) => None,
        };
        let xs = match (&x_up, x) {
            (Some(up), _) => up,
            (None, Act::Gpu(v)) => super::resident_slice(gpu, v)?,
            (None, Act::Host(_)) => return Err("no X".to_string()),
        };
        let mut y = match (w.is_bf16(), x) {
            (true, Act::Host(x)) => gpu.frozen(plan, w, gpu.upload_as(x, true)?.as_ref(), bias)?,
            (true, Act::Gpu(_)) => return Err("a bf16 product on a resident value".to_string()),
            (false, _) => gpu.frozen(plan, w, BufRef::F32(xs), bias)?,
        };
        // The sequential branch reads Y0, before the branches add to Y.
        let y0 = match sequential {
            Some(_) => Some(gpu.stream.clone_dtod(&y).map_err(|e| format!("copy: {e}"))?),
            None => None,
        };
        // Each branch reads its input through its dropout mask, if any.
        let (mut u_p, mut mask_p, mut kept_x) = (None, None, None);
        if let Some(l) = &parallel {
            let mut br = gpu.branch(l)?;
            let masked = br.mask.as_ref().map(|m| gpu.masked(xs, m)).transpose()?;
            u_p = Some(gpu.branch_forward(
                &br,
                masked.as_ref().unwrap_or(xs),
                &mut y,
                (n, din, dout),
            )?);
            if keep {
                kept_x = Some(match masked {
                    Some(m) => m,
                    None => match x {
                        Act::Gpu(v) => gpu.dev_copy(super::resident_slice(gpu, v)?)?,
                        Act::Host(_) => x_up.take().ok_or("no X")?,
                    },
                });
            }
            mask_p = br.mask.take();
        }
        let (mut u_s, mut mask_s) = (None, None);
        let mut y0 = y0;
        if let (Some(l), Some(y0v)) = (&sequential, y0.take()) {
            let mut br = gpu.branch(l)?;
            let y0v = match &br.mask {
                Some(m) => gpu.masked(&y0v, m)?,
                None => y0v,
            };
            u_s = Some(gpu.branch_forward(&br, &y0v, &mut y, (n, dout, dout))?);
            y0 = Some(y0v);
            mask_s = br.mask.take();
        }
        // Inference keeps nothing for a backward: only Y comes back.
        let down = |v: &Option<CudaSlice<f32>>| {
            v.as_ref().filter(|_| keep).map(|v| gpu.download(v)).transpose()
        };
        // On resident values the backward runs there too: no host copy.
        let host_y0 = if matches!(x, Act::Gpu(_)) { None } else { down(&y0)? };
        let on_gpu = keep.then(|| {
            Box::new(SavedOnGpu {
                gpu: gpu.id,
                ctx: gpu.ctx.clone(),
                x: kept_x,
                y0,
                mask_p,
                mask_s,
            })
        });
        let (y, y_gpu) = match x {
            Act::Host(_) => (gpu.download(&y)?, None),
            Act::Gpu(_) => (Vec::new(), Some(super::resident_value(gpu, y))),
        };
        Ok(AdaptedForward {
            y,
            y_gpu,
            y0: host_y0,
            u_p: down(&u_p)?.unwrap_or_default(),
            u_s: down(&u_s)?.unwrap_or_default(),
            on_gpu: OnGpu { inner: on_gpu },
        })
    });
    finish(ran, true)
}

/// See `super::super::try_adapted_backward`.
#[allow(clippy::too_many_arguments)]
pub(in crate::device) fn adapted_backward<'w>(
    slot: &super::Slot,
    w0: impl FnOnce() -> crate::device::W0<'w>,
    dy: Act<'_>,
    (n, din, dout): (usize, usize, usize),
    parallel: Option<(LowRank<'_>, &[f32], &[f32])>,
    sequential: Option<(LowRank<'_>, &[f32], &[f32])>,
    want_dx: bool,
    on_gpu: OnGpu,
) -> Attempt<AdaptedBackward> {
    if [n, din, dout].iter().any(|&d| i32::try_from(d).is_err()) {
        return Attempt::NotTaken;
    }
    let mut kept = on_gpu.inner;
    let on = kept.as_ref().map(|k| k.gpu);
    let plan = FrozenPlan::of(false, n, din, dout);
    // `w`: the resident W0, when dX is wanted (else no frozen product runs).
    let mut body = |gpu: &mut Gpu, w: Option<&super::Buf>| -> Result<AdaptedBackward, String> {
        gpu.ensure_ones(n)?;
        let dy_up;
        let dyd = match dy {
            Act::Host(dy) => {
                dy_up = gpu.up(dy)?;
                &dy_up
            }
            Act::Gpu(v) => super::resident_slice(gpu, v)?,
        };
        // dY0 = dY + s_s·dU_s·A_s (the sequential branch's part of dX).
        let mut g_s = None;
        let mut dy0 = None;
        if let Some((l, y0, u)) = &sequential {
            let br = gpu.branch_with_mask(l, kept.as_mut().map(|k| &mut k.mask_s), on, n * dout)?;
            let kept = kept.as_mut().and_then(|k| SavedOnGpu::take(&mut k.y0, on, gpu, n * dout));
            let y0 = match kept {
                Some(y0) => y0,
                None => gpu.up(y0)?,
            };
            let u = gpu.up(u)?;
            let (g, du) = gpu.branch_backward(&br, dyd, &u, &y0, (n, dout, dout))?;
            if want_dx {
                let mut d = gpu.dev_copy(dyd)?;
                gpu.grad_x(&br, &du, &mut d, (n, dout))?;
                dy0 = Some(d);
            }
            g_s = Some(g);
        }
        // dX = dY0·W0 (+ s_p·dU_p·A_p below).
        let mut dx = None;
        if let Some(w) = w {
            let d = dy0.as_ref().unwrap_or(dyd);
            dx = Some(if w.is_bf16() {
                // bf16 operands are rounded on the host (no kernel here).
                let rounded = gpu.upload_as(&gpu.download(d)?, true)?;
                gpu.frozen(plan, w, rounded.as_ref(), None)?
            } else {
                gpu.frozen(plan, w, BufRef::F32(d), None)?
            });
        }
        let mut g_p = None;
        if let Some((l, x, u)) = &parallel {
            let br = gpu.branch_with_mask(l, kept.as_mut().map(|k| &mut k.mask_p), on, n * din)?;
            let kept = kept.as_mut().and_then(|k| SavedOnGpu::take(&mut k.x, on, gpu, n * din));
            let x = match kept {
                Some(x) => x,
                None => gpu.up(x)?,
            };
            let u = gpu.up(u)?;
            let (g, du) = gpu.branch_backward(&br, dyd, &u, &x, (n, din, dout))?;
            if let Some(dx) = &mut dx {
                gpu.grad_x(&br, &du, dx, (n, din))?;
            }
            g_p = Some(g);
        }
        let (dx, dx_gpu) = match (dx, dy) {
            (Some(d), Act::Gpu(_)) => (None, Some(super::resident_value(gpu, d))),
            (d, _) => (d.map(|d| gpu.download(&d)).transpose()?, None),
        };
        Ok(AdaptedBackward { dx, dx_gpu, parallel: g_p, sequential: g_s })
    };
    let ran = if want_dx {
        with_resident(slot, w0, plan, |gpu, w| body(gpu, Some(w)))
    } else {
        with_gpu(|gpu| body(gpu, None)).map(|t| (t, false))
    };
    finish(ran, want_dx)
}

/// Counts a pass the GPU ran (and its frozen product, if it had one).
fn finish<T>(ran: Result<(T, bool), Option<String>>, frozen: bool) -> Attempt<T> {
    match ran {
        Ok((t, bf16)) => {
            if frozen {
                counted(bf16);
            } else {
                succeeded();
            }
            stats::GPU_ADAPTED_PASSES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            Attempt::Done(t)
        }
        Err(None) => Attempt::NotTaken,
        Err(Some(_)) => Attempt::Failed,
    }
}
