//! Fuzzes the ONNX path: loader, graph index, layer finder, split (three
//! target choices), the tract backbone and one forward/backward of the
//! adapted model. Body: `hydra_edge::fuzz_checks::onnx_model`, also run
//! seeded and bounded on stable by `tests/fuzz.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hydra_edge::fuzz_checks::onnx_model(data);
});
