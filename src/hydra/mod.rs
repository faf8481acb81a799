//! [`HydraLinear`]: a frozen linear layer `y0 = W0·x + b0` with a parallel
//! and a sequential low-rank branch (Hydra, arXiv 2309.06922):
//!
//! ```text
//! p = s_p·(B_p·(A_p·x + c_p) + e_p)      parallel   A_p: r_p×in,  B_p: out×r_p
//! q = s_s·(B_s·(A_s·y0 + c_s) + e_s)     sequential A_s: r_s×out, B_s: out×r_s
//! y = y0 + p + q
//! ```
//!
//! (`c`, `e`: the optional branch biases, zero at init.) Batches are row
//! vectors, as in the paper's code: `X` is n×in, `Y = X·W0ᵀ + b0 + …` is n×out.
//! Every low-rank product runs on [`crate::kernels`]; the dense products with
//! `W0` run on the kernels' packed sgemm (see `dense`). Merge, unmerge and the hot-swap delta are in
//! [`merge`](self::merge).
//!
//! Backward, given `dY`:
//! `dB_p = s_p·dYᵀ·U_p`, `dA_p = s_p·(dY·B_p)ᵀ·X`, `dB_s = s_s·dYᵀ·U_s`,
//! `dA_s = s_s·(dY·B_s)ᵀ·Y0`, `dY0 = dY + s_s·(dY·B_s)·A_s`,
//! `dX = dY0·W0 + s_p·(dY·B_p)·A_p` (dropout masks applied on the way).

mod config;
mod dense;
pub mod merge;

use alloc::format;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use half::f16;

pub use config::{BranchConfig, HydraConfig, Init, Variant};
#[cfg(feature = "std")]
pub use dense::record_gemm_shapes;
#[cfg(feature = "std")]
pub(crate) use dense::{Packs, frozen_backward, frozen_forward};
pub use dense::{Weights, gemm};
pub use merge::Delta;

use crate::error::{Error, Result};
use crate::kernels::{self, Kernels};
use crate::rng::Rng;

/// A batch of activations, f32 or f16 (cached activations are f16).
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// f32 rows.
    F32(&'a [f32]),
    /// f16 rows; products widen to f32.
    F16(&'a [f16]),
}

impl Input<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::F16(x) => x.len(),
        }
    }
    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn all_finite(&self) -> bool {
        match self {
            Input::F32(x) => all_finite(x),
            Input::F16(x) => all_finite_f16(x),
        }
    }
}

/// Whether every value is finite: an exponent of all ones is ∞ or NaN. The
/// test runs without an early exit inside blocks of 64, so the compiler
/// vectorises it (an `all(is_finite)` loop is scalar: ~0.6 ms for one FFN
/// activation of MiniLM's batch, per layer and direction).
pub(crate) fn all_finite(v: &[f32]) -> bool {
    finite_blocks(v, |x| x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
}

/// [`all_finite`] for f16 values.
fn all_finite_f16(v: &[f16]) -> bool {
    finite_blocks(v, |x| x.to_bits() & 0x7c00 == 0x7c00)
}

/// No element of `v` is `bad`, tested block by block without early exits.
#[inline(always)]
fn finite_blocks<T: Copy>(v: &[T], bad: impl Fn(T) -> bool) -> bool {
    let mut blocks = v.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(false, |any, &x| any | bad(x)) {
            return false;
        }
    }
    !blocks.remainder().iter().any(|&x| bad(x))
}

/// One branch's trainable tensors (or their gradients, same shapes).
#[derive(Clone, Debug, PartialEq)]
pub struct Branch {
    /// Down projection `A`, r×k (k = in for parallel, out for sequential).
    pub a: Vec<f32>,
    /// Up projection `B`, out×r.
    pub b: Vec<f32>,
    /// Down bias `c` (r), if the branch has biases.
    pub bias_down: Option<Vec<f32>>,
    /// Up bias `e` (out), if the branch has biases.
    pub bias_up: Option<Vec<f32>>,
}

impl Branch {
    fn zeros(r: usize, k: usize, out: usize, bias: bool) -> Branch {
        Branch {
            a: vec![0.0; r * k],
            b: vec![0.0; out * r],
            bias_down: bias.then(|| vec![0.0; r]),
            bias_up: bias.then(|| vec![0.0; out]),
        }
    }

    /// Every tensor of the branch, in a fixed order (A, B, c, e).
    pub fn tensors(&self) -> impl Iterator<Item = &[f32]> {
        [Some(&self.a[..]), Some(&self.b[..]), self.bias_down.as_deref(), self.bias_up.as_deref()]
            .into_iter()
            .flatten()
    }

    /// Mutable view of [`Branch::tensors`].
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut [f32]> {
        [
            Some(&mut self.a[..]),
            Some(&mut self.b[..]),
            self.bias_down.as_deref_mut(),
            self.bias_up.as_deref_mut(),
        ]
        .into_iter()
        .flatten()
    }

