//! spindle's error type: every failure a caller can act on, named precisely.

use crate::tree::{RequestId, ThreadId, ThreadState};
use std::path::PathBuf;

/// An engine operation, as named in [`SpindleError::WrongState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Feed,
    Fork,
    Finish,
    Join,
    ReleaseCache,
    Forget,
    Cancel,
    SetReturns,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Operation::Feed => "feed",
            Operation::Fork => "fork",
            Operation::Finish => "finish",
            Operation::Join => "join",
            Operation::ReleaseCache => "release_cache",
            Operation::Forget => "forget",
            Operation::Cancel => "cancel",
            Operation::SetReturns => "set_returns",
        };
        f.write_str(name)
    }
}

/// Errors returned by the spindle library. User input never panics; it lands here.
#[derive(Debug, thiserror::Error)]
pub enum SpindleError {
    /// The checkpoint could not be loaded (names the file and tensor or field).
    #[error(transparent)]
    Load(#[from] model_loader::LoadError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tree file is malformed (names the file and the problem).
    #[error("{path}: {msg}")]
    TreeFile { path: String, msg: String },
    /// A token id is outside the model's vocabulary.
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocab { token: u32, vocab: usize },
    /// No thread has this id.
    #[error("no thread {thread}")]
    UnknownThread { thread: ThreadId },
    /// No request has this id.
    #[error("no request {request}")]
    UnknownRequest { request: RequestId },
    /// The thread is not in a state the operation accepts.
    #[error("{op} of thread {thread}: it is {state:?}{}, but the operation needs {needs}", if *.queued > 0 { format!(" with {} queued tokens", .queued) } else { String::new() })]
    WrongState {
        thread: ThreadId,
        op: Operation,
        state: ThreadState,
        /// Tokens it still had queued.
        queued: usize,
        /// What the operation needs, in words.
        needs: &'static str,
    },
    /// A fork asked for no children.
    #[error("fork of thread {thread} with no children")]
    EmptyFork { thread: ThreadId },
    /// A fork asked for more children than the engine allows.
    #[error("fork of thread {thread}: {requested} children, at most {max}")]
    ForkTooWide {
        thread: ThreadId,
        requested: usize,
        max: usize,
    },
    /// A fork would nest deeper than the engine allows.
    #[error("fork of thread {thread} at depth {depth}: at most {max} levels")]
    ForkTooDeep {
        thread: ThreadId,
        depth: usize,
        max: usize,
    },
    /// Tokens would take positions past the largest one supported.
    #[error(
        "{tokens} tokens from position {next} would pass the largest supported position {max}"
    )]
    PositionOverflow { next: u64, tokens: usize, max: u32 },
    /// A prompt and its explicit positions differ in length.
    #[error("{tokens} prompt tokens but {positions} positions")]
    PositionsMismatch { tokens: usize, positions: usize },
    /// A request needs at least one prompt token.
    #[error("a request needs at least one prompt token")]
    EmptyPrompt,
    /// A KV-reuse join found a child whose cache was given back.
    #[error("reuse join of thread {thread}: child {child} gave its cache back (forked for a re-prefill join)")]
    CacheReleased { thread: ThreadId, child: ThreadId },
    /// The request was cancelled through the API.
    #[error("request {request} was cancelled")]
    Cancelled { request: RequestId },
    /// A setting or command-line value is invalid (names it).
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// A replay or script input does not describe a valid run (names the problem).
    #[error("{0}")]
    InvalidInput(String),
    /// The K/V cache asked for does not fit in memory.
    #[error("a K/V cache of {slots} slots does not fit in memory")]
    CacheTooLarge { slots: usize },
    /// An allocation failed (names what, and its size).
    #[error("out of memory: cannot allocate {what} ({mib} MiB)")]
    OutOfMemory { what: &'static str, mib: usize },
    /// A command-line run finished, but some of its requests failed (reported above it).
    #[error("{0}")]
    RunFailed(String),
    /// JSON could not be written or read.
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The KV pool cannot be sized for the model on this device (names why).
    #[error("KV cache too small: {0}")]
    OutOfBlocks(String),
    /// Even after preempting every other thread, this thread's next tokens do not fit.
    #[error("KV cache too small: {free} free blocks of {block_size} tokens cannot hold the next tokens of thread {thread} (request {request})")]
    ThreadDoesNotFit {
        thread: ThreadId,
        request: RequestId,
        free: usize,
        block_size: usize,
    },
    /// A backend failed (device error, unsupported shape).
    #[error("backend: {0}")]
    Backend(String),
    /// A device call failed (for CUDA: no device, driver, cuBLAS, kernel launch or argument
    /// check); the device's own error is kept as the source (`CudaError` for CUDA, wrapped
    /// where the CUDA backend meets the rest of spindle).
    #[error("{backend}: {source}")]
    Device {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A tokenizer file is missing or malformed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A protocol definition is inconsistent.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Result alias for the library.
pub type Result<T, E = SpindleError> = std::result::Result<T, E>;
