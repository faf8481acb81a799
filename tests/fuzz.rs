//! The fuzz targets of `fuzz/` as bounded, seeded property tests on stable:
//! every input path (ONNX loader + split + backbone + tail, NPZ reader,
//! checkpoint/resume, adapter reader) is fed structure-aware mutations of
//! the seed corpus in `fuzz/corpus/` and must return — an error is fine, a
//! panic, an abort or a hang fails the test. The bodies are
//! `hydra_edge::fuzz_checks`, shared with the cargo-fuzz targets.
//!
//! `HYDRA_FUZZ_ITERS` sets the mutations per target (default 1000; about
//! 2 s each in release);
//! `HYDRA_FUZZ_SEED` the first seed (default 1). A failure prints the seed
//! and the case, and writes the input to `target/fuzz-failures/`.
#![cfg(feature = "onnx")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use hydra_edge::adapter::{AdapterFile, DType};
use hydra_edge::fuzz_checks::{self, Reached};
use hydra_edge::model::AdaptedModel;
use hydra_edge::onnx::pb;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::rng::Rng;
use hydra_edge::train::{Dataset, TrainConfig, Trainer};
use prost::Message;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn iters() -> u64 {
    std::env::var("HYDRA_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

fn first_seed() -> u64 {
    std::env::var("HYDRA_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let d = root().join("fuzz/corpus").join(dir);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty seed corpus {}", d.display());
    v
}

/// Cases in progress, by target: what and since when (for the watchdog).
static RUNNING: Mutex<BTreeMap<String, (String, Instant)>> = Mutex::new(BTreeMap::new());

/// A hang is a failure too: a case that runs past a minute stops the test
/// binary, naming its seed (a plain hang would only show as a CI timeout).
fn watchdog() {
    static START: Once = Once::new();
    START.call_once(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((t, (what, since))) =
                    running.iter().find(|(_, (_, s))| s.elapsed() > Duration::from_secs(60))
                {
                    eprintln!("{t}: case {what} has run for {:?}: a hang", since.elapsed());
                    std::process::exit(2);
                }
            }
        });
    });
}

/// Runs `body` on `input`; on a panic, saves the input and names the seed.
fn run_case<R>(target: &str, seed: u64, what: &str, input: &[u8], body: &dyn Fn(&[u8]) -> R) -> R {
    watchdog();
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(target.into(), (format!("seed {seed} ({what})"), Instant::now()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(input)));
    RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(target);
    match r {
        Ok(r) => r,
        Err(_) => {
            let dir = root().join("target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let p = dir.join(format!("{target}-{seed}"));
            let _ = std::fs::write(&p, input);
            panic!("{target}: seed {seed} ({what}) panicked; input saved to {}", p.display());
        }
    }
}

/// Counts how far the cases got, and checks that the run was not vacuous:
/// every stage is reached, and a share of the mutated inputs (those whose
/// mutation left them valid) gets all the way through.
#[derive(Default)]
struct Depth(BTreeMap<String, usize>);

impl Depth {
    fn add(&mut self, r: Reached) {
        *self.0.entry(format!("{r:?}")).or_default() += 1;
    }
    fn check(&self, target: &str, at_least: f64) {
        let total: usize = self.0.values().sum();
        let ran = self.0.get("Ran").copied().unwrap_or(0);
        eprintln!("{target}: {total} cases, reached {:?}", self.0);
        // Most mutations break the input (refusing it is the right answer);
        // every stage must still be reached by some.
        for stage in ["Parsed", "Analysed", "Built", "Ran"] {
            assert!(self.0.contains_key(stage), "{target}: no case reached {stage}: {:?}", self.0);
        }
        assert!(
            ran as f64 >= at_least * total as f64,
            "{target}: only {ran} of {total} mutated inputs ran through: the mutations are too blunt"
        );
    }
}

/// Byte-level mutations: flips, overwrites with boundary values, inserts,
/// deletes and truncation.
fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>) -> String {
    let n = 1 + rng.below(4);
    let mut what = Vec::new();
    for _ in 0..n {
        if b.is_empty() {
            b.push(0);
        }
        let at = rng.below(b.len() as u64) as usize;
        match rng.below(6) {
            0 => {
                b[at] ^= 1 << rng.below(8);
                what.push(format!("flip@{at}"));
            }
            1 => {
                b[at] = [0u8, 0xff, 0x7f, 0x80, 1][rng.below(5) as usize];
                what.push(format!("set@{at}"));
            }
            2 => {
                let v = [0xffu8; 8];
                let end = (at + 8).min(b.len());
                b[at..end].copy_from_slice(&v[..end - at]);
                what.push(format!("ff8@{at}"));
            }
            3 => {
                b.insert(at, rng.below(256) as u8);
                what.push(format!("insert@{at}"));
            }
            4 => {
                b.remove(at);
                what.push(format!("delete@{at}"));
            }
            _ => {
                b.truncate(at);
                what.push(format!("truncate@{at}"));
            }
        }
    }
    what.join(",")
}

