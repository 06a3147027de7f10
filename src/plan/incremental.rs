//! The engine's planner: builds the step's [`AttentionPlan`] straight from the threads'
//! views and keeps it across steps, so a decode step touches only the rows' growing tails.
//!
//! A full build lays the views into a trie over their shared chunk lists (two views hold
//! the same chunk exactly when they hold the same [`Span`](crate::kv::Span) list at the same
//! index), so grouping costs O(threads x spans), not O(threads x context). It produces the
//! same arrays as [`AttentionPlan::build`] over the views' chunk lists.
//!
//! Between builds, a step whose batch is the same threads, each decoding one token into its
//! own tail (its view's shape unchanged), is applied in place: each row's limit grows by one
//! and its tail item's last chunk grows, or gains a chunk. Anything else (a fork, join,
//! finish, preemption, prefill, a different batch, a tail item reaching the split length)
//! rebuilds. Buffers are reused, so a steady decode step allocates nothing.

use super::{AttentionMode, AttentionPlan};
use crate::kv::{Chunk, KvView};

/// Where the planner finds each thread's view (after this step's appends) by its key.
pub trait ViewSource {
    /// The view of the thread `key`.
    fn view(&self, key: usize) -> &KvView;
}

impl ViewSource for [KvView] {
    fn view(&self, key: usize) -> &KvView {
        &self[key]
    }
}

/// One thread of the step as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanInput {
    /// Who the thread is (stable across steps; the engine's thread id); its view is
    /// `views.view(key)`.
    pub key: usize,
    /// Its first row in the batch; its rows are `first_row .. first_row + rows`.
    pub first_row: u32,
    /// Rows it feeds this step (its last `rows` view tokens), each seeing the view up to
    /// and including its own token.
    pub rows: u32,
}

/// What the last build remembers of one thread, to apply the next decode step in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Remembered {
    key: usize,
    shape: u64,
    len: usize,
    /// The item holding the thread's last tokens, when it serves only this thread's one row.
    tail_item: Option<u32>,
    /// That item's length in tokens.
    tail_len: usize,
}

/// How the planner made each step's plan ([`crate::Engine::plan_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanCounts {
    /// Plans built from the threads' views.
    pub builds: u64,
    /// Plans updated in place from the last step's.
    pub updates: u64,
}

/// Builds and updates the per-step attention plan (see the module docs).
#[derive(Debug)]
pub struct Planner {
    mode: AttentionMode,
    split: usize,
    block_size: usize,
    /// Per batch thread, from the last build or update; empty when the plan cannot be updated.
    memory: Vec<Remembered>,
    /// Full builds and in-place updates so far.
    builds: u64,
    updates: u64,
    // Scratch reused across builds.
    order: Vec<u32>,
    cursor: Vec<Cursor>,
    keys: Vec<(usize, u32, u32)>,
    fill: Vec<u32>,
    inserts: Vec<(u32, Chunk)>,
}

/// Where a thread's walk through its view stands: the next chunk is `spans[span].chunks()[chunk]`.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    span: u32,
    chunk: u32,
}

impl Planner {
    /// A planner for `mode` over blocks of `block_size` tokens whose items are cut at
    /// `split_tokens` (0: never).
    pub fn new(mode: AttentionMode, split_tokens: usize, block_size: usize) -> Self {
        Self {
            mode,
            split: split_tokens,
            block_size: block_size.max(1),
            memory: Vec::new(),
            builds: 0,
            updates: 0,
            order: Vec::new(),
            cursor: Vec::new(),
            keys: Vec::new(),
            fill: Vec::new(),
            inserts: Vec::new(),
        }
    }

    /// How the plans so far were made.
    pub fn counts(&self) -> PlanCounts {
        PlanCounts {
            builds: self.builds,
            updates: self.updates,
        }
    }

    /// Forgets the last plan: the next step builds from scratch.
    pub fn invalidate(&mut self) {
        self.memory.clear();
    }

