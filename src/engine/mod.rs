//! The engine: threads of many requests over one block pool, and the fused step that runs
//! every active thread's pending tokens in one forward pass.
//!
//! The engine is mechanism only: callers (the replay driver, the generation scheduler)
//! decide what to feed, when to fork and how to join. This file holds the thread
//! operations; a step is `schedule.rs` (admission, preemption), `batch.rs` (rows, plan,
//! counters), then the forward pass; `output.rs` is what it hands back, `invariants.rs`
//! what must always hold.

use crate::backend::{Backend, RowPick, StepInput};
use crate::error::{Operation, Result, SpindleError};
use crate::kv::{BlockPool, KvManager, KvView, SharedTail};
use crate::model;
use crate::plan::{AttentionMode, PlanInput, Planner, ViewSource};

mod batch;
mod invariants;
mod output;
mod schedule;

use crate::tree::{JoinKind, Pending, RequestId, Thread, ThreadId, ThreadState, MAX_POSITION};
pub use output::{EngineStats, PlanCounts, StepOutput, ThreadOutput};
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
    /// Blocks the live threads would hold with one private copy each (this step's count).
    private_blocks: usize,
    /// `[logit rows, vocab]`.
    logits: Vec<f32>,
    /// How each logits row's token is chosen ([`Engine::step_sampled`]).
    picks: Vec<RowPick>,
    /// One token per logits row ([`crate::backend::NO_TOKEN`] where the host chooses);
    /// empty after [`Engine::step`].
    tokens: Vec<u32>,
}

/// Threads, block pool and backend.
pub struct Engine<B: Backend> {
    backend: B,
    /// The block pool, changed only through the manager.
    kv: KvManager,
    threads: Vec<Thread>,
    /// Each request's current root thread, indexed by [`RequestId`].
    roots: Vec<ThreadId>,
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
        let kv = KvManager::new(backend.num_blocks(), backend.block_size(), cfg.shared_tail);
        let planner = Planner::new(cfg.mode, cfg.split_tokens, backend.block_size());
        Self {
            backend,
            kv,
            threads: Vec::new(),
            roots: Vec::new(),
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
        self.kv.pool()
    }

