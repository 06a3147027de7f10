//! Device selection: probes for the CUDA driver library before touching cudarc (whose
//! `CudaContext::new` panics when libcuda is absent; docs/gpu.md, section 4), then owns the
//! context and the one stream every kernel and cuBLAS call of the backend is issued on
//! (cudarc's event tracking is off: the stream alone orders the work).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use super::{CudaError, Result};

/// A CUDA compute capability: `sm_90` is major 9, minor 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ComputeCapability {
    pub major: i32,
    pub minor: i32,
}

/// A CUDA device with its context and work stream.
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Gpu {
    /// Number of CUDA devices, or `NoDevice` when there is no driver or no device.
    pub fn probe() -> Result<usize> {
        // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDevice("libcuda.so not found".into()));
        }
        let n = CudaContext::device_count()
            .map_err(|e| CudaError::NoDevice(format!("cuInit/cuDeviceGetCount failed: {e:?}")))?;
        if n <= 0 {
            return Err(CudaError::NoDevice("driver present but no device".into()));
        }
        Ok(n as usize)
    }

    /// Opens device `ordinal` (its primary context) and creates a non-blocking stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        let n = Self::probe()?;
        if ordinal >= n {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, {n} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::NoDevice(format!("cuCtx init failed: {e:?}")))?;
        // One stream orders everything, so cudarc's per-buffer event tracking (an event
        // recorded on every allocation and waited on at every access once a second stream
        // exists) is pure host overhead: off before any buffer is created.
        // SAFETY: cudarc's contract for turning tracking off: every buffer of this context is
        // used on `stream` only (kernels, cuBLAS and copies are all issued on it), so no
        // buffer is freed or read while another stream still uses it.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        ctx.bind_to_thread()?;
        // SAFETY: FFI edge; takes no arguments and sets function attributes of the
        // kernels in the context just bound.
        let code = unsafe { super::ffi::spindle_forked_attention_prepare() };
        CudaError::check("spindle_forked_attention_prepare", code)?;
        Ok(Self { ctx, stream })
    }

    /// Clears the CUDA runtime's last error (after a failed graph capture, whose error
    /// would otherwise be reported again by the next launch's check).
    pub fn clear_last_error() {
        // SAFETY: FFI edge; no arguments, only reads and resets the runtime's error state.
        unsafe { super::ffi::spindle_clear_last_error() };
    }

    /// The context.
    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all work is issued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device name, e.g. "NVIDIA H200".
    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// The device's compute capability.
    pub fn compute_capability(&self) -> Result<ComputeCapability> {
        let (major, minor) = self.ctx.compute_capability()?;
        Ok(ComputeCapability { major, minor })
    }

    /// Blocks until all work on the stream is done.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}
