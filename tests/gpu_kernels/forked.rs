//! Kernel v2 (`forked_attention`) against the CPU backend's attention on the same plan and
//! bf16 inputs, and against the lowering's CPU interpreter (`plan::lower::interpret`, the
//! kernel's spec): random thread trees (width 1 to 64, depth up to 3, forks and joins
//! mid-block), prefixes from 1 to 40k tokens, GQA 1 / 4 / 8, head dims 64 and 128, items
//! shorter than a tile, mixed prefill and decode rows, every dispatch and split choice.
//! Same tolerance as the other attention tests (row-scaled, `ATOL` / `RTOL`).

use super::*;
use spindle::backend::cuda::kernels::ForkedPlan;
use spindle::plan::lower::{interpret, lower, Dispatch, InterpShape, LowerConfig, LoweredPlan};

/// Threads of a random tree: a root prefix of `prefix` tokens, then forks (width 1 to 64,
/// depth up to 3, each child's tokens starting mid-block half of the time) and now and then
/// a join that continues over the children's tokens (KV reuse).
fn random_tree(rng: &mut Rng, prefix: usize, bs: usize) -> (Vec<PlanThread>, usize) {
    let mut next_block = 0usize;
    let mut segment = |rng: &mut Rng, len: usize| -> Vec<Chunk> {
        let mut out = Vec::new();
        let mut start = if rng.range(2) == 0 { rng.range(bs) } else { 0 };
        let mut left = len;
        while left > 0 {
            let n = left.min(bs - start);
            out.push(Chunk {
                block: next_block as u32,
                start: start as u32,
                len: n as u32,
            });
            next_block += 1;
            left -= n;
            start = 0;
        }
        out
    };
    let mut views: Vec<Vec<Chunk>> = Vec::new();
    // (view so far, depth)
    let mut stack = vec![(segment(rng, prefix), 0usize)];
    let mut budget = 64usize;
    while let Some((view, depth)) = stack.pop() {
        let width = [1usize, 2, 3, 8, 64][rng.range(5)].min(budget);
        if depth == 3 || width <= 1 {
            budget = budget.saturating_sub(1);
            views.push(view);
            continue;
        }
        let mut segs = Vec::new();
        for _ in 0..width {
            if budget == 0 {
                break;
            }
            let len = [
                0usize,
                1 + rng.range(8),
                1 + rng.range(70),
                80 + rng.range(300),
            ][rng.range(4)];
            let seg = segment(rng, len);
            let mut child = view.clone();
            child.extend_from_slice(&seg);
            segs.push(seg);
            if rng.range(3) == 0 {
                stack.push((child, depth + 1));
            } else {
                budget -= 1;
                views.push(child);
            }
        }
        if budget > 0 && rng.range(3) == 0 {
            let mut joined = view;
            for s in &segs {
                joined.extend_from_slice(s);
            }
            let len = rng.range(40);
            joined.extend(segment(rng, len));
            budget -= 1;
            views.push(joined);
        }
    }
    let mut rows = 0u32;
    let threads = views
        .into_iter()
        .map(|chunks| {
            let len: u32 = chunks.iter().map(|c| c.len).sum();
            let limits: Vec<u32> = match rng.range(10) {
                0..=5 => vec![len],
                6..=8 => {
                    let n = (1 + rng.range(6) as u32).min(len.max(1));
                    (0..n).map(|i| len + 1 + i - n).collect()
                }
                _ => vec![0],
            };
            let t = PlanThread {
                chunks,
                rows: limits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| PlanRow {
                        row: rows + i as u32,
                        limit: l,
                    })
                    .collect(),
            };
            rows += limits.len() as u32;
            t
        })
        .collect();
    (threads, next_block)
}

struct ForkedRun {
    got: Vec<f32>,
    want: Vec<f32>,
    spec: Vec<f32>,
}

