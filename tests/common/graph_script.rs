//! The CUDA-graph test's script (`tests/gpu_engine.rs`): threads with cache blocks of
//! their own (children sharing their parent's), prefill and decode steps built by hand as
//! the engine would, decode steps choosing tokens through `forward_sampled`. Any backend
//! runs it; `tests/step_counters.rs` runs it on the CPU so the script itself is checked
//! on every `cargo test`.

use spindle::backend::step_program::StepCounters;
use spindle::backend::{Backend, RowPick, RowSampling, StepInput, NO_TOKEN};
use spindle::kv::Chunk;
use spindle::plan::{AttentionMode, AttentionPlan, PlanRow, PlanThread};

/// What a backend did, for the steps of the script (the CUDA backend's counters; nothing
/// on the CPU).
pub trait Snapshot {
    fn snapshot(&self) -> StepCounters {
        StepCounters::default()
    }
}

impl Snapshot for spindle::CpuBackend {}

pub struct World {
    pub bs: usize,
    next_block: u32,
    /// Per thread: its view (chunks), its length, its next token, and whether its last
    /// block is shared (a child appends in a fresh block, never into its parent's).
    views: Vec<(Vec<Chunk>, usize, u32, bool)>,
}

/// What one step gave: token ids, the logits of its `Logits` row, its counters, and the
/// number of chunks in its plan.
pub type StepResult = (Vec<u32>, Vec<f32>, StepCounters, usize);

impl World {
    pub fn new(bs: usize) -> Self {
        Self {
            bs,
            next_block: 0,
            views: Vec::new(),
        }
    }

    /// Appends `n` token slots to thread `t`'s view (fresh blocks as needed); returns
    /// their slots.
    fn grow(&mut self, t: usize, n: usize) -> Vec<u32> {
        let bs = self.bs;
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            let (view, len, _, shared) = &mut self.views[t];
            let last_full = view.last().is_none_or(|c| c.start + c.len == bs as u32);
            if last_full || std::mem::take(shared) {
                view.push(Chunk {
                    block: self.next_block,
                    start: 0,
                    len: 0,
                });
                self.next_block += 1;
            }
            let c = view.last_mut().expect("a chunk");
            slots.push(c.block * bs as u32 + c.start + c.len);
            c.len += 1;
            *len += 1;
        }
        slots
    }

    /// A new thread: a copy of `parent`'s view (shared blocks) or an empty one.
    pub fn thread(&mut self, parent: Option<usize>) -> usize {
        let v = parent.map_or((Vec::new(), 0, 0, false), |p| {
            let (chunks, len, next, _) = self.views[p].clone();
            (chunks, len, next, true)
        });
        self.views.push(v);
        self.views.len() - 1
    }

    /// Prefills `n` tokens of thread `t` (causal rows), greedy token of its last row.
    pub fn prefill<B: Backend + Snapshot>(
        &mut self,
        b: &mut B,
        t: usize,
        n: usize,
    ) -> StepCounters {
        let vocab = b.config().vocab_size;
        let start = self.views[t].1;
        let slots = self.grow(t, n);
        let mut step = StepInput::default();
        let mut rows = Vec::new();
        for (i, &slot) in slots.iter().enumerate() {
            step.tokens.push(((t * 131 + i * 17 + 3) % vocab) as u32);
            step.positions.push((start + i) as u32);
            step.slots.push(slot);
            rows.push(PlanRow {
                row: i as u32,
                limit: (start + i + 1) as u32,
            });
        }
        step.logit_rows.push(n as u32 - 1);
        step.plan = AttentionPlan::build(
            &[PlanThread {
                chunks: self.views[t].0.clone(),
                rows,
            }],
            AttentionMode::Forked,
            0,
        );
        let before = b.snapshot();
        let (mut logits, mut ids) = (Vec::new(), Vec::new());
        let greedy = [RowPick::Sample(RowSampling::GREEDY)];
        b.forward_sampled(&step, &greedy, &mut logits, &mut ids)
            .expect("prefill");
        self.views[t].2 = ids[0];
        b.snapshot().since(&before)
    }

    /// One decode row for each thread of `ts` (every row's logits wanted, in order):
    /// row 0 greedy, row 1 sampled at a uniform from `seed`, row 2 handing its logits
    /// back, the others greedy; each thread then feeds what it got.
    pub fn decode<B: Backend + Snapshot>(
        &mut self,
        b: &mut B,
        ts: &[usize],
        seed: usize,
    ) -> StepResult {
        let vocab = b.config().vocab_size;
        let mut step = StepInput::default();
        let mut threads = Vec::new();
        for (r, &t) in ts.iter().enumerate() {
            let pos = self.views[t].1;
            let slot = self.grow(t, 1)[0];
            step.tokens.push(self.views[t].2);
            step.positions.push(pos as u32);
            step.slots.push(slot);
            step.logit_rows.push(r as u32);
            threads.push(PlanThread {
                chunks: self.views[t].0.clone(),
                rows: vec![PlanRow {
                    row: r as u32,
                    limit: pos as u32 + 1,
                }],
            });
        }
        step.plan = AttentionPlan::build(&threads, AttentionMode::Forked, 0);
        let picks: Vec<RowPick> = (0..ts.len())
            .map(|r| match r {
                1 => RowPick::Sample(RowSampling {
                    temperature: 0.8,
                    top_k: 40,
                    top_p: 0.9,
                    uniform: (seed as f64 * 0.37 + 0.11) % 1.0,
                }),
                2 => RowPick::Logits,
                _ => RowPick::Sample(RowSampling::GREEDY),
            })
            .collect();
        let before = b.snapshot();
        let (mut logits, mut ids) = (Vec::new(), Vec::new());
        b.forward_sampled(&step, &picks, &mut logits, &mut ids)
            .expect("decode step");
        let c = b.snapshot().since(&before);
        assert_eq!(ids.len(), ts.len());
        let row2 = if ts.len() > 2 {
            assert_eq!(ids[2], NO_TOKEN);
            logits[2 * vocab..3 * vocab].to_vec()
        } else {
            Vec::new()
        };
        for (r, &t) in ts.iter().enumerate() {
            self.views[t].2 = if r == 2 {
                spindle::generate::sampler::argmax(&row2)
            } else {
                ids[r]
            };
        }
        (ids, row2, c, step.plan.chunks.len())
    }
}

