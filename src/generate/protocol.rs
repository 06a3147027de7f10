//! The protocol interface: how a thread's own generated tokens turn into forks, thread
//! ends and joins. [`super::tags::TagProtocol`] is the data-driven implementation with the
//! ThreadWeaver, Multiverse and APR presets; users can implement [`Protocol`] themselves.

use crate::tree::JoinKind;

/// A thread's role in its request's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The request's root thread.
    Root,
    /// The `index`-th child (0-based) of a fork.
    Child { index: usize },
}

/// One child a fork asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSpec {
    /// Tokens fed to the child before it generates (`<Thread> 1:`, or APR's message).
    pub prime: Vec<u32>,
}

/// A fork the model asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkSpec {
    /// One entry per child, in order.
    pub children: Vec<ChildSpec>,
    /// Children start with the parent's context (ThreadWeaver, Multiverse) or empty (APR).
    pub share_context: bool,
    /// How the children's work returns to the parent.
    pub join: JoinKind,
    /// Tokens fed to the parent after the join (Multiverse's `<Conclusion>`).
    pub after_join: Vec<u32>,
}

/// What the runtime does after a thread generated a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ordinary text: keep generating.
    Text,
    /// Once the token is cached, fork the thread as `ForkSpec` says.
    Fork(ForkSpec),
    /// Once the token is cached, end this child thread; with `returns`, only those tokens
    /// go back to the parent at a re-prefill join (APR).
    End { returns: Option<Vec<u32>> },
    /// The token broke the protocol; it is kept as text and reported as an error event.
    Malformed(String),
}

/// How a thread ended when a budget cut it short.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Truncation {
    /// Tokens handed back instead of the transcript at a re-prefill join (for example the
    /// transcript with its closing tag added, so the parent's text stays well formed).
    pub returns: Option<Vec<u32>>,
    /// Tokens added after the transcript at a re-prefill join when `returns` is `None`
    /// (the child-end tag the child never wrote).
    pub append: Vec<u32>,
    /// A protocol problem to report (an unclosed block).
    pub problem: Option<String>,
}

/// A chosen token cut at the end of a control tag's text ([`ThreadParser::split`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSplit {
    /// Tokens of the text up to the tag's end, fed in the token's place.
    pub head: Vec<u32>,
    /// Tokens of the rest of the token's text, fed after unless the tag forks or ends
    /// the thread.
    pub rest: Vec<u32>,
}

/// Reads one thread's tokens as they are generated.
pub trait ThreadParser: Send {
    /// Called with a newly chosen `token` before it is cached (`generated` does not hold it
    /// yet). When a control tag's text ends inside the token, returns the tokens of its text
    /// up to the tag's end (`head`, fed in its place) and of the rest (`rest`, fed after
    /// unless the tag forks or ends the thread). `None`: feed the token as it is.
    fn split(&mut self, _generated: &[u32], _token: u32) -> Option<TokenSplit> {
        None
    }
    /// `generated` is every token the thread generated so far; its last one is new.
    fn on_token(&mut self, generated: &[u32]) -> Action;
    /// The thread's budget ran out after `generated`.
    fn on_truncate(&mut self, generated: &[u32]) -> Truncation;
}

/// A fork/join protocol: a parser per thread plus the tokens it treats as control.
pub trait Protocol: Send + Sync {
    /// Short name ("threadweaver").
    fn name(&self) -> &str;
    /// A parser for a new thread with `role`.
    fn parser(&self, role: Role) -> Box<dyn ThreadParser>;
    /// Every token id that is part of a control tag (for display and for masking).
    fn control_tokens(&self) -> Vec<u32>;
}
