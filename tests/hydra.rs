//! HydraLinear: fixtures from the numpy reference, finite-difference
//! gradients in f64, merge == unmerged, unmerge ∘ merge == id, identity at
//! init, hot-swap deltas, dropout, and bad input.

mod common;

use common::rand_vec;
use hydra_edge::hydra::{Branch, BranchConfig, Init, Input, Weights};
use hydra_edge::rng::Rng;
use hydra_edge::{Error, HydraConfig, HydraLinear, Variant, f16};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    variant: Variant,
    n: usize,
    in_dim: usize,
    out_dim: usize,
    x: Vec<f64>,
    w0: Vec<f64>,
    b0: Option<Vec<f64>>,
    g: Vec<f64>,
    y: Vec<f64>,
    dx: Vec<f64>,
    parallel: Option<FixBranch>,
    sequential: Option<FixBranch>,
}

#[derive(Deserialize)]
struct FixBranch {
    rank: usize,
    scale: f32,
    a: Vec<f64>,
    b: Vec<f64>,
    bias_down: Option<Vec<f64>>,
    bias_up: Option<Vec<f64>>,
    grad: FixGrad,
}

#[derive(Deserialize)]
struct FixGrad {
    a: Vec<f64>,
    b: Vec<f64>,
    bias_down: Option<Vec<f64>>,
    bias_up: Option<Vec<f64>>,
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Max |got − want| / (1 + max|want|).
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = 1.0 + want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).abs()).fold(0.0, f64::max) / scale
}

fn branch_cfg(b: &Option<FixBranch>) -> BranchConfig {
    b.as_ref().map_or(BranchConfig::default(), |b| BranchConfig {
        rank: b.rank,
        scale: b.scale,
        dropout: 0.0,
        bias: b.bias_down.is_some(),
    })
}

fn set_branch(dst: Option<&mut Branch>, src: &Option<FixBranch>) {
    if let (Some(d), Some(s)) = (dst, src) {
        d.a = f32s(&s.a);
        d.b = f32s(&s.b);
        d.bias_down = s.bias_down.as_deref().map(f32s);
        d.bias_up = s.bias_up.as_deref().map(f32s);
    }
}

#[test]
fn matches_the_numpy_reference_fixtures() {
    let text = include_str!("fixtures/hydra_cases.json");
    let fx: Fixtures = serde_json::from_str(text).unwrap();
    assert!(fx.cases.len() >= 6);
    for c in &fx.cases {
        let cfg = HydraConfig {
            variant: c.variant,
            parallel: branch_cfg(&c.parallel),
            sequential: branch_cfg(&c.sequential),
            ..HydraConfig::default()
        };
        let w0 = Weights::F32(f32s(&c.w0));
        let mut layer =
            HydraLinear::new(cfg, w0, c.b0.as_deref().map(f32s), c.in_dim, c.out_dim).unwrap();
        set_branch(layer.parallel_mut(), &c.parallel);
        set_branch(layer.sequential_mut(), &c.sequential);
        let y = layer.forward(Input::F32(&f32s(&c.x)), c.n).unwrap();
        let e = rel_err(&y, &c.y);
        assert!(e < 1e-6, "{}: forward err {e:e}", c.name);
        // Gradients without dX are the same gradients.
        let mut twin = HydraLinear::new(
            layer.config().clone(),
            layer.weights().clone(),
            layer.bias().map(<[f32]>::to_vec),
            c.in_dim,
            c.out_dim,
        )
        .unwrap();
        set_branch(twin.parallel_mut(), &c.parallel);
        set_branch(twin.sequential_mut(), &c.sequential);
        twin.forward(Input::F32(&f32s(&c.x)), c.n).unwrap();
        twin.backward_params_only(&f32s(&c.g)).unwrap();
        let dx = layer.backward(&f32s(&c.g)).unwrap();
        assert_eq!(twin.grads(), layer.grads(), "{}: backward_params_only", c.name);
        let e = rel_err(&dx, &c.dx);
        assert!(e < 1e-6, "{}: dx err {e:e}", c.name);
        let (gp, gs) = layer.grads();
        for (got, want) in [(gp, &c.parallel), (gs, &c.sequential)] {
            assert_eq!(got.is_some(), want.is_some(), "{}: branch presence", c.name);
            if let (Some(got), Some(want)) = (got, want) {
                let g = &want.grad;
                assert!(rel_err(&got.a, &g.a) < 1e-6, "{}: dA", c.name);
                assert!(rel_err(&got.b, &g.b) < 1e-6, "{}: dB", c.name);
                for (gv, wv) in [(&got.bias_down, &g.bias_down), (&got.bias_up, &g.bias_up)] {
                    assert_eq!(gv.is_some(), wv.is_some(), "{}: bias presence", c.name);
                    if let (Some(gv), Some(wv)) = (gv, wv) {
                        assert!(rel_err(gv, wv) < 1e-6, "{}: bias grad", c.name);
                    }
                }
            }
        }
    }
}

