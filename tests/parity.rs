//! Parity with Hugging Face `transformers`: every fixture case through the engine on the
//! CPU backend, at several block sizes and in both attention modes.

mod common;

use common::*;
use spindle::replay::{blocks_for, replay_with_stats};
use spindle::tree_file::TreeNode;
use spindle::AttentionMode;

const TOL: f32 = 1e-3;

#[test]
fn sequences_match_reference_logits() {
    for name in FIXTURES {
        let r = reference(name);
        for case in r["cases"].as_array().expect("cases") {
            if case["kind"] != "sequence" {
                continue;
            }
            let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).expect("tokens");
            let tree = TreeNode::sequence(tokens);
            let mut e = engine(name, blocks_for(&tree, 16), 16, AttentionMode::Forked);
            let (out, stats) = replay_with_stats(&mut e, &tree).expect("replay");
            let d = max_diff(&out.logits, &case["logits"], name);
            println!(
                "{name} {}: max |diff| = {d:.2e}, {} steps",
                case["name"], stats.steps
            );
            assert!(d <= TOL, "{name} {}: max |diff| {d}", case["name"]);
            assert!(e.pool().all_free(), "blocks leaked");
        }
    }
}

#[test]
fn trees_match_reference_logits_at_every_block_size_and_mode() {
    for name in FIXTURES {
        let r = reference(name);
        for case in r["cases"].as_array().expect("cases") {
            if case["kind"] != "tree" {
                continue;
            }
            for block_size in [1, 3, 16] {
                for mode in [AttentionMode::Forked, AttentionMode::Naive] {
                    let vocab = r["cases"][0]["logits"][0].as_array().expect("row").len();
                    let tree = parse_tree(&case["tree"], vocab);
                    let mut e = engine(name, blocks_for(&tree, block_size), block_size, mode);
                    let (out, stats) = replay_with_stats(&mut e, &tree).expect("replay");
                    let d = tree_diff(&out, &case["tree"], &format!("{name}/{}", case["name"]));
                    println!(
                        "{name} {} bs={block_size} {mode:?}: max |diff| = {d:.2e}, steps {}, blocks peak {} (private {}), kv read {} (naive {})",
                        case["name"], stats.steps, stats.blocks_peak, stats.blocks_without_sharing, stats.kv_tokens_read, stats.kv_tokens_read_naive
                    );
                    assert!(
                        d <= TOL,
                        "{name} {} bs={block_size}: max |diff| {d}",
                        case["name"]
                    );
                    assert!(e.pool().all_free(), "blocks leaked");
                    e.check_refcounts().expect("refcounts consistent");
                }
            }
        }
    }
}
