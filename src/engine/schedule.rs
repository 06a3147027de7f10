//! Scheduling a step: which threads run (oldest first, within the token budget and the
//! free blocks), who waits, and preemption by recompute when nothing fits.

use super::{Admitted, Engine, EngineStats};
use crate::backend::Backend;
use crate::error::{Result, SpindleError};
use crate::kv::BlockPool;
use crate::tree::{Pending, Thread, ThreadState};

impl<B: Backend> Engine<B> {
    /// Clears the step buffers and admits this step's threads into `buf.batch` (their
    /// slots reserved), preempting when nothing fits; fills `buf.waiting`. False when no
    /// thread has work.
    pub(super) fn admit(&mut self) -> Result<bool> {
        let bs = self.pool.block_size();
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
        for &id in &self.live {
            let t = &self.threads[id];
            if t.state == ThreadState::Active && !t.pending.is_empty() {
                buf.candidates.push(id);
            }
        }
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
                if t.view.append_into(
                    n,
                    &mut self.pool,
                    &mut input.copies,
                    self.cfg.shared_tail,
                    &mut input.slots,
                ) {
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
                    preempt(&mut self.threads[v], &mut self.pool, &mut self.stats);
                    buf.preempted.push(v);
                }
                None => {
                    return Err(SpindleError::ThreadDoesNotFit {
                        thread: first,
                        request: self.threads[first].request,
                        free: self.pool.num_free(),
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
fn preempt(t: &mut Thread, pool: &mut BlockPool, stats: &mut EngineStats) {
    let keep = t.pinned_len;
    let requeue = t.ctx_tokens[keep..]
        .iter()
        .zip(&t.ctx_pos[keep..])
        .rev()
        .map(|(&token, &pos)| Pending {
            token,
            pos,
            emit: false,
        });
    for p in requeue {
        t.pending.push_front(p);
    }
    t.view.truncate(keep, pool);
    t.ctx_tokens.truncate(keep);
    t.ctx_pos.truncate(keep);
    stats.preemptions += 1;
    if t.reuse_joins > 0 {
        stats.preemptions_after_reuse_join += 1;
    }
}
