//! The adaptive generation driver: runs requests on the engine, lets each thread's own
//! tokens (read by its protocol) fork and join the tree, enforces the policy (width,
//! depth, budgets, resource-aware waves) and reports events.
//!
//! Loop per step: *settle* every thread whose queued tokens are all cached (do its pending
//! fork or end, or choose its next token from its last logits), start children that now
//! fit, then run one fused engine step. Follows `replay.rs`, with choices instead of a
//! script of the whole tree.

use super::events::{path_label, EndReason, Event, RequestStats, ThreadTokens};
use super::output::{RequestOutput, ThreadRecord};
use super::policy::Policy;
use super::protocol::{Action, ForkSpec, Protocol, Role, ThreadParser};
use super::rng::{mix, Rng};
use super::sampler::{Decide, Sampler, SamplingParams, TokenSource};
use super::trace::TraceRecorder;
use crate::backend::Backend;
use crate::engine::Engine;
use crate::error::{Result, SpindleError};
use crate::tree::{JoinKind, ThreadId, ThreadState};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    pub protocol: Arc<dyn Protocol>,
    pub sampling: SamplingParams,
    /// Chooses every token; [`Sampler`] over `sampling` unless replaced.
    pub source: Box<dyn TokenSource>,
}

impl Request {
    /// A request sampled with `sampling`.
    pub fn new(prompt: Vec<u32>, protocol: Arc<dyn Protocol>, sampling: SamplingParams) -> Self {
        let source = Box::new(Sampler::new(sampling.clone()));
        Self {
            prompt,
            protocol,
            sampling,
            source,
        }
    }

    /// The same request with another token source (a scripted one, in tests and the demo).
    pub fn with_source(mut self, source: Box<dyn TokenSource>) -> Self {
        self.source = source;
        self
    }
}

/// What a thread does once its queued tokens are cached.
enum After {
    Decide,
    Fork(ForkSpec),
    End(Option<Vec<u32>>),
}

/// A fork whose children have not all been joined.
struct ForkState {
    children: Vec<ThreadId>,
    spec: ForkSpec,
    /// Children started so far (a prefix of `children`).
    started: usize,
}

/// Driver state of one thread.
struct ThreadCtl {
    request: usize,
    role: Role,
    path: Vec<u32>,
    parent: Option<ThreadId>,
    parser: Box<dyn ThreadParser>,
    seed: u64,
    rng: Rng,
    forks: Vec<Vec<ThreadId>>,
    prime: Vec<u32>,
    generated: Vec<u32>,
    /// Generated tokens counted against budgets (end-of-sequence included).
    count: usize,
    logits: Option<Vec<f32>>,
    after: After,
    started: bool,
    done: bool,
    end: Option<EndReason>,
    fork: Option<ForkState>,
    /// Longest child chain over this thread's joins (critical path below it).
    crit_below: usize,
}

impl ThreadCtl {
    fn crit(&self) -> usize {
        self.count + self.crit_below
    }
}

/// Driver state of one request.
struct RequestState {
    protocol: Arc<dyn Protocol>,
    source: Box<dyn TokenSource>,
    stop: Vec<Vec<u32>>,
    budget: usize,
    generated: usize,
    threads: Vec<ThreadId>,
    forks: usize,
    first_step: Option<u64>,
    last_step: u64,
    peak_width: usize,
    thread_steps: u64,
    done: bool,
}

/// Runs requests with adaptive forks and joins on an engine.
pub struct Generator<B: Backend> {
    engine: Engine<B>,
    policy: Policy,
    eos: Vec<u32>,
    requests: BTreeMap<usize, RequestState>,
    ctl: BTreeMap<ThreadId, ThreadCtl>,
    outputs: BTreeMap<usize, RequestOutput>,
    events: Vec<Event>,
    steps: u64,
    trace: TraceRecorder,
}

