//! The per-step attention plan: which query rows meet which KV chunks, and in what order
//! their partial results merge.
//!
//! The engine's [`Planner`] builds it from the threads' views and keeps it across steps
//! (`incremental.rs`); [`AttentionPlan::build`] here builds the same plan from plain chunk
//! lists, for tests, benchmarks and as the reference the planner is checked against. In
//! forked mode the views are
//! laid into a trie over their per-block chunks, so a prefix shared by many threads becomes
//! one work item read once for all of their query rows (FlashInfer cascade / DeFT style);
//! in naive mode every thread gets its own item (vLLM style). Long items are split along
//! the sequence. Every row's partials are merged with log-sum-exp in view order. The CPU
//! backend executes this exact structure; the CUDA kernels take the same arrays.

pub mod incremental;
pub mod lower;

pub use incremental::{PlanCounts, PlanInput, Planner, ViewSource};

use crate::kv::Chunk;

/// How the plan groups KV reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    /// Shared spans read once per step for every thread attending to them.
    Forked,
    /// Each thread reads its whole view (the per-thread baseline).
    Naive,
}

/// One thread's part of a step: its view and its query rows.
#[derive(Debug, Clone)]
pub struct PlanThread {
    /// The thread's view (after this step's appends), cut into per-block chunks.
    pub chunks: Vec<Chunk>,
    /// Its query rows in the step batch, each with how many view tokens it may see.
    pub rows: Vec<PlanRow>,
}

/// One query row of a [`PlanThread`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanRow {
    /// The row's index in the step batch.
    pub row: u32,
    /// View tokens the row may see (those at view index >= `limit` are masked).
    pub limit: u32,
}

/// The plan, in CSR form (int32-friendly arrays, as the kernels take them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttentionPlan {
    /// Number of query rows in the step.
    pub num_rows: usize,
    /// `[rows]`: view tokens visible to each row (tokens at view index >= limit are masked).
    pub row_limit: Vec<u32>,
    /// `[items + 1]`: item i reads `chunks[item_chunk_ptr[i]..item_chunk_ptr[i+1]]`.
    pub item_chunk_ptr: Vec<u32>,
    /// `[chunks]`: the KV chunks of all items, flattened.
    pub chunks: Vec<Chunk>,
    /// `[items]`: view index of each item's first token (the same for all its rows).
    pub item_view_start: Vec<u32>,
    /// `[items + 1]`: item i serves rows `item_rows[item_row_ptr[i]..item_row_ptr[i+1]]`.
    pub item_row_ptr: Vec<u32>,
    /// `[partials]`: the rows each item serves; partial p is (item of p, `item_rows[p]`).
    pub item_rows: Vec<u32>,
    /// `[rows + 1]`: row r merges partials `row_partials[row_partial_ptr[r]..row_partial_ptr[r+1]]`.
    pub row_partial_ptr: Vec<u32>,
    /// `[partials]`: partial indices in view order, per row.
    pub row_partials: Vec<u32>,
    /// K/V tokens this plan reads per layer (each item's visible tokens once).
    pub kv_tokens_read: u64,
}

impl AttentionPlan {
    /// Number of work items.
    pub fn num_items(&self) -> usize {
        self.item_view_start.len()
    }

    /// Builds the plan for one step. `split_tokens` caps an item's length (0: no split).
    pub fn build(threads: &[PlanThread], mode: AttentionMode, split_tokens: usize) -> Self {
        let num_rows = threads.iter().map(|t| t.rows.len()).sum();
        let mut b = Builder {
            threads,
            split: split_tokens,
            plan: AttentionPlan {
                num_rows,
                row_limit: vec![0; num_rows],
                item_chunk_ptr: vec![0],
                item_row_ptr: vec![0],
                ..Default::default()
            },
        };
        for t in threads {
            for r in &t.rows {
                b.plan.row_limit[r.row as usize] = r.limit;
            }
        }
        match mode {
            AttentionMode::Naive => {
                for (i, t) in threads.iter().enumerate() {
                    b.emit(&[i], &t.chunks, 0);
                }
            }
            AttentionMode::Forked => {
                let all: Vec<usize> = (0..threads.len()).collect();
                b.trie(&all, 0, 0);
            }
        }
        b.finish()
    }
}

struct Builder<'a> {
    threads: &'a [PlanThread],
    split: usize,
    plan: AttentionPlan,
}

