//! A stress run that loses nothing: many concurrent requests with random thread trees
//! (forks up to 16 wide, nesting, both joins, APR returns) share an engine whose pool is
//! about 10x smaller than their total demand, with random cancellations mid-flight. Every
//! request that is not cancelled ends with every logits row it gets alone, equal within
//! float rounding (under memory pressure a thread may run without its siblings, which
//! changes how its attention is partitioned into work items, not what it attends to); a
//! cancelled one is retired at once with its blocks back; a request the pool cannot hold
//! even after preemption is cancelled and started again later (never dropped); the engine's
//! invariants hold after every call; at the end every block is free. Without memory
//! pressure, cancelling one request leaves the others' logits unchanged bit for bit.
//!
//! `SPINDLE_STRESS=large cargo test --release --test stress -- --nocapture` runs a larger
//! version and prints its figures.

mod common;

use spindle::generate::rng::Rng;
use spindle::replay::tree_file::{Fork, NodeLogits, TreeNode};
use spindle::replay::{blocks_for, replay_with_stats, Replay};
use spindle::tree::ThreadState;
use spindle::{AttentionMode, CpuBackend, Engine, EngineConfig, JoinKind, SpindleError};
use std::collections::VecDeque;
use std::time::Instant;

const BLOCK: usize = 4;

fn below(rng: &mut Rng, n: u64) -> u64 {
    rng.below(n)
}

fn tokens(rng: &mut Rng, min: u64, max: u64, vocab: u64) -> Vec<u32> {
    (0..min + below(rng, max - min + 1))
        .map(|_| below(rng, vocab) as u32)
        .collect()
}

/// A random tree: forks up to 16 wide at the top, narrower below, either join, nested.
fn tree(rng: &mut Rng, depth: usize, vocab: u64) -> TreeNode {
    let mut node = TreeNode::sequence(tokens(rng, usize::from(depth == 0) as u64 + 1, 8, vocab));
    if depth < 2 && below(rng, 3) != 0 {
        let max_width = if depth == 0 { 16 } else { 4 };
        let width = 1 + below(rng, max_width) as usize;
        let join = if below(rng, 2) == 0 {
            JoinKind::Reuse
        } else {
            JoinKind::Reprefill
        };
        let children = (0..width)
            .map(|_| {
                let mut c = tree(rng, depth + 1, vocab);
                if join == JoinKind::Reprefill && below(rng, 4) == 0 {
                    c.returns = Some(tokens(rng, 1, 3, vocab));
                }
                c
            })
            .collect();
        node.fork = Some(Fork { join, children });
        if below(rng, 2) == 0 {
            node.then = Some(Box::new(TreeNode::sequence(tokens(rng, 1, 6, vocab))));
        }
    }
    node
}

/// Where two logits trees first differ by more than `tol` (0: bit for bit), and by how
/// much; `worst` gathers the largest difference seen.
fn difference(
    a: &NodeLogits,
    b: &NodeLogits,
    at: &str,
    tol: f32,
    worst: &mut f32,
) -> Option<String> {
    let mut rows = |x: &[Vec<f32>], y: &[Vec<f32>], what: &str| -> Option<String> {
        if x.len() != y.len() {
            return Some(format!("{at} {what}: {} rows vs {}", x.len(), y.len()));
        }
        for (r, (p, q)) in x.iter().zip(y).enumerate() {
            if p.len() != q.len() {
                return Some(format!(
                    "{at} {what} row {r}: {} values vs {}",
                    p.len(),
                    q.len()
                ));
            }
            let d = p
                .iter()
                .zip(q)
                .map(|(u, v)| (u - v).abs())
                .fold(0.0f32, f32::max);
            *worst = worst.max(d);
            if (tol == 0.0 && p != q) || d > tol {
                return Some(format!("{at} {what} row {r}: max |diff| {d:e}"));
            }
        }
        None
    };
    if let Some(d) = rows(&a.logits, &b.logits, "logits") {
        return Some(d);
    }
    rows(&a.join_logits, &b.join_logits, "join logits")
        .or_else(|| {
            (a.children.len() != b.children.len()).then(|| {
                format!(
                    "{at}: {} children vs {}",
                    a.children.len(),
                    b.children.len()
                )
            })
        })
        .or_else(|| {
            a.children
                .iter()
                .zip(&b.children)
                .enumerate()
                .find_map(|(i, (x, y))| difference(x, y, &format!("{at}.{i}"), tol, worst))
        })
        .or_else(|| match (&a.then, &b.then) {
            (Some(x), Some(y)) => difference(x, y, &format!("{at} then"), tol, worst),
            (None, None) => None,
            _ => Some(format!("{at}: then differs")),
        })
}

