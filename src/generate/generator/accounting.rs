//! Ending requests: finishing at the root, cancelling, failing after an error, and the
//! request's output and statistics.

use super::*;

impl<B: Backend> Generator<B> {
    /// Finishes a request at its root.
    pub(super) fn finish_root(&mut self, request: RequestId, reason: EndReason) -> Result<()> {
        let root = self.engine.root_of(request)?;
        self.engine.finish(root)?;
        if let Some(c) = self.ctl.get_mut(&root) {
            c.done = true;
            c.end = Some(reason.clone());
        }
        self.trace.thread_end(root, self.steps);
        self.events.push(Event::ThreadEnded {
            request,
            thread: root,
            path: Vec::new(),
            reason: reason.clone(),
        });
        self.complete(request, reason)
    }

    /// Cancels a request at any point (prefilling, decoding, forked with children waiting
    /// in a wave, preempted): every thread's blocks return to the pool at once and the
    /// request finishes with [`EndReason::Cancelled`] (a `Finished` event, and an output
    /// whose threads hold what they generated so far). Other requests are unaffected.
    /// Cancelling a request that already finished does nothing.
    ///
    /// # Errors
    /// [`SpindleError::UnknownRequest`] when no request has this id.
    pub fn cancel(&mut self, request: RequestId) -> Result<()> {
        let Some(rs) = self.requests.get(&request) else {
            return Err(SpindleError::UnknownRequest { request });
        };
        if rs.done {
            return Ok(());
        }
        self.end_all(request)?;
        self.complete(request, EndReason::Cancelled)
    }

    /// Releases every thread of `request` in the engine and marks them ended.
    pub(super) fn end_all(&mut self, request: RequestId) -> Result<()> {
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
        Ok(())
    }

    /// Cancels a request after an error: every thread released, an `Error` event.
    pub(super) fn fail(&mut self, request: RequestId, message: String) -> Result<()> {
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
    pub(super) fn complete(&mut self, request: RequestId, reason: EndReason) -> Result<()> {
        let Some(rs) = self.requests.get_mut(&request) else {
            return Ok(());
        };
        rs.done = true;
        let root = self.engine.root_of(request)?;
        let mut threads = Vec::new();
        let mut per_thread = Vec::new();
        for &id in &rs.threads {
            let Some(c) = self.ctl.get(&id) else { continue };
            let t = self.engine.thread(id)?;
            per_thread.push(ThreadTokens {
                thread: id,
                path: path_label(&t.path),
                tokens: c.count,
            });
            threads.push(ThreadRecord {
                thread: id,
                parent: t.parent,
                path: t.path.clone(),
                prime: c.prime.clone(),
                generated: c.generated.clone(),
                forks: c.forks.clone(),
                end: c.end.clone(),
            });
        }
        let stats = RequestStats {
            total_tokens: rs.generated,
            critical_path_tokens: self.ctl.get(&root).map_or(0, ThreadCtl::crit),
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
            EndReason::Error | EndReason::Cancelled => Vec::new(),
            _ => self.engine.thread(root)?.own_tokens.clone(),
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

    /// Gives a request that the pool cannot hold beside the others its blocks back and
    /// starts it again from its prompt (it waits behind the older requests). Its output
    /// will be the same: every draw depends only on the request's seed and the thread's
    /// place in the tree. An [`Event::Restarted`] tells a streaming consumer to drop what
    /// it showed of the request so far.
    pub(super) fn restart(&mut self, request: RequestId) -> Result<()> {
        let Some(rs) = self.requests.get_mut(&request) else {
            return Err(SpindleError::UnknownRequest { request });
        };
        rs.source.restart();
        for id in rs.threads.drain(..) {
            if self.ctl.remove(&id).is_some_and(|c| !c.done) {
                self.trace.thread_end(id, self.steps);
            }
        }
        let root = self.engine.restart_request(request, &rs.prompt)?;
        rs.threads.push(root);
        rs.restarts += 1;
        rs.generated = 0;
        rs.forks = 0;
        rs.first_step = None;
        rs.last_step = 0;
        rs.peak_width = 0;
        rs.thread_steps = 0;
        let ctl = root_ctl(&rs.prompt, rs.protocol.as_ref(), rs.seed, rs.budget);
        self.ctl.insert(root, ctl);
        self.trace.thread_start(
            request,
            root,
            format!("request {request} root (restart {})", rs.restarts),
            self.steps,
        );
        self.events.push(Event::Restarted {
            request,
            restarts: rs.restarts,
        });
        Ok(())
    }
}