/// Interesting integers for dims, attributes and header numbers.
fn wild_i64(rng: &mut Rng) -> i64 {
    const V: [i64; 12] = [0, 1, -1, 2, 3, 7, 64, 1 << 20, 1 << 31, 1 << 40, i64::MAX, i64::MIN];
    V[rng.below(V.len() as u64) as usize]
}

const OPS: [&str; 16] = [
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "Relu",
    "Reshape",
    "Transpose",
    "Softmax",
    "LayerNormalization",
    "Conv",
    "Gather",
    "Concat",
    "Shape",
    "Where",
    "NoSuchOp",
    "",
];

/// One structural mutation of an ONNX model; returns what it did.
fn mutate_model(rng: &mut Rng, m: &mut pb::ModelProto) -> String {
    let Some(g) = m.graph.as_mut() else { return "no graph".into() };
    let pick = |rng: &mut Rng, n: usize| rng.below(n.max(1) as u64) as usize;
    match rng.below(16) {
        0 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            g.node[i].op_type = OPS[pick(rng, OPS.len())].into();
            format!("op of node {i} → {}", g.node[i].op_type)
        }
        1 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            let n = &mut g.node[i];
            if n.input.is_empty() {
                n.input.push("x".into());
            } else {
                let k = pick(rng, n.input.len());
                n.input.remove(k);
            }
            format!("inputs of node {i}")
        }
        2 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            g.node[i].output.clear();
            format!("outputs of node {i} removed")
        }
        3 if g.node.len() > 1 => {
            let (i, j) = (pick(rng, g.node.len()), pick(rng, g.node.len()));
            g.node.swap(i, j);
            format!("nodes {i} and {j} swapped")
        }
        4 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            let n = &mut g.node[i];
            let v = wild_i64(rng);
            let name = ["axis", "perm", "transB", "alpha", "group", "kernel_shape", "epsilon"]
                [pick(rng, 7)];
            n.attribute.retain(|a| a.name != name);
            n.attribute.push(pb::AttributeProto {
                name: name.into(),
                r#type: if rng.below(2) == 0 { 2 } else { 7 },
                i: v,
                ints: vec![v, v],
                f: v as f32,
                ..Default::default()
            });
            format!("attribute {name}={v} on node {i}")
        }
        5 if !g.initializer.is_empty() => {
            let i = pick(rng, g.initializer.len());
            let t = &mut g.initializer[i];
            let k = pick(rng, t.dims.len().max(1));
            let v = wild_i64(rng);
            if t.dims.is_empty() {
                t.dims.push(v);
            } else {
                t.dims[k] = v;
            }
            format!("dims of initializer {i} → {:?}", t.dims)
        }
        6 if !g.initializer.is_empty() => {
            let i = pick(rng, g.initializer.len());
            let t = &mut g.initializer[i];
            let cut = pick(rng, t.raw_data.len());
            t.raw_data.truncate(cut);
            format!("raw data of initializer {i} cut to {cut}")
        }
        7 if !g.initializer.is_empty() => {
            let i = pick(rng, g.initializer.len());
            g.initializer[i].data_type = rng.below(20) as i32;
            format!("dtype of initializer {i} → {}", g.initializer[i].data_type)
        }
        8 if !g.initializer.is_empty() => {
            let i = pick(rng, g.initializer.len());
            g.initializer.remove(i);
            format!("initializer {i} removed")
        }
        9 if !g.initializer.is_empty() => {
            let i = pick(rng, g.initializer.len());
            let t = &mut g.initializer[i];
            t.data_location = Some(1);
            t.external_data = vec![pb::StringStringEntryProto {
                key: "location".into(),
                value: ["../../etc/passwd", "/etc/passwd", "w.bin", ""][pick(rng, 4)].into(),
            }];
            format!("initializer {i} made external")
        }
        10 if !g.input.is_empty() => {
            use pb::tensor_shape_proto::{Dimension, dimension::Value};
            let i = pick(rng, g.input.len());
            let v = wild_i64(rng);
            if let Some(pb::type_proto::Value::TensorType(t)) =
                g.input[i].r#type.as_mut().and_then(|t| t.value.as_mut())
                && let Some(s) = t.shape.as_mut()
            {
                let k = pick(rng, s.dim.len());
                let d = Dimension { value: Some(Value::DimValue(v)), ..Default::default() };
                if s.dim.is_empty() {
                    s.dim.push(d);
                } else {
                    s.dim[k] = d;
                }
            }
            format!("input {i} dim → {v}")
        }
        11 if !g.input.is_empty() => {
            let i = pick(rng, g.input.len());
            if let Some(pb::type_proto::Value::TensorType(t)) =
                g.input[i].r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                t.elem_type = rng.below(17) as i32;
            }
            format!("input {i} elem type")
        }
        12 if !g.output.is_empty() => {
            let i = pick(rng, g.output.len());
            g.output[i].name = ["", "nope", "x"][pick(rng, 3)].into();
            format!("output {i} renamed")
        }
        13 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            let n = g.node[i].clone();
            g.node.insert(i, n);
            format!("node {i} duplicated")
        }
        14 => {
            let v = wild_i64(rng);
            if let Some(o) = m.opset_import.first_mut() {
                o.version = v;
            }
            format!("opset → {v}")
        }
        _ if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            g.node.remove(i);
            format!("node {i} removed")
        }
        _ => "none".into(),
    }
}

