//! Whole decode steps: W threads (W in 1, 4, 16, 64) that share a P-token prefix each
//! decode one token per step, timed as `model::forward` over one fused step (the step the
//! engine builds for W decode rows: forked plan, prefix blocks shared).
//!
//! `cargo bench --bench decode [-- --quick] [--prefix P] [--steps N]`
//!
//! - Always: the CPU backend on the `tiny` Qwen3 shape of `gen-model`
//!   (`model_loader::generate_checkpoint`), prefix 256 (`--prefix` overrides), so it runs
//!   anywhere.
//! - With `--features cuda` and a GPU: the CUDA backend (fused step) on the 0.6b and 1.7b
//!   shapes (`--with-8b` adds 8b; 16 GB written first) with a 4096-token prefix. CUDA graphs
//!   are not implemented yet, so every row has `graphs` = off.
//!
//! Random weights and an unwritten (zero) prefix cache: the timing depends on shapes only.
//! Writes `target/bench/decode.csv` (`SPINDLE_BENCH_DIR` overrides; the checkpoints go to
//! `SPINDLE_SCRATCH/decode-models` when it is set) with the columns
//! `model,device,threads,prefix,graphs,ms_per_step,tokens_per_s`.

use model_loader::{generate_checkpoint, Arch, Checkpoint, Preset};
use spindle::backend::{Backend, StepInput};
use spindle::kv::Chunk;
use spindle::plan::{AttentionPlan, PlanRow, PlanThread};
use spindle::AttentionMode;
use std::path::{Path, PathBuf};
use std::time::Instant;

const WIDTHS: [usize; 4] = [1, 4, 16, 64];
const BLOCK: usize = 16;

struct Args {
    quick: bool,
    prefix: Option<usize>,
    steps: usize,
    with_8b: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        prefix: None,
        steps: 20,
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
            "--with-8b" => a.with_8b = true,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.quick {
        a.steps = a.steps.min(3);
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
            ms,
        });
    }

    gpu_rows(&args, &models, &mut rows);

    let mut csv = String::from("model,device,threads,prefix,graphs,ms_per_step,tokens_per_s\n");
    println!("model   device threads prefix graphs ms/step    tokens/s   vs W=1");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.model == r.model && b.device == r.device && b.threads == 1)
            .map_or(f64::NAN, |b| r.ms / b.ms);
        let tps = r.threads as f64 / (r.ms / 1e3);
        println!(
            "{:<7} {:<6} {:>7} {:>6} off    {:>9.3} {:>10.1}   {base:.2}x",
            r.model, r.device, r.threads, r.prefix, r.ms, tps
        );
        csv.push_str(&format!(
            "{},{},{},{},off,{:.4},{:.2}\n",
            r.model, r.device, r.threads, r.prefix, r.ms, tps
        ));
    }
    let path = out_dir.join("decode.csv");
    std::fs::write(&path, csv).expect("csv");
    println!("decode: wrote {}", path.display());
}

#[cfg(feature = "cuda")]
fn gpu_rows(args: &Args, models: &Path, rows: &mut Vec<Row>) {
    use spindle::backend::cuda::backend::{CudaBackend, CudaOptions, KvPoolSize};
    if let Err(e) = spindle::backend::cuda::Gpu::probe() {
        println!("decode: SKIPPED the GPU shapes: {e}");
        return;
    }
    let prefix = args.prefix.unwrap_or(4096);
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
        let opts = CudaOptions {
            block_size: BLOCK,
            pool: KvPoolSize::Blocks(blocks_needed(prefix, *WIDTHS.iter().max().unwrap_or(&1))),
            max_step_rows: 64,
            max_logit_rows: 64,
            ..Default::default()
        };
        let mut b = CudaBackend::load(&ck, &opts).expect("cuda backend");
        for &w in &WIDTHS {
            let ms = time_steps(&mut b, &decode_step(prefix, w, vocab), args.steps);
            rows.push(Row {
                model: format!("{preset:?}").to_lowercase(),
                device: "cuda",
                threads: w,
                prefix,
                ms,
            });
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_rows(_args: &Args, _models: &Path, _rows: &mut Vec<Row>) {
    println!("decode: SKIPPED the GPU shapes: built without --features cuda");
}
