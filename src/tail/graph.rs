//! The tail as a tape: nodes in topological order, each value stored by
//! forward and read back by backward, gradients accumulated per value in
//! reverse order. Constants are part of the graph; boundary values (the
//! tensors the frozen backbone computes) are fed to each forward.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use ndarray::ArrayD;

use super::ops::TailOp;
use crate::Tensor;
use crate::error::{Error, Result};
use crate::hydra::HydraLinear;
use crate::tail::ops::head::LinearHead;
use crate::tail::ops::linear::Linear;

/// Index of a value in the graph.
pub type ValueId = usize;

/// `last_use` of a value no node reads.
const NEVER_READ: usize = usize::MAX - 1;

#[derive(Debug)]
enum Source {
    Boundary,
    Constant(Tensor),
    Node,
}

#[derive(Debug)]
struct Node {
    name: String,
    inputs: Vec<ValueId>,
    output: ValueId,
}

/// The trainable tail: a tape of ops with forward and backward.
#[derive(Debug)]
pub struct TailGraph {
    names: Vec<String>,
    sources: Vec<Source>,
    nodes: Vec<Node>,
    /// `ops[i]` runs `nodes[i]` (kept apart so an op can be borrowed mutably
    /// while the tape is read).
    ops: Vec<Box<dyn TailOp>>,
    boundary: Vec<ValueId>,
    output: ValueId,
    requires_grad: Vec<bool>,
    tape: Vec<Option<Tensor>>,
    /// f32 copies of f16 tape values, made once per forward for the ops that
    /// do not take f16 (see [`TailOp::accepts_f16`]).
    widened: Vec<Option<Tensor>>,
    /// Index of the last node that reads each value in forward.
    last_use: Vec<usize>,
    /// Index of the new head's node (always the last), if there is one.
    head: Option<usize>,
    /// Seconds per node in forward and backward, when profiling.
    profile: Option<Vec<(f64, f64)>>,
    /// Stands in for an output that forward freed (see [`TailOp::backward_reads_output`]).
    placeholder: Tensor,
    /// Whether backward reads each value (as an op's input, or as the output
    /// of an op whose backward reads it).
    kept_for_backward: Vec<bool>,
}

/// Builds a [`TailGraph`] node by node, in topological order.
#[derive(Debug, Default)]
pub struct TailBuilder {
    names: Vec<String>,
    sources: Vec<Source>,
    nodes: Vec<Node>,
    ops: Vec<Box<dyn TailOp>>,
    boundary: Vec<ValueId>,
    by_name: BTreeMap<String, ValueId>,
}

impl TailBuilder {
    /// An empty graph.
    pub fn new() -> TailBuilder {
        TailBuilder::default()
    }

    fn add(&mut self, name: &str, src: Source) -> ValueId {
        let id = self.names.len();
        self.names.push(String::from(name));
        self.sources.push(src);
        self.by_name.insert(String::from(name), id);
        id
    }

    /// The value called `name`, if it exists yet.
    pub fn get(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }

    /// A value fed from outside on every forward (in declaration order).
    pub fn boundary(&mut self, name: &str) -> ValueId {
        if let Some(id) = self.get(name) {
            return id;
        }
        let id = self.add(name, Source::Boundary);
        self.boundary.push(id);
        id
    }

    /// A constant.
    pub fn constant(&mut self, name: &str, t: Tensor) -> ValueId {
        if let Some(id) = self.get(name) {
            return id;
        }
        self.add(name, Source::Constant(t))
    }

    /// The constant value of `id`, if it is one.
    pub fn constant_value(&self, id: ValueId) -> Option<&Tensor> {
        match self.sources.get(id) {
            Some(Source::Constant(t)) => Some(t),
            _ => None,
        }
    }

    /// Appends a node computing `output` from `inputs`.
    pub fn node(
        &mut self,
        name: &str,
        op: Box<dyn TailOp>,
        inputs: Vec<ValueId>,
        output: &str,
    ) -> ValueId {
        let out = self.add(output, Source::Node);
        self.nodes.push(Node { name: String::from(name), inputs, output: out });
        self.ops.push(op);
        out
    }

