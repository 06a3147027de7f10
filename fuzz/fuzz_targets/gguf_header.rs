//! Fuzz target `gguf_header`: see `checks::gguf_header` in `fuzz/checks.rs` (shared with the stable
//! regression test `tests/fuzz_regressions.rs`).
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::gguf_header(data));
