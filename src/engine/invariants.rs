//! The engine's invariants (reference counts, chunks inside blocks, a consistent thread
//! tree, nothing held when nothing lives), checked on demand or after every change.

use super::Engine;
use crate::backend::Backend;
use crate::tree::ThreadState;

impl<B: Backend> Engine<B> {
    /// With [`EngineConfig::check_invariants`](super::EngineConfig::check_invariants), checks them and panics on a violation (an
    /// engine bug, never a user's mistake).
    pub(super) fn after_change(&self) {
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
        let bs = self.kv.pool().block_size() as u32;
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
            if t.view.last_chunk() != t.view.chunk_iter().last() {
                return Err(format!(
                    "thread {id}: the view's copy of its last chunk is stale"
                ));
            }
            if len != t.view.len() || t.view.len() > t.context_len() {
                return Err(format!(
                    "thread {id}: view of {} tokens, chunks hold {len}, context {}",
                    t.view.len(),
                    t.context_len()
                ));
            }
            if t.own_tokens.len() != t.own_pos.len()
                || t.pinned_len > t.context_len()
                || t.pinned_len < t.fork_len
            {
                return Err(format!(
                    "thread {id}: context tokens, positions and pin disagree"
                ));
            }
            match t.parent {
                None if t.state != ThreadState::Retired
                    && self.roots.get(t.request.index()) != Some(&id) =>
                {
                    return Err(format!(
                        "live root {id} names request {}, whose root differs",
                        t.request
                    ))
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
        if self.live.is_empty() && !self.kv.pool().all_free() {
            return Err(format!(
                "no live thread but {} blocks in use",
                self.kv.pool().num_used()
            ));
        }
        Ok(())
    }

    /// Recounts every block reference from the live views and compares with the pool
    /// (a consistency check for tests).
    pub fn check_refcounts(&self) -> std::result::Result<(), String> {
        let mut counts = vec![0u32; self.kv.pool().num_blocks()];
        for t in &self.threads {
            for b in t.view.block_occurrences() {
                counts[b as usize] += 1;
            }
        }
        for (b, &c) in counts.iter().enumerate() {
            if self.kv.pool().refcount(b as u32) != c {
                return Err(format!(
                    "block {b}: pool says {} references, views hold {c}",
                    self.kv.pool().refcount(b as u32)
                ));
            }
        }
        Ok(())
    }
}
