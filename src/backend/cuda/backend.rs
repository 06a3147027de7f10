//! The CUDA backend: [`crate::backend::Backend`] on one GPU, bf16 storage and f32 math.
//!
//! - Weights are uploaded as bf16 (`TensorView::to_bf16`, rounding f32/f16 checkpoints to
//!   nearest), in Hugging Face layout (`[out, in]`), so every linear layer is one cuBLAS
//!   `GemmEx` ([`Blas::linear`]) plus, where the model has one, a bias add.
//! - The K/V cache is one bf16 buffer per layer and per K/V,
//!   `[num_blocks, block_size, kv_heads, head_dim]`. Its size is either given in blocks or a
//!   fraction (default 0.9) of the device memory still free after the weights
//!   ([`KvPoolSize`]); [`CudaBackend::pool`] reports what was chosen.
//! - [`Backend::begin_step`] uploads the step's tokens, positions, slots and the attention
//!   plan once, and runs the step's copy-on-write block copies (all layers in one launch).
//! - Attention, kernel v2 (the default): the plan is lowered as the engine built it
//!   (`plan::lower`: work units over items and splits, per-row partial CSR) and
//!   `forked_attention` stages each unit's K/V once for every row it serves, prefill and
//!   decode rows alike, merging partials per row in view order. Kernel v1
//!   (`SPINDLE_ATTN_KERNEL=v1` or [`CudaBackend::set_attention_kernel`]) stays as the
//!   per-thread baseline: every row's chunk list is the concatenation, in view order, of
//!   the chunks of its items, masked by `row_limit[r]`; groups of consecutive rows sharing
//!   a list run `prefill_attention`, otherwise the split-KV paged decode kernel, so a
//!   shared prefix is read once per row or group.
//! - Activations are [`DevMat`]: `[rows, cols]` bf16 on the device. Logits are computed in
//!   f32 by the lm_head GEMM for the gathered `logit_rows` only and copied to the host.
//!
//! Every CUDA failure is returned as [`SpindleError::Device`] (its source a `CudaError`); nothing panics and nothing
//! here needs `unsafe` (the kernel wrappers hold the FFI calls).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DriverError};
use half::bf16;
use model_loader::{Checkpoint, ModelConfig};

pub use super::devmat::DevMat;
use super::kernels::{self as kern, CacheShape, Chunks, DecodeWorkspace, ForkedPlan, KvCache};
use super::lowering::host_attention;
pub use super::pool::{CudaOptions, KvPoolSize, PoolInfo};
use super::weights::{to_i32, upload, DLayer, DLinear, Loader};
use super::{Blas, CudaError, Gpu};
use crate::backend::{Backend, LayerWeight, StepInput, Weight};
use crate::error::{Result, SpindleError};
use crate::plan::lower::{lower, LowerConfig, UNIT_WIDTH};

/// Maps a cudarc driver error into the crate's error type.
pub(super) fn drv<T>(r: std::result::Result<T, DriverError>) -> Result<T> {
    r.map_err(|e| SpindleError::from(CudaError::from(e)))
}

pub(super) fn backend_err(msg: impl Into<String>) -> SpindleError {
    SpindleError::Backend(msg.into())
}

/// Which attention kernel the backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// Kernel v1, the per-thread baseline: the plan unpacked into per-row chunk lists
    /// (`lowering.rs`), the paged decode or prefill kernel.
    V1,
    /// Kernel v2: the plan lowered as built (`plan::lower`), shared items read once for all
    /// their rows (`kernels/forked_attention.cu`).
    V2,
}

impl AttnKernel {
    /// `SPINDLE_ATTN_KERNEL=v1` selects the baseline; unset or `v2`, the forked kernel.
    pub fn from_env() -> Result<Self> {
        match std::env::var("SPINDLE_ATTN_KERNEL").as_deref() {
            Err(_) | Ok("v2") | Ok("") => Ok(Self::V2),
            Ok("v1") => Ok(Self::V1),
            Ok(other) => Err(SpindleError::InvalidSetting(format!(
                "SPINDLE_ATTN_KERNEL={other}: expected v1 or v2"
            ))),
        }
    }
}