#[test]
fn onnx_loader_split_and_tail_survive_mutated_models() {
    let seeds = corpus("onnx");
    let models: Vec<(String, pb::ModelProto)> = seeds
        .iter()
        .map(|(n, b)| (n.clone(), pb::ModelProto::decode(b.as_slice()).unwrap()))
        .collect();
    for (name, bytes) in &seeds {
        let r = run_case("onnx", 0, name, bytes, &fuzz_checks::onnx_model);
        assert_eq!(r, Reached::Ran, "seed {name} must run through");
    }
    let mut depth = Depth::default();
    for seed in first_seed()..first_seed() + iters() {
        let mut rng = Rng::new(seed);
        let (name, base) = &models[rng.below(models.len() as u64) as usize];
        let (what, bytes) = if rng.below(8) == 0 {
            let mut b = base.encode_to_vec();
            (mutate_bytes(&mut rng, &mut b), b)
        } else {
            let mut m = base.clone();
            let k = if rng.below(3) == 0 { 2 + rng.below(2) } else { 1 };
            let what: Vec<String> = (0..k).map(|_| mutate_model(&mut rng, &mut m)).collect();
            (what.join("; "), m.encode_to_vec())
        };
        let what = format!("{name}: {what}");
        let r = run_case("onnx", seed, &what, &bytes, &fuzz_checks::onnx_model);
        if std::env::var_os("HYDRA_FUZZ_VERBOSE").is_some() {
            eprintln!("seed {seed}: {r:?} ← {what}");
        }
        depth.add(r);
    }
    depth.check("onnx", 0.08);
}

