//! Attention on the CPU by executing an [`AttentionPlan`]: each work item's K/V is gathered
//! once and used by every query row it serves; partial results merge by log-sum-exp.

use super::simd::dot;
use crate::plan::AttentionPlan;

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
    let mut scores: Vec<f32> = Vec::new();
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
        for p in rows {
            let row = plan.item_rows[p] as usize;
            let visible = (plan.row_limit[row] as usize - view_start).min(staged);
            for h in 0..num_heads {
                let kvh = h / group;
                let qv = &q[row * q_width + h * head_dim..][..head_dim];
                scores.clear();
                scores.extend((0..visible).map(|j| {
                    let kv = &keys[j * kv_width + kvh * head_dim..][..head_dim];
                    dot(qv, kv) * scale
                }));
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let part = &mut partials[p * num_heads + h];
                part.m = m;
                for (j, &sc) in scores.iter().enumerate() {
                    let e = (sc - m).exp();
                    part.s += e;
                    let vv = &values[j * kv_width + kvh * head_dim..][..head_dim];
                    for (o, v) in part.o.iter_mut().zip(vv) {
                        *o += e * v;
                    }
                }
            }
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
    (out, tokens_read)
}
