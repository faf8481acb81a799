//! `--device` and the `cuda` feature.
//!
//! Everywhere: device names parse, asking for a GPU where there is none (or
//! in a build without `cuda`) is an error that names what is missing and
//! leaves the CPU in use, and the CLI says so instead of panicking.
//!
//! With a GPU (`targets/gpu-check.sh`: `cargo test --release --features cuda
//! --test device -- --ignored`): every product of a small model sent to the
//! GPU (`set_gpu_min_work(0)`) gives the CPU's products, forward, backward,
//! optimizer step and a short training run, within explicit tolerances.
//! Those tests are `#[ignore]`d and fail (never pass) where no GPU starts.
#![cfg(feature = "onnx")]

mod common;

use std::path::PathBuf;
use std::sync::Mutex;

use common::rel_err;
use hydra_edge::Error;
use hydra_edge::device::{self, Device};

/// The device is process-wide: tests that switch it take turns.
static DEVICE: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    DEVICE.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn device_names_parse_and_bad_ones_are_errors() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
    for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:99999999999999999999999", ""] {
        let e = bad.parse::<Device>().unwrap_err();
        assert!(e.to_string().contains("expected `cpu`, `cuda` or `cuda:N`"), "{bad}: {e}");
    }
}

/// Whether a GPU starts here (then the no-GPU assertions do not apply).
fn gpu_here() -> bool {
    let _g = lock();
    let ok = device::set_device(Device::Cuda(0)).is_ok();
    device::set_device(Device::Cpu).unwrap();
    ok
}

#[test]
fn a_gpu_that_is_not_there_is_a_clear_error_and_the_cpu_stays() {
    let _g = lock();
    match device::set_device(Device::Cuda(0)) {
        Err(Error::Device { device: d, reason }) => {
            assert_eq!(d, "cuda:0");
            let named = if cfg!(feature = "cuda") {
                ["libcuda", "cuBLAS", "no GPU", "cannot start", "no such GPU"]
                    .iter()
                    .any(|w| reason.contains(w))
            } else {
                reason.contains("--features cuda")
            };
            assert!(named, "the reason does not say what is missing: {reason}");
            assert_eq!(device::device(), Device::Cpu);
        }
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(info) => {
            // A machine with a GPU and a cuda build: then it must be in use.
            // (A build without `cuda` cannot get here: set_device refuses.)
            assert_eq!((info.device, device::device()), (Device::Cuda(0), Device::Cuda(0)));
        }
    }
    // A GPU number past the last one is refused with the count, where there is a GPU.
    if let Err(e) = device::set_device(Device::Cuda(4096)) {
        assert!(matches!(e, Error::Device { .. }), "{e}");
    }
    assert!(device::set_device(Device::Cpu).is_ok());
    assert_eq!(device::device(), Device::Cpu);
}

#[cfg(feature = "cli")]
#[test]
fn the_cli_reports_a_missing_gpu_instead_of_panicking() {
    if gpu_here() {
        return; // covered by the GPU run of targets/gpu-check.sh
    }
    let exe = cli_exe();
    let o = common::run_target_binary(&exe).args(["--device", "cuda", "demo"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("error: --device: device `cuda:0`:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let o = common::run_target_binary(&exe).args(["--device", "tpu", "demo"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "a bad --device is a usage error");
}

// ---- with a GPU -------------------------------------------------------------

use hydra_edge::backbone::Feed;
use hydra_edge::model::AdaptedModel;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::rng::Rng;
use hydra_edge::train::{Dataset, TrainConfig, Trainer};
use hydra_edge::{HydraConfig, Tensor};
use ndarray::{ArrayD, IxDyn};

/// The repository: where cargo built the tests, or `HYDRA_REPO_ROOT` for a
/// test binary run elsewhere (targets/gpu-bundle.sh, on a GPU machine).
fn root() -> PathBuf {
    std::env::var_os("HYDRA_REPO_ROOT")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

/// The CLI binary: cargo's, or `HYDRA_EDGE_BIN` (as [`root`]).
#[cfg(feature = "cli")]
fn cli_exe() -> PathBuf {
    std::env::var_os("HYDRA_EDGE_BIN")
        .map_or_else(|| env!("CARGO_BIN_EXE_hydra-edge").into(), Into::into)
}

/// Puts the process-wide knobs back to the defaults when dropped, also when
/// a test fails midway (else the tests after it would run with them).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        device::set_gpu_min_work(device::GPU_MIN_WORK);
        device::set_resident_tail(true);
        hydra_edge::runtime::set_matmul_precision(hydra_edge::runtime::MatmulPrecision::F32);
        let _ = device::set_device(Device::Cpu);
    }
}

/// Runs `f` on the CPU, then on cuda:0 with every product sent to the GPU,
/// and returns both results and the number of products the GPU ran.
fn cpu_then_gpu<T>(f: impl FnMut() -> T) -> (T, T, usize) {
    let _g = lock();
    cpu_then_gpu_locked(f)
}

/// [`cpu_then_gpu`] for a caller that holds [`lock`] already.
fn cpu_then_gpu_locked<T>(mut f: impl FnMut() -> T) -> (T, T, usize) {
    let _restore = Restore;
    let fallbacks = device::stats::gpu_fallbacks();
    device::set_device(Device::Cpu).unwrap();
    let cpu = f();
    let info = device::set_device(Device::Cuda(0)).unwrap_or_else(|e| panic!("no GPU: {e}"));
    eprintln!("GPU: {} ({:?} bytes)", info.name, info.memory_bytes);
    device::set_gpu_min_work(0);
    let before = device::stats::gpu_products();
    let gpu = f();
    let ran = device::stats::gpu_products() - before;
    device::set_gpu_min_work(device::GPU_MIN_WORK);
    device::set_device(Device::Cpu).unwrap();
    assert_eq!(device::stats::gpu_fallbacks(), fallbacks, "a CUDA call failed");
    (cpu, gpu, ran)
}

#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn gpu_products_match_the_cpu_for_every_operand_layout() {
    let (m, k, n) = (37, 300, 45);
    let mut rng = Rng::new(5);
    let a: Vec<f32> = (0..m * k * 2).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let b: Vec<f32> = (0..k * n * 2).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let c0: Vec<f32> = (0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    // Row-major, column-major, and strided both ways (a copy on the way up).
    let layouts =
        [((k, 1), (n, 1)), ((1, m), (1, k)), ((2 * k, 2), (1, 2 * k)), ((k, 1), (2 * n, 2))];
    for (sa, sb) in layouts {
        for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
            let (cpu, gpu, ran) = cpu_then_gpu(|| {
                let mut c = c0.clone();
                hydra_edge::hydra::gemm(m, k, n, alpha, &a, sa, &b, sb, beta, &mut c);
                c
            });
            assert_eq!(ran, 1);
            let e = rel_err(&cpu, &gpu);
            assert!(e <= 1e-5, "{sa:?} {sb:?} α={alpha} β={beta}: GPU vs CPU {e:e}");
        }
    }
}

/// The test transformer's last block adapted, up to its logits.
fn transformer_split() -> SplitConfig {
    SplitConfig {
        targets: Targets::LastBlocks(1),
        output: Some("logits".into()),
        adapter: HydraConfig { seed: 4, ..HydraConfig::default() },
        ..SplitConfig::default()
    }
}

fn transformer_feed(batch: usize) -> Feed {
    let mut rng = Rng::new(9);
    let mut f = Feed::new();
    let x: Vec<f32> = (0..batch * 8 * 32).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mask: Vec<f32> = (0..batch * 8).map(|i| if i % 8 < 6 { 1.0 } else { 0.0 }).collect();
    f.insert("x".into(), Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[batch, 8, 32]), x).unwrap()));
    f.insert("mask".into(), Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[batch, 8]), mask).unwrap()));
    f
}

#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn forward_backward_and_gradients_on_the_gpu_match_the_cpu() {
    let model = OnnxModel::load(root().join("models/test/transformer.onnx")).unwrap();
    let feed = transformer_feed(4);
    let (cpu, gpu, ran) = cpu_then_gpu(|| {
        let mut split = AdaptedModel::new(&model, &transformer_split()).unwrap();
        // Non-zero up-projections, so that every branch carries a gradient.
        split.params_and_grads().0.iter_mut().for_each(|p| {
            p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * ((i % 7) as f32 - 3.0))
        });
        split.zero_grad();
        let y = split.forward(&feed, true).unwrap();
        let y = y.f32("y").unwrap().clone();
        split.backward(y.mapv(|v| v.sin())).unwrap();
        let grads: Vec<Vec<f32>> = split.params_and_grads().1.iter().map(|g| g.to_vec()).collect();
        (y.iter().copied().collect::<Vec<f32>>(), grads, split.params())
    });
    assert!(ran > 0, "no product reached the GPU");
    let e = rel_err(&cpu.0, &gpu.0);
    eprintln!("forward: max rel |GPU − CPU| {e:.2e} ({ran} GPU products)");
    assert!(e <= 1e-5, "forward: GPU vs CPU {e:e}");
    for ((c, g), spec) in cpu.1.iter().zip(&gpu.1).zip(&cpu.2) {
        let e = rel_err(c, g);
        eprintln!("grad {}: max rel |GPU − CPU| {e:.2e}", spec.name);
        assert!(e <= 1e-4, "gradient of {}: GPU vs CPU {e:e}", spec.name);
    }
}

fn digits(name: &str) -> Dataset {
    Dataset::from_npz(&root().join("models/digits").join(name), "label").unwrap()
}

/// Adapter values after `epochs` of AdamW in batches of `batch` (0: the
/// whole set, one step per epoch).
fn digits_run(epochs: usize, batch: usize) -> Vec<Vec<f32>> {
    let model = OnnxModel::load(root().join("models/digits/digits_mlp.onnx")).unwrap();
    let cfg = SplitConfig { targets: Targets::AllLinear, ..SplitConfig::default() };
    let split = AdaptedModel::new(&model, &cfg).unwrap();
    let train = digits("digits_user_train.npz");
    let batch_size = if batch == 0 { train.len() } else { batch };
    let tc = TrainConfig { epochs, batch_size, lr: 1e-2, ..TrainConfig::default() };
    let mut t = Trainer::new(split, tc).unwrap();
    t.fit(&train, None, &mut |_| {}).unwrap();
    t.model().param_values().iter().map(|p| p.to_vec()).collect()
}

