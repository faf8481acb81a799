//! The split: the gradient cone of the chosen layers becomes the trainable
//! tail; everything else stays in one optimized tract plan (built by the
//! model layer, so that `onnx` never reaches up to the backbone).
//!
//! Tail = (nodes downstream of an adapted layer) ∩ (nodes upstream of the
//! chosen output). Every tensor a tail node reads from outside the tail is a
//! constant (loaded into the tail) or a *boundary* tensor (hidden states,
//! attention-mask terms, shapes…) computed by the backbone plan. Every tail
//! node is converted up front, so an op the engine lacks fails here.

use std::collections::{HashMap, HashSet};

use half::f16;

use super::import::build_op;
use super::layers::{LinearKind, LinearLayer, Targets, linear_layers};
use super::{GraphIndex, OnnxModel};
use crate::error::{Error, Result};
use crate::hydra::{HydraConfig, Weights};
use crate::kernels;
use crate::tail::ops::linear::{Layout, Linear};
use crate::tail::{TailBuilder, TailGraph};

/// How the tail stores frozen linear weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// f32: exact, twice the memory.
    #[default]
    F32,
    /// f16: half the memory; products widen to f32.
    F16,
}

/// What to adapt and where the tail ends.
#[derive(Clone, Debug)]
pub struct SplitConfig {
    /// The layers that get adapters.
    pub targets: Targets,
    /// The tensor the tail ends at: a model output (default: the first) or a
    /// feature tensor that will feed a new head.
    pub output: Option<String>,
    /// The adapter configuration (each layer's seed is derived from its index).
    pub adapter: HydraConfig,
    /// Storage of the tail's frozen linear weights.
    pub weights: WeightDtype,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            targets: Targets::AllLinear,
            output: None,
            adapter: HydraConfig::default(),
            weights: WeightDtype::F32,
        }
    }
}

/// What the split decided, for `inspect` and logs.
#[derive(Clone, Debug)]
pub struct SplitReport {
    /// Adapted layers (node names).
    pub adapted: Vec<String>,
    /// `(op type, node)` of every tail node, in order.
    pub tail_ops: Vec<(String, String)>,
    /// Tensors the backbone hands the tail.
    pub boundary: Vec<String>,
    /// The tail's output tensor.
    pub output: String,
    /// Named dims of the output that follow an input's length (`seq`), from
    /// the declared shapes: a new head, whose width is fixed, cannot sit on
    /// such an output.
    pub output_follows_input: Vec<String>,
    /// Float parameters of the whole model.
    pub model_params: usize,
    /// Frozen parameters held by the tail.
    pub tail_frozen_params: usize,
    /// Trainable (adapter) parameters.
    pub trainable_params: usize,
}

/// What the split produces: the tail with its adapters, what it decided, the
/// adapted layers as found in the file, and their weights' fingerprint. The
/// frozen backbone that computes the tail's boundary is built by
/// [`crate::model::AdaptedModel`], which owns all of it.
#[derive(Debug)]
pub struct Split {
    /// The trainable tail.
    pub tail: TailGraph,
    /// What the split decided.
    pub report: SplitReport,
    /// The adapted layers, as found in the model.
    pub layers: Vec<LinearLayer>,
    /// Fingerprint of the adapted layers' frozen weights.
    pub fingerprint: u64,
}

