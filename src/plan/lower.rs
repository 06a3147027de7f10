//! Lowering an [`AttentionPlan`] to the flat, fixed-width int32 arrays the forked attention
//! kernel (v2, `kernels/forked_attention.cu`) consumes, and [`interpret`], a CPU
//! interpreter of those arrays that is the executable spec of the kernel.
//!
//! # What the kernel gets
//!
//! - **Work units** (`units`, `[num_units, UNIT_WIDTH]`): one CTA per (unit, kv-head). A unit
//!   is a view range `[view_begin, view_end)` of one item (one split of it) and the query
//!   rows that read it. Its first chunk and the offset of `view_begin` inside that chunk are
//!   precomputed here, so a split starts where it is, without walking the item's earlier
//!   chunks; `chunk_end` bounds the walk.
//! - **Unit rows** (`unit_rows`, `[partials]`): the query row of each lowered partial. Unit u
//!   writes partials `row_begin..row_end` (the same indices), one per row it serves; rows
//!   that see nothing of the split are left out of it.
//! - **The merge CSR** (`row_part_ptr`, `[rows + 1]`, and `row_parts`, `[partials]`): each
//!   row's lowered partials in view order (the plan's `row_partials` order, each item's
//!   splits in order). A row with exactly one partial is written directly by the item
//!   kernel (`partial_direct[p] == 1`); the merge kernel runs over `merge_rows` only (rows
//!   with zero partials, which it zeroes, or several).
//! - The plan's chunks as three int32 arrays and `row_limit` (tokens of its view each row
//!   sees: causal and tree visibility).
//!
//! # Dispatch: forked or per-thread, per item
//!
//! An item served by `n` rows can run *forked* (its rows stacked `rows_per_unit` at a time,
//! every row tile staging the item's tokens once) or *per-thread* (each row alone stages the
//! tokens it sees, as kernel v1 does). The cost rule compares tokens staged per kv-head:
//! forked costs `row_tiles * round_up(visible, tile)`, per-thread costs
//! `sum over rows of round_up(visible_r, tile)`; the item runs per-thread when that is not
//! more. An item served by one row is therefore per-thread work (the costs are equal), and
//! an item shared by many rows runs forked. [`Dispatch`] overrides the rule for benchmarks.
//!
//! # Splits
//!
//! One split length `L` (a multiple of the tile) for the step, chosen so that units x
//! kv-heads fill the GPU (a wave rule in the spirit of FlashAttention-3's): over the
//! candidates `tile * 2^k` up to the longest item, the estimated time
//! `waves(L) * (min(L, longest) + tile)` (a wave is `num_sms * ctas_per_sm` CTAs, each paying
//! about a tile of start-up) is minimised, ties going to the longer split (fewer partials).
//! [`LowerConfig::split_tokens`] fixes `L` instead.

use super::AttentionPlan;
use thiserror::Error;

/// int32 fields of one work unit in [`LoweredPlan::units`].
pub const UNIT_WIDTH: usize = 8;
/// Tokens per K/V tile of the v2 kernel (`SPINDLE_FORKED_TILE_TOKENS`).
pub const TILE_TOKENS: usize = 64;
/// Stacked query vectors (rows x q-heads per kv-head) per v2 CTA (`SPINDLE_FORKED_CTA_ROWS`).
pub const CTA_ROWS: usize = 64;
/// Field: view index of the unit's first token.
pub const U_VIEW_BEGIN: usize = 0;
/// Field: one past the view index of its last token.
pub const U_VIEW_END: usize = 1;
/// Field: index (into the chunk arrays) of the chunk holding `view_begin`.
pub const U_CHUNK_BEGIN: usize = 2;
/// Field: tokens of that chunk before `view_begin`.
pub const U_CHUNK_OFFSET: usize = 3;
/// Field: one past the last chunk the unit reads.
pub const U_CHUNK_END: usize = 4;
/// Field: first lowered partial (index into `unit_rows`) of the unit.
pub const U_ROW_BEGIN: usize = 5;
/// Field: one past its last partial.
pub const U_ROW_END: usize = 6;
/// Field: the plan item the unit belongs to (diagnostics; the kernel does not read it).
pub const U_ITEM: usize = 7;

/// How items are dispatched (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// The cost rule decides per item.
    #[default]
    Auto,
    /// Every item forked (rows stacked).
    Forked,
    /// Every item per-thread (one row per unit).
    PerThread,
}