    /// Makes `plan` this step's plan for `threads` (in batch order, rows consecutive from
    /// 0). `plan` must be the one this planner produced last step (it is updated in place
    /// when it can be), or any plan after [`Planner::invalidate`].
    pub fn step<V: ViewSource + ?Sized>(
        &mut self,
        threads: &[PlanInput],
        views: &V,
        plan: &mut AttentionPlan,
    ) {
        if !self.update(threads, views, plan) {
            self.build(threads, views, plan);
        }
    }

    /// Applies a pure decode step in place, in one pass over the threads; false when it is
    /// not one. A false return may leave `plan` half updated: the caller rebuilds it.
    fn update<V: ViewSource + ?Sized>(
        &mut self,
        threads: &[PlanInput],
        views: &V,
        plan: &mut AttentionPlan,
    ) -> bool {
        if self.memory.len() != threads.len() || threads.is_empty() {
            return false;
        }
        self.inserts.clear();
        for (k, (t, m)) in threads.iter().zip(&mut self.memory).enumerate() {
            let view = views.view(t.key);
            let same = t.key == m.key
                && view.shape() == m.shape
                && view.len() == m.len + 1
                && t.rows == 1
                && t.first_row == k as u32;
            let (Some(item), Some(last), true) = (m.tail_item, view.last_chunk(), same) else {
                return false;
            };
            let end = plan.item_chunk_ptr[item as usize + 1] as usize;
            let tail = &mut plan.chunks[end - 1];
            if tail.block == last.block && tail.start == last.start {
                if tail.len + 1 != last.len {
                    return false;
                }
                tail.len = last.len;
            } else {
                // A new block: the item gains a chunk unless it already reached the split.
                if self.split > 0 && m.tail_len >= self.split {
                    return false;
                }
                self.inserts.push((item, last));
            }
            m.len += 1;
            m.tail_len += 1;
            plan.row_limit[k] += 1;
        }
        plan.kv_tokens_read += threads.len() as u64;
        self.insert_chunks(plan);
        self.updates += 1;
        true
    }

    /// Puts each `(item, chunk)` of `inserts` at the end of its item, in one backward pass
    /// over the items after the first one that grows.
    fn insert_chunks(&mut self, plan: &mut AttentionPlan) {
        if self.inserts.is_empty() {
            return;
        }
        self.inserts.sort_unstable_by_key(|&(item, _)| item);
        let p = &mut *plan;
        let old_len = p.chunks.len();
        let mut shift = self.inserts.len();
        p.chunks.resize(old_len + shift, Chunk::default());
        let first = self.inserts[0].0 as usize;
        let mut next = self.inserts.len();
        for item in (first..p.num_items()).rev() {
            let (s, e) = (
                p.item_chunk_ptr[item] as usize,
                p.item_chunk_ptr[item + 1] as usize,
            );
            let grows = next > 0 && self.inserts[next - 1].0 as usize == item;
            p.item_chunk_ptr[item + 1] = (e + shift) as u32;
            if grows {
                next -= 1;
                p.chunks[e + shift - 1] = self.inserts[next].1;
                shift -= 1;
            }
            p.chunks.copy_within(s..e, s + shift);
        }
    }

    /// Builds the plan from scratch.
    fn build<V: ViewSource + ?Sized>(
        &mut self,
        threads: &[PlanInput],
        views: &V,
        plan: &mut AttentionPlan,
    ) {
        self.builds += 1;
        let p = &mut *plan;
        let num_rows = threads.iter().map(|t| t.rows as usize).sum();
        p.num_rows = num_rows;
        p.row_limit.clear();
        p.row_limit.resize(num_rows, 0);
        for t in threads {
            for i in 0..t.rows {
                p.row_limit[(t.first_row + i) as usize] = row_limit(views.view(t.key).len(), t, i);
            }
        }
        p.item_chunk_ptr.clear();
        p.item_chunk_ptr.push(0);
        p.chunks.clear();
        p.item_view_start.clear();
        p.item_row_ptr.clear();
        p.item_row_ptr.push(0);
        p.item_rows.clear();
        p.kv_tokens_read = 0;
        self.order.clear();
        self.order.extend(0..threads.len() as u32);
        self.cursor.clear();
        self.cursor.resize(threads.len(), Cursor::default());
        match self.mode {
            AttentionMode::Naive => {
                for i in 0..threads.len() {
                    self.emit_run(threads, views, plan, i..i + 1, 0, None);
                }
            }
            AttentionMode::Forked => self.trie(threads, views, plan, 0..threads.len(), 0),
        }
        self.finish(threads, views, plan);
    }

