//! Shared helpers for the integration tests: fixture paths, engines, logit comparison.
#![allow(dead_code)]

pub mod sample_ref;

pub mod agreement;
pub mod decode;
pub mod graph_script;

use serde_json::Value;
use spindle::backend::cpu::CpuBackend;
use spindle::replay::tree_file::{NodeLogits, TreeLimits, TreeNode};
use spindle::{AttentionMode, Engine, EngineConfig};
use std::path::PathBuf;

pub const FIXTURES: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"];

/// The fixtures folder: `$SPINDLE_FIXTURES` when set (the GPU runner sets it, since a test
/// binary carried to another machine has this checkout's path baked in), else
/// `tests/fixtures` of this checkout.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("SPINDLE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// A scratch folder for files a test writes: `$SPINDLE_SCRATCH/<name>` when set (the GPU
/// runner sets it), else `<name>` under cargo's per-target temporary folder.
pub fn scratch(name: &str) -> PathBuf {
    match std::env::var_os("SPINDLE_SCRATCH") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name),
    }
}

pub fn reference(name: &str) -> Value {
    let text =
        std::fs::read_to_string(fixture(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference JSON")
}

pub fn engine(
    name: &str,
    blocks: usize,
    block_size: usize,
    mode: AttentionMode,
) -> Engine<CpuBackend> {
    let ck = model_loader::Checkpoint::open(&fixture(name)).expect("fixture opens");
    let backend = CpuBackend::load(&ck, blocks, block_size).expect("backend");
    Engine::new(
        backend,
        EngineConfig {
            mode,
            ..Default::default()
        },
    )
}

pub fn limits(vocab_size: usize) -> TreeLimits {
    TreeLimits {
        vocab_size,
        max_depth: 8,
    }
}

/// Largest |a - b| over two logit matrices; panics on a shape mismatch.
pub fn max_diff(got: &[Vec<f32>], want: &Value, what: &str) -> f32 {
    let want = want
        .as_array()
        .unwrap_or_else(|| panic!("{what}: reference logits missing"));
    assert_eq!(got.len(), want.len(), "{what}: number of logit rows");
    let mut m = 0.0f32;
    for (g, w) in got.iter().zip(want) {
        let w = w.as_array().expect("row");
        assert_eq!(g.len(), w.len(), "{what}: vocab");
        for (a, b) in g.iter().zip(w) {
            m = m.max((a - b.as_f64().expect("float") as f32).abs());
        }
    }
    m
}

/// Max difference over a whole tree (logits, join logits, children, then). The walk goes
/// both ways: output the reference does not have (join logits of a reuse join, children
/// of a node that does not fork, a `then` the reference lacks) is an error too.
pub fn tree_diff(got: &NodeLogits, want: &Value, what: &str) -> f32 {
    tree_diff_with(got, want, what, &max_diff)
}

/// Compares logit rows with reference rows; returns the largest difference.
pub type RowsDiff = dyn Fn(&[Vec<f32>], &Value, &str) -> f32;

/// [`tree_diff`] with the row-matrix comparison `diff` (full rows, or sparse reference rows).
pub fn tree_diff_with(got: &NodeLogits, want: &Value, what: &str, diff: &RowsDiff) -> f32 {
    let mut m = diff(&got.logits, &want["logits"], what);
    match want.get("fork") {
        Some(fork) => {
            if fork["join"] == "reprefill" {
                m = m.max(diff(
                    &got.join_logits,
                    &fork["join_logits"],
                    &format!("{what}.join"),
                ));
            } else {
                assert!(
                    got.join_logits.is_empty(),
                    "{what}: join logits at a reuse join"
                );
            }
            let kids = fork["children"].as_array().expect("children");
            assert_eq!(got.children.len(), kids.len(), "{what}: children");
            for (i, (g, w)) in got.children.iter().zip(kids).enumerate() {
                m = m.max(tree_diff_with(g, w, &format!("{what}.children[{i}]"), diff));
            }
        }
        None => {
            assert!(got.children.is_empty(), "{what}: children without a fork");
            assert!(
                got.join_logits.is_empty(),
                "{what}: join logits without a fork"
            );
        }
    }
    match (want.get("then"), got.then.as_deref()) {
        (Some(then), Some(g)) => m = m.max(tree_diff_with(g, then, &format!("{what}.then"), diff)),
        (Some(_), None) => panic!("{what}: then logits missing"),
        (None, Some(_)) => panic!("{what}: then logits the reference does not have"),
        (None, None) => {}
    }
    m
}

/// Counts the logit rows a reference tree node holds (own, join and every descendant's).
pub fn tree_rows(want: &Value) -> usize {
    let rows = |v: &Value| v.as_array().map_or(0, Vec::len);
    let mut n = rows(&want["logits"]);
    if let Some(fork) = want.get("fork") {
        n += rows(&fork["join_logits"]);
        n += fork["children"]
            .as_array()
            .expect("children")
            .iter()
            .map(tree_rows)
            .sum::<usize>();
    }
    if let Some(then) = want.get("then") {
        n += tree_rows(then);
    }
    n
}

pub fn parse_tree(v: &Value, vocab: usize) -> TreeNode {
    TreeNode::parse(v, "reference.json", limits(vocab)).expect("tree parses")
}