    fn fill(&mut self, v: f32) {
        self.tensors_mut().for_each(|t| t.fill(v));
    }
}

/// What forward keeps for backward.
#[derive(Debug)]
struct Saved {
    n: usize,
    /// Parallel branch input (after dropout), if the branch exists.
    xp: Option<SavedX>,
    /// Dropout scale per input element of the parallel branch (0 or 1/(1−p)).
    mask_p: Option<Vec<f32>>,
    /// Sequential branch input `Y0` after dropout.
    y0: Option<Vec<f32>>,
    mask_s: Option<Vec<f32>>,
    u_p: Vec<f32>,
    u_s: Vec<f32>,
    /// `X` and `Y0` left on the GPU by a forward there.
    #[cfg(feature = "std")]
    gpu: crate::device::OnGpu,
    /// The forward ran on a value resident on the GPU
    /// ([`HydraLinear::forward_resident`]): the host has no `X` or `Y0`, and
    /// only [`HydraLinear::backward_resident`] can run the backward.
    resident: bool,
}

#[derive(Debug)]
enum SavedX {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// A frozen linear layer with a Hydra adapter.
#[derive(Debug)]
pub struct HydraLinear {
    config: HydraConfig,
    in_dim: usize,
    out_dim: usize,
    w0: Weights,
    /// `w0` packed for bf16 products (reset whenever `w0` changes).
    packs: dense::Packs,
    b0: Option<Vec<f32>>,
    /// Parallel branch, if the variant has one.
    parallel: Option<Branch>,
    sequential: Option<Branch>,
    grad_parallel: Option<Branch>,
    grad_sequential: Option<Branch>,
    merged: bool,
    /// `b0` was `None` and merge created a bias (so unmerge drops it again).
    bias_added_by_merge: bool,
    training: bool,
    rng: Rng,
    saved: Option<Saved>,
}

impl HydraLinear {
    /// Wraps the frozen layer `W0` (out×in) and `b0` (out) with a freshly
    /// initialised adapter (identity: `B = 0`, biases 0).
    pub fn new(
        config: HydraConfig,
        w0: Weights,
        b0: Option<Vec<f32>>,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<HydraLinear> {
        config.validate(in_dim, out_dim)?;
        if w0.len() != out_dim * in_dim {
            return Err(shape("HydraLinear::new W0", format!("{out_dim}×{in_dim}"), w0.len()));
        }
        if let Some(b) = &b0 {
            if b.len() != out_dim {
                return Err(shape("HydraLinear::new b0", format!("{out_dim}"), b.len()));
            }
            if !b.iter().all(|v| v.is_finite()) {
                return Err(Error::NonFinite("HydraLinear::new b0"));
            }
        }
        if !w0.all_finite() {
            return Err(Error::NonFinite("HydraLinear::new W0"));
        }
        let mut rng = Rng::new(config.seed);
        let branch = |on: bool, c: &BranchConfig, k: usize, rng: &mut Rng| {
            on.then(|| {
                let mut b = Branch::zeros(c.rank, k, out_dim, c.bias);
                config::init_a(&mut b.a, k, c.rank, config.init, rng);
                b
            })
        };
        let parallel = branch(config.variant.has_parallel(), &config.parallel, in_dim, &mut rng);
        let sequential =
            branch(config.variant.has_sequential(), &config.sequential, out_dim, &mut rng);
        let zeros_like = |b: &Option<Branch>| {
            b.as_ref().map(|b| {
                let mut g = b.clone();
                g.fill(0.0);
                g
            })
        };
        Ok(HydraLinear {
            grad_parallel: zeros_like(&parallel),
            grad_sequential: zeros_like(&sequential),
            config,
            in_dim,
            out_dim,
            w0,
            packs: dense::Packs::default(),
            b0,
            parallel,
            sequential,
            merged: false,
            bias_added_by_merge: false,
            training: false,
            rng,
            saved: None,
        })
    }

    /// The adapter's configuration.
    pub fn config(&self) -> &HydraConfig {
        &self.config
    }
    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    /// The frozen (or, after [`HydraLinear::merge`], merged) weights.
    pub fn weights(&self) -> &Weights {
        &self.w0
    }
    /// Bytes of the weights' bf16 packs built so far (bf16 products only).
    pub fn pack_bytes(&self) -> usize {
        self.packs.bytes()
    }
    /// Bytes of GPU memory the frozen weights' resident copy takes now (0
    /// without one: on the CPU, before the first GPU product, after a
    /// merge or a change of device).
    pub fn gpu_bytes(&self) -> usize {
        self.packs.device_bytes()
    }
    /// The frozen (or merged) bias.
    pub fn bias(&self) -> Option<&[f32]> {
        self.b0.as_deref()
    }
    /// The parallel branch, if any.
    pub fn parallel(&self) -> Option<&Branch> {
        self.parallel.as_ref()
    }
    /// The sequential branch, if any.
    pub fn sequential(&self) -> Option<&Branch> {
        self.sequential.as_ref()
    }
    /// Mutable parallel branch (for optimisers and loading saved adapters).
    pub fn parallel_mut(&mut self) -> Option<&mut Branch> {
        self.parallel.as_mut()
    }
    /// Mutable sequential branch.
    pub fn sequential_mut(&mut self) -> Option<&mut Branch> {
        self.sequential.as_mut()
    }
    /// Both branches mutably (parallel first), for optimisers.
    pub fn branches_mut(&mut self) -> impl Iterator<Item = &mut Branch> {
        [self.parallel.as_mut(), self.sequential.as_mut()].into_iter().flatten()
    }
    /// Every trainable tensor with its gradient (parallel branch first; A, B,
    /// down bias, up bias), for optimisers.
    pub fn params_and_grads(&mut self) -> Vec<(&mut [f32], &[f32])> {
        let mut out = Vec::new();
        for (p, g) in [
            (&mut self.parallel, &self.grad_parallel),
            (&mut self.sequential, &self.grad_sequential),
        ] {
            if let (Some(p), Some(g)) = (p.as_mut(), g.as_ref()) {
                out.extend(p.tensors_mut().zip(g.tensors()));
            }
        }
        out
    }
    /// Gradients accumulated by [`HydraLinear::backward`]: (parallel, sequential).
    pub fn grads(&self) -> (Option<&Branch>, Option<&Branch>) {
        (self.grad_parallel.as_ref(), self.grad_sequential.as_ref())
    }
    /// Puts back gradients copied from [`HydraLinear::grads`] (a pass run
    /// again from its start).
    #[cfg(feature = "std")]
    pub(crate) fn restore_grads(&mut self, (p, s): (Option<Branch>, Option<Branch>)) {
        self.grad_parallel = p;
        self.grad_sequential = s;
    }
    /// Zeroes the accumulated gradients.
    pub fn zero_grad(&mut self) {
        for g in [&mut self.grad_parallel, &mut self.grad_sequential].into_iter().flatten() {
            g.fill(0.0);
        }
    }
    /// Number of trainable parameters.
    pub fn num_trainable(&self) -> usize {
        [&self.parallel, &self.sequential]
            .into_iter()
            .flatten()
            .flat_map(Branch::tensors)
            .map(<[f32]>::len)
            .sum()
    }
    /// Training mode turns dropout on; evaluation mode (the default) off.
    pub fn set_training(&mut self, on: bool) {
        self.training = on;
    }
    /// The dropout generator (its state belongs in a checkpoint).
    pub fn rng(&self) -> &Rng {
        &self.rng
    }
    /// Restores the dropout generator, e.g. from a checkpoint.
    pub fn set_rng(&mut self, rng: Rng) {
        self.rng = rng;
    }
    /// Whether the adapter is currently folded into the weights.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// `Y[n×out]` for `X[n×in]`; keeps what [`HydraLinear::backward`] needs.
    pub fn forward(&mut self, x: Input<'_>, n: usize) -> Result<Vec<f32>> {
        self.forward_ext(x, n, true, true)
    }

    /// [`HydraLinear::forward`] with control over what is kept: with
    /// `keep = false` (inference) nothing is; with `copy_input = false` the
    /// caller keeps `X` itself until backward (the tail's tape), the adapter
    /// stores no copy, and [`HydraLinear::backward_with_input`] must be given
    /// the same `X`.
    pub fn forward_ext(
        &mut self,
        x: Input<'_>,
        n: usize,
        copy_input: bool,
        keep: bool,
    ) -> Result<Vec<f32>> {
        let k = kernels::active();
        if x.len() != n * self.in_dim {
            return Err(shape("HydraLinear::forward X", format!("{n}×{}", self.in_dim), x.len()));
        }
        if !x.all_finite() {
            return Err(Error::NonFinite("HydraLinear::forward input"));
        }
        let xf: Vec<f32>;
        let x32: &[f32] = match x {
            Input::F32(x) => x,
            Input::F16(h) => {
                xf = widen(k, h);
                &xf
            }
        };
        #[cfg(feature = "std")]
        if !self.merged && crate::device::gpu_takes(&[n, self.in_dim, self.out_dim]) {
            use crate::device::Attempt;
            let (din, dout) = (self.in_dim, self.out_dim);
            // The dropout masks the CPU path would draw, in its order; the
            // generator goes back if the GPU does not run the pass.
            let rng0 = self.rng.clone();
            let (cp, cs, train) = (self.config.parallel, self.config.sequential, self.training);
            let mask_p = (train && self.parallel.is_some() && cp.dropout > 0.0)
                .then(|| dropout_mask(&mut self.rng, n * din, cp.dropout));
            let mask_s = (train && self.sequential.is_some() && cs.dropout > 0.0)
                .then(|| dropout_mask(&mut self.rng, n * dout, cs.dropout));
            let (p, s) = self.low_ranks(mask_p.as_deref(), mask_s.as_deref());
            let b0 = self.b0.as_deref();
            let w0 = &self.w0;
            let gpu = self.packs.gpu();
            match crate::device::try_adapted_forward(
                gpu,
                || w0.for_gpu(),
                b0,
                crate::device::Act::Host(x32),
                (n, din, dout),
                p,
                s,
                keep,
            ) {
                Attempt::Done(f) => {
                    dense::record_gemm(n, din, dout);
                    // The parallel branch's input as the CPU path keeps it:
                    // masked, or (the tape not keeping it) a copy.
                    let xp = match &mask_p {
                        Some(m) if keep => {
                            Some(SavedX::F32(x32.iter().zip(m).map(|(v, m)| v * m).collect()))
                        }
                        Some(_) => None,
                        None => (keep && copy_input && self.parallel.is_some()).then(|| match x {
                            Input::F32(v) => SavedX::F32(v.to_vec()),
                            Input::F16(h) => SavedX::F16(h.to_vec()),
                        }),
                    };
                    let saved = Saved {
                        n,
                        xp,
                        mask_p,
                        y0: f.y0,
                        mask_s,
                        u_p: f.u_p,
                        u_s: f.u_s,
                        gpu: f.on_gpu,
                        resident: false,
                    };
                    self.saved = keep.then_some(saved);
                    return Ok(f.y);
                }
                Attempt::NotTaken => self.rng = rng0,
                Attempt::Failed => {
                    self.rng = rng0;
                    return crate::device::on_cpu(|| self.forward_cpu(x, x32, n, copy_input, keep));
                }
            }
        }
        self.forward_cpu(x, x32, n, copy_input, keep)
    }

    /// [`HydraLinear::forward`] on `X[n×in]` resident on the GPU (the tail's
    /// values there: `device::resident`), `Y` left there: the same pass as
    /// the GPU's from host values, the same dropout masks. `Ok(None)`: not a
    /// pass for the GPU (merged, under the size threshold): the caller runs
    /// [`HydraLinear::forward_ext`] on a host copy. `Err`: a CUDA call
    /// failed; nothing is kept and the generator is as it was.
    #[cfg(feature = "std")]
    pub(crate) fn forward_resident(
        &mut self,
        x: &crate::device::resident::GpuValue,
        n: usize,
        keep: bool,
    ) -> core::result::Result<
        Option<crate::device::resident::GpuValue>,
        crate::device::resident::Failed,
    > {
        use crate::device::Attempt;
        use crate::device::resident::Failed;
        let (din, dout) = (self.in_dim, self.out_dim);
        if self.merged || x.len() != n * din || !crate::device::gpu_takes(&[n, din, dout]) {
            return Ok(None);
        }
        let rng0 = self.rng.clone();
        let (cp, cs, train) = (self.config.parallel, self.config.sequential, self.training);
        let mask_p = (train && self.parallel.is_some() && cp.dropout > 0.0)
            .then(|| dropout_mask(&mut self.rng, n * din, cp.dropout));
        let mask_s = (train && self.sequential.is_some() && cs.dropout > 0.0)
            .then(|| dropout_mask(&mut self.rng, n * dout, cs.dropout));
        let (p, s) = self.low_ranks(mask_p.as_deref(), mask_s.as_deref());
        let (b0, w0, gpu) = (self.b0.as_deref(), &self.w0, self.packs.gpu());
        let x = crate::device::Act::Gpu(x);
        match crate::device::try_adapted_forward(
            gpu,
            || w0.for_gpu(),
            b0,
            x,
            (n, din, dout),
            p,
            s,
            keep,
        ) {
            Attempt::Done(f) => {
                dense::record_gemm(n, din, dout);
                let Some(y) = f.y_gpu else {
                    self.rng = rng0;
                    return Err(Failed);
                };
                let saved = Saved {
                    n,
                    xp: None,
                    mask_p,
                    y0: None,
                    mask_s,
                    u_p: f.u_p,
                    u_s: f.u_s,
                    gpu: f.on_gpu,
                    resident: true,
                };
                self.saved = keep.then_some(saved);
                Ok(Some(y))
            }
            Attempt::NotTaken => {
                self.rng = rng0;
                Ok(None)
            }
            Attempt::Failed => {
                self.rng = rng0;
                Err(Failed)
            }
        }
    }

    /// The backward of [`HydraLinear::forward_resident`] for `dY` (on the
    /// host or the GPU), on the GPU from what the forward kept there:
    /// accumulates the gradients and returns `dX` on the GPU if `want_dx`.
    /// `Err`: it cannot run there (a CUDA call failed, or the forward was
    /// not resident); no gradient has changed.
    #[cfg(feature = "std")]
    pub(crate) fn backward_resident(
        &mut self,
        dy: crate::device::Act<'_>,
        want_dx: bool,
    ) -> core::result::Result<
        Option<crate::device::resident::GpuValue>,
        crate::device::resident::Failed,
    > {
        use crate::device::Attempt;
        use crate::device::resident::Failed;
        let mut saved = match self.saved.take() {
            Some(s) if s.resident => s,
            other => {
                self.saved = other;
                return Err(Failed);
            }
        };
        let (n, din, dout) = (saved.n, self.in_dim, self.out_dim);
        let (mask_p, mask_s) = (saved.mask_p.as_deref(), saved.mask_s.as_deref());
        let (p, s) = self.low_ranks(mask_p.filter(|_| want_dx), mask_s.filter(|_| want_dx));
        let p = p.map(|l| (l, &[][..], &saved.u_p[..]));
        let s = s.map(|l| (l, &[][..], &saved.u_s[..]));
        // The branches' inputs must be the ones the forward kept on the GPU.
        if !saved.gpu.holds(self.parallel.is_some(), self.sequential.is_some()) {
            return Err(Failed);
        }
        let (w0, gpu) = (&self.w0, self.packs.gpu());
        let on_gpu = core::mem::take(&mut saved.gpu);
        let ran = crate::device::try_adapted_backward(
            gpu,
            || w0.for_gpu(),
            dy,
            (n, din, dout),
            p,
            s,
            want_dx,
            on_gpu,
        );
        match ran {
            Attempt::Done(b) => {
                if want_dx && b.dx_gpu.is_none() {
                    return Err(Failed);
                }
                if want_dx {
                    dense::record_gemm(n, dout, din);
                }
                add_grads(self.grad_parallel.as_mut(), b.parallel);
                add_grads(self.grad_sequential.as_mut(), b.sequential);
                Ok(b.dx_gpu)
            }
            Attempt::NotTaken | Attempt::Failed => Err(Failed),
        }
    }

    /// The branches as the GPU path reads them, with the pass's dropout
    /// masks.
    #[cfg(feature = "std")]
    fn low_ranks<'a>(
        &'a self,
        mask_p: Option<&'a [f32]>,
        mask_s: Option<&'a [f32]>,
    ) -> (Option<crate::device::LowRank<'a>>, Option<crate::device::LowRank<'a>>) {
        fn lr<'a>(
            b: &'a Option<Branch>,
            c: &BranchConfig,
            mask: Option<&'a [f32]>,
        ) -> Option<crate::device::LowRank<'a>> {
            b.as_ref().map(|b| crate::device::LowRank {
                a: &b.a,
                b: &b.b,
                bias_down: b.bias_down.as_deref(),
                bias_up: b.bias_up.as_deref(),
                scale: c.scale,
                rank: c.rank,
                mask,
            })
        }
        (
            lr(&self.parallel, &self.config.parallel, mask_p),
            lr(&self.sequential, &self.config.sequential, mask_s),
        )
    }

    /// [`HydraLinear::forward_ext`] on the CPU (the frozen product may
    /// still go to the GPU alone), `x32` being `x` as f32.
    fn forward_cpu(
        &mut self,
        x: Input<'_>,
        x32: &[f32],
        n: usize,
        copy_input: bool,
        keep: bool,
    ) -> Result<Vec<f32>> {
        let k = kernels::active();
        let (din, dout) = (self.in_dim, self.out_dim);
        // y0 = X·W0ᵀ + b0 (dense, frozen).
        let mut y =
            dense::frozen_forward(k, &self.w0, &self.packs, self.b0.as_deref(), x32, n, din, dout);
        if self.merged {
            self.saved = None;
            return Ok(y);
        }
        let train = self.training;
        let mut saved = Saved {
            n,
            xp: None,
            mask_p: None,
            y0: None,
            mask_s: None,
            u_p: vec![],
            u_s: vec![],
            #[cfg(feature = "std")]
            gpu: Default::default(),
            resident: false,
        };
        // The sequential branch reads y0 before the branches add to it.
        let y0 = self.sequential.is_some().then(|| y.clone());
        if let Some(p) = &self.parallel {
            let c = &self.config.parallel;
            let r = c.rank;
            let mut u = vec![0.0f32; n * r];
            let mask =
                (train && c.dropout > 0.0).then(|| dropout_mask(&mut self.rng, n * din, c.dropout));
            let copy = keep && copy_input;
            let xp = match (&mask, x) {
                (Some(m), _) => Some(SavedX::F32(x32.iter().zip(m).map(|(v, m)| v * m).collect())),
                (None, Input::F32(x)) if copy => Some(SavedX::F32(x.to_vec())),
                (None, Input::F16(h)) if copy => Some(SavedX::F16(h.to_vec())),
                (None, _) => None,
            };
            match (&xp, x) {
                (Some(SavedX::F32(v)), _) => k.down_f32(v, &p.a, &mut u, n, din, r),
                (None, Input::F32(v)) => k.down_f32(v, &p.a, &mut u, n, din, r),
                (Some(SavedX::F16(v)), _) => k.down_f16(v, &p.a, &mut u, n, din, r),
                (None, Input::F16(v)) => k.down_f16(v, &p.a, &mut u, n, din, r),
            }
            add_bias_rows(&mut u, p.bias_down.as_deref(), 1.0);
            k.up(&u, &p.b, &mut y, c.scale, n, dout, r);
            add_bias_rows(&mut y, p.bias_up.as_deref(), c.scale);
            saved.xp = xp;
            saved.mask_p = mask;
            saved.u_p = u;
        }
        if let (Some(s), Some(mut y0)) = (&self.sequential, y0) {
            let c = &self.config.sequential;
            let r = c.rank;
            let mut u = vec![0.0f32; n * r];
            let mask = (train && c.dropout > 0.0)
                .then(|| dropout_mask(&mut self.rng, n * dout, c.dropout));
            if let Some(m) = &mask {
                y0.iter_mut().zip(m).for_each(|(v, m)| *v *= m);
            }
            k.down_f32(&y0, &s.a, &mut u, n, dout, r);
            add_bias_rows(&mut u, s.bias_down.as_deref(), 1.0);
            k.up(&u, &s.b, &mut y, c.scale, n, dout, r);
            add_bias_rows(&mut y, s.bias_up.as_deref(), c.scale);
            saved.y0 = Some(y0);
            saved.mask_s = mask;
            saved.u_s = u;
        }
        self.saved = keep.then_some(saved);
        Ok(y)
    }

    /// Bytes kept for backward by the last training forward.
    pub fn saved_bytes(&self) -> usize {
        self.saved.as_ref().map_or(0, |s| {
            let x = match &s.xp {
                Some(SavedX::F32(v)) => v.len() * 4,
                Some(SavedX::F16(v)) => v.len() * 2,
                None => 0,
            };
            let f = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |v| v.len() * 4);
            #[cfg(feature = "std")]
            let gpu = s.gpu.bytes();
            #[cfg(not(feature = "std"))]
            let gpu = 0;
            // (What the GPU keeps counts too: on a Jetson its memory is the host's.)
            x + f(&s.mask_p) + f(&s.y0) + f(&s.mask_s) + (s.u_p.len() + s.u_s.len()) * 4 + gpu
        })
    }

    /// Drops what the last forward kept for backward.
    pub fn clear_saved(&mut self) {
        self.saved = None;
    }

    /// Accumulates the adapter's gradients for `dY[n×out]` (of the last
    /// forward) and returns `dX[n×in]`.
    pub fn backward(&mut self, dy: &[f32]) -> Result<Vec<f32>> {
        Ok(self.backward_impl(dy, true, None)?.unwrap_or_default())
    }

    /// Backward after [`HydraLinear::forward_ext`] without an input copy:
    /// `x` is the forward's input; returns `dX` if `want_dx`.
    pub fn backward_with_input(
        &mut self,
        dy: &[f32],
        x: Input<'_>,
        want_dx: bool,
    ) -> Result<Option<Vec<f32>>> {
        self.backward_impl(dy, want_dx, Some(x))
    }

    /// Like [`HydraLinear::backward`] but without `dX`: for the first adapted
    /// layer of a tail nothing upstream needs it, and skipping it saves the
    /// dense `dY0·W0` product, the largest cost of backward.
    pub fn backward_params_only(&mut self, dy: &[f32]) -> Result<()> {
        self.backward_impl(dy, false, None).map(drop)
    }

    fn backward_impl(
        &mut self,
        dy: &[f32],
        want_dx: bool,
        input: Option<Input<'_>>,
    ) -> Result<Option<Vec<f32>>> {
        #[cfg_attr(not(feature = "std"), allow(unused_mut))]
        let mut saved = self.saved.take().ok_or_else(|| {
            Error::Config(
                "HydraLinear::backward called without a preceding forward (or after merge)"
                    .to_string(),
            )
        })?;
        if saved.resident {
            return Err(Error::Config(
                "HydraLinear::backward on the host after a forward on GPU-resident values"
                    .to_string(),
            ));
        }
        let (n, din, dout) = (saved.n, self.in_dim, self.out_dim);
        if dy.len() != n * dout {
            return Err(shape("HydraLinear::backward dY", format!("{n}×{dout}"), dy.len()));
        }
        if !all_finite(dy) {
            return Err(Error::NonFinite("HydraLinear::backward dY"));
        }
        if let Some(x) = &input
            && x.len() != n * din
        {
            return Err(shape("HydraLinear::backward X", format!("{n}×{din}"), x.len()));
        }
        #[cfg(feature = "std")]
        if crate::device::gpu_takes(&[n, din, dout]) {
            use crate::device::Attempt;
            let k = kernels::active();
            // The parallel branch's input, as f32.
            let xp: Option<alloc::borrow::Cow<'_, [f32]>> = match (&saved.xp, &input) {
                _ if self.parallel.is_none() => None,
                (Some(SavedX::F32(v)), _) => Some(v[..].into()),
                (None, Some(Input::F32(v))) => Some((*v).into()),
                (Some(SavedX::F16(v)), _) => Some(widen(k, v).into()),
                (None, Some(Input::F16(v))) => Some(widen(k, v).into()),
                (None, None) => None,
            };
            if self.parallel.is_none() || xp.is_some() {
                // The masks are only read for dX.
                let (mask_p, mask_s) = (saved.mask_p.as_deref(), saved.mask_s.as_deref());
                let (p, s) = self.low_ranks(mask_p.filter(|_| want_dx), mask_s.filter(|_| want_dx));
                let p = p.zip(xp.as_deref()).map(|(l, x)| (l, x, &saved.u_p[..]));
                let y0 = saved.y0.as_deref().unwrap_or_default();
                let s = s.map(|l| (l, y0, &saved.u_s[..]));
                let (w0, gpu) = (&self.w0, self.packs.gpu());
                let on_gpu = core::mem::take(&mut saved.gpu);
                match crate::device::try_adapted_backward(
                    gpu,
                    || w0.for_gpu(),
                    crate::device::Act::Host(dy),
                    (n, din, dout),
                    p,
                    s,
                    want_dx,
                    on_gpu,
                ) {
                    Attempt::Done(b) => {
                        if want_dx {
                            dense::record_gemm(n, dout, din);
                        }
                        add_grads(self.grad_parallel.as_mut(), b.parallel);
                        add_grads(self.grad_sequential.as_mut(), b.sequential);
                        return Ok(b.dx);
                    }
                    Attempt::NotTaken => {}
                    Attempt::Failed => {
                        return crate::device::on_cpu(|| {
                            self.backward_cpu(saved, dy, want_dx, input)
                        });
                    }
                }
            }
        }
        self.backward_cpu(saved, dy, want_dx, input)
    }

    /// [`HydraLinear::backward_impl`] on the CPU, after its checks.
    fn backward_cpu(
        &mut self,
        saved: Saved,
        dy: &[f32],
        want_dx: bool,
        input: Option<Input<'_>>,
    ) -> Result<Option<Vec<f32>>> {
        let k = kernels::active();
        let (n, din, dout) = (saved.n, self.in_dim, self.out_dim);
        // dY0 = dY + s_s·(dY·B_s)·A_s (masked), then dX = dY0·W0.
        let mut dy0_owned = None;
        if let (Some(s), Some(g)) = (&self.sequential, &mut self.grad_sequential) {
            let c = &self.config.sequential;
            let y0 = saved.y0.as_deref().unwrap_or_default();
            let du = branch_grads(k, g, &s.b, dy, &saved.u_s, c.scale, n, dout, c.rank);
            k.grad_a_f32(&du, y0, &mut g.a, c.scale, n, dout, c.rank);
            if want_dx {
                let mut dy0 = dy.to_vec();
                grad_x_masked(
                    k,
                    &du,
                    &s.a,
                    &mut dy0,
                    saved.mask_s.as_deref(),
                    c.scale,
                    n,
                    dout,
                    c.rank,
                );
                dy0_owned = Some(dy0);
            }
        }
        // dX = dY0·W0 is written, not added to (no zeroing pass first); the
        // parallel branch adds its part below.
        let mut dx = if want_dx {
            dense::frozen_backward(
                k,
                &self.w0,
                &self.packs,
                dy0_owned.as_deref().unwrap_or(dy),
                n,
                din,
                dout,
            )
        } else {
            Vec::new()
        };
        if let (Some(p), Some(g)) = (&self.parallel, &mut self.grad_parallel) {
            let c = &self.config.parallel;
            let du = branch_grads(k, g, &p.b, dy, &saved.u_p, c.scale, n, dout, c.rank);
            match (&saved.xp, input) {
                (Some(SavedX::F32(v)), _) => {
                    k.grad_a_f32(&du, v, &mut g.a, c.scale, n, din, c.rank)
                }
                (None, Some(Input::F32(v))) => {
                    k.grad_a_f32(&du, v, &mut g.a, c.scale, n, din, c.rank)
                }
                (Some(SavedX::F16(v)), _) => {
                    k.grad_a_f16(&du, v, &mut g.a, c.scale, n, din, c.rank)
                }
                (None, Some(Input::F16(v))) => {
                    k.grad_a_f16(&du, v, &mut g.a, c.scale, n, din, c.rank)
                }
                (None, None) => {
                    return Err(Error::Config(
                        "HydraLinear::backward: the forward kept no input and none was given"
                            .to_string(),
                    ));
                }
            }
            if want_dx {
                grad_x_masked(
                    k,
                    &du,
                    &p.a,
                    &mut dx,
                    saved.mask_p.as_deref(),
                    c.scale,
                    n,
                    din,
                    c.rank,
                );
            }
        }
        Ok(want_dx.then_some(dx))
    }
}

