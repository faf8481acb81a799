//! The split on the committed test models: tract prefix + tail engine (with
//! fresh, identity adapters) gives tract's own whole-model outputs, at batch
//! sizes 1, 3 and 8; and bad models, tensors and patterns are clear errors.
#![cfg(feature = "onnx")]

mod common;

use std::path::PathBuf;

use hydra_edge::Tensor;
use hydra_edge::backbone::{Backbone, Feed};
use hydra_edge::model::AdaptedModel;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::rng::Rng;
use hydra_edge::{Error, HydraConfig};
use ndarray::{ArrayD, IxDyn};

fn model_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/test").join(name)
}

/// Random inputs for every model input at `batch` (a mask input gets 0/1 with
/// the first position always kept).
fn feed(model: &OnnxModel, batch: usize, seed: u64) -> Feed {
    let mut rng = Rng::new(seed);
    let mut f = Feed::new();
    for name in model.input_names() {
        let dims: Vec<usize> = model
            .input_shape(&name)
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, d)| d.unwrap_or(if i == 0 { batch } else { 8 }))
            .collect();
        let len: usize = dims.iter().product();
        let v: Vec<f32> = if name == "mask" {
            (0..len)
                .map(|i| if i % dims[1] == 0 || rng.next_f32() > 0.3 { 1.0 } else { 0.0 })
                .collect()
        } else {
            (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect()
        };
        f.insert(name, Tensor::F32(ArrayD::from_shape_vec(IxDyn(&dims), v).unwrap()));
    }
    f
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.f32("a").unwrap(), b.f32("b").unwrap());
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

fn check_parity(file: &str, targets: Targets, output: Option<&str>) -> AdaptedModel {
    let model = OnnxModel::load(model_path(file)).unwrap();
    let cfg = SplitConfig { targets, output: output.map(str::to_string), ..SplitConfig::default() };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    let out_name = split.report().output.clone();
    let whole = Backbone::new(&model, std::slice::from_ref(&out_name)).unwrap();
    for batch in [1, 3, 8] {
        let f = feed(&model, batch, batch as u64);
        let want = whole.run(&f).unwrap().remove(0);
        let got = split.forward(&f, false).unwrap();
        let e = max_rel(&got, &want);
        assert!(e <= 1e-4, "{file} → {out_name}, batch {batch}: rel err {e:e}");
    }
    split
}

#[test]
fn mlp_parity_with_two_cuts() {
    let s = check_parity("mlp.onnx", Targets::Patterns(vec!["fc2".into()]), None);
    let ops: Vec<&str> = s.report().tail_ops.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(ops, ["Gemm", "Relu", "Gemm"]);
    assert_eq!(s.report().boundary, ["relu1_out"]);
    let s = check_parity("mlp.onnx", Targets::AllLinear, None);
    assert_eq!(s.report().boundary, ["x"], "whole model in the tail: the input is the boundary");
    assert_eq!(s.report().adapted.len(), 3);
}

#[test]
fn mlp_with_external_data_parity() {
    check_parity("mlp_external.onnx", Targets::AllLinear, None);
}

#[test]
fn transformer_last_block_parity_hidden_and_logits() {
    let s = check_parity("transformer.onnx", Targets::LastBlocks(1), Some("hidden"));
    assert!(
        s.report().adapted.iter().all(|n| n.starts_with("block1/")),
        "{:?}",
        s.report().adapted
    );
    assert_eq!(s.report().adapted.len(), 6, "q, k, v, out, fc1, fc2");
    // The mask term is computed by the backbone and handed over.
    assert!(
        s.report().boundary.iter().any(|b| b.starts_with("mask/")),
        "{:?}",
        s.report().boundary
    );
    check_parity("transformer.onnx", Targets::LastBlocks(2), Some("logits"));
    check_parity(
        "transformer.onnx",
        Targets::Patterns(vec!["block1/ffn/*".into()]),
        Some("pooled"),
    );
}

#[test]
fn transformer_layernorm17_parity() {
    let s = check_parity("transformer_ln17.onnx", Targets::LastBlocks(1), Some("logits"));
    assert!(s.report().tail_ops.iter().any(|(o, _)| o == "LayerNormalization"));
}

#[test]
fn cnn_head_parity() {
    let s = check_parity(
        "cnn.onnx",
        Targets::Patterns(vec!["conv_head".into(), "classifier".into()]),
        None,
    );
    let ops: Vec<&str> = s.report().tail_ops.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(ops, ["Conv", "Clip", "GlobalAveragePool", "Flatten", "Gemm"]);
    assert!(s.report().trainable_params > 0);
    assert!(s.report().tail_frozen_params >= 32 * 16 + 32 + 10 * 32 + 10);
}

