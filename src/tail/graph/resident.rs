//! The tail's nodes on values resident on the GPU (`device::resident`):
//! which nodes run there, moving values across, and the ops' forward and
//! backward on resident values.

use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, IxDyn};

use super::{Fail, NodeGrad, Source, TailGraph, ValueId};
use crate::Tensor;
use crate::device::resident::{self as dev, GpuValue};
use crate::tail::broadcast::{broadcast_shape, norm_axis};
use crate::tail::ops::GpuKind;

/// A value on the GPU and its shape.
#[derive(Clone, Debug)]
pub(super) struct DevVal {
    pub v: GpuValue,
    pub shape: Vec<usize>,
}

/// Whether `small` repeats over `big` as a trailing block (leading 1s, then
/// `big`'s trailing dims), as the Add kernel reads its second operand.
fn trailing_block(big: &[usize], small: &[usize]) -> bool {
    let s: Vec<usize> = small.iter().copied().skip_while(|&d| d == 1).collect();
    s.len() <= big.len() && big[big.len() - s.len()..] == s[..]
}

fn count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl TailGraph {
    fn no_gpu_form(&self, i: usize) -> Fail {
        Fail::Error(crate::Error::Tail {
            node: self.nodes[i].name.clone(),
            msg: alloc::string::String::from("the op has no form on the GPU"),
        })
    }

    fn is_constant(&self, v: ValueId) -> bool {
        matches!(self.sources[v], Source::Constant(_))
    }

    /// The shape of value `v` as it is now (host, GPU or constant).
    fn shape_now(&self, v: ValueId) -> Option<Vec<usize>> {
        match &self.sources[v] {
            Source::Constant(t) => Some(t.shape().to_vec()),
            _ => match (&self.tape[v], self.dev.get(v).and_then(Option::as_ref)) {
                (Some(t), _) => Some(t.shape().to_vec()),
                (None, Some(d)) => Some(d.shape.clone()),
                (None, None) => None,
            },
        }
    }

    fn on_dev(&self, v: ValueId) -> bool {
        self.dev.get(v).is_some_and(Option::is_some)
    }

    /// A float value (activations f32 or f16, or an f32 constant).
    fn is_float(&self, v: ValueId) -> bool {
        match &self.sources[v] {
            Source::Constant(t) => matches!(t, Tensor::F32(_)),
            _ => self.on_dev(v) || matches!(self.tape[v], Some(Tensor::F32(_) | Tensor::F16(_))),
        }
    }

    /// Whether node `i` runs on the GPU in this forward: an op that can,
    /// on inputs it takes there, and either an input already there or a
    /// linear layer worth the GPU on its own (a value is not sent up for
    /// one element-wise op).
    pub(super) fn gpu_forward_takes(&self, i: usize) -> bool {
        let Some(kind) = self.ops[i].gpu_kind() else { return false };
        let ins = &self.nodes[i].inputs;
        if ins.is_empty() || !ins.iter().all(|&v| self.is_float(v)) {
            return false;
        }
        let x = ins[0];
        let Some(sx) = self.shape_now(x) else { return false };
        match kind {
            GpuKind::Identity | GpuKind::Gelu => {
                ins.len() == 1 && !self.is_constant(x) && self.on_dev(x)
            }
            GpuKind::Add => {
                if ins.len() != 2 {
                    return false;
                }
                let Some(sb) = self.shape_now(ins[1]) else { return false };
                let Ok(out) = broadcast_shape(&sx, &sb, "") else { return false };
                let fits = (sx == out && trailing_block(&out, &sb))
                    || (sb == out && trailing_block(&out, &sx));
                let resident = ins.iter().any(|&v| !self.is_constant(v) && self.on_dev(v));
                fits && count(&out) > 0 && resident
            }
            GpuKind::LayerNorm { axis, .. } => {
                let width = sx.last().copied().unwrap_or(0);
                let last = norm_axis(axis, sx.len(), "").is_ok_and(|a| a + 1 == sx.len());
                // Scale and bias of the lane's shape (as the CPU broadcasts them).
                let params = ins[1..].iter().all(|&p| {
                    self.is_constant(p)
                        && self.shape_now(p).is_some_and(|s| {
                            let s: Vec<usize> = s.into_iter().skip_while(|&d| d == 1).collect();
                            s == [width]
                        })
                });
                (2..=3).contains(&ins.len())
                    && last
                    && width > 0
                    && params
                    && !self.is_constant(x)
                    && self.on_dev(x)
            }
            GpuKind::Linear => {
                let Some(l) = self.ops[i].as_linear() else { return false };
                let (din, dout) = l.dims();
                let rows = count(&sx) / din.max(1);
                ins.len() == 1
                    && !self.is_constant(x)
                    && sx.last() == Some(&din)
                    && rows > 0
                    && (self.on_dev(x) || dev::worth(&[rows, din, dout]))
            }
        }
    }

    /// Value `v` on the GPU: sent up from the host (once: the copy stays
    /// for every other reader), or a constant's cached copy.
    fn up(&mut self, v: ValueId) -> Result<DevVal, Fail> {
        if let Source::Constant(t) = &self.sources[v] {
            if let Some(Some(d)) = self.dev_consts.get(v) {
                return Ok(d.clone());
            }
            let a = t.f32("constant").map_err(Fail::Error)?;
            let d = DevVal { v: send(a)?, shape: a.shape().to_vec() };
            self.dev_consts[v] = Some(d.clone());
            return Ok(d);
        }
        if let Some(Some(d)) = self.dev.get(v) {
            return Ok(d.clone());
        }
        let t = self.tape[v].as_ref().ok_or(Fail::Missing(v))?;
        let a = t.to_f32("").map_err(Fail::Error)?;
        let d = DevVal { v: send(&a)?, shape: a.shape().to_vec() };
        self.dev[v] = Some(d.clone());
        Ok(d)
    }

    /// Brings every input of node `i` that is only on the GPU to the host
    /// (once: the copy stays on the tape for every other reader).
    pub(super) fn inputs_to_host(&mut self, i: usize) -> Result<(), Fail> {
        for j in 0..self.nodes[i].inputs.len() {
            let v = self.nodes[i].inputs[j];
            if self.tape[v].is_none()
                && let Some(Some(d)) = self.dev.get(v)
            {
                self.tape[v] = Some(Tensor::F32(fetch(d)?));
            }
        }
        Ok(())
    }

    /// Node `i`'s forward on the GPU ([`TailGraph::gpu_forward_takes`]);
    /// `None`: the op declined (the CPU runs it).
    pub(super) fn gpu_forward(&mut self, i: usize, train: bool) -> Result<Option<DevVal>, Fail> {
        let kind = self.ops[i].gpu_kind().ok_or_else(|| self.no_gpu_form(i))?;
        let ins = self.nodes[i].inputs.clone();
        let x = self.up(ins[0])?;
        Ok(Some(match kind {
            GpuKind::Identity => x,
            GpuKind::Gelu => {
                DevVal { v: dev::gelu(&x.v, None).map_err(|_| Fail::Gpu)?, shape: x.shape }
            }
            GpuKind::Add => {
                let b = self.up(ins[1])?;
                let out = broadcast_shape(&x.shape, &b.shape, "").map_err(Fail::Error)?;
                let (big, small) = if x.shape == out { (x, b) } else { (b, x) };
                let v = dev::add(&big.v, &small.v).map_err(|_| Fail::Gpu)?;
                DevVal { v, shape: big.shape }
            }
            GpuKind::LayerNorm { eps, .. } => {
                let width = x.shape.last().copied().unwrap_or(0);
                let scale = self.up(ins[1])?;
                let bias = match ins.get(2) {
                    Some(&b) => self.up(b)?,
                    None => {
                        DevVal { v: send(&ArrayD::zeros(IxDyn(&[width])))?, shape: vec![width] }
                    }
                };
                let v = dev::layer_norm(&x.v, &scale.v, &bias.v, width, eps, None)
                    .map_err(|_| Fail::Gpu)?;
                DevVal { v, shape: x.shape }
            }
            GpuKind::Linear => {
                let no_form = self.no_gpu_form(i);
                let l = self.ops[i].as_linear_mut().ok_or(no_form)?;
                let (din, dout) = l.dims();
                let rows = count(&x.shape) / din.max(1);
                let Some(v) = l.forward_resident(&x.v, rows, train).map_err(|_| Fail::Gpu)? else {
                    return Ok(None);
                };
                let mut shape = x.shape;
                if let Some(last) = shape.last_mut() {
                    *last = dout;
                }
                DevVal { v, shape }
            }
        }))
    }

    /// Whether node `i`'s backward runs on the GPU for the inputs `need`
    /// asks for: it ran there forward, and an Add sends no gradient to a
    /// broadcast input (that one sums on the CPU).
    pub(super) fn gpu_backward_takes(&self, i: usize, need: &[bool]) -> bool {
        if !self.ran_on_gpu.get(i).copied().unwrap_or(false) {
            return false;
        }
        let Some(kind) = self.ops[i].gpu_kind() else { return false };
        match kind {
            GpuKind::Add => {
                let out = self.nodes[i].output;
                let Some(so) = self
                    .dev
                    .get(out)
                    .and_then(Option::as_ref)
                    .map(|d| d.shape.clone())
                    .or_else(|| self.tape[out].as_ref().map(|t| t.shape().to_vec()))
                else {
                    return false;
                };
                self.nodes[i]
                    .inputs
                    .iter()
                    .zip(need)
                    .all(|(&v, &n)| !n || self.shape_now(v).as_deref() == Some(&so[..]))
            }
            _ => true,
        }
    }

    /// Node `i`'s backward on the GPU for the output's gradient `g`: one
    /// gradient per input that `need` asks for.
    pub(super) fn gpu_backward(
        &mut self,
        i: usize,
        g: NodeGrad,
        need: &[bool],
    ) -> Result<Vec<Option<NodeGrad>>, Fail> {
        let kind = self.ops[i].gpu_kind().ok_or_else(|| self.no_gpu_form(i))?;
        let ins = self.nodes[i].inputs.clone();
        if matches!(kind, GpuKind::Identity | GpuKind::Add) {
            // The gradient passes through where it is (a host one is not
            // sent up for nothing).
            let pass = |g: &NodeGrad| match g {
                NodeGrad::Host(a) => NodeGrad::Host(a.clone()),
                NodeGrad::Dev(d) => NodeGrad::Dev(d.clone()),
            };
            let mut out: Vec<Option<NodeGrad>> =
                need.iter().map(|&n| n.then(|| pass(&g))).collect();
            out.resize_with(ins.len(), || None);
            return Ok(out);
        }
        let dy = match g {
            NodeGrad::Dev(d) => d,
            NodeGrad::Host(a) => DevVal { v: send(&a)?, shape: a.shape().to_vec() },
        };
        let mut out = vec![None; ins.len()];
        let want = need.first().copied().unwrap_or(false);
        match kind {
            GpuKind::Gelu if want => {
                let x = self.up(ins[0])?;
                let v = dev::gelu(&x.v, Some(&dy.v)).map_err(|_| Fail::Gpu)?;
                out[0] = Some(DevVal { v, shape: x.shape });
            }
            GpuKind::LayerNorm { eps, .. } if want => {
                let x = self.up(ins[0])?;
                let scale = self.up(ins[1])?;
                let width = x.shape.last().copied().unwrap_or(0);
                // The backward reads no bias: the scale stands in for it.
                let v = dev::layer_norm(&x.v, &scale.v, &scale.v, width, eps, Some(&dy.v))
                    .map_err(|_| Fail::Gpu)?;
                out[0] = Some(DevVal { v, shape: x.shape });
            }
            GpuKind::Linear => {
                // An adapted layer's gradients accumulate whether or not dX is wanted.
                let no_form = self.no_gpu_form(i);
                let l = self.ops[i].as_linear_mut().ok_or(no_form)?;
                let (din, dout) = l.dims();
                let rows = count(&dy.shape) / dout.max(1);
                let dx = l.backward_resident(&dy.v, rows, want).map_err(|_| Fail::Gpu)?;
                if let Some(v) = dx.filter(|_| want) {
                    let mut shape = dy.shape;
                    if let Some(last) = shape.last_mut() {
                        *last = din;
                    }
                    out[0] = Some(DevVal { v, shape });
                }
            }
            _ => {}
        }
        Ok(out.into_iter().map(|d| d.map(NodeGrad::Dev)).collect())
    }
}

/// `a` on the GPU.
pub(super) fn send(a: &ArrayD<f32>) -> Result<GpuValue, Fail> {
    let a = a.as_standard_layout();
    dev::upload(a.as_slice().unwrap_or_default()).map_err(|_| Fail::Gpu)
}

/// `d` on the host.
pub(super) fn fetch(d: &DevVal) -> Result<ArrayD<f32>, Fail> {
    let v = dev::download(&d.v).map_err(|_| Fail::Gpu)?;
    ArrayD::from_shape_vec(IxDyn(&d.shape), v).map_err(|_| Fail::Gpu)
}
