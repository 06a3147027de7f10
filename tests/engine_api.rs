//! Misuse of the engine API gets a typed error, never a panic or a silent wrong state.

mod common;

use common::*;
use spindle::{AttentionMode, JoinKind, SpindleError};

#[test]
fn misuse_is_refused_with_a_reason() {
    let mut e = engine("tiny-llama", 64, 4, AttentionMode::Forked);
    // Tokens past the vocabulary.
    assert!(matches!(
        e.add_request(&[1, 600]),
        Err(SpindleError::TokenOutOfVocab { token: 600, .. })
    ));
    // Positions past the largest one the kernels take.
    assert!(e.add_request_with_positions(&[1], &[u32::MAX]).is_err());
    let root = e.add_request(&[1, 2, 3]).expect("request");
    // A fork before the prompt is cached, and a join with nothing forked.
    assert!(e.fork(root, 2, true).is_err());
    while e.has_work() {
        e.step().expect("step");
    }
    assert!(e.join(root, JoinKind::Reuse).is_err());
    assert!(e.fork(root, 0, true).is_err(), "a fork needs children");
    let kids = e
        .fork_with(root, 2, true, Some(JoinKind::Reprefill))
        .expect("fork");
    // Only a request's root can be cancelled.
    assert!(e.cancel(kids[0]).is_err());
    // Feeding a waiting parent, and joining before the children end.
    assert!(e.feed(root, &[4]).is_err());
    assert!(e.join(root, JoinKind::Reprefill).is_err());
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
    // Children forked for a re-prefill join gave their blocks back: a reuse join of them
    // would merge nothing, so it is refused rather than silently wrong.
    assert!(matches!(
        e.join(root, JoinKind::Reuse),
        Err(SpindleError::InvalidRequest(_))
    ));
    assert_eq!(e.join(root, JoinKind::Reprefill).expect("join"), 4);
    while e.has_work() {
        e.step().expect("step");
    }
    e.finish(root).expect("finish");
    assert!(e.pool().all_free());
    e.check_refcounts().expect("refcounts");
}

#[test]
fn a_prompt_larger_than_the_pool_names_its_thread() {
    let mut e = engine("tiny-llama", 2, 4, AttentionMode::Forked);
    let root = e.add_request(&[1; 9]).expect("request");
    match e.step() {
        Err(SpindleError::ThreadDoesNotFit {
            thread, request, ..
        }) => {
            assert_eq!((thread, request), (root, root));
        }
        other => panic!("expected ThreadDoesNotFit, got {other:?}"),
    }
    e.cancel(root).expect("cancel");
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
