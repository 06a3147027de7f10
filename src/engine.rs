//! The engine: threads of many requests over one block pool, and the fused step that runs
//! every active thread's pending tokens in one forward pass.
//!
//! The engine is mechanism only: callers (the replay driver, the generation scheduler)
//! decide what to feed, when to fork and how to join.

use crate::backend::{Backend, StepInput};
use crate::error::{Result, SpindleError};
use crate::kv::{BlockPool, KvView, SharedTail};
use crate::model;
use crate::plan::{AttentionMode, AttentionPlan, PlanThread};
use crate::tree::{JoinKind, Pending, Thread, ThreadId, ThreadState, MAX_POSITION};
use std::collections::BTreeSet;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Which attention plan the step uses.
    pub mode: AttentionMode,
    /// Longest attention work item (tokens) before it is split.
    pub split_tokens: usize,
    /// Most tokens one step may carry, over all threads.
    pub max_step_tokens: usize,
    /// Most tokens one thread may feed in one step (prefill chunk).
    pub prefill_chunk: usize,
    /// What an append into a shared, partly filled block does.
    pub shared_tail: SharedTail,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            mode: AttentionMode::Forked,
            split_tokens: 512,
            max_step_tokens: 4096,
            prefill_chunk: 512,
            shared_tail: SharedTail::NewSpan,
        }
    }
}

/// What one step produced for one thread.
#[derive(Debug, Clone)]
pub struct ThreadOutput {
    pub thread: ThreadId,
    /// Tokens appended this step (recomputed ones included).
    pub fed: usize,
    /// `[rows][vocab]` logits, in order: at every newly fed token when the thread asked for
    /// all logits, else only at its last queued token (the next-token distribution).
    pub logits: Vec<Vec<f32>>,
}

/// What one step did.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub threads: Vec<ThreadOutput>,
    /// Rows in the fused batch.
    pub rows: usize,
    /// Threads preempted (their tokens queued for recompute) to make room.
    pub preempted: Vec<ThreadId>,
    /// Threads with queued tokens that did not fit this step (free blocks or token budget).
    pub waiting: Vec<ThreadId>,
}

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

/// Threads, block pool and backend.
pub struct Engine<B: Backend> {
    backend: B,
    pool: BlockPool,
    threads: Vec<Thread>,
    /// Threads not yet retired, oldest first: what every per-step scan walks, so a long
    /// run's retired threads cost nothing per step.
    live: BTreeSet<ThreadId>,
    cfg: EngineConfig,
    stats: EngineStats,
}

