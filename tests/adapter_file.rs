//! The `.hydra` adapter file: round trips, hostile bytes, fingerprints and
//! crash-safe saving.
//!
//! The crash test re-runs this test binary as a child process that saves
//! checkpoints in a loop, kills it at random moments, and checks that the
//! file on disk is always one complete version the child wrote.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::rerun_self;

use hydra_edge::adapter::{
    AdapterFile, CheckpointState, DType, FORMAT_VERSION, Header, LayerEntry, MAGIC, NamedTensor,
    clean_temp_files, fingerprint,
};
use hydra_edge::rng::Rng;
use hydra_edge::{Error, HydraConfig, f16};

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hydra-adapter-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn header(fp: u64) -> Header {
    Header {
        config: HydraConfig { seed: 7, ..HydraConfig::default() },
        layers: vec![
            LayerEntry { name: "blocks.0.fc2".into(), in_dim: 12, out_dim: 8 },
            LayerEntry { name: "blocks.0.proj".into(), in_dim: 8, out_dim: 8 },
        ],
        fingerprint: fp,
        metadata: BTreeMap::from([("task".into(), "digits".into()), ("epochs".into(), "3".into())]),
        checkpoint: None,
    }
}

fn tensor(rng: &mut Rng, name: &str, shape: &[usize], dtype: DType) -> NamedTensor {
    let n = shape.iter().product();
    let data = (0..n).map(|_| rng.uniform(-2.0, 2.0)).collect();
    NamedTensor::new(name, shape.to_vec(), dtype, data).unwrap()
}

/// A small file with f32 and f16 tensors, a scalar and an empty tensor.
fn sample() -> AdapterFile {
    let mut rng = Rng::new(1);
    AdapterFile {
        header: header(0x0123_4567_89ab_cdef),
        tensors: vec![
            tensor(&mut rng, "blocks.0.fc2.A_p", &[4, 12], DType::F32),
            tensor(&mut rng, "blocks.0.fc2.B_p", &[8, 4], DType::F16),
            tensor(&mut rng, "blocks.0.proj.A_s", &[2, 8], DType::F32),
            tensor(&mut rng, "scalar", &[], DType::F16),
            tensor(&mut rng, "empty", &[0, 3], DType::F32),
        ],
    }
}

/// What a round trip must give: f16 tensors rounded as `half` rounds.
fn as_stored(file: &AdapterFile) -> AdapterFile {
    let mut f = file.clone();
    for t in &mut f.tensors {
        if t.dtype == DType::F16 {
            t.data.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
        }
    }
    f
}

#[test]
fn round_trip_keeps_f32_exact_and_rounds_f16_like_half() {
    let file = sample();
    let bytes = file.to_bytes().unwrap();
    assert_eq!(bytes[..8], MAGIC);
    assert_eq!(bytes[8..12], FORMAT_VERSION.to_le_bytes());
    let back = AdapterFile::from_bytes(&bytes).unwrap();
    assert_eq!(back, as_stored(&file));
    // The f16 tensor really changed (so the check above is not vacuous) and
    // a second trip is exact.
    assert_ne!(back.tensor("blocks.0.fc2.B_p"), file.tensor("blocks.0.fc2.B_p"));
    assert_eq!(AdapterFile::from_bytes(&back.to_bytes().unwrap()).unwrap(), back);
    assert_eq!(back.tensor("empty").unwrap().shape, vec![0, 3]);
    assert!(back.tensor("missing").is_none());
}

#[test]
fn f16_storage_rounds_to_nearest_even_including_specials() {
    // Halfway cases, subnormals, overflow, infinities and every f16 bit pattern widened.
    let mut data: Vec<f32> = vec![
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        -(1.0 + 2f32.powi(-11)),
        2f32.powi(-24),
        2f32.powi(-25),
        2f32.powi(-26),
        65504.0,
        65520.0,
        1e9,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
    ];
    data.extend((0..=u16::MAX).map(f16::from_bits).filter(|h| !h.is_nan()).map(f32::from));
    let mut rng = Rng::new(9);
    data.extend((0..5000).map(|_| rng.uniform(-70000.0, 70000.0) * rng.next_f32().powi(8)));
    let len = data.len();
    let file = AdapterFile {
        header: header(1),
        tensors: vec![NamedTensor::new("h", vec![len], DType::F16, data.clone()).unwrap()],
    };
    let back = AdapterFile::from_bytes(&file.to_bytes().unwrap()).unwrap();
    for (x, y) in data.iter().zip(&back.tensors[0].data) {
        assert_eq!(y.to_bits(), f16::from_f32(*x).to_f32().to_bits(), "{x:e}");
    }
}

