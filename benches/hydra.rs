//! One forward + backward of `HydraLinear` (n=512, in=out=384, r_p=r_s=8, f16
//! activations) against the same computation as plain f32
//! `matrixmultiply::sgemm` calls (activations converted to f32 first), in one
//! run. Prints the ratio, then runs both under criterion.
//!
//! `cargo bench --bench hydra`

mod cases;

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use half::f16;
use half::slice::HalfFloatSliceExt;
use hydra_edge::hydra::{BranchConfig, Input, Weights};
use hydra_edge::rng::Rng;
use hydra_edge::{HydraConfig, HydraLinear, Variant};

const N: usize = 512;
const D: usize = 384;
const R: usize = 8;

/// `C = alpha·A·B + beta·C`, strides (row, col) for A and B, C dense.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    sa: (isize, isize),
    b: &[f32],
    sb: (isize, isize),
    beta: f32,
    c: &mut [f32],
) {
    // SAFETY: all operands are sized for their strides by the callers below.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            sa.0,
            sa.1,
            b.as_ptr(),
            sb.0,
            sb.1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

/// The same layer computed with sgemm only.
struct Baseline {
    w0: Vec<f32>,
    ap: Vec<f32>,
    bp: Vec<f32>,
    as_: Vec<f32>,
    bs: Vec<f32>,
    s: f32,
    // Buffers.
    x: Vec<f32>,
    y0: Vec<f32>,
    y: Vec<f32>,
    up: Vec<f32>,
    us: Vec<f32>,
    dup: Vec<f32>,
    dus: Vec<f32>,
    g: [Vec<f32>; 4],
    dy0: Vec<f32>,
    dx: Vec<f32>,
}

impl Baseline {
    fn step(&mut self, xh: &[f16], dy: &[f32]) {
        let (n, d, r, s) = (N as isize, D as isize, R as isize, self.s);
        let (nu, du, ru) = (N, D, R);
        xh.convert_to_f32_slice(&mut self.x);
        gemm(nu, du, du, 1.0, &self.x, (d, 1), &self.w0, (1, d), 0.0, &mut self.y0);
        self.y.copy_from_slice(&self.y0);
        gemm(nu, du, ru, 1.0, &self.x, (d, 1), &self.ap, (1, d), 0.0, &mut self.up);
        gemm(nu, ru, du, s, &self.up, (r, 1), &self.bp, (1, r), 1.0, &mut self.y);
        gemm(nu, du, ru, 1.0, &self.y0, (d, 1), &self.as_, (1, d), 0.0, &mut self.us);
        gemm(nu, ru, du, s, &self.us, (r, 1), &self.bs, (1, r), 1.0, &mut self.y);
        // Backward.
        let [gap, gbp, gas, gbs] = &mut self.g;
        gemm(du, nu, ru, s, dy, (1, d), &self.up, (r, 1), 1.0, gbp);
        gemm(nu, du, ru, 1.0, dy, (d, 1), &self.bp, (r, 1), 0.0, &mut self.dup);
        gemm(ru, nu, du, s, &self.dup, (1, r), &self.x, (d, 1), 1.0, gap);
        gemm(du, nu, ru, s, dy, (1, d), &self.us, (r, 1), 1.0, gbs);
        gemm(nu, du, ru, 1.0, dy, (d, 1), &self.bs, (r, 1), 0.0, &mut self.dus);
        gemm(ru, nu, du, s, &self.dus, (1, r), &self.y0, (d, 1), 1.0, gas);
        self.dy0.copy_from_slice(dy);
        gemm(nu, ru, du, s, &self.dus, (r, 1), &self.as_, (d, 1), 1.0, &mut self.dy0);
        gemm(nu, du, du, 1.0, &self.dy0, (d, 1), &self.w0, (d, 1), 0.0, &mut self.dx);
        gemm(nu, ru, du, s, &self.dup, (r, 1), &self.ap, (d, 1), 1.0, &mut self.dx);
        let _ = n;
    }
}

impl Baseline {
    /// Only the frozen layer's two dense products (plus the conversion).
    fn dense(&mut self, xh: &[f16]) {
        let (d, du, nu) = (D as isize, D, N);
        xh.convert_to_f32_slice(&mut self.x);
        gemm(nu, du, du, 1.0, &self.x, (d, 1), &self.w0, (1, d), 0.0, &mut self.y0);
        gemm(nu, du, du, 1.0, &self.y0, (d, 1), &self.w0, (d, 1), 0.0, &mut self.dx);
    }
}

fn setup() -> (HydraLinear, Baseline, Vec<f16>, Vec<f32>) {
    let mut rng = Rng::new(1);
    let mut rand = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
    let w0 = rand(D * D);
    let cfg = HydraConfig {
        variant: Variant::Hydra,
        parallel: BranchConfig { rank: R, scale: 0.5, ..BranchConfig::default() },
        sequential: BranchConfig { rank: R, scale: 0.5, ..BranchConfig::default() },
        ..HydraConfig::default()
    };
    let mut layer = HydraLinear::new(cfg, Weights::F32(w0.clone()), None, D, D).unwrap();
    for br in layer.branches_mut() {
        br.b.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 7) as f32 * 0.01);
    }
    let (p, q) = (layer.parallel().unwrap().clone(), layer.sequential().unwrap().clone());
    let xh: Vec<f16> = rand(N * D).into_iter().map(f16::from_f32).collect();
    let dy = rand(N * D);
    let z = |len| vec![0.0f32; len];
    let base = Baseline {
        w0,
        ap: p.a,
        bp: p.b,
        as_: q.a,
        bs: q.b,
        s: 0.5,
        x: z(N * D),
        y0: z(N * D),
        y: z(N * D),
        up: z(N * R),
        us: z(N * R),
        dup: z(N * R),
        dus: z(N * R),
        g: [z(R * D), z(D * R), z(R * D), z(D * R)],
        dy0: z(N * D),
        dx: z(N * D),
    };
    (layer, base, xh, dy)
}

fn main() {
    let (mut layer, mut base, xh, dy) = setup();
    let mut hydra_step = || {
        layer.forward(Input::F16(black_box(&xh)), N).unwrap();
        black_box(layer.backward(&dy).unwrap());
    };
    let t_hydra = cases::best_time(&mut hydra_step);
    let t_base = cases::best_time(|| base.step(black_box(&xh), &dy));
    // The frozen products (X·W0ᵀ and dY0·W0) are the same sgemm calls in both;
    // timing them alone shows what the adapter itself costs on each path.
    let t_dense = cases::best_time(|| base.dense(black_box(&xh)));
    let tier = hydra_edge::kernels::active().tier();
    println!(
        "hydra_linear fwd+bwd n={N} in=out={D} r_p=r_s={R} f16 x: tier={tier} hydra={:.3} ms sgemm={:.3} ms speedup={:.2}",
        t_hydra * 1e3,
        t_base * 1e3,
        t_base / t_hydra
    );
    println!(
        "  of which frozen dense products {:.3} ms; adapter part: hydra={:.3} ms sgemm={:.3} ms speedup={:.2}",
        t_dense * 1e3,
        (t_hydra - t_dense) * 1e3,
        (t_base - t_dense) * 1e3,
        (t_base - t_dense) / (t_hydra - t_dense)
    );
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .configure_from_args();
    let mut g = c.benchmark_group("hydra_fwd_bwd_n512_d384_r8_f16");
    g.bench_function("hydra_linear", |b| b.iter(&mut hydra_step));
    g.bench_function("sgemm_baseline", |b| b.iter(|| base.step(black_box(&xh), &dy)));
    g.finish();
    c.final_summary();
}
