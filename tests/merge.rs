//! Merge and export: the merged .onnx run by tract gives the unmerged
//! adapted model's outputs (≤ 1e-4 relative) on every test model and both
//! real ones, onnxruntime agrees with tract on the merged file, external
//! data stays external, adapters for another base model are refused, and
//! hot-swapping among adapters gives each adapter's own outputs.
#![cfg(feature = "onnx")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hydra_edge::Tensor;
use hydra_edge::adapter::DType;
use hydra_edge::backbone::Feed;
use hydra_edge::export::{
    HeadExport, merge_adapter_file, merge_into_onnx, merge_into_onnx_checked,
};
use hydra_edge::infer::{HotSwap, Model};
use hydra_edge::model::AdaptedModel;
use hydra_edge::model::{HeadConfig, LinearHead};
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::rng::Rng;
use hydra_edge::train::{TrainConfig, Trainer};
use hydra_edge::{Error, HydraConfig, Variant};
use ndarray::{ArrayD, IxDyn};

fn test_model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/test").join(name)
}

fn real_model(name: &str) -> PathBuf {
    let dir = std::env::var("HYDRA_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/real/out"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run models/real/build_*.py (or `bash scripts/test.sh`, which does all the set-up)",
        p.display()
    );
    p
}

fn out_dir(tag: &str) -> common::Scratch {
    common::Scratch::new("hydra-merge", tag)
}

fn feed(model: &OnnxModel, batch: usize, seed: u64) -> Feed {
    let mut rng = Rng::new(seed);
    let mut f = Feed::new();
    for name in model.input_names() {
        let dims: Vec<usize> = model
            .input_shape(&name)
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.unwrap_or(match (i, name.as_str()) {
                    (0, _) => batch,
                    (_, "image") => 64,
                    _ => 8,
                })
            })
            .collect();
        let len: usize = dims.iter().product();
        let t = if model.input_is_integer(&name) {
            let v: Vec<i64> = if name.contains("mask") {
                (0..len).map(|i| i64::from(i % dims[1] < dims[1] - 2)).collect()
            } else {
                (0..len).map(|_| 1000 + rng.below(20_000) as i64).collect()
            };
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&dims), v).unwrap())
        } else if name == "mask" {
            Tensor::F32(
                ArrayD::from_shape_vec(
                    IxDyn(&dims),
                    (0..len).map(|i| if i % dims[1] < dims[1] - 2 { 1.0 } else { 0.0 }).collect(),
                )
                .unwrap(),
            )
        } else {
            Tensor::F32(
                ArrayD::from_shape_vec(
                    IxDyn(&dims),
                    (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect(),
                )
                .unwrap(),
            )
        };
        f.insert(name, t);
    }
    f
}

fn max_rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// Gives every adapter non-trivial parameters (as training would).
fn perturb(split: &mut AdaptedModel, seed: u64) {
    let mut rng = Rng::new(seed);
    for (_, a) in split.tail_mut().adapters_mut() {
        for br in a.branches_mut() {
            for t in br.tensors_mut() {
                t.iter_mut().for_each(|v| *v += rng.uniform(-0.05, 0.05));
            }
        }
    }
}

/// Runs the merged file with onnxruntime (Python) and returns its outputs.
fn onnxruntime(model: &Path, feed: &Feed, dir: &Path) -> BTreeMap<String, Tensor> {
    let map: BTreeMap<String, Tensor> = feed.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    common::onnxruntime(model, &map, dir)
}

struct Case {
    file: PathBuf,
    targets: Targets,
    output: Option<&'static str>,
    adapter: HydraConfig,
    head: Option<usize>,
}

