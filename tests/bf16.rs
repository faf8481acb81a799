//! `runtime::set_matmul_precision(Bf16)`: the tail's large dense products
//! with bf16 operands (AMX) and f32 sums.
//!
//! Where the CPU has bf16 matrix units: the products really ran in bf16 (a
//! counter and a difference from f32 show it), and forward values, every
//! adapter gradient and a training run stay within bf16 tolerances of the
//! f32 run — on the repo's transformer, on all-MiniLM-L6-v2 (an exporter's
//! model) and on the digits task. Without them: asking for bf16 says so and
//! the results are bit-identical to f32.
//!
//! The precision is process-wide, so this file is its own test binary and its
//! tests take turns.
#![cfg(feature = "onnx")]

mod common;

use std::path::PathBuf;
use std::sync::Mutex;

use common::rel_err;
use hydra_edge::backbone::Feed;
use hydra_edge::kernels::stats;
use hydra_edge::model::AdaptedModel;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::rng::Rng;
use hydra_edge::runtime::{MatmulPrecision, bf16_units, set_matmul_precision};
use hydra_edge::train::{Dataset, TrainConfig, Trainer};
use hydra_edge::{HydraConfig, Tensor};
use ndarray::{ArrayD, IxDyn};

static PRECISION: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `f` with f32 products, then with bf16 products; returns both and
/// the number of bf16 products the second run made.
fn f32_then_bf16<T>(mut f: impl FnMut() -> T) -> (T, T, usize) {
    let _g = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    assert!(!set_matmul_precision(MatmulPrecision::F32));
    let a = f();
    assert_eq!(set_matmul_precision(MatmulPrecision::Bf16), bf16_units());
    let before = stats::bf16_products();
    let b = f();
    let ran = stats::bf16_products() - before;
    set_matmul_precision(MatmulPrecision::F32);
    (a, b, ran)
}

#[test]
fn precision_names_parse_and_f32_is_the_default() {
    assert_eq!(MatmulPrecision::default(), MatmulPrecision::F32);
    assert_eq!("f32".parse::<MatmulPrecision>().unwrap(), MatmulPrecision::F32);
    assert_eq!("bf16".parse::<MatmulPrecision>().unwrap(), MatmulPrecision::Bf16);
    let e = "fp8".parse::<MatmulPrecision>().unwrap_err().to_string();
    assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
    let _g = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    assert!(!hydra_edge::runtime::bf16_products());
}

/// Forward values and every parameter gradient of a tail, with a loss
/// gradient that depends on the output.
fn forward_backward(model: &OnnxModel, cfg: &SplitConfig, feed: &Feed, out: &str) -> Vec<Vec<f32>> {
    let mut split = AdaptedModel::new(model, cfg).unwrap();
    // Non-zero up-projections, so that every branch carries a gradient.
    split.params_and_grads().0.iter_mut().for_each(|p| {
        p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.02 * ((i % 7) as f32 - 3.0))
    });
    split.zero_grad();
    let y = split.forward(feed, true).unwrap();
    let y = y.f32(out).unwrap().clone();
    split.backward(y.mapv(|v| v.sin())).unwrap();
    let mut all = vec![y.iter().copied().collect::<Vec<f32>>()];
    all.extend(split.params_and_grads().1.iter().map(|g| g.to_vec()));
    all
}

