//! Every kernel on every tier this CPU has, against the plain f64 reference,
//! over the shape grid of the issue, unaligned starts and seeded random sizes.
//! Tolerances are explicit per kernel and storage type (see `common`).

mod common;

use std::io::Write;

use common::*;
use hydra_edge::f16;
use hydra_edge::kernels::{self, Kernels, Tier, reference};
use hydra_edge::rng::Rng;

const DIMS: [usize; 15] = [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 257, 768];
const RANKS: [usize; 6] = [1, 2, 4, 8, 16, 64];

fn tiers() -> Vec<&'static Kernels> {
    let tiers: Vec<_> = Tier::available().map(|t| Kernels::for_tier(t).unwrap()).collect();
    let names: Vec<_> = tiers.iter().map(|k| k.tier().name()).collect();
    // Written to the real stderr (not libtest's capture) so the log names the tiers.
    let _ = writeln!(std::io::stderr(), "kernel tiers under test: {}", names.join(", "));
    tiers
}

/// The grid, then 40 seeded random shapes.
fn shapes() -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for &n in &DIMS {
        for &d in &DIMS {
            for &r in &RANKS {
                out.push((n, d, r));
            }
        }
    }
    let mut rng = Rng::new(0x5EED);
    for _ in 0..40 {
        out.push((rng.below(300) as usize, rng.below(300) as usize, 1 + rng.below(64) as usize));
    }
    out
}

/// Runs `case` for every shape; `case` gets the shape and an offset for unaligned starts.
fn sweep(mut case: impl FnMut(usize, usize, usize, usize, &mut Rng)) {
    let mut rng = Rng::new(42);
    for (idx, (n, d, r)) in shapes().into_iter().enumerate() {
        case(n, d, r, 1 + idx % 3, &mut rng);
    }
}

#[test]
fn down_f32_and_f16_match_reference_on_every_tier() {
    let ks = tiers();
    sweep(|n, d, r, off, rng| {
        let x = rand_vec(rng, n * d);
        let xh = rand_f16(rng, n * d);
        let a = rand_vec(rng, r * d);
        let want = reference::down(&f64s(&x), &f64s(&a), n, d, r);
        let want_h = reference::down(&f64s_h(&xh), &f64s(&a), n, d, r);
        let (xu, xhu, au) = (unaligned(&x, off), unaligned(&xh, off), unaligned(&a, off));
        for k in &ks {
            let mut u = unaligned(&vec![f32::NAN; n * r], off);
            k.down_f32(&xu[off..], &au[off..], &mut u[off..], n, d, r);
            let what = format!("down_f32 {} n={n} d={d} r={r}", k.tier());
            assert_close(&u[off..], &want, tol_f32(d), 0.0, &what);
            k.down_f16(&xhu[off..], &au[off..], &mut u[off..], n, d, r);
            let what = format!("down_f16 {} n={n} d={d} r={r}", k.tier());
            assert_close(&u[off..], &want_h, tol_f32(d), 0.0, &what);
        }
    });
}

#[test]
fn up_accumulate_matches_reference_on_every_tier() {
    let ks = tiers();
    sweep(|n, m, r, off, rng| {
        let (u, b, y0) = (rand_vec(rng, n * r), rand_vec(rng, m * r), rand_vec(rng, n * m));
        let s = 0.37;
        let want = reference::up(&f64s(&u), &f64s(&b), &f64s(&y0), f64::from(s), n, m, r);
        for k in &ks {
            let mut y = unaligned(&y0, off);
            k.up(&unaligned(&u, off)[off..], &unaligned(&b, off)[off..], &mut y[off..], s, n, m, r);
            let what = format!("up {} n={n} m={m} r={r}", k.tier());
            assert_close(&y[off..], &want, tol_f32(r), 0.0, &what);
        }
    });
}

#[test]
fn grad_u_overwrites_with_dy_times_b_on_every_tier() {
    let ks = tiers();
    sweep(|n, m, r, off, rng| {
        let (dy, b) = (rand_vec(rng, n * m), rand_vec(rng, m * r));
        let want = reference::grad_u(&f64s(&dy), &f64s(&b), n, m, r);
        for k in &ks {
            // Garbage (NaN) in the output must not leak: grad_u overwrites.
            let mut du = unaligned(&vec![f32::NAN; n * r], off);
            k.grad_u(
                &unaligned(&dy, off)[off..],
                &unaligned(&b, off)[off..],
                &mut du[off..],
                n,
                m,
                r,
            );
            let what = format!("grad_u {} n={n} m={m} r={r}", k.tier());
            assert_close(&du[off..], &want, tol_f32(m), 0.0, &what);
        }
    });
}

