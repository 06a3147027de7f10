//! The CUDA backend: [`crate::backend::Backend`] on one GPU, bf16 storage and f32 math.
//!
//! - Weights are uploaded as bf16 (`TensorView::to_bf16`, rounding f32/f16 checkpoints to
//!   nearest), in Hugging Face layout (`[out, in]`), so every linear layer is one cuBLAS
//!   `GemmEx` ([`Blas::linear`]) plus, where the model has one, a bias add.
//! - The K/V cache is one bf16 buffer per layer and per K/V,
//!   `[num_blocks, block_size, kv_heads, head_dim]`. Its size is either given in blocks or a
//!   fraction (default 0.9) of the device memory still free after the weights
//!   ([`KvPoolSize`]); [`CudaBackend::pool`] reports what was chosen.
//! - [`Backend::begin_step`] sends the step's tokens, positions, slots and the lowered
//!   attention plan's arrays in one packed copy (the kernels read them as ranges of it),
//!   and runs the step's copy-on-write block copies (all layers in one launch).
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
use cudarc::driver::{CudaEvent, PinnedHostSlice};

use super::kernels::{self as kern, CacheShape, Chunks, DecodeWorkspace, ForkedPlan, KvCache};
use super::lowering::host_attention;
use super::pool::GraphMode;
pub use super::pool::{CudaOptions, KvPoolSize, PoolInfo};
use super::profile::{nvtx_requested, profiler, range};
use super::weights::{
    upload, upload_head, upload_layer, DLayer, Device, HostBf16, LinearPart, Loader,
};
use super::{Blas, CudaError, Gpu};
use crate::backend::profile::profile_steps;
use crate::backend::step_program::{
    forked_attention_launches, pack_step, packed_len, stage_capacity, ArenaLayout, AttentionArrays,
    AttentionRanges, Gemm, Op, PackExtra, PackLayout, StepCounters, StepProgram, StepShape,
    TokenOp,
};
use crate::backend::weights::Weights;
use crate::backend::{Backend, RowPick, RowSampling, StepInput, Weight, NO_TOKEN};

mod graphs;
use crate::error::{Result, SpindleError};
use crate::plan::lower::{lower, lower_into, LowerConfig, LoweredPlan, UNIT_WIDTH};

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

/// Which attention kernel a step uses (its arrays are ranges of the staging buffer:
/// [`StepBufs::attn`]).
pub(super) enum AttnLaunch {
    /// One CSR entry per row.
    Decode { max_view: usize },
    /// Rows in groups sharing one chunk list; tiles planned on the host.
    Prefill,
    /// Kernel v2 over the lowered plan.
    Forked,
}

/// The current step's inputs on the device: every array is a range of the staging
/// buffer's device twin (`stage_d`), filled by the step's one host-to-device copy.
pub(super) struct StepBufs {
    /// Rows the kernels run over (a graph step's bucket, padding included).
    rows: usize,
    /// The step's own logit rows (what comes back to the host).
    real_logit_rows: usize,
    /// Where tokens, positions, slots, logit rows, block pairs and the attention arrays sit
    /// in `stage_d`.
    pack: PackLayout,
    num_logit_rows: usize,
    /// The attention arrays' ranges in `stage_d` (already shifted into `pack.attention`).
    attn: AttentionRanges,
    launch: AttnLaunch,
}

/// `[capacity]` pinned host staging buffer and its device twin (two allocations, counted).
fn alloc_stage(
    gpu: &Gpu,
    capacity: usize,
    c: &mut StepCounters,
) -> Result<(PinnedHostSlice<i32>, CudaSlice<i32>)> {
    c.allocations += 2;
    // SAFETY: cudarc's pinned allocation (FFI edge) leaves the memory unset; only the
    // elements `pack_step` has just written are ever copied.
    let h = drv(unsafe { gpu.ctx().alloc_pinned::<i32>(capacity) })?;
    // SAFETY: uninitialised device twin; only the range copied from `h` is read.
    let d = drv(unsafe { gpu.stream().alloc::<i32>(capacity) })?;
    Ok((h, d))
}

/// The GPU backend (see the module docs).
pub struct CudaBackend {
    gpu: Gpu,
    blas: Blas,
    cfg: ModelConfig,
    opts: CudaOptions,
    /// The shared weight table, layers fused (see [`DLayer`]).
    w: Weights<Device, DLayer>,
    pool: PoolInfo,
    k_cache: Vec<CudaSlice<bf16>>,
    v_cache: Vec<CudaSlice<bf16>>,
    ws: DecodeWorkspace,
    /// Target of the k half of `rope_neox` when rotating one tensor alone (length 0 used).
    dummy: CudaSlice<bf16>,
    step: Option<StepBufs>,
    kv_tokens_read: u64,
    /// What the backend has done to the device since load (see [`CudaBackend::counters`]).
    counters: StepCounters,
    /// The step's attention arrays on the host before packing (kept across steps).
    attn_host: AttentionArrays,
    /// Kernel v2's lowering of the step's plan (kept across steps: `lower_into`).
    lowered: LoweredPlan,
    /// Activation buffers of the fused step, sized at load.
    arena: Arena,
    /// `[capacity]` pinned staging buffer of the packed step inputs, and its device twin.
    stage_h: PinnedHostSlice<i32>,
    stage_d: CudaSlice<i32>,
    /// Recorded after each copy out of `stage_h`: waited on before it is rewritten.
    staged: CudaEvent,
    /// Fused steps run since load (for `--profile-steps`).
    steps: u64,
    /// The attention kernel in use ([`AttnKernel::from_env`] at load).
    attn_kernel: AttnKernel,
    /// Streaming multiprocessors (the split rule of the v2 lowering).
    num_sms: usize,
    /// `[max logit rows]` pinned host buffer the chosen token ids are copied into.
    tokens_h: PinnedHostSlice<i32>,
    /// The step's program (rebuilt in place each step: no allocation).
    program: StepProgram,
    /// Decode graphs per bucket, and how graph-shaped steps run.
    graphs: graphs::Graphs,
    /// Bumped whenever a buffer a captured graph points into is reallocated (arena,
    /// staging); with the workspace's allocation count it tells a graph it is stale.
    realloc_gen: u64,
}

