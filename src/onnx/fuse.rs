//! Pattern fusion before the tail is built: the erf form of GELU that
//! torch.onnx writes for `nn.GELU()` (BERT, ViT, MiniLM…),
//! `Div(x, √2) → Erf → Add(·, 1) → Mul(x, ·) → Mul(·, 0.5)`
//! (the two Muls in either order and with either operand order), becomes one
//! exact `Gelu` op: five element-wise passes and five backward passes over
//! the largest activation of a transformer block become one each. A match
//! needs every intermediate value to be read only inside the pattern and the
//! constants to be what they claim; anything else is left as it is.

use std::collections::{HashMap, HashSet};

use super::GraphIndex;
use crate::Tensor;

/// A fused GELU: the nodes it replaces, its input and its output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeluMatch {
    /// Node indices of the pattern (the last one is where the fused op goes).
    pub nodes: Vec<usize>,
    /// The GELU's input tensor.
    pub input: String,
    /// The GELU's output tensor (the last node's output).
    pub output: String,
}

fn scalar(g: &GraphIndex<'_>, name: &str) -> Option<f32> {
    match g.constant(name).ok()?? {
        Tensor::F32(a) if a.len() == 1 => a.iter().next().copied(),
        _ => None,
    }
}

fn near(v: Option<f32>, want: f32) -> bool {
    v.is_some_and(|v| (v - want).abs() <= 1e-4 * want.abs().max(1.0))
}

/// The only consumer of `t` among `within`, if it has exactly one consumer overall.
fn sole_consumer(g: &GraphIndex<'_>, t: &str, within: &HashSet<usize>) -> Option<usize> {
    match g.consumers.get(t).map(Vec::as_slice) {
        Some([c]) if within.contains(c) => Some(*c),
        _ => None,
    }
}

/// The operand of binary node `i` that is not `other` (None unless exactly one is).
fn other_input<'a>(g: &'a GraphIndex<'_>, i: usize, other: &str) -> Option<&'a str> {
    let ins = &g.nodes[i].input;
    match (ins.first().map(String::as_str), ins.get(1).map(String::as_str)) {
        (Some(a), Some(b)) if a == other && b != other => Some(b),
        (Some(a), Some(b)) if b == other && a != other => Some(a),
        _ => None,
    }
}

/// Every erf-GELU among `nodes` (tail nodes, topological order).
pub fn gelu_patterns(g: &GraphIndex<'_>, nodes: &[usize]) -> Vec<GeluMatch> {
    let within: HashSet<usize> = nodes.iter().copied().collect();
    let op = |i: usize| g.nodes[i].op_type.as_str();
    let out = |i: usize| g.nodes[i].output.first().map(String::as_str).unwrap_or("");
    let mut found = Vec::new();
    for &div in nodes {
        if op(div) != "Div" || g.nodes[div].input.len() != 2 {
            continue;
        }
        let x = g.nodes[div].input[0].as_str();
        if !near(scalar(g, &g.nodes[div].input[1]), core::f32::consts::SQRT_2) {
            continue;
        }
        let Some(erf) = sole_consumer(g, out(div), &within).filter(|&i| op(i) == "Erf") else {
            continue;
        };
        let Some(add) = sole_consumer(g, out(erf), &within).filter(|&i| op(i) == "Add") else {
            continue;
        };
        if !near(other_input(g, add, out(erf)).and_then(|c| scalar(g, c)), 1.0) {
            continue;
        }
        let Some(m1) = sole_consumer(g, out(add), &within).filter(|&i| op(i) == "Mul") else {
            continue;
        };
        let Some(m2) = sole_consumer(g, out(m1), &within).filter(|&i| op(i) == "Mul") else {
            continue;
        };
        // (x·(1+erf))·0.5 or ((1+erf)·0.5)·x
        let m1_other = other_input(g, m1, out(add));
        let m2_other = other_input(g, m2, out(m1));
        let ok = (m1_other == Some(x) && near(m2_other.and_then(|c| scalar(g, c)), 0.5))
            || (near(m1_other.and_then(|c| scalar(g, c)), 0.5) && m2_other == Some(x));
        if ok {
            found.push(GeluMatch {
                nodes: vec![div, erf, add, m1, m2],
                input: x.to_string(),
                output: out(m2).to_string(),
            });
        }
    }
    found
}

/// Node index → the fused GELU that ends there, and the set of nodes the
/// fusions remove (the ends included).
pub fn fused_gelus(
    g: &GraphIndex<'_>,
    nodes: &[usize],
) -> (HashMap<usize, GeluMatch>, HashSet<usize>) {
    let matches = gelu_patterns(g, nodes);
    let covered = matches.iter().flat_map(|m| m.nodes.iter().copied()).collect();
    let ends = matches.into_iter().map(|m| (*m.nodes.last().unwrap_or(&0), m)).collect();
    (ends, covered)
}