/// Returns the merged file's external data files, with the scratch folder
/// that holds them (removed when dropped).
fn check_case(tag: &str, c: Case) -> (common::Scratch, Vec<PathBuf>) {
    let model = OnnxModel::load(&c.file).unwrap();
    let cfg = SplitConfig {
        targets: c.targets,
        output: c.output.map(str::to_string),
        adapter: c.adapter,
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    perturb(&mut split, 7);
    let f = feed(&model, 3, 11);
    let mut head = c.head.map(|n| {
        let w: usize = split.forward(&f, false).unwrap().shape()[1..].iter().product();
        let mut h = LinearHead::new(w, n, 5).unwrap();
        h.b.iter_mut().for_each(|b| *b = 0.1);
        h
    });
    let unmerged = split.forward(&f, false).unwrap();
    let mut want = unmerged.f32("y").unwrap().clone();
    if let Some(h) = &mut head {
        want = h.forward(&want, false).unwrap();
    }
    let dir = out_dir(tag);
    let out = dir.join("merged.onnx");
    let export = head.as_ref().map(|h| HeadExport {
        head: h,
        feature: split.report().output.clone(),
        logits: "head_logits".into(),
        softmax: Some("head_probs".into()),
    });
    let report = merge_into_onnx(&model, &split, export, &out).unwrap();
    let merged = Model::load(&out).unwrap();
    let name =
        if head.is_some() { "head_logits".to_string() } else { split.report().output.clone() };
    let k =
        merged.output_names().iter().position(|o| *o == name).unwrap_or_else(|| {
            panic!("{tag}: output {name} missing from {:?}", merged.output_names())
        });
    let got = merged.run(&f).unwrap().swap_remove(k);
    let e = max_rel(got.f32("merged").unwrap(), &want);
    assert!(e <= 1e-4, "{tag}: merged vs unmerged rel err {e:e}");
    let ort = onnxruntime(&out, &f, &dir);
    let e2 = max_rel(ort[&name].f32("ort").unwrap(), got.f32("tract").unwrap());
    assert!(e2 <= 1e-4, "{tag}: onnxruntime vs tract on the merged file {e2:e}");
    eprintln!(
        "{tag}: {} layers merged, merged-vs-unmerged {e:.2e}, onnxruntime-vs-tract {e2:.2e}",
        report.layers
    );
    (dir, report.external_files)
}

fn hydra(bias: bool) -> HydraConfig {
    let mut c = HydraConfig::default();
    c.parallel.bias = bias;
    c.sequential.bias = bias;
    c
}

#[test]
fn merged_equals_unmerged_on_every_test_model() {
    let v = |variant| HydraConfig { variant, ..HydraConfig::default() };
    let cases = [
        (
            "mlp-hydra",
            Case {
                file: test_model("mlp.onnx"),
                targets: Targets::AllLinear,
                output: None,
                adapter: hydra(false),
                head: None,
            },
        ),
        (
            "mlp-biases",
            Case {
                file: test_model("mlp.onnx"),
                targets: Targets::AllLinear,
                output: None,
                adapter: hydra(true),
                head: None,
            },
        ),
        (
            "transformer-last-block",
            Case {
                file: test_model("transformer.onnx"),
                targets: Targets::LastBlocks(1),
                output: Some("logits"),
                adapter: hydra(true),
                head: None,
            },
        ),
        (
            "transformer-lora",
            Case {
                file: test_model("transformer.onnx"),
                targets: Targets::AllLinear,
                output: Some("logits"),
                adapter: v(Variant::Lora),
                head: None,
            },
        ),
        (
            "ln17-seqlora-head",
            Case {
                file: test_model("transformer_ln17.onnx"),
                targets: Targets::LastBlocks(2),
                output: Some("pooled"),
                adapter: v(Variant::SeqLora),
                head: Some(3),
            },
        ),
        (
            "cnn-head",
            Case {
                file: test_model("cnn.onnx"),
                targets: Targets::Patterns(vec!["conv_head".into(), "classifier".into()]),
                output: None,
                adapter: hydra(true),
                head: None,
            },
        ),
    ];
    for (tag, c) in cases {
        check_case(tag, c);
    }
}

#[test]
fn external_data_stays_external_in_the_merged_file() {
    let (_dir, files) = check_case(
        "mlp-external",
        Case {
            file: test_model("mlp_external.onnx"),
            targets: Targets::Patterns(vec!["fc2".into()]),
            output: None,
            adapter: hydra(false),
            head: None,
        },
    );
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with("mlp_external.weights"));
    // A copy, not a hard link: the onnx package refuses multiply-linked data files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&files[0]).unwrap().nlink(), 1, "not hard-linked");
    }
    let merged = std::fs::read(files[0].parent().unwrap().join("merged.onnx")).unwrap();
    let proto: hydra_edge::onnx::pb::ModelProto =
        prost::Message::decode(merged.as_slice()).unwrap();
    let ext: Vec<&str> = proto
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter(|t| t.data_location == Some(1))
        .map(|t| t.name.as_str())
        .collect();
    assert!(
        ext.contains(&"fc1.weight") && !ext.contains(&"fc2.weight"),
        "untouched stay external, merged are inline: {ext:?}"
    );
}