/// Shapes and knobs of the lowering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowerConfig {
    /// Tokens per K/V tile of the kernel (split lengths are multiples of it).
    pub tile_tokens: usize,
    /// Stacked query vectors (rows x q-heads per kv-head) one CTA computes.
    pub cta_rows: usize,
    /// Query heads per kv-head.
    pub gqa: usize,
    /// KV heads (CTAs per unit).
    pub num_kv_heads: usize,
    /// Streaming multiprocessors of the device, and resident CTAs per SM (the wave rule).
    pub num_sms: usize,
    pub ctas_per_sm: usize,
    /// `Some(L)`: split every item into pieces of `L` tokens (rounded up to the tile);
    /// `None`: the wave rule chooses.
    pub split_tokens: Option<usize>,
    /// Forked / per-thread choice.
    pub dispatch: Dispatch,
    /// The K/V pool the chunks must lie in.
    pub num_blocks: usize,
    pub block_size: usize,
}

impl LowerConfig {
    /// The kernel's defaults (64-token tiles, 64 stacked rows per CTA, an H200's 132 SMs
    /// with 2 CTAs each) for a model of `num_heads` / `num_kv_heads` and a pool.
    pub fn new(
        num_heads: usize,
        num_kv_heads: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Self {
        Self {
            tile_tokens: TILE_TOKENS,
            cta_rows: CTA_ROWS,
            gqa: num_heads / num_kv_heads.max(1),
            num_kv_heads,
            num_sms: 132,
            ctas_per_sm: 2,
            split_tokens: None,
            dispatch: Dispatch::Auto,
            num_blocks,
            block_size,
        }
    }

    /// Rows (threads' query rows, each with `gqa` heads) one unit serves.
    pub fn rows_per_unit(&self) -> usize {
        (self.cta_rows / self.gqa.max(1)).max(1)
    }
}

/// A plan the kernel cannot run, or a configuration it cannot use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LowerError {
    #[error("{what} has {got} entries, expected {want}")]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error(
        "{what} is not a CSR pointer array (must start at 0, never decrease and end at {end})"
    )]
    BadPointers { what: &'static str, end: usize },
    #[error("{what}[{index}] = {value} is out of range (< {bound})")]
    OutOfRange {
        what: &'static str,
        index: usize,
        value: u64,
        bound: u64,
    },
    #[error("partial {partial} is listed for row {listed} but item {item} serves it to row {row}")]
    PartialRow {
        partial: usize,
        listed: usize,
        item: usize,
        row: usize,
    },
    #[error("partial {partial} is merged {times} times (each exactly once)")]
    PartialCount { partial: usize, times: usize },
    #[error("row {row}: its items are not contiguous in view order (item {item} starts at {start}, expected {expected})")]
    ViewOrder {
        row: usize,
        item: usize,
        start: u64,
        expected: u64,
    },
    #[error("row {row} sees {limit} tokens but its items hold {view}")]
    LimitPastView { row: usize, limit: u64, view: u64 },
    #[error("chunk {index} (block {block}, start {start}, len {len}) lies outside the pool ({num_blocks} blocks of {block_size})")]
    ChunkOutsidePool {
        index: usize,
        block: u32,
        start: u32,
        len: u32,
        num_blocks: usize,
        block_size: usize,
    },
    #[error("{what} = {value} does not fit the kernel's int32 arrays")]
    TooLarge { what: &'static str, value: u64 },
    #[error("lowering configuration: {0}")]
    Config(String),
}

/// The plan as the v2 kernel takes it (see the module docs). All arrays int32.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoweredPlan {
    pub num_rows: usize,
    /// `[num_units, UNIT_WIDTH]`.
    pub units: Vec<i32>,
    /// `[partials]`: query row of each lowered partial.
    pub unit_rows: Vec<i32>,
    /// `[partials]`: 1 when the partial is its row's only one (the kernel writes the row).
    pub partial_direct: Vec<i32>,
    /// `[rows + 1]` / `[partials]`: each row's partials in view order.
    pub row_part_ptr: Vec<i32>,
    pub row_parts: Vec<i32>,
    /// `[merge rows]`: rows the merge kernel writes (zero or several partials).
    pub merge_rows: Vec<i32>,
    /// `[chunks]`: the plan's chunks.
    pub chunk_block: Vec<i32>,
    pub chunk_start: Vec<i32>,
    pub chunk_len: Vec<i32>,
    /// `[rows]`.
    pub row_limit: Vec<i32>,
    /// The split length used (tokens).
    pub split_tokens: usize,
    /// Items run forked / per-thread.
    pub forked_items: usize,
    pub per_thread_items: usize,
    /// K/V tokens staged per kv-head over all units (each unit's range once).
    pub tokens_staged: u64,
    /// The lowering's working memory, kept with its output so that [`lower_into`] on a
    /// steady step allocates nothing (never part of the result: equal whatever it holds).
    pub scratch: LowerScratch,
}

