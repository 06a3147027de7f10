//! The KV cache manager: the one place the engine touches blocks. Every thread's view
//! grows, forks, joins, shrinks and is freed through it, over one block pool (in the
//! spirit of vLLM v1's KV cache manager: allocate slots for a thread's next n tokens, free
//! a thread). The views stay in the threads' records, where the step reads them; the
//! manager holds the pool and the rule for appends into a shared tail block.

use super::block_pool::BlockPool;
use super::view::{BlockCopy, KvView, SharedTail};

/// The block pool and the operations that change block references.
#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    tail: SharedTail,
}

impl KvManager {
    /// A manager over `num_blocks` blocks of `block_size` tokens; appends into a shared,
    /// partly filled block follow `tail`.
    pub fn new(num_blocks: usize, block_size: usize, tail: SharedTail) -> Self {
        Self {
            pool: BlockPool::new(num_blocks, block_size),
            tail,
        }
    }

    /// The pool, to read.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    /// What an append into a shared, partly filled block does.
    pub fn shared_tail(&self) -> SharedTail {
        self.tail
    }

    /// Free blocks an append of `n` tokens to `view` needs (a copy-on-write copy included).
    pub fn blocks_needed(&self, view: &KvView, n: usize) -> usize {
        view.blocks_needed(n, &self.pool, self.tail)
    }

    /// Reserves cache slots for `n` new tokens at the end of `view`: the slots
    /// (`block * block_size + slot`) are pushed to `slots`, copy-on-write block copies to
    /// `copies`. False, changing nothing, when the pool has too few free blocks.
    pub fn allocate(
        &mut self,
        view: &mut KvView,
        n: usize,
        copies: &mut Vec<BlockCopy>,
        slots: &mut Vec<u32>,
    ) -> bool {
        view.append_into(n, &mut self.pool, copies, self.tail, slots)
    }

    /// A second view of the same tokens (a fork's child): chunk lists shared, references
    /// taken.
    pub fn fork(&mut self, view: &KvView) -> KvView {
        view.share(&mut self.pool)
    }

    /// A new view of tokens `start..` of `view` holding its own references (a child's own
    /// part, taken at a join by KV reuse).
    pub fn suffix(&mut self, view: &KvView, start: usize) -> KvView {
        view.suffix(start, &mut self.pool)
    }

    /// Keeps the first `len` tokens of `view` and gives back the blocks past them
    /// (preemption by recompute).
    pub fn truncate(&mut self, view: &mut KvView, len: usize) {
        view.truncate(len, &mut self.pool);
    }

    /// Gives back every block reference `view` holds; the view is left empty.
    pub fn free(&mut self, view: &mut KvView) {
        view.release(&mut self.pool);
    }

    /// Clears the pool's peak-use counter.
    pub fn reset_peak(&mut self) {
        self.pool.reset_peak();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_allocate_and_free_balance_the_pool() {
        let mut kv = KvManager::new(8, 4, SharedTail::NewSpan);
        let (mut copies, mut slots) = (Vec::new(), Vec::new());
        let mut parent = KvView::new();
        assert!(kv.allocate(&mut parent, 6, &mut copies, &mut slots));
        assert_eq!(slots, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(kv.pool().num_used(), 2);
        let mut child = kv.fork(&parent);
        assert_eq!(kv.pool().refcount(1), 2, "the fork shares the tail block");
        // The child's append cannot go on in the shared, partly filled block: a new one.
        assert_eq!(kv.blocks_needed(&child, 1), 1);
        slots.clear();
        assert!(kv.allocate(&mut child, 1, &mut copies, &mut slots));
        assert_eq!(slots, vec![8]);
        assert!(copies.is_empty());
        let mut own = kv.suffix(&child, 6);
        assert_eq!(own.len(), 1);
        kv.truncate(&mut child, 6);
        assert_eq!(
            kv.pool().refcount(2),
            1,
            "only the suffix holds the new block"
        );
        kv.free(&mut own);
        kv.free(&mut child);
        kv.free(&mut parent);
        assert!(kv.pool().all_free());
        // Too little room: nothing changes.
        let mut big = KvView::new();
        slots.clear();
        assert!(!kv.allocate(&mut big, 33, &mut copies, &mut slots));
        assert!(big.is_empty() && slots.is_empty() && kv.pool().all_free());
    }
}