#[test]
fn checkpoint_header_round_trips() {
    let mut file = sample();
    let mut rng = Rng::new(3);
    rng.next_u64();
    file.header.checkpoint = Some(CheckpointState {
        step: 1234,
        epoch: 5,
        rngs: vec![rng.state(), [u64::MAX, 0, 1 << 63, 42]],
        extra: BTreeMap::from([("lr_schedule_pos".into(), "0.25".into())]),
    });
    let mut moment = tensor(&mut rng, "adamw.m.blocks.0.fc2.A_p", &[4, 12], DType::F32);
    moment.data[0] = f32::MIN_POSITIVE / 4.0; // subnormal survives exactly
    file.tensors.push(moment);
    let back = AdapterFile::from_bytes(&file.to_bytes().unwrap()).unwrap();
    assert_eq!(back, as_stored(&file));
    assert_eq!(back.header.checkpoint.as_ref().unwrap().rngs[1][0], u64::MAX);
}

/// A `Read` that hands out at most 3 bytes per call, like a slow stream.
struct Trickle<'a>(&'a [u8]);

impl embedded_io::ErrorType for Trickle<'_> {
    type Error = core::convert::Infallible;
}

impl embedded_io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let n = buf.len().min(3).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn streams_read_and_write_through_embedded_io() {
    let file = sample();
    let mut out: Vec<u8> = Vec::new();
    file.write_to(&mut out).unwrap();
    assert_eq!(out, file.to_bytes().unwrap());
    // read_from stops after the checksum, so what follows stays in the stream.
    let mut stream = out.clone();
    stream.extend_from_slice(b"next");
    let mut r = Trickle(&stream);
    assert_eq!(AdapterFile::read_from(&mut r).unwrap(), as_stored(&file));
    assert_eq!(r.0, b"next");
}

