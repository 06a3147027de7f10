//! GGUF loading: fixtures converted to GGUF (llama.cpp's layout) load back to exactly the
//! safetensors values, and each malformed file gives its own typed error naming the file.

mod common;

use common::{fixtures, scratch};
use model_loader::gguf::{gguf_from_checkpoint, parse_gguf, write_gguf, GgufTensorSpec};
use model_loader::{Checkpoint, GgmlType, GgufValue, LoadError};
use std::path::{Path, PathBuf};

fn fixture_gguf(fixture: &str, test: &str) -> (Checkpoint, PathBuf) {
    let src = Checkpoint::open(&fixtures().join(fixture)).expect("fixture opens");
    let path = scratch(test).join("model.gguf");
    std::fs::write(&path, gguf_from_checkpoint(&src, &[])).unwrap();
    (src, path)
}

fn open_err(path: &Path) -> LoadError {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line message: {msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            e
        }
    }
}

#[test]
fn fixtures_round_trip_through_gguf() {
    for fixture in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let (src, path) = fixture_gguf(fixture, &format!("round_trip_{fixture}"));
        // Opening the file, and the directory holding it (no config.json there).
        for target in [path.clone(), path.parent().unwrap().to_path_buf()] {
            let ck = Checkpoint::open(&target).expect("gguf opens");
            assert_eq!(ck.config().arch, src.config().arch, "{fixture}");
            assert_eq!(ck.config().num_kv_heads, src.config().num_kv_heads);
            assert_eq!(ck.config().head_dim, src.config().head_dim);
            assert_eq!(ck.config().attention_bias, src.config().attention_bias);
            assert_eq!(
                ck.config().tie_word_embeddings,
                src.config().tie_word_embeddings
            );
            assert_eq!(ck.files(), vec![path.clone()]);
            let gguf = ck.gguf().expect("gguf source");
            assert_eq!(gguf.version, 3);
            for (name, _) in src.config().expected_tensors() {
                let a = src.tensor(&name).unwrap();
                let b = ck.tensor(&name).unwrap();
                assert_eq!(a.shape, b.shape, "{fixture} {name}");
                // Exact: F32 storage, and the q/k rows are back in Hugging Face's order.
                assert_eq!(a.to_f32(), b.to_f32(), "{fixture} {name}");
                assert_eq!(gguf.stored_types.get(&name), Some(&GgmlType::F32));
            }
        }
    }
}

#[test]
fn bad_magic_and_version() {
    let (_, path) = fixture_gguf("tiny-llama", "bad_magic");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..4].copy_from_slice(b"GGUX");
    std::fs::write(&path, &bytes).unwrap();
    match open_err(&path) {
        LoadError::GgufMagic { found, .. } => assert_eq!(&found, b"GGUX"),
        e => panic!("{e:?}"),
    }
    bytes[..4].copy_from_slice(b"GGUF");
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        open_err(&path),
        LoadError::GgufVersion { version: 7, .. }
    ));
}

#[test]
fn truncated_metadata() {
    let (_, path) = fixture_gguf("tiny-llama", "truncated");
    let bytes = std::fs::read(&path).unwrap();
    // Cut inside the metadata (the first key starts at byte 24).
    for cut in [2, 10, 30, 60, 200] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert!(
            matches!(open_err(&path), LoadError::GgufTruncated { .. }),
            "cut at {cut}"
        );
    }
    // An array whose count exceeds the file is truncation, not an allocation.
    let meta = vec![(
        "tokenizer.ggml.tokens".to_string(),
        GgufValue::Array(vec![GgufValue::U8(1)]),
    )];
    let mut b = write_gguf(&meta, &[]);
    // count field: after magic, version, 2 counts, key (8 + 21), value type 4, elem type 4.
    let at = 4 + 4 + 8 + 8 + 8 + 21 + 4 + 4;
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    match parse_gguf(&b, Path::new("x.gguf")) {
        Err(LoadError::GgufTruncated { what, .. }) => assert_eq!(what, "tokenizer.ggml.tokens"),
        other => panic!("{other:?}"),
    }
}

