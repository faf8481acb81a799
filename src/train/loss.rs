//! Losses on the model's (or the head's) output: softmax cross-entropy with
//! optional label smoothing, mean squared error, and binary cross-entropy on
//! logits. Each returns the mean loss (in f64), its gradient and, for
//! classification, how many predictions were right.

use ndarray::{ArrayD, Axis, Zip};
use serde::{Deserialize, Serialize};

use super::data::Labels;
use crate::error::{Error, Result};

/// Which loss.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Softmax cross-entropy over the last axis of `[B, C]` logits against class indices.
    CrossEntropy {
        /// Label smoothing ε: targets are `(1 − ε)·onehot + ε/C`.
        label_smoothing: f32,
    },
    /// Mean squared error against float targets of the output's shape.
    Mse,
    /// Binary cross-entropy on logits against 0/1 float targets.
    Bce,
}

/// A loss value with its gradient.
#[derive(Clone, Debug)]
pub struct LossOut {
    /// Mean loss over the batch.
    pub loss: f64,
    /// d loss / d output.
    pub grad: ArrayD<f32>,
    /// Correct predictions (classification) and how many were judged.
    pub correct: Option<(usize, usize)>,
}

impl Loss {
    /// Loss of `out` against `labels`.
    pub fn compute(&self, out: &ArrayD<f32>, labels: &Labels) -> Result<LossOut> {
        match (self, labels) {
            (Loss::CrossEntropy { label_smoothing }, Labels::Classes(c)) => {
                cross_entropy(out, c, *label_smoothing)
            }
            (Loss::Mse, Labels::Values(t)) => mse(out, t),
            (Loss::Bce, Labels::Values(t)) => bce(out, t),
            (l, _) => Err(Error::Config(format!(
                "loss {l:?} does not fit these labels (class indices go with cross_entropy, float targets with mse/bce)"
            ))),
        }
    }
}

fn cross_entropy(out: &ArrayD<f32>, labels: &[usize], eps: f32) -> Result<LossOut> {
    if out.ndim() != 2 || out.shape()[0] != labels.len() {
        return Err(Error::Shape {
            context: "cross-entropy",
            expected: format!("[{}, classes] logits", labels.len()),
            got: format!("{:?}", out.shape()),
        });
    }
    let (b, c) = (out.shape()[0], out.shape()[1]);
    if let Some(&bad) = labels.iter().find(|&&l| l >= c) {
        return Err(Error::Config(format!("class label {bad} ≥ number of outputs {c}")));
    }
    let mut grad = out.clone();
    let (mut loss, mut correct) = (0.0f64, 0usize);
    let smooth = f64::from(eps) / c as f64;
    for (i, mut row) in grad.axis_iter_mut(Axis(0)).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let arg = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |a, (j, &v)| if v > a.1 { (j, v) } else { a })
            .0;
        correct += usize::from(arg == labels[i]);
        let lse = f64::from(max) + row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln();
        for (j, g) in row.iter_mut().enumerate() {
            let logp = f64::from(*g) - lse;
            let q = smooth + if j == labels[i] { 1.0 - f64::from(eps) } else { 0.0 };
            loss -= q * logp;
            *g = ((logp.exp() - q) / b as f64) as f32;
        }
    }
    Ok(LossOut { loss: loss / b as f64, grad, correct: Some((correct, b)) })
}

fn check_same(out: &ArrayD<f32>, t: &ArrayD<f32>, what: &'static str) -> Result<()> {
    if out.shape() != t.shape() {
        return Err(Error::Shape {
            context: what,
            expected: format!("targets shaped like the output {:?}", out.shape()),
            got: format!("{:?}", t.shape()),
        });
    }
    Ok(())
}

fn mse(out: &ArrayD<f32>, t: &ArrayD<f32>) -> Result<LossOut> {
    check_same(out, t, "mse")?;
    let n = out.len().max(1) as f64;
    let loss = Zip::from(out).and(t).fold(0.0f64, |acc, &y, &t| acc + f64::from(y - t).powi(2)) / n;
    let grad = Zip::from(out).and(t).map_collect(|&y, &t| (2.0 * f64::from(y - t) / n) as f32);
    Ok(LossOut { loss, grad, correct: None })
}

fn bce(out: &ArrayD<f32>, t: &ArrayD<f32>) -> Result<LossOut> {
    check_same(out, t, "bce")?;
    let n = out.len().max(1) as f64;
    // max(x, 0) − x·t + log(1 + e^−|x|): stable for any logit.
    let loss = Zip::from(out).and(t).fold(0.0f64, |acc, &x, &t| {
        let (x, t) = (f64::from(x), f64::from(t));
        acc + x.max(0.0) - x * t + (-x.abs()).exp().ln_1p()
    }) / n;
    let grad = Zip::from(out)
        .and(t)
        .map_collect(|&x, &t| ((1.0 / (1.0 + (-f64::from(x)).exp()) - f64::from(t)) / n) as f32);
    let correct =
        Zip::from(out).and(t).fold(0usize, |c, &x, &t| c + usize::from((x > 0.0) == (t > 0.5)));
    Ok(LossOut { loss, grad, correct: Some((correct, out.len())) })
}
