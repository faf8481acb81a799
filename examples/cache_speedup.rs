//! The feature cache on all-MiniLM-L6-v2: last encoder block in the tail,
//! a new 2-class head on the pooled features, batch 16, 1,000 samples of 64
//! random tokens. Prints the epoch time without the cache and, with it, the
//! time of the first epoch (which builds the cache) and of a later one.
//!
//! `python3 models/real/build_minilm.py && cargo run --release --example cache_speedup [samples] [threads]`

use hydra_edge::Tensor;
use hydra_edge::model::AdaptedModel;
use hydra_edge::model::{CacheConfig, HeadConfig};
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::parallel::set_threads;
use hydra_edge::rng::Rng;
use hydra_edge::train::{Dataset, Labels, TrainConfig, Trainer};
use ndarray::{ArrayD, IxDyn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).map_or(Ok(1000), |s| s.parse())?;
    set_threads(std::env::args().nth(2).map_or(Ok(1), |s| s.parse())?)?;
    let path = std::env::var("HYDRA_MODELS_DIR").unwrap_or_else(|_| "models/real/out".into())
        + "/minilm.onnx";
    let model = OnnxModel::load(&path)?;
    let seq = 64;
    let mut rng = Rng::new(5);
    let ids: Vec<i64> = (0..n * seq)
        .map(|i| if i % seq == 0 { 101 } else { 1000 + rng.below(29_000) as i64 })
        .collect();
    let t = |v: Vec<i64>| Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[n, seq]), v).unwrap());
    let labels = Labels::Classes((0..n).map(|_| rng.below(2) as usize).collect());
    let data = Dataset::new(
        [("input_ids".to_string(), t(ids)), ("attention_mask".to_string(), t(vec![1; n * seq]))],
        labels,
    )?;
    let run = |cache: bool, epochs: usize| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        let cfg = SplitConfig {
            targets: Targets::LastBlocks(1),
            output: Some("pooled".into()),
            ..SplitConfig::default()
        };
        let split = AdaptedModel::new(&model, &cfg)?;
        let tc = TrainConfig {
            epochs,
            batch_size: 16,
            head: HeadConfig::New(2),
            cache: CacheConfig { enabled: cache, ram_budget: 1 << 30, ..CacheConfig::default() },
            ..TrainConfig::default()
        };
        let mut tr = Trainer::new(split, tc)?;
        let start = std::time::Instant::now();
        let m = tr.fit(&data, None, &mut |_| {})?;
        let total = start.elapsed().as_secs_f64();
        // The first epoch's figure excludes building the cache; add it back.
        let mut secs: Vec<f64> = m.iter().map(|m| m.seconds).collect();
        secs[0] += total - secs.iter().sum::<f64>();
        Ok(secs)
    };
    let uncached = run(false, 1)?;
    let cached = run(true, 2)?;
    println!("{n} samples × {seq} tokens, batch 16, MiniLM last block in the tail:");
    println!("  epoch without cache          {:.1} s", uncached[0]);
    println!(
        "  first epoch with cache       {:.1} s (runs the prefix once and stores f16 features)",
        cached[0]
    );
    println!("  later epoch with cache       {:.1} s", cached[1]);
    println!("  uncached / cached epoch time {:.2}", uncached[0] / cached[1]);
    Ok(())
}
