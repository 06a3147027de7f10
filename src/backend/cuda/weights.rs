//! The CUDA backend's weights: the shared table ([`crate::backend::weights`]) read as bf16
//! on the host, then uploaded one layer at a time with q/k/v and gate/up concatenated
//! ([`DLayer`]), so each is one GEMM.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use half::bf16;
use model_loader::{Checkpoint, ExpectedTensor};

use super::backend::{backend_err, drv};
use crate::backend::weights::{LayerWeights, Linear, WeightLoader, WeightStore};
use crate::backend::LayerWeight;
use crate::error::Result;

/// Host bf16 storage: a layer between the checkpoint and the device.
pub(super) struct HostBf16;

impl WeightStore for HostBf16 {
    type Matrix = Vec<bf16>;
    type Vector = Vec<bf16>;
}

/// Device bf16 storage.
pub(super) struct Device;

impl WeightStore for Device {
    type Matrix = CudaSlice<bf16>;
    type Vector = CudaSlice<bf16>;
}

/// A linear layer on the device: `[out, inp]` bf16 and an optional `[out]` bias.
pub(super) type DLinear = Linear<Device>;

/// One decoder layer on the device, q/k/v and gate/up concatenated along the output rows.
pub(super) struct DLayer {
    pub(super) input_norm: CudaSlice<bf16>, // [hidden]
    /// `[q_dim + 2 * kv_dim, hidden]`: q_proj, k_proj, v_proj rows in that order (and their
    /// biases likewise).
    pub(super) qkv: DLinear,
    pub(super) o: DLinear,                      // [hidden, q_dim]
    pub(super) q_norm: Option<CudaSlice<bf16>>, // [head_dim]
    pub(super) k_norm: Option<CudaSlice<bf16>>, // [head_dim]
    pub(super) post_norm: CudaSlice<bf16>,      // [hidden]
    /// `[2 * inter, hidden]`: gate_proj rows, then up_proj rows.
    pub(super) gate_up: DLinear,
    pub(super) down: DLinear, // [hidden, inter]
    pub(super) q_dim: usize,
    pub(super) kv_dim: usize,
}

/// One projection of a layer as the op-level API sees it: a row range of a (possibly
/// concatenated) device weight.
pub(super) struct LinearPart<'a> {
    pub(super) w: CudaView<'a, bf16>,            // [out, inp]
    pub(super) bias: Option<CudaView<'a, bf16>>, // [out]
    pub(super) out: usize,
    pub(super) inp: usize,
}

fn part(l: &DLinear, row0: usize, out: usize) -> LinearPart<'_> {
    LinearPart {
        w: l.w.slice(row0 * l.inp..(row0 + out) * l.inp),
        bias: l.bias.as_ref().map(|b| b.slice(row0..row0 + out)),
        out,
        inp: l.inp,
    }
}

impl DLayer {
    /// The projection `w` names, as a slice of the fused weights.
    pub(super) fn linear(&self, w: LayerWeight) -> Option<LinearPart<'_>> {
        let (q, kv) = (self.q_dim, self.kv_dim);
        let inter = self.gate_up.out / 2;
        Some(match w {
            LayerWeight::Q => part(&self.qkv, 0, q),
            LayerWeight::K => part(&self.qkv, q, kv),
            LayerWeight::V => part(&self.qkv, q + kv, kv),
            LayerWeight::O => part(&self.o, 0, self.o.out),
            LayerWeight::Gate => part(&self.gate_up, 0, inter),
            LayerWeight::Up => part(&self.gate_up, inter, inter),
            LayerWeight::Down => part(&self.down, 0, self.down.out),
            _ => return None,
        })
    }

    /// The norm vector `w` names.
    pub(super) fn vector(&self, w: LayerWeight) -> Option<&CudaSlice<bf16>> {
        match w {
            LayerWeight::InputNorm => Some(&self.input_norm),
            LayerWeight::PostNorm => Some(&self.post_norm),
            LayerWeight::QNorm => self.q_norm.as_ref(),
            LayerWeight::KNorm => self.k_norm.as_ref(),
            _ => None,
        }
    }
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

