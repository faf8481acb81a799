//! The third-party export corpus (`models/corpus/`, built by
//! `models/corpus/setup.sh` with torch.onnx from PyPI): models written by
//! exporters this repo does not own. Each either adapts, trains, merges and
//! matches (tract and onnxruntime), or fails with the error the README's
//! corpus table gives for it.
#![cfg(feature = "onnx")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hydra_edge::Tensor;
use hydra_edge::adapter::DType;
use hydra_edge::backbone::Feed;
use hydra_edge::export::{merge_adapter_file_checked, merge_into_onnx};
use hydra_edge::infer::Model;
use hydra_edge::model::{AdaptedModel, CacheDtype, HeadConfig};
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::rng::Rng;
use hydra_edge::train::{Dataset, Labels, TrainConfig, Trainer};
use ndarray::{ArrayD, IxDyn};

fn corpus(name: &str) -> PathBuf {
    let dir = std::env::var("HYDRA_CORPUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/corpus/out"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run `bash models/corpus/setup.sh` (or `bash scripts/test.sh`, which does all the set-up)",
        p.display()
    );
    p
}

fn scratch(tag: &str) -> common::Scratch {
    common::Scratch::new("hydra-corpus", tag)
}

/// `n` token sequences of length `len` (ids below 1000; the last rows padded
/// from position `len / 2`), and labels.
fn tokens(n: usize, len: usize, seed: u64) -> (BTreeMap<String, Tensor>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let ids: Vec<i64> = (0..n * len).map(|_| 100 + rng.below(900) as i64).collect();
    let mut mask = vec![1i64; n * len];
    for r in n / 2..n {
        for t in len / 2..len {
            mask[r * len + t] = 0;
        }
    }
    let labels = (0..n).map(|_| rng.below(2) as usize).collect();
    let t = |v: Vec<i64>| Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[n, len]), v).unwrap());
    let map = [("input_ids".to_string(), t(ids)), ("attention_mask".to_string(), t(mask))];
    (map.into_iter().collect(), labels)
}

fn max_rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

use common::onnxruntime;

