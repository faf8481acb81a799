//! Latency of all-MiniLM-L6-v2, in one run: the base model, the model with a
//! Hydra adapter (last two blocks) merged in, and the unmerged hot-swap path
//! (tract prefix + our tail) — plus the cost of one adapter swap relative
//! to one forward. Batch 16 × 64 tokens, best of several runs each.
//!
//! `python3 models/real/build_minilm.py && cargo run --release --example merge_latency [threads]`

use std::time::Instant;

use hydra_edge::Tensor;
use hydra_edge::adapter::DType;
use hydra_edge::backbone::Feed;
use hydra_edge::export::merge_into_onnx;
use hydra_edge::infer::{HotSwap, Model};
use hydra_edge::model::AdaptedModel;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::parallel::set_threads;
use hydra_edge::rng::Rng;
use hydra_edge::train::{TrainConfig, Trainer};
use ndarray::{ArrayD, IxDyn};

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    set_threads(std::env::args().nth(1).map_or(Ok(1), |s| s.parse())?)?;
    let dir = std::env::var("HYDRA_MODELS_DIR").unwrap_or_else(|_| "models/real/out".into());
    let model = OnnxModel::load(format!("{dir}/minilm.onnx"))?;
    let (b, s) = (16, 64);
    let mut rng = Rng::new(2);
    let ids: Vec<i64> = (0..b * s).map(|_| 1000 + rng.below(29_000) as i64).collect();
    let t = |v: Vec<i64>| Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[b, s]), v).unwrap());
    let feed = Feed::from([
        ("input_ids".to_string(), t(ids)),
        ("attention_mask".to_string(), t(vec![1; b * s])),
    ]);
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(2),
        output: Some("sentence_embedding".into()),
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(&model, &cfg)?;
    for (_, a) in split.tail_mut().adapters_mut() {
        for br in a.branches_mut() {
            br.b.iter_mut().enumerate().for_each(|(i, v)| *v = ((i % 13) as f32 - 6.0) * 1e-3);
        }
    }
    let out = std::env::temp_dir().join("hydra-merge-latency");
    std::fs::create_dir_all(&out)?;
    merge_into_onnx(&model, &split, None, &out.join("merged.onnx"))?;
    let files: Vec<_> = (0..3)
        .map(|k| {
            let mut s2 = AdaptedModel::new(&model, &cfg)?;
            for (_, a) in s2.tail_mut().adapters_mut() {
                for br in a.branches_mut() {
                    br.b.iter_mut().for_each(|v| *v = 1e-3 * k as f32);
                }
            }
            Trainer::new(s2, TrainConfig::default())?.adapter_file(false, DType::F32)
        })
        .collect::<Result<_, hydra_edge::Error>>()?;
    let base = Model::from_onnx(&model)?;
    let merged = Model::load(out.join("merged.onnx"))?;
    let mut hs = HotSwap::new(split, None);
    for (k, f) in files.iter().enumerate() {
        hs.add(&format!("user{k}"), f)?;
    }
    hs.activate(0)?;
    // Interleaved, so that drift of a shared machine hits all three alike.
    let (mut t_base, mut t_merged, mut t_unmerged) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for _ in 0..7 {
        t_base = t_base.min(best(1, || drop(base.run(&feed).unwrap())));
        t_merged = t_merged.min(best(1, || drop(merged.run(&feed).unwrap())));
        t_unmerged = t_unmerged.min(best(1, || drop(hs.run(&feed).unwrap())));
    }
    let mut k = 0;
    let t_swap = best(50, || {
        k = (k + 1) % 3;
        hs.activate(k).unwrap();
    });
    println!("MiniLM-L6, batch {b}×{s}, Hydra on the last 2 blocks (12 layers):");
    println!(
        "  base {:.1} ms | merged {:.1} ms | unmerged hot-swap path {:.1} ms",
        t_base * 1e3,
        t_merged * 1e3,
        t_unmerged * 1e3
    );
    println!("  merged/base {:.3} | unmerged/base {:.3}", t_merged / t_base, t_unmerged / t_base);
    println!(
        "  one adapter swap {:.3} ms = {:.5} of one forward",
        t_swap * 1e3,
        t_swap / t_unmerged
    );
    Ok(())
}
