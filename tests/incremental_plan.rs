//! The engine's incremental plan equals the plan built from scratch, step by step, over
//! random trees and random event sequences (forks, nested forks, both joins, finishes,
//! preemptions, new requests, prefills and long decode runs).

use model_loader::Checkpoint;
use spindle::backend::null::NullBackend;
use spindle::backend::Backend;
use spindle::generate::rng::Rng;
use spindle::kv::SharedTail;
use spindle::plan::{AttentionPlan, PlanRow, PlanThread};
use spindle::tree::ThreadState;
use spindle::{AttentionMode, Engine, EngineConfig, JoinKind, PlanCounts, ThreadId};

mod common;

fn engine(
    mode: AttentionMode,
    tail: SharedTail,
    split: usize,
    bs: usize,
    blocks: usize,
) -> Engine<NullBackend> {
    let ck = Checkpoint::open(&common::fixture("tiny-llama")).expect("fixture");
    let backend = NullBackend::new(ck.config().clone(), bs, blocks);
    Engine::new(
        backend,
        EngineConfig {
            mode,
            split_tokens: split,
            max_step_tokens: 64,
            prefill_chunk: 8,
            shared_tail: tail,
            check_invariants: true,
            ..EngineConfig::default()
        },
    )
}

/// The plan [`AttentionPlan::build`] makes from the batch's chunk lists.
fn from_scratch(e: &Engine<NullBackend>) -> AttentionPlan {
    let out = e.last_output();
    let bs = e.pool().block_size();
    let mut row = 0u32;
    let threads: Vec<PlanThread> = out
        .threads
        .iter()
        .map(|t| {
            let view = &e.thread(t.thread).expect("thread").view;
            let n = t.fed;
            let rows = (0..n)
                .map(|i| PlanRow {
                    row: row + i as u32,
                    limit: (view.len() - n + i + 1) as u32,
                })
                .collect();
            row += n as u32;
            PlanThread {
                chunks: view.chunks(bs),
                rows,
            }
        })
        .collect();
    AttentionPlan::build(&threads, e.config().mode, e.config().split_tokens)
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> Option<T> {
    if xs.is_empty() {
        None
    } else {
        Some(xs[rng.next_u64() as usize % xs.len()])
    }
}

/// Runs `ops` random operations on `e`, checking the plan after every step. Returns
/// (steps, steps whose plan was updated in place).
fn drive(e: &mut Engine<NullBackend>, seed: u64, ops: usize) -> (u64, u64) {
    let mut rng = Rng::new(seed);
    let vocab = e.backend().config().vocab_size as u64;
    let tok = |rng: &mut Rng| (rng.next_u64() % vocab) as u32;
    let mut roots: Vec<ThreadId> = Vec::new();
    let (mut steps, builds0) = (0u64, e.plan_counts());
    let bs = e.pool().block_size();
    let mut peak_private = e.stats().blocks_without_sharing;
    for op in 0..ops {
        let live: Vec<ThreadId> = e
            .threads()
            .iter()
            .filter(|t| t.state != ThreadState::Retired)
            .map(|t| t.id)
            .collect();
        let idle: Vec<ThreadId> = live
            .iter()
            .copied()
            .filter(|&id| {
                let t = e.thread(id).expect("live");
                t.state == ThreadState::Active && t.pending.is_empty()
            })
            .collect();
        let roll = rng.next_u64() % 100;
        if roots.len() < 3 && (roll < 3 || live.is_empty()) {
            let len = 1 + (rng.next_u64() % 40) as usize;
            let prompt: Vec<u32> = (0..len).map(|_| tok(&mut rng)).collect();
            roots.push(e.add_request(&prompt).expect("request"));
            continue;
        }
        match roll {
            // A fork (nested when the thread is a child), with or without the context.
            3..=6 => {
                if let Some(id) = pick(&mut rng, &idle) {
                    if e.thread(id).expect("t").depth() < 3 {
                        let n = 1 + (rng.next_u64() % 4) as usize;
                        let share = !rng.next_u64().is_multiple_of(8);
                        let kids = e.fork(id, n, share).expect("fork");
                        for k in kids {
                            let first = tok(&mut rng);
                            e.feed(k, &[first]).expect("feed");
                        }
                    }
                }
            }
            // A child ends; a parent whose children all ended joins them.
            7..=10 => {
                if let Some(id) = pick(&mut rng, &idle) {
                    if e.thread(id).expect("t").parent.is_some() {
                        e.finish(id).expect("finish");
                    }
                }
                let waiting: Vec<ThreadId> = live
                    .iter()
                    .copied()
                    .filter(|&id| {
                        e.thread(id).expect("t").state == ThreadState::Waiting
                            && e.children_done(id)
                    })
                    .collect();
                if let Some(p) = pick(&mut rng, &waiting) {
                    let reusable = e
                        .thread(p)
                        .expect("t")
                        .children
                        .iter()
                        .all(|&c| e.thread(c).expect("c").cache_intact());
                    let kind = if reusable && rng.next_u64().is_multiple_of(2) {
                        JoinKind::Reuse
                    } else {
                        JoinKind::Reprefill
                    };
                    e.join(p, kind).expect("join");
                    let t = tok(&mut rng);
                    e.feed(p, &[t]).expect("feed");
                }
            }
            // A root ends (its whole tree goes).
            11 => {
                if let Some(id) = pick(&mut rng, &idle) {
                    if e.thread(id).expect("t").parent.is_none() {
                        e.finish(id).expect("finish");
                        roots.retain(|&r| r != id);
                    }
                }
            }
            // A longer feed (a prefill chunk).
            12..=14 => {
                if let Some(id) = pick(&mut rng, &idle) {
                    let n = 2 + (rng.next_u64() % 20) as usize;
                    let toks: Vec<u32> = (0..n).map(|_| tok(&mut rng)).collect();
                    e.feed(id, &toks).expect("feed");
                }
            }
            // Decode: every idle thread gets one token, then a step.
            _ => {
                for &id in &idle {
                    let t = tok(&mut rng);
                    e.feed(id, &[t]).expect("feed");
                }
            }
        }
        if e.has_work() {
            match e.step() {
                Ok(_) => {}
                Err(spindle::SpindleError::ThreadDoesNotFit { request, .. }) => {
                    // The pool is too small for this tree even after preemption: drop it.
                    e.cancel(request).expect("cancel");
                    roots.retain(|&r| e.request_of(r).expect("root") != request);
                    continue;
                }
                Err(err) => panic!("step: {err}"),
            }
            steps += 1;
            let want = from_scratch(e);
            assert_eq!(
                e.last_plan(),
                &want,
                "seed {seed}, op {op}: the incremental plan differs from the one built from scratch"
            );
            e.check_refcounts().expect("refcounts");
            // The step's counter, kept incrementally, against a count over every thread.
            let private: usize = e
                .threads()
                .iter()
                .filter(|t| t.state != ThreadState::Retired)
                .map(|t| t.view.len().div_ceil(bs))
                .sum();
            peak_private = peak_private.max(private);
            assert_eq!(
                e.stats().blocks_without_sharing,
                peak_private,
                "seed {seed}, op {op}: blocks without sharing"
            );
        }
    }
    (steps, e.plan_counts().updates - builds0.updates)
}

#[test]
fn incremental_plan_equals_the_plan_built_from_scratch() {
    let mut updated = 0;
    let mut total = 0;
    for (i, (mode, tail, split, bs)) in [
        (AttentionMode::Forked, SharedTail::NewSpan, 32, 4),
        (AttentionMode::Forked, SharedTail::CopyOnWrite, 24, 4),
        (AttentionMode::Forked, SharedTail::NewSpan, 0, 16),
        (AttentionMode::Naive, SharedTail::NewSpan, 16, 4),
        (AttentionMode::Naive, SharedTail::CopyOnWrite, 0, 8),
    ]
    .into_iter()
    .enumerate()
    {
        for seed in 0..6u64 {
            // A pool small enough that preemption happens.
            let mut e = engine(mode, tail, split, bs, 96);
            let (steps, fast) = drive(&mut e, seed * 31 + i as u64, 400);
            total += steps;
            updated += fast;
        }
    }
    eprintln!("{updated} of {total} steps updated in place");
    // The in-place path must actually be exercised, and the rebuilds too.
    assert!(
        updated * 4 > total,
        "{updated} of {total} steps updated in place"
    );
    assert!(updated < total, "every step was updated in place?");
}

#[test]
fn a_long_decode_updates_in_place_across_blocks_and_splits() {
    // 8 threads over a 100-token prefix decode 300 steps: blocks fill (new chunks in
    // place) and tails pass the split length (a rebuild), always equal to the scratch plan.
    let mut e = engine(AttentionMode::Forked, SharedTail::NewSpan, 64, 4, 2048);
    let root = e.add_request(&(0..100).collect::<Vec<u32>>()).expect("req");
    while e.has_work() {
        e.step().expect("prefill");
    }
    let kids = e.fork(root, 8, true).expect("fork");
    for &k in &kids {
        e.feed(k, &[k.index() as u32]).expect("feed");
    }
    let PlanCounts {
        builds: b0,
        updates: u0,
    } = e.plan_counts();
    for s in 0..300u32 {
        e.step().expect("step");
        assert_eq!(e.last_plan(), &from_scratch(&e), "step {s}");
        for &k in &kids {
            e.feed(k, &[s % 50]).expect("feed");
        }
    }
    let PlanCounts {
        builds: b1,
        updates: u1,
    } = e.plan_counts();
    // The first step after the fork and one per 64-token split of the tails rebuild.
    assert!(b1 - b0 <= 1 + 300 / 64 + 1, "{} rebuilds", b1 - b0);
    assert!(u1 - u0 >= 300 - (1 + 300 / 64 + 1), "{} updates", u1 - u0);
}
