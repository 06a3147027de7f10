//! Fuzz target `protocol_tokens`: see `checks::protocol_tokens` in `fuzz/checks.rs` (shared with the stable
//! regression test `tests/fuzz_regressions.rs`).
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::protocol_tokens(data));