    /// Lays out `order[group]` (threads that share everything before their cursors, which
    /// sit at view index `view_start`).
    fn trie<V: ViewSource + ?Sized>(
        &mut self,
        threads: &[PlanInput],
        views: &V,
        plan: &mut AttentionPlan,
        group: std::ops::Range<usize>,
        view_start: usize,
    ) {
        // Threads with nothing left drop out; the rest keep their order.
        let mut live = group.start;
        for i in group.clone() {
            let t = self.order[i] as usize;
            if !self.at_end(threads, views, t) {
                self.order[live] = t as u32;
                live += 1;
            }
        }
        let group = group.start..live;
        if group.is_empty() {
            return;
        }
        // Partition by the next chunk (its list and index), partitions in order of first
        // appearance, threads in order inside each: sort by (key, position), then order the
        // runs of equal keys by their first position.
        let base = self.keys.len();
        for (pos, i) in group.clone().enumerate() {
            let t = self.order[i] as usize;
            let c = self.cursor[t];
            let key = views.view(threads[t].key).spans()[c.span as usize].key();
            self.keys.push((key, c.chunk, pos as u32));
        }
        let scratch = &mut self.keys[base..];
        scratch.sort_unstable();
        // Runs of equal (key, chunk): rewrite each entry's key as the run's first position
        // and sort again, which orders runs by first appearance and keeps positions inside.
        let mut r = 0;
        while r < scratch.len() {
            let (key, chunk, first) = scratch[r];
            let mut e = r;
            while e < scratch.len() && scratch[e].0 == key && scratch[e].1 == chunk {
                scratch[e].0 = first as usize;
                e += 1;
            }
            r = e;
        }
        scratch.sort_unstable_by_key(|&(first, _, pos)| (first, pos));
        let n = group.len();
        let tail = self.fill.len();
        for j in 0..n {
            let pos = self.keys[base + j].2 as usize;
            self.fill.push(self.order[group.start + pos]);
        }
        for j in 0..n {
            self.order[group.start + j] = self.fill[tail + j];
        }
        self.fill.truncate(tail);
        // Each partition: the runs of equal first position are the partitions.
        let mut parts_start = group.start;
        let mut j = 0;
        while j < n {
            let first = self.keys[base + j].0;
            let mut e = j;
            while e < n && self.keys[base + e].0 == first {
                e += 1;
            }
            let part = parts_start..parts_start + (e - j);
            parts_start = part.end;
            j = e;
            let len = self.emit_shared(threads, views, plan, part.clone(), view_start);
            self.trie(threads, views, plan, part, view_start + len);
        }
        self.keys.truncate(base);
    }

    fn at_end<V: ViewSource + ?Sized>(&self, threads: &[PlanInput], views: &V, t: usize) -> bool {
        (self.cursor[t].span as usize) >= views.view(threads[t].key).spans().len()
    }

