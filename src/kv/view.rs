//! A thread's view of the KV cache as a list of spans over reference-counted blocks.
//!
//! A span is a run of consecutive cached tokens, kept as its per-block chunks. The chunk
//! list is shared data: a fork copies a pointer to it (and bumps the blocks' reference
//! counts), never the list, and a list is only changed through the one view that holds it
//! alone. An append extends the tail span's last chunk or adds a chunk, so a view's chunk
//! list is never rebuilt. A join by KV reuse appends a child's own spans; an append into a
//! block another view can still read opens a new span (or copies that block first:
//! copy-on-write).

use super::block_pool::{BlockId, BlockPool};
use std::sync::Arc;

/// Chunks a fresh tail span reserves room for, so a decoding thread's chunk list grows
/// without reallocating for its first `TAIL_CAPACITY` blocks (4,096 tokens at the default
/// block size, as many as the engine's context vectors reserve).
const TAIL_CAPACITY: usize = 256;

/// A piece of a span inside one block: `len` tokens from slot `start` of `block`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub block: BlockId,
    pub start: u32,
    pub len: u32,
}

/// Consecutive cached tokens: the first `used` chunks of a chunk list that several views
/// may share.
#[derive(Debug, Clone)]
pub struct Span {
    /// `[chunks]`: shared between the views that hold this span; at least `used` long.
    chunks: Arc<Vec<Chunk>>,
    /// Chunks of the list this view uses (a prefix of it).
    used: usize,
    /// Tokens in those chunks.
    len: usize,
}

impl PartialEq for Span {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.chunks() == other.chunks()
    }
}

impl Eq for Span {}

impl Span {
    fn new(first: Chunk) -> Self {
        let mut chunks = Vec::with_capacity(TAIL_CAPACITY);
        chunks.push(first);
        Span {
            chunks: Arc::new(chunks),
            used: 1,
            len: first.len as usize,
        }
    }

    fn from_chunks(chunks: Vec<Chunk>) -> Self {
        Span {
            len: chunks.iter().map(|c| c.len as usize).sum(),
            used: chunks.len(),
            chunks: Arc::new(chunks),
        }
    }

    /// The span's per-block chunks, in order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks[..self.used]
    }

    /// Tokens in the span.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a span without tokens (never kept in a view).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// First slot used in the first block.
    pub fn offset(&self) -> usize {
        self.chunks().first().map_or(0, |c| c.start as usize)
    }

    /// Physical blocks in order.
    pub fn blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.chunks().iter().map(|c| c.block)
    }

    /// Identity of the shared chunk list: two spans with the same key hold the same chunk
    /// at every index both use.
    pub fn key(&self) -> usize {
        Arc::as_ptr(&self.chunks) as usize
    }

    /// The chunk list, for an in-place append: cloned only if another view shares it.
    fn chunks_mut(&mut self) -> &mut Vec<Chunk> {
        let v = Arc::make_mut(&mut self.chunks);
        v.truncate(self.used);
        v
    }
}

/// One block copy requested by copy-on-write: copy every slot of `src` into `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
}

/// What an append does when the view's last block is partly filled and another view can
/// still read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharedTail {
    /// Open a new span in a fresh block: no copy, and the shared prefix stays one chunk list
    /// that every sibling reads together (the default).
    #[default]
    NewSpan,
    /// Copy the block first and continue in the copy (vLLM's copy-on-write).
    CopyOnWrite,
}

/// The ordered context a thread attends to. Holds one reference per block occurrence.
#[derive(Debug, Clone, Default)]
pub struct KvView {
    spans: Vec<Span>,
    len: usize,
    /// Bumped by every change other than an append in place at the tail (new span, copy,
    /// truncate, extend, release): equal shapes mean only the tail grew.
    shape: u64,
    /// A copy of the last chunk, so the per-step questions (is there room, which block)
    /// do not chase the span list, its shared list and its buffer for every thread.
    last: Option<Chunk>,
}

