//! Adaptive generation on the real engine (CPU backend, tiny-qwen2): scripted control
//! tokens through the presets, nested forks, limits, budgets, waves under a small KV pool,
//! sampling reproducibility, events and the trace.

mod common;

use common::*;
use spindle::backend::cpu::CpuBackend;
use spindle::generate::demo::workload;
use spindle::generate::{
    EndReason, Event, Generator, Policy, Request, SamplingParams, ScriptItem, Scripted, TagProtocol,
};
use spindle::tokenizer::Tokenizer;
use spindle::{AttentionMode, Engine, JoinKind, RequestId};
use std::sync::Arc;

const MODEL: &str = "tiny-qwen2";

fn tok() -> Tokenizer {
    Tokenizer::from_file(&fixture(MODEL).join("tokenizer.json")).expect("tokenizer")
}

fn generator(blocks: usize, block_size: usize, policy: Policy) -> Generator<CpuBackend> {
    let e: Engine<CpuBackend> = engine(MODEL, blocks, block_size, AttentionMode::Forked);
    Generator::new(e, policy)
}

fn small_policy() -> Policy {
    Policy {
        thread_budget: 64,
        request_budget: 512,
        child_growth_tokens: 32,
        ..Policy::default()
    }
}

fn scripted(tok: &Tokenizer, scripts: &[(&[u32], &str)]) -> Box<Scripted> {
    let mut s = Scripted::new(tok.special_ids());
    for (path, text) in scripts {
        s = s.script(path, Scripted::parse(tok, text).expect("script"));
    }
    Box::new(s)
}

fn run_all(g: &mut Generator<CpuBackend>) -> Vec<Event> {
    let mut events = Vec::new();
    g.run(|e| events.push(e.clone())).expect("generation runs");
    events
}

fn assert_clean(g: &Generator<CpuBackend>) {
    assert!(g.engine().pool().all_free(), "blocks leaked");
    g.engine().check_refcounts().expect("refcounts consistent");
}

#[test]
fn demo_workload_runs_every_preset_concurrently() {
    let tok = tok();
    let mut g = generator(256, 16, small_policy());
    let mut ids = Vec::new();
    for d in workload(&tok).expect("workload") {
        ids.push(g.add_request(d.request).expect("request"));
    }
    let events = run_all(&mut g);
    assert_clean(&g);
    for id in ids {
        let out = g.output(id).expect("finished");
        println!("{}", out.render_tree(Some(&tok)));
        println!("{:?}", out.stats);
        assert_eq!(out.reason, EndReason::Eos);
    }
    let forks = events
        .iter()
        .filter(|e| matches!(e, Event::Forked { .. }))
        .count();
    assert_eq!(forks, 4);
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::Protocol { .. } | Event::Error { .. })));
}

fn tw(tok: &Tokenizer) -> Arc<TagProtocol> {
    Arc::new(TagProtocol::threadweaver(tok, JoinKind::Reprefill).expect("protocol"))
}

fn request(tok: &Tokenizer, prompt: &str, scripts: &[(&[u32], &str)]) -> Request {
    Request::new(enc(tok, prompt), tw(tok), SamplingParams::default())
        .with_source(scripted(tok, scripts))
}

fn enc(tok: &Tokenizer, s: &str) -> Vec<u32> {
    tok.encode(s).expect("encodes")
}

fn problems(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Protocol { problem, .. } => Some(problem.clone()),
            _ => None,
        })
        .collect()
}

/// Four children of different lengths under threadweaver.
const FOUR: &[(&[u32], &str)] = &[
    (
        &[],
        "{2}<Parallel><Outlines><Outline> 1: a</Outline><Outline> 2: b</Outline>\
         <Outline> 3: c</Outline><Outline> 4: d</Outline></Outlines>{3}</Parallel><|endoftext|>",
    ),
    (&[0], "{12}</Thread>"),
    (&[1], "{20}</Thread>"),
    (&[2], "{6}</Thread>"),
    (&[3], "{15}</Thread>"),
];