#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn an_optimizer_step_and_a_short_training_run_on_the_gpu_match_the_cpu() {
    // One AdamW step on the whole set, then three epochs in batches of 32.
    // Adam divides by √v, so a gradient's rounding difference can move a
    // parameter by up to a learning-rate fraction: looser after many steps.
    for (epochs, batch, tol) in [(1, 0, 1e-4), (3, 32, 2e-3)] {
        let _g = lock();
        let steps = device::stats::gpu_optimizer_steps();
        let (cpu, gpu, ran) = cpu_then_gpu_locked(|| digits_run(epochs, batch));
        assert!(ran > 0);
        assert!(device::stats::gpu_optimizer_steps() > steps, "the optimizer ran on the GPU");
        let worst = cpu.iter().zip(&gpu).map(|(c, g)| rel_err(c, g)).fold(0.0f32, f32::max);
        eprintln!(
            "{epochs} epoch(s): adapter max rel |GPU − CPU| {worst:.2e} ({ran} GPU products)"
        );
        assert!(worst <= tol, "{epochs} epochs: GPU vs CPU {worst:e}");
    }
}

#[test]
fn gpu_path_counters_stay_zero_on_the_cpu() {
    if gpu_here() {
        return;
    }
    let _g = lock();
    let counters = || {
        use device::stats::*;
        [
            gpu_products(),
            gpu_fallbacks(),
            gpu_tail_ops(),
            gpu_tail_reruns(),
            gpu_bytes_up(),
            gpu_cache_gathers(),
            gpu_cache_uploads(),
        ]
    };
    let before = counters();
    let _ = digits_run(1, 32);
    assert_eq!(counters(), before);
}

/// The transformer's forward on the GPU, merged and switched: a merge
/// changes `W0` and leaves the adapters out of the forward (so a GPU copy
/// of the unmerged `W0` kept past it would lose their share), and a switch
/// to the CPU and back opens the GPU anew (its copies are uploaded again);
/// then a forward and the copies' free on threads with no CUDA context
/// current. Each forward equals the CPU's at the same point, and no CUDA
/// call fails (`cpu_then_gpu`).
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn resident_weights_follow_merges_and_device_switches() {
    let model = OnnxModel::load(root().join("models/test/transformer.onnx")).unwrap();
    let feed = transformer_feed(4);
    let (cpu, gpu, ran) = cpu_then_gpu(|| {
        let mut split = AdaptedModel::new(&model, &transformer_split()).unwrap();
        let y = |split: &mut AdaptedModel| {
            let t = split.forward(&feed, false).unwrap();
            t.f32("y").unwrap().iter().copied().collect::<Vec<f32>>()
        };
        let base = y(&mut split); // the adapters start as no-ops
        split.params_and_grads().0.iter_mut().for_each(|p| {
            p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.02 * ((i % 5) as f32 - 2.0))
        });
        let before = y(&mut split);
        for (_, layer) in split.tail_mut().adapters_mut() {
            layer.merge().unwrap();
        }
        let merged = y(&mut split);
        let on = device::device();
        device::set_device(Device::Cpu).unwrap();
        device::set_device(on).unwrap();
        let switched = y(&mut split);
        // On threads where no context is current: a forward, then the
        // layers' GPU copies freed (a free without their context fails and
        // poisons the context, so the next product would fall back).
        let threaded = std::thread::scope(|s| s.spawn(|| y(&mut split)).join().unwrap());
        let mut other = AdaptedModel::new(&model, &transformer_split()).unwrap();
        std::thread::scope(|s| s.spawn(move || drop(split)).join().unwrap());
        let _ = y(&mut other);
        // The device switched from such a thread too: the GPU's own buffers
        // are freed there (the mock's exit count sees a refused free).
        std::thread::scope(|s| {
            s.spawn(|| {
                let on = device::device();
                device::set_device(Device::Cpu).unwrap();
                device::set_device(on).unwrap();
            })
            .join()
            .unwrap()
        });
        let after = y(&mut other);
        (before, merged, switched, base, threaded, after)
    });
    assert!(ran > 0, "no product reached the GPU");
    for (what, c, g) in [
        ("unmerged", &cpu.0, &gpu.0),
        ("merged", &cpu.1, &gpu.1),
        ("switched", &cpu.2, &gpu.2),
        ("on another thread", &cpu.4, &gpu.4),
        ("after a free on a third thread", &cpu.5, &gpu.5),
    ] {
        let e = rel_err(c, g);
        eprintln!("{what}: max rel |GPU − CPU| {e:.2e}");
        assert!(e <= 1e-5, "{what}: GPU vs CPU {e:e}");
    }
    // Merged or not, the same answers (on the CPU); a stale unmerged W0 on
    // the GPU would have lost the adapters' share, far above the tolerance.
    assert!(rel_err(&cpu.0, &cpu.1) <= 1e-4, "merged vs unmerged on the CPU");
    let share = rel_err(&cpu.3, &cpu.0);
    assert!(share >= 1e-3, "the adapters' share {share:e} is too small to tell stale weights");
}

/// `--matmul-precision bf16` on the GPU: products (every operand layout,
/// and the transformer's frozen layers with their weights resident) take
/// operands rounded to bf16 as the CPU's bf16 products round them, summed
/// in f32 — so they equal an f32 product of the rounded operands to f32
/// rounding, whatever the CPU has. A GPU without bf16 tensor cores runs
/// them in f32 instead (then none is counted as bf16).
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn bf16_products_on_the_gpu_round_their_operands_as_the_cpu_does() {
    use hydra_edge::kernels::round_bf16;
    use hydra_edge::runtime::{MatmulPrecision, set_matmul_precision};
    // The precision is process-wide: the whole test holds the lock.
    let _g = lock();
    let _restore = Restore;
    let (m, k, n) = (37, 300, 45);
    let mut rng = Rng::new(8);
    let a: Vec<f32> = (0..m * k * 2).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let b: Vec<f32> = (0..k * n * 2).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let (ar, br): (Vec<f32>, Vec<f32>) =
        (a.iter().map(|&v| round_bf16(v)).collect(), b.iter().map(|&v| round_bf16(v)).collect());
    let layouts = [((k, 1), (n, 1)), ((1, m), (1, k)), ((2 * k, 2), (1, 2 * k))];
    let mut want = Vec::new();
    device::set_device(Device::Cpu).unwrap();
    set_matmul_precision(MatmulPrecision::F32);
    for (sa, sb) in layouts {
        let mut c = vec![0.0f32; m * n];
        hydra_edge::hydra::gemm(m, k, n, 1.0, &ar, sa, &br, sb, 0.0, &mut c);
        want.push(c);
    }
    device::set_device(Device::Cuda(0)).unwrap_or_else(|e| panic!("no GPU: {e}"));
    set_matmul_precision(MatmulPrecision::Bf16);
    device::set_gpu_min_work(0);
    let tensor_cores = device::gpu_bf16();
    let before = device::stats::gpu_bf16_products();
    for ((sa, sb), want) in layouts.into_iter().zip(&want) {
        let mut c = vec![0.0f32; m * n];
        hydra_edge::hydra::gemm(m, k, n, 1.0, &a, sa, &b, sb, 0.0, &mut c);
        let e = rel_err(want, &c);
        eprintln!("bf16 {sa:?} {sb:?}: max rel |GPU − f32 of rounded| {e:.2e}");
        if tensor_cores {
            assert!(e <= 1e-5, "{sa:?} {sb:?}: {e:e}");
        }
    }
    let ran = device::stats::gpu_bf16_products() - before;
    set_matmul_precision(MatmulPrecision::F32);
    device::set_gpu_min_work(device::GPU_MIN_WORK);
    device::set_device(Device::Cpu).unwrap();
    if !tensor_cores {
        assert_eq!(ran, 0, "bf16 products counted on a GPU without bf16 tensor cores");
        eprintln!("this GPU has no bf16 tensor cores: its products stayed f32");
        return;
    }
    assert_eq!(ran, layouts.len());

    // The transformer with bf16 products on the GPU (weights resident in
    // bf16) stays within bf16's rounding of the f32 forward on the CPU.
    let model = OnnxModel::load(root().join("models/test/transformer.onnx")).unwrap();
    let feed = transformer_feed(4);
    let forward = || {
        let mut split = AdaptedModel::new(&model, &transformer_split()).unwrap();
        let y = split.forward(&feed, false).unwrap();
        y.f32("y").unwrap().iter().copied().collect::<Vec<f32>>()
    };
    let f32_cpu = forward();
    set_matmul_precision(MatmulPrecision::Bf16);
    let (_, bf16_gpu, ran) = cpu_then_gpu_locked(|| {
        let before = device::stats::gpu_bf16_products();
        (forward(), device::stats::gpu_bf16_products() - before)
    });
    let e = rel_err(&f32_cpu, &bf16_gpu.0);
    eprintln!(
        "transformer, bf16 on the GPU: max rel |GPU − f32 CPU| {e:.2e} ({} bf16 of {ran} GPU products)",
        bf16_gpu.1
    );
    assert!(bf16_gpu.1 > 0, "no bf16 product on the GPU");
    assert!(e <= 3e-2, "bf16 GPU forward vs f32: {e:e}");
}

/// The CLI's `--device cuda` end to end: the demo trains, merges and checks
/// with every product on the GPU (`--gpu-min-work 0`: its products are
/// small) and bf16 asked for, and reports the device and the products.
#[cfg(feature = "cli")]
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn the_cli_runs_the_demo_on_the_gpu() {
    let o = common::run_target_binary(&cli_exe())
        .args(["--json", "--device", "cuda", "--gpu-min-work", "0", "--matmul-precision", "bf16"])
        .arg("demo")
        // The mock's fault file is this process's tests' business.
        .env_remove("MOCK_CUDA_FAULTS")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("panicked") && !err.contains("failed"), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["device"], "cuda:0", "{j}");
    assert!(j["accuracy_after"].as_f64().unwrap() > 0.85, "{j}");
    assert!(j["merge_max_abs_error"].as_f64().unwrap() < 1e-3, "{j}");
    assert!(j["gpu_products"].as_u64().unwrap() > 0, "{j}");
    // bf16 on the GPU unless the CLI said it has no bf16 tensor cores.
    if !err.contains("no bf16 tensor cores") {
        assert!(j["gpu_bf16_products"].as_u64().unwrap() > 0, "{j}\n{err}");
    }
    assert!(j["gpu_adapted_passes"].as_u64().unwrap() > 0, "{j}");
    assert!(j["gpu_optimizer_steps"].as_u64().unwrap() > 0, "{j}");
}

