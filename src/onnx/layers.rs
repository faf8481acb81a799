//! The adaptable linear layers of a graph and the [`Targets`] that choose
//! among them.
//!
//! A linear layer is: a Gemm with a constant B (transA = 0; transB, alpha
//! and a constant C folded in); a MatMul with a constant 2-D weight, plus the
//! Add of a constant bias that directly follows it; a Conv with a 1×1 kernel,
//! one group, unit strides and no padding (a per-pixel linear layer over
//! channels). Weights are normalised to `W0` out×in, row-major.

use super::{Attrs, GraphIndex};
use crate::Tensor;
use crate::error::{Error, Result};

/// Which ONNX form a linear layer has.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinearKind {
    /// Gemm (`B` stored [out, in] when `trans_b`, else [in, out]).
    Gemm {
        /// transB.
        trans_b: bool,
        /// alpha (folded into W0).
        alpha: f32,
        /// beta (folded into the bias).
        beta: f32,
    },
    /// MatMul with a constant [in, out] weight (and maybe a fused bias Add).
    MatMul,
    /// 1×1 Conv, weight [out, in, 1, 1].
    Conv1x1,
}

/// One adaptable linear layer.
#[derive(Clone, Debug)]
pub struct LinearLayer {
    /// The node's name.
    pub name: String,
    /// Index of the Gemm / MatMul / Conv node.
    pub node: usize,
    /// Index of the fused bias Add (MatMul only).
    pub bias_node: Option<usize>,
    /// The form.
    pub kind: LinearKind,
    /// Initializer name of the weight.
    pub weight: String,
    /// Initializer name of the bias, if any.
    pub bias: Option<String>,
    /// The activation the layer reads.
    pub input: String,
    /// The tensor it produces (after the fused bias).
    pub output: String,
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    /// The block this layer belongs to (`…layer.5`, `block3`, …), if any.
    pub block: Option<String>,
}

impl LinearLayer {
    /// `W0` (out×in, alpha folded) and the bias (beta folded), as f32.
    pub fn weights(&self, g: &GraphIndex<'_>) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let w = const_f32(g, &self.weight)?;
        let (o, i) = (self.out_dim, self.in_dim);
        let w0: Vec<f32> = match self.kind {
            LinearKind::Gemm { trans_b: true, alpha, .. } => w.iter().map(|v| v * alpha).collect(),
            LinearKind::Gemm { trans_b: false, alpha, .. } => {
                transpose(&w, i, o).into_iter().map(|v| v * alpha).collect()
            }
            LinearKind::MatMul => transpose(&w, i, o),
            LinearKind::Conv1x1 => w,
        };
        let beta = match self.kind {
            LinearKind::Gemm { beta, .. } => beta,
            _ => 1.0,
        };
        let b = match &self.bias {
            Some(name) => {
                let t = g
                    .constant(name)?
                    .ok_or_else(|| Error::Onnx(format!("bias `{name}` is not constant")))?;
                let flat: Vec<f32> = t.f32(name)?.iter().map(|x| x * beta).collect();
                Some(match flat.len() {
                    n if n == o => flat,
                    1 => vec![flat[0]; o],
                    _ => {
                        return Err(Error::Onnx(format!("bias `{name}` does not fit {o} outputs")));
                    }
                })
            }
            None => None,
        };
        Ok((w0, b))
    }
}

