//! Tag protocols: the presets resolve through the fixture tokenizer, and every malformed
//! control sequence has a defined outcome (text plus a reported problem, a truncation, or
//! no fork) rather than a panic. Engine-level behaviour is in `tests/generate.rs`.

mod common;

use common::fixture;
use spindle::generate::tags::{ChildPrime, TagPair};
use spindle::generate::{Action, Protocol, Role, SplitTag, TagProtocol, TagSpec, TokenSplit};
use spindle::tokenizer::{TextStream, Tokenizer};
use spindle::{JoinKind, SpindleError};

fn tok() -> Tokenizer {
    Tokenizer::from_file(&fixture("tiny-qwen2").join("tokenizer.json")).expect("tokenizer")
}

fn id(tok: &Tokenizer, s: &str) -> u32 {
    tok.token_id(s).unwrap_or_else(|| panic!("{s} is a token"))
}

/// Feeds `text`'s tokens one by one to a fresh parser; returns every non-text action.
fn actions(p: &TagProtocol, role: Role, tokens: &[u32]) -> Vec<(usize, Action)> {
    let mut parser = p.parser(role);
    let mut out = Vec::new();
    for i in 0..tokens.len() {
        let a = parser.on_token(&tokens[..=i]);
        if a != Action::Text {
            out.push((i, a));
        }
    }
    out
}

fn enc(tok: &Tokenizer, s: &str) -> Vec<u32> {
    tok.encode(s).expect("encodes")
}

#[test]
fn tokenizer_round_trips_text_and_tags() {
    let t = tok();
    let text = "<Parallel> the licence</Parallel>";
    let ids = enc(&t, text);
    assert_eq!(ids[0], id(&t, "<Parallel>"));
    assert_eq!(*ids.last().expect("ids"), id(&t, "</Parallel>"));
    assert_eq!(t.decode(&ids).expect("decodes"), text);
    assert_eq!(t.tag("<Thread>").expect("tag"), vec![9]);
    assert_eq!(t.token_id("<|endoftext|>"), Some(0));
    assert!(t.special_ids().contains(&20));
    // Streaming decode gives back the same text piece by piece.
    let mut s = TextStream::new();
    let streamed: String = ids.iter().map(|&i| s.push(&t, i).expect("push")).collect();
    assert_eq!(streamed, text);
}

#[test]
fn tokenizer_errors_are_typed() {
    let missing = Tokenizer::from_file(std::path::Path::new("/nonexistent/tokenizer.json"));
    assert!(matches!(missing, Err(SpindleError::Io { .. })));
    let bad = Tokenizer::from_bytes(b"{not json");
    assert!(matches!(bad, Err(SpindleError::Tokenizer(_))));
    assert!(matches!(
        TagProtocol::preset("nope", &tok()),
        Err(SpindleError::Protocol(_))
    ));
}

#[test]
fn presets_resolve_to_the_fixture_tags() {
    let t = tok();
    let tw = TagProtocol::threadweaver(&t, JoinKind::Reprefill).expect("threadweaver");
    let s = tw.spec();
    assert_eq!(
        s.container,
        TagPair {
            open: vec![5],
            close: vec![6]
        }
    );
    assert_eq!(
        s.entry,
        TagPair {
            open: vec![7],
            close: vec![8]
        }
    );
    assert_eq!(s.child_end, vec![10]);
    match &s.child_prime {
        ChildPrime::Numbered { tag, labels } => {
            assert_eq!(tag, &vec![9]);
            assert_eq!(t.decode(&labels[0]).expect("label"), " 1:");
        }
        other => panic!("unexpected prime {other:?}"),
    }
    let mv = TagProtocol::multiverse(&t).expect("multiverse");
    assert_eq!(mv.spec().join, JoinKind::Reuse);
    assert_eq!(mv.spec().after_join, vec![id(&t, "<Conclusion>")]);
    let apr = TagProtocol::apr(&t).expect("apr");
    assert!(!apr.spec().share_context);
    assert_eq!(apr.spec().result, Some(vec![id(&t, "<join>")]));
    assert!(TagProtocol::preset("threadweaver-reuse", &t).is_ok());
    for p in [&tw, &mv, &apr] {
        assert!(p.control_tokens().iter().all(|&c| c <= 20));
    }
}