impl Builder<'_> {
    /// Lays the threads in `group` (all sharing chunks `..depth`) into items from chunk `depth` on.
    fn trie(&mut self, group: &[usize], depth: usize, view_start: usize) {
        let mut rest: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&t| self.threads[t].chunks.len() > depth)
            .collect();
        while let Some(&first) = rest.first() {
            let key = self.threads[first].chunks[depth];
            let (same, other): (Vec<usize>, Vec<usize>) = rest
                .iter()
                .partition(|&&t| self.threads[t].chunks[depth] == key);
            rest = other;
            // Extend the item while every thread of the partition continues identically.
            let mut end = depth + 1;
            loop {
                let next = self.threads[same[0]].chunks.get(end);
                let all_same = next.is_some()
                    && same
                        .iter()
                        .all(|&t| self.threads[t].chunks.get(end) == next);
                if !all_same {
                    break;
                }
                end += 1;
            }
            let chunks = &self.threads[same[0]].chunks[depth..end];
            let len: usize = chunks.iter().map(|c| c.len as usize).sum();
            self.emit(&same, chunks, view_start);
            self.trie(&same, end, view_start + len);
        }
    }

    /// Emits the item(s) for `chunks` starting at `view_start`, read by every row of `group`.
    fn emit(&mut self, group: &[usize], chunks: &[Chunk], view_start: usize) {
        let mut start = view_start;
        let mut piece: Vec<Chunk> = Vec::new();
        let mut piece_len = 0usize;
        for (i, c) in chunks.iter().enumerate() {
            piece.push(*c);
            piece_len += c.len as usize;
            let last = i + 1 == chunks.len();
            if last || (self.split > 0 && piece_len >= self.split) {
                self.push_item(group, &piece, start, piece_len);
                start += piece_len;
                piece.clear();
                piece_len = 0;
            }
        }
    }

    fn push_item(&mut self, group: &[usize], chunks: &[Chunk], view_start: usize, len: usize) {
        let rows: Vec<PlanRow> = group
            .iter()
            .flat_map(|&t| self.threads[t].rows.iter().copied())
            .filter(|r| r.limit as usize > view_start)
            .collect();
        let Some(max_limit) = rows.iter().map(|r| r.limit as usize).max() else {
            return; // no row sees any of it: nothing to read
        };
        let p = &mut self.plan;
        p.kv_tokens_read += (max_limit - view_start).min(len) as u64;
        p.chunks.extend_from_slice(chunks);
        p.item_chunk_ptr.push(p.chunks.len() as u32);
        p.item_view_start.push(view_start as u32);
        p.item_rows.extend(rows.iter().map(|r| r.row));
        p.item_row_ptr.push(p.item_rows.len() as u32);
    }

    fn finish(mut self) -> AttentionPlan {
        let p = &mut self.plan;
        // Partials per row, ordered by the item's view start (items of one row never overlap).
        let mut per_row: Vec<Vec<(u32, u32)>> = vec![Vec::new(); p.num_rows];
        for item in 0..p.num_items() {
            for idx in p.item_row_ptr[item]..p.item_row_ptr[item + 1] {
                let row = p.item_rows[idx as usize] as usize;
                per_row[row].push((p.item_view_start[item], idx));
            }
        }
        p.row_partial_ptr = vec![0];
        for mut partials in per_row {
            partials.sort_unstable();
            p.row_partials.extend(partials.iter().map(|&(_, idx)| idx));
            p.row_partial_ptr.push(p.row_partials.len() as u32);
        }
        self.plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(block: u32, len: u32) -> Chunk {
        Chunk {
            block,
            start: 0,
            len,
        }
    }

    #[test]
    fn shared_prefix_is_one_item_for_all_threads() {
        // Three threads share blocks 0 and 1 (32 tokens), then each has its own block.
        let threads: Vec<PlanThread> = (0..3)
            .map(|i| PlanThread {
                chunks: vec![chunk(0, 16), chunk(1, 16), chunk(2 + i, 5)],
                rows: vec![PlanRow { row: i, limit: 37 }],
            })
            .collect();
        let forked = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
        assert_eq!(forked.num_items(), 4);
        assert_eq!(forked.kv_tokens_read, 32 + 3 * 5);
        let naive = AttentionPlan::build(&threads, AttentionMode::Naive, 0);
        assert_eq!(naive.num_items(), 3);
        assert_eq!(naive.kv_tokens_read, 3 * 37);
        // Each row merges its partials in view order: the prefix first.
        for r in 0..3 {
            let ps = &forked.row_partials
                [forked.row_partial_ptr[r] as usize..forked.row_partial_ptr[r + 1] as usize];
            assert_eq!(ps.len(), 2);
            assert_eq!(forked.item_rows[ps[0] as usize], r as u32);
        }
    }

    #[test]
    fn long_items_are_split() {
        let threads = vec![PlanThread {
            chunks: (0..8).map(|b| chunk(b, 16)).collect(),
            rows: vec![PlanRow { row: 0, limit: 128 }],
        }];
        let plan = AttentionPlan::build(&threads, AttentionMode::Forked, 32);
        assert_eq!(plan.num_items(), 4);
        assert_eq!(plan.item_view_start, vec![0, 32, 64, 96]);
        assert_eq!(plan.kv_tokens_read, 128);
    }
}
