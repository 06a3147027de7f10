//! `config.json` validation on arbitrary text: a typed error, or a config whose tensor list and
//! parameter count can be computed and which reads back identically from its own
//! `to_hf_json` (the contract `ModelConfig::to_hf_json` documents).
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_loader::ModelConfig;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("fuzz/config.json");
    let Ok(config) = ModelConfig::from_json_str(text, origin) else {
        return;
    };
    let _ = config.num_parameters();
    // The tensor list is one entry per weight; skip only absurd layer counts for speed.
    if config.num_layers <= 4096 {
        let _ = config.expected_tensors();
    }
    let back = ModelConfig::from_json_str(&config.to_hf_json().to_string(), origin)
        .expect("a config's own to_hf_json reads back");
    assert_eq!(back, config, "to_hf_json round trip");
});
