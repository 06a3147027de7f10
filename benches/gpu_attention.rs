//! Decode attention over a forked tree, kernel v1 (per-thread paged split-KV decode: every
//! row walks prefix + own chunks) beside kernel v2 (forked: the lowered plan, the shared
//! prefix staged once per step for all rows), llm.c style: each point is validated first
//! (v2 against v1 on the GPU, and both against the CPU reference at small points), then
//! timed with CUDA events, the L2 flushed (a 256 MB write) before every timed launch.
//!
//! W threads share a P-token prefix and each has S tokens of its own, one decode row per
//! thread, head_dim 128, block 16, one layer. Sweep: W in {1, 2, 4, 8, 16, 32, 64}, P in
//! {1k, 4k, 16k, 32k}, S in {128, 1k}, 16/8 and 32/8 q/kv heads (`--quick`: W 16, P 4k,
//! S 128, 16/8). The device-to-device copy bandwidth is measured in the same run (bytes
//! read + written / time). Per point and version: time, unique bytes (the K/V of P + W S
//! tokens) per second and its fraction of the copy bandwidth, v2's speed-up over v1 and
//! the ideal W(P+S)/(P+WS).
//!
//! `cargo bench --features cuda --bench gpu_attention [-- --quick] [-- --iters N]` writes
//! `$SPINDLE_BENCH_DIR/gpu_attention.csv` (default `target/bench/`) with the columns
//! `W,P,S,q_heads,kv_heads,version,us,unique_gbps,frac_copy_bw,speedup_vs_v1,ideal_speedup`.
//! Without a GPU (or without the `cuda` feature) it runs the CPU backend's forked and
//! per-thread (naive) plans at small sizes instead (versions `cpu_forked` / `cpu_naive`,
//! bandwidth against a host memcpy), so `cargo bench` always runs; with
//! `SPINDLE_REQUIRE_GPU` set (the GPU run sets it) a missing GPU exits 1.

use std::time::Instant;

use spindle::backend::cpu_attention::{self, AttnShape};
use spindle::kv::Chunk;
use spindle::plan::{AttentionMode, AttentionPlan, PlanRow, PlanThread};

const D: usize = 128;
const BS: usize = 16;
const CSV_HEADER: &str =
    "W,P,S,q_heads,kv_heads,version,us,unique_gbps,frac_copy_bw,speedup_vs_v1,ideal_speedup\n";

struct Args {
    quick: bool,
    iters: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        iters: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--iters" => {
                let v = it.next().ok_or("--iters needs a value")?;
                a.iters = v.parse().map_err(|_| format!("bad --iters {v}"))?;
                if a.iters == 0 {
                    return Err("--iters must be positive".into());
                }
            }
            "--peak-gbs" => {
                // Accepted for old command lines; the copy bandwidth is measured now.
                it.next().ok_or("--peak-gbs needs a value")?;
            }
            "--bench" => {} // cargo bench passes this
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
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

fn threads_of(views: &[Vec<Chunk>], limit: usize) -> Vec<PlanThread> {
    views
        .iter()
        .enumerate()
        .map(|(t, c)| PlanThread {
            chunks: c.clone(),
            rows: vec![PlanRow {
                row: t as u32,
                limit: limit as u32,
            }],
        })
        .collect()
}

fn ideal(n: usize, p: usize, s: usize) -> f64 {
    (n * (p + s)) as f64 / (p + n * s) as f64
}

