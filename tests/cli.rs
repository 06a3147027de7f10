//! The `spindle` binary end to end: inspect, gen-model and replay, on good and bad input.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn spindle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(args)
        .output()
        .expect("spindle runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("cli")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A copy of a fixture's checkpoint files, to break.
fn copy_fixture(name: &str, to: &str) -> PathBuf {
    let d = scratch(to);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), d.join(f)).expect("copy");
    }
    d
}

#[test]
fn inspect_accepts_fixtures_and_generated_models() {
    for name in FIXTURES {
        let o = spindle(&["inspect", "--model", fixture(name).to_str().expect("utf8")]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("architecture") && out.contains("model.embed_tokens.weight"));
    }
    for arch in ["llama", "qwen2", "qwen3"] {
        let d = scratch(&format!("gen-{arch}"));
        let o = spindle(&[
            "gen-model",
            "--arch",
            arch,
            "--preset",
            "tiny",
            "--seed",
            "3",
            "--out",
            d.to_str().expect("utf8"),
        ]);
        assert!(o.status.success(), "{arch}: {}", stderr(&o));
        let o = spindle(&["inspect", "--model", d.to_str().expect("utf8")]);
        assert!(o.status.success(), "{arch}: {}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("BF16"));
    }
}

fn expect_refusal(dir: &Path, needle: &str) {
    let o = spindle(&["inspect", "--model", dir.to_str().expect("utf8")]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{} was accepted", dir.display());
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
}

#[test]
fn inspect_refuses_each_malformed_checkpoint_with_its_message() {
    // Truncated file.
    let d = copy_fixture("tiny-llama", "truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).expect("read");
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    expect_refusal(&d, "model.safetensors");
    // Header length past the end.
    let d = copy_fixture("tiny-llama", "header-len");
    let mut b = std::fs::read(d.join("model.safetensors")).expect("read");
    b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(d.join("model.safetensors"), &b).expect("write");
    expect_refusal(&d, "header");
    // Invalid config JSON.
    let d = copy_fixture("tiny-llama", "bad-config");
    std::fs::write(d.join("config.json"), "{ not json").expect("write");
    expect_refusal(&d, "config.json");
    // Unsupported architecture.
    let d = copy_fixture("tiny-llama", "arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).expect("read");
    std::fs::write(
        d.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .expect("write");
    expect_refusal(&d, "GPT2LMHeadModel");
    // Inconsistent config: a layer the weights do not have.
    let d = copy_fixture("tiny-llama", "missing-tensor");
    let cfg = std::fs::read_to_string(d.join("config.json")).expect("read");
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4"),
    )
    .expect("write");
    expect_refusal(&d, "model.layers.3");
    // Heads not divisible by kv heads.
    let d = copy_fixture("tiny-llama", "heads");
    let cfg = std::fs::read_to_string(d.join("config.json")).expect("read");
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
    )
    .expect("write");
    expect_refusal(&d, "num_key_value_heads");
}

/// `v` with every logit row removed (`logits`, `join_logits`), recursively, so a replay
/// that does not write its logits cannot pass by echoing its input.
fn strip_logits(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != "logits" && *k != "join_logits")
                .map(|(k, v)| (k.clone(), strip_logits(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_logits).collect()),
        other => other.clone(),
    }
}

#[test]
fn replay_fills_every_reference_case_within_tolerance() {
    for name in FIXTURES {
        let dir = scratch(&format!("replay-{name}"));
        let want = reference(name);
        let input = dir.join("tokens-only.json");
        let stripped = strip_logits(&want);
        assert!(
            !stripped.to_string().contains("logits"),
            "{name}: the input still holds logits"
        );
        std::fs::write(&input, stripped.to_string()).expect("write input");
        let out = dir.join("out.json");
        for bs in ["1", "3", "16"] {
            let _ = std::fs::remove_file(&out);
            let o = spindle(&[
                "replay",
                "--device",
                "cpu",
                "--model",
                fixture(name).to_str().expect("utf8"),
                "--tree",
                input.to_str().expect("utf8"),
                "--out",
                out.to_str().expect("utf8"),
                "--block-size",
                bs,
            ]);
            assert!(o.status.success(), "{name}: {}", stderr(&o));
            let got: Value =
                serde_json::from_str(&std::fs::read_to_string(&out).expect("out")).expect("json");
            let (g_cases, w_cases) = (
                got["cases"].as_array().expect("cases"),
                want["cases"].as_array().expect("cases"),
            );
            assert_eq!(g_cases.len(), w_cases.len(), "{name}: number of cases");
            for (g, w) in g_cases.iter().zip(w_cases) {
                assert_eq!(g["name"], w["name"], "{name}: cases in order");
                assert_eq!(g["kind"], w["kind"], "{name} {}: kind", w["name"]);
                // Same tolerance and reason as tests/parity.rs (a correct f32 pass reaches
                // about 1.3e-5).
                let d = if w["kind"] == "sequence" {
                    let rows: Vec<Vec<f32>> =
                        serde_json::from_value(g["logits"].clone()).expect("rows");
                    // max_diff checks the row count (one per token) and the vocabulary.
                    max_diff(&rows, &w["logits"], name)
                } else {
                    json_tree_diff(&g["tree"], &w["tree"], &format!("{name} {}", w["name"]))
                };
                assert!(d <= 1e-4, "{name} {} bs {bs}: {d}", w["name"]);
                let s = &g["stats"];
                let stat = |k: &str| {
                    s[k].as_u64()
                        .unwrap_or_else(|| panic!("{name}: stats.{k} missing"))
                };
                assert!(stat("steps") >= 1, "{name}: steps");
                assert!(stat("blocks_peak") >= 1, "{name}: blocks");
                assert!(
                    stat("kv_tokens_read") >= 1
                        && stat("kv_tokens_read") <= stat("kv_tokens_read_naive"),
                    "{name}: forked attention reads at most what naive reads: {s}"
                );
                if w["kind"] == "sequence" {
                    // One prompt, prefilled in one step, one thread, nothing shared.
                    assert_eq!(stat("steps"), 1, "{name}: {s}");
                    assert_eq!(stat("kv_tokens_read"), stat("kv_tokens_read_naive"));
                    assert_eq!(stat("blocks_without_sharing"), stat("blocks_peak"));
                }
            }
        }
    }
}

/// Max difference of a written tree against the reference tree, walking both: a missing or
/// an extra node, join or row count is an error.
fn json_tree_diff(got: &Value, want: &Value, at: &str) -> f32 {
    assert_eq!(got["tokens"], want["tokens"], "{at}: tokens");
    let rows: Vec<Vec<f32>> = serde_json::from_value(got["logits"].clone()).expect("rows");
    let mut d = max_diff(&rows, &want["logits"], at);
    assert_eq!(
        got.get("fork").is_some(),
        want.get("fork").is_some(),
        "{at}: fork"
    );
    if let Some(f) = want.get("fork") {
        assert_eq!(got["fork"]["join"], f["join"], "{at}: join kind");
        assert_eq!(
            got["fork"].get("join_logits").is_some(),
            f.get("join_logits").is_some(),
            "{at}: join logits"
        );
        if f["join"] == "reprefill" {
            let rows: Vec<Vec<f32>> =
                serde_json::from_value(got["fork"]["join_logits"].clone()).expect("rows");
            d = d.max(max_diff(&rows, &f["join_logits"], &format!("{at}.join")));
        }
        let (g_kids, w_kids) = (
            got["fork"]["children"].as_array().expect("kids"),
            f["children"].as_array().expect("kids"),
        );
        assert_eq!(g_kids.len(), w_kids.len(), "{at}: children");
        for (i, (g, w)) in g_kids.iter().zip(w_kids).enumerate() {
            d = d.max(json_tree_diff(g, w, &format!("{at}.children[{i}]")));
        }
    }
    assert_eq!(
        got.get("then").is_some(),
        want.get("then").is_some(),
        "{at}: then"
    );
    if let Some(t) = want.get("then") {
        d = d.max(json_tree_diff(&got["then"], t, &format!("{at}.then")));
    }
    d
}

#[test]
fn replay_refuses_malformed_tree_files() {
    let d = scratch("bad-trees");
    let model = fixture("tiny-llama");
    let cases = [
        ("bad-json", "{\"tokens\": [1, 2", "invalid JSON"),
        (
            "empty-children",
            r#"{"tokens":[1],"fork":{"join":"reuse","children":[]}}"#,
            "at least one child",
        ),
        (
            "unknown-join",
            r#"{"tokens":[1],"fork":{"join":"zip","children":[{"tokens":[2]}]}}"#,
            "unknown join",
        ),
        (
            "vocab",
            r#"{"tokens":[1, 512]}"#,
            "token id 512 is past the vocabulary",
        ),
        (
            "depth",
            r#"{"tokens":[1],"fork":{"join":"reuse","children":[{"tokens":[2],"fork":{"join":"reuse","children":[{"tokens":[3]}]}}]}}"#,
            "over the limit of 1",
        ),
    ];
    for (name, text, needle) in cases {
        let tree = d.join(format!("{name}.json"));
        std::fs::write(&tree, text).expect("write");
        let o = spindle(&[
            "replay",
            "--device",
            "cpu",
            "--model",
            model.to_str().expect("utf8"),
            "--tree",
            tree.to_str().expect("utf8"),
            "--out",
            d.join("out.json").to_str().expect("utf8"),
            "--max-depth",
            "1",
        ]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{name} accepted");
        assert!(
            err.contains(needle),
            "{name}: {err:?} should mention {needle:?}"
        );
        assert!(
            err.contains(&format!("{name}.json")),
            "{name}: the file is named: {err}"
        );
    }
}

#[test]
fn the_forward_pass_loads_a_generated_checkpoint() {
    let d = scratch("gen-forward");
    let model = d.join("model");
    let o = spindle(&[
        "gen-model",
        "--arch",
        "qwen3",
        "--preset",
        "tiny",
        "--seed",
        "5",
        "--out",
        model.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tree = d.join("tree.json");
    std::fs::write(&tree, r#"{"tokens":[1,2,3],"fork":{"join":"reuse","children":[{"tokens":[4,5]},{"tokens":[6]}]},"then":{"tokens":[7]}}"#).expect("write");
    let out = d.join("out.json");
    let o = spindle(&[
        "replay",
        "--device",
        "cpu",
        "--model",
        model.to_str().expect("utf8"),
        "--tree",
        tree.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("out")).expect("json");
    let rows: Vec<Vec<f32>> =
        serde_json::from_value(got["tree"]["then"]["logits"].clone()).expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].len(), 512, "the tiny preset's vocabulary");
    assert!(rows[0].iter().all(|x| x.is_finite()));
    assert_eq!(got["stats"]["steps"], 4, "prefill, two child steps, then");
}

/// The whole numbers of a line, in order (words like `(1.75x` or `[1.0]` are not).
fn ints(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .filter_map(|w| w.trim_matches([',', ':', ';']).parse().ok())
        .collect()
}

/// The one line that starts with `prefix` (after indentation).
fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    let mut found = out.lines().filter(|l| l.trim_start().starts_with(prefix));
    let l = found
        .next()
        .unwrap_or_else(|| panic!("no line {prefix:?} in {out}"));
    assert!(found.next().is_none(), "two lines {prefix:?} in {out}");
    l
}

/// One request's printed stats, checked for consistency; returns (steps, thread-steps,
/// total tokens, peak width).
fn check_request_stats(block: &[&str], what: &str) -> (u64, u64, u64, u64) {
    // request N: Reason; T threads, F forks, peak width W
    let head = ints(block[0]);
    assert!(!block[0].contains("Error"), "{what}: {}", block[0]);
    let [_, threads, forks, width] = head[..] else {
        panic!("{what}: {:?}", block[0])
    };
    assert!(
        threads >= 1 && width >= 1 && width <= threads,
        "{what}: {head:?}"
    );
    assert!(
        threads > forks,
        "{what}: every fork adds a thread: {head:?}"
    );
    //   tokens per thread: [root] 24, [0] 5
    let per: Vec<u64> = block[1]
        .trim_start()
        .strip_prefix("tokens per thread:")
        .unwrap_or_else(|| panic!("{what}: {:?}", block[1]))
        .split(',')
        .map(|e| {
            let (path, n) = e.trim().split_once(' ').expect("[path] n");
            assert!(path.starts_with('[') && path.ends_with(']'), "{what}: {e}");
            n.parse().expect("tokens")
        })
        .collect();
    assert_eq!(per.len() as u64, threads, "{what}: one entry per thread");
    //   critical path C tokens of TOT total (R x parallelism); S steps vs TS thread-steps
    let [crit, total, steps, thread_steps] = ints(block[2])[..] else {
        panic!("{what}: {:?}", block[2])
    };
    assert_eq!(
        per.iter().sum::<u64>(),
        total,
        "{what}: tokens per thread add up"
    );
    let longest = per.iter().copied().max().unwrap_or(0);
    assert!(
        longest <= crit && crit <= total,
        "{what}: critical path {crit}"
    );
    assert!(steps >= 1 && thread_steps >= steps, "{what}: {}", block[2]);
    (steps, thread_steps, total, width)
}

/// The engine's printed stats, checked; returns (steps, peak width).
fn check_engine_stats(out: &str) -> (u64, u64) {
    let [steps, width, _preemptions, _copies] = ints(line(out, "engine:"))[..] else {
        panic!("engine line: {out}")
    };
    let [peak, private, saved] = ints(line(out, "KV blocks:"))[..] else {
        panic!("KV line: {out}")
    };
    assert!(peak >= 1 && saved == private.saturating_sub(peak), "{out}");
    let [forked, naive] = ints(line(out, "attention K/V tokens read:"))[..] else {
        panic!("K/V line: {out}")
    };
    assert!(forked >= 1 && forked <= naive, "{out}");
    (steps, width)
}

/// The stats blocks (three lines from each `request N:` line) of a printout.
fn request_blocks(out: &str) -> Vec<Vec<&str>> {
    let lines: Vec<&str> = out.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            l.starts_with("request ") && !l.starts_with("request r") && l.contains(" threads, ")
        })
        .map(|(i, _)| lines[i..i + 3].to_vec())
        .collect()
}

#[test]
fn demo_runs_and_says_it_is_synthetic() {
    let o = spindle(&["demo", "--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("This workload is synthetic"));
    let titles = out.lines().filter(|l| l.starts_with("request r")).count();
    let blocks = request_blocks(&out);
    assert!(titles >= 2, "several requests: {out}");
    assert_eq!(blocks.len(), titles, "stats for every request");
    let (steps, width) = check_engine_stats(&out);
    let mut thread_steps = 0;
    let mut most_steps = 0;
    let mut widths = 0;
    for (i, b) in blocks.iter().enumerate() {
        let (s, ts, _, w) = check_request_stats(b, &format!("request {i}"));
        thread_steps += ts;
        most_steps = most_steps.max(s);
        widths += w;
    }
    // All requests share the engine's steps: it ran as many as the longest request, and
    // its width is at most the sum of theirs.
    assert_eq!(most_steps, steps, "{out}");
    assert!(width <= widths, "{out}");
    let [fused, alone] = ints(line(&out, "steps:"))[..] else {
        panic!("steps line: {out}")
    };
    assert_eq!((fused, alone), (steps, thread_steps), "{out}");
    assert!(alone > fused, "batching saved steps: {out}");
    // Both join kinds happened, with consistent re-prefill counts, and a nested child.
    let mut kinds = std::collections::BTreeSet::new();
    for l in out.lines().filter(|l| l.contains("~ joined ")) {
        let [threads, refed] = ints(l)[..] else {
            panic!("join line {l}")
        };
        assert!(threads >= 1, "{l}");
        if l.contains("(Reuse,") {
            assert_eq!(refed, 0, "a reuse join re-prefills nothing: {l}");
            kinds.insert("reuse");
        } else {
            assert!(l.contains("(Reprefill,") && refed > 0, "{l}");
            kinds.insert("reprefill");
        }
    }
    assert_eq!(kinds.len(), 2, "both join kinds: {out}");
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("[1.0] ")),
        "a nested child: {out}"
    );
}

#[test]
fn run_generates_with_each_protocol_and_reports_stats() {
    let model = fixture("tiny-qwen2");
    for protocol in ["threadweaver", "multiverse", "apr"] {
        let o = spindle(&[
            "run",
            "--device",
            "cpu",
            "--model",
            model.to_str().expect("utf8"),
            "--prompt",
            "Read the licence.",
            "--protocol",
            protocol,
            "--max-tokens",
            "24",
            "--temperature",
            "0.8",
            "--seed",
            "1",
        ]);
        assert!(o.status.success(), "{protocol}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        let blocks = request_blocks(&out);
        assert_eq!(blocks.len(), 1, "{protocol}: one request: {out}");
        let (steps, _, total, width) = check_request_stats(&blocks[0], protocol);
        assert!(
            (1..=24).contains(&total),
            "{protocol}: --max-tokens 24 caps {total}"
        );
        // One request: the engine's counters are its own.
        assert_eq!(
            check_engine_stats(&out),
            (steps, width),
            "{protocol}: {out}"
        );
    }
}

/// Without the `cuda` feature no GPU can be used, whatever the machine has.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_device_that_is_not_there_is_a_clear_error() {
    let o = spindle(&["demo", "--device", "cuda"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("cuda") || err.contains("CUDA"), "{err}");
}
