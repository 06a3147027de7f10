//! Fuzz target `engine_ops`: see `checks::engine_ops` in `fuzz/checks.rs` (shared with the
//! stable regression test `tests/fuzz_regressions.rs`).
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::engine_ops(data));
