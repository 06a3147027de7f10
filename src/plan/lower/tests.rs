//! Tests of the lowering: the structure of units and partials, the dispatch and split
//! rules, typed errors on malformed plans, and the interpreter of the lowered arrays (the
//! kernel's spec) against the CPU backend's attention on random thread trees.

use super::*;
use crate::backend::cpu_attention::{attention, AttnShape};
use crate::kv::Chunk;
use crate::plan::{AttentionMode, PlanRow, PlanThread};
use model_loader::rng::Rng;

fn chunk(block: u32, start: u32, len: u32) -> Chunk {
    Chunk { block, start, len }
}

fn cfg(num_blocks: usize, block_size: usize) -> LowerConfig {
    LowerConfig::new(8, 2, num_blocks, block_size)
}

/// Every view index of every unit, walked from the unit's precomputed chunk and offset, must
/// land on the slot a walk of the whole item from its start finds.
fn check_unit_addresses(plan: &AttentionPlan, lp: &LoweredPlan, block_size: usize) {
    for u in 0..lp.num_units() {
        let f = lp.unit(u);
        let item = f[U_ITEM] as usize;
        // Brute force: the item's slots in view order.
        let mut slots = Vec::new();
        for c in
            &plan.chunks[plan.item_chunk_ptr[item] as usize..plan.item_chunk_ptr[item + 1] as usize]
        {
            for s in c.start..c.start + c.len {
                slots.push(c.block as usize * block_size + s as usize);
            }
        }
        let vs = plan.item_view_start[item] as usize;
        let (mut ci, mut cv) = (
            f[U_CHUNK_BEGIN] as usize,
            f[U_VIEW_BEGIN] as usize - f[U_CHUNK_OFFSET] as usize,
        );
        assert!(f[U_CHUNK_OFFSET] >= 0 && (f[U_CHUNK_OFFSET]) < lp.chunk_len[ci]);
        for v in f[U_VIEW_BEGIN] as usize..f[U_VIEW_END] as usize {
            while cv + lp.chunk_len[ci] as usize <= v {
                cv += lp.chunk_len[ci] as usize;
                ci += 1;
            }
            assert!(
                ci < f[U_CHUNK_END] as usize,
                "unit {u} walks past chunk_end"
            );
            let slot =
                lp.chunk_block[ci] as usize * block_size + lp.chunk_start[ci] as usize + (v - cv);
            assert_eq!(slot, slots[v - vs], "unit {u} view index {v}");
        }
        assert_eq!(
            ci + 1,
            f[U_CHUNK_END] as usize,
            "unit {u}: chunk_end is tight"
        );
    }
}

#[test]
fn splits_start_at_their_chunk_without_walking_the_earlier_ones() {
    // One row over 10 chunks of uneven lengths, some starting mid-block.
    let chunks = vec![
        chunk(0, 3, 13),
        chunk(1, 0, 16),
        chunk(2, 5, 7),
        chunk(3, 0, 16),
        chunk(4, 0, 1),
        chunk(5, 2, 14),
        chunk(6, 0, 16),
        chunk(7, 9, 7),
        chunk(8, 0, 16),
        chunk(9, 0, 11),
    ];
    let total: u32 = chunks.iter().map(|c| c.len).sum();
    let threads = vec![PlanThread {
        chunks,
        rows: vec![PlanRow {
            row: 0,
            limit: total,
        }],
    }];
    let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    for split in [16, 32, 48] {
        let mut c = cfg(10, 16);
        c.tile_tokens = 16;
        c.split_tokens = Some(split);
        let lp = lower(&plan, &c).unwrap();
        assert_eq!(lp.num_units(), (total as usize).div_ceil(split));
        check_unit_addresses(&plan, &lp, 16);
        // The second unit starts inside the item, not at chunk 0.
        assert!(lp.unit(1)[U_CHUNK_BEGIN] > 0, "split {split}");
        // The units tile the view: each starts where the previous ended.
        for u in 1..lp.num_units() {
            assert_eq!(lp.unit(u)[U_VIEW_BEGIN], lp.unit(u - 1)[U_VIEW_END]);
        }
        assert_eq!(lp.tokens_staged, total as u64);
        // One row, several splits: merged, in view order.
        assert_eq!(lp.merge_rows, vec![0]);
        let ps = &lp.row_parts[..];
        assert!(ps.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ps.len(), lp.num_units());
    }
}

