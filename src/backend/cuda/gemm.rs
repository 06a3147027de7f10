//! Linear layers through cuBLAS (`cublasGemmEx`, bf16 inputs, f32 compute): the GEMM half
//! of the GPU backend. Weights stay in HF layout `[out_features, in_features]` row-major.

use std::sync::Arc;

use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use half::bf16;

use super::{CudaError, Result};

/// Output element types of [`Blas::linear`].
pub trait GemmOut: DeviceRepr {
    #[doc(hidden)]
    const DTYPE: sys::cudaDataType;
}
impl GemmOut for bf16 {
    const DTYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}
impl GemmOut for f32 {
    const DTYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

/// Bytes of the workspace each handle gets (cuBLAS recommends 32 MiB on Hopper, 4 MiB
/// before it; one size for both).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLAS handle bound to one stream, with a workspace of its own set at creation, so a
/// GEMM captured into a CUDA graph never allocates (cuBLAS would otherwise take stream-
/// ordered memory inside the capture).
#[derive(Debug)]
pub struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    /// `[WORKSPACE_BYTES]` owned here for the handle's life.
    _workspace: CudaSlice<u8>,
}

impl Blas {
    /// Creates a cuBLAS handle on `stream`; `NoDevice` when libcublas is not installed
    /// (checked first: cudarc's dynamic loader panics on a missing library).
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only tries to dlopen libcublas.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDevice("libcublas not found".into()));
        }
        let blas = CudaBlas::new(stream.clone())?;
        // SAFETY: uninitialised device memory handed to cuBLAS as scratch (it writes before
        // it reads).
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }?;
        {
            let (wp, _g) = workspace.device_ptr(&stream);
            // SAFETY: FFI edge; the handle is live, the pointer names WORKSPACE_BYTES bytes
            // of this context that `Blas` keeps alive as long as the handle.
            unsafe {
                sys::cublasSetWorkspace_v2(*blas.handle(), wp as usize as *mut _, WORKSPACE_BYTES)
            }
            .result()?;
        }
        Ok(Self {
            blas,
            stream,
            _workspace: workspace,
        })
    }

    /// The stream GEMMs are issued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `out[m, n] = x[m, k] . w[n, k]^T` (+ `beta * out` when `accumulate`), bf16 inputs,
    /// f32 accumulation, out bf16 or f32. `w` is an HF linear weight (row-major
    /// `[out_features, in_features]`). Row-major out = col-major out^T = W x^T, i.e. cuBLAS
    /// `C(n x m) = op_T(W: k x n col-major) * X(k x m col-major)`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear<T: GemmOut>(
        &self,
        x: &dyn DevicePtr<bf16>,       // [m, k]
        w: &dyn DevicePtr<bf16>,       // [n, k]
        out: &mut dyn DevicePtrMut<T>, // [m, n]
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        const K: &str = "cublasGemmEx";
        let dim = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| CudaError::shape(K, format!("{what} = {v} exceeds i32")))
        };
        let (mi, ni, ki) = (dim(m, "m")?, dim(n, "n")?, dim(k, "k")?);
        for (what, got, want) in [
            ("x", x.len(), m * k),
            ("w", w.len(), n * k),
            ("out", out.len(), m * n),
        ] {
            if got != want {
                return Err(CudaError::shape(
                    K,
                    format!("{what}: length {got}, expected {want}"),
                ));
            }
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0f32 };
        let stream = &self.stream;
        // cuBLAS issues its work in whatever context is current on the calling thread, as
        // the kernel launchers do: bind ours first (a thread that never touched the device,
        // or last touched another one, would otherwise fail or use the wrong context).
        stream.context().bind_to_thread()?;
        let (wp, _g0) = w.device_ptr(stream);
        let (xp, _g1) = x.device_ptr(stream);
        let (op, _g2) = out.device_ptr_mut(stream);
        // SAFETY: x, w and out hold m*k, n*k and m*n elements (checked above), leading
        // dimensions match those shapes, alpha/beta are host f32 as COMPUTE_32F expects, and
        // the guards keep the buffers ordered on this handle's stream until it is enqueued.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha) as *const f32 as *const _,
                wp as usize as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                ki,
                xp as usize as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                ki,
                (&beta) as *const f32 as *const _,
                op as usize as *mut _,
                T::DTYPE,
                ni,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}