/// Plain f64 forward of the layer, for finite differences.
struct Ref64 {
    n: usize,
    din: usize,
    dout: usize,
    w0: Vec<f64>,
    b0: Option<Vec<f64>>,
    par: Option<Br64>,
    seq: Option<Br64>,
}

/// (A, B, c, e, scale, rank) of one branch.
type Br64 = (Vec<f64>, Vec<f64>, Option<Vec<f64>>, Option<Vec<f64>>, f64, usize);

fn branch64(x: &[f64], k: usize, br: &Br64, n: usize, dout: usize, y: &mut [f64]) {
    let (a, b, c, e, s, r) = br;
    for i in 0..n {
        let u: Vec<f64> = (0..*r)
            .map(|j| {
                (0..k).map(|t| a[j * k + t] * x[i * k + t]).sum::<f64>()
                    + c.as_ref().map_or(0.0, |c| c[j])
            })
            .collect();
        for o in 0..dout {
            let up: f64 = (0..*r).map(|j| b[o * r + j] * u[j]).sum::<f64>()
                + e.as_ref().map_or(0.0, |e| e[o]);
            y[i * dout + o] += s * up;
        }
    }
}

impl Ref64 {
    fn forward(&self, x: &[f64]) -> Vec<f64> {
        let (n, din, dout) = (self.n, self.din, self.dout);
        let mut y0 = vec![0.0; n * dout];
        for i in 0..n {
            for o in 0..dout {
                y0[i * dout + o] =
                    (0..din).map(|t| self.w0[o * din + t] * x[i * din + t]).sum::<f64>()
                        + self.b0.as_ref().map_or(0.0, |b| b[o]);
            }
        }
        let mut y = y0.clone();
        if let Some(p) = &self.par {
            branch64(x, din, p, n, dout, &mut y);
        }
        if let Some(q) = &self.seq {
            branch64(&y0, dout, q, n, dout, &mut y);
        }
        y
    }

