//! Parity with Hugging Face `transformers`: every fixture case through the engine, at
//! several block sizes, in both attention modes and both shared-tail policies. One test
//! body per case kind, run against each backend ([`Target`]): the CPU backend always; the
//! CUDA backend (with `--features cuda`) when a device exists, printing `SKIPPED` and why
//! otherwise (failing instead with `SPINDLE_REQUIRE_GPU` set).

mod common;

use common::*;
use model_loader::Checkpoint;
use spindle::backend::Backend;
use spindle::kv::SharedTail;
use spindle::replay::tree_file::TreeNode;
use spindle::replay::{blocks_for, replay_with_stats};
use spindle::{AttentionMode, Engine, EngineConfig};

/// A correct f32 forward reaches about 1.3e-5 against the float32 reference (summation
/// order differs from PyTorch's); 1e-4 leaves room for that, the fixtures' README calls
/// it a fair bound, and every bug planted in docs/testing.md lands far outside it.
const TOL: f32 = 1e-4;

/// A backend the parity cases run on.
struct Target<B> {
    /// Its name in the test output.
    name: &'static str,
    /// Largest accepted |logit difference| against the reference.
    tol: f32,
    /// Loads it on a checkpoint with `blocks` blocks of `block_size` tokens; `Err(reason)`
    /// when this machine cannot run it (the test is then skipped, loudly).
    load: fn(&Checkpoint, usize, usize) -> Result<B, String>,
}

fn cpu() -> Target<spindle::CpuBackend> {
    Target {
        name: "cpu",
        tol: TOL,
        load: |ck, blocks, bs| Ok(spindle::CpuBackend::load(ck, blocks, bs).expect("backend")),
    }
}

/// Reports a skipped target. With `SPINDLE_REQUIRE_GPU` set (the GPU run sets it) a missing
/// device is a failure.
fn skipped(test: &str, target: &str, reason: &str) {
    assert!(
        std::env::var_os("SPINDLE_REQUIRE_GPU").is_none(),
        "{test}: SPINDLE_REQUIRE_GPU is set but {target} is unavailable: {reason}"
    );
    println!("SKIPPED: {test} on {target}: {reason}");
}

fn sequences_match<B: Backend>(test: &str, t: &Target<B>) {
    let mut sequences = 0;
    for name in FIXTURES {
        let r = reference(name);
        for case in r["cases"].as_array().expect("cases") {
            if case["kind"] != "sequence" {
                continue;
            }
            let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).expect("tokens");
            let tree = TreeNode::sequence(tokens);
            let ck = Checkpoint::open(&fixture(name)).expect("fixture");
            let backend = match (t.load)(&ck, blocks_for(&tree, 16), 16) {
                Ok(b) => b,
                Err(reason) => return skipped(test, t.name, &reason),
            };
            let cfg = EngineConfig {
                mode: AttentionMode::Forked,
                ..Default::default()
            };
            let mut e = Engine::new(backend, cfg);
            let (out, stats) = replay_with_stats(&mut e, &tree).expect("replay");
            let d = max_diff(&out.logits, &case["logits"], name);
            println!(
                "{} {name} {}: max |diff| = {d:.2e}, {} steps",
                t.name, case["name"], stats.steps
            );
            assert!(
                d <= t.tol,
                "{} {name} {}: max |diff| {d}",
                t.name,
                case["name"]
            );
            assert!(e.pool().all_free(), "blocks leaked");
            sequences += 1;
        }
    }
    assert_eq!(sequences, 3, "every fixture's sequence case ran (one each)");
}

