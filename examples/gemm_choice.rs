//! Which GEMM the tail's dense products use, measured on the tail's own
//! shapes (MiniLM FFN and attention-output products at batch 16 × 64, both as
//! `x·W` and as `x·Wᵀ`, and one attention head's products), single-threaded,
//! interleaved in one run: the crate's own packed kernel on the active tier
//! (`kernels::Kernels::sgemm`, AVX-512 12×32 / AVX2 6×16 / NEON 8×8 tiles),
//! matrixmultiply (the portable fallback, no AVX-512 kernel), and
//! tract-linalg's kernels (which pack both operands on every call through a
//! selection and packing API that changes between releases). The pool splits
//! each product by rows or columns for every choice alike, so one thread is
//! the comparison that decides.
//!
//! `cargo run --release --example gemm_choice`

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
    let own = hydra_edge::kernels::active();
    hydra_edge::parallel::set_threads(1).map_err(|e| TractError::msg(e.to_string()))?;
    let amx = hydra_edge::runtime::bf16_units();
    println!("own kernel tier: {}; bf16 matrix units (AMX): {amx}", own.tier());
    println!(
        "shape m×k×n (B layout): own / matrixmultiply / tract GFLOP/s, own ÷ matrixmultiply; \
         bf16 products (AMX, packing included) GFLOP/s and ÷ own f32"
    );
    let shapes = [
        (1024, 384, 1536, true),
        (1024, 1536, 384, true),
        (1024, 384, 384, true),
        (1024, 384, 1536, false),
        (1024, 1536, 384, false),
        (64, 32, 64, true),
        (64, 64, 32, true),
    ];
    for &(m, k, n, b_row) in &shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 * 0.1).collect();
        let sb = if b_row { (n, 1) } else { (1, k) };
        let (mut c0, mut c1, mut c2) =
            (vec![0.0f32; m * n], vec![0.0f32; m * n], vec![0.0f32; m * n]);
        let mm = |c: &mut [f32]| unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                b.as_ptr(),
                sb.0 as isize,
                sb.1 as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        };
        own.sgemm(m, k, n, 1.0, &a, (k, 1), &b, sb, 0.0, &mut c0, n);
        mm(&mut c1);
        let err = c0.iter().zip(&c1).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let reps = (2e9 / (2.0 * (m * k * n) as f64)).clamp(5.0, 2000.0) as usize;
        let (mut t_own, mut t_mm, mut t_tract, mut t_bf16) =
            (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
        let mut c3 = vec![0.0f32; m * n];
        let bf16 = |c: &mut [f32]| {
            use hydra_edge::runtime::{MatmulPrecision, set_matmul_precision};
            set_matmul_precision(MatmulPrecision::Bf16);
            hydra_edge::hydra::gemm(m, k, n, 1.0, &a, (k, 1), &b, sb, 0.0, c);
            set_matmul_precision(MatmulPrecision::F32);
        };
        for _ in 0..5 {
            let t0 = Instant::now();
            for _ in 0..reps {
                own.sgemm(m, k, n, 1.0, &a, (k, 1), &b, sb, 0.0, &mut c0, n);
            }
            t_own = t_own.min(t0.elapsed().as_secs_f64() / reps as f64);
            let t0 = Instant::now();
            for _ in 0..reps {
                mm(&mut c1);
            }
            t_mm = t_mm.min(t0.elapsed().as_secs_f64() / reps as f64);
            if b_row {
                let t0 = Instant::now();
                for _ in 0..reps {
                    tract_mm(m, k, n, &a, &b, &mut c2)?;
                }
                t_tract = t_tract.min(t0.elapsed().as_secs_f64() / reps as f64);
            }
            if amx {
                let t0 = Instant::now();
                for _ in 0..reps {
                    bf16(&mut c3);
                }
                t_bf16 = t_bf16.min(t0.elapsed().as_secs_f64() / reps as f64);
            }
        }
        let gf = 2.0 * (m * k * n) as f64 / 1e9;
        let tract = if b_row { format!("{:.1}", gf / t_tract) } else { "–".into() };
        let bf16 = if amx {
            let rel = c3
                .iter()
                .zip(&c0)
                .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                .fold(0.0f32, f32::max);
            format!(
                "; bf16 {:.1}, {:.2}× (max rel. diff to f32 {rel:.1e})",
                gf / t_bf16,
                t_own / t_bf16
            )
        } else {
            String::new()
        };
        println!(
            "{m}×{k}×{n} ({}): {:.1} / {:.1} / {tract}, {:.2}× (max |own − mm| {err:.1e}){bf16}",
            if b_row { "row-major" } else { "Wᵀ" },
            gf / t_own,
            gf / t_mm,
            t_mm / t_own
        );
    }
    Ok(())
}
