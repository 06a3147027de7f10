//! Adaptive generation: the model's own control tags fork and join its reasoning tree.
//!
//! - [`protocol`] / [`tags`]: protocols as data (ThreadWeaver, Multiverse, APR presets) plus
//!   the small trait a user protocol implements.
//! - [`policy`]: width, depth, budgets, resource-aware waves.
//! - [`sampler`] / [`rng`] / [`scripted`]: choosing tokens (real sampling with a per-thread
//!   seeded generator; a scripted source for tests and the demo).
//! - [`generator`]: the driver over the engine; [`events`], [`output`], [`trace`]: what it
//!   reports.
//! - [`demo`]: the synthetic workload of `spindle demo`.

pub mod demo;
pub mod events;
pub mod generator;
pub mod output;
pub mod policy;
pub mod protocol;
pub mod rng;
pub mod sampler;
pub mod scripted;
pub mod tags;
pub mod trace;

pub use events::{EndReason, Event, RequestStats};
pub use generator::{Generator, Request};
pub use output::{RequestOutput, ThreadRecord};
pub use policy::Policy;
pub use protocol::{
    Action, ChildSpec, ForkSpec, Protocol, Role, ThreadParser, TokenSplit, Truncation,
};
pub use sampler::{
    row_distribution, sample_row, Decide, RowSampling, Sampler, SamplingParams, TokenSource,
};
pub use scripted::{ScriptItem, Scripted};
pub use tags::{SplitTag, TagProtocol, TagSpec};
pub use trace::TraceRecorder;