impl<B: Backend> Generator<B> {
    /// A generator over `engine`; end-of-sequence ids come from the model config.
    pub fn new(engine: Engine<B>, policy: Policy) -> Self {
        let eos = engine.backend().config().eos_token_ids.clone();
        Self {
            engine,
            policy,
            eos,
            requests: BTreeMap::new(),
            ctl: BTreeMap::new(),
            outputs: BTreeMap::new(),
            events: Vec::new(),
            steps: 0,
            trace: TraceRecorder::new(),
        }
    }

    /// Replaces the end-of-sequence ids.
    pub fn set_eos(&mut self, eos: Vec<u32>) {
        self.eos = eos;
    }

    /// The engine.
    pub fn engine(&self) -> &Engine<B> {
        &self.engine
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The trace recorded so far.
    pub fn trace(&self) -> &TraceRecorder {
        &self.trace
    }

    /// Engine steps run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Starts a request; returns its id (its root thread's id).
    pub fn add_request(&mut self, req: Request) -> Result<usize> {
        if req.prompt.is_empty() {
            return Err(SpindleError::InvalidRequest(
                "a request needs at least one prompt token".into(),
            ));
        }
        let root = self.engine.add_request(&req.prompt)?;
        let budget = self
            .policy
            .request_budget
            .min(req.sampling.max_tokens.unwrap_or(usize::MAX));
        let seed = mix(req.sampling.seed, &[]);
        self.ctl.insert(
            root,
            ThreadCtl {
                request: root,
                role: Role::Root,
                path: Vec::new(),
                parent: None,
                parser: req.protocol.parser(Role::Root),
                seed,
                rng: Rng::new(seed),
                forks: Vec::new(),
                prime: req.prompt.clone(),
                generated: Vec::new(),
                count: 0,
                logits: None,
                after: After::Decide,
                started: true,
                done: false,
                end: None,
                fork: None,
                crit_below: 0,
            },
        );
        self.requests.insert(
            root,
            RequestState {
                protocol: req.protocol,
                source: req.source,
                stop: req
                    .sampling
                    .stop
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect(),
                budget,
                generated: 0,
                threads: vec![root],
                forks: 0,
                first_step: None,
                last_step: 0,
                peak_width: 0,
                thread_steps: 0,
                done: false,
            },
        );
        self.trace
            .thread_start(root, root, format!("request {root} root"), self.steps);
        Ok(root)
    }

    /// True when every request has finished.
    pub fn is_idle(&self) -> bool {
        self.requests.values().all(|r| r.done)
    }

    /// A finished request's output.
    pub fn output(&self, request: usize) -> Option<&RequestOutput> {
        self.outputs.get(&request)
    }

    /// Removes and returns a finished request's output, and lets the engine and the
    /// generator drop everything else they kept about its threads: a long-running caller
    /// takes outputs this way so memory does not grow with every request served.
    pub fn take_output(&mut self, request: usize) -> Result<Option<RequestOutput>> {
        let Some(out) = self.outputs.remove(&request) else {
            return Ok(None);
        };
        if let Some(rs) = self.requests.remove(&request) {
            for id in rs.threads {
                self.ctl.remove(&id);
                if self.engine.thread(id)?.state == ThreadState::Retired {
                    self.engine.forget(id)?;
                }
            }
        }
        Ok(Some(out))
    }

    /// Every finished request's output, by id.
    pub fn outputs(&self) -> &BTreeMap<usize, RequestOutput> {
        &self.outputs
    }

    /// Runs until every request has finished, handing each event to `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<()> {
        while !self.is_idle() {
            for e in self.step()? {
                on_event(&e);
            }
        }
        Ok(())
    }

