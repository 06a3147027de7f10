//! What a step hands back (each thread's rows and logits, borrowed from the engine's
//! buffers) and the engine's counters.

use crate::tree::ThreadId;

/// What one step produced for one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadOutput {
    pub thread: ThreadId,
    /// Tokens appended this step (recomputed ones included).
    pub fed: usize,
    /// Its logits rows in the step's `[rows, vocab]` buffer: `first_logit ..
    /// first_logit + logit_rows`. A thread that asked for all logits gets one row per
    /// newly fed token, else one at its last queued token (the next-token distribution)
    /// or none.
    pub first_logit: usize,
    pub logit_rows: usize,
}

/// What one step did. It borrows the engine's buffers: read (or copy) what you need
/// before the next call that changes the engine.
#[derive(Debug, Clone, Copy)]
pub struct StepOutput<'a> {
    /// One entry per thread that ran, in batch order.
    pub threads: &'a [ThreadOutput],
    /// Rows in the fused batch.
    pub rows: usize,
    /// Threads preempted (their tokens queued for recompute) to make room.
    pub preempted: &'a [ThreadId],
    /// Threads with queued tokens that did not fit this step (free blocks or token budget).
    pub waiting: &'a [ThreadId],
    /// `[logit rows, vocab]`: every logits row of the step, threads in batch order.
    pub logits: &'a [f32],
    /// Vocabulary size (the length of one logits row).
    pub vocab: usize,
    /// One token per logits row, chosen by the backend ([`crate::backend::NO_TOKEN`] for
    /// a row whose logits came back instead), after [`crate::Engine::step_sampled`];
    /// empty after [`crate::Engine::step`].
    pub tokens: &'a [u32],
}

impl<'a> StepOutput<'a> {
    /// The logits rows of `t` (one `[vocab]` slice each), in feeding order.
    /// None when the step returned no logits (a sampled step whose rows were all chosen
    /// by the backend, see [`crate::Engine::step_sampled`]).
    pub fn logits_of(&self, t: &ThreadOutput) -> impl ExactSizeIterator<Item = &'a [f32]> {
        let (a, b) = (
            t.first_logit * self.vocab,
            (t.first_logit + t.logit_rows) * self.vocab,
        );
        self.logits
            .get(a..b)
            .unwrap_or_default()
            .chunks_exact(self.vocab.max(1))
    }

    /// The last logits row of `t` (its next-token distribution), if it has one and the
    /// step returned logits.
    pub fn last_logits(&self, t: &ThreadOutput) -> Option<&'a [f32]> {
        self.logits_of(t).last()
    }

    /// The token the backend chose at `t`'s last logits row in a sampled step
    /// ([`crate::Engine::step_sampled`]); None when `t` has no logits row, its row came
    /// back as logits, or the step was not sampled.
    pub fn token_of(&self, t: &ThreadOutput) -> Option<u32> {
        if t.logit_rows == 0 {
            return None;
        }
        self.tokens
            .get(t.first_logit + t.logit_rows - 1)
            .copied()
            .filter(|&tok| tok != crate::backend::NO_TOKEN)
    }
}

pub use crate::plan::PlanCounts;

/// Counters over the engine's life.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    pub steps: u64,
    /// Most blocks in use at once.
    pub blocks_peak: usize,
    /// Most blocks a cache with one private copy per thread would have needed at once.
    pub blocks_without_sharing: usize,
    /// K/V tokens read by attention, summed over steps and layers.
    pub kv_tokens_read: u64,
    /// The same for a per-thread (naive) kernel.
    pub kv_tokens_read_naive: u64,
    /// Most threads in one step's batch.
    pub peak_width: usize,
    /// Block copies made by copy-on-write.
    pub cow_copies: u64,
    /// Preemptions under memory pressure.
    pub preemptions: u64,
    /// Those of them that hit a thread after it had joined children by KV reuse (the case
    /// where the merged children's cache must survive the preemption).
    pub preemptions_after_reuse_join: u64,
}
