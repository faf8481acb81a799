//! Training on the digits task (models/digits): adaptation works, runs are
//! deterministic, resume is bit-identical, the feature cache changes nothing,
//! non-finite steps are skipped and then stop training, budgets are enforced.
#![cfg(feature = "onnx")]

use std::path::{Path, PathBuf};

use hydra_edge::Tensor;
use hydra_edge::adapter::{AdapterFile, DType};
use hydra_edge::model::AdaptedModel;
use hydra_edge::model::{CacheConfig, HeadConfig};
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::train::npz::{parse_npz, write_npz};
use hydra_edge::train::{Dataset, Event, Labels, Loss, OptimizerKind, TrainConfig, Trainer};
use hydra_edge::{Error, HydraConfig, Variant};
use ndarray::{ArrayD, IxDyn};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/digits")
}

fn model() -> OnnxModel {
    OnnxModel::load(dir().join("digits_mlp.onnx")).unwrap()
}

fn data(name: &str) -> Dataset {
    Dataset::from_npz(&dir().join(name), "label").unwrap()
}

fn split(variant: Variant, dropout: f32) -> AdaptedModel {
    let mut adapter = HydraConfig { variant, seed: 3, ..HydraConfig::default() };
    adapter.parallel.dropout = dropout;
    adapter.sequential.dropout = dropout;
    AdaptedModel::new(
        &model(),
        &SplitConfig { targets: Targets::AllLinear, adapter, ..SplitConfig::default() },
    )
    .unwrap()
}

fn cfg(epochs: usize) -> TrainConfig {
    TrainConfig { epochs, batch_size: 24, lr: 1e-2, warmup_steps: 3, ..TrainConfig::default() }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hydra-train-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn adapter_bytes(t: &Trainer) -> Vec<u8> {
    let mut f = t.adapter_file(false, DType::F32).unwrap();
    f.header.metadata.clear();
    f.to_bytes().unwrap()
}

#[test]
fn adaptation_recovers_accuracy_on_the_shifted_user_data() {
    let (train, test) = (data("digits_user_train.npz"), data("digits_user_test.npz"));
    let mut frozen = Trainer::new(split(Variant::Hydra, 0.0), cfg(1)).unwrap();
    let before = frozen.evaluate(&test).unwrap().1.unwrap();
    let mut t = Trainer::new(split(Variant::Hydra, 0.1), cfg(30)).unwrap();
    let mut steps = 0;
    let metrics = t
        .fit(&train, Some(&test), &mut |e| {
            if let Event::Step { .. } = e {
                steps += 1
            }
        })
        .unwrap();
    let after = metrics.last().unwrap().eval_accuracy.unwrap();
    assert_eq!(steps, 30 * 200usize.div_ceil(24), "every step reported, last partial batch kept");
    assert!(metrics[0].train_loss > metrics.last().unwrap().train_loss);
    assert!(before < 0.45 && after > 0.85, "user accuracy {before:.3} → {after:.3}");
    // A new head on the frozen features (head-only) also learns.
    let s = AdaptedModel::new(
        &model(),
        &SplitConfig {
            targets: Targets::None,
            output: Some("features".into()),
            ..SplitConfig::default()
        },
    )
    .unwrap();
    let mut h = Trainer::new(s, TrainConfig { head: HeadConfig::New(10), ..cfg(30) }).unwrap();
    h.fit(&train, None, &mut |_| {}).unwrap();
    assert!(h.evaluate(&test).unwrap().1.unwrap() > 0.75);
}

#[test]
fn same_seed_gives_a_bit_identical_adapter() {
    let train = data("digits_user_train.npz");
    let run = || {
        let mut t = Trainer::new(split(Variant::Hydra, 0.2), cfg(3)).unwrap();
        t.fit(&train, None, &mut |_| {}).unwrap();
        adapter_bytes(&t)
    };
    assert!(run() == run(), "two runs with one seed differ");
}

#[test]
fn resume_from_a_checkpoint_is_bit_identical() {
    let train = data("digits_user_train.npz");
    for opt in [OptimizerKind::default(), OptimizerKind::Sgd { momentum: 0.9 }] {
        let c = TrainConfig { optimizer: opt, head: HeadConfig::Keep, ..cfg(4) };
        // N = 13 steps: the checkpoint lands in the middle of epoch 2.
        let mut straight = Trainer::new(split(Variant::Hydra, 0.2), c.clone()).unwrap();
        straight.fit_until(&train, None, Some(26), &mut |_| {}).unwrap();
        let mut first = Trainer::new(split(Variant::Hydra, 0.2), c.clone()).unwrap();
        first.fit_until(&train, None, Some(13), &mut |_| {}).unwrap();
        let path = tmp("resume.ckpt");
        first.save_checkpoint(&path).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(split(Variant::Hydra, 0.2), c, &path).unwrap();
        assert_eq!(resumed.step(), 13);
        resumed.fit_until(&train, None, Some(26), &mut |_| {}).unwrap();
        assert!(
            adapter_bytes(&resumed) == adapter_bytes(&straight),
            "{opt:?}: resumed run differs"
        );
    }
}

#[test]
fn cached_uncached_and_spilled_epochs_give_identical_results() {
    let train = data("digits_user_train.npz");
    let run = |cache: CacheConfig| {
        let mut t =
            Trainer::new(split(Variant::Lora, 0.0), TrainConfig { cache, ..cfg(3) }).unwrap();
        let m = t.fit(&train, None, &mut |_| {}).unwrap();
        (adapter_bytes(&t), m.iter().map(|m| m.train_loss).collect::<Vec<_>>())
    };
    let ram = run(CacheConfig::default());
    let none = run(CacheConfig { enabled: false, ..CacheConfig::default() });
    let spill = run(CacheConfig {
        ram_budget: 64 * 64 * 2,
        spill_dir: Some(std::env::temp_dir()),
        ..CacheConfig::default()
    });
    assert!(ram == none, "cache vs no cache: losses {:?} vs {:?}", ram.1, none.1);
    assert!(ram == spill, "RAM vs spilled cache");
}

#[test]
fn feature_cache_spills_beyond_its_ram_budget_and_cleans_up() {
    let train = data("digits_user_train.npz");
    let s = split(Variant::Lora, 0.0);
    let dir = tmp("spill");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = CacheConfig {
        ram_budget: 50 * 64 * 2,
        spill_dir: Some(dir.clone()),
        ..CacheConfig::default()
    };
    let mut c = hydra_edge::model::FeatureCache::build(&s, &train, 16, &cfg).unwrap();
    assert_eq!((c.len(), c.ram_bytes(), c.spilled_bytes()), (200, 50 * 128, 150 * 128));
    let b = c.batch(&[199, 0, 120]).unwrap();
    assert_eq!(b[0].shape(), [3, 64]);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    drop(c);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "spill file removed");
}

