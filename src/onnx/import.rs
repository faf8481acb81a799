//! ONNX node → tail op. Every op the tail engine lacks, and every attribute
//! or input form it does not handle, is an `UnsupportedOp` error here — at
//! split time, never mid-training.

use super::{Attrs, GraphIndex};
use crate::error::{Error, Result};
use crate::tail::ops::TailOp;
use crate::tail::ops::binary::{Binary, BinaryKind};
use crate::tail::ops::linear::MatMul;
use crate::tail::ops::norm::{BatchNorm, LayerNorm, Softmax};
use crate::tail::ops::reduce::{GlobalAveragePool, Reduce, ReduceKind};
use crate::tail::ops::shape::{Concat, Gather, ReshapeKind, ReshapeLike, Shape, Slice, Transpose};
use crate::tail::ops::unary::{Cast, Clip, HardSigmoid, Unary, UnaryKind};

/// The op types the tail engine runs (linear layers and Constant included).
pub const SUPPORTED: &[&str] = &[
    "Gemm",
    "MatMul",
    "Conv",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Relu",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "Max",
    "Min",
    "BatchNormalization",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Gelu",
    "Sqrt",
    "Exp",
    "Neg",
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "Dropout",
    "Expand",
    "IsNaN",
    "Where",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Slice",
    "Gather",
    "Identity",
    "Cast",
    "Constant",
    "Shape",
];

fn unsupported(g: &GraphIndex<'_>, i: usize, reason: impl Into<String>) -> Error {
    Error::UnsupportedOp {
        op: g.nodes[i].op_type.clone(),
        node: g.node_name(i),
        reason: reason.into(),
    }
}

/// A constant scalar input of node `i` (for Clip bounds), or `default` if absent.
fn const_scalar(g: &GraphIndex<'_>, i: usize, input: usize, default: f32) -> Result<f32> {
    let Some(name) = g.nodes[i].input.get(input).filter(|s| !s.is_empty()) else {
        return Ok(default);
    };
    match g.constant(name)? {
        Some(t) if t.len() == 1 => match t {
            crate::Tensor::F32(a) => Ok(a.iter().copied().next().unwrap_or(default)),
            crate::Tensor::F16(a) => Ok(a.iter().next().map_or(default, |v| v.to_f32())),
            crate::Tensor::I64(a) => Ok(a.iter().copied().next().unwrap_or(0) as f32),
        },
        _ => Err(unsupported(g, i, format!("input `{name}` must be a constant scalar"))),
    }
}

/// A constant input of node `i` as f32 values (BatchNormalization's statistics).
fn const_values(g: &GraphIndex<'_>, i: usize, input: usize, what: &str) -> Result<Vec<f32>> {
    let name = g.nodes[i].input.get(input).filter(|s| !s.is_empty());
    let t = match name {
        Some(name) => g.constant(name)?,
        None => None,
    };
    match t {
        Some(t) => Ok(t.to_f32(what)?.iter().copied().collect()),
        None => Err(unsupported(
            g,
            i,
            format!("its {what} is not a constant (only the inference form is supported)"),
        )),
    }
}

