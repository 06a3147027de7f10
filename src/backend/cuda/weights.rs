//! Uploading a checkpoint's weights to the device as bf16: one [`DLinear`] per matrix
//! (with its bias), one [`DLayer`] per decoder layer.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use model_loader::Checkpoint;

use super::backend::{backend_err, drv};
use crate::error::Result;

pub(super) struct DLinear {
    pub(super) w: CudaSlice<bf16>, // [out, inp]
    pub(super) bias: Option<CudaSlice<bf16>>,
    pub(super) out: usize,
    pub(super) inp: usize,
}

pub(super) struct DLayer {
    pub(super) input_norm: CudaSlice<bf16>,
    pub(super) q: DLinear,
    pub(super) k: DLinear,
    pub(super) v: DLinear,
    pub(super) o: DLinear,
    pub(super) q_norm: Option<CudaSlice<bf16>>,
    pub(super) k_norm: Option<CudaSlice<bf16>>,
    pub(super) post_norm: CudaSlice<bf16>,
    pub(super) gate: DLinear,
    pub(super) up: DLinear,
    pub(super) down: DLinear,
}

/// Uploads a host vector (at least one element allocated).
pub(super) fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy>(
    stream: &Arc<CudaStream>,
    host: &[T],
) -> Result<CudaSlice<T>> {
    if host.is_empty() {
        return drv(stream.alloc_zeros::<T>(1));
    }
    drv(stream.clone_htod(host))
}

pub(super) fn to_i32(what: &str, v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| backend_err(format!("{what} {v} exceeds i32")))
}

pub(super) struct Loader<'a> {
    pub(super) ck: &'a Checkpoint,
    pub(super) stream: &'a Arc<CudaStream>,
    pub(super) bytes: usize,
}

impl Loader<'_> {
    pub(super) fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<CudaSlice<bf16>> {
        let t = self.ck.tensor(name)?;
        if t.shape != shape {
            return Err(backend_err(format!(
                "{name}: shape {:?}, expected {shape:?}",
                t.shape
            )));
        }
        let data = t.to_bf16();
        if data.len() != shape.iter().product::<usize>() || data.is_empty() {
            return Err(backend_err(format!(
                "{name}: {} elements for shape {shape:?}",
                data.len()
            )));
        }
        self.bytes += data.len() * 2;
        drv(self.stream.clone_htod(&data))
    }

    pub(super) fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<DLinear> {
        let w = self.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(DLinear { w, bias, out, inp })
    }
}