#[test]
fn dispatch_rule_and_overrides() {
    // Eight threads share 96 tokens, each then has 5 of its own.
    let threads: Vec<PlanThread> = (0..8)
        .map(|i| PlanThread {
            chunks: vec![
                chunk(0, 0, 32),
                chunk(1, 0, 32),
                chunk(2, 0, 32),
                chunk(3 + i, 0, 5),
            ],
            rows: vec![PlanRow { row: i, limit: 101 }],
        })
        .collect();
    let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    assert_eq!(plan.num_items(), 9);
    let mut c = LowerConfig::new(8, 8, 16, 32); // gqa 1: 64 rows per unit
    c.split_tokens = Some(1024);
    let auto = lower(&plan, &c).unwrap();
    // The shared item is forked (one unit for 8 rows); each 1-row item is per-thread.
    assert_eq!((auto.forked_items, auto.per_thread_items), (1, 8));
    assert_eq!(auto.num_units(), 9);
    assert_eq!(auto.tokens_staged, 96 + 8 * 5);
    c.dispatch = Dispatch::PerThread;
    let pt = lower(&plan, &c).unwrap();
    assert_eq!((pt.forked_items, pt.per_thread_items), (0, 9));
    assert_eq!(pt.num_units(), 16);
    assert_eq!(pt.tokens_staged, 8 * 96 + 8 * 5);
    c.dispatch = Dispatch::Forked;
    let fk = lower(&plan, &c).unwrap();
    assert_eq!((fk.forked_items, fk.per_thread_items), (9, 0));
    // gqa 8 fits 8 rows per CTA: 8 rows in one unit; gqa 16 (4 rows per CTA): two units.
    let mut c16 = LowerConfig::new(16, 1, 16, 32);
    c16.split_tokens = Some(1024);
    assert_eq!(c16.rows_per_unit(), 4);
    let lp = lower(&plan, &c16).unwrap();
    assert_eq!(lp.forked_items, 1);
    assert_eq!(lp.num_units(), 2 + 8);
    // Every row has two partials (prefix, own): all rows merge.
    assert_eq!(lp.merge_rows.len(), 8);
}

#[test]
fn rows_that_see_one_partial_are_written_directly() {
    // A prefill of 4 rows over 40 tokens (limits 37..40) and a row that sees nothing.
    let threads = vec![PlanThread {
        chunks: vec![chunk(0, 0, 16), chunk(1, 0, 16), chunk(2, 0, 8)],
        rows: vec![
            PlanRow { row: 0, limit: 37 },
            PlanRow { row: 1, limit: 38 },
            PlanRow { row: 2, limit: 39 },
            PlanRow { row: 3, limit: 40 },
            PlanRow { row: 4, limit: 0 },
        ],
    }];
    let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    let mut c = cfg(4, 16);
    c.split_tokens = Some(4096);
    let lp = lower(&plan, &c).unwrap();
    assert_eq!(lp.num_units(), 1);
    assert_eq!(lp.partial_direct, vec![1, 1, 1, 1]);
    assert_eq!(
        lp.merge_rows,
        vec![4],
        "the row with no partial is zeroed by the merge"
    );
    // Split at 32 tokens: the rows see both splits and merge.
    c.split_tokens = Some(32);
    c.tile_tokens = 16;
    let lp = lower(&plan, &c).unwrap();
    assert_eq!(lp.num_units(), 2);
    assert_eq!(lp.merge_rows, vec![0, 1, 2, 3, 4]);
    assert_eq!(lp.row_parts, vec![0, 4, 1, 5, 2, 6, 3, 7]);
}

#[test]
fn rows_are_left_out_of_splits_they_cannot_see() {
    let threads = vec![PlanThread {
        chunks: vec![chunk(0, 0, 16), chunk(1, 0, 16), chunk(2, 0, 16)],
        rows: vec![PlanRow { row: 0, limit: 10 }, PlanRow { row: 1, limit: 48 }],
    }];
    let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    let mut c = cfg(4, 16);
    c.tile_tokens = 16;
    c.split_tokens = Some(16);
    c.dispatch = Dispatch::Forked;
    let lp = lower(&plan, &c).unwrap();
    assert_eq!(lp.num_units(), 3);
    // Row 0 is only in the first split.
    assert_eq!(lp.unit_rows, vec![0, 1, 1, 1]);
    assert_eq!(lp.partial_direct, vec![1, 0, 0, 0]);
    assert_eq!(lp.merge_rows, vec![1]);
}