fn const_f32(g: &GraphIndex<'_>, name: &str) -> Result<Vec<f32>> {
    match g.constant(name)? {
        Some(Tensor::F32(a)) => Ok(a.iter().copied().collect()),
        _ => Err(Error::Onnx(format!("`{name}` is not a float constant"))),
    }
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

fn const_shape(g: &GraphIndex<'_>, name: &str) -> Option<Vec<usize>> {
    if let Some(t) = g.initializers.get(name) {
        return Some(t.dims.iter().map(|&d| d.max(0) as usize).collect());
    }
    g.constant(name).ok().flatten().map(|t| t.shape().to_vec())
}

/// The block key of a name: the prefix through the first number that follows
/// a word like `layer`, `layers`, `block`, `blocks`, `h` or `stage`
/// (`/encoder/layer.5/attention/…` → `/encoder/layer.5`).
pub fn block_of(name: &str) -> Option<String> {
    const WORDS: [&str; 7] = ["layer", "layers", "block", "blocks", "h", "stage", "stages"];
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()) {
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            // The word before the number, skipping one separator.
            let mut e = i;
            if e > 0 && matches!(b[e - 1], b'.' | b'_' | b'/' | b'-') {
                e -= 1;
            }
            let mut s = e;
            while s > 0 && b[s - 1].is_ascii_alphabetic() {
                s -= 1;
            }
            let word = name[s..e].to_ascii_lowercase();
            let boundary = j == b.len() || !b[j].is_ascii_alphanumeric();
            if boundary && WORDS.contains(&word.as_str()) {
                return Some(name[..j].to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    None
}

/// Linear layers whose weight is quantized: a Gemm / MatMul / Conv whose
/// weight input is a `DequantizeLinear` of a constant (the QDQ format of
/// onnxruntime's quantizer and of quantization-aware exports), as
/// `(node name, weight tensor)`. They run in the frozen backbone as they are;
/// hydra-edge does not adapt them (an adapter merged into int8 weights would
/// need requantizing, which changes the model beyond the adapter).
pub fn quantized_layers(g: &GraphIndex<'_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if !matches!(n.op_type.as_str(), "Gemm" | "MatMul" | "Conv") {
            continue;
        }
        let Some(w) = n.input.get(1) else { continue };
        let dq = g.producer.get(w.as_str()).map(|&p| &g.nodes[p]);
        if dq.is_some_and(|d| {
            d.op_type == "DequantizeLinear" && d.input.first().is_some_and(|x| g.is_constant(x))
        }) {
            out.push((g.node_name(i), w.clone()));
        }
    }
    out
}

/// Whether `targets` names (or matches) the layer `name` with weight `weight`.
pub(crate) fn targets_mention(targets: &Targets, name: &str, weight: &str) -> bool {
    match targets {
        Targets::Names(ns) => ns.iter().any(|n| n == name),
        Targets::Patterns(ps) => ps.iter().any(|p| matches(p, name) || matches(p, weight)),
        _ => false,
    }
}

/// Every adaptable linear layer of the graph, in topological order.
pub fn linear_layers(g: &GraphIndex<'_>) -> Result<Vec<LinearLayer>> {
    let outputs: Vec<String> = g.model.output_names();
    let mut out = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let a = Attrs::of(n);
        let name = g.node_name(i);
        let input = n.input.first().cloned().unwrap_or_default();
        let own = |t: &str| g.consumers.get(t).is_some_and(|c| c.len() == 1);
        let mk = |kind,
                  weight: &str,
                  bias: Option<String>,
                  bias_node,
                  output: String,
                  in_dim,
                  out_dim| LinearLayer {
            // The node's name, else its weight's or bias's (exporters that
            // name nodes `node_MatMul_92` still name the bias after the
            // parameter, `bert.encoder.layer.5.output.dense.bias`) — but
            // only a tensor this layer alone reads: exporters deduplicate
            // equal constants (all-zero biases of an untrained model become
            // one `…layer.0….bias` read by every layer), and such a name
            // says nothing about the layer.
            block: block_of(&name)
                .or_else(|| Some(weight).filter(|w| own(w)).and_then(block_of))
                .or_else(|| bias.as_deref().filter(|b| own(b)).and_then(block_of)),
            name: name.clone(),
            node: i,
            bias_node,
            kind,
            weight: weight.to_string(),
            bias,
            input: input.clone(),
            output,
            in_dim,
            out_dim,
        };
        match n.op_type.as_str() {
            "Gemm"
                if n.input.len() >= 2
                    && g.is_constant(&n.input[1])
                    && a.int("transA").unwrap_or(0) == 0 =>
            {
                let Some(s) = const_shape(g, &n.input[1]).filter(|s| s.len() == 2) else {
                    continue;
                };
                let trans_b = a.int("transB").unwrap_or(0) != 0;
                let (in_dim, out_dim) = if trans_b { (s[1], s[0]) } else { (s[0], s[1]) };
                let bias = n.input.get(2).filter(|c| !c.is_empty()).cloned();
                if bias.as_ref().is_some_and(|c| !g.is_constant(c)) {
                    continue;
                }
                let kind = LinearKind::Gemm {
                    trans_b,
                    alpha: a.float("alpha").unwrap_or(1.0),
                    beta: a.float("beta").unwrap_or(1.0),
                };
                out.push(mk(kind, &n.input[1], bias, None, n.output[0].clone(), in_dim, out_dim));
            }
            "MatMul" if n.input.len() == 2 && g.is_constant(&n.input[1]) => {
                let Some(s) = const_shape(g, &n.input[1]).filter(|s| s.len() == 2) else {
                    continue;
                };
                let y = n.output[0].as_str();
                // Fuse `Add(y, bias)` when it is y's only reader and y is not a graph output.
                let fused = match g.consumers.get(y).map(Vec::as_slice) {
                    Some([c])
                        if !outputs.iter().any(|o| o == y) && g.nodes[*c].op_type == "Add" =>
                    {
                        let add = &g.nodes[*c];
                        let other = add.input.iter().find(|t| t.as_str() != y).cloned();
                        other
                            .filter(|b| g.is_constant(b))
                            .filter(|b| {
                                const_shape(g, b).is_some_and(|bs| {
                                    bs.iter().product::<usize>() == s[1] && bs.last() == Some(&s[1])
                                })
                            })
                            .map(|b| (*c, b, add.output[0].clone()))
                    }
                    _ => None,
                };
                let (bias_node, bias, output) = match fused {
                    Some((c, b, o)) => (Some(c), Some(b), o),
                    None => (None, None, y.to_string()),
                };
                out.push(mk(LinearKind::MatMul, &n.input[1], bias, bias_node, output, s[0], s[1]));
            }
            "Conv" if n.input.len() >= 2 && g.is_constant(&n.input[1]) => {
                let Some(s) =
                    const_shape(g, &n.input[1]).filter(|s| s.len() == 4 && s[2] == 1 && s[3] == 1)
                else {
                    continue;
                };
                let ones = |k: &str| a.ints(k).is_none_or(|v| v.iter().all(|&x| x == 1));
                let zeros = a.ints("pads").is_none_or(|v| v.iter().all(|&x| x == 0));
                let auto_pad_ok = a
                    .string("auto_pad")
                    .is_none_or(|p| p == "NOTSET" || p == "VALID" || p.is_empty());
                if a.int("group").unwrap_or(1) != 1
                    || !ones("strides")
                    || !ones("dilations")
                    || !zeros
                    || !auto_pad_ok
                {
                    continue;
                }
                let bias = n.input.get(2).filter(|c| !c.is_empty()).cloned();
                if bias.as_ref().is_some_and(|c| !g.is_constant(c)) {
                    continue;
                }
                out.push(mk(
                    LinearKind::Conv1x1,
                    &n.input[1],
                    bias,
                    None,
                    n.output[0].clone(),
                    s[1],
                    s[0],
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Which layers get adapters (PEFT's `target_modules`, in this graph's terms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Layers whose node, weight or output name matches any pattern: `*`
    /// and `?` are wildcards over the whole name; a pattern without them
    /// matches as a substring.
    Patterns(Vec<String>),
    /// Every linear layer.
    AllLinear,
    /// Every linear layer of the last K blocks (see [`block_of`]).
    LastBlocks(usize),
    /// Exactly these layers (node names), e.g. as listed in an adapter file.
    Names(Vec<String>),
    /// No adapters: the tail is just the output tensor, for training a new
    /// head on frozen features ("head-only", linear probing).
    None,
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Whether `pattern` matches `name` (see [`Targets::Patterns`]).
pub fn matches(pattern: &str, name: &str) -> bool {
    if pattern.contains(['*', '?']) {
        glob(pattern.as_bytes(), name.as_bytes())
    } else {
        name.contains(pattern)
    }
}

impl Targets {
    /// The chosen layers, or an error if nothing matches.
    pub fn select<'l>(&self, layers: &'l [LinearLayer]) -> Result<Vec<&'l LinearLayer>> {
        let chosen: Vec<&LinearLayer> = match self {
            Targets::None => return Ok(Vec::new()),
            Targets::Names(names) => {
                let mut out = Vec::new();
                for n in names {
                    out.push(
                        layers
                            .iter()
                            .find(|l| &l.name == n)
                            .ok_or_else(|| Error::NotFound { what: "layer", name: n.clone() })?,
                    );
                }
                out.sort_by_key(|l| l.node);
                out
            }
            Targets::AllLinear => layers.iter().collect(),
            Targets::Patterns(ps) => {
                for p in ps {
                    let hit = layers
                        .iter()
                        .any(|l| [&l.name, &l.weight, &l.output].iter().any(|n| matches(p, n)));
                    if !hit {
                        return Err(Error::NotFound {
                            what: "target layer matching pattern",
                            name: p.clone(),
                        });
                    }
                }
                layers
                    .iter()
                    .filter(|l| {
                        ps.iter()
                            .any(|p| [&l.name, &l.weight, &l.output].iter().any(|n| matches(p, n)))
                    })
                    .collect()
            }
            Targets::LastBlocks(k) => {
                let mut blocks: Vec<&str> = Vec::new();
                for l in layers {
                    if let Some(b) = &l.block
                        && !blocks.contains(&b.as_str())
                    {
                        blocks.push(b);
                    }
                }
                if blocks.is_empty() || *k == 0 {
                    return Err(Error::NotFound {
                        what: "blocks (names like `layer.N` or `blockN`) in",
                        name: "the model".into(),
                    });
                }
                let keep = &blocks[blocks.len().saturating_sub(*k)..];
                layers
                    .iter()
                    .filter(|l| l.block.as_deref().is_some_and(|b| keep.contains(&b)))
                    .collect()
            }
        };
        if chosen.is_empty() {
            return Err(Error::NotFound { what: "target layers for", name: format!("{self:?}") });
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_follow_layer_words() {
        assert_eq!(
            block_of("/encoder/layer.5/attention/self/query/MatMul").as_deref(),
            Some("/encoder/layer.5")
        );
        assert_eq!(block_of("block1/attn/q/MatMul").as_deref(), Some("block1"));
        assert_eq!(block_of("blocks.6.0.conv_pwl").as_deref(), Some("blocks.6"));
        assert_eq!(block_of("fc1"), None);
        assert_eq!(block_of("conv_head"), None);
    }

    #[test]
    fn patterns_glob_or_substring() {
        assert!(matches("attn/q", "block1/attn/q/MatMul"));
        assert!(matches("block?/ffn/*", "block1/ffn/fc2/MatMul"));
        assert!(!matches("block?/ffn", "block1/ffn/fc2/MatMul"));
        assert!(matches("*fc2*", "block1/ffn/fc2/MatMul"));
    }
}
