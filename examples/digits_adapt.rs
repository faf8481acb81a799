//! The digits task: a pre-trained MLP adapted to a shifted "user"
//! distribution (200 images), head-only vs LoRA vs SeqLoRA vs Hydra, at
//! matched-ish trainable parameter counts, 3 seeds each.
//!
//! `cargo run --release --example digits_adapt`

use std::path::Path;

use hydra_edge::model::AdaptedModel;
use hydra_edge::model::HeadConfig;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::train::{Dataset, TrainConfig, Trainer};
use hydra_edge::{HydraConfig, Variant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = Path::new("models/digits");
    let model = OnnxModel::load(dir.join("digits_mlp.onnx"))?;
    let train = Dataset::from_npz(&dir.join("digits_user_train.npz"), "label")?;
    let test = Dataset::from_npz(&dir.join("digits_user_test.npz"), "label")?;
    let base = Dataset::from_npz(&dir.join("digits_base_test.npz"), "label")?;
    let frozen = AdaptedModel::new(
        &model,
        &SplitConfig { targets: Targets::Patterns(vec!["head".into()]), ..SplitConfig::default() },
    )?;
    let mut t = Trainer::new(frozen, TrainConfig::default())?;
    println!(
        "frozen model: user test accuracy {:.3}, base test accuracy {:.3}",
        t.evaluate(&test)?.1.unwrap_or(0.0),
        t.evaluate(&base)?.1.unwrap_or(0.0)
    );
    let runs: [(&str, Option<Variant>, usize, usize); 4] = [
        ("head-only", None, 0, 0),
        ("LoRA", Some(Variant::Lora), 8, 0),
        ("SeqLoRA", Some(Variant::SeqLora), 0, 8),
        ("Hydra", Some(Variant::Hydra), 4, 4),
    ];
    println!(
        "| method | trainable params | user test accuracy (mean ± std, 3 seeds) | base test accuracy |"
    );
    println!("|---|---|---|---|");
    for (name, variant, rp, rs) in runs {
        let mut accs = Vec::new();
        let mut base_accs = Vec::new();
        let mut params = 0;
        for seed in 0..3u64 {
            let mut adapter = HydraConfig { seed, ..HydraConfig::default() };
            let (targets, output, head) = match variant {
                None => (Targets::None, Some("features".to_string()), HeadConfig::New(10)),
                Some(v) => {
                    adapter.variant = v;
                    adapter.parallel.rank = rp.max(1);
                    adapter.sequential.rank = rs.max(1);
                    (Targets::AllLinear, None, HeadConfig::Keep)
                }
            };
            let split = AdaptedModel::new(
                &model,
                &SplitConfig { targets, output, adapter, ..SplitConfig::default() },
            )?;
            let cfg = TrainConfig {
                epochs: 40,
                batch_size: 32,
                lr: 1e-2,
                seed,
                head,
                ..TrainConfig::default()
            };
            let mut t = Trainer::new(split, cfg)?;
            t.fit(&train, None, &mut |_| {})?;
            params =
                t.model().report().trainable_params + t.head().map_or(0, |h| h.w.len() + h.b.len());
            accs.push(t.evaluate(&test)?.1.unwrap_or(0.0));
            base_accs.push(t.evaluate(&base)?.1.unwrap_or(0.0));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let std = |v: &[f64]| {
            (v.iter().map(|a| (a - mean(v)).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
        };
        println!(
            "| {name} | {params} | {:.3} ± {:.3} | {:.3} |",
            mean(&accs),
            std(&accs),
            mean(&base_accs)
        );
    }
    Ok(())
}