fn generated_by_path(g: &Generator<CpuBackend>, id: RequestId) -> Vec<(Vec<u32>, Vec<u32>)> {
    let out = g.output(id).expect("finished");
    let mut v: Vec<_> = out
        .threads
        .iter()
        .map(|t| (t.path.clone(), t.generated.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn reprefill_join_feeds_children_transcripts_in_outline_order() {
    let tok = tok();
    let mut g = generator(256, 16, small_policy());
    let id = g
        .add_request(request(&tok, "<think> plan", FOUR))
        .expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    let out = g.output(id).expect("finished");
    assert_eq!(out.reason, EndReason::Eos);
    assert_eq!(out.threads.len(), 5);
    // The root's context holds every child's transcript, in order, after </Outlines>.
    let mut expect: Vec<u32> = Vec::new();
    for k in &out.threads[0].forks[0] {
        let t = out.thread(*k).expect("child");
        expect.extend(&t.prime);
        expect.extend(&t.generated);
    }
    let outlines_end = tok.token_id("</Outlines>").expect("</Outlines> is a token");
    let close = out
        .context
        .iter()
        .position(|&x| x == outlines_end)
        .expect("</Outlines>");
    assert_eq!(
        &out.context[close + 1..close + 1 + expect.len()],
        &expect[..]
    );
    let joined: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Joined {
                kind, reprefill, ..
            } => Some((*kind, *reprefill)),
            _ => None,
        })
        .collect();
    assert_eq!(joined, vec![(JoinKind::Reprefill, expect.len())]);
    // Critical path: the root's tokens plus the longest child.
    let root = out.threads[0].generated.len();
    let longest = out.threads[1..]
        .iter()
        .map(|t| t.generated.len())
        .max()
        .expect("kids");
    assert_eq!(out.stats.critical_path_tokens, root + longest);
    assert_eq!(
        out.stats.total_tokens,
        out.threads.iter().map(|t| t.generated.len()).sum::<usize>()
    );
    let tokens = events
        .iter()
        .filter(|e| matches!(e, Event::Token { .. }))
        .count();
    assert_eq!(tokens, out.stats.total_tokens);
}

#[test]
fn multiverse_reuse_join_keeps_children_kv_and_jumps_position() {
    let tok = tok();
    let mut g = generator(256, 16, small_policy());
    let mv = Arc::new(TagProtocol::multiverse(&tok).expect("protocol"));
    let scripts: &[(&[u32], &str)] = &[
        (
            &[],
            "<Parallel><Goal><Outline> 1</Outline><Outline> 2</Outline></Goal>{3}</Conclusion></Parallel><|endoftext|>",
        ),
        (&[0], "{7}</Path>"),
        (&[1], "{3}</Path>"),
    ];
    let prompt = enc(&tok, "<think> x");
    let id = g
        .add_request(
            Request::new(prompt.clone(), mv, SamplingParams::default())
                .with_source(scripted(&tok, scripts)),
        )
        .expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    let out = g.output(id).expect("finished");
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Joined {
            kind: JoinKind::Reuse,
            reprefill: 0,
            ..
        }
    )));
    // Context: prompt, root tokens up to </Goal>, both paths' own tokens, <Conclusion>, ...
    let root = g
        .engine()
        .thread(g.engine().root_of(id).expect("request"))
        .expect("root");
    let goal_tag = tok.token_id("</Goal>").expect("</Goal> is a token");
    let goal_end = out
        .context
        .iter()
        .position(|&x| x == goal_tag)
        .expect("</Goal>");
    let p = root.own_pos[goal_end] + 1;
    let kids = &out.threads[0].forks[0];
    let lens: Vec<usize> = kids
        .iter()
        .map(|k| {
            let t = out.thread(*k).expect("kid");
            // The end tag is cached too.
            t.prime.len() + t.generated.len()
        })
        .collect();
    let conclusion = goal_end + 1 + lens.iter().sum::<usize>();
    assert_eq!(
        out.context[conclusion], 15,
        "<Conclusion> follows the merged paths"
    );
    assert_eq!(
        root.own_pos[conclusion],
        p + *lens.iter().max().expect("lens") as u32,
        "position jumps past the longest path"
    );
    // Both paths started at the same position.
    assert_eq!(root.own_pos[goal_end + 1], p);
    assert_eq!(root.own_pos[goal_end + 1 + lens[0]], p);
}