#[test]
fn the_wave_rule_splits_long_items_until_the_gpu_is_full() {
    // One row over 32k tokens, 8 kv heads, 132 SMs x 2: unsplit is 8 CTAs.
    let chunks: Vec<Chunk> = (0..2048).map(|b| chunk(b, 0, 16)).collect();
    let threads = vec![PlanThread {
        chunks,
        rows: vec![PlanRow {
            row: 0,
            limit: 32768,
        }],
    }];
    let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    let c = LowerConfig::new(16, 8, 2048, 16);
    let lp = lower(&plan, &c).unwrap();
    let ctas = lp.num_units() * c.num_kv_heads;
    assert!(
        (132..=2 * 264).contains(&ctas),
        "{ctas} CTAs (split {})",
        lp.split_tokens
    );
    assert_eq!(lp.split_tokens % c.tile_tokens, 0);
    check_unit_addresses(&plan, &lp, 16);
    // Many short items already fill the machine: no split.
    let threads: Vec<PlanThread> = (0..512)
        .map(|i| PlanThread {
            chunks: vec![chunk(i, 0, 16)],
            rows: vec![PlanRow { row: i, limit: 16 }],
        })
        .collect();
    let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    let lp = lower(&plan, &LowerConfig::new(16, 8, 512, 16)).unwrap();
    assert_eq!(lp.num_units(), 512);
}

#[test]
fn malformed_plans_are_typed_errors() {
    let threads = vec![
        PlanThread {
            chunks: vec![chunk(0, 0, 8), chunk(1, 0, 4)],
            rows: vec![PlanRow { row: 0, limit: 12 }],
        },
        PlanThread {
            chunks: vec![chunk(0, 0, 8), chunk(2, 0, 4)],
            rows: vec![PlanRow { row: 1, limit: 12 }],
        },
    ];
    let good = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    let c = cfg(4, 8);
    assert!(lower(&good, &c).is_ok());

    let mut p = good.clone();
    p.chunks[0].block = 4;
    assert!(matches!(
        lower(&p, &c),
        Err(LowerError::ChunkOutsidePool { index: 0, .. })
    ));
    let mut p = good.clone();
    p.chunks[1].start = 5; // 5 + 4 > 8
    assert!(matches!(
        lower(&p, &c),
        Err(LowerError::ChunkOutsidePool { .. })
    ));
    let mut p = good.clone();
    p.row_limit[1] = 13;
    assert_eq!(
        lower(&p, &c),
        Err(LowerError::LimitPastView {
            row: 1,
            limit: 13,
            view: 12
        })
    );
    let mut p = good.clone();
    p.row_limit.pop();
    assert!(matches!(
        lower(&p, &c),
        Err(LowerError::Length {
            what: "row_limit",
            ..
        })
    ));
    let mut p = good.clone();
    p.item_row_ptr[1] = 5;
    assert!(matches!(lower(&p, &c), Err(LowerError::BadPointers { .. })));
    let mut p = good.clone();
    p.item_rows[0] = 7;
    assert!(matches!(
        lower(&p, &c),
        Err(LowerError::OutOfRange {
            what: "item_rows",
            ..
        })
    ));
    let mut p = good.clone();
    p.row_partials.swap(0, 1); // row 0 lists its own-block partial before the prefix
    assert!(matches!(
        lower(&p, &c),
        Err(LowerError::ViewOrder { .. } | LowerError::PartialRow { .. })
    ));
    let mut p = good.clone();
    p.item_view_start[1] = 3;
    assert!(matches!(lower(&p, &c), Err(LowerError::ViewOrder { .. })));
    let mut p = good.clone();
    let last = p.row_partials.len() - 1;
    p.row_partials[last] = p.row_partials[0];
    assert!(lower(&p, &c).is_err(), "a partial merged twice");
    let mut bad = c;
    bad.gqa = 128;
    assert!(matches!(lower(&good, &bad), Err(LowerError::Config(_))));
}

