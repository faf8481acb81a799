//! Every tail op against central finite differences (broadcasting cases
//! included): the analytic input gradients of `L = Σ op(x) ⊙ G` must match
//! `(L(x + h) − L(x − h)) / 2h`, the loss summed in f64.

mod common;

use common::rand_vec;
use hydra_edge::HydraConfig;
use hydra_edge::Tensor;
use hydra_edge::hydra::Weights;
use hydra_edge::rng::Rng;
use hydra_edge::tail::ops::TailOp;
use hydra_edge::tail::ops::binary::{Binary, BinaryKind};
use hydra_edge::tail::ops::linear::{Layout, Linear, MatMul};
use hydra_edge::tail::ops::norm::{BatchNorm, LayerNorm, Softmax};
use hydra_edge::tail::ops::reduce::{GlobalAveragePool, Reduce, ReduceKind};
use hydra_edge::tail::ops::shape::{Concat, Gather, ReshapeKind, ReshapeLike, Slice, Transpose};
use hydra_edge::tail::ops::unary::{Cast, Clip, HardSigmoid, Unary, UnaryKind};
use ndarray::{ArrayD, IxDyn};

fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn rand_t(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    t(shape, (0..n).map(|_| rng.uniform(lo, hi)).collect())
}

fn ints(shape: &[usize], v: Vec<i64>) -> Tensor {
    Tensor::I64(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn loss(op: &mut dyn TailOp, inputs: &[Tensor], g: &ArrayD<f32>) -> f64 {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let y = op.forward(&refs, false).unwrap();
    y.f32("y").unwrap().iter().zip(g.iter()).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
}

/// Checks the gradient of every input marked in `need` (every element, or
/// 40 evenly spaced ones for large inputs).
fn check(name: &str, op: &mut dyn TailOp, inputs: Vec<Tensor>, need: &[bool], h: f32, tol: f64) {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let y = op.forward(&refs, false).unwrap();
    let mut rng = Rng::new(77);
    let g = ArrayD::from_shape_vec(IxDyn(y.shape()), rand_vec(&mut rng, y.len())).unwrap();
    let grads = op.backward(&refs, &y, &g, need).unwrap();
    assert_eq!(grads.len(), inputs.len(), "{name}: one gradient slot per input");
    for (i, &want) in need.iter().enumerate() {
        if !want {
            continue;
        }
        let gi = grads[i].as_ref().unwrap_or_else(|| panic!("{name}: input {i} got no gradient"));
        assert_eq!(gi.shape(), inputs[i].shape(), "{name}: gradient {i} shape");
        let n = inputs[i].len();
        let step = (n / 40).max(1);
        for j in (0..n).step_by(step) {
            let mut plus = inputs.clone();
            let mut minus = inputs.clone();
            let Tensor::F32(p) = &mut plus[i] else { unreachable!() };
            p.as_slice_mut().unwrap()[j] += h;
            let Tensor::F32(m) = &mut minus[i] else { unreachable!() };
            m.as_slice_mut().unwrap()[j] -= h;
            let fd = (loss(op, &plus, &g) - loss(op, &minus, &g)) / (2.0 * f64::from(h));
            let an = f64::from(
                gi.as_slice_memory_order()
                    .map(|s| s[j])
                    .unwrap_or_else(|| gi.iter().nth(j).copied().unwrap()),
            );
            assert!(
                (an - fd).abs() <= tol * (1.0 + fd.abs()),
                "{name}: d/dx{i}[{j}]: analytic {an} vs fd {fd}"
            );
        }
    }
}

const H: f32 = 1e-2;
const TOL: f64 = 3e-3;

#[test]
fn binary_ops_with_broadcasting() {
    let mut rng = Rng::new(1);
    let shapes: [(&[usize], &[usize]); 4] =
        [(&[2, 3, 4], &[4]), (&[2, 1, 4], &[3, 1]), (&[], &[2, 3]), (&[3, 4], &[3, 4])];
    for kind in [BinaryKind::Add, BinaryKind::Sub, BinaryKind::Mul, BinaryKind::Div] {
        for (sa, sb) in shapes {
            let a = rand_t(&mut rng, sa, -1.0, 1.0);
            let b = rand_t(&mut rng, sb, 0.5, 1.5);
            check(
                &format!("{kind:?} {sa:?}×{sb:?}"),
                &mut Binary::new(kind),
                vec![a, b],
                &[true, true],
                H,
                TOL,
            );
        }
    }
    let a = rand_t(&mut rng, &[2, 3], 0.5, 2.0);
    check(
        "Pow const",
        &mut Binary::new(BinaryKind::Pow),
        vec![a.clone(), Tensor::scalar(2.0)],
        &[true, false],
        H,
        TOL,
    );
    let p = rand_t(&mut rng, &[3], 0.5, 2.5);
    check("Pow both", &mut Binary::new(BinaryKind::Pow), vec![a, p], &[true, true], H, TOL);
}

#[test]
fn unary_ops() {
    let mut rng = Rng::new(2);
    let kinds = [
        UnaryKind::Relu,
        UnaryKind::Sigmoid,
        UnaryKind::Tanh,
        UnaryKind::Erf,
        UnaryKind::Gelu,
        UnaryKind::GeluTanh,
        UnaryKind::Sqrt,
        UnaryKind::Exp,
        UnaryKind::Neg,
        UnaryKind::Identity,
    ];
    for kind in kinds {
        // Keep clear of kinks and of √'s pole.
        let v: Vec<f32> = (0..24)
            .map(|_| {
                let x = rng.uniform(0.1, 2.0);
                if kind == UnaryKind::Sqrt || rng.next_f32() < 0.5 { x } else { -x }
            })
            .collect();
        check(&format!("{kind:?}"), &mut Unary::new(kind), vec![t(&[4, 6], v)], &[true], H, TOL);
    }
    let v: Vec<f32> = (0..20).map(|i| [-0.9, -0.3, 0.2, 0.45, 0.8][i % 5]).collect();
    check("Clip", &mut Clip::new(-0.5, 0.5), vec![t(&[4, 5], v)], &[true], 1e-3, TOL);
    check(
        "Cast",
        &mut Cast::new(true),
        vec![rand_t(&mut rng, &[3, 2], -1.0, 1.0)],
        &[true],
        H,
        TOL,
    );
}

#[test]
fn erf_matches_known_values() {
    use hydra_edge::tail::ops::unary::erf;
    for (x, want) in [
        (0.0, 0.0),
        (0.5, 0.520_499_877_8),
        (1.0, 0.842_700_792_9),
        (2.0, 0.995_322_265),
        (-1.5, -0.966_105_146),
    ] {
        assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
    }
}

#[test]
fn softmax_and_layernorm() {
    let mut rng = Rng::new(3);
    for (axis, legacy) in [(-1, false), (1, false), (1, true), (0, true)] {
        let x = rand_t(&mut rng, &[2, 3, 4], -2.0, 2.0);
        check(
            &format!("Softmax axis {axis} legacy {legacy}"),
            &mut Softmax::new(axis, legacy),
            vec![x],
            &[true],
            H,
            TOL,
        );
    }
    for axis in [-1, 1] {
        let x = rand_t(&mut rng, &[2, 3, 5], -2.0, 2.0);
        let shape: &[usize] = if axis == -1 { &[5] } else { &[3, 5] };
        let (s, b) = (rand_t(&mut rng, shape, 0.5, 1.5), rand_t(&mut rng, shape, -0.5, 0.5));
        check(
            &format!("LayerNorm axis {axis}"),
            &mut LayerNorm::new(axis, 1e-5),
            vec![x, s, b],
            &[true, false, false],
            H,
            TOL,
        );
    }
}

/// An empty normalised axis is an empty result, forward and backward (the
/// outputs are written lane by lane without zeroing: zero lanes, zero writes).
#[test]
fn layernorm_over_an_empty_axis_is_empty() {
    let (x, s, b) = (t(&[2, 0], vec![]), t(&[0], vec![]), t(&[0], vec![]));
    let mut ln = LayerNorm::new(-1, 1e-5);
    let y = ln.forward(&[&x, &s, &b], true).unwrap();
    assert_eq!(y.shape(), &[2, 0]);
    let dy = ArrayD::<f32>::zeros(IxDyn(&[2, 0]));
    let dx = ln.backward(&[&x, &s, &b], &y, &dy, &[true, false, false]).unwrap();
    assert_eq!(dx[0].as_ref().map(|d| d.shape().to_vec()), Some(vec![2, 0]));
}

#[test]
fn reductions_and_pooling() {
    let mut rng = Rng::new(4);
    for kind in [ReduceKind::Mean, ReduceKind::Sum] {
        for (axes, keep) in
            [(Some(vec![-1]), true), (Some(vec![0, 2]), false), (Some(vec![]), true)]
        {
            let x = rand_t(&mut rng, &[2, 3, 4], -1.0, 1.0);
            check(
                &format!("{kind:?} {axes:?} keep={keep}"),
                &mut Reduce::new(kind, axes, keep, false),
                vec![x],
                &[true],
                H,
                TOL,
            );
        }
        // Axes given as an input tensor.
        let x = rand_t(&mut rng, &[2, 3, 4], -1.0, 1.0);
        let op = &mut Reduce::new(kind, None, true, false);
        check(
            &format!("{kind:?} axes input"),
            op,
            vec![x, ints(&[1], vec![1])],
            &[true, false],
            H,
            TOL,
        );
    }
    let x = rand_t(&mut rng, &[2, 3, 4, 5], -1.0, 1.0);
    check("GlobalAveragePool", &mut GlobalAveragePool, vec![x], &[true], H, TOL);
}

#[test]
fn data_movement_ops() {
    let mut rng = Rng::new(5);
    let x = || rand_t(&mut Rng::new(9), &[2, 3, 4], -1.0, 1.0);
    let reshape = &mut ReshapeLike::new(ReshapeKind::Reshape { allowzero: false });
    check("Reshape", reshape, vec![x(), ints(&[3], vec![0, -1, 2])], &[true, false], H, TOL);
    check("Flatten", &mut ReshapeLike::new(ReshapeKind::Flatten(2)), vec![x()], &[true], H, TOL);
    let sq = rand_t(&mut rng, &[2, 1, 4], -1.0, 1.0);
    check(
        "Squeeze",
        &mut ReshapeLike::new(ReshapeKind::Squeeze(Some(vec![1]))),
        vec![sq],
        &[true],
        H,
        TOL,
    );
    check(
        "Unsqueeze",
        &mut ReshapeLike::new(ReshapeKind::Unsqueeze(None)),
        vec![x(), ints(&[2], vec![0, -1])],
        &[true, false],
        H,
        TOL,
    );
    check("Transpose", &mut Transpose::new(Some(vec![2, 0, 1])), vec![x()], &[true], H, TOL);
    let y = rand_t(&mut rng, &[2, 5, 4], -1.0, 1.0);
    check("Concat", &mut Concat::new(1), vec![x(), y], &[true, true], H, TOL);
    let slice_in = vec![
        x(),
        ints(&[2], vec![2, 1]),
        ints(&[2], vec![-100, 3]),
        ints(&[2], vec![2, 1]),
        ints(&[2], vec![-1, 1]),
    ];
    check(
        "Slice negative step",
        &mut Slice::new(None),
        slice_in,
        &[true, false, false, false, false],
        H,
        TOL,
    );
    let slice_in = vec![
        x(),
        ints(&[1], vec![1]),
        ints(&[1], vec![i64::MAX]),
        ints(&[1], vec![2]),
        ints(&[1], vec![2]),
    ];
    check(
        "Slice step 2",
        &mut Slice::new(None),
        slice_in,
        &[true, false, false, false, false],
        H,
        TOL,
    );
    check(
        "Gather repeated",
        &mut Gather::new(1),
        vec![x(), ints(&[2, 2], vec![0, 2, 2, -1])],
        &[true, false],
        H,
        TOL,
    );
    check(
        "Gather scalar",
        &mut Gather::new(1),
        vec![x(), ints(&[], vec![0])],
        &[true, false],
        H,
        TOL,
    );
}

#[test]
fn matmul_and_linear_layers() {
    let mut rng = Rng::new(6);
    let a = rand_t(&mut rng, &[2, 1, 3, 4], -1.0, 1.0);
    let b = rand_t(&mut rng, &[3, 4, 5], -1.0, 1.0);
    check("MatMul broadcast batch", &mut MatMul, vec![a, b], &[true, true], H, TOL);
    let (din, dout) = (6, 5);
    let w = rand_vec(&mut rng, din * dout);
    let bias = Some(rand_vec(&mut rng, dout));
    for layout in [Layout::Rows, Layout::Channels] {
        for adapted in [false, true] {
            let mut op =
                Linear::new("Gemm", layout, Weights::F32(w.clone()), bias.clone(), din, dout)
                    .unwrap();
            if adapted {
                let mut cfg = HydraConfig::default();
                cfg.parallel.rank = 2;
                cfg.sequential.rank = 3;
                op.adapt(cfg).unwrap();
                for br in op.adapter_mut().unwrap().branches_mut() {
                    br.b.iter_mut().for_each(|v| *v = rng.uniform(-0.5, 0.5));
                }
            }
            let shape: &[usize] =
                if layout == Layout::Rows { &[2, 3, din] } else { &[2, din, 2, 3] };
            let x = rand_t(&mut rng, shape, -1.0, 1.0);
            check(
                &format!("Linear {layout:?} adapted={adapted}"),
                &mut op,
                vec![x],
                &[true],
                H,
                TOL,
            );
        }
    }
}

#[test]
fn the_head_op_has_finite_difference_gradients_for_its_input_and_weights() {
    use hydra_edge::tail::ops::head::LinearHead;
    let mut rng = Rng::new(21);
    // Features of rank 3 are flattened after the batch axis, as for a pooled [B, C, 1] tensor.
    let x = rand_t(&mut rng, &[3, 4, 2], -1.0, 1.0);
    let mut head = LinearHead::new(8, 5, 7).unwrap();
    head.b.iter_mut().for_each(|v| *v = rng.uniform(-0.5, 0.5));
    check("Head input", &mut head, vec![x.clone()], &[true], H, TOL);
    // dL/dW and dL/db for L = Σ g·y, against central differences in f64.
    let refs = [&x];
    let y = TailOp::forward(&mut head, &refs, true).unwrap();
    let g = ArrayD::from_shape_vec(IxDyn(y.shape()), rand_vec(&mut rng, y.len())).unwrap();
    TailOp::backward(&mut head, &refs, &y, &g, &[false]).unwrap();
    let (gw, gb) = (head.gw.clone(), head.gb.clone());
    let value = |h: &mut LinearHead| -> f64 {
        let y = TailOp::forward(h, &refs, false).unwrap();
        y.f32("y").unwrap().iter().zip(g.iter()).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
    };
    for (j, &want) in gw.iter().enumerate() {
        let keep = head.w[j];
        head.w[j] = keep + H;
        let plus = value(&mut head);
        head.w[j] = keep - H;
        let minus = value(&mut head);
        head.w[j] = keep;
        let fd = (plus - minus) / (2.0 * f64::from(H));
        assert!((fd - f64::from(want)).abs() <= TOL * (1.0 + fd.abs()), "dW[{j}] {want} vs {fd}");
    }
    for (j, &want) in gb.iter().enumerate() {
        let keep = head.b[j];
        head.b[j] = keep + H;
        let plus = value(&mut head);
        head.b[j] = keep - H;
        let minus = value(&mut head);
        head.b[j] = keep;
        let fd = (plus - minus) / (2.0 * f64::from(H));
        assert!((fd - f64::from(want)).abs() <= TOL * (1.0 + fd.abs()), "db[{j}] {want} vs {fd}");
    }
}

#[test]
fn masks_and_norms_from_exporters() {
    use hydra_edge::tail::ops::select::{Expand, IsNan, Where};
    let mut rng = Rng::new(21);
    // ReduceL2 over one axis, with and without keepdims.
    for keep in [true, false] {
        let mut op = Reduce::new(ReduceKind::L2, Some(vec![1]), keep, false);
        check("ReduceL2", &mut op, vec![rand_t(&mut rng, &[3, 5], -1.0, 1.0)], &[true], H, TOL);
    }
    let y = Reduce::new(ReduceKind::L2, Some(vec![1]), false, false)
        .forward(&[&t(&[1, 2], vec![3.0, 4.0])], false)
        .unwrap();
    assert_eq!(y.f32("y").unwrap().as_slice().unwrap(), &[5.0]);
    // Expand: [3, 1] to [2, 3, 4] (bidirectional broadcast), gradient summed back.
    let shape = ints(&[3], vec![2, 3, 4]);
    check(
        "Expand",
        &mut Expand,
        vec![rand_t(&mut rng, &[3, 1], -1.0, 1.0), shape],
        &[true, false],
        H,
        TOL,
    );
    // Where with a broadcast integer condition; gradients to both branches.
    let cond = ints(&[1, 4], vec![1, 0, 0, 1]);
    let (a, b) = (rand_t(&mut rng, &[3, 4], -1.0, 1.0), rand_t(&mut rng, &[3, 1], -1.0, 1.0));
    check(
        "Where",
        &mut Where,
        vec![cond.clone(), a.clone(), b.clone()],
        &[false, true, true],
        H,
        TOL,
    );
    let y = Where.forward(&[&cond, &a, &b], false).unwrap();
    let (ya, a, b) = (y.f32("y").unwrap(), a.f32("a").unwrap(), b.f32("b").unwrap());
    assert_eq!(ya[[2, 0]], a[[2, 0]]);
    assert_eq!(ya[[2, 1]], b[[2, 0]]);
    // IsNaN → Where: PyTorch's attention export zeroes NaN rows of a softmax.
    let x = t(&[2, 2], vec![f32::NAN, 0.5, 0.25, f32::NAN]);
    let m = IsNan.forward(&[&x], false).unwrap();
    assert_eq!(m.i64("m").unwrap().as_slice().unwrap(), &[1, 0, 0, 1]);
    assert!(!IsNan.differentiable(0));
    let zero = t(&[], vec![0.0]);
    let y = Where.forward(&[&m, &zero, &x], false).unwrap();
    assert_eq!(y.f32("y").unwrap().as_slice().unwrap(), &[0.0, 0.5, 0.25, 0.0]);
}

/// The ops MobileNetV3- and ResNet-style exports put in the gradient cone:
/// HardSigmoid / HardSwish (values on every side of their kinks), Max / Min
/// with broadcasting (no ties), BatchNormalization in inference form
/// (against its formula, and finite differences).
#[test]
fn cnn_activation_and_norm_ops() {
    // Clear of the kinks at αx + β ∈ {0, 1} (HardSwish: x = ±3).
    let v: Vec<f32> = (0..24).map(|i| [-4.5, -2.2, -0.7, 0.4, 1.9, 3.8][i % 6]).collect();
    check("HardSwish", &mut HardSigmoid::swish(), vec![t(&[4, 6], v.clone())], &[true], H, TOL);
    let y = HardSigmoid::swish().forward(&[&t(&[6], v[..6].to_vec())], false).unwrap();
    let want = [0.0, -2.2 * (-2.2 / 6.0 + 0.5), -0.7 * (-0.7 / 6.0 + 0.5), 0.4 * (0.4 / 6.0 + 0.5)];
    for (g, w) in y.f32("y").unwrap().iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "HardSwish value {g} vs {w}");
    }
    let v: Vec<f32> = (0..24).map(|i| [-4.0, -1.2, 0.3, 1.7, 3.1, 6.0][i % 6]).collect();
    check("HardSigmoid", &mut HardSigmoid::new(0.2, 0.5), vec![t(&[4, 6], v)], &[true], H, TOL);

    let mut rng = Rng::new(11);
    let shapes: [(&[usize], &[usize]); 3] =
        [(&[2, 3, 4], &[4]), (&[2, 1, 4], &[3, 1]), (&[3, 4], &[3, 4])];
    for kind in [BinaryKind::Max, BinaryKind::Min] {
        for (sa, sb) in shapes {
            // a on the grid ±0.25, ±0.75 and b on 0, ±0.5, ±1, each jittered by
            // < 0.1: every pair is ≥ 0.05 apart, so no tie within the FD step.
            let mut grid = |shape: &[usize], off: f32| {
                let n = shape.iter().product();
                let v = (0..n)
                    .map(|_| (rng.below(4) as f32 - 2.0) * 0.5 + off + rng.uniform(-0.1, 0.1))
                    .collect();
                t(shape, v)
            };
            let (a, b) = (grid(sa, 0.25), grid(sb, 0.0));
            check(
                &format!("{kind:?} {sa:?}×{sb:?}"),
                &mut Binary::new(kind),
                vec![a, b],
                &[true, true],
                1e-3,
                TOL,
            );
        }
    }
    let y = Binary::new(BinaryKind::Max)
        .forward(&[&t(&[3], vec![1.0, -2.0, 5.0]), &t(&[1], vec![0.5])], false)
        .unwrap();
    assert_eq!(y.f32("y").unwrap().iter().copied().collect::<Vec<_>>(), [1.0, 0.5, 5.0]);

    let (scale, bias, mean, var) =
        ([1.5, -0.5, 2.0], [0.1, 0.2, -0.3], [0.4, -1.0, 0.0], [0.25, 4.0, 1.0]);
    let mut bn = BatchNorm::new(&scale, &bias, &mean, &var, 1e-5).unwrap();
    let x = rand_t(&mut rng, &[2, 3, 2, 2], -1.0, 1.0);
    let y = bn.forward(&[&x], false).unwrap();
    let (xv, yv) = (x.f32("x").unwrap(), y.f32("y").unwrap());
    for ((idx, &xi), &yi) in xv.indexed_iter().zip(yv.iter()) {
        let c = idx[1];
        let want = (xi - mean[c]) / (var[c] + 1e-5f32).sqrt() * scale[c] + bias[c];
        assert!((yi - want).abs() < 1e-5, "BatchNormalization value {yi} vs {want}");
    }
    check("BatchNormalization", &mut bn, vec![x], &[true], H, TOL);
    assert!(BatchNorm::new(&[1.0], &[0.0], &[0.0], &[-1.0], 1e-5).is_err(), "negative variance");
    assert!(BatchNorm::new(&[1.0, 2.0], &[0.0], &[0.0], &[1.0], 1e-5).is_err(), "length mismatch");
    let wrong = rand_t(&mut rng, &[2, 4, 2], -1.0, 1.0);
    assert!(bn.forward(&[&wrong], false).is_err(), "wrong channel count is an error");
}