/// Where NVRTC is missing, a GPU run keeps the optimizer step on the CPU,
/// says so once, and trains as well: the CLI's demo with the mock's driver
/// and cuBLAS but not its NVRTC (mock-only: a real machine's NVRTC cannot
/// be hidden from a test).
#[cfg(feature = "cli")]
#[test]
fn without_nvrtc_the_optimizer_step_stays_on_the_cpu() {
    if std::env::var_os("MOCK_CUDA_FAULTS").is_none() {
        eprintln!("skipped: needs the mock GPU (targets/cuda-mock/run.sh)");
        return;
    }
    let libs = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let mock = libs
        .split(':')
        .map(PathBuf::from)
        .find(|d| d.join("libnvrtc.so").exists() && d.join("libcuda.so").exists())
        .expect("the mock's folder on LD_LIBRARY_PATH");
    let dir = std::env::temp_dir().join(format!("hydra-no-nvrtc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for lib in ["libcuda.so", "libcublas.so"] {
        let _ = std::fs::remove_file(dir.join(lib));
        std::os::unix::fs::symlink(mock.join(lib), dir.join(lib)).unwrap();
    }
    let o = common::run_target_binary(&cli_exe())
        .args(["--json", "--device", "cuda", "--gpu-min-work", "0", "demo"])
        .env("LD_LIBRARY_PATH", &dir)
        .env_remove("MOCK_CUDA_FAULTS")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let said = "the optimizer step stays on the CPU: NVRTC (libnvrtc.so) is not here";
    assert_eq!(err.matches(said).count(), 1, "{err}");
    assert!(!err.contains("panicked") && !err.contains("failed"), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["gpu_optimizer_steps"], 0, "{j}");
    assert!(j["gpu_adapted_passes"].as_u64().unwrap() > 0, "{j}");
    assert!(j["accuracy_after"].as_f64().unwrap() > 0.85, "{j}");
}

use half::f16;
use hydra_edge::hydra::{BranchConfig, HydraLinear, Input, Variant, Weights};

/// How an adapted layer's backward is asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Backward {
    /// `backward`: the forward kept its input, `dX` wanted.
    Full,
    /// `backward_params_only`: the first adapted layer, no `dX`.
    ParamsOnly,
    /// `backward_with_input`: the tape keeps the input, the adapter none.
    WithInput,
}

/// One adapted layer, forward and backward: `Y`, `dX` and every gradient.
#[allow(clippy::type_complexity)]
fn adapted_layer_pass(
    variant: Variant,
    bias: bool,
    half: bool,
    mode: Backward,
    (p_par, p_seq): (f32, f32),
) -> (Vec<f32>, Option<Vec<f32>>, Vec<Vec<f32>>, [u64; 4]) {
    let (n, din, dout) = (40, 48, 36);
    let mut rng = Rng::new(11);
    let mut v = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
    let (w0, b0, x, dy) = (v(dout * din), v(dout), v(n * din), v(n * dout));
    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let cfg = HydraConfig {
        variant,
        parallel: BranchConfig { rank: 4, scale: 0.5, dropout: p_par, bias },
        sequential: BranchConfig { rank: 3, scale: 2.0, dropout: p_seq, bias },
        seed: 3,
        ..HydraConfig::default()
    };
    let w = if half {
        Weights::F16(w0.iter().map(|&v| f16::from_f32(v)).collect())
    } else {
        Weights::F32(w0)
    };
    let mut h = HydraLinear::new(cfg, w, Some(b0), din, dout).unwrap();
    // Non-zero up-projections and biases, so that every part carries weight.
    for b in h.branches_mut() {
        b.tensors_mut().for_each(|t| {
            t.iter_mut().enumerate().for_each(|(i, v)| *v += 0.05 * ((i % 7) as f32 - 3.0))
        });
    }
    h.set_training(true);
    let input = if half { Input::F16(&xh) } else { Input::F32(&x) };
    let y = h.forward_ext(input, n, mode != Backward::WithInput, true).unwrap();
    let dx = match mode {
        Backward::Full => Some(h.backward(&dy).unwrap()),
        Backward::ParamsOnly => {
            h.backward_params_only(&dy).unwrap();
            None
        }
        Backward::WithInput => h.backward_with_input(&dy, input, true).unwrap(),
    };
    let (gp, gs) = h.grads();
    let grads = gp.into_iter().chain(gs).flat_map(|g| g.tensors().map(<[f32]>::to_vec)).collect();
    (y, dx, grads, h.rng().state())
}

/// Every Hydra variant's layer, with and without branch biases, f32 and f16
/// weights and input, with and without dropout, each way of asking for
/// backward: forward and backward run whole on the GPU (the frozen product
/// and the branches' low-rank products, masks and gradients:
/// `gpu_adapted_passes`) and give the CPU's `Y`, `dX` and gradients (the
/// same dropout masks: the layer's generator draws them either way).
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn adapted_layers_run_their_branches_on_the_gpu() {
    for variant in [Variant::Hydra, Variant::Lora, Variant::SeqLora] {
        for (bias, half) in [(false, false), (true, false), (true, true)] {
            for mode in [Backward::Full, Backward::ParamsOnly, Backward::WithInput] {
                for dropout in [(0.0, 0.0), (0.25, 0.25), (0.25, 0.0), (0.0, 0.25)] {
                    let case = format!("{variant:?} bias {bias} f16 {half} {mode:?} p {dropout:?}");
                    let _g = lock();
                    let passes = device::stats::gpu_adapted_passes();
                    let (cpu, gpu, ran) = cpu_then_gpu_locked(|| {
                        adapted_layer_pass(variant, bias, half, mode, dropout)
                    });
                    assert_eq!(device::stats::gpu_adapted_passes() - passes, 2, "{case}");
                    let frozen = if mode == Backward::ParamsOnly { 1 } else { 2 };
                    assert_eq!(ran, frozen, "{case}: the frozen products that ran");
                    let e = rel_err(&cpu.0, &gpu.0);
                    assert!(e <= 1e-5, "{case}: Y {e:e}");
                    assert_eq!(cpu.1.is_some(), gpu.1.is_some(), "{case}");
                    if let (Some(c), Some(g)) = (&cpu.1, &gpu.1) {
                        assert!(rel_err(c, g) <= 1e-5, "{case}: dX {:e}", rel_err(c, g));
                    }
                    assert_eq!(cpu.3, gpu.3, "{case}: the generator after the pass");
                    assert_eq!(cpu.2.len(), gpu.2.len());
                    for (i, (c, g)) in cpu.2.iter().zip(&gpu.2).enumerate() {
                        assert!(rel_err(c, g) <= 1e-5, "{case}: gradient {i} {:e}", rel_err(c, g));
                    }
                }
            }
        }
    }
}

/// Makes the mock fail the `nth` product or launch from now on (a fresh tag
/// each time, so that the count starts anew).
fn arm_fault(path: &std::ffi::OsStr, nth: usize) {
    static TAG: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    let tag = TAG.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::fs::write(path, format!("{tag} {nth}")).unwrap();
}

/// Fails the first CUDA call of `run`, then the second, … (each run with
/// one fault armed) until a run goes clean, past its last call. Each run
/// must do `units` units of GPU work (passes, steps: `done` counts them);
/// with a fault, exactly one of them fails (counted once) and is left to
/// the CPU, and the GPU stays in use. Returns how many calls were walked.
fn walk_faults(
    path: &std::ffi::OsStr,
    what: &str,
    done: fn() -> usize,
    units: usize,
    mut run: impl FnMut(usize),
) -> usize {
    for nth in 1.. {
        arm_fault(path, nth);
        let (fallbacks, before) = (device::stats::gpu_fallbacks(), done());
        run(nth);
        let failed = device::stats::gpu_fallbacks() - fallbacks;
        let on_gpu = done() - before;
        if failed == 0 {
            assert_eq!(on_gpu, units, "{what}: a clean run");
            std::fs::remove_file(path).unwrap();
            return nth - 1;
        }
        assert_eq!((failed, on_gpu), (1, units - 1), "{what}: fault at call {nth}");
        assert_eq!(device::device(), Device::Cuda(0), "one failure does not give the GPU up");
    }
    unreachable!()
}

/// Removes the mock's fault file when dropped.
struct Faults(std::ffi::OsString);

impl Drop for Faults {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A CUDA call that fails in the middle of an adapted layer's pass (the
/// mock's injected fault: `MOCK_CUDA_FAULTS`, set by `cuda-mock/run.sh`;
/// the test needs it and says so elsewhere) leaves nothing half-done: the
/// pass runs again whole on the CPU, the result is the CPU's, the failure
/// is counted, and the next pass is the GPU's again. Each allocation, copy
/// and product of the forward and of the backward fails in turn.
#[test]
fn a_gpu_failure_mid_pass_reruns_the_pass_on_the_cpu() {
    let Some(path) = std::env::var_os("MOCK_CUDA_FAULTS") else {
        eprintln!("skipped: needs the mock GPU's fault injection (targets/cuda-mock/run.sh)");
        return;
    };
    let _g = lock();
    let _restore = Restore;
    let _faults = Faults(path.clone());
    // With dropout on both branches: a failed pass's masks must be drawn
    // again, the same, by the CPU's rerun (the generator goes back).
    let pass = || adapted_layer_pass(Variant::Hydra, true, false, Backward::Full, (0.25, 0.25));
    device::set_device(Device::Cpu).unwrap();
    let cpu = pass();
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    let tried =
        walk_faults(&path, "a Hydra layer's passes", device::stats::gpu_adapted_passes, 2, |nth| {
            let gpu = pass();
            assert!(rel_err(&cpu.0, &gpu.0) <= 1e-5, "fault at call {nth}: Y");
            let (c, g) = (cpu.1.as_ref().unwrap(), gpu.1.as_ref().unwrap());
            assert!(rel_err(c, g) <= 1e-5, "fault at call {nth}: dX");
            for (c, g) in cpu.2.iter().zip(&gpu.2) {
                assert!(rel_err(c, g) <= 1e-5, "fault at call {nth}: gradients");
            }
            assert_eq!(cpu.3, gpu.3, "fault at call {nth}: the generator after the pass");
        });
    // 23 products (forward: the bias, the frozen product, each branch's four
    // with c and e; backward: each branch's five, dY0, the frozen product
    // and dX's parallel part), each with its allocations and copies.
    assert!(tried > 23, "only {tried} CUDA calls in a Hydra layer's forward and backward");
    eprintln!("injected faults: {tried} CUDA calls, each pass rerun on the CPU");
}

/// A layer's resident `W0` is freed when the device changes (to the CPU, or
/// a GPU opened anew), not kept until the layer's next product.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn a_change_of_device_frees_the_resident_weights() {
    let _g = lock();
    let _restore = Restore;
    let (n, din, dout) = (8, 16, 12);
    let w0: Vec<f32> = (0..din * dout).map(|i| (i % 5) as f32 - 2.0).collect();
    let x: Vec<f32> = (0..n * din).map(|i| (i % 3) as f32).collect();
    let mut h =
        HydraLinear::new(HydraConfig::default(), Weights::F32(w0), None, din, dout).unwrap();
    for switch in [Device::Cpu, Device::Cuda(0)] {
        device::set_device(Device::Cuda(0)).unwrap();
        device::set_gpu_min_work(0);
        h.forward_ext(Input::F32(&x), n, false, false).unwrap();
        assert_eq!(h.gpu_bytes(), din * dout * 4, "one f32 copy of W0 on the GPU");
        device::set_device(switch).unwrap();
        assert_eq!(h.gpu_bytes(), 0, "freed by the switch to {switch}");
    }
}

