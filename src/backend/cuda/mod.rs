//! GPU building blocks for spindle's CUDA backend: device/stream setup with a safe probe
//! for a missing driver ([`device`]), the C ABI of the nvcc-built kernels ([`ffi`], from
//! `kernels/spindle_kernels.h`), one shape-checked safe wrapper per kernel launcher
//! ([`kernels`]), and bf16 GEMM through cuBLAS ([`gemm`]). The FFI is mistral.rs-style:
//! `extern "C"` launcher -> one declaration -> one safe wrapper that checks shapes, then
//! makes the one `unsafe` call (docs/gpu.md, sections 2-4, which also cover the toolchain).

pub mod backend;
pub mod device;
pub mod devmat;
pub mod error;
pub mod ffi;
pub mod gemm;
pub mod kernels;
mod lowering;
pub mod pool;
pub mod profile;
mod weights;

pub use device::{ComputeCapability, Gpu};
pub use error::CudaError;
pub use gemm::Blas;

/// Result type of the CUDA layer.
pub type Result<T> = std::result::Result<T, CudaError>;