impl PartialEq for KvView {
    /// Same tokens in the same blocks (the shape counter is history, not content).
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.spans == other.spans
    }
}

impl Eq for KvView {}

impl KvView {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached tokens in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the view holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The spans, in context order.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Changes when anything but an in-place tail append changed the view.
    pub fn shape(&self) -> u64 {
        self.shape
    }

    /// The last chunk (where the next token goes when it has room).
    pub fn last_chunk(&self) -> Option<Chunk> {
        self.last
    }

    /// Recomputes the copy of the last chunk after a change to the span list.
    fn refresh_last(&mut self) {
        self.last = self.spans.last().and_then(|s| s.chunks().last().copied());
    }

    /// Every block occurrence in the view (one per chunk).
    pub fn block_occurrences(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.spans.iter().flat_map(|s| s.blocks())
    }

    /// The view's chunks, in context order (no copy).
    pub fn chunk_iter(&self) -> impl Iterator<Item = Chunk> + '_ {
        self.spans.iter().flat_map(|s| s.chunks().iter().copied())
    }

    /// A second view of the same tokens (a fork): the chunk lists are shared, reference
    /// counts bumped.
    pub fn share(&self, pool: &mut BlockPool) -> KvView {
        for b in self.block_occurrences() {
            pool.retain(b);
        }
        self.clone()
    }

    /// Drops every reference this view holds.
    pub fn release(&mut self, pool: &mut BlockPool) {
        for b in self.block_occurrences() {
            pool.release(b);
        }
        self.spans.clear();
        self.len = 0;
        self.shape += 1;
        self.last = None;
    }

    /// A new view over tokens `start..` of this one (a child's own part at a join),
    /// holding its own references.
    pub fn suffix(&self, start: usize, pool: &mut BlockPool) -> KvView {
        let mut out = KvView::new();
        let mut seen = 0usize;
        for span in &self.spans {
            let mut own = Vec::new();
            for &c in span.chunks() {
                let (lo, hi) = (seen, seen + c.len as usize);
                seen = hi;
                if hi <= start {
                    continue;
                }
                let skip = start.saturating_sub(lo) as u32;
                pool.retain(c.block);
                own.push(Chunk {
                    block: c.block,
                    start: c.start + skip,
                    len: c.len - skip,
                });
            }
            if !own.is_empty() {
                let s = Span::from_chunks(own);
                out.len += s.len;
                out.spans.push(s);
            }
        }
        out.refresh_last();
        out
    }

    /// Keeps the first `len` tokens and drops the references of every block past them
    /// (preemption by recompute: the dropped tokens are fed again later).
    pub fn truncate(&mut self, len: usize, pool: &mut BlockPool) {
        if len >= self.len {
            return;
        }
        self.shape += 1;
        let mut seen = 0usize;
        let mut keep_spans = 0usize;
        for span in &mut self.spans {
            if seen >= len {
                for b in span.blocks() {
                    pool.release(b);
                }
                continue;
            }
            keep_spans += 1;
            if seen + span.len <= len {
                seen += span.len;
                continue;
            }
            // The cut falls inside this span.
            let keep = len - seen;
            let mut tokens = 0usize;
            let mut chunks = 0usize;
            let mut last_len = 0u32;
            for c in span.chunks() {
                if tokens >= keep {
                    pool.release(c.block);
                    continue;
                }
                chunks += 1;
                last_len = (keep - tokens).min(c.len as usize) as u32;
                tokens += c.len as usize;
            }
            let cut_mid_chunk = span.chunks()[chunks - 1].len != last_len;
            span.used = chunks;
            span.len = keep;
            if cut_mid_chunk {
                if let Some(c) = span.chunks_mut().last_mut() {
                    c.len = last_len;
                }
            }
            seen = len;
        }
        self.spans.truncate(keep_spans);
        self.len = len;
        self.refresh_last();
    }

    /// Appends another view's spans after this one's (a join by KV reuse); takes its references.
    pub fn extend(&mut self, other: KvView) {
        self.len += other.len;
        self.spans.extend(other.spans);
        self.shape += 1;
        self.refresh_last();
    }

    /// Free blocks an append of `n` tokens needs under `tail` (a copy-on-write copy included).
    pub fn blocks_needed(&self, n: usize, pool: &BlockPool, tail: SharedTail) -> usize {
        if n == 0 {
            return 0;
        }
        let bs = pool.block_size();
        let Some(last) = self.last_chunk() else {
            return n.div_ceil(bs);
        };
        let used = (last.start + last.len) as usize % bs;
        let shared = pool.refcount(last.block) > 1;
        match (used, shared, tail) {
            (0, _, _) | (_, true, SharedTail::NewSpan) => n.div_ceil(bs),
            (used, shared, _) => usize::from(shared) + n.saturating_sub(bs - used).div_ceil(bs),
        }
    }

    /// Reserves cache slots (`block * block_size + slot`) for `n` new tokens at the end of
    /// the view. When the tail block is shared, `tail` decides: open a new span in a fresh
    /// block, or copy the tail block (pushed to `copies`) and continue in the copy.
    /// Returns `None`, changing nothing, when the pool has too few free blocks.
    pub fn append(
        &mut self,
        n: usize,
        pool: &mut BlockPool,
        copies: &mut Vec<BlockCopy>,
        tail: SharedTail,
    ) -> Option<Vec<u32>> {
        let mut slots = Vec::with_capacity(n);
        self.append_into(n, pool, copies, tail, &mut slots)
            .then_some(slots)
    }

    /// [`KvView::append`] writing the slots at the end of `slots` (no allocation of its
    /// own when the tail has room). Returns false, changing nothing, when the pool is short.
    pub fn append_into(
        &mut self,
        n: usize,
        pool: &mut BlockPool,
        copies: &mut Vec<BlockCopy>,
        tail: SharedTail,
        slots: &mut Vec<u32>,
    ) -> bool {
        if self.blocks_needed(n, pool, tail) > pool.num_free() {
            return false;
        }
        if n == 0 {
            return true;
        }
        let bs = pool.block_size();
        // Can the tokens go on in the tail span's own chunk list?
        let mut in_place = false;
        if let (Some(last), Some(span)) = (self.last, self.spans.last_mut()) {
            let room = (last.start + last.len) < bs as u32;
            if room && pool.refcount(last.block) > 1 {
                if tail == SharedTail::CopyOnWrite {
                    // Stop using the shared chunk; continue in a copy of its block.
                    let Some(copy) = pool.allocate() else {
                        return false;
                    };
                    copies.push(BlockCopy {
                        src: last.block,
                        dst: copy,
                    });
                    pool.release(last.block);
                    self.shape += 1;
                    span.used -= 1;
                    span.len -= last.len as usize;
                    if span.used == 0 {
                        self.spans.pop();
                    }
                    let copied = Chunk {
                        block: copy,
                        ..last
                    };
                    self.spans.push(Span::new(copied));
                    self.last = Some(copied);
                    in_place = true;
                }
            } else {
                // Another view holding this chunk list would see the change: start a new span.
                in_place = Arc::strong_count(&span.chunks) == 1;
            }
        }
        if !in_place {
            self.shape += 1;
        }
        for i in 0..n {
            let room = self
                .last_chunk()
                .filter(|_| in_place || i > 0)
                .is_some_and(|c| c.start + c.len < bs as u32);
            if room {
                let Some(span) = self.spans.last_mut() else {
                    return false;
                };
                span.len += 1;
                let Some(c) = span.chunks_mut().last_mut() else {
                    return false;
                };
                slots.push(c.block * bs as u32 + c.start + c.len);
                c.len += 1;
                self.last = Some(*c);
            } else {
                let Some(block) = pool.allocate() else {
                    return false;
                };
                let chunk = Chunk {
                    block,
                    start: 0,
                    len: 1,
                };
                slots.push(block * bs as u32);
                match self.spans.last_mut() {
                    Some(span) if in_place || i > 0 => {
                        span.chunks_mut().push(chunk);
                        span.used += 1;
                        span.len += 1;
                    }
                    _ => self.spans.push(Span::new(chunk)),
                }
                self.last = Some(chunk);
            }
        }
        self.len += n;
        true
    }

    /// The view cut into per-block chunks, in context order.
    pub fn chunks(&self, block_size: usize) -> Vec<Chunk> {
        debug_assert!(self
            .chunk_iter()
            .all(|c| (c.start + c.len) as usize <= block_size));
        self.chunk_iter().collect()
    }

    /// Cache slot of every token, in context order.
    pub fn slots(&self, block_size: usize) -> Vec<u32> {
        self.chunk_iter()
            .flat_map(|c| (c.start..c.start + c.len).map(move |s| c.block * block_size as u32 + s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mid_block_span_reports_its_slots_and_blocks_needed() {
        let mut pool = BlockPool::new(16, 4);
        let mut copies = Vec::new();
        let cow = SharedTail::CopyOnWrite;
        let mut parent = KvView::new();
        parent.append(6, &mut pool, &mut copies, cow).expect("room");
        // Tokens 5..6 of the parent: a span starting at offset 1 of its shared second block,
        // ending at slot 2 of it.
        let mut tail = parent.suffix(5, &mut pool);
        assert_eq!((tail.spans()[0].offset(), tail.len()), (1, 1));
        let (b0, b1) = (
            parent.spans()[0].chunks()[0].block,
            parent.spans()[0].chunks()[1].block,
        );
        let slot = |b: u32, s: u32| b * 4 + s;
        assert_eq!(
            parent.slots(4),
            [
                slot(b0, 0),
                slot(b0, 1),
                slot(b0, 2),
                slot(b0, 3),
                slot(b1, 0),
                slot(b1, 1)
            ]
        );
        assert_eq!(tail.slots(4), [slot(b1, 1)]);
        // Copy-on-write: one copy of the shared block holds 2 of 3 new tokens, one more
        // block the third.
        assert_eq!(tail.blocks_needed(3, &pool, cow), 2);
        assert_eq!(tail.blocks_needed(2, &pool, cow), 1);
        // A new span ignores the partial block.
        assert_eq!(tail.blocks_needed(3, &pool, SharedTail::NewSpan), 1);
        tail.release(&mut pool);
        parent.release(&mut pool);
        assert!(pool.all_free());
    }

    #[test]
    fn fork_copies_at_most_the_partial_tail() {
        let mut pool = BlockPool::new(16, 4);
        let mut copies = Vec::new();
        let mut parent = KvView::new();
        let cow = SharedTail::CopyOnWrite;
        parent.append(6, &mut pool, &mut copies, cow).expect("room");
        assert_eq!(pool.num_used(), 2);
        let mut child = parent.share(&mut pool);
        assert_eq!(pool.num_used(), 2, "a fork allocates nothing");
        let slots = child.append(1, &mut pool, &mut copies, cow).expect("room");
        assert_eq!(copies.len(), 1, "one copy of the partial tail");
        assert_eq!(copies[0].src, parent.spans()[0].chunks()[1].block);
        assert_eq!(slots[0] / 4, copies[0].dst);
        assert_eq!(slots[0] % 4, 2);
        // The child's own part starts mid-block in the copy.
        let own = child.suffix(6, &mut pool);
        assert_eq!(own.len(), 1);
        assert_eq!(own.spans()[0].offset(), 2);
        let mut own = own;
        own.release(&mut pool);
        child.release(&mut pool);
        parent.release(&mut pool);
        assert!(pool.all_free());
    }

    #[test]
    fn new_span_policy_copies_nothing() {
        let mut pool = BlockPool::new(16, 4);
        let mut copies = Vec::new();
        let mut parent = KvView::new();
        parent
            .append(6, &mut pool, &mut copies, SharedTail::NewSpan)
            .expect("room");
        let mut child = parent.share(&mut pool);
        child
            .append(3, &mut pool, &mut copies, SharedTail::NewSpan)
            .expect("room");
        assert!(copies.is_empty());
        assert_eq!(child.spans().len(), 2);
        assert_eq!(child.chunks(4)[..2], parent.chunks(4)[..]);
        let mut own = child.suffix(6, &mut pool);
        assert_eq!(own.spans()[0].offset(), 0);
        own.release(&mut pool);
        child.truncate(6, &mut pool);
        assert_eq!(child, parent);
        child.release(&mut pool);
        parent.release(&mut pool);
        assert!(pool.all_free());
    }

    #[test]
    fn append_fails_cleanly_when_pool_is_short() {
        let mut pool = BlockPool::new(1, 2);
        let mut copies = Vec::new();
        let mut v = KvView::new();
        assert!(v
            .append(3, &mut pool, &mut copies, SharedTail::NewSpan)
            .is_none());
        assert_eq!(v.len(), 0);
        assert!(pool.all_free());
    }

    #[test]
    fn shape_changes_unless_the_tail_grows_in_place() {
        let mut pool = BlockPool::new(16, 4);
        let mut copies = Vec::new();
        let ns = SharedTail::NewSpan;
        let mut v = KvView::new();
        assert!(v.is_empty());
        v.append(2, &mut pool, &mut copies, ns).expect("room");
        assert!(!v.is_empty() && !v.spans()[0].is_empty());
        let s0 = v.shape();
        // Its own list: the tail grows in place, across a block boundary too.
        v.append(3, &mut pool, &mut copies, ns).expect("room");
        assert_eq!((v.shape(), v.spans().len()), (s0, 1));
        // A fork's shared tail: the append opens a new span, a new shape.
        let mut child = v.share(&mut pool);
        child.append(1, &mut pool, &mut copies, ns).expect("room");
        assert_eq!(child.spans().len(), 2);
        assert_ne!(child.shape(), s0);
        let s1 = child.shape();
        child.release(&mut pool);
        assert!(child.is_empty());
        assert_ne!(child.shape(), s1);
        v.release(&mut pool);
        assert!(pool.all_free());
    }

    #[test]
    fn an_owned_list_whose_full_last_block_is_shared_grows_in_place() {
        // A join's suffix view owns its chunk list, but its full last block is still held by
        // the child's view: the next token goes to a fresh block in the same span, with no
        // copy and no new span.
        let mut pool = BlockPool::new(16, 4);
        let mut copies = Vec::new();
        let mut parent = KvView::new();
        parent
            .append(8, &mut pool, &mut copies, SharedTail::NewSpan)
            .expect("room");
        assert_eq!(parent.spans()[0].len(), 8);
        let mut own = parent.suffix(4, &mut pool);
        assert_ne!(own, parent, "views of different tokens differ");
        for tail in [SharedTail::NewSpan, SharedTail::CopyOnWrite] {
            let mut v = parent.suffix(4, &mut pool);
            let slots = v.append(1, &mut pool, &mut copies, tail).expect("room");
            assert!(copies.is_empty(), "{tail:?}: a full block is never copied");
            assert_eq!(
                v.spans().len(),
                1,
                "{tail:?}: the owned list grows in place"
            );
            assert_eq!(v.spans()[0].len(), 5);
            assert_eq!(slots[0] % 4, 0, "{tail:?}: a fresh block");
            v.release(&mut pool);
        }
        own.release(&mut pool);
        parent.release(&mut pool);
        assert!(pool.all_free());
    }
}
