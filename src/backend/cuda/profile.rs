//! NVTX ranges (cudarc's NVTX bindings, loaded at run time: without `libnvToolsExt` every
//! range is a no-op, never a panic) and the profiler start/stop of `--profile-steps`.

use std::sync::OnceLock;

use super::CudaError;
use crate::error::Result;

/// Whether the NVTX library can be loaded (probed once).
fn nvtx_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the NVTX library; no NVTX call is made.
    *PRESENT.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() })
}

/// An NVTX range, ended when dropped (nothing when NVTX is absent).
pub struct Range(#[allow(dead_code)] Option<cudarc::nvtx::Range>);

/// Whether `SPINDLE_NVTX` asks for NVTX ranges on every step (read once); without it they
/// are recorded only inside a `--profile-steps` window.
pub fn nvtx_requested() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SPINDLE_NVTX").is_some_and(|v| v != "0"))
}

/// Opens the NVTX range `name` (a step, a phase, a kernel family) when `on` and NVTX is
/// present; otherwise nothing.
pub fn range(on: bool, name: &str) -> Range {
    Range((on && nvtx_present()).then(|| cudarc::nvtx::scoped_range(name)))
}

/// `cuProfilerStart` (or `cuProfilerStop` when `start` is false).
pub fn profiler(start: bool) -> Result<()> {
    // SAFETY: FFI edge; both calls take no arguments and only toggle the attached
    // profiler's collection for the current context (bound by the backend's stream).
    let r = unsafe {
        if start {
            cudarc::driver::sys::cuProfilerStart()
        } else {
            cudarc::driver::sys::cuProfilerStop()
        }
    };
    r.result().map_err(|e| CudaError::from(e).into())
}