#[test]
fn a_merge_whose_check_fails_writes_nothing_and_keeps_foreign_files() {
    let model = OnnxModel::load(test_model("mlp_external.onnx")).unwrap();
    let cfg = SplitConfig {
        targets: Targets::Patterns(vec!["fc2".into()]),
        adapter: hydra(false),
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    perturb(&mut split, 3);
    let dir = out_dir("failed-check");
    let out = dir.join("merged.onnx");
    // A user's file that happens to carry the external data file's name.
    let foreign = dir.join("mlp_external.weights");
    std::fs::write(&foreign, b"the user's own bytes").unwrap();
    std::fs::write(&out, b"the previous merged model").unwrap();
    let mut seen = None;
    let e = merge_into_onnx_checked(&model, &split, None, &out, &mut |tmp| {
        // The candidate is complete and loadable where the check runs.
        Model::load(tmp)?;
        seen = Some(tmp.to_path_buf());
        Err(Error::Config("check failed on purpose".into()))
    })
    .unwrap_err();
    assert!(e.to_string().contains("on purpose"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous merged model", "-o untouched");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"the user's own bytes", "never deleted");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!seen.unwrap().exists());
    assert_eq!(names.len(), 2, "no temporary or external file left: {names:?}");
    // A passing check: the data goes under a new name beside the foreign file.
    let report = merge_into_onnx_checked(&model, &split, None, &out, &mut |_| Ok(())).unwrap();
    assert_eq!(std::fs::read(&foreign).unwrap(), b"the user's own bytes");
    assert_eq!(report.external_files.len(), 1);
    assert!(report.external_files[0].ends_with("mlp_external.1.weights"), "{report:?}");
    let f = feed(&model, 2, 5);
    let merged = Model::load(&out).unwrap().run(&f).unwrap().swap_remove(0);
    let want = split.forward(&f, false).unwrap();
    assert!(max_rel(merged.f32("m").unwrap(), want.f32("u").unwrap()) <= 1e-4);
}

#[test]
fn merged_equals_unmerged_on_the_real_models() {
    let (_dir, files) = check_case(
        "minilm",
        Case {
            file: real_model("minilm.onnx"),
            targets: Targets::LastBlocks(1),
            output: Some("last_hidden_state"),
            adapter: hydra(false),
            head: None,
        },
    );
    assert!(
        files.iter().any(|f| f.ends_with("minilm.weights")),
        "MiniLM keeps its weights external: {files:?}"
    );
    check_case(
        "efficientnet",
        Case {
            file: real_model("efficientnet_lite0.onnx"),
            targets: Targets::Patterns(vec!["conv_head".into(), "classifier".into()]),
            output: Some("logits"),
            adapter: hydra(false),
            head: None,
        },
    );
}

fn trained_file(
    model: &OnnxModel,
    seed: u64,
) -> (hydra_edge::adapter::AdapterFile, ArrayD<f32>, Feed) {
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(1),
        output: Some("logits".into()),
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(model, &cfg).unwrap();
    perturb(&mut split, seed);
    let f = feed(model, 2, 3);
    let y = split.forward(&f, false).unwrap().f32("y").unwrap().clone();
    let t = Trainer::new(split, TrainConfig { head: HeadConfig::Keep, ..TrainConfig::default() })
        .unwrap();
    (t.adapter_file(false, DType::F32).unwrap(), y, f)
}

#[test]
fn adapter_files_merge_and_hot_swap_with_their_own_outputs() {
    let model = OnnxModel::load(test_model("transformer.onnx")).unwrap();
    let runs: Vec<_> = (1..=3).map(|s| trained_file(&model, s)).collect();
    // Merge from a file.
    let dir = out_dir("file");
    let (report, _) = merge_adapter_file(&model, &runs[1].0, &dir.join("m.onnx"), false).unwrap();
    assert_eq!(report.layers, 6);
    let m = Model::load(dir.join("m.onnx")).unwrap();
    let k = m.output_names().iter().position(|o| o == "logits").unwrap();
    assert!(max_rel(m.run(&runs[1].2).unwrap()[k].f32("m").unwrap(), &runs[1].1) <= 1e-4);
    // Hot-swap among the three, in a shuffled order, twice.
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(1),
        output: Some("logits".into()),
        ..SplitConfig::default()
    };
    let mut hs = HotSwap::new(AdaptedModel::new(&model, &cfg).unwrap(), None);
    for (i, (f, _, _)) in runs.iter().enumerate() {
        assert_eq!(hs.add(&format!("user{i}"), f).unwrap(), i);
    }
    for &i in &[2, 0, 1, 1, 2, 0] {
        let y = hs.run_with(i, &runs[i].2).unwrap();
        assert!(max_rel(&y, &runs[i].1) <= 1e-5, "adapter {i} after swapping");
    }
    assert!(runs[0].1 != runs[1].1, "the adapters differ");
}

#[test]
fn an_adapter_for_another_base_model_is_refused_for_merge_and_hot_swap() {
    let model = OnnxModel::load(test_model("transformer.onnx")).unwrap();
    let (file, _, _) = trained_file(&model, 1);
    let mut proto = model.proto().clone();
    let w = proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == "block1/attn/q.weight")
        .unwrap();
    w.raw_data[5] ^= 0x10;
    let other = OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap();
    let e =
        merge_adapter_file(&other, &file, &out_dir("refuse").join("x.onnx"), false).unwrap_err();
    assert!(matches!(e, Error::FingerprintMismatch { .. }), "{e}");
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(1),
        output: Some("logits".into()),
        ..SplitConfig::default()
    };
    let mut hs = HotSwap::new(AdaptedModel::new(&other, &cfg).unwrap(), None);
    assert!(matches!(hs.add("u", &file), Err(Error::FingerprintMismatch { .. })));
    assert!(!out_dir("refuse").join("x.onnx").exists());
}

