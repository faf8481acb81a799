//! ONNX models: loading (external data included), the graph index the split
//! works on, the adaptable linear layers, and the split itself.
//!
//! The protobuf types are tract's (`tract_onnx::pb`, prost 0.14), so the same
//! `ModelProto` feeds tract for the frozen backbone and our own analysis.

pub mod fuse;
mod import;
pub mod layers;
pub mod split;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use prost::Message;
pub use tract_onnx::pb;

use crate::Tensor;
use crate::error::{Error, Result};

pub use layers::{LinearKind, LinearLayer, Targets};
pub use split::{Split, SplitConfig, SplitReport, WeightDtype, split};

/// Where an initializer's data lived outside the model file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalRef {
    /// The data file (absolute, or as resolved from the model's folder).
    pub file: PathBuf,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u64,
}

/// A loaded ONNX model with all initializer data in memory.
#[derive(Clone, Debug)]
pub struct OnnxModel {
    proto: pb::ModelProto,
    path: Option<PathBuf>,
    /// Initializers that were stored as external data, by name.
    external: HashMap<String, ExternalRef>,
}

impl OnnxModel {
    /// Loads `path`, resolving initializers stored as external data relative to its folder.
    pub fn load(path: impl AsRef<Path>) -> Result<OnnxModel> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        let mut model = OnnxModel::from_bytes(&bytes, path.parent())?;
        model.path = Some(path.to_path_buf());
        Ok(model)
    }

    /// Decodes a model; external data is looked up in `dir` (if any).
    pub fn from_bytes(bytes: &[u8], dir: Option<&Path>) -> Result<OnnxModel> {
        let mut proto = pb::ModelProto::decode(bytes)
            .map_err(|e| Error::Onnx(format!("cannot decode protobuf: {e}")))?;
        let graph =
            proto.graph.as_mut().ok_or_else(|| Error::Onnx("the model has no graph".into()))?;
        let mut external = HashMap::new();
        for t in graph.initializer.iter_mut() {
            if let Some(r) = resolve_external(t, dir)? {
                external.insert(t.name.clone(), r);
            }
        }
        for n in graph.node.iter_mut() {
            for a in n.attribute.iter_mut() {
                if let Some(t) = a.t.as_mut() {
                    resolve_external(t, dir)?;
                }
            }
        }
        if graph.node.is_empty() {
            return Err(Error::Onnx("the graph has no nodes".into()));
        }
        Ok(OnnxModel { proto, path: None, external })
    }

    /// Initializers that were stored as external data, with where they came from.
    pub fn external(&self) -> &HashMap<String, ExternalRef> {
        &self.external
    }

    /// The protobuf (with external data resolved into it).
    pub fn proto(&self) -> &pb::ModelProto {
        &self.proto
    }

    /// The file it was loaded from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The graph.
    pub fn graph(&self) -> &pb::GraphProto {
        self.proto.graph.as_ref().expect("checked at load")
    }

    /// The default-domain opset version.
    pub fn opset(&self) -> i64 {
        self.proto
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(0, |o| o.version)
    }

    /// Names of the graph inputs that are not initializers.
    pub fn input_names(&self) -> Vec<String> {
        let inits: HashSet<&str> =
            self.graph().initializer.iter().map(|t| t.name.as_str()).collect();
        self.graph()
            .input
            .iter()
            .map(|i| i.name.clone())
            .filter(|n| !inits.contains(n.as_str()))
            .collect()
    }

    /// Names of the graph outputs.
    pub fn output_names(&self) -> Vec<String> {
        self.graph().output.iter().map(|o| o.name.clone()).collect()
    }

    /// The declared shape of input `name`: `Some(d)` for fixed dims, `None` for symbolic ones.
    pub fn input_shape(&self, name: &str) -> Option<Vec<Option<usize>>> {
        declared_shape(self.graph().input.iter().find(|i| i.name == name)?)
    }

    /// The declared shape of output `name` (as [`OnnxModel::input_shape`]).
    pub fn output_shape(&self, name: &str) -> Option<Vec<Option<usize>>> {
        declared_shape(self.graph().output.iter().find(|o| o.name == name)?)
    }

    /// The named symbolic dims of value `name` (a graph output, an
    /// intermediate with declared `value_info`, or an input) past its first
    /// (batch) dim that are also named dims of an input past its batch dim:
    /// dims that follow the input's length (`seq`), not the model's width.
    pub fn input_following_dims(&self, name: &str) -> Vec<String> {
        use pb::tensor_shape_proto::dimension::Value;
        let g = self.graph();
        let params = |vi: &pb::ValueInfoProto| -> Vec<String> {
            let Some(pb::type_proto::Value::TensorType(t)) =
                vi.r#type.as_ref().and_then(|t| t.value.as_ref())
            else {
                return Vec::new();
            };
            t.shape
                .iter()
                .flat_map(|s| s.dim.iter().skip(1))
                .filter_map(|d| match &d.value {
                    Some(Value::DimParam(p)) if !p.is_empty() => Some(p.clone()),
                    _ => None,
                })
                .collect()
        };
        let from_inputs: Vec<String> = g.input.iter().flat_map(params).collect();
        g.output
            .iter()
            .chain(&g.value_info)
            .chain(&g.input)
            .find(|v| v.name == name)
            .map(params)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| from_inputs.contains(p))
            .collect()
    }

    /// The graph outputs, best tail end first: declared rank 2 (`[B, H]`
    /// pooled embeddings, `[B, C]` logits) before other known ranks
    /// (`[B, T, H]` hidden states, feature maps), before undeclared ones;
    /// graph order within each. The first is the default output of a split
    /// and of `inspect`.
    pub fn ranked_outputs(&self) -> Vec<String> {
        let mut outs: Vec<(usize, String)> = self
            .output_names()
            .into_iter()
            .map(|o| {
                let key = match self.output_shape(&o).map(|s| s.len()) {
                    Some(2) => 0,
                    Some(_) => 1,
                    None => 2,
                };
                (key, o)
            })
            .collect();
        outs.sort_by_key(|(k, _)| *k);
        outs.into_iter().map(|(_, o)| o).collect()
    }

    /// Whether input `name` holds integers (token ids) rather than floats.
    pub fn input_is_integer(&self, name: &str) -> bool {
        self.graph().input.iter().find(|i| i.name == name).and_then(|vi| vi.r#type.as_ref()?.value.as_ref()).is_some_and(
            |v| matches!(v, pb::type_proto::Value::TensorType(t) if t.elem_type != 1 && t.elem_type != 10 && t.elem_type != 11),
        )
    }

    /// Number of parameters in the float initializers.
    pub fn num_params(&self) -> usize {
        self.graph()
            .initializer
            .iter()
            .filter(|t| matches!(t.data_type, 1 | 10 | 11))
            .map(|t| t.dims.iter().product::<i64>().max(0) as usize)
            .sum()
    }

    /// Indexes the graph for analysis.
    pub fn index(&self) -> Result<GraphIndex<'_>> {
        GraphIndex::new(self)
    }
}

