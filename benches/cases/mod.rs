//! The kernel benchmark cases, shared by `benches/kernels.rs` (criterion) and
//! `examples/kernel_bench.rs` (the one-run report): for one shape, every
//! kernel as a closure over its own buffers, with the bytes it must move and,
//! where one exists, the best general-purpose way to compute the same thing
//! (`matrixmultiply::sgemm`, after converting f16 operands with `half`'s
//! own SIMD slice conversion).
#![allow(dead_code)]

use std::time::Instant;

use half::f16;
use half::slice::HalfFloatSliceExt;
use hydra_edge::kernels::Kernels;
use hydra_edge::rng::Rng;

/// A shape of the issue: batch rows `n`, width `d` (= `m` for square layers), rank `r`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub n: usize,
    pub d: usize,
    pub r: usize,
}

pub const SHAPES: [Shape; 4] = [
    Shape { n: 256, d: 384, r: 8 },
    Shape { n: 512, d: 768, r: 8 },
    Shape { n: 128, d: 1280, r: 16 },
    Shape { n: 4096, d: 768, r: 2 },
];

type KernelFn = Box<dyn FnMut(&Kernels)>;
type BaselineFn = Box<dyn FnMut()>;

pub struct Case {
    pub name: &'static str,
    /// Bytes read plus bytes written by one call.
    pub bytes: usize,
    pub kernel: KernelFn,
    pub sgemm: Option<BaselineFn>,
}

fn rand(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect()
}

fn rand_h(rng: &mut Rng, len: usize) -> Vec<f16> {
    (0..len).map(|_| f16::from_f32(rng.uniform(-1.0, 1.0))).collect()
}

/// `C = alpha·A·B + beta·C` with explicit (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (isize, isize),
    b: &[f32],
    (rsb, csb): (isize, isize),
    beta: f32,
    c: &mut [f32],
    rsc: isize,
) {
    // SAFETY: every operand spans its whole (m×k, k×n, m×n) extent with these strides.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            rsc,
            1,
        )
    }
}