#[test]
fn grad_x_accumulates_on_every_tier() {
    let ks = tiers();
    sweep(|n, d, r, off, rng| {
        let (du, a, dx0) = (rand_vec(rng, n * r), rand_vec(rng, r * d), rand_vec(rng, n * d));
        let s = -1.25;
        let want = reference::grad_x(&f64s(&du), &f64s(&a), &f64s(&dx0), f64::from(s), n, d, r);
        for k in &ks {
            let mut dx = unaligned(&dx0, off);
            k.grad_x(
                &unaligned(&du, off)[off..],
                &unaligned(&a, off)[off..],
                &mut dx[off..],
                s,
                n,
                d,
                r,
            );
            let what = format!("grad_x {} n={n} d={d} r={r}", k.tier());
            assert_close(&dx[off..], &want, tol_f32(r), 0.0, &what);
        }
    });
}

#[test]
fn grad_a_f32_and_f16_accumulate_on_every_tier() {
    let ks = tiers();
    sweep(|n, d, r, off, rng| {
        let (du, x, da0) = (rand_vec(rng, n * r), rand_vec(rng, n * d), rand_vec(rng, r * d));
        let xh = rand_f16(rng, n * d);
        let s = 0.5;
        let want = reference::grad_a(&f64s(&du), &f64s(&x), &f64s(&da0), 0.5, n, d, r);
        let want_h = reference::grad_a(&f64s(&du), &f64s_h(&xh), &f64s(&da0), 0.5, n, d, r);
        let duu = unaligned(&du, off);
        for k in &ks {
            let mut da = unaligned(&da0, off);
            k.grad_a_f32(&duu[off..], &unaligned(&x, off)[off..], &mut da[off..], s, n, d, r);
            let what = format!("grad_a_f32 {} n={n} d={d} r={r}", k.tier());
            assert_close(&da[off..], &want, tol_f32(n), 0.0, &what);
            let mut da = unaligned(&da0, off);
            k.grad_a_f16(&duu[off..], &unaligned(&xh, off)[off..], &mut da[off..], s, n, d, r);
            let what = format!("grad_a_f16 {} n={n} d={d} r={r}", k.tier());
            assert_close(&da[off..], &want_h, tol_f32(n), 0.0, &what);
        }
    });
}

#[test]
fn grad_b_accumulates_on_every_tier() {
    let ks = tiers();
    sweep(|n, m, r, off, rng| {
        let (dy, u, db0) = (rand_vec(rng, n * m), rand_vec(rng, n * r), rand_vec(rng, m * r));
        let s = 2.0;
        let want = reference::grad_b(&f64s(&dy), &f64s(&u), &f64s(&db0), 2.0, n, m, r);
        for k in &ks {
            let mut db = unaligned(&db0, off);
            k.grad_b(
                &unaligned(&dy, off)[off..],
                &unaligned(&u, off)[off..],
                &mut db[off..],
                s,
                n,
                m,
                r,
            );
            let what = format!("grad_b {} n={n} m={m} r={r}", k.tier());
            assert_close(&db[off..], &want, tol_f32(n), 0.0, &what);
        }
    });
}

#[test]
fn merge_update_f32_and_f16_on_every_tier() {
    let ks = tiers();
    sweep(|m, d, r, off, rng| {
        let (b, a, w0) = (rand_vec(rng, m * r), rand_vec(rng, r * d), rand_vec(rng, m * d));
        let wh0 = rand_f16(rng, m * d);
        let s = 0.1;
        let want = reference::merge(&f64s(&b), &f64s(&a), &f64s(&w0), f64::from(s), m, d, r);
        let want_h = reference::merge(&f64s(&b), &f64s(&a), &f64s_h(&wh0), f64::from(s), m, d, r);
        let (bu, au) = (unaligned(&b, off), unaligned(&a, off));
        for k in &ks {
            let mut w = unaligned(&w0, off);
            k.merge_f32(&bu[off..], &au[off..], &mut w[off..], s, m, d, r);
            let what = format!("merge_f32 {} m={m} d={d} r={r}", k.tier());
            assert_close(&w[off..], &want, tol_f32(r), 0.0, &what);
            let mut wh = unaligned(&wh0, off);
            k.merge_f16(&bu[off..], &au[off..], &mut wh[off..], s, m, d, r);
            let got: Vec<f32> = wh[off..].iter().map(|h| h.to_f32()).collect();
            // One f16 rounding of the result on top of the f32 accumulation.
            let rounded = reference::Ref {
                scale: want_h
                    .scale
                    .iter()
                    .zip(&want_h.value)
                    .map(|(s, v)| s + v.abs() * U16 / tol_f32(r))
                    .collect(),
                value: want_h.value.clone(),
            };
            let what = format!("merge_f16 {} m={m} d={d} r={r}", k.tier());
            assert_close(&got, &rounded, tol_f32(r), 6.0e-8, &what);
        }
    });
}

