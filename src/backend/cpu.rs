//! The CPU backend: every operation in f32. It is the reference the CUDA kernels are tested
//! against and the default where there is no GPU.

use super::cpu_attention::{self, AttnShape};
use super::packed::PackedMatrix;
use super::weights::{WeightLoader, WeightStore, Weights};
use super::{Backend, StepInput, Weight};
use crate::error::{Result, SpindleError};
use crate::plan::AttentionPlan;
use model_loader::{Checkpoint, DType, ExpectedTensor, ModelConfig, TensorView};

/// `[rows, cols]` row-major f32 activations.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// The CPU's weight storage: packed matrices (bf16 or f32), f32 vectors.
pub struct CpuStore;

impl WeightStore for CpuStore {
    type Matrix = PackedMatrix;
    type Vector = Vec<f32>;
}

/// Reads tensors straight from the checkpoint, packing matrices for the GEMM.
struct CpuLoader<'a>(&'a Checkpoint);

impl WeightLoader<CpuStore> for CpuLoader<'_> {
    fn matrix(&mut self, e: &ExpectedTensor) -> Result<PackedMatrix> {
        let t = self.0.tensor(&e.name)?;
        let (n, k) = match t.shape {
            [n, k] if t.shape == e.shape.as_slice() => (*n, *k),
            other => {
                return Err(SpindleError::Backend(format!(
                    "{}: shape {other:?}, expected {:?}",
                    e.name, e.shape
                )))
            }
        };
        let packed = pack(&t, n, k);
        // Packed: the file's pages of this tensor are not needed any more.
        self.0.release_pages(t.name);
        Ok(packed)
    }

    fn vector(&mut self, e: &ExpectedTensor) -> Result<Vec<f32>> {
        Ok(self.0.tensor(&e.name)?.to_f32())
    }
}

/// f32 weights, f32 K/V cache and the current step's inputs.
pub struct CpuBackend {
    cfg: ModelConfig,
    w: Weights<CpuStore>,
    inv_freq: Vec<f32>, // [head_dim / 2]
    block_size: usize,
    num_blocks: usize,
    k_cache: Vec<Vec<f32>>, // per layer: [num_blocks * block_size, kv_heads * head_dim]
    v_cache: Vec<Vec<f32>>,
    step: StepInput,
    kv_tokens_read: u64,
}

/// A `[n, k]` weight packed for the GEMM: bf16 checkpoints stay bf16 (widened in the
/// kernel), anything else becomes f32.
fn pack(t: &TensorView<'_>, n: usize, k: usize) -> PackedMatrix {
    // Straight from the stored bytes when they are f32 or bf16: no widened copy first.
    match t.dtype {
        DType::BF16 if t.data.len() == 2 * n * k => PackedMatrix::from_bf16_le(t.data, n, k),
        DType::F32 if t.data.len() == 4 * n * k => PackedMatrix::from_f32_le(t.data, n, k),
        _ => PackedMatrix::from_f32(&t.to_f32(), n, k),
    }
}

impl CpuBackend {
    /// Widens the checkpoint's weights to f32 and allocates a cache of `num_blocks` blocks.
    pub fn load(ck: &Checkpoint, num_blocks: usize, block_size: usize) -> Result<Self> {
        let cfg = ck.config().clone();
        let kv_width = cfg.num_kv_heads * cfg.head_dim;
        let cache_elems = pool_elems(num_blocks, block_size, kv_width)?;
        let w = Weights::load(&cfg, &mut CpuLoader(ck))?;
        let inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta);
        let mut k_cache = Vec::with_capacity(cfg.num_layers);
        let mut v_cache = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k_cache.push(zeroed(cache_elems)?);
            v_cache.push(zeroed(cache_elems)?);
        }
        Ok(Self {
            w,
            inv_freq,
            block_size,
            num_blocks,
            k_cache,
            v_cache,
            step: StepInput::default(),
            kv_tokens_read: 0,
            cfg,
        })
    }

    /// K/V tokens attention read since creation, summed over layers: the plan's count
    /// ([`AttentionPlan::kv_tokens_read`]) of every step, once per layer.
    pub fn kv_tokens_read(&self) -> u64 {
        self.kv_tokens_read
    }
}

