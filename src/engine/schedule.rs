//! Scheduling a step: which threads run (oldest first, within the token budget and the
//! free blocks), who waits, and preemption by recompute when nothing fits.

use super::{Admitted, Engine, EngineStats};
use crate::backend::Backend;
use crate::error::{Result, SpindleError};
use crate::kv::KvManager;
use crate::tree::{Pending, Thread, ThreadState};

impl<B: Backend> Engine<B> {
    /// Clears the step buffers and admits this step's threads into `buf.batch` (their
    /// slots reserved), preempting when nothing fits; fills `buf.waiting`. False when no
    /// thread has work.
    pub(super) fn admit(&mut self) -> Result<bool> {
        let bs = self.kv.block_size();
        let buf = &mut self.buf;
        buf.candidates.clear();
        buf.batch.clear();
        buf.outputs.clear();
        buf.preempted.clear();
        buf.waiting.clear();
        let input = &mut buf.input;
        input.tokens.clear();
        input.positions.clear();
        input.slots.clear();
        input.logit_rows.clear();
        input.copies.clear();
        // One pass over the live threads: the candidates, and the blocks the live threads
        // would hold without sharing (the batch's appends are added in `build_batch`).
        let mut private = 0usize;
        for &id in &self.live {
            let t = &self.threads[id];
            private += t.view.len().div_ceil(bs);
            if t.state == ThreadState::Active && !t.pending.is_empty() {
                buf.candidates.push(id);
            }
        }
        buf.private_blocks = private;
        if buf.candidates.is_empty() {
            return Ok(false);
        }
        // Admission: oldest first, within the step's token budget and the free blocks.
        // A pass that admits nobody preempts one thread and starts over, so every pass
        // starts with an empty batch.
        loop {
            let mut budget = self.cfg.max_step_tokens.max(1);
            for &id in &buf.candidates {
                if budget == 0 {
                    break;
                }
                let t = &mut self.threads[id];
                let n = t
                    .pending
                    .len()
                    .min(self.cfg.prefill_chunk.max(1))
                    .min(budget);
                if self
                    .kv
                    .allocate(&mut t.view, n, &mut input.copies, &mut input.slots)
                {
                    budget -= n;
                    buf.batch.push(Admitted {
                        id,
                        n,
                        first_row: 0,
                    });
                }
            }
            if !buf.batch.is_empty() {
                break;
            }
            // Nothing fits: preempt the youngest thread that holds blocks of its own.
            let first = buf.candidates[0];
            let victim = self.live.iter().rev().copied().find(|&id| {
                let t = &self.threads[id];
                t.state == ThreadState::Active && t.view.len() > t.pinned_len && id != first
            });
            match victim {
                Some(v) => {
                    let t = &mut self.threads[v];
                    buf.private_blocks -= t.view.len().div_ceil(bs);
                    preempt(t, &mut self.kv, &mut self.stats);
                    buf.private_blocks += t.view.len().div_ceil(bs);
                    buf.preempted.push(v);
                }
                None => {
                    return Err(SpindleError::ThreadDoesNotFit {
                        thread: first,
                        request: self.threads[first].request,
                        free: self.kv.pool().num_free(),
                        block_size: bs,
                    });
                }
            }
        }
        // Who waits: the candidates not admitted (the batch is a subsequence of them).
        let mut admitted = buf.batch.iter().map(|a| a.id).peekable();
        for &id in &buf.candidates {
            if admitted.peek() == Some(&id) {
                admitted.next();
            } else {
                buf.waiting.push(id);
            }
        }
        Ok(true)
    }
}

/// Preemption by recompute: drops the thread's own cached tokens past its pinned length and
/// queues them again (with their positions) before its queued ones, so nothing is lost.
fn preempt(t: &mut Thread, kv: &mut KvManager, stats: &mut EngineStats) {
    let keep = t.pinned_len;
    // The pinned part holds the fork point, so the dropped tokens are all the thread's own.
    let own_keep = keep.saturating_sub(t.fork_len);
    let requeue = t.own_tokens[own_keep..]
        .iter()
        .zip(&t.own_pos[own_keep..])
        .rev()
        .map(|(&token, &pos)| Pending {
            token,
            pos,
            emit: false,
        });
    for p in requeue {
        t.pending.push_front(p);
    }
    kv.truncate(&mut t.view, keep);
    t.own_tokens.truncate(own_keep);
    t.own_pos.truncate(own_keep);
    stats.preemptions += 1;
    if t.reuse_joins > 0 {
        stats.preemptions_after_reuse_join += 1;
    }
}