/// [`lower_into`]'s working memory (flat vectors, cleared and refilled each call).
#[derive(Debug, Clone, Default)]
pub struct LowerScratch {
    /// `[plan partials]` item of each partial (validation).
    partial_item: Vec<usize>,
    /// `[items]` tokens of each item.
    item_len: Vec<u64>,
    /// `[plan partials]` times each partial is merged (validation).
    seen: Vec<usize>,
    /// `[items]` most tokens any of its rows sees.
    item_visible: Vec<u64>,
    /// One item's partials that see something of it.
    ps: Vec<usize>,
    /// Row groups sharing units, and their partials back to back.
    groups: Vec<Group>,
    group_partials: Vec<usize>,
    /// (plan partial, lowered partial) in lowering order, then as a CSR by plan partial.
    pairs: Vec<(u32, i32)>,
    lowered_ptr: Vec<usize>,
    lowered_ids: Vec<i32>,
    /// The current item's splits.
    splits: Vec<Split>,
}

impl PartialEq for LowerScratch {
    /// Scratch never distinguishes two lowerings.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Partials of one item that share units (a forked row tile, or one row per-thread),
/// with the tokens its rows see: `partials` is a range of `LowerScratch::group_partials`.
#[derive(Debug, Clone, Copy)]
struct Group {
    item: usize,
    partials: (usize, usize),
    visible: u64,
}

impl LoweredPlan {
    /// Number of work units.
    pub fn num_units(&self) -> usize {
        self.units.len() / UNIT_WIDTH
    }

    /// Number of lowered partials.
    pub fn num_partials(&self) -> usize {
        self.unit_rows.len()
    }