#[test]
fn apr_children_see_only_their_message_and_return_only_results() {
    let tok = tok();
    let mut g = generator(256, 16, small_policy());
    let apr = Arc::new(TagProtocol::apr(&tok).expect("protocol"));
    let scripts: &[(&[u32], &str)] = &[
        (
            &[],
            "<spawn><Outline> alpha</Outline><Outline> beta</Outline></spawn>{2}<|endoftext|>",
        ),
        (&[0], "{5}<join> 1</join>"),
        (&[1], "{2}<join> 22</join>"),
    ];
    let id = g
        .add_request(
            Request::new(enc(&tok, "solve"), apr, SamplingParams::default())
                .with_source(scripted(&tok, scripts)),
        )
        .expect("request");
    run_all(&mut g);
    assert_clean(&g);
    let out = g.output(id).expect("finished");
    let kids = out.threads[0].forks[0].clone();
    for &k in &kids {
        let t = g.engine().thread(k).expect("kid");
        assert_eq!(t.own_pos[0], 0, "an APR child starts at position 0");
        assert_eq!(t.fork_len, 0, "and sees none of the parent's context");
    }
    let text = tok.decode(&out.context).expect("decode");
    assert!(
        text.contains("</spawn><join> 1</join><join> 22</join>"),
        "{text}"
    );
    let child0 = tok
        .decode(&out.thread(kids[0]).expect("kid").generated)
        .expect("decode");
    let free_part = child0.split("<join>").next().expect("text");
    assert!(!free_part.is_empty() && !text.contains(&format!("{free_part}<join>")));
}

#[test]
fn nested_forks_and_depth_limit() {
    let tok = tok();
    let nested: &[(&[u32], &str)] = &[
        (&[], "<Parallel><Outlines><Outline> 1</Outline><Outline> 2</Outline></Outlines>{2}<|endoftext|>"),
        (&[0], "{2}<Parallel><Outlines><Outline> a</Outline><Outline> b</Outline></Outlines>{2}</Thread>"),
        (&[0, 0], "{3}<Outlines><Outline> deep</Outline></Outlines>{2}</Thread>"),
        (&[0, 1], "{4}</Thread>"),
        (&[1], "{5}</Thread>"),
    ];
    // Depth 2 allowed: the grandchildren exist; the grandchild's own fork is refused.
    let mut g = generator(256, 16, small_policy());
    let id = g.add_request(request(&tok, "go", nested)).expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    let out = g.output(id).expect("finished");
    assert_eq!(out.threads.len(), 5);
    assert_eq!(out.stats.forks, 2);
    let p = problems(&events);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("max depth 2"));
    assert!(out.threads.iter().all(|t| t.end.is_some()));
    // With max depth 1 the child's fork is text too.
    let mut g = generator(
        256,
        16,
        Policy {
            max_depth: 1,
            ..small_policy()
        },
    );
    let id = g.add_request(request(&tok, "go", nested)).expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    assert_eq!(g.output(id).expect("finished").threads.len(), 3);
    assert!(problems(&events)[0].contains("depth 1"));
}

#[test]
fn width_limit_drops_extra_outlines() {
    let tok = tok();
    let mut g = generator(
        256,
        16,
        Policy {
            max_width: 2,
            ..small_policy()
        },
    );
    let id = g.add_request(request(&tok, "go", FOUR)).expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    let out = g.output(id).expect("finished");
    assert_eq!(out.threads[0].forks[0].len(), 2);
    assert!(problems(&events)[0].contains("max width 2"));
}

#[test]
fn zero_outlines_and_stray_closes_do_not_fork() {
    let tok = tok();
    let scripts: &[(&[u32], &str)] = &[(
        &[],
        "</Thread><Parallel><Outlines></Outlines>{2}</Parallel></Outlines><|endoftext|>",
    )];
    let mut g = generator(64, 16, small_policy());
    let id = g
        .add_request(request(&tok, "go", scripts))
        .expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    assert_eq!(g.output(id).expect("finished").threads.len(), 1);
    assert_eq!(problems(&events).len(), 3, "{:?}", problems(&events));
}

