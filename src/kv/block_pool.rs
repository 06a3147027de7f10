//! Block pool: fixed-size KV blocks with reference counts and a free list (vLLM's block manager).
//!
//! The pool only does bookkeeping: which physical block ids are free and how many views
//! reference each one. The K/V storage itself lives in the backend, indexed by block id.

/// A physical block id in the KV cache.
pub type BlockId = u32;

/// Reference-counted pool of `num_blocks` blocks of `block_size` tokens each.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    refcount: Vec<u32>,
    free: Vec<BlockId>,
    peak_used: usize,
}

impl BlockPool {
    /// A pool with every block free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            block_size,
            refcount: vec![0; num_blocks],
            // Pop from the back: hand out low ids first, which keeps tests readable.
            free: (0..num_blocks as BlockId).rev().collect(),
            peak_used: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks not referenced by any view.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use right now.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Highest number of blocks in use at once since creation (or the last reset).
    pub fn peak_used(&self) -> usize {
        self.peak_used
    }

    /// Forget the peak (start of a new measurement).
    pub fn reset_peak(&mut self) {
        self.peak_used = self.num_used();
    }

    /// Takes a free block with reference count 1, or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.free.pop()?;
        self.refcount[id as usize] = 1;
        self.peak_used = self.peak_used.max(self.num_used());
        Some(id)
    }

    /// One more view references `id`.
    pub fn retain(&mut self, id: BlockId) {
        let rc = &mut self.refcount[id as usize];
        debug_assert!(*rc > 0, "retain of free block {id}");
        *rc += 1;
    }

    /// One view stops referencing `id`; the block is freed when nobody does.
    pub fn release(&mut self, id: BlockId) {
        let rc = &mut self.refcount[id as usize];
        debug_assert!(*rc > 0, "double release of block {id}");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(id);
        }
    }

    /// How many views reference `id`.
    pub fn refcount(&self, id: BlockId) -> u32 {
        self.refcount[id as usize]
    }

    /// True when every block is free (nothing leaked).
    pub fn all_free(&self) -> bool {
        self.free.len() == self.refcount.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_exhausted_then_reuse() {
        let mut pool = BlockPool::new(2, 4);
        let a = pool.allocate().expect("first block");
        let b = pool.allocate().expect("second block");
        assert_ne!(a, b);
        assert_eq!(pool.allocate(), None);
        pool.retain(a);
        pool.release(a);
        assert_eq!(pool.num_free(), 0, "still referenced once");
        pool.release(a);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.peak_used(), 2);
        pool.release(a);
        pool.release(b);
        assert!(pool.all_free());
    }
}
