//! Property tests of the thread tree over random trees: every thread's logits equal one
//! dense forward over the tree flattened with explicit positions and visibility (an
//! independent oracle of the fixtures' semantics, as the reference was built), no block
//! leaks, and the block and KV-read bounds hold.

mod common;

use common::*;
use spindle::backend::StepInput;
use spindle::kv::{Chunk, SharedTail};
use spindle::plan::{AttentionPlan, PlanThread};
use spindle::replay::{blocks_for, replay_with_stats};
use spindle::tree_file::{Fork, NodeLogits, TreeNode};
use spindle::{AttentionMode, Engine, EngineConfig, JoinKind};

/// The library's seeded generator, so failures reproduce from the seed.
struct Rng(spindle::generate::rng::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(spindle::generate::rng::Rng::new(seed))
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n
    }
}

fn random_tokens(rng: &mut Rng, max_len: u64, vocab: u64) -> Vec<u32> {
    (0..rng.below(max_len + 1))
        .map(|_| rng.below(vocab) as u32)
        .collect()
}

fn random_tree(rng: &mut Rng, depth: usize, max_depth: usize, vocab: u64) -> TreeNode {
    let mut node = TreeNode::sequence(random_tokens(rng, 9, vocab));
    if depth < max_depth && rng.below(2 + depth as u64) == 0 {
        let width = 1 + rng.below(8) as usize;
        let join = if rng.below(2) == 0 {
            JoinKind::Reuse
        } else {
            JoinKind::Reprefill
        };
        let children = (0..width)
            .map(|_| {
                let mut c = random_tree(rng, depth + 1, max_depth, vocab);
                if join == JoinKind::Reprefill && rng.below(4) == 0 {
                    c.returns = Some(random_tokens(rng, 3, vocab));
                }
                c
            })
            .collect();
        node.fork = Some(Fork { join, children });
        if rng.below(2) == 0 {
            node.then = Some(Box::new(random_tree(rng, depth, max_depth, vocab)));
        }
    }
    node
}

/// One token of the flattened tree: id, position, and the entries it attends to (itself last).
struct Entry {
    token: u32,
    pos: u32,
    visible: Vec<usize>,
}

/// Entry indices of each node's outputs, shaped like the tree.
struct OracleNode {
    own: Vec<usize>,
    join: Vec<usize>,
    children: Vec<OracleNode>,
    then: Option<Box<OracleNode>>,
}

fn push(token: u32, pos: u32, ctx: &mut Vec<usize>, all: &mut Vec<Entry>) -> usize {
    ctx.push(all.len());
    all.push(Entry {
        token,
        pos,
        visible: ctx.clone(),
    });
    all.len() - 1
}

/// Independent oracle of `tests/fixtures/README.md`, the way the reference was built: the
/// tree flattened into one sequence with explicit positions and per-token visibility.
/// `ctx` holds the entry indices of the current thread's context.
fn flatten(
    node: &TreeNode,
    ctx: &mut Vec<usize>,
    next: &mut u32,
    all: &mut Vec<Entry>,
) -> OracleNode {
    let mut out = OracleNode {
        own: Vec::new(),
        join: Vec::new(),
        children: Vec::new(),
        then: None,
    };
    for &t in &node.tokens {
        out.own.push(push(t, *next, ctx, all));
        *next += 1;
    }
    if let Some(fork) = &node.fork {
        let base = ctx.clone();
        let p = *next;
        let mut owns = Vec::new();
        let mut extent = 0;
        for c in &fork.children {
            let mut cctx = base.clone();
            let mut cnext = p;
            out.children.push(flatten(c, &mut cctx, &mut cnext, all));
            owns.push((c.returns.clone(), cctx[base.len()..].to_vec()));
            extent = extent.max(cnext - p);
        }
        match fork.join {
            JoinKind::Reuse => {
                for (_, own) in owns {
                    ctx.extend(own);
                }
                *next = p + extent;
            }
            JoinKind::Reprefill => {
                for (returns, own) in owns {
                    let toks =
                        returns.unwrap_or_else(|| own.iter().map(|&i| all[i].token).collect());
                    for t in toks {
                        out.join.push(push(t, *next, ctx, all));
                        *next += 1;
                    }
                }
            }
        }
        if let Some(then) = &node.then {
            out.then = Some(Box::new(flatten(then, ctx, next, all)));
        }
    }
    out
}