impl<B: Backend> Engine<B> {
    /// An engine over `backend`'s cache.
    pub fn new(backend: B, cfg: EngineConfig) -> Self {
        let pool = BlockPool::new(backend.num_blocks(), backend.block_size());
        Self {
            backend,
            pool,
            threads: Vec::new(),
            live: BTreeSet::new(),
            cfg,
            stats: EngineStats::default(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The block pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Engine settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.blocks_peak = self.pool.peak_used();
        s
    }

    /// Clears the counters (and the pool's peak).
    pub fn reset_stats(&mut self) {
        self.stats = EngineStats::default();
        self.pool.reset_peak();
    }

    /// A thread by id.
    pub fn thread(&self, id: ThreadId) -> Result<&Thread> {
        self.threads
            .get(id)
            .ok_or_else(|| SpindleError::InvalidRequest(format!("no thread {id}")))
    }

    fn thread_mut(&mut self, id: ThreadId) -> Result<&mut Thread> {
        self.threads
            .get_mut(id)
            .ok_or_else(|| SpindleError::InvalidRequest(format!("no thread {id}")))
    }

    /// All threads ever created (retired ones included).
    pub fn threads(&self) -> &[Thread] {
        &self.threads
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.backend.config().vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(&token) => Err(SpindleError::TokenOutOfVocab { token, vocab }),
            None => Ok(()),
        }
    }

    /// Starts a request: a root thread with `prompt` queued at positions 0, 1, 2, ...
    pub fn add_request(&mut self, prompt: &[u32]) -> Result<ThreadId> {
        let positions: Vec<u32> = (0..prompt.len() as u32).collect();
        self.add_request_with_positions(prompt, &positions)
    }

    /// Starts a request whose prompt tokens carry explicit positions (a flattened tree
    /// context, for example); later tokens continue after the largest one.
    pub fn add_request_with_positions(
        &mut self,
        prompt: &[u32],
        positions: &[u32],
    ) -> Result<ThreadId> {
        self.check_tokens(prompt)?;
        if positions.len() != prompt.len() {
            return Err(SpindleError::InvalidRequest(format!(
                "{} prompt tokens but {} positions",
                prompt.len(),
                positions.len()
            )));
        }
        let id = self.threads.len();
        let mut t = Thread {
            id,
            request: id,
            parent: None,
            path: Vec::new(),
            state: ThreadState::Active,
            children: Vec::new(),
            view: KvView::new(),
            ctx_tokens: Vec::new(),
            ctx_pos: Vec::new(),
            next_pos: 0,
            fork_len: 0,
            pinned_len: 0,
            reuse_joins: 0,
            fork_pos: 0,
            pending: Default::default(),
            returns: None,
            tokens_fed: 0,
            release_on_finish: false,
            all_logits: false,
        };
        for (&token, &pos) in prompt.iter().zip(positions) {
            t.pending.push_back(Pending {
                token,
                pos,
                emit: true,
            });
        }
        if let Some(&p) = positions.iter().find(|&&p| p >= MAX_POSITION) {
            return Err(SpindleError::InvalidRequest(format!(
                "position {p} is past the largest supported position {}",
                MAX_POSITION - 1
            )));
        }
        t.next_pos = positions.iter().max().map_or(0, |p| p + 1);
        self.threads.push(t);
        self.live.insert(id);
        Ok(id)
    }

    /// Asks for logits at every token `id` feeds (teacher forcing, scoring) instead of only
    /// at its last queued token (generation). Children forked later inherit the setting.
    pub fn set_all_logits(&mut self, id: ThreadId, all: bool) -> Result<()> {
        self.thread_mut(id)?.all_logits = all;
        Ok(())
    }

    /// Queues tokens on an active thread.
    pub fn feed(&mut self, id: ThreadId, tokens: &[u32]) -> Result<()> {
        self.check_tokens(tokens)?;
        let t = self.thread_mut(id)?;
        if t.state != ThreadState::Active {
            return Err(SpindleError::InvalidRequest(format!(
                "feed to thread {id} in state {:?}",
                t.state
            )));
        }
        check_positions(t.next_pos, tokens.len())?;
        t.feed(tokens);
        Ok(())
    }

    /// Forks `n` children off `id` once its queued tokens are cached. With `share_context`
    /// each child starts with the parent's context and next position (metadata only);
    /// without it (APR) a child starts empty at position 0.
    pub fn fork(&mut self, id: ThreadId, n: usize, share_context: bool) -> Result<Vec<ThreadId>> {
        self.fork_with(id, n, share_context, None)
    }

    /// [`Engine::fork`] when the join is known in advance: children of a re-prefill join
    /// give their blocks back as soon as they finish (only their tokens are needed).
    pub fn fork_with(
        &mut self,
        id: ThreadId,
        n: usize,
        share_context: bool,
        join: Option<JoinKind>,
    ) -> Result<Vec<ThreadId>> {
        let parent = self.thread(id)?;
        if parent.state != ThreadState::Active || !parent.pending.is_empty() {
            return Err(SpindleError::InvalidRequest(format!(
                "fork of thread {id}: it must be active with no queued tokens"
            )));
        }
        if n == 0 {
            return Err(SpindleError::InvalidRequest(format!(
                "fork of thread {id} with no children"
            )));
        }
        let parent = parent.clone();
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let cid = self.threads.len();
            let mut path = parent.path.clone();
            path.push(i as u32);
            let (view, ctx_tokens, ctx_pos, pos) = if share_context {
                (
                    parent.view.share(&mut self.pool),
                    parent.ctx_tokens.clone(),
                    parent.ctx_pos.clone(),
                    parent.next_pos,
                )
            } else {
                (KvView::new(), Vec::new(), Vec::new(), 0)
            };
            self.threads.push(Thread {
                id: cid,
                request: parent.request,
                parent: Some(id),
                path,
                state: ThreadState::Active,
                children: Vec::new(),
                fork_len: view.len(),
                pinned_len: view.len(),
                reuse_joins: 0,
                view,
                ctx_tokens,
                ctx_pos,
                next_pos: pos,
                fork_pos: pos,
                pending: Default::default(),
                returns: None,
                tokens_fed: 0,
                release_on_finish: join == Some(JoinKind::Reprefill),
                all_logits: parent.all_logits,
            });
            self.live.insert(cid);
            ids.push(cid);
        }
        let p = self.thread_mut(id)?;
        p.state = ThreadState::Waiting;
        p.children = ids.clone();
        Ok(ids)
    }