#[test]
fn f16_to_f32_is_exact_for_all_65536_patterns_on_every_tier() {
    let src: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    for k in tiers() {
        for off in [0usize, 1, 3] {
            let s = unaligned(&src, off);
            let mut dst = vec![0.0f32; src.len()];
            k.f16_to_f32(&s[off..], &mut dst);
            for (h, &f) in src.iter().zip(&dst) {
                let want = h.to_f32();
                if want.is_nan() {
                    // NaN stays NaN with its sign and payload (quieted).
                    assert!(f.is_nan(), "{}: {:#06x} -> {f}", k.tier(), h.to_bits());
                    assert_eq!(
                        f.to_bits() | 0x0040_0000,
                        want.to_bits() | 0x0040_0000,
                        "{}: nan {:#06x}",
                        k.tier(),
                        h.to_bits()
                    );
                } else {
                    assert_eq!(f.to_bits(), want.to_bits(), "{}: {:#06x}", k.tier(), h.to_bits());
                }
            }
        }
    }
}

/// f32 inputs that exercise every rounding decision f32→f16 can make.
fn f32_probes() -> Vec<f32> {
    let mut v = Vec::new();
    for bits in 0..=u16::MAX {
        let h = f16::from_bits(bits);
        let f = h.to_f32();
        v.push(f);
        if f.is_finite() {
            // The exact midpoint to the next f16 up (a tie), and its f32 neighbours.
            let next = f16::from_bits(bits.wrapping_add(1)).to_f32();
            if next.is_finite() && (next.abs() > f.abs()) {
                let mid = ((f64::from(f) + f64::from(next)) / 2.0) as f32;
                v.extend([
                    mid,
                    f32::from_bits(mid.to_bits() - 1),
                    f32::from_bits(mid.to_bits() + 1),
                ]);
            }
        }
    }
    // Overflow and underflow boundaries, specials, and random bit patterns.
    v.extend([65504.0, 65519.99, 65520.0, 1e6, f32::MAX, f32::INFINITY, f32::NEG_INFINITY]);
    v.extend([f32::MIN_POSITIVE, 2.98e-8, 2.99e-8, 5.96e-8, 1e-10, -0.0, f32::NAN]);
    let mut rng = Rng::new(99);
    v.extend((0..200_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    v
}

#[test]
fn f32_to_f16_rounds_to_nearest_even_like_half_on_every_tier() {
    let src = f32_probes();
    for k in tiers() {
        for off in [0usize, 2] {
            let s = unaligned(&src, off);
            let mut dst = vec![f16::ZERO; src.len()];
            k.f32_to_f16(&s[off..], &mut dst);
            for (&f, h) in src.iter().zip(&dst) {
                let want = f16::from_f32(f);
                if f.is_nan() {
                    assert!(
                        h.is_nan(),
                        "{}: {:#010x} -> {:#06x}",
                        k.tier(),
                        f.to_bits(),
                        h.to_bits()
                    );
                    assert_eq!(h.to_bits() & 0x8000, want.to_bits() & 0x8000, "sign of nan");
                } else {
                    assert_eq!(
                        h.to_bits(),
                        want.to_bits(),
                        "{}: {f:e} ({:#010x})",
                        k.tier(),
                        f.to_bits()
                    );
                }
            }
        }
    }
}

#[test]
fn conversions_handle_every_length_and_tail() {
    let mut rng = Rng::new(3);
    for k in tiers() {
        for len in 0..80 {
            let src = rand_vec(&mut rng, len);
            let mut h = vec![f16::ZERO; len];
            k.f32_to_f16(&src, &mut h);
            let mut back = vec![0.0f32; len];
            k.f16_to_f32(&h, &mut back);
            for i in 0..len {
                assert_eq!(h[i], f16::from_f32(src[i]), "{} len {len} at {i}", k.tier());
                assert_eq!(back[i], h[i].to_f32());
            }
        }
    }
}

#[test]
fn every_tier_gives_the_same_f16_rounding_as_scalar() {
    // Bitwise agreement of the conversion across tiers: a model converted on
    // one device loads identically on another.
    let src = f32_probes();
    let scalar = Kernels::for_tier(Tier::Scalar).unwrap();
    let mut want = vec![f16::ZERO; src.len()];
    scalar.f32_to_f16(&src, &mut want);
    for k in tiers() {
        let mut got = vec![f16::ZERO; src.len()];
        k.f32_to_f16(&src, &mut got);
        for i in 0..src.len() {
            if !src[i].is_nan() {
                assert_eq!(got[i].to_bits(), want[i].to_bits(), "{} at {:e}", k.tier(), src[i]);
            }
        }
    }
}

#[test]
fn dispatch_picks_a_supported_tier_and_honours_its_name() {
    let t = kernels::select().unwrap();
    assert!(t.is_supported());
    assert_eq!(kernels::active().tier(), t);
    if std::env::var("HYDRA_KERNELS").is_err() {
        assert_eq!(t, Tier::best());
    }
    for tier in Tier::ALL {
        assert_eq!(Tier::parse(tier.name()).unwrap(), tier);
        assert_eq!(Kernels::for_tier(tier).is_ok(), tier.is_supported());
    }
    assert!(Tier::parse("avx9000").is_err());
}

#[test]
#[should_panic(expected = "has 5 elements, expected 2×3")]
fn wrong_shape_is_caught_at_the_safe_entry() {
    let k = kernels::active();
    let mut u = vec![0.0; 2];
    k.down_f32(&[0.0; 5], &[0.0; 3], &mut u, 2, 3, 1);
}

#[test]
#[should_panic(expected = "rank 65 outside")]
fn rank_above_max_is_caught_at_the_safe_entry() {
    let k = kernels::active();
    k.grad_u(&[], &[0.0; 65], &mut [], 0, 1, 65);
}

/// The packed sgemm against the f64 reference on every tier: edge sizes
/// around each tier's micro-tile and the packing blocks (k past 256, n past
/// 1024), row- and column-major A and B, a C wider than the product, α and β
/// (β = 0 over NaN must not read C).
#[test]
fn sgemm_matches_reference_on_every_tier() {
    let ks = tiers();
    let mut rng = Rng::new(7);
    let mut cases = Vec::new();
    for &m in &[1, 5, 6, 7, 12, 13, 17, 31, 145] {
        for &k in &[0, 1, 3, 16, 257] {
            for &n in &[1, 7, 15, 16, 17, 32, 33, 65] {
                cases.push((m, k, n));
            }
        }
    }
    cases.extend([(3, 600, 1100), (150, 300, 40), (64, 32, 64), (64, 64, 32)]);
    for (idx, &(m, k, n)) in cases.iter().enumerate() {
        let a_row = idx % 2 == 0;
        let b_row = idx % 3 != 0;
        let (alpha, beta) = [(1.0, 0.0), (0.5, 1.0), (1.0, -0.5), (2.0, 0.0)][idx % 4];
        let rsc = n + idx % 5;
        let a = rand_vec(&mut rng, m * k);
        let b = rand_vec(&mut rng, k * n);
        let c0: Vec<f32> =
            if beta == 0.0 { vec![f32::NAN; m * rsc] } else { rand_vec(&mut rng, m * rsc) };
        let sa = if a_row { (k, 1) } else { (1, m) };
        let sb = if b_row { (n, 1) } else { (1, k) };
        let want = reference::gemm((m, k, n), alpha, &a, sa, &b, sb, beta, &c0, rsc);
        for kern in &ks {
            let mut c = c0.clone();
            kern.sgemm(m, k, n, alpha, &a, sa, &b, sb, beta, &mut c, rsc);
            let got: Vec<f32> =
                (0..m).flat_map(|i| c[i * rsc..i * rsc + n].iter().copied()).collect();
            let what =
                format!("sgemm {} m={m} k={k} n={n} a_row={a_row} b_row={b_row}", kern.tier());
            assert_close(&got, &want, tol_f32(k), 0.0, &what);
            // Padding between rows of C is never written.
            for i in 0..m {
                for j in n..rsc {
                    let (g, w) = (c[i * rsc + j], c0[i * rsc + j]);
                    assert!(g.to_bits() == w.to_bits(), "{what}: wrote C padding ({i}, {j})");
                }
            }
        }
    }
}

/// A product cut along its rows or columns (as the thread pool cuts it) is
/// bit-identical to the whole one on every tier, at every cut.
#[test]
fn sgemm_split_is_bit_identical_on_every_tier() {
    let ks = tiers();
    let mut rng = Rng::new(8);
    let (m, k, n) = (61, 300, 83);
    let a = rand_vec(&mut rng, m * k);
    let b = rand_vec(&mut rng, k * n);
    let c0 = rand_vec(&mut rng, m * n);
    for kern in &ks {
        let mut whole = c0.clone();
        kern.sgemm(m, k, n, 0.75, &a, (k, 1), &b, (1, k), 0.5, &mut whole, n);
        for cut in [1, 5, 12, 13, 30, 60] {
            let mut c = c0.clone();
            let (top, bottom) = c.split_at_mut(cut * n);
            kern.sgemm(cut, k, n, 0.75, &a, (k, 1), &b, (1, k), 0.5, top, n);
            kern.sgemm(m - cut, k, n, 0.75, &a[cut * k..], (k, 1), &b, (1, k), 0.5, bottom, n);
            assert!(
                c.iter().zip(&whole).all(|(x, y)| x.to_bits() == y.to_bits()),
                "sgemm {}: row cut at {cut} differs",
                kern.tier()
            );
        }
        for cut in [1, 16, 17, 33, 64, 82] {
            let mut c = c0.clone();
            kern.sgemm(m, k, cut, 0.75, &a, (k, 1), &b, (1, k), 0.5, &mut c, n);
            kern.sgemm(
                m,
                k,
                n - cut,
                0.75,
                &a,
                (k, 1),
                &b[cut * k..],
                (1, k),
                0.5,
                &mut c[cut..],
                n,
            );
            assert!(
                c.iter().zip(&whole).all(|(x, y)| x.to_bits() == y.to_bits()),
                "sgemm {}: column cut at {cut} differs",
                kern.tier()
            );
        }
    }
}

/// Strides that reach past the slices are refused before any work.
#[test]
#[should_panic(expected = "sgemm: B too short")]
fn sgemm_checks_its_operands() {
    let k = Kernels::for_tier(Tier::best()).unwrap();
    let mut c = vec![0.0; 4];
    k.sgemm(2, 3, 2, 1.0, &[0.0; 6], (3, 1), &[0.0; 5], (2, 1), 0.0, &mut c, 2);
}

/// bf16 rounding as every bf16 product rounds its operands (AMX, the
/// GPU's GemmEx): nearest, ties to even; ±0, ±∞ and NaN kept; a value past
/// bf16's largest finite rounds to ∞.
#[test]
fn bf16_rounding_is_nearest_even_and_keeps_specials() {
    use hydra_edge::kernels::{bf16_bits, round_bf16};
    let tie_down = 1.0 + 2f32.powi(-8); // halfway between 1 and 1 + 2⁻⁷: to 1 (even)
    let tie_up = 1.0 + 3.0 * 2f32.powi(-8); // halfway to 1 + 2⁻⁶: up (even)
    let above = 1.0 + 2f32.powi(-8) + 2f32.powi(-20);
    for (x, want) in [
        (1.0, 1.0),
        (tie_down, 1.0),
        (tie_up, 1.0 + 2f32.powi(-6)),
        (above, 1.0 + 2f32.powi(-7)),
        (-tie_up, -(1.0 + 2f32.powi(-6))),
        (0.0, 0.0),
        (f32::INFINITY, f32::INFINITY),
        (f32::NEG_INFINITY, f32::NEG_INFINITY),
        (f32::MAX, f32::INFINITY),
    ] {
        assert_eq!(round_bf16(x), want, "{x:e}");
        assert_eq!(u32::from(bf16_bits(x)) << 16, want.to_bits(), "{x:e}");
    }
    assert_eq!(round_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
    for nan in [f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xff80_0001)] {
        assert!(round_bf16(nan).is_nan(), "{:#x}", nan.to_bits());
    }
}
