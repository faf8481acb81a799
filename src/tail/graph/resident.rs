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
use crate::tail::ops::binary::BinaryKind;
use crate::tail::ops::unary::UnaryKind;

/// A value on the GPU and its shape.
#[derive(Clone, Debug)]
pub(super) struct DevVal {
    pub v: GpuValue,
    pub shape: Vec<usize>,
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
        let Some(&x) = ins.first() else { return false };
        let Some(sx) = self.shape_now(x) else { return false };
        let float = |vs: &[ValueId]| vs.iter().all(|&v| self.is_float(v));
        let resident = |v: ValueId| !self.is_constant(v) && self.on_dev(v);
        let rank_ok = |s: &[usize]| (1..=dev::MAX_RANK).contains(&s.len()) && count(s) > 0;
        match kind {
            GpuKind::Identity | GpuKind::Gelu => ins.len() == 1 && float(ins) && resident(x),
            GpuKind::Unary(k) => {
                ins.len() == 1
                    && float(ins)
                    && resident(x)
                    && count(&sx) > 0
                    && unary_code(k).is_some()
            }
            GpuKind::Binary(_) => {
                let Some(sb) = ins.get(1).and_then(|&b| self.shape_now(b)) else { return false };
                let Ok(out) = broadcast_shape(&sx, &sb, "") else { return false };
                ins.len() == 2 && float(ins) && rank_ok(&out) && ins.iter().any(|&v| resident(v))
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
                    && float(ins)
                    && last
                    && width > 0
                    && params
                    && resident(x)
            }
            GpuKind::Softmax { axis } => {
                let last = norm_axis(axis, sx.len(), "").is_ok_and(|a| a + 1 == sx.len());
                ins.len() == 1 && float(ins) && last && count(&sx) > 0 && resident(x)
            }
            GpuKind::Reshape => {
                // The shape (and axes) inputs are host values.
                let rest: Option<Vec<&Tensor>> =
                    ins[1..].iter().map(|&v| self.host_value(v)).collect();
                float(&ins[..1])
                    && resident(x)
                    && rest.is_some_and(|r| self.ops[i].gpu_target(&sx, &r).is_ok())
            }
            GpuKind::Transpose => {
                ins.len() == 1
                    && float(ins)
                    && rank_ok(&sx)
                    && resident(x)
                    && self.ops[i].gpu_perm(sx.len()).is_ok()
            }
            GpuKind::MatMul => {
                let Some(sb) = ins.get(1).and_then(|&b| self.shape_now(b)) else { return false };
                let (ra, rb) = (sx.len(), sb.len());
                // Equal batch axes (attention's), no broadcast.
                ins.len() == 2
                    && float(ins)
                    && ra >= 2
                    && ra == rb
                    && sx[..ra - 2] == sb[..rb - 2]
                    && sx[ra - 1] == sb[rb - 2]
                    && count(&sx) > 0
                    && count(&sb) > 0
                    && ins.iter().any(|&v| resident(v))
            }
            GpuKind::Reduce => {
                let rest: Option<Vec<&Tensor>> =
                    ins[1..].iter().map(|&v| self.host_value(v)).collect();
                float(&ins[..1])
                    && resident(x)
                    && count(&sx) > 0
                    && rest.is_some_and(|r| {
                        self.ops[i].gpu_reduce(&sx, &r).is_ok_and(|p| p.outer * p.inner > 0)
                    })
            }
            GpuKind::Linear => {
                let Some(l) = self.ops[i].as_linear() else { return false };
                let (din, dout) = l.dims();
                let rows = count(&sx) / din.max(1);
                ins.len() == 1
                    && float(ins)
                    && !self.is_constant(x)
                    && sx.last() == Some(&din)
                    && rows > 0
                    && (self.on_dev(x) || dev::worth(&[rows, din, dout]))
            }
        }
    }

    /// Reduction node `i`'s plan for an input of `shape` (its other
    /// inputs read on the host).
    fn reduce_plan(&self, i: usize, shape: &[usize]) -> Result<crate::tail::ops::ReducePlan, Fail> {
        let rest: Vec<&Tensor> = self.nodes[i].inputs[1..]
            .iter()
            .map(|&v| self.host_value(v).ok_or(Fail::Missing(v)))
            .collect::<Result<_, _>>()?;
        self.ops[i].gpu_reduce(shape, &rest).map_err(Fail::Error)
    }

    /// Value `v` on the host as it is (a constant, or on the tape).
    fn host_value(&self, v: ValueId) -> Option<&Tensor> {
        match &self.sources[v] {
            Source::Constant(t) => Some(t),
            _ => self.tape[v].as_ref(),
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
        let gpu = |r: Result<GpuValue, dev::Failed>| r.map_err(|_| Fail::Gpu);
        Ok(Some(match kind {
            GpuKind::Identity => x,
            GpuKind::Gelu => DevVal { v: gpu(dev::gelu(&x.v, None))?, shape: x.shape },
            GpuKind::Unary(k) => {
                let code = unary_code(k).ok_or_else(|| self.no_gpu_form(i))?;
                DevVal { v: gpu(dev::unary(&x.v, code, None))?, shape: x.shape }
            }
            GpuKind::Binary(op) => {
                let b = self.up(ins[1])?;
                let out = broadcast_shape(&x.shape, &b.shape, "").map_err(Fail::Error)?;
                let (sa, sb) = (bstrides(&x.shape, &out), bstrides(&b.shape, &out));
                let v = gpu(dev::binary(&x.v, &b.v, op_code(op), &out, &sa, &sb))?;
                DevVal { v, shape: out }
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
                let v = gpu(dev::layer_norm(&x.v, &scale.v, &bias.v, width, eps, None))?;
                DevVal { v, shape: x.shape }
            }
            GpuKind::Softmax { .. } => {
                let width = x.shape.last().copied().unwrap_or(0);
                DevVal { v: gpu(dev::softmax(&x.v, width, None))?, shape: x.shape }
            }
            GpuKind::Reshape => {
                let rest: Vec<&Tensor> = ins[1..]
                    .iter()
                    .map(|&v| self.host_value(v).ok_or(Fail::Missing(v)))
                    .collect::<Result<_, _>>()?;
                let shape = self.ops[i].gpu_target(&x.shape, &rest).map_err(Fail::Error)?;
                DevVal { v: x.v, shape }
            }
            GpuKind::Reduce => {
                let p = self.reduce_plan(i, &x.shape)?;
                let v = gpu(dev::reduce(&x.v, (p.outer, p.len, p.inner), p.scale, false))?;
                DevVal { v, shape: p.out_shape }
            }
            GpuKind::Transpose => {
                let p = self.ops[i].gpu_perm(x.shape.len()).map_err(Fail::Error)?;
                let shape = p.iter().map(|&a| x.shape[a]).collect();
                DevVal { v: gpu(dev::permute(&x.v, &x.shape, &p))?, shape }
            }
            GpuKind::MatMul => {
                let b = self.up(ins[1])?;
                let r = x.shape.len();
                let (m, k, n) = (x.shape[r - 2], x.shape[r - 1], b.shape[r - 1]);
                let batch = count(&x.shape[..r - 2]);
                let v = gpu(dev::batched_matmul(&x.v, false, &b.v, false, batch, (m, n, k)))?;
                let mut shape = x.shape[..r - 2].to_vec();
                shape.extend([m, n]);
                DevVal { v, shape }
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
    /// asks for: it ran there forward, and a binary op's gradient goes to
    /// inputs it can sum back to their shape there (the broadcast axes one
    /// block: [`unbroadcast_plan`]), not to Max's or Min's inputs nor to
    /// Pow's exponent (those run on the CPU).
    pub(super) fn gpu_backward_takes(&self, i: usize, need: &[bool]) -> bool {
        if !self.ran_on_gpu.get(i).copied().unwrap_or(false) {
            return false;
        }
        let Some(kind) = self.ops[i].gpu_kind() else { return false };
        match kind {
            GpuKind::Binary(op) => {
                let out = self.nodes[i].output;
                let Some(so) = self.shape_now(out) else { return false };
                let ins = &self.nodes[i].inputs;
                let wanted = |j: usize| need.get(j).copied().unwrap_or(false);
                let op_ok = match op {
                    BinaryKind::Max | BinaryKind::Min => !wanted(0) && !wanted(1),
                    BinaryKind::Pow => !wanted(1),
                    _ => true,
                };
                op_ok
                    && ins.iter().zip(need).all(|(&v, &n)| {
                        !n || self.shape_now(v).is_some_and(|s| unbroadcast_plan(&s, &so).is_some())
                    })
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
        let want = need.first().copied().unwrap_or(false);
        let pass = |g: &NodeGrad| match g {
            NodeGrad::Host(a) => NodeGrad::Host(a.clone()),
            NodeGrad::Dev(d) => NodeGrad::Dev(d.clone()),
        };
        // Gradients that pass through go on where they are (a host one is
        // not sent up for nothing).
        // Add's and Sub's gradients pass through to full-shape inputs (not
        // to Sub's second, which is negated).
        let out_shape = self.shape_now(self.nodes[i].output);
        let full = |j: usize| {
            ins.get(j).is_some_and(|&v| out_shape.is_some() && self.shape_now(v) == out_shape)
        };
        let wanted = |j: usize| need.get(j).copied().unwrap_or(false);
        let passes = match kind {
            GpuKind::Identity => true,
            GpuKind::Binary(BinaryKind::Add) => (0..2).all(|j| !wanted(j) || full(j)),
            GpuKind::Binary(BinaryKind::Sub) => (!wanted(0) || full(0)) && !wanted(1),
            _ => false,
        };
        match kind {
            _ if passes => {
                let mut out: Vec<Option<NodeGrad>> =
                    need.iter().take(1).map(|&n| n.then(|| pass(&g))).collect();
                if matches!(kind, GpuKind::Binary(BinaryKind::Add)) {
                    out.extend(need.iter().skip(1).map(|&n| n.then(|| pass(&g))));
                }
                out.resize_with(ins.len(), || None);
                return Ok(out);
            }
            GpuKind::Reshape => {
                let shape = self.shape_now(ins[0]).ok_or(Fail::Missing(ins[0]))?;
                let mut out: Vec<Option<NodeGrad>> = (0..ins.len()).map(|_| None).collect();
                if want {
                    out[0] = Some(match g {
                        NodeGrad::Dev(d) => NodeGrad::Dev(DevVal { v: d.v, shape }),
                        NodeGrad::Host(a) => NodeGrad::Host(
                            a.as_standard_layout()
                                .into_owned()
                                .into_shape_with_order(IxDyn(&shape))
                                .map_err(|e| {
                                    Fail::Error(crate::Error::Tail {
                                        node: self.nodes[i].name.clone(),
                                        msg: alloc::format!("gradient reshape: {e}"),
                                    })
                                })?,
                        ),
                    });
                }
                return Ok(out);
            }
            _ => {}
        }
        let dy = match g {
            NodeGrad::Dev(d) => d,
            NodeGrad::Host(a) => DevVal { v: send(&a)?, shape: a.shape().to_vec() },
        };
        let gpu = |r: Result<GpuValue, dev::Failed>| r.map_err(|_| Fail::Gpu);
        let mut out: Vec<Option<DevVal>> = vec![None; ins.len()];
        match kind {
            GpuKind::Binary(op) => {
                // The gradient over the output's shape, then summed over the
                // axes input j is broadcast along.
                let sd = bstrides(&dy.shape, &dy.shape);
                for j in 0..ins.len().min(2) {
                    if !need[j] {
                        continue;
                    }
                    // `dy op' v` with v read broadcast over the output.
                    let with = |v: &DevVal, code: i32| {
                        let sv = bstrides(&v.shape, &dy.shape);
                        gpu(dev::binary(&dy.v, &v.v, code, &dy.shape, &sd, &sv))
                    };
                    let full = match (op, j) {
                        (BinaryKind::Add, _) | (BinaryKind::Sub, 0) => dy.v.clone(),
                        (BinaryKind::Sub, _) => gpu(dev::unary(&dy.v, 7, None))?,
                        // d(a·b) = dy·b, dy·a; d(a/b)/da = dy/b.
                        (BinaryKind::Mul, _) => with(&self.up(ins[1 - j])?, 2)?,
                        (BinaryKind::Div, 0) => with(&self.up(ins[1])?, 3)?,
                        (BinaryKind::Div, _) => {
                            // d(a/b)/db = −(a/b)/b = −y/b.
                            let (y, b) = (self.up(self.nodes[i].output)?, self.up(ins[1])?);
                            let q = DevVal { v: with(&y, 2)?, shape: dy.shape.clone() };
                            let sb = bstrides(&b.shape, &dy.shape);
                            let t = gpu(dev::binary(&q.v, &b.v, 3, &dy.shape, &sd, &sb))?;
                            gpu(dev::unary(&t, 7, None))?
                        }
                        (BinaryKind::Pow, 0) => {
                            // d(a^p)/da = dy·p·a^(p−1).
                            let (a, p) = (self.up(ins[0])?, self.up(ins[1])?);
                            let (sa, sp) =
                                (bstrides(&a.shape, &dy.shape), bstrides(&p.shape, &dy.shape));
                            let f = gpu(dev::binary(&a.v, &p.v, 7, &dy.shape, &sa, &sp))?;
                            gpu(dev::binary(&dy.v, &f, 2, &dy.shape, &sd, &sd))?
                        }
                        _ => return Err(self.no_gpu_form(i)),
                    };
                    let shape = self.shape_now(ins[j]).ok_or(Fail::Missing(ins[j]))?;
                    let v = match unbroadcast_plan(&shape, &dy.shape) {
                        Some(None) => full,
                        Some(Some((outer, len, inner))) => {
                            gpu(dev::reduce(&full, (outer, len, inner), 1.0, false))?
                        }
                        None => return Err(self.no_gpu_form(i)),
                    };
                    out[j] = Some(DevVal { v, shape });
                }
            }
            GpuKind::Unary(k) if want => {
                let code = unary_code(k).ok_or_else(|| self.no_gpu_form(i))?;
                let x = self.up(ins[0])?;
                let v = gpu(dev::unary(&x.v, code, Some(&dy.v)))?;
                out[0] = Some(DevVal { v, shape: x.shape });
            }
            GpuKind::Gelu if want => {
                let x = self.up(ins[0])?;
                let v = gpu(dev::gelu(&x.v, Some(&dy.v)))?;
                out[0] = Some(DevVal { v, shape: x.shape });
            }
            GpuKind::LayerNorm { eps, .. } if want => {
                let x = self.up(ins[0])?;
                let scale = self.up(ins[1])?;
                let width = x.shape.last().copied().unwrap_or(0);
                // The backward reads no bias: the scale stands in for it.
                let v = gpu(dev::layer_norm(&x.v, &scale.v, &scale.v, width, eps, Some(&dy.v)))?;
                out[0] = Some(DevVal { v, shape: x.shape });
            }
            GpuKind::Softmax { .. } if want => {
                let y = self.up(self.nodes[i].output)?;
                let width = y.shape.last().copied().unwrap_or(0);
                let v = gpu(dev::softmax(&y.v, width, Some(&dy.v)))?;
                out[0] = Some(DevVal { v, shape: y.shape });
            }
            GpuKind::Reduce if want => {
                let shape = self.shape_now(ins[0]).ok_or(Fail::Missing(ins[0]))?;
                let p = self.reduce_plan(i, &shape)?;
                let v = gpu(dev::reduce(&dy.v, (p.outer, p.len, p.inner), p.scale, true))?;
                out[0] = Some(DevVal { v, shape });
            }
            GpuKind::Transpose if want => {
                let p = self.ops[i].gpu_perm(dy.shape.len()).map_err(Fail::Error)?;
                let mut inv = vec![0; p.len()];
                for (j, &a) in p.iter().enumerate() {
                    inv[a] = j;
                }
                let shape = inv.iter().map(|&a| dy.shape[a]).collect();
                out[0] = Some(DevVal { v: gpu(dev::permute(&dy.v, &dy.shape, &inv))?, shape });
            }
            GpuKind::MatMul => {
                // (Each operand goes up only for the gradient that reads it.)
                let (sa, sb) = (
                    self.shape_now(ins[0]).ok_or(Fail::Missing(ins[0]))?,
                    self.shape_now(ins[1]).ok_or(Fail::Missing(ins[1]))?,
                );
                let r = sa.len();
                let (m, k, n) = (sa[r - 2], sa[r - 1], sb[r - 1]);
                let batch = count(&sa[..r - 2]);
                if want {
                    // dA = dY·Bᵀ
                    let b = self.up(ins[1])?;
                    let v = gpu(dev::batched_matmul(&dy.v, false, &b.v, true, batch, (m, k, n)))?;
                    out[0] = Some(DevVal { v, shape: sa.clone() });
                }
                if need.get(1).copied().unwrap_or(false) {
                    // dB = Aᵀ·dY
                    let a = self.up(ins[0])?;
                    let v = gpu(dev::batched_matmul(&a.v, true, &dy.v, false, batch, (k, n, m)))?;
                    out[1] = Some(DevVal { v, shape: sb });
                }
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

/// Row-major strides of a value of `shape` read over the broadcast output
/// `out` (shapes right-aligned; 0 along an axis it is broadcast over).
fn bstrides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let off = out.len() - shape.len().min(out.len());
    let mut st = vec![0; out.len()];
    let mut acc = 1;
    for (i, &d) in shape.iter().enumerate().rev() {
        if let Some(o) = st.get_mut(off + i) {
            *o = if d == 1 { 0 } else { acc };
        }
        acc *= d;
    }
    st
}

/// The element-wise kernel's code for `op`.
fn op_code(op: BinaryKind) -> i32 {
    match op {
        BinaryKind::Add => 0,
        BinaryKind::Sub => 1,
        BinaryKind::Mul => 2,
        BinaryKind::Div => 3,
        BinaryKind::Pow => 4,
        BinaryKind::Max => 5,
        BinaryKind::Min => 6,
    }
}

/// The GPU kernel's number of a unary function (`device::resident::unary`);
/// `None` for those with kinds of their own (Gelu, Identity).
fn unary_code(k: UnaryKind) -> Option<i32> {
    match k {
        UnaryKind::Relu => Some(0),
        UnaryKind::Sigmoid => Some(1),
        UnaryKind::Tanh => Some(2),
        UnaryKind::Erf => Some(3),
        UnaryKind::GeluTanh => Some(4),
        UnaryKind::Sqrt => Some(5),
        UnaryKind::Exp => Some(6),
        UnaryKind::Neg => Some(7),
        UnaryKind::Gelu | UnaryKind::Identity => None,
    }
}

/// How a gradient over the output shape `out` sums back to an input of
/// `shape` broadcast over it: `Some(None)` for the same shape (nothing to
/// sum), `Some(Some((outer, len, inner)))` when the axes it is broadcast
/// along are one block of adjacent axes (summed as `[outer, len, inner]`
/// over `len`), `None` otherwise (the CPU sums it).
fn unbroadcast_plan(shape: &[usize], out: &[usize]) -> Option<Option<(usize, usize, usize)>> {
    if shape.len() > out.len() {
        return None;
    }
    let off = out.len() - shape.len();
    let dim = |k: usize| if k < off { 1 } else { shape[k - off] };
    let mut block: Option<(usize, usize)> = None;
    for (k, &o) in out.iter().enumerate() {
        let d = dim(k);
        if d == o {
            continue;
        }
        if d != 1 {
            return None;
        }
        block = match block {
            None => Some((k, k)),
            // Axes of size 1 in both between two broadcast axes keep one block.
            Some((a, b)) if (b + 1..k).all(|m| out[m] == 1) => Some((a, k)),
            Some(_) => return None,
        };
    }
    Some(block.map(|(a, b)| {
        (out[..a].iter().product(), out[a..=b].iter().product(), out[b + 1..].iter().product())
    }))
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