/// Elements of one layer's K (or V) cache, or a clear error for a pool that cannot exist:
/// a zero block size, or more slots than a `u32` slot index can name.
fn pool_elems(num_blocks: usize, block_size: usize, kv_width: usize) -> Result<usize> {
    if block_size == 0 {
        return Err(SpindleError::InvalidSetting(
            "the block size must be at least 1 token".into(),
        ));
    }
    let slots = num_blocks
        .checked_mul(block_size)
        .filter(|&s| s <= u32::MAX as usize)
        .ok_or_else(|| {
            SpindleError::InvalidSetting(format!(
                "{num_blocks} blocks of {block_size} tokens is more slots than the cache can index ({})",
                u32::MAX
            ))
        })?;
    slots
        .checked_mul(kv_width)
        .ok_or(SpindleError::CacheTooLarge { slots })
}

/// A zeroed buffer, or an error (not an abort) when memory runs out.
fn zeroed(elems: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(elems)
        .map_err(|_| SpindleError::OutOfMemory {
            what: "a K/V cache layer",
            mib: (elems * 4) >> 20,
        })?;
    v.resize(elems, 0.0);
    Ok(v)
}

// The element-wise operations below are public because they are the reference the CUDA
// kernels are tested against (tests/gpu_kernels.rs), not a second copy of them.