/// Lowers `plan`, runs v2 on the GPU, and computes the CPU reference and the interpreter.
fn run_forked(
    g: &Gpu,
    case: &AttnCase,
    plan: &AttentionPlan,
    cfg: &LowerConfig,
    q: &[bf16],
) -> ForkedRun {
    let st = g.stream();
    let (hq, d) = (case.hq, case.shape.head_dim);
    let lp: LoweredPlan = lower(plan, cfg).expect("lowering");
    let k_d = up(st, &case.k);
    let v_d = up(st, &case.v);
    let q_d = up(st, q);
    let n = |v: &[i32]| if v.is_empty() { vec![0] } else { v.to_vec() };
    let bufs: Vec<CudaSlice<i32>> = [
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
    .map(|v| up(st, &n(v)))
    .collect();
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
    let views: Vec<_> = bufs.iter().zip(lens).map(|(b, l)| b.slice(0..l)).collect();
    let fp = ForkedPlan {
        units: &views[0],
        unit_rows: &views[1],
        partial_direct: &views[2],
        chunk_block: &views[3],
        chunk_start: &views[4],
        chunk_len: &views[5],
        row_limit: &views[6],
        row_part_ptr: &views[7],
        row_parts: &views[8],
        merge_rows: &views[9],
    };
    let rows = plan.num_rows;
    // Poisoned output: every element must be written (directly or by the merge).
    let mut out_d = up(st, &vec![bf16::from_f32(f32::NAN); (rows * hq * d).max(1)]);
    {
        let mut out_v = out_d.slice_mut(0..rows * hq * d);
        let cache = KvCache {
            k: &k_d,
            v: &v_d,
            shape: case.shape,
        };
        let mut ws = DecodeWorkspace::new();
        kernels::forked_attention(
            st,
            &q_d.slice(0..rows * hq * d),
            &cache,
            &fp,
            &mut out_v,
            hq,
            1.0 / (d as f32).sqrt(),
            &mut ws,
        )
        .expect("forked_attention");
    }
    let got = f32s(&down(st, &out_d)[..rows * hq * d]);
    let shape = AttnShape {
        num_heads: hq,
        num_kv_heads: case.shape.num_kv_heads,
        head_dim: d,
        block_size: case.shape.block_size,
    };
    let (qf, kf, vf) = (f32s(q), f32s(&case.k), f32s(&case.v));
    let want = cpu_attention::attention(plan, &qf, &kf, &vf, shape).output;
    let spec = interpret(
        &lp,
        &qf,
        &kf,
        &vf,
        InterpShape {
            num_heads: hq,
            num_kv_heads: case.shape.num_kv_heads,
            head_dim: d,
            block_size: case.shape.block_size,
            tile_tokens: cfg.tile_tokens,
        },
    );
    ForkedRun { got, want, spec }
}

#[test]
fn forked_v2_matches_cpu_on_random_trees() {
    const T: &str = "forked_v2_matches_cpu_on_random_trees";
    let Some(g) = gpu(T) else { return };
    let mut rng = Rng::new(0xf0_4ced);
    // The sanitizer runs (scripts/gpu-stage-run.sh) ask for fewer cases.
    let cases: usize = std::env::var("SPINDLE_FORKED_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    for case_no in 0..cases {
        let gqa = [1usize, 4, 8][case_no % 3];
        let d = [64usize, 128][(case_no / 3) % 2];
        let hkv = 1 + rng.range(2);
        let bs = [16usize, 3, 1][rng.range(3)];
        let prefix = [1usize, 17, 200, 1500][rng.range(4)];
        let (threads, num_blocks) = random_tree(&mut rng, prefix, bs);
        let mode = if rng.range(4) == 0 {
            AttentionMode::Naive
        } else {
            AttentionMode::Forked
        };
        let plan = AttentionPlan::build(&threads, mode, [0usize, 100][rng.range(2)]);
        let case = AttnCase::new(&mut rng, num_blocks.max(1), bs, hkv, hkv * gqa, d);
        let q = rng.bf16s(plan.num_rows * hkv * gqa * d, 1.0);
        let mut cfg = LowerConfig::new(hkv * gqa, hkv, num_blocks.max(1), bs);
        cfg.split_tokens = [None, None, Some(64), Some(256)][rng.range(4)];
        cfg.dispatch = [Dispatch::Auto, Dispatch::Forked, Dispatch::PerThread][rng.range(3)];
        let r = run_forked(&g, &case, &plan, &cfg, &q);
        let what = format!(
            "{T} case {case_no}: gqa {gqa}, {hkv} kv heads, d {d}, bs {bs}, prefix {prefix}, \
             {} threads, {} rows, {mode:?}, split {:?}, {:?}",
            threads.len(),
            plan.num_rows,
            cfg.split_tokens,
            cfg.dispatch
        );
        assert_close(&format!("{what} vs cpu"), &r.got, &r.want, d, ATOL, RTOL);
        assert_close(
            &format!("{what} vs interpreter"),
            &r.got,
            &r.spec,
            d,
            ATOL,
            RTOL,
        );
    }
}

/// One step of 16 threads over a shared prefix of 1 to 40k tokens: decode rows, one
/// thread prefilling 7 rows, at Qwen3-1.7B's shape (16 q-heads, 8 kv-heads, d 128) and
/// GQA 8 at d 64.
#[test]
fn forked_v2_long_shared_prefixes() {
    const T: &str = "forked_v2_long_shared_prefixes";
    let Some(g) = gpu(T) else { return };
    let mut rng = Rng::new(40_000);
    for (prefix, hkv, gqa, d) in [
        (1usize, 8usize, 2usize, 128usize),
        (1000, 8, 2, 128),
        (4099, 1, 8, 64),
        (40_000, 8, 2, 128),
    ] {
        let bs = 16;
        let pre: Vec<Chunk> = (0..prefix.div_ceil(bs))
            .map(|b| Chunk {
                block: b as u32,
                start: 0,
                len: (prefix - b * bs).min(bs) as u32,
            })
            .collect();
        let mut next = pre.len() as u32;
        let mut threads = Vec::new();
        let mut rows = 0u32;
        for t in 0..16 {
            let own = 1 + rng.range(40);
            let mut chunks = pre.clone();
            // The thread's tokens continue mid-block in a block of its own.
            let off = (prefix % bs) as u32;
            let mut left = own as u32;
            let mut start = off;
            while left > 0 {
                let n = left.min(bs as u32 - start);
                chunks.push(Chunk {
                    block: next,
                    start,
                    len: n,
                });
                next += 1;
                left -= n;
                start = 0;
            }
            let len = (prefix + own) as u32;
            let n = if t == 5 { 7.min(own as u32) } else { 1 };
            threads.push(PlanThread {
                chunks,
                rows: (0..n)
                    .map(|i| PlanRow {
                        row: rows + i,
                        limit: len + 1 + i - n,
                    })
                    .collect(),
            });
            rows += n;
        }
        let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
        let case = AttnCase::new(&mut rng, next as usize, bs, hkv, hkv * gqa, d);
        let q = rng.bf16s(plan.num_rows * hkv * gqa * d, 1.0);
        let cfg = LowerConfig::new(hkv * gqa, hkv, next as usize, bs);
        let r = run_forked(&g, &case, &plan, &cfg, &q);
        let what = format!("{T}: prefix {prefix}, {hkv} kv heads, gqa {gqa}, d {d}");
        assert_close(&format!("{what} vs cpu"), &r.got, &r.want, d, ATOL, RTOL);
        assert_close(
            &format!("{what} vs interpreter"),
            &r.got,
            &r.spec,
            d,
            ATOL,
            RTOL,
        );
    }
}

#[test]
fn forked_v2_rejects_bad_shapes() {
    const T: &str = "forked_v2_rejects_bad_shapes";
    let Some(g) = gpu(T) else { return };
    let st = g.stream();
    let mut rng = Rng::new(3);
    let case = AttnCase::new(&mut rng, 4, 16, 1, 2, 64);
    let threads = vec![PlanThread {
        chunks: vec![Chunk {
            block: 0,
            start: 0,
            len: 10,
        }],
        rows: vec![PlanRow { row: 0, limit: 10 }],
    }];
    let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    let lp = lower(&plan, &LowerConfig::new(2, 1, 4, 16)).expect("lowering");
    let k_d = up(st, &case.k);
    let v_d = up(st, &case.v);
    let q_d = up(st, &rng.bf16s(2 * 64, 1.0));
    let mut out_d = up(st, &vec![bf16::ZERO; 2 * 64]);
    let i = |v: &[i32]| up(st, if v.is_empty() { &[0][..] } else { v });
    let (un, ur, pd) = (i(&lp.units), i(&lp.unit_rows), i(&lp.partial_direct));
    let (cb, cs, cl) = (i(&lp.chunk_block), i(&lp.chunk_start), i(&lp.chunk_len));
    let (rl, rp, mr) = (i(&lp.row_limit), i(&lp.row_part_ptr), i(&lp.merge_rows));
    let rps = i(&lp.row_parts);
    let cache = KvCache {
        k: &k_d,
        v: &v_d,
        shape: case.shape,
    };
    let units_short = un.slice(0..lp.units.len() - 1);
    let mr0 = mr.slice(0..0);
    let rps_v = rps.slice(0..lp.row_parts.len());
    let mut ws = DecodeWorkspace::new();
    let mut launch = |units: &dyn cudarc::driver::DevicePtr<i32>, heads: usize| {
        let fp = ForkedPlan {
            units,
            unit_rows: &ur,
            partial_direct: &pd,
            chunk_block: &cb,
            chunk_start: &cs,
            chunk_len: &cl,
            row_limit: &rl,
            row_part_ptr: &rp,
            row_parts: &rps_v,
            merge_rows: &mr0,
        };
        kernels::forked_attention(st, &q_d, &cache, &fp, &mut out_d, heads, 0.125, &mut ws)
    };
    assert!(launch(&un, 2).is_ok());
    assert!(launch(&units_short, 2).is_err(), "units not whole");
    assert!(
        launch(&un, 3).is_err(),
        "q heads not a multiple of kv heads"
    );
    assert!(launch(&un, 130).is_err(), "gqa over the CTA's 64 rows");
    g.synchronize().expect("sync");
}
