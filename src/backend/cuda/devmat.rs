//! [`DevMat`]: a `[rows, cols]` bf16 activation buffer on the device.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use half::bf16;

use super::backend::drv;
use crate::error::Result;

/// A `[rows, cols]` bf16 activation buffer on the device.
///
/// The allocation holds at least one element (CUDA refuses empty allocations), so always
/// go through [`DevMat::view`] / [`DevMat::view_mut`], which are exactly `rows * cols` long.
pub struct DevMat {
    /// Rows (one per step token).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    pub(super) buf: CudaSlice<bf16>,
}

impl DevMat {
    pub(super) fn zeros(stream: &Arc<CudaStream>, rows: usize, cols: usize) -> Result<Self> {
        let buf = drv(stream.alloc_zeros::<bf16>((rows * cols).max(1)))?;
        Ok(Self { rows, cols, buf })
    }

    /// Elements (`rows * cols`).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the matrix has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `rows * cols` elements.
    pub fn view(&self) -> CudaView<'_, bf16> {
        self.buf.slice(0..self.len())
    }

    /// The `rows * cols` elements, writable.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, bf16> {
        let n = self.len();
        self.buf.slice_mut(0..n)
    }

    /// Host copy, widened to f32 (for tests and debugging; synchronises the stream).
    pub fn to_host_f32(&self) -> Result<Vec<f32>> {
        let stream = self.buf.stream().clone();
        let v = drv(stream.clone_dtoh(&self.view()))?;
        Ok(v.into_iter().map(f32::from).collect())
    }
}