fn poisoned(every: usize) -> Dataset {
    let d = data("digits_user_train.npz");
    let arrays = parse_npz(&std::fs::read(dir().join("digits_user_train.npz")).unwrap()).unwrap();
    let Tensor::F32(mut x) = arrays["x"].clone() else { panic!() };
    for (i, mut row) in x.outer_iter_mut().enumerate() {
        if i % every == 0 {
            row[3] = f32::NAN;
        }
    }
    Dataset::new([("x".to_string(), Tensor::F32(x))], d.labels().clone()).unwrap()
}

#[test]
fn non_finite_steps_are_skipped_and_then_stop_training_leaving_the_checkpoint_intact() {
    // One NaN sample in a batch spoils it: the step is skipped and reported.
    let nan_some = poisoned(150);
    let mut skipped = Vec::new();
    let mut t = Trainer::new(
        split(Variant::Hydra, 0.0),
        TrainConfig { cache: CacheConfig { enabled: false, ..CacheConfig::default() }, ..cfg(2) },
    )
    .unwrap();
    let m = t
        .fit(&nan_some, None, &mut |e| {
            if let Event::Skipped { reason, .. } = e {
                skipped.push(reason.to_string())
            }
        })
        .unwrap();
    assert_eq!(m.iter().map(|m| m.skipped_steps).sum::<usize>(), skipped.len());
    assert!(!skipped.is_empty() && m.iter().all(|m| m.train_loss.is_finite()), "{skipped:?}");
    // A good checkpoint, then data that is all bad: training stops with an error.
    let path = tmp("diverge.ckpt");
    t.save_checkpoint(&path).unwrap();
    let saved = std::fs::read(&path).unwrap();
    let mut t2 = Trainer::resume(
        split(Variant::Hydra, 0.0),
        TrainConfig { epochs: 5, max_bad_steps: 3, ..t.config().clone() },
        &path,
    )
    .unwrap();
    let e = t2.fit(&poisoned(1), None, &mut |_| {}).unwrap_err();
    assert!(matches!(&e, Error::Diverged { reason } if reason.starts_with("4 consecutive")), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), saved, "the last good checkpoint is untouched");
    assert!(AdapterFile::load(&path).is_ok());
}