/// What crosses the bus for one adapted layer (both branches): the forward
/// sends `X` and the branch tensors up once (and `W0` on first use) and
/// brings `Y`, `Y0` and the `U`s back; the backward after it sends only
/// `dY`, the `U`s and the branch tensors — `X` and `Y0` stayed on the GPU —
/// and brings back `dX` and the gradients. Counted by
/// `stats::gpu_bytes_up` / `gpu_bytes_down`, to the byte.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn an_adapted_backward_sends_only_dy_up() {
    let _g = lock();
    let _restore = Restore;
    for dropout in [0.0, 0.25] {
        for half in [false, true] {
            adapted_traffic(dropout, half);
        }
    }
}

/// [`an_adapted_backward_sends_only_dy_up`] with dropout `p` on both
/// branches: the masks go up with the forward and stay for the backward.
/// f16 weights (`half`) go up and stay as f16: half the bytes.
fn adapted_traffic(p: f32, half: bool) {
    let (n, din, dout, rp, rs) = (24, 40, 28, 4, 3);
    let cfg = HydraConfig {
        parallel: BranchConfig { rank: rp, dropout: p, ..BranchConfig::default() },
        sequential: BranchConfig { rank: rs, dropout: p, ..BranchConfig::default() },
        ..HydraConfig::default()
    };
    let w0: Vec<f32> = (0..din * dout).map(|i| ((i % 9) as f32 - 4.0) / 8.0).collect();
    let x: Vec<f32> = (0..n * din).map(|i| ((i % 7) as f32 - 3.0) / 4.0).collect();
    let dy: Vec<f32> = (0..n * dout).map(|i| ((i % 5) as f32 - 2.0) / 4.0).collect();
    // (Values exact in f16.)
    let (w, w_bytes) = if half {
        (Weights::F16(w0.iter().map(|&v| f16::from_f32(v)).collect()), 2)
    } else {
        (Weights::F32(w0), 4)
    };
    let mut h = HydraLinear::new(cfg, w, None, din, dout).unwrap();
    h.set_training(true);
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    let traffic = |f: &mut dyn FnMut()| {
        let (up, down) = (device::stats::gpu_bytes_up(), device::stats::gpu_bytes_down());
        f();
        (device::stats::gpu_bytes_up() - up, device::stats::gpu_bytes_down() - down)
    };
    let branches = 4 * (rp * din + dout * rp + rs * dout + dout * rs);
    let us = 4 * n * (rp + rs);
    let masks = if p > 0.0 { 4 * n * (din + dout) } else { 0 };
    // The first forward uploads W0 and the column of ones as well.
    let first = traffic(&mut || drop(h.forward_ext(Input::F32(&x), n, false, true).unwrap()));
    assert_eq!(
        first.0,
        w_bytes * din * dout + 4 * (n + n * din) + branches + masks,
        "p {p}, f16 {half}"
    );
    assert_eq!(h.gpu_bytes(), w_bytes * din * dout, "f16 {half}: W0 on the GPU");
    h.backward_with_input(&dy, Input::F32(&x), true).unwrap();
    let fwd = traffic(&mut || drop(h.forward_ext(Input::F32(&x), n, false, true).unwrap()));
    assert_eq!(
        fwd,
        (4 * n * din + branches + masks, 4 * 2 * n * dout + us),
        "forward, p {p}, f16 {half}"
    );
    let mut dx = None;
    let bwd = traffic(&mut || dx = h.backward_with_input(&dy, Input::F32(&x), true).unwrap());
    assert_eq!(bwd.0, 4 * n * dout + us + branches, "backward, p {p}: only dY, the Us, A, B go up");
    assert_eq!(bwd.1, 4 * n * din + branches, "backward, p {p}: dX and the gradients come back");
    assert_eq!(dx.map(|d| d.len()), Some(n * din));
}

use hydra_edge::train::optim::{Optimizer, OptimizerKind};

/// `steps` updates of tensors of odd lengths (one past the kernel's
/// 1024 × 256 threads, so its loop strides) by `kind`, with a restore of
/// other moments after `restore_at` steps; the parameters and moments after.
fn optimizer_run(kind: OptimizerKind, steps: usize, restore_at: usize) -> Vec<Vec<f32>> {
    optimizer_run_with_cpu_step(kind, steps, restore_at, usize::MAX)
}

/// [`optimizer_run`] with step `cpu_at` kept off the GPU (under the size
/// threshold), the others sent there (`set_gpu_min_work(0)`).
fn optimizer_run_with_cpu_step(
    kind: OptimizerKind,
    steps: usize,
    restore_at: usize,
    cpu_at: usize,
) -> Vec<Vec<f32>> {
    let lens = [3, 1000, 300_001];
    let mut rng = Rng::new(21);
    let mut params: Vec<Vec<f32>> =
        lens.iter().map(|&n| (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect()).collect();
    let mut opt = Optimizer::new(kind, 0.01, &lens);
    for step in 0..steps {
        let grads: Vec<Vec<f32>> =
            lens.iter().map(|&n| (0..n).map(|_| rng.uniform(-0.1, 0.1)).collect()).collect();
        if step == restore_at {
            let (m, v) = opt.state();
            let scaled = |t: &[Vec<f32>]| -> Vec<Vec<f32>> {
                t.iter().map(|x| x.iter().map(|v| v * 0.5).collect()).collect()
            };
            let (m, v) = (scaled(m), scaled(v));
            assert!(opt.restore(m, v, opt.steps()));
        }
        let mut refs: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        if step == cpu_at {
            device::set_gpu_min_work(usize::MAX);
            opt.step(&mut refs, &g, 1e-2);
            device::set_gpu_min_work(0);
        } else {
            opt.step(&mut refs, &g, 1e-2);
        }
    }
    let (m, v) = opt.state();
    params.into_iter().chain(m.iter().cloned()).chain(v.iter().cloned()).collect()
}

/// AdamW (with decoupled decay) and SGD with momentum on the GPU — NVRTC's
/// kernels, the moments kept there between steps, a restore of other
/// moments midway — give the CPU's parameters and moments bit for bit
/// (`--fmad=false`, IEEE division and square root).
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn optimizer_steps_on_the_gpu_are_the_cpus_bit_for_bit() {
    for kind in [OptimizerKind::default(), OptimizerKind::Sgd { momentum: 0.9 }] {
        let _g = lock();
        let steps = device::stats::gpu_optimizer_steps();
        let (cpu, gpu, _) = cpu_then_gpu_locked(|| optimizer_run(kind, 6, 3));
        assert_eq!(
            device::stats::gpu_optimizer_steps() - steps,
            6,
            "{kind:?}: every step on the GPU"
        );
        for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            let differ = c.iter().zip(g).filter(|(c, g)| c.to_bits() != g.to_bits()).count();
            assert_eq!(differ, 0, "{kind:?}: tensor {i}: {differ} values differ from the CPU's");
        }
    }
}

/// A step the GPU does not take (here: under the size threshold) changes
/// the host's moments, so the GPU's cached copy is dropped and the next GPU
/// step sends the host's up: the run stays the CPU's, bit for bit.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn a_cpu_step_between_gpu_steps_refreshes_the_gpus_moments() {
    let _g = lock();
    let steps = device::stats::gpu_optimizer_steps();
    let kind = OptimizerKind::default();
    let (cpu, gpu, _) = cpu_then_gpu_locked(|| optimizer_run_with_cpu_step(kind, 4, 99, 1));
    assert_eq!(device::stats::gpu_optimizer_steps() - steps, 3, "steps 0, 2, 3 on the GPU");
    for (c, g) in cpu.iter().zip(&gpu) {
        assert!(c.iter().zip(g).all(|(c, g)| c.to_bits() == g.to_bits()));
    }
}

/// A CUDA call that fails during an optimizer step on the GPU (the mock's
/// injected fault, as in `a_gpu_failure_mid_pass_reruns_the_pass_on_the_cpu`:
/// each upload, allocation, the launch and each download in turn) leaves
/// that step to the CPU with the host's state untouched by the GPU's half:
/// the run ends as the CPU's, bit for bit, and the other steps stay on the
/// GPU (the moments sent up anew after the failed one).
#[test]
fn a_failed_optimizer_step_on_the_gpu_runs_on_the_cpu() {
    let Some(path) = std::env::var_os("MOCK_CUDA_FAULTS") else {
        eprintln!("skipped: needs the mock GPU's fault injection (targets/cuda-mock/run.sh)");
        return;
    };
    let _g = lock();
    let _restore = Restore;
    let _faults = Faults(path.clone());
    let kind = OptimizerKind::default();
    device::set_device(Device::Cpu).unwrap();
    let cpu = optimizer_run(kind, 3, 99);
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    let tried =
        walk_faults(&path, "optimizer steps", device::stats::gpu_optimizer_steps, 3, |nth| {
            let gpu = optimizer_run(kind, 3, 99);
            for (c, g) in cpu.iter().zip(&gpu) {
                let same = c.iter().zip(g).all(|(c, g)| c.to_bits() == g.to_bits());
                assert!(same, "fault at call {nth}: the run differs from the CPU's");
            }
        });
    // Three steps: each uploads P and G, the first (and the one after a
    // failure) the moments, launches, and brings P, m, v back.
    assert!(tried >= 3 * 6, "only {tried} CUDA calls in three optimizer steps");
    eprintln!("injected optimizer faults: {tried} CUDA calls, each step rerun on the CPU");
}

/// A forward on the GPU, then a change of device before the backward (to
/// the CPU, or the GPU opened anew): the backward takes the host's copies
/// of what the forward kept — not the first GPU's — and its gradients and
/// `dX` are those of a pass on the CPU alone.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn a_backward_after_a_change_of_device_uses_the_hosts_copies() {
    let _g = lock();
    let _restore = Restore;
    let (n, din, dout) = (16, 24, 20);
    let w0: Vec<f32> = (0..din * dout).map(|i| ((i % 11) as f32 - 5.0) / 8.0).collect();
    let x: Vec<f32> = (0..n * din).map(|i| ((i % 7) as f32 - 3.0) / 4.0).collect();
    let dy: Vec<f32> = (0..n * dout).map(|i| ((i % 5) as f32 - 2.0) / 4.0).collect();
    let pass = |switch: Option<Device>| {
        let mut h =
            HydraLinear::new(HydraConfig::default(), Weights::F32(w0.clone()), None, din, dout)
                .unwrap();
        for b in h.branches_mut() {
            b.tensors_mut().for_each(|t| t.iter_mut().for_each(|v| *v += 0.1));
        }
        let y = h.forward(Input::F32(&x), n).unwrap();
        if let Some(d) = switch {
            device::set_device(d).unwrap();
            device::set_gpu_min_work(0);
        }
        let dx = h.backward(&dy).unwrap();
        let (gp, gs) = h.grads();
        let g: Vec<Vec<f32>> =
            gp.into_iter().chain(gs).flat_map(|g| g.tensors().map(<[f32]>::to_vec)).collect();
        (y, dx, g)
    };
    device::set_device(Device::Cpu).unwrap();
    let cpu = pass(None);
    for switch in [Device::Cpu, Device::Cuda(0)] {
        device::set_device(Device::Cuda(0)).unwrap();
        device::set_gpu_min_work(0);
        let passes = device::stats::gpu_adapted_passes();
        let got = pass(Some(switch));
        let on_gpu = device::stats::gpu_adapted_passes() - passes;
        assert_eq!(on_gpu, if switch == Device::Cpu { 1 } else { 2 }, "{switch}");
        assert!(rel_err(&cpu.0, &got.0) <= 1e-5, "{switch}: Y");
        assert!(rel_err(&cpu.1, &got.1) <= 1e-5, "{switch}: dX");
        for (c, g) in cpu.2.iter().zip(&got.2) {
            assert!(rel_err(c, g) <= 1e-5, "{switch}: gradients");
        }
    }
}

