//! Element-wise unary ops: Relu, Sigmoid, Tanh, Erf, Gelu (exact and tanh),
//! Sqrt, Exp, Neg, Identity, Clip, Cast. Backward multiplies `dy` by the
//! derivative, written from the input or (where cheaper) the output.

use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, Zip};

use super::{TailOp, fail, input};
use crate::Tensor;
use crate::error::Result;
use crate::tail::fastmath as fm;

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

/// Runs `$body` with `$f` bound to `kind`'s function as a concrete closure,
/// so each element loop is monomorphised (and vectorised).
macro_rules! with_kind {
    ($kind:expr, |$x:ident| $f:ident => $body:expr) => {
        match $kind {
            UnaryKind::Relu => {
                let $f = |$x: f32| $x.max(0.0);
                $body
            }
            UnaryKind::Sigmoid => {
                let $f = |$x: f32| 1.0 / (1.0 + fm::exp(-$x));
                $body
            }
            UnaryKind::Tanh => {
                let $f = |$x: f32| $x.tanh();
                $body
            }
            UnaryKind::Erf => {
                let $f = |$x: f32| fm::erf($x);
                $body
            }
            UnaryKind::Gelu => {
                let $f =
                    |$x: f32| 0.5 * $x * (1.0 + fm::erf($x * core::f32::consts::FRAC_1_SQRT_2));
                $body
            }
            UnaryKind::GeluTanh => {
                let $f = |$x: f32| UnaryKind::GeluTanh.apply($x);
                $body
            }
            UnaryKind::Sqrt => {
                let $f = |$x: f32| $x.sqrt();
                $body
            }
            UnaryKind::Exp => {
                let $f = |$x: f32| fm::exp($x);
                $body
            }
            UnaryKind::Neg => {
                let $f = |$x: f32| -$x;
                $body
            }
            UnaryKind::Identity => {
                let $f = |$x: f32| $x;
                $body
            }
        }
    };
}

