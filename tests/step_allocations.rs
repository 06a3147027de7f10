//! A steady decode step allocates nothing: 64 threads over a shared 512-token prompt, one
//! token each per step, counted by a counting global allocator after a warm-up. The
//! backend does no arithmetic, so what is counted is spindle's own work per step (feed,
//! schedule, plan, batch, outputs), with logits or with the backend choosing the tokens.

use model_loader::Checkpoint;
use spindle::backend::null::NullBackend;
use spindle::backend::{RowPick, RowSampling};
use spindle::{AttentionMode, Engine, EngineConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

mod common;

/// Counts allocations (and reallocations) made by a thread while its `COUNTING` is set
/// (only the test's own thread: the harness's threads allocate as they please).
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCS: AtomicU64 = AtomicU64::new(0);

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: defers every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_steady_decode_step_allocates_nothing() {
    const W: usize = 64;
    const P: usize = 512;
    let ck = Checkpoint::open(&common::fixture("tiny-llama")).expect("fixture");
    let vocab = ck.config().vocab_size as u32;
    let backend = NullBackend::new(ck.config().clone(), 16, P / 16 + W * 32);
    let mut e = Engine::new(
        backend,
        EngineConfig {
            mode: AttentionMode::Forked,
            ..EngineConfig::default()
        },
    );
    let prompt: Vec<u32> = (0..P as u32).map(|i| i % vocab).collect();
    let root = e.add_request(&prompt).expect("request");
    while e.has_work() {
        e.step().expect("prefill");
    }
    let kids = e.fork(root, W, true).expect("fork");
    let mut token = [0u32; 1];
    let feed_all = |e: &mut Engine<NullBackend>, token: &mut [u32; 1]| {
        for &k in &kids {
            token[0] = (token[0] + 7) % vocab;
            e.feed(k, &token[..]).expect("feed");
        }
    };
    // Warm-up: the fork's first steps build the plan and size every buffer.
    for _ in 0..16 {
        feed_all(&mut e, &mut token);
        let out = e.step().expect("step");
        assert_eq!(out.rows, W);
    }
    let builds0 = e.plan_counts().builds;
    // 200 steps: every thread's tail crosses 12 block boundaries.
    const STEPS: u64 = 200;
    COUNTING.with(|c| c.set(true));
    let mut rows = 0usize;
    for _ in 0..STEPS {
        feed_all(&mut e, &mut token);
        let out = e.step().expect("step");
        rows += out.rows + out.logits.len() / vocab as usize;
    }
    COUNTING.with(|c| c.set(false));
    let allocs = ALLOCS.load(Ordering::SeqCst);
    let builds1 = e.plan_counts().builds;
    eprintln!(
        "{allocs} allocations in {STEPS} steady decode steps at W = {W}, P = {P} \
         ({} plan rebuilds)",
        builds1 - builds0
    );
    assert_eq!(rows, 2 * W * STEPS as usize, "every thread ran every step");
    assert_eq!(allocs, 0, "allocations per steady decode step must be zero");
    assert_eq!(
        builds1, builds0,
        "a steady decode step updates the plan in place"
    );

    // The same steps with the backend choosing the tokens (greedy ids: the null backend
    // samples on the host, where a tempered draw sorts the row): the picks and the tokens
    // live in the engine's buffers too.
    let pick = RowPick::Sample(RowSampling::GREEDY);
    for _ in 0..4 {
        feed_all(&mut e, &mut token);
        e.step_sampled(|_| pick).expect("step");
    }
    COUNTING.with(|c| c.set(true));
    let mut tokens = 0usize;
    for _ in 0..STEPS {
        feed_all(&mut e, &mut token);
        let out = e.step_sampled(|_| pick).expect("step");
        tokens += out.threads.iter().filter_map(|t| out.token_of(t)).count();
    }
    COUNTING.with(|c| c.set(false));
    let sampled_allocs = ALLOCS.load(Ordering::SeqCst) - allocs;
    eprintln!("{sampled_allocs} allocations in {STEPS} sampled decode steps");
    assert_eq!(
        tokens,
        W * STEPS as usize,
        "every thread got a token every step"
    );
    assert_eq!(
        sampled_allocs, 0,
        "allocations per steady sampled decode step must be zero"
    );
}

/// The CUDA backend's host work per decode step allocates nothing once warm: kernel v2's
/// lowering into the kept `LoweredPlan`, the attention arrays, the packed inputs with the
/// device-sampling settings, the step program rebuilt in place, and for a CUDA-graph step
/// the padding to the bucket's capacities. Decode steps of W = 64 threads over a shared
/// 4k prefix whose tails grow (each step's plan differs), replayed after a warm-up pass.
#[test]
fn the_cuda_steps_host_work_allocates_nothing() {
    use model_loader::{preset_config, Arch, Preset};
    use spindle::backend::graph_layout::{bucket_for, pad_lowered_into, GraphCaps};
    use spindle::backend::step_program::{
        pack_step, AttentionArrays, PackExtra, StepProgram, StepShape, TokenOp,
        DEFAULT_MAX_STEP_PARTIALS,
    };
    use spindle::backend::{RowPick, RowSampling};
    use spindle::plan::lower::{lower_into, LowerConfig, LoweredPlan};
    const W: usize = 64;
    let cfg = preset_config(Arch::Qwen3, Preset::P1_7B);
    let steps: Vec<_> = (0..16)
        .map(|age| common::decode::decode_step(W, 4096, age))
        .collect();
    let num_blocks = steps.iter().map(|s| s.1).max().expect("steps");
    let mut lc = LowerConfig::new(cfg.num_heads, cfg.num_kv_heads, num_blocks, 16);
    lc.num_sms = 132;
    let picks = vec![
        RowPick::Sample(RowSampling {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.95,
            uniform: 0.5,
        });
        W
    ];
    let bucket = bucket_for(W, 256).expect("bucket");
    let caps = GraphCaps::initial(bucket, 132, DEFAULT_MAX_STEP_PARTIALS);
    let (mut lowered, mut padded) = (LoweredPlan::default(), LoweredPlan::default());
    let mut arrays = AttentionArrays::default();
    let mut staging = vec![0i32; 1 << 16];
    let mut program = StepProgram::default();
    let mut host_step = |step: &spindle::backend::StepInput| {
        lower_into(&step.plan, &lc, &mut lowered).expect("lowers");
        // Eager: the lowering as is.
        arrays.clear();
        arrays.push_lowered(&lowered);
        let extra = PackExtra {
            attention: &arrays.data,
            picks: &picks,
            pad_rows: 0,
        };
        pack_step(step, &extra, &mut staging).expect("packs");
        let shape = StepShape {
            rows: W,
            logit_rows: W,
            copies: false,
            attention_launches: 2,
            tokens: TokenOp::Sample,
            logits_back: false,
            graph: false,
        };
        program.build_into(&cfg, &shape);
        // Graph: padded to the bucket.
        pad_lowered_into(&lowered, &caps, &mut padded).expect("fits the bucket");
        arrays.clear();
        arrays.push_lowered(&padded);
        let extra = PackExtra {
            attention: &arrays.data,
            picks: &picks,
            pad_rows: bucket,
        };
        pack_step(step, &extra, &mut staging).expect("packs");
        program.build_into(
            &cfg,
            &StepShape {
                graph: true,
                ..shape
            },
        );
    };
    for (s, _) in &steps {
        host_step(s);
    }
    COUNTING.with(|c| c.set(true));
    for _ in 0..4 {
        for (s, _) in &steps {
            host_step(s);
        }
    }
    COUNTING.with(|c| c.set(false));
    let allocs = ALLOCS.load(Ordering::SeqCst);
    eprintln!("{allocs} allocations in 64 steps of the CUDA step's host work at W = {W}");
    assert_eq!(
        allocs, 0,
        "the CUDA step's host work must not allocate once warm"
    );
}