// ---- random trees: the interpreter against the CPU backend ----

struct TreeGen {
    rng: Rng,
    block_size: u32,
    next_block: u32,
}

impl TreeGen {
    fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    /// `len` new tokens in fresh blocks; the first chunk starts mid-block half of the time
    /// (a fork or join that did not end on a block boundary).
    fn segment(&mut self, len: u32) -> Vec<Chunk> {
        let mut out = Vec::new();
        let mut left = len;
        let mut start = if self.below(2) == 0 {
            self.below(self.block_size as u64) as u32
        } else {
            0
        };
        while left > 0 {
            let n = left.min(self.block_size - start);
            out.push(chunk(self.next_block, start, n));
            self.next_block += 1;
            left -= n;
            start = 0;
        }
        out
    }

    fn seg_len(&mut self) -> u32 {
        match self.below(6) {
            0 => 0,
            1 => 1 + self.below(8) as u32,
            2..=4 => 1 + self.below(70) as u32,
            _ => 80 + self.below(300) as u32,
        }
    }

    /// Leaves below a node whose view so far is `prefix`: a fork into children (each its
    /// own segment, perhaps forking again), and now and then a KV-reuse join of the
    /// children's segments.
    fn subtree(
        &mut self,
        prefix: Vec<Chunk>,
        depth: usize,
        budget: &mut usize,
        out: &mut Vec<Vec<Chunk>>,
    ) {
        let width = match self.below(5) {
            0 => 1,
            1 => 2,
            2 => 3,
            3 => 8,
            _ => 64,
        }
        .min(*budget as u64) as usize;
        if depth == 3 || width <= 1 {
            *budget = budget.saturating_sub(1);
            out.push(prefix);
            return;
        }
        let mut child_segs = Vec::new();
        for _ in 0..width {
            if *budget == 0 {
                break;
            }
            let n = self.seg_len();
            let seg = self.segment(n);
            let mut view = prefix.clone();
            view.extend_from_slice(&seg);
            child_segs.push(seg);
            if self.below(3) == 0 {
                self.subtree(view, depth + 1, budget, out);
            } else {
                *budget -= 1;
                out.push(view);
            }
        }
        if *budget > 0 && self.below(3) == 0 {
            // A join by KV reuse: the parent continues over its children's tokens.
            let mut view = prefix;
            for s in &child_segs {
                view.extend_from_slice(s);
            }
            let n = self.seg_len();
            view.extend(self.segment(n));
            *budget -= 1;
            out.push(view);
        }
    }
}

struct Case {
    threads: Vec<PlanThread>,
    num_blocks: usize,
}

fn random_case(g: &mut TreeGen) -> Case {
    let mut views = Vec::new();
    let mut budget = 64usize;
    let p = match g.below(3) {
        0 => 1 + g.below(20) as u32,
        1 => 1 + g.below(200) as u32,
        _ => 200 + g.below(1200) as u32,
    };
    let root = g.segment(p);
    g.subtree(root, 0, &mut budget, &mut views);
    // Rows: mostly decode rows, some prefills with causal limits, the odd blind row.
    let mut rows_of: Vec<Vec<u32>> = Vec::new();
    let mut num_rows = 0u32;
    for v in &views {
        let len: u32 = v.iter().map(|c| c.len).sum();
        let limits = match g.below(10) {
            0..=5 => vec![len],
            6..=8 => {
                let n = (1 + g.below(6) as u32).min(len.max(1));
                (0..n).map(|i| len + 1 + i - n).collect()
            }
            _ => vec![0],
        };
        num_rows += limits.len() as u32;
        rows_of.push(limits);
    }
    // Row ids shuffled so a thread's rows are not always consecutive.
    let mut ids: Vec<u32> = (0..num_rows).collect();
    for i in (1..ids.len()).rev() {
        let j = g.below(i as u64 + 1) as usize;
        ids.swap(i, j);
    }
    let mut next = 0usize;
    let threads = views
        .into_iter()
        .zip(rows_of)
        .map(|(chunks, limits)| PlanThread {
            chunks,
            rows: limits
                .into_iter()
                .map(|l| {
                    next += 1;
                    PlanRow {
                        row: ids[next - 1],
                        limit: l,
                    }
                })
                .collect(),
        })
        .collect();
    Case {
        threads,
        num_blocks: g.next_block as usize,
    }
}

