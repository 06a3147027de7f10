//! Choosing a device (the CPU backend, or the CUDA one when a GPU is usable) and running an
//! engine job on it, whatever the backend type.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Result, SpindleError};
use model_loader::Checkpoint;

/// The device a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

impl std::str::FromStr for Device {
    type Err = SpindleError;

    /// `auto`, `cpu` or `cuda`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(SpindleError::InvalidSetting(format!(
                "device {other:?}: expected auto, cpu or cuda"
            ))),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
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
    crate::backend::cuda::device::Gpu::probe()
        .map(|_| ())
        .map_err(|e| SpindleError::Backend(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn gpu_usable() -> Result<()> {
    Err(SpindleError::Backend(
        "this spindle was built without the `cuda` feature (cargo build --features cuda)".into(),
    ))
}

/// Work that runs on an engine of whichever backend the device resolved to.
pub trait EngineJob {
    /// Runs the job.
    fn run<B: Backend>(self, engine: Engine<B>) -> Result<()>;
}

/// Loads `ck` on the resolved device with a pool of `blocks` blocks of `block_size`
/// tokens and runs `job` on an engine over it.
pub fn run_on(
    device: Device,
    ck: &Checkpoint,
    blocks: usize,
    block_size: usize,
    cfg: EngineConfig,
    job: impl EngineJob,
) -> Result<()> {
    match device.resolve()? {
        Resolved::Cpu => job.run(Engine::new(CpuBackend::load(ck, blocks, block_size)?, cfg)),
        Resolved::Cuda => run_cuda(ck, blocks, block_size, cfg, job),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(
    ck: &Checkpoint,
    blocks: usize,
    block_size: usize,
    cfg: EngineConfig,
    job: impl EngineJob,
) -> Result<()> {
    use crate::backend::cuda::backend::{CudaBackend, CudaOptions, KvPoolSize};
    let opts = CudaOptions {
        block_size,
        pool: KvPoolSize::Blocks(blocks),
        ..Default::default()
    };
    job.run(Engine::new(CudaBackend::load(ck, &opts)?, cfg))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _ck: &Checkpoint,
    _blocks: usize,
    _block_size: usize,
    _cfg: EngineConfig,
    _job: impl EngineJob,
) -> Result<()> {
    gpu_usable()
}
