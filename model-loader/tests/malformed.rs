//! One test per malformed input, each asserting the specific `LoadError` variant it produces.

mod common;

use common::{copy_fixture, edit_config, edit_header, fixtures, read_raw, write_raw};
use model_loader::{Checkpoint, LoadError};
use serde_json::json;
use std::path::Path;

fn open(dir: &Path) -> LoadError {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened but should not", dir.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line message: {msg}");
            e
        }
    }
}

fn weights(dir: &Path) -> std::path::PathBuf {
    dir.join("model.safetensors")
}

#[test]
fn truncated_to_a_few_bytes() {
    let dir = copy_fixture("tiny-llama", "truncated_few");
    let bytes = std::fs::read(weights(&dir)).unwrap();
    std::fs::write(weights(&dir), &bytes[..5]).unwrap();
    match open(&dir) {
        LoadError::HeaderTooShort { path, len } => {
            assert_eq!((path, len), (weights(&dir), 5));
        }
        e => panic!("{e:?}"),
    }
    std::fs::write(weights(&dir), b"").unwrap();
    assert!(matches!(
        open(&dir),
        LoadError::HeaderTooShort { len: 0, .. }
    ));
}

#[test]
fn truncated_data_region() {
    let dir = copy_fixture("tiny-llama", "truncated_data");
    let bytes = std::fs::read(weights(&dir)).unwrap();
    std::fs::write(weights(&dir), &bytes[..bytes.len() - 100]).unwrap();
    let e = open(&dir);
    assert!(matches!(e, LoadError::OffsetsOutOfRange { .. }), "{e:?}");
}

#[test]
fn truncated_inside_header() {
    let dir = copy_fixture("tiny-qwen2", "truncated_header");
    let bytes = std::fs::read(weights(&dir)).unwrap();
    std::fs::write(weights(&dir), &bytes[..200]).unwrap();
    match open(&dir) {
        LoadError::HeaderLength { len, file_len, .. } => assert_eq!((len, file_len), (2760, 200)),
        e => panic!("{e:?}"),
    }
}

#[test]
fn header_length_past_the_end() {
    let dir = copy_fixture("tiny-llama", "header_len_past_end");
    let mut bytes = std::fs::read(weights(&dir)).unwrap();
    let file_len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&(file_len * 3).to_le_bytes());
    std::fs::write(weights(&dir), &bytes).unwrap();
    match open(&dir) {
        LoadError::HeaderLength {
            len, file_len: f, ..
        } => assert_eq!((len, f), (file_len * 3, file_len)),
        e => panic!("{e:?}"),
    }
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(weights(&dir), &bytes).unwrap();
    assert!(matches!(open(&dir), LoadError::HeaderLength { .. }));
}

#[test]
fn header_not_json() {
    let dir = copy_fixture("tiny-llama", "header_not_json");
    let mut bytes = std::fs::read(weights(&dir)).unwrap();
    bytes[8] = b'[';
    std::fs::write(weights(&dir), &bytes).unwrap();
    assert!(matches!(open(&dir), LoadError::HeaderJson { .. }));
}

