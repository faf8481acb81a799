//! Fuzzes checkpoint loading and resuming on the digits model: a checkpoint
//! is refused, or the rest of its epoch trains and finishes. Body:
//! `hydra_edge::fuzz_checks::checkpoint`, also run seeded on stable by
//! `tests/fuzz.rs`. As with `read_adapter`, each input is also tried with its
//! checksum fixed, so that the fuzzer reaches the header and tensors.
#![no_main]

use std::sync::OnceLock;

use hydra_edge::onnx::OnnxModel;
use hydra_edge::train::Dataset;
use libfuzzer_sys::fuzz_target;

fn setup() -> &'static (OnnxModel, Dataset) {
    static S: OnceLock<(OnnxModel, Dataset)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits/");
        let model = OnnxModel::load(format!("{dir}digits_mlp.onnx")).expect("digits model");
        let train = Dataset::from_npz(format!("{dir}digits_user_train.npz").as_ref(), "label")
            .expect("digits data");
        (model, train)
    })
}

fuzz_target!(|data: &[u8]| {
    let (model, train) = setup();
    hydra_edge::fuzz_checks::checkpoint(model, train, data);
    if data.len() >= 4 {
        let body = data.len() - 4;
        let mut fixed = data.to_vec();
        fixed[body..].copy_from_slice(&crc32fast::hash(&data[..body]).to_le_bytes());
        hydra_edge::fuzz_checks::checkpoint(model, train, &fixed);
    }
});