/// Which attention kernel a step uses, with its device arrays.
pub(super) enum AttnLaunch {
    /// One CSR entry per row.
    Decode { max_view: usize },
    /// Rows in groups sharing one chunk list; tiles planned on the host.
    Prefill {
        q_indptr: CudaSlice<i32>,
        tile_group: CudaSlice<i32>,
        tile_row: CudaSlice<i32>,
        num_tiles: usize,
        num_groups: usize,
    },
    /// Kernel v2 over the lowered plan (the chunk and row_limit arrays of [`StepBufs`]).
    Forked {
        units: CudaSlice<i32>,
        num_units: usize,
        unit_rows: CudaSlice<i32>,
        partial_direct: CudaSlice<i32>,
        num_partials: usize,
        row_part_ptr: CudaSlice<i32>,
        row_parts: CudaSlice<i32>,
        num_row_parts: usize,
        merge_rows: CudaSlice<i32>,
        num_merge_rows: usize,
    },
}

/// The current step's inputs on the device. Buffers hold at least one element; the
/// lengths are kept alongside.
pub(super) struct StepBufs {
    rows: usize,
    tokens: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    logit_rows: CudaSlice<i32>,
    num_logit_rows: usize,
    /// CSR over rows (decode) or groups (prefill).
    chunk_indptr: CudaSlice<i32>,
    num_entries: usize,
    chunk_block: CudaSlice<i32>,
    chunk_start: CudaSlice<i32>,
    chunk_len: CudaSlice<i32>,
    num_chunks: usize,
    row_limit: CudaSlice<i32>,
    launch: AttnLaunch,
}

/// The GPU backend (see the module docs).
pub struct CudaBackend {
    gpu: Gpu,
    blas: Blas,
    cfg: ModelConfig,
    opts: CudaOptions,
    embed: CudaSlice<bf16>, // [vocab, hidden]
    layers: Vec<DLayer>,
    final_norm: CudaSlice<bf16>,
    lm_head: Option<DLinear>, // None: tied to `embed`
    pool: PoolInfo,
    k_cache: Vec<CudaSlice<bf16>>,
    v_cache: Vec<CudaSlice<bf16>>,
    ws: DecodeWorkspace,
    /// Target of the k half of `rope_neox` when rotating one tensor alone (length 0 used).
    dummy: CudaSlice<bf16>,
    step: Option<StepBufs>,
    kv_tokens_read: u64,
    /// The attention kernel in use ([`AttnKernel::from_env`] at load).
    attn_kernel: AttnKernel,
    /// Streaming multiprocessors (the split rule of the v2 lowering).
    num_sms: usize,
}

impl CudaBackend {
    /// Opens device `opts.device`, uploads the checkpoint's weights as bf16 and allocates
    /// the K/V pool (see [`KvPoolSize`]). Fails with [`SpindleError::Device`] when there is no
    /// usable GPU, and [`SpindleError::Backend`] for shapes the kernels do not support.
    pub fn load(ck: &Checkpoint, opts: &CudaOptions) -> Result<Self> {
        let cfg = ck.config().clone();
        let (hd, heads, kvh) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        if !kern::ATTN_HEAD_DIMS.contains(&hd) {
            return Err(backend_err(format!(
                "head_dim {hd} is not supported by the attention kernels ({:?})",
                kern::ATTN_HEAD_DIMS
            )));
        }
        if kvh == 0 || !heads.is_multiple_of(kvh) {
            return Err(backend_err(format!(
                "{heads} query heads are not a multiple of {kvh} kv heads"
            )));
        }
        if opts.block_size == 0 || opts.partition_size == 0 {
            return Err(backend_err(
                "block_size and partition_size must be positive",
            ));
        }
        if let KvPoolSize::FreeFraction(f) = opts.pool {
            if !(f > 0.0 && f <= 1.0) {
                return Err(backend_err(format!(
                    "KV pool fraction {f} is outside (0, 1]"
                )));
            }
        }
        let attn_kernel = AttnKernel::from_env()?;
        let gpu = Gpu::new(opts.device)?;
        let num_sms = drv(gpu.ctx().attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        ))?
        .max(1) as usize;
        let stream = gpu.stream().clone();
        let blas = Blas::new(stream.clone())?;

