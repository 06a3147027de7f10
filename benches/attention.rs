//! Decode attention over a forked tree: forked plan (shared prefix read once per step for
//! every thread) against the per-thread plan, on the CPU backend's executor.
//!
//! For each shape it first checks the two plans agree, then prints K/V tokens and bytes
//! read per step, time per step and the speed-up side by side with the ideal
//! n(P+S)/(P+nS) of design-notes section 3. Run: `cargo bench --bench attention`
//! (`-- --quick` for one small shape).

use spindle::backend::cpu_attention::{attention, AttnShape};
use spindle::kv::{BlockPool, KvView, SharedTail};
use spindle::plan::{AttentionMode, AttentionPlan, PlanRow, PlanThread};
use std::time::Instant;

struct Case {
    threads: usize,
    prefix: usize,
    suffix: usize,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // Qwen3-8B attention shape: 32 query heads, 8 KV heads, head_dim 128; one layer.
    let shape = AttnShape {
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        block_size: 16,
    };
    let cases: Vec<Case> = if quick {
        vec![Case {
            threads: 4,
            prefix: 256,
            suffix: 16,
        }]
    } else {
        [
            (4, 1024, 64),
            (16, 1024, 64),
            (16, 4096, 64),
            (8, 4096, 256),
        ]
        .iter()
        .map(|&(threads, prefix, suffix)| Case {
            threads,
            prefix,
            suffix,
        })
        .collect()
    };
    println!("decode attention on the CPU backend: 32 q-heads / 8 kv-heads / head_dim 128, block 16, one layer");
    println!(
        "{:>3} {:>6} {:>5} | {:>12} {:>12} {:>7} | {:>10} {:>10} {:>7} {:>7}",
        "n",
        "P",
        "S",
        "kv tok fork",
        "kv tok naive",
        "bytes÷",
        "ms fork",
        "ms naive",
        "speedup",
        "ideal"
    );
    for c in &cases {
        run(c, shape);
    }
}

fn run(c: &Case, shape: AttnShape) {
    let kv_width = shape.num_kv_heads * shape.head_dim;
    let q_width = shape.num_heads * shape.head_dim;
    let tokens = c.prefix + c.threads * c.suffix;
    let blocks = tokens.div_ceil(shape.block_size) + 2 * c.threads + 2;
    let mut pool = BlockPool::new(blocks, shape.block_size);
    let mut copies = Vec::new();
    let mut root = KvView::new();
    let tail = SharedTail::NewSpan;
    root.append(c.prefix, &mut pool, &mut copies, tail)
        .expect("pool sized for the prefix");
    let mut views: Vec<KvView> = (0..c.threads)
        .map(|_| {
            let mut v = root.share(&mut pool);
            v.append(c.suffix, &mut pool, &mut copies, tail)
                .expect("pool sized for the suffixes");
            v
        })
        .collect();
    let fill = |n: usize, seed: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.618 + seed).sin()) * 0.5)
            .collect()
    };
    let k_cache = fill(blocks * shape.block_size * kv_width, 1.0); // [slots, kv_heads * head_dim]
    let v_cache = fill(blocks * shape.block_size * kv_width, 2.0);
    let q = fill(c.threads * q_width, 3.0); // [threads, heads * head_dim]
    let threads: Vec<PlanThread> = views
        .iter()
        .enumerate()
        .map(|(i, v)| PlanThread {
            chunks: v.chunks(shape.block_size),
            rows: vec![PlanRow {
                row: i as u32,
                limit: v.len() as u32,
            }],
        })
        .collect();
    let forked = AttentionPlan::build(&threads, AttentionMode::Forked, 512);
    let naive = AttentionPlan::build(&threads, AttentionMode::Naive, 512);
    let of = attention(&forked, &q, &k_cache, &v_cache, shape).output;
    let on = attention(&naive, &q, &k_cache, &v_cache, shape).output;
    let diff = of
        .iter()
        .zip(&on)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "forked and naive plans disagree by {diff}");
    let time = |plan: &AttentionPlan| {
        let iters = 3;
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(attention(plan, &q, &k_cache, &v_cache, shape));
        }
        start.elapsed().as_secs_f64() * 1e3 / iters as f64
    };
    let (tf, tn) = (time(&forked), time(&naive));
    let (n, p, s) = (c.threads as f64, c.prefix as f64, c.suffix as f64);
    let ideal = n * (p + s) / (p + n * s);
    println!(
        "{:>3} {:>6} {:>5} | {:>12} {:>12} {:>7.2} | {:>10.2} {:>10.2} {:>6.2}x {:>6.2}x",
        c.threads,
        c.prefix,
        c.suffix,
        forked.kv_tokens_read,
        naive.kv_tokens_read,
        naive.kv_tokens_read as f64 / forked.kv_tokens_read as f64,
        tf,
        tn,
        tn / tf,
        ideal
    );
    for v in &mut views {
        v.release(&mut pool);
    }
    root.release(&mut pool);
}
