//! inspect, train, eval, merge, run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use hydra_edge::Tensor;
use hydra_edge::adapter::{AdapterFile, DType};
use hydra_edge::backbone::Feed;
use hydra_edge::export::{merge_adapter_file_checked, write_atomic};
use hydra_edge::infer::Model;
use hydra_edge::model::AdaptedModel;
use hydra_edge::model::split_config_for;
use hydra_edge::model::{CacheConfig, CacheDtype, HeadConfig};
use hydra_edge::onnx::layers::linear_layers;
use hydra_edge::onnx::{OnnxModel, SplitConfig, Targets};
use hydra_edge::output::check_output;
use hydra_edge::train::npz::{read_npz, write_npz};
use hydra_edge::train::{Dataset, Event, Loss, TrainConfig, Trainer};
use hydra_edge::{HydraConfig, Variant};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{ArrayD, IxDyn};
use serde_json::json;

use crate::{OptimizerArg, ScheduleArg, TrainArgs, VariantArg};

/// Inputs for a model when none are given: zeros (token ids and masks: 1),
/// batch `batch`, other symbolic dims 16. Declared dims are not trusted: an
/// input of more than 2²⁶ values (256 MB of f32) is refused, not allocated.
pub fn synthetic_feed(model: &OnnxModel, batch: usize) -> Result<Feed> {
    const MAX_VALUES: usize = 1 << 26;
    let mut f = Feed::new();
    for name in model.input_names() {
        let dims: Vec<usize> = model
            .input_shape(&name)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, d)| d.unwrap_or(if i == 0 { batch } else { 16 }))
            .collect();
        let values = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if values.is_none_or(|n| n > MAX_VALUES) {
            bail!(
                "input `{name}` declares shape {dims:?}, too large for a synthetic check input \
                 (more than {MAX_VALUES} values); give real inputs (e.g. --check-data)"
            );
        }
        let t = if model.input_is_integer(&name) {
            Tensor::I64(ArrayD::from_elem(IxDyn(&dims), 1))
        } else {
            Tensor::F32(ArrayD::from_elem(IxDyn(&dims), 0.5))
        };
        f.insert(name, t);
    }
    Ok(f)
}

/// `e`, with "`verb` PATH" in front unless it already names the path (an
/// I/O error's context does), so that no message says a path twice.
fn named_err(e: hydra_edge::Error, verb: &str, path: &Path) -> anyhow::Error {
    let text = e.to_string();
    let shown = path.display().to_string();
    if text.contains(&shown) {
        anyhow::Error::new(e)
    } else {
        anyhow::Error::new(e).context(format!("{verb} {shown}"))
    }
}

fn named<T>(r: hydra_edge::Result<T>, verb: &str, path: &Path) -> Result<T> {
    r.map_err(|e| named_err(e, verb, path))
}

fn mb(b: usize) -> f64 {
    b as f64 / 1e6
}

