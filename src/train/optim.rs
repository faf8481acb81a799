//! Optimisers (SGD with momentum, AdamW with decoupled weight decay), the
//! learning-rate schedule (linear warmup, then cosine decay to a floor) and
//! gradient clipping by global norm. Only adapter and head tensors are ever
//! handed to them: frozen weights are not parameters at all.

use serde::{Deserialize, Serialize};

/// Which optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// `v ← μ·v + g; p ← p − lr·v` (decay: `p ← p − lr·wd·p`).
    Sgd {
        /// Momentum μ.
        momentum: f32,
    },
    /// AdamW (Loshchilov & Hutter): Adam moments, decoupled weight decay.
    AdamW {
        /// β1.
        beta1: f32,
        /// β2.
        beta2: f32,
        /// ε.
        eps: f32,
    },
}

impl Default for OptimizerKind {
    fn default() -> Self {
        OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Linear warmup from 0 to `base` over `warmup` steps, then cosine decay to
/// `min` at `total` steps (and `min` after).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub base: f32,
    /// Floor.
    pub min: f32,
    /// Warmup steps.
    pub warmup: u64,
    /// Total steps of the run.
    pub total: u64,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.base * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (core::f64::consts::PI * t).cos());
        (f64::from(self.min) + f64::from(self.base - self.min) * cos) as f32
    }
}

/// Optimiser state: per parameter tensor, the first (and for AdamW second) moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: u64,
    /// The moments on the GPU, with one in use (`device`).
    gpu: crate::device::OptimizerCache,
}

impl Optimizer {
    /// State for tensors of the given lengths.
    pub fn new(kind: OptimizerKind, weight_decay: f32, lens: &[usize]) -> Optimizer {
        let zeros = || lens.iter().map(|&n| vec![0.0; n]).collect::<Vec<_>>();
        let v = if matches!(kind, OptimizerKind::AdamW { .. }) { zeros() } else { Vec::new() };
        Optimizer { kind, weight_decay, m: zeros(), v, t: 0, gpu: Default::default() }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The moment tensors (for checkpoints): `m` then `v`.
    pub fn state(&self) -> (&[Vec<f32>], &[Vec<f32>]) {
        (&self.m, &self.v)
    }

    /// Restores a state saved by [`Optimizer::state`]; lengths must match.
    pub fn restore(&mut self, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>, t: u64) -> bool {
        let same = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len())
        };
        if !same(&self.m, &m) || !same(&self.v, &v) {
            return false;
        }
        (self.m, self.v, self.t) = (m, v, t);
        self.gpu.clear();
        true
    }

    /// AdamW's bias corrections `1 − β1ᵗ`, `1 − β2ᵗ` of step `t`.
    fn corrections(beta1: f32, beta2: f32, t: u64) -> (f32, f32) {
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        let (c1, c2) = (1.0 - f64::from(beta1).powi(t), 1.0 - f64::from(beta2).powi(t));
        (c1 as f32, c2 as f32)
    }

    /// One update of every parameter tensor with its gradient (on the GPU
    /// in use, where there is one: `device`).
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f32) {
        self.t += 1;
        let wd = self.weight_decay;
        // With a GPU in use, the same update there (the same bits).
        let rule = match self.kind {
            OptimizerKind::Sgd { momentum } => crate::device::StepRule::Sgd { momentum },
            OptimizerKind::AdamW { beta1, beta2, eps } => {
                let (c1, c2) = Self::corrections(beta1, beta2, self.t);
                crate::device::StepRule::AdamW { beta1, beta2, eps, c1, c2 }
            }
        };
        let (m, v) = (&mut self.m, &mut self.v);
        match crate::device::try_optimizer_step(&mut self.gpu, rule, lr, wd, params, grads, m, v) {
            crate::device::Attempt::Done(()) => return,
            // The host's moments change below: the GPU's copy is stale.
            _ => self.gpu.clear(),
        }
        match self.kind {
            OptimizerKind::Sgd { momentum } => {
                for ((p, g), m) in params.iter_mut().zip(grads).zip(&mut self.m) {
                    for ((p, &g), m) in p.iter_mut().zip(g.iter()).zip(m.iter_mut()) {
                        *m = momentum * *m + g;
                        *p -= lr * (*m + wd * *p);
                    }
                }
            }
            OptimizerKind::AdamW { beta1, beta2, eps } => {
                let (c1, c2) = Self::corrections(beta1, beta2, self.t);
                for (((p, g), m), v) in
                    params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v)
                {
                    for (((p, &g), m), v) in
                        p.iter_mut().zip(g.iter()).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        *m = beta1 * *m + (1.0 - beta1) * g;
                        *v = beta2 * *v + (1.0 - beta2) * g * g;
                        let (mh, vh) = (*m / c1, *v / c2);
                        *p -= lr * (mh / (vh.sqrt() + eps) + wd * *p);
                    }
                }
            }
        }
    }
}

/// Global L2 norm of all gradients.
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    grads.iter().flat_map(|g| g.iter()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

/// Scales the gradients so their global norm is at most `max`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Vec<f32>], max: f32) -> f64 {
    let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    let norm = global_norm(&refs);
    if norm > f64::from(max) && norm > 0.0 {
        let s = (f64::from(max) / norm) as f32;
        grads.iter_mut().flat_map(|g| g.iter_mut()).for_each(|v| *v *= s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule { base: 1.0, min: 0.1, warmup: 4, total: 14 };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert!((s.lr(4) - 1.0).abs() < 1e-6);
        assert!((s.lr(9) - 0.55).abs() < 1e-6, "{}", s.lr(9));
        assert!((s.lr(14) - 0.1).abs() < 1e-6);
        assert!((s.lr(100) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_sgd_follows_momentum() {
        let mut p = vec![1.0f32, -1.0];
        let mut o = Optimizer::new(OptimizerKind::default(), 0.0, &[2]);
        o.step(&mut [&mut p], &[&[0.5, -2.0]], 0.1);
        // m̂/√v̂ = sign(g) on the first step.
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6, "{p:?}");
        let mut q = vec![0.0f32];
        let mut s = Optimizer::new(OptimizerKind::Sgd { momentum: 0.5 }, 0.0, &[1]);
        s.step(&mut [&mut q], &[&[1.0]], 1.0);
        s.step(&mut [&mut q], &[&[1.0]], 1.0);
        assert_eq!(q[0], -(1.0 + 1.5));
        let mut wd = vec![2.0f32];
        let mut d = Optimizer::new(OptimizerKind::default(), 0.5, &[1]);
        d.step(&mut [&mut wd], &[&[0.0]], 0.1);
        assert!(
            (wd[0] - (2.0 - 0.1 * 0.5 * 2.0)).abs() < 1e-6,
            "decoupled decay with zero gradient: {}",
            wd[0]
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        assert_eq!(clip_global_norm(&mut g, 1.0), 5.0);
        assert!((g[0][0] - 0.6).abs() < 1e-6 && (g[1][0] - 0.8).abs() < 1e-6);
    }
}
