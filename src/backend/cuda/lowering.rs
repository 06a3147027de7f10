//! Lowering the plan to the per-thread kernels (kernel v1): every row's chunk list in view
//! order, grouped where consecutive rows share one (a thread's prefill chunk).

use super::backend::backend_err;
use super::weights::to_i32;
use crate::backend::StepInput;
use crate::error::Result;

/// Host-side attention arrays of one step, derived from the plan.
pub(super) struct HostAttn {
    /// Per entry (row or group): its chunk list.
    pub(super) indptr: Vec<i32>,
    pub(super) block: Vec<i32>,
    pub(super) start: Vec<i32>,
    pub(super) len: Vec<i32>,
    pub(super) row_limit: Vec<i32>,
    /// `Some(q_indptr)` when rows are grouped for the prefill kernel.
    pub(super) groups: Option<Vec<i32>>,
    pub(super) max_view: usize,
}

type ChunkTriple = (i32, i32, i32);

/// Row r's chunks: the chunks of its items in `row_partials` (view) order.
pub(super) fn row_chunk_lists(
    step: &StepInput,
    num_blocks: usize,
    block_size: usize,
) -> Result<Vec<Vec<ChunkTriple>>> {
    let plan = &step.plan;
    let bad = |what: &str| backend_err(format!("malformed attention plan: {what}"));
    let items = plan.num_items();
    if plan.item_chunk_ptr.len() != items + 1
        || plan.item_row_ptr.len() != items + 1
        || plan.row_partial_ptr.len() != plan.num_rows + 1
        || plan.row_limit.len() != plan.num_rows
    {
        return Err(bad("CSR array lengths"));
    }
    let mut partial_item = vec![u32::MAX; plan.item_rows.len()];
    for i in 0..items {
        let (a, b) = (
            plan.item_row_ptr[i] as usize,
            plan.item_row_ptr[i + 1] as usize,
        );
        let slots = partial_item
            .get_mut(a..b)
            .ok_or_else(|| bad("item_row_ptr"))?;
        slots.fill(i as u32);
    }
    let mut out = Vec::with_capacity(plan.num_rows);
    for r in 0..plan.num_rows {
        let (a, b) = (
            plan.row_partial_ptr[r] as usize,
            plan.row_partial_ptr[r + 1] as usize,
        );
        let ps = plan
            .row_partials
            .get(a..b)
            .ok_or_else(|| bad("row_partial_ptr"))?;
        let mut list = Vec::new();
        for &p in ps {
            let item = *partial_item
                .get(p as usize)
                .ok_or_else(|| bad("row_partials"))?;
            if item == u32::MAX || plan.item_rows[p as usize] as usize != r {
                return Err(bad("partial not served to its row"));
            }
            let (ca, cb) = (
                plan.item_chunk_ptr[item as usize] as usize,
                plan.item_chunk_ptr[item as usize + 1] as usize,
            );
            for c in plan
                .chunks
                .get(ca..cb)
                .ok_or_else(|| bad("item_chunk_ptr"))?
            {
                if c.block as usize >= num_blocks || c.start as usize + c.len as usize > block_size
                {
                    return Err(bad(&format!(
                        "chunk {c:?} outside the pool ({num_blocks} blocks of {block_size})"
                    )));
                }
                list.push((c.block as i32, c.start as i32, c.len as i32));
            }
        }
        out.push(list);
    }
    Ok(out)
}