    /// Finishes the graph with `output` as its result.
    pub fn finish(self, output: &str) -> Result<TailGraph> {
        let out = self
            .get(output)
            .ok_or_else(|| Error::NotFound { what: "tail output", name: String::from(output) })?;
        let mut requires_grad = vec![false; self.names.len()];
        for (n, op) in self.nodes.iter().zip(&self.ops) {
            let adapted = op.as_linear().is_some_and(|l| l.adapter().is_some()) || op.trainable();
            let through =
                n.inputs.iter().enumerate().any(|(i, &v)| requires_grad[v] && op.differentiable(i));
            requires_grad[n.output] = adapted || through;
        }
        let len = self.names.len();
        let mut last_use = vec![NEVER_READ; len];
        let mut kept_for_backward = vec![false; len];
        for (i, (n, op)) in self.nodes.iter().zip(&self.ops).enumerate() {
            n.inputs.iter().for_each(|&v| last_use[v] = i);
            if requires_grad[n.output] {
                n.inputs.iter().for_each(|&v| kept_for_backward[v] = true);
                kept_for_backward[n.output] |= op.backward_reads_output();
            }
        }
        kept_for_backward[out] = true;
        last_use[out] = usize::MAX;
        Ok(TailGraph {
            last_use,
            profile: None,
            head: None,
            placeholder: Tensor::F32(ArrayD::from_elem(ndarray::IxDyn(&[0]), 0.0)),
            kept_for_backward,
            names: self.names,
            sources: self.sources,
            nodes: self.nodes,
            ops: self.ops,
            boundary: self.boundary,
            output: out,
            requires_grad,
            tape: vec![None; len],
            widened: vec![None; len],
        })
    }
}

fn at_node(e: Error, node: &str) -> Error {
    match e {
        Error::Tail { node: n, msg } if n.is_empty() => {
            Error::Tail { node: String::from(node), msg }
        }
        e => e,
    }
}

impl TailGraph {
    /// Names of the boundary values, in the order [`TailGraph::forward`] takes them.
    pub fn boundary_names(&self) -> Vec<&str> {
        self.boundary.iter().map(|&v| self.names[v].as_str()).collect()
    }

    /// The output value's name.
    pub fn output_name(&self) -> &str {
        &self.names[self.output]
    }

    /// `(op type, node name)` of every node, in order.
    pub fn ops(&self) -> Vec<(&'static str, &str)> {
        self.nodes.iter().zip(&self.ops).map(|(n, op)| (op.op_type(), n.name.as_str())).collect()
    }

    /// Every adapted layer: `(node name, adapter)`.
    pub fn adapters(&self) -> impl Iterator<Item = (&str, &HydraLinear)> {
        self.nodes
            .iter()
            .zip(&self.ops)
            .filter_map(|(n, op)| Some((n.name.as_str(), op.as_linear()?.adapter()?)))
    }

    /// Mutable [`TailGraph::adapters`].
    pub fn adapters_mut(&mut self) -> impl Iterator<Item = (&str, &mut HydraLinear)> {
        self.nodes
            .iter()
            .zip(self.ops.iter_mut())
            .filter_map(|(n, op)| Some((n.name.as_str(), op.as_linear_mut()?.adapter_mut()?)))
    }

    /// Zeroes every adapter's (and the head's) gradient.
    pub fn zero_grad(&mut self) {
        self.adapters_mut().for_each(|(_, a)| a.zero_grad());
        if let Some(h) = self.head_mut() {
            h.zero_grad();
        }
    }

    /// Trainable parameters (all adapters and the head).
    pub fn trainable_params(&self) -> usize {
        let head = self.head().map_or(0, |h| h.w.len() + h.b.len());
        self.adapters().map(|(_, a)| a.num_trainable()).sum::<usize>() + head
    }