    /// Unit `u`'s fields.
    pub fn unit(&self, u: usize) -> &[i32] {
        &self.units[u * UNIT_WIDTH..(u + 1) * UNIT_WIDTH]
    }
}

fn fit(what: &'static str, v: u64) -> Result<i32, LowerError> {
    i32::try_from(v).map_err(|_| LowerError::TooLarge { what, value: v })
}

fn check_ptr(what: &'static str, ptr: &[u32], len: usize, end: usize) -> Result<(), LowerError> {
    if ptr.len() != len {
        return Err(LowerError::Length {
            what,
            got: ptr.len(),
            want: len,
        });
    }
    let ok = ptr.first() == Some(&0)
        && ptr.windows(2).all(|w| w[0] <= w[1])
        && ptr.last().map(|&e| e as usize) == Some(end);
    if ok {
        Ok(())
    } else {
        Err(LowerError::BadPointers { what, end })
    }
}

/// One split of an item: view range and where it starts in the chunk arrays.
#[derive(Debug, Clone, Copy)]
struct Split {
    view_begin: u64,
    view_end: u64,
    chunk_begin: usize,
    chunk_offset: u64,
    chunk_end: usize,
}

/// Checks everything the kernel relies on.
fn validate(
    plan: &AttentionPlan,
    cfg: &LowerConfig,
    sc: &mut LowerScratch,
) -> Result<(), LowerError> {
    let items = plan.num_items();
    let rows = plan.num_rows;
    if plan.row_limit.len() != rows {
        return Err(LowerError::Length {
            what: "row_limit",
            got: plan.row_limit.len(),
            want: rows,
        });
    }
    check_ptr(
        "item_chunk_ptr",
        &plan.item_chunk_ptr,
        items + 1,
        plan.chunks.len(),
    )?;
    check_ptr(
        "item_row_ptr",
        &plan.item_row_ptr,
        items + 1,
        plan.item_rows.len(),
    )?;
    check_ptr(
        "row_partial_ptr",
        &plan.row_partial_ptr,
        rows + 1,
        plan.row_partials.len(),
    )?;
    for (i, c) in plan.chunks.iter().enumerate() {
        let inside = (c.block as usize) < cfg.num_blocks
            && c.start as u64 + c.len as u64 <= cfg.block_size as u64;
        if !inside {
            return Err(LowerError::ChunkOutsidePool {
                index: i,
                block: c.block,
                start: c.start,
                len: c.len,
                num_blocks: cfg.num_blocks,
                block_size: cfg.block_size,
            });
        }
    }
    fit("pool slots", cfg.num_blocks as u64 * cfg.block_size as u64)?;
    let partial_item = &mut sc.partial_item;
    partial_item.clear();
    partial_item.resize(plan.item_rows.len(), 0);
    for item in 0..items {
        let range = plan.item_row_ptr[item] as usize..plan.item_row_ptr[item + 1] as usize;
        partial_item[range.clone()].fill(item);
        for p in range {
            let r = plan.item_rows[p];
            if r as usize >= rows {
                return Err(LowerError::OutOfRange {
                    what: "item_rows",
                    index: p,
                    value: r as u64,
                    bound: rows as u64,
                });
            }
        }
    }
    let item_len = &mut sc.item_len;
    item_len.clear();
    item_len.extend((0..items).map(|i| {
        plan.chunks[plan.item_chunk_ptr[i] as usize..plan.item_chunk_ptr[i + 1] as usize]
            .iter()
            .map(|c| c.len as u64)
            .sum::<u64>()
    }));
    let seen = &mut sc.seen;
    seen.clear();
    seen.resize(plan.item_rows.len(), 0);
    for r in 0..rows {
        let ps = &plan.row_partials
            [plan.row_partial_ptr[r] as usize..plan.row_partial_ptr[r + 1] as usize];
        let mut view = 0u64;
        for (k, &p) in ps.iter().enumerate() {
            let p = p as usize;
            if p >= plan.item_rows.len() {
                return Err(LowerError::OutOfRange {
                    what: "row_partials",
                    index: plan.row_partial_ptr[r] as usize + k,
                    value: p as u64,
                    bound: plan.item_rows.len() as u64,
                });
            }
            seen[p] += 1;
            let item = partial_item[p];
            if plan.item_rows[p] as usize != r {
                return Err(LowerError::PartialRow {
                    partial: p,
                    listed: r,
                    item,
                    row: plan.item_rows[p] as usize,
                });
            }
            let start = plan.item_view_start[item] as u64;
            if start != view {
                return Err(LowerError::ViewOrder {
                    row: r,
                    item,
                    start,
                    expected: view,
                });
            }
            view = start + item_len[item];
        }
        let limit = plan.row_limit[r] as u64;
        if limit > view {
            return Err(LowerError::LimitPastView {
                row: r,
                limit,
                view,
            });
        }
        fit("row_limit", limit)?;
    }
    if let Some(p) = seen.iter().position(|&n| n != 1) {
        return Err(LowerError::PartialCount {
            partial: p,
            times: seen[p],
        });
    }
    Ok(())
}

/// Cuts `[view_start, view_start + visible)` of an item (chunks `c0..c1`) into splits of `len`
/// tokens, walking its chunks once.
fn item_splits(
    plan: &AttentionPlan,
    c0: usize,
    c1: usize,
    view_start: u64,
    visible: u64,
    len: u64,
    out: &mut Vec<Split>,
) {
    out.clear();
    let (mut ci, mut chunk_view) = (c0, view_start); // chunk ci starts at view index chunk_view
    let mut begin = view_start;
    let end = view_start + visible;
    while begin < end {
        let stop = (begin + len).min(end);
        // Skip chunks ending at or before `begin` (each chunk is passed once overall).
        while ci < c1 && chunk_view + plan.chunks[ci].len as u64 <= begin {
            chunk_view += plan.chunks[ci].len as u64;
            ci += 1;
        }
        let (mut cj, mut cv) = (ci, chunk_view);
        while cj < c1 && cv < stop {
            cv += plan.chunks[cj].len as u64;
            cj += 1;
        }
        out.push(Split {
            view_begin: begin,
            view_end: stop,
            chunk_begin: ci,
            chunk_offset: begin - chunk_view,
            chunk_end: cj,
        });
        begin = stop;
    }
}

fn round_up(x: u64, m: u64) -> u64 {
    x.div_ceil(m) * m
}

/// Lowers `plan` for the v2 kernel (see the module docs).
pub fn lower(plan: &AttentionPlan, cfg: &LowerConfig) -> Result<LoweredPlan, LowerError> {
    let mut out = LoweredPlan::default();
    lower_into(plan, cfg, &mut out)?;
    Ok(out)
}

/// [`lower`] into `out`, reusing its vectors (cleared first, capacity kept) so that a
/// caller lowering every step does not reallocate the output arrays once they have grown to
/// the largest step. On `Err`, `out` holds a partial lowering and must not be used.
pub fn lower_into(
    plan: &AttentionPlan,
    cfg: &LowerConfig,
    out: &mut LoweredPlan,
) -> Result<(), LowerError> {
    if cfg.tile_tokens == 0 || cfg.cta_rows == 0 || cfg.gqa == 0 || cfg.num_kv_heads == 0 {
        return Err(LowerError::Config(format!(
            "tile {} tokens, {} rows per CTA, gqa {}, {} kv heads: all must be positive",
            cfg.tile_tokens, cfg.cta_rows, cfg.gqa, cfg.num_kv_heads
        )));
    }
    if cfg.gqa > cfg.cta_rows {
        return Err(LowerError::Config(format!(
            "{} query heads per kv head do not fit a CTA of {} rows",
            cfg.gqa, cfg.cta_rows
        )));
    }
    let mut sc = std::mem::take(&mut out.scratch);
    let r = lower_with(plan, cfg, out, &mut sc);
    out.scratch = sc;
    r
}

/// [`lower_into`]'s body, with its scratch taken out of `out`.
fn lower_with(
    plan: &AttentionPlan,
    cfg: &LowerConfig,
    out: &mut LoweredPlan,
    sc: &mut LowerScratch,
) -> Result<(), LowerError> {
    validate(plan, cfg, sc)?;
    let tile = cfg.tile_tokens as u64;
    let rows_per_unit = cfg.rows_per_unit();
    let visible = |p: usize, item: usize| -> u64 {
        let start = plan.item_view_start[item] as u64;
        (plan.row_limit[plan.item_rows[p] as usize] as u64).saturating_sub(start)
    };
    let items = plan.num_items();

    // Groups of partials (rows) that share units: per item, row tiles (forked) or single
    // rows (per-thread). Each with the tokens its rows see.
    sc.groups.clear();
    sc.group_partials.clear();
    let (mut forked_items, mut per_thread_items) = (0, 0);
    sc.item_visible.clear();
    sc.item_visible.resize(items, 0);
    for item in 0..items {
        let len = sc.item_len[item];
        sc.ps.clear();
        sc.ps.extend(
            (plan.item_row_ptr[item] as usize..plan.item_row_ptr[item + 1] as usize)
                .filter(|&p| visible(p, item) > 0),
        );
        if sc.ps.is_empty() {
            continue;
        }
        let vis = |p: usize| visible(p, item).min(len);
        sc.item_visible[item] = sc.ps.iter().map(|&p| vis(p)).max().unwrap_or(0);
        let tile_visible = |t: &[usize]| t.iter().map(|&p| vis(p)).max().unwrap_or(0);
        let forked_cost: u64 = sc
            .ps
            .chunks(rows_per_unit)
            .map(|t| round_up(tile_visible(t), tile))
            .sum();
        let per_thread_cost: u64 = sc.ps.iter().map(|&p| round_up(vis(p), tile)).sum();
        let forked = match cfg.dispatch {
            Dispatch::Forked => true,
            Dispatch::PerThread => false,
            Dispatch::Auto => per_thread_cost > forked_cost,
        };
        if forked {
            forked_items += 1;
            for t in sc.ps.chunks(rows_per_unit) {
                let start = sc.group_partials.len();
                sc.group_partials.extend_from_slice(t);
                sc.groups.push(Group {
                    item,
                    partials: (start, sc.group_partials.len()),
                    visible: tile_visible(t),
                });
            }
        } else {
            per_thread_items += 1;
            for &p in &sc.ps {
                sc.group_partials.push(p);
                sc.groups.push(Group {
                    item,
                    partials: (sc.group_partials.len() - 1, sc.group_partials.len()),
                    visible: vis(p),
                });
            }
        }
    }

    // The split length.
    let groups = &sc.groups;
    let longest = groups.iter().map(|g| g.visible).max().unwrap_or(0);
    let split = match cfg.split_tokens {
        Some(l) => round_up(l.max(1) as u64, tile),
        None => {
            let slots = (cfg.num_sms.max(1) * cfg.ctas_per_sm.max(1)) as u64;
            let mut best = (u64::MAX, tile);
            let mut l = tile;
            loop {
                let units: u64 = groups.iter().map(|g| g.visible.div_ceil(l)).sum();
                let ctas = units * cfg.num_kv_heads as u64;
                let est = ctas.div_ceil(slots) * (l.min(round_up(longest, tile)) + tile);
                if est <= best.0 {
                    best = (est, l);
                }
                if l >= longest {
                    break;
                }
                l *= 2;
            }
            best.1
        }
    };

    // Units, partials, and each plan partial's lowered partials (in split order).
    out.num_rows = plan.num_rows;
    out.split_tokens = split as usize;
    out.forked_items = forked_items;
    out.per_thread_items = per_thread_items;
    out.tokens_staged = 0;
    for v in [
        &mut out.units,
        &mut out.unit_rows,
        &mut out.partial_direct,
        &mut out.row_part_ptr,
        &mut out.row_parts,
        &mut out.merge_rows,
        &mut out.chunk_block,
        &mut out.chunk_start,
        &mut out.chunk_len,
        &mut out.row_limit,
    ] {
        v.clear();
    }
    sc.pairs.clear();
    let mut split_item = usize::MAX; // the item whose splits `sc.splits` holds
    for g in groups {
        let item = g.item;
        let view_start = plan.item_view_start[item] as u64;
        if split_item != item {
            // An item's groups are consecutive: its splits are cut once.
            item_splits(
                plan,
                plan.item_chunk_ptr[item] as usize,
                plan.item_chunk_ptr[item + 1] as usize,
                view_start,
                sc.item_visible[item],
                split,
                &mut sc.splits,
            );
            split_item = item;
        }
        for s in sc.splits.iter() {
            if s.view_begin >= view_start + g.visible {
                break;
            }
            let end = s.view_end.min(view_start + g.visible);
            let row_begin = out.unit_rows.len();
            for &p in &sc.group_partials[g.partials.0..g.partials.1] {
                let row = plan.item_rows[p] as usize;
                if (plan.row_limit[row] as u64) > s.view_begin {
                    let k = fit("partials", out.unit_rows.len() as u64)?;
                    sc.pairs.push((p as u32, k));
                    out.unit_rows.push(row as i32);
                }
            }
            let row_end = out.unit_rows.len();
            if row_end == row_begin {
                continue;
            }
            out.tokens_staged += end - s.view_begin;
            // A row tile that sees less than the split stops at its last visible chunk.
            let mut chunk_end = s.chunk_end;
            if end < s.view_end {
                let (mut cj, mut cv) = (s.chunk_begin, s.view_begin - s.chunk_offset);
                while cv < end {
                    cv += plan.chunks[cj].len as u64;
                    cj += 1;
                }
                chunk_end = cj;
            }
            let fields = [
                fit("view index", s.view_begin)?,
                fit("view index", end)?,
                fit("chunk index", s.chunk_begin as u64)?,
                fit("chunk offset", s.chunk_offset)?,
                fit("chunk index", chunk_end as u64)?,
                row_begin as i32,
                row_end as i32,
                fit("item", item as u64)?,
            ];
            out.units.extend_from_slice(&fields);
        }
    }

    // Each plan partial's lowered partials, in split order: a stable counting sort of
    // the (plan partial, lowered partial) pairs by plan partial.
    let n = plan.item_rows.len();
    sc.lowered_ptr.clear();
    sc.lowered_ptr.resize(n + 1, 0);
    for &(p, _) in &sc.pairs {
        sc.lowered_ptr[p as usize + 1] += 1;
    }
    for i in 0..n {
        sc.lowered_ptr[i + 1] += sc.lowered_ptr[i];
    }
    sc.lowered_ids.clear();
    sc.lowered_ids.resize(sc.pairs.len(), 0);
    for &(p, k) in &sc.pairs {
        let at = &mut sc.lowered_ptr[p as usize];
        sc.lowered_ids[*at] = k;
        *at += 1;
    }
    // `lowered_ptr[p]` now ends partial p's list; it starts where p - 1's ends.
    let lowered_of = |p: usize| {
        let a = if p == 0 { 0 } else { sc.lowered_ptr[p - 1] };
        &sc.lowered_ids[a..sc.lowered_ptr[p]]
    };

    // Merge CSR in view order.
    out.row_part_ptr.push(0);
    for r in 0..plan.num_rows {
        for &p in &plan.row_partials
            [plan.row_partial_ptr[r] as usize..plan.row_partial_ptr[r + 1] as usize]
        {
            out.row_parts.extend_from_slice(lowered_of(p as usize));
        }
        out.row_part_ptr
            .push(fit("partials", out.row_parts.len() as u64)?);
    }
    out.partial_direct.resize(out.unit_rows.len(), 0);
    for r in 0..plan.num_rows {
        let (a, b) = (
            out.row_part_ptr[r] as usize,
            out.row_part_ptr[r + 1] as usize,
        );
        if b - a == 1 {
            out.partial_direct[out.row_parts[a] as usize] = 1;
        } else {
            out.merge_rows.push(r as i32);
        }
    }
    for c in &plan.chunks {
        out.chunk_block.push(fit("block", c.block as u64)?);
        out.chunk_start.push(fit("chunk start", c.start as u64)?);
        out.chunk_len.push(fit("chunk len", c.len as u64)?);
    }
    for &l in &plan.row_limit {
        out.row_limit.push(fit("row limit", l as u64)?);
    }
    Ok(())
}

/// Shapes for [`interpret`]: the K/V cache is `[num_blocks, block_size, num_kv_heads,
/// head_dim]` and q/out `[rows, num_heads, head_dim]`, all f32 here.
#[derive(Debug, Clone, Copy)]
pub struct InterpShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Tokens per K/V tile (the kernel's; the online softmax rescales once per tile).
    pub tile_tokens: usize,
}

/// Rounds to the nearest bf16 (as the kernel's `__float2bfloat16_rn`).
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Executes `lp` on the CPU exactly as the v2 kernels do, in f32: per (unit, kv-head),
/// token tiles of `tile_tokens` staged through the unit's chunk cursor, base-2 logits,
/// per-row online softmax per tile, probabilities rounded to bf16 before `P V` (the tensor
/// cores take bf16) but summed unrounded, partials `(o / l, m + log2 l)`; rows with one
/// partial written directly, the others merged in view order; outputs rounded to bf16.
/// Returns `[rows, num_heads * head_dim]`.
pub fn interpret(
    lp: &LoweredPlan,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    shape: InterpShape,
) -> Vec<f32> {
    let InterpShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
        block_size,
        tile_tokens: tt,
    } = shape;
    let gqa = num_heads / num_kv_heads;
    let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let np = lp.num_partials();
    let mut part_o = vec![0.0f32; np * num_heads * d]; // [partials, heads, d]
    let mut part_lse = vec![f32::NEG_INFINITY; np * num_heads]; // [partials, heads]
    let mut out = vec![0.0f32; lp.num_rows * num_heads * d]; // [rows, heads, d]
    fn kv_at(cache: &[f32], slot: usize, kvh: usize, kv_heads: usize, d: usize) -> &[f32] {
        &cache[(slot * kv_heads + kvh) * d..][..d]
    }
    for u in 0..lp.num_units() {
        let f = lp.unit(u);
        let (vb, ve) = (f[U_VIEW_BEGIN] as usize, f[U_VIEW_END] as usize);
        let (rb, re) = (f[U_ROW_BEGIN] as usize, f[U_ROW_END] as usize);
        for kvh in 0..num_kv_heads {
            // Stacked rows: (partial k, head h) for k in rb..re, h in the kv-head's group.
            let n = (re - rb) * gqa;
            let mut m = vec![f32::NEG_INFINITY; n];
            let mut l = vec![0.0f32; n];
            let mut o = vec![0.0f32; n * d];
            // The chunk cursor: chunk ci starts at view index cv.
            let mut ci = f[U_CHUNK_BEGIN] as usize;
            let mut cv = vb - f[U_CHUNK_OFFSET] as usize;
            let ce = f[U_CHUNK_END] as usize;
            let mut t0 = vb;
            while t0 < ve {
                let t1 = (t0 + tt).min(ve);
                // Slots of the tile's tokens.
                let mut slots = Vec::with_capacity(t1 - t0);
                for v in t0..t1 {
                    while ci < ce && cv + lp.chunk_len[ci] as usize <= v {
                        cv += lp.chunk_len[ci] as usize;
                        ci += 1;
                    }
                    let slot = lp.chunk_block[ci] as usize * block_size
                        + lp.chunk_start[ci] as usize
                        + (v - cv);
                    slots.push(slot);
                }
                for s in 0..n {
                    let (k, h) = (rb + s / gqa, s % gqa);
                    let row = lp.unit_rows[k] as usize;
                    let head = kvh * gqa + h;
                    let qv = &q[(row * num_heads + head) * d..][..d];
                    let lim = (lp.row_limit[row] as usize).min(ve);
                    let scores: Vec<f32> = (t0..t1)
                        .zip(&slots)
                        .map(|(v, &slot)| {
                            if v < lim {
                                let kv = kv_at(k_cache, slot, kvh, num_kv_heads, d);
                                qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale_log2
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect();
                    let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let m_new = m[s].max(mx);
                    if m_new == f32::NEG_INFINITY {
                        continue; // nothing visible yet: state unchanged
                    }
                    let alpha = (m[s] - m_new).exp2();
                    let acc = &mut o[s * d..(s + 1) * d];
                    for x in acc.iter_mut() {
                        *x *= alpha;
                    }
                    let mut sum = 0.0f32;
                    for (&sc, &slot) in scores.iter().zip(&slots) {
                        let p = (sc - m_new).exp2();
                        sum += p;
                        let pb = round_bf16(p);
                        if pb != 0.0 {
                            let vv = kv_at(v_cache, slot, kvh, num_kv_heads, d);
                            for (x, y) in acc.iter_mut().zip(vv) {
                                *x += pb * y;
                            }
                        }
                    }
                    l[s] = l[s] * alpha + sum;
                    m[s] = m_new;
                }
                t0 = t1;
            }
            for s in 0..n {
                let (k, h) = (rb + s / gqa, s % gqa);
                let head = kvh * gqa + h;
                let inv = if l[s] > 0.0 { 1.0 / l[s] } else { 0.0 };
                if lp.partial_direct[k] == 1 {
                    let row = lp.unit_rows[k] as usize;
                    let dst = &mut out[(row * num_heads + head) * d..][..d];
                    for (y, x) in dst.iter_mut().zip(&o[s * d..(s + 1) * d]) {
                        *y = round_bf16(x * inv);
                    }
                } else {
                    let dst = &mut part_o[(k * num_heads + head) * d..][..d];
                    for (y, x) in dst.iter_mut().zip(&o[s * d..(s + 1) * d]) {
                        *y = x * inv;
                    }
                    part_lse[k * num_heads + head] = if l[s] > 0.0 {
                        m[s] + l[s].log2()
                    } else {
                        f32::NEG_INFINITY
                    };
                }
            }
        }
    }
    // The merge kernel: per (merge row, head), partials in view order, in f32.
    for &row in &lp.merge_rows {
        // Padding (-1) and out-of-range entries are skipped, as the merge kernel does.
        let Ok(row) = usize::try_from(row) else {
            continue;
        };
        if row >= lp.num_rows {
            continue;
        }
        let ps = &lp.row_parts[lp.row_part_ptr[row] as usize..lp.row_part_ptr[row + 1] as usize];
        for head in 0..num_heads {
            let (mut m, mut den) = (f32::NEG_INFINITY, 0.0f32);
            let mut acc = vec![0.0f32; d];
            for &p in ps {
                let lse = part_lse[p as usize * num_heads + head];
                if lse == f32::NEG_INFINITY {
                    continue;
                }
                let m_new = m.max(lse);
                let a = (m - m_new).exp2();
                let b = (lse - m_new).exp2();
                den = den * a + b;
                let po = &part_o[(p as usize * num_heads + head) * d..][..d];
                for (x, y) in acc.iter_mut().zip(po) {
                    *x = *x * a + b * y;
                }
                m = m_new;
            }
            let dst = &mut out[(row * num_heads + head) * d..][..d];
            for (y, x) in dst.iter_mut().zip(&acc) {
                *y = if den > 0.0 { round_bf16(x / den) } else { 0.0 };
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
