//! Criterion: every kernel on the dispatched tier, paired in one group with
//! the scalar tier and with convert + `matrixmultiply::sgemm`, for each shape
//! of the issue. `cargo bench --bench kernels`; the one-run ratio table is
//! `cargo run --release --example kernel_bench`.

mod cases;

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hydra_edge::kernels::{self, Kernels, Tier};

fn kernels(c: &mut Criterion) {
    let fast = kernels::active();
    let scalar = Kernels::for_tier(Tier::Scalar).expect("scalar runs everywhere");
    for sh in cases::SHAPES {
        let shape = format!("n{}_d{}_r{}", sh.n, sh.d, sh.r);
        for mut case in cases::cases(sh) {
            let mut g = c.benchmark_group(case.name);
            g.throughput(Throughput::Bytes(case.bytes as u64));
            g.bench_function(BenchmarkId::new(fast.tier().name(), &shape), |b| {
                b.iter(|| (case.kernel)(fast))
            });
            g.bench_function(BenchmarkId::new("scalar", &shape), |b| {
                b.iter(|| (case.kernel)(scalar))
            });
            if let Some(base) = case.sgemm.as_mut() {
                g.bench_function(BenchmarkId::new("sgemm", &shape), |b| b.iter(&mut *base));
            }
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = kernels
}
criterion_main!(benches);