#[test]
fn threadweaver_outlines_fork_one_child_per_entry() {
    let t = tok();
    let p = TagProtocol::threadweaver(&t, JoinKind::Reprefill).expect("protocol");
    let toks = enc(
        &t,
        "go<Parallel><Outlines><Outline> 1: a</Outline><Outline> 2: b</Outline></Outlines>",
    );
    let acts = actions(&p, Role::Root, &toks);
    assert_eq!(acts.len(), 1);
    let (at, Action::Fork(spec)) = &acts[0] else {
        panic!("expected a fork, got {acts:?}");
    };
    assert_eq!(*at, toks.len() - 1);
    assert_eq!(spec.children.len(), 2);
    assert_eq!(
        t.decode(&spec.children[1].prime).expect("prime"),
        "<Thread> 2:"
    );
    assert_eq!(spec.join, JoinKind::Reprefill);
    assert!(spec.share_context);
    // A child ends at </Thread>; a root treats it as text and reports it.
    let end = enc(&t, " done</Thread>");
    assert_eq!(
        actions(&p, Role::Child { index: 0 }, &end),
        vec![(end.len() - 1, Action::End { returns: None })]
    );
    assert!(matches!(
        actions(&p, Role::Root, &end)[..],
        [(_, Action::Malformed(_))]
    ));
    // A preset names its tags in messages by their text.
    let named = TagProtocol::preset("threadweaver", &t).expect("preset");
    match &actions(&named, Role::Root, &end)[..] {
        [(_, Action::Malformed(msg))] => assert!(msg.contains("</Thread>"), "{msg}"),
        other => panic!("expected a malformed end tag, got {other:?}"),
    }
}

#[test]
fn apr_messages_become_child_prompts_and_results_are_wrapped() {
    let t = tok();
    let p = TagProtocol::apr(&t).expect("protocol");
    let toks = enc(
        &t,
        "<spawn><Outline> count ten</Outline><Outline> sum</Outline></spawn>",
    );
    let acts = actions(&p, Role::Root, &toks);
    let [(_, Action::Fork(spec))] = &acts[..] else {
        panic!("expected one fork, got {acts:?}");
    };
    assert!(!spec.share_context);
    assert_eq!(
        t.decode(&spec.children[0].prime).expect("msg"),
        " count ten"
    );
    assert_eq!(t.decode(&spec.children[1].prime).expect("msg"), " sum");
    // The child's result is what lies between <join> and </join>, handed back wrapped.
    let child = enc(&t, " thinking<join> 10</join>");
    let acts = actions(&p, Role::Child { index: 0 }, &child);
    let [(_, Action::End { returns: Some(r) })] = &acts[..] else {
        panic!("expected an end with returns, got {acts:?}");
    };
    assert_eq!(t.decode(r).expect("returns"), "<join> 10</join>");
    // Without <join>, the child hands back everything it wrote, wrapped.
    let child = enc(&t, " ten</join>");
    let acts = actions(&p, Role::Child { index: 0 }, &child);
    let [(_, Action::End { returns: Some(r) })] = &acts[..] else {
        panic!("expected an end with returns, got {acts:?}");
    };
    assert_eq!(t.decode(r).expect("returns"), "<join> ten</join>");
}

#[test]
fn malformed_sequences_are_text_with_a_reported_problem() {
    let t = tok();
    let p = TagProtocol::threadweaver(&t, JoinKind::Reprefill).expect("protocol");
    let malformed = |text: &str| -> usize {
        let acts = actions(&p, Role::Root, &enc(&t, text));
        assert!(
            acts.iter().all(|(_, a)| matches!(a, Action::Malformed(_))),
            "{text}: {acts:?}"
        );
        acts.len()
    };
    // A close without an open.
    assert_eq!(malformed("a</Outlines> b"), 1);
    assert_eq!(malformed("a</Parallel>"), 1);
    assert_eq!(malformed("<Outlines> a</Outline></Outlines>"), 2); // entry close w/o open + zero entries
                                                                   // Zero outlines: no fork.
    assert_eq!(malformed("<Parallel><Outlines></Outlines>"), 1);
    // An entry outside a container, a container inside a container.
    assert_eq!(malformed("<Outline> x"), 1);
    assert_eq!(malformed("<Outlines><Outlines>"), 1);
    // After a malformed close the parser still forks on a good block.
    let acts = actions(
        &p,
        Role::Root,
        &enc(&t, "</Outlines><Outlines><Outline> 1</Outline></Outlines>"),
    );
    assert!(matches!(acts[0].1, Action::Malformed(_)));
    assert!(matches!(acts[1].1, Action::Fork(_)));
}

