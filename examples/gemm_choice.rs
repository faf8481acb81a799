//! Why the tail's dense products use matrixmultiply (split over the one
//! thread pool) rather than tract-linalg's kernels: both on the tail's own
//! shapes (MiniLM FFN and attention-output products at batch 16 × 64, and one
//! attention head's product), same run, same threads. tract packs both
//! operands on every call through a selection and packing API that changes
//! between releases; matrixmultiply takes strided slices as they are.
//!
//! `cargo run --release --example gemm_choice [threads]`

use std::time::Instant;
use tract_linalg::MmmDispatch;
use tract_linalg::mmm::Query;
use tract_linalg::mmm::{AsInputValue, FusedSpec};
use tract_onnx::prelude::*;

fn tract_mm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> TractResult<()> {
    let q = Query::plain(DatumType::F32, Some(m), Some(k), Some(n));
    let (mmm, packing, pe) = MmmDispatch::native()
        .pick(&q)
        .ok_or_else(|| TractError::msg("no f32 kernel for this machine"))?;
    assert!(pe.is_none());
    let (af, bf) = &mmm.packings()[packing];
    let at = tract_onnx::prelude::Tensor::from_shape(&[m, k], a)?;
    let bt = tract_onnx::prelude::Tensor::from_shape(&[k, n], b)?;
    let pa = af.prepare_one(&at, 1, 0)?;
    let pb = bf.prepare_one(&bt, 0, 1)?;
    let mut ct = unsafe { tract_onnx::prelude::Tensor::uninitialized::<f32>(&[m, n])? };
    unsafe {
        let store = mmm.c_view(Some(0), Some(1)).wrap(&ct.view_mut());
        mmm.run(
            m,
            n,
            &[
                FusedSpec::AddMatMul {
                    a: AsInputValue::Borrowed(&*pa),
                    b: AsInputValue::Borrowed(&*pb),
                    packing,
                },
                FusedSpec::Store(store),
            ],
        )?;
    }
    c.copy_from_slice(ct.to_plain_array_view::<f32>()?.as_slice().unwrap());
    Ok(())
}

fn main() -> TractResult<()> {
    hydra_edge::parallel::set_threads(std::env::args().nth(1).map_or(1, |s| s.parse().unwrap()))
        .unwrap();
    for &(m, k, n) in &[(1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384), (64, 32, 64)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 * 0.1).collect();
        let mut c1 = vec![0.0f32; m * n];
        let mut c2 = vec![0.0f32; m * n];
        tract_mm(m, k, n, &a, &b, &mut c1)?;
        hydra_edge::hydra::gemm(m, k, n, 1.0, &a, (k, 1), &b, (n, 1), 0.0, &mut c2);
        let err = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let reps = 20;
        let t0 = Instant::now();
        for _ in 0..reps {
            tract_mm(m, k, n, &a, &b, &mut c1)?;
        }
        let tt = t0.elapsed().as_secs_f64() / reps as f64;
        let t0 = Instant::now();
        for _ in 0..reps {
            hydra_edge::hydra::gemm(m, k, n, 1.0, &a, (k, 1), &b, (n, 1), 0.0, &mut c2);
        }
        let tm = t0.elapsed().as_secs_f64() / reps as f64;
        let gf = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "{m}x{k}x{n}: tract {:.1} GF/s, matrixmultiply {:.1} GF/s, err {err}",
            gf / tt,
            gf / tm
        );
    }
    Ok(())
}