#[test]
fn the_best_epoch_is_kept_restored_and_survives_a_resume() {
    let (train, test) = (data("digits_user_train.npz"), data("digits_user_test.npz"));
    let mut t = Trainer::new(split(Variant::Hydra, 0.0), cfg(6)).unwrap();
    let m = t.fit_until(&train, Some(&test), Some(3 * 9), &mut |_| {}).unwrap();
    let path = tmp("best.ckpt");
    t.save_checkpoint(&path).unwrap();
    let mut r = Trainer::resume(split(Variant::Hydra, 0.0), cfg(6), &path).unwrap();
    assert_eq!(r.best_epoch(), t.best_epoch(), "the best epoch survives a resume");
    assert_eq!(r.start_score(), t.start_score());
    let rest = r.fit(&train, Some(&test), &mut |_| {}).unwrap();
    let all: Vec<_> = m.iter().chain(&rest).collect();
    let (k, best) = all
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.eval_loss.unwrap().total_cmp(&b.1.eval_loss.unwrap()))
        .map(|(k, m)| (k as u64, m.eval_loss.unwrap()))
        .unwrap();
    assert_eq!(r.best_epoch(), Some((k, best)));
    assert!(r.start_score().unwrap() > best, "the start is measured before any step");
    assert!(r.restore_best().unwrap());
    let again = r.evaluate(&test).unwrap().0;
    assert!((again - best).abs() <= 1e-9 * best.max(1.0), "restored: {again} vs {best}");
}

#[test]
fn an_epoch_far_above_its_start_is_divergence() {
    let train = data("digits_user_train.npz");
    let mut t =
        Trainer::new(split(Variant::Hydra, 0.0), TrainConfig { lr: 30.0, ..cfg(3) }).unwrap();
    let e = t.fit(&train, None, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&e, Error::Diverged { reason } if reason.contains("at the start") || reason.contains("NaN")),
        "{e}"
    );
    // Off when asked.
    let mut t = Trainer::new(
        split(Variant::Hydra, 0.0),
        TrainConfig { lr: 30.0, divergence_factor: None, max_bad_steps: 1000, ..cfg(1) },
    )
    .unwrap();
    t.fit(&train, None, &mut |_| {}).unwrap();
}

#[test]
fn a_configuration_over_the_memory_budget_is_refused_with_the_estimate() {
    let train = data("digits_user_train.npz");
    let mut t = Trainer::new(
        split(Variant::Hydra, 0.0),
        TrainConfig { memory_budget: Some(10_000), ..cfg(1) },
    )
    .unwrap();
    let e = t.fit(&train, None, &mut |_| {}).unwrap_err();
    let Error::OverBudget { estimate, budget, .. } = &e else { panic!("{e}") };
    assert!(*estimate > *budget);
    assert!(e.to_string().contains("activations") && e.to_string().contains("MB"), "{e}");
    let r = t.estimate_memory(&train).unwrap();
    assert_eq!(r.total_bytes, r.cache_bytes + r.activation_bytes + r.parameter_bytes);
    let mut ok = Trainer::new(
        split(Variant::Hydra, 0.0),
        TrainConfig { memory_budget: Some(r.total_bytes + 1), ..cfg(1) },
    )
    .unwrap();
    ok.fit(&train, None, &mut |_| {}).unwrap();
}

