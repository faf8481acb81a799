//! Fuzzes the NPZ/NPY reader (and the data set and writer behind it). Body:
//! `hydra_edge::fuzz_checks::npz`, also run seeded on stable by `tests/fuzz.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hydra_edge::fuzz_checks::npz(data);
});