#[test]
fn offsets_out_of_range() {
    let dir = copy_fixture("tiny-llama", "offsets_out_of_range");
    let name = "model.norm.weight";
    let data_len = read_raw(&weights(&dir)).1.len() as u64;
    edit_header(&dir, |h| {
        h[name]["data_offsets"] = json!([data_len - 128, data_len + 128]);
    });
    match open(&dir) {
        LoadError::OffsetsOutOfRange {
            tensor,
            end,
            data_len: d,
            ..
        } => {
            assert_eq!((tensor.as_str(), end, d), (name, data_len + 128, data_len));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn overlapping_offsets() {
    let dir = copy_fixture("tiny-llama", "overlapping");
    let a = "model.layers.0.input_layernorm.weight";
    let b = "model.layers.0.post_attention_layernorm.weight";
    edit_header(&dir, |h| {
        let offsets = h[a]["data_offsets"].clone();
        h[b]["data_offsets"] = offsets;
    });
    match open(&dir) {
        LoadError::OverlappingTensors { a: x, b: y, .. } => {
            let mut got = [x, y];
            got.sort();
            assert_eq!(got, [a.to_string(), b.to_string()]);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn unsupported_dtype() {
    for dtype in ["I64", "F8_E4M3"] {
        let dir = copy_fixture("tiny-qwen2", &format!("dtype_{dtype}"));
        let name = "model.layers.1.mlp.up_proj.weight";
        edit_header(&dir, |h| h[name]["dtype"] = json!(dtype));
        match open(&dir) {
            LoadError::UnsupportedDType {
                tensor, dtype: d, ..
            } => {
                assert_eq!((tensor.as_str(), d.as_str()), (name, dtype));
            }
            e => panic!("{e:?}"),
        }
    }
}

#[test]
fn byte_length_disagrees_with_shape() {
    let dir = copy_fixture("tiny-llama", "byte_length");
    let name = "model.layers.1.self_attn.v_proj.weight";
    edit_header(&dir, |h| h[name]["shape"] = json!([32, 65]));
    match open(&dir) {
        LoadError::ByteLength {
            tensor,
            expected,
            actual,
            ..
        } => {
            assert_eq!(
                (tensor.as_str(), expected, actual),
                (name, 32 * 65 * 4, 32 * 64 * 4)
            );
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn wrong_shape() {
    let dir = copy_fixture("tiny-llama", "wrong_shape");
    let name = "model.layers.0.self_attn.q_proj.weight";
    edit_header(&dir, |h| h[name]["shape"] = json!([128, 32]));
    let e = open(&dir);
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor `{name}` has shape [128, 32], expected [64, 64]",
            weights(&dir).display()
        )
    );
    match e {
        LoadError::WrongShape {
            path,
            tensor,
            expected,
            actual,
        } => {
            assert_eq!(path, weights(&dir));
            assert_eq!(tensor, name);
            assert_eq!((expected, actual), (vec![64, 64], vec![128, 32]));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn wrong_shape_from_config() {
    let dir = copy_fixture("tiny-qwen2", "wrong_shape_config");
    edit_config(&dir, |c| {
        c.insert("intermediate_size".into(), json!(128));
    });
    match open(&dir) {
        LoadError::WrongShape {
            tensor,
            expected,
            actual,
            ..
        } => {
            assert_eq!(tensor, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!((expected, actual), (vec![128, 96], vec![160, 96]));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture("tiny-qwen2", "missing_tensor");
    let name = "model.layers.1.self_attn.v_proj.bias";
    edit_header(&dir, |h| {
        h.remove(name);
    });
    match open(&dir) {
        LoadError::MissingTensor { path, tensor } => {
            assert_eq!((path, tensor.as_str()), (weights(&dir), name));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn missing_lm_head_when_untied() {
    let dir = copy_fixture("tiny-llama", "missing_lm_head");
    edit_header(&dir, |h| {
        h.remove("lm_head.weight");
    });
    assert!(
        matches!(open(&dir), LoadError::MissingTensor { tensor, .. } if tensor == "lm_head.weight")
    );
}

#[test]
fn invalid_config_json() {
    let dir = copy_fixture("tiny-llama", "invalid_config_json");
    std::fs::write(
        dir.join("config.json"),
        "{\"architectures\": [\"LlamaForCausalLM\"],",
    )
    .unwrap();
    match open(&dir) {
        LoadError::ConfigJson { path, .. } => assert_eq!(path, dir.join("config.json")),
        e => panic!("{e:?}"),
    }
}

#[test]
fn missing_config_file() {
    let dir = copy_fixture("tiny-llama", "missing_config");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    match open(&dir) {
        LoadError::Io { path, source } => {
            assert_eq!(path, dir.join("config.json"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn inconsistent_config_heads_not_divisible() {
    let dir = copy_fixture("tiny-llama", "inconsistent_heads");
    edit_config(&dir, |c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    match open(&dir) {
        LoadError::InconsistentConfig { msg, .. } => {
            assert!(
                msg.contains("num_attention_heads (4)") && msg.contains("num_key_value_heads (3)"),
                "{msg}"
            )
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn inconsistent_config_head_dim_underivable() {
    let dir = copy_fixture("tiny-qwen2", "inconsistent_head_dim");
    edit_config(&dir, |c| {
        c.insert("hidden_size".into(), json!(100));
    });
    assert!(matches!(open(&dir), LoadError::InconsistentConfig { .. }));
}

#[test]
fn missing_config_field() {
    let dir = copy_fixture("tiny-llama", "missing_field");
    edit_config(&dir, |c| {
        c.remove("hidden_size");
    });
    match open(&dir) {
        LoadError::ConfigField { path, field, .. } => {
            assert_eq!(
                (path, field.as_str()),
                (dir.join("config.json"), "hidden_size")
            );
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn zero_size_config_field() {
    let dir = copy_fixture("tiny-llama", "zero_field");
    edit_config(&dir, |c| {
        c.insert("num_attention_heads".into(), json!(0));
    });
    assert!(
        matches!(open(&dir), LoadError::ConfigField { field, .. } if field == "num_attention_heads")
    );
}

#[test]
fn unsupported_architecture() {
    let dir = copy_fixture("tiny-llama", "unsupported_arch");
    edit_config(&dir, |c| {
        c.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
        c.insert("model_type".into(), json!("gpt2"));
    });
    match open(&dir) {
        LoadError::UnsupportedArch { arch, .. } => assert_eq!(arch, "GPT2LMHeadModel"),
        e => panic!("{e:?}"),
    }
}

/// A sharded copy of tiny-llama whose index lists a second shard that is not on disk.
#[test]
fn index_names_missing_shard() {
    let dir = copy_fixture("tiny-llama", "missing_shard");
    std::fs::rename(weights(&dir), dir.join("model-00001-of-00002.safetensors")).unwrap();
    let (header, _) = read_raw(&dir.join("model-00001-of-00002.safetensors"));
    let mut weight_map = serde_json::Map::new();
    for name in header.keys().filter(|k| *k != "__metadata__") {
        weight_map.insert(name.clone(), json!("model-00001-of-00002.safetensors"));
    }
    weight_map.insert(
        "model.norm.weight".into(),
        json!("model-00002-of-00002.safetensors"),
    );
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::write(&index_path, json!({ "weight_map": weight_map }).to_string()).unwrap();
    match open(&dir) {
        LoadError::MissingShard {
            index_path: p,
            shard,
        } => {
            assert_eq!(
                (p, shard.as_str()),
                (index_path, "model-00002-of-00002.safetensors")
            );
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn index_invalid_or_escaping() {
    let dir = copy_fixture("tiny-llama", "bad_index");
    std::fs::remove_file(weights(&dir)).unwrap();
    let index_path = dir.join("model.safetensors.index.json");
    for text in [
        "{",
        "{\"weight_map\": 3}",
        "{\"weight_map\": {\"a\": \"../x.safetensors\"}}",
    ] {
        std::fs::write(&index_path, text).unwrap();
        assert!(matches!(open(&dir), LoadError::IndexJson { .. }), "{text}");
    }
    std::fs::remove_file(&index_path).unwrap();
    assert!(matches!(open(&dir), LoadError::NoWeights { .. }));
}

#[test]
fn tensor_in_two_shards() {
    let dir = copy_fixture("tiny-llama", "duplicate_tensor");
    std::fs::copy(weights(&dir), dir.join("b.safetensors")).unwrap();
    std::fs::rename(weights(&dir), dir.join("a.safetensors")).unwrap();
    let index = json!({ "weight_map": { "model.norm.weight": "a.safetensors", "lm_head.weight": "b.safetensors" } });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert!(matches!(open(&dir), LoadError::DuplicateTensor { .. }));
}

#[test]
fn corrupted_headers_never_panic() {
    let src = std::fs::read(fixtures().join("tiny-qwen2/model.safetensors")).unwrap();
    let dir = copy_fixture("tiny-qwen2", "fuzz");
    let header_end = 8 + u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..300 {
        let mut bytes = src.clone();
        for _ in 0..(1 + round % 4) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let i = (state % header_end as u64) as usize;
            bytes[i] = b"0123456789[]{}\",:-eE. "[(state >> 40) as usize % 22];
        }
        std::fs::write(weights(&dir), &bytes).unwrap();
        let _ = Checkpoint::open(&dir);
    }
    let (header, data) = read_raw(&fixtures().join("tiny-qwen2/model.safetensors"));
    write_raw(&weights(&dir), &header, &data);
    assert!(Checkpoint::open(&dir).is_ok());
}