#[test]
fn every_single_byte_corruption_is_an_error() {
    let bytes = sample().to_bytes().unwrap();
    assert!(bytes.len() > 500, "sample too small to be telling: {}", bytes.len());
    for i in 0..bytes.len() {
        for flip in [0xFF, 0x01, 0x80] {
            let mut bad = bytes.clone();
            bad[i] ^= flip;
            assert!(
                matches!(AdapterFile::from_bytes(&bad), Err(Error::Corrupt(_))),
                "byte {i} ^ {flip:#x} was accepted"
            );
            assert!(AdapterFile::read_from(&mut Trickle(&bad)).is_err(), "byte {i} (stream)");
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample().to_bytes().unwrap();
    for len in 0..bytes.len() {
        assert!(
            matches!(AdapterFile::from_bytes(&bytes[..len]), Err(Error::Corrupt(_))),
            "truncation to {len} bytes was accepted"
        );
        assert!(
            AdapterFile::read_from(&mut &bytes[..len]).is_err(),
            "truncation to {len} (stream)"
        );
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut bytes = sample().to_bytes().unwrap();
    bytes.push(0);
    let err = AdapterFile::from_bytes(&bytes).unwrap_err();
    assert!(err.to_string().contains("after the checksum"), "{err}");

    let dir = scratch("trailing");
    let path = dir.join("a.hydra");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(AdapterFile::load(&path), Err(Error::Corrupt(_))));
}

/// Splices a hostile field into an otherwise valid prefix and fixes nothing
/// else: the reader must refuse it without allocating what it claims.
#[test]
fn hostile_lengths_are_refused_without_huge_allocations() {
    let good = sample().to_bytes().unwrap();
    let header_len = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
    let tensors_at = 16 + header_len;

    let mut huge_header = good.clone();
    huge_header[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut huge_count = good.clone();
    huge_count[tensors_at..tensors_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    // First tensor: name length, name, dtype, rank, then dims.
    let name_len = u16::from_le_bytes([good[tensors_at + 4], good[tensors_at + 5]]) as usize;
    let dims_at = tensors_at + 6 + name_len + 2;
    let mut huge_dims = good.clone();
    huge_dims[dims_at..dims_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut overflow_dims = good.clone();
    overflow_dims[dims_at..dims_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    overflow_dims[dims_at + 8..dims_at + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut high_rank = good.clone();
    high_rank[dims_at - 1] = 200;
    let mut bad_dtype = good.clone();
    bad_dtype[dims_at - 2] = 7;

    for (what, bytes) in [
        ("header length", &huge_header),
        ("tensor count", &huge_count),
        ("dimension", &huge_dims),
        ("overflowing dimensions", &overflow_dims),
        ("rank", &high_rank),
        ("dtype", &bad_dtype),
    ] {
        assert!(matches!(AdapterFile::from_bytes(bytes), Err(Error::Corrupt(_))), "{what}");
        // Over a stream of unknown length too (buffers grow only with data).
        assert!(AdapterFile::read_from(&mut &bytes[..]).is_err(), "{what} (stream)");
    }
}

#[test]
fn writer_refuses_what_the_format_cannot_hold() {
    let mut file = sample();
    file.tensors[0].data.pop();
    assert!(matches!(file.to_bytes(), Err(Error::Shape { .. })));
    assert!(NamedTensor::new("x", vec![2, 3], DType::F32, vec![0.0; 5]).is_err());
    assert!(NamedTensor::new("x".repeat(5000), vec![], DType::F32, vec![0.0]).is_err());
    assert!(NamedTensor::new("x", vec![1; 9], DType::F32, vec![0.0]).is_err());

    let mut dup = sample();
    dup.tensors[1].name = dup.tensors[0].name.clone();
    assert!(matches!(dup.to_bytes(), Err(Error::Config(_))));

    let mut nan = sample();
    nan.header.config.parallel.scale = f32::NAN;
    assert!(nan.to_bytes().is_err());
    let mut out = Vec::new();
    assert!(nan.write_to(&mut out).is_err());
    assert!(out.is_empty(), "a refused file must write nothing");
}

#[test]
fn fingerprint_is_pinned_and_sensitive_to_names_and_values() {
    let w0: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
    let w1 = [1.0f32, -2.0, 3.5];
    let fp = fingerprint([("layer.0", &w0[..]), ("layer.1", &w1[..])]);
    // Pinned (and checked against an independent Python FNV-1a): changing the
    // definition would orphan every adapter file in the field.
    assert_eq!(fp, 0x0c9a_20de_e38d_7fab, "got {fp:#018x}");
    assert_eq!(fingerprint([] as [(&str, &[f32]); 0]), 0xcbf2_9ce4_8422_2325);

    let mut w0b = w0.clone();
    w0b[5] = f32::from_bits(w0b[5].to_bits() ^ 1);
    assert_ne!(fingerprint([("layer.0", &w0b[..]), ("layer.1", &w1[..])]), fp);
    assert_ne!(fingerprint([("layer.O", &w0[..]), ("layer.1", &w1[..])]), fp);
    assert_ne!(fingerprint([("layer.1", &w1[..]), ("layer.0", &w0[..])]), fp);
    // The same bytes split differently between name and weights.
    let zero = [0.0f32];
    assert_ne!(fingerprint([("a", &zero[..])]), fingerprint([("a\0\0\0\0", &[][..])]));
    assert_ne!(fingerprint([("a", &[0.0f32][..])]), fingerprint([("a", &[-0.0f32][..])]));
}

#[test]
fn fingerprint_mismatch_is_reported() {
    let file = sample();
    assert!(file.check_fingerprint(0x0123_4567_89ab_cdef).is_ok());
    match file.check_fingerprint(42) {
        Err(e @ Error::FingerprintMismatch { expected: 42, found: 0x0123_4567_89ab_cdef }) => {
            assert!(e.to_string().contains("different base model"), "{e}");
        }
        other => panic!("expected FingerprintMismatch, got {other:?}"),
    }
}

#[test]
fn save_into_missing_directory_is_io_error_with_context() {
    let dir = scratch("missing");
    let path = dir.join("no/such/dir/a.hydra");
    match sample().save(&path) {
        Err(e @ Error::Io { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("a.hydra") && msg.contains("no/such/dir"), "{msg}");
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
    assert!(matches!(AdapterFile::load(&path), Err(Error::Io { .. })));
}

#[test]
fn save_then_load_replaces_and_leaves_no_temp_files() {
    let dir = scratch("save");
    let path = dir.join("a.hydra");
    let mut file = sample();
    file.save(&path).unwrap();
    assert_eq!(AdapterFile::load(&path).unwrap(), as_stored(&file));
    file.header.metadata.insert("epochs".into(), "4".into());
    file.tensors.truncate(2);
    file.save(&path).unwrap();
    assert_eq!(AdapterFile::load(&path).unwrap(), as_stored(&file));
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["a.hydra"]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- crash safety -------------------------------------------------------

const CHILD_ENV: &str = "HYDRA_ADAPTER_CRASH_CHILD";
const CHILD_START_ENV: &str = "HYDRA_ADAPTER_CRASH_START";
const CHILD_READY: &str = "hydra-adapter-crash-child-ready";
const CRASH_TEST: &str = "killed_writer_always_leaves_a_complete_file";

/// Version `v` of the checkpoint: size and contents are functions of `v`.
fn version(v: u64) -> AdapterFile {
    let mut rng = Rng::new(v);
    let mut header = header(v.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    header.metadata.insert("version".into(), v.to_string());
    header.checkpoint = Some(CheckpointState {
        step: v,
        epoch: v / 10,
        rngs: vec![rng.state()],
        extra: BTreeMap::new(),
    });
    // From a few bytes to ~2 MiB, so that kills land in every phase of a save
    // and a shorter file replaces a longer one and vice versa.
    let big = 1 + rng.below(500_000) as usize;
    let tensors = vec![
        tensor(&mut rng, "A", &[big], DType::F32),
        tensor(&mut rng, "B", &[(v % 37) as usize + 1, 3], DType::F16),
    ];
    AdapterFile { header, tensors }
}

/// In the child: say it is running, then save versions start, start+1, …
/// to the path until killed.
fn child_loop(path: &Path) -> ! {
    let start: u64 = std::env::var(CHILD_START_ENV).unwrap().parse().unwrap();
    println!("{CHILD_READY}");
    for v in start.. {
        version(v).save(path).unwrap();
    }
    unreachable!()
}

#[test]
fn killed_writer_always_leaves_a_complete_file() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child_loop(Path::new(&path));
    }
    let dir = scratch("crash");
    let path = dir.join("ckpt.hydra");
    // Kill delays span a few saves on this machine (emulated ones are slow),
    // and at least 0–30 ms.
    let t0 = Instant::now();
    for v in 1..=8 {
        version(v).save(&path).unwrap();
    }
    let max_delay_us = (t0.elapsed().as_micros() as u64 * 3 / 8).max(30_000);
    version(0).save(&path).unwrap();

    let mut rng = Rng::new(2024);
    let mut last = 0;
    let mut changes = 0;
    for kill in 1..=40u64 {
        let start = kill * 1_000_000;
        let mut child = rerun_self(&["--exact", CRASH_TEST, "--nocapture"])
            .env(CHILD_ENV, &path)
            .env(CHILD_START_ENV, start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the child (set HYDRA_TEST_RUNNER?): {e}"));
        // Kill only once the child runs its save loop, not while it starts up.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while line.trim() != CHILD_READY {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the child ended before it was ready");
        }
        std::thread::sleep(Duration::from_micros(rng.below(max_delay_us)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child stopped on its own: {status}");

        let file = AdapterFile::load(&path)
            .unwrap_or_else(|e| panic!("after kill {kill}: the file is not valid: {e}"));
        let v: u64 = file.header.metadata["version"].parse().unwrap();
        assert!(v == last || (start..start + 1_000_000).contains(&v), "kill {kill}: version {v}");
        assert_eq!(file, as_stored(&version(v)), "kill {kill}: version {v} is inconsistent");
        if v != last {
            changes += 1;
        }
        last = v;
    }
    // Not vacuous: the children did replace the file while being killed.
    assert!(changes > 0, "no child ever completed a save");
    let stale = clean_temp_files(&path).unwrap();
    eprintln!(
        "crash test: 40 kills within 0–{} ms; the file changed {changes} times; \
         {stale} stale temp files (kills mid-save) removed",
        max_delay_us / 1000
    );

    // Stale temp files never disturb saving or loading, and are cleaned up.
    version(7).save(&path).unwrap();
    assert_eq!(AdapterFile::load(&path).unwrap(), as_stored(&version(7)));
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["ckpt.hydra"]);
    let _ = std::fs::remove_dir_all(&dir);
}
