//! spindle's own cost per step, with a backend that does no arithmetic: one request with a
//! shared prompt of P tokens forked into W children that each decode one token per step
//! (feed, schedule, plan, batch, outputs; the logits buffer has a real vocabulary,
//! 151,936). Prints microseconds and allocations per steady decode step, for W in
//! {1, 4, 16, 64, 256, 1024} at P = 512 and P in {512, 4096, 32768} at W = 64, and the
//! 1024 / 256 time ratio. Every case's engine is set up first; then 15 rounds each run a
//! short segment of every case in turn, and a case reports the median of its segments, so
//! a slow spell of a shared machine falls on all cases alike. Writes
//! `target/bench/runtime.csv` (`SPINDLE_BENCH_DIR` overrides). Pinning it to one core
//! (`taskset -c 1`) steadies it further.
//!
//! `cargo bench --bench runtime` (add `-- --quick` for shorter segments). `-- --only W:P
//! --steps N --rounds 1` runs one case for N steps, for instruction counts under `valgrind
//! --tool=callgrind` (the difference between two step counts is the cost of the extra
//! steps alone).

use model_loader::Checkpoint;
use spindle::backend::null::NullBackend;
use spindle::{AttentionMode, Engine, EngineConfig, ThreadId};
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

/// One case: an engine whose root with a `p`-token prompt has forked into `w` children.
struct Case {
    w: usize,
    p: usize,
    engine: Engine<NullBackend>,
    kids: Vec<ThreadId>,
    token: u32,
}

impl Case {
    /// Prefills the prompt, forks, and runs 16 warm-up steps; `steps` is how many steps
    /// the case runs in all (the pool is sized for them).
    fn new(w: usize, p: usize, steps: usize) -> Self {
        let fixtures = std::env::var_os("SPINDLE_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("tests/fixtures"));
        let ck = Checkpoint::open(&fixtures.join("tiny-llama")).expect("tiny-llama fixture");
        let mut cfg = ck.config().clone();
        cfg.vocab_size = VOCAB;
        let blocks = p.div_ceil(BLOCK) + w * (steps + 64).div_ceil(BLOCK) + 16;
        let mut engine = Engine::new(
            NullBackend::new(cfg, BLOCK, blocks),
            EngineConfig {
                mode: AttentionMode::Forked,
                max_step_tokens: 4096.max(w),
                ..EngineConfig::default()
            },
        );
        let prompt: Vec<u32> = (0..p as u32).map(|i| i % VOCAB as u32).collect();
        let root = engine.add_request(&prompt).expect("request");
        while engine.has_work() {
            engine.step().expect("prefill");
        }
        let kids = engine.fork(root, w, true).expect("fork");
        let mut case = Case {
            w,
            p,
            engine,
            kids,
            token: 0,
        };
        for _ in 0..16 {
            case.step();
        }
        case
    }

    /// One decode step: every child is fed one token, then the engine steps.
    fn step(&mut self) {
        for &k in &self.kids {
            self.token = (self.token + 7) % VOCAB as u32;
            self.engine.feed(k, &[self.token]).expect("feed");
        }
        let out = self.engine.step().expect("step");
        assert_eq!(out.rows, self.w, "one row per thread");
    }

    /// Runs `steps` steps: (microseconds per step, allocations, plan rebuilds).
    fn segment(&mut self, steps: usize) -> (f64, u64, u64) {
        let b0 = self.engine.plan_counts().builds;
        let a0 = ALLOCS.load(Ordering::Relaxed);
        let t0 = Instant::now();
        for _ in 0..steps {
            self.step();
        }
        let secs = t0.elapsed().as_secs_f64();
        let allocs = ALLOCS.load(Ordering::Relaxed) - a0;
        let b1 = self.engine.plan_counts().builds;
        (secs * 1e6 / steps as f64, allocs, b1 - b0)
    }
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
    let rounds: usize = arg("--rounds").map_or(15, |s| s.parse().expect("--rounds N"));
    // Steps per segment: about 2 ms of work, so that a segment of every case runs within a
    // few tens of milliseconds and a slow spell of the machine hits all cases alike.
    let steps_for = |w: usize| {
        let s = fixed_steps.unwrap_or(if w >= 256 { 20 } else { 100 });
        if quick {
            (s / 4).max(1)
        } else {
            s
        }
    };
    // Every case's engine is built first; then the rounds run one segment of each case in
    // turn, and each case reports the median over its segments.
    let mut runs: Vec<Case> = cases
        .iter()
        .map(|&(w, p)| Case::new(w, p, steps_for(w) * rounds))
        .collect();
    let mut us: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    let mut allocs = vec![0u64; runs.len()];
    let mut rebuilds = vec![0u64; runs.len()];
    for _ in 0..rounds {
        for (i, case) in runs.iter_mut().enumerate() {
            let (t, a, b) = case.segment(steps_for(case.w));
            us[i].push(t);
            allocs[i] += a;
            rebuilds[i] += b;
        }
    }
    println!(
        "spindle runtime per step (no-arithmetic backend, vocabulary {VOCAB}, block {BLOCK}; \
         median of {rounds} interleaved segments)"
    );
    println!(
        "{:>7} {:>7} {:>12} {:>16} {:>18}",
        "threads", "prefix", "us/step", "allocs/step", "plan rebuilds/step"
    );
    let mut csv = String::from("threads,prefix,us_per_step,allocs_per_step,rebuilds_per_step\n");
    for (i, case) in runs.iter().enumerate() {
        let (w, p) = (case.w, case.p);
        let n = (steps_for(w) * rounds) as f64;
        let t = median(us[i].clone());
        let a = allocs[i] as f64 / n;
        let b = rebuilds[i] as f64 / n;
        println!("{w:>7} {p:>7} {t:>12.2} {a:>16.3} {b:>18.3}");
        csv.push_str(&format!("{w},{p},{t:.3},{a:.3},{b:.4}\n"));
    }
    let time_of = |w: usize| {
        runs.iter()
            .position(|c| c.w == w && c.p == 512)
            .map(|i| median(us[i].clone()))
    };
    if let (Some(a), Some(b)) = (time_of(256), time_of(1024)) {
        println!("1024 threads / 256 threads: {:.2}x the time", b / a);
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