#[test]
fn adapters_are_refused_on_another_base_model_and_reload_exactly() {
    let train = data("digits_user_train.npz");
    let mut t = Trainer::new(split(Variant::Hydra, 0.0), cfg(1)).unwrap();
    t.fit(&train, None, &mut |_| {}).unwrap();
    let path = tmp("user.hydra");
    t.save_adapter(&path, DType::F32).unwrap();
    let mut fresh = Trainer::new(split(Variant::Hydra, 0.0), cfg(1)).unwrap();
    fresh.load(&AdapterFile::load(&path).unwrap()).unwrap();
    assert!(adapter_bytes(&fresh) == adapter_bytes(&t), "reloaded adapter differs");
    // Another backbone: the same graph with one weight changed.
    let mut proto = model().proto().clone();
    let w = proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == "fc2.weight")
        .unwrap();
    w.raw_data[0] ^= 1;
    let other = OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap();
    let s = AdaptedModel::new(
        &other,
        &SplitConfig { targets: Targets::AllLinear, ..SplitConfig::default() },
    )
    .unwrap();
    let e = Trainer::new(s, cfg(1)).unwrap().load(&AdapterFile::load(&path).unwrap()).unwrap_err();
    assert!(matches!(e, Error::FingerprintMismatch { .. }), "{e}");
}

/// `digits_mlp.onnx` with one value of `fc1.weight` (upstream of `features`) changed.
fn other_backbone() -> OnnxModel {
    let mut proto = model().proto().clone();
    let w = proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == "fc1.weight")
        .unwrap();
    w.raw_data[0] ^= 1;
    OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto), None).unwrap()
}

#[test]
fn head_only_adapters_are_fingerprinted_by_the_weights_that_feed_their_output() {
    let head_only = |m: &OnnxModel| {
        let s = AdaptedModel::new(
            m,
            &SplitConfig {
                targets: Targets::None,
                output: Some("features".into()),
                ..SplitConfig::default()
            },
        )
        .unwrap();
        Trainer::new(s, TrainConfig { head: HeadConfig::New(10), ..cfg(1) }).unwrap()
    };
    let mut t = head_only(&model());
    t.fit(&data("digits_user_train.npz"), None, &mut |_| {}).unwrap();
    let file = t.adapter_file(false, DType::F32).unwrap();
    head_only(&model()).load(&file).unwrap();
    // Same output name and width, other weights upstream: refused.
    let e = head_only(&other_backbone()).load(&file).unwrap_err();
    assert!(matches!(e, Error::FingerprintMismatch { .. }), "{e}");
    // Another output of the same width: refused too.
    let s = AdaptedModel::new(
        &model(),
        &SplitConfig {
            targets: Targets::None,
            output: Some("logits".into()),
            ..SplitConfig::default()
        },
    );
    assert_ne!(s.unwrap().fingerprint(), head_only(&model()).model().fingerprint());
}

#[test]
fn adapter_files_with_extra_tensors_wrong_dims_or_a_bad_optimizer_step_are_refused() {
    let train = data("digits_user_train.npz");
    let mut t = Trainer::new(split(Variant::Hydra, 0.0), cfg(1)).unwrap();
    t.fit(&train, None, &mut |_| {}).unwrap();
    let good = t.adapter_file(false, DType::F32).unwrap();
    let fresh = || Trainer::new(split(Variant::Hydra, 0.0), cfg(1)).unwrap();
    fresh().load(&good).unwrap();
    // A tensor the model has no place for.
    let mut extra = good.clone();
    let mut x = extra.tensors[0].clone();
    x.name = "fc9/parallel/A".into();
    extra.tensors.push(x);
    let e = fresh().load(&extra).unwrap_err();
    assert!(e.to_string().contains("fc9/parallel/A"), "{e}");
    // The right number of values in the wrong dims.
    let mut dims = good.clone();
    let t0 = &mut dims.tensors[0];
    t0.shape = vec![t0.data.len(), 1];
    let e = fresh().load(&dims).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // Optimizer moments only belong in a checkpoint.
    let ckpt = t.adapter_file(true, DType::F32).unwrap();
    fresh().load(&ckpt).unwrap();
    let mut moments = good.clone();
    moments
        .tensors
        .extend(ckpt.tensors.iter().filter(|t| t.name.starts_with("optimizer/")).cloned());
    assert!(fresh().load(&moments).is_err());
    // A malformed optimizer step is an error, not silently dropped state.
    let mut bad = ckpt.clone();
    bad.header.checkpoint.as_mut().unwrap().extra.insert("optimizer_steps".into(), "x1".into());
    let e = fresh().load(&bad).unwrap_err();
    assert!(e.to_string().contains("optimizer_steps"), "{e}");
}