fn one_tensor(dims: Vec<u64>, type_id: u32, data_len: usize) -> Vec<u8> {
    write_gguf(
        &[(
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        )],
        &[GgufTensorSpec {
            name: "blk.0.attn_q.weight".into(),
            dims,
            type_id,
            data: vec![0u8; data_len],
        }],
    )
}

#[test]
fn tensor_data_out_of_range() {
    let path = scratch("out_of_range").join("m.gguf");
    // 64 x 2 F32 values need 512 bytes; 100 are written.
    let b = one_tensor(vec![64, 2], 0, 100);
    std::fs::write(&path, &b).unwrap();
    match open_err(&path) {
        LoadError::GgufTensorData { tensor, end, .. } => {
            assert_eq!(tensor, "blk.0.attn_q.weight");
            assert!(end > b.len() as u64);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn unknown_quant_type() {
    let path = scratch("unknown_quant").join("m.gguf");
    // ggml type 13 is Q5_K, not dequantised here.
    std::fs::write(&path, one_tensor(vec![256, 1], 13, 176)).unwrap();
    match open_err(&path) {
        LoadError::UnknownQuant {
            tensor, type_id, ..
        } => assert_eq!((tensor.as_str(), type_id), ("blk.0.attn_q.weight", 13)),
        e => panic!("{e:?}"),
    }
}

#[test]
fn shape_not_whole_blocks() {
    let path = scratch("partial_block").join("m.gguf");
    // Q4_1 blocks hold 32 values; 40 columns is not a whole number of blocks.
    std::fs::write(&path, one_tensor(vec![40, 1], 3, 40)).unwrap();
    assert!(matches!(open_err(&path), LoadError::GgufShape { .. }));
}

#[test]
fn shape_inconsistent_with_metadata() {
    let src = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    let path = scratch("wrong_shape").join("m.gguf");
    // Claim 2 heads of 16 in the metadata while q_proj holds 4 heads' rows.
    let mut b = gguf_from_checkpoint(&src, &[]);
    let key = b"llama.attention.head_count";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // value type (4 bytes, U32) then the value
    b[at + 4..at + 8].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    match open_err(&path) {
        LoadError::WrongShape {
            tensor,
            expected,
            actual,
            ..
        } => {
            assert_eq!(tensor, "model.layers.0.self_attn.q_proj.weight");
            assert_eq!((expected, actual), (vec![32, 64], vec![64, 64]));
        }
        e => panic!("{e:?}"),
    }
    let mut b = gguf_from_checkpoint(&src, &[]);
    let key = b"llama.feed_forward_length";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    b[at + 4..at + 8].copy_from_slice(&96u32.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    match open_err(&path) {
        LoadError::WrongShape {
            tensor,
            expected,
            actual,
            ..
        } => {
            assert!(tensor.contains("mlp."), "{tensor}");
            assert!(
                expected.contains(&96) && actual.contains(&160),
                "{expected:?} {actual:?}"
            );
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn missing_metadata_and_unsupported_arch() {
    let path = scratch("bad_meta").join("m.gguf");
    std::fs::write(&path, write_gguf(&[], &[])).unwrap();
    match open_err(&path) {
        LoadError::GgufMetadata { key, .. } => assert_eq!(key, "general.architecture"),
        e => panic!("{e:?}"),
    }
    let meta = [(
        "general.architecture".to_string(),
        GgufValue::String("mamba".into()),
    )];
    std::fs::write(&path, write_gguf(&meta, &[])).unwrap();
    assert!(matches!(open_err(&path), LoadError::UnsupportedArch { .. }));
    let meta = [(
        "general.architecture".to_string(),
        GgufValue::String("llama".into()),
    )];
    std::fs::write(&path, write_gguf(&meta, &[])).unwrap();
    match open_err(&path) {
        LoadError::GgufMetadata { key, msg, .. } => {
            assert_eq!(
                (key.as_str(), msg.as_str()),
                ("llama.vocab_size", "is missing")
            )
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn directory_with_two_ggufs_is_ambiguous() {
    let dir = scratch("two_ggufs");
    for n in ["a.gguf", "b.gguf"] {
        std::fs::write(dir.join(n), b"GGUF").unwrap();
    }
    match Checkpoint::open(&dir) {
        Err(LoadError::AmbiguousGguf { count: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
}