/// Adapts `targets` of a corpus encoder with a new 2-way head, trains one
/// epoch, merges (checked against the unmerged model before -o is written)
/// and compares onnxruntime on the merged file; returns (layers, loss, tract
/// error, onnxruntime error) and the merged file (with its scratch folder,
/// which removes it when dropped).
fn train_merge_check(
    name: &str,
    targets: Targets,
    tol: f32,
) -> (usize, f64, f32, f32, (common::Scratch, PathBuf)) {
    let model = OnnxModel::load(corpus(name)).unwrap();
    let cfg = SplitConfig { targets, ..SplitConfig::default() };
    let adapted = AdaptedModel::new(&model, &cfg).unwrap();
    let r = adapted.report().clone();
    assert_eq!(r.output, "sentence_embedding");
    for op in ["IsNaN", "Where", "ReduceL2", "Expand"] {
        assert!(r.tail_ops.iter().any(|(o, _)| o == op), "{name}: {op} runs in the tail");
    }
    assert!(!r.tail_ops.iter().any(|(o, _)| o == "Shape"), "{name}: shape arithmetic stays frozen");
    let (inputs, labels) = tokens(32, 16, 7);
    let train = Dataset::new(inputs, Labels::Classes(labels)).unwrap();
    let tc = TrainConfig {
        epochs: 1,
        batch_size: 16,
        lr: 1e-3,
        head: HeadConfig::New(2),
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(adapted, tc).unwrap();
    let m = t.fit(&train, None, &mut |_| {}).unwrap();
    assert!(m[0].train_loss.is_finite() && m[0].skipped_steps == 0, "{name}: {m:?}");
    let file = t.adapter_file(false, DType::F32).unwrap();
    let dir = scratch(name);
    let out = dir.join("merged.onnx");
    let (check, _) = tokens(4, 16, 9);
    let feed: Feed = check.clone().into_iter().collect();
    let (mut want, mut e_tract) = (None, f32::NAN);
    merge_adapter_file_checked(&model, &file, &out, false, &mut |tmp, unmerged| {
        let w = unmerged.predict(&feed, CacheDtype::F32)?;
        let merged = Model::load(tmp)?;
        let k = merged.output_names().iter().position(|o| o == "head_logits").unwrap();
        let got = merged.run(&feed)?.swap_remove(k);
        e_tract = max_rel(got.f32("merged").unwrap(), &w);
        assert!(e_tract <= tol, "{name}: merged vs unmerged in tract: {e_tract:e}");
        want = Some(w);
        Ok(())
    })
    .unwrap();
    let ort = onnxruntime(&out, &check, &dir);
    let e_ort = max_rel(ort["head_logits"].f32("ort").unwrap(), want.as_ref().unwrap());
    assert!(
        e_ort <= tol,
        "{name}: onnxruntime on the merged file vs the unmerged model: {e_ort:e}"
    );
    eprintln!(
        "{name}: {} layers, 1 epoch loss {:.4}, merged vs unmerged {e_tract:.2e}, onnxruntime {e_ort:.2e}",
        r.adapted.len(),
        m[0].train_loss
    );
    (r.adapted.len(), m[0].train_loss, e_tract, e_ort, (dir, out))
}

#[test]
fn a_torch_dynamo_sentence_encoder_trains_merges_and_matches_onnxruntime() {
    // Every linear layer, through the export's IsNaN/Where attention, its
    // Shape/Expand mean-pooling mask and its ReduceL2 norm.
    let (layers, ..) = train_merge_check("minilm_dynamo.onnx", Targets::AllLinear, 1e-4);
    assert_eq!(layers, 36, "6 blocks × 6 linear layers");
}

#[test]
fn an_fp16_export_merges_into_an_fp16_model() {
    // `last:2` finds its blocks through the bias names (nodes are `node_MatMul_N`).
    let (layers, .., out) = train_merge_check("minilm_half.onnx", Targets::LastBlocks(2), 1e-2);
    assert_eq!(layers, 12);
    let count = |p: &Path| {
        let m = OnnxModel::load(p).unwrap();
        m.graph().initializer.iter().filter(|t| t.data_type == 10).count()
    };
    let (base, merged) = (count(&corpus("minilm_half.onnx")), count(&out.1));
    assert!(base > 100 && merged >= base, "f16 initializers: base {base}, merged {merged}");
}

#[test]
fn the_torchscript_export_trains_merges_and_matches_with_per_shape_plans() {
    // tract (0.23) cannot type this export's attention-mask Flatten over a
    // product of two symbolic dims (reproduced in tests/split.rs); the
    // backbone plans per input shape instead, and the whole path works.
    let model = OnnxModel::load(corpus("minilm_legacy.onnx")).unwrap();
    let split = AdaptedModel::new(&model, &SplitConfig::default()).unwrap();
    assert!(split.backbone().plans_per_shape());
    let (layers, ..) = train_merge_check("minilm_legacy.onnx", Targets::AllLinear, 1e-4);
    assert_eq!(layers, 36);
}

#[test]
#[cfg(feature = "cli")]
fn inspect_and_train_end_the_tail_at_the_same_ranked_output() {
    let bin = env!("CARGO_BIN_EXE_hydra-edge");
    // The dynamo export has one output; this repo's MiniLM build has three,
    // the hidden states first: the pooled [N, 384] embedding is the default.
    let minilm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/real/out/minilm.onnx");
    assert!(
        minilm.exists(),
        "run models/real/build_minilm.py (or `bash scripts/test.sh`, which does all the set-up)"
    );
    let model = OnnxModel::load(&minilm).unwrap();
    assert_eq!(model.output_names()[0], "last_hidden_state");
    assert_eq!(model.ranked_outputs()[0], "pooled");
    let split = AdaptedModel::new(
        &model,
        &SplitConfig { targets: Targets::LastBlocks(1), ..SplitConfig::default() },
    )
    .unwrap();
    assert_eq!(split.report().output, "pooled", "train's default output");
    for (args, want) in
        [(vec![], "pooled"), (vec!["--output-tensor", "last_hidden_state"], "last_hidden_state")]
    {
        let o = Command::new(bin)
            .arg("--json")
            .arg("inspect")
            .arg(&minilm)
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["output"], want);
        let head = j["suggestions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["suggestion"].as_str().unwrap().starts_with("head only"))
            .unwrap();
        assert!(head["suggestion"].as_str().unwrap().contains(&format!("`{want}`")), "{head}");
        // On the pooled [N, 384] output a new head trains; on the hidden
        // states [N, S, 384] it is refused (its width would fix S), saying so.
        assert_eq!(head["trainable"], want == "pooled", "{head}");
        if want != "pooled" {
            assert!(
                head["reason"].as_str().unwrap().contains("follow the input's length"),
                "{head}"
            );
        }
    }
}

/// A MobileNetV3-style CNN from torch.onnx's TorchScript exporter without
/// constant folding: the cut after the depthwise conv puts the project and
/// last 1×1 convs, their BatchNormalization nodes, the residual Add,
/// HardSwish, Max, the pooling and the Gemm classifier in the tail. Trains
/// one epoch on the model's own logits head, merges (BN stays a node; the
/// adapters fold into the convs and Gemms), matches tract and onnxruntime.
#[test]
fn a_torchscript_cnn_with_batchnorm_and_hardswish_trains_merges_and_matches() {
    let name = "mobilenetv3_block.onnx";
    let model = OnnxModel::load(corpus(name)).unwrap();
    let layers = [
        "/project/project.0/Conv",
        "/last/last.0/Conv",
        "/classifier/classifier.0/Gemm",
        "/classifier/classifier.3/Gemm",
    ];
    let cfg = SplitConfig {
        targets: Targets::Names(layers.iter().map(|s| s.to_string()).collect()),
        ..SplitConfig::default()
    };
    let adapted = AdaptedModel::new(&model, &cfg).unwrap();
    let r = adapted.report().clone();
    assert_eq!(r.output, "logits");
    assert_eq!(r.adapted.len(), 4);
    for op in ["BatchNormalization", "HardSwish", "Max", "GlobalAveragePool"] {
        assert!(r.tail_ops.iter().any(|(o, _)| o == op), "{op} runs in the tail: {:?}", r.tail_ops);
    }
    let mut rng = Rng::new(5);
    let images = |rng: &mut Rng, n: usize| {
        let v = (0..n * 3 * 32 * 32).map(|_| rng.uniform(-1.0, 1.0)).collect();
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, 3, 32, 32]), v).unwrap())
    };
    let x = images(&mut rng, 32);
    let labels: Vec<usize> = (0..32).map(|_| rng.below(10) as usize).collect();
    let train =
        Dataset::new(BTreeMap::from([("image".to_string(), x)]), Labels::Classes(labels)).unwrap();
    let tc = TrainConfig {
        epochs: 1,
        batch_size: 8,
        lr: 1e-3,
        head: HeadConfig::Keep,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(adapted, tc).unwrap();
    let m = t.fit(&train, None, &mut |_| {}).unwrap();
    assert!(m[0].train_loss.is_finite() && m[0].skipped_steps == 0, "{m:?}");
    let file = t.adapter_file(false, DType::F32).unwrap();
    let dir = scratch("mobilenet");
    let out = dir.join("merged.onnx");
    let check: BTreeMap<String, Tensor> =
        [("image".to_string(), images(&mut rng, 4))].into_iter().collect();
    let feed: Feed = check.clone().into_iter().collect();
    let mut want = None;
    merge_adapter_file_checked(&model, &file, &out, false, &mut |tmp, unmerged| {
        let w = unmerged.predict(&feed, CacheDtype::F32)?;
        let merged = Model::load(tmp)?;
        let k = merged.output_names().iter().position(|o| o == "logits").unwrap();
        let got = merged.run(&feed)?.swap_remove(k);
        let e = max_rel(got.f32("merged").unwrap(), &w);
        assert!(e <= 1e-4, "merged vs unmerged in tract: {e:e}");
        // The adapters changed the model: the merged logits are not the base's.
        let base = Model::load(corpus(name))?.run(&feed)?.swap_remove(0);
        assert!(max_rel(base.f32("base").unwrap(), &w) > 1e-6, "training changed nothing");
        want = Some(w);
        Ok(())
    })
    .unwrap();
    let merged = OnnxModel::load(&out).unwrap();
    let bn = merged.graph().node.iter().filter(|n| n.op_type == "BatchNormalization").count();
    assert_eq!(bn, 5, "BatchNormalization nodes are kept as they were");
    let ort = onnxruntime(&out, &check, &dir);
    let e = max_rel(ort["logits"].f32("ort").unwrap(), want.as_ref().unwrap());
    assert!(e <= 1e-4, "onnxruntime on the merged file vs the unmerged model: {e:e}");
    eprintln!("{name}: 4 layers, 1 epoch loss {:.4}, onnxruntime {e:.2e}", m[0].train_loss);
}