/// The fused step's activation buffers ([`ArenaLayout`]), allocated once.
struct Arena {
    layout: ArenaLayout,
    x: CudaSlice<bf16>,       // [rows, hidden] residual stream
    h: CudaSlice<bf16>,       // [rows, hidden] normed
    delta: CudaSlice<bf16>,   // [rows, hidden] o_proj / down_proj output
    sel: CudaSlice<bf16>,     // [rows, hidden] gathered logit rows
    qkv: CudaSlice<bf16>,     // [rows, q + 2 kv]
    q: CudaSlice<bf16>,       // [rows, q]
    attn: CudaSlice<bf16>,    // [rows, q]
    gate_up: CudaSlice<bf16>, // [rows, 2 inter]
    act: CudaSlice<bf16>,     // [rows, inter]
    logits: CudaSlice<f32>,   // [logit_rows, vocab]
    tokens: CudaSlice<i32>,   // [logit_rows] greedy tokens
}

impl Arena {
    /// Allocates the buffers (uninitialised: every op writes before it reads), counting
    /// allocations in `c`.
    fn new(stream: &Arc<CudaStream>, layout: ArenaLayout, c: &mut StepCounters) -> Result<Self> {
        let mut b = |n: usize| -> Result<CudaSlice<bf16>> {
            c.allocations += 1;
            // SAFETY: cudarc's uninitialised allocation (FFI edge); the fused step writes
            // every element it later reads (each op's output range covers its readers').
            drv(unsafe { stream.alloc::<bf16>(n) })
        };
        let arena = Self {
            x: b(layout.hidden)?,
            h: b(layout.hidden)?,
            delta: b(layout.hidden)?,
            sel: b(layout.hidden)?,
            qkv: b(layout.qkv)?,
            q: b(layout.q)?,
            attn: b(layout.q)?,
            gate_up: b(layout.gate_up)?,
            act: b(layout.act)?,
            logits: {
                c.allocations += 1;
                // SAFETY: as above; the lm_head GEMM writes every logit that is read.
                drv(unsafe { stream.alloc::<f32>(layout.logits_f32) })?
            },
            tokens: {
                c.allocations += 1;
                // SAFETY: as above; argmax writes every token that is read.
                drv(unsafe { stream.alloc::<i32>(layout.logit_rows.max(1)) })?
            },
            layout,
        };
        Ok(arena)
    }
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