pub fn inspect(path: &Path, output: Option<&str>, json: bool) -> Result<()> {
    let model = named(OnnxModel::load(path), "loading", path)?;
    let g = model.index()?;
    let layers = linear_layers(&g)?;
    let inputs: Vec<_> =
        model.input_names().into_iter().map(|n| (n.clone(), model.input_shape(&n))).collect();
    // The cuts are judged against one output: the one asked for, else the
    // first ranked (what `train` picks without --output-tensor).
    let ranked = model.ranked_outputs();
    let chosen = match output {
        Some(o) => o.to_string(),
        None => ranked.first().cloned().context("the model has no outputs")?,
    };
    if !g.producer.contains_key(chosen.as_str()) {
        bail!("--output-tensor `{chosen}` is not a tensor of this model");
    }
    let up = g.upstream(&chosen);
    let layers: Vec<_> = layers.into_iter().filter(|l| up.contains(&l.node)).collect();
    let out = Some(chosen.clone());
    let mut suggestions: Vec<(String, Targets, Option<String>)> =
        vec![("all linear layers".into(), Targets::AllLinear, out.clone())];
    let blocks: Vec<&str> =
        layers.iter().filter_map(|l| l.block.as_deref()).fold(Vec::new(), |mut v, b| {
            if !v.contains(&b) {
                v.push(b);
            }
            v
        });
    for k in [1, 2].into_iter().filter(|&k| k <= blocks.len()) {
        suggestions.push((
            format!("linear layers of the last {k} block(s)"),
            Targets::LastBlocks(k),
            out.clone(),
        ));
    }
    if let Some(last) = layers.last() {
        suggestions.push((
            format!("last layer `{}`", last.name),
            Targets::Names(vec![last.name.clone()]),
            out.clone(),
        ));
    }
    suggestions.push((format!("head only: a new head on `{chosen}`"), Targets::None, out.clone()));
    // Without a usable synthetic input the suggestions are listed without a memory estimate.
    let feed = synthetic_feed(&model, 1);
    if let Err(e) = &feed {
        eprintln!("note: no memory estimates: {e}");
    }
    let mut rows = Vec::new();
    for (what, targets, output) in suggestions {
        let head_only = targets == Targets::None;
        let cfg = SplitConfig { targets, output, ..SplitConfig::default() };
        let split = AdaptedModel::new(&model, &cfg)
            .and_then(|s| if head_only { s.check_new_head().map(|()| s) } else { Ok(s) });
        match split {
            Ok(mut s) => {
                let mem = feed.as_ref().ok().and_then(|f| s.estimate_memory(f).ok());
                let r = s.report();
                rows.push(json!({"suggestion": what, "trainable": true, "adapted_layers": r.adapted.len(), "tail_ops": r.tail_ops.len(),
                    "boundary": r.boundary, "trainable_params": r.trainable_params, "tail_frozen_params": r.tail_frozen_params,
                    "train_memory_mb_at_batch_32": mem.map(|m| mb(m.at_batch(32)))}));
            }
            Err(e) => {
                rows.push(json!({"suggestion": what, "trainable": false, "reason": e.to_string()}))
            }
        }
    }
    if json {
        let l: Vec<_> = layers.iter().map(|l| json!({"name": l.name, "kind": format!("{:?}", l.kind), "in": l.in_dim, "out": l.out_dim, "block": l.block, "weight": l.weight})).collect();
        println!(
            "{}",
            json!({"model": path, "opset": model.opset(), "params": model.num_params(), "inputs": inputs, "outputs": ranked.iter().map(|o| json!({"name": o, "shape": model.output_shape(o)})).collect::<Vec<_>>(), "output": chosen, "linear_layers": l, "suggestions": rows})
        );
        return Ok(());
    }
    println!("{}  (opset {}, {} parameters)", path.display(), model.opset(), model.num_params());
    for (n, s) in &inputs {
        let dims: Vec<String> = s
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|d| d.map_or("?".into(), |d| d.to_string()))
            .collect();
        println!("  input  {n} [{}]", dims.join(", "));
    }
    for o in &ranked {
        let dims: Vec<String> = model
            .output_shape(o)
            .unwrap_or_default()
            .iter()
            .map(|d| d.map_or("?".into(), |d| d.to_string()))
            .collect();
        let mark = if *o == chosen { "  ← the cuts below end here" } else { "" };
        println!("  output {o} [{}]{mark}", dims.join(", "));
    }
    if !ranked.contains(&chosen) {
        println!("  tensor {chosen}  ← the cuts below end here");
    }
    println!("adaptable linear layers feeding `{chosen}` ({}):", layers.len());
    for l in &layers {
        println!(
            "  {:<48} {:?} {}→{} {}",
            l.name,
            l.kind,
            l.in_dim,
            l.out_dim,
            l.block.as_deref().unwrap_or("")
        );
    }
    println!("suggested targets:");
    for r in rows {
        if r["trainable"] == true {
            println!(
                "  ✔ {}: {} adapted layers, {} tail ops, {} trainable / {} frozen tail params, {}",
                r["suggestion"].as_str().unwrap_or(""),
                r["adapted_layers"],
                r["tail_ops"],
                r["trainable_params"],
                r["tail_frozen_params"],
                r["train_memory_mb_at_batch_32"]
                    .as_f64()
                    .map_or("memory not estimated".into(), |m| format!(
                        "~{m:.1} MB to train at batch 32"
                    ))
            );
        } else {
            println!(
                "  ✘ {}: {}",
                r["suggestion"].as_str().unwrap_or(""),
                r["reason"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn pair<T: std::str::FromStr>(s: &str, what: &str) -> Result<(T, T)>
where
    T::Err: std::fmt::Display,
{
    let parts: Vec<&str> = s.split(',').collect();
    let p = |x: &str| x.trim().parse::<T>().map_err(|e| anyhow::anyhow!("bad {what} `{x}`: {e}"));
    match parts[..] {
        [a] => Ok((p(a)?, p(a)?)),
        [a, b] => Ok((p(a)?, p(b)?)),
        _ => bail!("{what} takes one value or two (parallel,sequential)"),
    }
}

fn targets(s: &str) -> Result<Targets> {
    Ok(match s {
        "all" => Targets::AllLinear,
        "none" => Targets::None,
        _ if s.starts_with("last:") => {
            Targets::LastBlocks(s[5..].parse().context("last:K needs a number")?)
        }
        _ => {
            let pats: Vec<String> =
                s.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
            if pats.is_empty() {
                bail!(
                    "--targets `{s}` names no layer (use `all`, `last:K`, `none` or name patterns)"
                );
            }
            Targets::Patterns(pats)
        }
    })
}

/// `--targets` items, resolved against the model's layers: an exact layer
/// name is that layer; a glob (`*`, `?`) is every layer it matches; any other
/// item is a substring that must match exactly one layer — a substring that
/// matches several is an error naming them (it would silently adapt more
/// layers than meant).
fn resolve_targets(t: Targets, model: &OnnxModel) -> Result<Targets> {
    let Targets::Patterns(items) = t else { return Ok(t) };
    let g = model.index()?;
    let layers = linear_layers(&g)?;
    let mut names: Vec<String> = Vec::new();
    for p in &items {
        let hits: Vec<&str> = if layers.iter().any(|l| l.name == *p) {
            vec![p.as_str()]
        } else {
            layers
                .iter()
                .filter(|l| hydra_edge::onnx::layers::matches(p, &l.name))
                .map(|l| l.name.as_str())
                .collect()
        };
        match hits.len() {
            0 => bail!(
                "--targets `{p}` matches no adaptable layer (`hydra-edge inspect` lists them)"
            ),
            n if n > 1 && !p.contains(['*', '?']) => bail!(
                "--targets `{p}` matches {n} layers ({}{}): name one exactly, or use a glob such as `{p}*` to mean all of them",
                hits.iter().take(4).copied().collect::<Vec<_>>().join(", "),
                if n > 4 { ", …" } else { "" }
            ),
            _ => names.extend(hits.iter().map(|h| h.to_string())),
        }
    }
    names.dedup();
    Ok(Targets::Names(names))
}

fn head(s: &str) -> Result<HeadConfig> {
    match s {
        "keep" => Ok(HeadConfig::Keep),
        _ if s.starts_with("new:") => {
            Ok(HeadConfig::New(s[4..].parse().context("new:N needs a number")?))
        }
        _ => bail!("--head is `keep` or `new:N`"),
    }
}

pub fn train(a: &TrainArgs, json: bool) -> Result<()> {
    // Every output is checked before any work: an unwritable --out is found now, not after the epochs.
    let mut inputs: Vec<&Path> = vec![&a.model, &a.data];
    inputs.extend(a.eval.as_deref());
    // --out, --checkpoint and --plot must be three different files, and none
    // may be an input (--resume included: --out must not replace the
    // checkpoint a run resumes from; --checkpoint may, that is its job).
    let mut outs: Vec<&Path> = vec![&a.out];
    outs.extend(a.checkpoint.as_deref());
    outs.extend(a.plot.as_deref());
    for (k, o) in outs.iter().enumerate() {
        let mut forbidden = inputs.clone();
        forbidden.extend(outs.iter().take(k));
        if k == 0 || Some(*o) != a.checkpoint.as_deref() {
            forbidden.extend(a.resume.as_deref());
        }
        check_output(o, &forbidden)?;
    }
    let model = named(OnnxModel::load(&a.model), "loading", &a.model)?;
    let train = Dataset::from_npz(&a.data, &a.label_key)?;
    let eval = a.eval.as_ref().map(|p| Dataset::from_npz(p, &a.label_key)).transpose()?;
    if let (Some(p), Some(e)) = (&a.eval, &eval)
        && e.is_empty()
    {
        bail!("--eval {}: no samples", p.display());
    }
    let (rp, rs) = pair::<usize>(&a.rank, "rank")?;
    let (sp, ss) = pair::<f32>(&a.scale, "scale")?;
    let mut adapter = HydraConfig { seed: a.seed, ..HydraConfig::default() };
    adapter.variant = match a.variant {
        VariantArg::Hydra => Variant::Hydra,
        VariantArg::Lora => Variant::Lora,
        VariantArg::Seqlora => Variant::SeqLora,
    };
    (
        adapter.parallel.rank,
        adapter.sequential.rank,
        adapter.parallel.scale,
        adapter.sequential.scale,
    ) = (rp, rs, sp, ss);
    if !(0.0..1.0).contains(&a.dropout) {
        bail!("--dropout {} must be in [0, 1)", a.dropout);
    }
    (adapter.parallel.dropout, adapter.sequential.dropout) = (a.dropout, a.dropout);
    let head_cfg = head(&a.head)?;
    let targets = resolve_targets(targets(&a.targets)?, &model)?;
    if matches!(targets, Targets::None) && head_cfg == HeadConfig::Keep {
        bail!(
            "nothing to train: --targets none adapts no layer and --head keep adds no head (use --head new:N, or name layers)"
        );
    }
    let split = AdaptedModel::new(
        &model,
        &SplitConfig {
            targets,
            output: a.output_tensor.clone(),
            adapter,
            ..SplitConfig::default()
        },
    )?;
    // The backbone plan and the tail hold what they need: free the file's copy.
    drop(model);
    hydra_edge::runtime::release_freed_memory();
    let loss = match train.labels() {
        hydra_edge::train::Labels::Classes(_) => Loss::CrossEntropy { label_smoothing: 0.0 },
        hydra_edge::train::Labels::Values(_) => Loss::Mse,
    };
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch,
        lr: a.lr,
        min_lr: match a.schedule {
            ScheduleArg::Cosine => a.min_lr,
            ScheduleArg::Constant => a.lr,
        },
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        optimizer: match a.optimizer {
            OptimizerArg::Adamw => hydra_edge::train::OptimizerKind::default(),
            OptimizerArg::Sgd => hydra_edge::train::OptimizerKind::Sgd { momentum: 0.9 },
        },
        clip_norm: (a.clip > 0.0).then_some(a.clip),
        seed: a.seed,
        loss,
        head: head_cfg,
        memory_budget: a.budget_mb.map(|m| (m * 1e6) as usize),
        divergence_factor: (a.divergence_factor > 0.0).then_some(a.divergence_factor),
        cache: CacheConfig {
            enabled: !a.no_cache,
            gpu_budget: a.gpu_cache_mb.saturating_mul(1_000_000),
            ..CacheConfig::default()
        },
        ..TrainConfig::default()
    };
    let mut t = match &a.resume {
        Some(p) => Trainer::resume(split, cfg, p).map_err(|e| named_err(e, "resuming from", p))?,
        None => Trainer::new(split, cfg)?,
    };
    let r = t.model().report().clone();
    if !json {
        println!(
            "{} layers adapted, {} trainable parameters, tail of {} ops ending at `{}`",
            r.adapted.len(),
            r.trainable_params,
            r.tail_ops.len(),
            r.output
        );
        // Which layers, by name and shape: a pattern may match more than meant.
        let shown = 12;
        for l in t.model().adapted_layers().iter().take(shown) {
            println!("  adapted {} ({}→{})", l.name, l.in_dim, l.out_dim);
        }
        if r.adapted.len() > shown {
            println!("  … and {} more (--json lists them all)", r.adapted.len() - shown);
        }
        if a.resume.is_none() && !a.no_cache {
            println!(
                "epoch 1 runs the frozen backbone once per sample to build the feature cache; later epochs read it"
            );
        }
        let m = t.estimate_memory(&train)?;
        println!(
            "estimated peak training memory {:.1} MB (cache {:.1}{}, activations {:.1}, parameters {:.1}, backbone {:.1})",
            mb(m.total_bytes),
            mb(m.cache_bytes),
            if m.gpu_cache_bytes > 0 {
                format!(" + {:.1} on the GPU", mb(m.gpu_cache_bytes))
            } else {
                String::new()
            },
            mb(m.activation_bytes),
            mb(m.parameter_bytes),
            mb(m.backbone_bytes)
        );
    }
    let per_epoch = train.len().div_ceil(a.batch) as u64;
    let mut all = Vec::new();
    let start = Instant::now();
    let mut diverged = None;
    // The epochs a resumed run's checkpoint holds; what this run saved.
    let resumed_at = t.position().0;
    let mut saved_epoch = None;
    while (t.position().0 as usize) < a.epochs {
        let epoch = t.position().0;
        let bar = (!json).then(|| {
            let b = ProgressBar::new(per_epoch);
            b.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(format!("{}/{}", epoch + 1, a.epochs));
            b
        });
        let metrics = t.fit_epoch(&train, eval.as_ref(), &mut |e| match e {
            Event::Step { loss, .. } => {
                if let Some(b) = &bar {
                    b.set_message(format!("loss {loss:.4}"));
                    b.inc(1);
                }
            }
            Event::Skipped { step, reason } => eprintln!("step {step} skipped: {reason}"),
            Event::Epoch(_) => {}
        });
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let metrics: Vec<_> = match metrics {
            Ok(m) => m.into_iter().collect(),
            // No checkpoint of the diverged state: the last one stays the last good one.
            Err(e @ hydra_edge::Error::Diverged { .. }) => {
                diverged = Some(e);
                break;
            }
            Err(e) => return Err(e.into()),
        };
        for m in metrics {
            if !json && m.prefix_samples > 0 && !a.no_cache && m.epoch == 0 {
                println!(
                    "  (epoch 1 built the feature cache: {} samples through the backbone)",
                    m.prefix_samples
                );
            }
            if json {
                println!(
                    "{}",
                    json!({"epoch": m.epoch, "train_loss": m.train_loss, "train_accuracy": m.train_accuracy, "eval_loss": m.eval_loss, "eval_accuracy": m.eval_accuracy, "skipped": m.skipped_steps, "seconds": m.seconds, "prefix_samples": m.prefix_samples})
                );
            } else {
                println!(
                    "epoch {:>3}: loss {:.4}  acc {}  eval loss {}  eval acc {}  {:.1}s",
                    m.epoch + 1,
                    m.train_loss,
                    m.train_accuracy.map_or("-".into(), |v| format!("{v:.3}")),
                    m.eval_loss.map_or("-".into(), |v| format!("{v:.4}")),
                    m.eval_accuracy.map_or("-".into(), |v| format!("{v:.3}")),
                    m.seconds
                );
            }
            all.push(m);
        }
        if let Some(c) = &a.checkpoint {
            t.save_checkpoint(c)?;
            saved_epoch = Some(t.position().0);
        }
    }
    // What to write: the best epoch (unless --keep-last on a run that did not diverge).
    if (!a.keep_last || diverged.is_some())
        && let Some((epoch, score)) = t.best_epoch()
    {
        t.restore_best()?;
        if !json && (diverged.is_some() || epoch + 1 != t.position().0) {
            let what = if eval.is_some() { "eval loss" } else { "train loss" };
            println!("keeping epoch {} ({what} {score:.4}), the best", epoch + 1);
        }
    }
    if let Some(e) = diverged {
        // Only what is true: the checkpoint this run last wrote, or the one it resumed from.
        let ckpt = match (&a.checkpoint, saved_epoch, &a.resume) {
            (Some(c), Some(k), _) => {
                format!("; {} holds epoch {k}, the last good one", c.display())
            }
            (_, None, Some(r)) => format!(
                "; {} is untouched: it holds epoch {resumed_at}, the last good one",
                r.display()
            ),
            _ => String::new(),
        };
        let Some((best, _)) = t.best_epoch() else {
            bail!("{e}; nothing was written to {}{ckpt} (lower --lr)", a.out.display());
        };
        write_unless_better(&mut t, a, eval.as_ref().unwrap_or(&train))?;
        bail!(
            "{e}; wrote epoch {}'s adapter (the best) to {}{ckpt} (lower --lr)",
            best + 1,
            a.out.display()
        );
    }
    write_unless_better(&mut t, a, eval.as_ref().unwrap_or(&train))?;
    if !json && !all.is_empty() {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!(
            "\n| epoch | train loss | train acc | eval loss | eval acc | seconds | skipped |\n|---|---|---|---|---|---|---|"
        );
        for m in &all {
            println!(
                "| {} | {:.4} | {} | {} | {} | {:.2} | {} |",
                m.epoch + 1,
                m.train_loss,
                f(m.train_accuracy),
                f(m.eval_loss),
                f(m.eval_accuracy),
                m.seconds,
                m.skipped_steps
            );
        }
    }
    if let Some(p) = &a.plot {
        crate::plot::learning_curve(&all, p)?;
    }
    if json {
        println!(
            "{}",
            json!({"adapter": a.out, "trainable_params": r.trainable_params, "adapted": r.adapted, "output": r.output, "seconds": start.elapsed().as_secs_f64()})
        );
    } else {
        println!("wrote {} ({:.1}s)", a.out.display(), start.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Writes the trainer's adapter to `--out`, unless a file there loads on this
/// model and scores better on `data` (and `--overwrite` is not given): then
/// that file is kept, this run's adapter goes to `OUT.new`, and it is an
/// error.
fn write_unless_better(t: &mut Trainer, a: &TrainArgs, data: &Dataset) -> Result<()> {
    let mut mine = t.adapter_file(false, DType::F32)?;
    // Where the data came from, so that `merge` can check on real inputs.
    for (key, path) in [("data", Some(&a.data)), ("eval_data", a.eval.as_ref())] {
        if let Some(p) = path.and_then(|p| std::fs::canonicalize(p).ok()) {
            mine.header.metadata.insert(key.into(), p.display().to_string());
        }
    }
    let existing = if a.overwrite { None } else { AdapterFile::load(&a.out).ok() };
    let Some(old) = existing else {
        mine.save(&a.out)?;
        return Ok(());
    };
    let new_score = t.evaluate_cached(data)?.0;
    // Only a file this model can load is comparable; the trainer gets its own parameters back.
    let old_score = match t.load(&old) {
        Ok(()) => Some(t.evaluate_cached(data)?.0),
        Err(_) => None,
    };
    t.load(&mine)?;
    let why = match old_score {
        Some(s) if s < new_score => format!(
            "holds an adapter that scores better on this run's {} data (loss {s:.4} vs {new_score:.4})",
            if a.eval.is_some() { "eval" } else { "training" }
        ),
        Some(_) => {
            mine.save(&a.out)?;
            return Ok(());
        }
        // A valid adapter for another model or configuration: not this run's to replace.
        None => "holds an adapter for another model or configuration".to_string(),
    };
    let mut new_path = a.out.clone().into_os_string();
    new_path.push(".new");
    let new_path = std::path::PathBuf::from(new_path);
    check_output(&new_path, &[&a.model, &a.data, &a.out])?;
    mine.save(&new_path)?;
    bail!(
        "{} {why}: kept it, and wrote this run's adapter to {} (pass --overwrite to replace it)",
        a.out.display(),
        new_path.display()
    );
}

fn load_adapted(model: &OnnxModel, adapter: &Path) -> Result<Trainer> {
    let file = named(AdapterFile::load(adapter), "loading", adapter)?;
    let (cfg, classes) = split_config_for(&file);
    let split = AdaptedModel::new(model, &cfg)?;
    let loss = file
        .header
        .metadata
        .get("loss")
        .and_then(|l| serde_json::from_str::<Loss>(l).ok())
        .unwrap_or(Loss::CrossEntropy { label_smoothing: 0.0 });
    let head = classes.map_or(HeadConfig::Keep, HeadConfig::New);
    let mut t = Trainer::new(split, TrainConfig { loss, head, ..TrainConfig::default() })?;
    t.load(&file)?;
    Ok(t)
}

pub fn eval(model: &Path, adapter: &Path, data: &Path, label_key: &str, json: bool) -> Result<()> {
    let m = OnnxModel::load(model)?;
    let mut t = load_adapted(&m, adapter)?;
    let d = Dataset::from_npz(data, label_key)?;
    let (loss, acc) = t.evaluate(&d)?;
    if json {
        println!("{}", json!({"samples": d.len(), "loss": loss, "accuracy": acc}));
    } else {
        println!(
            "{} samples: loss {loss:.4}{}",
            d.len(),
            acc.map_or(String::new(), |a| format!(", accuracy {a:.4}"))
        );
    }
    Ok(())
}

/// Rows `start..end` (axis 0) of a tensor.
fn slice_rows(t: &Tensor, start: usize, end: usize) -> Tensor {
    use ndarray::{Axis, Slice};
    let s = Slice::from(start..end);
    match t {
        Tensor::F32(a) => Tensor::F32(a.slice_axis(Axis(0), s).to_owned()),
        Tensor::F16(a) => Tensor::F16(a.slice_axis(Axis(0), s).to_owned()),
        Tensor::I64(a) => Tensor::I64(a.slice_axis(Axis(0), s).to_owned()),
    }
}

/// The batches' outputs joined along axis 0 (an output without a batch axis: the first).
fn concat_rows(parts: Vec<&Tensor>) -> Result<Tensor> {
    use ndarray::{Axis, concatenate};
    let first = parts.first().copied().context("no batch ran")?;
    if parts.len() == 1 || first.shape().is_empty() {
        return Ok(first.clone());
    }
    let err = |e: ndarray::ShapeError| anyhow::anyhow!("outputs of the batches do not stack: {e}");
    Ok(match first {
        Tensor::F32(_) => {
            let v: Vec<_> = parts
                .iter()
                .map(|t| t.f32("output").map(|a| a.view()))
                .collect::<hydra_edge::Result<_>>()?;
            Tensor::F32(concatenate(Axis(0), &v).map_err(err)?)
        }
        Tensor::I64(_) => {
            let v: Vec<_> = parts
                .iter()
                .map(|t| t.i64("output").map(|a| a.view()))
                .collect::<hydra_edge::Result<_>>()?;
            Tensor::I64(concatenate(Axis(0), &v).map_err(err)?)
        }
        Tensor::F16(_) => {
            let v: Vec<_> = parts
                .iter()
                .map(|t| t.to_f32("output").map(|a| a.into_owned()))
                .collect::<hydra_edge::Result<_>>()?;
            let views: Vec<_> = v.iter().map(|a| a.view()).collect();
            Tensor::F32(concatenate(Axis(0), &views).map_err(err)?)
        }
    })
}

/// Samples checked by `merge` when the adapter names its data.
const RECORDED_CHECK_SAMPLES: usize = 16;
/// Recorded data files above this size are not read for the check.
const RECORDED_MAX_BYTES: u64 = 256 << 20;

/// The first samples of the data the adapter was trained on (its eval data
/// first), when the adapter records the file, the file still reads, and it
/// holds every input of the model; else `None` (merge then checks on
/// synthetic inputs and says so).
fn recorded_data(file: &AdapterFile, m: &OnnxModel) -> Option<(PathBuf, Feed)> {
    let md = &file.header.metadata;
    for key in ["eval_data", "data"] {
        let Some(p) = md.get(key).map(PathBuf::from).filter(|p| p.is_file()) else { continue };
        // Read whole to take 16 samples: not for a file that would strain a device.
        if std::fs::metadata(&p).map_or(true, |md| md.len() > RECORDED_MAX_BYTES) {
            continue;
        }
        let Ok(mut f) = feed_from_npz(&p) else { continue };
        f.retain(|k, _| m.input_names().contains(k));
        if f.len() != m.input_names().len() {
            continue;
        }
        // A model that fixes its batch gets exactly that many samples.
        let fixed = m.input_names().iter().find_map(|k| m.input_shape(k)?.first().copied()?);
        let mut first = Feed::new();
        for (k, t) in f {
            let have = t.shape().first().copied().unwrap_or(0);
            let n = fixed.unwrap_or(have.min(RECORDED_CHECK_SAMPLES));
            if n == 0 || n > have {
                break;
            }
            first.insert(k, t.rows(0..n));
        }
        if first.len() == m.input_names().len() {
            return Some((p, first));
        }
    }
    None
}

fn feed_from_npz(path: &Path) -> Result<Feed> {
    Ok(read_npz(path)?.into_iter().collect())
}

pub fn merge(
    model: &Path,
    adapter: &Path,
    out: &Path,
    softmax: bool,
    check: Option<&Path>,
    json: bool,
) -> Result<()> {
    let mut inputs = vec![model, adapter];
    inputs.extend(check);
    check_output(out, &inputs)?;
    let m = OnnxModel::load(model)?;
    let file = named(AdapterFile::load(adapter), "loading", adapter)?;
    // The check data is read (and must hold samples) before anything is written.
    let mut recorded = None;
    let feed = match check {
        Some(p) => {
            let mut f = feed_from_npz(p)?;
            f.retain(|k, _| m.input_names().contains(k));
            let n = f.values().next().and_then(|t| t.shape().first().copied()).unwrap_or(0);
            if n == 0 {
                bail!(
                    "--check-data {}: no samples of the model's inputs to check with",
                    p.display()
                );
            }
            f
        }
        None => match recorded_data(&file, &m) {
            Some((p, f)) => {
                recorded = Some(p);
                f
            }
            None => synthetic_feed(&m, 4)?,
        },
    };
    let mut checked_on = match (check, &recorded) {
        (Some(p), _) => format!("{}", p.display()),
        (None, Some(p)) => format!("{} (the adapter's training data)", p.display()),
        (None, None) => "synthetic".to_string(),
    };
    // The merged model is written to a temporary file beside `out`, checked
    // against the unmerged one, and only then renamed onto `out`.
    let (mut max_abs, mut scale) = (0.0f32, 1e-12f32);
    // Set when the unmerged model cannot run the check data at all (a
    // recorded file that no longer fits the model): then, and only then,
    // the check is retried on synthetic inputs. A check that runs and
    // disagrees is never retried.
    let data_unusable = std::cell::Cell::new(false);
    let mut verify =
        |feed: &Feed, tmp: &Path, adapted: &mut AdaptedModel| -> hydra_edge::Result<()> {
            let refuse = |m: String| hydra_edge::Error::Config(format!("merge check failed: {m}"));
            // The reference in f32 whatever `--matmul-precision` says: the
            // check is of the merge, not of bf16 rounding.
            let want =
                hydra_edge::runtime::with_f32_products(|| adapted.predict(feed, CacheDtype::F32))
                    .inspect_err(|_| data_unusable.set(true))?;
            let name = if adapted.head().is_some() {
                "head_logits".to_string()
            } else {
                adapted.report().output.clone()
            };
            let merged = Model::load(tmp)?;
            let k = merged
                .output_names()
                .iter()
                .position(|o| *o == name)
                .ok_or_else(|| refuse(format!("the merged model lacks `{name}`")))?;
            let got = merged.run(feed)?.swap_remove(k);
            let got = got.f32("merged")?;
            if got.shape() != want.shape() {
                return Err(refuse(format!(
                    "merged output {:?} vs unmerged {:?}",
                    got.shape(),
                    want.shape()
                )));
            }
            // NaN-aware: a NaN anywhere is an error, never a max that drops it.
            max_abs =
                got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, |m, d| {
                    if d.is_nan() || m.is_nan() { f32::NAN } else { m.max(d) }
                });
            if !max_abs.is_finite() {
                return Err(refuse(
                    "the merged or unmerged model produced non-finite outputs; nothing was written"
                        .into(),
                ));
            }
            scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
            Ok(())
        };
    let merged =
        merge_adapter_file_checked(&m, &file, out, softmax, &mut |t, a| verify(&feed, t, a));
    let (report, _) = match merged {
        Err(e) if recorded.is_some() && data_unusable.get() => {
            eprintln!(
                "note: the adapter's recorded data does not run on this model ({e}); checking on synthetic inputs instead"
            );
            checked_on = "synthetic".to_string();
            let synthetic = synthetic_feed(&m, 4)?;
            merge_adapter_file_checked(&m, &file, out, softmax, &mut |t, a| {
                verify(&synthetic, t, a)
            })?
        }
        r => r?,
    };
    if json {
        println!(
            "{}",
            json!({"merged": out, "layers": report.layers, "external_files": report.external_files, "max_abs_error": max_abs, "max_rel_error": max_abs / scale, "checked_on": checked_on})
        );
    } else {
        println!(
            "merged {} layers into {} (merged vs unmerged: max abs error {max_abs:.3e}, relative {:.3e})",
            report.layers,
            out.display(),
            max_abs / scale
        );
        for f in &report.external_files {
            println!("  external weights: {}", f.display());
        }
        if checked_on == "synthetic" {
            println!(
                "  note: checked on synthetic inputs only (constant values, token ids 1), a weak check; pass --check-data with real inputs"
            );
        } else {
            println!("  checked on {checked_on}");
        }
    }
    Ok(())
}

pub fn run(
    model: &Path,
    input: &Path,
    output: Option<&Path>,
    batch: usize,
    json: bool,
) -> Result<()> {
    if let Some(o) = output {
        check_output(o, &[model, input])?;
    }
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let m = Model::load(model)?;
    let mut feed = feed_from_npz(input)?;
    feed.retain(|k, _| m.input_names().contains(k));
    let n = feed.values().next().and_then(|t| t.shape().first().copied()).unwrap_or(0);
    if feed.values().any(|t| t.shape().first() != Some(&n)) {
        bail!("the input arrays disagree on the number of samples (axis 0)");
    }
    let t0 = Instant::now();
    // In batches: the model's peak memory is that of one batch, not of the file.
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    for start in (0..n.max(1)).step_by(batch) {
        let end = (start + batch).min(n);
        let part: Feed = feed
            .iter()
            .map(|(k, t)| Ok((k.clone(), slice_rows(t, start, end.max(start)))))
            .collect::<Result<_>>()?;
        parts.push(m.run(&part)?);
        if n == 0 {
            break;
        }
    }
    let outs: Vec<Tensor> = (0..m.output_names().len())
        .map(|k| concat_rows(parts.iter().map(|p| &p[k]).collect()))
        .collect::<Result<_>>()?;
    let secs = t0.elapsed().as_secs_f64();
    let mut map = BTreeMap::new();
    for (n, t) in m.output_names().iter().zip(outs) {
        if !json {
            print!("{n}: {:?}", t.shape());
            if let Tensor::F32(a) = &t
                && a.ndim() == 2
            {
                let arg: Vec<usize> = a
                    .outer_iter()
                    .take(8)
                    .map(|r| {
                        r.iter()
                            .enumerate()
                            .fold(
                                (0, f32::NEG_INFINITY),
                                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                            )
                            .0
                    })
                    .collect();
                print!("  argmax of the first rows {arg:?}");
            }
            println!();
        }
        map.insert(n.clone(), t);
    }
    if let Some(p) = output {
        named(write_atomic(p, &write_npz(&map)), "writing", p)?;
    }
    if json {
        let shapes: BTreeMap<_, _> =
            map.iter().map(|(k, v)| (k.clone(), v.shape().to_vec())).collect();
        println!("{}", json!({"outputs": shapes, "seconds": secs}));
    } else {
        println!("({:.1} ms)", secs * 1e3);
    }
    Ok(())
}