/// tf2onnx's Keras CNN: NHWC input behind a Transpose, BN folded into the
/// convs, ReLU6 as Clip, GlobalAveragePool → Squeeze, Dense as MatMul + Add
/// (the Add becomes the layer's bias) and TF-style `…:0` tensor names. Every
/// linear layer (the 1×1 conv after the depthwise one, both Dense) adapts
/// with no edits, trains, merges, and matches in tract and onnxruntime.
#[test]
fn a_tf2onnx_nhwc_cnn_with_tf_names_trains_merges_and_matches() {
    let name = "cnn_tf2onnx.onnx";
    let model = OnnxModel::load(corpus(name)).unwrap();
    assert!(
        model.graph().node.iter().any(|n| n.output.iter().any(|o| o.ends_with(":0"))),
        "TF-style tensor names"
    );
    let (r, _) = classifier_round_trip(name, &images("image", [32, 32, 3]), Targets::AllLinear, 10);
    assert_eq!(r.output, "logits");
    let names: Vec<&str> = r.adapted.iter().map(String::as_str).collect();
    assert_eq!(names, ["tfcnn/pw/Conv2D", "tfcnn/fc1/MatMul", "tfcnn/logits/MatMul"]);
    for op in ["GlobalAveragePool", "Squeeze", "Relu"] {
        assert!(r.tail_ops.iter().any(|(o, _)| o == op), "{op} runs in the tail: {:?}", r.tail_ops);
    }
}

