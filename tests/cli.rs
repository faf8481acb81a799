//! The CLI end to end on the committed digits model:
//! inspect → train → eval → merge → run, plus the demo, in human and --json modes.
#![cfg(feature = "cli")]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The CLI binary (under qemu-user, through the runner: see `common::run_target_binary`).
fn bin() -> Command {
    common::run_target_binary(std::path::Path::new(env!("CARGO_BIN_EXE_hydra-edge")))
}

fn digits(f: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/digits").join(f)
}

fn ok(o: Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn inspect_train_merge_run_through_the_cli() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = digits("digits_mlp.onnx");
    let out = ok(bin().arg("inspect").arg(&model).output().unwrap());
    assert!(out.contains("fc1") && out.contains("✔ all linear layers"), "{out}");
    let j: serde_json::Value =
        serde_json::from_str(&ok(bin().args(["--json", "inspect"]).arg(&model).output().unwrap()))
            .unwrap();
    assert_eq!(j["linear_layers"].as_array().unwrap().len(), 3);

    let adapter = dir.join("user.hydra");
    let plot = dir.join("curve.svg");
    let ckpt = dir.join("user.ckpt");
    let out = ok(bin()
        .arg("train")
        .arg(&model)
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .arg("--eval")
        .arg(digits("digits_user_test.npz"))
        .args(["--epochs", "20", "--lr", "0.01", "--rank", "4,4", "--variant", "hydra", "--out"])
        .arg(&adapter)
        .arg("--plot")
        .arg(&plot)
        .arg("--checkpoint")
        .arg(&ckpt)
        .output()
        .unwrap());
    assert!(out.contains("epoch  20") && out.contains("wrote"), "{out}");
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    assert!(ckpt.exists());

    let j: serde_json::Value = serde_json::from_str(&ok(bin()
        .args(["--json", "eval"])
        .arg(&model)
        .arg(&adapter)
        .arg("--data")
        .arg(digits("digits_user_test.npz"))
        .output()
        .unwrap()))
    .unwrap();
    assert!(j["accuracy"].as_f64().unwrap() > 0.8, "{j}");

    let merged = dir.join("merged.onnx");
    let j: serde_json::Value = serde_json::from_str(&ok(bin()
        .args(["--json", "merge"])
        .arg(&model)
        .arg(&adapter)
        .arg("-o")
        .arg(&merged)
        .arg("--check-data")
        .arg(digits("digits_user_test.npz"))
        .output()
        .unwrap()))
    .unwrap();
    assert!(j["max_rel_error"].as_f64().unwrap() <= 1e-4, "{j}");
    let outputs = dir.join("out.npz");
    let out = ok(bin()
        .arg("run")
        .arg(&merged)
        .arg("--input")
        .arg(digits("digits_user_test.npz"))
        .arg("--output")
        .arg(&outputs)
        .output()
        .unwrap());
    assert!(out.contains("logits: [519, 10]"), "{out}");
    assert!(outputs.exists());

    // Resume from the checkpoint for 5 more epochs.
    let out = ok(bin()
        .arg("train")
        .arg(&model)
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--epochs", "25", "--lr", "0.01", "--rank", "4,4", "--out"])
        .arg(dir.join("more.hydra"))
        .arg("--resume")
        .arg(&ckpt)
        .output()
        .unwrap());
    assert!(out.contains("epoch  21") && !out.contains("epoch   1:"), "{out}");
}

#[test]
fn errors_are_reported_not_panics() {
    let o = bin().arg("inspect").arg("/nonexistent/model.onnx").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    // The path once, the OS error once.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.matches("/nonexistent/model.onnx").count() == 1, "{err}");
    assert!(err.matches("No such file").count() == 1, "{err}");
    let o = bin()
        .arg("train")
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--targets", "nosuchlayer"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nosuchlayer"));
    let o = bin().arg("bench").env("HYDRA_KERNELS", "avx9000").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown kernel tier"));
}

