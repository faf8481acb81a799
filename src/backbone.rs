//! The frozen backbone: one optimized tract plan that computes, from the
//! model's inputs, exactly the tensors the tail reads (or the model's own
//! outputs, for a plain inference run). The batch dimension stays symbolic,
//! so any batch size — the last partial one included — runs the same plan.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoRunnable, SymbolValues, TDim, TValue,
    Tensor as TractTensor, TractResult, TypedRunnableModel, tvec,
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

/// The error of the first attempt, when the retry failed too.
fn first_error(e: &Error) -> Error {
    Error::Backbone(match e {
        Error::Backbone(m) => m.clone(),
        e => e.to_string(),
    })
}

/// A tract plan over an ONNX model with chosen outputs.
#[derive(Debug, Clone)]
pub struct Backbone {
    plan: Option<Arc<TypedRunnableModel>>,
    /// The model inputs the plan takes, in order.
    inputs: Vec<String>,
    /// What the plan returns, in order.
    outputs: Vec<String>,
    /// The model's `value_info` had to be ignored (stale declared types).
    ignored_value_info: bool,
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
            let build = |proto: &tract_onnx::pb::ModelProto| {
                guard("building the plan", || {
                    let onnx = tract_onnx::onnx();
                    let mut m = onnx.model_for_proto_model(proto).map_err(tract_err)?;
                    m.select_outputs_by_name(computed.iter().map(|s| s.as_str()))
                        .map_err(tract_err)?;
                    let typed = m.into_optimized().map_err(tract_err)?;
                    typed.into_runnable().map_err(tract_err)
                })
            };
            match build(model.proto()) {
                Ok(p) => Some(p),
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
                    let p = build(&bare).map_err(|_| first_error(&first))?;
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        eprintln!(
                            "note: tract refused the model's declared intermediate types ({first}); the plan was built without them"
                        )
                    });
                    ignored = true;
                    Some(p)
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Backbone { plan, inputs, outputs: outputs.to_vec(), ignored_value_info: ignored })
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

    /// Runs the plan on `feed` (every model input, by name).
    pub fn run(&self, feed: &Feed) -> Result<Vec<Tensor>> {
        let mut computed = Vec::new();
        if let Some(plan) = &self.plan {
            let mut args = tvec![];
            for name in &self.inputs {
                let t = feed
                    .get(name)
                    .ok_or_else(|| Error::NotFound { what: "model input", name: name.clone() })?;
                args.push(TValue::from(to_tract(t)));
            }
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
