//! Attention on the CPU by executing an [`AttentionPlan`]: each work item's K/V is gathered
//! once and used by every query row it serves (the rows in parallel, each compiled for
//! AVX2 and FMA where the CPU has them); partial results merge by log-sum-exp.

use super::simd::{dot, has_avx2_fma};
use crate::plan::AttentionPlan;
use rayon::prelude::*;

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
    /// Every head of one query row (`q_row`, `[heads * head_dim]`) over the first `visible`
    /// staged tokens, into its partials (one per head). `scores` is scratch.
    fn row(&self, q_row: &[f32], visible: usize, parts: &mut [Partial], scores: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the running CPU reports AVX2 and FMA, the features `row_avx2` is
            // compiled for; it takes only references.
            unsafe { self.row_avx2(q_row, visible, parts, scores) };
            return;
        }
        self.row_impl(q_row, visible, parts, scores);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn row_avx2(
        &self,
        q_row: &[f32],
        visible: usize,
        parts: &mut [Partial],
        scores: &mut Vec<f32>,
    ) {
        self.row_impl(q_row, visible, parts, scores);
    }

    #[inline(always)]
    fn row_impl(
        &self,
        q_row: &[f32],
        visible: usize,
        parts: &mut [Partial],
        scores: &mut Vec<f32>,
    ) {
        let (d, w) = (self.head_dim, self.kv_width);
        for (h, part) in parts.iter_mut().enumerate() {
            let kvh = h / self.group;
            let qv = &q_row[h * d..(h + 1) * d];
            scores.clear();
            scores.extend((0..visible).map(|j| {
                let kv = &self.keys[j * w + kvh * d..][..d];
                dot(qv, kv) * self.scale
            }));
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            part.m = m;
            for (j, &sc) in scores.iter().enumerate() {
                let e = (sc - m).exp();
                part.s += e;
                let vv = &self.values[j * w + kvh * d..][..d];
                for (o, v) in part.o.iter_mut().zip(vv) {
                    *o += e * v;
                }
            }
        }
    }
}

/// Computes `[rows, heads * head_dim]` attention outputs of `q` (`[rows, heads * head_dim]`)
/// over `k_cache`/`v_cache` (`[slots, kv_heads * head_dim]`). Returns the outputs and the
/// number of K/V tokens gathered.
pub fn attention(
    plan: &AttentionPlan,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    shape: AttnShape,
) -> (Vec<f32>, u64) {
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
        // Rows in parallel (each owns its partials); the staged K/V is shared read-only.
        let staged_kv = Staged {
            keys: &keys,
            values: &values,
            kv_width,
            head_dim,
            group,
            scale,
        };
        partials[rows.start * num_heads..rows.end * num_heads]
            .par_chunks_mut(num_heads)
            .zip(rows)
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (parts, p)| {
                let row = plan.item_rows[p] as usize;
                let visible = (plan.row_limit[row] as usize - view_start).min(staged);
                let q_row = &q[row * q_width..(row + 1) * q_width];
                staged_kv.row(q_row, visible, parts, scores);
            });
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
    (out, tokens_read)
}