#[test]
fn the_demo_adapts_merges_and_checks() {
    let j: serde_json::Value =
        serde_json::from_str(&ok(bin().args(["--json", "demo"]).output().unwrap())).unwrap();
    assert!(j["accuracy_before"].as_f64().unwrap() < 0.5);
    assert!(j["accuracy_after"].as_f64().unwrap() > 0.85);
    assert!(j["merge_max_abs_error"].as_f64().unwrap() < 1e-3);
    // The cached (f16) model input reaches the first layer's f16 kernels.
    assert!(j["f16_kernel_calls"].as_u64().unwrap() > 0, "{j}");
    let tier = j["tier"].as_str().unwrap();
    if let Ok(want) = std::env::var("HYDRA_EXPECT_TIER") {
        assert_eq!(tier, want, "the demo ran on another tier than expected");
    }
    assert_eq!(j["bf16_products"].as_u64(), Some(0), "f32 is the default: {j}");
}

#[test]
fn bf16_products_are_opt_in_and_a_bad_precision_is_an_error() {
    let o = bin().args(["--json", "--matmul-precision", "bf16", "demo"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    let j: serde_json::Value = serde_json::from_str(&ok(o)).unwrap();
    assert!(j["accuracy_after"].as_f64().unwrap() > 0.85, "{j}");
    assert!(j["merge_max_abs_error"].as_f64().unwrap() < 1e-3, "{j}");
    let ran = j["bf16_products"].as_u64().unwrap();
    if hydra_edge::runtime::bf16_units() {
        assert!(ran > 0, "no product ran in bf16: {j}");
    } else {
        // No AMX here: said once, and everything stays f32.
        assert_eq!(ran, 0);
        assert!(stderr.contains("no bf16 matrix units"), "{stderr}");
    }
    // Train and merge with bf16 products: the merge check compares the
    // merged model with the unmerged one in f32, so it passes as tightly as
    // in an f32 run.
    let dir = std::env::temp_dir().join(format!("hydra-cli-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (adapter, merged) = (dir.join("a.hydra"), dir.join("m.onnx"));
    ok(bin()
        .args(["--matmul-precision", "bf16", "train"])
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--epochs", "3", "--out"])
        .arg(&adapter)
        .output()
        .unwrap());
    let j: serde_json::Value = serde_json::from_str(&ok(bin()
        .args(["--json", "--matmul-precision", "bf16", "merge"])
        .arg(digits("digits_mlp.onnx"))
        .arg(&adapter)
        .arg("-o")
        .arg(&merged)
        .output()
        .unwrap()))
    .unwrap();
    assert!(j["max_rel_error"].as_f64().unwrap() < 1e-5, "{j}");
    std::fs::remove_dir_all(&dir).ok();

    let o = bin().args(["--matmul-precision", "fp8", "demo"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("fp8") && stderr.contains("bf16"), "{stderr}");
}

#[test]
fn cli_training_runs_the_backbone_only_in_the_first_epoch() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = ok(bin()
        .args(["--json", "train"])
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .arg("--eval")
        .arg(digits("digits_user_test.npz"))
        .args(["--epochs", "4", "--out"])
        .arg(dir.join("a.hydra"))
        .output()
        .unwrap());
    let epochs: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|j| j.get("epoch").is_some())
        .collect();
    assert_eq!(epochs.len(), 4, "{out}");
    assert!(epochs[0]["prefix_samples"].as_u64().unwrap() > 0, "{out}");
    for e in &epochs[1..] {
        assert_eq!(e["prefix_samples"].as_u64(), Some(0), "epoch {e}: the cache must serve it");
    }
}

#[test]
fn impossible_heads_and_thread_counts_are_errors_not_panics() {
    for head in ["new:0", "new:100000000000"] {
        let o = bin()
            .arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .args(["--targets", "none", "--head", head, "--epochs", "1", "--out"])
            .arg(std::env::temp_dir().join(format!("hydra-cli-head-{}.hydra", std::process::id())))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "--head {head}: {err}");
        assert!(err.contains("head of") && !err.contains("panicked"), "--head {head}: {err}");
    }
    let o = bin().args(["--threads", "100000", "bench"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("at most 256"), "{err}");
}

#[test]
fn outputs_that_are_inputs_directories_or_devices_are_refused_before_any_work() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("base.onnx");
    std::fs::copy(digits("digits_mlp.onnx"), &model).unwrap();
    let before = std::fs::read(&model).unwrap();
    let adapter = dir.join("a.hydra");
    ok(bin()
        .arg("train")
        .arg(&model)
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--epochs", "1", "--out"])
        .arg(&adapter)
        .output()
        .unwrap());
    // merge M A -o M: refused, M untouched.
    for out in [model.clone(), adapter.clone(), dir.clone(), PathBuf::from("/dev/null")] {
        let o = bin().arg("merge").arg(&model).arg(&adapter).arg("-o").arg(&out).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "-o {}: {err}", out.display());
        assert!(err.contains("refusing to write"), "-o {}: {err}", out.display());
    }
    assert_eq!(std::fs::read(&model).unwrap(), before, "the base model is untouched");
    // An unwritable --out is found before training, not after it.
    let t0 = std::time::Instant::now();
    let o = bin()
        .arg("train")
        .arg(&model)
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--epochs", "500", "--out"])
        .arg(dir.join("no/such/folder/a.hydra"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(t0.elapsed().as_secs_f64() < 5.0, "refused before 500 epochs");
}

#[test]
fn resuming_with_another_batch_size_finishes_instead_of_spinning() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("c.ckpt");
    let train = |batch: &str, epochs: &str, resume: bool| {
        let mut c = bin();
        c.arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .args(["--epochs", epochs, "--batch", batch, "--out"])
            .arg(dir.join("a.hydra"))
            .arg("--checkpoint")
            .arg(&ckpt);
        if resume {
            c.arg("--resume").arg(&ckpt);
        }
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let mut child = c.spawn().unwrap();
        let t0 = std::time::Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed().as_secs() > 60 {
                child.kill().unwrap();
                panic!("training with --batch {batch} did not finish in 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    assert!(train("7", "2", false).success());
    // The checkpoint's position belongs to batch 7; resuming with 150 (two batches an epoch) must end.
    assert!(train("150", "4", true).success());
}

#[test]
fn empty_targets_and_nan_adapters_are_refused() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-nan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for t in ["", ","] {
        let o = bin()
            .arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .args(["--targets", t, "--out"])
            .arg(dir.join("t.hydra"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "--targets `{t}`");
        assert!(String::from_utf8_lossy(&o.stderr).contains("names no layer"));
    }
    let adapter = dir.join("a.hydra");
    ok(bin()
        .arg("train")
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--epochs", "1", "--out"])
        .arg(&adapter)
        .output()
        .unwrap());
    // A NaN in a tensor, with a valid checksum: refused by eval and merge, nothing written.
    let mut f = hydra_edge::adapter::AdapterFile::load(&adapter).unwrap();
    f.tensors[0].data[0] = f32::NAN;
    let bad = dir.join("nan.hydra");
    f.save(&bad).unwrap();
    let o = bin()
        .arg("eval")
        .arg(digits("digits_mlp.onnx"))
        .arg(&bad)
        .arg("--data")
        .arg(digits("digits_user_test.npz"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("NaN"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = dir.join("merged.onnx");
    let o = bin()
        .arg("merge")
        .arg(digits("digits_mlp.onnx"))
        .arg(&bad)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(!out.exists(), "no merged file from a NaN adapter");
}

/// `digits_mlp.onnx` with its input declared as `dims`.
fn with_input_dims(path: &std::path::Path, dims: &[i64]) {
    use hydra_edge::onnx::pb::tensor_shape_proto::{Dimension, dimension::Value};
    use prost::Message;
    let bytes = std::fs::read(digits("digits_mlp.onnx")).unwrap();
    let mut m = hydra_edge::onnx::pb::ModelProto::decode(bytes.as_slice()).unwrap();
    let input = &mut m.graph.as_mut().unwrap().input[0];
    let Some(hydra_edge::onnx::pb::type_proto::Value::TensorType(t)) =
        input.r#type.as_mut().unwrap().value.as_mut()
    else {
        panic!("tensor input")
    };
    t.shape.as_mut().unwrap().dim = dims
        .iter()
        .map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() })
        .collect();
    std::fs::write(path, m.encode_to_vec()).unwrap();
}

#[test]
fn huge_declared_input_dims_are_errors_and_merge_writes_nothing() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-dims-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let adapter = dir.join("a.hydra");
    ok(bin()
        .arg("train")
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--epochs", "1", "--out"])
        .arg(&adapter)
        .output()
        .unwrap());
    for dims in [vec![1i64 << 40, 64], vec![1, 1 << 62], vec![1 << 20, 1 << 20]] {
        let model = dir.join("huge.onnx");
        with_input_dims(&model, &dims);
        let o = bin().arg("inspect").arg(&model).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(matches!(o.status.code(), Some(0 | 1)), "inspect {dims:?}: {err}");
        assert!(!err.contains("panicked"), "inspect {dims:?}: {err}");
        let out = dir.join("merged.onnx");
        let o = bin().arg("merge").arg(&model).arg(&adapter).arg("-o").arg(&out).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "merge {dims:?}: {err}");
        assert!(!err.contains("panicked"), "merge {dims:?}: {err}");
        assert!(!out.exists(), "merge {dims:?} wrote -o");
    }
    // A node without outputs: a clear error from inspect, train and merge.
    {
        use prost::Message;
        let bytes = std::fs::read(digits("digits_mlp.onnx")).unwrap();
        let mut m = hydra_edge::onnx::pb::ModelProto::decode(bytes.as_slice()).unwrap();
        let g = m.graph.as_mut().unwrap();
        g.node.push(hydra_edge::onnx::pb::NodeProto {
            op_type: "Relu".into(),
            input: vec![g.input[0].name.clone()],
            ..Default::default()
        });
        let model = dir.join("no-output.onnx");
        std::fs::write(&model, m.encode_to_vec()).unwrap();
        for args in [vec!["inspect"], vec!["merge", "-o", "x.onnx"]] {
            let mut c = bin();
            c.arg(args[0]).arg(&model);
            if args[0] == "merge" {
                c.arg(&adapter).arg("-o").arg(dir.join("x.onnx"));
            }
            let o = c.output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.contains("has no output"), "{args:?}: {err}");
        }
    }
}

#[test]
fn a_diverging_run_writes_nothing_bad_and_a_worse_run_never_replaces_a_better_adapter() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-diverge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, ckpt) = (dir.join("a.hydra"), dir.join("c.ckpt"));
    let train = |lr: &str, epochs: &str, extra: &[&str]| {
        bin()
            .arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .arg("--eval")
            .arg(digits("digits_user_test.npz"))
            .args(["--lr", lr, "--epochs", epochs, "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    ok(train("1e-3", "5", &[]));
    let good = std::fs::read(&out).unwrap();
    // --lr 30 explodes in the first epoch: an error, no checkpoint of it, --out untouched.
    let o = train("30", "5", &["--checkpoint", ckpt.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("diverged") && err.contains("nothing was written"), "{err}");
    assert!(!ckpt.exists(), "no checkpoint holds the exploded weights");
    assert_eq!(std::fs::read(&out).unwrap(), good);
    // A run that ends worse than the adapter at --out keeps that adapter.
    let o = train("1e-4", "2", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("scores better") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), good);
    let new = dir.join("a.hydra.new");
    assert!(hydra_edge::adapter::AdapterFile::load(&new).is_ok(), "the run's result is kept aside");
    // Unless asked.
    ok(train("1e-4", "2", &["--overwrite"]));
    assert_ne!(std::fs::read(&out).unwrap(), good);
    // Divergence after good epochs: the checkpoint keeps the last good epoch,
    // --out gets the best one (carried through the resume), and it says so.
    let out2 = dir.join("b.hydra");
    let c = ckpt.to_str().unwrap().to_string();
    let run = |lr: &str, epochs: &str, resume: bool| {
        let mut extra = vec!["--checkpoint", c.as_str(), "--overwrite"];
        if resume {
            extra.extend(["--resume", c.as_str()]);
        }
        let mut cmd = bin();
        cmd.arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .arg("--eval")
            .arg(digits("digits_user_test.npz"))
            .args(["--lr", lr, "--epochs", epochs, "--out"])
            .arg(&out2)
            .args(&extra);
        cmd.output().unwrap()
    };
    ok(run("1e-3", "3", false));
    let good_ckpt = std::fs::read(&ckpt).unwrap();
    let o = run("30", "6", true);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("diverged") && err.contains("untouched: it holds epoch 3"), "{err}");
    assert!(err.contains("wrote epoch 3's adapter (the best)"), "{err}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), good_ckpt, "the last good checkpoint is untouched");
    let best = hydra_edge::adapter::AdapterFile::load(&out2).unwrap();
    assert!(best.tensors.iter().all(|t| t.data.iter().all(|v| v.is_finite() && v.abs() < 1e3)));
}

#[test]
fn training_killed_at_any_moment_leaves_a_checkpoint_that_resumes() {
    use hydra_edge::adapter::AdapterFile;
    let dir = std::env::temp_dir().join(format!("hydra-cli-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ckpt, out) = (dir.join("c.ckpt"), dir.join("a.hydra"));
    let train = |extra: &[&str]| {
        let mut c = bin();
        c.arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .args(["--batch", "8", "--epochs", "100000", "--checkpoint"])
            .arg(&ckpt)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    // How long this machine (or emulator: qemu-user is ~10× slower to start)
    // takes to the first checkpoint, so that the kills below land at the same
    // moments of a run everywhere.
    let t0 = std::time::Instant::now();
    let mut child = train(&[]).spawn().unwrap();
    while !ckpt.exists() && t0.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let first = t0.elapsed();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ckpt.exists(), "no checkpoint after {first:?}");
    std::fs::remove_file(&ckpt).unwrap();
    let mut epochs = Vec::new();
    for kill in 0..12u32 {
        let resume: Vec<&str> =
            if ckpt.exists() { vec!["--resume", ckpt.to_str().unwrap()] } else { vec![] };
        let mut child = train(&resume).spawn().unwrap();
        // Kills land anywhere: start-up, mid-epoch, mid-save (from half the
        // time to the first checkpoint up to three and a bit times it).
        std::thread::sleep(first * (2 + kill) / 4);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if ckpt.exists() {
            let f = AdapterFile::load(&ckpt)
                .unwrap_or_else(|e| panic!("kill {kill}: checkpoint unreadable: {e}"));
            epochs.push(f.header.checkpoint.unwrap().epoch);
        }
    }
    assert!(epochs.len() >= 3, "the runs got far enough to checkpoint: {epochs:?}");
    assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "resumes move forward: {epochs:?}");
    let stale: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(stale.len() <= 1, "at most the last kill's temporary file: {stale:?}");
    // The last checkpoint resumes and finishes a short run.
    let last = epochs.last().copied().unwrap();
    let o = bin()
        .arg("train")
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--batch", "8", "--epochs", &(last + 1).to_string(), "--resume"])
        .arg(&ckpt)
        .arg("--out")
        .arg(dir.join("final.hydra"))
        .output()
        .unwrap();
    ok(o);
    assert!(AdapterFile::load(&dir.join("final.hydra")).is_ok());
}

/// `.npz` with the digits input `x` and `label`, `n` samples.
fn digits_npz(path: &std::path::Path, n: usize) {
    use hydra_edge::Tensor;
    use ndarray::{ArrayD, IxDyn};
    let map = [
        ("x".to_string(), Tensor::F32(ArrayD::zeros(IxDyn(&[n, 64])))),
        ("label".to_string(), Tensor::I64(ArrayD::zeros(IxDyn(&[n])))),
    ]
    .into_iter()
    .collect();
    std::fs::write(path, hydra_edge::train::npz::write_npz(&map)).unwrap();
}

#[test]
fn empty_data_overflowing_batches_and_clashing_outputs_are_errors() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.npz");
    digits_npz(&empty, 0);
    let adapter = dir.join("a.hydra");
    let train = |extra: &[&str]| {
        bin()
            .arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .args(["--epochs", "1"])
            .args(extra)
            .output()
            .unwrap()
    };
    ok(train(&["--out", adapter.to_str().unwrap()]));
    let fails = |o: Output, what: &str, want: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{what}: {err}");
    };
    // 0 samples: eval, merge --check-data and train --eval are errors, not "loss 0".
    let o = bin()
        .arg("eval")
        .arg(digits("digits_mlp.onnx"))
        .arg(&adapter)
        .arg("--data")
        .arg(&empty)
        .output()
        .unwrap();
    fails(o, "eval on 0 samples", "nothing to evaluate");
    let merged = dir.join("m.onnx");
    let o = bin()
        .arg("merge")
        .arg(digits("digits_mlp.onnx"))
        .arg(&adapter)
        .arg("-o")
        .arg(&merged)
        .arg("--check-data")
        .arg(&empty)
        .output()
        .unwrap();
    fails(o, "merge --check-data with 0 samples", "no samples");
    assert!(!merged.exists());
    let o =
        train(&["--eval", empty.to_str().unwrap(), "--out", dir.join("b.hydra").to_str().unwrap()]);
    fails(o, "train --eval with 0 samples", "no samples");
    // A batch size that overflows the estimate still meets the budget.
    let o = train(&[
        "--batch",
        "18446744073709551615",
        "--budget-mb",
        "1",
        "--out",
        dir.join("c.hydra").to_str().unwrap(),
    ]);
    fails(o, "--batch u64::MAX --budget-mb 1", "exceeds the budget");
    // Outputs that clash with each other or with the checkpoint resumed from.
    let ckpt = dir.join("c.ckpt");
    ok(train(&[
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        dir.join("d.hydra").to_str().unwrap(),
    ]));
    let same = dir.join("same");
    fails(
        train(&["--out", same.to_str().unwrap(), "--plot", same.to_str().unwrap()]),
        "--plot = --out",
        "refusing to write",
    );
    fails(
        train(&["--out", ckpt.to_str().unwrap(), "--resume", ckpt.to_str().unwrap()]),
        "--out = --resume",
        "refusing to write",
    );
    ok(train(&[
        "--out",
        dir.join("e.hydra").to_str().unwrap(),
        "--resume",
        ckpt.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
    ]));
    // An adapter for another configuration at --out is kept; the run's goes beside it.
    let before = std::fs::read(&adapter).unwrap();
    let o = train(&["--rank", "2", "--out", adapter.to_str().unwrap()]);
    fails(o, "--out holds another configuration's adapter", "another model or configuration");
    assert_eq!(std::fs::read(&adapter).unwrap(), before);
    assert!(dir.join("a.hydra.new").exists());
}

#[test]
fn stale_temporary_files_of_dead_processes_are_removed_by_the_next_write() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Process ids that cannot be running (above the kernel's pid_max).
    let (dead, live) = (4_194_305u32 + 7, std::process::id());
    let adapter = dir.join("a.hydra");
    let merged = dir.join("m.onnx");
    let plant =
        [dir.join(format!(".a.hydra.tmp.{dead}.0")), dir.join(format!(".m.onnx.tmp-{dead}"))];
    let keep =
        [dir.join(format!(".a.hydra.tmp.{live}.0")), dir.join(format!(".m.onnx.tmp-{live}"))];
    for p in plant.iter().chain(&keep) {
        std::fs::write(p, b"half a file").unwrap();
    }
    ok(bin()
        .arg("train")
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--epochs", "1", "--out"])
        .arg(&adapter)
        .output()
        .unwrap());
    let said = ok(bin()
        .arg("merge")
        .arg(digits("digits_mlp.onnx"))
        .arg(&adapter)
        .arg("-o")
        .arg(&merged)
        .output()
        .unwrap());
    assert!(
        said.contains("the adapter's training data"),
        "without --check-data the check runs on the recorded training data: {said}"
    );
    for p in &plant {
        assert!(!p.exists(), "{} removed", p.display());
    }
    for p in &keep {
        assert!(p.exists(), "{}: a live process's temporary file is left alone", p.display());
    }
}

#[test]
fn the_recipe_is_settable_nothing_to_train_is_an_error_and_run_goes_in_batches() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-recipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let train = |extra: &[&str]| {
        bin()
            .arg("--json")
            .arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .args(["--epochs", "2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = dir.join("a.hydra");
    let o = train(&["--targets", "none", "--head", "keep", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to train"));
    assert!(!out.exists());
    // Every knob of the recipe, and different recipes give different adapters.
    let mut files = Vec::new();
    for (k, recipe) in [
        vec!["--schedule", "constant", "--clip", "0", "--weight-decay", "0"],
        vec!["--optimizer", "sgd", "--lr", "0.05", "--warmup", "3", "--dropout", "0.1"],
        vec!["--min-lr", "1e-4"],
    ]
    .into_iter()
    .enumerate()
    {
        let f = dir.join(format!("r{k}.hydra"));
        let mut args = recipe.clone();
        args.extend(["--out", f.to_str().unwrap()]);
        let j: Vec<serde_json::Value> =
            ok(train(&args)).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let last = j.last().unwrap();
        assert_eq!(last["adapted"].as_array().unwrap().len(), 3, "{last}");
        files.push(std::fs::read(&f).unwrap());
    }
    assert!(files[0] != files[1] && files[1] != files[2]);
    let o = train(&["--dropout", "1.5"]);
    assert_eq!(o.status.code(), Some(1));
    // run: batches of 7 give the outputs of one batch of 200, in order.
    let (one, many) = (dir.join("one.npz"), dir.join("many.npz"));
    for (batch, path) in [("1000", &one), ("7", &many)] {
        ok(bin()
            .arg("run")
            .arg(digits("digits_mlp.onnx"))
            .arg("--input")
            .arg(digits("digits_user_train.npz"))
            .args(["--batch", batch, "--output"])
            .arg(path)
            .output()
            .unwrap());
    }
    let read = |p: &PathBuf| hydra_edge::train::npz::read_npz(p).unwrap();
    let (a, b) = (read(&one), read(&many));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert_eq!(v.shape()[0], 200, "{k}");
        let (x, y) = (v.f32("a").unwrap(), b[k].f32("b").unwrap());
        let err = x.iter().zip(y.iter()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(err <= 1e-5, "{k}: batched run differs by {err}");
    }
}

#[test]
fn hostile_head_entries_missing_inputs_and_labels_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let adapter = dir.join("h.hydra");
    ok(bin()
        .arg("train")
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(digits("digits_user_train.npz"))
        .args(["--epochs", "1", "--targets", "none", "--head", "new:10", "--out"])
        .arg(&adapter)
        .output()
        .unwrap());
    let fails = |o: Output, what: &str, want: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{what}: {err}");
    };
    // A head entry whose product overflows (checksum valid): refused before any allocation.
    let mut f = hydra_edge::adapter::AdapterFile::load(&adapter).unwrap();
    f.header.metadata.insert("head".into(), "new:10:4611686018427387904".into());
    let bad = dir.join("huge-head.hydra");
    f.save(&bad).unwrap();
    let o = bin()
        .arg("eval")
        .arg(digits("digits_mlp.onnx"))
        .arg(&bad)
        .arg("--data")
        .arg(digits("digits_user_test.npz"))
        .output()
        .unwrap();
    fails(o, "eval with a huge head entry", "head");
    let out = dir.join("m.onnx");
    let o = bin()
        .arg("merge")
        .arg(digits("digits_mlp.onnx"))
        .arg(&bad)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    fails(o, "merge with a huge head entry", "head");
    assert!(!out.exists());
    // Data without the model's input, or without the label array: named.
    let no_input = dir.join("no-input.npz");
    let map = [
        (
            "pixels".to_string(),
            hydra_edge::Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[4, 64]))),
        ),
        (
            "label".to_string(),
            hydra_edge::Tensor::I64(ndarray::ArrayD::zeros(ndarray::IxDyn(&[4]))),
        ),
    ]
    .into_iter()
    .collect();
    std::fs::write(&no_input, hydra_edge::train::npz::write_npz(&map)).unwrap();
    let o = bin()
        .arg("eval")
        .arg(digits("digits_mlp.onnx"))
        .arg(&adapter)
        .arg("--data")
        .arg(&no_input)
        .output()
        .unwrap();
    fails(o, "data without the model's input", "`x`");
    let o = bin()
        .arg("eval")
        .arg(digits("digits_mlp.onnx"))
        .arg(&adapter)
        .arg("--data")
        .arg(digits("digits_user_test.npz"))
        .args(["--label-key", "labels"])
        .output()
        .unwrap();
    fails(o, "a wrong --label-key", "label array `labels` not found");
}

#[test]
fn targets_are_exact_names_globs_or_unambiguous_substrings() {
    let out = std::env::temp_dir().join(format!("hydra-cli-targets-{}.hydra", std::process::id()));
    let train = |t: &str| {
        bin()
            .arg("--json")
            .arg("train")
            .arg(digits("digits_mlp.onnx"))
            .arg("--data")
            .arg(digits("digits_user_train.npz"))
            .args(["--epochs", "1", "--overwrite", "--targets", t, "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    // `fc` is a substring of fc1 and fc2: an error that names both, not two layers adapted.
    let o = train("fc");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("matches 2 layers") && err.contains("fc1") && err.contains("fc2"),
        "{err}"
    );
    for (t, want) in
        [("fc1", vec!["fc1"]), ("fc*", vec!["fc1", "fc2"]), ("fc2,head", vec!["fc2", "head"])]
    {
        let j: Vec<serde_json::Value> =
            ok(train(t)).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let adapted: Vec<&str> = j.last().unwrap()["adapted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(adapted, want, "--targets {t}");
    }
}

/// `train` records where its data came from, and `merge` without
/// `--check-data` checks on the first samples of it (saying so); when the
/// file is gone it falls back to synthetic inputs and says that check is weak.
#[test]
fn merge_checks_on_the_adapters_own_training_data_by_default() {
    let dir = std::env::temp_dir().join(format!("hydra-cli-recorded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("train.npz");
    std::fs::copy(digits("digits_user_train.npz"), &data).unwrap();
    let adapter = dir.join("a.hydra");
    ok(bin()
        .arg("train")
        .arg(digits("digits_mlp.onnx"))
        .arg("--data")
        .arg(&data)
        .args(["--epochs", "1", "--out"])
        .arg(&adapter)
        .output()
        .unwrap());
    let file = hydra_edge::adapter::AdapterFile::load(&adapter).unwrap();
    let recorded = file.header.metadata.get("data").expect("the data path is recorded");
    assert_eq!(std::path::Path::new(recorded), std::fs::canonicalize(&data).unwrap());
    let merge = |out: &str| {
        ok(bin()
            .arg("--json")
            .arg("merge")
            .arg(digits("digits_mlp.onnx"))
            .arg(&adapter)
            .arg("-o")
            .arg(dir.join(out))
            .output()
            .unwrap())
    };
    let j: serde_json::Value = serde_json::from_str(merge("m1.onnx").trim()).unwrap();
    let on = j["checked_on"].as_str().unwrap();
    assert!(on.contains("train.npz") && on.contains("training data"), "{j}");
    // A recorded file that no longer fits the model (same names, wrong
    // width): the check falls back to synthetic inputs and says so.
    let mut arrays = hydra_edge::train::npz::parse_npz(&std::fs::read(&data).unwrap()).unwrap();
    for (k, t) in arrays.iter_mut() {
        if t.is_float() && k != "label" {
            *t = hydra_edge::Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[4, 3])));
        }
    }
    std::fs::write(&data, hydra_edge::train::npz::write_npz(&arrays)).unwrap();
    let o = bin()
        .arg("--json")
        .arg("merge")
        .arg(digits("digits_mlp.onnx"))
        .arg(&adapter)
        .arg("-o")
        .arg(dir.join("m3.onnx"))
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_str(ok(o.clone()).trim()).unwrap();
    assert_eq!(j["checked_on"], "synthetic", "{j}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not run on this model"));
    std::fs::remove_file(&data).unwrap();
    let j: serde_json::Value = serde_json::from_str(merge("m2.onnx").trim()).unwrap();
    assert_eq!(j["checked_on"], "synthetic", "{j}");
}