/// Compares an f32 and a bf16 forward/backward: forward within `fwd_tol`,
/// each gradient within `grad_tol`; where bf16 units exist, products ran in
/// bf16 and changed the result; elsewhere everything is bit-identical.
fn check(
    name: &str,
    (f32r, bf16r, ran): (Vec<Vec<f32>>, Vec<Vec<f32>>, usize),
    fwd_tol: f32,
    grad_tol: f32,
) {
    if !bf16_units() {
        eprintln!("{name}: no bf16 matrix units here: the products must stay f32");
        assert_eq!(ran, 0);
        assert_eq!(f32r, bf16r);
        return;
    }
    assert!(ran > 0, "{name}: no product ran in bf16");
    let e = rel_err(&f32r[0], &bf16r[0]);
    eprintln!("{name}: forward max rel |bf16 − f32| {e:.2e} ({ran} bf16 products)");
    assert!(e > 0.0, "{name}: bf16 products gave the f32 result bit for bit");
    assert!(e <= fwd_tol, "{name}: forward bf16 vs f32 {e:e}");
    let mut worst = 0.0f32;
    for (i, (a, b)) in f32r[1..].iter().zip(&bf16r[1..]).enumerate() {
        let e = rel_err(a, b);
        assert!(e <= grad_tol, "{name}: gradient {i}: bf16 vs f32 {e:e}");
        worst = worst.max(e);
    }
    eprintln!("{name}: {} gradients, worst max rel |bf16 − f32| {worst:.2e}", f32r.len() - 1);
}

#[test]
fn transformer_tail_forward_and_gradients_stay_within_bf16_tolerance() {
    let model = OnnxModel::load(root().join("models/test/transformer.onnx")).unwrap();
    let (batch, seq, d) = (4, 8, 32);
    let mut rng = Rng::new(9);
    let x: Vec<f32> = (0..batch * seq * d).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mask: Vec<f32> = (0..batch * seq).map(|i| if i % seq < 6 { 1.0 } else { 0.0 }).collect();
    let feed = Feed::from([
        ("x".to_string(), Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[batch, seq, d]), x).unwrap())),
        (
            "mask".to_string(),
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), mask).unwrap()),
        ),
    ]);
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(1),
        output: Some("logits".into()),
        adapter: HydraConfig { seed: 4, ..HydraConfig::default() },
        ..SplitConfig::default()
    };
    check("transformer", f32_then_bf16(|| forward_backward(&model, &cfg, &feed, "y")), 3e-3, 3e-3);
}

#[test]
fn minilm_tail_forward_and_gradients_stay_within_bf16_tolerance() {
    let model = OnnxModel::load(minilm_path()).unwrap();
    let feed = minilm_feed(4, 32);
    check(
        "minilm",
        f32_then_bf16(|| forward_backward(&model, &minilm_tail(), &feed, "y")),
        1e-2,
        3e-2,
    );
}

/// bf16 products are cut at whole tile blocks when the pool splits them, so
/// a MiniLM tail's forward and gradients (products large enough to split,
/// frozen layers with biases) are bit-identical at 1, 2 and 3 threads.
#[test]
fn bf16_results_do_not_depend_on_the_thread_count() {
    let model = OnnxModel::load(minilm_path()).unwrap();
    let feed = minilm_feed(4, 40);
    let _g = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    let on = set_matmul_precision(MatmulPrecision::Bf16);
    let mut runs = Vec::new();
    for t in [1, 2, 3] {
        hydra_edge::parallel::set_threads(t).unwrap();
        runs.push(forward_backward(&model, &minilm_tail(), &feed, "y"));
    }
    set_matmul_precision(MatmulPrecision::F32);
    hydra_edge::parallel::set_threads(0).unwrap();
    eprintln!("bf16 products on: {on}");
    assert!(runs[0] == runs[1] && runs[0] == runs[2], "results changed with the thread count");
}