fn trees_match<B: Backend>(test: &str, t: &Target<B>) {
    let mut trees = Vec::new();
    for name in FIXTURES {
        let r = reference(name);
        let ck = Checkpoint::open(&fixture(name)).expect("fixture");
        for case in r["cases"].as_array().expect("cases") {
            if case["kind"] != "tree" {
                continue;
            }
            trees.push(format!("{name}/{}", case["name"].as_str().expect("name")));
            for block_size in [1, 3, 16] {
                for (mode, shared_tail) in [
                    (AttentionMode::Forked, SharedTail::NewSpan),
                    (AttentionMode::Naive, SharedTail::NewSpan),
                    (AttentionMode::Forked, SharedTail::CopyOnWrite),
                ] {
                    let vocab = r["cases"][0]["logits"][0].as_array().expect("row").len();
                    let tree = parse_tree(&case["tree"], vocab);
                    let backend = match (t.load)(&ck, blocks_for(&tree, block_size), block_size) {
                        Ok(b) => b,
                        Err(reason) => return skipped(test, t.name, &reason),
                    };
                    let cfg = EngineConfig {
                        mode,
                        shared_tail,
                        ..Default::default()
                    };
                    let mut e = Engine::new(backend, cfg);
                    let (out, stats) = replay_with_stats(&mut e, &tree).expect("replay");
                    let d = tree_diff(&out, &case["tree"], &format!("{name}/{}", case["name"]));
                    println!(
                        "{} {name} {} bs={block_size} {mode:?} {shared_tail:?}: max |diff| = {d:.2e}, steps {}, blocks peak {} (private {}), kv read {} (naive {})",
                        t.name, case["name"], stats.steps, stats.blocks_peak, stats.blocks_without_sharing, stats.kv_tokens_read, stats.kv_tokens_read_naive
                    );
                    assert!(
                        d <= t.tol,
                        "{} {name} {} bs={block_size}: max |diff| {d}",
                        t.name,
                        case["name"]
                    );
                    assert!(e.pool().all_free(), "blocks leaked");
                    e.check_refcounts().expect("refcounts consistent");
                }
            }
        }
    }
    assert_eq!(
        trees,
        [
            "tiny-llama/fork3_reuse",
            "tiny-llama/fork2_reprefill",
            "tiny-llama/fork3_longest_first",
            "tiny-qwen2/fork4_reuse",
            "tiny-qwen2/nested_longest_first",
            "tiny-qwen3/fork3_reuse_nested",
        ],
        "every fixture tree case ran"
    );
}

#[test]
fn sequences_match_reference_logits() {
    sequences_match("sequences_match_reference_logits", &cpu());
}

#[test]
fn trees_match_reference_logits_at_every_block_size_and_mode() {
    trees_match(
        "trees_match_reference_logits_at_every_block_size_and_mode",
        &cpu(),
    );
}

/// The CUDA backend on the same cases. Its weights, activations and K/V are bf16, so the
/// bound is `tests/gpu_engine.rs`'s `REF_MAX_ABS` (0.25; derivation there), which also
/// checks top-1 agreement on these fixtures.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use spindle::backend::cuda::backend::{CudaBackend, CudaOptions, KvPoolSize};

    fn target() -> Target<CudaBackend> {
        Target {
            name: "cuda",
            tol: 0.25,
            load: |ck, blocks, block_size| {
                spindle::backend::cuda::Gpu::probe().map_err(|e| e.to_string())?;
                let opts = CudaOptions {
                    block_size,
                    pool: KvPoolSize::Blocks(blocks),
                    ..Default::default()
                };
                Ok(CudaBackend::load(ck, &opts).expect("CUDA backend loads"))
            },
        }
    }

    #[test]
    fn sequences_match_reference_logits_on_cuda() {
        sequences_match("sequences_match_reference_logits_on_cuda", &target());
    }

    #[test]
    fn trees_match_reference_logits_on_cuda() {
        trees_match("trees_match_reference_logits_on_cuda", &target());
    }
}