/// Logits of every entry from one dense masked forward (block size 1, one slot per entry,
/// each row attending exactly to its visible entries).
fn dense_forward(all: &[Entry]) -> Vec<Vec<f32>> {
    if all.is_empty() {
        return Vec::new();
    }
    let ck = model_loader::Checkpoint::open(&fixture("tiny-llama")).expect("fixture");
    let mut backend = spindle::CpuBackend::load(&ck, all.len(), 1).expect("backend");
    let threads: Vec<PlanThread> = all
        .iter()
        .enumerate()
        .map(|(r, e)| PlanThread {
            chunks: e
                .visible
                .iter()
                .map(|&i| Chunk {
                    block: i as u32,
                    start: 0,
                    len: 1,
                })
                .collect(),
            rows: vec![(r as u32, e.visible.len() as u32)],
        })
        .collect();
    let step = StepInput {
        tokens: all.iter().map(|e| e.token).collect(),
        positions: all.iter().map(|e| e.pos).collect(),
        slots: (0..all.len() as u32).collect(),
        logit_rows: (0..all.len() as u32).collect(),
        copies: Vec::new(),
        plan: AttentionPlan::build(&threads, AttentionMode::Naive, 0),
    };
    let logits = spindle::model::forward(&mut backend, &step).expect("forward");
    logits
        .chunks(logits.len() / all.len())
        .map(<[f32]>::to_vec)
        .collect()
}

fn compare(dense: &[Vec<f32>], got: &NodeLogits, want: &OracleNode, at: &str) -> f32 {
    let diff = |a: &[Vec<f32>], idx: &[usize], what: &str| {
        assert_eq!(a.len(), idx.len(), "{what}: row count");
        let d = a
            .iter()
            .zip(idx)
            .flat_map(|(x, &i)| x.iter().zip(&dense[i]).map(|(p, q)| (p - q).abs()))
            .fold(0.0f32, f32::max);
        if d > 1e-3 {
            eprintln!("{what}: logits differ by {d}");
        }
        d
    };
    let join = diff(&got.join_logits, &want.join, &format!("{at}.join"));
    let mut m = diff(&got.logits, &want.own, at).max(join);
    assert_eq!(got.children.len(), want.children.len(), "{at}: children");
    for (i, (g, w)) in got.children.iter().zip(&want.children).enumerate() {
        m = m.max(compare(dense, g, w, &format!("{at}.children[{i}]")));
    }
    if let Some(t) = &want.then {
        m = m.max(compare(
            dense,
            got.then.as_deref().expect("then"),
            t,
            &format!("{at}.then"),
        ));
    }
    m
}

#[test]
fn random_trees_match_flattened_forward_and_free_every_block() {
    let mut rng = Rng::new(0x5eed);
    let vocab = 512;
    for case in 0..40 {
        let tree = random_tree(&mut rng, 0, 3, vocab);
        let block_size = 1 + rng.below(17) as usize;
        let mode = if case % 2 == 0 {
            AttentionMode::Forked
        } else {
            AttentionMode::Naive
        };
        let shared_tail = if case % 3 == 0 {
            SharedTail::CopyOnWrite
        } else {
            SharedTail::NewSpan
        };
        let ck = model_loader::Checkpoint::open(&fixture("tiny-llama")).expect("fixture");
        let blocks = blocks_for(&tree, block_size);
        let backend = spindle::CpuBackend::load(&ck, blocks, block_size).expect("backend");
        let mut e = Engine::new(
            backend,
            EngineConfig {
                mode,
                shared_tail,
                prefill_chunk: 1 + rng.below(8) as usize,
                ..Default::default()
            },
        );
        let (got, stats) = replay_with_stats(&mut e, &tree).expect("replay");
        assert!(e.pool().all_free(), "case {case}: blocks leaked");
        e.check_refcounts().expect("refcounts");
        let mut all = Vec::new();
        let want = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
        let d = compare(&dense_forward(&all), &got, &want, &format!("case {case}"));
        assert!(d <= 1e-3, "case {case}: max |diff| {d}");
        if shared_tail == SharedTail::NewSpan {
            let bound = tree.total_tokens().div_ceil(block_size) + tree.num_nodes();
            assert!(
                stats.blocks_peak <= bound,
                "case {case}: blocks peak {} over the bound {bound}",
                stats.blocks_peak
            );
        }
        println!(
            "case {case}: {} nodes, {} tokens, bs {block_size}, {mode:?}, {shared_tail:?}: max |diff| {d:.1e}, peak {} blocks ({} without sharing)",
            tree.num_nodes(),
            tree.total_tokens(),
            stats.blocks_peak,
            stats.blocks_without_sharing
        );
    }
}