/// An adapted layer's pass with bf16 products on the GPU: the frozen
/// products (forward `X·W0ᵀ`, backward `dY0·W0`, `dY0` rounded after the
/// sequential branch's part is added) take bf16 operands where the GPU has
/// tensor cores, the low-rank products stay f32. Against the CPU's f32 pass:
/// within bf16's rounding (2⁻⁸ per operand), and not equal to it (the
/// rounding happened); on a GPU without tensor cores, the f32 result.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn adapted_layers_with_bf16_products_on_the_gpu() {
    use hydra_edge::runtime::{MatmulPrecision, set_matmul_precision};
    let _g = lock();
    let _restore = Restore;
    for dropout in [0.0, 0.25] {
        device::set_device(Device::Cpu).unwrap();
        set_matmul_precision(MatmulPrecision::F32);
        let cpu =
            adapted_layer_pass(Variant::Hydra, true, false, Backward::Full, (dropout, dropout));
        device::set_device(Device::Cuda(0)).unwrap();
        device::set_gpu_min_work(0);
        set_matmul_precision(MatmulPrecision::Bf16);
        let (bf16, passes) =
            (device::stats::gpu_bf16_products(), device::stats::gpu_adapted_passes());
        let fallbacks = device::stats::gpu_fallbacks();
        let gpu =
            adapted_layer_pass(Variant::Hydra, true, false, Backward::Full, (dropout, dropout));
        assert_eq!(device::stats::gpu_fallbacks(), fallbacks, "a CUDA call failed");
        assert_eq!(device::stats::gpu_adapted_passes() - passes, 2);
        let tensor_cores = device::gpu_bf16();
        let rounded = device::stats::gpu_bf16_products() - bf16;
        assert_eq!(rounded, if tensor_cores { 2 } else { 0 }, "p {dropout}");
        let mut errs = vec![
            rel_err(&cpu.0, &gpu.0),
            rel_err(cpu.1.as_ref().unwrap(), gpu.1.as_ref().unwrap()),
        ];
        errs.extend(cpu.2.iter().zip(&gpu.2).map(|(c, g)| rel_err(c, g)));
        let worst = errs.iter().copied().fold(0.0f32, f32::max);
        eprintln!(
            "adapted layer, bf16 on the GPU (p {dropout}): max rel |GPU − f32 CPU| {worst:.2e}"
        );
        if tensor_cores {
            assert!(worst <= 2e-2 && worst > 1e-6, "p {dropout}: {errs:?}");
        } else {
            assert!(worst <= 1e-5, "p {dropout}: {errs:?}");
        }
        set_matmul_precision(MatmulPrecision::F32);
    }
}

/// The test transformer (with ONNX LayerNormalization) from its first
/// block's attention output on, that layer and the block's second FFN
/// layer adapted (the MiniLM recipe's shape): the rest stays frozen, so
/// values can stay on the GPU from the residual Add through the norm, the
/// frozen layers and GELU, into the next block's q, k and v.
fn resident_split(dropout: f32) -> SplitConfig {
    let mut adapter = HydraConfig { seed: 4, ..HydraConfig::default() };
    adapter.parallel.dropout = dropout;
    adapter.sequential.dropout = dropout;
    SplitConfig {
        targets: Targets::Patterns(vec!["block0/attn/out".into(), "block0/ffn/fc2".into()]),
        output: Some("logits".into()),
        adapter,
        ..SplitConfig::default()
    }
}

/// One forward and backward of [`resident_split`]: the output, every
/// gradient, and the adapters' generators after it.
fn resident_pass(model: &OnnxModel, dropout: f32) -> (Vec<f32>, Vec<Vec<f32>>, Vec<[u64; 4]>) {
    let mut split = AdaptedModel::new(model, &resident_split(dropout)).unwrap();
    split.params_and_grads().0.iter_mut().for_each(|p| {
        p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * ((i % 7) as f32 - 3.0))
    });
    split.zero_grad();
    let y = split.forward(&transformer_feed(4), true).unwrap();
    let y = y.f32("y").unwrap().clone();
    split.backward(y.mapv(|v| v.sin())).unwrap();
    let grads = split.params_and_grads().1.iter().map(|g| g.to_vec()).collect();
    let rngs = split.tail().adapters().map(|(_, a)| a.rng().state()).collect();
    (y.iter().copied().collect(), grads, rngs)
}

fn assert_same_pass(
    what: &str,
    cpu: &(Vec<f32>, Vec<Vec<f32>>, Vec<[u64; 4]>),
    gpu: &(Vec<f32>, Vec<Vec<f32>>, Vec<[u64; 4]>),
) {
    let e = rel_err(&cpu.0, &gpu.0);
    assert!(e <= 1e-5, "{what}: output, GPU vs CPU {e:e}");
    assert_eq!(cpu.1.len(), gpu.1.len());
    for (i, (c, g)) in cpu.1.iter().zip(&gpu.1).enumerate() {
        let e = rel_err(c, g);
        assert!(e <= 1e-4, "{what}: gradient {i}, GPU vs CPU {e:e}");
    }
    assert_eq!(cpu.2, gpu.2, "{what}: the generators after the pass");
}

/// With the tail's values resident on the GPU, the residual Adds, the
/// norms, GELU and the frozen layers run there forward and backward
/// (`gpu_tail_ops`), the result is the CPU's, and less crosses the bus
/// than with every product sending its operands up and its result back
/// (`set_resident_tail(false)`, the baseline).
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn the_tails_values_stay_on_the_gpu_between_its_ops() {
    let model = OnnxModel::load(root().join("models/test/transformer_ln17.onnx")).unwrap();
    let ops: Vec<String> = AdaptedModel::new(&model, &resident_split(0.0))
        .unwrap()
        .tail()
        .ops()
        .iter()
        .map(|(t, _)| t.to_string())
        .collect();
    for want in ["LayerNormalization", "Gelu", "Add"] {
        assert!(ops.iter().any(|o| o == want), "the tail has no {want}: {ops:?}");
    }
    let _g = lock();
    let _restore = Restore;
    device::set_device(Device::Cpu).unwrap();
    let cpu = resident_pass(&model, 0.1);
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    let (fallbacks, reruns) = (device::stats::gpu_fallbacks(), device::stats::gpu_tail_reruns());
    let traffic = || device::stats::gpu_bytes_up() + device::stats::gpu_bytes_down();
    let mut bytes = [0usize; 2];
    for (k, resident) in [false, true].into_iter().enumerate() {
        device::set_resident_tail(resident);
        let (ops, moved) = (device::stats::gpu_tail_ops(), traffic());
        let passes = device::stats::gpu_adapted_passes();
        let gpu = resident_pass(&model, 0.1);
        let (ops, moved) = (device::stats::gpu_tail_ops() - ops, traffic() - moved);
        let passes = device::stats::gpu_adapted_passes() - passes;
        assert_same_pass(&format!("resident {resident}"), &cpu, &gpu);
        bytes[k] = moved;
        // Both adapted layers' passes, forward and backward, on the GPU.
        assert_eq!(passes, 4, "resident {resident}: adapted passes on the GPU");
        if resident {
            // Forward: residual Add, norm, GELU, residual Add, norm (the
            // frozen layer counts as a product); backward: the same.
            assert!(ops >= 8, "only {ops} element-wise ops and norms ran on the GPU");
        } else {
            assert_eq!(ops, 0, "the baseline ran element-wise ops on the GPU");
        }
        eprintln!("resident {resident}: {ops} tail ops on the GPU, {moved} bytes across");
    }
    assert_eq!(device::stats::gpu_fallbacks(), fallbacks, "a CUDA call failed");
    assert_eq!(device::stats::gpu_tail_reruns(), reruns, "a pass fell back to the CPU");
    // 0.33 with attention on the GPU too (0.63 without it, 0.82 with the
    // adapted layers' values going through the host).
    assert!(
        bytes[1] * 100 < bytes[0] * 40,
        "resident values moved {} bytes, the baseline {}",
        bytes[1],
        bytes[0]
    );
    eprintln!(
        "tail traffic, resident ÷ per product: {:.2} ({} vs {} bytes)",
        bytes[1] as f64 / bytes[0] as f64,
        bytes[1],
        bytes[0]
    );
}

/// A CUDA call that fails anywhere in a forward or backward with values
/// resident on the GPU loses nothing: the tail runs both again on the CPU
/// (the gradients put back, the adapters' generators too, so dropout draws
/// the same masks), the result is the CPU's, and the next pass uses the GPU
/// again. Each CUDA call of the pass fails in turn.
#[test]
fn a_gpu_failure_with_resident_values_reruns_the_tail_on_the_cpu() {
    let Some(path) = std::env::var_os("MOCK_CUDA_FAULTS") else {
        eprintln!("skipped: needs the mock GPU's fault injection (targets/cuda-mock/run.sh)");
        return;
    };
    let model = OnnxModel::load(root().join("models/test/transformer_ln17.onnx")).unwrap();
    let _g = lock();
    let _restore = Restore;
    let _faults = Faults(path.clone());
    device::set_device(Device::Cpu).unwrap();
    let cpu = resident_pass(&model, 0.1);
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    // Compile the kernels before faults are armed.
    let _ = resident_pass(&model, 0.1);
    let (mut walked, reruns) = (0, device::stats::gpu_tail_reruns());
    for nth in 1.. {
        arm_fault(&path, nth);
        let (fallbacks, ops) = (device::stats::gpu_fallbacks(), device::stats::gpu_tail_ops());
        let gpu = resident_pass(&model, 0.1);
        assert_same_pass(&format!("fault at call {nth}"), &cpu, &gpu);
        assert_eq!(device::device(), Device::Cuda(0), "one failure does not give the GPU up");
        if device::stats::gpu_fallbacks() == fallbacks {
            assert!(device::stats::gpu_tail_ops() > ops, "a clean pass ran no tail op on the GPU");
            std::fs::remove_file(&path).unwrap();
            break;
        }
        walked = nth;
    }
    // Faults in the resident ops and adapted passes rerun the tail (those
    // in the optimizer or the head's products, that step or product).
    let reruns = device::stats::gpu_tail_reruns() - reruns;
    assert!(reruns > 30, "only {reruns} tail reruns");
    assert!(walked > 300, "only {walked} CUDA calls in a resident tail's forward and backward");
    eprintln!(
        "injected resident faults: {walked} CUDA calls ({reruns} tail reruns), each pass rerun on the CPU"
    );
}

