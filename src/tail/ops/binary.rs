//! Broadcasting binary ops: Add, Sub, Mul, Div, Pow, Max, Min (numpy rules). Backward
//! sums each input's gradient back down to that input's shape. Integer
//! inputs (shape arithmetic) are supported for Add, Sub, Mul, Div.

use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, ArrayViewD, IxDyn, Zip};

use super::{TailOp, fail, input};
use crate::Tensor;
use crate::error::Result;
use crate::tail::broadcast::{broadcast_shape, unbroadcast};
use crate::tail::fastmath as fm;

/// Which operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    /// `a + b`.
    Add,
    /// `a − b`.
    Sub,
    /// `a·b`.
    Mul,
    /// `a / b`.
    Div,
    /// `a^b`.
    Pow,
    /// `max(a, b)` (ONNX Max of two inputs); ties send the gradient to `a`.
    Max,
    /// `min(a, b)` (ONNX Min of two inputs); ties send the gradient to `a`.
    Min,
}

/// A broadcasting binary op.
#[derive(Debug)]
pub struct Binary {
    kind: BinaryKind,
}

impl Binary {
    /// The op for `kind`.
    pub fn new(kind: BinaryKind) -> Binary {
        Binary { kind }
    }
}

fn views<'a, T>(
    a: &'a ArrayD<T>,
    b: &'a ArrayD<T>,
) -> Result<(ArrayViewD<'a, T>, ArrayViewD<'a, T>)> {
    let shape = broadcast_shape(a.shape(), b.shape(), "")?;
    let a = a.broadcast(IxDyn(&shape)).ok_or_else(|| fail("broadcast"))?;
    let b = b.broadcast(IxDyn(&shape)).ok_or_else(|| fail("broadcast"))?;
    Ok((a, b))
}

fn zip<T: Copy, U>(a: &ArrayD<T>, b: &ArrayD<T>, f: impl Fn(T, T) -> U) -> Result<ArrayD<U>> {
    let (a, b) = views(a, b)?;
    Ok(Zip::from(&a).and(&b).map_collect(|&x, &y| f(x, y)))
}

/// Whether `small` broadcasts over `big` as a repeated trailing block (a
/// bias row, a scale vector): leading 1s, then `big`'s trailing dims.
fn trailing_block(big: &[usize], small: &[usize]) -> bool {
    let s: Vec<usize> = small.iter().copied().skip_while(|&d| d == 1).collect();
    s.len() <= big.len() && big[big.len() - s.len()..] == s[..]
}

/// `f(a, b)` element-wise with numpy broadcasting, on contiguous slices and
/// the thread pool for the shapes the tail meets most (same shape, scalar,
/// trailing block on either side); a general strided loop otherwise.
fn zip_f32(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    f: impl Fn(f32, f32) -> f32 + Sync + Send + Copy,
) -> Result<ArrayD<f32>> {
    let (sa, sb) = (a.shape(), b.shape());
    let (ca, cb) = (a.as_standard_layout(), b.as_standard_layout());
    let (xa, xb) = (ca.as_slice().unwrap_or_default(), cb.as_slice().unwrap_or_default());
    let shaped = |shape: &[usize], v: Vec<f32>| {
        ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| fail(alloc::format!("{e}")))
    };
    if sa == sb {
        return shaped(sa, fm::map2(xa, xb, f));
    }
    // A scalar on either side (a scale, an epsilon): one pass, no rows.
    if xb.len() == 1 && sb.len() <= sa.len() {
        let y = xb[0];
        return shaped(sa, fm::map(xa, move |x| f(x, y)));
    }
    if xa.len() == 1 && sa.len() <= sb.len() {
        let x = xa[0];
        return shaped(sb, fm::map(xb, move |y| f(x, y)));
    }
    if sa.len() >= sb.len() && trailing_block(sa, sb) {
        return shaped(sa, fm::map_rows(xa, xb, f));
    }
    if sb.len() >= sa.len() && trailing_block(sb, sa) {
        return shaped(sb, fm::map_rows(xb, xa, move |y, x| f(x, y)));
    }
    zip(a, b, f)
}

impl TailOp for Binary {
    fn backward_reads_output(&self) -> bool {
        // Only the gradients of Div's divisor and Pow's base read `y`.
        matches!(self.kind, BinaryKind::Div | BinaryKind::Pow)
    }

    fn gpu_kind(&self) -> Option<super::GpuKind> {
        Some(super::GpuKind::Binary(self.kind))
    }

