//! A new output head: a linear layer `[B, F] → [B, N]` on a feature tensor
//! of the tail (inputs of higher rank are flattened after the batch axis),
//! trained from scratch alongside the adapters. Init: `W ~ U(±1/√F)`, `b = 0`.
//!
//! It is a tail op like any other (the last node of the tape, appended by
//! [`TailGraph::set_head`](crate::tail::TailGraph::set_head)): the tail's
//! forward ends in logits and its backward fills the head's gradients. As a
//! standalone layer it also has its own [`LinearHead::forward`] /
//! [`LinearHead::backward`].

use ndarray::{ArrayD, IxDyn};

use super::{TailOp, input};
use crate::Tensor;
use crate::error::{Error, Result};
use crate::hydra::gemm;
use crate::rng::Rng;

/// The largest head [`LinearHead::new`] builds (weights): 1 GB of f32.
pub const MAX_HEAD_PARAMS: usize = 1 << 28;

/// A trainable linear head.
#[derive(Clone, Debug)]
pub struct LinearHead {
    /// Weights, out×in.
    pub w: Vec<f32>,
    /// Bias, out.
    pub b: Vec<f32>,
    /// Gradient of `w`.
    pub gw: Vec<f32>,
    /// Gradient of `b`.
    pub gb: Vec<f32>,
    in_dim: usize,
    out_dim: usize,
    saved: Option<(Vec<f32>, Vec<usize>)>,
}

impl LinearHead {
    /// A seeded head for `in_dim` features and `out_dim` outputs; refuses
    /// zero or absurd sizes before allocating anything.
    pub fn new(in_dim: usize, out_dim: usize, seed: u64) -> Result<LinearHead> {
        let len = in_dim.checked_mul(out_dim).filter(|&n| n > 0 && n <= MAX_HEAD_PARAMS);
        let Some(len) = len else {
            return Err(Error::Config(format!(
                "a head of {out_dim} outputs on {in_dim} features is not possible (at least 1 each, at most {MAX_HEAD_PARAMS} weights)"
            )));
        };
        let mut rng = Rng::new(seed ^ 0x4EAD);
        let bound = 1.0 / (in_dim as f32).sqrt();
        let w = (0..len).map(|_| rng.uniform(-bound, bound)).collect();
        Ok(LinearHead {
            w,
            b: vec![0.0; out_dim],
            gw: vec![0.0; len],
            gb: vec![0.0; out_dim],
            in_dim,
            out_dim,
            saved: None,
        })
    }

    /// Weights, bias and their gradients, borrowed together (for optimisers).
    pub fn split_mut(&mut self) -> (&mut [f32], &mut [f32], &[f32], &[f32]) {
        (&mut self.w, &mut self.b, &self.gw, &self.gb)
    }

    /// Zeroes the gradients.
    pub fn zero_grad(&mut self) {
        self.gw.fill(0.0);
        self.gb.fill(0.0);
    }

    /// (inputs, outputs).
    pub fn dims(&self) -> (usize, usize) {
        (self.in_dim, self.out_dim)
    }

    /// `[B, F…] → [B, N]`; with `train`, keeps the features for backward.
    pub fn forward(&mut self, feat: &ArrayD<f32>, train: bool) -> Result<ArrayD<f32>> {
        let b = feat.shape().first().copied().unwrap_or(0);
        if feat.len() != b * self.in_dim {
            return Err(Error::Shape {
                context: "head input",
                expected: format!("[{b}, {}]", self.in_dim),
                got: format!("{:?}", feat.shape()),
            });
        }
        let x: Vec<f32> = feat.as_standard_layout().iter().copied().collect();
        let mut y = vec![0.0f32; b * self.out_dim];
        gemm(
            b,
            self.in_dim,
            self.out_dim,
            1.0,
            &x,
            (self.in_dim, 1),
            &self.w,
            (1, self.in_dim),
            0.0,
            &mut y,
        );
        y.chunks_exact_mut(self.out_dim)
            .for_each(|r| r.iter_mut().zip(&self.b).for_each(|(v, b)| *v += b));
        self.saved = train.then(|| (x, feat.shape().to_vec()));
        ArrayD::from_shape_vec(IxDyn(&[b, self.out_dim]), y)
            .map_err(|e| Error::Config(e.to_string()))
    }

    /// Sets the gradients from `dy` `[B, N]` and returns the features' gradient.
    pub fn backward(&mut self, dy: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let (x, shape) = self
            .saved
            .take()
            .ok_or_else(|| Error::Config("head backward without forward".into()))?;
        let b = shape[0];
        let g: Vec<f32> = dy.as_standard_layout().iter().copied().collect();
        let dx = self.grads(&x, &g, b, true).unwrap_or_default();
        ArrayD::from_shape_vec(IxDyn(&shape), dx).map_err(|e| Error::Config(e.to_string()))
    }
}

impl LinearHead {
    /// `dW = dYᵀ·X`, `db = Σ dY` (set, not accumulated: the head runs once
    /// per step) and, if `want_dx`, `dX = dY·W`, for features `x` `[B, F]`.
    fn grads(&mut self, x: &[f32], g: &[f32], b: usize, want_dx: bool) -> Option<Vec<f32>> {
        gemm(
            self.out_dim,
            b,
            self.in_dim,
            1.0,
            g,
            (1, self.out_dim),
            x,
            (self.in_dim, 1),
            0.0,
            &mut self.gw,
        );
        self.gb
            .iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = (0..b).map(|i| g[i * self.out_dim + j]).sum());
        want_dx.then(|| {
            let mut dx = vec![0.0f32; b * self.in_dim];
            gemm(
                b,
                self.out_dim,
                self.in_dim,
                1.0,
                g,
                (self.out_dim, 1),
                &self.w,
                (self.in_dim, 1),
                0.0,
                &mut dx,
            );
            dx
        })
    }
}

impl TailOp for LinearHead {
    fn op_type(&self) -> &'static str {
        "Head"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?.to_f32("head input")?;
        // The tape keeps the features: nothing saved here.
        let y = LinearHead::forward(self, &x, false)?;
        Ok(Tensor::F32(y))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let x = input(inputs, 0)?.to_f32("head input")?;
        let b = x.shape().first().copied().unwrap_or(0);
        let (xs, gs) = (x.as_standard_layout(), dy.as_standard_layout());
        let (xs, gs) = (xs.as_slice().unwrap_or_default(), gs.as_slice().unwrap_or_default());
        if xs.len() != b * self.in_dim || gs.len() != b * self.out_dim {
            return Err(Error::Shape {
                context: "head backward",
                expected: format!(
                    "[{b}, {}] features and [{b}, {}] gradient",
                    self.in_dim, self.out_dim
                ),
                got: format!("{:?} and {:?}", x.shape(), dy.shape()),
            });
        }
        let want = need.first().copied().unwrap_or(false);
        let dx = self.grads(xs, gs, b, want);
        Ok(vec![match dx {
            Some(d) => Some(
                ArrayD::from_shape_vec(x.raw_dim(), d).map_err(|e| Error::Config(e.to_string()))?,
            ),
            None => None,
        }])
    }

    fn backward_reads_output(&self) -> bool {
        false
    }

    fn trainable(&self) -> bool {
        true
    }

    fn as_head(&self) -> Option<&LinearHead> {
        Some(self)
    }

    fn as_head_mut(&mut self) -> Option<&mut LinearHead> {
        Some(self)
    }
}
