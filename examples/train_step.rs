//! The engine benchmark (issue "one owner … and a training step faster than
//! PyTorch"): all-MiniLM-L6-v2, Hydra r8+8 on the attention-output and
//! FFN-output dense of the last 2 blocks, a new 2-class head on the pooled
//! embedding, batch 16 × 64 tokens, AdamW, prefix cached — the recipe of
//! `../shared/anchors/pytorch_minilm_hydra.py`.
//!
//! Reports, side by side in one run:
//! - the training step (cached boundary → tail → head → loss → backward →
//!   AdamW) at 1 thread and at every thread count up to `max_threads`;
//! - tail forward + backward ÷ tract's forward of the same tail (the tail's
//!   subgraph cut out of the ONNX file with the boundary as its inputs);
//! - the step's dense GFLOP/s ÷ the GFLOP/s of plain sgemm on exactly the
//!   products the step ran (shapes recorded during the step, replayed);
//! - the hot-swap run (an adapter folded into the weights) ÷ the same model
//!   with no adapter, and the cost of one swap.
//!
//! `python3 models/real/build_minilm.py && cargo run --release --example train_step [max_threads] [steps]`

use std::time::Instant;

use hydra_edge::Tensor;
use hydra_edge::adapter::DType;
use hydra_edge::hydra::{gemm, record_gemm_shapes};
use hydra_edge::infer::HotSwap;
use hydra_edge::kernels::stats;
use hydra_edge::model::{AdaptedModel, CacheConfig, HeadConfig};
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::parallel::set_threads;
use hydra_edge::rng::Rng;
use hydra_edge::runtime::{MatmulPrecision, set_matmul_precision};
use hydra_edge::train::{Dataset, Labels, OptimizerKind, TrainConfig, Trainer};
use hydra_edge::{HydraConfig, Variant};
use ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::*;

const SEQ: usize = 64;
const BATCH: usize = 16;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn recipe() -> SplitConfig {
    let mut adapter = HydraConfig { variant: Variant::Hydra, ..HydraConfig::default() };
    adapter.parallel.rank = 8;
    adapter.sequential.rank = 8;
    SplitConfig {
        targets: Targets::Patterns(
            [
                "4/attention/output/dense",
                "4/output/dense",
                "5/attention/output/dense",
                "5/output/dense",
            ]
            .iter()
            .map(|p| format!("/encoder/layer.{p}"))
            .collect(),
        ),
        output: Some("pooled".into()),
        adapter,
        ..SplitConfig::default()
    }
}

fn data(n: usize, seed: u64) -> Result<Dataset, Box<dyn std::error::Error>> {
    let mut rng = Rng::new(seed);
    // TRAIN_STEP_VOCAB: token ids below it (targets/gpu-bundle.sh ships a
    // MiniLM whose word table keeps only its first rows, to fit the device
    // transfer; the step's cost does not depend on which rows are read).
    let vocab: u64 = std::env::var("TRAIN_STEP_VOCAB").map_or(Ok(30_000), |s| s.parse())?;
    let span =
        vocab.checked_sub(1000).filter(|s| *s > 0).ok_or("TRAIN_STEP_VOCAB must be over 1000")?;
    let ids: Vec<i64> = (0..n * SEQ)
        .map(|i| if i % SEQ == 0 { 101 } else { 1000 + rng.below(span) as i64 })
        .collect();
    // Real sentences are padded: give each sample a random length.
    let mask: Vec<i64> = (0..n)
        .flat_map(|_| {
            let len = 8 + rng.below((SEQ - 8) as u64) as usize;
            (0..SEQ).map(move |j| i64::from(j < len))
        })
        .collect();
    let t = |v: Vec<i64>| Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[n, SEQ]), v).unwrap());
    let labels = Labels::Classes((0..n).map(|_| rng.below(2) as usize).collect());
    Ok(Dataset::new(
        [("input_ids".to_string(), t(ids)), ("attention_mask".to_string(), t(mask))],
        labels,
    )?)
}

