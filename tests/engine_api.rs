//! Misuse of the engine API gets a typed error, never a panic or a silent wrong state.

mod common;

use common::*;
use spindle::{AttentionMode, JoinKind, RequestId, SpindleError, ThreadId};

#[test]
fn misuse_is_refused_with_a_reason() {
    use spindle::error::Operation;
    use spindle::tree::ThreadState;
    let mut e = engine("tiny-llama", 64, 4, AttentionMode::Forked);
    // Tokens past the vocabulary.
    assert!(matches!(
        e.add_request(&[1, 600]),
        Err(SpindleError::TokenOutOfVocab { token: 600, .. })
    ));
    // Positions past the largest one the kernels take, and positions that do not match.
    assert!(matches!(
        e.add_request_with_positions(&[1], &[u32::MAX]),
        Err(SpindleError::PositionOverflow { next, .. }) if next == u32::MAX as u64
    ));
    assert!(matches!(
        e.add_request_with_positions(&[1, 2], &[0]),
        Err(SpindleError::PositionsMismatch {
            tokens: 2,
            positions: 1
        })
    ));
    // Unknown ids.
    assert!(matches!(
        e.feed(ThreadId(99), &[1]),
        Err(SpindleError::UnknownThread {
            thread: ThreadId(99)
        })
    ));
    assert!(matches!(
        e.cancel(RequestId(99)),
        Err(SpindleError::UnknownRequest {
            request: RequestId(99)
        })
    ));
    let root = e.add_request(&[1, 2, 3]).expect("request");
    // A fork before the prompt is cached, and a join with nothing forked.
    assert!(matches!(
        e.fork(root, 2, true),
        Err(SpindleError::WrongState {
            op: Operation::Fork,
            state: ThreadState::Active,
            queued: 3,
            ..
        })
    ));
    while e.has_work() {
        e.step().expect("step");
    }
    assert!(matches!(
        e.join(root, JoinKind::Reuse),
        Err(SpindleError::WrongState {
            op: Operation::Join,
            state: ThreadState::Active,
            ..
        })
    ));
    assert!(
        matches!(
            e.fork(root, 0, true),
            Err(SpindleError::EmptyFork { thread }) if thread == root
        ),
        "a fork needs children"
    );
    assert!(matches!(
        e.fork(root, 5000, true),
        Err(SpindleError::ForkTooWide {
            requested: 5000,
            max: 1024,
            ..
        })
    ));
    let kids = e
        .fork_with(root, 2, true, Some(JoinKind::Reprefill))
        .expect("fork");
    // A request is named by its own id, not by a thread's: the children belong to the
    // root's request, and the next request id is not given out yet.
    let request = e.request_of(root).expect("root");
    assert_eq!(e.request_of(kids[0]).expect("child"), request);
    assert_eq!(e.root_of(request).expect("request"), root);
    assert!(matches!(
        e.cancel(RequestId(request.index() + 1)),
        Err(SpindleError::UnknownRequest { request: r }) if r.index() == request.index() + 1
    ));
    // Feeding a waiting parent, and joining before the children end.
    assert!(matches!(
        e.feed(root, &[4]),
        Err(SpindleError::WrongState {
            op: Operation::Feed,
            state: ThreadState::Waiting,
            ..
        })
    ));
    assert!(matches!(
        e.join(root, JoinKind::Reprefill),
        Err(SpindleError::WrongState {
            op: Operation::Join,
            state: ThreadState::Waiting,
            ..
        })
    ));
    e.check_refcounts()
        .expect("refcounts while children share the prompt's blocks");
    for &k in &kids {
        e.feed(k, &[5, 6]).expect("feed");
    }
    while e.has_work() {
        e.step().expect("step");
    }
    for &k in &kids {
        e.finish(k).expect("finish");
    }
    assert!(matches!(
        e.forget(kids[0]),
        Err(SpindleError::WrongState {
            op: Operation::Forget,
            state: ThreadState::Finished,
            ..
        })
    ));
    // Children forked for a re-prefill join gave their blocks back: a reuse join of them
    // would merge nothing, so it is refused rather than silently wrong.
    assert!(matches!(
        e.join(root, JoinKind::Reuse),
        Err(SpindleError::CacheReleased { thread, child }) if thread == root && child == kids[0]
    ));
    assert_eq!(e.join(root, JoinKind::Reprefill).expect("join"), 4);
    while e.has_work() {
        e.step().expect("step");
    }
    e.finish(root).expect("finish");
    assert!(e.pool().all_free());
    e.check_invariants().expect("invariants");
}

