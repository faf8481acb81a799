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

mod resident;

use crate::device::resident::GpuValue;
use resident::DevVal;

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
    /// Values resident on the GPU (`device::resident`), by value: made by
    /// nodes that ran there, or sent up for them (once each). Sized by each
    /// forward.
    dev: Vec<Option<DevVal>>,
    /// The constants' copies on the GPU, for the GPU `dev_consts_gpu`.
    dev_consts: Vec<Option<DevVal>>,
    dev_consts_gpu: Option<u64>,
    /// Whether each node ran on the GPU in the last forward.
    ran_on_gpu: Vec<bool>,
    /// What running the last forward again on the CPU takes, kept when it
    /// ran with values on the GPU: a failed CUDA call in its backward runs
    /// both again on the CPU.
    rerun: Option<Rerun>,
}

/// The start of a forward: the adapters' generators (its boundary values
/// stay on the tape while values are resident on the GPU).
#[derive(Debug)]
struct Rerun {
    rngs: Vec<crate::rng::Rng>,
    train: bool,
}

/// Why a pass stopped.
#[derive(Debug)]
enum Fail {
    /// An op's error (the caller's).
    Error(Error),
    /// A CUDA call failed (counted and reported): the pass runs again on the CPU.
    Gpu,
    /// A value (or node) that should be there is not.
    Missing(usize),
}

/// A node output's gradient during backward, on the host or the GPU.
#[derive(Debug)]
enum NodeGrad {
    Host(ArrayD<f32>),
    Dev(DevVal),
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
            dev: Vec::new(),
            dev_consts: Vec::new(),
            dev_consts_gpu: None,
            ran_on_gpu: Vec::new(),
            rerun: None,
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
    ///
    /// With a GPU in use (`device::resident`), the nodes that can run there
    /// on values already there (or a linear layer worth it alone) do, and
    /// their values stay there for the next such node; a value crosses to
    /// the other side only where a node there reads it. A failed CUDA call
    /// runs the whole forward again on the CPU (the adapters' generators
    /// put back first, so dropout draws the same masks).
    pub fn forward(&mut self, boundary: Vec<Tensor>, train: bool) -> Result<Tensor> {
        self.forward_with(boundary, Vec::new(), train)
    }

    /// [`TailGraph::forward`] with some boundary tensors already on the GPU
    /// (`on_gpu[k]`: the `k`-th tensor's values, dense f32, as the feature
    /// cache gathers them there): GPU ops read those instead of sending the
    /// host's copy up. Ignored where the tail's values are not resident; a
    /// value of the wrong size is ignored too (the host's copy goes up).
    pub(crate) fn forward_with(
        &mut self,
        boundary: Vec<Tensor>,
        on_gpu: Vec<Option<GpuValue>>,
        train: bool,
    ) -> Result<Tensor> {
        if boundary.len() != self.boundary.len() {
            return Err(Error::Shape {
                context: "tail boundary",
                expected: format!("{} tensors ({:?})", self.boundary.len(), self.boundary_names()),
                got: format!("{} tensors", boundary.len()),
            });
        }
        self.rerun = None;
        if !crate::device::resident::active() {
            // Nothing stays on a GPU no longer in use.
            self.dev_consts.clear();
            self.dev_consts_gpu = None;
            return self
                .run_forward(boundary, Vec::new(), train, false)
                .map_err(|f| self.fail_error(f));
        }
        let rerun = Rerun { rngs: self.adapters().map(|(_, a)| a.rng().clone()).collect(), train };
        match self.run_forward(boundary, on_gpu, train, true) {
            Ok(y) => {
                // A backward reruns only if values were on the GPU.
                if train && self.ran_on_gpu.iter().any(|&g| g) {
                    self.rerun = Some(rerun);
                } else {
                    self.free_boundary();
                }
                Ok(y)
            }
            Err(Fail::Gpu) => self.forward_again(rerun),
            Err(f) => Err(self.fail_error(f)),
        }
    }