    /// Emits the longest run of chunks every thread of `order[part]` shares from its cursor
    /// (all cursors point at the same chunk), moves the cursors past it, and returns its
    /// length in tokens.
    fn emit_shared<V: ViewSource + ?Sized>(
        &mut self,
        threads: &[PlanInput],
        views: &V,
        plan: &mut AttentionPlan,
        part: std::ops::Range<usize>,
        view_start: usize,
    ) -> usize {
        let lead = self.order[part.start] as usize;
        let start = self.cursor[lead];
        // Walk the lead thread's spans while every other thread holds the same list at the
        // same index; inside a shared list the run reaches the shortest holder's end.
        let mut end = start;
        let spans = views.view(threads[lead].key).spans();
        while let Some(span) = spans.get(end.span as usize) {
            let full = span.chunks().len() as u32;
            let mut stop = full;
            for i in part.clone().skip(1) {
                let t = self.order[i] as usize;
                let used = views
                    .view(threads[t].key)
                    .spans()
                    .get(end.span as usize)
                    .filter(|s| s.key() == span.key())
                    .map_or(end.chunk, |s| s.chunks().len() as u32);
                stop = stop.min(used);
            }
            let whole = part.clone().skip(1).all(|i| {
                let t = self.order[i] as usize;
                views
                    .view(threads[t].key)
                    .spans()
                    .get(end.span as usize)
                    .is_some_and(|s| s.chunks().len() as u32 == full)
            });
            if !whole {
                end.chunk = stop;
                break;
            }
            // Every holder uses the whole list: go on while they all go on alike.
            end = Cursor {
                span: end.span + 1,
                chunk: 0,
            };
            let next = spans.get(end.span as usize).map(|s| s.key());
            let alike = next.is_some()
                && part.clone().skip(1).all(|i| {
                    let t = self.order[i] as usize;
                    views
                        .view(threads[t].key)
                        .spans()
                        .get(end.span as usize)
                        .map(|s| s.key())
                        == next
                });
            if !alike {
                break;
            }
        }
        let len = self.emit_run(
            threads,
            views,
            plan,
            part.clone(),
            view_start,
            Some((start, end)),
        );
        for i in part {
            let t = self.order[i] as usize;
            self.cursor[t] = normalize(views.view(threads[t].key), end);
        }
        len
    }

    /// Emits the item(s) for the chunks of `order[part][0]`'s view from `range.0` to
    /// `range.1` (all of it when `None`), read by every row of `order[part]` that sees them;
    /// returns the run's length in tokens.
    fn emit_run<V: ViewSource + ?Sized>(
        &mut self,
        threads: &[PlanInput],
        views: &V,
        plan: &mut AttentionPlan,
        part: std::ops::Range<usize>,
        view_start: usize,
        range: Option<(Cursor, Cursor)>,
    ) -> usize {
        let lead = self.order[part.start] as usize;
        let spans = views.view(threads[lead].key).spans();
        let (from, to) = range.unwrap_or((
            Cursor::default(),
            Cursor {
                span: spans.len() as u32,
                chunk: 0,
            },
        ));
        let last_span = (to.span as usize).min(spans.len().saturating_sub(1));
        let range_of = |s: usize| {
            let c0 = if s == from.span as usize {
                from.chunk
            } else {
                0
            } as usize;
            let c1 = if s == to.span as usize {
                to.chunk as usize
            } else {
                spans[s].chunks().len()
            };
            (c0, c1.max(c0))
        };
        let count: usize = (from.span as usize..=last_span)
            .filter(|&s| s < spans.len())
            .map(|s| {
                let (c0, c1) = range_of(s);
                c1 - c0
            })
            .sum();
        let mut start = view_start;
        let mut piece_len = 0usize;
        let mut total = 0usize;
        let mut k = 0usize;
        for s in (from.span as usize..=last_span).filter(|&s| s < spans.len()) {
            let (c0, c1) = range_of(s);
            for &chunk in &spans[s].chunks()[c0..c1] {
                plan.chunks.push(chunk);
                piece_len += chunk.len as usize;
                total += chunk.len as usize;
                k += 1;
                if k == count || (self.split > 0 && piece_len >= self.split) {
                    self.push_item(threads, views, plan, part.clone(), start, piece_len);
                    start += piece_len;
                    piece_len = 0;
                }
            }
        }
        total
    }

    /// Closes the item of the chunks pushed since the last item: `len` tokens from
    /// `view_start`, read by the rows of `order[part]` that see past `view_start`.
    fn push_item<V: ViewSource + ?Sized>(
        &self,
        threads: &[PlanInput],
        views: &V,
        plan: &mut AttentionPlan,
        part: std::ops::Range<usize>,
        view_start: usize,
        len: usize,
    ) {
        let p = &mut *plan;
        let rows_before = p.item_rows.len();
        let mut max_limit = 0usize;
        for i in part {
            let t = &threads[self.order[i] as usize];
            let view_len = views.view(t.key).len();
            // Row j sees `view_len - rows + j + 1` tokens: those past `view_start` see the item.
            let first = (view_start + t.rows as usize).saturating_sub(view_len);
            for j in first..t.rows as usize {
                p.item_rows.push(t.first_row + j as u32);
            }
            if first < t.rows as usize {
                max_limit = max_limit.max(view_len);
            }
        }
        if p.item_rows.len() == rows_before {
            // No row sees any of it: nothing to read.
            let keep = p.item_chunk_ptr[p.item_chunk_ptr.len() - 1] as usize;
            p.chunks.truncate(keep);
            return;
        }
        p.kv_tokens_read += (max_limit - view_start).min(len) as u64;
        p.item_chunk_ptr.push(p.chunks.len() as u32);
        p.item_view_start.push(view_start as u32);
        p.item_row_ptr.push(p.item_rows.len() as u32);
    }