#[test]
fn npz_reader_survives_mutated_files() {
    let seeds = corpus("npz");
    for (name, bytes) in &seeds {
        run_case("npz", 0, name, bytes, &fuzz_checks::npz);
    }
    let mut depth = Depth::default();
    for seed in first_seed()..first_seed() + iters() * 4 {
        let mut rng = Rng::new(seed);
        let (name, base) = &seeds[rng.below(seeds.len() as u64) as usize];
        let mut b = base.clone();
        let what = if rng.below(3) == 0 {
            // Aim at the NPY header text: shape, dtype, order.
            let text = String::from_utf8_lossy(&b).into_owned();
            let keys = ["'shape': (", "'descr': '", "'fortran_order': "];
            let key = keys[rng.below(3) as usize];
            match text.find(key) {
                Some(at) => {
                    let at = at + key.len();
                    let junk: &[u8] = [
                        &b"99999999999999999999"[..],
                        b"-1",
                        b"<f2",
                        b"|O",
                        b"True",
                        b")",
                        b"1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
                    ][rng.below(7) as usize];
                    let end = (at + junk.len()).min(b.len());
                    b[at..end].copy_from_slice(&junk[..end - at]);
                    format!("header {key:?} ← {:?}", String::from_utf8_lossy(junk))
                }
                None => mutate_bytes(&mut rng, &mut b),
            }
        } else {
            mutate_bytes(&mut rng, &mut b)
        };
        let r = run_case("npz", seed, &format!("{name}: {what}"), &b, &fuzz_checks::npz);
        depth.add(r);
    }
    let ran = depth.0.get("Ran").copied().unwrap_or(0);
    eprintln!("npz: reached {:?}", depth.0);
    assert!(
        ran > 0 && depth.0.contains_key("Nothing"),
        "some mutated files read, some not: {:?}",
        depth.0
    );
}

fn digits(f: &str) -> PathBuf {
    root().join("models/digits").join(f)
}

/// A checkpoint of a short run on the digits model (adapters and a new head).
fn seed_checkpoints(model: &OnnxModel, train: &Dataset) -> Vec<AdapterFile> {
    let mut out = Vec::new();
    for (targets, head) in [
        (Targets::AllLinear, hydra_edge::model::HeadConfig::Keep),
        (Targets::None, hydra_edge::model::HeadConfig::New(10)),
    ] {
        let output = matches!(targets, Targets::None).then(|| "features".to_string());
        let s =
            AdaptedModel::new(model, &SplitConfig { targets, output, ..SplitConfig::default() })
                .unwrap();
        let mut t = Trainer::new(
            s,
            TrainConfig { epochs: 2, batch_size: 16, head, ..TrainConfig::default() },
        )
        .unwrap();
        t.fit_until(train, None, Some(20), &mut |_| {}).unwrap();
        out.push(t.adapter_file(true, DType::F32).unwrap());
        out.push(t.adapter_file(false, DType::F16).unwrap());
    }
    out
}

/// One structural mutation of a checkpoint's header or tensors.
fn mutate_checkpoint(rng: &mut Rng, f: &mut AdapterFile) -> String {
    let wild = |rng: &mut Rng| -> String {
        ["0", "1", "-1", "18446744073709551615", "9999999999999", "x", "", "1e400", "NaN"]
            [rng.below(9) as usize]
            .to_string()
    };
    match rng.below(10) {
        0 => {
            let keys = [
                "batch_in_epoch",
                "bad_streak",
                "optimizer_steps",
                "best_epoch",
                "best_score",
                "start_score",
            ];
            let k = keys[rng.below(keys.len() as u64) as usize];
            let v = wild(rng);
            if let Some(cp) = f.header.checkpoint.as_mut() {
                cp.extra.insert(k.into(), v.clone());
            }
            format!("{k} = {v:?}")
        }
        1 => {
            let v = wild_i64(rng) as u64;
            if let Some(cp) = f.header.checkpoint.as_mut() {
                if rng.below(2) == 0 { cp.step = v } else { cp.epoch = v }
            }
            format!("step/epoch = {v}")
        }
        2 => {
            if let Some(cp) = f.header.checkpoint.as_mut() {
                cp.rngs.pop();
            }
            "one generator state fewer".into()
        }
        3 if !f.tensors.is_empty() => {
            let i = rng.below(f.tensors.len() as u64) as usize;
            f.tensors.remove(i);
            format!("tensor {i} removed")
        }
        4 if !f.tensors.is_empty() => {
            let i = rng.below(f.tensors.len() as u64) as usize;
            let t = &mut f.tensors[i];
            let v = [f32::NAN, f32::INFINITY, 1e30, -0.0][rng.below(4) as usize];
            if let Some(x) = t.data.first_mut() {
                *x = v;
            }
            format!("tensor {i} [0] = {v}")
        }
        5 if !f.tensors.is_empty() => {
            let i = rng.below(f.tensors.len() as u64) as usize;
            let t = &mut f.tensors[i];
            t.shape = vec![t.data.len()];
            t.name = ["head/W", "optimizer/m/999", "best/0", "x"][rng.below(4) as usize].into();
            format!("tensor {i} renamed {}", t.name)
        }
        6 => {
            let v =
                ["keep", "new:10:64", "new:0:0", "new:10:4611686018427387904", "new:3:64", "new:x"]
                    [rng.below(6) as usize];
            f.header.metadata.insert("head".into(), v.into());
            format!("head = {v}")
        }
        7 => {
            let v = ["logits", "features", "nope", ""][rng.below(4) as usize];
            f.header.metadata.insert("output".into(), v.into());
            format!("output = {v}")
        }
        8 if !f.header.layers.is_empty() => {
            let i = rng.below(f.header.layers.len() as u64) as usize;
            f.header.layers[i].in_dim = wild_i64(rng) as usize;
            format!("layer {i} in_dim")
        }
        _ => {
            f.header.config.parallel.rank = [0usize, 1, 4, 1 << 30][rng.below(4) as usize];
            format!("parallel rank = {}", f.header.config.parallel.rank)
        }
    }
}

