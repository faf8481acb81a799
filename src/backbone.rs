//! The frozen backbone: one optimized tract plan that computes, from the
//! model's inputs, exactly the tensors the tail reads (or the model's own
//! outputs, for a plain inference run). The batch dimension stays symbolic,
//! so any batch size — the last partial one included — runs the same plan.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, SymbolValues, TDim,
    TValue, Tensor as TractTensor, TractResult, TypedRunnableModel, tvec,
};

use crate::Tensor;
use tract_onnx::tract_core::plan::SimpleState;

use crate::error::{Error, Result};
use crate::onnx::OnnxModel;

/// Named input tensors of a model.
pub type Feed = HashMap<String, Tensor>;

fn tract_err(e: impl core::fmt::Display) -> Error {
    Error::Backbone(format!("{e:#}"))
}

std::thread_local! {
    /// Set while this thread is inside [`guard`]: its panics are reported as errors.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs tract code, turning a panic into an error. tract checks most
/// malformed graphs and returns errors, but some (a node missing an input
/// its op indexes, found by `tests/fuzz.rs`) panic inside it; a user's bad
/// file must never crash the app. The panic message is kept in the error,
/// and not printed by the panic hook (chained: other panics print as before).
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    r.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Error::Backbone(format!(
            "tract failed while {what} (the model is probably malformed): {msg}"
        )))
    })
}

/// Small concrete input shapes for a first per-shape plan: declared dims as
/// they are, symbolic ones 1 for the batch and 8 for the rest.
fn probe_shapes(model: &OnnxModel) -> Vec<(DatumType, Vec<usize>)> {
    model
        .input_names()
        .iter()
        .map(|n| {
            let dt = if model.input_is_integer(n) { DatumType::I64 } else { DatumType::F32 };
            let dims = model
                .input_shape(n)
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, d)| d.unwrap_or(if i == 0 { 1 } else { 8 }))
                .collect();
            (dt, dims)
        })
        .collect()
}

/// The error of the first attempt, when the retry failed too.
fn first_error(e: &Error) -> Error {
    Error::Backbone(match e {
        Error::Backbone(m) => m.clone(),
        e => e.to_string(),
    })
}

type Runnable = Arc<TypedRunnableModel>;
type PlanCache = Arc<std::sync::Mutex<HashMap<Vec<Vec<usize>>, Runnable>>>;

/// How the backbone runs.
#[derive(Debug, Clone)]
enum Plan {
    /// One plan for every input shape (the batch and lengths stay symbolic).
    Any(Runnable),
    /// tract cannot type the graph with symbolic dims (e.g. a Flatten over
    /// the product of two of them): one plan per concrete input shapes,
    /// made on first use and kept.
    PerShape { proto: Arc<tract_onnx::pb::ModelProto>, outputs: Vec<String>, plans: PlanCache },
}

/// A plan for `proto` computing `outputs`, with the inputs' types and shapes
/// fixed to `shapes` (or left as declared when `None`).
fn build_plan(
    proto: &tract_onnx::pb::ModelProto,
    outputs: &[String],
    shapes: Option<&[(DatumType, Vec<usize>)]>,
) -> Result<Runnable> {
    guard("building the plan", || {
        let onnx = tract_onnx::onnx();
        let mut m = onnx.model_for_proto_model(proto).map_err(tract_err)?;
        for (i, (dt, s)) in shapes.unwrap_or_default().iter().enumerate() {
            m.set_input_fact(i, InferenceFact::dt_shape(*dt, s.clone())).map_err(tract_err)?;
        }
        m.select_outputs_by_name(outputs.iter().map(|s| s.as_str())).map_err(tract_err)?;
        let typed = m.into_optimized().map_err(tract_err)?;
        typed.into_runnable().map_err(tract_err)
    })
}

/// A tract plan over an ONNX model with chosen outputs.
#[derive(Debug, Clone)]
pub struct Backbone {
    plan: Option<Plan>,
    /// The model inputs the plan takes, in order.
    inputs: Vec<String>,
    /// What the plan returns, in order.
    outputs: Vec<String>,
    /// The model's `value_info` had to be ignored (stale declared types).
    ignored_value_info: bool,
    /// The batch every input declares as a fixed first dim (`[1, 3, 224,
    /// 224]`), if they all do.
    fixed_batch: Option<usize>,
}

