//! Error type of the CUDA layer: wraps cudarc driver and cuBLAS errors and adds spindle's
//! own cases (no device, kernel launch status, argument checks). candle-style thiserror enum.

use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;

/// Everything the CUDA layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable CUDA driver or device (libcuda missing, no GPU, or an init failure).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver API call failed.
    #[error("CUDA driver error: {0:?}")]
    Driver(#[from] DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0:?}")]
    Cublas(#[from] CublasError),
    /// A kernel launcher returned a non-zero `cudaError_t`.
    #[error("kernel `{kernel}` failed: cudaError {code}")]
    Launch {
        /// Launcher name, e.g. `spindle_paged_decode`.
        kernel: &'static str,
        /// The `cudaError_t` value (1 = invalid value, 35 = insufficient driver, ...).
        code: i32,
    },
    /// A safe wrapper rejected its arguments before launching.
    #[error("`{kernel}`: {msg}")]
    Shape {
        /// Launcher name.
        kernel: &'static str,
        /// What was wrong.
        msg: String,
    },
}

impl CudaError {
    pub(crate) fn shape(kernel: &'static str, msg: impl Into<String>) -> Self {
        CudaError::Shape {
            kernel,
            msg: msg.into(),
        }
    }

    /// Maps a launcher's return status to a `Result`.
    pub(crate) fn check(kernel: &'static str, code: i32) -> Result<(), CudaError> {
        if code == 0 {
            Ok(())
        } else {
            Err(CudaError::Launch { kernel, code })
        }
    }
}

impl From<CudaError> for crate::error::SpindleError {
    /// The CUDA backend's errors reach callers as [`SpindleError::Device`], the CUDA error
    /// kept as the source.
    ///
    /// [`SpindleError::Device`]: crate::error::SpindleError::Device
    fn from(e: CudaError) -> Self {
        crate::error::SpindleError::Device {
            backend: "cuda",
            source: Box::new(e),
        }
    }
}