    fn loss(&self, x: &[f64], g: &[f64]) -> f64 {
        self.forward(x).iter().zip(g).map(|(y, g)| y * g).sum()
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn ref_of(layer: &HydraLinear, n: usize) -> Ref64 {
    let c = layer.config();
    let br = |b: Option<&Branch>, cfg: &BranchConfig| {
        b.map(|b| {
            (
                to64(&b.a),
                to64(&b.b),
                b.bias_down.as_deref().map(to64),
                b.bias_up.as_deref().map(to64),
                f64::from(cfg.scale),
                cfg.rank,
            )
        })
    };
    let Weights::F32(w0) = layer.weights() else { panic!("f32 weights expected") };
    Ref64 {
        n,
        din: layer.in_dim(),
        dout: layer.out_dim(),
        w0: to64(w0),
        b0: layer.bias().map(to64),
        par: br(layer.parallel(), &c.parallel),
        seq: br(layer.sequential(), &c.sequential),
    }
}

/// A layer with random (non-zero) B and biases, so every gradient is non-trivial.
fn random_layer(
    variant: Variant,
    bias: bool,
    has_b0: bool,
    din: usize,
    dout: usize,
    r: usize,
    seed: u64,
) -> HydraLinear {
    let mut rng = Rng::new(seed);
    let cfg = HydraConfig {
        variant,
        parallel: BranchConfig { rank: r, scale: 0.7, dropout: 0.0, bias },
        sequential: BranchConfig { rank: r, scale: 1.3, dropout: 0.0, bias },
        init: Init::XavierUniform,
        seed,
    };
    let w0 = Weights::F32(rand_vec(&mut rng, din * dout));
    let b0 = has_b0.then(|| rand_vec(&mut rng, dout));
    let mut layer = HydraLinear::new(cfg, w0, b0, din, dout).unwrap();
    for br in layer.branches_mut() {
        for t in br.tensors_mut() {
            t.iter_mut().for_each(|v| *v = rng.uniform(-1.0, 1.0));
        }
    }
    layer
}

const VARIANTS: [Variant; 3] = [Variant::Hydra, Variant::Lora, Variant::SeqLora];

#[test]
fn gradients_match_central_finite_differences_in_f64() {
    // d/dθ Σ y⊙G by (L(θ+h) − L(θ−h)) / 2h on the f64 reference, against the
    // layer's f32 kernel gradients. Every parameter and every input element.
    let h = 1e-6;
    for variant in VARIANTS {
        for bias in [false, true] {
            for &(n, din, dout, r) in &[(3, 5, 4, 2), (1, 6, 9, 1), (2, 4, 4, 1)] {
                let what = format!("{variant:?} bias={bias} n={n} in={din} out={dout} r={r}");
                let mut layer = random_layer(variant, bias, true, din, dout, r, 7 + n as u64);
                let mut rng = Rng::new(3);
                let (x, g) = (rand_vec(&mut rng, n * din), rand_vec(&mut rng, n * dout));
                layer.forward(Input::F32(&x), n).unwrap();
                let dx = layer.backward(&g).unwrap();
                let refm = ref_of(&layer, n);
                let (x64, g64) = (to64(&x), to64(&g));
                let check = |got: f32, fd: f64, name: &str| {
                    let err = (f64::from(got) - fd).abs();
                    assert!(
                        err <= 1e-4 * (1.0 + fd.abs()),
                        "{what}: {name}: analytic {got} vs fd {fd}"
                    );
                };
                for i in 0..x.len() {
                    let (mut xp, mut xm) = (x64.clone(), x64.clone());
                    xp[i] += h;
                    xm[i] -= h;
                    check(
                        dx[i],
                        (refm.loss(&xp, &g64) - refm.loss(&xm, &g64)) / (2.0 * h),
                        &format!("dx[{i}]"),
                    );
                }
                let (gp, gs) = layer.grads();
                for (which, grads) in [("par", gp), ("seq", gs)] {
                    let Some(grads) = grads else { continue };
                    for (ti, gt) in grads.tensors().enumerate() {
                        for j in 0..gt.len() {
                            let fd = {
                                let mut plus = ref_of(&layer, n);
                                let mut minus = ref_of(&layer, n);
                                for (m, sign) in [(&mut plus, 1.0), (&mut minus, -1.0)] {
                                    let br = if which == "par" {
                                        m.par.as_mut()
                                    } else {
                                        m.seq.as_mut()
                                    }
                                    .unwrap();
                                    let t = match ti {
                                        0 => &mut br.0,
                                        1 => &mut br.1,
                                        2 => br.2.as_mut().unwrap(),
                                        _ => br.3.as_mut().unwrap(),
                                    };
                                    t[j] += sign * h;
                                }
                                (plus.loss(&x64, &g64) - minus.loss(&x64, &g64)) / (2.0 * h)
                            };
                            check(gt[j], fd, &format!("{which} tensor {ti}[{j}]"));
                        }
                    }
                }
            }
        }
    }
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

#[test]
fn merged_forward_equals_unmerged_and_unmerge_restores_weights() {
    for variant in VARIANTS {
        for has_b0 in [false, true] {
            for bias in [false, true] {
                let what = format!("{variant:?} b0={has_b0} bias={bias}");
                let (n, din, dout) = (8, 48, 40);
                let mut layer = random_layer(variant, bias, has_b0, din, dout, 4, 11);
                // Scale B down to adapter-like magnitudes.
                for br in layer.branches_mut() {
                    br.b.iter_mut().for_each(|v| *v *= 0.1);
                }
                let x = rand_vec(&mut Rng::new(5), n * din);
                let y = layer.forward(Input::F32(&x), n).unwrap();
                let (Weights::F32(w_before), b_before) =
                    (layer.weights().clone(), layer.bias().map(<[f32]>::to_vec))
                else {
                    unreachable!()
                };
                layer.merge().unwrap();
                assert!(layer.is_merged());
                let ym = layer.forward(Input::F32(&x), n).unwrap();
                let e = max_rel(&ym, &y);
                assert!(e <= 1e-5, "{what}: merged vs unmerged {e:e}");
                layer.unmerge().unwrap();
                let Weights::F32(w_after) = layer.weights() else { unreachable!() };
                let e = max_rel(w_after, &w_before);
                assert!(e <= 1e-6, "{what}: unmerge(merge(W)) err {e:e}");
                assert_eq!(
                    layer.bias().is_some(),
                    b_before.is_some(),
                    "{what}: bias presence restored"
                );
                if let (Some(a), Some(b)) = (layer.bias(), &b_before) {
                    assert!(max_rel(a, b) <= 1e-6, "{what}: bias restored");
                }
                let y2 = layer.forward(Input::F32(&x), n).unwrap();
                assert!(max_rel(&y2, &y) <= 1e-5, "{what}: forward after unmerge");
            }
        }
    }
}

#[test]
fn merge_with_f16_weights_rounds_once_and_matches() {
    let (n, din, dout) = (4, 64, 32);
    let mut rng = Rng::new(9);
    let w: Vec<f16> = rand_vec(&mut rng, din * dout).into_iter().map(f16::from_f32).collect();
    let cfg = HydraConfig::default();
    let mut layer = HydraLinear::new(cfg, Weights::F16(w), None, din, dout).unwrap();
    for br in layer.branches_mut() {
        br.b.iter_mut().for_each(|v| *v = rng.uniform(-0.1, 0.1));
    }
    let x: Vec<f16> = rand_vec(&mut rng, n * din).into_iter().map(f16::from_f32).collect();
    let y = layer.forward(Input::F16(&x), n).unwrap();
    let (wm, _) = layer.merged_weights().unwrap();
    layer.merge().unwrap();
    let Weights::F16(wh) = layer.weights() else { panic!("storage type kept") };
    for (h, f) in wh.iter().zip(&wm) {
        assert_eq!(*h, f16::from_f32(*f), "f32 merge rounded once to f16");
    }
    let ym = layer.forward(Input::F16(&x), n).unwrap();
    // f16 weight rounding (2⁻¹¹ relative per weight) bounds the difference.
    assert!(max_rel(&ym, &y) <= 2e-3, "{}", max_rel(&ym, &y));
}

#[test]
fn fresh_adapter_is_the_identity_bit_for_bit() {
    for variant in VARIANTS {
        let (n, din, dout) = (5, 33, 17);
        let mut rng = Rng::new(21);
        let w = rand_vec(&mut rng, din * dout);
        let b = rand_vec(&mut rng, dout);
        let cfg = HydraConfig {
            variant,
            parallel: BranchConfig { rank: 4, scale: 2.0, dropout: 0.0, bias: true },
            sequential: BranchConfig { rank: 4, scale: 3.0, dropout: 0.0, bias: true },
            ..HydraConfig::default()
        };
        let mut layer =
            HydraLinear::new(cfg, Weights::F32(w.clone()), Some(b.clone()), din, dout).unwrap();
        let x = rand_vec(&mut rng, n * din);
        let y = layer.forward(Input::F32(&x), n).unwrap();
        // The frozen layer alone, through the same dense path.
        let mut frozen = vec![0.0f32; n * dout];
        unsafe {
            matrixmultiply::sgemm(
                n,
                din,
                dout,
                1.0,
                x.as_ptr(),
                din as isize,
                1,
                w.as_ptr(),
                1,
                din as isize,
                0.0,
                frozen.as_mut_ptr(),
                dout as isize,
                1,
            );
        }
        for i in 0..n {
            for o in 0..dout {
                frozen[i * dout + o] += b[o];
            }
        }
        let same = y.iter().zip(&frozen).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{variant:?}: fresh adapter changed the output");
    }
}

#[test]
fn delta_apply_equals_merge_and_remove_restores() {
    let (din, dout) = (24, 20);
    for variant in VARIANTS {
        let layer = random_layer(variant, true, true, din, dout, 3, 4);
        let (wm, bm) = layer.merged_weights().unwrap();
        let delta = layer.delta().unwrap();
        assert!(delta.len() < din * dout, "delta is low-rank");
        let mut w = layer.weights().clone();
        let mut b = layer.bias().unwrap().to_vec();
        delta.apply(&mut w, Some(&mut b)).unwrap();
        let Weights::F32(wv) = &w else { unreachable!() };
        assert!(max_rel(wv, &wm) <= 1e-6);
        assert!(max_rel(&b, bm.as_ref().unwrap()) <= 1e-6);
        delta.remove(&mut w, Some(&mut b)).unwrap();
        let (Weights::F32(wv), Weights::F32(w0)) = (&w, layer.weights()) else { unreachable!() };
        assert!(max_rel(wv, w0) <= 1e-6);
        // A wrong-shaped target is an error, not a panic.
        let mut small = Weights::F32(vec![0.0; 3]);
        assert!(matches!(delta.apply(&mut small, Some(&mut b)), Err(Error::Shape { .. })));
        assert!(delta.apply(&mut w, None).is_err(), "bias delta needs a bias");
    }
}

#[test]
fn dropout_is_seeded_off_in_eval_and_its_gradient_is_exact() {
    let (n, din, dout) = (6, 12, 10);
    let mut layer = random_layer(Variant::Hydra, false, true, din, dout, 2, 17);
    let cfg = HydraConfig {
        parallel: BranchConfig { rank: 2, scale: 0.7, dropout: 0.3, bias: false },
        sequential: BranchConfig { rank: 2, scale: 1.3, dropout: 0.2, bias: false },
        ..layer.config().clone()
    };
    let mut drop = HydraLinear::new(
        cfg,
        layer.weights().clone(),
        layer.bias().map(<[f32]>::to_vec),
        din,
        dout,
    )
    .unwrap();
    *drop.parallel_mut().unwrap() = layer.parallel().unwrap().clone();
    *drop.sequential_mut().unwrap() = layer.sequential().unwrap().clone();
    let x = rand_vec(&mut Rng::new(2), n * din);
    let y_plain = layer.forward(Input::F32(&x), n).unwrap();
    assert_eq!(drop.forward(Input::F32(&x), n).unwrap(), y_plain, "eval mode: no dropout");
    drop.set_training(true);
    let state = drop.rng().clone();
    let y1 = drop.forward(Input::F32(&x), n).unwrap();
    assert_ne!(y1, y_plain, "training mode drops");
    drop.set_rng(state.clone());
    let y2 = drop.forward(Input::F32(&x), n).unwrap();
    assert_eq!(y1, y2, "same generator state, same mask");
    // Finite differences on the input with the mask held fixed (same state each time).
    let g = rand_vec(&mut Rng::new(8), n * dout);
    drop.set_rng(state.clone());
    drop.forward(Input::F32(&x), n).unwrap();
    let dx = drop.backward(&g).unwrap();
    let loss = |drop: &mut HydraLinear, x: &[f32]| -> f64 {
        drop.set_rng(state.clone());
        let y = drop.forward(Input::F32(x), n).unwrap();
        y.iter().zip(&g).map(|(y, g)| f64::from(*y) * f64::from(*g)).sum()
    };
    let h = 1e-2f32; // the loss is linear in x, so a large step is exact up to f32 rounding
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&mut drop, &xp) - loss(&mut drop, &xm)) / (2.0 * f64::from(h));
        assert!(
            (f64::from(dx[i]) - fd).abs() <= 2e-3 * (1.0 + fd.abs()),
            "dx[{i}] {} vs {fd}",
            dx[i]
        );
    }
}

