//! Synthetic decode steps for the host-side tests of the CUDA step: W threads over a
//! shared prefix, as the engine would batch them.

use spindle::backend::StepInput;
use spindle::kv::Chunk;
use spindle::plan::{AttentionMode, AttentionPlan, PlanRow, PlanThread};

/// A decode step of `w` threads over a shared `prefix`-token prefix (16-token blocks
/// `0..prefix / 16`), thread t with a tail of `1 + (t + age) % 16` tokens in block
/// `prefix / 16 + t`: one row each, seeing its whole view.
pub fn decode_step(w: usize, prefix: u32, age: usize) -> (StepInput, usize) {
    const BS: u32 = 16;
    let shared: Vec<Chunk> = (0..prefix / BS)
        .map(|b| Chunk {
            block: b,
            start: 0,
            len: BS,
        })
        .collect();
    let mut step = StepInput::default();
    let mut threads = Vec::new();
    for t in 0..w {
        let tail = 1 + ((t + age) % 16) as u32;
        let block = prefix / BS + t as u32;
        let mut chunks = shared.clone();
        chunks.push(Chunk {
            block,
            start: 0,
            len: tail,
        });
        step.tokens.push((t * 7 + age) as u32);
        step.positions.push(prefix + tail - 1);
        step.slots.push(block * BS + tail - 1);
        step.logit_rows.push(t as u32);
        threads.push(PlanThread {
            chunks,
            rows: vec![PlanRow {
                row: t as u32,
                limit: prefix + tail,
            }],
        });
    }
    step.plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
    (step, (prefix / BS) as usize + w)
}
