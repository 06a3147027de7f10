//! The engine: threads of many requests over one block pool, and the fused step that runs
//! every active thread's pending tokens in one forward pass.
//!
//! The engine is mechanism only: callers (the replay driver, the generation scheduler)
//! decide what to feed, when to fork and how to join.

use crate::backend::{Backend, StepInput};
use crate::error::{Operation, Result, SpindleError};
use crate::kv::{BlockPool, KvView, SharedTail};
use crate::model;
use crate::plan::{AttentionMode, PlanInput, Planner, ViewSource};
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
    /// Most children one fork may create.
    pub max_fork_width: usize,
    /// Deepest nesting of forks (a root is depth 0).
    pub max_fork_depth: usize,
    /// Check the engine's invariants after every call that changes it and panic on a
    /// violation (a bug detector for tests; see [`Engine::check_invariants`]).
    pub check_invariants: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            mode: AttentionMode::Forked,
            split_tokens: 512,
            max_step_tokens: 4096,
            prefill_chunk: 512,
            shared_tail: SharedTail::NewSpan,
            max_fork_width: 1024,
            max_fork_depth: 64,
            check_invariants: false,
        }
    }
}

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
}

impl<'a> StepOutput<'a> {
    /// The logits rows of `t` (one `[vocab]` slice each), in feeding order.
    pub fn logits_of(&self, t: &ThreadOutput) -> impl ExactSizeIterator<Item = &'a [f32]> {
        let (a, b) = (
            t.first_logit * self.vocab,
            (t.first_logit + t.logit_rows) * self.vocab,
        );
        self.logits[a..b].chunks_exact(self.vocab.max(1))
    }

    /// The last logits row of `t` (its next-token distribution), if it has one.
    pub fn last_logits(&self, t: &ThreadOutput) -> Option<&'a [f32]> {
        self.logits_of(t).last()
    }
}

/// A thread admitted to this step: `n` tokens, rows `first_row ..`.
#[derive(Debug, Clone, Copy)]
struct Admitted {
    id: ThreadId,
    n: usize,
    first_row: u32,
}

/// Buffers one step fills, kept across steps so a steady decode step allocates nothing.
#[derive(Debug, Default)]
struct StepBuffers {
    input: StepInput,
    candidates: Vec<ThreadId>,
    batch: Vec<Admitted>,
    outputs: Vec<ThreadOutput>,
    plan_inputs: Vec<PlanInput>,
    preempted: Vec<ThreadId>,
    waiting: Vec<ThreadId>,
    /// `[logit rows, vocab]`.
    logits: Vec<f32>,
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
    planner: Planner,
    buf: StepBuffers,
}

