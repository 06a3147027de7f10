//! Building a step's batch from the admitted threads: its rows (tokens, positions, slots,
//! which rows want logits), the attention plan, and the step's counters.

use super::{Engine, ThreadOutput};
use crate::backend::Backend;
use crate::plan::PlanInput;

impl<B: Backend> Engine<B> {
    /// Fills the step input from `buf.batch`: one row per token, the plan (updated in
    /// place when it can be), and the counters.
    pub(super) fn build_batch(&mut self) {
        let bs = self.kv.pool().block_size();
        let buf = &mut self.buf;
        let input = &mut buf.input;
        // The step's rows.
        // Per-thread (naive) kernels would read each thread's whole view.
        let mut naive = 0u64;
        for a in buf.batch.iter_mut() {
            let t = &mut self.threads[a.id];
            let len = t.view.len();
            naive += len as u64;
            buf.private_blocks += len.div_ceil(bs) - (len - a.n).div_ceil(bs);
            a.first_row = input.tokens.len() as u32;
            let first_logit = input.logit_rows.len();
            for _ in 0..a.n {
                let Some(p) = t.pending.pop_front() else {
                    break;
                };
                let row = input.tokens.len() as u32;
                input.tokens.push(p.token);
                input.positions.push(p.pos);
                t.own_tokens.push(p.token);
                t.own_pos.push(p.pos);
                // Logits for every fed token, or only for the next-token distribution.
                if p.emit && (t.all_logits || t.pending.is_empty()) {
                    input.logit_rows.push(row);
                }
            }
            buf.outputs.push(ThreadOutput {
                thread: a.id,
                fed: a.n,
                first_logit,
                logit_rows: input.logit_rows.len() - first_logit,
            });
        }
        if cfg!(debug_assertions) || self.cfg.check_invariants {
            for &slot in &input.slots {
                let block = slot / bs as u32;
                assert_eq!(
                    self.kv.pool().refcount(block),
                    1,
                    "engine invariant violated: block {block} written while shared"
                );
            }
        }
        buf.plan_inputs.clear();
        buf.plan_inputs.extend(buf.batch.iter().map(|a| PlanInput {
            key: a.id.index(),
            first_row: a.first_row,
            rows: a.n as u32,
        }));
        self.planner
            .step(&buf.plan_inputs, self.threads.as_slice(), &mut input.plan);
        let layers = self.backend.config().num_layers as u64;
        self.stats.kv_tokens_read += input.plan.kv_tokens_read * layers;
        self.stats.kv_tokens_read_naive += naive * layers;
        self.stats.cow_copies += input.copies.len() as u64;
        self.stats.steps += 1;
        self.stats.peak_width = self.stats.peak_width.max(buf.batch.len());
        self.stats.blocks_without_sharing =
            self.stats.blocks_without_sharing.max(buf.private_blocks);
    }
}