#[test]
fn shared_prefix_is_read_once_per_step_and_layer() {
    let (p, w, s) = (40u64, 6u64, 5u64);
    let layers = 3u64; // tiny-llama
    let tree = TreeNode {
        tokens: (0..p as u32).collect(),
        returns: None,
        fork: Some(Fork {
            join: JoinKind::Reuse,
            children: (0..w)
                .map(|i| {
                    TreeNode::sequence((0..s as u32).map(|j| 100 + i as u32 * 10 + j).collect())
                })
                .collect(),
        }),
        then: None,
    };
    for mode in [AttentionMode::Forked, AttentionMode::Naive] {
        let mut e = engine("tiny-llama", blocks_for(&tree, 16), 16, mode);
        let (_, stats) = replay_with_stats(&mut e, &tree).expect("replay");
        // Step 1 prefills the prefix; then every child decodes one token per step.
        let forked: u64 = p + (1..=s).map(|k| p + w * k).sum::<u64>();
        let naive: u64 = p + (1..=s).map(|k| w * (p + k)).sum::<u64>();
        assert_eq!(stats.steps, 1 + s);
        assert_eq!(stats.kv_tokens_read_naive, naive * layers, "{mode:?}");
        let want = if mode == AttentionMode::Forked {
            forked
        } else {
            naive
        };
        assert_eq!(stats.kv_tokens_read, want * layers, "{mode:?}");
        assert_eq!(
            e.backend().kv_tokens_read(),
            want * layers,
            "backend count, {mode:?}"
        );
        assert!(stats.blocks_peak < stats.blocks_without_sharing);
        println!(
            "{mode:?}: kv tokens read {} (naive {}), blocks peak {} vs {} without sharing",
            stats.kv_tokens_read,
            stats.kv_tokens_read_naive,
            stats.blocks_peak,
            stats.blocks_without_sharing
        );
    }
}

#[test]
fn a_pool_too_small_for_the_width_waits_and_preempts_without_losing_anything() {
    let mut rng = Rng::new(7);
    // APR-style children: twelve tokens each, one token handed back.
    let children = (0..6)
        .map(|i| TreeNode {
            returns: Some(vec![i]),
            ..TreeNode::sequence((0..12).map(|_| rng.below(512) as u32).collect())
        })
        .collect();
    let tree = TreeNode {
        tokens: (0..20).map(|_| rng.below(512) as u32).collect(),
        returns: None,
        fork: Some(Fork {
            join: JoinKind::Reprefill,
            children,
        }),
        then: Some(Box::new(TreeNode::sequence(vec![1, 2, 3]))),
    };
    let block_size = 4;
    // The prefix takes 5 blocks; all six children at once would need 18 more.
    let blocks = 12;
    let mut e = engine("tiny-llama", blocks, block_size, AttentionMode::Forked);
    let (got, stats) = replay_with_stats(&mut e, &tree).expect("replay under pressure");
    assert!(e.pool().all_free());
    assert!(stats.blocks_peak <= blocks);
    assert!(stats.preemptions > 0, "the pool was meant to be too small");
    let mut all = Vec::new();
    let want = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
    let d = compare(&dense_forward(&all), &got, &want, "pressure");
    assert!(d <= 1e-3, "max |diff| {d}");
    println!(
        "pool of {blocks} blocks: {} steps, {} preemptions, peak {} blocks ({} without sharing), max |diff| {d:.1e}",
        stats.steps, stats.preemptions, stats.blocks_peak, stats.blocks_without_sharing
    );
}