/// A weight shared by two nodes: transformers' BertForMaskedLM with the word
/// embeddings tied to the LM decoder, exported by dynamo as one initializer
/// read by the embedding `Gather` and, through a `Transpose`, by the decoder
/// `MatMul`. The decoder adapts (a Transpose of a constant is a constant
/// weight), the merge gives it a new initializer of its own and leaves the
/// embedding table exactly as it was; merged == unmerged in tract and
/// onnxruntime.
#[test]
fn a_decoder_tied_to_the_embeddings_adapts_and_merges_without_touching_them() {
    let name = "tied_mlm.onnx";
    let model = OnnxModel::load(corpus(name)).unwrap();
    let g = model.graph();
    let table = g.initializer.iter().find(|t| t.dims == [1000, 64]).unwrap();
    let readers: Vec<&str> = g
        .node
        .iter()
        .filter(|n| n.input.contains(&table.name))
        .map(|n| n.op_type.as_str())
        .collect();
    assert_eq!(readers, ["Gather", "Transpose"], "the table is shared: {readers:?}");
    let transposed = &g
        .node
        .iter()
        .find(|n| n.op_type == "Transpose" && n.input[0] == table.name)
        .unwrap()
        .output[0];
    let decoder =
        g.node.iter().find(|n| n.op_type == "MatMul" && n.input[1] == *transposed).unwrap();
    let cfg = SplitConfig { targets: Targets::AllLinear, ..SplitConfig::default() };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    let r = split.report().clone();
    assert_eq!(r.adapted.len(), 2 * 6 + 2, "6 per block, the MLM transform and the tied decoder");
    assert!(r.adapted.contains(&decoder.name), "{:?}", r.adapted);
    // Non-zero adapters, so that the merge changes every adapted weight.
    split.params_and_grads().0.iter_mut().for_each(|p| {
        p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.02 * ((i % 5) as f32 - 2.0))
    });
    let (check, _) = tokens(3, 16, 4);
    let feed: Feed = check.clone().into_iter().collect();
    let want = split.forward(&feed, false).unwrap().f32("unmerged").unwrap().clone();
    let dir = scratch("tied");
    let out = dir.join("merged.onnx");
    merge_into_onnx(&model, &split, None, &out).unwrap();
    let got = Model::load(&out).unwrap().run(&feed).unwrap().swap_remove(0);
    let e = max_rel(got.f32("merged").unwrap(), &want);
    assert!(e <= 1e-4, "merged vs unmerged in tract: {e:e}");
    let base = Model::load(corpus(name)).unwrap().run(&feed).unwrap().swap_remove(0);
    assert!(max_rel(base.f32("base").unwrap(), &want) > 1e-4, "the adapters change the logits");
    let ort = onnxruntime(&out, &check, &dir);
    let e_ort = max_rel(ort["logits"].f32("ort").unwrap(), &want);
    assert!(e_ort <= 1e-4, "onnxruntime on the merged file vs the unmerged model: {e_ort:e}");
    let merged = OnnxModel::load(&out).unwrap();
    let mg = merged.graph();
    let kept = mg.initializer.iter().find(|t| t.name == table.name).unwrap();
    assert_eq!(kept, table, "the embedding table is untouched");
    let dec = mg.node.iter().find(|n| n.name == decoder.name).unwrap();
    assert!(
        mg.initializer.iter().any(|t| t.name == dec.input[1] && t.dims == [64, 1000]),
        "the decoder reads a merged weight of its own, not the table: {}",
        dec.input[1]
    );
    // A new head cannot sit on its [N, seq, 1000] logits: the head's width
    // would fix the length. Refused before any training, with what to do.
    let head_only = AdaptedModel::new(
        &model,
        &SplitConfig { targets: Targets::None, ..SplitConfig::default() },
    )
    .unwrap();
    let refused = head_only.check_new_head().unwrap_err().to_string();
    assert!(
        refused.contains("follow the input's length (seq)") && refused.contains("--head keep"),
        "{refused}"
    );
    let (x, labels) = tokens(8, 16, 2);
    let data = Dataset::new(x, Labels::Classes(labels)).unwrap();
    let tc = TrainConfig { epochs: 1, head: HeadConfig::New(2), ..TrainConfig::default() };
    let err = Trainer::new(head_only, tc).and_then(|mut t| t.fit(&data, None, &mut |_| {}));
    assert!(err.is_err_and(|e| e.to_string() == refused));
    eprintln!(
        "{name}: {} layers, merged vs unmerged {e:.2e}, onnxruntime {e_ort:.2e}",
        r.adapted.len()
    );
}