#[test]
fn forks_deeper_than_the_limit_are_refused() {
    let mut e = engine("tiny-llama", 64, 4, AttentionMode::Forked);
    let mut t = e.add_request(&[1]).expect("request");
    e.step().expect("step");
    for _ in 0..e.config().max_fork_depth {
        t = e.fork(t, 1, true).expect("fork")[0];
    }
    assert!(matches!(
        e.fork(t, 1, true),
        Err(SpindleError::ForkTooDeep {
            depth: 65,
            max: 64,
            ..
        })
    ));
}

#[test]
fn cancelling_frees_blocks_at_once_at_any_point() {
    let mut e = engine("tiny-llama", 64, 4, AttentionMode::Forked);
    // Mid-prefill: the prompt is longer than one prefill chunk.
    let a = e.add_request(&[1; 12]).expect("request");
    let b = e.add_request(&[2; 5]).expect("request");
    e.step().expect("step");
    let used_with_a = e.pool().num_used();
    e.cancel(e.request_of(a).expect("a"))
        .expect("cancel mid-prefill");
    assert!(e.pool().num_used() < used_with_a, "a's blocks came back");
    assert_eq!(
        e.thread(a).expect("a").state,
        spindle::tree::ThreadState::Retired
    );
    e.check_invariants().expect("invariants");
    // Mid-fork: one child of b is cancelled with its subtree; b joins the other.
    while e.has_work() {
        e.step().expect("step");
    }
    let kids = e.fork(b, 2, true).expect("fork");
    e.feed(kids[0], &[3, 4, 5]).expect("feed");
    e.feed(kids[1], &[6]).expect("feed");
    e.step().expect("step");
    let grandkids = e.fork(kids[1], 2, true).expect("nested fork");
    e.feed(grandkids[0], &[7]).expect("feed");
    e.feed(grandkids[1], &[8]).expect("feed");
    e.step().expect("step");
    let before = e.pool().num_used();
    e.cancel_thread(kids[1]).expect("cancel a subtree");
    assert!(
        e.pool().num_used() < before,
        "the subtree's blocks came back"
    );
    for g in grandkids {
        assert_eq!(
            e.thread(g).expect("g").state,
            spindle::tree::ThreadState::Retired
        );
    }
    e.check_invariants()
        .expect("invariants after a subtree cancel");
    while e.has_work() {
        e.step().expect("step");
    }
    e.finish(kids[0]).expect("finish");
    assert_eq!(
        e.join(b, JoinKind::Reprefill).expect("join"),
        3,
        "only the surviving child"
    );
    // Cancelling what already ended does nothing.
    e.cancel_thread(kids[1]).expect("again");
    e.cancel(e.request_of(b).expect("b"))
        .expect("cancel the request");
    assert!(e.pool().all_free());
    e.check_invariants().expect("invariants when empty");
}

#[test]
fn a_prompt_larger_than_the_pool_names_its_thread() {
    let mut e = engine("tiny-llama", 2, 4, AttentionMode::Forked);
    let root = e.add_request(&[1; 9]).expect("request");
    match e.step() {
        Err(SpindleError::ThreadDoesNotFit {
            thread, request, ..
        }) => {
            assert_eq!((thread, request), (root, e.request_of(root).expect("root")));
        }
        other => panic!("expected ThreadDoesNotFit, got {other:?}"),
    }
    e.cancel(e.request_of(root).expect("root")).expect("cancel");
    assert!(e.pool().all_free());
}