#[test]
fn thread_and_request_budgets_truncate() {
    let tok = tok();
    // Child 0 never closes: cut at the thread budget, its </Thread> restored for the parent.
    let scripts: &[(&[u32], &str)] = &[
        (&[], "<Parallel><Outlines><Outline> 1</Outline><Outline> 2</Outline></Outlines>{2}<|endoftext|>"),
        (&[0], "{100}"),
        (&[1], "{3}</Thread>"),
    ];
    let mut g = generator(
        256,
        16,
        Policy {
            thread_budget: 10,
            ..small_policy()
        },
    );
    let id = g
        .add_request(request(&tok, "go", scripts))
        .expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    let out = g.output(id).expect("finished");
    let kid = out.thread(out.threads[0].forks[0][0]).expect("kid");
    assert_eq!(kid.generated.len(), 10);
    assert_eq!(kid.end, Some(EndReason::Budget));
    assert_eq!(out.reason, EndReason::Eos);
    let text = tok.decode(&out.context).expect("decode");
    assert_eq!(text.matches("</Thread>").count(), 2, "{text}");
    assert!(events.iter().any(|e| matches!(
        e,
        Event::ThreadEnded {
            reason: EndReason::Budget,
            ..
        }
    )));

    // The request budget (here via max_tokens) ends everything, mid-block included.
    let scripts: &[(&[u32], &str)] = &[
        (
            &[],
            "<Parallel><Outlines><Outline> 1</Outline></Outlines>{100}",
        ),
        (&[0], "{100}"),
    ];
    let mut g = generator(256, 16, small_policy());
    let req = Request::new(
        enc(&tok, "go"),
        tw(&tok),
        SamplingParams {
            max_tokens: Some(30),
            ..Default::default()
        },
    )
    .with_source(scripted(&tok, scripts));
    let id = g.add_request(req).expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    let out = g.output(id).expect("finished");
    assert_eq!(out.reason, EndReason::Budget);
    assert_eq!(out.stats.total_tokens, 30);
    assert!(
        problems(&events).iter().any(|p| p.contains("still open")),
        "{:?}",
        problems(&events)
    );
}

#[test]
fn stop_sequences_end_the_root() {
    let tok = tok();
    let scripts: &[(&[u32], &str)] = &[(&[], "{3} the end{5}")];
    let mut g = generator(64, 16, small_policy());
    let req = Request::new(
        enc(&tok, "go"),
        tw(&tok),
        SamplingParams {
            stop: vec![enc(&tok, " the end")],
            ..Default::default()
        },
    )
    .with_source(scripted(&tok, scripts));
    let id = g.add_request(req).expect("request");
    run_all(&mut g);
    let out = g.output(id).expect("finished");
    assert_eq!(out.reason, EndReason::Stop);
    assert!(tok
        .decode(&out.threads[0].generated)
        .expect("decode")
        .ends_with(" the end"));
}

#[test]
fn small_kv_pool_runs_children_in_waves_with_the_same_result() {
    let tok = tok();
    // Each child is planned at ceil((3 + 40) / 4) = 11 blocks (a fresh span after the
    // shared tail block, as the engine counts it).
    let policy = Policy {
        child_growth_tokens: 40,
        ..small_policy()
    };
    let mut big = generator(256, 4, policy.clone());
    let a = big
        .add_request(request(&tok, "<think> plan", FOUR))
        .expect("request");
    let big_events = run_all(&mut big);
    assert!(!big_events.iter().any(|e| matches!(e, Event::Waves { .. })));
    // 4-token blocks, 40 for the lot (the root's final context needs 25): room for two
    // children at a time.
    let mut small = generator(40, 4, policy);
    let b = small
        .add_request(request(&tok, "<think> plan", FOUR))
        .expect("request");
    let events = run_all(&mut small);
    assert_clean(&small);
    let errors: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Error { .. }))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let waves: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Waves { .. }))
        .collect();
    println!("{waves:?}");
    assert!(!waves.is_empty(), "expected waves");
    let out = small.output(b).expect("finished");
    assert_eq!(out.reason, EndReason::Eos);
    assert!(
        out.threads.iter().all(|t| t.end.is_some()),
        "every thread finished"
    );
    assert!(
        out.stats.peak_width < 4,
        "peak width {}",
        out.stats.peak_width
    );
    assert_eq!(generated_by_path(&small, b), generated_by_path(&big, a));
    assert!(small.steps() > big.steps());
}