fn engine(blocks: usize) -> Engine<CpuBackend> {
    let ck = model_loader::Checkpoint::open(&common::fixture("tiny-llama")).expect("fixture");
    let backend = CpuBackend::load(&ck, blocks, BLOCK).expect("backend");
    Engine::new(
        backend,
        EngineConfig {
            mode: AttentionMode::Forked,
            max_step_tokens: 64,
            prefill_chunk: 16,
            check_invariants: true,
            ..EngineConfig::default()
        },
    )
}

struct Figures {
    requests: usize,
    cancelled: usize,
    restarts: usize,
    steps: u64,
    preemptions: u64,
    pool: usize,
    demand: usize,
    seconds: f64,
    /// Largest logits difference from a run alone, and requests equal bit for bit.
    max_diff: f32,
    identical: usize,
}

/// Logits tolerance against a run alone under memory pressure (the parity tests' bound).
const TOL: f32 = 1e-4;

fn stress(requests: usize, seed: u64) -> Figures {
    let t0 = Instant::now();
    let mut rng = Rng::new(seed);
    let vocab = 512u64;
    let trees: Vec<TreeNode> = (0..requests).map(|_| tree(&mut rng, 0, vocab)).collect();
    // What each gives alone, with room to spare, and the most blocks it held at once.
    let (alone, needs): (Vec<NodeLogits>, Vec<usize>) = trees
        .iter()
        .map(|t| {
            let (logits, stats) =
                replay_with_stats(&mut engine(blocks_for(t, BLOCK)), t).expect("alone");
            (logits, stats.blocks_peak)
        })
        .unzip();
    let demand: usize = needs.iter().sum();
    let pool = (demand / 10).max(needs.iter().copied().max().unwrap_or(1));
    // Requests in flight at once: about three times what the pool holds.
    let concurrency = (3 * pool * requests / demand.max(1)).max(4);
    let mut e = engine(pool);
    // Which requests get cancelled, and after how many of their steps.
    let cancel_at: Vec<Option<u64>> = (0..requests)
        .map(|_| (below(&mut rng, 5) == 0).then(|| below(&mut rng, 30)))
        .collect();
    let mut queue: VecDeque<usize> = (0..requests).collect();
    let mut active: Vec<(usize, Replay<'_>, u64)> = Vec::new();
    let (mut cancelled, mut restarts, mut finished) = (0usize, 0usize, 0usize);
    let (mut max_diff, mut identical) = (0.0f32, 0usize);
    let mut guard = 0u64;
    while !queue.is_empty() || !active.is_empty() {
        guard += 1;
        assert!(guard < 200_000, "the stress run does not progress");
        while active.len() < concurrency {
            let Some(i) = queue.pop_front() else { break };
            let r = Replay::start(&mut e, &trees[i]).expect("start");
            active.push((i, r, 0));
        }
        for (_, r, _) in active.iter_mut() {
            r.prepare(&mut e).expect("prepare");
        }
        // Finished requests: exactly what they give alone.
        let mut k = 0;
        while k < active.len() {
            if active[k].1.is_done() {
                let (i, r, _) = active.swap_remove(k);
                let root = e.root_of(r.request()).expect("root");
                let mut worst = 0.0f32;
                if let Some(d) = difference(&r.into_logits(), &alone[i], "root", TOL, &mut worst) {
                    panic!("request {i} (seed {seed}) differs from its run alone: {d}");
                }
                max_diff = max_diff.max(worst);
                identical += usize::from(worst == 0.0);
                assert_eq!(e.thread(root).expect("root").state, ThreadState::Retired);
                finished += 1;
            } else {
                k += 1;
            }
        }
        // Cancellations mid-flight: retired at once, blocks back.
        let mut k = 0;
        while k < active.len() {
            let (i, ref r, steps) = active[k];
            if cancel_at[i].is_some_and(|at| steps >= at) {
                let request = r.request();
                let root = e.root_of(request).expect("root");
                let used = e.pool().num_used();
                e.cancel(request).expect("cancel");
                assert_eq!(e.thread(root).expect("root").state, ThreadState::Retired);
                assert!(e.pool().num_used() <= used);
                assert!(e.threads().iter().all(|t| t.request != request
                    || (t.state == ThreadState::Retired && t.view.is_empty())));
                active.swap_remove(k);
                cancelled += 1;
            } else {
                k += 1;
            }
        }
        if active.is_empty() {
            continue;
        }
        match e.step() {
            Ok(_) => {}
            Err(SpindleError::ThreadDoesNotFit { request, .. }) => {
                // Nothing left to preempt: give the request's blocks back and run it again
                // later, from the start (its output so far is discarded, never corrupted).
                e.cancel(request).expect("cancel");
                let k = active
                    .iter()
                    .position(|(_, r, _)| r.request() == request)
                    .expect("the request is active");
                let (i, _, _) = active.swap_remove(k);
                queue.push_back(i);
                restarts += 1;
                continue;
            }
            Err(err) => panic!("step: {err}"),
        }
        for (_, r, steps) in active.iter_mut() {
            r.collect(&e).expect("collect");
            *steps += 1;
        }
    }
    assert_eq!(finished + cancelled, requests);
    assert!(e.pool().all_free(), "every block is free at the end");
    e.check_invariants().expect("invariants at the end");
    Figures {
        requests,
        cancelled,
        restarts,
        steps: e.stats().steps,
        preemptions: e.stats().preemptions,
        pool,
        demand,
        seconds: t0.elapsed().as_secs_f64(),
        max_diff,
        identical,
    }
}

#[test]
fn concurrent_trees_in_a_small_pool_lose_nothing() {
    let large = std::env::var("SPINDLE_STRESS").is_ok_and(|v| v == "large");
    let (requests, seeds) = if large { (400, 3) } else { (24, 2) };
    let (mut preemptions, mut cancelled) = (0, 0);
    for seed in 0..seeds {
        let f = stress(requests, 1000 + seed);
        preemptions += f.preemptions;
        cancelled += f.cancelled;
        println!(
            "stress seed {seed}: {} requests ({} cancelled, {} restarted), {} steps, {} preemptions, \
             pool {} blocks for a demand of {}, {:.1} s; {} finished bit for bit, max |diff| {:e}",
            f.requests,
            f.cancelled,
            f.restarts,
            f.steps,
            f.preemptions,
            f.pool,
            f.demand,
            f.seconds,
            f.identical,
            f.max_diff
        );
    }
    assert!(preemptions > 0, "the pool must be tight enough to preempt");
    assert!(cancelled > 0, "some requests must be cancelled");
}

/// Runs `trees` together on one engine with room for all; the request at `cancel`
/// (if any) is cancelled after `at` steps. Returns every other request's logits.
fn together(trees: &[TreeNode], cancel: Option<(usize, u64)>) -> Vec<Option<NodeLogits>> {
    let blocks: usize = trees.iter().map(|t| blocks_for(t, BLOCK)).sum();
    let mut e = engine(blocks);
    let mut replays: Vec<Option<Replay<'_>>> = trees
        .iter()
        .map(|t| Some(Replay::start(&mut e, t).expect("start")))
        .collect();
    let mut out: Vec<Option<NodeLogits>> = vec![None; trees.len()];
    let mut steps = 0u64;
    loop {
        if let Some((c, at)) = cancel {
            if steps == at {
                if let Some(r) = replays[c].take() {
                    e.cancel(r.request()).expect("cancel");
                }
            }
        }
        for (i, slot) in replays.iter_mut().enumerate() {
            if let Some(r) = slot {
                r.prepare(&mut e).expect("prepare");
                if r.is_done() {
                    out[i] = slot.take().map(Replay::into_logits);
                }
            }
        }
        if replays.iter().all(Option::is_none) {
            break;
        }
        e.step().expect("step");
        steps += 1;
        for r in replays.iter_mut().flatten() {
            r.collect(&e).expect("collect");
        }
    }
    assert!(e.pool().all_free());
    out
}

#[test]
fn cancelling_a_request_leaves_the_others_bit_for_bit() {
    let mut rng = Rng::new(7);
    let trees: Vec<TreeNode> = (0..6).map(|_| tree(&mut rng, 0, 512)).collect();
    let base = together(&trees, None);
    // Cancel request 2 at several points: before its prompt ran, mid-prefill or decode,
    // with children running, late.
    for at in [0, 1, 3, 6, 12, 25] {
        let got = together(&trees, Some((2, at)));
        for (i, (g, b)) in got.iter().zip(&base).enumerate() {
            if i == 2 {
                continue;
            }
            let (Some(g), Some(b)) = (g, b) else {
                panic!("request {i} did not finish");
            };
            let mut worst = 0.0;
            if let Some(d) = difference(g, b, "root", 0.0, &mut worst) {
                panic!("cancelling request 2 at step {at} changed request {i}: {d}");
            }
        }
    }
}