#[test]
fn report_counts_and_memory_estimate() {
    let model = OnnxModel::load(model_path("transformer.onnx")).unwrap();
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(1),
        adapter: HydraConfig::default(),
        ..SplitConfig::default()
    };
    let mut s = AdaptedModel::new(&model, &cfg).unwrap();
    let r = s.report().clone();
    // 4 attention (32×32) + fc1 (32→64) + fc2 (64→32), Hydra r_p = 4, r_s = 8.
    let hydra = |i: usize, o: usize| 4 * i + o * 4 + 8 * o + o * 8;
    let want = 4 * hydra(32, 32) + hydra(32, 64) + hydra(64, 32);
    assert_eq!(r.trainable_params, want);
    assert!(r.model_params > r.tail_frozen_params);
    let m = s.estimate_memory(&feed(&model, 4, 1)).unwrap();
    assert!(m.per_sample_bytes > 8 * 32 * 4, "{m:?}");
    assert!(m.at_batch(16) > m.at_batch(1));
}

#[test]
fn bad_inputs_are_clear_errors() {
    // Malformed and truncated files.
    assert!(matches!(OnnxModel::from_bytes(b"not a model at all", None), Err(Error::Onnx(_))));
    let bytes = std::fs::read(model_path("transformer.onnx")).unwrap();
    for cut in [10, bytes.len() / 3, bytes.len() - 7] {
        let r = OnnxModel::from_bytes(&bytes[..cut], None);
        assert!(r.is_err(), "truncated at {cut} must fail");
    }
    let model = OnnxModel::load(model_path("transformer.onnx")).unwrap();
    // A feature tensor that does not exist.
    let cfg = SplitConfig { output: Some("no_such_tensor".into()), ..SplitConfig::default() };
    assert!(matches!(AdaptedModel::new(&model, &cfg), Err(Error::NotFound { .. })));
    // A pattern that matches nothing.
    let cfg = SplitConfig {
        targets: Targets::Patterns(vec!["decoder".into()]),
        ..SplitConfig::default()
    };
    let e = AdaptedModel::new(&model, &cfg).unwrap_err();
    assert!(matches!(&e, Error::NotFound { name, .. } if name == "decoder"), "{e}");
    // A missing file.
    assert!(matches!(OnnxModel::load(model_path("nope.onnx")), Err(Error::Io { .. })));
    // An unsupported op in the tail, reported with its node at split time.
    let mlp = OnnxModel::load(model_path("mlp.onnx")).unwrap();
    let mut proto = mlp.proto().clone();
    let relu = proto.graph.as_mut().unwrap().node.iter_mut().find(|n| n.name == "relu2").unwrap();
    relu.op_type = "Softplus".into();
    let edited = OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap();
    let cfg =
        SplitConfig { targets: Targets::Patterns(vec!["fc2".into()]), ..SplitConfig::default() };
    let e = AdaptedModel::new(&edited, &cfg).unwrap_err();
    assert!(
        matches!(&e, Error::UnsupportedOp { op, node, .. } if op == "Softplus" && node == "relu2"),
        "{e}"
    );
    // ...but the same op upstream of every adapted layer stays in tract.
    let cfg =
        SplitConfig { targets: Targets::Patterns(vec!["head".into()]), ..SplitConfig::default() };
    let f = feed(&edited, 2, 5);
    let mut split = AdaptedModel::new(&edited, &cfg).unwrap();
    let whole = Backbone::new(&edited, &["logits".to_string()]).unwrap();
    assert!(max_rel(&split.forward(&f, false).unwrap(), &whole.run(&f).unwrap()[0]) <= 1e-4);
    // A 3×3 Conv in the tail is refused with the reason.
    let cnn = OnnxModel::load(model_path("cnn.onnx")).unwrap();
    let mut proto = cnn.proto().clone();
    let g = proto.graph.as_mut().unwrap();
    let conv1 = g.node.iter().position(|n| n.name == "conv1").unwrap();
    let mut stem = g.node[conv1].clone();
    // Turn conv1 into an (adaptable) 1×1 conv ahead of the 3×3 conv2.
    let w = g.initializer.iter_mut().find(|t| t.name == "conv1.weight").unwrap();
    w.dims = vec![8, 3, 1, 1];
    w.raw_data.truncate(8 * 3 * 4);
    w.float_data.truncate(8 * 3);
    stem.attribute.retain(|a| a.name != "pads");
    g.node[conv1] = stem;
    let edited = OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap();
    let mut small = HydraConfig::default();
    small.parallel.rank = 2;
    small.sequential.rank = 2;
    let cfg = SplitConfig {
        targets: Targets::Patterns(vec!["conv1".into()]),
        adapter: small,
        ..SplitConfig::default()
    };
    let e = AdaptedModel::new(&edited, &cfg).unwrap_err();
    assert!(
        matches!(&e, Error::UnsupportedOp { op, node, .. } if op == "Conv" && node == "conv2"),
        "{e}"
    );
}

