//! Whole decode steps, and a parallel-reasoning tree against the same tokens one thread at
//! a time.
//!
//! `cargo bench --bench decode [-- --quick] [--prefix P] [--steps N] [--tokens N]`
//!
//! **Steps.** W threads (W in 1, 4, 16, 64) that share a P-token prefix each decode one
//! token per step, timed as `model::forward` over one fused step (the step the engine
//! builds for W decode rows: forked plan, prefix blocks shared), `--steps` runs (3 with
//! `--quick`) after one warm-up. Random weights and an unwritten (zero) prefix cache: the
//! timing depends on shapes only.
//!
//! **Tree.** Through the real [`spindle::Engine`] (default [`EngineConfig`]: forked
//! plan): a P-token prompt forked into W children (W in 4, 16) that each decode N tokens
//! (`--tokens`, default 32), one token per child per step, then finished and joined by KV
//! reuse; against one thread that decodes the same W x N tokens one per step after the
//! same prompt. The tokens fed are a fixed sequence (child w's i-th token is a function of
//! w and i; the single thread feeds child 0's N tokens, then child 1's, ...), not sampled,
//! so both runs feed the same tokens and pay no sampling cost (each child's context ends at
//! P + N tokens, the single thread's at P + W x N). The timed region runs from the fork to
//! the join (tree: N steps of W rows) and from the first to the last decode step (single
//! thread: W x N steps of one row); the prompt's prefill is outside it (untimed, rerun
//! before every measurement). One untimed warm-up of both runs at W = 16 with 2 tokens per
//! thread, then 5 measurements (1 with `--quick`) alternating tree and single thread,
//! median reported; tokens per second is W x N over the wall time for both. Both runs of
//! a model use one engine over one backend whose pool holds either without preemption
//! (checked).
//!
//! - Always: the CPU backend on the `tiny` Qwen3 shape of `gen-model`
//!   (`model_loader::generate_checkpoint`), prefix 256 (`--prefix` overrides), so it runs
//!   anywhere.
//! - With `--features cuda` and a GPU: the CUDA backend (fused step) on the 0.6b and 1.7b
//!   shapes (`--quick`: 0.6b only; `--with-8b` adds 8b; 16 GB written first) with a
//!   4096-token prefix, both sections on one backend per shape. Its step rows choose the
//!   greedy tokens on the device (`forward_sampled`: only token ids come back), each W
//!   twice: replayed as a CUDA graph (`graphs` = on) and launched eagerly (off), the two
//!   interleaved so a drift of the machine hits both.
//!
//! Writes `target/bench/decode.csv` (`SPINDLE_BENCH_DIR` overrides; the checkpoints go to
//! `SPINDLE_SCRATCH/decode-models` when it is set) with the columns
//! `model,device,threads,prefix,graphs,ms_per_step,tokens_per_s`, and
//! `target/bench/decode_tree.csv` (same directory) with
//! `model,device,prefix,threads,tokens_per_thread,mode,wall_ms,tokens_per_s,speedup`:
//! per model and W a `tree` row (threads W, tokens_per_thread N) and a `sequential` row
//! (threads 1, tokens_per_thread W x N); `speedup` is the sequential wall time over the
//! tree's (1 on the sequential row).

use model_loader::{generate_checkpoint, Arch, Checkpoint, Preset};
use spindle::backend::{Backend, StepInput};
use spindle::kv::Chunk;
use spindle::plan::{AttentionPlan, PlanRow, PlanThread};
use spindle::{AttentionMode, Engine, EngineConfig, JoinKind, ThreadId};
use std::path::{Path, PathBuf};
use std::time::Instant;

const WIDTHS: [usize; 4] = [1, 4, 16, 64];
/// Children of the tree section's fork.
const TREE_WIDTHS: [usize; 2] = [4, 16];
const BLOCK: usize = 16;