#[test]
fn weights_from_constant_nodes_merge_into_fresh_initializers_and_names_stay_unique() {
    // digits_mlp with `fc2.weight` produced by a Constant node (as some
    // exporters write weights) and a new head on a model that has `head.*`.
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/digits/digits_mlp.onnx");
    let mut proto = OnnxModel::load(&base).unwrap().proto().clone();
    let g = proto.graph.as_mut().unwrap();
    let k = g.initializer.iter().position(|t| t.name == "fc2.weight").unwrap();
    let w = g.initializer.remove(k);
    g.node.insert(
        0,
        hydra_edge::onnx::pb::NodeProto {
            name: String::new(),
            op_type: "Constant".into(),
            output: vec!["fc2.weight".into()],
            attribute: vec![hydra_edge::onnx::pb::AttributeProto {
                name: "value".into(),
                r#type: 4,
                t: Some(w),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let model = OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap();
    let cfg = SplitConfig {
        targets: Targets::Patterns(vec!["fc2".into()]),
        output: Some("features".into()),
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    assert_eq!(split.adapted_layers().len(), 1, "a Constant-node weight is adaptable");
    perturb(&mut split, 4);
    let f = feed(&model, 3, 2);
    let feats = split.forward(&f, false).unwrap();
    let mut head = LinearHead::new(feats.shape()[1], 3, 1).unwrap();
    head.b.iter_mut().for_each(|b| *b = 0.2);
    let want = head.forward(feats.f32("f").unwrap(), false).unwrap();
    let dir = out_dir("constant-weights");
    let out = dir.join("merged.onnx");
    let export = HeadExport {
        head: &head,
        feature: "features".into(),
        logits: "head_logits".into(),
        softmax: None,
    };
    merge_into_onnx(&model, &split, Some(export), &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let merged: hydra_edge::onnx::pb::ModelProto =
        prost::Message::decode(bytes.as_slice()).unwrap();
    let g = merged.graph.as_ref().unwrap();
    let mut names: Vec<&str> = g
        .initializer
        .iter()
        .map(|t| t.name.as_str())
        .chain(g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)))
        .collect();
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n, "every tensor defined once");
    let mut nodes: Vec<&str> =
        g.node.iter().map(|n| n.name.as_str()).filter(|s| !s.is_empty()).collect();
    let n = nodes.len();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), n, "new node names are unique (the model already has `head`)");
    let got = Model::load(&out).unwrap();
    let k = got.output_names().iter().position(|o| o == "head_logits").unwrap();
    let y = got.run(&f).unwrap().swap_remove(k);
    assert!(max_rel(y.f32("y").unwrap(), &want) <= 1e-4);
    let ort = onnxruntime(&out, &f, &dir);
    assert!(
        max_rel(ort["head_logits"].f32("ort").unwrap(), &want) <= 1e-4,
        "a valid file for onnxruntime"
    );
}

#[test]
fn stale_declared_types_are_ignored_and_dropped_from_the_merged_file() {
    // A converter left `value_info` saying an f32 tensor is f16: tract
    // refuses the declaration; the plan is built without it, and the merged
    // file (valid for onnxruntime) no longer carries it.
    use hydra_edge::onnx::pb;
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/digits/digits_mlp.onnx");
    let mut proto = OnnxModel::load(&base).unwrap().proto().clone();
    let g = proto.graph.as_mut().unwrap();
    let hidden = g.node[0].output[0].clone();
    g.value_info.push(pb::ValueInfoProto {
        name: hidden.clone(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 10,
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    });
    let model = OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap();
    let mut split = AdaptedModel::new(
        &model,
        &SplitConfig { targets: Targets::Patterns(vec!["fc2".into()]), ..SplitConfig::default() },
    )
    .unwrap();
    assert!(split.backbone().ignored_value_info(), "node 0's output `{hidden}`");
    perturb(&mut split, 8);
    let dir = out_dir("stale-types");
    let out = dir.join("merged.onnx");
    merge_into_onnx(&model, &split, None, &out).unwrap();
    let merged = OnnxModel::load(&out).unwrap();
    assert!(merged.graph().value_info.is_empty());
    let f = feed(&model, 2, 3);
    let want = split.forward(&f, false).unwrap();
    let ort = onnxruntime(&out, &f, &dir);
    let name = split.report().output.clone();
    assert!(max_rel(ort[&name].f32("ort").unwrap(), want.f32("want").unwrap()) <= 1e-4);
}