    /// Every trainable tensor with its gradient: the adapters in tail order
    /// (parallel branch first), then the head.
    pub fn params_and_grads(&mut self) -> (Vec<&mut [f32]>, Vec<&[f32]>) {
        let (mut p, mut g) = (Vec::new(), Vec::new());
        for op in self.ops.iter_mut() {
            if op.as_head().is_some() {
                if let Some(h) = op.as_head_mut() {
                    let (w, b, gw, gb) = h.split_mut();
                    p.extend([w, b]);
                    g.extend([gw, gb]);
                }
            } else if let Some(a) = op.as_linear_mut().and_then(Linear::adapter_mut) {
                for (pp, gg) in a.params_and_grads() {
                    p.push(pp);
                    g.push(gg);
                }
            }
        }
        (p, g)
    }

    /// The new head, if the tail ends in one.
    pub fn head(&self) -> Option<&LinearHead> {
        self.head.and_then(|i| self.ops[i].as_head())
    }

    /// Mutable [`TailGraph::head`].
    pub fn head_mut(&mut self) -> Option<&mut LinearHead> {
        self.head.and_then(|i| self.ops[i].as_head_mut())
    }

    /// The features the head reads (the tail's output without the head).
    pub fn features_name(&self) -> &str {
        match self.head {
            Some(i) => &self.names[self.nodes[i].inputs[0]],
            None => &self.names[self.output],
        }
    }

    /// Puts `head` at the end of the tail (replacing the one there), or
    /// removes the head with `None`: the tail's output becomes the logits, or
    /// the features again.
    pub fn set_head(&mut self, head: Option<LinearHead>) {
        self.clear_tape();
        match (self.head, head) {
            (Some(i), Some(h)) => self.ops[i] = Box::new(h),
            (Some(i), None) => {
                let node = self.nodes.remove(i);
                self.ops.remove(i);
                self.names.pop();
                self.sources.pop();
                self.requires_grad.pop();
                self.tape.pop();
                self.widened.pop();
                self.last_use.pop();
                self.kept_for_backward.pop();
                let feat = node.inputs[0];
                self.output = feat;
                self.last_use[feat] = usize::MAX;
                self.kept_for_backward[feat] = true;
                self.head = None;
            }
            (None, Some(h)) => {
                let feat = self.output;
                let out = self.names.len();
                self.names.push(format!("{}/head_logits", self.names[feat]));
                self.sources.push(Source::Node);
                self.nodes.push(Node {
                    name: String::from("head"),
                    inputs: vec![feat],
                    output: out,
                });
                self.ops.push(Box::new(h));
                self.requires_grad.push(true);
                self.tape.push(None);
                self.widened.push(None);
                self.last_use.push(usize::MAX);
                self.kept_for_backward.push(true);
                self.last_use[feat] = self.nodes.len() - 1;
                self.kept_for_backward[feat] = true;
                self.output = out;
                self.head = Some(self.nodes.len() - 1);
                if let Some(p) = &mut self.profile {
                    p.push((0.0, 0.0));
                }
            }
            (None, None) => {}
        }
    }

    /// Frozen parameters held by the tail (linear weights and float constants).
    pub fn frozen_params(&self) -> usize {
        let linear: usize =
            self.ops.iter().filter_map(|op| op.as_linear()).map(|l| l.frozen_params()).sum();
        let consts: usize = self
            .sources
            .iter()
            .map(|s| match s {
                Source::Constant(Tensor::F32(a)) => a.len(),
                _ => 0,
            })
            .sum();
        linear + consts
    }

    /// Bytes the linear layers' bf16 weight packs take once built (0 with
    /// f32 products).
    pub fn planned_pack_bytes(&self) -> usize {
        self.ops.iter().filter_map(|op| op.as_linear()).map(|l| l.planned_pack_bytes()).sum()
    }

