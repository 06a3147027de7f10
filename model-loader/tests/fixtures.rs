//! Opening the reference fixtures: config values, tensor access, rope_theta layouts, sharding.

mod common;

use common::{copy_fixture, edit_config, fixtures, scratch};
use model_loader::{
    write_safetensors, Arch, Checkpoint, DType, LoadError, ModelConfig, TensorSpec,
};
use serde_json::json;
use std::path::Path;

#[test]
fn tiny_llama_opens_with_expected_config() {
    let ckpt = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    let c = ckpt.config();
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.arch.name(), "LlamaForCausalLM");
    assert_eq!(
        (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (3, 4, 2, 16)
    );
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.vocab_size),
        (64, 160, 512)
    );
    assert_eq!(c.rope_theta, 1e4);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert!(!c.attention_bias && !c.qk_norm && !c.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, vec![0]);
    assert_eq!(c.bos_token_id, None);
    assert_eq!(c.max_position_embeddings, 4096);

    assert_eq!(
        ckpt.files(),
        vec![fixtures().join("tiny-llama/model.safetensors")]
    );
    let views = ckpt.tensors();
    assert_eq!(views.len(), c.expected_tensors().len());
    assert!(views.windows(2).all(|w| w[0].name < w[1].name));
    assert!(views.iter().all(|v| v.dtype == DType::F32));

    let q = ckpt
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.shape, &[64, 64]);
    assert_eq!(q.numel(), 64 * 64);
    assert_eq!(q.data.len(), 64 * 64 * 4);
    let f = q.to_f32();
    assert_eq!(f.len(), 64 * 64);
    assert_eq!(f[5], f32::from_le_bytes(q.data[20..24].try_into().unwrap()));
    assert!(f.iter().all(|x| x.is_finite()) && f.iter().any(|&x| x != 0.0));
    assert_eq!(q.to_bf16()[5], half::bf16::from_f32(f[5]));
    let k = ckpt
        .tensor("model.layers.2.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(k.shape, &[32, 64]);
}

#[test]
fn tiny_qwen2_opens_with_expected_config() {
    let ckpt = Checkpoint::open(&fixtures().join("tiny-qwen2")).unwrap();
    let c = ckpt.config();
    assert_eq!(c.arch, Arch::Qwen2);
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (6, 2, 16));
    assert_eq!((c.hidden_size, c.num_layers, c.vocab_size), (96, 2, 384));
    assert_eq!(c.rope_theta, 1e6);
    assert!(c.attention_bias && !c.qk_norm);
    assert!(ckpt.tensors().iter().all(|v| v.dtype == DType::BF16));

    let bias = ckpt.tensor("model.layers.1.self_attn.k_proj.bias").unwrap();
    assert_eq!(bias.shape, &[32]);
    let wide = bias.to_f32();
    let raw = bias.to_bf16();
    assert_eq!(wide.len(), 32);
    for (w, r) in wide.iter().zip(&raw) {
        assert_eq!(*w, r.to_f32());
    }
    assert!(ckpt.tensor("model.layers.0.self_attn.o_proj.bias").is_err());
}

#[test]
fn missing_tensor_lookup_is_typed() {
    let ckpt = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    match ckpt.tensor("model.layers.9.mlp.up_proj.weight") {
        Err(LoadError::MissingTensor { tensor, .. }) => {
            assert_eq!(tensor, "model.layers.9.mlp.up_proj.weight")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn top_level_rope_theta_parses() {
    let text = std::fs::read_to_string(fixtures().join("tiny-llama/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), json!(500000.0));
    let c = ModelConfig::from_json_str(&v.to_string(), Path::new("config.json")).unwrap();
    assert_eq!(c.rope_theta, 5e5);

    // The same through a checkpoint directory, with an integer-valued rope_theta.
    let dir = copy_fixture("tiny-qwen2", "top_level_rope_theta");
    edit_config(&dir, |c| {
        c.remove("rope_parameters");
        c.insert("rope_theta".into(), json!(1000000));
    });
    assert_eq!(Checkpoint::open(&dir).unwrap().config().rope_theta, 1e6);
}

#[test]
fn config_round_trips_through_hf_json() {
    for fixture in ["tiny-llama", "tiny-qwen2"] {
        let c = ModelConfig::from_file(&fixtures().join(fixture).join("config.json")).unwrap();
        let text = serde_json::to_string_pretty(&c.to_hf_json()).unwrap();
        let back = ModelConfig::from_json_str(&text, Path::new("x")).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.to_hf_json()["rope_theta"], json!(c.rope_theta as f64));
    }
}

/// Splits a fixture's tensors into two shards plus an index and checks every tensor is identical.
fn sharded_copy_is_identical(fixture: &str) {
    let src = Checkpoint::open(&fixtures().join(fixture)).unwrap();
    let dir = scratch(&format!("sharded-{fixture}"));
    std::fs::copy(
        fixtures().join(fixture).join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();

    let views = src.tensors();
    let (first, second) = views.split_at(views.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let shard = format!("model-{:05}-of-00002.safetensors", i + 1);
        let specs: Vec<TensorSpec> = part
            .iter()
            .map(|v| TensorSpec {
                name: v.name.to_string(),
                dtype: v.dtype,
                shape: v.shape.to_vec(),
            })
            .collect();
        write_safetensors(&dir.join(&shard), &specs, &mut |i, w| {
            w.write_all(part[i].data)
        })
        .unwrap();
        for v in part {
            weight_map.insert(v.name.to_string(), json!(shard));
        }
    }
    let total: usize = views.iter().map(|v| v.data.len()).sum();
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();

    let sharded = Checkpoint::open(&dir).unwrap();
    assert_eq!(sharded.files().len(), 2);
    assert_eq!(sharded.config(), src.config());
    assert_eq!(sharded.dir(), dir.as_path());
    let got = sharded.tensors();
    assert_eq!(got.len(), views.len());
    for (a, b) in views.iter().zip(&got) {
        assert_eq!((a.name, a.dtype, a.shape), (b.name, b.dtype, b.shape));
        assert_eq!(a.data, b.data, "{}", a.name);
    }
}

#[test]
fn sharded_tiny_llama_is_byte_identical() {
    sharded_copy_is_identical("tiny-llama");
}

#[test]
fn sharded_tiny_qwen2_is_byte_identical() {
    sharded_copy_is_identical("tiny-qwen2");
}

#[test]
fn tied_checkpoint_with_lm_head_is_accepted() {
    let dir = copy_fixture("tiny-llama", "tied_with_lm_head");
    edit_config(&dir, |c| {
        c.insert("tie_word_embeddings".into(), json!(true));
    });
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.config().tie_word_embeddings);
    assert!(!ckpt
        .config()
        .expected_tensors()
        .iter()
        .any(|(n, _)| n == "lm_head.weight"));
    assert!(ckpt.tensor("lm_head.weight").is_ok());
}

#[test]
fn extra_tensors_are_ignored() {
    let dir = copy_fixture("tiny-llama", "extra_tensors");
    let path = dir.join("model.safetensors");
    let (mut header, mut data) = common::read_raw(&path);
    let start = data.len();
    data.extend_from_slice(&[0u8; 32]);
    header.insert(
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        json!({"dtype": "F32", "shape": [8], "data_offsets": [start, start + 32]}),
    );
    common::write_raw(&path, &header, &data);
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(
        ckpt.tensor("model.layers.0.self_attn.rotary_emb.inv_freq")
            .unwrap()
            .to_f32(),
        vec![0.0; 8]
    );
}