    /// Orders every row's partials (already in view order: items come root to leaf) and
    /// remembers each thread's tail for the next step.
    fn finish<V: ViewSource + ?Sized>(
        &mut self,
        threads: &[PlanInput],
        views: &V,
        plan: &mut AttentionPlan,
    ) {
        let p = &mut *plan;
        p.row_partial_ptr.clear();
        p.row_partial_ptr.resize(p.num_rows + 1, 0);
        for &r in &p.item_rows {
            p.row_partial_ptr[r as usize + 1] += 1;
        }
        for r in 0..p.num_rows {
            p.row_partial_ptr[r + 1] += p.row_partial_ptr[r];
        }
        self.fill.clear();
        self.fill
            .extend_from_slice(&p.row_partial_ptr[..p.num_rows]);
        p.row_partials.clear();
        p.row_partials.resize(p.item_rows.len(), 0);
        for (idx, &r) in p.item_rows.iter().enumerate() {
            let at = &mut self.fill[r as usize];
            p.row_partials[*at as usize] = idx as u32;
            *at += 1;
        }
        self.fill.clear();
        // Each thread's tail: the item of its row's last partial, if that item serves
        // only this row and ends at the view's end.
        self.memory.clear();
        let item_of = |partial: u32| {
            p.item_row_ptr
                .partition_point(|&ptr| ptr <= partial)
                .saturating_sub(1)
        };
        for t in threads {
            let mut m = Remembered {
                key: t.key,
                shape: views.view(t.key).shape(),
                len: views.view(t.key).len(),
                tail_item: None,
                tail_len: 0,
            };
            let r = t.first_row as usize;
            let (a, b) = (
                p.row_partial_ptr[r] as usize,
                p.row_partial_ptr[r + 1] as usize,
            );
            if t.rows == 1 && b > a {
                let item = item_of(p.row_partials[b - 1]);
                let one_row = p.item_row_ptr[item + 1] - p.item_row_ptr[item] == 1;
                let len: usize = p.chunks
                    [p.item_chunk_ptr[item] as usize..p.item_chunk_ptr[item + 1] as usize]
                    .iter()
                    .map(|c| c.len as usize)
                    .sum();
                let ends = p.item_view_start[item] as usize + len == views.view(t.key).len();
                if one_row && ends {
                    m.tail_item = Some(item as u32);
                    m.tail_len = len;
                }
            }
            self.memory.push(m);
        }
        // Room for the tails to grow by chunks until the next build, without reallocating.
        let per_tail = if self.split > 0 {
            self.split.div_ceil(self.block_size) + 2
        } else {
            64
        };
        let headroom = threads.len() * per_tail;
        p.chunks.reserve(headroom);
        self.inserts.clear();
        self.inserts.reserve(threads.len());
        // And for the next build to add an item per thread (a tail passing the split)
        // without reallocating.
        let n = threads.len();
        p.item_chunk_ptr.reserve(n);
        p.item_view_start.reserve(n);
        p.item_row_ptr.reserve(n);
        p.item_rows.reserve(2 * n);
        p.row_partials.reserve(2 * n);
    }
}

/// Moves a cursor that sits at the end of a span to the start of the next one.
fn normalize(view: &KvView, mut c: Cursor) -> Cursor {
    let spans = view.spans();
    while (c.span as usize) < spans.len()
        && c.chunk as usize >= spans[c.span as usize].chunks().len()
    {
        c = Cursor {
            span: c.span + 1,
            chunk: 0,
        };
    }
    c
}

