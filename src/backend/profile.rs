//! Profiling hooks shared by the backends: which engine steps to bracket with
//! `cuProfilerStart` / `cuProfilerStop` (`--profile-steps A..B`, so `nsys`/`ncu` with
//! `--capture-range=cudaProfilerApi` record only those steps; docs/profiling.md). The CUDA
//! backend reads it at each step; the CPU backend has nothing to bracket.

use std::ops::Range;
use std::sync::Mutex;

use crate::error::{Result, SpindleError};

static PROFILE_STEPS: Mutex<Option<Range<u64>>> = Mutex::new(None);

/// Brackets steps `steps.start .. steps.end` (0-based, end exclusive) of every CUDA backend
/// of this process with the profiler's start and stop.
pub fn set_profile_steps(steps: Option<Range<u64>>) {
    *PROFILE_STEPS.lock().unwrap_or_else(|e| e.into_inner()) = steps;
}

/// The steps to profile, if any.
pub fn profile_steps() -> Option<Range<u64>> {
    PROFILE_STEPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Parses `A..B` (0-based steps, `B` exclusive, `A < B`).
pub fn parse_steps(s: &str) -> Result<Range<u64>> {
    let bad = || {
        SpindleError::InvalidSetting(format!(
            "--profile-steps {s:?}: expected A..B with A < B, e.g. 10..20"
        ))
    };
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a >= b {
        return Err(bad());
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ranges_parse_or_say_why_not() {
        assert_eq!(parse_steps("10..20").expect("ok"), 10..20);
        assert_eq!(parse_steps(" 0 .. 1").expect("ok"), 0..1);
        for bad in ["", "5", "5..5", "7..3", "a..b", "1..-2", "1...3"] {
            assert!(parse_steps(bad).is_err(), "{bad:?}");
        }
    }
}
