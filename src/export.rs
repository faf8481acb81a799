//! Merging trained adapters into the original ONNX model and writing it out.
//!
//! Only the adapted initializers change (merged in f32 from the file's own
//! f32 weights, even when the tail stored them f16): MatMul weights are
//! `[in, out]`, Gemm's B is `[out, in]` with transB (alpha and beta undone),
//! a 1×1 Conv's weight `[out, in, 1, 1]`. A bias the sequential branch
//! creates is added (Gemm C, Conv B, or an Add after a MatMul). A new head is
//! appended as a Gemm (and optional Softmax) with named outputs. Everything
//! else is left as it was; initializers the input kept as external data stay
//! external, in a weights file copied next to the output (a copy, not a hard
//! link: the `onnx` Python package refuses external data files with several
//! links as a possible hardlink attack, for the base model and the merged one
//! alike), and the merged file points there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, Result};
use crate::hydra::{HydraLinear, Weights};
use crate::model::{AdaptedModel, LinearHead};
use crate::onnx::layers::{LinearKind, LinearLayer};
use crate::onnx::{OnnxModel, pb};

/// A new head to append: `outputs = Gemm(feature, W, b)` (+ Softmax).
#[derive(Clone, Debug)]
pub struct HeadExport<'a> {
    /// The trained head.
    pub head: &'a LinearHead,
    /// The feature tensor it reads.
    pub feature: String,
    /// Name of the logits output.
    pub logits: String,
    /// Also append a Softmax with this output name.
    pub softmax: Option<String>,
}

/// What a merge wrote.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// The merged model.
    pub path: PathBuf,
    /// Layers merged.
    pub layers: usize,
    /// External weights files written next to it.
    pub external_files: Vec<PathBuf>,
}

/// `base`, or `base_K` for the first K that no tensor or node uses yet; taken.
fn fresh(taken: &mut std::collections::HashSet<String>, base: String) -> String {
    let mut name = base.clone();
    let mut k = 1;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}