/// Reads checkpoint tensors as host bf16 (rounding f32/f16 to nearest), counting bytes.
pub(super) struct Loader<'a> {
    pub(super) ck: &'a Checkpoint,
    pub(super) bytes: usize,
}

impl Loader<'_> {
    fn read(&mut self, e: &ExpectedTensor) -> Result<Vec<bf16>> {
        let t = self.ck.tensor(&e.name)?;
        if t.shape != e.shape.as_slice() {
            return Err(backend_err(format!(
                "{}: shape {:?}, expected {:?}",
                e.name, t.shape, e.shape
            )));
        }
        let data = t.to_bf16();
        if data.len() != e.shape.iter().product::<usize>() || data.is_empty() {
            return Err(backend_err(format!(
                "{}: {} elements for shape {:?}",
                e.name,
                data.len(),
                e.shape
            )));
        }
        self.bytes += data.len() * 2;
        Ok(data)
    }
}

impl WeightLoader<HostBf16> for Loader<'_> {
    fn matrix(&mut self, e: &ExpectedTensor) -> Result<Vec<bf16>> {
        self.read(e)
    }
    fn vector(&mut self, e: &ExpectedTensor) -> Result<Vec<bf16>> {
        self.read(e)
    }
}

fn upload_linear(stream: &Arc<CudaStream>, l: Linear<HostBf16>) -> Result<DLinear> {
    Ok(Linear {
        w: upload(stream, &l.w)?,
        bias: l.bias.map(|b| upload(stream, &b)).transpose()?,
        out: l.out,
        inp: l.inp,
    })
}

/// Concatenates linear layers along their output rows (all share `inp`; biases all or none).
fn concat(parts: Vec<Linear<HostBf16>>) -> Result<Linear<HostBf16>> {
    let inp = parts[0].inp;
    let with_bias = parts[0].bias.is_some();
    if parts
        .iter()
        .any(|p| p.inp != inp || p.bias.is_some() != with_bias)
    {
        return Err(backend_err(
            "fused projections disagree on input width or bias",
        ));
    }
    let out = parts.iter().map(|p| p.out).sum();
    let mut w = Vec::with_capacity(out * inp);
    let mut bias = with_bias.then(|| Vec::with_capacity(out));
    for p in parts {
        w.extend_from_slice(&p.w);
        if let (Some(b), Some(pb)) = (bias.as_mut(), p.bias) {
            b.extend_from_slice(&pb);
        }
    }
    Ok(Linear { w, bias, out, inp })
}

/// Fuses a host layer (q/k/v and gate/up concatenated) and uploads it.
pub(super) fn upload_layer(stream: &Arc<CudaStream>, l: LayerWeights<HostBf16>) -> Result<DLayer> {
    let (q_dim, kv_dim) = (l.q.out, l.k.out);
    let qkv = concat(vec![l.q, l.k, l.v])?;
    let gate_up = concat(vec![l.gate, l.up])?;
    let opt = |v: Option<Vec<bf16>>| v.map(|v| upload(stream, &v)).transpose();
    Ok(DLayer {
        input_norm: upload(stream, &l.input_norm)?,
        qkv: upload_linear(stream, qkv)?,
        o: upload_linear(stream, l.o)?,
        q_norm: opt(l.q_norm)?,
        k_norm: opt(l.k_norm)?,
        post_norm: upload(stream, &l.post_norm)?,
        gate_up: upload_linear(stream, gate_up)?,
        down: upload_linear(stream, l.down)?,
        q_dim,
        kv_dim,
    })
}

/// Uploads an untied output head.
pub(super) fn upload_head(stream: &Arc<CudaStream>, l: Linear<HostBf16>) -> Result<DLinear> {
    upload_linear(stream, l)
}
