//! The GGUF loader on arbitrary bytes: header and tensor index, the config the metadata
//! describes, and dequantising every tensor. A typed error at any stage is fine; a panic is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_loader::gguf::{gguf_config, load_tensors, parse_gguf};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.gguf");
    let Ok(header) = parse_gguf(data, path) else {
        return;
    };
    for t in &header.tensors {
        assert!(t.start <= t.end && t.end <= data.len(), "{t:?} outside the file");
    }
    let has_output = header.tensors.iter().any(|t| t.name == "output.weight");
    let has_qkv_bias = header.tensors.iter().any(|t| t.name == "blk.0.attn_q.bias");
    let Ok(config) = gguf_config(&header, path, has_output, has_qkv_bias) else {
        return;
    };
    if let Ok(tensors) = load_tensors(&header, data, path, &config) {
        for t in &tensors {
            assert_eq!(t.values.len(), t.shape.iter().product::<usize>(), "{}", t.name);
        }
    }
});
