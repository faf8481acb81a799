//! Fuzzes the adapter-file reader: whatever the bytes, `from_bytes` returns
//! (never panics, never over-allocates), and what it accepts re-encodes to a
//! file that reads back to the same bytes.
//!
//! Random bytes almost never carry a valid CRC-32, which would stop every
//! input at the checksum; so each input is also tried with its last four
//! bytes replaced by the right checksum, which lets the fuzzer reach the
//! header and tensor parsing behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    hydra_edge::fuzz_checks::adapter_file(data);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 4 {
        let body = data.len() - 4;
        let mut fixed = data.to_vec();
        fixed[body..].copy_from_slice(&crc32fast::hash(&data[..body]).to_le_bytes());
        check(&fixed);
    }
});
