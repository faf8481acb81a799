//! Folding an adapter into its layer and taking it back out.
//!
//! Merge (exact up to f32 rounding; no added latency):
//! `W' = W0 + s_p·B_p·A_p + s_s·B_s·(A_s·W0)`,
//! `b' = b0 + s_s·B_s·(A_s·b0 + c_s) + s_s·e_s + s_p·(B_p·c_p + e_p)`.
//! Every weight-sized step is a rank-r update on the kernels; `A_s·W0` is the
//! `grad_a` kernel with `A_sᵀ` as its left operand. f16 weights are widened,
//! updated in f32 and rounded once.
//!
//! Unmerge inverts it: subtract the parallel term, then undo `(I + s·B·A)` with
//! the Woodbury identity `(I + s·B·A)⁻¹ = I − s·B·(I_r + s·A·B)⁻¹·A`, which
//! needs only an r×r solve (f64, partial pivoting).
//!
//! [`Delta`] is the hot-swap form: the same update as low-rank factors
//! (`(r_p + r_s)·(in + out)` numbers instead of `in·out`), applied to and
//! removed from a shared `W0` without re-deriving anything.

use alloc::format;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use super::{Branch, HydraLinear, Weights};
use crate::error::{Error, Result};
use crate::kernels::{self, Kernels};

/// A layer's adapter update as low-rank factors, for applying to and removing
/// from shared frozen weights at run time.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    out_dim: usize,
    in_dim: usize,
    /// `(L, R, r)`: `ΔW += L[out×r]·R[r×in]` per part (one per branch).
    parts: Vec<(Vec<f32>, Vec<f32>, usize)>,
    bias: Option<Vec<f32>>,
}

impl Delta {
    /// Number of f32 values the delta holds.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|(l, r, _)| l.len() + r.len()).sum::<usize>()
            + self.bias.as_ref().map_or(0, Vec::len)
    }

    /// Whether the delta holds nothing (an adapter without branches).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bias change, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// `W += ΔW`, `b += Δb` (a missing `b` with a bias delta is an error).
    pub fn apply(&self, w: &mut Weights, b: Option<&mut [f32]>) -> Result<()> {
        self.update(w, b, 1.0)
    }

    /// `W −= ΔW`, `b −= Δb`: undoes [`Delta::apply`] (exactly up to rounding
    /// of the stored type; use f32 weights for repeated swaps).
    pub fn remove(&self, w: &mut Weights, b: Option<&mut [f32]>) -> Result<()> {
        self.update(w, b, -1.0)
    }

    fn update(&self, w: &mut Weights, b: Option<&mut [f32]>, sign: f32) -> Result<()> {
        let (m, d) = (self.out_dim, self.in_dim);
        if w.len() != m * d {
            return Err(Error::Shape {
                context: "Delta weights",
                expected: format!("{m}×{d}"),
                got: format!("{} elements", w.len()),
            });
        }
        match (&self.bias, b) {
            (Some(db), Some(b)) if b.len() == db.len() => {
                b.iter_mut().zip(db).for_each(|(b, d)| *b += sign * d)
            }
            (Some(db), b) => {
                return Err(Error::Shape {
                    context: "Delta bias",
                    expected: format!("{}", db.len()),
                    got: format!("{:?}", b.map(|b| b.len())),
                });
            }
            (None, _) => {}
        }
        let k = kernels::active();
        for (l, r, rank) in &self.parts {
            match w {
                Weights::F32(w) => k.merge_f32(l, r, w, sign, m, d, *rank),
                Weights::F16(w) => k.merge_f16(l, r, w, sign, m, d, *rank),
            }
        }
        Ok(())
    }
}