        let mut ld = Loader {
            ck,
            stream: &stream,
            bytes: 0,
        };
        let (hidden, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (q_dim, kv_dim) = (heads * hd, kvh * hd);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let b = cfg.qkv_bias();
            let qk_norm = |ld: &mut Loader<'_>, which: &str| -> Result<Option<CudaSlice<bf16>>> {
                if cfg.qk_norm {
                    Ok(Some(
                        ld.tensor(&format!("{p}.self_attn.{which}.weight"), &[hd])?,
                    ))
                } else {
                    Ok(None)
                }
            };
            layers.push(DLayer {
                input_norm: ld.tensor(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                q: ld.linear(&format!("{p}.self_attn.q_proj"), q_dim, hidden, b)?,
                k: ld.linear(&format!("{p}.self_attn.k_proj"), kv_dim, hidden, b)?,
                v: ld.linear(&format!("{p}.self_attn.v_proj"), kv_dim, hidden, b)?,
                o: ld.linear(
                    &format!("{p}.self_attn.o_proj"),
                    hidden,
                    q_dim,
                    cfg.o_bias(),
                )?,
                q_norm: qk_norm(&mut ld, "q_norm")?,
                k_norm: qk_norm(&mut ld, "k_norm")?,
                post_norm: ld.tensor(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                gate: ld.linear(&format!("{p}.mlp.gate_proj"), inter, hidden, false)?,
                up: ld.linear(&format!("{p}.mlp.up_proj"), inter, hidden, false)?,
                down: ld.linear(&format!("{p}.mlp.down_proj"), hidden, inter, false)?,
            });
        }
        let embed = ld.tensor("model.embed_tokens.weight", &[vocab, hidden])?;
        let final_norm = ld.tensor("model.norm.weight", &[hidden])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(ld.linear("lm_head", vocab, hidden, false)?)
        };
        let weight_bytes = ld.bytes;
        drv(stream.synchronize())?;

