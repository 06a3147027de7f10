//! Per-thread random numbers: the loader crate's seeded generator (splitmix64 seeding,
//! xoshiro256** streams), re-exported where generation uses it.

pub use model_loader::rng::{mix, splitmix64, Rng};