        // The shared weight table, read on the host as bf16; each layer is fused (q/k/v,
        // gate/up) and uploaded as soon as it is read.
        let mut ld = Loader { ck, bytes: 0 };
        let host =
            Weights::<HostBf16, DLayer>::load_with(&cfg, &mut ld, |_, l| upload_layer(&stream, l))?;
        let w: Weights<Device, DLayer> = Weights {
            embed: upload(&stream, &host.embed)?,
            layers: host.layers,
            final_norm: upload(&stream, &host.final_norm)?,
            lm_head: host.lm_head.map(|l| upload_head(&stream, l)).transpose()?,
        };
        let weight_bytes = ld.bytes;
        // The fused step's activations and staging, planned once (before the K/V pool takes
        // its share of the free memory).
        let mut counters = StepCounters::default();
        let rows = opts.max_step_rows.max(1);
        let layout = ArenaLayout::new(&cfg, rows, opts.max_logit_rows.clamp(1, rows));
        let arena = Arena::new(&stream, layout, &mut counters)?;
        let (stage_h, stage_d) = alloc_stage(&gpu, stage_capacity(rows), &mut counters)?;
        // Split-KV / v2 partials, sized for `max_step_partials` so the first long step does
        // not allocate (its allocations and memsets count in `counters()`).
        let ws = DecodeWorkspace::with_partials(&stream, opts.max_step_partials, heads, hd)?;
        counters.allocations += 1;
        // SAFETY: cudarc's pinned allocation (FFI edge); only the token ids a step has just
        // copied in are read.
        let tokens_h = drv(unsafe { gpu.ctx().alloc_pinned::<i32>(layout.logit_rows.max(1)) })?;
        let graph_mode = GraphMode::from_env(opts.graphs)?;
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
        let gpu_ctx = gpu.ctx().clone();
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
            w,
            k_cache,
            v_cache,
            ws,
            dummy,
            step: None,
            kv_tokens_read: 0,
            counters,
            attn_host: AttentionArrays::default(),
            lowered: LoweredPlan::default(),
            arena,
            stage_h,
            stage_d,
            staged: drv(gpu_ctx.new_event(None))?,
            steps: 0,
            attn_kernel,
            num_sms,
            tokens_h,
            program: StepProgram::default(),
            graphs: graphs::Graphs::new(graph_mode, opts.max_graph_rows),
            realloc_gen: 0,
        })
    }

    /// What the backend has done to the device since load: kernel launches (GEMMs
    /// included), allocations, memsets and copies. Take it before and after a step and
    /// subtract ([`StepCounters::since`]).
    pub fn counters(&self) -> StepCounters {
        // The split-KV workspace grows on demand (zero-filled): its allocations count too.
        let ws = self.ws.allocations();
        StepCounters {
            allocations: self.counters.allocations + ws,
            memsets: self.counters.memsets + ws,
            ..self.counters
        }
    }

    /// The shape of the step in progress, as its program needs it.
    fn shape_of(
        &self,
        s: &StepBufs,
        copies: bool,
        tokens: TokenOp,
        logits_back: bool,
    ) -> StepShape {
        let attention_launches = match s.launch {
            AttnLaunch::Decode { max_view }
                if kern::decode_num_splits(max_view, self.opts.partition_size) > 1 =>
            {
                2
            }
            AttnLaunch::Forked => forked_attention_launches(
                s.rows,
                s.attn.units.len() / UNIT_WIDTH,
                s.attn.merge_rows.len(),
            ),
            _ => 1,
        };
        StepShape {
            rows: s.rows,
            logit_rows: s.num_logit_rows,
            copies,
            attention_launches,
            tokens,
            logits_back,
            graph: false,
        }
    }

    /// The program the fused step runs for `step` (lowers its attention plan on the host;
    /// nothing is launched).
    pub fn step_program(&self, step: &StepInput) -> Result<StepProgram> {
        let attention_launches = match self.attn_kernel {
            AttnKernel::V1 => {
                let gqa = self.cfg.num_heads / self.cfg.num_kv_heads;
                let prefill_ok =
                    self.opts.use_prefill_kernel && kern::prefill_rows_per_tile(gqa) > 0;
                let h =
                    host_attention(step, self.pool.num_blocks, self.pool.block_size, prefill_ok)?;
                match h.groups {
                    None if kern::decode_num_splits(h.max_view, self.opts.partition_size) > 1 => 2,
                    _ => 1,
                }
            }
            AttnKernel::V2 => {
                let lp = lower(&step.plan, &self.lower_config())
                    .map_err(|e| backend_err(format!("malformed attention plan: {e}")))?;
                forked_attention_launches(step.tokens.len(), lp.num_units(), lp.merge_rows.len())
            }
        };
        Ok(StepProgram::build(
            &self.cfg,
            &StepShape {
                rows: step.tokens.len(),
                logit_rows: step.logit_rows.len(),
                copies: !step.copies.is_empty(),
                attention_launches,
                tokens: TokenOp::None,
                logits_back: true,
                graph: false,
            },
        ))
    }

    /// One fused step that chooses the greedy token of every logit row on the device
    /// (`argmax`, lowest index on ties, as the CPU sampler's) and brings back only those
    /// ids, in logit-row order, over `tokens`.
    pub fn forward_greedy(&mut self, step: &StepInput, tokens: &mut Vec<u32>) -> Result<()> {
        let picks = vec![RowPick::Sample(RowSampling::GREEDY); step.logit_rows.len()];
        let mut unused = Vec::new();
        self.run_fused(step, Some(&picks), &mut unused, tokens)
    }

    /// The fused step: [`StepProgram`] run in the arena, or replayed as a CUDA graph when
    /// the step has a graph's shape (`graphs.rs`). `picks`: tokens chosen on the device
    /// (one per logit row; `None`: logits only).
    fn run_fused(
        &mut self,
        step: &StepInput,
        picks: Option<&[RowPick]>,
        logits: &mut Vec<f32>,
        tokens: &mut Vec<u32>,
    ) -> Result<()> {
        logits.clear();
        tokens.clear();
        // --profile-steps A..B: the profiler collects steps A to B - 1.
        let n = self.steps;
        self.steps += 1;
        let profile = profile_steps();
        if profile.as_ref().is_some_and(|r| r.start == n) {
            profiler(true)?;
        }
        // NVTX ranges only while someone profiles: each one allocates a C string.
        let marks = profile.is_some() || nvtx_requested();
        let _step = range(marks, "step");
        let (token_op, logits_back) = token_plan(picks);
        let graphed = match (picks, self.graphs.bucket_of(step, self.attn_kernel)) {
            (Some(p), Some(bucket)) => self.run_graph_step(step, p, bucket, marks)?,
            _ => false,
        };
        if !graphed {
            self.ensure_capacity(step.tokens.len(), step.logit_rows.len())?;
            {
                let _r = range(marks, "begin_step");
                self.begin_step_with(step, picks.unwrap_or(&[]), 0)?;
            }
            let shape = {
                let s = self.step_bufs()?;
                self.shape_of(s, !step.copies.is_empty(), token_op, logits_back)
            };
            let mut program = std::mem::take(&mut self.program);
            program.build_into(&self.cfg, &shape);
            let r = program.ops.iter().try_for_each(|&op| {
                let _r = range(marks, op.name());
                self.run_op(op)
            });
            self.program = program;
            r?;
        }
        self.collect(picks, logits_back, marks, logits, tokens)?;
        if profile.is_some_and(|r| r.end == n + 1) {
            drv(self.stream().synchronize())?;
            profiler(false)?;
        }
        Ok(())
    }

    /// Copies the step's results back: the chosen token ids (the real rows';
    /// [`NO_TOKEN`] for a `Logits` pick) and, when some row asked or none was chosen on
    /// the device, the logits of the real logit rows.
    fn collect(
        &mut self,
        picks: Option<&[RowPick]>,
        logits_back: bool,
        marks: bool,
        logits: &mut Vec<f32>,
        tokens: &mut Vec<u32>,
    ) -> Result<()> {
        let _r = range(marks, "download");
        let s = self.step_bufs()?;
        let m = s.real_logit_rows;
        if m == 0 {
            return Ok(());
        }
        let stream = self.stream().clone();
        let vocab = self.cfg.vocab_size;
        if let Some(picks) = picks {
            drv(stream.memcpy_dtoh(&self.arena.tokens.slice(0..m), &mut self.tokens_h))?;
            self.counters.d2h_copies += 1;
            drv(stream.synchronize())?;
            let ids = drv(self.tokens_h.as_slice())?;
            tokens.extend(ids[..m].iter().zip(picks).map(|(&t, p)| match p {
                RowPick::Logits => NO_TOKEN,
                RowPick::Sample(_) => t as u32,
            }));
        }
        if logits_back {
            logits.resize(m * vocab, 0.0);
            // Only the rows that asked (every row when nothing was chosen on the device),
            // one copy per run of consecutive asking rows; a row chosen on the device keeps
            // whatever the buffer held.
            let asks = |r: usize| picks.is_none_or(|p| matches!(p[r], RowPick::Logits));
            let mut r = 0;
            while r < m {
                if !asks(r) {
                    r += 1;
                    continue;
                }
                let start = r;
                while r < m && asks(r) {
                    r += 1;
                }
                let (a, b) = (start * vocab, r * vocab);
                drv(stream.memcpy_dtoh(&self.arena.logits.slice(a..b), &mut logits[a..b]))?;
                self.counters.d2h_copies += 1;
            }
            drv(stream.synchronize())?;
        }
        Ok(())
    }

    /// One op of the fused step (see [`StepProgram`]), counted.
    fn run_op(&mut self, op: Op) -> Result<()> {
        let s = self
            .step
            .as_ref()
            .ok_or_else(|| backend_err("no step in progress"))?;
        let cfg = &self.cfg;
        let (rows, m) = (s.rows, s.num_logit_rows);
        let (hidden, qd, kvd, inter, vocab) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let eps = cfg.rms_norm_eps;
        let stream = self.gpu.stream().clone();
        let shape = CacheShape {
            num_blocks: self.pool.num_blocks,
            block_size: self.pool.block_size,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let a = &mut self.arena;
        let w = &self.w;
        let stage = &self.stage_d;
        let nh = rows * hidden;
        let mut launches = 1;
        match op {
            // Done (and counted) by begin_step, the graph step and `collect`.
            Op::UploadInputs | Op::CopyBlocks | Op::Download | Op::DownloadTokens => launches = 0,
            Op::GraphLaunch => {
                launches = 0;
                self.graphs.launch(s.rows)?;
                self.counters.graph_launches += 1;
            }
            Op::Embed => kern::embedding::<bf16>(
                &stream,
                &mut a.x.slice_mut(0..nh),
                &w.embed,
                &stage.slice(s.pack.tokens.clone()),
                hidden,
            )?,
            Op::Norm { layer } => kern::rmsnorm(
                &stream,
                &mut a.h.slice_mut(0..nh),
                &a.x.slice(0..nh),
                &w.layer(layer)?.input_norm,
                eps,
            )?,
            Op::AddNorm {
                layer,
                post_attention,
            } => {
                let g = match w.layers.get(layer) {
                    None => &w.final_norm,
                    Some(l) if post_attention => &l.post_norm,
                    Some(l) => &l.input_norm,
                };
                kern::fused_add_rmsnorm(
                    &stream,
                    &mut a.h.slice_mut(0..nh),
                    &mut a.x.slice_mut(0..nh),
                    &a.delta.slice(0..nh),
                    g,
                    eps,
                )?
            }
            Op::Gemm { layer, gemm } => {
                let (x, lw, out, n, k): (_, &CudaSlice<bf16>, _, usize, usize) = match gemm {
                    Gemm::Qkv => (
                        a.h.slice(0..nh),
                        &w.layer(layer)?.qkv.w,
                        a.qkv.slice_mut(0..rows * (qd + 2 * kvd)),
                        qd + 2 * kvd,
                        hidden,
                    ),
                    Gemm::O => (
                        a.attn.slice(0..rows * qd),
                        &w.layer(layer)?.o.w,
                        a.delta.slice_mut(0..nh),
                        hidden,
                        qd,
                    ),
                    Gemm::GateUp => (
                        a.h.slice(0..nh),
                        &w.layer(layer)?.gate_up.w,
                        a.gate_up.slice_mut(0..rows * 2 * inter),
                        2 * inter,
                        hidden,
                    ),
                    Gemm::Down => (
                        a.act.slice(0..rows * inter),
                        &w.layer(layer)?.down.w,
                        a.delta.slice_mut(0..nh),
                        hidden,
                        inter,
                    ),
                    Gemm::LmHead => {
                        let head = w.lm_head.as_ref().map_or(&w.embed, |l| &l.w);
                        self.blas.linear::<f32>(
                            &a.sel.slice(0..m * hidden),
                            head,
                            &mut a.logits.slice_mut(0..m * vocab),
                            m,
                            vocab,
                            hidden,
                            false,
                        )?;
                        self.counters.launches += 1;
                        return Ok(());
                    }
                };
                let mut out = out;
                self.blas
                    .linear::<bf16>(&x, lw, &mut out, rows, n, k, false)?;
            }
            Op::OBias { layer } => {
                let b = w
                    .layer(layer)?
                    .o
                    .bias
                    .as_ref()
                    .ok_or_else(|| backend_err(format!("layer {layer}: o_proj has no bias")))?;
                kern::bias_add(&stream, &mut a.delta.slice_mut(0..nh), b)?
            }
            Op::QkvPrep { layer } => {
                let l = w.layer(layer)?;
                let norms = match (&l.q_norm, &l.k_norm) {
                    (Some(qn), Some(kn)) => {
                        Some((qn as kern::In<'_, bf16>, kn as kern::In<'_, bf16>))
                    }
                    _ => None,
                };
                let (Some(kc), Some(vc)) =
                    (self.k_cache.get_mut(layer), self.v_cache.get_mut(layer))
                else {
                    return Err(backend_err(format!("no layer {layer}")));
                };
                kern::qkv_prep(
                    &stream,
                    &mut a.q.slice_mut(0..rows * qd),
                    kern::KvDest::Cache {
                        k_cache: kc,
                        v_cache: vc,
                        slots: &stage.slice(s.pack.slots.clone()),
                        shape,
                    },
                    &a.qkv.slice(0..rows * (qd + 2 * kvd)),
                    l.qkv.bias.as_ref().map(|b| b as kern::In<'_, bf16>),
                    norms,
                    &stage.slice(s.pack.positions.clone()),
                    kern::QkvShape {
                        num_q_heads: cfg.num_heads,
                        num_kv_heads: cfg.num_kv_heads,
                        head_dim: cfg.head_dim,
                        eps,
                        theta: cfg.rope_theta,
                    },
                )?
            }
            Op::Attention { layer, .. } => {
                let cache = KvCache {
                    k: self
                        .k_cache
                        .get(layer)
                        .ok_or_else(|| backend_err(format!("no layer {layer}")))?,
                    v: &self.v_cache[layer],
                    shape,
                };
                launches = attend(
                    &stream,
                    stage,
                    s,
                    &cache,
                    &a.q.slice(0..rows * qd),
                    &mut a.attn.slice_mut(0..rows * qd),
                    cfg.num_heads,
                    cfg.head_dim,
                    self.opts.partition_size,
                    &mut self.ws,
                )?;
            }
            Op::SiluMul { .. } => kern::silu_mul(
                &stream,
                &mut a.act.slice_mut(0..rows * inter),
                &a.gate_up.slice(0..rows * 2 * inter),
                inter,
            )?,
            Op::GatherLogitRows => kern::embedding::<bf16>(
                &stream,
                &mut a.sel.slice_mut(0..m * hidden),
                &a.h.slice(0..nh),
                &stage.slice(s.pack.logit_rows.clone()),
                hidden,
            )?,
            Op::Argmax => kern::argmax(
                &stream,
                &mut a.tokens.slice_mut(0..m),
                &a.logits.slice(0..m * vocab),
            )?,
            Op::Sample => {
                let sp = s.pack.sampling.clone(); // [4, m]: temperature, top_k, top_p, uniform
                if sp.len() != 4 * m {
                    return Err(backend_err(format!(
                        "sampling settings of {} elements for {m} rows",
                        sp.len()
                    )));
                }
                let part = |i: usize| stage.slice(sp.start + i * m..sp.start + (i + 1) * m);
                let (t, k, p, u) = (part(0), part(1), part(2), part(3));
                // SAFETY: reinterpreting int32 staging elements as f32 (same size and
                // alignment); `pack_step` wrote them as f32 bit patterns.
                let (t, p, u) = unsafe {
                    (
                        t.transmute::<f32>(m),
                        p.transmute::<f32>(m),
                        u.transmute::<f32>(m),
                    )
                };
                let (Some(t), Some(p), Some(u)) = (t, p, u) else {
                    return Err(backend_err("sampling settings outside the staging buffer"));
                };
                kern::sample(
                    &stream,
                    &mut a.tokens.slice_mut(0..m),
                    &a.logits.slice(0..m * vocab),
                    &kern::SampleParams {
                        temperature: &t,
                        top_k: &k,
                        top_p: &p,
                        uniform: &u,
                    },
                )?
            }
        }
        self.counters.launches += launches;
        Ok(())
    }

    /// A zero-filled `[rows, cols]` matrix for the op-level API (counted: one allocation
    /// and one memset).
    fn zeros(&mut self, rows: usize, cols: usize) -> Result<DevMat> {
        self.counters.allocations += 1;
        self.counters.memsets += 1;
        DevMat::zeros(self.gpu.stream(), rows, cols)
    }

    /// Grows the arena for a step of `rows` rows and `logit_rows` logit rows (allocations,
    /// counted; a step within the load-time size allocates nothing).
    fn ensure_capacity(&mut self, rows: usize, logit_rows: usize) -> Result<()> {
        let l = self.arena.layout;
        if rows > l.rows || logit_rows > l.logit_rows {
            let stream = self.stream().clone();
            let layout =
                ArenaLayout::new(&self.cfg, rows.max(l.rows), logit_rows.max(l.logit_rows));
            self.arena = Arena::new(&stream, layout, &mut self.counters)?;
            self.realloc_gen += 1;
            // SAFETY: cudarc's pinned allocation (FFI edge); only ids just copied in are read.
            self.tokens_h =
                drv(unsafe { self.gpu.ctx().alloc_pinned::<i32>(layout.logit_rows.max(1)) })?;
            self.counters.allocations += 1;
        }
        Ok(())
    }

    /// Grows the staging buffers to hold `need` elements (counted allocations).
    fn ensure_stage(&mut self, rows: usize, need: usize) -> Result<()> {
        if need > self.stage_h.len() {
            let cap = (2 * need).max(stage_capacity(rows));
            let (h, d) = alloc_stage(&self.gpu, cap, &mut self.counters)?;
            self.stage_h = h;
            self.stage_d = d;
            self.realloc_gen += 1;
        }
        Ok(())
    }

    /// Checks a step's arrays against each other, the vocabulary and the pool.
    fn check_step(&self, step: &StepInput) -> Result<()> {
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
        if let Some(c) = step
            .copies
            .iter()
            .find(|c| c.src as usize >= nb || c.dst as usize >= nb)
        {
            return Err(backend_err(format!("block copy {c:?} outside the pool")));
        }
        Ok(())
    }

    /// [`Backend::begin_step`] with the picks' sampling settings packed too, and rows
    /// padded to `pad_rows` (0: none; a graph step pads with [`Self::stage_inputs`]).
    fn begin_step_with(
        &mut self,
        step: &StepInput,
        picks: &[RowPick],
        pad_rows: usize,
    ) -> Result<()> {
        self.step = None;
        self.check_step(step)?;
        // The attention arrays first (into `attn_host`, kept across steps), then everything
        // packed into the pinned staging buffer: tokens, positions, slots, logit rows,
        // sampling settings, block pairs and the attention arrays travel in one async copy.
        self.attn_host.clear();
        let gqa = self.cfg.num_heads / self.cfg.num_kv_heads;
        let (attn, launch) = match self.attn_kernel {
            AttnKernel::V1 => self.attention_v1(step, gqa)?,
            AttnKernel::V2 => self.attention_v2(step)?,
        };
        self.stage_inputs(step, picks, pad_rows, attn, launch)
    }

    /// Packs `step` (rows padded to `pad_rows`) with `picks` and the attention arrays in
    /// `attn_host` (at `attn`) into the staging buffer, sends it in one copy, runs the
    /// block copies, and records the step's buffers.
    fn stage_inputs(
        &mut self,
        step: &StepInput,
        picks: &[RowPick],
        pad_rows: usize,
        attn: AttentionRanges,
        launch: AttnLaunch,
    ) -> Result<()> {
        let rows = step.tokens.len();
        let stream = self.stream().clone();
        let extra = PackExtra {
            attention: &self.attn_host.data,
            picks,
            pad_rows,
        };
        let need = packed_len(step, &extra);
        // The previous step's copy out of the staging buffer must be done before it is
        // overwritten or, when this step grows it, freed (a step without logits ends
        // without a synchronisation).
        drv(self.staged.synchronize())?;
        self.ensure_stage(rows.max(pad_rows), need)?;
        let extra = PackExtra {
            attention: &self.attn_host.data,
            picks,
            pad_rows,
        };
        let host = drv(self.stage_h.as_mut_slice())?;
        let pack = pack_step(step, &extra, host)?;
        if pack.len > 0 {
            let src = &drv(self.stage_h.as_slice())?[..pack.len];
            drv(stream.memcpy_htod(src, &mut self.stage_d.slice_mut(0..pack.len)))?;
            drv(self.staged.record(&stream))?;
            self.counters.h2d_copies += 1;
        }
        let attn = attn.shifted(pack.attention.start);

        // Copy-on-write block copies, every layer in one launch.
        if !step.copies.is_empty() {
            let shape = self.cache_shape();
            let pairs = self.stage_d.slice(pack.copies.clone());
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
            kern::copy_blocks(&stream, &mut ks, &mut vs, &pairs, shape)?;
            self.counters.launches += 1;
        }

        self.kv_tokens_read += step.plan.kv_tokens_read * self.cfg.num_layers as u64;
        let padded = pad_rows.max(rows);
        self.step = Some(StepBufs {
            rows: padded,
            real_logit_rows: step.logit_rows.len(),
            pack,
            num_logit_rows: step.logit_rows.len() + (padded - rows),
            attn,
            launch,
        });
        Ok(())
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

    /// K/V tokens attention read since creation, summed over layers: the plan's count
    /// (`AttentionPlan::kv_tokens_read`, each shared item once) of every step, once per
    /// layer, as the CPU backend and the engine's stats count them. (The per-row kernels
    /// the plan is lowered to may read a shared prefix once per row or row group.)
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

    fn linear_of(&self, w: Weight) -> Result<LinearPart<'_>> {
        match w {
            Weight::LmHead => {
                let l = self
                    .w
                    .lm_head
                    .as_ref()
                    .ok_or_else(|| backend_err("lm_head is tied"))?;
                Ok(LinearPart {
                    w: l.w.slice(..),
                    bias: None,
                    out: l.out,
                    inp: l.inp,
                })
            }
            Weight::Layer(i, lw) => self
                .w
                .layer(i)?
                .linear(lw)
                .ok_or_else(|| backend_err(format!("{lw:?} is not a matrix"))),
            Weight::FinalNorm => Err(backend_err("final norm is not a matrix")),
        }
    }

    fn vector_of(&self, w: Weight) -> Result<&CudaSlice<bf16>> {
        let missing = || backend_err(format!("{w:?} is not a vector of this model"));
        match w {
            Weight::FinalNorm => Ok(&self.w.final_norm),
            Weight::Layer(i, lw) => self
                .w
                .layers
                .get(i)
                .and_then(|l| l.vector(lw))
                .ok_or_else(missing),
            Weight::LmHead => Err(missing()),
        }
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer < self.w.layers.len() {
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

impl CudaBackend {
    /// Kernel v1's arrays, appended to `attn_host`: the plan unpacked into per-row (or
    /// per-group) chunk lists, and the prefill tiles.
    fn attention_v1(
        &mut self,
        step: &StepInput,
        gqa: usize,
    ) -> Result<(AttentionRanges, AttnLaunch)> {
        let (nb, bs) = (self.pool.num_blocks, self.pool.block_size);
        let prefill_ok = self.opts.use_prefill_kernel && kern::prefill_rows_per_tile(gqa) > 0;
        let h = host_attention(step, nb, bs, prefill_ok)?;
        let a = &mut self.attn_host;
        let mut r = AttentionRanges {
            chunk_indptr: a.push(&h.indptr),
            chunk_block: a.push(&h.block),
            chunk_start: a.push(&h.start),
            chunk_len: a.push(&h.len),
            row_limit: a.push(&h.row_limit),
            ..Default::default()
        };
        let launch = match &h.groups {
            Some(q_indptr) => {
                let plan = kern::prefill_plan(q_indptr, gqa)?;
                r.q_indptr = a.push(q_indptr);
                r.tile_group = a.push(&plan.tile_group);
                r.tile_row = a.push(&plan.tile_row);
                AttnLaunch::Prefill
            }
            None => AttnLaunch::Decode {
                max_view: h.max_view,
            },
        };
        Ok((r, launch))
    }

    /// How kernel v2's lowering cuts this model's plans on this GPU.
    fn lower_config(&self) -> LowerConfig {
        let mut cfg = LowerConfig::new(
            self.cfg.num_heads,
            self.cfg.num_kv_heads,
            self.pool.num_blocks,
            self.pool.block_size,
        );
        cfg.num_sms = self.num_sms;
        cfg
    }

    /// Kernel v2's arrays, appended to `attn_host`: the plan lowered as built
    /// (`plan::lower_into`, into the lowering kept across steps).
    fn attention_v2(&mut self, step: &StepInput) -> Result<(AttentionRanges, AttnLaunch)> {
        let cfg = self.lower_config();
        lower_into(&step.plan, &cfg, &mut self.lowered)
            .map_err(|e| backend_err(format!("malformed attention plan: {e}")))?;
        Ok((
            self.attn_host.push_lowered(&self.lowered),
            AttnLaunch::Forked,
        ))
    }
}

impl Backend for CudaBackend {
    type Act = DevMat;

    /// The fused step: [`StepProgram`] run in the arena (no allocation, memset or copy
    /// beyond the program's own), or the op-by-op layer loop when `fused_step` is off.
    fn forward(&mut self, step: &StepInput, logits: &mut Vec<f32>) -> Result<()> {
        if !self.opts.fused_step {
            return crate::model::layer_loop(self, step, logits);
        }
        let mut unused = Vec::new();
        self.run_fused(step, None, logits, &mut unused)
    }

    /// The fused step choosing tokens on the device: greedy and sampled rows through the
    /// argmax or sampling kernel, only token ids coming back (and the logits when some row
    /// picks [`RowPick::Logits`]); a pure-decode step replays its bucket's CUDA graph.
    fn forward_sampled(
        &mut self,
        step: &StepInput,
        picks: &[RowPick],
        logits: &mut Vec<f32>,
        tokens: &mut Vec<u32>,
    ) -> Result<()> {
        crate::backend::check_picks(step, picks)?;
        if !self.opts.fused_step {
            crate::model::layer_loop(self, step, logits)?;
            return crate::backend::sample_on_host(logits, self.cfg.vocab_size, picks, tokens);
        }
        self.run_fused(step, Some(picks), logits, tokens)
    }

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
        self.begin_step_with(step, &[], 0)
    }

    fn embed(&mut self) -> Result<DevMat> {
        let rows = self.step_bufs()?.rows;
        let hidden = self.cfg.hidden_size;
        let mut out = self.zeros(rows, hidden)?;
        let s = self.step_bufs()?;
        if s.rows > 0 {
            kern::embedding::<bf16>(
                self.gpu.stream(),
                &mut out.view_mut(),
                &self.w.embed,
                &self.stage_d.slice(s.pack.tokens.clone()),
                hidden,
            )?;
            self.counters.launches += 1;
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
        let mut out = self.zeros(x.rows, x.cols)?;
        let g = self.vector_of(w)?;
        if x.rows > 0 {
            kern::rmsnorm(
                self.gpu.stream(),
                &mut out.view_mut(),
                &x.view(),
                g,
                self.cfg.rms_norm_eps,
            )?;
            self.counters.launches += 1;
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
        self.counters.launches += 1;
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
        let out_cols = lin.out;
        let mut out = self.zeros(x.rows, out_cols)?;
        let lin = self.linear_of(w)?;
        let stream = self.gpu.stream();
        let mut launches = 0;
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
            launches += 1;
            if let Some(b) = &lin.bias {
                kern::bias_add(stream, &mut out.view_mut(), b)?;
                launches += 1;
            }
        }
        self.counters.launches += launches;
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
        self.counters.launches += 1;
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
            &self.stage_d.slice(s.pack.positions.clone()),
            heads,
            0,
            hd,
            self.cfg.rope_theta,
        )?;
        self.counters.launches += 1;
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
            &self.stage_d.slice(s.pack.slots.clone()),
            shape,
        )?;
        self.counters.launches += 1;
        Ok(())
    }

    fn attention(&mut self, layer: usize, q: &DevMat) -> Result<DevMat> {
        self.check_layer(layer)?;
        let (heads, hd) = (self.cfg.num_heads, self.cfg.head_dim);
        let rows = self.check_rows("attention q", q, heads * hd)?;
        let stream = self.gpu.stream().clone();
        let mut out = self.zeros(rows, heads * hd)?;
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
        let n = attend(
            &stream,
            &self.stage_d,
            s,
            &cache,
            &q.view(),
            &mut out.view_mut(),
            heads,
            hd,
            self.opts.partition_size,
            &mut self.ws,
        )?;
        self.counters.launches += n;
        Ok(out)
    }

    fn silu_mul(&mut self, gate: &DevMat, up: &DevMat) -> Result<DevMat> {
        if gate.rows != up.rows || gate.cols != up.cols || gate.cols == 0 {
            return Err(backend_err(format!(
                "silu_mul: [{}, {}] and [{}, {}]",
                gate.rows, gate.cols, up.rows, up.cols
            )));
        }
        let mut out = self.zeros(gate.rows, gate.cols)?;
        if gate.rows > 0 {
            kern::silu_mul_split(
                self.gpu.stream(),
                &mut out.view_mut(),
                &gate.view(),
                &up.view(),
                gate.cols,
            )?;
            self.counters.launches += 1;
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
        let logit_rows = s.pack.logit_rows.clone();
        let stream = self.gpu.stream().clone();
        // Gather the wanted rows: the embedding kernel with x as the table.
        let mut sel = self.zeros(m, hidden)?;
        kern::embedding::<bf16>(
            &stream,
            &mut sel.view_mut(),
            &x.view(),
            &self.stage_d.slice(logit_rows),
            hidden,
        )?;
        let w = match &self.w.lm_head {
            Some(l) => &l.w,
            None => &self.w.embed,
        };
        let mut out = drv(stream.alloc_zeros::<f32>(m * vocab))?;
        self.counters.allocations += 1;
        self.counters.memsets += 1;
        self.blas
            .linear::<f32>(&sel.view(), w, &mut out, m, vocab, hidden, false)?;
        self.counters.launches += 2;
        *host = drv(stream.clone_dtoh(&out))?;
        self.counters.d2h_copies += 1;
        Ok(())
    }
}

/// How a step with `picks` chooses its tokens on the device, and whether its logits come
/// back: the argmax kernel when every row is greedy (or wants logits), else the sampling
/// kernel; logits when some row wants them or nothing is chosen on the device.
fn token_plan(picks: Option<&[RowPick]>) -> (TokenOp, bool) {
    let Some(picks) = picks else {
        return (TokenOp::None, true);
    };
    let logits_back = picks.iter().any(|p| matches!(p, RowPick::Logits));
    let sample = picks
        .iter()
        .any(|p| matches!(p, RowPick::Sample(s) if !s.is_greedy()));
    let op = if sample {
        TokenOp::Sample
    } else {
        TokenOp::Argmax
    };
    (op, logits_back)
}

/// Attention of `q` over one layer's cache per the step's lowered plan (kernel v1's decode
/// or prefill kernel, or kernel v2), its arrays read from `stage` (the staging buffer's
/// device twin) at the step's ranges; returns the launches made (split-KV decode and v2
/// merge partials in a second).
#[allow(clippy::too_many_arguments)]
fn attend(
    stream: &Arc<CudaStream>,
    stage: &CudaSlice<i32>, // [capacity] packed step inputs
    s: &StepBufs,
    cache: &KvCache<'_>,
    q: kern::In<'_, bf16>,    // [rows, heads * head_dim]
    out: kern::Out<'_, bf16>, // [rows, heads * head_dim]
    heads: usize,
    hd: usize,
    partition_size: usize,
    ws: &mut DecodeWorkspace,
) -> Result<u64> {
    let a = &s.attn;
    let at = |r: &std::ops::Range<usize>| stage.slice(r.clone());
    let (ib, cb, cs, cl) = (
        at(&a.chunk_indptr),
        at(&a.chunk_block),
        at(&a.chunk_start),
        at(&a.chunk_len),
    );
    let chunks = Chunks {
        indptr: &ib,
        block: &cb,
        start: &cs,
        len: &cl,
    };
    let row_limit = at(&a.row_limit); // [rows]
    let scale = 1.0 / (hd as f32).sqrt();
    Ok(match &s.launch {
        AttnLaunch::Decode { max_view } => {
            kern::paged_decode(
                stream,
                q,
                cache,
                &chunks,
                &row_limit,
                out,
                heads,
                scale,
                *max_view,
                partition_size,
                ws,
            )?;
            // Split-KV decode merges its partials in a second launch.
            if kern::decode_num_splits(*max_view, partition_size) > 1 {
                2
            } else {
                1
            }
        }
        AttnLaunch::Prefill => {
            kern::prefill_attention(
                stream,
                q,
                cache,
                &at(&a.q_indptr),
                &chunks,
                &row_limit,
                &at(&a.tile_group),
                &at(&a.tile_row),
                out,
                heads,
                scale,
            )?;
            1
        }
        AttnLaunch::Forked => {
            let num_units = a.units.len() / UNIT_WIDTH;
            let num_merge_rows = a.merge_rows.len();
            let (un, ur, pd) = (at(&a.units), at(&a.unit_rows), at(&a.partial_direct));
            let (rp, rps, mr) = (at(&a.row_part_ptr), at(&a.row_parts), at(&a.merge_rows));
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
            kern::forked_attention(stream, q, cache, &plan, out, heads, scale, ws)?;
            forked_attention_launches(s.rows, num_units, num_merge_rows)
        }
    })
}