/// A tensor of `dtype` (ONNX: 1 f32, 10 f16, 11 f64; anything else is
/// written f32) holding `v`: merged weights keep the model's own type, so an
/// fp16 model merges into an fp16 model.
fn typed_tensor(name: &str, dims: &[usize], v: &[f32], dtype: i32) -> pb::TensorProto {
    let (data_type, raw_data): (i32, Vec<u8>) = match dtype {
        10 => (10, v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()),
        11 => (11, v.iter().flat_map(|x| f64::from(*x).to_le_bytes()).collect()),
        _ => (1, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type,
        raw_data,
        ..Default::default()
    }
}

/// The element type of tensor `name`: an initializer's, a Constant node's
/// value's, else what the graph declares for it (inputs, outputs,
/// value_info); f32 (1) when nothing says.
fn dtype_of(g: &crate::onnx::GraphIndex<'_>, name: &str) -> i32 {
    if let Some(t) = g.initializers.get(name) {
        return t.data_type;
    }
    if let Some(&i) = g.constant_nodes.get(name)
        && let Some(t) =
            g.nodes[i].attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref())
    {
        return t.data_type;
    }
    let graph = g.model.graph();
    graph
        .value_info
        .iter()
        .chain(&graph.output)
        .chain(&graph.input)
        .find(|v| v.name == name)
        .and_then(|v| {
            let pb::type_proto::Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
            Some(t.elem_type)
        })
        .unwrap_or(1)
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

/// `(W', b')` of one layer, merged in f32 from the model's own weights.
fn merged(
    model: &OnnxModel,
    layer: &LinearLayer,
    trained: &HydraLinear,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let g = model.index()?;
    let (w0, b0) = layer.weights(&g)?;
    let mut h = HydraLinear::new(
        trained.config().clone(),
        Weights::F32(w0),
        b0,
        layer.in_dim,
        layer.out_dim,
    )?;
    for (dst, src) in
        h.branches_mut().zip([trained.parallel(), trained.sequential()].into_iter().flatten())
    {
        *dst = src.clone();
    }
    h.merged_weights()
}

/// Writes `model` with the adapters of `split` merged in (and `head`
/// appended) to `out`, atomically.
pub fn merge_into_onnx(
    model: &OnnxModel,
    split: &AdaptedModel,
    head: Option<HeadExport<'_>>,
    out: &Path,
) -> Result<MergeReport> {
    merge_into_onnx_checked(model, split, head, out, &mut |_| Ok(()))
}

/// Like [`merge_into_onnx`], but `verify` is first handed the merged model
/// written to a temporary file beside `out` (so that its external data
/// resolves); only if it returns `Ok` is that file renamed onto `out`. On
/// failure nothing is left behind: not the temporary file, not the external
/// weights files this merge placed, and `out` is untouched.
pub fn merge_into_onnx_checked(
    model: &OnnxModel,
    split: &AdaptedModel,
    head: Option<HeadExport<'_>>,
    out: &Path,
    verify: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<MergeReport> {
    let (bytes, placed) = build(model, split, head, out)?;
    let external_files = finish(&bytes, placed, out, verify)?;
    Ok(MergeReport {
        path: out.to_path_buf(),
        layers: split.adapted_layers().len(),
        external_files,
    })
}

/// The merged model's bytes, and the external weights files placed beside `out`.
fn build(
    model: &OnnxModel,
    split: &AdaptedModel,
    head: Option<HeadExport<'_>>,
    out: &Path,
) -> Result<(Vec<u8>, Vec<Placed>)> {
    crate::output::check_kind(out)?;
    let mut proto = model.proto().clone();
    let g = model.index()?;
    let mut uses: HashMap<String, usize> = HashMap::new();
    for n in g.nodes {
        for i in &n.input {
            *uses.entry(i.clone()).or_default() += 1;
        }
    }
    let adapters: HashMap<&str, &HydraLinear> = split.tail().adapters().collect();
    let mut new_inits: Vec<pb::TensorProto> = Vec::new();
    let mut replaced: HashMap<String, pb::TensorProto> = HashMap::new();
    let mut extra_nodes: Vec<(usize, pb::NodeProto)> = Vec::new();
    let graph = proto.graph.as_mut().ok_or_else(|| Error::Onnx("no graph".into()))?;
    // Every name the graph already uses: a new tensor must take none of them
    // (node names may be empty or repeated in ONNX, so they are not relied on).
    let mut taken: std::collections::HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().chain(n.input.iter()).chain(std::iter::once(&n.name)))
        .chain(graph.initializer.iter().map(|t| &t.name))
        .chain(graph.input.iter().map(|v| &v.name))
        .chain(graph.output.iter().map(|v| &v.name))
        .cloned()
        .collect();
    for layer in split.adapted_layers() {
        let trained = adapters.get(layer.name.as_str()).ok_or_else(|| Error::NotFound {
            what: "adapter for layer",
            name: layer.name.clone(),
        })?;
        let (w, b) = merged(model, layer, trained)?;
        let (o, i) = (layer.out_dim, layer.in_dim);
        let (data, dims, alpha, beta) = match layer.kind {
            LinearKind::MatMul => (transpose(&w, o, i), vec![i, o], 1.0, 1.0),
            LinearKind::Gemm { trans_b: true, alpha, beta } => (w, vec![o, i], alpha, beta),
            LinearKind::Gemm { trans_b: false, alpha, beta } => {
                (transpose(&w, o, i), vec![i, o], alpha, beta)
            }
            LinearKind::Conv1x1 => (w, vec![o, i, 1, 1], 1.0, 1.0),
        };
        if alpha == 0.0 || beta == 0.0 && b.is_some() && layer.bias.is_some() {
            return Err(Error::Onnx(format!(
                "layer `{}` has alpha or beta 0; cannot merge into it",
                layer.name
            )));
        }
        let data: Vec<f32> = data.into_iter().map(|v| v / alpha).collect();
        // A weight shared with another node, or produced by a node (Constant,
        // ConstantOfShape) rather than an initializer, gets a new initializer
        // of its own under a fresh name.
        let is_init = g.initializers.contains_key(layer.weight.as_str());
        let wname = if uses.get(&layer.weight).copied().unwrap_or(0) > 1 || !is_init {
            fresh(&mut taken, format!("{}/merged_weight", layer.name))
        } else {
            layer.weight.clone()
        };
        let node = &mut graph.node[layer.node];
        node.input[1] = wname.clone();
        let wtype = dtype_of(&g, &layer.weight);
        replaced.insert(wname.clone(), typed_tensor(&wname, &dims, &data, wtype));
        let Some(b) = b else { continue };
        match (&layer.bias, layer.kind) {
            (Some(bname), _) => {
                let old = g
                    .initializers
                    .get(bname.as_str())
                    .map(|t| t.dims.iter().map(|&d| d as usize).collect::<Vec<_>>())
                    .unwrap_or_else(|| vec![o]);
                let dims = if old.iter().product::<usize>() == o { old } else { vec![o] };
                let scaled: Vec<f32> = b.iter().map(|v| v / beta).collect();
                let bname2 = if uses.get(bname).copied().unwrap_or(0) > 1
                    || !g.initializers.contains_key(bname.as_str())
                {
                    fresh(&mut taken, format!("{}/merged_bias", layer.name))
                } else {
                    bname.clone()
                };
                if bname2 != *bname {
                    let target = layer.bias_node.unwrap_or(layer.node);
                    for inp in graph.node[target].input.iter_mut().filter(|s| *s == bname) {
                        *inp = bname2.clone();
                    }
                }
                let btype = dtype_of(&g, bname);
                replaced.insert(bname2.clone(), typed_tensor(&bname2, &dims, &scaled, btype));
            }
            (None, LinearKind::Gemm { .. } | LinearKind::Conv1x1) => {
                let bname = fresh(&mut taken, format!("{}/merged_bias", layer.name));
                let node = &mut graph.node[layer.node];
                node.input.resize(2, String::new());
                node.input.push(bname.clone());
                if let LinearKind::Gemm { .. } = layer.kind {
                    node.attribute.retain(|a| a.name != "beta");
                }
                new_inits.push(typed_tensor(&bname, &[o], &b, wtype));
            }
            (None, LinearKind::MatMul) => {
                let node = &mut graph.node[layer.node];
                let y = node.output[0].clone();
                let pre = fresh(&mut taken, format!("{}/merged_pre_bias", layer.name));
                node.output[0] = pre.clone();
                let bname = fresh(&mut taken, format!("{}/merged_bias", layer.name));
                new_inits.push(typed_tensor(&bname, &[o], &b, wtype));
                extra_nodes.push((
                    layer.node + 1,
                    pb::NodeProto {
                        name: fresh(&mut taken, format!("{}/merged_bias_add", layer.name)),
                        op_type: "Add".into(),
                        input: vec![pre, bname],
                        output: vec![y],
                        ..Default::default()
                    },
                ));
            }
        }
    }
    let changed: std::collections::HashSet<String> = replaced.keys().cloned().collect();
    for (at, n) in extra_nodes.into_iter().rev() {
        graph.node.insert(at, n);
    }
    for t in graph.initializer.iter_mut() {
        if let Some(r) = replaced.remove(&t.name) {
            *t = r;
        }
    }
    graph.initializer.extend(replaced.into_values());
    graph.initializer.extend(new_inits);
    if let Some(h) = head {
        let (i, o) = h.head.dims();
        for name in std::iter::once(&h.logits).chain(h.softmax.as_ref()) {
            if taken.contains(name) {
                return Err(Error::Config(format!(
                    "the model already has a tensor named `{name}`; the new head's output needs that name"
                )));
            }
        }
        let (wname, bname) =
            (fresh(&mut taken, "head.weight".into()), fresh(&mut taken, "head.bias".into()));
        // The head computes in its feature's type (f32 unless the model says otherwise).
        let htype = dtype_of(&g, &h.feature);
        graph.initializer.push(typed_tensor(&wname, &[o, i], &h.head.w, htype));
        graph.initializer.push(typed_tensor(&bname, &[o], &h.head.b, htype));
        // Features of rank > 2 ([N, C, 1, 1] after a pool, [N, T, H]) are
        // flattened as the trained head saw them; a no-op on [N, C].
        let flat = fresh(&mut taken, format!("{}/flat", h.feature));
        graph.node.push(pb::NodeProto {
            name: fresh(&mut taken, "head/flatten".into()),
            op_type: "Flatten".into(),
            input: vec![h.feature.clone()],
            output: vec![flat.clone()],
            attribute: vec![pb::AttributeProto {
                name: "axis".into(),
                r#type: 2,
                i: 1,
                ..Default::default()
            }],
            ..Default::default()
        });
        let gemm = pb::NodeProto {
            name: fresh(&mut taken, "head".into()),
            op_type: "Gemm".into(),
            input: vec![flat, wname, bname],
            output: vec![h.logits.clone()],
            attribute: vec![pb::AttributeProto {
                name: "transB".into(),
                r#type: 2,
                i: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        graph.node.push(gemm);
        let out_info = |name: &str| value_info(name, o, htype);
        graph.output.push(out_info(&h.logits));
        if let Some(p) = &h.softmax {
            graph.node.push(pb::NodeProto {
                name: fresh(&mut taken, "head/softmax".into()),
                op_type: "Softmax".into(),
                input: vec![h.logits.clone()],
                output: vec![p.clone()],
                attribute: vec![pb::AttributeProto {
                    name: "axis".into(),
                    r#type: 2,
                    i: -1,
                    ..Default::default()
                }],
                ..Default::default()
            });
            graph.output.push(out_info(p));
        }
    }
    // Declared intermediate types that contradict the graph (the backbone
    // had to ignore them) would make the merged file invalid for onnxruntime
    // too: they are hints, so they go.
    if split.backbone().ignored_value_info() {
        graph.value_info.clear();
    }
    let placed = externalize(graph, model, &changed, out)?;
    Ok((proto.encode_to_vec(), placed))
}

/// Writes `bytes` to a temporary file beside `out`, has `verify` check it,
/// and renames it onto `out`; on any failure removes the temporary file and
/// the external files this merge created.
fn finish(
    bytes: &[u8],
    placed: Vec<Placed>,
    out: &Path,
    verify: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    let written = write_temp(out, bytes).and_then(|tmp| {
        let checked = verify(&tmp).and_then(|()| commit(&tmp, out));
        if checked.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        checked
    });
    if let Err(e) = written {
        for f in placed.iter().filter(|p| p.created) {
            let _ = std::fs::remove_file(&f.path);
        }
        return Err(e);
    }
    Ok(placed.into_iter().map(|p| p.path).collect())
}

fn value_info(name: &str, width: usize, elem_type: i32) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let dim = |v: Value| Dimension { value: Some(v), ..Default::default() };
    let shape = pb::TensorShapeProto {
        dim: vec![dim(Value::DimParam("N".into())), dim(Value::DimValue(width as i64))],
    };
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type,
                shape: Some(shape),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An external weights file the merged model points at.
struct Placed {
    path: PathBuf,
    /// Made by this merge (a link or copy), so removed again if it fails.
    created: bool,
}

/// Whether the files at `a` and `b` hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(fa), Ok(fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else { return false };
    match (fa.metadata(), fb.metadata()) {
        (Ok(ma), Ok(mb)) if ma.len() == mb.len() => {}
        _ => return false,
    }
    let (mut ra, mut rb) = (std::io::BufReader::new(fa), std::io::BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match ra.read(&mut ba) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 {
            return true;
        }
        if rb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Points untouched, originally external initializers back at their data,
/// copied next to `out`. A file of the same name that
/// is already there is used only if it holds the same bytes; otherwise the
/// data goes under a new name. Nothing that is there is ever removed.
fn externalize(
    graph: &mut pb::GraphProto,
    model: &OnnxModel,
    changed: &std::collections::HashSet<String>,
    out: &Path,
) -> Result<Vec<Placed>> {
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut placed: HashMap<PathBuf, String> = HashMap::new();
    let mut files: Vec<Placed> = Vec::new();
    let result = (|| -> Result<()> {
        for t in graph.initializer.iter_mut() {
            let Some(r) = model.external().get(&t.name) else { continue };
            // Merged tensors carry new data: they stay inline.
            if changed.contains(&t.name) {
                continue;
            }
            let location = match placed.get(&r.file) {
                Some(l) => l.clone(),
                None => {
                    let name = r
                        .file
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "weights.bin".into());
                    let (name, target, created) = place(&r.file, dir, &name)?;
                    files.push(Placed { path: target, created });
                    placed.insert(r.file.clone(), name.clone());
                    name
                }
            };
            let kv = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
            t.raw_data.clear();
            t.data_location = Some(1);
            t.external_data = vec![
                kv("location", location),
                kv("offset", r.offset.to_string()),
                kv("length", r.length.to_string()),
            ];
        }
        Ok(())
    })();
    if let Err(e) = result {
        for f in files.iter().filter(|p| p.created) {
            let _ = std::fs::remove_file(&f.path);
        }
        return Err(e);
    }
    Ok(files)
}

/// Puts the data file `src` into `dir` as `name` (or, when another file
/// holds that name, `stem.N.ext`): `(name used, path, whether it was created)`.
fn place(src: &Path, dir: &Path, name: &str) -> Result<(String, PathBuf, bool)> {
    let stem = Path::new(name).file_stem().map(|s| s.to_string_lossy().into_owned());
    let ext = Path::new(name).extension().map(|s| s.to_string_lossy().into_owned());
    for k in 0..1000 {
        let candidate = match (k, &stem, &ext) {
            (0, _, _) => name.to_string(),
            (_, Some(s), Some(e)) => format!("{s}.{k}.{e}"),
            _ => format!("{name}.{k}"),
        };
        let target = dir.join(&candidate);
        let exists = std::fs::symlink_metadata(&target).is_ok();
        if exists {
            let same_file = std::fs::canonicalize(&target).ok() == std::fs::canonicalize(src).ok();
            if same_file || same_bytes(&target, src) {
                return Ok((candidate, target, false));
            }
            continue;
        }
        // Copied, never hard-linked (see the module docs); the copy is made
        // to a temporary name and renamed, so a kill leaves no torn file
        // under the name the merged model points at.
        let tmp = dir.join(format!(".{candidate}.tmp-{}", std::process::id()));
        let copied = std::fs::copy(src, &tmp)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &target));
        if let Err(source) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Io {
                context: format!("copying external data to {}", target.display()),
                source,
            });
        }
        return Ok((candidate, target, true));
    }
    Err(Error::Config(format!(
        "no free name for the external data file `{name}` in {}",
        dir.display()
    )))
}

