//! Element-wise unary ops: Relu, Sigmoid, Tanh, Erf, Gelu (exact and tanh),
//! Sqrt, Exp, Neg, Identity, Clip, Cast. Backward multiplies `dy` by the
//! derivative, written from the input or (where cheaper) the output.

use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, Zip};

use super::{TailOp, fail, input};
use crate::Tensor;
use crate::error::Result;

/// Which function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryKind {
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `tanh x`.
    Tanh,
    /// The error function.
    Erf,
    /// `x·Φ(x)` (exact, erf form).
    Gelu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// `√x`.
    Sqrt,
    /// `e^x`.
    Exp,
    /// `−x`.
    Neg,
    /// `x`.
    Identity,
}

/// An element-wise function of one input.
#[derive(Debug)]
pub struct Unary {
    kind: UnaryKind,
}

impl Unary {
    /// The op for `kind`.
    pub fn new(kind: UnaryKind) -> Unary {
        Unary { kind }
    }
}

const FRAC_2_SQRT_PI: f64 = core::f64::consts::FRAC_2_SQRT_PI;
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// erf with |error| < 1.2e-7 (Numerical Recipes' Chebyshev fit of erfc), in f64.
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x * core::f64::consts::FRAC_1_SQRT_2))
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

impl UnaryKind {
    fn apply(self, x: f32) -> f32 {
        let xd = f64::from(x);
        match self {
            UnaryKind::Relu => x.max(0.0),
            UnaryKind::Sigmoid => (1.0 / (1.0 + (-xd).exp())) as f32,
            UnaryKind::Tanh => x.tanh(),
            UnaryKind::Erf => erf(xd) as f32,
            UnaryKind::Gelu => gelu(xd) as f32,
            UnaryKind::GeluTanh => gelu_tanh(xd) as f32,
            UnaryKind::Sqrt => x.sqrt(),
            UnaryKind::Exp => x.exp(),
            UnaryKind::Neg => -x,
            UnaryKind::Identity => x,
        }
    }

    /// dy/dx at input `x` with output `y`.
    fn derivative(self, x: f32, y: f32) -> f32 {
        let xd = f64::from(x);
        match self {
            UnaryKind::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            UnaryKind::Sigmoid => y * (1.0 - y),
            UnaryKind::Tanh => 1.0 - y * y,
            UnaryKind::Erf => (FRAC_2_SQRT_PI * (-xd * xd).exp()) as f32,
            UnaryKind::Gelu => {
                let cdf = 0.5 * (1.0 + erf(xd * core::f64::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * xd * xd).exp()
                    * 0.5
                    * FRAC_2_SQRT_PI
                    * core::f64::consts::FRAC_1_SQRT_2;
                (cdf + xd * pdf) as f32
            }
            UnaryKind::GeluTanh => {
                let u = SQRT_2_OVER_PI * (xd + 0.044_715 * xd * xd * xd);
                let t = u.tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * xd * xd);
                (0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * du) as f32
            }
            UnaryKind::Sqrt => 0.5 / y,
            UnaryKind::Exp => y,
            UnaryKind::Neg => -1.0,
            UnaryKind::Identity => 1.0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            UnaryKind::Relu => "Relu",
            UnaryKind::Sigmoid => "Sigmoid",
            UnaryKind::Tanh => "Tanh",
            UnaryKind::Erf => "Erf",
            UnaryKind::Gelu | UnaryKind::GeluTanh => "Gelu",
            UnaryKind::Sqrt => "Sqrt",
            UnaryKind::Exp => "Exp",
            UnaryKind::Neg => "Neg",
            UnaryKind::Identity => "Identity",
        }
    }
}

impl TailOp for Unary {
    fn op_type(&self) -> &'static str {
        self.kind.name()
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?;
        if self.kind == UnaryKind::Identity {
            return Ok(x.clone());
        }
        let kind = self.kind;
        Ok(Tensor::F32(x.f32("unary input")?.mapv(|v| kind.apply(v))))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        if !need.first().copied().unwrap_or(false) {
            return Ok(vec![None]);
        }
        let (x, y) = (input(inputs, 0)?.f32("unary input")?, output.f32("unary output")?);
        let kind = self.kind;
        let dx = Zip::from(dy).and(x).and(y).map_collect(|&g, &x, &y| g * kind.derivative(x, y));
        Ok(vec![Some(dx)])
    }
}

/// `min(max(x, lo), hi)` with constant bounds (ONNX Clip; ReLU6 is Clip(0, 6)).
#[derive(Debug)]
pub struct Clip {
    lo: f32,
    hi: f32,
}

impl Clip {
    /// Bounds (use ±∞ for a missing one).
    pub fn new(lo: f32, hi: f32) -> Clip {
        Clip { lo, hi }
    }
}

impl TailOp for Clip {
    fn op_type(&self) -> &'static str {
        "Clip"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let (lo, hi) = (self.lo, self.hi);
        Ok(Tensor::F32(input(inputs, 0)?.f32("Clip input")?.mapv(|v| v.max(lo).min(hi))))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let mut out = vec![None; inputs.len()];
        if need.first().copied().unwrap_or(false) {
            let x = input(inputs, 0)?.f32("Clip input")?;
            let (lo, hi) = (self.lo, self.hi);
            out[0] = Some(
                Zip::from(dy).and(x).map_collect(|&g, &x| if x >= lo && x <= hi { g } else { 0.0 }),
            );
        }
        Ok(out)
    }

    fn differentiable(&self, input: usize) -> bool {
        input == 0
    }
}

/// ONNX Cast to float or to an integer type (kept as i64).
#[derive(Debug)]
pub struct Cast {
    to_float: bool,
}

impl Cast {
    /// `to_float`: FLOAT target (else an integer or bool target).
    pub fn new(to_float: bool) -> Cast {
        Cast { to_float }
    }
}

impl TailOp for Cast {
    fn op_type(&self) -> &'static str {
        "Cast"
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?;
        Ok(match (x, self.to_float) {
            (Tensor::F32(a), true) => Tensor::F32(a.clone()),
            (Tensor::I64(a), true) => Tensor::F32(a.mapv(|v| v as f32)),
            (Tensor::F32(a), false) => Tensor::I64(a.mapv(|v| v as i64)),
            (Tensor::I64(a), false) => Tensor::I64(a.clone()),
            (Tensor::F16(a), true) => Tensor::F32(a.mapv(|v| v.to_f32())),
            (Tensor::F16(a), false) => Tensor::I64(a.mapv(|v| v.to_f32() as i64)),
        })
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        if need.first().copied().unwrap_or(false) {
            if !self.to_float || !matches!(inputs.first(), Some(Tensor::F32(_))) {
                return Err(fail("gradient through a cast to an integer type"));
            }
            return Ok(vec![Some(dy.clone())]);
        }
        Ok(vec![None])
    }

    fn differentiable(&self, _input: usize) -> bool {
        self.to_float
    }
}