#[test]
fn mse_and_bce_losses_train_and_bad_labels_are_errors() {
    let train = data("digits_user_train.npz");
    let Labels::Classes(c) = train.labels() else { panic!() };
    let onehot: Vec<f32> =
        c.iter().flat_map(|&l| (0..10).map(move |k| f32::from(u8::from(k == l)))).collect();
    let targets = Labels::Values(ArrayD::from_shape_vec(IxDyn(&[c.len(), 10]), onehot).unwrap());
    let x = parse_npz(&std::fs::read(dir().join("digits_user_train.npz")).unwrap()).unwrap()["x"]
        .clone();
    let d = Dataset::new([("x".to_string(), x)], targets).unwrap();
    for loss in [Loss::Mse, Loss::Bce] {
        let mut t =
            Trainer::new(split(Variant::Lora, 0.0), TrainConfig { loss, ..cfg(8) }).unwrap();
        let m = t.fit(&d, None, &mut |_| {}).unwrap();
        assert!(m.last().unwrap().train_loss < m[0].train_loss, "{loss:?}: {m:?}");
    }
    // Class labels with an MSE loss, and labels out of range.
    let mut t =
        Trainer::new(split(Variant::Lora, 0.0), TrainConfig { loss: Loss::Mse, ..cfg(1) }).unwrap();
    assert!(matches!(t.fit(&train, None, &mut |_| {}), Err(Error::Config(_))));
    let x = parse_npz(&std::fs::read(dir().join("digits_user_train.npz")).unwrap()).unwrap()["x"]
        .clone();
    let bad = Dataset::new([("x".to_string(), x)], Labels::Classes(vec![11; 200])).unwrap();
    let mut t = Trainer::new(split(Variant::Lora, 0.0), cfg(1)).unwrap();
    assert!(matches!(t.fit(&bad, None, &mut |_| {}), Err(Error::Config(_))));
    // Mismatched sample counts.
    assert!(
        Dataset::new([("x".to_string(), Tensor::scalar(1.0))], Labels::Classes(vec![1])).is_err()
    );
}

#[test]
fn npz_round_trips_and_reads_numpy_files() {
    let a = Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap(),
    );
    let b = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[4]), vec![0, -1, 7, i64::MAX]).unwrap());
    let map = [("a".to_string(), a), ("b".to_string(), b)].into_iter().collect();
    let bytes = write_npz(&map);
    assert_eq!(parse_npz(&bytes).unwrap(), map);
    // numpy.savez output (committed data).
    let d = data("digits_user_test.npz");
    assert!(d.len() > 400);
    assert!(Dataset::from_npz(Path::new("/nonexistent.npz"), "label").is_err());
    assert!(matches!(parse_npz(b"PK\x05\x06 not really"), Err(Error::Data(_))));
    for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
        assert!(parse_npz(&bytes[..cut]).is_err());
    }
}

#[test]
fn npz_entries_that_share_their_data_are_refused_not_decoded_again() {
    // One 1 MB array, then a central directory with 2,000 entries that all
    // point at it: decoding each would need 2 GB.
    let a = Tensor::F32(ArrayD::zeros(IxDyn(&[1 << 18])));
    let bytes = write_npz(&[("arrayxx".to_string(), a)].into_iter().collect());
    let cd = bytes.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    let eocd = bytes.windows(4).rposition(|w| w == b"PK\x05\x06").unwrap();
    let entry = &bytes[cd..eocd];
    let n = 2000u16;
    let mut evil = bytes[..cd].to_vec();
    for k in 0..n {
        // Distinct names, so that only the shared data gives it away.
        let mut e = entry.to_vec();
        let name_len = usize::from(u16::from_le_bytes([e[28], e[29]]));
        e[46 + name_len - 5] = b'a' + (k % 26) as u8;
        e[46 + name_len - 6] = b'a' + (k / 26 % 26) as u8;
        evil.extend_from_slice(&e);
    }
    let mut end = bytes[eocd..].to_vec();
    end[8..10].copy_from_slice(&n.to_le_bytes());
    end[10..12].copy_from_slice(&n.to_le_bytes());
    end[12..16].copy_from_slice(&((entry.len() * usize::from(n)) as u32).to_le_bytes());
    evil.extend_from_slice(&end);
    let e = parse_npz(&evil).unwrap_err();
    assert!(matches!(e, Error::Data(_)), "{e}");
    assert!(e.to_string().contains("invalid data file"), "{e}");
}