/// Gradients shared by both branches: `dB += s·dYᵀ·U`, `de += s·Σ dY`,
/// `dc += s·Σ dU`; returns `dU = dY·B` (unscaled).
#[allow(clippy::too_many_arguments)]
fn branch_grads(
    k: &Kernels,
    g: &mut Branch,
    b: &[f32],
    dy: &[f32],
    u: &[f32],
    s: f32,
    n: usize,
    out: usize,
    r: usize,
) -> Vec<f32> {
    k.grad_b(dy, u, &mut g.b, s, n, out, r);
    if let Some(ge) = &mut g.bias_up {
        sum_rows_into(ge, dy, s);
    }
    let mut du = vec![0.0f32; n * r];
    k.grad_u(dy, b, &mut du, n, out, r);
    if let Some(gc) = &mut g.bias_down {
        sum_rows_into(gc, &du, s);
    }
    du
}

/// Adds one backward's gradient increments from the GPU to the sums.
#[cfg(feature = "std")]
fn add_grads(g: Option<&mut Branch>, inc: Option<crate::device::LowRankGrads>) {
    let add = |g: &mut [f32], inc: &[f32]| g.iter_mut().zip(inc).for_each(|(g, i)| *g += i);
    if let (Some(g), Some(inc)) = (g, inc) {
        add(&mut g.a, &inc.a);
        add(&mut g.b, &inc.b);
        if let (Some(g), Some(inc)) = (&mut g.bias_down, &inc.bias_down) {
            add(g, inc);
        }
        if let (Some(g), Some(inc)) = (&mut g.bias_up, &inc.bias_up) {
            add(g, inc);
        }
    }
}