/// The tail op for non-linear node `i` (linear layers are built by the split).
pub(crate) fn build_op(g: &GraphIndex<'_>, i: usize, opset: i64) -> Result<Box<dyn TailOp>> {
    let n = &g.nodes[i];
    let a = Attrs::of(n);
    if !n.domain.is_empty()
        && n.domain != "ai.onnx"
        && !(n.domain == "com.microsoft" && n.op_type == "Gelu")
    {
        return Err(unsupported(g, i, format!("domain `{}` is not supported", n.domain)));
    }
    let unary = |k| -> Result<Box<dyn TailOp>> { Ok(Box::new(Unary::new(k))) };
    let binary = |k| -> Result<Box<dyn TailOp>> { Ok(Box::new(Binary::new(k))) };
    match n.op_type.as_str() {
        "Add" => binary(BinaryKind::Add),
        "Sub" => binary(BinaryKind::Sub),
        "Mul" => binary(BinaryKind::Mul),
        "Div" => binary(BinaryKind::Div),
        "Pow" => binary(BinaryKind::Pow),
        "Relu" => unary(UnaryKind::Relu),
        "Sigmoid" => unary(UnaryKind::Sigmoid),
        "Tanh" => unary(UnaryKind::Tanh),
        "Erf" => unary(UnaryKind::Erf),
        "Sqrt" => unary(UnaryKind::Sqrt),
        "Exp" => unary(UnaryKind::Exp),
        "Neg" => unary(UnaryKind::Neg),
        "Identity" => unary(UnaryKind::Identity),
        // Inference form: the frozen model's own dropout is off while adapters train.
        "Dropout" => unary(UnaryKind::Identity),
        "Gelu" => match a.string("approximate").as_deref() {
            None | Some("none") => unary(UnaryKind::Gelu),
            Some("tanh") => unary(UnaryKind::GeluTanh),
            Some(other) => Err(unsupported(g, i, format!("approximate=`{other}`"))),
        },
        "Clip" => {
            let (lo, hi) = if opset < 11 {
                (
                    a.float("min").unwrap_or(f32::NEG_INFINITY),
                    a.float("max").unwrap_or(f32::INFINITY),
                )
            } else {
                (const_scalar(g, i, 1, f32::NEG_INFINITY)?, const_scalar(g, i, 2, f32::INFINITY)?)
            };
            Ok(Box::new(Clip::new(lo, hi)))
        }
        "HardSigmoid" => Ok(Box::new(HardSigmoid::new(
            a.float("alpha").unwrap_or(0.2),
            a.float("beta").unwrap_or(0.5),
        ))),
        "HardSwish" => Ok(Box::new(HardSigmoid::swish())),
        "Max" | "Min" => match n.input.iter().filter(|s| !s.is_empty()).count() {
            1 => unary(UnaryKind::Identity),
            2 => binary(if n.op_type == "Max" { BinaryKind::Max } else { BinaryKind::Min }),
            k => Err(unsupported(g, i, format!("{k} inputs (the tail takes one or two)"))),
        },
        "BatchNormalization" => {
            if a.int("training_mode").unwrap_or(0) != 0 {
                return Err(unsupported(g, i, "training_mode=1 (only the inference form)"));
            }
            if n.output
                .iter()
                .skip(1)
                .any(|o| !o.is_empty() && g.consumers.contains_key(o.as_str()))
            {
                return Err(unsupported(g, i, "its running mean / var outputs are used"));
            }
            Ok(Box::new(
                BatchNorm::new(
                    &const_values(g, i, 1, "scale")?,
                    &const_values(g, i, 2, "bias")?,
                    &const_values(g, i, 3, "mean")?,
                    &const_values(g, i, 4, "var")?,
                    a.float("epsilon").unwrap_or(1e-5),
                )
                .map_err(|e| unsupported(g, i, e.to_string()))?,
            ))
        }
        "Cast" => {
            let to = a.int("to").unwrap_or(1);
            match to {
                1 | 10 | 11 => Ok(Box::new(Cast::new(true))),
                2..=7 | 9 | 12 | 13 => Ok(Box::new(Cast::new(false))),
                _ => Err(unsupported(g, i, format!("cast to data type {to}"))),
            }
        }
        "LayerNormalization" => {
            if n.output
                .iter()
                .skip(1)
                .any(|o| !o.is_empty() && g.consumers.contains_key(o.as_str()))
            {
                return Err(unsupported(g, i, "its mean / inverse-std outputs are used"));
            }
            Ok(Box::new(LayerNorm::new(
                a.int("axis").unwrap_or(-1),
                a.float("epsilon").unwrap_or(1e-5),
            )))
        }
        "Softmax" => {
            let legacy = opset < 13;
            Ok(Box::new(Softmax::new(a.int("axis").unwrap_or(if legacy { 1 } else { -1 }), legacy)))
        }
        "ReduceMean" | "ReduceSum" | "ReduceL2" => {
            let kind = match n.op_type.as_str() {
                "ReduceMean" => ReduceKind::Mean,
                "ReduceSum" => ReduceKind::Sum,
                _ => ReduceKind::L2,
            };
            let axes_from_input = (kind == ReduceKind::Sum && opset >= 13) || opset >= 18;
            let axes = if axes_from_input {
                a.ints("axes")
            } else {
                Some(a.ints("axes").unwrap_or_default())
            };
            let keep = a.int("keepdims").unwrap_or(1) != 0;
            let noop = a.int("noop_with_empty_axes").unwrap_or(0) != 0;
            Ok(Box::new(Reduce::new(kind, axes, keep, noop)))
        }
        "GlobalAveragePool" => Ok(Box::new(GlobalAveragePool)),
        "Expand" => Ok(Box::new(crate::tail::ops::select::Expand)),
        "IsNaN" => Ok(Box::new(crate::tail::ops::select::IsNan)),
        "Where" => Ok(Box::new(crate::tail::ops::select::Where)),
        "Flatten" => {
            Ok(Box::new(ReshapeLike::new(ReshapeKind::Flatten(a.int("axis").unwrap_or(1)))))
        }
        "Reshape" => {
            if opset < 5 {
                return Err(unsupported(g, i, "Reshape-1 (shape as attribute)"));
            }
            Ok(Box::new(ReshapeLike::new(ReshapeKind::Reshape {
                allowzero: a.int("allowzero").unwrap_or(0) != 0,
            })))
        }
        "Squeeze" => Ok(Box::new(ReshapeLike::new(ReshapeKind::Squeeze(if opset < 13 {
            a.ints("axes")
        } else {
            None
        })))),
        "Unsqueeze" => {
            let axes = if opset < 13 {
                Some(a.ints("axes").ok_or_else(|| unsupported(g, i, "Unsqueeze without axes"))?)
            } else {
                None
            };
            Ok(Box::new(ReshapeLike::new(ReshapeKind::Unsqueeze(axes))))
        }
        "Transpose" => {
            let perm = a.ints("perm").map(|p| p.into_iter().map(|v| v.max(0) as usize).collect());
            Ok(Box::new(Transpose::new(perm)))
        }
        "Concat" => Ok(Box::new(Concat::new(
            a.int("axis").ok_or_else(|| unsupported(g, i, "Concat without axis"))?,
        ))),
        "Slice" => {
            let attrs = if opset < 10 {
                let s =
                    a.ints("starts").ok_or_else(|| unsupported(g, i, "Slice without starts"))?;
                let e = a.ints("ends").ok_or_else(|| unsupported(g, i, "Slice without ends"))?;
                Some((s, e, a.ints("axes")))
            } else {
                None
            };
            Ok(Box::new(Slice::new(attrs)))
        }
        "Gather" => Ok(Box::new(Gather::new(a.int("axis").unwrap_or(0)))),
        "Shape" => Ok(Box::new(Shape::new(a.int("start").unwrap_or(0), a.int("end")))),
        "MatMul" => Ok(Box::new(MatMul)),
        "Gemm" => Err(unsupported(
            g,
            i,
            "Gemm with a non-constant B or transA=1 (only linear-layer Gemms are supported)",
        )),
        "Conv" => Err(unsupported(
            g,
            i,
            "only 1×1 Conv with group=1, unit strides and no padding runs in the tail; cut the tail after this conv",
        )),
        other => Err(unsupported(
            g,
            i,
            format!(
                "`{other}` is not implemented by the tail engine (supported: {})",
                SUPPORTED.join(", ")
            ),
        )),
    }
}