/// Writes `name` split over two shards with an index, in a scratch directory.
fn sharded_copy(name: &str) -> std::path::PathBuf {
    use model_loader::{write_safetensors, Checkpoint, TensorSpec};
    let src = Checkpoint::open(&fixture(name)).expect("fixture");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sharded-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::copy(fixture(name).join("config.json"), dir.join("config.json")).expect("config");
    let tensors = src.tensors();
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [&tensors[..half], &tensors[half..]].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", shard + 1);
        let specs: Vec<TensorSpec> = part
            .iter()
            .map(|t| TensorSpec {
                name: t.name.to_string(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
            })
            .collect();
        write_safetensors(&dir.join(&file), &specs, &mut |i, w| {
            w.write_all(part[i].data)
        })
        .expect("shard");
        for t in part.iter() {
            weight_map.insert(t.name.to_string(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    dir
}

#[test]
fn a_sharded_copy_gives_identical_logits() {
    for name in FIXTURES {
        let dir = sharded_copy(name);
        let sharded = model_loader::Checkpoint::open(&dir).expect("sharded copy opens");
        assert_eq!(sharded.files().len(), 2);
        let r = reference(name);
        let case = &r["cases"][0];
        let tokens: Vec<u32> = serde_json::from_value(case["tokens"].clone()).expect("tokens");
        let tree = TreeNode::sequence(tokens);
        let mut single = engine(name, blocks_for(&tree, 16), 16, AttentionMode::Forked);
        let backend =
            spindle::CpuBackend::load(&sharded, blocks_for(&tree, 16), 16).expect("backend");
        let mut split = spindle::Engine::new(backend, Default::default());
        let (a, _) = replay_with_stats(&mut single, &tree).expect("single file");
        let (b, _) = replay_with_stats(&mut split, &tree).expect("sharded");
        assert_eq!(
            a.logits, b.logits,
            "{name}: sharded logits must be bit-identical"
        );
    }
}

/// Each fixture converted to a GGUF the way llama.cpp's converter writes it (Llama's q/k rows
/// interleaved for its rope) matches every reference case within tolerance, and
/// `spindle replay --model FILE.gguf` writes exactly what it writes for the safetensors.
#[test]
fn a_gguf_copy_matches_the_reference() {
    for name in FIXTURES {
        let src = model_loader::Checkpoint::open(&fixture(name)).expect("fixture");
        let dir =
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let gguf = dir.join(format!("{name}.gguf"));
        std::fs::write(&gguf, model_loader::gguf::gguf_from_checkpoint(&src, &[])).expect("gguf");
        let ck = model_loader::Checkpoint::open(&gguf).expect("gguf opens");

        let r = reference(name);
        let vocab = r["cases"][0]["logits"][0].as_array().expect("row").len();
        for case in r["cases"].as_array().expect("cases") {
            let (tree, want) = if case["kind"] == "sequence" {
                let tokens: Vec<u32> =
                    serde_json::from_value(case["tokens"].clone()).expect("tokens");
                let want = serde_json::json!({"logits": case["logits"]});
                (TreeNode::sequence(tokens), want)
            } else {
                (parse_tree(&case["tree"], vocab), case["tree"].clone())
            };
            let backend =
                spindle::CpuBackend::load(&ck, blocks_for(&tree, 16), 16).expect("backend");
            let mut e = spindle::Engine::new(backend, Default::default());
            let (out, _) = replay_with_stats(&mut e, &tree).expect("replay");
            let d = tree_diff(&out, &want, name);
            println!("{name} {} from GGUF: max |diff| = {d:.2e}", case["name"]);
            assert!(d <= TOL, "{name} {}: {d}", case["name"]);
        }

        let replay = |model: &std::path::Path, out: &std::path::Path| {
            let status = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
                .args(["replay", "--device", "cpu", "--model"])
                .arg(model)
                .arg("--tree")
                .arg(fixture(name).join("reference.json"))
                .arg("--out")
                .arg(out)
                .status()
                .expect("spindle replay runs");
            assert!(status.success(), "{name}: replay on {}", model.display());
            std::fs::read_to_string(out).expect("out")
        };
        assert_eq!(
            replay(&gguf, &dir.join("gguf.json")),
            replay(&fixture(name), &dir.join("st.json")),
            "{name}: replay output from the GGUF"
        );
    }
}
