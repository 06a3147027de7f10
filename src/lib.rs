//! spindle: a runtime for adaptive parallel reasoning. A model forks its reasoning into
//! threads that share a copy-on-write paged KV cache; every active thread of every request
//! runs in one fused batch per step, and shared prefixes are read once per step.

pub mod backend;
pub mod cli;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv;
pub mod model;
pub mod plan;
pub mod tokenizer;
pub mod tree;

pub use backend::cpu::CpuBackend;
pub use engine::{Engine, EngineConfig, EngineStats, StepOutput};
pub use error::{Result, SpindleError};
pub use plan::AttentionMode;
pub use tree::{JoinKind, ThreadId};
pub mod replay;
pub mod tree_file;
