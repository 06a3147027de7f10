//! spindle's own cost per step, with a backend that does no arithmetic: one request with a
//! shared prompt of P tokens forked into W children that each decode one token per step
//! (feed, schedule, plan, batch, outputs; the logits buffer has a real vocabulary,
//! 151,936). Prints microseconds and allocations per steady decode step, for W in
//! {1, 4, 16, 64, 256, 1024} at P = 512 and P in {512, 4096, 32768} at W = 64; medians of
//! three interleaved runs. Writes `target/bench/runtime.csv` (`SPINDLE_BENCH_DIR`
//! overrides).
//!
//! `cargo bench --bench runtime` (add `-- --quick` for fewer steps). `-- --only W:P --steps N
//! --rounds 1` runs one case, for instruction counts under `valgrind --tool=callgrind`
//! (the difference between two step counts is the cost of the extra steps alone).

use model_loader::Checkpoint;
use spindle::backend::null::NullBackend;
use spindle::{AttentionMode, Engine, EngineConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts allocations and reallocations.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const VOCAB: usize = 151_936;
const BLOCK: usize = 16;

/// One measurement: (microseconds per step, allocations per step, plan rebuilds per step).
fn run(w: usize, p: usize, steps: usize) -> (f64, f64, f64) {
    let fixtures = std::env::var_os("SPINDLE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tests/fixtures"));
    let ck = Checkpoint::open(&fixtures.join("tiny-llama")).expect("tiny-llama fixture");
    let mut cfg = ck.config().clone();
    cfg.vocab_size = VOCAB;
    let blocks = p.div_ceil(BLOCK) + w * (steps + 64).div_ceil(BLOCK) + 16;
    let mut e = Engine::new(
        NullBackend::new(cfg, BLOCK, blocks),
        EngineConfig {
            mode: AttentionMode::Forked,
            max_step_tokens: 4096.max(w),
            ..EngineConfig::default()
        },
    );
    let prompt: Vec<u32> = (0..p as u32).map(|i| i % VOCAB as u32).collect();
    let root = e.add_request(&prompt).expect("request");
    while e.has_work() {
        e.step().expect("prefill");
    }
    let kids = e.fork(root, w, true).expect("fork");
    let mut token = 0u32;
    let mut step = |e: &mut Engine<NullBackend>| {
        for &k in &kids {
            token = (token + 7) % VOCAB as u32;
            e.feed(k, &[token]).expect("feed");
        }
        let out = e.step().expect("step");
        assert_eq!(out.rows, w, "one row per thread");
    };
    for _ in 0..16 {
        step(&mut e);
    }
    let b0 = e.plan_counts().builds;
    let a0 = ALLOCS.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for _ in 0..steps {
        step(&mut e);
    }
    let secs = t0.elapsed().as_secs_f64();
    let allocs = ALLOCS.load(Ordering::Relaxed) - a0;
    let b1 = e.plan_counts().builds;
    let n = steps as f64;
    (secs * 1e6 / n, allocs as f64 / n, (b1 - b0) as f64 / n)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The value after `flag` on the command line.
fn arg(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut cases: Vec<(usize, usize)> = [1, 4, 16, 64, 256, 1024]
        .iter()
        .map(|&w| (w, 512))
        .collect();
    cases.extend([(64, 4096), (64, 32768)]);
    if let Some(only) = arg("--only") {
        let (w, p) = only.split_once(':').expect("--only W:P");
        cases = vec![(w.parse().expect("W"), p.parse().expect("P"))];
    }
    let fixed_steps: Option<usize> = arg("--steps").map(|s| s.parse().expect("--steps N"));
    let rounds: usize = arg("--rounds").map_or(3, |s| s.parse().expect("--rounds N"));
    let steps_for = |w: usize| {
        let s = fixed_steps.unwrap_or(if w >= 256 { 200 } else { 1000 });
        if quick {
            s / 10
        } else {
            s
        }
    };
    // Interleaved rounds over every case, then medians.
    let mut results: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, &(w, p)) in cases.iter().enumerate() {
            results[i].push(run(w, p, steps_for(w)));
        }
    }
    println!(
        "spindle runtime per step (no-arithmetic backend, vocabulary {VOCAB}, block {BLOCK}; \
         medians of {rounds})"
    );
    println!(
        "{:>7} {:>7} {:>12} {:>16} {:>18}",
        "threads", "prefix", "us/step", "allocs/step", "plan rebuilds/step"
    );
    let mut csv = String::from("threads,prefix,us_per_step,allocs_per_step,rebuilds_per_step\n");
    for (&(w, p), r) in cases.iter().zip(&results) {
        let us = median(r.iter().map(|x| x.0).collect());
        let allocs = median(r.iter().map(|x| x.1).collect());
        let rebuilds = median(r.iter().map(|x| x.2).collect());
        println!("{w:>7} {p:>7} {us:>12.2} {allocs:>16.3} {rebuilds:>18.3}");
        csv.push_str(&format!("{w},{p},{us:.3},{allocs:.3},{rebuilds:.4}\n"));
    }
    let out_dir = std::env::var_os("SPINDLE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out_dir).expect("bench dir");
    let path = out_dir.join(if arg("--only").is_some() {
        "runtime_one.csv"
    } else {
        "runtime.csv"
    });
    std::fs::write(&path, csv).expect("csv");
    println!("wrote {}", path.display());
}
