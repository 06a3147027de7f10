//! What a finished request hands back: every thread's tokens, the tree shape, the root's
//! final context, and its statistics; plus a plain-text rendering of the tree.

use super::events::{path_label, EndReason, RequestStats};
use crate::tokenizer::Tokenizer;
use crate::tree::{RequestId, ThreadId};

/// One thread of a finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadRecord {
    pub thread: ThreadId,
    pub parent: Option<ThreadId>,
    pub path: Vec<u32>,
    /// Tokens fed before it generated (prompt for the root, prime for a child).
    pub prime: Vec<u32>,
    /// Tokens it generated, end-of-sequence included.
    pub generated: Vec<u32>,
    /// Children of each of its forks, in order.
    pub forks: Vec<Vec<ThreadId>>,
    /// Why it ended (`None` when it never ran: a cancelled request).
    pub end: Option<EndReason>,
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct RequestOutput {
    pub request: RequestId,
    pub reason: EndReason,
    /// The root's final context: prompt, its tokens, joined children's tokens (re-prefilled
    /// or reused), in context order. Empty for a cancelled request.
    pub context: Vec<u32>,
    /// Every thread, in creation order (the root first).
    pub threads: Vec<ThreadRecord>,
    pub stats: RequestStats,
}

impl RequestOutput {
    /// The thread record of `id`.
    pub fn thread(&self, id: ThreadId) -> Option<&ThreadRecord> {
        self.threads.iter().find(|t| t.thread == id)
    }

    /// The tree as indented text, one line per thread (`[0.1] prime | generated`); with a
    /// tokenizer the tokens are decoded, otherwise printed as ids.
    pub fn render_tree(&self, tok: Option<&Tokenizer>) -> String {
        let mut out = String::new();
        let show = |ids: &[u32]| -> String {
            match tok.map(|t| t.decode(ids)) {
                Some(Ok(s)) => format!("{s:?}"),
                _ => format!("{ids:?}"),
            }
        };
        let mut stack: Vec<ThreadId> = self.threads.first().map(|t| t.thread).into_iter().collect();
        while let Some(id) = stack.pop() {
            let Some(t) = self.thread(id) else { continue };
            let indent = "  ".repeat(t.path.len());
            let end = t
                .end
                .as_ref()
                .map(|e| format!("{e:?}"))
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "{indent}[{}] {} tokens, end {end}: {} | {}\n",
                path_label(&t.path),
                t.generated.len(),
                show(&t.prime),
                show(&t.generated)
            ));
            for fork in t.forks.iter().rev() {
                stack.extend(fork.iter().rev());
            }
        }
        out
    }
}
