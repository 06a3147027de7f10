//! Decode attention on the GPU over a forked tree: n threads share a P-token prefix and
//! each has S tokens of its own (Qwen3-8B attention shape: 32 q-heads / 8 kv-heads,
//! head_dim 128, block 16, one layer). Runs the per-thread split-KV paged decode kernel
//! (every row walks prefix + own chunks), timed with CUDA events, L2 flushed (a 256 MB
//! write) before every timed launch, and prints, per shape, measured as FlashInfer does
//! (design-notes section 3):
//!
//! - unique bytes (the K/V of P + n S tokens, what a forked kernel must read) / time, and
//!   that as a fraction of the peak bandwidth (`--peak-gbs`, default 4800 for H200 HBM3e);
//! - logical bytes (n (P + S) tokens: what this per-thread kernel reads) / time;
//! - the CPU plan's `kv_tokens_read` for the same tree, forked vs naive.
//!
//! `cargo bench --features cuda --bench gpu_attention [-- --quick] [-- --peak-gbs 3350]`.
//! Writes the table as CSV to `$SPINDLE_BENCH_DIR/gpu_attention.csv` (default
//! `target/bench/`). Without a GPU it prints that it was skipped and exits 0, unless
//! `SPINDLE_REQUIRE_GPU` is set (the GPU run sets it): then a missing GPU exits 1.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use spindle::backend::cuda::kernels::{self, CacheShape, Chunks, DecodeWorkspace, KvCache};
use spindle::backend::cuda::Gpu;
use spindle::kv::Chunk;
use spindle::plan::{AttentionMode, AttentionPlan, PlanThread};

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const BS: usize = 16;
const PARTITION: usize = 512;
const FLUSH_BYTES: usize = 256 << 20;

struct Args {
    peak_gbs: f64,
    quick: bool,
    iters: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        peak_gbs: 4800.0,
        quick: false,
        iters: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--peak-gbs" => {
                let v = it.next().ok_or("--peak-gbs needs a value")?;
                a.peak_gbs = v.parse().map_err(|_| format!("bad --peak-gbs {v}"))?;
            }
            "--iters" => {
                let v = it.next().ok_or("--iters needs a value")?;
                a.iters = v.parse().map_err(|_| format!("bad --iters {v}"))?;
            }
            "--bench" => {} // cargo bench passes this
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_attention: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = Gpu::probe() {
        if std::env::var_os("SPINDLE_REQUIRE_GPU").is_some() {
            eprintln!("gpu_attention: SPINDLE_REQUIRE_GPU is set but there is no GPU ({e})");
            std::process::exit(1);
        }
        println!("SKIPPED: gpu_attention: no CUDA driver ({e})");
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("gpu_attention: {e}");
        std::process::exit(1);
    }
}

/// Random bf16 data from spindle's one seeded generator.
struct Rng(spindle::generate::rng::Rng);
impl Rng {
    fn bf16s(&mut self, n: usize) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(self.0.next_f32() - 0.5))
            .collect()
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The tree's chunk lists: the shared prefix in blocks `0..P/BS`, thread t's own tokens in
/// the blocks after it.
fn tree_chunks(n: usize, p: usize, s: usize) -> Vec<Vec<Chunk>> {
    let pb = p.div_ceil(BS);
    let sb = s.div_ceil(BS);
    let run = |first: usize, len: usize| -> Vec<Chunk> {
        (0..len.div_ceil(BS))
            .map(|i| Chunk {
                block: (first + i) as u32,
                start: 0,
                len: (len - i * BS).min(BS) as u32,
            })
            .collect()
    };
    (0..n)
        .map(|t| {
            let mut c = run(0, p);
            c.extend(run(pb + t * sb, s));
            c
        })
        .collect()
}