/// The declared dims of a value: `Some(d)` for fixed ones, `None` for symbolic ones.
fn declared_shape(vi: &pb::ValueInfoProto) -> Option<Vec<Option<usize>>> {
    use pb::tensor_shape_proto::dimension::Value;
    let Some(pb::type_proto::Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    Some(
        t.shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Value::DimValue(v)) if v > 0 => Some(v as usize),
                _ => None,
            })
            .collect(),
    )
}

/// Loads the bytes of an initializer stored as external data into
/// `raw_data`, returning where they came from.
fn resolve_external(t: &mut pb::TensorProto, dir: Option<&Path>) -> Result<Option<ExternalRef>> {
    if t.data_location != Some(1) {
        return Ok(None);
    }
    let get = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
    let location = get("location")
        .ok_or_else(|| Error::Onnx(format!("initializer `{}` has no external location", t.name)))?;
    let offset: u64 = get("offset")
        .map_or(Ok(0), |v| v.parse())
        .map_err(|_| Error::Onnx(format!("bad offset for `{}`", t.name)))?;
    let length: Option<u64> = get("length")
        .map(|v| v.parse())
        .transpose()
        .map_err(|_| Error::Onnx(format!("bad length for `{}`", t.name)))?;
    let dir = dir.ok_or_else(|| {
        Error::Onnx(format!("`{}` is stored externally but the model has no folder", t.name))
    })?;
    let rel = Path::new(&location);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(Error::Onnx(format!(
            "external data path `{location}` leaves the model's folder"
        )));
    }
    let file = dir.join(rel);
    // The lexical check above does not see symlinks: resolve both and compare.
    if let (Ok(real), Ok(root)) = (std::fs::canonicalize(&file), std::fs::canonicalize(dir))
        && !real.starts_with(&root)
    {
        return Err(Error::Onnx(format!(
            "external data path `{location}` resolves to {}, outside the model's folder",
            real.display()
        )));
    }
    // Read just this initializer's range: re-reading the whole data file per
    // initializer cost ~100 × 90 MB for MiniLM.
    let io =
        |source| Error::Io { context: format!("reading external data {}", file.display()), source };
    let mut f = std::fs::File::open(&file).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let end = match length {
        Some(l) => offset.checked_add(l),
        None => Some(size),
    };
    let Some(end) = end.filter(|&e| e <= size && offset <= e) else {
        return Err(Error::Onnx(format!(
            "external data for `{}` is out of range of {}",
            t.name,
            file.display()
        )));
    };
    let mut data = vec![0u8; (end - offset) as usize];
    f.seek(SeekFrom::Start(offset)).and_then(|_| f.read_exact(&mut data)).map_err(io)?;
    let start = offset as usize;
    t.raw_data = data;
    t.data_location = Some(0);
    t.external_data.clear();
    let file = std::fs::canonicalize(&file).unwrap_or(file);
    Ok(Some(ExternalRef { file, offset: start as u64, length: end - offset }))
}