#[test]
fn bad_input_is_an_error_never_a_panic() {
    let w = || Weights::F32(vec![0.5; 6 * 4]);
    let cfg = |r: usize| HydraConfig {
        parallel: BranchConfig { rank: r, ..BranchConfig::default() },
        sequential: BranchConfig { rank: r, ..BranchConfig::default() },
        ..HydraConfig::default()
    };
    // Rank 0, rank above min(in, out).
    assert!(matches!(HydraLinear::new(cfg(0), w(), None, 6, 4), Err(Error::Config(_))));
    assert!(matches!(HydraLinear::new(cfg(5), w(), None, 6, 4), Err(Error::Config(_))));
    // W0 and b0 of the wrong size; non-finite weights.
    assert!(matches!(
        HydraLinear::new(cfg(2), Weights::F32(vec![0.0; 5]), None, 6, 4),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        HydraLinear::new(cfg(2), w(), Some(vec![0.0; 3]), 6, 4),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        HydraLinear::new(cfg(2), Weights::F32(vec![f32::NAN; 24]), None, 6, 4),
        Err(Error::NonFinite(_))
    ));
    let mut layer = HydraLinear::new(cfg(2), w(), None, 6, 4).unwrap();
    // Backward before forward.
    assert!(layer.backward(&[0.0; 4]).is_err());
    // Mismatched X, non-finite X.
    assert!(matches!(layer.forward(Input::F32(&[0.0; 7]), 1), Err(Error::Shape { .. })));
    assert!(matches!(
        layer.forward(Input::F32(&[0.0, 1.0, f32::INFINITY, 0.0, 0.0, 0.0]), 1),
        Err(Error::NonFinite(_))
    ));
    let nan16 = [f16::NAN; 6];
    assert!(matches!(layer.forward(Input::F16(&nan16), 1), Err(Error::NonFinite(_))));
    // Mismatched and non-finite dY.
    layer.forward(Input::F32(&[0.1; 12]), 2).unwrap();
    assert!(matches!(layer.backward(&[0.0; 5]), Err(Error::Shape { .. })));
    layer.forward(Input::F32(&[0.1; 12]), 2).unwrap();
    assert!(matches!(layer.backward(&[f32::NAN; 8]), Err(Error::NonFinite(_))));
    // Merge twice, unmerge when not merged.
    assert!(layer.unmerge().is_err());
    layer.merge().unwrap();
    assert!(layer.merge().is_err());
    assert!(layer.delta().is_err());
}