/// `mobilenetv3_block.onnx` with its batch dim fixed at `batch` (as many
/// exports declare `[1, 3, 224, 224]`), written by the `onnx` package.
fn fixed_batch_copy(batch: usize, dir: &Path) -> PathBuf {
    let out = dir.join(format!("fixed{batch}.onnx"));
    let script = format!(
        "import onnx\nm = onnx.load({src:?})\nfor v in list(m.graph.input) + list(m.graph.output):\n    d = v.type.tensor_type.shape.dim[0]\n    d.ClearField('dim_param')\n    d.dim_value = {batch}\nonnx.save(m, {out:?})\n",
        src = corpus("mobilenetv3_block.onnx").display().to_string(),
        out = out.display().to_string(),
    );
    let st = Command::new("python3").arg("-c").arg(script).status().expect("python3 with onnx");
    assert!(st.success(), "writing the fixed-batch copy");
    out
}

/// A model whose inputs fix the batch at 1 runs any batch one sample at a
/// time (the feature cache's probes at batches 2 and 3 included) and gives
/// the dynamic model's answers; one fixed at 2 says what it runs.
#[test]
fn a_fixed_batch_model_trains_at_any_batch_or_says_why_not() {
    let dir = scratch("fixed");
    let layers = ["/last/last.0/Conv", "/classifier/classifier.0/Gemm"];
    let cfg = SplitConfig {
        targets: Targets::Names(layers.iter().map(|s| s.to_string()).collect()),
        ..SplitConfig::default()
    };
    let fixed = OnnxModel::load(fixed_batch_copy(1, &dir)).unwrap();
    let dynamic = OnnxModel::load(corpus("mobilenetv3_block.onnx")).unwrap();
    let (mut a, mut b) =
        (AdaptedModel::new(&fixed, &cfg).unwrap(), AdaptedModel::new(&dynamic, &cfg).unwrap());
    assert_eq!(a.backbone().fixed_batch(), Some(1));
    assert_eq!(b.backbone().fixed_batch(), None);
    let mut rng = Rng::new(3);
    let v = (0..6 * 3 * 32 * 32).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let x = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[6, 3, 32, 32]), v).unwrap());
    let feed: Feed = [("image".to_string(), x.clone())].into_iter().collect();
    let (pa, pb) =
        (a.predict(&feed, CacheDtype::F32).unwrap(), b.predict(&feed, CacheDtype::F32).unwrap());
    assert_eq!(pa.shape(), [6, 10]);
    assert!(
        max_rel(&pa, &pb) <= 1e-5,
        "batch of 6 through a batch-1 model: {:e}",
        max_rel(&pa, &pb)
    );
    let labels: Vec<usize> = (0..6).map(|i| i % 10).collect();
    let train =
        Dataset::new(BTreeMap::from([("image".to_string(), x)]), Labels::Classes(labels)).unwrap();
    let tc =
        TrainConfig { epochs: 2, batch_size: 4, head: HeadConfig::Keep, ..TrainConfig::default() };
    let mut t = Trainer::new(a, tc).unwrap();
    let m = t.fit(&train, None, &mut |_| {}).unwrap();
    assert!(m.iter().all(|e| e.train_loss.is_finite()), "{m:?}");

    // An export that bakes the batch of 1 into the tail (Flatten written as
    // Reshape to [1, -1]): batches are refused with the reason, batch 1 trains.
    let baked = dir.join("baked.onnx");
    let script = format!(
        "import onnx, numpy as np\nfrom onnx import numpy_helper\nm = onnx.load({src:?})\nfor n in m.graph.node:\n    if n.op_type == 'Flatten':\n        n.op_type = 'Reshape'\n        del n.attribute[:]\n        n.input.append('batch_one_shape')\nm.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], dtype=np.int64), 'batch_one_shape'))\nonnx.save(m, {out:?})\n",
        src = fixed_batch_copy(1, &dir).display().to_string(),
        out = baked.display().to_string(),
    );
    assert!(Command::new("python3").arg("-c").arg(script).status().unwrap().success());
    let baked = OnnxModel::load(&baked).unwrap();
    let mut c = AdaptedModel::new(&baked, &cfg).unwrap();
    let err = c.predict(&feed, CacheDtype::F32).unwrap_err().to_string();
    assert!(err.contains("--batch 1"), "{err}");
    let one: Feed = feed
        .iter()
        .map(|(k, t)| {
            let Tensor::F32(a) = t else { unreachable!() };
            (
                k.clone(),
                Tensor::F32(a.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..1)).to_owned()),
            )
        })
        .collect();
    let p1 = c.predict(&one, CacheDtype::F32).unwrap();
    assert!(
        max_rel(&p1, &pb.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..1)).to_owned())
            <= 1e-5
    );

    let two = OnnxModel::load(fixed_batch_copy(2, &dir)).unwrap();
    let mut c = AdaptedModel::new(&two, &cfg).unwrap();
    let err = c.predict(&feed, CacheDtype::F32).unwrap_err().to_string();
    assert!(err.contains("fix the batch at 2") && err.contains("--batch 2"), "{err}");
}