#[test]
fn memory_pressure_preempts_and_resumes_without_loss() {
    let tok = tok();
    let long: &[(&[u32], &str)] = &[(&[], "{40}<|endoftext|>")];
    let alone = |seed_prompt: &str| {
        let mut g = generator(64, 4, small_policy());
        let id = g
            .add_request(request(&tok, seed_prompt, long))
            .expect("request");
        run_all(&mut g);
        g.output(id).expect("finished").threads[0].generated.clone()
    };
    let (x, y) = (alone("first prompt here"), alone("second"));
    // Two requests that each need ~12 blocks of 4 tokens in a pool of 16.
    let mut g = generator(16, 4, small_policy());
    let a = g
        .add_request(request(&tok, "first prompt here", long))
        .expect("request");
    let b = g
        .add_request(request(&tok, "second", long))
        .expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    assert!(
        events.iter().any(|e| matches!(e, Event::Preempted { .. })),
        "expected preemption"
    );
    assert!(g.engine().stats().preemptions > 0);
    assert_eq!(g.output(a).expect("a").threads[0].generated, x);
    assert_eq!(g.output(b).expect("b").threads[0].generated, y);
}

#[test]
fn pool_too_small_for_anything_fails_the_request_not_the_run() {
    let tok = tok();
    let long: &[(&[u32], &str)] = &[(&[], "{40}<|endoftext|>")];
    let mut g = generator(4, 4, small_policy());
    let id = g.add_request(request(&tok, "go", long)).expect("request");
    let events = run_all(&mut g);
    assert_clean(&g);
    assert_eq!(g.output(id).expect("finished").reason, EndReason::Error);
    assert!(events.iter().any(|e| matches!(e, Event::Error { .. })));
}

#[test]
fn the_request_that_cannot_fit_fails_not_its_neighbour() {
    let tok = tok();
    // 4 blocks of 4 tokens: the first request's 24-token prompt can never fit; the short
    // request added after it must still finish.
    let mut g = generator(4, 4, small_policy());
    let long_prompt = " the licence".repeat(12);
    let big = g
        .add_request(request(&tok, &long_prompt, &[(&[], "{2}<|endoftext|>")]))
        .expect("request");
    assert!(enc(&tok, &long_prompt).len() > 16);
    let small = g
        .add_request(request(&tok, "go", &[(&[], "{3}<|endoftext|>")]))
        .expect("request");
    run_all(&mut g);
    assert_clean(&g);
    assert_eq!(g.output(big).expect("ended").reason, EndReason::Error);
    assert_ne!(g.output(small).expect("ended").reason, EndReason::Error);
}

/// Scripted tags (four children) with every free token *sampled* at temperature 0.9 from
/// the thread's own generator, so forks and per-child seeding are both exercised.
fn sampled(tok: &Tokenizer, seed: u64) -> Request {
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        seed,
        ..Default::default()
    };
    let mut source = Scripted::new(tok.special_ids()).sampling(params.clone());
    for (path, text) in FOUR {
        source = source.script(path, Scripted::parse(tok, text).expect("script"));
    }
    Request::new(enc(tok, "<think> Read the licence"), tw(tok), params)
        .with_source(Box::new(source))
}

#[test]
fn sampling_is_reproducible_alone_or_batched() {
    let tok = tok();
    let mut g = generator(256, 16, small_policy());
    let a = g.add_request(sampled(&tok, 7)).expect("request");
    run_all(&mut g);
    let alone = generated_by_path(&g, a);
    assert_eq!(alone.len(), 5, "the root and four sampled children");

    let mut g = generator(256, 16, small_policy());
    g.add_request(request(&tok, "<think> other work", FOUR))
        .expect("request");
    let b = g.add_request(sampled(&tok, 7)).expect("request");
    g.add_request(sampled(&tok, 8)).expect("request");
    run_all(&mut g);
    assert_clean(&g);
    assert_eq!(generated_by_path(&g, b), alone);

    let mut g = generator(256, 16, small_policy());
    let c = g.add_request(sampled(&tok, 8)).expect("request");
    run_all(&mut g);
    assert_ne!(
        generated_by_path(&g, c),
        alone,
        "another seed samples differently"
    );
}

