//! What an adapter adds to its frozen layer: one `HydraLinear` forward +
//! backward (r8+8, batch 16 × 64 tokens, MiniLM's FFN-output and
//! attention-output shapes) against the frozen layer's own two products
//! (`X·W0ᵀ`, `dY·W0`) in the same run, in f32 and (where the CPU has AMX)
//! with bf16 products. Best of 30 for each; the ratio is what to read.
//!
//! `cargo run --release --example adapter_overhead [threads]`

use std::time::Instant;

use hydra_edge::hydra::{BranchConfig, Input, Weights, gemm};
use hydra_edge::rng::Rng;
use hydra_edge::runtime::{MatmulPrecision, set_matmul_precision};
use hydra_edge::{HydraConfig, HydraLinear};

fn best_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}

fn main() -> hydra_edge::Result<()> {
    let threads = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    hydra_edge::parallel::set_threads(threads)?;
    let n = 16 * 64;
    println!(
        "adapted layer (Hydra r8+8) fwd+bwd ÷ its frozen products, n = {n}, {threads} thread(s)"
    );
    for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        if !set_matmul_precision(precision) && precision == MatmulPrecision::Bf16 {
            println!("  (no bf16 matrix units on this CPU: bf16 rows skipped)");
            break;
        }
        for (din, dout) in [(1536, 384), (384, 384)] {
            let mut rng = Rng::new(1);
            let mut v = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
            let (w, x, dy, b) = (v(din * dout), v(n * din), v(n * dout), v(dout));
            let mut cfg = HydraConfig::default();
            cfg.parallel = BranchConfig { rank: 8, ..cfg.parallel };
            cfg.sequential = BranchConfig { rank: 8, ..cfg.sequential };
            let mut layer = HydraLinear::new(cfg, Weights::F32(w.clone()), Some(b), din, dout)?;
            layer.set_training(true);
            let adapted = best_ms(30, || {
                let y = layer.forward_ext(Input::F32(&x), n, false, true).expect("forward");
                let dx = layer.backward_with_input(&dy, Input::F32(&x), true).expect("backward");
                std::hint::black_box((y, dx));
            });
            let (mut y, mut dx) = (vec![0.0; n * dout], vec![0.0; n * din]);
            let frozen = best_ms(30, || {
                gemm(n, din, dout, 1.0, &x, (din, 1), &w, (1, din), 0.0, &mut y);
                gemm(n, dout, din, 1.0, &dy, (dout, 1), &w, (din, 1), 0.0, &mut dx);
                std::hint::black_box((&y, &dx));
            });
            println!(
                "  {precision:?} {din}→{dout}: adapted {adapted:.2} ms, frozen {frozen:.2} ms, ratio {:.2}",
                adapted / frozen
            );
            // A merged layer's forward is its frozen product with the bias:
            // fused into the product's start vs bias rows + a β = 1 product.
            layer.merge()?;
            let fused = best_ms(30, || {
                std::hint::black_box(
                    layer.forward_ext(Input::F32(&x), n, false, false).expect("fwd"),
                );
            });
            let bias = layer.bias().expect("bias").to_vec();
            let Weights::F32(wm) = layer.weights().clone() else { unreachable!("f32") };
            let rows = best_ms(30, || {
                let mut y = Vec::with_capacity(n * dout);
                for _ in 0..n {
                    y.extend_from_slice(&bias);
                }
                gemm(n, din, dout, 1.0, &x, (din, 1), &wm, (1, din), 1.0, &mut y);
                std::hint::black_box(y);
            });
            println!(
                "  {precision:?} {din}→{dout} frozen forward + bias: fused {fused:.2} ms, bias rows + β = 1 {rows:.2} ms, ratio {:.2}",
                fused / rows
            );
        }
    }
    Ok(())
}