pub(super) fn host_attention(
    step: &StepInput,
    num_blocks: usize,
    block_size: usize,
    group_rows: bool,
) -> Result<HostAttn> {
    let lists = row_chunk_lists(step, num_blocks, block_size)?;
    let limits: Vec<usize> = step.plan.row_limit.iter().map(|&l| l as usize).collect();
    for (r, (list, &lim)) in lists.iter().zip(&limits).enumerate() {
        let view: usize = list.iter().map(|c| c.2 as usize).sum();
        if view < lim {
            return Err(backend_err(format!(
                "malformed attention plan: row {r} sees {lim} tokens but its items hold {view}"
            )));
        }
    }
    let row_limit = limits
        .iter()
        .map(|&l| to_i32("row_limit", l as u32))
        .collect::<Result<Vec<_>>>()?;
    let max_view = limits.iter().copied().max().unwrap_or(0);
    // Groups: maximal runs of consecutive rows whose lists are prefixes of one another (the
    // group reads the longest; each row's limit masks the rest).
    let mut entries: Vec<(usize, usize, usize)> = Vec::new(); // (first row, end row, list row)
    let mut r = 0;
    while r < lists.len() {
        let (mut end, mut longest) = (r + 1, r);
        while group_rows && end < lists.len() {
            let (a, b) = (&lists[longest], &lists[end]);
            let prefix = if a.len() <= b.len() {
                b.starts_with(a)
            } else {
                a.starts_with(b)
            };
            if !prefix {
                break;
            }
            if b.len() > a.len() {
                longest = end;
            }
            end += 1;
        }
        entries.push((r, end, longest));
        r = end;
    }
    let grouped = group_rows && entries.iter().any(|&(a, b, _)| b - a > 1);
    let mut h = HostAttn {
        indptr: vec![0],
        block: Vec::new(),
        start: Vec::new(),
        len: Vec::new(),
        row_limit,
        groups: None,
        max_view,
    };
    let push_list = |h: &mut HostAttn, list: &[ChunkTriple]| -> Result<()> {
        for &(b, s, l) in list {
            h.block.push(b);
            h.start.push(s);
            h.len.push(l);
        }
        h.indptr.push(to_i32("num_chunks", h.block.len() as u32)?);
        Ok(())
    };
    if grouped {
        let mut q_indptr = vec![0i32];
        for &(_, b, longest) in &entries {
            push_list(&mut h, &lists[longest])?;
            q_indptr.push(b as i32);
        }
        h.groups = Some(q_indptr);
    } else {
        for list in &lists {
            push_list(&mut h, list)?;
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Chunk;
    use crate::plan::{AttentionMode, AttentionPlan, PlanRow, PlanThread};

    pub(super) fn chunk(block: u32, start: u32, len: u32) -> Chunk {
        Chunk { block, start, len }
    }

    pub(super) fn step_of(threads: &[PlanThread], mode: AttentionMode, split: usize) -> StepInput {
        let plan = AttentionPlan::build(threads, mode, split);
        let n = plan.num_rows;
        StepInput {
            tokens: vec![0; n],
            positions: vec![0; n],
            slots: vec![0; n],
            plan,
            ..Default::default()
        }
    }

    #[test]
    pub(super) fn forked_plan_rows_get_their_whole_view_in_order() {
        // Two threads share blocks 0-1 then each has one block of its own; thread 0 decodes
        // one row, thread 1 prefills three (causal limits).
        let threads = vec![
            PlanThread {
                chunks: vec![chunk(0, 0, 4), chunk(1, 0, 4), chunk(2, 0, 2)],
                rows: vec![PlanRow { row: 0, limit: 10 }],
            },
            PlanThread {
                chunks: vec![chunk(0, 0, 4), chunk(1, 0, 4), chunk(3, 0, 3)],
                rows: vec![
                    PlanRow { row: 1, limit: 9 },
                    PlanRow { row: 2, limit: 10 },
                    PlanRow { row: 3, limit: 11 },
                ],
            },
        ];
        for split in [0, 4] {
            let step = step_of(&threads, AttentionMode::Forked, split);
            let lists = row_chunk_lists(&step, 8, 4).unwrap();
            assert_eq!(lists[0], vec![(0, 0, 4), (1, 0, 4), (2, 0, 2)]);
            for list in &lists[1..4] {
                assert_eq!(list, &vec![(0, 0, 4), (1, 0, 4), (3, 0, 3)]);
            }
            let h = host_attention(&step, 8, 4, true).unwrap();
            assert_eq!(h.groups, Some(vec![0, 1, 4]));
            assert_eq!(h.indptr, vec![0, 3, 6]);
            let h = host_attention(&step, 8, 4, false).unwrap();
            assert_eq!(h.groups, None);
            assert_eq!(h.indptr, vec![0, 3, 6, 9, 12]);
            assert_eq!(h.row_limit, vec![10, 9, 10, 11]);
            assert_eq!(h.max_view, 11);
        }
    }

    #[test]
    pub(super) fn rows_seeing_fewer_items_group_with_longer_ones() {
        // Split items of 2 tokens: row 1 (limit 5) does not read the last item, row 2 does.
        let threads = vec![PlanThread {
            chunks: vec![chunk(0, 0, 4), chunk(1, 0, 1), chunk(1, 1, 2)],
            rows: vec![PlanRow { row: 0, limit: 5 }, PlanRow { row: 1, limit: 7 }],
        }];
        let step = step_of(&threads, AttentionMode::Forked, 2);
        let lists = row_chunk_lists(&step, 4, 4).unwrap();
        assert!(lists[1].starts_with(&lists[0]));
        let h = host_attention(&step, 4, 4, true).unwrap();
        assert_eq!(h.groups, Some(vec![0, 2]));
        assert_eq!(h.indptr, vec![0, lists[1].len() as i32]);
    }

    #[test]
    pub(super) fn bad_plans_are_errors() {
        let threads = vec![PlanThread {
            chunks: vec![chunk(9, 0, 4)],
            rows: vec![PlanRow { row: 0, limit: 4 }],
        }];
        let step = step_of(&threads, AttentionMode::Naive, 0);
        assert!(
            host_attention(&step, 4, 4, true).is_err(),
            "block outside the pool"
        );
        let mut step = step_of(
            &[PlanThread {
                chunks: vec![chunk(0, 0, 4)],
                rows: vec![PlanRow { row: 0, limit: 4 }],
            }],
            AttentionMode::Naive,
            0,
        );
        step.plan.row_limit[0] = 5;
        assert!(
            host_attention(&step, 4, 4, true).is_err(),
            "limit past the view"
        );
    }
}