/// Every kernel for `sh`, seeded.
pub fn cases(sh: Shape) -> Vec<Case> {
    let Shape { n, d, r } = sh;
    let m = d;
    let mut rng = Rng::new(11);
    let (x, xh, a) = (rand(&mut rng, n * d), rand_h(&mut rng, n * d), rand(&mut rng, r * d));
    let (dy, u, b) = (rand(&mut rng, n * m), rand(&mut rng, n * r), rand(&mut rng, m * r));
    let (w, wh) = (rand(&mut rng, m * d), rand_h(&mut rng, m * d));
    let (f, i) = (4usize, d as isize);
    let (ri, mi) = (r as isize, m as isize);
    let mut out = Vec::new();

    {
        let (src, mut dst) = (xh.clone(), vec![0.0f32; n * d]);
        out.push(Case {
            name: "f16_to_f32",
            bytes: n * d * 6,
            kernel: Box::new(move |k| k.f16_to_f32(&src, &mut dst)),
            sgemm: None,
        });
    }
    {
        let (src, mut dst) = (x.clone(), vec![f16::ZERO; n * d]);
        out.push(Case {
            name: "f32_to_f16",
            bytes: n * d * 6,
            kernel: Box::new(move |k| k.f32_to_f16(&src, &mut dst)),
            sgemm: None,
        });
    }
    {
        let (xk, ak, mut uk) = (x.clone(), a.clone(), vec![0.0; n * r]);
        let (xs, as_, mut us) = (x.clone(), a.clone(), vec![0.0; n * r]);
        out.push(Case {
            name: "down_f32",
            bytes: n * d * f + r * d * f + n * r * f,
            kernel: Box::new(move |k| k.down_f32(&xk, &ak, &mut uk, n, d, r)),
            sgemm: Some(Box::new(move || {
                sgemm(n, d, r, 1.0, &xs, (i, 1), &as_, (1, i), 0.0, &mut us, ri)
            })),
        });
    }
    {
        let (xk, ak, mut uk) = (xh.clone(), a.clone(), vec![0.0; n * r]);
        let (xs, as_, mut us, mut xf) = (xh.clone(), a.clone(), vec![0.0; n * r], vec![0.0; n * d]);
        out.push(Case {
            name: "down_f16",
            bytes: n * d * 2 + r * d * f + n * r * f,
            kernel: Box::new(move |k| k.down_f16(&xk, &ak, &mut uk, n, d, r)),
            sgemm: Some(Box::new(move || {
                xs.convert_to_f32_slice(&mut xf);
                sgemm(n, d, r, 1.0, &xf, (i, 1), &as_, (1, i), 0.0, &mut us, ri)
            })),
        });
    }
    {
        let (uk, bk, mut yk) = (u.clone(), b.clone(), dy.clone());
        let (us, bs, mut ys) = (u.clone(), b.clone(), dy.clone());
        out.push(Case {
            name: "up",
            bytes: n * r * f + m * r * f + 2 * n * m * f,
            kernel: Box::new(move |k| k.up(&uk, &bk, &mut yk, 1e-3, n, m, r)),
            sgemm: Some(Box::new(move || {
                sgemm(n, r, m, 1e-3, &us, (ri, 1), &bs, (1, ri), 1.0, &mut ys, mi)
            })),
        });
    }
    {
        let (dyk, bk, mut duk) = (dy.clone(), b.clone(), vec![0.0; n * r]);
        let (dys, bs, mut dus) = (dy.clone(), b.clone(), vec![0.0; n * r]);
        out.push(Case {
            name: "grad_u",
            bytes: n * m * f + m * r * f + n * r * f,
            kernel: Box::new(move |k| k.grad_u(&dyk, &bk, &mut duk, n, m, r)),
            sgemm: Some(Box::new(move || {
                sgemm(n, m, r, 1.0, &dys, (mi, 1), &bs, (ri, 1), 0.0, &mut dus, ri)
            })),
        });
    }
    {
        let (duk, ak, mut dxk) = (u.clone(), a.clone(), x.clone());
        let (dus, as_, mut dxs) = (u.clone(), a.clone(), x.clone());
        out.push(Case {
            name: "grad_x",
            bytes: n * r * f + r * d * f + 2 * n * d * f,
            kernel: Box::new(move |k| k.grad_x(&duk, &ak, &mut dxk, 1e-3, n, d, r)),
            sgemm: Some(Box::new(move || {
                sgemm(n, r, d, 1e-3, &dus, (ri, 1), &as_, (i, 1), 1.0, &mut dxs, i)
            })),
        });
    }
    {
        let (duk, xk, mut dak) = (u.clone(), x.clone(), a.clone());
        let (dus, xs, mut das) = (u.clone(), x.clone(), a.clone());
        out.push(Case {
            name: "grad_a_f32",
            bytes: n * r * f + n * d * f + 2 * r * d * f,
            kernel: Box::new(move |k| k.grad_a_f32(&duk, &xk, &mut dak, 1e-3, n, d, r)),
            sgemm: Some(Box::new(move || {
                sgemm(r, n, d, 1e-3, &dus, (1, ri), &xs, (i, 1), 1.0, &mut das, i)
            })),
        });
    }
    {
        let (duk, xk, mut dak) = (u.clone(), xh.clone(), a.clone());
        let (dus, xs, mut das, mut xf) = (u.clone(), xh.clone(), a.clone(), vec![0.0; n * d]);
        out.push(Case {
            name: "grad_a_f16",
            bytes: n * r * f + n * d * 2 + 2 * r * d * f,
            kernel: Box::new(move |k| k.grad_a_f16(&duk, &xk, &mut dak, 1e-3, n, d, r)),
            sgemm: Some(Box::new(move || {
                xs.convert_to_f32_slice(&mut xf);
                sgemm(r, n, d, 1e-3, &dus, (1, ri), &xf, (i, 1), 1.0, &mut das, i)
            })),
        });
    }
    {
        let (dyk, uk, mut dbk) = (dy.clone(), u.clone(), b.clone());
        let (dys, us, mut dbs) = (dy.clone(), u.clone(), b.clone());
        out.push(Case {
            name: "grad_b",
            bytes: n * m * f + n * r * f + 2 * m * r * f,
            kernel: Box::new(move |k| k.grad_b(&dyk, &uk, &mut dbk, 1e-3, n, m, r)),
            sgemm: Some(Box::new(move || {
                sgemm(m, n, r, 1e-3, &dys, (1, mi), &us, (ri, 1), 1.0, &mut dbs, ri)
            })),
        });
    }
    {
        let (bk, ak, mut wk) = (b.clone(), a.clone(), w.clone());
        let (bs, as_, mut ws) = (b.clone(), a.clone(), w.clone());
        out.push(Case {
            name: "merge_f32",
            bytes: m * r * f + r * d * f + 2 * m * d * f,
            kernel: Box::new(move |k| k.merge_f32(&bk, &ak, &mut wk, 1e-6, m, d, r)),
            sgemm: Some(Box::new(move || {
                sgemm(m, r, d, 1e-6, &bs, (ri, 1), &as_, (i, 1), 1.0, &mut ws, i)
            })),
        });
    }
    {
        let (bk, ak, mut wk) = (b.clone(), a.clone(), wh.clone());
        let (bs, as_, mut ws, mut wf) = (b, a, wh, vec![0.0; m * d]);
        out.push(Case {
            name: "merge_f16",
            bytes: m * r * f + r * d * f + 2 * m * d * 2,
            kernel: Box::new(move |k| k.merge_f16(&bk, &ak, &mut wk, 1e-6, m, d, r)),
            sgemm: Some(Box::new(move || {
                ws.convert_to_f32_slice(&mut wf);
                sgemm(m, r, d, 1e-6, &bs, (ri, 1), &as_, (i, 1), 1.0, &mut wf, i);
                ws.convert_from_f32_slice(&wf);
            })),
        });
    }
    out
}

/// Seconds per call of `f`: the best of 7 batches of at least 3 ms each (the
/// minimum is the least noisy estimate on a shared machine).
pub fn best_time(mut f: impl FnMut()) -> f64 {
    f();
    let mut iters = 1u32;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        if t.elapsed().as_secs_f64() > 3e-3 || iters >= 1 << 20 {
            break;
        }
        iters *= 2;
    }
    (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / f64::from(iters)
        })
        .fold(f64::INFINITY, f64::min)
}