/// The first dim every input of `model` declares as fixed, if all agree.
fn fixed_batch_of(model: &OnnxModel, inputs: &[String]) -> Option<usize> {
    let mut batch = None;
    for name in inputs {
        let b = model.input_shape(name)?.first().copied()??;
        if batch.is_some_and(|x| x != b) {
            return None;
        }
        batch = Some(b);
    }
    batch
}

impl Backbone {
    /// A plan computing `outputs` (tensor names) from the model's inputs.
    /// Outputs that are model inputs are passed through without tract; with
    /// no other output there is no plan at all.
    pub fn new(model: &OnnxModel, outputs: &[String]) -> Result<Backbone> {
        let inputs = model.input_names();
        let computed: Vec<&String> = outputs.iter().filter(|o| !inputs.contains(o)).collect();
        let mut ignored = false;
        let plan = if computed.is_empty() {
            None
        } else {
            let computed: Vec<String> = computed.into_iter().cloned().collect();
            let build = |proto: &tract_onnx::pb::ModelProto| build_plan(proto, &computed, None);
            // Built from the loaded model itself: a copy of the protobuf would
            // hold the weights a third time while tract converts and packs
            // them (the process's peak; ~90 MB for MiniLM).
            let symbolic = match build(model.proto()) {
                Ok(p) => Ok(p),
                // Declared intermediate types and shapes (`value_info`) are
                // hints; converters leave stale ones (onnxconverter-common's
                // fp16 pass types a Cast-to-f32 output f16). tract takes them
                // as facts and refuses; onnxruntime ignores them. Without them
                // tract infers every type itself.
                Err(first) if !model.graph().value_info.is_empty() => {
                    let mut bare = model.proto().clone();
                    if let Some(g) = bare.graph.as_mut() {
                        g.value_info.clear();
                    }
                    match build(&bare) {
                        Ok(p) => {
                            static SAID: std::sync::Once = std::sync::Once::new();
                            SAID.call_once(|| {
                                eprintln!(
                                    "note: tract refused the model's declared intermediate types ({first}); the plan was built without them"
                                )
                            });
                            ignored = true;
                            Ok(p)
                        }
                        Err(_) => Err(first_error(&first)),
                    }
                }
                Err(e) => Err(e),
            };
            match symbolic {
                Ok(p) => Some(Plan::Any(p)),
                // Last resort: concrete input shapes. Tried now on a small
                // probe shape, so that a model tract cannot run at all still
                // fails here, with the first error.
                Err(first) => {
                    let proto = model.proto().clone();
                    let probe = probe_shapes(model);
                    let plan = build_plan(&proto, &computed, Some(&probe))
                        .map_err(|_| first_error(&first))?;
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        eprintln!(
                            "note: tract cannot plan this model for symbolic input shapes ({first}); a plan is built per input shape instead (each new batch or length costs one plan build)"
                        )
                    });
                    let key: Vec<Vec<usize>> = probe.iter().map(|(_, s)| s.clone()).collect();
                    let plans: PlanCache = Arc::default();
                    plans.lock().unwrap_or_else(|e| e.into_inner()).insert(key, plan);
                    Some(Plan::PerShape { proto: Arc::new(proto), outputs: computed, plans })
                }
            }
        };
        let fixed_batch = fixed_batch_of(model, &inputs);
        Ok(Backbone {
            plan,
            inputs,
            outputs: outputs.to_vec(),
            ignored_value_info: ignored,
            fixed_batch,
        })
    }

    /// Whether tract could not plan the model for symbolic input shapes, so
    /// that a plan is built per concrete input shape.
    pub fn plans_per_shape(&self) -> bool {
        matches!(self.plan, Some(Plan::PerShape { .. }))
    }

    /// Whether the model's declared intermediate types (`value_info`) had to
    /// be ignored to build the plan (they contradict the graph).
    pub fn ignored_value_info(&self) -> bool {
        self.ignored_value_info
    }

    /// The model's input names, in the order tract takes them.
    pub fn input_names(&self) -> &[String] {
        &self.inputs
    }

    /// The tensors [`Backbone::run`] returns, in order.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// The batch size the model's inputs fix (`Some(1)` for a `[1, 3, 224,
    /// 224]` input), if they do.
    pub fn fixed_batch(&self) -> Option<usize> {
        self.fixed_batch
    }

    /// Runs the plan on `feed` (every model input, by name).
    ///
    /// A model whose inputs fix the batch at 1 (many exports do) runs any
    /// batch one sample at a time: outputs with a first dim of 1 are
    /// concatenated along it, outputs every sample computes alike (shape
    /// values) are kept once. A model fixed at another batch runs only that
    /// batch; others are an error that says so.
    pub fn run(&self, feed: &Feed) -> Result<Vec<Tensor>> {
        let Some(fixed) = self.fixed_batch else { return self.run_plan(feed) };
        let (name, n) = match self.inputs.iter().find_map(|i| Some((i, feed.get(i)?))) {
            Some((i, t)) => (i, t.shape().first().copied().unwrap_or(1)),
            None => return self.run_plan(feed),
        };
        if n == fixed {
            return self.run_plan(feed);
        }
        if fixed != 1 || n == 0 {
            return Err(Error::Config(format!(
                "the model's inputs fix the batch at {fixed} (`{name}` is declared with a first dim of {fixed}); it runs batches of exactly {fixed}, not {n}: use --batch {fixed} and train without the feature cache (--no-cache), or re-export the model with a dynamic batch"
            )));
        }
        let mut per_sample: Vec<Vec<Tensor>> = Vec::with_capacity(n);
        for i in 0..n {
            let mut one = Feed::new();
            for (k, t) in feed {
                let t = if self.inputs.contains(k) && t.shape().first() == Some(&n) {
                    t.rows(i..i + 1)
                } else {
                    t.clone()
                };
                one.insert(k.clone(), t);
            }
            per_sample.push(self.run_plan(&one)?);
        }
        let outputs = per_sample.first().map_or(0, Vec::len);
        (0..outputs)
            .map(|j| {
                let parts: Vec<&Tensor> = per_sample.iter().map(|o| &o[j]).collect();
                if parts.iter().all(|t| t.shape().first() == Some(&1)) {
                    concat_rows(&parts)
                } else if parts.iter().all(|t| *t == parts[0]) {
                    Ok(parts[0].clone())
                } else {
                    Err(Error::Backbone(format!(
                        "`{}` has no batch axis but differs between samples; this batch-1 model cannot run batches of {n}: use --batch 1",
                        self.outputs[j]
                    )))
                }
            })
            .collect()
    }

    fn run_plan(&self, feed: &Feed) -> Result<Vec<Tensor>> {
        let mut computed = Vec::new();
        if let Some(plan) = &self.plan {
            let mut args = tvec![];
            for name in &self.inputs {
                let t = feed
                    .get(name)
                    .ok_or_else(|| Error::NotFound { what: "model input", name: name.clone() })?;
                args.push(TValue::from(to_tract(t)));
            }
            let plan: Runnable = match plan {
                Plan::Any(p) => p.clone(),
                Plan::PerShape { proto, outputs, plans } => {
                    let key: Vec<Vec<usize>> = args.iter().map(|a| a.shape().to_vec()).collect();
                    let mut plans = plans.lock().unwrap_or_else(|e| e.into_inner());
                    match plans.get(&key) {
                        Some(p) => p.clone(),
                        None => {
                            let shapes: Vec<(DatumType, Vec<usize>)> =
                                args.iter().map(|a| (a.datum_type(), a.shape().to_vec())).collect();
                            let p = build_plan(proto, outputs, Some(&shapes))?;
                            plans.insert(key, p.clone());
                            p
                        }
                    }
                }
            };
            let plan = &plan;
            // Symbols (the batch) as the inputs pin them, for outputs that
            // tract folded to a symbolic dimension.
            let mut symbols = SymbolValues::default();
            for (i, a) in args.iter().enumerate() {
                let fact = plan.model().input_fact(i).map_err(tract_err)?;
                for (d, &v) in fact.shape.iter().zip(a.shape()) {
                    if let TDim::Sym(sym) = d {
                        symbols.set(sym, v as i64);
                    }
                }
            }
            let outs = guard("running the plan", || {
                let mut state = SimpleState::new(plan).map_err(tract_err)?;
                state.run(args).map_err(tract_err)
            })?;
            let symbols = &symbols;
            for v in outs {
                computed.push(from_tract(&v, symbols)?);
            }
        }
        let mut computed = computed.into_iter();
        self.outputs
            .iter()
            .map(|o| match feed.get(o) {
                Some(t) if self.inputs.contains(o) => Ok(t.clone()),
                None if self.inputs.contains(o) => {
                    Err(Error::NotFound { what: "model input in the data", name: o.clone() })
                }
                _ => computed.next().ok_or_else(|| {
                    Error::Backbone(format!(
                        "tract's plan returned fewer outputs than asked for; `{o}` is missing"
                    ))
                }),
            })
            .collect()
    }
}

