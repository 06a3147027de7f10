//! The thread tree: one reasoning thread's state (its KV view, tokens, positions) and the
//! fork / join rules of `tests/fixtures/README.md`.

use crate::kv::KvView;
use std::collections::VecDeque;
use std::fmt;

/// Largest position a token may take (positions travel to the GPU as int32).
pub const MAX_POSITION: u32 = i32::MAX as u32;

/// A thread's id: its index in the engine. Never reused while the engine lives.
///
/// Printed (`{}` and `{:?}` alike) as the bare number, as messages and traces always
/// showed it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct ThreadId(pub usize);

/// A request's id: the engine numbers requests 0, 1, 2, ... as they are added, apart from
/// thread ids. A request keeps its id when it is started again
/// ([`crate::Engine::restart_request`]).
///
/// Printed (`{}` and `{:?}` alike) as the bare number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct RequestId(pub usize);

macro_rules! bare_number {
    ($t:ty) => {
        impl $t {
            /// The number inside (an index into the engine's tables).
            pub fn index(self) -> usize {
                self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}
bare_number!(ThreadId);
bare_number!(RequestId);

/// How children's results return to their parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// Keep the children's K/V: the parent's context gains every child's own cached tokens.
    Reuse,
    /// Feed each child's transcript (or its `returns`) to the parent again as new tokens.
    Reprefill,
}

/// Where a thread is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadState {
    /// Has work, or may be given more.
    Active,
    /// Forked; suspended until its children are joined.
    Waiting,
    /// Ended; a child stays here until its parent joins it.
    Finished,
    /// Joined or released: holds no blocks.
    Retired,
}

/// A token waiting to be appended to a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub token: u32,
    pub pos: u32,
    /// False for tokens fed again after a preemption: their outputs were already delivered.
    pub emit: bool,
}

/// One reasoning thread.
///
/// Laid out for the step: the fields every decode step touches come first, so a thread's
/// per-step work reads its first two cache lines (and the third in `build_batch`) instead
/// of five scattered ones; the tree's bookkeeping follows.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub struct Thread {
    // Cache line 0.
    pub state: ThreadState,
    /// Logits at every fed token, not only the last queued one.
    pub all_logits: bool,
    /// Position the next fed token gets.
    pub next_pos: u32,
    /// Cached context.
    pub view: KvView,
    // Cache line 1.
    /// Tokens queued for the next steps.
    pub pending: VecDeque<Pending>,
    /// `[context len - fork_len]` token ids of the thread's own context part (from its
    /// fork point on; a root's whole context), in context order. A fork copies nothing:
    /// the shared part is the parent's.
    pub own_tokens: Vec<u32>,
    // Cache line 2 on: read when the tree changes.
    /// `[own_tokens.len()]` their positions.
    pub own_pos: Vec<u32>,
    pub id: ThreadId,
    /// The request this thread belongs to.
    pub request: RequestId,
    pub parent: Option<ThreadId>,
    /// Child indices from the root: the thread's path in the tree.
    pub path: Vec<u32>,
    pub children: Vec<ThreadId>,
    /// Context length when this thread was forked (its own part starts there).
    pub fork_len: usize,
    /// Leading context tokens this thread cannot recompute as one sequence of its own: the
    /// shared prefix, and everything up to its last KV-reuse join (children's K/V were
    /// computed with their own visibility). Preemption keeps them.
    pub pinned_len: usize,
    /// Tokens handed back at a re-prefill join instead of the transcript (APR).
    pub returns: Option<Vec<u32>>,
    /// KV-reuse joins this thread has made (children's caches merged into its context).
    pub reuse_joins: u32,
    /// Give the blocks back at finish (a re-prefill join needs only the tokens).
    pub release_on_finish: bool,
}

impl Thread {
    /// Depth in the tree (root = 0).
    pub fn depth(&self) -> usize {
        self.path.len()
    }

    /// Tokens of the thread's own context part (after its fork point), in order.
    pub fn transcript(&self) -> &[u32] {
        &self.own_tokens
    }

    /// Tokens of the thread's context: the shared part up to its fork point and its own.
    pub fn context_len(&self) -> usize {
        self.fork_len + self.own_tokens.len()
    }

    /// True while the cache still holds the whole context (a thread that gave its blocks
    /// back at finish does not).
    pub fn cache_intact(&self) -> bool {
        self.view.len() == self.context_len()
    }

    /// Queues `tokens` at the next positions.
    pub fn feed(&mut self, tokens: &[u32]) {
        debug_assert!(
            self.next_pos as usize + tokens.len() <= MAX_POSITION as usize + 1,
            "positions checked by the engine"
        );
        for &token in tokens {
            self.pending.push_back(Pending {
                token,
                pos: self.next_pos,
                emit: true,
            });
            self.next_pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The step's fields stay in the thread's first two cache lines (see [`Thread`]).
    #[test]
    fn step_fields_fill_the_first_two_cache_lines() {
        assert_eq!(std::mem::align_of::<Thread>(), 64);
        assert!(offset_of!(Thread, view) + size_of::<KvView>() <= 64);
        assert!(offset_of!(Thread, pending) >= 64);
        assert!(offset_of!(Thread, own_tokens) + size_of::<Vec<u32>>() <= 128);
    }
}