/// View tokens row `i` of `t` may see.
fn row_limit(view_len: usize, t: &PlanInput, i: u32) -> u32 {
    (view_len - t.rows as usize + i as usize + 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{BlockPool, SharedTail};
    use crate::plan::{PlanRow, PlanThread};

    fn grow(v: &mut KvView, n: usize, pool: &mut BlockPool) {
        assert!(v
            .append(n, pool, &mut Vec::new(), SharedTail::NewSpan)
            .is_some());
    }

    /// [`AttentionPlan::build`] over the same threads.
    fn scratch(
        views: &[KvView],
        threads: &[PlanInput],
        mode: AttentionMode,
        split: usize,
        bs: usize,
    ) -> AttentionPlan {
        let pts: Vec<PlanThread> = threads
            .iter()
            .map(|t| PlanThread {
                chunks: views[t.key].chunks(bs),
                rows: (0..t.rows)
                    .map(|i| PlanRow {
                        row: t.first_row + i,
                        limit: row_limit(views[t.key].len(), t, i),
                    })
                    .collect(),
            })
            .collect();
        AttentionPlan::build(&pts, mode, split)
    }

    #[test]
    fn counts_builds_and_updates_and_tails_grow_in_reserved_room() {
        // One thread decoding without a split: the first step builds, the next ones
        // update in place (6 new blocks) inside the room the build reserved.
        let bs = 4;
        let mut pool = BlockPool::new(64, bs);
        let mut views = vec![KvView::new()];
        grow(&mut views[0], 5, &mut pool);
        let threads = [PlanInput {
            key: 0,
            first_row: 0,
            rows: 1,
        }];
        let mut planner = Planner::new(AttentionMode::Forked, 0, bs);
        let mut plan = AttentionPlan::default();
        planner.step(&threads, &views[..], &mut plan);
        assert_eq!(
            planner.counts(),
            PlanCounts {
                builds: 1,
                updates: 0
            }
        );
        let cap = plan.chunks.capacity();
        for s in 0..24 {
            grow(&mut views[0], 1, &mut pool);
            planner.step(&threads, &views[..], &mut plan);
            let want = scratch(&views, &threads, AttentionMode::Forked, 0, bs);
            assert_eq!(plan, want, "step {s}");
        }
        assert_eq!(
            planner.counts(),
            PlanCounts {
                builds: 1,
                updates: 24
            }
        );
        assert_eq!(
            plan.chunks.capacity(),
            cap,
            "the tail grew without reallocating"
        );
        // After invalidate, even a pure decode step builds from scratch.
        grow(&mut views[0], 1, &mut pool);
        planner.invalidate();
        planner.step(&threads, &views[..], &mut plan);
        assert_eq!(
            planner.counts(),
            PlanCounts {
                builds: 2,
                updates: 24
            }
        );
        assert_eq!(
            plan,
            scratch(&views, &threads, AttentionMode::Forked, 0, bs)
        );
    }

    #[test]
    fn a_build_leaves_room_for_an_item_per_thread() {
        // Four separate threads: the next build may add an item (and a partial) per thread
        // without reallocating.
        let bs = 4;
        let mut pool = BlockPool::new(64, bs);
        let mut views: Vec<KvView> = (0..4).map(|_| KvView::new()).collect();
        for (i, v) in views.iter_mut().enumerate() {
            grow(v, 3 + i, &mut pool);
        }
        let threads: Vec<PlanInput> = (0..4)
            .map(|k| PlanInput {
                key: k,
                first_row: k as u32,
                rows: 1,
            })
            .collect();
        let mut planner = Planner::new(AttentionMode::Forked, 8, bs);
        let mut plan = AttentionPlan::default();
        planner.step(&threads, &views[..], &mut plan);
        assert_eq!(
            plan,
            scratch(&views, &threads, AttentionMode::Forked, 8, bs)
        );
        let room = |v: &Vec<u32>| v.capacity() - v.len();
        assert!(room(&plan.item_chunk_ptr) >= 4);
        assert!(room(&plan.item_view_start) >= 4);
        assert!(room(&plan.item_row_ptr) >= 4);
        assert!(room(&plan.item_rows) >= 8);
        assert!(room(&plan.row_partials) >= 8);
    }
}