    fn op_type(&self) -> &'static str {
        match self.kind {
            BinaryKind::Add => "Add",
            BinaryKind::Sub => "Sub",
            BinaryKind::Mul => "Mul",
            BinaryKind::Div => "Div",
            BinaryKind::Pow => "Pow",
            BinaryKind::Max => "Max",
            BinaryKind::Min => "Min",
        }
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        match (a, b) {
            (Tensor::F32(a), Tensor::F32(b)) => Ok(Tensor::F32(match self.kind {
                BinaryKind::Add => zip_f32(a, b, |x, y| x + y)?,
                BinaryKind::Sub => zip_f32(a, b, |x, y| x - y)?,
                BinaryKind::Mul => zip_f32(a, b, |x, y| x * y)?,
                BinaryKind::Div => zip_f32(a, b, |x, y| x / y)?,
                BinaryKind::Pow => zip_f32(a, b, pow)?,
                BinaryKind::Max => zip_f32(a, b, |x, y| if x >= y || x.is_nan() { x } else { y })?,
                BinaryKind::Min => zip_f32(a, b, |x, y| if x <= y || x.is_nan() { x } else { y })?,
            })),
            (Tensor::I64(a), Tensor::I64(b)) => Ok(Tensor::I64(match self.kind {
                BinaryKind::Add => zip(a, b, |x, y| x.wrapping_add(y))?,
                BinaryKind::Sub => zip(a, b, |x, y| x.wrapping_sub(y))?,
                BinaryKind::Mul => zip(a, b, |x, y| x.wrapping_mul(y))?,
                BinaryKind::Div => zip(a, b, |x, y| if y == 0 { 0 } else { x / y })?,
                BinaryKind::Pow => return Err(fail("integer Pow is not supported")),
                BinaryKind::Max => zip(a, b, |x, y| x.max(y))?,
                BinaryKind::Min => zip(a, b, |x, y| x.min(y))?,
            })),
            (Tensor::F32(a), Tensor::I64(b)) if self.kind == BinaryKind::Pow => {
                Ok(Tensor::F32(zip(a, &b.mapv(|v| v as f32), pow)?))
            }
            _ => Err(fail("mixed f32 and i64 operands")),
        }
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let a = input(inputs, 0)?.f32("lhs")?;
        let want = |i: usize| need.get(i).copied().unwrap_or(false);
        let mut out = vec![None, None];
        // The exponent of Pow may be an integer constant: no gradient there.
        let b_f32;
        let b = match input(inputs, 1)? {
            Tensor::F32(b) => b,
            Tensor::I64(b) if !want(1) => {
                b_f32 = b.mapv(|v| v as f32);
                &b_f32
            }
            Tensor::I64(_) => return Err(fail("gradient of an integer operand")),
            Tensor::F16(_) => return Err(fail("f16 operand (widened by the graph)")),
        };
        let (sa, sb) = (a.shape(), b.shape());
        match self.kind {
            BinaryKind::Add | BinaryKind::Sub => {
                if want(0) {
                    out[0] = Some(unbroadcast(dy.clone(), sa));
                }
                if want(1) {
                    let g = if self.kind == BinaryKind::Sub { dy.mapv(|v| -v) } else { dy.clone() };
                    out[1] = Some(unbroadcast(g, sb));
                }
            }
            BinaryKind::Mul => {
                if want(0) {
                    out[0] = Some(unbroadcast(zip_f32(dy, b, |g, y| g * y)?, sa));
                }
                if want(1) {
                    out[1] = Some(unbroadcast(zip_f32(dy, a, |g, x| g * x)?, sb));
                }
            }
            BinaryKind::Div => {
                if want(0) {
                    out[0] = Some(unbroadcast(zip_f32(dy, b, |g, y| g / y)?, sa));
                }
                if want(1) {
                    // d(a/b)/db = −(a/b)/b = −out/b
                    let y = output.f32("Div output")?;
                    let gy = zip_f32(dy, y, |g, q| g * q)?;
                    out[1] = Some(unbroadcast(zip_f32(&gy, b, |g, y| -g / y)?, sb));
                }
            }
            BinaryKind::Max | BinaryKind::Min => {
                let max = self.kind == BinaryKind::Max;
                // The input that was chosen gets dy (ties: a).
                let a_wins = move |x: f32, y: f32| {
                    if max { x >= y || x.is_nan() } else { x <= y || x.is_nan() }
                };
                let (av, bv) = views(a, b)?;
                if dy.shape() != av.shape() {
                    return Err(fail("Max/Min backward: gradient shape differs from the output's"));
                }
                if want(0) {
                    let d = Zip::from(dy)
                        .and(&av)
                        .and(&bv)
                        .map_collect(|&g, &x, &y| if a_wins(x, y) { g } else { 0.0 });
                    out[0] = Some(unbroadcast(d, sa));
                }
                if want(1) {
                    let d = Zip::from(dy)
                        .and(&av)
                        .and(&bv)
                        .map_collect(|&g, &x, &y| if a_wins(x, y) { 0.0 } else { g });
                    out[1] = Some(unbroadcast(d, sb));
                }
            }
            BinaryKind::Pow => {
                if want(0) {
                    let (av, bv) = views(a, b)?;
                    let d = Zip::from(dy)
                        .and(&av)
                        .and(&bv)
                        .map_collect(|&g, &x, &p| g * p * pow(x, p - 1.0));
                    out[0] = Some(unbroadcast(d, sa));
                }
                if want(1) {
                    let y = output.f32("Pow output")?;
                    let (av, _) = views(a, b)?;
                    let d = Zip::from(dy).and(y).and(&av).map_collect(|&g, &y, &x| g * y * x.ln());
                    out[1] = Some(unbroadcast(d, sb));
                }
            }
        }
        Ok(out)
    }
}

/// `x^p`, exact for the common small integer exponents.
fn pow(x: f32, p: f32) -> f32 {
    if p == 2.0 {
        x * x
    } else if p == 1.0 {
        x
    } else if p == 0.5 {
        x.sqrt()
    } else if p == 3.0 {
        x * x * x
    } else {
        x.powf(p)
    }
}