    /// Settles every thread, runs one engine step and settles again; returns the events.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        self.settle()?;
        if self.is_idle() {
            return Ok(std::mem::take(&mut self.events));
        }
        if !self.engine.has_work() {
            // Every live thread waits on something that cannot happen: report, never hang.
            let stuck: Vec<usize> = self
                .requests
                .iter()
                .filter(|(_, r)| !r.done)
                .map(|(&id, _)| id)
                .collect();
            for r in stuck {
                self.fail(r, "no thread of the request can make progress".into())?;
            }
            return Ok(std::mem::take(&mut self.events));
        }
        let out = match self.engine.step() {
            Ok(out) => out,
            Err(e @ SpindleError::ThreadDoesNotFit { request, .. }) => {
                // Even preemption cannot make room for this request's thread: give up that
                // request, keep the rest.
                self.fail(request, e.to_string())?;
                return Ok(std::mem::take(&mut self.events));
            }
            Err(e) => return Err(e),
        };
        self.steps += 1;
        for &t in &out.preempted {
            self.events.push(Event::Preempted { thread: t });
        }
        self.trace.step(self.steps, out.threads.len(), out.rows);
        let mut width: BTreeMap<usize, usize> = BTreeMap::new();
        for mut t in out.threads {
            let Some(c) = self.ctl.get_mut(&t.thread) else {
                continue;
            };
            *width.entry(c.request).or_default() += 1;
            if let Some(l) = t.logits.pop() {
                c.logits = Some(l);
            }
        }
        for (r, w) in width {
            if let Some(rs) = self.requests.get_mut(&r) {
                rs.first_step.get_or_insert(self.steps);
                rs.last_step = self.steps;
                rs.peak_width = rs.peak_width.max(w);
                rs.thread_steps += w as u64;
            }
        }
        self.settle()?;
        Ok(std::mem::take(&mut self.events))
    }

    /// Advances threads until nothing changes.
    fn settle(&mut self) -> Result<()> {
        loop {
            let mut changed = false;
            let ids: Vec<ThreadId> = self
                .ctl
                .iter()
                .filter(|(_, c)| !c.done && c.started)
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                changed |= self.advance(id)?;
            }
            changed |= self.start_waves()?;
            if !changed {
                return Ok(());
            }
        }
    }

    /// Acts for thread `id` if all its queued tokens are cached.
    fn advance(&mut self, id: ThreadId) -> Result<bool> {
        let t = self.engine.thread(id)?;
        if t.state != ThreadState::Active || !t.pending.is_empty() {
            return Ok(false);
        }
        let Some(c) = self.ctl.get_mut(&id) else {
            return Ok(false);
        };
        if c.done || !c.started {
            return Ok(false);
        }
        match std::mem::replace(&mut c.after, After::Decide) {
            After::Fork(spec) => {
                c.logits = None;
                self.fork(id, spec)?;
                Ok(true)
            }
            After::End(returns) => {
                self.end_child(id, returns, EndReason::EndTag)?;
                Ok(true)
            }
            After::Decide => match c.logits.take() {
                Some(logits) => {
                    self.decide(id, &logits)?;
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    }

    /// Chooses thread `id`'s next token from `logits` and acts on it.
    fn decide(&mut self, id: ThreadId, logits: &[f32]) -> Result<()> {
        let Some(c) = self.ctl.get(&id) else {
            return Ok(());
        };
        let request = c.request;
        let is_root = c.role == Role::Root;
        // Budgets first: a thread out of tokens ends where it is.
        {
            let c = &self.ctl[&id];
            let rs = &self.requests[&request];
            let over_thread = !is_root && c.count >= self.policy.thread_budget;
            if rs.generated >= rs.budget || over_thread {
                return self.truncate(id);
            }
        }
        let (Some(c), Some(rs)) = (self.ctl.get_mut(&id), self.requests.get_mut(&request)) else {
            return Ok(());
        };
        let token = rs.source.next_token(Decide {
            request,
            path: &c.path,
            generated: &c.generated,
            logits,
            rng: &mut c.rng,
        });
        c.count += 1;
        rs.generated += 1;
        self.events.push(Event::Token {
            request,
            thread: id,
            path: c.path.clone(),
            token,
        });
        if self.eos.contains(&token) {
            return if is_root {
                c.generated.push(token);
                self.finish_root(request, EndReason::Eos)
            } else {
                let tr = c.parser.on_truncate(&c.generated);
                c.generated.push(token);
                if let Some(p) = tr.problem {
                    self.events.push(Event::Protocol {
                        request,
                        thread: id,
                        problem: p,
                    });
                }
                let returns = self.truncated_returns(id, tr.returns, tr.append)?;
                self.end_child(id, returns, EndReason::Eos)
            };
        }
        c.generated.push(token);
        if is_root && rs.stop.iter().any(|s| c.generated.ends_with(s)) {
            return self.finish_root(request, EndReason::Stop);
        }
        let action = c.parser.on_token(&c.generated);
        let depth = c.path.len();
        let exhausted = rs.generated >= rs.budget;
        if let Err(e) = self.engine.feed(id, &[token]) {
            return self.fail(request, format!("token {token} from the token source: {e}"));
        }
        let problem = |what: String| Event::Protocol {
            request,
            thread: id,
            problem: what,
        };
        match action {
            Action::Text => {}
            Action::Malformed(p) => self.events.push(problem(p)),
            Action::End { returns } => {
                if let Some(c) = self.ctl.get_mut(&id) {
                    c.after = After::End(returns);
                }
            }
            Action::Fork(mut spec) => {
                if depth >= self.policy.max_depth {
                    self.events.push(problem(format!(
                        "fork at depth {depth} refused (max depth {}): tags kept as text",
                        self.policy.max_depth
                    )));
                } else if self.policy.max_width == 0 {
                    self.events.push(problem(
                        "fork refused: max width 0 disables forks; tags kept as text".into(),
                    ));
                } else if exhausted {
                    self.events.push(problem(
                        "fork refused: the request's token budget is spent".into(),
                    ));
                } else if spec.children.iter().any(|ch| ch.prime.is_empty()) {
                    self.events.push(problem(
                        "fork refused: a child would start with no tokens".into(),
                    ));
                } else {
                    if spec.children.len() > self.policy.max_width {
                        self.events.push(problem(format!(
                            "{} children asked, max width {}: the rest are dropped",
                            spec.children.len(),
                            self.policy.max_width
                        )));
                        spec.children.truncate(self.policy.max_width);
                    }
                    if let Some(c) = self.ctl.get_mut(&id) {
                        c.after = After::Fork(spec);
                    }
                }
            }
        }
        Ok(())
    }

    /// Returns handed back by a child cut short: the parser's, or its transcript with
    /// `append` (the missing end tag) added.
    fn truncated_returns(
        &self,
        id: ThreadId,
        returns: Option<Vec<u32>>,
        append: Vec<u32>,
    ) -> Result<Option<Vec<u32>>> {
        if returns.is_some() || append.is_empty() {
            return Ok(returns);
        }
        let mut r = self.engine.thread(id)?.transcript().to_vec();
        r.extend(append);
        Ok(Some(r))
    }

    /// Ends thread `id` because a budget ran out.
    fn truncate(&mut self, id: ThreadId) -> Result<()> {
        let Some(c) = self.ctl.get_mut(&id) else {
            return Ok(());
        };
        let request = c.request;
        let tr = c.parser.on_truncate(&c.generated);
        let is_root = c.role == Role::Root;
        if let Some(p) = tr.problem {
            self.events.push(Event::Protocol {
                request,
                thread: id,
                problem: format!("{p} (token budget reached; truncated)"),
            });
        }
        if is_root {
            return self.finish_root(request, EndReason::Budget);
        }
        let returns = self.truncated_returns(id, tr.returns, tr.append)?;
        self.end_child(id, returns, EndReason::Budget)
    }

    /// Forks thread `id` per `spec` and starts the children that fit.
    fn fork(&mut self, id: ThreadId, spec: ForkSpec) -> Result<()> {
        let n = spec.children.len();
        let kids = self.engine.fork(id, n, spec.share_context)?;
        let c = self
            .ctl
            .get_mut(&id)
            .ok_or_else(|| SpindleError::InvalidRequest(format!("no driver state for {id}")))?;
        let request = c.request;
        let fork_no = c.forks.len() as u64;
        c.forks.push(kids.clone());
        let parent_seed = c.seed;
        let path = c.path.clone();
        let protocol = self.requests[&request].protocol.clone();
        for (i, (&kid, child)) in kids.iter().zip(&spec.children).enumerate() {
            let seed = mix(parent_seed, &[fork_no, i as u64]);
            let role = Role::Child { index: i };
            self.ctl.insert(
                kid,
                ThreadCtl {
                    request,
                    role,
                    path: self.engine.thread(kid)?.path.clone(),
                    parent: Some(id),
                    parser: protocol.parser(role),
                    seed,
                    rng: Rng::new(seed),
                    forks: Vec::new(),
                    prime: child.prime.clone(),
                    generated: Vec::new(),
                    count: 0,
                    logits: None,
                    after: After::Decide,
                    started: false,
                    done: false,
                    end: None,
                    fork: None,
                    crit_below: 0,
                },
            );
        }
        let join = spec.join;
        if let Some(c) = self.ctl.get_mut(&id) {
            c.fork = Some(ForkState {
                children: kids.clone(),
                spec,
                started: 0,
            });
        }
        if let Some(rs) = self.requests.get_mut(&request) {
            rs.forks += 1;
            rs.threads.extend(&kids);
        }
        let started = self.start_children(id)?;
        self.events.push(Event::Forked {
            request,
            parent: id,
            path,
            children: kids.clone(),
            join,
            running: started.len(),
        });
        if started.len() < n {
            self.push_waves(id, &started);
        }
        Ok(())
    }

    fn push_waves(&mut self, parent: ThreadId, started: &[ThreadId]) {
        let Some(c) = self.ctl.get(&parent) else {
            return;
        };
        let Some(fs) = &c.fork else { return };
        let bs = self.engine.pool().block_size();
        let prime = fs
            .spec
            .children
            .iter()
            .map(|ch| ch.prime.len())
            .max()
            .unwrap_or(0);
        let running = fs.children[..fs.started]
            .iter()
            .filter(|k| self.ctl.get(k).is_some_and(|k| !k.done))
            .count();
        self.events.push(Event::Waves {
            request: c.request,
            parent,
            children: fs.children.len(),
            running,
            started: started.to_vec(),
            free_blocks: self.engine.pool().num_free(),
            blocks_per_child: self.policy.blocks_per_child(prime, bs),
        });
    }

    /// Blocks that running children may still claim under the policy's plan.
    fn outstanding_blocks(&self) -> usize {
        let bs = self.engine.pool().block_size();
        self.ctl
            .iter()
            .filter(|(_, c)| c.started && !c.done && c.role != Role::Root && c.fork.is_none())
            .map(|(&id, c)| {
                let held = self
                    .engine
                    .thread(id)
                    .map(|t| t.view.len().saturating_sub(t.fork_len).div_ceil(bs))
                    .unwrap_or(0);
                self.policy
                    .blocks_per_child(c.prime.len(), bs)
                    .saturating_sub(held)
            })
            .sum()
    }

    /// Starts as many of `parent`'s waiting children as free blocks allow (at least one when
    /// none of them is running, so a fork always progresses). When the request's budget
    /// is spent, waiting children end at once without running.
    fn start_children(&mut self, parent: ThreadId) -> Result<Vec<ThreadId>> {
        let bs = self.engine.pool().block_size();
        let Some(c) = self.ctl.get(&parent) else {
            return Ok(Vec::new());
        };
        let Some(fs) = &c.fork else {
            return Ok(Vec::new());
        };
        let request = c.request;
        let waiting: Vec<ThreadId> = fs.children[fs.started..].to_vec();
        if waiting.is_empty() {
            return Ok(Vec::new());
        }
        let running = fs.children[..fs.started]
            .iter()
            .filter(|k| self.ctl.get(k).is_some_and(|k| !k.done))
            .count();
        let rs = &self.requests[&request];
        if rs.generated >= rs.budget {
            // Nothing left to spend: the waiting children end empty.
            for &k in &waiting {
                if let Some(fs) = self.ctl.get_mut(&parent).and_then(|c| c.fork.as_mut()) {
                    fs.started += 1;
                }
                if let Some(kc) = self.ctl.get_mut(&k) {
                    kc.started = true;
                }
                self.trace
                    .thread_start(request, k, self.span_name(k), self.steps);
                self.end_child(k, Some(Vec::new()), EndReason::Budget)?;
            }
            return Ok(Vec::new());
        }
        let free = self.engine.pool().num_free();
        let available = free
            .saturating_sub(self.policy.reserve_blocks)
            .saturating_sub(self.outstanding_blocks());
        let mut started = Vec::new();
        let mut left = available;
        for &k in &waiting {
            let prime_len = self.ctl.get(&k).map_or(0, |kc| kc.prime.len());
            let need = self.policy.blocks_per_child(prime_len, bs);
            let forced = running == 0 && started.is_empty();
            if need > left && !forced {
                break;
            }
            left = left.saturating_sub(need);
            let prime = self
                .ctl
                .get(&k)
                .map(|kc| kc.prime.clone())
                .unwrap_or_default();
            self.engine.feed(k, &prime)?;
            if let Some(kc) = self.ctl.get_mut(&k) {
                kc.started = true;
            }
            if let Some(fs) = self.ctl.get_mut(&parent).and_then(|c| c.fork.as_mut()) {
                fs.started += 1;
            }
            self.trace
                .thread_start(request, k, self.span_name(k), self.steps);
            started.push(k);
        }
        Ok(started)
    }

    fn span_name(&self, id: ThreadId) -> String {
        match self.ctl.get(&id) {
            Some(c) => format!("[{}] t{id}", path_label(&c.path)),
            None => format!("t{id}"),
        }
    }

    /// Starts waiting children wherever they now fit.
    fn start_waves(&mut self) -> Result<bool> {
        let parents: Vec<ThreadId> = self
            .ctl
            .iter()
            .filter(|(_, c)| {
                !c.done
                    && c.fork
                        .as_ref()
                        .is_some_and(|f| f.started < f.children.len())
            })
            .map(|(&id, _)| id)
            .collect();
        let mut changed = false;
        for p in parents {
            let before = self
                .ctl
                .get(&p)
                .and_then(|c| c.fork.as_ref())
                .map_or(0, |f| f.started);
            let started = self.start_children(p)?;
            if !started.is_empty() {
                self.push_waves(p, &started);
            }
            let after = self
                .ctl
                .get(&p)
                .and_then(|c| c.fork.as_ref())
                .map_or(0, |f| f.started);
            changed |= after != before;
        }
        Ok(changed)
    }

    /// Ends child `id`; joins its parent once every sibling has ended.
    fn end_child(
        &mut self,
        id: ThreadId,
        returns: Option<Vec<u32>>,
        reason: EndReason,
    ) -> Result<()> {
        if let Some(r) = &returns {
            self.engine.set_returns(id, r)?;
        }
        self.engine.finish(id)?;
        let Some(c) = self.ctl.get_mut(&id) else {
            return Ok(());
        };
        c.done = true;
        c.end = Some(reason.clone());
        let (request, path, parent) = (c.request, c.path.clone(), c.parent);
        self.trace.thread_end(id, self.steps);
        self.events.push(Event::ThreadEnded {
            request,
            thread: id,
            path,
            reason,
        });
        let Some(parent) = parent else {
            return Ok(());
        };
        let kind = self
            .ctl
            .get(&parent)
            .and_then(|p| p.fork.as_ref())
            .map(|f| f.spec.join);
        if kind == Some(JoinKind::Reprefill) {
            // Only the transcript goes back: free the child's cache now, for the next wave.
            self.engine.release_cache(id)?;
        }
        if self.engine.children_done(parent) {
            self.join(parent)?;
        }
        Ok(())
    }

    /// Joins `parent`'s children and primes it to continue.
    fn join(&mut self, parent: ThreadId) -> Result<()> {
        let Some(c) = self.ctl.get_mut(&parent) else {
            return Ok(());
        };
        let Some(fs) = c.fork.take() else {
            return Ok(());
        };
        let request = c.request;
        let queued = self.engine.join(parent, fs.spec.join)?;
        self.engine.feed(parent, &fs.spec.after_join)?;
        let below = fs
            .children
            .iter()
            .filter_map(|k| self.ctl.get(k))
            .map(ThreadCtl::crit)
            .max()
            .unwrap_or(0);
        if let Some(c) = self.ctl.get_mut(&parent) {
            c.crit_below += below;
            c.logits = None;
        }
        self.events.push(Event::Joined {
            request,
            parent,
            children: fs.children,
            kind: fs.spec.join,
            reprefill: queued,
        });
        if queued + fs.spec.after_join.len() == 0 {
            // Nothing to compute the parent's next token from: end it rather than stall.
            self.events.push(Event::Protocol {
                request,
                thread: parent,
                problem: "the join handed back no tokens; the thread ends".into(),
            });
            return self.truncate(parent);
        }
        Ok(())
    }

    /// Finishes a request at its root.
    fn finish_root(&mut self, request: usize, reason: EndReason) -> Result<()> {
        self.engine.finish(request)?;
        if let Some(c) = self.ctl.get_mut(&request) {
            c.done = true;
            c.end = Some(reason.clone());
        }
        self.trace.thread_end(request, self.steps);
        self.events.push(Event::ThreadEnded {
            request,
            thread: request,
            path: Vec::new(),
            reason: reason.clone(),
        });
        self.complete(request, reason)
    }

    /// Cancels a request after an error: every thread released, an `Error` event.
    fn fail(&mut self, request: usize, message: String) -> Result<()> {
        self.engine.cancel(request)?;
        let ids: Vec<ThreadId> = self
            .requests
            .get(&request)
            .map(|r| r.threads.clone())
            .unwrap_or_default();
        for id in ids {
            if let Some(c) = self.ctl.get_mut(&id) {
                if !c.done {
                    c.done = true;
                    self.trace.thread_end(id, self.steps);
                }
            }
        }
        self.events.push(Event::Error { request, message });
        self.complete(request, EndReason::Error)
    }

    /// Records a finished request's output and stats.
    fn complete(&mut self, request: usize, reason: EndReason) -> Result<()> {
        let Some(rs) = self.requests.get_mut(&request) else {
            return Ok(());
        };
        rs.done = true;
        let mut threads = Vec::new();
        let mut per_thread = Vec::new();
        for &id in &rs.threads {
            let Some(c) = self.ctl.get(&id) else { continue };
            per_thread.push(ThreadTokens {
                thread: id,
                path: path_label(&c.path),
                tokens: c.count,
            });
            threads.push(ThreadRecord {
                thread: id,
                parent: c.parent,
                path: c.path.clone(),
                prime: c.prime.clone(),
                generated: c.generated.clone(),
                forks: c.forks.clone(),
                end: c.end.clone(),
            });
        }
        let stats = RequestStats {
            total_tokens: rs.generated,
            critical_path_tokens: self.ctl.get(&request).map_or(0, ThreadCtl::crit),
            threads: threads.len(),
            forks: rs.forks,
            peak_width: rs.peak_width,
            steps: rs
                .first_step
                .map_or(0, |f| rs.last_step.saturating_sub(f) + 1),
            thread_steps: rs.thread_steps,
            tokens_per_thread: per_thread,
        };
        let context = match reason {
            EndReason::Error => Vec::new(),
            _ => self.engine.thread(request)?.ctx_tokens.clone(),
        };

        self.events.push(Event::Finished {
            request,
            reason: reason.clone(),
            stats: stats.clone(),
        });
        self.outputs.insert(
            request,
            RequestOutput {
                request,
                reason,
                context,
                threads,
                stats,
            },
        );
        Ok(())
    }
}