    /// Frees the boundary values that a GPU forward kept for a rerun and
    /// nothing else reads.
    fn free_boundary(&mut self) {
        for &v in &self.boundary {
            if self.last_use[v] != usize::MAX && !self.kept_for_backward[v] {
                self.tape[v] = None;
                self.widened[v] = None;
            }
        }
    }

    /// The forward that `r` started, again, on the CPU, from the boundary
    /// values on the tape.
    fn forward_again(&mut self, r: Rerun) -> Result<Tensor> {
        crate::device::stats::GPU_TAIL_RERUNS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        let mut boundary = Vec::with_capacity(self.boundary.len());
        for &v in &self.boundary {
            let t = self.tape[v].take().ok_or_else(|| self.fail_error(Fail::Missing(v)))?;
            boundary.push(t);
        }
        for ((_, a), rng) in self.adapters_mut().zip(&r.rngs) {
            a.set_rng(rng.clone());
        }
        self.dev_consts.clear();
        let train = r.train;
        crate::device::on_cpu(|| self.run_forward(boundary, Vec::new(), train, false))
            .map_err(|f| self.fail_error(f))
    }

    fn fail_error(&self, f: Fail) -> Error {
        match f {
            Fail::Error(e) => e,
            Fail::Gpu => Error::Tail {
                node: String::new(),
                msg: String::from("a GPU call failed where no CPU rerun was possible"),
            },
            Fail::Missing(v) => Error::Tail {
                node: self.names.get(v).cloned().unwrap_or_default(),
                msg: String::from("value not computed yet"),
            },
        }
    }