fn random_bf16(rng: &mut Rng, n: usize, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|_| round_bf16((rng.next_f32() * 2.0 - 1.0) * amp))
        .collect()
}

#[test]
fn interpreter_matches_cpu_attention_on_random_trees() {
    let mut g = TreeGen {
        rng: Rng::new(0x5eed_0010),
        block_size: 16,
        next_block: 0,
    };
    let mut checked_rows = 0usize;
    let mut saw = (false, false, false); // splits, forked items, direct rows
    for case_no in 0..36 {
        g.next_block = 0;
        let case = random_case(&mut g);
        let gqa = [1usize, 4, 8][case_no % 3];
        let num_kv_heads = 1 + g.below(2) as usize;
        let num_heads = gqa * num_kv_heads;
        let head_dim = [64usize, 128][(case_no / 3) % 2];
        let mode = if g.below(4) == 0 {
            AttentionMode::Naive
        } else {
            AttentionMode::Forked
        };
        let plan_split = [0usize, 32, 100][g.below(3) as usize];
        let plan = AttentionPlan::build(&case.threads, mode, plan_split);
        let mut c = LowerConfig::new(num_heads, num_kv_heads, case.num_blocks, 16);
        c.tile_tokens = [16usize, 64][g.below(2) as usize];
        c.num_sms = 1 + g.below(8) as usize;
        c.split_tokens = [None, None, Some(16), Some(100)][g.below(4) as usize];
        c.dispatch = [
            Dispatch::Auto,
            Dispatch::Auto,
            Dispatch::Forked,
            Dispatch::PerThread,
        ][g.below(4) as usize];
        let lp = lower(&plan, &c).unwrap_or_else(|e| panic!("case {case_no}: {e}"));
        check_unit_addresses(&plan, &lp, 16);
        saw.0 |= lp.num_units() > plan.num_items();
        saw.1 |= lp.forked_items > 0;
        saw.2 |= lp.partial_direct.contains(&1);

        let slots = case.num_blocks * 16;
        let kv_width = num_kv_heads * head_dim;
        let k = random_bf16(&mut g.rng, slots * kv_width, 1.0);
        let v = random_bf16(&mut g.rng, slots * kv_width, 1.0);
        let q = random_bf16(&mut g.rng, plan.num_rows * num_heads * head_dim, 3.0);
        let shape = AttnShape {
            num_heads,
            num_kv_heads,
            head_dim,
            block_size: 16,
        };
        let want = attention(&plan, &q, &k, &v, shape).output;
        let got = interpret(
            &lp,
            &q,
            &k,
            &v,
            InterpShape {
                num_heads,
                num_kv_heads,
                head_dim,
                block_size: 16,
                tile_tokens: c.tile_tokens,
            },
        );
        assert_eq!(got.len(), want.len());
        let mut worst = 0.0f32;
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let err = (a - b).abs();
            let tol = 2e-3 + 1e-2 * b.abs();
            assert!(
                err <= tol,
                "case {case_no} (gqa {gqa}, kv heads {num_kv_heads}, d {head_dim}, {mode:?}, {c:?}): \
                 row {} [{}]: interpreter {a} vs cpu {b}",
                i / (num_heads * head_dim),
                i % (num_heads * head_dim)
            );
            worst = worst.max(err / tol);
        }
        checked_rows += plan.num_rows;

        // The same lowering padded for a CUDA graph (rows to a bucket, every array to
        // capacities beyond its need) gives the real rows exactly the same outputs.
        let rows = plan.num_rows;
        let bucket = crate::backend::graph_layout::bucket_for(rows, usize::MAX).unwrap_or(rows);
        let caps = crate::backend::graph_layout::GraphCaps {
            rows: bucket,
            units: 0,
            partials: 0,
            chunks: 0,
        }
        .grown_for(&lp);
        let caps = crate::backend::graph_layout::GraphCaps {
            units: caps.units + 3,
            partials: caps.partials + 5,
            chunks: caps.chunks + 2,
            ..caps
        };
        let mut padded = LoweredPlan::default();
        crate::backend::graph_layout::pad_lowered_into(&lp, &caps, &mut padded)
            .unwrap_or_else(|e| panic!("case {case_no}: {e}"));
        let mut q_padded = q.clone();
        q_padded.resize(bucket * num_heads * head_dim, 0.0);
        let got_padded = interpret(
            &padded,
            &q_padded,
            &k,
            &v,
            InterpShape {
                num_heads,
                num_kv_heads,
                head_dim,
                block_size: 16,
                tile_tokens: c.tile_tokens,
            },
        );
        assert!(
            got_padded[..got.len()]
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "case {case_no}: padding changed a real row"
        );
    }
    assert!(checked_rows > 200, "{checked_rows} rows checked");
    assert_eq!(saw, (true, true, true), "splits, forked items, direct rows");
}