#[test]
fn checkpoint_and_resume_survive_mutated_files() {
    let model = OnnxModel::load(digits("digits_mlp.onnx")).unwrap();
    let train = Dataset::from_npz(&digits("digits_user_train.npz"), "label").unwrap();
    let files = seed_checkpoints(&model, &train);
    let body = |b: &[u8]| fuzz_checks::checkpoint(&model, &train, b);
    for f in &files {
        let r = run_case("checkpoint", 0, "seed", &f.to_bytes().unwrap(), &body);
        assert_eq!(r, Reached::Ran, "every seed checkpoint resumes");
    }
    let mut depth = Depth::default();
    for seed in first_seed()..first_seed() + iters() {
        let mut rng = Rng::new(seed);
        let mut f = files[rng.below(files.len() as u64) as usize].clone();
        let k = 1 + rng.below(3);
        let what: Vec<String> = (0..k).map(|_| mutate_checkpoint(&mut rng, &mut f)).collect();
        // Structural mutations are re-encoded with a valid checksum; some
        // encodings are themselves refused, which is fine too.
        let Ok(bytes) = f.to_bytes() else { continue };
        depth.add(run_case("checkpoint", seed, &what.join("; "), &bytes, &body));
    }
    depth.check("checkpoint", 0.2);
}

#[test]
fn adapter_reader_survives_mutated_files() {
    let seeds = corpus("read_adapter");
    let mut depth = Depth::default();
    for seed in first_seed()..first_seed() + iters() * 4 {
        let mut rng = Rng::new(seed);
        let (name, base) = &seeds[rng.below(seeds.len() as u64) as usize];
        let mut b = base.clone();
        let what = mutate_bytes(&mut rng, &mut b);
        // Mostly with the checksum fixed, so that the header and tensors are reached.
        if rng.below(4) != 0 && b.len() >= 4 {
            let body = b.len() - 4;
            let crc = crc32fast::hash(&b[..body]).to_le_bytes();
            b[body..].copy_from_slice(&crc);
        }
        let r = run_case(
            "read_adapter",
            seed,
            &format!("{name}: {what}"),
            &b,
            &fuzz_checks::adapter_file,
        );
        // Parsed and the rest are one stage here.
        depth.add(if r == Reached::Nothing { r } else { Reached::Ran });
    }
    let ran = depth.0.get("Ran").copied().unwrap_or(0);
    assert!(ran > 0, "some mutated adapter files must still read: {:?}", depth.0);
}

#[test]
fn the_seed_corpus_is_where_the_fuzz_targets_look_for_it() {
    for d in ["onnx", "npz", "read_adapter"] {
        assert!(!corpus(d).is_empty());
    }
    assert!(Path::new(&root().join("fuzz/fuzz_targets/onnx_model.rs")).exists());
}