#[test]
fn a_step_reports_who_waited_and_who_was_preempted() {
    // Three blocks of four tokens: two prompts fill them, then neither can grow.
    let mut e = engine("tiny-llama", 3, 4, AttentionMode::Forked);
    let a = e.add_request(&[1, 2, 3, 4]).expect("request");
    let b = e
        .add_request(&[5, 6, 7, 8, 9, 10, 11, 12])
        .expect("request");
    assert!(
        e.thread(a).expect("a").view.is_empty(),
        "nothing cached yet"
    );
    e.step().expect("step");
    let s = e.last_output();
    assert!(!e.thread(a).expect("a").view.is_empty());
    let ran: Vec<_> = s.threads.iter().map(|t| (t.thread, t.fed)).collect();
    assert_eq!(ran, [(a, 4), (b, 8)]);
    assert!(s.waiting.is_empty() && s.preempted.is_empty());
    assert_eq!(e.pool().num_free(), 0);
    e.check_refcounts()
        .expect("refcounts while every block is held");
    e.feed(a, &[13]).expect("feed");
    e.feed(b, &[14]).expect("feed");
    // No block is free: the younger request is preempted (its 8 tokens queued again),
    // the older one runs, and the younger one cannot fit its 9 tokens yet, so it waits.
    let s = e.step().expect("step");
    let ran: Vec<_> = s.threads.iter().map(|t| (t.thread, t.fed)).collect();
    assert_eq!(ran, [(a, 1)]);
    assert_eq!((s.preempted, s.waiting, s.rows), (&[b][..], &[b][..], 1));
    assert_eq!(e.stats().preemptions, 1);
    assert_eq!(
        e.stats().preemptions_after_reuse_join,
        0,
        "no join happened"
    );
    e.finish(a).expect("finish");
    let s = e.step().expect("step");
    assert_eq!(s.threads.len(), 1);
    assert_eq!((s.threads[0].thread, s.threads[0].fed), (b, 9));
    assert_eq!(s.threads[0].logit_rows, 1, "only the new token's output");
    assert!(s.waiting.is_empty());
    e.finish(b).expect("finish");
    assert!(e.pool().all_free());
}

#[test]
fn an_empty_step_has_an_empty_plan() {
    // Found by fuzz/engine_ops (fuzz/regressions/engine_ops/empty-step-stale-plan): a step
    // with nothing to run left the previous step's plan in place.
    let mut e = engine("tiny-llama", 16, 4, AttentionMode::Forked);
    let root = e.add_request(&[1, 2, 3]).expect("request");
    e.step().expect("prefill");
    assert_eq!(e.last_plan().num_rows, 3);
    let out = e.step().expect("nothing to do");
    assert_eq!((out.rows, out.threads.len(), out.logits.len()), (0, 0, 0));
    let plan = e.last_plan();
    assert_eq!((plan.num_rows, plan.num_items()), (0, 0));
    assert_eq!(plan.item_chunk_ptr, [0]);
    assert_eq!(plan.row_partial_ptr, [0]);
    e.finish(root).expect("finish");
}

#[test]
fn a_restart_with_a_bad_prompt_changes_nothing() {
    use spindle::tree::ThreadState;
    let mut e = engine("tiny-llama", 64, 4, AttentionMode::Forked);
    let root = e.add_request(&[1, 2, 3]).expect("request");
    e.step().expect("prefill");
    let request = e.request_of(root).expect("root");
    assert!(matches!(
        e.restart_request(request, &[1, 600]),
        Err(SpindleError::TokenOutOfVocab { token: 600, .. })
    ));
    // The request still runs on its old root, its cache intact.
    assert_eq!(e.root_of(request).expect("request"), root);
    let t = e.thread(root).expect("root");
    assert_eq!((t.state, t.view.len()), (ThreadState::Active, 3));
    // A good prompt restarts it under the same id.
    let new_root = e.restart_request(request, &[4, 5]).expect("restart");
    assert_ne!(new_root, root);
    assert_eq!(e.request_of(new_root).expect("new root"), request);
    assert_eq!(e.thread(root).expect("old").state, ThreadState::Retired);
}