/// Decodes a tensor proto into a tail tensor (float types → f32, integer and bool types → i64).
pub fn tensor_from_proto(t: &pb::TensorProto) -> Result<Tensor> {
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    let Some(count) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
        return Err(Error::Onnx(format!("tensor `{}` has an overflowing shape {dims:?}", t.name)));
    };
    let bad = || {
        Error::Onnx(format!(
            "tensor `{}` has {} bytes/values for shape {dims:?}",
            t.name,
            t.raw_data.len()
        ))
    };
    let raw = !t.raw_data.is_empty();
    let shape = ndarray::IxDyn(&dims);
    match t.data_type {
        // FLOAT, FLOAT16, DOUBLE
        1 | 10 | 11 => {
            let v: Vec<f32> = match (t.data_type, raw) {
                (1, true) => t
                    .raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                (1, false) => t.float_data.clone(),
                (10, true) => t
                    .raw_data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                (10, false) => {
                    t.int32_data.iter().map(|&b| half::f16::from_bits(b as u16).to_f32()).collect()
                }
                (_, true) => t
                    .raw_data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                    .collect(),
                (_, false) => t.double_data.iter().map(|&d| d as f32).collect(),
            };
            if v.len() != count {
                return Err(bad());
            }
            Ok(Tensor::F32(ndarray::ArrayD::from_shape_vec(shape, v).map_err(|_| bad())?))
        }
        // INT64, INT32, BOOL, INT8, UINT8, INT16
        7 | 6 | 9 | 3 | 2 | 5 => {
            let v: Vec<i64> = match (t.data_type, raw) {
                (7, true) => t
                    .raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
                (7, false) => t.int64_data.clone(),
                (6, true) => t
                    .raw_data
                    .chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
                (5, true) => t
                    .raw_data
                    .chunks_exact(2)
                    .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                    .collect(),
                (3, true) => t.raw_data.iter().map(|&b| i64::from(b as i8)).collect(),
                (_, true) => t.raw_data.iter().map(|&b| i64::from(b)).collect(),
                (_, false) => t.int32_data.iter().map(|&v| i64::from(v)).collect(),
            };
            if v.len() != count {
                return Err(bad());
            }
            Ok(Tensor::I64(ndarray::ArrayD::from_shape_vec(shape, v).map_err(|_| bad())?))
        }
        other => Err(Error::Onnx(format!("tensor `{}` has unsupported data type {other}", t.name))),
    }
}

/// Attribute lookup helpers for a node.
pub(crate) struct Attrs<'a>(&'a pb::NodeProto);