#[test]
fn scripted_free_tokens_avoid_control_tokens() {
    let tok = tok();
    let mut g = generator(64, 16, small_policy());
    // 20 free tokens, then end-of-text: every free choice must avoid the special ids.
    let special = tok.special_ids();
    let eos = tok.token_id("<|endoftext|>").expect("end-of-text id");
    let s =
        Scripted::new(special.clone()).script(&[], [ScriptItem::Free(20), ScriptItem::Token(eos)]);
    let id = g
        .add_request(
            Request::new(enc(&tok, "go"), tw(&tok), SamplingParams::default())
                .with_source(Box::new(s)),
        )
        .expect("request");
    run_all(&mut g);
    let out = g.output(id).expect("finished");
    assert_eq!(out.threads[0].generated.len(), 21);
    assert!(out.threads[0].generated[..20]
        .iter()
        .all(|t| !special.contains(t)));
    assert_eq!(out.threads[0].generated[20], eos);
}

#[test]
fn trace_has_thread_spans_and_batch_width_counters() {
    let tok = tok();
    let mut g = generator(256, 16, small_policy());
    g.add_request(request(&tok, "<think> plan", FOUR))
        .expect("request");
    run_all(&mut g);
    let trace = g.trace().to_json();
    let evs = trace["traceEvents"].as_array().expect("events");
    let spans = evs.iter().filter(|e| e["ph"] == "X").count();
    let counters: Vec<_> = evs.iter().filter(|e| e["ph"] == "C").collect();
    assert_eq!(spans, 5);
    assert_eq!(counters.len() as u64, g.steps());
    assert_eq!(
        counters
            .iter()
            .map(|c| c["args"]["width"].as_u64().expect("width"))
            .max(),
        Some(4)
    );
    let path = std::env::temp_dir().join(format!("spindle-trace-{}.json", std::process::id()));
    g.trace().write(&path).expect("write");
    let back: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert_eq!(back, trace);
    let _ = std::fs::remove_file(path);
}

#[test]
fn take_output_frees_what_the_request_kept_and_the_generator_goes_on() {
    let tok = tok();
    let mut g = generator(256, 16, small_policy());
    let a = g
        .add_request(request(&tok, "<think> plan", FOUR))
        .expect("request");
    run_all(&mut g);
    let out = g.take_output(a).expect("take").expect("finished");
    assert_eq!(out.threads.len(), 5);
    assert!(g.output(a).is_none(), "taken");
    assert!(
        g.engine()
            .thread(g.engine().root_of(a).expect("request"))
            .expect("root")
            .own_tokens
            .is_empty(),
        "forgotten"
    );
    // The generator serves the next request as before.
    let b = g
        .add_request(request(&tok, "<think> plan", FOUR))
        .expect("request");
    run_all(&mut g);
    assert_clean(&g);
    assert_eq!(g.output(b).expect("finished").threads.len(), 5);
}

#[test]
fn where_a_request_budget_cuts_does_not_depend_on_waves_or_neighbours() {
    let tok = tok();
    for budget in [40, 55, 65] {
        // The budget runs out while the four children are still generating.
        let policy = Policy {
            child_growth_tokens: 40,
            request_budget: budget,
            ..small_policy()
        };
        let mut big = generator(256, 4, policy.clone());
        let a = big
            .add_request(request(&tok, "<think> plan", FOUR))
            .expect("request");
        run_all(&mut big);
        let alone = generated_by_path(&big, a);
        assert_eq!(
            alone.len(),
            5,
            "budget {budget}: the root and four children"
        );
        // A pool that fits two children at a time, shared with another request.
        let mut small = generator(48, 4, policy);
        small
            .add_request(request(&tok, "<think> other work", FOUR))
            .expect("request");
        let b = small
            .add_request(request(&tok, "<think> plan", FOUR))
            .expect("request");
        let events = run_all(&mut small);
        assert_clean(&small);
        assert!(
            events.iter().any(|e| matches!(e, Event::Waves { .. })),
            "budget {budget}: expected waves"
        );
        assert_eq!(generated_by_path(&small, b), alone, "budget {budget}");
    }
}