/// `parts` (one row each) stacked along the first axis.
fn concat_rows(parts: &[&Tensor]) -> Result<Tensor> {
    use ndarray::{ArrayD, ArrayViewD, Axis};
    fn cat<T: Clone>(v: Vec<ArrayViewD<'_, T>>) -> Result<ArrayD<T>> {
        ndarray::concatenate(Axis(0), &v)
            .map_err(|e| Error::Backbone(format!("stacking samples: {e}")))
    }
    let kind = |t: &Tensor| core::mem::discriminant(t);
    if parts.iter().any(|t| kind(t) != kind(parts[0])) {
        return Err(Error::Backbone("samples gave outputs of different types".into()));
    }
    Ok(match parts[0] {
        Tensor::F32(_) => Tensor::F32(cat(parts
            .iter()
            .filter_map(|t| t.f32("").ok())
            .map(|a| a.view())
            .collect())?),
        Tensor::F16(_) => Tensor::F16(cat(parts
            .iter()
            .filter_map(|t| if let Tensor::F16(a) = t { Some(a.view()) } else { None })
            .collect())?),
        Tensor::I64(_) => Tensor::I64(cat(parts
            .iter()
            .filter_map(|t| t.i64("").ok())
            .map(|a| a.view())
            .collect())?),
    })
}