    /// Marks a thread as ended. It must have no queued tokens. A child keeps its cache
    /// until its parent joins it; a root releases everything.
    pub fn finish(&mut self, id: ThreadId) -> Result<()> {
        self.thread(id)?;
        let t = &mut self.threads[id];
        if t.state != ThreadState::Active || !t.pending.is_empty() {
            return Err(SpindleError::InvalidRequest(format!(
                "finish of thread {id}: it must be active with no queued tokens"
            )));
        }
        t.state = ThreadState::Finished;
        if t.release_on_finish {
            t.view.release(&mut self.pool);
        }
        if t.parent.is_none() {
            self.retire(id);
        }
        Ok(())
    }

    /// Sets the tokens a child hands back at a re-prefill join instead of its transcript.
    pub fn set_returns(&mut self, id: ThreadId, tokens: &[u32]) -> Result<()> {
        self.check_tokens(tokens)?;
        self.thread_mut(id)?.returns = Some(tokens.to_vec());
        Ok(())
    }

    /// Releases the cached K/V of a finished child whose work returns by re-prefill (its
    /// transcript and returns are kept), so memory frees before its siblings end. A reuse
    /// join of a released child merges nothing.
    pub fn release_cache(&mut self, id: ThreadId) -> Result<()> {
        let t = self
            .threads
            .get_mut(id)
            .ok_or_else(|| SpindleError::InvalidRequest(format!("no thread {id}")))?;
        if t.state != ThreadState::Finished || t.parent.is_none() {
            return Err(SpindleError::InvalidRequest(format!(
                "release_cache of thread {id}: it must be a finished child"
            )));
        }
        t.view.release(&mut self.pool);
        Ok(())
    }

    /// True when every child of `id` has finished.
    pub fn children_done(&self, id: ThreadId) -> bool {
        self.threads.get(id).is_some_and(|t| {
            t.children
                .iter()
                .all(|&c| self.threads[c].state == ThreadState::Finished)
        })
    }

    /// Joins the finished children of `id`. Reuse: the parent's context gains their own
    /// cached tokens and its position jumps past the longest child. Re-prefill: their
    /// transcripts (or returns) are queued on the parent; the number queued is returned.
    pub fn join(&mut self, id: ThreadId, kind: JoinKind) -> Result<usize> {
        let parent = self.thread(id)?;
        if parent.state != ThreadState::Waiting || !self.children_done(id) {
            return Err(SpindleError::InvalidRequest(format!(
                "join of thread {id}: it must be waiting on finished children"
            )));
        }
        let children = parent.children.clone();
        let p = parent.next_pos;
        if kind == JoinKind::Reuse {
            if let Some(&c) = children.iter().find(|&&c| {
                let t = &self.threads[c];
                t.view.len() < t.ctx_tokens.len()
            }) {
                return Err(SpindleError::InvalidRequest(format!(
                    "reuse join of thread {id}: child {c} gave its cache back (forked for a re-prefill join)"
                )));
            }
        }
        let mut queued = Vec::new();
        let mut own_views = Vec::new();
        let mut extent = 0u32;
        for &c in &children {
            let child = &self.threads[c];
            match kind {
                JoinKind::Reuse => {
                    let own = child.view.suffix(child.fork_len, &mut self.pool);
                    // A child whose cache was released contributes nothing.
                    let start = child.fork_len;
                    let end = start + own.len();
                    own_views.push((
                        own,
                        child.ctx_tokens[start..end].to_vec(),
                        child.ctx_pos[start..end].to_vec(),
                    ));
                    extent = extent.max(child.next_pos.saturating_sub(p));
                }
                JoinKind::Reprefill => match &child.returns {
                    Some(r) => queued.extend_from_slice(r),
                    None => queued.extend_from_slice(child.transcript()),
                },
            }
            self.retire(c);
        }
        let parent = self.thread_mut(id)?;
        parent.state = ThreadState::Active;
        parent.children.clear();
        for (view, toks, pos) in own_views {
            parent.view.extend(view);
            parent.ctx_tokens.extend(toks);
            parent.ctx_pos.extend(pos);
        }
        if kind == JoinKind::Reuse {
            parent.next_pos = p.saturating_add(extent);
            parent.pinned_len = parent.view.len();
            parent.reuse_joins += 1;
        }
        check_positions(parent.next_pos, queued.len())?;
        parent.feed(&queued);
        Ok(queued.len())
    }