/// Replays `tree` with a pool of `blocks`; `None` when the pool cannot hold it at all.
fn replay_tight(
    tree: &TreeNode,
    blocks: usize,
    block_size: usize,
) -> Option<(NodeLogits, spindle::EngineStats)> {
    let mut e = engine("tiny-llama", blocks, block_size, AttentionMode::Forked);
    match replay_with_stats(&mut e, tree) {
        Ok(r) => {
            assert!(e.pool().all_free(), "blocks leaked under pressure");
            e.check_refcounts().expect("refcounts");
            Some(r)
        }
        Err(spindle::SpindleError::ThreadDoesNotFit { .. }) => None,
        Err(other) => panic!("unexpected error under pressure: {other}"),
    }
}

#[test]
fn preemption_under_tight_pools_keeps_every_tree_exact() {
    let mut rng = Rng::new(0xfeed);
    let mut preempted_runs = 0;
    let mut reuse_preempted = 0;
    for case in 0..30 {
        let tree = loop {
            let t = random_tree(&mut rng, 0, 3, 512);
            if t.fork.is_some() {
                break t;
            }
        };
        let block_size = 1 + rng.below(4) as usize;
        let Some((_, roomy)) = replay_tight(&tree, blocks_for(&tree, block_size), block_size)
        else {
            panic!("case {case}: the roomy pool must fit");
        };
        let mut all = Vec::new();
        let want = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
        let dense = dense_forward(&all);
        // Shrink the pool below the peak the tree needed until it no longer fits.
        for cut in 1..=roomy.blocks_peak {
            let blocks = roomy.blocks_peak - cut;
            let Some((got, stats)) = replay_tight(&tree, blocks, block_size) else {
                break;
            };
            let d = compare(
                &dense,
                &got,
                &want,
                &format!("case {case} ({blocks} blocks)"),
            );
            assert!(d <= 1e-3, "case {case}, {blocks} blocks: max |diff| {d}");
            if stats.preemptions > 0 {
                preempted_runs += 1;
                if has_reuse(&tree) {
                    reuse_preempted += 1;
                }
            }
        }
    }
    println!(
        "{preempted_runs} runs preempted ({reuse_preempted} on trees with reuse joins), all exact"
    );
    assert!(
        preempted_runs >= 10,
        "too few runs exercised preemption: {preempted_runs}"
    );
    assert!(
        reuse_preempted >= 5,
        "too few reuse trees exercised preemption: {reuse_preempted}"
    );
}

fn has_reuse(t: &TreeNode) -> bool {
    t.fork
        .as_ref()
        .is_some_and(|f| f.join == JoinKind::Reuse || f.children.iter().any(has_reuse))
        || t.then.as_deref().is_some_and(has_reuse)
}

#[test]
fn preempting_a_thread_after_a_reuse_join_keeps_the_merged_cache() {
    // The inner thread joins two children by KV reuse, then decodes; the pool forces its
    // preemption after the join. Recomputing the merged children's tokens as one sequence
    // would change their K/V (they must not see each other), so they stay cached.
    let v: serde_json::Value = serde_json::from_str(
        r#"{"tokens":[11,12,13,14],"fork":{"join":"reprefill","children":[
            {"tokens":[21,22,23,24,25,26,27,28],"returns":[1]},
            {"tokens":[31],"returns":[2],"fork":{"join":"reuse","children":[{"tokens":[41,42]},{"tokens":[51,52]}]},
             "then":{"tokens":[61,62,63,64]}}]},
          "then":{"tokens":[70]}}"#,
    )
    .expect("tree JSON");
    let tree = TreeNode::parse(&v, "regression", limits(512)).expect("tree");
    let mut all = Vec::new();
    let want = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
    let dense = dense_forward(&all);
    let mut preempted = 0;
    for blocks in 10..=20 {
        let Some((got, stats)) = replay_tight(&tree, blocks, 1) else {
            continue;
        };
        preempted += stats.preemptions;
        let d = compare(&dense, &got, &want, &format!("{blocks} blocks"));
        assert!(d <= 1e-3, "{blocks} blocks: max |diff| {d}");
    }
    assert!(preempted > 0, "the pools were meant to force preemption");
}