#[test]
fn the_feature_cache_is_built_once_across_fit_until_calls() {
    // The CLI calls fit_until once per epoch: the backbone must run only in the first.
    let (train, eval) = (data("digits_user_train.npz"), data("digits_user_test.npz"));
    let mut t = Trainer::new(split(Variant::Hydra, 0.0), cfg(3)).unwrap();
    let per_epoch = train.len().div_ceil(24) as u64;
    let mut seen = Vec::new();
    for epoch in 0..3 {
        let m = t.fit_until(&train, Some(&eval), Some(per_epoch * (epoch + 1)), &mut |_| {});
        seen.extend(m.unwrap());
    }
    assert_eq!(seen.len(), 3);
    assert!(seen[0].prefix_samples >= train.len() + eval.len(), "{:?}", seen[0]);
    assert_eq!((seen[1].prefix_samples, seen[2].prefix_samples), (0, 0), "{seen:?}");
}

#[test]
fn cached_f16_features_reach_the_f16_kernels_in_training() {
    // Every layer adapted: the first one reads the cached (f16) model input.
    let train = data("digits_user_train.npz");
    let before = hydra_edge::kernels::stats::f16_kernel_calls();
    let mut t = Trainer::new(split(Variant::Hydra, 0.0), cfg(1)).unwrap();
    t.fit(&train, None, &mut |_| {}).unwrap();
    let steps = train.len().div_ceil(24);
    // down_f16 in each forward and grad_a_f16 in each backward of the first layer.
    assert!(hydra_edge::kernels::stats::f16_kernel_calls() - before >= 2 * steps);
}

#[test]
fn a_reshape_target_built_from_shape_of_the_input_follows_the_batch_in_the_cache() {
    // models/test/shape_target.onnx: Reshape(h, Concat(Gather(Shape(x), 0), [2, 4])).
    // The target has the same shape at every batch size but not the same value;
    // a cache that froze it at batch 1 would break (or silently mix samples).
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/test/shape_target.onnx");
    let model = OnnxModel::load(path).unwrap();
    let mut rng = hydra_edge::rng::Rng::new(11);
    let n = 10;
    let x: Vec<f32> = (0..n * 8).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let data = Dataset::new(
        [("x".to_string(), Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, 8]), x).unwrap()))],
        Labels::Classes((0..n).map(|i| i % 3).collect()),
    )
    .unwrap();
    let run = |enabled: bool| {
        let split = AdaptedModel::new(
            &model,
            &SplitConfig { targets: Targets::Names(vec!["fc1".into()]), ..SplitConfig::default() },
        )
        .unwrap();
        assert!(split.report().boundary.len() >= 2, "{:?}", split.report().boundary);
        let cache = CacheConfig { enabled, ..CacheConfig::default() };
        let c = TrainConfig { epochs: 2, batch_size: 3, lr: 1e-2, cache, ..TrainConfig::default() };
        let mut t = Trainer::new(split, c).unwrap();
        let m = t.fit(&data, None, &mut |_| {}).unwrap();
        assert!(!enabled || m[1].prefix_samples == 0, "the second epoch reads the cache");
        (adapter_bytes(&t), m.iter().map(|m| m.train_loss).collect::<Vec<_>>())
    };
    let (cached, live) = (run(true), run(false));
    assert!(cached == live, "cached {:?} vs live {:?}", cached.1, live.1);
}

#[test]
fn an_adapter_is_refused_by_a_model_configured_with_another_scale_or_variant() {
    let train = data("digits_user_train.npz");
    let mut t = Trainer::new(split(Variant::Hydra, 0.0), cfg(1)).unwrap();
    t.fit(&train, None, &mut |_| {}).unwrap();
    let file = t.adapter_file(false, DType::F32).unwrap();
    let mut scaled = HydraConfig { variant: Variant::Hydra, seed: 3, ..HydraConfig::default() };
    scaled.parallel.scale = 2.0;
    for adapter in
        [scaled, HydraConfig { variant: Variant::Lora, seed: 3, ..HydraConfig::default() }]
    {
        let other = AdaptedModel::new(
            &model(),
            &SplitConfig { targets: Targets::AllLinear, adapter, ..SplitConfig::default() },
        )
        .unwrap();
        let e = Trainer::new(other, cfg(1)).unwrap().load(&file).unwrap_err();
        assert!(e.to_string().contains("trained as"), "{e}");
    }
    Trainer::new(split(Variant::Hydra, 0.0), cfg(1)).unwrap().load(&file).unwrap();
}