        // K/V pool.
        let shape1 = CacheShape {
            num_blocks: 1,
            block_size: opts.block_size,
            num_kv_heads: kvh,
            head_dim: hd,
        };
        let block_elems = shape1.block_elems();
        if !block_elems.is_multiple_of(8) {
            return Err(backend_err(format!(
                "block of {block_elems} elements is not a multiple of 8 (copy_blocks uses 16-byte vectors)"
            )));
        }
        let bytes_per_block = 2 * cfg.num_layers * block_elems * 2;
        let (free, total) = drv(gpu.ctx().mem_get_info())?;
        let num_blocks = match opts.pool {
            KvPoolSize::Blocks(n) => n,
            KvPoolSize::FreeFraction(f) => {
                ((free as f64 * f) / bytes_per_block.max(1) as f64) as usize
            }
        };
        // Slots are int32 in the kernels.
        let num_blocks = num_blocks.min(i32::MAX as usize / opts.block_size);
        if num_blocks == 0 {
            return Err(SpindleError::OutOfBlocks(format!(
                "no room for a single KV block ({bytes_per_block} B; {free} B free after weights)"
            )));
        }
        let elems = num_blocks * block_elems;
        let mut k_cache = Vec::with_capacity(cfg.num_layers);
        let mut v_cache = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k_cache.push(drv(stream.alloc_zeros::<bf16>(elems))?);
            v_cache.push(drv(stream.alloc_zeros::<bf16>(elems))?);
        }
        let dummy = drv(stream.alloc_zeros::<bf16>(8))?;
        drv(stream.synchronize())?;
        Ok(Self {
            pool: PoolInfo {
                num_blocks,
                block_size: opts.block_size,
                bytes_per_block,
                weight_bytes,
                free_after_weights: free,
                total,
            },
            gpu,
            blas,
            cfg,
            opts: opts.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            k_cache,
            v_cache,
            ws: DecodeWorkspace::new(),
            dummy,
            step: None,
            kv_tokens_read: 0,
            attn_kernel,
            num_sms,
        })
    }

    /// The attention kernel in use.
    pub fn attention_kernel(&self) -> AttnKernel {
        self.attn_kernel
    }

    /// Selects the attention kernel for the following steps (benchmarks and tests compare
    /// v1 and v2 this way).
    pub fn set_attention_kernel(&mut self, k: AttnKernel) {
        self.attn_kernel = k;
    }

    /// What the K/V pool was sized to.
    pub fn pool(&self) -> &PoolInfo {
        &self.pool
    }

    /// The device (context and stream).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// K/V tokens the attention kernels were asked to read since creation, summed over
    /// layers. Kernel v1: per row (decode) or per row group (prefill), the visible view
    /// length (the per-thread kernel's logical count, not the plan's `kv_tokens_read`).
    /// Kernel v2: the tokens its work units stage (each unit's range once).
    pub fn kv_tokens_read(&self) -> u64 {
        self.kv_tokens_read
    }

    /// Blocks until all queued work is done and reports any asynchronous error.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.gpu.synchronize()?)
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.gpu.stream()
    }

    fn cache_shape(&self) -> CacheShape {
        CacheShape {
            num_blocks: self.pool.num_blocks,
            block_size: self.pool.block_size,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    fn step_bufs(&self) -> Result<&StepBufs> {
        self.step
            .as_ref()
            .ok_or_else(|| backend_err("no step in progress (begin_step not called)"))
    }

    fn linear_of(&self, w: Weight) -> Result<&DLinear> {
        match w {
            Weight::LmHead => self
                .lm_head
                .as_ref()
                .ok_or_else(|| backend_err("lm_head is tied")),
            Weight::Layer(i, lw) => {
                let l = self
                    .layers
                    .get(i)
                    .ok_or_else(|| backend_err(format!("no layer {i}")))?;
                Ok(match lw {
                    LayerWeight::Q => &l.q,
                    LayerWeight::K => &l.k,
                    LayerWeight::V => &l.v,
                    LayerWeight::O => &l.o,
                    LayerWeight::Gate => &l.gate,
                    LayerWeight::Up => &l.up,
                    LayerWeight::Down => &l.down,
                    other => return Err(backend_err(format!("{other:?} is not a matrix"))),
                })
            }
            Weight::FinalNorm => Err(backend_err("final norm is not a matrix")),
        }
    }

    fn vector_of(&self, w: Weight) -> Result<&CudaSlice<bf16>> {
        let missing = || backend_err(format!("{w:?} is not a vector of this model"));
        match w {
            Weight::FinalNorm => Ok(&self.final_norm),
            Weight::Layer(i, lw) => {
                let l = self.layers.get(i).ok_or_else(missing)?;
                match lw {
                    LayerWeight::InputNorm => Ok(&l.input_norm),
                    LayerWeight::PostNorm => Ok(&l.post_norm),
                    LayerWeight::QNorm => l.q_norm.as_ref().ok_or_else(missing),
                    LayerWeight::KNorm => l.k_norm.as_ref().ok_or_else(missing),
                    _ => Err(missing()),
                }
            }
            Weight::LmHead => Err(missing()),
        }
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer < self.layers.len() {
            Ok(())
        } else {
            Err(backend_err(format!("no layer {layer}")))
        }
    }

    fn check_rows(&self, what: &str, x: &DevMat, cols: usize) -> Result<usize> {
        let rows = self.step_bufs()?.rows;
        if x.rows != rows || x.cols != cols {
            return Err(backend_err(format!(
                "{what}: got [{}, {}], expected [{rows}, {cols}]",
                x.rows, x.cols
            )));
        }
        Ok(rows)
    }
}

/// A step's attention arrays on the device (the attention part of [`StepBufs`]).
pub(super) struct StepAttn {
    num_entries: usize,
    chunk_indptr: CudaSlice<i32>,
    num_chunks: usize,
    chunk_block: CudaSlice<i32>,
    chunk_start: CudaSlice<i32>,
    chunk_len: CudaSlice<i32>,
    row_limit: CudaSlice<i32>,
    launch: AttnLaunch,
}

impl CudaBackend {
    /// Kernel v1's arrays: the plan unpacked into per-row (or per-group) chunk lists.
    fn attention_v1(&mut self, step: &StepInput, gqa: usize) -> Result<StepAttn> {
        let stream = self.stream().clone();
        let (nb, bs) = (self.pool.num_blocks, self.pool.block_size);
        let prefill_ok = self.opts.use_prefill_kernel && kern::prefill_rows_per_tile(gqa) > 0;
        let h = host_attention(step, nb, bs, prefill_ok)?;
        let launch = match &h.groups {
            Some(q_indptr) => {
                let plan = kern::prefill_plan(q_indptr, gqa)?;
                AttnLaunch::Prefill {
                    num_tiles: plan.tile_group.len(),
                    num_groups: q_indptr.len() - 1,
                    q_indptr: upload(&stream, q_indptr)?,
                    tile_group: upload(&stream, &plan.tile_group)?,
                    tile_row: upload(&stream, &plan.tile_row)?,
                }
            }
            None => AttnLaunch::Decode {
                max_view: h.max_view,
            },
        };
        self.kv_tokens_read += h.logical_tokens * self.cfg.num_layers as u64;
        Ok(StepAttn {
            num_entries: h.indptr.len() - 1,
            chunk_indptr: upload(&stream, &h.indptr)?,
            num_chunks: h.block.len(),
            chunk_block: upload(&stream, &h.block)?,
            chunk_start: upload(&stream, &h.start)?,
            chunk_len: upload(&stream, &h.len)?,
            row_limit: upload(&stream, &h.row_limit)?,
            launch,
        })
    }

    /// Kernel v2's arrays: the plan lowered as built (`plan::lower`).
    fn attention_v2(&mut self, step: &StepInput) -> Result<StepAttn> {
        let stream = self.stream().clone();
        let mut cfg = LowerConfig::new(
            self.cfg.num_heads,
            self.cfg.num_kv_heads,
            self.pool.num_blocks,
            self.pool.block_size,
        );
        cfg.num_sms = self.num_sms;
        let lp = lower(&step.plan, &cfg)
            .map_err(|e| backend_err(format!("malformed attention plan: {e}")))?;
        self.kv_tokens_read += lp.tokens_staged * self.cfg.num_layers as u64;
        Ok(StepAttn {
            num_entries: 0,
            chunk_indptr: upload(&stream, &[0i32])?,
            num_chunks: lp.chunk_block.len(),
            chunk_block: upload(&stream, &lp.chunk_block)?,
            chunk_start: upload(&stream, &lp.chunk_start)?,
            chunk_len: upload(&stream, &lp.chunk_len)?,
            row_limit: upload(&stream, &lp.row_limit)?,
            launch: AttnLaunch::Forked {
                units: upload(&stream, &lp.units)?,
                num_units: lp.num_units(),
                unit_rows: upload(&stream, &lp.unit_rows)?,
                partial_direct: upload(&stream, &lp.partial_direct)?,
                num_partials: lp.num_partials(),
                row_part_ptr: upload(&stream, &lp.row_part_ptr)?,
                row_parts: upload(&stream, &lp.row_parts)?,
                num_row_parts: lp.row_parts.len(),
                merge_rows: upload(&stream, &lp.merge_rows)?,
                num_merge_rows: lp.merge_rows.len(),
            },
        })
    }
}

impl Backend for CudaBackend {
    type Act = DevMat;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn block_size(&self) -> usize {
        self.pool.block_size
    }

    fn num_blocks(&self) -> usize {
        self.pool.num_blocks
    }

    fn begin_step(&mut self, step: &StepInput) -> Result<()> {
        self.step = None;
        let rows = step.tokens.len();
        if step.positions.len() != rows || step.slots.len() != rows || step.plan.num_rows != rows {
            return Err(backend_err(format!(
                "step arrays disagree: {rows} tokens, {} positions, {} slots, plan of {} rows",
                step.positions.len(),
                step.slots.len(),
                step.plan.num_rows
            )));
        }
        let vocab = self.cfg.vocab_size;
        if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(SpindleError::TokenOutOfVocab { token: t, vocab });
        }
        let (nb, bs) = (self.pool.num_blocks, self.pool.block_size);
        if let Some(&s) = step.slots.iter().find(|&&s| s as usize >= nb * bs) {
            return Err(backend_err(format!(
                "slot {s} outside the pool ({nb} blocks of {bs})"
            )));
        }
        if let Some(&r) = step.logit_rows.iter().find(|&&r| r as usize >= rows) {
            return Err(backend_err(format!("logit row {r} of a {rows}-row step")));
        }
        let stream = self.stream().clone();

        // Copy-on-write block copies, every layer in one launch.
        if !step.copies.is_empty() {
            let mut pairs = Vec::with_capacity(2 * step.copies.len());
            for c in &step.copies {
                if c.src as usize >= nb || c.dst as usize >= nb {
                    return Err(backend_err(format!("block copy {c:?} outside the pool")));
                }
                pairs.push(to_i32("block", c.src)?);
                pairs.push(to_i32("block", c.dst)?);
            }
            let pairs_d = upload(&stream, &pairs)?;
            let shape = self.cache_shape();
            let mut ks: Vec<&mut dyn DevicePtrMut<bf16>> = self
                .k_cache
                .iter_mut()
                .map(|c| c as &mut dyn DevicePtrMut<bf16>)
                .collect();
            let mut vs: Vec<&mut dyn DevicePtrMut<bf16>> = self
                .v_cache
                .iter_mut()
                .map(|c| c as &mut dyn DevicePtrMut<bf16>)
                .collect();
            kern::copy_blocks(&stream, &mut ks, &mut vs, &pairs_d, shape)?;
        }

        let gqa = self.cfg.num_heads / self.cfg.num_kv_heads;
        let as_i32 = |what: &str, v: &[u32]| -> Result<Vec<i32>> {
            v.iter().map(|&x| to_i32(what, x)).collect()
        };
        let (tokens, positions, slots, logit_rows) = (
            upload(&stream, &as_i32("token", &step.tokens)?)?,
            upload(&stream, &as_i32("position", &step.positions)?)?,
            upload(&stream, &as_i32("slot", &step.slots)?)?,
            upload(&stream, &as_i32("logit row", &step.logit_rows)?)?,
        );
        let attn = match self.attn_kernel {
            AttnKernel::V1 => self.attention_v1(step, gqa)?,
            AttnKernel::V2 => self.attention_v2(step)?,
        };
        self.step = Some(StepBufs {
            rows,
            tokens,
            positions,
            slots,
            logit_rows,
            num_logit_rows: step.logit_rows.len(),
            num_entries: attn.num_entries,
            chunk_indptr: attn.chunk_indptr,
            num_chunks: attn.num_chunks,
            chunk_block: attn.chunk_block,
            chunk_start: attn.chunk_start,
            chunk_len: attn.chunk_len,
            row_limit: attn.row_limit,
            launch: attn.launch,
        });
        Ok(())
    }

    fn embed(&mut self) -> Result<DevMat> {
        let s = self.step_bufs()?;
        let hidden = self.cfg.hidden_size;
        let stream = self.stream();
        let mut out = DevMat::zeros(stream, s.rows, hidden)?;
        if s.rows > 0 {
            kern::embedding::<bf16>(
                stream,
                &mut out.view_mut(),
                &self.embed,
                &s.tokens.slice(0..s.rows),
                hidden,
            )?;
        }
        Ok(out)
    }

    fn rms_norm(&mut self, x: &DevMat, w: Weight) -> Result<DevMat> {
        let g = self.vector_of(w)?;
        if x.cols != g.len() {
            return Err(backend_err(format!(
                "{w:?}: width {} but the norm has {}",
                x.cols,
                g.len()
            )));
        }
        let stream = self.stream();
        let mut out = DevMat::zeros(stream, x.rows, x.cols)?;
        if x.rows > 0 {
            kern::rmsnorm(
                stream,
                &mut out.view_mut(),
                &x.view(),
                g,
                self.cfg.rms_norm_eps,
            )?;
        }
        Ok(out)
    }

    fn add(&mut self, x: &mut DevMat, y: &DevMat) -> Result<()> {
        if x.rows != y.rows || x.cols != y.cols {
            return Err(backend_err(format!(
                "add: [{}, {}] + [{}, {}]",
                x.rows, x.cols, y.rows, y.cols
            )));
        }
        if x.is_empty() {
            return Ok(());
        }
        // x += y as a one-row bias add over the flattened matrices (f32 add, one rounding).
        kern::bias_add(self.gpu.stream(), &mut x.view_mut(), &y.view())?;
        Ok(())
    }

    fn linear(&mut self, x: &DevMat, w: Weight) -> Result<DevMat> {
        let lin = self.linear_of(w)?;
        if x.cols != lin.inp {
            return Err(backend_err(format!(
                "{w:?}: input width {} but weight takes {}",
                x.cols, lin.inp
            )));
        }
        let stream = self.gpu.stream();
        let mut out = DevMat::zeros(stream, x.rows, lin.out)?;
        if x.rows > 0 {
            self.blas.linear::<bf16>(
                &x.view(),
                &lin.w,
                &mut out.view_mut(),
                x.rows,
                lin.out,
                lin.inp,
                false,
            )?;
            if let Some(b) = &lin.bias {
                kern::bias_add(stream, &mut out.view_mut(), b)?;
            }
        }
        Ok(out)
    }

    fn head_norm(&mut self, x: &mut DevMat, w: Weight) -> Result<()> {
        let g = self.vector_of(w)?;
        let hd = self.cfg.head_dim;
        if g.len() != hd || !x.cols.is_multiple_of(hd) {
            return Err(backend_err(format!(
                "{w:?}: head norm of width {} over [{}, {}]",
                g.len(),
                x.rows,
                x.cols
            )));
        }
        if x.is_empty() {
            return Ok(());
        }
        // [rows, heads * hd] is [rows * heads, hd].
        kern::rmsnorm_inplace(
            self.gpu.stream(),
            &mut x.view_mut(),
            g,
            self.cfg.rms_norm_eps,
        )?;
        Ok(())
    }

    fn rope(&mut self, x: &mut DevMat) -> Result<()> {
        let hd = self.cfg.head_dim;
        let rows = self.check_rows("rope", x, x.cols)?;
        if !x.cols.is_multiple_of(hd) {
            return Err(backend_err(format!(
                "rope: width {} is not whole heads of {hd}",
                x.cols
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let s = self.step.as_ref().ok_or_else(|| backend_err("no step"))?;
        let heads = x.cols / hd;
        // One tensor at a time: x as the "q" operand, an empty "k" with 0 heads.
        kern::rope_neox(
            self.gpu.stream(),
            &mut x.view_mut(),
            &mut self.dummy.slice_mut(0..0),
            &s.positions.slice(0..rows),
            heads,
            0,
            hd,
            self.cfg.rope_theta,
        )?;
        Ok(())
    }

    fn write_kv(&mut self, layer: usize, k: &DevMat, v: &DevMat) -> Result<()> {
        self.check_layer(layer)?;
        let kv_dim = self.cfg.num_kv_heads * self.cfg.head_dim;
        let rows = self.check_rows("write_kv k", k, kv_dim)?;
        self.check_rows("write_kv v", v, kv_dim)?;
        if rows == 0 {
            return Ok(());
        }
        let shape = self.cache_shape();
        let s = self.step.as_ref().ok_or_else(|| backend_err("no step"))?;
        kern::kv_write(
            self.gpu.stream(),
            &k.view(),
            &v.view(),
            &mut self.k_cache[layer],
            &mut self.v_cache[layer],
            &s.slots.slice(0..rows),
            shape,
        )?;
        Ok(())
    }

    fn attention(&mut self, layer: usize, q: &DevMat) -> Result<DevMat> {
        self.check_layer(layer)?;
        let (heads, hd) = (self.cfg.num_heads, self.cfg.head_dim);
        let rows = self.check_rows("attention q", q, heads * hd)?;
        let stream = self.gpu.stream().clone();
        let mut out = DevMat::zeros(&stream, rows, heads * hd)?;
        if rows == 0 {
            return Ok(out);
        }
        let shape = self.cache_shape();
        let s = self.step.as_ref().ok_or_else(|| backend_err("no step"))?;
        let cache = KvCache {
            k: &self.k_cache[layer],
            v: &self.v_cache[layer],
            shape,
        };
        let nc = s.num_chunks;
        let (ib, cb, cs, cl) = (
            s.chunk_indptr.slice(0..s.num_entries + 1),
            s.chunk_block.slice(0..nc),
            s.chunk_start.slice(0..nc),
            s.chunk_len.slice(0..nc),
        );
        let chunks = Chunks {
            indptr: &ib,
            block: &cb,
            start: &cs,
            len: &cl,
        };
        let row_limit = s.row_limit.slice(0..rows);
        let scale = 1.0 / (hd as f32).sqrt();
        match &s.launch {
            AttnLaunch::Decode { max_view } => kern::paged_decode(
                &stream,
                &q.view(),
                &cache,
                &chunks,
                &row_limit,
                &mut out.view_mut(),
                heads,
                scale,
                *max_view,
                self.opts.partition_size,
                &mut self.ws,
            )?,
            AttnLaunch::Prefill {
                q_indptr,
                tile_group,
                tile_row,
                num_tiles,
                num_groups,
            } => kern::prefill_attention(
                &stream,
                &q.view(),
                &cache,
                &q_indptr.slice(0..num_groups + 1),
                &chunks,
                &row_limit,
                &tile_group.slice(0..*num_tiles),
                &tile_row.slice(0..*num_tiles),
                &mut out.view_mut(),
                heads,
                scale,
            )?,
            AttnLaunch::Forked {
                units,
                num_units,
                unit_rows,
                partial_direct,
                num_partials,
                row_part_ptr,
                row_parts,
                num_row_parts,
                merge_rows,
                num_merge_rows,
            } => {
                let (un, ur, pd) = (
                    units.slice(0..num_units * UNIT_WIDTH),
                    unit_rows.slice(0..*num_partials),
                    partial_direct.slice(0..*num_partials),
                );
                let (rp, rps, mr) = (
                    row_part_ptr.slice(0..rows + 1),
                    row_parts.slice(0..*num_row_parts),
                    merge_rows.slice(0..*num_merge_rows),
                );
                let plan = ForkedPlan {
                    units: &un,
                    unit_rows: &ur,
                    partial_direct: &pd,
                    chunk_block: &cb,
                    chunk_start: &cs,
                    chunk_len: &cl,
                    row_limit: &row_limit,
                    row_part_ptr: &rp,
                    row_parts: &rps,
                    merge_rows: &mr,
                };
                kern::forked_attention(
                    &stream,
                    &q.view(),
                    &cache,
                    &plan,
                    &mut out.view_mut(),
                    heads,
                    scale,
                    &mut self.ws,
                )?
            }
        }
        Ok(out)
    }

    fn silu_mul(&mut self, gate: &DevMat, up: &DevMat) -> Result<DevMat> {
        if gate.rows != up.rows || gate.cols != up.cols || gate.cols == 0 {
            return Err(backend_err(format!(
                "silu_mul: [{}, {}] and [{}, {}]",
                gate.rows, gate.cols, up.rows, up.cols
            )));
        }
        let stream = self.gpu.stream();
        let mut out = DevMat::zeros(stream, gate.rows, gate.cols)?;
        if gate.rows > 0 {
            kern::silu_mul_split(
                stream,
                &mut out.view_mut(),
                &gate.view(),
                &up.view(),
                gate.cols,
            )?;
        }
        Ok(out)
    }

    fn logits(&mut self, x: &DevMat, host: &mut Vec<f32>) -> Result<()> {
        let hidden = self.cfg.hidden_size;
        let rows = self.check_rows("logits", x, hidden)?;
        let s = self.step.as_ref().ok_or_else(|| backend_err("no step"))?;
        let m = s.num_logit_rows;
        let vocab = self.cfg.vocab_size;
        host.clear();
        if m == 0 || rows == 0 {
            return Ok(());
        }
        let stream = self.gpu.stream().clone();
        // Gather the wanted rows: the embedding kernel with x as the table.
        let mut sel = DevMat::zeros(&stream, m, hidden)?;
        kern::embedding::<bf16>(
            &stream,
            &mut sel.view_mut(),
            &x.view(),
            &s.logit_rows.slice(0..m),
            hidden,
        )?;
        let w = match &self.lm_head {
            Some(l) => &l.w,
            None => &self.embed,
        };
        let mut out = drv(stream.alloc_zeros::<f32>(m * vocab))?;
        self.blas
            .linear::<f32>(&sel.view(), w, &mut out, m, vocab, hidden, false)?;
        *host = drv(stream.clone_dtoh(&out))?;
        Ok(())
    }
}