#[test]
fn config_round_trips_through_json_and_seed_fixes_init() {
    let cfg = HydraConfig {
        variant: Variant::SeqLora,
        sequential: BranchConfig { rank: 3, scale: 0.5, dropout: 0.1, bias: true },
        init: Init::XavierUniform,
        seed: 99,
        ..HydraConfig::default()
    };
    let text = serde_json::to_string(&cfg).unwrap();
    assert!(text.contains("\"seqlora\"") && text.contains("xavier_uniform"), "{text}");
    let back: HydraConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, cfg);
    let partial: HydraConfig =
        serde_json::from_str(r#"{"variant":"lora","parallel":{"rank":2}}"#).unwrap();
    assert_eq!(partial.parallel.rank, 2);
    assert_eq!(partial.parallel.scale, 1.0);
    let w = Weights::F32(vec![0.0; 16]);
    let a = HydraLinear::new(cfg.clone(), w.clone(), None, 4, 4).unwrap();
    let b = HydraLinear::new(cfg, w, None, 4, 4).unwrap();
    assert_eq!(a.sequential(), b.sequential());
    let bound = (6.0f32 / 8.0).sqrt();
    assert!(a.sequential().unwrap().a.iter().all(|v| v.abs() <= bound && *v != 0.0));
    assert!(a.sequential().unwrap().b.iter().all(|v| *v == 0.0), "B starts at zero");
    assert_eq!(a.num_trainable(), 3 * 4 + 4 * 3 + 3 + 4);
}