impl<'a> Attrs<'a> {
    pub(crate) fn of(n: &'a pb::NodeProto) -> Attrs<'a> {
        Attrs(n)
    }
    fn get(&self, name: &str) -> Option<&'a pb::AttributeProto> {
        self.0.attribute.iter().find(|a| a.name == name)
    }
    pub(crate) fn int(&self, name: &str) -> Option<i64> {
        self.get(name).map(|a| a.i)
    }
    pub(crate) fn float(&self, name: &str) -> Option<f32> {
        self.get(name).map(|a| a.f)
    }
    pub(crate) fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    pub(crate) fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    pub(crate) fn tensor(&self, name: &str) -> Option<&'a pb::TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }
}

/// Producers, consumers and constants of a graph.
#[derive(Debug)]
pub struct GraphIndex<'a> {
    /// The model.
    pub model: &'a OnnxModel,
    /// Nodes in file order (ONNX requires topological order; checked).
    pub nodes: &'a [pb::NodeProto],
    /// Tensor name → index of the node producing it.
    pub producer: HashMap<&'a str, usize>,
    /// Tensor name → indices of the nodes reading it.
    pub consumers: HashMap<&'a str, Vec<usize>>,
    /// Initializers by name.
    pub initializers: HashMap<&'a str, &'a pb::TensorProto>,
    /// Outputs of `Constant` nodes, by name.
    pub constant_nodes: HashMap<&'a str, usize>,
}

