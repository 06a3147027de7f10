//! Attention on the CPU by executing an [`AttentionPlan`]: each work item's K/V is gathered
//! once and used by every query row it serves (the rows in parallel, each compiled for
//! AVX2 and FMA where the CPU has them); partial results merge by log-sum-exp.

use super::simd::{dot, has_avx2_fma};
use crate::plan::AttentionPlan;
use rayon::prelude::*;
use std::ops::Range;

/// Shapes of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// Partial softmax state of one (partial, head): running max, sum of exponentials and the
/// unnormalised weighted sum of values.
#[derive(Clone)]
struct Partial {
    m: f32,
    s: f32,
    o: Vec<f32>,
}

/// Bytes of K and V (f32) per token tile: half of a typical 512 KiB L2.
const TILE_BYTES: usize = 256 << 10;

/// Tokens per tile for K/V rows `kv_width` floats wide: about [`TILE_BYTES`] of K and V
/// together (8 bytes a float pair), between 16 and 512 tokens.
fn tile_tokens(kv_width: usize) -> usize {
    (TILE_BYTES / (8 * kv_width.max(1))).clamp(16, 512)
}

/// One work item's staged K/V (`[tokens, kv_heads * head_dim]` each) and its shape.
struct Staged<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    kv_width: usize,
    head_dim: usize,
    group: usize,
    scale: f32,
}

impl Staged<'_> {
    /// Every head of one query row (`q_row`, `[heads * head_dim]`) over the staged tokens
    /// `tokens` (already cut to the row's visible ones), folded into its partials (one per
    /// head) by online softmax. `scores` is scratch.
    fn row(
        &self,
        q_row: &[f32],
        tokens: Range<usize>,
        parts: &mut [Partial],
        scores: &mut Vec<f32>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the running CPU reports AVX2 and FMA, the features `row_avx2` is
            // compiled for; it takes only references and a range.
            unsafe { self.row_avx2(q_row, tokens, parts, scores) };
            return;
        }
        self.row_impl(q_row, tokens, parts, scores);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn row_avx2(
        &self,
        q_row: &[f32],
        tokens: Range<usize>,
        parts: &mut [Partial],
        scores: &mut Vec<f32>,
    ) {
        self.row_impl(q_row, tokens, parts, scores);
    }

    #[inline(always)]
    fn row_impl(
        &self,
        q_row: &[f32],
        tokens: Range<usize>,
        parts: &mut [Partial],
        scores: &mut Vec<f32>,
    ) {
        let (d, w, g, n) = (self.head_dim, self.kv_width, self.group, tokens.len());
        // The q-heads of one kv-head together: each key and value row is loaded once for
        // all of them. scores: [group, n], then the softmax weights in place.
        for (kvh, group_parts) in parts.chunks_mut(g).enumerate() {
            scores.clear();
            scores.resize(g * n, 0.0);
            for (jj, j) in tokens.clone().enumerate() {
                let kv = &self.keys[j * w + kvh * d..][..d];
                for hh in 0..g {
                    let qv = &q_row[(kvh * g + hh) * d..][..d];
                    scores[hh * n + jj] = dot(qv, kv) * self.scale;
                }
            }
            for (part, sc) in group_parts.iter_mut().zip(scores.chunks_exact_mut(n)) {
                let tile_max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let m = part.m.max(tile_max);
                if part.s > 0.0 && m > part.m {
                    // A larger maximum: rescale what earlier tiles accumulated.
                    let r = (part.m - m).exp();
                    part.s *= r;
                    for o in part.o.iter_mut() {
                        *o *= r;
                    }
                }
                part.m = m;
                for e in sc.iter_mut() {
                    *e = (*e - m).exp();
                    part.s += *e;
                }
            }
            for (jj, j) in tokens.clone().enumerate() {
                let vv = &self.values[j * w + kvh * d..][..d];
                for (hh, part) in group_parts.iter_mut().enumerate() {
                    let e = scores[hh * n + jj];
                    for (o, v) in part.o.iter_mut().zip(vv) {
                        *o += e * v;
                    }
                }
            }
        }
    }
}

/// What [`attention`] computes.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionOutput {
    /// `[rows, heads * head_dim]` attention outputs.
    pub output: Vec<f32>,
    /// K/V tokens gathered: a measurement for tests, which must equal the plan's
    /// `kv_tokens_read` (the one count the backends and the engine report).
    pub kv_tokens_gathered: u64,
}

