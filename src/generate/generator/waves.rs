//! Starting a fork's children in waves: as many as the free KV blocks allow (each planned
//! at its prime plus its planned growth, in blocks as the engine counts them), the rest
//! when running siblings end.

use super::*;

impl<B: Backend> Generator<B> {
    pub(super) fn push_waves(&mut self, parent: ThreadId, started: &[ThreadId]) -> Result<()> {
        let Some(c) = self.ctl.get(&parent) else {
            return Ok(());
        };
        let Some(fs) = &c.fork else { return Ok(()) };
        let per_child = fs
            .children
            .iter()
            .zip(&fs.spec.children)
            .map(|(&k, ch)| self.blocks_still_needed(k, ch.prime.len()))
            .max()
            .unwrap_or(0);
        let running = fs.children[..fs.started]
            .iter()
            .filter(|k| self.ctl.get(k).is_some_and(|k| !k.done))
            .count();
        self.events.push(Event::Waves {
            request: self.engine.request_of(parent)?,
            parent,
            children: fs.children.len(),
            running,
            started: started.to_vec(),
            free_blocks: self.engine.pool().num_free(),
            blocks_per_child: per_child,
        });
        Ok(())
    }

    /// Blocks child `id` (primed with `prime_len` tokens) may still claim under the
    /// policy's plan: the engine's count for the planned tokens it has not cached yet.
    fn blocks_still_needed(&self, id: ThreadId, prime_len: usize) -> usize {
        let planned = self.policy.planned_tokens(prime_len);
        let cached = self.engine.context_since_fork(id);
        self.engine
            .blocks_needed(id, planned.saturating_sub(cached))
    }

    /// Blocks that running children may still claim under the policy's plan.
    pub(super) fn outstanding_blocks(&self) -> usize {
        self.ctl
            .iter()
            .filter(|(_, c)| c.started && !c.done && c.role != Role::Root && c.fork.is_none())
            .map(|(&id, c)| self.blocks_still_needed(id, c.prime.len()))
            .sum()
    }

    /// Starts as many of `parent`'s waiting children as free blocks allow (at least one when
    /// none of them is running, so a fork always progresses). When the request's budget
    /// is spent, waiting children end at once without running.
    pub(super) fn start_children(&mut self, parent: ThreadId) -> Result<Vec<ThreadId>> {
        let Some(c) = self.ctl.get(&parent) else {
            return Ok(Vec::new());
        };
        let Some(fs) = &c.fork else {
            return Ok(Vec::new());
        };
        let request = self.engine.request_of(parent)?;
        let waiting: Vec<ThreadId> = fs.children[fs.started..].to_vec();
        if waiting.is_empty() {
            return Ok(Vec::new());
        }
        let running = fs.children[..fs.started]
            .iter()
            .filter(|k| self.ctl.get(k).is_some_and(|k| !k.done))
            .count();
        let empty: Vec<ThreadId> = waiting
            .iter()
            .copied()
            .filter(|k| self.ctl.get(k).is_some_and(|kc| kc.allowance == 0))
            .collect();
        if empty.len() == waiting.len() {
            // Nothing to spend: the waiting children end empty.
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
            let need = self.blocks_still_needed(k, prime_len);
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

    pub(super) fn span_name(&self, id: ThreadId) -> String {
        match self.engine.thread(id) {
            Ok(t) if self.ctl.contains_key(&id) => format!("[{}] t{id}", path_label(&t.path)),
            _ => format!("t{id}"),
        }
    }

    /// Starts waiting children wherever they now fit.
    pub(super) fn start_waves(&mut self) -> Result<bool> {
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
                self.push_waves(p, &started)?;
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
}
