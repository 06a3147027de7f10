//! A thread's view of the KV cache as a list of spans over reference-counted blocks.
//!
//! A span is a run of consecutive cached tokens in a chain of blocks, starting `offset`
//! slots into its first block (design notes section 2). A fork clones the span list and
//! bumps reference counts; a join by KV reuse appends a child's own spans; an append into
//! a block another view can still read copies that block first (copy-on-write).

use super::block_pool::{BlockId, BlockPool};

/// Consecutive tokens stored in `blocks`, starting at slot `offset` of `blocks[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Physical blocks in order; the span covers slots `offset .. offset + len` of their concatenation.
    pub blocks: Vec<BlockId>,
    /// First slot used in `blocks[0]`.
    pub offset: usize,
    /// Tokens in the span.
    pub len: usize,
}

/// A piece of a span inside one block: `len` tokens from slot `start` of `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub block: BlockId,
    pub start: u32,
    pub len: u32,
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvView {
    spans: Vec<Span>,
    len: usize,
}

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

    /// Every block occurrence in the view (one per span that uses it).
    pub fn block_occurrences(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.spans.iter().flat_map(|s| s.blocks.iter().copied())
    }

    /// A second view of the same tokens (a fork): metadata only, reference counts bumped.
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
    }

    /// A new view over tokens `start..` of this one (a child's own part at a join),
    /// holding its own references.
    pub fn suffix(&self, start: usize, pool: &mut BlockPool) -> KvView {
        let bs = pool.block_size();
        let mut out = KvView::new();
        let mut seen = 0usize;
        for span in &self.spans {
            let (lo, hi) = (seen, seen + span.len);
            seen = hi;
            if hi <= start {
                continue;
            }
            let skip = start.saturating_sub(lo);
            let first_slot = span.offset + skip;
            let last_slot = span.offset + span.len - 1;
            let blocks = span.blocks[first_slot / bs..=last_slot / bs].to_vec();
            for &b in &blocks {
                pool.retain(b);
            }
            out.len += span.len - skip;
            out.spans.push(Span {
                blocks,
                offset: first_slot % bs,
                len: span.len - skip,
            });
        }
        out
    }

    /// Keeps the first `len` tokens and drops the references of every block past them
    /// (preemption by recompute: the dropped tokens are fed again later).
    pub fn truncate(&mut self, len: usize, pool: &mut BlockPool) {
        if len >= self.len {
            return;
        }
        let bs = pool.block_size();
        let mut seen = 0usize;
        let mut kept = Vec::new();
        for mut span in std::mem::take(&mut self.spans) {
            let keep = len.saturating_sub(seen).min(span.len);
            seen += span.len;
            let used_blocks = if keep == 0 {
                0
            } else {
                (span.offset + keep - 1) / bs + 1
            };
            for &b in &span.blocks[used_blocks..] {
                pool.release(b);
            }
            if keep > 0 {
                span.blocks.truncate(used_blocks);
                span.len = keep;
                kept.push(span);
            }
        }
        self.spans = kept;
        self.len = len;
    }

    /// Appends another view's spans after this one's (a join by KV reuse); takes its references.
    pub fn extend(&mut self, other: KvView) {
        self.len += other.len;
        self.spans.extend(other.spans);
    }

    /// Free blocks an append of `n` tokens needs under `tail` (a copy-on-write copy included).
    pub fn blocks_needed(&self, n: usize, pool: &BlockPool, tail: SharedTail) -> usize {
        if n == 0 {
            return 0;
        }
        let bs = pool.block_size();
        let Some(span) = self.spans.last() else {
            return n.div_ceil(bs);
        };
        let used = (span.offset + span.len) % bs;
        let shared = span.blocks.last().is_some_and(|&b| pool.refcount(b) > 1);
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
        if self.blocks_needed(n, pool, tail) > pool.num_free() {
            return None;
        }
        if n == 0 {
            return Some(Vec::new());
        }
        let bs = pool.block_size();
        let new_span = match self.spans.last() {
            None => true,
            Some(span) => {
                let shared = span.blocks.last().is_some_and(|&b| pool.refcount(b) > 1);
                shared && (span.offset + span.len) % bs != 0 && tail == SharedTail::NewSpan
            }
        };
        if new_span {
            self.spans.push(Span {
                blocks: Vec::new(),
                offset: 0,
                len: 0,
            });
        }
        let mut slots = Vec::with_capacity(n);
        let span = self.spans.last_mut()?;
        for _ in 0..n {
            let end = span.offset + span.len;
            if end % bs == 0 || span.blocks.is_empty() {
                span.blocks.push(pool.allocate()?);
            } else if let Some(last) = span.blocks.last_mut() {
                if pool.refcount(*last) > 1 {
                    let copy = pool.allocate()?;
                    copies.push(BlockCopy {
                        src: *last,
                        dst: copy,
                    });
                    pool.release(*last);
                    *last = copy;
                }
            }
            let block = *span.blocks.last()?;
            slots.push(block * bs as u32 + (end % bs) as u32);
            span.len += 1;
        }
        self.len += n;
        Some(slots)
    }

    /// The view cut into per-block chunks, in context order.
    pub fn chunks(&self, block_size: usize) -> Vec<Chunk> {
        let mut out = Vec::new();
        for span in &self.spans {
            let mut slot = span.offset;
            let end = span.offset + span.len;
            while slot < end {
                let in_block = slot % block_size;
                let take = (block_size - in_block).min(end - slot);
                out.push(Chunk {
                    block: span.blocks[slot / block_size],
                    start: in_block as u32,
                    len: take as u32,
                });
                slot += take;
            }
        }
        out
    }

    /// Cache slot of every token, in context order.
    pub fn slots(&self, block_size: usize) -> Vec<u32> {
        self.chunks(block_size)
            .iter()
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
        assert_eq!((tail.spans()[0].offset, tail.len()), (1, 1));
        let (b0, b1) = (parent.spans()[0].blocks[0], parent.spans()[0].blocks[1]);
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
        assert_eq!(copies[0].src, parent.spans()[0].blocks[1]);
        assert_eq!(slots[0] / 4, copies[0].dst);
        assert_eq!(slots[0] % 4, 2);
        // The child's own part starts mid-block in the copy.
        let own = child.suffix(6, &mut pool);
        assert_eq!(own.len(), 1);
        assert_eq!(own.spans()[0].offset, 2);
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
        assert_eq!(own.spans()[0].offset, 0);
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
}
