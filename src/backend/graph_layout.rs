//! The fixed shape of a CUDA-graph decode step, on the host: row-count buckets, the
//! capacities a captured graph is built for, and the padding that turns any step that fits
//! them into exactly that shape.
//!
//! A CUDA graph replays its kernels with the grid sizes and pointers of its capture. So a
//! step runs as a graph only in a fixed shape: its rows padded to a bucket (`1, 2, 4, 8`,
//! then multiples of 16, as vLLM's capture sizes), and kernel v2's arrays padded to the
//! bucket's [`GraphCaps`]: every array sits at the same place of the staging buffer every
//! step, whatever the plan. Padding is inert by construction:
//!
//! - a padded row has token 0, position 0, slot -1 (`kv_write` skips it), row limit 0, no
//!   partial and no merge entry, and its own logit row (its token is never read);
//! - a padded unit is `[0, 0, 0, 0, 0, 0, 0, -1]`: an empty view and no rows, so its CTAs
//!   stage nothing and write nothing;
//! - padded partials (`unit_rows` -1), row parts (-1) and merge rows (-1) are never
//!   reached or are skipped by the kernels' bounds checks; padded chunks are never named
//!   by a unit.
//!
//! [`pad_lowered_into`] is checked against [`crate::plan::lower::interpret`] (the kernel's
//! spec): a padded plan gives the real rows exactly the unpadded plan's outputs
//! (`src/plan/lower/tests.rs`).

use crate::plan::lower::{LoweredPlan, UNIT_WIDTH};

/// Largest rows of a graph step by default (`CudaOptions::max_graph_rows`).
pub const DEFAULT_MAX_GRAPH_ROWS: usize = 256;

/// The padded row count of a step of `rows` rows: the smallest bucket (1, 2, 4, 8, then
/// multiples of 16) that holds it, or `None` beyond `max_rows` (or for an empty step).
pub fn bucket_for(rows: usize, max_rows: usize) -> Option<usize> {
    if rows == 0 || rows > max_rows {
        return None;
    }
    let b = if rows <= 8 {
        rows.next_power_of_two()
    } else {
        rows.div_ceil(16) * 16
    };
    (b <= max_rows).then_some(b).or(Some(rows))
}

/// What a captured graph's kernel v2 launch is built for: rows (the bucket) and the
/// capacities of the lowered arrays. A step whose lowering exceeds one runs eagerly and
/// the bucket is re-captured with [`GraphCaps::grown_for`] next time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphCaps {
    /// Padded rows (the bucket).
    pub rows: usize,
    /// Work units (`[units, UNIT_WIDTH]`).
    pub units: usize,
    /// Lowered partials (`unit_rows`, `partial_direct`, and `row_parts`).
    pub partials: usize,
    /// Chunks of the plan.
    pub chunks: usize,
}

impl GraphCaps {
    /// First capacities of a bucket of `rows` rows on a GPU of `num_sms` SMs, from what the
    /// lowering's wave rule makes of a decode step (`tests/step_counters.rs` prints it: a
    /// 4k shared prefix on 132 SMs splits into about 33 units, and each row reads every
    /// split, so W = 64 lowers to 128 units and 2,112 partials): units for half a wave
    /// plus two per row; partials for a quarter wave plus two, per row, but no more than
    /// `max_partials` (the attention workspace allocated at load, so a wide bucket does
    /// not grow it before a step needs it); chunks for a 4k prefix in 16-token blocks plus
    /// two per row; each rounded up to a power of two. A step beyond them grows them
    /// ([`GraphCaps::grown_for`]).
    pub fn initial(rows: usize, num_sms: usize, max_partials: usize) -> Self {
        let sms = num_sms.max(1);
        Self {
            rows,
            units: (sms / 2 + 2 * rows).next_power_of_two(),
            partials: (rows * (sms / 4 + 2))
                .min(max_partials.max(64))
                .next_power_of_two(),
            chunks: (256 + 2 * rows).next_power_of_two(),
        }
    }