impl HydraLinear {
    /// The merged weights `W'` (out×in) and bias `b'` in f32, leaving the
    /// layer as it is. The bias is `None` only if the layer has none and the
    /// adapter adds none.
    pub fn merged_weights(&self) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        if self.merged {
            return Err(Error::Config("the adapter is already merged into this layer".to_string()));
        }
        let mut b = self.b0.clone();
        let delta = self.delta()?;
        // Apply in f32 (the stored type may be f16: round once, at the end).
        let mut wf = Weights::F32(self.w0.to_f32(kernels::active()));
        if delta.bias.is_some() && b.is_none() {
            b = Some(vec![0.0; self.out_dim]);
        }
        delta.apply(&mut wf, b.as_deref_mut())?;
        let Weights::F32(w) = wf else { unreachable!("constructed as f32") };
        Ok((w, b))
    }

    /// The adapter as a [`Delta`] against this layer's frozen weights.
    pub fn delta(&self) -> Result<Delta> {
        if self.merged {
            return Err(Error::Config("the adapter is already merged into this layer".to_string()));
        }
        let k = kernels::active();
        let (m, d) = (self.out_dim, self.in_dim);
        let mut parts = Vec::new();
        let mut bias: Option<Vec<f32>> = None;
        let mut add_bias = |v: Vec<f32>| match &mut bias {
            Some(b) => b.iter_mut().zip(&v).for_each(|(b, v)| *b += v),
            None => bias = Some(v),
        };
        if let Some(p) = &self.parallel {
            let (r, s) = (self.config.parallel.rank, self.config.parallel.scale);
            let right = p.a.iter().map(|a| s * a).collect();
            parts.push((p.b.clone(), right, r));
            if let Some(v) = branch_bias(p, None, s, m, r) {
                add_bias(v);
            }
        }
        if let Some(q) = &self.sequential {
            let (r, s) = (self.config.sequential.rank, self.config.sequential.scale);
            // R = s·A_s·W0 (r×in), with A_sᵀ (out×r) as the kernel's left operand.
            let at = transpose(&q.a, r, m);
            let mut right = vec![0.0f32; r * d];
            match &self.w0 {
                Weights::F32(w) => k.grad_a_f32(&at, w, &mut right, s, m, d, r),
                Weights::F16(w) => k.grad_a_f16(&at, w, &mut right, s, m, d, r),
            }
            parts.push((q.b.clone(), right, r));
            if let Some(v) = branch_bias(q, self.b0.as_deref(), s, m, r) {
                add_bias(v);
            }
        }
        Ok(Delta { out_dim: m, in_dim: d, parts, bias })
    }

    /// Folds the adapter into the layer's weights (rounded once to the stored
    /// type); forward then costs what the frozen layer costs.
    pub fn merge(&mut self) -> Result<()> {
        let (w, b) = self.merged_weights()?;
        self.bias_added_by_merge = self.b0.is_none() && b.is_some();
        self.w0 = store_like(&self.w0, w);
        self.packs = super::dense::Packs::default();
        self.b0 = b;
        self.merged = true;
        self.saved = None;
        Ok(())
    }

    /// Folds `delta` (this adapter's [`HydraLinear::delta`]) into the
    /// weights, for hot-swapping: forward then costs what the frozen layer
    /// costs. [`HydraLinear::unmerge_delta`] with the same delta undoes it.
    pub fn merge_delta(&mut self, delta: &Delta) -> Result<()> {
        if self.merged {
            return Err(Error::Config("the adapter is already merged into this layer".to_string()));
        }
        if delta.bias.is_some() && self.b0.is_none() {
            self.b0 = Some(vec![0.0; self.out_dim]);
            self.bias_added_by_merge = true;
        }
        delta.apply(&mut self.w0, self.b0.as_deref_mut())?;
        self.packs = super::dense::Packs::default();
        self.merged = true;
        self.saved = None;
        Ok(())
    }

    /// Removes a delta folded in by [`HydraLinear::merge_delta`].
    pub fn unmerge_delta(&mut self, delta: &Delta) -> Result<()> {
        if !self.merged {
            return Err(Error::Config("the adapter is not merged into this layer".to_string()));
        }
        delta.remove(&mut self.w0, self.b0.as_deref_mut())?;
        self.packs = super::dense::Packs::default();
        if self.bias_added_by_merge {
            self.b0 = None;
            self.bias_added_by_merge = false;
        }
        self.merged = false;
        Ok(())
    }

    /// Takes a merged adapter back out, restoring `W0` and `b0` (up to
    /// rounding; exact to ~1e-6 relative with f32 weights).
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            return Err(Error::Config("the adapter is not merged into this layer".to_string()));
        }
        let k = kernels::active();
        let (m, d) = (self.out_dim, self.in_dim);
        let mut w = self.w0.to_f32(k);
        let mut b = self.b0.clone();
        if let Some(p) = &self.parallel {
            let (r, s) = (self.config.parallel.rank, self.config.parallel.scale);
            k.merge_f32(&p.b, &p.a, &mut w, -s, m, d, r);
            if let (Some(b), Some(v)) = (&mut b, branch_bias(p, None, s, m, r)) {
                b.iter_mut().zip(&v).for_each(|(b, v)| *b -= v);
            }
        }
        if let Some(q) = &self.sequential {
            let (r, s) = (self.config.sequential.rank, self.config.sequential.scale);
            if let (Some(b), Some(v)) = (&mut b, branch_bias(q, None, s, m, r)) {
                b.iter_mut().zip(&v).for_each(|(b, v)| *b -= v);
            }
            undo_sequential(k, q, s, r, m, d, &mut w, b.as_deref_mut())?;
        }
        self.w0 = store_like(&self.w0, w);
        self.packs = super::dense::Packs::default();
        self.b0 = if self.bias_added_by_merge { None } else { b };
        self.bias_added_by_merge = false;
        self.merged = false;
        Ok(())
    }
}