/// The graph test's script on one backend: its decode steps' results, and the decode steps
/// expected to replay a graph (their indices) or to run eagerly because the step outgrew
/// the bucket's capacities.
pub fn run<B: Backend + Snapshot>(b: &mut B, bs: usize) -> (Vec<StepResult>, Vec<&'static str>) {
    let mut w = World::new(bs);
    let mut out = Vec::new();
    let mut kind = Vec::new();
    // Seven independent short prompts, and a parent with a 100-token prompt whose two
    // children share it (forked items, rows with several partials, views over a tile).
    let small: Vec<usize> = (0..7).map(|_| w.thread(None)).collect();
    for &t in &small {
        w.prefill(b, t, 5);
    }
    let parent = w.thread(None);
    w.prefill(b, parent, 100);
    let kids = [w.thread(Some(parent)), w.thread(Some(parent))];
    let mut seed = 0;
    let mut step = |w: &mut World, b: &mut B, ts: &[usize], k: &'static str| {
        seed += 1;
        out.push(w.decode(b, ts, seed));
        kind.push(k);
    };
    // Bucket 8 with 5, 6 and 7 rows, then with the children (their plans differ in
    // units, partials, chunks and merge rows from step to step).
    step(&mut w, b, &small[..5], "capture");
    step(&mut w, b, &small[..6], "replay");
    step(&mut w, b, &small[..7], "replay");
    let mixed = [small[0], small[1], kids[0], small[2], kids[1]];
    step(&mut w, b, &mixed, "replay");
    step(&mut w, b, &mixed, "replay");
    // An eager prefill larger than the arena (max_step_rows 64) reallocates it: the next
    // graph step must capture again.
    let long = w.thread(None);
    w.prefill(b, long, 4200);
    step(&mut w, b, &mixed, "capture");
    // The long thread's view has more chunks than the bucket's capacity (512 at 8 rows):
    // that step runs eagerly and the capacities grow; the next captures for them.
    let with_long = [small[0], small[1], long, kids[0], small[3]];
    step(&mut w, b, &with_long, "eager");
    step(&mut w, b, &with_long, "capture");
    step(&mut w, b, &with_long, "replay");
    (out, kind)
}