struct Args {
    quick: bool,
    prefix: Option<usize>,
    steps: usize,
    /// Tokens each child of the tree section decodes.
    tokens: usize,
    /// Measurements of each tree and its single thread (median reported).
    reps: usize,
    with_8b: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        prefix: None,
        steps: 20,
        tokens: 32,
        reps: 5,
        with_8b: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> Result<usize, String> {
        let v = v.ok_or(format!("{what} needs a value"))?;
        v.parse().map_err(|_| format!("bad {what} {v}"))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--prefix" => a.prefix = Some(num(it.next(), "--prefix")?),
            "--steps" => a.steps = num(it.next(), "--steps")?.max(1),
            "--tokens" => a.tokens = num(it.next(), "--tokens")?.max(1),
            "--with-8b" => a.with_8b = true,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.quick {
        a.steps = a.steps.min(3);
        a.reps = 1;
    }
    Ok(a)
}

/// Blocks a step of `width` threads over a `prefix`-token prefix needs: the prefix's, then
/// one private block per thread.
fn blocks_needed(prefix: usize, width: usize) -> usize {
    prefix.div_ceil(BLOCK) + width
}

/// The decode step of `width` threads sharing a `prefix`-token prefix (blocks
/// `0..prefix / BLOCK`, the last maybe partial), thread w's new token in its own block.
fn decode_step(prefix: usize, width: usize, vocab: usize) -> StepInput {
    let prefix_blocks = prefix.div_ceil(BLOCK);
    let shared: Vec<Chunk> = (0..prefix_blocks)
        .map(|b| Chunk {
            block: b as u32,
            start: 0,
            len: (prefix - b * BLOCK).min(BLOCK) as u32,
        })
        .collect();
    let mut step = StepInput::default();
    let mut threads = Vec::with_capacity(width);
    for w in 0..width {
        let own = (prefix_blocks + w) as u32;
        step.tokens.push(((w * 7919 + 11) % vocab) as u32);
        step.positions.push(prefix as u32);
        step.slots.push(own * BLOCK as u32);
        step.logit_rows.push(w as u32);
        let mut chunks = shared.clone();
        chunks.push(Chunk {
            block: own,
            start: 0,
            len: 1,
        });
        threads.push(PlanThread {
            chunks,
            rows: vec![PlanRow {
                row: w as u32,
                limit: prefix as u32 + 1,
            }],
        });
    }
    step.plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    step
}

/// Mean milliseconds of one `forward` of `step` over `steps` runs (after one warm-up).
fn time_steps<B: Backend>(b: &mut B, step: &StepInput, steps: usize) -> f64 {
    let mut logits = Vec::new();
    spindle::model::forward(b, step, &mut logits).expect("warm-up step");
    let t = Instant::now();
    for _ in 0..steps {
        spindle::model::forward(b, step, &mut logits).expect("step");
    }
    // The step ends with the logits on the host, so the device work is done too.
    t.elapsed().as_secs_f64() * 1e3 / steps as f64
}

/// Mean milliseconds of one step of `step` choosing every row's greedy token on the device
/// (only token ids come back; a graph replay when the backend's graphs are on), over
/// `steps` runs after one warm-up (which captures the graph).
#[cfg(feature = "cuda")]
fn time_device_greedy(
    b: &mut spindle::backend::cuda::backend::CudaBackend,
    step: &StepInput,
    steps: usize,
) -> f64 {
    use spindle::backend::{RowPick, RowSampling};
    let picks = vec![RowPick::Sample(RowSampling::GREEDY); step.logit_rows.len()];
    let (mut logits, mut tokens) = (Vec::new(), Vec::new());
    b.forward_sampled(step, &picks, &mut logits, &mut tokens)
        .expect("warm-up step");
    let t = Instant::now();
    for _ in 0..steps {
        b.forward_sampled(step, &picks, &mut logits, &mut tokens)
            .expect("step");
    }
    // The step ends with the token ids on the host, so the device work is done too.
    t.elapsed().as_secs_f64() * 1e3 / steps as f64
}

/// Blocks one engine needs for the tree section (W up to `width`, `tokens` per child): the
/// larger of the tree's (the prompt's blocks, then each child's own blocks and one more
/// for a partial block it cannot append to in place) and the single thread's (the prompt
/// and all W x N tokens in its own blocks), plus a little slack.
fn tree_blocks(prefix: usize, width: usize, tokens: usize) -> usize {
    let tree = prefix.div_ceil(BLOCK) + width * (tokens.div_ceil(BLOCK) + 1);
    let single = (prefix + width * tokens).div_ceil(BLOCK) + 1;
    tree.max(single) + 4
}

/// The tree section's prompt: `prefix` fixed tokens.
fn tree_prompt(prefix: usize, vocab: usize) -> Vec<u32> {
    (0..prefix).map(|i| ((i * 31 + 7) % vocab) as u32).collect()
}

/// The `i`-th token child `w` decodes (of `tokens`); the single thread feeds the same.
fn tree_token(w: usize, i: usize, tokens: usize, vocab: usize) -> u32 {
    (((w * tokens + i) * 7919 + 11) % vocab) as u32
}

/// A new request for `prompt`, prefilled (untimed); its root thread.
fn prefill<B: Backend>(e: &mut Engine<B>, prompt: &[u32]) -> ThreadId {
    let root = e.add_request(prompt).expect("request");
    while e.has_work() {
        e.step().expect("prefill step");
    }
    root
}

/// Milliseconds from forking the prefilled prompt into `width` children to joining them by
/// KV reuse, each child fed one fixed token per step for `tokens` steps.
fn run_tree<B: Backend>(e: &mut Engine<B>, prompt: &[u32], width: usize, tokens: usize) -> f64 {
    let vocab = e.backend().config().vocab_size;
    let root = prefill(e, prompt);
    let t = Instant::now();
    let kids = e
        .fork_with(root, width, true, Some(JoinKind::Reuse))
        .expect("fork");
    for i in 0..tokens {
        for (w, &k) in kids.iter().enumerate() {
            e.feed(k, &[tree_token(w, i, tokens, vocab)]).expect("feed");
        }
        let rows = e.step().expect("tree step").rows;
        assert_eq!(rows, width, "every child decodes in every step");
    }
    for &k in &kids {
        e.finish(k).expect("finish child");
    }
    e.join(root, JoinKind::Reuse).expect("join");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    e.finish(root).expect("finish");
    ms
}

/// Milliseconds for one thread to decode the tree's `width` x `tokens` tokens one per step
/// after the prefilled prompt (child 0's tokens, then child 1's, ...).
fn run_single<B: Backend>(e: &mut Engine<B>, prompt: &[u32], width: usize, tokens: usize) -> f64 {
    let vocab = e.backend().config().vocab_size;
    let root = prefill(e, prompt);
    let t = Instant::now();
    for w in 0..width {
        for i in 0..tokens {
            e.feed(root, &[tree_token(w, i, tokens, vocab)])
                .expect("feed");
            let rows = e.step().expect("single-thread step").rows;
            assert_eq!(rows, 1, "one token per step");
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    e.finish(root).expect("finish");
    ms
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct TreeRow {
    model: String,
    device: &'static str,
    prefix: usize,
    width: usize,
    tokens: usize,
    tree_ms: f64,
    single_ms: f64,
}

/// The tree section on one engine over `backend` (its pool at least [`tree_blocks`]):
/// per W in [`TREE_WIDTHS`], the median tree and single-thread wall times.
fn tree_rows<B: Backend>(
    backend: B,
    model: &str,
    device: &'static str,
    prefix: usize,
    args: &Args,
    rows: &mut Vec<TreeRow>,
) {
    let prompt = tree_prompt(prefix, backend.config().vocab_size);
    let mut e = Engine::new(backend, EngineConfig::default());
    // Warm-up: first touches of the pool's blocks and the backend's buffers.
    let widest = TREE_WIDTHS.iter().copied().max().unwrap_or(1);
    run_tree(&mut e, &prompt, widest, 2);
    run_single(&mut e, &prompt, widest, 2);
    for &w in &TREE_WIDTHS {
        let (mut tree, mut single) = (Vec::new(), Vec::new());
        for _ in 0..args.reps {
            tree.push(run_tree(&mut e, &prompt, w, args.tokens));
            single.push(run_single(&mut e, &prompt, w, args.tokens));
        }
        rows.push(TreeRow {
            model: model.to_string(),
            device,
            prefix,
            width: w,
            tokens: args.tokens,
            tree_ms: median(tree),
            single_ms: median(single),
        });
    }
    assert_eq!(e.stats().preemptions, 0, "the pool held every run");
    assert!(e.pool().all_free(), "every run gave its blocks back");
}

/// Prints the tree section's table and writes `decode_tree.csv`.
fn report_tree(rows: &[TreeRow], args: &Args, out_dir: &Path) {
    println!();
    println!(
        "tree: prompt forked into W children x N fixed tokens each, joined by KV reuse, vs one \
         thread decoding the same W x N tokens; prompt prefill untimed; median of {}",
        args.reps
    );
    println!("model   device prefix threads tok/thread mode         wall ms   tokens/s  speed-up");
    let mut csv = String::from(
        "model,device,prefix,threads,tokens_per_thread,mode,wall_ms,tokens_per_s,speedup\n",
    );
    for r in rows {
        let total = (r.width * r.tokens) as f64;
        let speedup = r.single_ms / r.tree_ms;
        for (threads, per_thread, mode, ms, x) in [
            (r.width, r.tokens, "tree", r.tree_ms, speedup),
            (1, r.width * r.tokens, "sequential", r.single_ms, 1.0),
        ] {
            let tps = total / (ms / 1e3);
            println!(
                "{:<7} {:<6} {:>6} {:>7} {:>10} {:<10} {:>9.2} {:>10.1} {:>8.2}x",
                r.model, r.device, r.prefix, threads, per_thread, mode, ms, tps, x
            );
            csv.push_str(&format!(
                "{},{},{},{threads},{per_thread},{mode},{ms:.3},{tps:.2},{x:.3}\n",
                r.model, r.device, r.prefix
            ));
        }
    }
    let path = out_dir.join("decode_tree.csv");
    std::fs::write(&path, csv).expect("csv");
    println!("decode: wrote {}", path.display());
}

fn checkpoint(dir: &Path, preset: Preset) -> Checkpoint {
    let d = dir.join(format!("{preset:?}").to_lowercase());
    if Checkpoint::open(&d).is_err() {
        eprintln!(
            "decode: writing the {preset:?} checkpoint to {}",
            d.display()
        );
        generate_checkpoint(Arch::Qwen3, preset, 1, &d).expect("gen-model");
    }
    Checkpoint::open(&d).expect("checkpoint")
}

struct Row {
    model: String,
    device: &'static str,
    threads: usize,
    prefix: usize,
    /// "on" when the step was a CUDA graph replay.
    graphs: &'static str,
    ms: f64,
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("decode: {e}");
            std::process::exit(2);
        }
    };
    let out_dir = std::env::var_os("SPINDLE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out_dir).expect("bench dir");
    // The random checkpoints (gigabytes at the GPU shapes) go to SPINDLE_SCRATCH when set
    // (the GPU bundle's scratch space), so they never travel with the results.
    let models = std::env::var_os("SPINDLE_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| out_dir.clone())
        .join("decode-models");
    let mut rows = Vec::new();

    // CPU, tiny shape.
    let ck = checkpoint(&models, Preset::Tiny);
    let prefix = args.prefix.unwrap_or(256);
    let vocab = ck.config().vocab_size;
    for &w in &WIDTHS {
        let mut b =
            spindle::CpuBackend::load(&ck, blocks_needed(prefix, w), BLOCK).expect("cpu backend");
        let ms = time_steps(&mut b, &decode_step(prefix, w, vocab), args.steps);
        rows.push(Row {
            model: "tiny".into(),
            device: "cpu",
            threads: w,
            prefix,
            graphs: "off",
            ms,
        });
    }

    // CPU, tiny shape: the tree against one thread, on one engine.
    let tree_prefix = prefix.max(1);
    let mut tree = Vec::new();
    let b = spindle::CpuBackend::load(
        &ck,
        tree_blocks(
            tree_prefix,
            *TREE_WIDTHS.iter().max().unwrap_or(&1),
            args.tokens,
        ),
        BLOCK,
    )
    .expect("cpu backend");
    tree_rows(b, "tiny", "cpu", tree_prefix, &args, &mut tree);

    gpu_rows(&args, &models, &mut rows, &mut tree);

    let mut csv = String::from("model,device,threads,prefix,graphs,ms_per_step,tokens_per_s\n");
    println!("model   device threads prefix graphs ms/step    tokens/s   vs W=1");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| {
                b.model == r.model && b.device == r.device && b.graphs == r.graphs && b.threads == 1
            })
            .map_or(f64::NAN, |b| r.ms / b.ms);
        let tps = r.threads as f64 / (r.ms / 1e3);
        println!(
            "{:<7} {:<6} {:>7} {:>6} {:<6} {:>9.3} {:>10.1}   {base:.2}x",
            r.model, r.device, r.threads, r.prefix, r.graphs, r.ms, tps
        );
        csv.push_str(&format!(
            "{},{},{},{},{},{:.4},{:.2}\n",
            r.model, r.device, r.threads, r.prefix, r.graphs, r.ms, tps
        ));
    }
    let path = out_dir.join("decode.csv");
    std::fs::write(&path, csv).expect("csv");
    println!("decode: wrote {}", path.display());
    report_tree(&tree, &args, &out_dir);
}

#[cfg(feature = "cuda")]
fn gpu_rows(args: &Args, models: &Path, rows: &mut Vec<Row>, tree: &mut Vec<TreeRow>) {
    use spindle::backend::cuda::backend::{CudaBackend, CudaOptions, KvPoolSize};
    use spindle::backend::cuda::pool::GraphMode;
    if let Err(e) = spindle::backend::cuda::Gpu::probe() {
        println!("decode: SKIPPED the GPU shapes: {e}");
        return;
    }
    let prefix = args.prefix.unwrap_or(4096);
    let tree_prefix = prefix.max(1);
    let mut presets = vec![Preset::P0_6B, Preset::P1_7B];
    if args.with_8b {
        presets.push(Preset::P8B);
    }
    if args.quick {
        presets.truncate(1);
    }
    for preset in presets {
        let ck = checkpoint(models, preset);
        let vocab = ck.config().vocab_size;
        let model = format!("{preset:?}").to_lowercase();
        // One backend per shape serves both sections: its pool holds the widest step and
        // either run of the tree section, and its arena the engine's prefill chunks.
        let blocks = blocks_needed(prefix, *WIDTHS.iter().max().unwrap_or(&1)).max(tree_blocks(
            tree_prefix,
            *TREE_WIDTHS.iter().max().unwrap_or(&1),
            args.tokens,
        ));
        let opts = CudaOptions {
            block_size: BLOCK,
            pool: KvPoolSize::Blocks(blocks),
            max_step_rows: EngineConfig::default().prefill_chunk.max(64),
            max_logit_rows: 64,
            ..Default::default()
        };
        let mut b = CudaBackend::load(&ck, &opts).expect("cuda backend");
        for &w in &WIDTHS {
            let step = decode_step(prefix, w, vocab);
            // Graphs on and off interleaved in rounds; the mean of each over all rounds.
            let rounds = 3;
            let (mut on, mut off) = (0.0, 0.0);
            for _ in 0..rounds {
                for (mode, acc) in [(GraphMode::On, &mut on), (GraphMode::Off, &mut off)] {
                    b.set_graph_mode(mode);
                    *acc += time_device_greedy(&mut b, &step, args.steps) / rounds as f64;
                }
            }
            if let Some(why) = b.graphs_disabled() {
                println!("decode: CUDA graphs were turned off ({why}): the 'on' rows ran eagerly");
            }
            for (graphs, ms) in [("on", on), ("off", off)] {
                rows.push(Row {
                    model: model.clone(),
                    device: "cuda",
                    threads: w,
                    prefix,
                    graphs,
                    ms,
                });
            }
        }
        b.set_graph_mode(GraphMode::On);
        tree_rows(b, &model, "cuda", tree_prefix, args, tree);
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_rows(_args: &Args, _models: &Path, _rows: &mut Vec<Row>, _tree: &mut Vec<TreeRow>) {
    println!("decode: SKIPPED the GPU shapes: built without --features cuda");
}