/// `acc[j] += s·Σ_i m[i, j]`.
fn sum_rows_into(acc: &mut [f32], m: &[f32], s: f32) {
    let w = acc.len();
    for row in m.chunks_exact(w) {
        acc.iter_mut().zip(row).for_each(|(a, v)| *a += s * v);
    }
}

/// `m[i, :] += s·bias` for every row.
fn add_bias_rows(m: &mut [f32], bias: Option<&[f32]>, s: f32) {
    if let Some(b) = bias {
        m.chunks_exact_mut(b.len())
            .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += s * b));
    }
}

/// `dX += mask ⊙ (s·dU·A)`: straight into `dX` without dropout, through a
/// temporary with it.
#[allow(clippy::too_many_arguments)]
fn grad_x_masked(
    k: &Kernels,
    du: &[f32],
    a: &[f32],
    dx: &mut [f32],
    mask: Option<&[f32]>,
    s: f32,
    n: usize,
    width: usize,
    r: usize,
) {
    match mask {
        None => k.grad_x(du, a, dx, s, n, width, r),
        Some(mask) => {
            let mut t = vec![0.0f32; n * width];
            k.grad_x(du, a, &mut t, s, n, width, r);
            dx.iter_mut().zip(&t).zip(mask).for_each(|((d, t), m)| *d += t * m);
        }
    }
}

