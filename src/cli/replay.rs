//! `spindle replay`: teacher-forces a tree file (or every case of a `reference.json`)
//! through the engine and writes it back with every logit filled in, plus stats.

use model_loader::Checkpoint;
use serde_json::{json, Value};
use spindle::backend::Backend;
use spindle::device::{run_on, Device, EngineJob};
use spindle::engine::{Engine, EngineConfig, EngineStats};
use spindle::error::{Result, SpindleError};
use spindle::plan::AttentionMode;
use spindle::replay::tree_file::{TreeLimits, TreeNode};
use spindle::replay::{blocks_for, replay_with_stats};
use std::path::{Path, PathBuf};

/// Arguments of `spindle replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Checkpoint directory, a .gguf file, or a directory holding one.
    #[arg(long)]
    pub model: PathBuf,
    /// A `NODE` tree (tokens only; logits are ignored) or a whole `reference.json`.
    #[arg(long)]
    pub tree: PathBuf,
    /// Where to write the filled tree(s) and stats.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks in the pool (default: enough for the largest case).
    #[arg(long)]
    pub blocks: Option<usize>,
    /// Per-thread attention (every thread reads its whole context) instead of forked.
    #[arg(long)]
    pub naive: bool,
    /// Deepest fork nesting accepted.
    #[arg(long, default_value_t = 8)]
    pub max_depth: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value_t = Device::Auto)]
    pub device: Device,
    /// Engine steps A..B (0-based, B exclusive) bracketed by cudaProfilerStart/Stop, for
    /// `nsys`/`ncu` with `--capture-range=cudaProfilerApi` (docs/profiling.md); CUDA only.
    #[arg(long, value_parser = spindle::backend::profile::parse_steps)]
    pub profile_steps: Option<std::ops::Range<u64>>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| SpindleError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| SpindleError::TreeFile {
        path: path.display().to_string(),
        msg: format!("invalid JSON: {e}"),
    })
}

fn stats_json(s: &EngineStats) -> Value {
    json!({
        "blocks_peak": s.blocks_peak,
        "blocks_without_sharing": s.blocks_without_sharing,
        "kv_tokens_read": s.kv_tokens_read,
        "kv_tokens_read_naive": s.kv_tokens_read_naive,
        "steps": s.steps,
        "peak_width": s.peak_width,
        "preemptions": s.preemptions,
    })
}

/// One thing to replay: where it came from in the input, and its tree.
struct Job {
    case: Option<usize>,
    sequence: bool,
    tree: TreeNode,
}

/// Runs the command.
pub fn run(args: &ReplayArgs) -> Result<()> {
    spindle::backend::profile::set_profile_steps(args.profile_steps.clone());
    if args.block_size == 0 {
        return Err(SpindleError::InvalidSetting(
            "--block-size must be at least 1".into(),
        ));
    }
    let ck = Checkpoint::open(&args.model)?;
    let input = read_json(&args.tree)?;
    let origin = args.tree.display().to_string();
    let limits = TreeLimits {
        vocab_size: ck.config().vocab_size,
        max_depth: args.max_depth,
    };
    let bad = |msg: String| SpindleError::TreeFile {
        path: origin.clone(),
        msg,
    };
    let mut jobs = Vec::new();
    if let Some(cases) = input.get("cases") {
        let cases = cases
            .as_array()
            .ok_or_else(|| bad("\"cases\" is not an array".into()))?;
        for (i, case) in cases.iter().enumerate() {
            let at = format!("cases[{i}]");
            match case.get("kind").and_then(Value::as_str) {
                Some("sequence") => {
                    let node =
                        json!({ "tokens": case.get("tokens").cloned().unwrap_or(Value::Null) });
                    let tree = TreeNode::parse(&node, &format!("{origin} {at}"), limits)?;
                    jobs.push(Job {
                        case: Some(i),
                        sequence: true,
                        tree,
                    });
                }
                Some("tree") => {
                    let node = case
                        .get("tree")
                        .ok_or_else(|| bad(format!("{at}: missing \"tree\"")))?;
                    let tree = TreeNode::parse(node, &format!("{origin} {at}"), limits)?;
                    jobs.push(Job {
                        case: Some(i),
                        sequence: false,
                        tree,
                    });
                }
                other => return Err(bad(format!("{at}: unknown kind {other:?}"))),
            }
        }
    } else {
        let node = input.get("tree").unwrap_or(&input);
        jobs.push(Job {
            case: None,
            sequence: false,
            tree: TreeNode::parse(node, &origin, limits)?,
        });
    }
    let blocks = args.blocks.unwrap_or_else(|| {
        jobs.iter()
            .map(|j| blocks_for(&j.tree, args.block_size))
            .max()
            .unwrap_or(1)
    });
    let mode = if args.naive {
        AttentionMode::Naive
    } else {
        AttentionMode::Forked
    };
    let cfg = EngineConfig {
        mode,
        ..Default::default()
    };
    let job = ReplayJob {
        jobs: &jobs,
        output: input.clone(),
        out: &args.out,
    };
    run_on(args.device, &ck, blocks, args.block_size, cfg, job)
}

/// The replay of every job on one engine, then the output file.
struct ReplayJob<'a> {
    jobs: &'a [Job],
    output: Value,
    out: &'a Path,
}

impl EngineJob for ReplayJob<'_> {
    fn run<B: Backend>(self, mut engine: Engine<B>) -> Result<()> {
        let ReplayJob {
            jobs,
            mut output,
            out,
        } = self;
        eprintln!("replay on the {} backend", engine.backend().name());
        for job in jobs {
            let (logits, stats) = replay_with_stats(&mut engine, &job.tree)?;
            let filled = job.tree.to_json(&logits);
            let st = stats_json(&stats);
            eprintln!(
                "{}: {} steps, blocks peak {} (without sharing {}), kv tokens read {} (naive {})",
                job.case
                    .map_or_else(|| "tree".to_string(), |i| format!("case {i}")),
                stats.steps,
                stats.blocks_peak,
                stats.blocks_without_sharing,
                stats.kv_tokens_read,
                stats.kv_tokens_read_naive
            );
            match job.case {
                Some(i) => {
                    let case = &mut output["cases"][i];
                    if job.sequence {
                        case["logits"] = filled["logits"].clone();
                    } else {
                        case["tree"] = filled;
                    }
                    case["stats"] = st;
                }
                None => output = json!({ "tree": filled, "stats": st }),
            }
        }
        let text = serde_json::to_string(&output).map_err(|source| SpindleError::Json {
            what: "replay output".into(),
            source,
        })?;
        std::fs::write(out, text).map_err(|source| SpindleError::Io {
            path: out.to_path_buf(),
            source,
        })
    }
}
