//! spindle's error type: every failure a caller can act on, named precisely.

use std::path::PathBuf;

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
    /// A request or engine call is invalid (unknown thread, join before the children end, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The KV pool cannot hold even one step of the work that remains.
    #[error("KV cache too small: {0}")]
    OutOfBlocks(String),
    /// Even after preempting every other thread, this thread's next tokens do not fit.
    #[error("KV cache too small: {free} free blocks of {block_size} tokens cannot hold the next tokens of thread {thread} (request {request})")]
    ThreadDoesNotFit {
        thread: usize,
        request: usize,
        free: usize,
        block_size: usize,
    },
    /// A backend failed (device error, unsupported shape).
    #[error("backend: {0}")]
    Backend(String),
    /// A CUDA call failed (no device, driver, cuBLAS, kernel launch or argument check).
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
    /// A tokenizer file is missing or malformed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A protocol definition is inconsistent.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Result alias for the library.
pub type Result<T, E = SpindleError> = std::result::Result<T, E>;