/// The other linear-layer forms of a TorchScript export: `torch.addmm` as a
/// Gemm with transB = 0, alpha ≠ 1 and beta = 2, and a bias-less nn.Linear as
/// a MatMul with a transposed constant. All three adapt (the default
/// targets), train on the model's own logits and merge; merged vs unmerged and
/// onnxruntime ≤ 1e-4.
#[test]
fn gemm_with_alpha_beta_and_untransposed_b_and_biasless_linears_merge_exactly() {
    let name = "linear_zoo.onnx";
    let model = OnnxModel::load(corpus(name)).unwrap();
    let adapted = AdaptedModel::new(&model, &SplitConfig::default()).unwrap();
    let r = adapted.report().clone();
    assert_eq!(r.output, "logits");
    let names: Vec<&str> = r.adapted.iter().map(String::as_str).collect();
    assert_eq!(names.len(), 3, "two Gemms and the bias-less MatMul: {names:?}");
    let mut rng = Rng::new(21);
    let xs = |rng: &mut Rng, n: usize| {
        let v = (0..n * 32).map(|_| rng.uniform(-1.0, 1.0)).collect();
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, 32]), v).unwrap())
    };
    let labels: Vec<usize> = (0..64).map(|_| rng.below(10) as usize).collect();
    let train = Dataset::new(
        BTreeMap::from([("x".to_string(), xs(&mut rng, 64))]),
        Labels::Classes(labels),
    )
    .unwrap();
    let tc = TrainConfig {
        epochs: 2,
        batch_size: 16,
        lr: 1e-2,
        head: HeadConfig::Keep,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(adapted, tc).unwrap();
    let m = t.fit(&train, None, &mut |_| {}).unwrap();
    assert!(m.iter().all(|e| e.train_loss.is_finite()), "{m:?}");
    let file = t.adapter_file(false, DType::F32).unwrap();
    let dir = scratch("linear-zoo");
    let out = dir.join("merged.onnx");
    let check: BTreeMap<String, Tensor> = BTreeMap::from([("x".to_string(), xs(&mut rng, 5))]);
    let feed: Feed = check.clone().into_iter().collect();
    let mut want = None;
    merge_adapter_file_checked(&model, &file, &out, false, &mut |tmp, unmerged| {
        let w = unmerged.predict(&feed, CacheDtype::F32)?;
        let got = Model::load(tmp)?.run(&feed)?.swap_remove(0);
        let e = max_rel(got.f32("merged").unwrap(), &w);
        assert!(e <= 1e-4, "merged vs unmerged in tract: {e:e}");
        let base = Model::load(corpus(name))?.run(&feed)?.swap_remove(0);
        assert!(max_rel(base.f32("base").unwrap(), &w) > 1e-6, "training changed nothing");
        want = Some(w);
        Ok(())
    })
    .unwrap();
    let ort = onnxruntime(&out, &check, &dir);
    let e = max_rel(ort["logits"].f32("ort").unwrap(), want.as_ref().unwrap());
    assert!(e <= 1e-4, "onnxruntime on the merged file vs the unmerged model: {e:e}");
    eprintln!("{name}: {names:?}, 2 epochs loss {:.4}, onnxruntime {e:.2e}", m[1].train_loss);
}

/// `n` random images of one sample shape `dims` as input `name`.
fn images(
    name: &'static str,
    dims: [usize; 3],
) -> impl Fn(&mut Rng, usize) -> BTreeMap<String, Tensor> {
    move |rng, n| {
        let v = (0..n * dims.iter().product::<usize>()).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let x = ArrayD::from_shape_vec(IxDyn(&[n, dims[0], dims[1], dims[2]]), v).unwrap();
        BTreeMap::from([(name.to_string(), Tensor::F32(x))])
    }
}

