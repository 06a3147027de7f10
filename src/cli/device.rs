//! `--device cpu|cuda|auto`: which backend a command runs on.

use crate::error::{Result, SpindleError};

/// The device a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// The f32 CPU backend (the reference).
    Cpu,
    /// The CUDA backend (needs a build with `--features cuda` and a GPU).
    Cuda,
}

/// The backend a command will actually use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Cpu,
    Cuda,
}

impl Device {
    /// Picks the backend, probing for a GPU without touching it when it is absent.
    pub fn resolve(self) -> Result<Resolved> {
        match self {
            Device::Cpu => Ok(Resolved::Cpu),
            Device::Auto => Ok(if gpu_usable().is_ok() {
                Resolved::Cuda
            } else {
                Resolved::Cpu
            }),
            Device::Cuda => gpu_usable().map(|()| Resolved::Cuda),
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_usable() -> Result<()> {
    crate::cuda::device::Gpu::probe()
        .map(|_| ())
        .map_err(|e| SpindleError::Backend(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn gpu_usable() -> Result<()> {
    Err(SpindleError::Backend(
        "this spindle was built without the `cuda` feature (cargo build --features cuda)".into(),
    ))
}

/// The CUDA backend does not run whole models yet: say so instead of pretending.
pub fn require_cpu(resolved: Resolved) -> Result<()> {
    match resolved {
        Resolved::Cpu => Ok(()),
        Resolved::Cuda => Err(SpindleError::Backend(
            "the CUDA backend runs the kernel tests and benchmarks but not whole models yet; use --device cpu".into(),
        )),
    }
}