/// A change of device between a forward on resident values and its
/// backward loses nothing: the backward finds its values' GPU gone and
/// runs the pass again on the CPU, with the CPU's result.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn a_device_change_between_a_resident_forward_and_its_backward_reruns_on_the_cpu() {
    let model = OnnxModel::load(root().join("models/test/transformer_ln17.onnx")).unwrap();
    let _g = lock();
    let _restore = Restore;
    device::set_device(Device::Cpu).unwrap();
    let cpu = resident_pass(&model, 0.1);
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    let mut split = AdaptedModel::new(&model, &resident_split(0.1)).unwrap();
    split.params_and_grads().0.iter_mut().for_each(|p| {
        p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * ((i % 7) as f32 - 3.0))
    });
    split.zero_grad();
    let (ops, reruns) = (device::stats::gpu_tail_ops(), device::stats::gpu_tail_reruns());
    let y = split.forward(&transformer_feed(4), true).unwrap();
    assert!(device::stats::gpu_tail_ops() > ops, "the forward ran nothing on the GPU");
    device::set_device(Device::Cpu).unwrap();
    let y = y.f32("y").unwrap().clone();
    split.backward(y.mapv(|v| v.sin())).unwrap();
    assert_eq!(device::stats::gpu_tail_reruns() - reruns, 1, "the backward reran the pass");
    let grads: Vec<Vec<f32>> = split.params_and_grads().1.iter().map(|g| g.to_vec()).collect();
    let rngs = split.tail().adapters().map(|(_, a)| a.rng().state()).collect();
    assert_same_pass("device changed", &cpu, &(y.iter().copied().collect(), grads, rngs));
}

use hydra_edge::model::{CacheConfig, CacheDtype, Samples};

/// Ten transformer inputs (sample `i`'s values from its own seed).
struct Feeds;

impl Samples for Feeds {
    fn len(&self) -> usize {
        10
    }

    fn feed(&self, idx: &[usize]) -> Feed {
        let (mut x, mut mask) = (Vec::new(), Vec::new());
        for &i in idx {
            let mut rng = Rng::new(100 + i as u64);
            x.extend((0..8 * 32).map(|_| rng.uniform(-1.0, 1.0)));
            mask.extend((0..8).map(|j| if j < 4 + i % 4 { 1.0f32 } else { 0.0 }));
        }
        let b = idx.len();
        let mut f = Feed::new();
        f.insert("x".into(), Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[b, 8, 32]), x).unwrap()));
        f.insert("mask".into(), Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[b, 8]), mask).unwrap()));
        f
    }

    fn id(&self) -> u64 {
        0xfeed
    }
}

/// Each batch's output and gradients, and the bytes sent up for it.
type CachedPass = (Vec<f32>, Vec<Vec<f32>>, usize);

/// Three forward and backward passes of [`resident_split`] (dropout on)
/// on batches from the feature cache (`dtype`, `gpu_budget`), the last
/// batch after a CPU batch when `switch` (the device set to the CPU and
/// back): each pass's result and how many boundary tensors came on the GPU.
fn cached_passes(
    model: &OnnxModel,
    dtype: CacheDtype,
    gpu_budget: usize,
    switch: bool,
) -> (Vec<CachedPass>, usize, usize) {
    let mut split = AdaptedModel::new(model, &resident_split(0.1)).unwrap();
    split.params_and_grads().0.iter_mut().for_each(|p| {
        p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * ((i % 7) as f32 - 3.0))
    });
    let cache = CacheConfig { dtype, gpu_budget, ..CacheConfig::default() };
    let (mut out, mut on_gpu, mut gpu_bytes) = (Vec::new(), 0, 0);
    for (k, idx) in [&[0usize, 1, 2, 3][..], &[4, 5, 6], &[7, 2, 9, 5]].into_iter().enumerate() {
        if switch && k == 2 {
            let gpu = device::device();
            device::set_device(Device::Cpu).unwrap();
            assert_eq!(split.cache_gpu_bytes(), 0, "the change of device freed the GPU's copy");
            split.boundary_batch(&Feeds, &[8], &cache, 4).unwrap();
            device::set_device(gpu).unwrap();
        }
        let up = device::stats::gpu_bytes_up();
        split.zero_grad();
        let b = split.boundary_batch(&Feeds, idx, &cache, 4).unwrap();
        on_gpu += b.on_gpu();
        let y = split.predict_batch(b, true).unwrap();
        split.backward_prediction(y.mapv(|v| v.sin())).unwrap();
        let grads = split.params_and_grads().1.iter().map(|g| g.to_vec()).collect();
        gpu_bytes = gpu_bytes.max(split.cache_gpu_bytes());
        out.push((y.iter().copied().collect(), grads, device::stats::gpu_bytes_up() - up));
    }
    (out, on_gpu, gpu_bytes)
}

/// A feature cache that fits stays on the GPU: it goes up once (again only
/// after the device changed), each batch's boundary tensors are gathered
/// there (f16 records widened exactly, or f32), so a batch sends up less
/// than with the cache on the host, and the results are the CPU's. A
/// budget it does not fit (or 0) keeps it on the host, with the same
/// results.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn a_feature_cache_that_fits_stays_on_the_gpu() {
    let model = OnnxModel::load(root().join("models/test/transformer_ln17.onnx")).unwrap();
    let _g = lock();
    let _restore = Restore;
    for dtype in [CacheDtype::F16, CacheDtype::F32] {
        device::set_device(Device::Cpu).unwrap();
        let (cpu, on_gpu, _) = cached_passes(&model, dtype, 256 << 20, false);
        assert_eq!(on_gpu, 0, "{dtype:?}: boundary tensors on a GPU not in use");
        device::set_device(Device::Cuda(0)).unwrap();
        device::set_gpu_min_work(0);
        let fallbacks = device::stats::gpu_fallbacks();
        let mut up = Vec::new();
        for (budget, switch) in [(0, false), (64, false), (256 << 20, false), (256 << 20, true)] {
            let what = format!("{dtype:?}, budget {budget}, switch {switch}");
            let (uploads, gathers) =
                (device::stats::gpu_cache_uploads(), device::stats::gpu_cache_gathers());
            let (gpu, on_gpu, gpu_bytes) = cached_passes(&model, dtype, budget, switch);
            let (uploads, gathers) = (
                device::stats::gpu_cache_uploads() - uploads,
                device::stats::gpu_cache_gathers() - gathers,
            );
            for (k, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
                let e = rel_err(&c.0, &g.0);
                assert!(e <= 1e-5, "{what}: batch {k}'s output, GPU vs CPU {e:e}");
                for (i, (c, g)) in c.1.iter().zip(&g.1).enumerate() {
                    let e = rel_err(c, g);
                    assert!(e <= 1e-4, "{what}: batch {k}'s gradient {i}, GPU vs CPU {e:e}");
                }
            }
            assert_eq!(gathers, on_gpu, "{what}: every tensor on the GPU was gathered there");
            if budget < 1 << 20 {
                assert_eq!((uploads, on_gpu, gpu_bytes), (0, 0, 0), "{what}: does not fit");
            } else {
                assert!(on_gpu >= 3, "{what}: only {on_gpu} boundary tensors on the GPU");
                assert_eq!(uploads, 1 + usize::from(switch), "{what}: uploads of the cache");
                // 10 samples' records (f16 or f32).
                assert!(gpu_bytes > 0, "{what}: nothing kept on the GPU");
            }
            eprintln!(
                "{what}: {on_gpu} boundary tensors gathered on the GPU, {} bytes kept; bytes up per batch {:?}",
                gpu_bytes,
                gpu.iter().map(|p| p.2).collect::<Vec<_>>()
            );
            up.push(gpu.iter().map(|p| p.2).collect::<Vec<_>>());
        }
        // The second batch (the cache already up): its features no longer go up.
        assert!(up[2][1] < up[0][1], "{dtype:?}: batch bytes up {} vs {}", up[2][1], up[0][1]);
        assert_eq!(device::stats::gpu_fallbacks(), fallbacks, "{dtype:?}: a CUDA call failed");
    }
}

/// A CUDA call that fails while the feature cache goes up to the GPU, or
/// while a batch is gathered there, loses nothing: those tensors come from
/// the host (the failure counted once), the pass gives the CPU's result,
/// and the next batch is gathered on the GPU. Each CUDA call of the first
/// batch's gathering fails in turn.
#[test]
fn a_gpu_failure_while_gathering_from_the_cache_leaves_the_batch_to_the_host() {
    let Some(path) = std::env::var_os("MOCK_CUDA_FAULTS") else {
        eprintln!("skipped: needs the mock GPU's fault injection (targets/cuda-mock/run.sh)");
        return;
    };
    let model = OnnxModel::load(root().join("models/test/transformer_ln17.onnx")).unwrap();
    let _g = lock();
    let _restore = Restore;
    let _faults = Faults(path.clone());
    let cache = CacheConfig::default();
    let fresh = || {
        let mut split = AdaptedModel::new(&model, &resident_split(0.1)).unwrap();
        split.params_and_grads().0.iter_mut().for_each(|p| {
            p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * ((i % 7) as f32 - 3.0))
        });
        split
    };
    let pass = |split: &mut AdaptedModel, idx: &[usize], fault: Option<usize>| {
        split.zero_grad();
        if let Some(nth) = fault {
            arm_fault(&path, nth);
        }
        let b = split.boundary_batch(&Feeds, idx, &cache, 4).unwrap();
        let _ = std::fs::remove_file(&path);
        let on_gpu = b.on_gpu();
        let y = split.predict_batch(b, true).unwrap();
        split.backward_prediction(y.mapv(|v| v.sin())).unwrap();
        let grads: Vec<Vec<f32>> = split.params_and_grads().1.iter().map(|g| g.to_vec()).collect();
        (y.iter().copied().collect::<Vec<f32>>(), grads, on_gpu)
    };
    let same =
        |what: &str, c: &(Vec<f32>, Vec<Vec<f32>>, usize), g: &(Vec<f32>, Vec<Vec<f32>>, usize)| {
            assert!(rel_err(&c.0, &g.0) <= 1e-5, "{what}: output {:e}", rel_err(&c.0, &g.0));
            for (i, (c, g)) in c.1.iter().zip(&g.1).enumerate() {
                assert!(rel_err(c, g) <= 1e-4, "{what}: gradient {i} {:e}", rel_err(c, g));
            }
        };
    let (first, second) = (&[0usize, 1, 2, 3][..], &[4usize, 5, 6][..]);
    device::set_device(Device::Cpu).unwrap();
    let mut split = fresh();
    let cpu = (pass(&mut split, first, None), pass(&mut split, second, None));
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    // Compile the kernels before faults are armed.
    let clean = pass(&mut fresh(), first, None).2;
    assert!(clean > 0, "no boundary tensor gathered on the GPU");
    let mut walked = 0;
    for nth in 1.. {
        let mut split = fresh();
        let fallbacks = device::stats::gpu_fallbacks();
        let one = pass(&mut split, first, Some(nth));
        let failed = device::stats::gpu_fallbacks() - fallbacks;
        let two = pass(&mut split, second, None);
        same(&format!("fault at call {nth}, first batch"), &cpu.0, &one);
        same(&format!("fault at call {nth}, second batch"), &cpu.1, &two);
        assert_eq!(two.2, clean, "fault at call {nth}: the next batch is gathered on the GPU");
        assert_eq!(device::device(), Device::Cuda(0), "one failure does not give the GPU up");
        if failed == 0 {
            assert_eq!(one.2, clean, "a clean batch");
            break;
        }
        assert_eq!(failed, 1, "fault at call {nth}: failures counted");
        assert!(one.2 < clean, "fault at call {nth}: a failed gather still gave a GPU value");
        walked = nth;
    }
    // The upload's allocation and copy, and each gather's.
    assert!(walked >= 2 + 2 * clean, "only {walked} CUDA calls in a batch's gathering");
    eprintln!("injected cache faults: {walked} CUDA calls, each leaving tensors to the host");
}