impl<B: Backend> Engine<B> {
    /// An engine over `backend`'s cache.
    pub fn new(backend: B, cfg: EngineConfig) -> Self {
        let pool = BlockPool::new(backend.num_blocks(), backend.block_size());
        let planner = Planner::new(cfg.mode, cfg.split_tokens, backend.block_size());
        Self {
            backend,
            pool,
            threads: Vec::new(),
            live: BTreeSet::new(),
            cfg,
            stats: EngineStats::default(),
            planner,
            buf: StepBuffers::default(),
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
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`] for an id the engine never gave out.
    pub fn thread(&self, id: ThreadId) -> Result<&Thread> {
        self.threads
            .get(id)
            .ok_or(SpindleError::UnknownThread { thread: id })
    }

    fn thread_mut(&mut self, id: ThreadId) -> Result<&mut Thread> {
        self.threads
            .get_mut(id)
            .ok_or(SpindleError::UnknownThread { thread: id })
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
    ///
    /// # Errors
    /// [`SpindleError::TokenOutOfVocab`] for a token past the vocabulary;
    /// [`SpindleError::PositionOverflow`] for a prompt longer than the largest position.
    pub fn add_request(&mut self, prompt: &[u32]) -> Result<ThreadId> {
        let positions: Vec<u32> = (0..prompt.len() as u32).collect();
        self.add_request_with_positions(prompt, &positions)
    }

    /// Starts a request whose prompt tokens carry explicit positions (a flattened tree
    /// context, for example); later tokens continue after the largest one.
    ///
    /// # Errors
    /// [`SpindleError::TokenOutOfVocab`]; [`SpindleError::PositionsMismatch`] when the
    /// lengths differ; [`SpindleError::PositionOverflow`] for a position past the largest.
    pub fn add_request_with_positions(
        &mut self,
        prompt: &[u32],
        positions: &[u32],
    ) -> Result<ThreadId> {
        self.check_tokens(prompt)?;
        if positions.len() != prompt.len() {
            return Err(SpindleError::PositionsMismatch {
                tokens: prompt.len(),
                positions: positions.len(),
            });
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
            ctx_tokens: Vec::with_capacity(prompt.len() + CONTEXT_ROOM),
            ctx_pos: Vec::with_capacity(prompt.len() + CONTEXT_ROOM),
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
            return Err(SpindleError::PositionOverflow {
                next: p as u64,
                tokens: 1,
                max: MAX_POSITION - 1,
            });
        }
        t.next_pos = positions.iter().max().map_or(0, |p| p + 1);
        self.threads.push(t);
        self.live.insert(id);
        self.after_change();
        Ok(id)
    }

    /// Asks for logits at every token `id` feeds (teacher forcing, scoring) instead of only
    /// at its last queued token (generation). Children forked later inherit the setting.
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`].
    pub fn set_all_logits(&mut self, id: ThreadId, all: bool) -> Result<()> {
        self.thread_mut(id)?.all_logits = all;
        Ok(())
    }

    /// Queues tokens on an active thread.
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`]; [`SpindleError::TokenOutOfVocab`];
    /// [`SpindleError::WrongState`] unless the thread is active;
    /// [`SpindleError::PositionOverflow`] past the largest position.
    pub fn feed(&mut self, id: ThreadId, tokens: &[u32]) -> Result<()> {
        self.check_tokens(tokens)?;
        let t = self.thread_mut(id)?;
        if t.state != ThreadState::Active {
            return Err(wrong_state(t, Operation::Feed, "an active thread"));
        }
        check_positions(t.next_pos, tokens.len())?;
        t.feed(tokens);
        self.after_change();
        Ok(())
    }

    /// Forks `n` children off `id` once its queued tokens are cached. With `share_context`
    /// each child starts with the parent's context and next position (metadata only);
    /// without it (APR) a child starts empty at position 0.
    ///
    /// # Errors
    /// As [`Engine::fork_with`].
    pub fn fork(&mut self, id: ThreadId, n: usize, share_context: bool) -> Result<Vec<ThreadId>> {
        self.fork_with(id, n, share_context, None)
    }

    /// [`Engine::fork`] when the join is known in advance: children of a re-prefill join
    /// give their blocks back as soon as they finish (only their tokens are needed).
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`]; [`SpindleError::WrongState`] unless the thread is
    /// active with nothing queued; [`SpindleError::EmptyFork`] for `n == 0`;
    /// [`SpindleError::ForkTooWide`] / [`SpindleError::ForkTooDeep`] past
    /// [`EngineConfig::max_fork_width`] / [`EngineConfig::max_fork_depth`].
    pub fn fork_with(
        &mut self,
        id: ThreadId,
        n: usize,
        share_context: bool,
        join: Option<JoinKind>,
    ) -> Result<Vec<ThreadId>> {
        let parent = self.thread(id)?;
        if parent.state != ThreadState::Active || !parent.pending.is_empty() {
            return Err(wrong_state(
                parent,
                Operation::Fork,
                "an active thread with no queued tokens",
            ));
        }
        if n == 0 {
            return Err(SpindleError::EmptyFork { thread: id });
        }
        if n > self.cfg.max_fork_width {
            return Err(SpindleError::ForkTooWide {
                thread: id,
                requested: n,
                max: self.cfg.max_fork_width,
            });
        }
        if parent.depth() >= self.cfg.max_fork_depth {
            return Err(SpindleError::ForkTooDeep {
                thread: id,
                depth: parent.depth() + 1,
                max: self.cfg.max_fork_depth,
            });
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
                    with_room(&parent.ctx_tokens),
                    with_room(&parent.ctx_pos),
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
        self.after_change();
        Ok(ids)
    }

    /// Marks a thread as ended. It must have no queued tokens. A child keeps its cache
    /// until its parent joins it; a root releases everything.
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`]; [`SpindleError::WrongState`] unless the thread is
    /// active with nothing queued.
    pub fn finish(&mut self, id: ThreadId) -> Result<()> {
        self.thread(id)?;
        let t = &mut self.threads[id];
        if t.state != ThreadState::Active || !t.pending.is_empty() {
            return Err(wrong_state(
                t,
                Operation::Finish,
                "an active thread with no queued tokens",
            ));
        }
        t.state = ThreadState::Finished;
        if t.release_on_finish {
            t.view.release(&mut self.pool);
        }
        if t.parent.is_none() {
            self.retire(id);
        }
        self.after_change();
        Ok(())
    }

    /// Sets the tokens a child hands back at a re-prefill join instead of its transcript.
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`]; [`SpindleError::TokenOutOfVocab`].
    pub fn set_returns(&mut self, id: ThreadId, tokens: &[u32]) -> Result<()> {
        self.check_tokens(tokens)?;
        self.thread_mut(id)?.returns = Some(tokens.to_vec());
        Ok(())
    }

