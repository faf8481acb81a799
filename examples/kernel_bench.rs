//! One-run kernel report: every kernel on the dispatched tier against the
//! scalar tier and against convert + `matrixmultiply::sgemm`, and achieved
//! bandwidth against a plain memory copy measured in the same run.
//!
//! `cargo run --release --example kernel_bench`
//!
//! Each figure is the best of several timed batches (the minimum is the
//! least noisy estimate on a shared machine); ratios, not absolute times,
//! are what to compare.

#[path = "../benches/cases/mod.rs"]
mod cases;

use std::hint::black_box;

use cases::best_time as time;

use hydra_edge::kernels::{self, Kernels, Tier};

fn main() {
    let fast = kernels::active();
    let scalar = Kernels::for_tier(Tier::Scalar).expect("scalar runs everywhere");
    println!(
        "# kernel_bench: dispatched tier {}, available: {}",
        fast.tier(),
        Tier::available().map(Tier::name).collect::<Vec<_>>().join(", ")
    );
    for sh in cases::SHAPES {
        // The copy moves as many bytes as the f16 activations of this shape.
        let src = vec![0u8; sh.n * sh.d * 2];
        // Offset so source and destination do not alias modulo 4 KiB.
        let mut dst_buf = vec![0u8; src.len() + 192];
        let dst = &mut dst_buf[192..];
        let mut copy = || time(|| dst.copy_from_slice(black_box(&src)));
        // Best of two measurements, before the kernels and interleaved with them.
        let mut t_copy = copy();
        for mut case in cases::cases(sh) {
            t_copy = t_copy.min(copy());
            let copy_gbps = 2.0 * src.len() as f64 / t_copy / 1e9;
            let t_fast = time(|| (case.kernel)(black_box(fast)));
            let t_scalar = time(|| (case.kernel)(black_box(scalar)));
            let vs_sgemm = match case.sgemm.as_mut() {
                Some(base) => format!("{:.2}", time(base) / t_fast),
                None => "-".to_string(),
            };
            println!(
                "{} n={} d={} r={} tier={} vs_scalar={:.2} vs_sgemm={} gbps={:.1} copy_gbps={:.1}",
                case.name,
                sh.n,
                sh.d,
                sh.r,
                fast.tier(),
                t_scalar / t_fast,
                vs_sgemm,
                case.bytes as f64 / t_fast / 1e9,
                copy_gbps
            );
        }
    }
}