fn to_tract(t: &Tensor) -> TractTensor {
    match t {
        Tensor::F32(a) => TractTensor::from(a.clone()),
        Tensor::F16(a) => TractTensor::from(a.clone()),
        Tensor::I64(a) => TractTensor::from(a.clone()),
    }
}

fn from_tract(t: &TractTensor, symbols: &SymbolValues) -> Result<Tensor> {
    if let Ok(v) = t.to_plain_array_view::<f32>() {
        return Ok(Tensor::F32(v.to_owned()));
    }
    if let Ok(v) = t.to_plain_array_view::<i64>() {
        return Ok(Tensor::I64(v.to_owned()));
    }
    if let Ok(v) = t.to_plain_array_view::<tract_onnx::prelude::f16>() {
        return Ok(Tensor::F16(v.to_owned()));
    }
    // Shape arithmetic that tract keeps as dimensions, possibly symbolic in
    // the batch: evaluated with the symbols this run resolved.
    if let Ok(v) = t.to_plain_array_view::<TDim>() {
        let ints: Vec<i64> = v
            .iter()
            .map(|d| d.eval_to_i64(symbols))
            .collect::<TractResult<_>>()
            .map_err(tract_err)?;
        return Ok(Tensor::I64(
            ndarray::ArrayD::from_shape_vec(v.raw_dim(), ints).map_err(tract_err)?,
        ));
    }
    if t.datum_type().is_integer() || t.datum_type() == DatumType::Bool {
        let c = t.cast_to::<i64>().map_err(tract_err)?;
        return Ok(Tensor::I64(c.to_plain_array_view::<i64>().map_err(tract_err)?.to_owned()));
    }
    if let Ok(c) = t.cast_to::<f32>() {
        return Ok(Tensor::F32(c.to_plain_array_view::<f32>().map_err(tract_err)?.to_owned()));
    }
    Err(Error::Backbone(format!("unsupported output type {:?}", t.datum_type())))
}