    /// Whether `lp` (a lowering of at most `rows` rows) fits.
    pub fn fits(&self, lp: &LoweredPlan) -> bool {
        lp.num_rows <= self.rows
            && lp.num_units() <= self.units
            && lp.num_partials() <= self.partials
            && lp.row_parts.len() <= self.partials
            && lp.chunk_block.len() <= self.chunks
            && lp.merge_rows.len() <= self.rows
    }

    /// These capacities grown (to powers of two) until `lp` fits.
    pub fn grown_for(&self, lp: &LoweredPlan) -> Self {
        let grow = |cap: usize, need: usize| {
            if need <= cap {
                cap
            } else {
                need.next_power_of_two()
            }
        };
        Self {
            rows: self.rows.max(lp.num_rows),
            units: grow(self.units, lp.num_units()),
            partials: grow(self.partials, lp.num_partials().max(lp.row_parts.len())),
            chunks: grow(self.chunks, lp.chunk_block.len()),
        }
    }

    /// int32 elements the padded attention arrays take (what
    /// `AttentionArrays::push_lowered` appends for a padded plan).
    pub fn attention_len(&self) -> usize {
        1 + 3 * self.chunks
            + self.rows
            + UNIT_WIDTH * self.units
            + 2 * self.partials
            + (self.rows + 1)
            + self.partials
            + self.rows
    }
}

/// The unit padding: an empty view served to no row (its CTAs return at once).
pub const NOOP_UNIT: [i32; UNIT_WIDTH] = [0, 0, 0, 0, 0, 0, 0, -1];