fn run(args: &Args) -> Res<()> {
    let gpu = Gpu::new(0)?;
    let stream: Arc<CudaStream> = gpu.stream().clone();
    println!(
        "GPU: {} (sm_{}{}); decode attention, per-thread paged split-KV kernel (partition {PARTITION}); {HQ} q-heads / {HKV} kv-heads / head_dim {D}, block {BS}, one layer; L2 flushed ({} MB write) before each timed launch; median of {} launches; peak {:.0} GB/s",
        gpu.name()?,
        gpu.compute_capability()?.0,
        gpu.compute_capability()?.1,
        FLUSH_BYTES >> 20,
        args.iters,
        args.peak_gbs
    );
    let shapes: Vec<(usize, usize, usize)> = if args.quick {
        vec![(16, 1024, 256)]
    } else {
        vec![(16, 1024, 256), (16, 4096, 256), (16, 16384, 256)]
    };
    println!(
        "{:>3} {:>6} {:>4} | {:>9} | {:>10} {:>9} {:>6} | {:>11} {:>9} | {:>11} {:>11} {:>6} {:>7}",
        "n",
        "P",
        "S",
        "us",
        "unique MB",
        "GB/s",
        "%peak",
        "logical MB",
        "GB/s",
        "plan forked",
        "plan naive",
        "ratio",
        "ideal"
    );
    let mut csv = String::from(
        "threads,prefix,own,us,unique_mb,unique_gbs,pct_peak,logical_mb,logical_gbs,plan_forked_tokens,plan_naive_tokens\n",
    );
    let mut flush = stream.alloc_zeros::<u8>(FLUSH_BYTES)?;
    let start = gpu.ctx().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = gpu.ctx().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let mut rng = Rng(spindle::generate::rng::Rng::new(42));
    for (n, p, s) in shapes {
        let views = tree_chunks(n, p, s);
        let limit = p + s;
        // The CPU plan's read counts for this tree (one decode row per thread).
        let threads: Vec<PlanThread> = views
            .iter()
            .enumerate()
            .map(|(t, c)| PlanThread {
                chunks: c.clone(),
                rows: vec![(t as u32, limit as u32)],
            })
            .collect();
        let forked = AttentionPlan::build(&threads, AttentionMode::Forked, PARTITION);
        let naive = AttentionPlan::build(&threads, AttentionMode::Naive, PARTITION);

        let num_blocks = p.div_ceil(BS) + n * s.div_ceil(BS);
        let shape = CacheShape {
            num_blocks,
            block_size: BS,
            num_kv_heads: HKV,
            head_dim: D,
        };
        let k_cache: CudaSlice<bf16> = stream.clone_htod(&rng.bf16s(shape.elems()))?;
        let v_cache: CudaSlice<bf16> = stream.clone_htod(&rng.bf16s(shape.elems()))?;
        let q: CudaSlice<bf16> = stream.clone_htod(&rng.bf16s(n * HQ * D))?;
        let mut out = stream.alloc_zeros::<bf16>(n * HQ * D)?;
        let mut indptr = vec![0i32];
        let (mut cb, mut cs, mut cl) = (Vec::new(), Vec::new(), Vec::new());
        for v in &views {
            for c in v {
                cb.push(c.block as i32);
                cs.push(c.start as i32);
                cl.push(c.len as i32);
            }
            indptr.push(cb.len() as i32);
        }
        let d_indptr = stream.clone_htod(&indptr)?;
        let d_cb = stream.clone_htod(&cb)?;
        let d_cs = stream.clone_htod(&cs)?;
        let d_cl = stream.clone_htod(&cl)?;
        let d_limit = stream.clone_htod(&vec![limit as i32; n])?;
        let mut ws = DecodeWorkspace::new();
        let cache = KvCache {
            k: &k_cache,
            v: &v_cache,
            shape,
        };
        let chunks = Chunks {
            indptr: &d_indptr,
            block: &d_cb,
            start: &d_cs,
            len: &d_cl,
        };
        let scale = 1.0 / (D as f32).sqrt();
        let launch = |out: &mut CudaSlice<bf16>, ws: &mut DecodeWorkspace| {
            kernels::paged_decode(
                &stream, &q, &cache, &chunks, &d_limit, out, HQ, scale, limit, PARTITION, ws,
            )
        };
        launch(&mut out, &mut ws)?; // warm-up (allocates the workspace)
        stream.synchronize()?;
        let mut times = Vec::with_capacity(args.iters);
        for _ in 0..args.iters {
            stream.memset_zeros(&mut flush)?;
            start.record(&stream)?;
            launch(&mut out, &mut ws)?;
            end.record(&stream)?;
            times.push(start.elapsed_ms(&end)? as f64 * 1e-3);
        }
        let host_out = stream.clone_dtoh(&out)?;
        if host_out.iter().any(|x| !x.to_f32().is_finite()) {
            return Err(format!("n={n} P={p}: non-finite attention output").into());
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let tok_bytes = (2 * HKV * D * 2) as f64; // K and V, bf16
        let unique = (p + n * s) as f64 * tok_bytes;
        let logical = (n * (p + s)) as f64 * tok_bytes;
        let gbs = |b: f64| b / t / 1e9;
        let ideal = (n * (p + s)) as f64 / (p + n * s) as f64;
        println!(
            "{:>3} {:>6} {:>4} | {:>9.1} | {:>10.1} {:>9.0} {:>5.1}% | {:>11.1} {:>9.0} | {:>11} {:>11} {:>5.2}x {:>6.2}x",
            n,
            p,
            s,
            t * 1e6,
            unique / 1e6,
            gbs(unique),
            100.0 * gbs(unique) / args.peak_gbs,
            logical / 1e6,
            gbs(logical),
            forked.kv_tokens_read,
            naive.kv_tokens_read,
            naive.kv_tokens_read as f64 / forked.kv_tokens_read.max(1) as f64,
            ideal
        );
        csv.push_str(&format!(
            "{n},{p},{s},{:.2},{:.3},{:.1},{:.2},{:.3},{:.1},{},{}\n",
            t * 1e6,
            unique / 1e6,
            gbs(unique),
            100.0 * gbs(unique) / args.peak_gbs,
            logical / 1e6,
            gbs(logical),
            forked.kv_tokens_read,
            naive.kv_tokens_read
        ));
    }
    let dir = std::env::var_os("SPINDLE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/bench"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("gpu_attention.csv");
    std::fs::write(&path, csv)?;
    println!("CSV: {}", path.display());
    println!(
        "unique GB/s is the effective bandwidth a forked kernel would need to match this time; logical GB/s is what this per-thread kernel actually moves (above peak means L2/SMEM reuse across rows). ideal = n(P+S)/(P+nS)."
    );
    Ok(())
}