/// `W ← (I + s·B·A)⁻¹·W`, `b ← (I + s·B·A)⁻¹·b` by Woodbury: an r×r solve.
#[allow(clippy::too_many_arguments)]
fn undo_sequential(
    k: &Kernels,
    q: &Branch,
    s: f32,
    r: usize,
    m: usize,
    d: usize,
    w: &mut [f32],
    b: Option<&mut [f32]>,
) -> Result<()> {
    // K = I_r + s·A·B (r×r), in f64.
    let mut kk = vec![0.0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            let dot: f64 =
                (0..m).map(|o| f64::from(q.a[i * m + o]) * f64::from(q.b[o * r + j])).sum();
            kk[i * r + j] = f64::from(s) * dot + if i == j { 1.0 } else { 0.0 };
        }
    }
    let lu = Lu::new(kk, r).ok_or_else(|| {
        Error::Config(
            "cannot unmerge: I + s·A_s·B_s is singular for this sequential branch".to_string(),
        )
    })?;
    // Z = K⁻¹·(A·W) (r×in), then W −= s·B·Z.
    let at = transpose(&q.a, r, m);
    let mut t = vec![0.0f32; r * d];
    k.grad_a_f32(&at, w, &mut t, 1.0, m, d, r);
    let z = lu.solve_columns(&t, d);
    k.merge_f32(&q.b, &z, w, -s, m, d, r);
    if let Some(b) = b {
        let ab: Vec<f32> = (0..r).map(|i| (0..m).map(|o| q.a[i * m + o] * b[o]).sum()).collect();
        let zb = lu.solve_columns(&ab, 1);
        for (o, bo) in b.iter_mut().enumerate() {
            *bo -= s * (0..r).map(|j| q.b[o * r + j] * zb[j]).sum::<f32>();
        }
    }
    Ok(())
}

/// A branch's bias contribution `s·(B·(A·b_in + c) + e)` (b_in: the
/// sequential branch's frozen input bias), or `None` if it is identically zero.
fn branch_bias(br: &Branch, b_in: Option<&[f32]>, s: f32, m: usize, r: usize) -> Option<Vec<f32>> {
    if br.bias_down.is_none() && br.bias_up.is_none() && b_in.is_none() {
        return None;
    }
    let k_in = br.a.len() / r;
    let mut u: Vec<f32> = br.bias_down.clone().unwrap_or_else(|| vec![0.0; r]);
    if let Some(bi) = b_in {
        for (i, ui) in u.iter_mut().enumerate() {
            *ui += (0..k_in).map(|j| br.a[i * k_in + j] * bi[j]).sum::<f32>();
        }
    }
    let mut out: Vec<f32> = (0..m).map(|o| (0..r).map(|j| br.b[o * r + j] * u[j]).sum()).collect();
    if let Some(e) = &br.bias_up {
        out.iter_mut().zip(e).for_each(|(o, e)| *o += e);
    }
    out.iter_mut().for_each(|o| *o *= s);
    Some(out)
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

fn store_like(like: &Weights, w: Vec<f32>) -> Weights {
    match like {
        Weights::F32(_) => Weights::F32(w),
        Weights::F16(_) => {
            let mut h = vec![half::f16::ZERO; w.len()];
            kernels::active().f32_to_f16(&w, &mut h);
            Weights::F16(h)
        }
    }
}

/// LU factors of a small square matrix with partial pivoting (f64).
struct Lu {
    lu: Vec<f64>,
    piv: Vec<usize>,
    n: usize,
}

impl Lu {
    fn new(mut a: Vec<f64>, n: usize) -> Option<Lu> {
        let mut piv: Vec<usize> = (0..n).collect();
        for c in 0..n {
            let p = (c..n).max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))?;
            if a[p * n + c].abs() < 1e-12 {
                return None;
            }
            if p != c {
                for j in 0..n {
                    a.swap(p * n + j, c * n + j);
                }
                piv.swap(p, c);
            }
            for i in c + 1..n {
                let f = a[i * n + c] / a[c * n + c];
                a[i * n + c] = f;
                for j in c + 1..n {
                    a[i * n + j] -= f * a[c * n + j];
                }
            }
        }
        Some(Lu { lu: a, piv, n })
    }

    /// Solves `A·Z = T` for `T` n×cols (row-major, f32), in f64.
    fn solve_columns(&self, t: &[f32], cols: usize) -> Vec<f32> {
        let n = self.n;
        let mut z = vec![0.0f64; n * cols];
        for (i, &p) in self.piv.iter().enumerate() {
            for j in 0..cols {
                z[i * cols + j] = f64::from(t[p * cols + j]);
            }
        }
        for i in 0..n {
            for k in 0..i {
                let f = self.lu[i * n + k];
                for j in 0..cols {
                    z[i * cols + j] -= f * z[k * cols + j];
                }
            }
        }
        for i in (0..n).rev() {
            for k in i + 1..n {
                let f = self.lu[i * n + k];
                for j in 0..cols {
                    z[i * cols + j] -= f * z[k * cols + j];
                }
            }
            let dgl = self.lu[i * n + i];
            for j in 0..cols {
                z[i * cols + j] /= dgl;
            }
        }
        z.into_iter().map(|v| v as f32).collect()
    }
}