/// `lp` padded to exactly `caps` into `out` (vectors reused): every array has the
/// capacity's length, so its place in the staging buffer is the same for every step of
/// the bucket. `Err` names what does not fit.
pub fn pad_lowered_into(
    lp: &LoweredPlan,
    caps: &GraphCaps,
    out: &mut LoweredPlan,
) -> Result<(), String> {
    if !caps.fits(lp) {
        return Err(format!(
            "lowering ({} rows, {} units, {} partials, {} row parts, {} chunks, {} merge rows) \
             exceeds the graph's capacities {caps:?}",
            lp.num_rows,
            lp.num_units(),
            lp.num_partials(),
            lp.row_parts.len(),
            lp.chunk_block.len(),
            lp.merge_rows.len()
        ));
    }
    fn padded(dst: &mut Vec<i32>, src: &[i32], len: usize, fill: i32) {
        dst.clear();
        dst.extend_from_slice(src);
        dst.resize(len, fill);
    }
    out.num_rows = caps.rows;
    out.units.clear();
    out.units.extend_from_slice(&lp.units);
    for _ in lp.num_units()..caps.units {
        out.units.extend_from_slice(&NOOP_UNIT);
    }
    padded(&mut out.unit_rows, &lp.unit_rows, caps.partials, -1);
    padded(
        &mut out.partial_direct,
        &lp.partial_direct,
        caps.partials,
        0,
    );
    let last = lp.row_part_ptr.last().copied().unwrap_or(0);
    padded(&mut out.row_part_ptr, &lp.row_part_ptr, caps.rows + 1, last);
    padded(&mut out.row_parts, &lp.row_parts, caps.partials, -1);
    padded(&mut out.merge_rows, &lp.merge_rows, caps.rows, -1);
    padded(&mut out.chunk_block, &lp.chunk_block, caps.chunks, 0);
    padded(&mut out.chunk_start, &lp.chunk_start, caps.chunks, 0);
    padded(&mut out.chunk_len, &lp.chunk_len, caps.chunks, 0);
    padded(&mut out.row_limit, &lp.row_limit, caps.rows, 0);
    out.split_tokens = lp.split_tokens;
    out.forked_items = lp.forked_items;
    out.per_thread_items = lp.per_thread_items;
    out.tokens_staged = lp.tokens_staged;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::step_program::AttentionArrays;

    #[test]
    fn buckets() {
        let got: Vec<_> = [1, 2, 3, 5, 8, 9, 16, 17, 33, 250, 256]
            .iter()
            .map(|&r| bucket_for(r, 256))
            .collect();
        let want = [1, 2, 4, 8, 8, 16, 16, 32, 48, 256, 256].map(Some);
        assert_eq!(got, want);
        assert_eq!(bucket_for(0, 256), None);
        assert_eq!(bucket_for(257, 256), None);
        // A cap that is not a bucket still takes its own row count.
        assert_eq!(bucket_for(20, 20), Some(20));
        assert_eq!(bucket_for(7, 6), None);
    }

    fn small_plan() -> LoweredPlan {
        LoweredPlan {
            num_rows: 3,
            units: vec![0, 5, 0, 0, 1, 0, 2, 0, 5, 9, 1, 0, 2, 2, 3, 1],
            unit_rows: vec![0, 1, 2],
            partial_direct: vec![0, 0, 1],
            row_part_ptr: vec![0, 1, 2, 3],
            row_parts: vec![0, 1, 2],
            merge_rows: vec![0, 1],
            chunk_block: vec![4, 7],
            chunk_start: vec![0, 0],
            chunk_len: vec![5, 4],
            row_limit: vec![5, 5, 9],
            ..Default::default()
        }
    }

    #[test]
    fn padding_has_the_capacities_lengths_and_inert_fill() {
        let lp = small_plan();
        let caps = GraphCaps {
            rows: 4,
            units: 3,
            partials: 5,
            chunks: 4,
        };
        let mut out = LoweredPlan::default();
        pad_lowered_into(&lp, &caps, &mut out).expect("fits");
        assert_eq!(out.num_rows, 4);
        assert_eq!(out.num_units(), 3);
        assert_eq!(out.unit(2), &NOOP_UNIT);
        assert_eq!(&out.units[..16], &lp.units[..]);
        assert_eq!(out.unit_rows, vec![0, 1, 2, -1, -1]);
        assert_eq!(out.partial_direct, vec![0, 0, 1, 0, 0]);
        assert_eq!(
            out.row_part_ptr,
            vec![0, 1, 2, 3, 3],
            "padded rows have no part"
        );
        assert_eq!(out.row_parts, vec![0, 1, 2, -1, -1]);
        assert_eq!(out.merge_rows, vec![0, 1, -1, -1]);
        assert_eq!(out.chunk_len, vec![5, 4, 0, 0]);
        assert_eq!(out.row_limit, vec![5, 5, 9, 0]);
        let mut a = AttentionArrays::default();
        let ranges = a.push_lowered(&out);
        assert_eq!(
            a.len(),
            caps.attention_len(),
            "the layout's size is the caps'"
        );

        // Two different plans of the bucket land at the same ranges.
        let mut other = small_plan();
        other.units.truncate(UNIT_WIDTH);
        other.chunk_block.truncate(1);
        other.chunk_start.truncate(1);
        other.chunk_len.truncate(1);
        let mut out2 = LoweredPlan::default();
        pad_lowered_into(&other, &caps, &mut out2).expect("fits");
        let mut b = AttentionArrays::default();
        assert_eq!(b.push_lowered(&out2), ranges);
        assert_eq!(b.len(), a.len());
    }

    #[test]
    fn a_plan_beyond_the_capacities_is_refused_and_grown_for() {
        let lp = small_plan();
        let caps = GraphCaps {
            rows: 4,
            units: 1,
            partials: 2,
            chunks: 1,
        };
        let mut out = LoweredPlan::default();
        let e = pad_lowered_into(&lp, &caps, &mut out).expect_err("too small");
        assert!(e.contains("2 units"), "{e}");
        let g = caps.grown_for(&lp);
        assert!(g.fits(&lp));
        assert_eq!((g.units, g.partials, g.chunks), (2, 4, 2));
        assert_eq!(g.grown_for(&lp), g, "growing again changes nothing");
        let init = GraphCaps::initial(16, 132, 4096);
        assert_eq!((init.units, init.partials, init.chunks), (128, 1024, 512));
        let wide = GraphCaps::initial(256, 132, 4096);
        assert_eq!(
            wide.partials, 4096,
            "no more partials than the workspace holds"
        );
    }
}