#[test]
fn unclosed_blocks_are_reported_at_truncation() {
    let t = tok();
    let p = TagProtocol::threadweaver(&t, JoinKind::Reprefill).expect("protocol");
    let toks = enc(&t, "<Parallel><Outlines><Outline> 1: a");
    let mut parser = p.parser(Role::Child { index: 0 });
    for i in 0..toks.len() {
        parser.on_token(&toks[..=i]);
    }
    let tr = parser.on_truncate(&toks);
    assert!(tr.problem.expect("problem").contains("still open"));
    assert_eq!(tr.append, vec![10], "a cut child gets its </Thread> back");
    let mut root = p.parser(Role::Root);
    let toks = enc(&t, "<Parallel> x");
    for i in 0..toks.len() {
        root.on_token(&toks[..=i]);
    }
    assert!(root.on_truncate(&toks).problem.is_some());
}

#[test]
fn tags_split_across_tokens_match_only_when_complete() {
    // A protocol whose tags are several ordinary tokens each (as with a tokenizer that has
    // no added tokens for them).
    let (a, b, c, d) = (100u32, 101u32, 102u32, 103u32);
    let spec = TagSpec {
        name: "split".into(),
        block: None,
        container: TagPair {
            open: vec![a, b],
            close: vec![a, c],
        },
        entry: TagPair {
            open: vec![d, b],
            close: vec![d, c],
        },
        child_prime: ChildPrime::EntryContent,
        child_end: vec![c, c],
        result: None,
        share_context: true,
        join: JoinKind::Reprefill,
        after_join: Vec::new(),
    };
    let p = TagProtocol::new(spec).expect("valid spec");
    // a then x: not a tag; a b: container open; entry "d b 50 51 d c"; close "a c".
    let toks = [a, 60, a, b, d, b, 50, 51, d, c, a, c];
    let acts = actions(&p, Role::Root, &toks);
    let [(11, Action::Fork(spec))] = &acts[..] else {
        panic!("expected one fork at the last token, got {acts:?}");
    };
    // The entry holds only its text: the first token of the closing tag was taken back.
    assert_eq!(spec.children[0].prime, vec![50, 51]);
    // A split child-end tag ends the child only when complete.
    let acts = actions(&p, Role::Child { index: 0 }, &[c, 7, c, c]);
    assert_eq!(acts, vec![(3, Action::End { returns: None })]);
    // A tag spelled in ordinary tokens is text for a protocol whose tags are added tokens.
    let t = tok();
    let tw = TagProtocol::threadweaver(&t, JoinKind::Reprefill).expect("protocol");
    let pieces: Vec<u32> = ["<", "Out", "lines", ">"]
        .iter()
        .flat_map(|s| enc(&t, s))
        .collect();
    assert!(!pieces.contains(&5));
    assert!(actions(&tw, Role::Root, &pieces).is_empty());
}

#[test]
fn invalid_specs_are_rejected() {
    let t = tok();
    let mut spec = TagProtocol::multiverse(&t)
        .expect("protocol")
        .spec()
        .clone();
    spec.after_join.clear();
    assert!(matches!(
        TagProtocol::new(spec.clone()),
        Err(SpindleError::Protocol(_))
    ));
    spec.after_join = vec![15];
    spec.child_end.clear();
    assert!(matches!(
        TagProtocol::new(spec),
        Err(SpindleError::Protocol(_))
    ));
}

