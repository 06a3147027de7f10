//! Generation policy: how wide and deep the tree may grow and how many tokens threads and
//! requests may generate. Defaults suit a real 8B reasoning model (ThreadWeaver-style
//! Qwen3-8B): forks of up to 8 threads, one level of nesting below the first, 2k tokens per
//! thread and 16k per request.

/// Limits on the trees a request may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Most children one fork may have; outlines past it are dropped (reported).
    pub max_width: usize,
    /// Deepest thread a fork may create (root = 0): a thread at depth `max_depth` cannot
    /// fork; its fork tags are kept as text (reported).
    pub max_depth: usize,
    /// Most tokens a child thread may generate (the root is bounded by the request budget).
    pub thread_budget: usize,
    /// Most tokens all threads of a request may generate together. A fork splits what the
    /// forking thread's share has left evenly between its children (each child's subtree
    /// gets that much), so where a thread is cut never depends on scheduling: the same
    /// request and seed give the same tokens alone, batched, or in memory-pressure waves.
    pub request_budget: usize,
    /// Blocks to keep free for the threads already running when a fork starts children.
    /// Children that do not fit wait and start as others finish (waves).
    pub reserve_blocks: usize,
    /// Tokens of growth planned per started child when counting how many fit: the child's
    /// budget, capped here so that a generous budget does not serialise every fork.
    pub child_growth_tokens: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_width: 8,
            max_depth: 2,
            thread_budget: 2048,
            request_budget: 16384,
            reserve_blocks: 0,
            child_growth_tokens: 512,
        }
    }
}

impl Policy {
    /// Tokens one new child is planned to append: its prime and planned growth. The
    /// blocks they take are the engine's answer ([`crate::Engine::blocks_needed`]: the
    /// child's view, its shared tail block and the copy-on-write setting), not the
    /// policy's.
    pub fn planned_tokens(&self, prime_len: usize) -> usize {
        prime_len + self.thread_budget.min(self.child_growth_tokens)
    }
}