/// Computes `[rows, heads * head_dim]` attention outputs of `q` (`[rows, heads * head_dim]`)
/// over `k_cache`/`v_cache` (`[slots, kv_heads * head_dim]`), with the number of K/V tokens
/// gathered.
pub fn attention(
    plan: &AttentionPlan,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    shape: AttnShape,
) -> AttentionOutput {
    let AttnShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = shape;
    let group = num_heads / num_kv_heads;
    let kv_width = num_kv_heads * head_dim;
    let q_width = num_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let empty = Partial {
        m: f32::NEG_INFINITY,
        s: 0.0,
        o: vec![0.0; head_dim],
    };
    // [partials, heads]
    let mut partials = vec![empty; plan.item_rows.len() * num_heads];
    let mut tokens_read = 0u64;
    let mut keys: Vec<f32> = Vec::new(); // [item tokens, kv_heads * head_dim]
    let mut values: Vec<f32> = Vec::new();
    for item in 0..plan.num_items() {
        let view_start = plan.item_view_start[item] as usize;
        let rows = plan.item_row_ptr[item] as usize..plan.item_row_ptr[item + 1] as usize;
        let max_limit = rows
            .clone()
            .map(|p| plan.row_limit[plan.item_rows[p] as usize] as usize)
            .max()
            .unwrap_or(0);
        let want = max_limit.saturating_sub(view_start);
        // Stage the item's visible K/V once (the shared-memory tile of the GPU kernel).
        keys.clear();
        values.clear();
        let chunks = &plan.chunks
            [plan.item_chunk_ptr[item] as usize..plan.item_chunk_ptr[item + 1] as usize];
        'gather: for c in chunks {
            for s in c.start..c.start + c.len {
                if keys.len() / kv_width >= want {
                    break 'gather;
                }
                let slot = c.block as usize * block_size + s as usize;
                keys.extend_from_slice(&k_cache[slot * kv_width..(slot + 1) * kv_width]);
                values.extend_from_slice(&v_cache[slot * kv_width..(slot + 1) * kv_width]);
            }
        }
        let staged = keys.len() / kv_width;
        tokens_read += staged as u64;
        // Token tiles of about TILE_BYTES of K and V, so a tile stays in cache while every
        // row of the item uses it (what makes a shared item read once pay on the CPU);
        // within a tile the rows run in parallel, each owning its partials.
        let tile = tile_tokens(kv_width);
        let staged_kv = Staged {
            keys: &keys,
            values: &values,
            kv_width,
            head_dim,
            group,
            scale,
        };
        for t0 in (0..staged).step_by(tile) {
            let t1 = (t0 + tile).min(staged);
            partials[rows.start * num_heads..rows.end * num_heads]
                .par_chunks_mut(num_heads)
                .zip(rows.clone())
                .for_each_init(Vec::new, |scores: &mut Vec<f32>, (parts, p)| {
                    let row = plan.item_rows[p] as usize;
                    let visible = (plan.row_limit[row] as usize - view_start).min(staged);
                    if visible > t0 {
                        let q_row = &q[row * q_width..(row + 1) * q_width];
                        staged_kv.row(q_row, t0..t1.min(visible), parts, scores);
                    }
                });
        }
    }
    // Merge each row's partials in view order.
    let mut out = vec![0.0f32; plan.num_rows * q_width];
    for row in 0..plan.num_rows {
        let ps = &plan.row_partials
            [plan.row_partial_ptr[row] as usize..plan.row_partial_ptr[row + 1] as usize];
        for h in 0..num_heads {
            let mut m = f32::NEG_INFINITY;
            let mut s = 0.0f32;
            let mut o = vec![0.0f32; head_dim];
            for &p in ps {
                let part = &partials[p as usize * num_heads + h];
                if part.s == 0.0 {
                    continue;
                }
                let new_m = m.max(part.m);
                let a = (m - new_m).exp();
                let b = (part.m - new_m).exp();
                s = s * a + part.s * b;
                for (acc, x) in o.iter_mut().zip(&part.o) {
                    *acc = *acc * a + x * b;
                }
                m = new_m;
            }
            let dst = &mut out[row * q_width + h * head_dim..][..head_dim];
            if s > 0.0 {
                for (d, x) in dst.iter_mut().zip(&o) {
                    *d = x / s;
                }
            }
        }
    }
    AttentionOutput {
        output: out,
        kv_tokens_gathered: tokens_read,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Chunk;
    use crate::plan::{AttentionMode, PlanRow, PlanThread};

    /// The tile length only sets speed (the outputs agree up to rounding whatever it is),
    /// so it is pinned here: about 256 KiB of K and V, 16 to 512 tokens.
    #[test]
    fn a_tile_holds_about_256_kib_of_k_and_v() {
        // 256 KiB / (8 bytes x 256 floats) = 128 tokens.
        assert_eq!(tile_tokens(256), 128);
        assert_eq!(tile_tokens(512), 64);
        // Capped at 512 tokens for narrow rows, at least 16 for wide ones.
        assert_eq!(tile_tokens(32), 512);
        assert_eq!(tile_tokens(1), 512);
        assert_eq!(tile_tokens(8192), 16);
    }

    /// A row that may see no token (limit 0) is in no item and has no partials: its
    /// output is zeros, not 0/0.
    #[test]
    fn a_row_that_sees_nothing_is_zero() {
        let shape = AttnShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
        };
        let k: Vec<f32> = (0..16).map(|i| (i as f32 * 0.3).sin()).collect();
        let v: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).cos()).collect();
        let q: Vec<f32> = (0..16).map(|i| (i as f32 * 1.1).sin()).collect();
        let threads = vec![PlanThread {
            chunks: vec![Chunk {
                block: 0,
                start: 0,
                len: 3,
            }],
            rows: vec![PlanRow { row: 0, limit: 3 }, PlanRow { row: 1, limit: 0 }],
        }];
        for mode in [AttentionMode::Forked, AttentionMode::Naive] {
            let plan = AttentionPlan::build(&threads, mode, 0);
            let AttentionOutput {
                output: out,
                kv_tokens_gathered: read,
            } = attention(&plan, &q, &k, &v, shape);
            assert_eq!(read, 3, "{mode:?}");
            assert_eq!(out[8..], [0.0; 8], "{mode:?}: the row that sees nothing");
            assert!(
                out[..8].iter().all(|x| x.is_finite()) && out[..8].iter().any(|&x| x != 0.0),
                "{mode:?}: the row that sees 3 tokens: {:?}",
                &out[..8]
            );
        }
    }

    /// An item's K/V is gathered only up to the last token one of its rows may see: the
    /// tokens past every limit are not read, and the count returned is the plan's.
    #[test]
    fn tokens_past_every_limit_are_not_read() {
        let shape = AttnShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
        };
        let k: Vec<f32> = (0..32).map(|i| (i as f32 * 0.3).sin()).collect();
        let v: Vec<f32> = (0..32).map(|i| (i as f32 * 0.7).cos()).collect();
        let q: Vec<f32> = (0..16).map(|i| (i as f32 * 1.1).sin()).collect();
        // Seven tokens in two blocks; the rows see 2 and 5 of them.
        let threads = vec![PlanThread {
            chunks: vec![
                Chunk {
                    block: 0,
                    start: 0,
                    len: 4,
                },
                Chunk {
                    block: 1,
                    start: 0,
                    len: 3,
                },
            ],
            rows: vec![PlanRow { row: 0, limit: 2 }, PlanRow { row: 1, limit: 5 }],
        }];
        for mode in [AttentionMode::Forked, AttentionMode::Naive] {
            let plan = AttentionPlan::build(&threads, mode, 0);
            assert_eq!(plan.kv_tokens_read, 5, "{mode:?}");
            let read = attention(&plan, &q, &k, &v, shape).kv_tokens_gathered;
            assert_eq!(read, 5, "{mode:?}");
        }
    }

    /// Items longer than a tile: the online softmax across tiles (and limits that end
    /// inside, at and just past a tile) against a direct f64 softmax.
    #[test]
    fn tiles_fold_like_one_softmax() {
        // kv_width 2 x 1024 makes a tile 16 tokens long.
        let shape = AttnShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 1024,
            block_size: 8,
        };
        let kv_width = shape.num_kv_heads * shape.head_dim;
        assert_eq!(tile_tokens(kv_width), 16);
        let tokens = 100usize;
        let blocks = tokens.div_ceil(shape.block_size);
        let val = |i: usize, salt: f32| (i as f32 * 0.618 + salt).sin() * 2.0;
        let k: Vec<f32> = (0..blocks * shape.block_size * kv_width)
            .map(|i| val(i, 0.3))
            .collect();
        let v: Vec<f32> = (0..k.len()).map(|i| val(i, 1.7)).collect();
        let chunks: Vec<Chunk> = (0..blocks)
            .map(|b| Chunk {
                block: b as u32,
                start: 0,
                len: (tokens - b * shape.block_size).min(shape.block_size) as u32,
            })
            .collect();
        let limits = [1u32, 15, 16, 17, 40, 100];
        let threads = vec![PlanThread {
            chunks,
            rows: limits
                .iter()
                .enumerate()
                .map(|(r, &l)| PlanRow {
                    row: r as u32,
                    limit: l,
                })
                .collect(),
        }];
        let q_width = shape.num_heads * shape.head_dim;
        let q: Vec<f32> = (0..limits.len() * q_width)
            .map(|i| val(i, 2.9) * 0.05)
            .collect();
        for mode in [AttentionMode::Forked, AttentionMode::Naive] {
            let plan = AttentionPlan::build(&threads, mode, 0);
            let out = attention(&plan, &q, &k, &v, shape).output;
            let d = shape.head_dim;
            for (r, &limit) in limits.iter().enumerate() {
                for h in 0..shape.num_heads {
                    let kvh = h / (shape.num_heads / shape.num_kv_heads);
                    let qv = &q[r * q_width + h * d..][..d];
                    let scores: Vec<f64> = (0..limit as usize)
                        .map(|j| {
                            let kj = &k[j * kv_width + kvh * d..][..d];
                            qv.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for x in 0..d {
                        let want: f64 = scores
                            .iter()
                            .enumerate()
                            .map(|(j, s)| (s - m).exp() / z * v[j * kv_width + kvh * d + x] as f64)
                            .sum();
                        let got = out[r * q_width + h * d + x] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{mode:?} row {r} (limit {limit}) head {h} [{x}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