#[test]
fn cancelling_a_request_with_children_in_waves_frees_it_and_spares_the_other() {
    use spindle::generate::events::EndReason;
    let tok = tok();
    let policy = Policy {
        child_growth_tokens: 40,
        ..small_policy()
    };
    let long: &[(&[u32], &str)] = &[(&[], "{30}<|endoftext|>")];
    let alone = {
        let mut g = generator(256, 4, policy.clone());
        let id = g
            .add_request(request(&tok, "other", long))
            .expect("request");
        run_all(&mut g);
        generated_by_path(&g, id)
    };
    // A pool with room for two children at a time: the forking request's children wait in
    // waves when it is cancelled.
    let mut g = generator(56, 4, policy);
    let a = g
        .add_request(request(&tok, "<think> plan", FOUR))
        .expect("request");
    let b = g
        .add_request(request(&tok, "other", long))
        .expect("request");
    let mut waves = false;
    while !waves {
        let events = g.step().expect("step");
        waves |= events.iter().any(|e| matches!(e, Event::Waves { .. }));
        assert!(!g.is_idle(), "the fork never waited in waves");
    }
    let used = g.engine().pool().num_used();
    g.cancel(a).expect("cancel");
    assert!(
        g.engine().pool().num_used() < used,
        "its blocks came back at once"
    );
    assert!(matches!(
        g.cancel(RequestId(9999)),
        Err(spindle::SpindleError::UnknownRequest {
            request: RequestId(9999)
        })
    ));
    g.cancel(a).expect("cancelling again does nothing");
    run_all(&mut g);
    assert_clean(&g);
    assert_eq!(g.output(a).expect("a ended").reason, EndReason::Cancelled);
    assert_eq!(
        generated_by_path(&g, b),
        alone,
        "the other request is unchanged"
    );
}

#[test]
fn a_request_the_pool_cannot_hold_beside_others_restarts_instead_of_failing() {
    let tok = tok();
    let policy = Policy {
        child_growth_tokens: 8,
        ..small_policy()
    };
    let prompts = ["<think> plan", "<think> other plan", "<think> a third plan"];
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut g = generator(256, 4, policy.clone());
            let id = g.add_request(request(&tok, p, FOUR)).expect("request");
            run_all(&mut g);
            assert_clean(&g);
            generated_by_path(&g, id)
        })
        .collect();
    // Pools from roomy to tight: where the requests' pinned prefixes leave no room for the
    // oldest one's next tokens, it restarts, and still ends with its output alone (34 and
    // 30 blocks restart once; 28 and 20 hold no request alone, which then fail).
    let mut restarted = 0;
    for blocks in [40, 34, 30, 28, 20] {
        let mut g = generator(blocks, 4, policy.clone());
        let ids: Vec<RequestId> = prompts
            .iter()
            .map(|p| g.add_request(request(&tok, p, FOUR)).expect("request"))
            .collect();
        let events = run_all(&mut g);
        assert_clean(&g);
        restarted += events
            .iter()
            .filter(|e| matches!(e, Event::Restarted { .. }))
            .count();
        for (i, &id) in ids.iter().enumerate() {
            let out = g.output(id).expect("every request ends");
            if out.reason == EndReason::Error {
                // Only a request that cannot fit even alone may fail.
                let mut solo = generator(blocks, 4, policy.clone());
                let s = solo
                    .add_request(request(&tok, prompts[i], FOUR))
                    .expect("request");
                run_all(&mut solo);
                assert_eq!(
                    solo.output(s).expect("ends").reason,
                    EndReason::Error,
                    "request {i} failed in a pool of {blocks} blocks that holds it alone"
                );
            } else {
                assert_eq!(
                    generated_by_path(&g, id),
                    alone[i],
                    "request {i} in a pool of {blocks} blocks"
                );
            }
        }
    }
    assert!(restarted > 0, "no pool size made a request restart");
}