/// Inverted dropout: each element kept with probability 1−p and scaled by 1/(1−p).
fn dropout_mask(rng: &mut Rng, len: usize, p: f32) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    (0..len).map(|_| if rng.next_f32() < p { 0.0 } else { keep }).collect()
}

fn widen(k: &Kernels, h: &[f16]) -> Vec<f32> {
    let mut out = vec![0.0; h.len()];
    k.f16_to_f32(h, &mut out);
    out
}

fn shape(context: &'static str, expected: alloc::string::String, got: usize) -> Error {
    Error::Shape { context, expected, got: format!("{got} elements") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block-wise finite checks find one ∞ or NaN (either sign) at any
    /// position, inside a block of 64 or in the remainder, and pass
    /// denormals, zeros and the largest finite values.
    #[test]
    fn finite_checks_find_every_position() {
        let len = 64 * 3 + 17;
        let ok: Vec<f32> = (0..len)
            .map(|i| match i % 4 {
                0 => f32::MAX,
                1 => -1e-40,
                2 => -0.0,
                _ => i as f32,
            })
            .collect();
        assert!(all_finite(&ok) && all_finite(&[]));
        let ok16: Vec<f16> = ok.iter().map(|&v| f16::from_f32(v.clamp(-6e4, 6e4))).collect();
        assert!(all_finite_f16(&ok16) && all_finite_f16(&[]));
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for i in 0..len {
                let mut v = ok.clone();
                v[i] = bad;
                assert!(!all_finite(&v), "{bad} at {i}");
                let mut h = ok16.clone();
                h[i] = f16::from_f32(bad);
                assert!(!all_finite_f16(&h), "{bad} at {i} (f16)");
            }
        }
    }
}