    /// Engine settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.blocks_peak = self.kv.pool().peak_used();
        s
    }

    /// Clears the counters (and the pool's peak).
    pub fn reset_stats(&mut self) {
        self.stats = EngineStats::default();
        self.kv.reset_peak();
    }

    /// A thread by id.
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`] for an id the engine never gave out.
    pub fn thread(&self, id: ThreadId) -> Result<&Thread> {
        self.threads
            .get(id.index())
            .ok_or(SpindleError::UnknownThread { thread: id })
    }

    fn thread_mut(&mut self, id: ThreadId) -> Result<&mut Thread> {
        self.threads
            .get_mut(id.index())
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
        let id = ThreadId(self.threads.len());
        let mut t = Thread {
            id,
            request: RequestId(self.roots.len()),
            parent: None,
            path: Vec::new(),
            state: ThreadState::Active,
            children: Vec::new(),
            view: KvView::new(),
            own_tokens: Vec::with_capacity(prompt.len() + CONTEXT_ROOM),
            own_pos: Vec::with_capacity(prompt.len() + CONTEXT_ROOM),
            next_pos: 0,
            fork_len: 0,
            pinned_len: 0,
            reuse_joins: 0,
            pending: Default::default(),
            returns: None,
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
        self.roots.push(id);
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
            let cid = ThreadId(self.threads.len());
            let mut path = parent.path.clone();
            path.push(i as u32);
            let (view, pos) = if share_context {
                (self.kv.fork(&parent.view), parent.next_pos)
            } else {
                (KvView::new(), 0)
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
                own_tokens: context_vec(cid),
                own_pos: context_vec(cid),
                next_pos: pos,
                pending: Default::default(),
                returns: None,
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
            self.kv.free(&mut t.view);
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
        self.kv.free(&mut t.view);
        self.after_change();
        Ok(())
    }

    /// True when every child of `id` has finished.
    pub fn children_done(&self, id: ThreadId) -> bool {
        self.threads.get(id.index()).is_some_and(|t| {
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
            if let Some(&c) = children.iter().find(|&&c| !self.threads[c].cache_intact()) {
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
                    // Every child's cache is intact (checked above): its own part is
                    // exactly its own tokens.
                    let own = self.kv.suffix(&child.view, child.fork_len);
                    let n = own.len();
                    own_views.push((
                        own,
                        child.own_tokens[..n].to_vec(),
                        child.own_pos[..n].to_vec(),
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
            parent.own_tokens.extend(toks);
            parent.own_pos.extend(pos);
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
        self.kv.free(&mut t.view);
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
        t.own_tokens = Vec::new();
        t.own_pos = Vec::new();
        t.returns = None;
        self.after_change();
        Ok(())
    }

    /// The request `id` belongs to.
    ///
    /// # Errors
    /// [`SpindleError::UnknownThread`] for an id the engine never gave out.
    pub fn request_of(&self, id: ThreadId) -> Result<RequestId> {
        Ok(self.thread(id)?.request)
    }

    /// A request's current root thread.
    ///
    /// # Errors
    /// [`SpindleError::UnknownRequest`] for an id the engine never gave out.
    pub fn root_of(&self, request: RequestId) -> Result<ThreadId> {
        self.roots
            .get(request.index())
            .copied()
            .ok_or(SpindleError::UnknownRequest { request })
    }

    /// Cancels a request: every thread of it retires and its blocks return to the pool at
    /// once, whatever it was doing (prefilling, decoding, waiting on children, preempted).
    /// Cancelling a request that already ended does nothing.
    ///
    /// # Errors
    /// [`SpindleError::UnknownRequest`] for an id the engine never gave out.
    pub fn cancel(&mut self, request: RequestId) -> Result<()> {
        let root = self.root_of(request)?;
        self.retire(root);
        self.after_change();
        Ok(())
    }

    /// Starts a request again from `prompt`: its threads retire (as [`Engine::cancel`])
    /// and a new root thread, under the same request id, queues the prompt at positions
    /// 0, 1, 2, ... Returns the new root.
    ///
    /// # Errors
    /// [`SpindleError::UnknownRequest`]; as [`Engine::add_request`] for the prompt.
    pub fn restart_request(&mut self, request: RequestId, prompt: &[u32]) -> Result<ThreadId> {
        // The new prompt is checked before anything is cancelled: a bad one changes nothing.
        self.check_tokens(prompt)?;
        check_positions(0, prompt.len())?;
        self.cancel(request)?;
        let root = self.add_request(prompt)?;
        // `add_request` numbered a new request: give its root to this one instead.
        self.roots.pop();
        self.roots[request.index()] = root;
        self.threads[root.index()].request = request;
        self.after_change();
        Ok(root)
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

    /// True when `id` is active with nothing queued: every token it was fed is cached, so
    /// its caller may decide what comes next (false for an unknown id).
    pub fn is_ready(&self, id: ThreadId) -> bool {
        self.threads
            .get(id.index())
            .is_some_and(|t| t.state == ThreadState::Active && t.pending.is_empty())
    }

    /// Tokens of `id`'s cached context after its fork point (its own part; 0 for an
    /// unknown id).
    pub fn context_since_fork(&self, id: ThreadId) -> usize {
        self.threads
            .get(id.index())
            .map_or(0, |t| t.view.len().saturating_sub(t.fork_len))
    }

    /// Free blocks `id` needs to append `n` more tokens to its cache, as the allocator
    /// will count them ([`KvView::blocks_needed`]: a fresh span or a copy-on-write copy
    /// of a shared tail block, per [`EngineConfig::shared_tail`]); 0 for an unknown id.
    pub fn blocks_needed(&self, id: ThreadId, n: usize) -> usize {
        self.threads
            .get(id.index())
            .map_or(0, |t| self.kv.blocks_needed(&t.view, n))
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
        if !self.admit()? {
            // An empty step: its plan is the empty plan, not the last step's.
            self.planner
                .step(&[], self.threads.as_slice(), &mut self.buf.input.plan);
            return Ok(self.output(0));
        }
        self.build_batch();
        self.buf.tokens.clear();
        model::forward(&mut self.backend, &self.buf.input, &mut self.buf.logits)?;
        self.after_change();
        let rows = self.buf.input.tokens.len();
        Ok(self.output(rows))
    }

    /// [`Engine::step`] where the backend may choose tokens itself
    /// ([`Backend::forward_sampled`]): each thread's last logits row (its next-token
    /// distribution) is chosen as `pick` says for that thread, every other row (a thread
    /// that asked for all logits) comes back as logits. [`StepOutput::token_of`] gives the
    /// chosen tokens. When no row is [`RowPick::Logits`] the output's logits are empty
    /// whatever the backend did (a device backend returns only token ids then); otherwise
    /// the buffer is `[logit rows, vocab]` with the logits of every row that asked (a
    /// device backend copies back only those; a row it sampled holds unspecified values,
    /// the CPU backend's its true logits).
    ///
    /// # Errors
    /// As [`Engine::step`]; a backend's error for picks it cannot serve.
    pub fn step_sampled(
        &mut self,
        mut pick: impl FnMut(&Thread) -> RowPick,
    ) -> Result<StepOutput<'_>> {
        self.buf.picks.clear();
        self.buf.tokens.clear();
        if !self.admit()? {
            self.planner
                .step(&[], self.threads.as_slice(), &mut self.buf.input.plan);
            return Ok(self.output(0));
        }
        self.build_batch();
        let buf = &mut self.buf;
        for o in &buf.outputs {
            if o.logit_rows == 0 {
                continue;
            }
            buf.picks
                .extend(std::iter::repeat_n(RowPick::Logits, o.logit_rows - 1));
            buf.picks.push(pick(&self.threads[o.thread]));
        }
        self.backend
            .forward_sampled(&buf.input, &buf.picks, &mut buf.logits, &mut buf.tokens)?;
        check_sampled(
            &buf.picks,
            &buf.tokens,
            buf.logits.len(),
            self.backend.config().vocab_size,
        )?;
        if !buf.picks.contains(&RowPick::Logits) {
            // Only token ids came back (or should have): the same on every backend.
            buf.logits.clear();
        }
        self.after_change();
        let rows = self.buf.input.tokens.len();
        Ok(self.output(rows))
    }

    /// The last step's attention plan (what the backend ran).
    pub fn last_plan(&self) -> &crate::plan::AttentionPlan {
        &self.buf.input.plan
    }

    /// How the planner made the plans so far.
    pub fn plan_counts(&self) -> PlanCounts {
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
            tokens: &self.buf.tokens,
        }
    }
}

/// Checks what [`Backend::forward_sampled`] handed back against its contract: one token
/// per pick, a vocabulary id for each sampled row and [`crate::backend::NO_TOKEN`] for
/// each logits row, and every row's logits when some row asked for them.
fn check_sampled(picks: &[RowPick], tokens: &[u32], logits: usize, vocab: usize) -> Result<()> {
    let bad = |what: String| Err(SpindleError::Backend(what));
    if tokens.len() != picks.len() {
        return bad(format!(
            "the backend chose {} tokens for {} logit rows",
            tokens.len(),
            picks.len()
        ));
    }
    let mut want_logits = false;
    for (row, (pick, &token)) in picks.iter().zip(tokens).enumerate() {
        match pick {
            RowPick::Logits if token != crate::backend::NO_TOKEN => {
                return bad(format!("token {token} for logits row {row}"));
            }
            RowPick::Logits => want_logits = true,
            RowPick::Sample(_) if token as usize >= vocab => {
                return bad(format!(
                    "token {token} past the vocabulary ({vocab}) for sampled row {row}"
                ));
            }
            RowPick::Sample(_) => {}
        }
    }
    if want_logits && logits < picks.len() * vocab {
        return bad(format!(
            "{logits} logits for {} rows of vocab {vocab}",
            picks.len()
        ));
    }
    Ok(())
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

/// An empty context vector for thread `id`, with room for [`CONTEXT_ROOM`] tokens plus
/// `id % 64` cache lines. Equal-size buffers allocated one after another sit a fixed stride
/// apart, so the tails every decoding thread writes each step would land on the same few
/// cache sets and evict each other (cachegrind, 1,024 children: 1,470 last-level misses per
/// step, 209 with the stagger).
fn context_vec(id: ThreadId) -> Vec<u32> {
    const TOKENS_PER_LINE: usize = 64 / std::mem::size_of::<u32>();
    Vec::with_capacity(CONTEXT_ROOM + TOKENS_PER_LINE * (id.index() % 64))
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

impl std::ops::Index<ThreadId> for Vec<Thread> {
    type Output = Thread;

    fn index(&self, id: ThreadId) -> &Thread {
        &self[id.index()]
    }
}

impl std::ops::IndexMut<ThreadId> for Vec<Thread> {
    fn index_mut(&mut self, id: ThreadId) -> &mut Thread {
        &mut self[id.index()]
    }
}

impl ViewSource for [Thread] {
    fn view(&self, key: usize) -> &KvView {
        &self[key].view
    }
}