/// Every f16 bit pattern, 64 to a sample (the digits model's input width),
/// as f32.
struct AllHalves;

impl Samples for AllHalves {
    fn len(&self) -> usize {
        1 << 10
    }

    fn feed(&self, idx: &[usize]) -> Feed {
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| (0..64).map(move |j| f16::from_bits((i * 64 + j) as u16).to_f32()))
            .collect();
        let mut f = Feed::new();
        f.insert(
            "x".into(),
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[idx.len(), 64]), x).unwrap()),
        );
        f
    }

    fn id(&self) -> u64 {
        0xf16
    }
}

/// The GPU's gather from the feature cache widens every f16 exactly as the
/// host does (zeros, subnormals, normals, infinities; NaN stays NaN), and
/// gives f32 records back bit for bit: the digits model with every layer
/// adapted has its input as the boundary, so the cache holds the samples'
/// values themselves.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn the_gpu_gathers_every_f16_and_f32_value_exactly() {
    let model = OnnxModel::load(root().join("models/digits/digits_mlp.onnx")).unwrap();
    let _g = lock();
    let _restore = Restore;
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    let cfg = SplitConfig { targets: Targets::AllLinear, ..SplitConfig::default() };
    let mut split = AdaptedModel::new(&model, &cfg).unwrap();
    // Every sample, in an order that is not the records' (a batch reads
    // records all over the cache).
    let order: Vec<usize> = (0..AllHalves.len()).map(|i| (i * 389) % AllHalves.len()).collect();
    for dtype in [CacheDtype::F16, CacheDtype::F32] {
        let cache = CacheConfig { dtype, ..CacheConfig::default() };
        let mut checked = 0;
        for idx in order.chunks(300) {
            let b = split.boundary_batch(&AllHalves, idx, &cache, 300).unwrap();
            assert_eq!(b.on_gpu(), 1, "{dtype:?}: the input is not on the GPU");
            let host = b.tensors()[0].to_f32("boundary").unwrap();
            let gpu = b.gpu_copy(0).unwrap();
            assert_eq!(host.len(), gpu.len());
            for (i, (h, g)) in host.iter().zip(&gpu).enumerate() {
                let same = if h.is_nan() { g.is_nan() } else { h.to_bits() == g.to_bits() };
                assert!(same, "{dtype:?}: value {i} of the batch: host {h:e}, GPU {g:e}");
            }
            checked += gpu.len();
        }
        assert_eq!(checked, 1 << 16, "{dtype:?}: every pattern checked");
    }
}

/// The memory estimate counts the feature cache's copy on the GPU as what
/// the cache then keeps there, to the byte, and leaves it out of the total
/// on a GPU with its own memory (the mock's, unless MOCK_CUDA_INTEGRATED).
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn the_memory_estimate_counts_the_cache_kept_on_the_gpu() {
    let _g = lock();
    let _restore = Restore;
    let info = device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    let model = OnnxModel::load(root().join("models/digits/digits_mlp.onnx")).unwrap();
    let cfg = SplitConfig { targets: Targets::AllLinear, ..SplitConfig::default() };
    let train = digits("digits_user_train.npz");
    for budget in [256 << 20, 1000] {
        let split = AdaptedModel::new(&model, &cfg).unwrap();
        let cache = CacheConfig { gpu_budget: budget, ..CacheConfig::default() };
        let tc = TrainConfig { epochs: 1, batch_size: 32, cache, ..TrainConfig::default() };
        let mut t = Trainer::new(split, tc).unwrap();
        let r = t.estimate_memory(&train).unwrap();
        t.fit(&train, None, &mut |_| {}).unwrap();
        // The input (64 values a sample) is the boundary, stored as f16.
        let kept = t.model().cache_gpu_bytes();
        assert_eq!(r.gpu_cache_bytes, kept, "budget {budget}: estimate vs what the GPU holds");
        if budget > 1000 {
            assert_eq!(kept, train.len() * 64 * 2, "the whole cache on the GPU");
        } else {
            assert_eq!(kept, 0, "over the budget");
        }
        let gpu_share = if info.integrated { r.gpu_cache_bytes } else { 0 };
        assert_eq!(
            r.total_bytes,
            r.cache_bytes + gpu_share + r.activation_bytes + r.parameter_bytes + r.backbone_bytes,
            "integrated {}",
            info.integrated
        );
        assert_eq!(device::gpu_shares_host_memory(), info.integrated);
    }
}

use hydra_edge::tail::TailBuilder;
use hydra_edge::tail::ops::linear::{Layout, Linear};
use hydra_edge::tail::ops::reduce::{GlobalAveragePool, Reduce, ReduceKind};

/// A pooling tail on `[4, 6, 16]` activations: an adapted layer, the
/// activations masked (`x · mask[..., None]`), then summed over the
/// sequence (ReduceSum, axes input, no kept dims) or, for `pool` 1, a mean
/// over the sequence with the dims kept (ReduceMean, axes attribute) and a
/// mean over the features, or, for `pool` 2, a GlobalAveragePool over
/// `[4, 16, 6]` (the transposed activations): [`tail_pass`].
fn pooling_pass(pool: usize) -> Pass {
    let (n, s, h) = (4, 6, 16);
    let mut rng = Rng::new(21);
    let mut v = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
    let x = ArrayD::from_shape_vec(IxDyn(&[n, s, h]), v(n * s * h)).unwrap();
    let mask: Vec<f32> = (0..n * s).map(|i| if i % s < 3 + i / s { 1.0 } else { 0.0 }).collect();
    let mask = ArrayD::from_shape_vec(IxDyn(&[n, s, 1]), mask).unwrap();
    let lin = adapted_layer(h, Some(v(h)), v(h * h), 5);
    let mut b = TailBuilder::new();
    let xi = b.boundary("x");
    let mi = b.boundary("mask");
    let y = b.node("proj", Box::new(lin), vec![xi], "y");
    let mul =
        hydra_edge::tail::ops::binary::Binary::new(hydra_edge::tail::ops::binary::BinaryKind::Mul);
    let masked = b.node("mask", Box::new(mul), vec![y, mi], "masked");
    let out = match pool {
        0 => {
            let axes = b.constant(
                "axes",
                Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1]), vec![1]).unwrap()),
            );
            b.node(
                "sum",
                Box::new(Reduce::new(ReduceKind::Sum, None, false, false)),
                vec![masked, axes],
                "out",
            )
        }
        1 => {
            let m = b.node(
                "mean",
                Box::new(Reduce::new(ReduceKind::Mean, Some(vec![1]), true, false)),
                vec![masked],
                "mean",
            );
            b.node(
                "mean2",
                Box::new(Reduce::new(ReduceKind::Mean, Some(vec![-1]), true, false)),
                vec![m],
                "out",
            )
        }
        _ => {
            let t = hydra_edge::tail::ops::shape::Transpose::new(Some(vec![0, 2, 1]));
            let tr = b.node("transpose", Box::new(t), vec![masked], "t");
            b.node("gap", Box::new(GlobalAveragePool), vec![tr], "out")
        }
    };
    let _ = out;
    tail_pass(b, vec![Tensor::F32(x), Tensor::F32(mask)])
}

/// A frozen `h×h` layer (`w` row-major, `bias`) with a fresh Hydra adapter.
fn adapted_layer(h: usize, bias: Option<Vec<f32>>, w: Vec<f32>, seed: u64) -> Linear {
    let mut lin = Linear::new("MatMul", Layout::Rows, Weights::F32(w), bias, h, h).unwrap();
    lin.adapt(HydraConfig { seed, ..HydraConfig::default() }).unwrap();
    lin
}

/// The tail `b` builds (its output `out`) on `inputs`, its adapters'
/// parameters moved off their start (so that every part carries weight):
/// one training forward and a backward of a fixed `dY` (not one computed
/// from y, which would carry the forward's rounding into the gradients'
/// comparison). The output and every gradient.
fn tail_pass(b: TailBuilder, inputs: Vec<Tensor>) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut tail = b.finish("out").unwrap();
    tail.params_and_grads().0.iter_mut().for_each(|p| {
        p.iter_mut().enumerate().for_each(|(i, v)| *v += 0.05 * ((i % 7) as f32 - 3.0))
    });
    tail.zero_grad();
    let y = tail.forward(inputs, true).unwrap().into_f32();
    let y = y.f32("y").unwrap().clone();
    let mut k = 0;
    tail.backward(y.mapv(|_| {
        k += 1;
        ((k % 5) as f32 - 2.0) / 4.0
    }))
    .unwrap();
    let grads = tail.params_and_grads().1.iter().map(|g| g.to_vec()).collect();
    (y.iter().copied().collect(), grads)
}

type Pass = (Vec<f32>, Vec<Vec<f32>>);

/// `gpu`'s output within `tol.0` and its gradients within `tol.1` of `cpu`'s.
fn assert_close(what: &str, cpu: &Pass, gpu: &Pass, tol: (f32, f32)) {
    let e = rel_err(&cpu.0, &gpu.0);
    assert!(e <= tol.0, "{what}: output, GPU vs CPU {e:e}");
    assert_eq!(cpu.1.len(), gpu.1.len(), "{what}: gradients");
    for (i, (c, g)) in cpu.1.iter().zip(&gpu.1).enumerate() {
        let e = rel_err(c, g);
        assert!(e <= tol.1, "{what}: gradient {i}, GPU vs CPU {e:e}");
    }
}