/// The same, for `dy·f'(x, y)`.
macro_rules! with_derivative {
    ($kind:expr, |$g:ident, $x:ident, $y:ident| $f:ident => $body:expr) => {
        match $kind {
            UnaryKind::Erf => {
                let $f = |$g: f32, $x: f32, _y: f32| {
                    $g * (core::f32::consts::FRAC_2_SQRT_PI * fm::exp(-$x * $x))
                };
                $body
            }
            UnaryKind::Gelu => {
                let $f = |$g: f32, $x: f32, _y: f32| {
                    // e^(−z²) with z = x/√2 is e^(−x²/2): φ(x)·√(2π).
                    let (e, gauss) = fm::erf_and_gauss($x * core::f32::consts::FRAC_1_SQRT_2);
                    let cdf = 0.5 * (1.0 + e);
                    let pdf = gauss * 0.398_942_3;
                    $g * (cdf + $x * pdf)
                };
                $body
            }
            UnaryKind::Sigmoid => {
                let $f = |$g: f32, _x: f32, $y: f32| $g * $y * (1.0 - $y);
                $body
            }
            UnaryKind::Tanh => {
                let $f = |$g: f32, _x: f32, $y: f32| $g * (1.0 - $y * $y);
                $body
            }
            UnaryKind::Relu => {
                let $f = |$g: f32, $x: f32, _y: f32| if $x > 0.0 { $g } else { 0.0 };
                $body
            }
            k => {
                let $f = |$g: f32, $x: f32, $y: f32| $g * k.derivative($x, $y);
                $body
            }
        }
    };
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
    fn gpu_kind(&self) -> Option<super::GpuKind> {
        Some(match self.kind {
            UnaryKind::Gelu => super::GpuKind::Gelu,
            UnaryKind::Identity => super::GpuKind::Identity,
            k => super::GpuKind::Unary(k),
        })
    }

    fn op_type(&self) -> &'static str {
        self.kind.name()
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?;
        if self.kind == UnaryKind::Identity {
            return Ok(x.clone());
        }
        let x = x.f32("unary input")?;
        let xs = x.as_standard_layout();
        let xs = xs.as_slice().unwrap_or_default();
        let y = with_kind!(self.kind, |v| f => fm::map(xs, f));
        Ok(Tensor::F32(
            ArrayD::from_shape_vec(x.raw_dim(), y).map_err(|e| fail(alloc::format!("{e}")))?,
        ))
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
        if self.kind == UnaryKind::Identity {
            // dX = dY: one copy, not a pass over dY, X and Y.
            return Ok(vec![Some(dy.to_owned())]);
        }
        let (x, y) = (input(inputs, 0)?.f32("unary input")?, output.f32("unary output")?);
        let (xs, ys, gs) =
            (x.as_standard_layout(), y.as_standard_layout(), dy.as_standard_layout());
        let (xs, ys, gs) = (
            xs.as_slice().unwrap_or_default(),
            ys.as_slice().unwrap_or_default(),
            gs.as_slice().unwrap_or_default(),
        );
        if xs.len() != gs.len() || ys.len() != gs.len() {
            return Err(fail("unary backward: gradient and input sizes differ"));
        }
        let dx = with_derivative!(self.kind, |g, x, y| f => fm::map3(gs, xs, ys, f));
        Ok(vec![Some(
            ArrayD::from_shape_vec(x.raw_dim(), dx).map_err(|e| fail(alloc::format!("{e}")))?,
        )])
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

/// ONNX HardSigmoid `max(0, min(1, α·x + β))`, and HardSwish
/// `x·HardSigmoid(x)` with α = 1/6, β = 1/2 (MobileNetV3's activations).
#[derive(Debug)]
pub struct HardSigmoid {
    alpha: f32,
    beta: f32,
    swish: bool,
}

impl HardSigmoid {
    /// HardSigmoid with the given slope and offset (ONNX defaults: 0.2, 0.5).
    pub fn new(alpha: f32, beta: f32) -> HardSigmoid {
        HardSigmoid { alpha, beta, swish: false }
    }

    /// HardSwish.
    pub fn swish() -> HardSigmoid {
        HardSigmoid { alpha: 1.0 / 6.0, beta: 0.5, swish: true }
    }
}

impl TailOp for HardSigmoid {
    fn op_type(&self) -> &'static str {
        if self.swish { "HardSwish" } else { "HardSigmoid" }
    }

    fn forward(&mut self, inputs: &[&Tensor], _train: bool) -> Result<Tensor> {
        let x = input(inputs, 0)?.f32("HardSigmoid input")?;
        let xs = x.as_standard_layout();
        let (a, b, swish) = (self.alpha, self.beta, self.swish);
        let y = fm::map(xs.as_slice().unwrap_or_default(), move |v| {
            let h = (a * v + b).clamp(0.0, 1.0);
            if swish { v * h } else { h }
        });
        Ok(Tensor::F32(
            ArrayD::from_shape_vec(x.raw_dim(), y).map_err(|e| fail(alloc::format!("{e}")))?,
        ))
    }

    fn backward(
        &mut self,
        inputs: &[&Tensor],
        _output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        if !need.first().copied().unwrap_or(false) {
            return Ok(vec![None]);
        }
        let x = input(inputs, 0)?.f32("HardSigmoid input")?;
        if x.shape() != dy.shape() {
            return Err(fail("HardSigmoid backward: gradient and input shapes differ"));
        }
        let (a, b, swish) = (self.alpha, self.beta, self.swish);
        let dx = Zip::from(dy).and(x).map_collect(|&g, &v| {
            let z = a * v + b;
            let inside = z > 0.0 && z < 1.0;
            match (swish, inside) {
                // d/dx x·(αx + β) = 2αx + β inside; 1 above, 0 below.
                (true, true) => g * (2.0 * a * v + b),
                (true, false) => {
                    if z >= 1.0 {
                        g
                    } else {
                        0.0
                    }
                }
                (false, true) => g * a,
                (false, false) => 0.0,
            }
        });
        Ok(vec![Some(dx)])
    }

    fn backward_reads_output(&self) -> bool {
        false
    }
}
