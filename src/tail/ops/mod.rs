//! The tail's operators: one file per family, each op with its forward and
//! its backward. Every op has one output; inputs are f32 activations or
//! constants, or i64 shape/axes tensors (f16 activations only where an op
//! says it takes them, see [`TailOp::accepts_f16`]). Backward receives the output's
//! gradient and returns one gradient per input that `need` asks for (only
//! f32 inputs on a differentiable path are ever asked for).

pub mod binary;
pub mod head;
pub mod linear;
pub mod norm;
pub mod reduce;
pub mod select;
pub mod shape;
pub mod unary;

use alloc::string::String;
use alloc::vec::Vec;

use ndarray::ArrayD;

use crate::Tensor;
use crate::error::{Error, Result};

/// How an op runs on values resident on the GPU (`device::resident`), for
/// the ops that can.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GpuKind {
    /// `x` as it is.
    Identity,
    /// Exact GELU.
    Gelu,
    /// Another element-wise function (Relu, Sigmoid, Tanh, Erf, tanh-GELU,
    /// Sqrt, Exp, Neg).
    Unary(unary::UnaryKind),
    /// Broadcasting Add, Sub, Mul, Div, Pow, Max or Min.
    Binary(binary::BinaryKind),
    /// LayerNormalization.
    LayerNorm {
        /// The first normalised axis.
        axis: i64,
        /// Added to the variance.
        eps: f32,
    },
    /// Softmax (along the last axis only, on the GPU).
    Softmax {
        /// Its axis.
        axis: i64,
    },
    /// A reshape ([`TailOp::gpu_target`]): the same values, another shape.
    Reshape,
    /// A transpose ([`TailOp::gpu_perm`]).
    Transpose,
    /// A linear layer (rows layout: see [`linear::Linear::resident`]).
    Linear,
    /// Attention's batched product of two activations.
    MatMul,
    /// A sum or mean over adjacent axes ([`TailOp::gpu_reduce`]): pooling.
    Reduce,
}

/// A reduction as the GPU runs it: the input seen as `[outer, len, inner]`
/// (the reduced axes are the middle ones), summed over `len` and scaled
/// (1 for a sum, `1/len` for a mean), giving `out_shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReducePlan {
    /// Product of the axes before the reduced ones.
    pub outer: usize,
    /// Product of the reduced axes.
    pub len: usize,
    /// Product of the axes after them.
    pub inner: usize,
    /// The sums' factor.
    pub scale: f32,
    /// The output's shape.
    pub out_shape: Vec<usize>,
}

/// One tail operator.
pub trait TailOp: core::fmt::Debug + Send {
    /// The ONNX op type it implements.
    fn op_type(&self) -> &'static str;

    /// Computes the output; may keep what backward needs (dropout masks,
    /// adapter activations).
    fn forward(&mut self, inputs: &[&Tensor], train: bool) -> Result<Tensor>;

    /// Given `dy` (the gradient of the output), the gradient of each input
    /// `i` with `need[i]`, else `None`.
    fn backward(
        &mut self,
        inputs: &[&Tensor],
        output: &Tensor,
        dy: &ArrayD<f32>,
        need: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>>;

    /// Whether input `input` may be an f16 tensor (cached activations) as it
    /// is; every other input receives f16 values widened to f32.
    fn accepts_f16(&self, _input: usize) -> bool {
        false
    }

    /// How the op runs on the GPU's resident values, if it can.
    fn gpu_kind(&self) -> Option<GpuKind> {
        None
    }

    /// A reshape's output shape for an input of shape `x` (`rest`: its
    /// other inputs, on the host).
    fn gpu_target(&self, _x: &[usize], _rest: &[&Tensor]) -> Result<Vec<usize>> {
        Err(fail("not a reshape"))
    }

    /// A transpose's permutation for an input of rank `rank`.
    fn gpu_perm(&self, _rank: usize) -> Result<Vec<usize>> {
        Err(fail("not a transpose"))
    }

    /// A reduction's plan for an input of shape `x` (`rest`: its other
    /// inputs, on the host); an error where the GPU has no form for it
    /// (axes that are not adjacent, none at all).
    fn gpu_reduce(&self, _x: &[usize], _rest: &[&Tensor]) -> Result<ReducePlan> {
        Err(fail("not a reduction"))
    }

    /// Drops whatever forward kept for backward (inference needs none of it).
    fn release(&mut self) {}

    /// Whether backward reads the op's output value (default: yes); when it
    /// does not, the tape frees the output as soon as forward is done with it.
    fn backward_reads_output(&self) -> bool {
        true
    }

    /// Which inputs a gradient can flow through (default: all).
    fn differentiable(&self, _input: usize) -> bool {
        true
    }

    /// Whether the op has parameters of its own that train (the new head).
    fn trainable(&self) -> bool {
        false
    }

    /// The op as the new head, if it is one.
    fn as_head(&self) -> Option<&head::LinearHead> {
        None
    }

    /// Mutable [`TailOp::as_head`].
    fn as_head_mut(&mut self) -> Option<&mut head::LinearHead> {
        None
    }

    /// The op as a linear layer, if it is one (to reach its adapter).
    fn as_linear(&self) -> Option<&linear::Linear> {
        None
    }

    /// Mutable [`TailOp::as_linear`].
    fn as_linear_mut(&mut self) -> Option<&mut linear::Linear> {
        None
    }
}

/// A tail run-time error; the graph fills in the node name.
pub(crate) fn fail(msg: impl Into<String>) -> Error {
    Error::Tail { node: String::new(), msg: msg.into() }
}

/// The `i`-th input, or an error if it is missing.
pub(crate) fn input<'a>(inputs: &[&'a Tensor], i: usize) -> Result<&'a Tensor> {
    inputs.get(i).copied().ok_or_else(|| fail(alloc::format!("missing input {i}")))
}