fn write_csv(csv: &str) -> Res<()> {
    let dir = std::env::var_os("SPINDLE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/bench"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("gpu_attention.csv");
    std::fs::write(&path, csv)?;
    println!("CSV: {}", path.display());
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_attention: {e}");
            std::process::exit(2);
        }
    };
    let no_gpu = gpu::probe().err();
    if let Some(reason) = no_gpu {
        if std::env::var_os("SPINDLE_REQUIRE_GPU").is_some() {
            eprintln!("gpu_attention: SPINDLE_REQUIRE_GPU is set but there is no GPU ({reason})");
            std::process::exit(1);
        }
        println!("SKIPPED: gpu_attention on the GPU: {reason}; running the CPU plans instead");
        if let Err(e) = cpu_fallback(&args) {
            eprintln!("gpu_attention: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = gpu::run(&args) {
        eprintln!("gpu_attention: {e}");
        std::process::exit(1);
    }
}

/// The CPU backend's forked and per-thread plans at small sizes (f32 K/V).
fn cpu_fallback(args: &Args) -> Res<()> {
    let (hq, hkv) = (16usize, 8usize);
    // Host copy bandwidth: a 64 MiB copy, read + written bytes.
    let src = vec![1.0f32; 16 << 20];
    let mut dst = vec![0.0f32; 16 << 20];
    dst.copy_from_slice(&src); // first touch
    let t = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    }
    let copy_gbps = 4.0 * 2.0 * (src.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!(
        "CPU: forked vs per-thread (naive) plans, {hq} q-heads / {hkv} kv-heads / head_dim {D}, block {BS}; host copy {copy_gbps:.1} GB/s"
    );
    println!(
        "{:>3} {:>6} {:>4} | {:>10} | {:>10} {:>10} | {:>8} {:>6}",
        "W", "P", "S", "version", "us", "unique GB/s", "speedup", "ideal"
    );
    let mut csv = String::from(CSV_HEADER);
    let points: &[(usize, usize, usize)] = if args.quick {
        &[(4, 256, 32)]
    } else {
        &[
            (1, 256, 32),
            (4, 256, 32),
            (16, 256, 32),
            (4, 1024, 32),
            (16, 1024, 32),
        ]
    };
    let mut rng = spindle::generate::rng::Rng::new(42);
    for &(n, p, s) in points {
        let views = tree_chunks(n, p, s);
        let threads = threads_of(&views, p + s);
        let num_blocks = p.div_ceil(BS) + n * s.div_ceil(BS);
        let kv_width = hkv * D;
        let k: Vec<f32> = (0..num_blocks * BS * kv_width)
            .map(|_| rng.next_f32() - 0.5)
            .collect();
        let v: Vec<f32> = (0..k.len()).map(|_| rng.next_f32() - 0.5).collect();
        let q: Vec<f32> = (0..n * hq * D).map(|_| rng.next_f32() - 0.5).collect();
        let shape = AttnShape {
            num_heads: hq,
            num_kv_heads: hkv,
            head_dim: D,
            block_size: BS,
        };
        let mut results = Vec::new();
        for (name, mode) in [
            ("cpu_naive", AttentionMode::Naive),
            ("cpu_forked", AttentionMode::Forked),
        ] {
            let plan = AttentionPlan::build(&threads, mode, 0);
            let out = cpu_attention::attention(&plan, &q, &k, &v, shape).output; // warm-up
            let mut times = Vec::new();
            for _ in 0..args.iters.min(5) {
                let t = Instant::now();
                std::hint::black_box(cpu_attention::attention(&plan, &q, &k, &v, shape));
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            results.push((name, times[times.len() / 2], out));
        }
        // Validate: the two plans agree.
        let worst = results[0]
            .2
            .iter()
            .zip(&results[1].2)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        if worst > 1e-4 {
            return Err(format!("W={n} P={p} S={s}: forked and naive differ by {worst}").into());
        }
        let base = results[0].1;
        let unique = ((p + n * s) * 2 * kv_width * 4) as f64;
        for (name, t, _) in &results {
            let gbps = unique / t / 1e9;
            println!(
                "{:>3} {:>6} {:>4} | {:>10} | {:>10.1} {:>10.2} | {:>7.2}x {:>5.2}x",
                n,
                p,
                s,
                name,
                t * 1e6,
                gbps,
                base / t,
                ideal(n, p, s)
            );
            csv.push_str(&format!(
                "{n},{p},{s},{hq},{hkv},{name},{:.2},{:.3},{:.4},{:.3},{:.3}\n",
                t * 1e6,
                gbps,
                gbps / copy_gbps,
                base / t,
                ideal(n, p, s)
            ));
        }
    }
    write_csv(&csv)
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::{Args, Res};

    pub fn probe() -> Result<(), String> {
        Err("built without the cuda feature".into())
    }

    pub fn run(_: &Args) -> Res<()> {
        Err("built without the cuda feature".into())
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::driver::sys::CUevent_flags;
    use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
    use half::bf16;
    use spindle::backend::cuda::kernels::{
        self, CacheShape, Chunks, DecodeWorkspace, ForkedPlan, KvCache,
    };
    use spindle::backend::cuda::{ComputeCapability, Gpu};
    use spindle::plan::lower::{lower, LowerConfig};
    use std::sync::Arc;

    const PARTITION: usize = 512;
    const FLUSH_BYTES: usize = 256 << 20;

    pub fn probe() -> Result<(), String> {
        Gpu::probe().map(|_| ()).map_err(|e| e.to_string())
    }

    struct Timer {
        start: CudaEvent,
        end: CudaEvent,
        flush: CudaSlice<u8>,
    }

    impl Timer {
        /// Median seconds of `iters` launches of `f`, the L2 flushed before each.
        fn time(
            &mut self,
            stream: &Arc<CudaStream>,
            iters: usize,
            mut f: impl FnMut() -> Res<()>,
        ) -> Res<f64> {
            f()?; // warm-up
            stream.synchronize()?;
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                stream.memset_zeros(&mut self.flush)?;
                self.start.record(stream)?;
                f()?;
                self.end.record(stream)?;
                times.push(self.start.elapsed_ms(&self.end)? as f64 * 1e-3);
            }
            times.sort_by(f64::total_cmp);
            Ok(times[times.len() / 2])
        }
    }

    fn bf16s(rng: &mut spindle::generate::rng::Rng, n: usize) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.next_f32() - 0.5))
            .collect()
    }

    fn up(stream: &Arc<CudaStream>, v: &[i32]) -> Res<CudaSlice<i32>> {
        Ok(stream.clone_htod(if v.is_empty() { &[0][..] } else { v })?)
    }

    pub fn run(args: &Args) -> Res<()> {
        let gpu = Gpu::new(0)?;
        let stream: Arc<CudaStream> = gpu.stream().clone();
        let mut timer = Timer {
            start: gpu.ctx().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?,
            end: gpu.ctx().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?,
            flush: stream.alloc_zeros::<u8>(FLUSH_BYTES)?,
        };
        // Device copy bandwidth: a 1 GiB device-to-device copy, bytes read + written.
        let copy_bytes = 1usize << 30;
        let src = stream.alloc_zeros::<u8>(copy_bytes)?;
        let mut dst = stream.alloc_zeros::<u8>(copy_bytes)?;
        let t_copy = timer.time(&stream, 5, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
        drop((src, dst));
        let copy_gbps = 2.0 * copy_bytes as f64 / t_copy / 1e9;
        let sms = gpu.ctx().attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let ComputeCapability { major, minor } = gpu.compute_capability()?;
        println!(
            "GPU: {} (sm_{major}{minor}, {sms} SMs); device copy {copy_gbps:.0} GB/s (read + write); decode attention v1 (per-thread split-KV, partition {PARTITION}) vs v2 (forked); head_dim {D}, block {BS}, one layer; L2 flushed before each timed launch; median of {} launches",
            gpu.name()?,
            args.iters
        );
        println!(
            "{:>3} {:>6} {:>4} | {:>5} | {:>2} | {:>9} {:>9} {:>6} | {:>7} {:>6} {:>5}",
            "W", "P", "S", "heads", "v", "us", "uniq GB/s", "frac", "speedup", "ideal", "/ideal"
        );
        let mut csv = String::from(CSV_HEADER);
        let sweep: Vec<(usize, usize, usize, usize, usize)> = if args.quick {
            vec![(16, 4096, 128, 16, 8)]
        } else {
            let mut v = Vec::new();
            for (hq, hkv) in [(16, 8), (32, 8)] {
                for p in [1024, 4096, 16384, 32768] {
                    for s in [128, 1024] {
                        for w in [1, 2, 4, 8, 16, 32, 64] {
                            v.push((w, p, s, hq, hkv));
                        }
                    }
                }
            }
            v
        };
        let mut rng = spindle::generate::rng::Rng::new(42);
        let mut worst_ratio = f64::INFINITY;
        for (n, p, s, hq, hkv) in sweep {
            let views = tree_chunks(n, p, s);
            let limit = p + s;
            let threads = threads_of(&views, limit);
            let num_blocks = p.div_ceil(BS) + n * s.div_ceil(BS);
            let shape = CacheShape {
                num_blocks,
                block_size: BS,
                num_kv_heads: hkv,
                head_dim: D,
            };
            let k_host = bf16s(&mut rng, shape.elems());
            let v_host = bf16s(&mut rng, shape.elems());
            let q_host = bf16s(&mut rng, n * hq * D);
            let k_cache = stream.clone_htod(&k_host)?;
            let v_cache = stream.clone_htod(&v_host)?;
            let q = stream.clone_htod(&q_host)?;
            let cache = KvCache {
                k: &k_cache,
                v: &v_cache,
                shape,
            };
            let scale = 1.0 / (D as f32).sqrt();
            // v1: per-row chunk lists.
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
            let (d_indptr, d_cb, d_cs, d_cl) = (
                up(&stream, &indptr)?,
                up(&stream, &cb)?,
                up(&stream, &cs)?,
                up(&stream, &cl)?,
            );
            let d_limit = up(&stream, &vec![limit as i32; n])?;
            let chunks = Chunks {
                indptr: &d_indptr,
                block: &d_cb,
                start: &d_cs,
                len: &d_cl,
            };
            let mut out1 = stream.alloc_zeros::<bf16>(n * hq * D)?;
            let mut ws1 = DecodeWorkspace::new();
            // v2: the forked plan, lowered.
            let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
            let mut cfg = LowerConfig::new(hq, hkv, num_blocks, BS);
            cfg.num_sms = sms.max(1);
            let lp = lower(&plan, &cfg)?;
            let bufs = [
                &lp.units,
                &lp.unit_rows,
                &lp.partial_direct,
                &lp.chunk_block,
                &lp.chunk_start,
                &lp.chunk_len,
                &lp.row_limit,
                &lp.row_part_ptr,
                &lp.row_parts,
                &lp.merge_rows,
            ]
            .iter()
            .map(|v| up(&stream, v))
            .collect::<Res<Vec<_>>>()?;
            let lens = [
                lp.units.len(),
                lp.unit_rows.len(),
                lp.partial_direct.len(),
                lp.chunk_block.len(),
                lp.chunk_start.len(),
                lp.chunk_len.len(),
                lp.row_limit.len(),
                lp.row_part_ptr.len(),
                lp.row_parts.len(),
                lp.merge_rows.len(),
            ];
            let dv: Vec<_> = bufs.iter().zip(lens).map(|(b, l)| b.slice(0..l)).collect();
            let fp = ForkedPlan {
                units: &dv[0],
                unit_rows: &dv[1],
                partial_direct: &dv[2],
                chunk_block: &dv[3],
                chunk_start: &dv[4],
                chunk_len: &dv[5],
                row_limit: &dv[6],
                row_part_ptr: &dv[7],
                row_parts: &dv[8],
                merge_rows: &dv[9],
            };
            let mut out2 = stream.alloc_zeros::<bf16>(n * hq * D)?;
            let mut ws2 = DecodeWorkspace::new();

            // Validate: v1 and v2 agree; at small points both match the CPU reference.
            kernels::paged_decode(
                &stream, &q, &cache, &chunks, &d_limit, &mut out1, hq, scale, limit, PARTITION,
                &mut ws1,
            )?;
            kernels::forked_attention(&stream, &q, &cache, &fp, &mut out2, hq, scale, &mut ws2)?;
            let o1: Vec<f32> = stream
                .clone_dtoh(&out1)?
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let o2: Vec<f32> = stream
                .clone_dtoh(&out2)?
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let close = |a: &[f32], b: &[f32]| {
                a.chunks(D).zip(b.chunks(D)).all(|(ra, rb)| {
                    let m = rb.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    ra.iter()
                        .zip(rb)
                        .all(|(x, y)| (x - y).abs() <= 2e-2 * y.abs() + 4e-3 * m)
                })
            };
            if !close(&o2, &o1) {
                return Err(format!("W={n} P={p} S={s} {hq}/{hkv}: v2 differs from v1").into());
            }
            if n * (p + s) <= 64 * 1024 {
                let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
                let want = cpu_attention::attention(
                    &plan,
                    &f(&q_host),
                    &f(&k_host),
                    &f(&v_host),
                    AttnShape {
                        num_heads: hq,
                        num_kv_heads: hkv,
                        head_dim: D,
                        block_size: BS,
                    },
                )
                .output;
                if !close(&o1, &want) || !close(&o2, &want) {
                    return Err(format!("W={n} P={p} S={s}: a kernel differs from the CPU").into());
                }
            }

            let t1 = timer.time(&stream, args.iters, || {
                Ok(kernels::paged_decode(
                    &stream, &q, &cache, &chunks, &d_limit, &mut out1, hq, scale, limit, PARTITION,
                    &mut ws1,
                )?)
            })?;
            let t2 = timer.time(&stream, args.iters, || {
                Ok(kernels::forked_attention(
                    &stream, &q, &cache, &fp, &mut out2, hq, scale, &mut ws2,
                )?)
            })?;
            let unique = ((p + n * s) * 2 * hkv * D * 2) as f64;
            let id = ideal(n, p, s);
            for (ver, t) in [("v1", t1), ("v2", t2)] {
                let gbps = unique / t / 1e9;
                let sp = t1 / t;
                println!(
                    "{:>3} {:>6} {:>4} | {:>2}/{:<2} | {:>2} | {:>9.1} {:>9.0} {:>6.3} | {:>6.2}x {:>5.2}x {:>5.2}",
                    n,
                    p,
                    s,
                    hq,
                    hkv,
                    ver,
                    t * 1e6,
                    gbps,
                    gbps / copy_gbps,
                    sp,
                    id,
                    sp / id
                );
                csv.push_str(&format!(
                    "{n},{p},{s},{hq},{hkv},{ver},{:.2},{:.1},{:.4},{:.3},{:.3}\n",
                    t * 1e6,
                    gbps,
                    gbps / copy_gbps,
                    sp,
                    id
                ));
            }
            worst_ratio = worst_ratio.min(t1 / t2);
        }
        write_csv(&csv)?;
        println!(
            "unique GB/s: K/V of P + W S tokens per second; frac: of the measured copy bandwidth; ideal = W(P+S)/(P+WS); slowest v2 point: {:.2}x of v1",
            worst_ratio
        );
        Ok(())
    }
}
