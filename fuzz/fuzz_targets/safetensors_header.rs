//! The safetensors header parser on arbitrary bytes: a typed error or a header whose tensors
//! lie inside the file, sorted, sized by dtype × shape, and not overlapping.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_loader::parse_safetensors;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(tensors) = parse_safetensors(data, Path::new("fuzz.safetensors")) else {
        return;
    };
    let mut last_end = 0;
    for t in &tensors {
        assert!(t.start <= t.end && t.end <= data.len(), "{t:?} outside the file");
        let numel: usize = t.shape.iter().product();
        assert_eq!(t.end - t.start, numel * t.dtype.size_bytes(), "{t:?}");
        if t.start != t.end {
            assert!(t.start >= last_end, "{t:?} overlaps an earlier tensor");
            last_end = t.end;
        }
    }
});