/// Pooling's reductions (ReduceSum, ReduceMean, GlobalAveragePool) run on
/// resident values forward and backward, with the CPU's result.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn pooling_reductions_run_on_the_gpu() {
    let _g = lock();
    let _restore = Restore;
    for pool in 0..3 {
        device::set_device(Device::Cpu).unwrap();
        let cpu = pooling_pass(pool);
        device::set_device(Device::Cuda(0)).unwrap();
        device::set_gpu_min_work(0);
        let mut down = [0; 2];
        for resident in [false, true] {
            device::set_resident_tail(resident);
            let (ops, fallbacks, before) = (
                device::stats::gpu_tail_ops(),
                device::stats::gpu_fallbacks(),
                device::stats::gpu_bytes_down(),
            );
            let gpu = pooling_pass(pool);
            let ops = device::stats::gpu_tail_ops() - ops;
            down[usize::from(resident)] = device::stats::gpu_bytes_down() - before;
            let what = format!("pool {pool}, resident {resident}");
            assert_eq!(device::stats::gpu_fallbacks(), fallbacks, "{what}: a CUDA call failed");
            assert_close(&what, &cpu, &gpu, (1e-5, 1e-5));
            eprintln!(
                "{what}: {ops} tail ops on the GPU, {} bytes down",
                down[usize::from(resident)]
            );
            // Forward: the mask's Mul and the reductions (and the
            // transpose); backward: the same.
            let want = if resident { [4, 6, 6][pool] } else { 0 };
            assert!(ops >= want, "{what}: only {ops} ops on the GPU");
        }
        // The [4, 6, 16] activations no longer come down for the CPU's pooling.
        assert!(down[1] + 4 * 6 * 16 * 4 <= down[0], "pool {pool}: bytes down {down:?}");
    }
}

/// An older exporter's transformer (opset 13: LayerNormalization written as
/// ReduceMean, Sub, Pow, Add, Sqrt and Div; GELU as Div, Erf, Add and Mul)
/// keeps its values on the GPU through those ops too, forward and backward
/// (the norms' broadcast gradients summed there), with the CPU's result.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn decomposed_norms_and_gelu_stay_on_the_gpu() {
    let model = OnnxModel::load(root().join("models/test/transformer.onnx")).unwrap();
    let _g = lock();
    let _restore = Restore;
    device::set_device(Device::Cpu).unwrap();
    let cpu = resident_pass(&model, 0.1);
    device::set_device(Device::Cuda(0)).unwrap();
    device::set_gpu_min_work(0);
    let (fallbacks, reruns) = (device::stats::gpu_fallbacks(), device::stats::gpu_tail_reruns());
    let traffic = || device::stats::gpu_bytes_up() + device::stats::gpu_bytes_down();
    let mut bytes = [0usize; 2];
    let mut ops = [0usize; 2];
    for (k, resident) in [false, true].into_iter().enumerate() {
        device::set_resident_tail(resident);
        let (o, moved) = (device::stats::gpu_tail_ops(), traffic());
        let gpu = resident_pass(&model, 0.1);
        (ops[k], bytes[k]) = (device::stats::gpu_tail_ops() - o, traffic() - moved);
        assert_same_pass(&format!("resident {resident}"), &cpu, &gpu);
    }
    assert_eq!(device::stats::gpu_fallbacks(), fallbacks, "a CUDA call failed");
    assert_eq!(device::stats::gpu_tail_reruns(), reruns, "a pass fell back to the CPU");
    eprintln!(
        "opset-13 transformer: {} tail ops on the GPU; traffic resident ÷ per product {:.2} ({} vs {} bytes)",
        ops[1],
        bytes[1] as f64 / bytes[0] as f64,
        bytes[1],
        bytes[0]
    );
    // Two decomposed norms and a GELU in the tail, forward and backward.
    assert!(ops[1] >= 30, "only {} ops on the GPU", ops[1]);
    assert!(bytes[1] * 100 < bytes[0] * 40, "traffic {bytes:?}");
}

use hydra_edge::tail::ops::binary::{Binary, BinaryKind};
use hydra_edge::tail::ops::unary::{Unary, UnaryKind};

/// An adapted layer on `[4, 6, 16]` activations, then `case`'s element-wise
/// ops: its output and every gradient after a backward of `sin(y)`.
fn elementwise_pass(case: usize) -> Pass {
    let (n, s, h) = (4, 6, 16);
    let mut rng = Rng::new(23);
    let mut v = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
    let x = ArrayD::from_shape_vec(IxDyn(&[n, s, h]), v(n * s * h)).unwrap();
    let c = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[h]), v(h)).unwrap());
    let lin = adapted_layer(h, Some(v(h)), v(h * h), 5);
    let mut b = TailBuilder::new();
    let xi = b.boundary("x");
    let y = b.node("proj", Box::new(lin), vec![xi], "y");
    let scalar = |b: &mut TailBuilder, name: &str, p: f32| {
        b.constant(name, Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[]), vec![p]).unwrap()))
    };
    let unary = |b: &mut TailBuilder, k: UnaryKind, x, out: &str| {
        b.node(out, Box::new(Unary::new(k)), vec![x], out)
    };
    let binary = |b: &mut TailBuilder, k: BinaryKind, x, z, out: &str| {
        b.node(out, Box::new(Binary::new(k)), vec![x, z], out)
    };
    let kinds = [
        UnaryKind::Relu,
        UnaryKind::Sigmoid,
        UnaryKind::Tanh,
        UnaryKind::Erf,
        UnaryKind::GeluTanh,
        UnaryKind::Exp,
        UnaryKind::Neg,
    ];
    match case {
        k if k < kinds.len() => {
            unary(&mut b, kinds[k], y, "out");
        }
        7 => {
            // √(e^y), e^y to the 1.7th and cubed.
            let e = unary(&mut b, UnaryKind::Exp, y, "e");
            let r = unary(&mut b, UnaryKind::Sqrt, e, "r");
            let p = scalar(&mut b, "p", 1.7);
            let q = binary(&mut b, BinaryKind::Pow, e, p, "q");
            let three = scalar(&mut b, "three", 3.0);
            let cube = binary(&mut b, BinaryKind::Pow, r, three, "cube");
            let sum = binary(&mut b, BinaryKind::Add, q, cube, "sum");
            binary(&mut b, BinaryKind::Add, sum, r, "out");
        }
        _ => {
            // Max and Min against a broadcast row (their backward on the
            // CPU), a broadcast Add's and Mul's gradients summed into it.
            let ci = b.constant("c", c);
            let w = b.node("row", Box::new(adapted_layer(h, None, v(h * h), 6)), vec![ci], "w");
            let hi = binary(&mut b, BinaryKind::Max, y, ci, "hi");
            let lo = binary(&mut b, BinaryKind::Min, y, ci, "lo");
            let m = binary(&mut b, BinaryKind::Mul, hi, w, "m");
            let a = binary(&mut b, BinaryKind::Add, lo, w, "a");
            binary(&mut b, BinaryKind::Sub, m, a, "out");
        }
    }
    tail_pass(b, vec![Tensor::F32(x)])
}

/// Every element-wise function with a GPU form (Relu, Sigmoid, Tanh, Erf,
/// tanh-GELU, Exp, Neg, Sqrt, Pow, Max, Min) runs on resident values and
/// gives the CPU's output and gradients.
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn elementwise_functions_run_on_the_gpu() {
    let _g = lock();
    let _restore = Restore;
    for case in 0..9 {
        device::set_device(Device::Cpu).unwrap();
        let cpu = elementwise_pass(case);
        device::set_device(Device::Cuda(0)).unwrap();
        device::set_gpu_min_work(0);
        let (ops, fallbacks) = (device::stats::gpu_tail_ops(), device::stats::gpu_fallbacks());
        let gpu = elementwise_pass(case);
        let ops = device::stats::gpu_tail_ops() - ops;
        assert_eq!(device::stats::gpu_fallbacks(), fallbacks, "case {case}: a CUDA call failed");
        assert_close(&format!("case {case}"), &cpu, &gpu, (1e-5, 1e-4));
        // Forward and backward of each op (Max's and Min's backward on the CPU).
        let want = [2, 2, 2, 2, 2, 2, 2, 12, 7][case];
        assert!(ops >= want, "case {case}: only {ops} ops on the GPU");
        eprintln!("element-wise case {case}: {ops} ops on the GPU");
    }
}

/// Element-wise functions at the ends of their range (tanh-GELU far below
/// 0, where 1 + tanh cancels in f32; Exp and Sigmoid past f32's exp range)
/// give the CPU's values element by element: the input reaches the GPU
/// through a frozen identity layer (exact there).
#[test]
#[ignore = "needs a CUDA device (targets/gpu-check.sh)"]
fn elementwise_functions_match_the_cpu_at_the_ends_of_their_range() {
    let _g = lock();
    let _restore = Restore;
    let h = 16;
    let xs: Vec<f32> = (0..4 * h)
        .map(|i| match i % 8 {
            0 => -4.0 - (i / 8) as f32 * 0.4,
            1 => 88.5 + (i / 8) as f32 * 0.5,
            2 => -90.0 - (i / 8) as f32,
            3 => -87.5,
            _ => (i as f32 - 30.0) * 0.7,
        })
        .collect();
    let run = |k: UnaryKind| {
        let mut eye = vec![0.0f32; h * h];
        (0..h).for_each(|i| eye[i * h + i] = 1.0);
        let lin = Linear::new("MatMul", Layout::Rows, Weights::F32(eye), None, h, h).unwrap();
        let mut b = TailBuilder::new();
        let xi = b.boundary("x");
        let y = b.node("eye", Box::new(lin), vec![xi], "y");
        b.node("f", Box::new(Unary::new(k)), vec![y], "out");
        let mut tail = b.finish("out").unwrap();
        let x = ArrayD::from_shape_vec(IxDyn(&[4, h]), xs.clone()).unwrap();
        let y = tail.forward(vec![Tensor::F32(x)], false).unwrap().into_f32();
        y.f32("y").unwrap().iter().copied().collect::<Vec<f32>>()
    };
    for k in [UnaryKind::GeluTanh, UnaryKind::Exp, UnaryKind::Sigmoid, UnaryKind::Tanh] {
        device::set_device(Device::Cpu).unwrap();
        let cpu = run(k);
        device::set_device(Device::Cuda(0)).unwrap();
        device::set_gpu_min_work(0);
        let ops = device::stats::gpu_tail_ops();
        let gpu = run(k);
        assert!(device::stats::gpu_tail_ops() > ops, "{k:?} did not run on the GPU");
        for ((x, c), g) in xs.iter().zip(&cpu).zip(&gpu) {
            // (An absolute 1e-9 for tanh-GELU far below 0, where even the
            // CPU's f64 formula cancels: values under 1e-14 there.)
            let close = (c - g).abs() <= 1e-5 * c.abs() + 1e-9 || c == g;
            assert!(close, "{k:?}({x}): CPU {c:e}, GPU {g:e}");
        }
    }
}
