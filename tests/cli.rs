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

#[test]
fn demo_runs_and_says_it_is_synthetic() {
    let o = spindle(&["demo", "--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("This workload is synthetic"));
    assert!(out.contains("fused steps for all requests vs"));
    // Forks, nested forks and both join kinds happened.
    assert!(out.contains("Reprefill") && out.contains("Reuse"), "{out}");
    assert!(out.contains("[1.0]"), "a nested child: {out}");
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
        for want in ["steps", "peak width", "critical path", "saved by sharing"] {
            assert!(out.contains(want), "{protocol}: no {want:?} in {out}");
        }
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
