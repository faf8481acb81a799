//! `demo`: the main job on an embedded default — a digits MLP pre-trained on
//! scikit-learn's digits (models/digits, built by make_digits.py), adapted
//! with Hydra to a "user" who writes slanted, thicker, fainter digits; then
//! merged, checked against the unmerged model, and timed against the base.
//! `bench`: kernel and train-step figures on this machine.

use std::hint::black_box;
use std::time::Instant;

use anyhow::Result;
use hydra_edge::Tensor;
use hydra_edge::backbone::Feed;
use hydra_edge::export::merge_into_onnx;
use hydra_edge::infer::Model;
use hydra_edge::kernels::{self, Kernels, Tier, stats};
use hydra_edge::model::AdaptedModel;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::train::npz::parse_npz;
use hydra_edge::train::{Dataset, Event, Labels, TrainConfig, Trainer};
use hydra_edge::{HydraConfig, f16};
use serde_json::json;

const MODEL: &[u8] = include_bytes!("../../../models/digits/digits_mlp.onnx");
const USER_TRAIN: &[u8] = include_bytes!("../../../models/digits/digits_user_train.npz");
const USER_TEST: &[u8] = include_bytes!("../../../models/digits/digits_user_test.npz");
const BASE_TEST: &[u8] = include_bytes!("../../../models/digits/digits_base_test.npz");

fn dataset(bytes: &[u8]) -> Result<Dataset> {
    let mut a = parse_npz(bytes)?;
    let labels = match a.remove("label") {
        Some(Tensor::I64(l)) => Labels::Classes(l.iter().map(|&v| v as usize).collect()),
        _ => anyhow::bail!("embedded data lacks labels"),
    };
    Ok(Dataset::new(a, labels)?)
}

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