impl<'a> GraphIndex<'a> {
    fn new(model: &'a OnnxModel) -> Result<GraphIndex<'a>> {
        let g = model.graph();
        let initializers: HashMap<&str, &pb::TensorProto> =
            g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut constant_nodes = HashMap::new();
        let mut known: HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
        known.extend(initializers.keys());
        for (i, n) in g.node.iter().enumerate() {
            // Every ONNX operator has an output; the rest of the crate relies on `output[0]`.
            if n.output.first().is_none_or(String::is_empty) {
                return Err(Error::Onnx(format!(
                    "node {i} (`{}`, {}) has no output",
                    n.name, n.op_type
                )));
            }
            for inp in n.input.iter().filter(|s| !s.is_empty()) {
                if !known.contains(inp.as_str()) {
                    return Err(Error::Onnx(format!(
                        "node `{}` reads `{inp}` before it is produced (graph not topologically sorted or dangling)",
                        n.name
                    )));
                }
                consumers.entry(inp.as_str()).or_default().push(i);
            }
            for out in n.output.iter().filter(|s| !s.is_empty()) {
                if producer.insert(out.as_str(), i).is_some() {
                    return Err(Error::Onnx(format!("tensor `{out}` is produced twice")));
                }
                known.insert(out.as_str());
                // ConstantOfShape of a constant shape is a constant too (old
                // Caffe2 exports and "light" models produce weights this way).
                let constant_shape = n.op_type == "ConstantOfShape"
                    && n.input.first().is_some_and(|s| {
                        initializers.contains_key(s.as_str())
                            || constant_nodes.contains_key(s.as_str())
                    });
                // So is a Transpose of a constant: a tied weight read
                // transposed (dynamo's LM heads: `MatMul(x, Transpose(E))`
                // where E is also the embedding table).
                let constant_transpose = n.op_type == "Transpose"
                    && n.input.first().is_some_and(|s| {
                        initializers.contains_key(s.as_str())
                            || constant_nodes.contains_key(s.as_str())
                    });
                if n.op_type == "Constant" || constant_shape || constant_transpose {
                    constant_nodes.insert(out.as_str(), i);
                }
            }
        }
        for o in &g.output {
            if !known.contains(o.name.as_str()) {
                return Err(Error::Onnx(format!("graph output `{}` is never produced", o.name)));
            }
        }
        Ok(GraphIndex { model, nodes: &g.node, producer, consumers, initializers, constant_nodes })
    }

    /// The constant value of tensor `name` (an initializer or a Constant node's output).
    pub fn constant(&self, name: &str) -> Result<Option<Tensor>> {
        if let Some(t) = self.initializers.get(name) {
            return tensor_from_proto(t).map(Some);
        }
        let Some(&i) = self.constant_nodes.get(name) else { return Ok(None) };
        let n = &self.nodes[i];
        let a = Attrs::of(n);
        if n.op_type == "ConstantOfShape" {
            let dims = self
                .constant(&n.input[0])?
                .ok_or_else(|| Error::Onnx(format!("`{name}`: shape is not constant")))?
                .to_i64_vec("ConstantOfShape shape")?;
            let dims: Vec<usize> = dims
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<core::result::Result<_, _>>()
                .map_err(|_| Error::Onnx(format!("`{name}`: negative dims {dims:?}")))?;
            let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if count.is_none_or(|c| c > 1 << 28) {
                return Err(Error::Onnx(format!(
                    "`{name}`: ConstantOfShape {dims:?} is too large"
                )));
            }
            let value = match a.tensor("value") {
                Some(t) => tensor_from_proto(t)?,
                None => Tensor::scalar(0.0),
            };
            let shape = ndarray::IxDyn(&dims);
            return Ok(Some(match value {
                Tensor::I64(v) => Tensor::I64(ndarray::ArrayD::from_elem(
                    shape,
                    v.iter().next().copied().unwrap_or(0),
                )),
                v => {
                    let v =
                        v.to_f32("ConstantOfShape value")?.iter().next().copied().unwrap_or(0.0);
                    Tensor::F32(ndarray::ArrayD::from_elem(shape, v))
                }
            }));
        }
        if n.op_type == "Transpose" {
            let x = self
                .constant(&n.input[0])?
                .ok_or_else(|| Error::Onnx(format!("`{name}`: Transpose input is not constant")))?;
            let rank = x.shape().len();
            let perm: Vec<usize> = match a.ints("perm") {
                None => (0..rank).rev().collect(),
                Some(p) => p.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect(),
            };
            let mut seen = alloc::vec![false; rank];
            if perm.len() != rank
                || !perm.iter().all(|&d| d < rank && !core::mem::replace(&mut seen[d], true))
            {
                return Err(Error::Onnx(format!(
                    "`{name}`: Transpose perm {perm:?} for rank {rank}"
                )));
            }
            fn permute<T: Clone>(v: ndarray::ArrayD<T>, perm: &[usize]) -> ndarray::ArrayD<T> {
                v.permuted_axes(perm.to_vec()).as_standard_layout().into_owned()
            }
            return Ok(Some(match x {
                Tensor::F32(v) => Tensor::F32(permute(v, &perm)),
                Tensor::F16(v) => Tensor::F16(permute(v, &perm)),
                Tensor::I64(v) => Tensor::I64(permute(v, &perm)),
            }));
        }
        if let Some(t) = a.tensor("value") {
            return tensor_from_proto(t).map(Some);
        }
        if let Some(f) = a.float("value_float") {
            return Ok(Some(Tensor::scalar(f)));
        }
        if let Some(v) = a.int("value_int") {
            return Ok(Some(Tensor::I64(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), v))));
        }
        if let Some(v) = a.ints("value_ints") {
            return Ok(Some(Tensor::I64(ndarray::Array1::from(v).into_dyn())));
        }
        if let Some(v) = a.get("value_floats") {
            return Ok(Some(Tensor::F32(ndarray::Array1::from(v.floats.clone()).into_dyn())));
        }
        Err(Error::Onnx(format!("Constant node `{}` has no supported value attribute", n.name)))
    }

    /// The nodes that tensor `output` depends on.
    pub fn upstream(&self, output: &str) -> HashSet<usize> {
        let mut up: HashSet<usize> = HashSet::new();
        let mut tensors = vec![output];
        while let Some(t) = tensors.pop() {
            if let Some(&i) = self.producer.get(t)
                && up.insert(i)
            {
                tensors.extend(
                    self.nodes[i].input.iter().filter(|s| !s.is_empty()).map(String::as_str),
                );
            }
        }
        up
    }

    /// Whether `name` is a constant.
    pub fn is_constant(&self, name: &str) -> bool {
        self.initializers.contains_key(name) || self.constant_nodes.contains_key(name)
    }

    /// A display name for node `i` (its name, or its op and first output).
    pub fn node_name(&self, i: usize) -> String {
        let n = &self.nodes[i];
        if n.name.is_empty() {
            format!("{}:{}", n.op_type, n.output.first().map_or("", |s| s.as_str()))
        } else {
            n.name.clone()
        }
    }
}