/// Adapts `targets` of a corpus classifier (output `logits`; `inputs(rng, n)`
/// makes a batch of `n`),
/// trains `epochs` on its own logits head, merges (checked), and compares
/// tract and onnxruntime on the merged file with the unmerged model; returns
/// the split report and onnxruntime's error.
fn classifier_round_trip(
    name: &str,
    inputs: &dyn Fn(&mut Rng, usize) -> BTreeMap<String, Tensor>,
    targets: Targets,
    classes: usize,
) -> (hydra_edge::onnx::SplitReport, f32) {
    let model = OnnxModel::load(corpus(name)).unwrap();
    let cfg = SplitConfig { targets, ..SplitConfig::default() };
    let adapted = AdaptedModel::new(&model, &cfg).unwrap();
    let r = adapted.report().clone();
    let mut rng = Rng::new(17);
    let labels: Vec<usize> = (0..32).map(|_| rng.below(classes as u64) as usize).collect();
    let train = Dataset::new(inputs(&mut rng, 32), Labels::Classes(labels)).unwrap();
    let tc = TrainConfig {
        epochs: 1,
        batch_size: 8,
        lr: 1e-3,
        head: HeadConfig::Keep,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(adapted, tc).unwrap();
    let m = t.fit(&train, None, &mut |_| {}).unwrap();
    assert!(m[0].train_loss.is_finite() && m[0].skipped_steps == 0, "{name}: {m:?}");
    let file = t.adapter_file(false, DType::F32).unwrap();
    let dir = scratch(name);
    let out = dir.join("merged.onnx");
    let check = inputs(&mut rng, 3);
    let feed: Feed = check.clone().into_iter().collect();
    let mut want = None;
    merge_adapter_file_checked(&model, &file, &out, false, &mut |tmp, unmerged| {
        let w = unmerged.predict(&feed, CacheDtype::F32)?;
        let got = Model::load(tmp)?.run(&feed)?.swap_remove(0);
        let e = max_rel(got.f32("merged").unwrap(), &w);
        assert!(e <= 1e-4, "{name}: merged vs unmerged in tract: {e:e}");
        let base = Model::load(corpus(name))?.run(&feed)?.swap_remove(0);
        assert!(max_rel(base.f32("base").unwrap(), &w) > 1e-6, "{name}: training changed nothing");
        want = Some(w);
        Ok(())
    })
    .unwrap();
    let ort = onnxruntime(&out, &check, &dir);
    let e = max_rel(ort["logits"].f32("ort").unwrap(), want.as_ref().unwrap());
    assert!(e <= 1e-4, "{name}: onnxruntime on the merged file vs the unmerged model: {e:e}");
    eprintln!(
        "{name}: {} layers, {} tail ops, 1 epoch loss {:.4}, onnxruntime {e:.2e}",
        r.adapted.len(),
        r.tail_ops.len(),
        m[0].train_loss
    );
    (r, e)
}

/// A ViT from transformers, exported by the dynamo exporter: every linear
/// layer of its 3 blocks adapts (`last:3`, blocks found through the
/// parameter names); the patch Conv, the CLS Concat and the position Add stay
/// in the frozen prefix, the CLS row's Gather runs in the tail; trains,
/// merges and matches onnxruntime. `all` would take the 64→5 logits layer
/// too, which the default rank 8 does not fit: a clear error saying so.
#[test]
fn a_dynamo_vit_adapts_its_blocks_trains_and_merges() {
    let (r, _) = classifier_round_trip(
        "vit_tiny.onnx",
        &images("pixel_values", [3, 32, 32]),
        Targets::LastBlocks(3),
        5,
    );
    assert_eq!(r.adapted.len(), 3 * 6, "q, k, v, attention output, fc1, fc2 per block");
    assert!(r.tail_ops.iter().any(|(o, _)| o == "Gather"), "the CLS row is taken in the tail");
    let model = OnnxModel::load(corpus("vit_tiny.onnx")).unwrap();
    let cfg = SplitConfig { targets: Targets::AllLinear, ..SplitConfig::default() };
    let err = AdaptedModel::new(&model, &cfg).unwrap_err().to_string();
    assert!(err.contains("64→5") && err.contains("rank of at most 5"), "{err}");
}

/// transformers' BertForSequenceClassification exported as optimum does
/// (TorchScript, `input_ids` / `attention_mask` / `token_type_ids` →
/// `logits`): the last 2 blocks adapt, the Tanh pooler on the CLS row and
/// the Gemm classifier run in the tail, train on the model's own logits
/// (3 classes), merge and match tract and onnxruntime.
#[test]
fn an_optimum_style_bert_classifier_adapts_trains_and_merges() {
    let text = |rng: &mut Rng, n: usize| {
        let (mut map, _) = tokens(n, 16, rng.below(1000));
        let types = ArrayD::from_shape_vec(IxDyn(&[n, 16]), vec![0i64; n * 16]).unwrap();
        map.insert("token_type_ids".to_string(), Tensor::I64(types));
        map
    };
    let (r, _) = classifier_round_trip("bert_classifier.onnx", &text, Targets::LastBlocks(2), 3);
    assert_eq!(r.adapted.len(), 12, "6 linear layers in each of the last 2 blocks");
    for op in ["Tanh", "Gemm", "Softmax", "LayerNormalization"] {
        assert!(r.tail_ops.iter().any(|(o, _)| o == op), "{op} runs in the tail: {:?}", r.tail_ops);
    }
}

/// An int8 QDQ model (onnxruntime's `quantize_static` on `linear_zoo.onnx`:
/// QuantizeLinear/DequantizeLinear around every weight and activation): its
/// quantized layers are refused as targets with an error that says why and
/// what to do, whether chosen by `all` or by name; the quantized model runs
/// frozen in tract, so a new head on its output trains, merges and matches
/// onnxruntime.
#[test]
fn an_int8_qdq_model_runs_frozen_and_its_quantized_layers_are_refused_as_targets() {
    let dir = scratch("qdq");
    let q = dir.join("linear_zoo_qdq.onnx");
    let script = format!(
        "import numpy as np\nfrom onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationDataReader\nclass R(CalibrationDataReader):\n    def __init__(self):\n        g = np.random.default_rng(0)\n        self.it = iter([{{'x': g.uniform(-1, 1, (4, 32)).astype(np.float32)}} for _ in range(8)])\n    def get_next(self):\n        return next(self.it, None)\nquantize_static({src:?}, {out:?}, R(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)\n",
        src = corpus("linear_zoo.onnx").display().to_string(),
        out = q.display().to_string(),
    );
    let st =
        Command::new("python3").arg("-c").arg(script).status().expect("python3 with onnxruntime");
    assert!(st.success(), "quantizing with onnxruntime");
    let model = OnnxModel::load(&q).unwrap();
    assert!(model.graph().node.iter().any(|n| n.op_type == "DequantizeLinear"));
    for targets in
        [Targets::AllLinear, Targets::LastBlocks(1), Targets::Names(vec!["/l2/MatMul".into()])]
    {
        let cfg = SplitConfig { targets: targets.clone(), ..SplitConfig::default() };
        let err = AdaptedModel::new(&model, &cfg).unwrap_err().to_string();
        assert!(
            err.contains("int8-quantized") && err.contains("quantize after merging"),
            "{targets:?}: {err}"
        );
    }
    // Head-only: the quantized backbone runs in tract, frozen.
    let cfg = SplitConfig { targets: Targets::None, ..SplitConfig::default() };
    let adapted = AdaptedModel::new(&model, &cfg).unwrap();
    let mut rng = Rng::new(4);
    let xs = |rng: &mut Rng, n: usize| {
        let v = (0..n * 32).map(|_| rng.uniform(-1.0, 1.0)).collect();
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, 32]), v).unwrap())
    };
    let labels: Vec<usize> = (0..48).map(|_| rng.below(3) as usize).collect();
    let train = Dataset::new(
        BTreeMap::from([("x".to_string(), xs(&mut rng, 48))]),
        Labels::Classes(labels),
    )
    .unwrap();
    let tc = TrainConfig {
        epochs: 2,
        batch_size: 16,
        lr: 1e-2,
        head: HeadConfig::New(3),
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(adapted, tc).unwrap();
    let m = t.fit(&train, None, &mut |_| {}).unwrap();
    assert!(m.iter().all(|e| e.train_loss.is_finite()), "{m:?}");
    let file = t.adapter_file(false, DType::F32).unwrap();
    let out = dir.join("merged.onnx");
    let check = BTreeMap::from([("x".to_string(), xs(&mut rng, 6))]);
    let feed: Feed = check.clone().into_iter().collect();
    let mut want = None;
    merge_adapter_file_checked(&model, &file, &out, false, &mut |tmp, unmerged| {
        let w = unmerged.predict(&feed, CacheDtype::F32)?;
        let merged = Model::load(tmp)?;
        let k = merged.output_names().iter().position(|o| o == "head_logits").unwrap();
        let e = max_rel(merged.run(&feed)?.swap_remove(k).f32("merged").unwrap(), &w);
        assert!(e <= 1e-4, "merged vs unmerged in tract: {e:e}");
        want = Some(w);
        Ok(())
    })
    .unwrap();
    let ort = onnxruntime(&out, &check, &dir);
    let e = max_rel(ort["head_logits"].f32("ort").unwrap(), want.as_ref().unwrap());
    assert!(e <= 1e-4, "onnxruntime on the merged QDQ file vs tract's unmerged run: {e:e}");
    eprintln!("linear_zoo QDQ: head-only loss {:.4}, onnxruntime {e:.2e}", m[1].train_loss);
}