/// Backward through the whole tail (attention, LayerNorm, GELU, Gather,
/// classifier) against finite differences on adapter parameters.
#[test]
fn tail_backward_matches_finite_differences_on_adapter_params() {
    let model = OnnxModel::load(model_path("transformer.onnx")).unwrap();
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(1),
        output: Some("logits".into()),
        ..SplitConfig::default()
    };
    let mut s = AdaptedModel::new(&model, &cfg).unwrap();
    let mut rng = Rng::new(12);
    for (_, a) in s.tail_mut().adapters_mut() {
        for br in a.branches_mut() {
            br.b.iter_mut().for_each(|v| *v = rng.uniform(-0.2, 0.2));
        }
    }
    let f = feed(&model, 3, 4);
    let boundary = s.prefix(&f).unwrap();
    let y = s.tail_mut().forward(boundary.clone(), true).unwrap();
    let g = ArrayD::from_shape_vec(IxDyn(y.shape()), common::rand_vec(&mut rng, y.len())).unwrap();
    s.tail_mut().zero_grad();
    s.tail_mut().backward(g.clone()).unwrap();
    let loss = |s: &mut AdaptedModel| -> f64 {
        let y = s.tail_mut().forward(boundary.clone(), false).unwrap();
        y.f32("y").unwrap().iter().zip(g.iter()).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
    };
    let names: Vec<String> = s.tail().adapters().map(|(n, _)| n.to_string()).collect();
    let mut checked = 0;
    for (li, name) in names.iter().enumerate() {
        for branch in 0..2 {
            for tensor in 0..2 {
                let grad = {
                    let a = s.tail().adapters().nth(li).unwrap().1;
                    let (gp, gs) = a.grads();
                    let g = if branch == 0 { gp } else { gs }.unwrap();
                    if tensor == 0 { g.a.clone() } else { g.b.clone() }
                };
                for j in [0, grad.len() / 2, grad.len() - 1] {
                    let h = 1e-2f32;
                    let bump = |s: &mut AdaptedModel, d: f32| {
                        let a = s.tail_mut().adapters_mut().nth(li).unwrap().1;
                        let br = a.branches_mut().nth(branch).unwrap();
                        if tensor == 0 { br.a[j] += d } else { br.b[j] += d }
                    };
                    bump(&mut s, h);
                    let lp = loss(&mut s);
                    bump(&mut s, -2.0 * h);
                    let lm = loss(&mut s);
                    bump(&mut s, h);
                    let fd = (lp - lm) / (2.0 * f64::from(h));
                    let an = f64::from(grad[j]);
                    assert!(
                        (an - fd).abs() <= 5e-3 * (1.0 + fd.abs()),
                        "{name} branch {branch} tensor {tensor}[{j}]: {an} vs {fd}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, names.len() * 12);
}

#[test]
fn f16_frozen_tail_weights_stay_close_to_f32() {
    use hydra_edge::onnx::WeightDtype;
    let model = OnnxModel::load(model_path("transformer.onnx")).unwrap();
    let f = feed(&model, 3, 2);
    let run = |weights| {
        let cfg = SplitConfig {
            targets: Targets::LastBlocks(1),
            output: Some("logits".into()),
            weights,
            ..SplitConfig::default()
        };
        AdaptedModel::new(&model, &cfg).unwrap().forward(&f, false).unwrap()
    };
    let (full, half) = (run(WeightDtype::F32), run(WeightDtype::F16));
    let e = max_rel(&half, &full);
    // f16 weights round each weight by ≤ 2⁻¹¹ relative: visible, but small.
    assert!(e > 0.0 && e < 5e-3, "f16 vs f32 tail weights: {e:e}");
}

#[cfg(unix)]
#[test]
fn external_data_behind_a_symlink_out_of_the_folder_is_refused() {
    let dir = std::env::temp_dir().join(format!("hydra-symlink-{}", std::process::id()));
    let outside = std::env::temp_dir().join(format!("hydra-symlink-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(model_path("mlp_external.onnx"), dir.join("mlp_external.onnx")).unwrap();
    std::fs::copy(model_path("mlp_external.weights"), outside.join("w.bin")).unwrap();
    std::os::unix::fs::symlink(outside.join("w.bin"), dir.join("mlp_external.weights")).unwrap();
    let e = OnnxModel::load(dir.join("mlp_external.onnx")).unwrap_err();
    assert!(e.to_string().contains("outside the model's folder"), "{e}");
    // The same file inside the folder loads.
    std::fs::remove_file(dir.join("mlp_external.weights")).unwrap();
    std::fs::copy(outside.join("w.bin"), dir.join("mlp_external.weights")).unwrap();
    OnnxModel::load(dir.join("mlp_external.onnx")).unwrap();
}

/// Minimal reproduction of a tract (0.23) limitation, kept for upstream:
/// `Flatten` of a tensor whose shape holds the square of a symbol
/// (`[N, S, S]`, as PyTorch's TorchScript exporter writes for BERT's
/// attention mask) fails tract's analysis with "Can not compute a shape with
/// square of symbols"; onnxruntime runs it. The backbone falls back to one
/// plan per concrete input shape.
#[test]
fn a_model_tract_cannot_plan_symbolically_runs_with_per_shape_plans() {
    use hydra_edge::onnx::pb;
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let sym = |s: &str| Dimension { value: Some(Value::DimParam(s.into())), ..Default::default() };
    let vi = |name: &str, dims: Option<Vec<Dimension>>| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: dims.map(|dim| pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let axis = |name: &str, v: i64| pb::TensorProto {
        name: name.into(),
        dims: vec![1],
        data_type: 7,
        int64_data: vec![v],
        ..Default::default()
    };
    let node = |op: &str, ins: &[&str], out: &str| pb::NodeProto {
        op_type: op.into(),
        name: out.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        ..Default::default()
    };
    let mut flatten = node("Flatten", &["ab"], "y");
    flatten.attribute.push(pb::AttributeProto {
        name: "axis".into(),
        r#type: 2,
        i: 1,
        ..Default::default()
    });
    let proto = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(pb::GraphProto {
            name: "square_of_symbols".into(),
            node: vec![
                node("Unsqueeze", &["x", "ax1"], "a"),
                node("Unsqueeze", &["x", "ax2"], "b"),
                node("Mul", &["a", "b"], "ab"),
                flatten,
            ],
            initializer: vec![axis("ax1", 1), axis("ax2", 2)],
            input: vec![vi("x", Some(vec![sym("N"), sym("S")]))],
            output: vec![vi("y", None)],
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap();
    let backbone = Backbone::new(&model, &["y".to_string()]).unwrap();
    assert!(backbone.plans_per_shape(), "tract planned it symbolically: drop the fallback's note");
    for (n, s) in [(2usize, 3usize), (1, 5), (2, 3)] {
        let x: Vec<f32> = (0..n * s).map(|v| v as f32).collect();
        let mut f = Feed::new();
        f.insert(
            "x".into(),
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, s]), x.clone()).unwrap()),
        );
        let y = backbone.run(&f).unwrap().remove(0);
        let y = y.f32("y").unwrap();
        assert_eq!(y.shape(), &[n, s * s]);
        for b in 0..n {
            for i in 0..s {
                for j in 0..s {
                    assert_eq!(y[[b, i * s + j]], x[b * s + i] * x[b * s + j]);
                }
            }
        }
    }
}

/// Exporters deduplicate equal constants: an untrained model's all-zero
/// biases become one initializer named after the first layer
/// (`enc.layer.0.dense.bias`) that every layer reads. Such a name says
/// nothing about a layer's block, so it is not used: layers that only have
/// it get no block (and `last:K` does not silently pick them as block 0),
/// while a layer whose bias is its own keeps the block its name gives.
#[test]
fn a_deduplicated_bias_name_does_not_assign_blocks() {
    use hydra_edge::onnx::pb;
    let f32s = |name: &str, dims: &[i64], v: f32| pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: vec![v; dims.iter().product::<i64>() as usize],
        ..Default::default()
    };
    let node = |op: &str, ins: &[&str], out: &str, name: &str| pb::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        ..Default::default()
    };
    let vi = |name: &str| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let proto = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(pb::GraphProto {
            name: "dedup".into(),
            node: vec![
                node("MatMul", &["x", "val_1"], "m1", "node_MatMul_1"),
                node("Add", &["m1", "enc.layer.0.dense.bias"], "a1", "node_Add_1"),
                node("MatMul", &["a1", "val_2"], "m2", "node_MatMul_2"),
                node("Add", &["m2", "enc.layer.0.dense.bias"], "a2", "node_Add_2"),
                node("MatMul", &["a2", "val_3"], "m3", "node_MatMul_3"),
                node("Add", &["m3", "enc.layer.1.dense.bias"], "y", "node_Add_3"),
            ],
            initializer: vec![
                f32s("val_1", &[4, 4], 0.1),
                f32s("val_2", &[4, 4], 0.2),
                f32s("val_3", &[4, 4], 0.3),
                f32s("enc.layer.0.dense.bias", &[4], 0.0),
                f32s("enc.layer.1.dense.bias", &[4], 0.5),
            ],
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap();
    let g = model.index().unwrap();
    let layers = hydra_edge::onnx::layers::linear_layers(&g).unwrap();
    let blocks: Vec<Option<&str>> = layers.iter().map(|l| l.block.as_deref()).collect();
    assert_eq!(blocks, [None, None, Some("enc.layer.1")]);
}