    /// Releases a thread's blocks (and its unjoined descendants').
    fn retire(&mut self, id: ThreadId) {
        let children = std::mem::take(&mut self.threads[id].children);
        for c in children {
            self.retire(c);
        }
        let t = &mut self.threads[id];
        t.view.release(&mut self.pool);
        t.pending.clear();
        t.state = ThreadState::Retired;
        self.live.remove(&id);
    }

    /// Drops what a retired thread still remembers (its context tokens and positions), once
    /// the caller has read what it needs, so a long run's memory does not grow with every
    /// thread it ever ran. The id stays valid.
    pub fn forget(&mut self, id: ThreadId) -> Result<()> {
        let t = self.thread_mut(id)?;
        if t.state != ThreadState::Retired {
            return Err(SpindleError::InvalidRequest(format!(
                "forget of thread {id}: only a retired thread can be forgotten"
            )));
        }
        t.ctx_tokens = Vec::new();
        t.ctx_pos = Vec::new();
        t.returns = None;
        Ok(())
    }

    /// Cancels a request: releases every thread of it.
    pub fn cancel(&mut self, request: ThreadId) -> Result<()> {
        if self.thread(request)?.parent.is_some() {
            return Err(SpindleError::InvalidRequest(format!(
                "cancel of thread {request}: only a request's root thread can be cancelled"
            )));
        }
        self.retire(request);
        Ok(())
    }

    /// True when some active thread has queued tokens.
    pub fn has_work(&self) -> bool {
        self.live.iter().any(|&id| {
            let t = &self.threads[id];
            t.state == ThreadState::Active && !t.pending.is_empty()
        })
    }

    /// Preemption by recompute: drops the thread's own cached tokens past its fork point and
    /// queues them again (with their positions), so nothing is lost.
    fn preempt(&mut self, id: ThreadId) {
        let t = &mut self.threads[id];
        let keep = t.pinned_len;
        let mut requeue: Vec<Pending> = t.ctx_tokens[keep..]
            .iter()
            .zip(&t.ctx_pos[keep..])
            .map(|(&token, &pos)| Pending {
                token,
                pos,
                emit: false,
            })
            .collect();
        requeue.extend(t.pending.drain(..));
        t.pending = requeue.into();
        t.view.truncate(keep, &mut self.pool);
        t.ctx_tokens.truncate(keep);
        t.ctx_pos.truncate(keep);
        self.stats.preemptions += 1;
        if t.reuse_joins > 0 {
            self.stats.preemptions_after_reuse_join += 1;
        }
    }

