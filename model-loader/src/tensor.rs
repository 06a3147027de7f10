//! Zero-copy views of stored tensors and their conversion to f32 / bf16.

use crate::dtype::DType;
use half::{bf16, f16};

/// A borrowed, zero-copy view of one tensor inside a memory-mapped safetensors file.
///
/// `data` is the raw little-endian bytes; it is not necessarily aligned for the element type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorView<'a> {
    /// The tensor's name (Hugging Face naming, e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub name: &'a str,
    /// The stored element type.
    pub dtype: DType,
    /// The shape, outermost dimension first (row-major).
    pub shape: &'a [usize],
    /// The raw bytes, `numel() * dtype.size_bytes()` long for views from a `Checkpoint`.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements (product of the shape; 1 for a scalar). Saturates instead of overflowing.
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |acc, &d| acc.saturating_mul(d))
    }

    /// The elements widened (or copied) to f32, in storage order.
    ///
    /// Reads from possibly unaligned bytes; a trailing partial element, if any, is ignored.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => {
                let (chunks, _) = self.data.as_chunks::<4>();
                chunks.iter().map(|c| f32::from_le_bytes(*c)).collect()
            }
            DType::F16 => {
                let (chunks, _) = self.data.as_chunks::<2>();
                chunks
                    .iter()
                    .map(|c| f16::from_bits(u16::from_le_bytes(*c)).to_f32())
                    .collect()
            }
            DType::BF16 => {
                let (chunks, _) = self.data.as_chunks::<2>();
                chunks
                    .iter()
                    .map(|c| bf16::from_bits(u16::from_le_bytes(*c)).to_f32())
                    .collect()
            }
        }
    }

    /// The elements as bf16 (exact for BF16, rounded to nearest for F32 and F16).
    pub fn to_bf16(&self) -> Vec<bf16> {
        match self.dtype {
            DType::BF16 => {
                let (chunks, _) = self.data.as_chunks::<2>();
                chunks
                    .iter()
                    .map(|c| bf16::from_bits(u16::from_le_bytes(*c)))
                    .collect()
            }
            DType::F32 | DType::F16 => self.to_f32().into_iter().map(bf16::from_f32).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widens_unaligned_data() {
        let vals = [1.5f32, -2.25, 0.0];
        let mut bytes = vec![0u8];
        for v in vals {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let shape = [3usize];
        let view = TensorView {
            name: "t",
            dtype: DType::F32,
            shape: &shape,
            data: &bytes[1..],
        };
        assert_eq!(view.numel(), 3);
        assert_eq!(view.to_f32(), vals.to_vec());
        assert_eq!(view.to_bf16()[1].to_f32(), -2.25);

        let mut b = vec![7u8];
        for v in vals {
            b.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
        }
        let view = TensorView {
            name: "t",
            dtype: DType::BF16,
            shape: &shape,
            data: &b[1..],
        };
        assert_eq!(view.to_f32(), vals.to_vec());

        let mut h = Vec::new();
        for v in vals {
            h.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
        h.push(9); // trailing partial element is ignored
        let view = TensorView {
            name: "t",
            dtype: DType::F16,
            shape: &shape,
            data: &h,
        };
        assert_eq!(view.to_f32(), vals.to_vec());
    }
}