    /// Releases the cached K/V of a finished child whose work returns by re-prefill (its
    /// transcript and returns are kept), so memory frees before its siblings end. A reuse
    /// join of a released child merges nothing.
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`]; [`SpindleError::WrongState`] unless it is a
    /// finished child.
    pub fn release_cache(&mut self, id: ThreadId) -> Result<()> {
        self.thread(id)?;
        let t = &mut self.threads[id];
        if t.state != ThreadState::Finished || t.parent.is_none() {
            return Err(wrong_state(t, Operation::ReleaseCache, "a finished child"));
        }
        t.view.release(&mut self.pool);
        self.after_change();
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
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`]; [`SpindleError::WrongState`] unless the thread
    /// waits on children that all finished; [`SpindleError::CacheReleased`] for a reuse
    /// join of a child that gave its cache back; [`SpindleError::PositionOverflow`] when
    /// the re-prefilled tokens would pass the largest position.
    pub fn join(&mut self, id: ThreadId, kind: JoinKind) -> Result<usize> {
        let parent = self.thread(id)?;
        if parent.state != ThreadState::Waiting || !self.children_done(id) {
            return Err(wrong_state(
                parent,
                Operation::Join,
                "a thread waiting on finished children",
            ));
        }
        let children = parent.children.clone();
        let p = parent.next_pos;
        if kind == JoinKind::Reuse {
            if let Some(&c) = children.iter().find(|&&c| {
                let t = &self.threads[c];
                t.view.len() < t.ctx_tokens.len()
            }) {
                return Err(SpindleError::CacheReleased {
                    thread: id,
                    child: c,
                });
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
        self.after_change();
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
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`]; [`SpindleError::WrongState`] unless it is retired.
    pub fn forget(&mut self, id: ThreadId) -> Result<()> {
        let t = self.thread_mut(id)?;
        if t.state != ThreadState::Retired {
            return Err(wrong_state(t, Operation::Forget, "a retired thread"));
        }
        t.ctx_tokens = Vec::new();
        t.ctx_pos = Vec::new();
        t.returns = None;
        self.after_change();
        Ok(())
    }

    /// Cancels a request: every thread of it retires and its blocks return to the pool at
    /// once, whatever it was doing (prefilling, decoding, waiting on children, preempted).
    /// Cancelling a request that already ended does nothing.
    ///
    /// # Errors
    /// [`SpindleError::UnknownRequest`] when `request` is not a request's id (its root
    /// thread's).
    pub fn cancel(&mut self, request: usize) -> Result<()> {
        match self.threads.get(request) {
            Some(t) if t.parent.is_none() => {}
            _ => return Err(SpindleError::UnknownRequest { request }),
        }
        self.retire(request);
        self.after_change();
        Ok(())
    }

    /// Cancels one thread and its whole subtree; a root cancels its request. A cancelled
    /// child leaves its parent's children, so the parent joins the others as if it had
    /// never been forked (with none left, the join merges nothing). Its blocks return to
    /// the pool at once. Cancelling a retired thread does nothing.
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`] for an id the engine never gave out.
    pub fn cancel_thread(&mut self, id: ThreadId) -> Result<()> {
        let t = self.thread(id)?;
        if t.state == ThreadState::Retired {
            return Ok(());
        }
        if let Some(p) = t.parent {
            self.threads[p].children.retain(|&c| c != id);
        }
        self.retire(id);
        self.after_change();
        Ok(())
    }

    /// True when some active thread has queued tokens.
    pub fn has_work(&self) -> bool {
        self.live.iter().any(|&id| {
            let t = &self.threads[id];
            t.state == ThreadState::Active && !t.pending.is_empty()
        })
    }

    /// Runs one fused step: every active thread's next queued tokens (a prefill chunk or
    /// one decode token) in one forward pass. Threads the pool cannot hold wait; if none
    /// fits, the youngest running thread is preempted. The output borrows the engine's
    /// buffers (the logits are one `[rows, vocab]` buffer, not copied per thread).
    ///
    /// # Errors
    /// [`SpindleError::ThreadDoesNotFit`] when even after preempting every other thread
    /// the oldest waiting thread's next tokens do not fit in the pool (nothing is lost:
    /// cancel or finish something and step again); a backend's error (device failure).
    pub fn step(&mut self) -> Result<StepOutput<'_>> {
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
            // An empty step: its plan is the empty plan, not the last step's.
            self.planner
                .step(&[], self.threads.as_slice(), &mut input.plan);
            return Ok(self.output(0));
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
        // The step's rows.
        for a in buf.batch.iter_mut() {
            let t = &mut self.threads[a.id];
            a.first_row = input.tokens.len() as u32;
            let first_logit = input.logit_rows.len();
            for _ in 0..a.n {
                let Some(p) = t.pending.pop_front() else {
                    break;
                };
                let row = input.tokens.len() as u32;
                input.tokens.push(p.token);
                input.positions.push(p.pos);
                t.ctx_tokens.push(p.token);
                t.ctx_pos.push(p.pos);
                if p.emit {
                    t.tokens_fed += 1;
                }
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
                    self.pool.refcount(block),
                    1,
                    "engine invariant violated: block {block} written while shared"
                );
            }
        }
        buf.plan_inputs.clear();
        buf.plan_inputs.extend(buf.batch.iter().map(|a| PlanInput {
            key: a.id,
            first_row: a.first_row,
            rows: a.n as u32,
        }));
        self.planner
            .step(&buf.plan_inputs, self.threads.as_slice(), &mut input.plan);
        // Counters: a per-thread kernel reads each thread's whole view.
        let naive: u64 = buf
            .batch
            .iter()
            .map(|a| self.threads[a.id].view.len() as u64)
            .sum();
        let layers = self.backend.config().num_layers as u64;
        self.stats.kv_tokens_read += input.plan.kv_tokens_read * layers;
        self.stats.kv_tokens_read_naive += naive * layers;
        self.stats.cow_copies += input.copies.len() as u64;
        self.stats.steps += 1;
        self.stats.peak_width = self.stats.peak_width.max(buf.batch.len());
        let private: usize = self
            .live
            .iter()
            .map(|&id| self.threads[id].view.len().div_ceil(bs))
            .sum();
        self.stats.blocks_without_sharing = self.stats.blocks_without_sharing.max(private);

        model::forward(&mut self.backend, &self.buf.input, &mut self.buf.logits)?;
        self.after_change();
        let rows = self.buf.input.tokens.len();
        Ok(self.output(rows))
    }

    /// The last step's attention plan (what the backend ran).
    pub fn last_plan(&self) -> &crate::plan::AttentionPlan {
        &self.buf.input.plan
    }

    /// (full plan builds, in-place plan updates) so far.
    pub fn plan_counts(&self) -> (u64, u64) {
        self.planner.counts()
    }

    /// The last step's output again, borrowing the engine immutably (so the engine can be
    /// read while it is held).
    pub fn last_output(&self) -> StepOutput<'_> {
        self.output(self.buf.input.tokens.len())
    }

    fn output(&self, rows: usize) -> StepOutput<'_> {
        StepOutput {
            threads: &self.buf.outputs,
            rows,
            preempted: &self.buf.preempted,
            waiting: &self.buf.waiting,
            // The backend overwrites the buffer's rows each step and leaves its length alone
            // when it need not change.
            logits: self
                .buf
                .logits
                .get(..self.buf.input.logit_rows.len() * self.backend.config().vocab_size)
                .unwrap_or_default(),
            vocab: self.backend.config().vocab_size,
        }
    }

    /// With [`EngineConfig::check_invariants`], checks them and panics on a violation (an
    /// engine bug, never a user's mistake).
    fn after_change(&self) {
        if self.cfg.check_invariants {
            if let Err(e) = self.check_invariants() {
                panic!("engine invariant violated: {e}");
            }
        }
    }

    /// Checks the engine's invariants: reference counts equal the views that hold each
    /// block; every chunk lies inside its block and a view's length is the sum of its
    /// chunks; retired threads hold nothing; the thread tree is consistent (a child's
    /// parent lists it and waits, a parent with children waits, requests match); with no
    /// live thread, every block is free. (No write into a shared block is checked at each
    /// step.)
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.check_refcounts()?;
        let bs = self.pool.block_size() as u32;
        for t in &self.threads {
            let id = t.id;
            if t.state == ThreadState::Retired {
                if !t.view.is_empty() || !t.pending.is_empty() || self.live.contains(&id) {
                    return Err(format!("retired thread {id} still holds blocks or work"));
                }
                continue;
            }
            if !self.live.contains(&id) {
                return Err(format!("thread {id} is {:?} but not live", t.state));
            }
            let mut len = 0usize;
            for c in t.view.chunk_iter() {
                if c.len == 0 || c.start + c.len > bs {
                    return Err(format!("thread {id}: chunk {c:?} outside its block"));
                }
                len += c.len as usize;
            }
            if len != t.view.len() || t.view.len() > t.ctx_tokens.len() {
                return Err(format!(
                    "thread {id}: view of {} tokens, chunks hold {len}, context {}",
                    t.view.len(),
                    t.ctx_tokens.len()
                ));
            }
            if t.ctx_tokens.len() != t.ctx_pos.len() || t.pinned_len > t.ctx_tokens.len() {
                return Err(format!(
                    "thread {id}: context tokens, positions and pin disagree"
                ));
            }
            match t.parent {
                None if t.request != id => {
                    return Err(format!("root {id} names request {}", t.request))
                }
                None => {}
                Some(p) => {
                    let parent = &self.threads[p];
                    if parent.state != ThreadState::Waiting
                        || !parent.children.contains(&id)
                        || parent.request != t.request
                    {
                        return Err(format!(
                            "child {id}: parent {p} is {:?} and does not list it",
                            parent.state
                        ));
                    }
                }
            }
            if !t.children.is_empty() && t.state != ThreadState::Waiting {
                return Err(format!("thread {id} has children but is {:?}", t.state));
            }
            if let Some(&c) = t
                .children
                .iter()
                .find(|&&c| self.threads[c].parent != Some(id))
            {
                return Err(format!("thread {id} lists child {c}, whose parent differs"));
            }
        }
        if self.live.is_empty() && !self.pool.all_free() {
            return Err(format!(
                "no live thread but {} blocks in use",
                self.pool.num_used()
            ));
        }
        Ok(())
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
        return Err(SpindleError::PositionOverflow {
            next: next as u64,
            tokens: n,
            max: MAX_POSITION - 1,
        });
    }
    Ok(())
}

/// Tokens a thread's context vectors make room for ahead of time, so a decoding thread
/// does not reallocate them step after step.
const CONTEXT_ROOM: usize = 4096;

/// A copy of a parent's context vector with room for a child's next [`CONTEXT_ROOM`] tokens.
fn with_room(v: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(v.len() + CONTEXT_ROOM);
    out.extend_from_slice(v);
    out
}

/// The error for `op` on `t` in a state it does not accept.
fn wrong_state(t: &Thread, op: Operation, needs: &'static str) -> SpindleError {
    SpindleError::WrongState {
        thread: t.id,
        op,
        state: t.state,
        queued: t.pending.len(),
        needs,
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

impl ViewSource for [Thread] {
    fn view(&self, key: usize) -> &KvView {
        &self[key].view
    }
}