/// Per-layer seed, so that layers start from different A.
fn layer_seed(base: u64, k: usize) -> u64 {
    base.wrapping_add((k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Splits `model` as `cfg` asks: the gradient cone becomes the tail (every
/// node converted now, so an op the engine lacks fails here).
pub fn split(model: &OnnxModel, cfg: &SplitConfig) -> Result<Split> {
    let g = model.index()?;
    let layers = linear_layers(&g)?;
    let output = match &cfg.output {
        Some(o) => o.clone(),
        None => model
            .ranked_outputs()
            .into_iter()
            .next()
            .ok_or_else(|| Error::Onnx("the model has no outputs".into()))?,
    };
    if !g.producer.contains_key(output.as_str()) {
        return Err(Error::NotFound { what: "output or feature tensor", name: output });
    }
    // `all` and `last:K` are judged against the chosen output: only the
    // layers that feed it (a cut before the last layers leaves those out).
    // Layers named explicitly must feed it, or the split says so.
    let feeding: Vec<LinearLayer> = match cfg.targets {
        Targets::AllLinear | Targets::LastBlocks(_) => {
            let up = g.upstream(&output);
            layers.iter().filter(|l| up.contains(&l.node)).cloned().collect()
        }
        _ => layers.clone(),
    };
    let quantized: Vec<(String, String)> = {
        let up = g.upstream(&output);
        super::layers::quantized_layers(&g)
            .into_iter()
            .filter(|(n, _)| up.iter().any(|&i| g.node_name(i) == *n))
            .collect()
    };
    let refuse_quantized = |which: &[&(String, String)]| {
        let names: Vec<&str> = which.iter().take(3).map(|(n, _)| n.as_str()).collect();
        Error::Config(format!(
            "{} linear layer(s) feeding `{output}` have int8-quantized weights (QDQ: DequantizeLinear of an int8 constant), e.g. {}; hydra-edge runs them frozen but does not adapt quantized weights (merging an adapter would need requantizing them): adapt the float model and quantize after merging, or train a new head (--targets none --head new:N)",
            which.len(),
            names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        ))
    };
    let named: Vec<&(String, String)> = quantized
        .iter()
        .filter(|(n, w)| super::layers::targets_mention(&cfg.targets, n, w))
        .collect();
    if !named.is_empty() {
        return Err(refuse_quantized(&named));
    }
    let chosen: Vec<LinearLayer> = match cfg.targets.select(&feeding) {
        Ok(c) if c.is_empty() && !quantized.is_empty() && cfg.targets != Targets::None => {
            return Err(refuse_quantized(&quantized.iter().collect::<Vec<_>>()));
        }
        Ok(c) => c.into_iter().cloned().collect(),
        Err(_) if !quantized.is_empty() && feeding.is_empty() => {
            return Err(refuse_quantized(&quantized.iter().collect::<Vec<_>>()));
        }
        Err(e) => return Err(e),
    };
    let tail_nodes = cone(&g, &chosen, &output)?;
    let weights =
        chosen.iter().map(|l| l.weights(&g).map(|(w, _)| w)).collect::<Result<Vec<_>>>()?;
    let fingerprint = if chosen.is_empty() {
        output_fingerprint(&g, &output)?
    } else {
        crate::adapter::fingerprint(
            chosen.iter().zip(&weights).map(|(l, w)| (l.name.as_str(), w.as_slice())),
        )
    };
    let tail = build_tail(&g, &layers, &chosen, &tail_nodes, &output, cfg, model.opset())?;
    let boundary: Vec<String> = tail.boundary_names().iter().map(|s| s.to_string()).collect();
    let report = SplitReport {
        adapted: chosen.iter().map(|l| l.name.clone()).collect(),
        tail_ops: tail.ops().into_iter().map(|(o, n)| (o.to_string(), n.to_string())).collect(),
        boundary,
        output_follows_input: model.input_following_dims(&output),
        output,
        model_params: model.num_params(),
        tail_frozen_params: tail.frozen_params(),
        trainable_params: tail.trainable_params(),
    };
    Ok(Split { tail, report, layers: chosen, fingerprint })
}

/// Fingerprint of a split with no adapted layer (a new head only): the
/// output's name and declared shape, and every constant that feeds it (in
/// graph order). Without it a head-only adapter would load on any model
/// with an output of the same name and width.
fn output_fingerprint(g: &GraphIndex<'_>, output: &str) -> Result<u64> {
    let mut feeds: HashSet<usize> = HashSet::new();
    let mut stack: Vec<usize> = g.producer.get(output).copied().into_iter().collect();
    while let Some(i) = stack.pop() {
        if feeds.insert(i) {
            stack.extend(g.nodes[i].input.iter().filter_map(|x| g.producer.get(x.as_str())));
        }
    }
    let mut order: Vec<usize> = feeds.into_iter().collect();
    order.sort_unstable();
    let graph = g.model.graph();
    let shape = graph
        .output
        .iter()
        .chain(&graph.value_info)
        .find(|v| v.name == output)
        .map(|v| format!("{:?}", v.r#type))
        .unwrap_or_default();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut tensors: Vec<(String, Vec<f32>)> = vec![(format!("output {output} {shape}"), vec![])];
    for i in order {
        for x in &g.nodes[i].input {
            let constant = g.initializers.contains_key(x.as_str())
                || g.constant_nodes.contains_key(x.as_str());
            if !constant || !seen.insert(x.as_str()) {
                continue;
            }
            let v: Vec<f32> = match g.constant(x)? {
                Some(crate::Tensor::F32(a)) => a.iter().copied().collect(),
                Some(crate::Tensor::F16(a)) => a.iter().map(|v| v.to_f32()).collect(),
                Some(crate::Tensor::I64(a)) => a.iter().map(|&v| v as f32).collect(),
                None => continue,
            };
            // One tensor at a time: a model's weights are never all copied at once.
            let h = crate::adapter::fingerprint([(x.as_str(), v.as_slice())]);
            let words = [f32::from_bits(h as u32), f32::from_bits((h >> 32) as u32)];
            tensors.push((x.clone(), words.to_vec()));
        }
    }
    Ok(crate::adapter::fingerprint(tensors.iter().map(|(n, v)| (n.as_str(), v.as_slice()))))
}

/// The tail's nodes (indices, in topological order).
fn cone(g: &GraphIndex<'_>, chosen: &[LinearLayer], output: &str) -> Result<Vec<usize>> {
    let mut down: HashSet<usize> = HashSet::new();
    let mut stack: Vec<usize> =
        chosen.iter().flat_map(|l| [Some(l.node), l.bias_node]).flatten().collect();
    while let Some(i) = stack.pop() {
        // A tensor's shape does not depend on the adapters' values: `Shape`
        // (and `Size`) of a trainable tensor, and everything computed from it
        // and frozen values alone (masks, position ids, `Expand` and `Reshape`
        // targets, `ConstantOfShape`, …), is frozen — computed by the
        // backbone on the base model, whose tensors have the same shapes, and
        // handed to the tail as a boundary tensor.
        if matches!(g.nodes[i].op_type.as_str(), "Shape" | "Size") || !down.insert(i) {
            continue;
        }
        for o in &g.nodes[i].output {
            stack.extend(g.consumers.get(o.as_str()).into_iter().flatten().copied());
        }
    }
    let up = g.upstream(output);
    for l in chosen {
        if !up.contains(&l.node) {
            return Err(Error::Config(format!(
                "target layer `{}` does not feed the output `{output}`",
                l.name
            )));
        }
    }
    let mut nodes: Vec<usize> = down.intersection(&up).copied().collect();
    nodes.sort_unstable();
    Ok(nodes)
}

fn store(w: Vec<f32>, dtype: WeightDtype) -> Weights {
    match dtype {
        WeightDtype::F32 => Weights::F32(w),
        WeightDtype::F16 => {
            let mut h = vec![f16::ZERO; w.len()];
            kernels::active().f32_to_f16(&w, &mut h);
            Weights::F16(h)
        }
    }
}

fn build_tail(
    g: &GraphIndex<'_>,
    layers: &[LinearLayer],
    chosen: &[LinearLayer],
    nodes: &[usize],
    output: &str,
    cfg: &SplitConfig,
    opset: i64,
) -> Result<TailGraph> {
    let by_node: HashMap<usize, &LinearLayer> = layers.iter().map(|l| (l.node, l)).collect();
    let in_tail: HashSet<usize> = nodes.iter().copied().collect();
    let absorbed: HashSet<usize> =
        layers.iter().filter(|l| in_tail.contains(&l.node)).filter_map(|l| l.bias_node).collect();
    let chosen_nodes: Vec<usize> = chosen.iter().map(|l| l.node).collect();
    let (gelu_ends, fused) = super::fuse::fused_gelus(g, nodes);
    let mut b = TailBuilder::new();
    if nodes.is_empty() {
        // Head-only: the tail is the feature tensor itself.
        b.boundary(output);
    }
    let value = |b: &mut TailBuilder, name: &str| -> Result<usize> {
        if let Some(id) = b.get(name) {
            return Ok(id);
        }
        Ok(match g.constant(name)? {
            Some(t) => b.constant(name, t),
            None => b.boundary(name),
        })
    };
    for &i in nodes {
        if absorbed.contains(&i) {
            continue;
        }
        if let Some(m) = gelu_ends.get(&i) {
            let x = value(&mut b, &m.input)?;
            let op = Box::new(crate::tail::ops::unary::Unary::new(
                crate::tail::ops::unary::UnaryKind::Gelu,
            ));
            b.node(&format!("{}/fused_gelu", g.node_name(i)), op, vec![x], &m.output);
            continue;
        }
        if fused.contains(&i) {
            continue;
        }
        let n = &g.nodes[i];
        let name = g.node_name(i);
        if n.op_type == "Constant" {
            let t = g
                .constant(&n.output[0])?
                .ok_or_else(|| Error::Onnx(format!("Constant `{name}` has no value")))?;
            b.constant(&n.output[0], t);
            continue;
        }
        if let Some(l) = by_node.get(&i) {
            let (w, bias) = l.weights(g)?;
            let (op_type, layout) = match l.kind {
                LinearKind::Gemm { .. } => ("Gemm", Layout::Rows),
                LinearKind::MatMul => ("MatMul", Layout::Rows),
                LinearKind::Conv1x1 => ("Conv", Layout::Channels),
            };
            let mut op =
                Linear::new(op_type, layout, store(w, cfg.weights), bias, l.in_dim, l.out_dim)?;
            if let Some(k) = chosen_nodes.iter().position(|&c| c == i) {
                let mut a = cfg.adapter.clone();
                a.seed = layer_seed(a.seed, k);
                op.adapt(a).map_err(|e| match e {
                    Error::Config(m) => Error::Config(format!("layer `{}`: {m}", l.name)),
                    e => e,
                })?;
            }
            let x = value(&mut b, &l.input)?;
            b.node(&name, Box::new(op), vec![x], &l.output);
            continue;
        }
        let op = build_op(g, i, opset)?;
        // Optional inputs may be omitted only at the end (positions matter).
        let mut ins = n.input.clone();
        while ins.last().is_some_and(|s| s.is_empty()) {
            ins.pop();
        }
        if n.op_type == "Clip" {
            ins.truncate(1); // bounds are part of the op
        }
        if ins.iter().any(|s| s.is_empty()) {
            return Err(Error::UnsupportedOp {
                op: n.op_type.clone(),
                node: name,
                reason: "an optional input is omitted before a given one".into(),
            });
        }
        let ids = ins.iter().map(|s| value(&mut b, s)).collect::<Result<Vec<_>>>()?;
        for extra in n.output.iter().skip(1).filter(|o| !o.is_empty()) {
            if g.consumers
                .get(extra.as_str())
                .is_some_and(|c| c.iter().any(|c| in_tail.contains(c)))
            {
                return Err(Error::UnsupportedOp {
                    op: n.op_type.clone(),
                    node: name,
                    reason: format!("its second output `{extra}` is used in the tail"),
                });
            }
        }
        b.node(&name, op, ids, &n.output[0]);
    }
    b.finish(output)
}