/// A byte-level BPE built from GGUF metadata whose vocabulary is the 256 byte symbols plus
/// the merges `><` and `</`: every tag is many tokens, and BPE merges across tag edges.
fn char_level_tokenizer() -> Tokenizer {
    use model_loader::GgufValue;
    use std::collections::BTreeMap;
    let s = |v: &str| GgufValue::String(v.to_string());
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.extend(["><".to_string(), "</".to_string()]);
    let mut m = BTreeMap::new();
    m.insert("tokenizer.ggml.model".to_string(), s("gpt2"));
    m.insert("tokenizer.ggml.pre".to_string(), s("gpt2"));
    m.insert(
        "tokenizer.ggml.tokens".to_string(),
        GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
    );
    m.insert(
        "tokenizer.ggml.merges".to_string(),
        GgufValue::Array(vec![s("> <"), s("< /")]),
    );
    Tokenizer::from_gguf(&m, std::path::Path::new("chars.gguf")).expect("tokenizer")
}

/// Feeds `tokens` as the generator does: a token the parser splits is replaced by its head
/// then its rest, stopping at the first fork or end. Returns the fed tokens and the actions.
fn run_split(p: &TagProtocol, role: Role, tokens: &[u32]) -> (Vec<u32>, Vec<Action>) {
    let mut parser = p.parser(role);
    let (mut gen, mut acts) = (Vec::new(), Vec::new());
    for &t in tokens {
        let pieces = match parser.split(&gen, t) {
            Some(TokenSplit { head, rest }) => head.into_iter().chain(rest).collect(),
            None => vec![t],
        };
        for piece in pieces {
            gen.push(piece);
            let a = parser.on_token(&gen);
            let stop = matches!(a, Action::Fork(_) | Action::End { .. });
            if a != Action::Text {
                acts.push(a);
            }
            if stop {
                return (gen, acts);
            }
        }
    }
    (gen, acts)
}

#[test]
fn multi_token_tags_match_on_text_even_when_bpe_merges_their_edges() {
    let tok = char_level_tokenizer();
    let text = "<Parallel><Outlines><Outline> a</Outline><Outline> b</Outline></Outlines><x";
    let ids = enc(&tok, text);
    let merged = tok.token_id("><").expect("merge token");
    assert!(ids.contains(&merged), "BPE merges tag edges");
    // The `>` closing `</Outlines>` is the first byte of a `><` token.
    let gt = text.find("</Outlines>").expect("tag") + "</Outlines".len();
    let at = (0..ids.len())
        .find(|&k| tok.decode(&ids[..k]).expect("decode").len() == gt)
        .expect("a token starts at the closing >");
    assert_eq!(ids[at], merged, "the fork tag ends inside `><`");
    assert_eq!(tok.decode(&ids).expect("decode"), text);

    // Ids only: the tags are sequences of single characters, but `><` hides their edges.
    let ids_only = TagProtocol::threadweaver(&tok, JoinKind::Reprefill)
        .expect("protocol")
        .with_names(&tok);
    assert!(actions(&ids_only, Role::Root, &ids)
        .iter()
        .all(|(_, a)| !matches!(a, Action::Fork(_))));

    let p = TagProtocol::preset("threadweaver", &tok).expect("preset");
    let split = p.split_tags();
    assert!(
        split.contains(&SplitTag {
            text: "<Outlines>".to_string(),
            tokens: 10
        }),
        "{split:?}"
    );
    let (fed, acts) = run_split(&p, Role::Root, &ids);
    // Exactly one fork, at the end of `</Outlines>`, which ends inside a merged `><`: its `>`
    // is fed alone and the rest of the token (`<`) dropped, as a text client stops there.
    let Some(Action::Fork(spec)) = acts.last() else {
        panic!("no fork: {acts:?}");
    };
    assert_eq!(acts.len(), 1, "{acts:?}");
    assert_eq!(spec.children.len(), 2);
    assert_eq!(
        tok.decode(&fed).expect("decode"),
        "<Parallel><Outlines><Outline> a</Outline><Outline> b</Outline></Outlines>"
    );
    let primes: Vec<String> = spec
        .children
        .iter()
        .map(|c| tok.decode(&c.prime).expect("prime"))
        .collect();
    assert_eq!(primes, ["<Thread> 1:", "<Thread> 2:"]);

    // A child ends at `</Thread>` even when its last `>` is merged with what follows.
    let child = enc(&tok, " done</Thread><y");
    let (fed, acts) = run_split(&p, Role::Child { index: 0 }, &child);
    assert!(
        matches!(acts.as_slice(), [Action::End { returns: None }]),
        "{acts:?}"
    );
    assert_eq!(tok.decode(&fed).expect("decode"), " done</Thread>");
}
