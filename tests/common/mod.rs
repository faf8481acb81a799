//! Shared test helpers: seeded data and explicit tolerances.
#![allow(dead_code)]

use std::process::Command;

use hydra_edge::f16;
use hydra_edge::kernels::reference::Ref;
use hydra_edge::rng::Rng;

/// Unit roundoff of f32 (2⁻²⁴).
pub const U32: f64 = 5.960_464_477_539_063e-8;
/// Half an ulp of f16 at 1.0, relative (2⁻¹¹).
pub const U16: f64 = 4.882_812_5e-4;

/// max |a − b| / (1 + max |a|): the error of `b` against the reference `a`,
/// relative to the reference's largest value.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = 1.0 + a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Uniform values in [-1, 1).
pub fn rand_vec(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect()
}

/// Uniform values in [-1, 1), rounded to f16.
pub fn rand_f16(rng: &mut Rng, len: usize) -> Vec<f16> {
    (0..len).map(|_| f16::from_f32(rng.uniform(-1.0, 1.0))).collect()
}

pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

pub fn f64s_h(v: &[f16]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x.to_f32())).collect()
}

/// A copy of `v` that starts `off` elements into a fresh buffer, so that the
/// slice handed to a kernel is not aligned to its vector width.
pub fn unaligned<T: Copy + Default>(v: &[T], off: usize) -> Vec<T> {
    let mut buf = vec![T::default(); off];
    buf.extend_from_slice(v);
    buf
}

/// f32 accumulation error bound for a sum of `k` terms, relative to Σ|term|:
/// a few units of roundoff times √k (blocked or sequential summation of
/// unrelated terms), plus one rounding for the final scale and add.
pub fn tol_f32(k: usize) -> f64 {
    4.0 * U32 * ((k + 1) as f64).sqrt() + 2.0 * U32
}

/// Checks `|got − ref| ≤ tol·scale + abs` element-wise; reports the worst.
pub fn assert_close(got: &[f32], want: &Ref, tol: f64, abs: f64, what: &str) {
    assert_eq!(got.len(), want.value.len(), "{what}: length");
    for (i, &g) in got.iter().enumerate() {
        let (v, s) = (want.value[i], want.scale[i]);
        let err = (f64::from(g) - v).abs();
        assert!(
            err <= tol * s + abs,
            "{what}: element {i}: got {g}, want {v} (err {err:.3e} > {tol:.2e}·{s:.3e} + {abs:.1e})"
        );
    }
}

/// The command that runs this test binary again (through the runner, see
/// [`run_target_binary`]).
pub fn rerun_self(args: &[&str]) -> Command {
    let mut cmd = run_target_binary(&std::env::current_exe().unwrap());
    cmd.args(args);
    cmd
}

/// The command that starts `exe`, a binary built for this test's target:
/// through the runner cargo used, if one is configured for this architecture
/// (qemu-user in the aarch64 CI stage, where the kernel may not exec a foreign
/// binary itself; `HYDRA_TEST_RUNNER` overrides), else directly.
pub fn run_target_binary(exe: &std::path::Path) -> Command {
    let arch_prefix = format!("CARGO_TARGET_{}_", std::env::consts::ARCH.to_uppercase());
    let runner = std::env::var("HYDRA_TEST_RUNNER").ok().or_else(|| {
        std::env::vars()
            .find(|(k, v)| k.starts_with(&arch_prefix) && k.ends_with("_RUNNER") && !v.is_empty())
            .map(|(_, v)| v)
    });
    match runner.as_deref().map(str::split_whitespace) {
        Some(mut words) => {
            let mut cmd = Command::new(words.next().expect("empty test runner"));
            cmd.args(words).arg(exe);
            cmd
        }
        None => Command::new(exe),
    }
}

/// Runs `model` with onnxruntime (Python, installed by scripts/test.sh) on `inputs`
/// and returns its outputs by name; `dir` holds the exchange files.
#[cfg(feature = "onnx")]
pub fn onnxruntime(
    model: &std::path::Path,
    inputs: &std::collections::BTreeMap<String, hydra_edge::Tensor>,
    dir: &std::path::Path,
) -> std::collections::BTreeMap<String, hydra_edge::Tensor> {
    use hydra_edge::train::npz::{parse_npz, write_npz};
    let (inp, out) = (dir.join("ort_in.npz"), dir.join("ort_out.npz"));
    std::fs::write(&inp, write_npz(inputs)).unwrap();
    let script = "import sys, numpy as np, onnxruntime as ort\n\
        m, i, o = sys.argv[1:4]\n\
        s = ort.InferenceSession(m)\n\
        f = dict(np.load(i))\n\
        r = s.run(None, {x.name: f[x.name] for x in s.get_inputs()})\n\
        np.savez(o, **{x.name: v for x, v in zip(s.get_outputs(), r)})\n";
    let st = Command::new("python3")
        .args(["-c", script])
        .arg(model)
        .arg(&inp)
        .arg(&out)
        .status()
        .expect("python3 with onnxruntime (installed by scripts/test.sh)");
    assert!(st.success(), "onnxruntime failed on {}", model.display());
    parse_npz(&std::fs::read(&out).unwrap()).unwrap()
}

/// A scratch folder under the system temp dir, removed with everything in it
/// when dropped (a failing test's too), so that test runs leave nothing
/// behind (the corpus and merge tests write ~100 MB models each run).
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    /// `<temp>/<prefix>-<pid>-<tag>`, created empty.
    pub fn new(prefix: &str, tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("{prefix}-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