    /// Runs one fused step: every active thread's next queued tokens (a prefill chunk or
    /// one decode token) in one forward pass. Threads the pool cannot hold wait; if none
    /// fits, the youngest running thread is preempted.
    pub fn step(&mut self) -> Result<StepOutput> {
        let bs = self.pool.block_size();
        let mut out = StepOutput::default();
        let candidates: Vec<ThreadId> = self
            .live
            .iter()
            .copied()
            .filter(|&id| {
                let t = &self.threads[id];
                t.state == ThreadState::Active && !t.pending.is_empty()
            })
            .collect();
        if candidates.is_empty() {
            return Ok(out);
        }
        // Admission: oldest first, within the step's token budget and the free blocks.
        let mut batch: Vec<(ThreadId, usize, Vec<u32>)> = Vec::new();
        let mut copies = Vec::new();
        let mut budget = self.cfg.max_step_tokens.max(1);
        loop {
            for &id in &candidates {
                if budget == 0 || batch.iter().any(|b| b.0 == id) {
                    continue;
                }
                let t = &mut self.threads[id];
                let n = t
                    .pending
                    .len()
                    .min(self.cfg.prefill_chunk.max(1))
                    .min(budget);
                if let Some(slots) =
                    t.view
                        .append(n, &mut self.pool, &mut copies, self.cfg.shared_tail)
                {
                    budget -= n;
                    batch.push((id, n, slots));
                }
            }
            if !batch.is_empty() {
                break;
            }
            // Nothing fits: preempt the youngest thread that holds blocks of its own.
            let victim = self
                .live
                .iter()
                .rev()
                .map(|&id| &self.threads[id])
                .find(|t| {
                    t.state == ThreadState::Active
                        && t.view.len() > t.pinned_len
                        && t.id != candidates[0]
                });
            match victim.map(|t| t.id) {
                Some(v) => {
                    self.preempt(v);
                    out.preempted.push(v);
                }
                None => {
                    let thread = candidates[0];
                    return Err(SpindleError::ThreadDoesNotFit {
                        thread,
                        request: self.threads[thread].request,
                        free: self.pool.num_free(),
                        block_size: bs,
                    });
                }
            }
        }
        out.waiting = candidates
            .iter()
            .copied()
            .filter(|id| !batch.iter().any(|b| b.0 == *id))
            .collect();
        // Build the step's rows and the plan.
        let mut step = StepInput {
            copies,
            ..Default::default()
        };
        let mut plan_threads = Vec::with_capacity(batch.len());
        let mut emit_rows: Vec<Vec<bool>> = Vec::with_capacity(batch.len());
        for (id, n, slots) in &batch {
            let t = &mut self.threads[*id];
            let mut rows = Vec::with_capacity(*n);
            let mut emits = Vec::with_capacity(*n);
            for (i, slot) in slots.iter().enumerate() {
                let Some(p) = t.pending.pop_front() else {
                    break;
                };
                let row = step.tokens.len() as u32;
                step.tokens.push(p.token);
                step.positions.push(p.pos);
                step.slots.push(*slot);
                t.ctx_tokens.push(p.token);
                t.ctx_pos.push(p.pos);
                let limit = (t.view.len() - n + i + 1) as u32;
                rows.push((row, limit));
                if p.emit {
                    t.tokens_fed += 1;
                }
                // Logits for every fed token, or only for the next-token distribution.
                let emit = p.emit && (t.all_logits || t.pending.is_empty());
                if emit {
                    step.logit_rows.push(row);
                }
                emits.push(emit);
            }
            plan_threads.push(PlanThread {
                chunks: t.view.chunks(bs),
                rows,
            });
            emit_rows.push(emits);
        }
        if cfg!(debug_assertions) {
            for &slot in &step.slots {
                let block = slot / bs as u32;
                debug_assert_eq!(
                    self.pool.refcount(block),
                    1,
                    "block {block} written while shared"
                );
            }
        }
        step.plan = AttentionPlan::build(&plan_threads, self.cfg.mode, self.cfg.split_tokens);
        let naive: u64 = plan_threads
            .iter()
            .map(|t| t.rows.iter().map(|r| r.1 as u64).max().unwrap_or(0))
            .sum();
        let layers = self.backend.config().num_layers as u64;
        self.stats.kv_tokens_read += step.plan.kv_tokens_read * layers;
        self.stats.kv_tokens_read_naive += naive * layers;
        self.stats.cow_copies += step.copies.len() as u64;
        self.stats.steps += 1;
        self.stats.peak_width = self.stats.peak_width.max(batch.len());
        let private: usize = self
            .live
            .iter()
            .map(|&id| self.threads[id].view.len().div_ceil(bs))
            .sum();
        self.stats.blocks_without_sharing = self.stats.blocks_without_sharing.max(private);

        let logits = model::forward(&mut self.backend, &step)?;
        let vocab = self.backend.config().vocab_size;
        let mut rows = logits.chunks_exact(vocab);
        out.rows = step.tokens.len();
        for ((id, n, _), emits) in batch.iter().zip(emit_rows) {
            let mut l = Vec::new();
            for e in emits {
                if e {
                    l.push(rows.next().map(<[f32]>::to_vec).unwrap_or_default());
                }
            }
            out.threads.push(ThreadOutput {
                thread: *id,
                fed: *n,
                logits: l,
            });
        }
        Ok(out)
    }

    /// Recounts every block reference from the live views and compares with the pool
    /// (a consistency check for tests).
    pub fn check_refcounts(&self) -> std::result::Result<(), String> {
        let mut counts = vec![0u32; self.pool.num_blocks()];
        for t in &self.threads {
            for b in t.view.block_occurrences() {
                counts[b as usize] += 1;
            }
        }
        for (b, &c) in counts.iter().enumerate() {
            if self.pool.refcount(b as u32) != c {
                return Err(format!(
                    "block {b}: pool says {} references, views hold {c}",
                    self.pool.refcount(b as u32)
                ));
            }
        }
        Ok(())
    }
}

/// Checks that `n` tokens fed from position `next` stay within [`MAX_POSITION`].
fn check_positions(next: u32, n: usize) -> Result<()> {
    if next as usize + n > MAX_POSITION as usize {
        return Err(SpindleError::InvalidRequest(format!(
            "{n} tokens from position {next} would pass the largest supported position {}",
            MAX_POSITION - 1
        )));
    }
    Ok(())
}