pub fn demo(epochs: usize, json: bool) -> Result<()> {
    let start = Instant::now();
    let model = OnnxModel::from_bytes(MODEL, None)?;
    let (train, test, base) = (dataset(USER_TRAIN)?, dataset(USER_TEST)?, dataset(BASE_TEST)?);
    let say = |s: String| {
        if !json {
            println!("{s}");
        }
    };
    say(format!("hydra-edge demo — kernels: {} tier", kernels::active().tier()));
    say(format!(
        "model: digits MLP 64→64→64→10 ({} parameters), user data: {} to adapt on, {} to test",
        model.num_params(),
        train.len(),
        test.len()
    ));
    let split = AdaptedModel::new(
        &model,
        &SplitConfig {
            targets: Targets::AllLinear,
            adapter: HydraConfig::default(),
            ..SplitConfig::default()
        },
    )?;
    let cfg = TrainConfig { epochs, batch_size: 32, lr: 1e-2, ..TrainConfig::default() };
    let mut t = Trainer::new(split, cfg)?;
    let (_, before) = t.evaluate(&test)?;
    let (_, base_before) = t.evaluate(&base)?;
    say(format!(
        "accuracy before adapting: user {:.1}%, original writers {:.1}%",
        100.0 * before.unwrap_or(0.0),
        100.0 * base_before.unwrap_or(0.0)
    ));
    say(format!(
        "training a Hydra adapter (parallel rank 4 + sequential rank 8 on 3 layers, {} parameters)…",
        t.model().report().trainable_params
    ));
    let (f16_calls0, widened0) = (stats::f16_kernel_calls(), stats::widened_elements());
    let t0 = Instant::now();
    let mut last = 0.0;
    t.fit(&train, None, &mut |e| {
        if let Event::Epoch(m) = e {
            last = m.train_loss;
        }
    })?;
    let train_secs = t0.elapsed().as_secs_f64();
    // Which path training took: cached f16 activations straight into the f16
    // kernels of the active tier, or widened to f32 first.
    let f16_calls = stats::f16_kernel_calls() - f16_calls0;
    let widened = stats::widened_elements() - widened0;
    let (_, after) = t.evaluate(&test)?;
    let (_, base_after) = t.evaluate(&base)?;
    say(format!("trained {epochs} epochs in {train_secs:.2}s (final loss {last:.3})"));
    say(format!(
        "f16 path: {f16_calls} calls of the {} tier's f16 kernels on cached f16 activations, \
         {widened} f16 values widened to f32",
        kernels::active().tier()
    ));
    say(format!(
        "accuracy after adapting:  user {:.1}%, original writers {:.1}%",
        100.0 * after.unwrap_or(0.0),
        100.0 * base_after.unwrap_or(0.0)
    ));
    let dir = std::env::temp_dir().join(format!("hydra-edge-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let merged_path = dir.join("digits_user.onnx");
    merge_into_onnx(&model, t.model(), None, &merged_path)?;
    let (feed, _) = test.batch(&(0..test.len()).collect::<Vec<_>>());
    // Checked in f32 whatever `--matmul-precision` says (the merge is exact).
    let unmerged = hydra_edge::runtime::with_f32_products(|| t.model_mut().forward(&feed, false))?;
    let merged = Model::load(&merged_path)?;
    let base_model = Model::from_onnx(&model)?;
    let got = merged.run(&feed)?.remove(0);
    let (u, g) = (unmerged.f32("unmerged")?, got.f32("merged")?);
    let err = u.iter().zip(g.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    say(format!(
        "merged into {} — merged vs unmerged max abs error {err:.2e}",
        merged_path.display()
    ));
    let run = |m: &Model, f: &Feed| drop(m.run(f));
    let (mut tb, mut tm) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..20 {
        tb = tb.min(best(1, || run(&base_model, &feed)));
        tm = tm.min(best(1, || run(&merged, &feed)));
    }
    say(format!(
        "latency on {} samples: base {:.3} ms, merged {:.3} ms (merged/base {:.3})",
        test.len(),
        tb * 1e3,
        tm * 1e3,
        tm / tb
    ));
    say(format!("done in {:.1}s", start.elapsed().as_secs_f64()));
    if json {
        println!(
            "{}",
            json!({"accuracy_before": before, "accuracy_after": after, "base_accuracy_before": base_before, "base_accuracy_after": base_after,
                "merge_max_abs_error": err, "base_ms": tb * 1e3, "merged_ms": tm * 1e3, "train_seconds": train_secs, "merged_model": merged_path,
                "tier": kernels::active().tier().name(), "f16_kernel_calls": f16_calls, "f16_widened": widened,
                "device": hydra_edge::device::device().to_string(), "gpu_products": hydra_edge::device::stats::gpu_products(),
                "gpu_bf16_products": hydra_edge::device::stats::gpu_bf16_products(), "bf16_products": kernels::stats::bf16_products(),
                "gpu_adapted_passes": hydra_edge::device::stats::gpu_adapted_passes(),
                "gpu_tail_ops": hydra_edge::device::stats::gpu_tail_ops(),
                "gpu_tail_reruns": hydra_edge::device::stats::gpu_tail_reruns(),
                "gpu_cache_gathers": hydra_edge::device::stats::gpu_cache_gathers(),
                "gpu_optimizer_steps": hydra_edge::device::stats::gpu_optimizer_steps()})
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

pub fn bench(json: bool) -> Result<()> {
    let fast = kernels::active();
    let scalar = Kernels::for_tier(Tier::Scalar)?;
    let (n, d, r) = (512, 768, 8);
    let x: Vec<f16> =
        (0..n * d).map(|i| f16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect();
    let a: Vec<f32> = (0..r * d).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut u = vec![0.0f32; n * r];
    let mut du = vec![0.0f32; n * r];
    let mut da = vec![0.0f32; r * d];
    let mut time = |k: &Kernels| {
        (
            best(20, || k.down_f16(black_box(&x), &a, &mut u, n, d, r)),
            best(20, || k.grad_a_f16(black_box(&du), &x, &mut da, 1.0, n, d, r)),
        )
    };
    let (fd, fg) = time(fast);
    let (sd, sg) = time(scalar);
    du.fill(0.0);
    let gbps = (n * d * 2 + r * d * 4) as f64 / fd / 1e9;
    // A train step on the embedded digits model.
    let model = OnnxModel::from_bytes(MODEL, None)?;
    let train = dataset(USER_TRAIN)?;
    let split = AdaptedModel::new(
        &model,
        &SplitConfig { targets: Targets::AllLinear, ..SplitConfig::default() },
    )?;
    let mut t =
        Trainer::new(split, TrainConfig { epochs: 3, batch_size: 32, ..TrainConfig::default() })?;
    let t0 = Instant::now();
    let mut steps = 0;
    t.fit(&train, None, &mut |e| steps += usize::from(matches!(e, Event::Step { .. })))?;
    let step_ms = t0.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    if json {
        println!(
            "{}",
            json!({"tier": fast.tier().name(), "down_f16_ms": fd * 1e3, "down_f16_vs_scalar": sd / fd, "down_f16_gbps": gbps, "grad_a_f16_vs_scalar": sg / fg, "digits_train_step_ms": step_ms})
        );
    } else {
        println!(
            "tier {} (available: {})",
            fast.tier(),
            Tier::available().map(Tier::name).collect::<Vec<_>>().join(", ")
        );
        println!(
            "down_f16  n={n} d={d} r={r}: {:.3} ms, {:.1}× scalar, {gbps:.1} GB/s",
            fd * 1e3,
            sd / fd
        );
        println!("grad_a_f16 n={n} d={d} r={r}: {:.3} ms, {:.1}× scalar", fg * 1e3, sg / fg);
        println!("digits MLP train step (batch 32, Hydra on 3 layers, cache on): {step_ms:.3} ms");
        println!("(full report: cargo run --release --example kernel_bench)");
    }
    Ok(())
}