fn minilm_path() -> PathBuf {
    let dir = std::env::var("HYDRA_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("models/real/out"));
    let path = dir.join("minilm.onnx");
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/test.sh` (it builds it)",
        path.display()
    );
    path
}

/// The engine recipe's tail: the last 2 blocks, up to the pooled embedding.
fn minilm_tail() -> SplitConfig {
    SplitConfig {
        targets: Targets::LastBlocks(2),
        output: Some("pooled".into()),
        adapter: HydraConfig { seed: 2, ..HydraConfig::default() },
        ..SplitConfig::default()
    }
}

/// Random token ids; row `b` ends in `4·b` padding tokens.
fn minilm_feed(batch: usize, seq: usize) -> Feed {
    let mut rng = Rng::new(5);
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| if i % seq == 0 { 101 } else { 1000 + rng.below(29_000) as i64 })
        .collect();
    let mask: Vec<i64> =
        (0..batch * seq).map(|i| i64::from(i % seq < seq - 4 * (i / seq))).collect();
    let t = |v: Vec<i64>| Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), v).unwrap());
    Feed::from([("input_ids".to_string(), t(ids)), ("attention_mask".to_string(), t(mask))])
}

#[test]
fn digits_training_in_bf16_reaches_the_f32_accuracy() {
    let dir = root().join("models/digits");
    let model = OnnxModel::load(dir.join("digits_mlp.onnx")).unwrap();
    let train = Dataset::from_npz(&dir.join("digits_user_train.npz"), "label").unwrap();
    let test = Dataset::from_npz(&dir.join("digits_user_test.npz"), "label").unwrap();
    let run = || {
        let cfg = SplitConfig {
            targets: Targets::AllLinear,
            adapter: HydraConfig { seed: 3, ..HydraConfig::default() },
            ..SplitConfig::default()
        };
        let split = AdaptedModel::new(&model, &cfg).unwrap();
        let tc = TrainConfig { epochs: 15, batch_size: 32, lr: 1e-2, ..TrainConfig::default() };
        let mut t = Trainer::new(split, tc).unwrap();
        t.fit(&train, None, &mut |_| {}).unwrap();
        let acc = t.evaluate(&test).unwrap().1.unwrap();
        (acc, t.model().param_values().iter().map(|p| p.to_vec()).collect::<Vec<Vec<f32>>>())
    };
    let ((acc32, p32), (acc16, p16), ran) = f32_then_bf16(run);
    eprintln!("digits: user test accuracy f32 {acc32:.3}, bf16 {acc16:.3} ({ran} bf16 products)");
    assert!(acc32 > 0.85, "f32 run did not adapt: {acc32}");
    if bf16_units() {
        assert!(ran > 0);
        assert!((acc16 - acc32).abs() <= 0.03, "bf16 {acc16:.3} vs f32 {acc32:.3}");
    } else {
        assert_eq!((ran, &p16), (0, &p32));
    }
}

/// bf16 products pack a layer's frozen weights once and keep the packs:
/// merging and unmerging change the weights, so the packs must follow. With
/// stale packs the merged layer would drop the adapter's contribution
/// (here as large as the frozen product itself).
#[test]
fn merge_and_unmerge_repack_the_weights_for_bf16_products() {
    use hydra_edge::HydraLinear;
    use hydra_edge::hydra::{Input, Weights};
    let (n, din, dout) = (48, 64, 96);
    let mut rng = Rng::new(17);
    let mut v = |len: usize, s: f32| (0..len).map(|_| rng.uniform(-s, s)).collect::<Vec<f32>>();
    let (w, b, x) = (v(din * dout, 0.2), v(dout, 0.5), v(n * din, 1.0));
    let (bp, bs) = (v(dout * 8, 1.0), v(dout * 8, 1.0));
    let mut cfg = HydraConfig::default();
    (cfg.parallel.rank, cfg.sequential.rank) = (8, 8);
    let mut layer = HydraLinear::new(cfg, Weights::F32(w), Some(b), din, dout).unwrap();
    layer.parallel_mut().unwrap().b = bp;
    layer.sequential_mut().unwrap().b = bs;
    let _g = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    let on = set_matmul_precision(MatmulPrecision::Bf16);
    let unmerged = layer.forward(Input::F32(&x), n).unwrap();
    let packed = layer.pack_bytes();
    layer.merge().unwrap();
    let merged = layer.forward(Input::F32(&x), n).unwrap();
    layer.unmerge().unwrap();
    let again = layer.forward(Input::F32(&x), n).unwrap();
    set_matmul_precision(MatmulPrecision::F32);
    eprintln!("bf16 products on: {on}; packs after the first forward: {packed} bytes");
    assert_eq!(packed > 0, on, "the forward packs exist exactly when bf16 products run");
    assert!(rel_err(&merged, &unmerged) < 2e-2, "merged {}", rel_err(&merged, &unmerged));
    assert!(rel_err(&again, &unmerged) < 2e-2, "unmerged again {}", rel_err(&again, &unmerged));
}
