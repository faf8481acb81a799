//! MiniLM-L6 with its last encoder block in the tail: the tail's ops and
//! parameter counts, then — at batch 16 × 64 tokens, in one run — the time of
//! one tract prefix run against one tail forward + backward.
//!
//! `python3 models/real/build_minilm.py && cargo run --release --example minilm_split [threads]`

use std::collections::BTreeMap;
use std::time::Instant;

use hydra_edge::Tensor;
use hydra_edge::backbone::Feed;
use hydra_edge::model::AdaptedModel;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::parallel::set_threads;
use hydra_edge::rng::Rng;
use ndarray::{ArrayD, IxDyn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = std::env::args().nth(1).map_or(Ok(1), |s| s.parse())?;
    set_threads(threads)?;
    let path = std::env::var("HYDRA_MODELS_DIR").unwrap_or_else(|_| "models/real/out".into())
        + "/minilm.onnx";
    let model = OnnxModel::load(&path)?;
    let cfg = SplitConfig {
        targets: Targets::LastBlocks(1),
        output: Some("last_hidden_state".into()),
        ..SplitConfig::default()
    };
    let mut split = AdaptedModel::new(&model, &cfg)?;
    let r = split.report().clone();
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    for (op, _) in &r.tail_ops {
        *ops.entry(op.as_str()).or_default() += 1;
    }
    println!("tail: {} nodes: {ops:?}", r.tail_ops.len());
    println!("boundary tensors: {:?}", r.boundary);
    println!(
        "params: model {} | tail frozen {} | trainable (Hydra r_p=4, r_s=8 on {} layers) {}",
        r.model_params,
        r.tail_frozen_params,
        r.adapted.len(),
        r.trainable_params
    );
    let (batch, seq) = (16, 64);
    let mut rng = Rng::new(1);
    let ids: Vec<i64> = (0..batch * seq).map(|_| 1000 + rng.below(29_000) as i64).collect();
    let t = |v: Vec<i64>| Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), v).unwrap());
    let feed = Feed::from([
        ("input_ids".to_string(), t(ids)),
        ("attention_mask".to_string(), t(vec![1; batch * seq])),
    ]);
    let mem = split.estimate_memory(&feed)?;
    println!("tail training memory at batch {batch}: {:.1} MB", mem.at_batch(batch) as f64 / 1e6);
    let reps = 5;
    let (mut t_prefix, mut t_tail) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        let t0 = Instant::now();
        let boundary = split.prefix(&feed)?;
        t_prefix = t_prefix.min(t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        let y = split.tail_mut().forward(boundary, true)?;
        let dy = ArrayD::from_elem(IxDyn(y.shape()), 1e-3f32);
        split.tail_mut().backward(dy)?;
        t_tail = t_tail.min(t1.elapsed().as_secs_f64());
    }
    println!(
        "batch {batch}×{seq}, {threads} thread(s), best of {reps}: tract prefix {:.1} ms | tail fwd+bwd {:.1} ms | tail/prefix {:.2}",
        t_prefix * 1e3,
        t_tail * 1e3,
        t_tail / t_prefix
    );
    Ok(())
}