    /// Bytes of the frozen values the tail holds (linear weights in their
    /// storage type, biases, constants).
    pub fn frozen_bytes(&self) -> usize {
        let linear: usize =
            self.ops.iter().filter_map(|op| op.as_linear()).map(|l| l.frozen_bytes()).sum();
        let consts: usize = self
            .sources
            .iter()
            .map(|s| match s {
                Source::Constant(t) => t.bytes(),
                _ => 0,
            })
            .sum();
        linear + consts
    }

    /// Bytes held on the tape by the last forward (the activations backward needs).
    pub fn tape_bytes(&self) -> usize {
        self.tape.iter().chain(&self.widened).flatten().map(Tensor::bytes).sum()
    }

    /// Runs the tail on the boundary values (in [`TailGraph::boundary_names`]
    /// order) and keeps every value for [`TailGraph::backward`].
    pub fn forward(&mut self, boundary: Vec<Tensor>, train: bool) -> Result<Tensor> {
        if boundary.len() != self.boundary.len() {
            return Err(Error::Shape {
                context: "tail boundary",
                expected: format!("{} tensors ({:?})", self.boundary.len(), self.boundary_names()),
                got: format!("{} tensors", boundary.len()),
            });
        }
        self.clear_tape();
        for (&id, t) in self.boundary.iter().zip(boundary) {
            self.tape[id] = Some(t);
        }
        for i in 0..self.nodes.len() {
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            widen_inputs(&self.nodes[i].inputs, &*self.ops[i], &self.tape, &mut self.widened);
            let y = {
                let node = &self.nodes[i];
                let inputs = gather(
                    &self.sources,
                    &self.tape,
                    &self.widened,
                    &self.names,
                    &node.inputs,
                    &*self.ops[i],
                )?;
                self.ops[i].forward(&inputs, train).map_err(|e| at_node(e, &node.name))?
            };
            let out = self.nodes[i].output;
            self.tape[out] = Some(y);
            if let (Some(p), Some(t0)) = (&mut self.profile, t0) {
                p[i].0 += t0.elapsed().as_secs_f64();
            }
            if !train {
                self.ops[i].release();
            }
            // Free what neither a later forward node nor backward reads.
            for &v in &self.nodes[i].inputs {
                if self.last_use[v] == i && !(train && self.kept_for_backward[v]) {
                    self.tape[v] = None;
                    self.widened[v] = None;
                }
            }
            if self.last_use[out] == NEVER_READ && !(train && self.kept_for_backward[out]) {
                // Read by nobody (a dead branch of the tail).
                self.tape[out] = None;
            }
        }
        // The tail's result is f32 even when it is a cached f16 feature (head-only).
        self.tape[self.output].clone().map(Tensor::into_f32).ok_or_else(|| Error::Tail {
            node: self.names[self.output].clone(),
            msg: String::from("output not computed"),
        })
    }