/// Temp file in the same folder, fsync, rename: a crash leaves the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::output::check_kind(path)?;
    let tmp = write_temp(path, bytes)?;
    commit(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Writes and fsyncs `bytes` to a new temporary file beside `path`.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    use std::io::Write;
    let io = |context: String| move |source| Error::Io { context, source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    // A new file, never one that is there (a symlink planted at the name included).
    let create = || std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp);
    let mut f = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // This process's own leftover (a pid is not reused while it runs).
            std::fs::remove_file(&tmp).and_then(|()| create())
        }
        r => r,
    }
    .map_err(io(format!("creating {}", tmp.display())))?;
    if let Err(e) = f.write_all(bytes).and_then(|_| f.sync_all()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(format!("writing {}", tmp.display()))(e));
    }
    Ok(tmp)
}

/// Renames the finished temporary file onto `path` and syncs the folder.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    // Checked again at the rename: the target may have changed since.
    crate::output::check_kind(path)?;
    std::fs::rename(tmp, path).map_err(|source| Error::Io {
        context: format!("renaming {} onto {}", tmp.display(), path.display()),
        source,
    })?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    // Temporaries of writes to `path` that were killed before their rename
    // (named by their process id: a live process's are left alone).
    if let (Some(name), Ok(entries)) = (path.file_name(), std::fs::read_dir(dir)) {
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && !crate::output::process_alive(pid) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Merges the adapter file `file` (trained on `model`) into `model`, writing
/// `out`; a new head in the file is appended (with a Softmax output if
/// `softmax`). Refused if the file was trained on another base model.
pub fn merge_adapter_file(
    model: &OnnxModel,
    file: &crate::adapter::AdapterFile,
    out: &Path,
    softmax: bool,
) -> Result<(MergeReport, AdaptedModel)> {
    merge_adapter_file_checked(model, file, out, softmax, &mut |_, _| Ok(()))
}

/// Like [`merge_adapter_file`], with `verify` run on the merged file (at a
/// temporary path) and the unmerged model before `out` is written; see
/// [`merge_into_onnx_checked`].
pub fn merge_adapter_file_checked(
    model: &OnnxModel,
    file: &crate::adapter::AdapterFile,
    out: &Path,
    softmax: bool,
    verify: &mut dyn FnMut(&Path, &mut AdaptedModel) -> Result<()>,
) -> Result<(MergeReport, AdaptedModel)> {
    let mut adapted = AdaptedModel::from_adapter_file(model, file)?;
    let export = adapted.head().map(|h| HeadExport {
        head: h,
        feature: adapted.report().output.clone(),
        logits: "head_logits".into(),
        softmax: softmax.then(|| "head_probs".to_string()),
    });
    let (bytes, placed) = build(model, &adapted, export, out)?;
    let external_files = finish(&bytes, placed, out, &mut |p| verify(p, &mut adapted))?;
    let report = MergeReport {
        path: out.to_path_buf(),
        layers: adapted.adapted_layers().len(),
        external_files,
    };
    Ok((report, adapted))
}