/// Tract's forward of the tail alone: the ONNX graph cut at the boundary
/// tensors (they become its inputs, with these shapes) and ending at
/// `pooled`, optimized by tract.
fn tract_tail(
    onnx: &OnnxModel,
    boundary: &[String],
    values: &[Tensor],
) -> Result<std::sync::Arc<TypedRunnableModel>, Box<dyn std::error::Error>> {
    use hydra_edge::onnx::pb;
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let mut proto = onnx.proto().clone();
    let g = proto.graph.as_mut().ok_or("no graph")?;
    // Keep the nodes `pooled` needs, walking back until a boundary tensor.
    let mut keep = vec![false; g.node.len()];
    let mut want: Vec<String> = vec!["pooled".into()];
    while let Some(t) = want.pop() {
        if boundary.contains(&t) {
            continue;
        }
        if let Some(i) = g.node.iter().position(|n| n.output.contains(&t))
            && !keep[i]
        {
            keep[i] = true;
            want.extend(g.node[i].input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let nodes = std::mem::take(&mut g.node);
    g.node = nodes.into_iter().zip(&keep).filter(|(_, k)| **k).map(|(n, _)| n).collect();
    let info = |name: &str, elem_type: i32, dims: &[usize]| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    g.input = boundary
        .iter()
        .zip(values)
        .map(|(b, v)| info(b, if matches!(v, Tensor::I64(_)) { 7 } else { 1 }, v.shape()))
        .collect();
    g.output.retain(|o| o.name == "pooled");
    let m = tract_onnx::onnx().model_for_proto_model(&proto)?;
    Ok(m.into_optimized()?.into_runnable()?)
}

fn tract_value(t: &Tensor) -> TValue {
    match t {
        Tensor::F32(a) => tract_onnx::prelude::Tensor::from(a.clone()).into(),
        Tensor::F16(a) => tract_onnx::prelude::Tensor::from(a.mapv(|v| v.to_f32())).into(),
        Tensor::I64(a) => tract_onnx::prelude::Tensor::from(a.clone()).into(),
    }
}

/// The median wall time of `steps` single training steps, in ms.
fn median_step_ms(trainer: &mut Trainer, train: &Dataset, steps: usize) -> hydra_edge::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..steps {
        let target = trainer.step() + 1;
        let t0 = Instant::now();
        trainer.fit_until(train, None, Some(target), &mut |_| {})?;
        v.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

/// The adapters' gradients for one batch (`dY = sin(Y)` at the tail's
/// output), leaving the gradients zeroed.
fn batch_grads(
    m: &mut AdaptedModel,
    feed: &hydra_edge::backbone::Feed,
) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    m.zero_grad();
    let y = m.forward(feed, true)?;
    let dy = y.f32("tail output")?.mapv(f32::sin);
    m.backward(dy)?;
    let grads = m.params_and_grads().1.iter().map(|g| g.to_vec()).collect();
    m.zero_grad();
    Ok(grads)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let max_threads: usize = std::env::args().nth(1).map_or(Ok(2), |s| s.parse())?;
    let steps: usize = std::env::args().nth(2).map_or(Ok(20), |s| s.parse())?;
    let path = std::env::var("HYDRA_MODELS_DIR").unwrap_or_else(|_| "models/real/out".into())
        + "/minilm.onnx";
    // As the CLI does: reuse freed activation memory instead of page-faulting it back.
    hydra_edge::runtime::keep_freed_memory(256 << 20);
    let onnx = OnnxModel::load(&path)?;
    let train = data(BATCH * 4, 7)?;
    let cfg = TrainConfig {
        epochs: 1_000,
        batch_size: BATCH,
        lr: 1e-3,
        weight_decay: 1e-4,
        optimizer: OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        head: HeadConfig::New(2),
        cache: CacheConfig { enabled: true, ..CacheConfig::default() },
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(AdaptedModel::new(&onnx, &recipe())?, cfg)?;
    println!(
        "all-MiniLM-L6-v2, Hydra r8+8 on {} layers of the last 2 blocks, new 2-class head, batch {BATCH} × {SEQ} tokens, AdamW, prefix cached",
        trainer.model().report().adapted.len()
    );
    // HYDRA_MATMUL=bf16: every step below (and the profile, tail vs tract,
    // hot-swap) with bf16 products; by default f32, with the steps repeated
    // in bf16 beside them where the CPU has bf16 matrix units.
    let precision: MatmulPrecision =
        std::env::var("HYDRA_MATMUL").map_or(Ok(MatmulPrecision::F32), |s| s.parse())?;
    set_matmul_precision(precision);
    // Build the cache and warm up (first steps allocate and create the head).
    set_threads(1)?;
    let f16_before = stats::f16_kernel_calls();
    trainer.fit_until(&train, None, Some(4), &mut |_| {})?;
    let mut step_ms = Vec::new();
    let mut threads_list = vec![1];
    threads_list.extend((2..=max_threads).filter(|t| *t > 1));
    for &t in &threads_list {
        set_threads(t)?;
        step_ms.push((t, median_step_ms(&mut trainer, &train, steps)?));
    }
    let f16_calls = stats::f16_kernel_calls() - f16_before;
    // The same steps with the large dense products in bf16 (AMX), where the
    // CPU has bf16 matrix units (`runtime::set_matmul_precision`).
    let mut bf16_ms = Vec::new();
    let bf16_before = stats::bf16_products();
    if precision == MatmulPrecision::F32 && set_matmul_precision(MatmulPrecision::Bf16) {
        for &t in &threads_list {
            set_threads(t)?;
            bf16_ms.push((t, median_step_ms(&mut trainer, &train, steps)?));
        }
    }
    let bf16_per_step =
        (stats::bf16_products() - bf16_before) / (steps * threads_list.len()).max(1);
    // HYDRA_MATMUL=bf16 keeps bf16 products on for the rest (profile, tail
    // vs tract, hot-swap); f32 otherwise.
    let precision: MatmulPrecision =
        std::env::var("HYDRA_MATMUL").map_or(Ok(MatmulPrecision::F32), |s| s.parse())?;
    set_matmul_precision(precision);
    // HYDRA_DEVICE=cuda[:N] (a `--features cuda` build): the same step with the
    // tail's dense products on that GPU, beside the CPU's at the most threads.
    if let Ok(dev) = std::env::var("HYDRA_DEVICE") {
        // One batch's adapter gradients from the same parameters on the CPU
        // and on the GPU: max |GPU − CPU| per tensor.
        let (feed, _) = train.batch(&(0..BATCH).collect::<Vec<_>>());
        let cpu_grads = batch_grads(trainer.model_mut(), &feed)?;
        let info = hydra_edge::device::set_device(dev.parse()?)?;
        let gpu_grads = batch_grads(trainer.model_mut(), &feed)?;
        let mut worst = 0.0f32;
        for (spec, (c, g)) in trainer.model().params().iter().zip(cpu_grads.iter().zip(&gpu_grads))
        {
            let scale = c.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
            let e = c.iter().zip(g).fold(0.0f32, |m, (c, g)| m.max((c - g).abs())) / scale;
            worst = worst.max(e);
            println!("  gradient {}: max |GPU − CPU| / max |CPU| = {e:.2e}", spec.name);
        }
        println!("one batch's gradients on {}: worst tensor {worst:.2e}", info.device);
        // f32 products on both sides: only the summation order differs.
        let finite = gpu_grads.iter().flatten().all(|v| v.is_finite());
        if precision == MatmulPrecision::F32 && (worst > 1e-3 || !finite) {
            return Err(format!("GPU gradients differ from the CPU's by {worst:e} (> 1e-3)").into());
        }
        use hydra_edge::device::stats as gpu;
        let counters = || {
            [
                gpu::gpu_products(),
                gpu::gpu_adapted_passes(),
                gpu::gpu_bytes_up(),
                gpu::gpu_bytes_down(),
                gpu::gpu_tail_ops(),
                gpu::gpu_cache_gathers(),
            ]
        };
        // The tail's values resident on the GPU (the default), then the
        // per-product baseline (operands up and results back per product,
        // element-wise ops and norms on the CPU), side by side.
        // One step first: it uploads the frozen weights and the feature
        // cache (kept there when it fits), so the figures below are a
        // step's in a run.
        let up0 = gpu::gpu_bytes_up();
        median_step_ms(&mut trainer, &train, 1)?;
        println!(
            "first step on {}: {:.1} MB up (the frozen weights, and the feature cache's {:.1} MB \
             kept there)",
            info.device,
            (gpu::gpu_bytes_up() - up0) as f64 / 1e6,
            trainer.model().cache_gpu_bytes() as f64 / 1e6
        );
        let mut runs = Vec::new();
        for resident in [true, false] {
            hydra_edge::device::set_resident_tail(resident);
            let before = counters();
            let ms = median_step_ms(&mut trainer, &train, steps)?;
            let per_step: Vec<usize> =
                counters().iter().zip(&before).map(|(a, b)| (a - b) / steps.max(1)).collect();
            runs.push((ms, per_step));
        }
        hydra_edge::device::set_resident_tail(true);
        let (gpu_ms, per_step) = runs[0].clone();
        let (t, cpu_ms) = *step_ms.last().unwrap();
        println!(
            "training step on {} ({}): {gpu_ms:.1} ms, {} products per step on the GPU ({} adapted \
             layers' passes whole there, {} element-wise ops and norms, {} boundary tensors gathered \
             from the feature cache kept there), {:.1} MB up and {:.1} MB down per step; CPU at {t} \
             thread(s) {cpu_ms:.1} ms (GPU ÷ CPU {:.2})",
            info.device,
            info.name,
            per_step[0],
            per_step[1],
            per_step[4],
            per_step[5],
            per_step[2] as f64 / 1e6,
            per_step[3] as f64 / 1e6,
            gpu_ms / cpu_ms
        );
        let (base_ms, base) = &runs[1];
        println!(
            "per-product baseline on {}: {base_ms:.1} ms, {:.1} MB up and {:.1} MB down per step; \
             resident ÷ baseline: time {:.2}, bytes across {:.2}",
            info.device,
            base[2] as f64 / 1e6,
            base[3] as f64 / 1e6,
            gpu_ms / base_ms,
            (per_step[2] + per_step[3]) as f64 / (base[2] + base[3]).max(1) as f64
        );
        // And with bf16 operands on the GPU's tensor cores, where it has them
        // (when the step above was f32).
        set_matmul_precision(MatmulPrecision::Bf16);
        if precision == MatmulPrecision::F32 && hydra_edge::device::gpu_bf16() {
            let bf16 = hydra_edge::device::stats::gpu_bf16_products();
            let ms = median_step_ms(&mut trainer, &train, steps)?;
            let per_step = (hydra_edge::device::stats::gpu_bf16_products() - bf16) / steps.max(1);
            println!(
                "training step on {}, bf16 products: {ms:.1} ms, {per_step} bf16 products per step \
                 (GPU f32 ÷ bf16 {:.2})",
                info.device,
                gpu_ms / ms
            );
        }
        set_matmul_precision(precision);
        hydra_edge::device::set_device(hydra_edge::device::Device::Cpu)?;
    }
    if std::env::var_os("HYDRA_PROFILE").is_some() {
        trainer.model_mut().tail_mut().set_profiling(true);
        let target = trainer.step() + steps as u64;
        trainer.fit_until(&train, None, Some(target), &mut |_| {})?;
        println!("per op type over {steps} steps ({max_threads} threads): forward ms, backward ms");
        for (op, f, b) in trainer.model().tail().profile() {
            println!("  {op:<24} {:>8.1} {:>8.1}", f * 1e3 / steps as f64, b * 1e3 / steps as f64);
        }
        if std::env::var_os("HYDRA_PROFILE_NODES").is_some() {
            for (name, op, f, b) in trainer.model().tail().profile_nodes() {
                let (f, b) = (f * 1e3 / steps as f64, b * 1e3 / steps as f64);
                println!("    {op:<12} {f:>7.2} {b:>7.2}  {name}");
            }
        }
        trainer.model_mut().tail_mut().set_profiling(false);
    }
    if std::env::var_os("TRAIN_STEP_ONLY").is_some() {
        // For profilers: stop after the timed steps.
        for (t, ms) in &step_ms {
            println!("training step, {t} thread(s), {precision:?} products: {ms:.1} ms");
        }
        for ((t, ms), (_, f32_ms)) in bf16_ms.iter().zip(&step_ms) {
            println!(
                "training step, bf16 products, {t} thread(s): {ms:.1} ms (f32 ÷ bf16 {:.2}; {bf16_per_step} bf16 products per step)",
                f32_ms / ms
            );
        }
        return Ok(());
    }
    let prefix_after_cache = trainer.model().prefix_samples();

    // Tail forward+backward vs tract's forward of the same tail, and dense
    // GFLOP/s vs plain sgemm on the same shapes, at `max_threads`.
    set_threads(max_threads)?;
    let model = trainer.model_mut();
    let idx: Vec<usize> = (0..BATCH).collect();
    let cache = CacheConfig::default();
    let boundary = model.boundary(&train, &idx, &cache, BATCH)?;
    let names = model.report().boundary.clone();
    let run_tail =
        |m: &mut AdaptedModel, record: bool| -> Result<f64, Box<dyn std::error::Error>> {
            let b = boundary.clone();
            let t0 = Instant::now();
            if record {
                record_gemm_shapes(true);
            }
            let y = m.predict_boundary(b, true)?;
            m.backward_prediction(ArrayD::from_elem(y.raw_dim(), 1e-3))?;
            let dt = t0.elapsed().as_secs_f64();
            m.tail_mut().clear_tape();
            Ok(dt)
        };
    run_tail(model, false)?;
    let ours = median((0..steps).map(|_| run_tail(model, false)).collect::<Result<Vec<_>, _>>()?);
    run_tail(model, true)?;
    let shapes = record_gemm_shapes(false);
    let flops: f64 = shapes.iter().map(|&(m, k, n)| 2.0 * (m * k * n) as f64).sum();
    let mut sg = Vec::new();
    for _ in 0..steps.min(10) {
        let bufs: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = shapes
            .iter()
            .map(|&(m, k, n)| (vec![0.5; m * k], vec![0.25; k * n], vec![0.0; m * n]))
            .collect();
        let t0 = Instant::now();
        for (&(m, k, n), (a, b, c)) in shapes.iter().zip(bufs) {
            let mut c = c;
            gemm(m, k, n, 1.0, &a, (k, 1), &b, (n, 1), 0.0, &mut c);
            std::hint::black_box(&c);
        }
        sg.push(t0.elapsed().as_secs_f64());
    }
    let sgemm = median(sg);
    let plan = tract_tail(&onnx, &names, &boundary)?;
    let tv: TVec<TValue> = boundary.iter().map(tract_value).collect();
    plan.run(tv.clone())?;
    let tract = median(
        (0..steps)
            .map(|_| {
                let t0 = Instant::now();
                plan.run(tv.clone()).map(|_| t0.elapsed().as_secs_f64())
            })
            .collect::<Result<Vec<_>, _>>()?,
    );

    // Hot-swap: two adapters on one model, runs at merged weights.
    let file = trainer.adapter_file(false, DType::F32)?;
    let mut other = file.clone();
    for t in &mut other.tensors {
        t.data.iter_mut().for_each(|v| *v *= 0.5);
    }
    let mut hs = HotSwap::new(AdaptedModel::new(&onnx, &recipe())?, Some(2));
    let a = hs.add("a", &file)?;
    let b = hs.add("b", &other)?;
    let feed = train.batch(&idx).0;
    // Baselines: the same adapter unmerged, and the base model as one tract plan.
    let mut unmerged = AdaptedModel::from_adapter_file(&onnx, &file)?;
    let whole = hydra_edge::infer::Model::from_onnx(&onnx)?;
    let timed = |f: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error>>| {
        f().map(|_| ())?;
        let v: Result<Vec<f64>, Box<dyn std::error::Error>> = (0..steps)
            .map(|_| {
                let t0 = Instant::now();
                f()?;
                Ok(t0.elapsed().as_secs_f64())
            })
            .collect();
        v.map(median)
    };
    hs.activate(a)?;
    let swapped = timed(&mut || hs.run(&feed).map(drop).map_err(Into::into))?;
    let unmerged_t = timed(&mut || {
        unmerged.predict(&feed, hydra_edge::model::CacheDtype::F32).map(drop).map_err(Into::into)
    })?;
    let base = timed(&mut || whole.run(&feed).map(drop).map_err(Into::into))?;
    let mut flip = false;
    let swap = timed(&mut || {
        flip = !flip;
        hs.activate(if flip { b } else { a }).map_err(Into::into)
    })?;

    println!("\n| measure | value |\n|---|---|");
    for (t, ms) in &step_ms {
        println!("| training step, {t} thread(s) | {ms:.1} ms |");
    }
    for ((t, ms), (_, f32_ms)) in bf16_ms.iter().zip(&step_ms) {
        println!(
            "| training step, bf16 products (AMX), {t} thread(s) | {ms:.1} ms (f32 ÷ bf16 {:.2}, {bf16_per_step} bf16 products per step) |",
            f32_ms / ms
        );
    }
    println!("| matmul precision for the rows below (HYDRA_MATMUL) | {precision:?} |");
    println!(
        "| tail fwd+bwd ÷ tract fwd of the same tail ({max_threads} thr) | {:.1} ms ÷ {:.1} ms = {:.2} |",
        ours * 1e3,
        tract * 1e3,
        ours / tract
    );
    println!(
        "| dense GFLOP/s in the step ÷ sgemm on the same {} products ({max_threads} thr) | {:.1} ÷ {:.1} = {:.2} |",
        shapes.len(),
        flops / ours / 1e9,
        flops / sgemm / 1e9,
        sgemm / ours
    );
    println!(
        "| hot-swap run (merged) ÷ base model in tract (batch {BATCH}) | {:.1} ms ÷ {:.1} ms = {:.3} |",
        swapped * 1e3,
        base * 1e3,
        swapped / base
    );
    println!(
        "| hot-swap run (merged) ÷ same adapter unmerged | {:.1} ms ÷ {:.1} ms = {:.3} |",
        swapped * 1e3,
        unmerged_t * 1e3,
        swapped / unmerged_t
    );
    println!("| one swap (unfold + fold 4 layers) | {:.2} ms |", swap * 1e3);
    println!("| f16 kernel calls during the timed steps | {f16_calls} |");
    println!(
        "| samples through the backbone (cache build + probes) | {prefix_after_cache} for {} samples |",
        train.len()
    );
    Ok(())
}