    /// Back-propagates `dy` (the gradient of the output of the last forward),
    /// accumulating into every adapter's gradients.
    pub fn backward(&mut self, dy: ArrayD<f32>) -> Result<()> {
        let out_shape = self.tape[self.output].as_ref().map(|t| t.shape().to_vec());
        if out_shape.as_deref() != Some(dy.shape()) {
            return Err(Error::Shape {
                context: "tail backward",
                expected: format!("{out_shape:?} (the last forward's output)"),
                got: format!("{:?}", dy.shape()),
            });
        }
        let mut grads: Vec<Option<ArrayD<f32>>> = vec![None; self.names.len()];
        grads[self.output] = Some(dy);
        for i in (0..self.nodes.len()).rev() {
            let out = self.nodes[i].output;
            let Some(g) = grads[out].take() else { continue };
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            let node = &self.nodes[i];
            let op = &mut self.ops[i];
            let need: Vec<bool> = node
                .inputs
                .iter()
                .enumerate()
                .map(|(j, &v)| self.requires_grad[v] && op.differentiable(j))
                .collect();
            let inputs =
                gather(&self.sources, &self.tape, &self.widened, &self.names, &node.inputs, &**op)?;
            let output = match &self.tape[out] {
                Some(t) => t,
                // Forward freed it: this op's backward does not read it.
                None if !op.backward_reads_output() => &self.placeholder,
                None => {
                    return Err(Error::Tail {
                        node: node.name.clone(),
                        msg: String::from("backward without forward"),
                    });
                }
            };
            let dxs =
                op.backward(&inputs, output, &g, &need).map_err(|e| at_node(e, &node.name))?;
            for ((&v, dx), &want) in node.inputs.iter().zip(dxs).zip(&need) {
                let (true, Some(dx)) = (want, dx) else { continue };
                grads[v] = Some(match grads[v].take() {
                    Some(mut acc) if acc.shape() == dx.shape() => {
                        acc += &dx;
                        acc
                    }
                    Some(acc) => {
                        return Err(Error::Tail {
                            node: node.name.clone(),
                            msg: format!("gradient shape {:?} vs {:?}", dx.shape(), acc.shape()),
                        });
                    }
                    None => dx,
                });
            }
            if let (Some(p), Some(t0)) = (&mut self.profile, t0) {
                p[i].1 += t0.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }

    /// Starts (clearing it) or stops timing every node.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| vec![(0.0, 0.0); self.nodes.len()]);
    }

    /// Seconds spent per op type since profiling started: `(op type,
    /// forward, backward)`, slowest first.
    pub fn profile(&self) -> Vec<(&'static str, f64, f64)> {
        let mut by: Vec<(&'static str, f64, f64)> = Vec::new();
        for (op, &(f, b)) in self.ops.iter().zip(self.profile.iter().flatten()) {
            match by.iter_mut().find(|e| e.0 == op.op_type()) {
                Some(e) => (e.1, e.2) = (e.1 + f, e.2 + b),
                None => by.push((op.op_type(), f, b)),
            }
        }
        by.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
        by
    }

    /// Seconds per node since profiling started: `(output name, op type,
    /// forward, backward)`, in graph order.
    pub fn profile_nodes(&self) -> Vec<(&str, &'static str, f64, f64)> {
        self.nodes
            .iter()
            .zip(&self.ops)
            .zip(self.profile.iter().flatten())
            .map(|((node, op), &(f, b))| (self.names[node.output].as_str(), op.op_type(), f, b))
            .collect()
    }

    /// Frees the tape (the activations kept for backward).
    pub fn clear_tape(&mut self) {
        self.tape.iter_mut().for_each(|t| *t = None);
        self.widened.iter_mut().for_each(|t| *t = None);
    }
}

/// Makes the f32 copy of every f16 input that `op` does not take as f16.
fn widen_inputs(
    ids: &[ValueId],
    op: &dyn TailOp,
    tape: &[Option<Tensor>],
    widened: &mut [Option<Tensor>],
) {
    for (j, &v) in ids.iter().enumerate() {
        if let Some(t @ Tensor::F16(_)) = &tape[v]
            && !op.accepts_f16(j)
            && widened[v].is_none()
        {
            widened[v] = t.to_f32("").ok().map(|a| Tensor::F32(a.into_owned()));
        }
    }
}

fn gather<'a>(
    sources: &'a [Source],
    tape: &'a [Option<Tensor>],
    widened: &'a [Option<Tensor>],
    names: &[String],
    ids: &[ValueId],
    op: &dyn TailOp,
) -> Result<Vec<&'a Tensor>> {
    ids.iter()
        .enumerate()
        .map(|(j, &v)| match &sources[v] {
            Source::Constant(t) => Ok(t),
            Source::Boundary | Source::Node => {
                let t = match (&tape[v], &widened[v]) {
                    (Some(Tensor::F16(_)), Some(w)) if !op.accepts_f16(j) => Some(w),
                    (t, _) => t.as_ref(),
                };
                t.ok_or_else(|| Error::Tail {
                    node: names[v].clone(),
                    msg: String::from("value not computed yet"),
                })
            }
        })
        .collect()
}