    fn run_forward(
        &mut self,
        boundary: Vec<Tensor>,
        on_gpu: Vec<Option<GpuValue>>,
        train: bool,
        gpu: bool,
    ) -> core::result::Result<Tensor, Fail> {
        self.clear_tape();
        let len = self.names.len();
        self.dev.resize_with(len, || None);
        self.ran_on_gpu = vec![false; self.nodes.len()];
        if gpu {
            let id = crate::device::resident::gpu_id();
            if id != self.dev_consts_gpu {
                self.dev_consts.clear();
                self.dev_consts_gpu = id;
            }
            self.dev_consts.resize_with(len, || None);
        }
        for (&id, t) in self.boundary.iter().zip(boundary) {
            self.tape[id] = Some(t);
        }
        if gpu {
            for (&id, g) in self.boundary.iter().zip(on_gpu) {
                let shape = match (&self.tape[id], &g) {
                    (Some(t @ (Tensor::F32(_) | Tensor::F16(_))), Some(g))
                        if t.len() == g.len() =>
                    {
                        t.shape().to_vec()
                    }
                    _ => continue,
                };
                self.dev[id] = g.map(|v| DevVal { v, shape });
            }
        }
        for i in 0..self.nodes.len() {
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            let out = self.nodes[i].output;
            let on_gpu =
                if gpu && self.gpu_forward_takes(i) { self.gpu_forward(i, train)? } else { None };
            if let Some(y) = on_gpu {
                self.dev[out] = Some(y);
                self.ran_on_gpu[i] = true;
            } else {
                self.inputs_to_host(i)?;
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
                    )
                    .map_err(Fail::Error)?;
                    self.ops[i]
                        .forward(&inputs, train)
                        .map_err(|e| Fail::Error(at_node(e, &node.name)))?
                };
                self.tape[out] = Some(y);
            }
            if let (Some(p), Some(t0)) = (&mut self.profile, t0) {
                p[i].0 += t0.elapsed().as_secs_f64();
            }
            if !train {
                self.ops[i].release();
            }
            // Free what neither a later forward node nor backward reads (on
            // the GPU's path the boundary values stay on the host, for a
            // rerun on the CPU).
            for &v in &self.nodes[i].inputs {
                if self.last_use[v] == i && !(train && self.kept_for_backward[v]) {
                    if !(gpu && matches!(self.sources[v], Source::Boundary)) {
                        self.tape[v] = None;
                        self.widened[v] = None;
                    }
                    self.dev[v] = None;
                }
            }
            if self.last_use[out] == NEVER_READ && !(train && self.kept_for_backward[out]) {
                // Read by nobody (a dead branch of the tail).
                self.tape[out] = None;
                self.dev[out] = None;
            }
        }
        if self.tape[self.output].is_none()
            && let Some(Some(d)) = self.dev.get(self.output)
        {
            self.tape[self.output] = Some(Tensor::F32(resident::fetch(d)?));
        }
        // The tail's result is f32 even when it is a cached f16 feature (head-only).
        self.tape[self.output].clone().map(Tensor::into_f32).ok_or(Fail::Missing(self.output))
    }

    /// Back-propagates `dy` (the gradient of the output of the last forward),
    /// accumulating into every adapter's gradients.
    ///
    /// The nodes that ran forward on the GPU run backward there, their
    /// gradients staying there for the next such node. A failed CUDA call
    /// puts the gradients back as they were, runs the forward again on the
    /// CPU and the backward there.
    pub fn backward(&mut self, dy: ArrayD<f32>) -> Result<()> {
        let out_shape = self.tape[self.output].as_ref().map(|t| t.shape().to_vec());
        if out_shape.as_deref() != Some(dy.shape()) {
            return Err(Error::Shape {
                context: "tail backward",
                expected: format!("{out_shape:?} (the last forward's output)"),
                got: format!("{:?}", dy.shape()),
            });
        }
        if self.rerun.is_none() {
            return self.run_backward(dy, false).map_err(|f| self.fail_error(f));
        }
        let grads: Vec<_> =
            self.adapters().map(|(_, a)| (a.grads().0.cloned(), a.grads().1.cloned())).collect();
        let head = self.head().map(|h| (h.gw.clone(), h.gb.clone()));
        match self.run_backward(dy.clone(), true) {
            Ok(()) => {
                self.free_boundary();
                Ok(())
            }
            Err(Fail::Gpu) => {
                for ((_, a), g) in self.adapters_mut().zip(grads) {
                    a.restore_grads(g);
                }
                if let (Some(h), Some((gw, gb))) = (self.head_mut(), head) {
                    (h.gw, h.gb) = (gw, gb);
                }
                let Some(r) = self.rerun.take() else {
                    return Err(self.fail_error(Fail::Gpu));
                };
                self.forward_again(r)?;
                crate::device::on_cpu(|| self.run_backward(dy, false))
                    .map_err(|f| self.fail_error(f))
            }
            Err(f) => Err(self.fail_error(f)),
        }
    }

    fn run_backward(&mut self, dy: ArrayD<f32>, gpu: bool) -> core::result::Result<(), Fail> {
        let mut grads: Vec<Option<NodeGrad>> = (0..self.names.len()).map(|_| None).collect();
        grads[self.output] = Some(NodeGrad::Host(dy));
        for i in (0..self.nodes.len()).rev() {
            let out = self.nodes[i].output;
            let Some(g) = grads[out].take() else { continue };
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            let need: Vec<bool> = {
                let op = &self.ops[i];
                self.nodes[i]
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| self.requires_grad[v] && op.differentiable(j))
                    .collect()
            };
            if !gpu
                && self.ran_on_gpu.get(i).copied().unwrap_or(false)
                && self.ops[i].as_linear().is_some_and(|l| l.adapter().is_some())
            {
                // An adapted layer's state is on the GPU: only a rerun can redo it.
                return Err(Fail::Gpu);
            }
            let dxs: Vec<Option<NodeGrad>> = if gpu && self.gpu_backward_takes(i, &need) {
                self.gpu_backward(i, g, &need)?
            } else {
                self.inputs_to_host(i)?;
                // (A node that ran forward on the GPU made no f32 copies.)
                widen_inputs(&self.nodes[i].inputs, &*self.ops[i], &self.tape, &mut self.widened);
                if self.tape[out].is_none()
                    && self.ops[i].backward_reads_output()
                    && let Some(Some(d)) = self.dev.get(out)
                {
                    self.tape[out] = Some(Tensor::F32(resident::fetch(d)?));
                }
                let g = match g {
                    NodeGrad::Host(a) => a,
                    NodeGrad::Dev(d) => resident::fetch(&d)?,
                };
                let node = &self.nodes[i];
                let op = &mut self.ops[i];
                let inputs = gather(
                    &self.sources,
                    &self.tape,
                    &self.widened,
                    &self.names,
                    &node.inputs,
                    &**op,
                )
                .map_err(Fail::Error)?;
                let output = match &self.tape[out] {
                    Some(t) => t,
                    // Forward freed it: this op's backward does not read it.
                    None if !op.backward_reads_output() => &self.placeholder,
                    None => {
                        return Err(Fail::Error(Error::Tail {
                            node: node.name.clone(),
                            msg: String::from("backward without forward"),
                        }));
                    }
                };
                op.backward(&inputs, output, &g, &need)
                    .map_err(|e| Fail::Error(at_node(e, &node.name)))?
                    .into_iter()
                    .map(|d| d.map(NodeGrad::Host))
                    .collect()
            };
            let node_name = &self.nodes[i].name;
            for ((&v, dx), &want) in self.nodes[i].inputs.iter().zip(dxs).zip(&need) {
                let (true, Some(dx)) = (want, dx) else { continue };
                grads[v] = Some(match grads[v].take() {
                    None => dx,
                    Some(acc) => add_grad(acc, dx).map_err(|f| match f {
                        Fail::Error(Error::Tail { msg, .. }) => {
                            Fail::Error(Error::Tail { node: node_name.clone(), msg })
                        }
                        f => f,
                    })?,
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

    /// Frees the tape (the activations kept for backward, on the host and
    /// on the GPU).
    pub fn clear_tape(&mut self) {
        self.tape.iter_mut().for_each(|t| *t = None);
        self.widened.iter_mut().for_each(|t| *t = None);
        self.dev.clear();
        self.rerun = None;
    }

    /// Bytes of GPU memory the tape holds (values resident there).
    pub fn gpu_tape_bytes(&self) -> usize {
        // Each buffer once (a reshape's value shares its input's).
        let mut seen = BTreeMap::new();
        for d in self.dev.iter().flatten() {
            seen.insert(d.v.id(), d.v.len() * 4);
        }
        seen.values().sum()
    }
}

/// `acc + dx`, two gradients of one value: on the GPU when both are there,
/// else on the host.
fn add_grad(acc: NodeGrad, dx: NodeGrad) -> core::result::Result<NodeGrad, Fail> {
    let mismatch = |a: &[usize], b: &[usize]| {
        Fail::Error(Error::Tail {
            node: String::new(),
            msg: format!("gradient shape {a:?} vs {b:?}"),
        })
    };
    Ok(match (acc, dx) {
        (NodeGrad::Dev(a), NodeGrad::Dev(d)) => {
            if a.shape != d.shape {
                return Err(mismatch(&d.shape, &a.shape));
            }
            let v = crate::device::resident::accumulate(a.v, &d.v).map_err(|_| Fail::Gpu)?;
            NodeGrad::Dev(DevVal { v, shape: a.shape })
        }
        (acc, dx) => {
            let host = |g: NodeGrad| match g {
                NodeGrad::Host(a) => Ok(a),
                NodeGrad::Dev(d) => resident::fetch(&d),
            };
            let (mut acc, dx) = (host(acc)?, host(dx)?);
            if acc.shape() != dx.shape() {
                return Err(mismatch(dx.shape(), acc.shape()));
            }
            acc += &dx;
            NodeGrad::Host(acc)
        }
    })
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