/// RoPE frequencies of a head of `head_dim`: `[head_dim / 2]`, HF's
/// `1 / theta^(2i / d)` computed in f32.
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Rotary embedding (NeoX half-split, as HF's `rotate_half`) in place: `x` is
/// `[rows, heads * head_dim]` with `row_width = heads * head_dim`; row r is at
/// `positions[r]`; `inv_freq` from [`rope_inv_freq`].
pub fn rope_rows(x: &mut [f32], row_width: usize, positions: &[u32], inv_freq: &[f32]) {
    let half = inv_freq.len();
    let d = 2 * half;
    if d == 0 || row_width == 0 {
        return;
    }
    // [half]: (sin, cos) of the row's angles, computed once for all its heads.
    let mut sin_cos = vec![(0.0f32, 0.0f32); half];
    for (row, &pos) in x.chunks_exact_mut(row_width).zip(positions) {
        let pos = pos as f32;
        for (sc, &f) in sin_cos.iter_mut().zip(inv_freq) {
            *sc = (pos * f).sin_cos();
        }
        for head in row.chunks_exact_mut(d) {
            for (i, &(sin, cos)) in sin_cos.iter().enumerate() {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    }
}

/// `[n]` = silu(gate) * up, element-wise (`gate` and `up` are `[n]`).
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// RMSNorm of each `width`-wide row of `x` into `out` (HF: mean of squares in f32), where
/// `width = w.len()`.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

impl Backend for CpuBackend {
    type Act = Mat;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn begin_step(&mut self, step: &StepInput) -> Result<()> {
        let kv_width = self.cfg.num_kv_heads * self.cfg.head_dim;
        let block_elems = self.block_size * kv_width;
        for c in &step.copies {
            let (src, dst) = (c.src as usize * block_elems, c.dst as usize * block_elems);
            for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
                cache.copy_within(src..src + block_elems, dst);
            }
        }
        self.step = step.clone();
        Ok(())
    }

    fn embed(&mut self) -> Result<Mat> {
        let h = self.cfg.hidden_size;
        let mut data = vec![0.0f32; self.step.tokens.len() * h];
        for (&t, row) in self.step.tokens.iter().zip(data.chunks_exact_mut(h)) {
            if !self.w.embed.row_into(t as usize, row) {
                return Err(SpindleError::TokenOutOfVocab {
                    token: t,
                    vocab: self.cfg.vocab_size,
                });
            }
        }
        Ok(Mat {
            rows: self.step.tokens.len(),
            cols: h,
            data,
        })
    }

    fn rms_norm(&mut self, x: &Mat, w: Weight) -> Result<Mat> {
        let g = self.w.vector(w)?;
        let mut out = vec![0.0; x.data.len()];
        rms_norm_rows(&x.data, g, self.cfg.rms_norm_eps, &mut out);
        Ok(Mat {
            rows: x.rows,
            cols: x.cols,
            data: out,
        })
    }

    fn add(&mut self, x: &mut Mat, y: &Mat) -> Result<()> {
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn linear(&mut self, x: &Mat, w: Weight) -> Result<Mat> {
        let lin = self.w.linear(w)?;
        if x.cols != lin.inp {
            return Err(SpindleError::Backend(format!(
                "{w:?}: input width {} but weight takes {}",
                x.cols, lin.inp
            )));
        }
        let mut data = lin.w.matmul(&x.data, x.rows);
        if let Some(bias) = &lin.bias {
            for row in data.chunks_exact_mut(lin.out) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        Ok(Mat {
            rows: x.rows,
            cols: lin.out,
            data,
        })
    }

    fn head_norm(&mut self, x: &mut Mat, w: Weight) -> Result<()> {
        let g = self.w.vector(w)?.to_vec();
        let src = x.data.clone();
        rms_norm_rows(&src, &g, self.cfg.rms_norm_eps, &mut x.data);
        Ok(())
    }

    fn rope(&mut self, x: &mut Mat) -> Result<()> {
        rope_rows(&mut x.data, x.cols, &self.step.positions, &self.inv_freq);
        Ok(())
    }

    fn write_kv(&mut self, layer: usize, k: &Mat, v: &Mat) -> Result<()> {
        let w = k.cols;
        for (r, &slot) in self.step.slots.iter().enumerate() {
            let s = slot as usize;
            self.k_cache[layer][s * w..(s + 1) * w].copy_from_slice(&k.data[r * w..(r + 1) * w]);
            self.v_cache[layer][s * w..(s + 1) * w].copy_from_slice(&v.data[r * w..(r + 1) * w]);
        }
        Ok(())
    }

    fn attention(&mut self, layer: usize, q: &Mat) -> Result<Mat> {
        let shape = AttnShape {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            block_size: self.block_size,
        };
        let plan: &AttentionPlan = &self.step.plan;
        let cpu_attention::AttentionOutput {
            output: data,
            kv_tokens_gathered: gathered,
        } = cpu_attention::attention(
            plan,
            &q.data,
            &self.k_cache[layer],
            &self.v_cache[layer],
            shape,
        );
        debug_assert_eq!(
            gathered, plan.kv_tokens_read,
            "gathered what the plan counts"
        );
        self.kv_tokens_read += plan.kv_tokens_read;
        Ok(Mat {
            rows: q.rows,
            cols: q.cols,
            data,
        })
    }

    fn silu_mul(&mut self, gate: &Mat, up: &Mat) -> Result<Mat> {
        let data = silu_mul(&gate.data, &up.data);
        Ok(Mat {
            rows: gate.rows,
            cols: gate.cols,
            data,
        })
    }

    fn logits(&mut self, x: &Mat, out: &mut Vec<f32>) -> Result<()> {
        let h = x.cols;
        let mut sel = Vec::with_capacity(self.step.logit_rows.len() * h);
        for &r in &self.step.logit_rows {
            sel.extend_from_slice(&x.data[r as usize * h..(r as usize + 1) * h]);
        }
        let m = self.step.logit_rows.len();
        *out = match &self.w.lm_head {
            Some(lin) => lin.w.matmul(&sel, m),
            None => self.w.embed.matmul(&sel, m),
        };
        Ok(())
    }
}
