//! Split parity on the real backbones, built from PyPI packages by
//! models/real/build_*.py (`bash scripts/test.sh` runs them first):
//! all-MiniLM-L6-v2 with its last encoder block in the tail, and
//! EfficientNet-Lite0 with its last 1×1 conv and classifier.
#![cfg(feature = "onnx")]

use std::path::PathBuf;

use hydra_edge::Tensor;
use hydra_edge::backbone::{Backbone, Feed};
use hydra_edge::model::AdaptedModel;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::rng::Rng;
use ndarray::{ArrayD, IxDyn};

fn real(name: &str) -> PathBuf {
    let dir = std::env::var("HYDRA_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/real/out"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `python3 models/real/build_minilm.py` and `python3 models/real/build_efficientnet_lite0.py` (or `bash scripts/test.sh`, which does all the set-up)",
        p.display()
    );
    p
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.f32("a").unwrap(), b.f32("b").unwrap());
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// Random token ids and a mask whose rows end in padding of random length.
pub fn text_feed(batch: usize, seq: usize, seed: u64) -> Feed {
    let mut rng = Rng::new(seed);
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| if i % seq == 0 { 101 } else { 1000 + rng.below(29_000) as i64 })
        .collect();
    let mut mask = vec![1i64; batch * seq];
    for b in 0..batch {
        let keep = seq / 2 + rng.below((seq / 2) as u64 + 1) as usize;
        mask[b * seq + keep.min(seq)..(b + 1) * seq].iter_mut().for_each(|m| *m = 0);
    }
    let t = |v: Vec<i64>| Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), v).unwrap());
    Feed::from([("input_ids".to_string(), t(ids)), ("attention_mask".to_string(), t(mask))])
}

#[test]
fn minilm_last_block_split_parity() {
    let model = OnnxModel::load(real("minilm.onnx")).unwrap();
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(1),
        output: Some("last_hidden_state".into()),
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    let r = split.report();
    assert_eq!(
        r.adapted.len(),
        6,
        "q, k, v, attention output, intermediate, output: {:?}",
        r.adapted
    );
    assert!(r.adapted.iter().all(|n| n.starts_with("/encoder/layer.5/")));
    let whole = Backbone::new(&model, &["last_hidden_state".to_string()]).unwrap();
    for batch in [1, 3, 8] {
        let f = text_feed(batch, 16, batch as u64);
        let e = max_rel(&split.forward(&f, false).unwrap(), &whole.run(&f).unwrap()[0]);
        assert!(e <= 1e-4, "batch {batch}: rel err {e:e}");
    }
    // The pooled sentence features, for a new head: the tail ends at `pooled`.
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(2),
        output: Some("pooled".into()),
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    let whole = Backbone::new(&model, &["pooled".to_string()]).unwrap();
    let f = text_feed(3, 24, 9);
    let e = max_rel(&split.forward(&f, false).unwrap(), &whole.run(&f).unwrap()[0]);
    assert!(e <= 1e-4, "pooled: rel err {e:e}");
}

#[test]
fn efficientnet_head_split_parity() {
    let model = OnnxModel::load(real("efficientnet_lite0.onnx")).unwrap();
    let cfg = SplitConfig {
        targets: Targets::Patterns(vec!["conv_head".into(), "classifier".into()]),
        output: Some("logits".into()),
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    let ops: Vec<&str> = split.report().tail_ops.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(ops, ["Conv", "Clip", "GlobalAveragePool", "Flatten", "Gemm"]);
    let whole = Backbone::new(&model, &["logits".to_string()]).unwrap();
    for batch in [1, 3, 8] {
        let mut rng = Rng::new(batch as u64);
        let v: Vec<f32> = (0..batch * 3 * 96 * 96).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let img = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[batch, 3, 96, 96]), v).unwrap());
        let f = Feed::from([("image".to_string(), img)]);
        let e = max_rel(&split.forward(&f, false).unwrap(), &whole.run(&f).unwrap()[0]);
        assert!(e <= 1e-4, "batch {batch}: rel err {e:e}");
    }
}
