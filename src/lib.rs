//! spindle: a runtime for adaptive parallel reasoning. A model forks its reasoning into
//! threads that share a copy-on-write paged KV cache; every active thread of every request
//! runs in one fused batch per step, and shared prefixes are read once per step.
//!
//! ```
//! use model_loader::Checkpoint;
//! use spindle::{CpuBackend, Engine, EngineConfig, JoinKind};
//!
//! let ck = Checkpoint::open("tests/fixtures/tiny-llama".as_ref())?;
//! let backend = CpuBackend::load(&ck, /* blocks */ 256, /* block size */ 16)?;
//! let mut engine = Engine::new(backend, EngineConfig::default());
//!
//! let root = engine.add_request(&[1, 2, 3, 4])?; // prompt, prefilled in one step
//! engine.step()?;
//! let kids = engine.fork(root, 3, true)?; // metadata only: the prefix is shared
//! for (i, &k) in kids.iter().enumerate() {
//!     engine.feed(k, &[10 + i as u32])?;
//! }
//! let out = engine.step()?; // all three children in one batch
//! assert_eq!(out.threads.len(), 3);
//! assert_eq!(out.logits.len(), 3 * 512); // one [rows, vocab] buffer, borrowed
//! for &k in &kids {
//!     engine.finish(k)?;
//! }
//! engine.join(root, JoinKind::Reuse)?; // the parent now attends to their K/V
//! engine.feed(root, &[5])?;
//! let out = engine.step()?;
//! let logits = out.last_logits(&out.threads[0]).expect("next-token logits"); // [vocab]
//! assert_eq!(logits.len(), 512);
//! engine.finish(root)?;
//! assert!(engine.pool().all_free());
//! # Ok::<(), spindle::SpindleError>(())
//! ```

pub mod backend;
pub mod device;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv;
pub mod model;
pub mod plan;
pub mod tokenizer;
pub mod tree;

pub use backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use backend::cuda::backend::{CudaBackend, CudaOptions, KvPoolSize};
pub use device::{run_on, Device, EngineJob};
pub use engine::{Engine, EngineConfig, EngineStats, PlanCounts, StepOutput};
pub use error::{Result, SpindleError};
pub use plan::AttentionMode;
pub use tree::{JoinKind, RequestId, ThreadId};
pub mod replay;