/// The interpreter is not trivially agreeing: corrupting a unit's chunk offset changes
/// the result beyond tolerance.
#[test]
fn interpreter_notices_a_wrong_chunk_offset() {
    let threads = vec![PlanThread {
        chunks: vec![chunk(0, 0, 16), chunk(1, 0, 16), chunk(2, 0, 16)],
        rows: vec![PlanRow { row: 0, limit: 48 }],
    }];
    let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    let mut c = cfg(3, 16);
    c.gqa = 1;
    c.num_kv_heads = 1;
    c.tile_tokens = 16;
    c.split_tokens = Some(16);
    let mut lp = lower(&plan, &c).unwrap();
    let mut rng = Rng::new(7);
    let k = random_bf16(&mut rng, 48 * 64, 1.0);
    let v = random_bf16(&mut rng, 48 * 64, 1.0);
    let q = random_bf16(&mut rng, 64, 3.0);
    let shape = InterpShape {
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 64,
        block_size: 16,
        tile_tokens: 16,
    };
    let good = interpret(&lp, &q, &k, &v, shape);
    let want = attention(
        &plan,
        &q,
        &k,
        &v,
        AttnShape {
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 64,
            block_size: 16,
        },
    )
    .output;
    let close = |a: &[f32]| {
        a.iter()
            .zip(&want)
            .all(|(x, y)| (x - y).abs() <= 2e-3 + 1e-2 * y.abs())
    };
    assert!(close(&good));
    lp.units[UNIT_WIDTH + U_CHUNK_OFFSET] = 3;
    lp.units[UNIT_WIDTH + U_VIEW_END] -= 3;
    let bad = interpret(&lp, &q, &k, &v, shape);
    assert!(!close(&bad));
}

#[test]
fn lower_into_reuses_its_output_and_matches_lower() {
    let mut g = TreeGen {
        rng: Rng::new(0x5eed_0014),
        block_size: 16,
        next_block: 0,
    };
    // One output reused over cases of varied sizes: whatever a larger earlier case left in
    // the vectors must not survive into a smaller one.
    let mut reused = LoweredPlan::default();
    let mut shrank = false;
    let mut last_units = 0usize;
    for case_no in 0..24 {
        g.next_block = 0;
        let case = random_case(&mut g);
        let plan = AttentionPlan::build(&case.threads, AttentionMode::Forked, 0);
        let mut c = LowerConfig::new(8, 2, case.num_blocks, 16);
        c.num_sms = 1 + g.below(8) as usize;
        let fresh = lower(&plan, &c).unwrap_or_else(|e| panic!("case {case_no}: {e}"));
        lower_into(&plan, &c, &mut reused).unwrap_or_else(|e| panic!("case {case_no}: {e}"));
        assert_eq!(reused, fresh, "case {case_no}");
        shrank |= fresh.units.len() < last_units;
        last_units = fresh.units.len();
    }
    assert!(shrank, "some case must be smaller than the one before it");
    let units_cap = reused.units.capacity();
    let plan = AttentionPlan::build(&[], AttentionMode::Forked, 0);
    lower_into(&plan, &cfg(1, 16), &mut reused).expect("empty plan");
    assert_eq!(reused, lower(&plan, &cfg(1, 16)).expect("empty plan"));
    assert_eq!(reused.units.capacity(), units_cap, "capacity kept");
}
