//! Plain f64 references for every kernel: the definition the SIMD tiers are
//! tested against. Each also returns, per output element, the sum of the
//! absolute values of the terms it added up, from which the tests derive an
//! error bound that scales with the conditioning of that element.
//!
//! Inputs are read exactly (f16 widened losslessly), so a reference result
//! is the exact answer rounded once to f64.

use alloc::vec;
use alloc::vec::Vec;

/// A reference result: values and, per element, `Σ|term|` (its magnitude scale).
#[derive(Clone, Debug)]
pub struct Ref {
    /// Exact-ish results (f64).
    pub value: Vec<f64>,
    /// Sum of absolute terms per element, including the initial value.
    pub scale: Vec<f64>,
}

/// `Y[i, j] = y0[i, j] + s·Σ_k L(i, k)·R(k, j)` with accessor closures.
fn product(
    rows: usize,
    cols: usize,
    inner: usize,
    s: f64,
    init: impl Fn(usize, usize) -> f64,
    lhs: impl Fn(usize, usize) -> f64,
    rhs: impl Fn(usize, usize) -> f64,
) -> Ref {
    let mut value = vec![0.0; rows * cols];
    let mut scale = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let y0 = init(i, j);
            let (mut acc, mut mag) = (0.0, 0.0);
            for k in 0..inner {
                let t = lhs(i, k) * rhs(k, j);
                acc += t;
                mag += t.abs();
            }
            value[i * cols + j] = y0 + s * acc;
            scale[i * cols + j] = y0.abs() + s.abs() * mag;
        }
    }
    Ref { value, scale }
}

/// `C = α·A·B + β·C` for the strided sgemm (`A(i, p) = a[i·rsa + p·csa]`,
/// `B(p, j) = b[p·rsb + j·csb]`, C row-major with row stride `rsc`; `β = 0`
/// never reads C), as an `m×n` result.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &[f32],
    rsc: usize,
) -> Ref {
    product(
        m,
        n,
        k,
        f64::from(alpha),
        |i, j| if beta == 0.0 { 0.0 } else { f64::from(beta) * f64::from(c[i * rsc + j]) },
        |i, p| f64::from(a[i * rsa + p * csa]),
        |p, j| f64::from(b[p * rsb + j * csb]),
    )
}

/// `U = X·Aᵀ` (X n×d, A r×d).
pub fn down(x: &[f64], a: &[f64], n: usize, d: usize, r: usize) -> Ref {
    product(n, r, d, 1.0, |_, _| 0.0, |i, j| x[i * d + j], |j, k| a[k * d + j])
}

/// `Y + s·U·Bᵀ` (U n×r, B m×r, Y n×m).
pub fn up(u: &[f64], b: &[f64], y: &[f64], s: f64, n: usize, m: usize, r: usize) -> Ref {
    product(n, m, r, s, |i, j| y[i * m + j], |i, k| u[i * r + k], |k, j| b[j * r + k])
}

/// `dY·B` (dY n×m, B m×r).
pub fn grad_u(dy: &[f64], b: &[f64], n: usize, m: usize, r: usize) -> Ref {
    product(n, r, m, 1.0, |_, _| 0.0, |i, c| dy[i * m + c], |c, k| b[c * r + k])
}

/// `dX + s·dU·A` (dU n×r, A r×d).
pub fn grad_x(du: &[f64], a: &[f64], dx: &[f64], s: f64, n: usize, d: usize, r: usize) -> Ref {
    product(n, d, r, s, |i, j| dx[i * d + j], |i, k| du[i * r + k], |k, j| a[k * d + j])
}

/// `dA + s·dUᵀ·X` (dU n×r, X n×d, dA r×d).
pub fn grad_a(du: &[f64], x: &[f64], da: &[f64], s: f64, n: usize, d: usize, r: usize) -> Ref {
    product(r, d, n, s, |k, j| da[k * d + j], |k, i| du[i * r + k], |i, j| x[i * d + j])
}

/// `dB + s·dYᵀ·U` (dY n×m, U n×r, dB m×r).
pub fn grad_b(dy: &[f64], u: &[f64], db: &[f64], s: f64, n: usize, m: usize, r: usize) -> Ref {
    product(m, r, n, s, |c, k| db[c * r + k], |c, i| dy[i * m + c], |i, k| u[i * r + k])
}

/// `W + s·B·A` (B m×r, A r×d, W m×d).
pub fn merge(b: &[f64], a: &[f64], w: &[f64], s: f64, m: usize, d: usize, r: usize) -> Ref {
    product(m, d, r, s, |c, j| w[c * d + j], |c, k| b[c * r + k], |k, j| a[k * d + j])
}
