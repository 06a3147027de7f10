//! The thread-tree file parser on arbitrary JSON: a typed error, or a tree whose sizes can be
//! computed and which `to_json` writes back as the same tree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use spindle::replay::tree_file::{NodeLogits, TreeLimits, TreeNode};

const LIMITS: TreeLimits = TreeLimits {
    vocab_size: 384,
    max_depth: 8,
};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // A whole reference.json: its tree cases; anything else: the value itself as a NODE.
    let trees: Vec<&Value> = match value.get("cases").and_then(Value::as_array) {
        Some(cases) => cases.iter().filter_map(|c| c.get("tree")).collect(),
        None => vec![&value],
    };
    for v in trees {
        let Ok(tree) = TreeNode::parse(v, "fuzz.json", LIMITS) else {
            continue;
        };
        let _ = tree.total_tokens();
        let _ = tree.num_nodes();
        let written = tree.to_json(&NodeLogits::skeleton(&tree));
        let back = TreeNode::parse(&written, "written.json", LIMITS)
            .expect("a parsed tree's own to_json parses");
        assert_eq!(back, tree, "to_json round trip");
    }
});
