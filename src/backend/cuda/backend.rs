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
//! - Attention: every row's chunk list is the concatenation, in view order (the order of
//!   `row_partials`), of the chunks of the plan items it belongs to, masked by
//!   `row_limit[r]`. When some consecutive rows share a chunk list (a thread's prefill
//!   chunk) the step runs `prefill_attention` over groups of such rows, otherwise the
//!   split-KV paged decode kernel, one row per CSR entry. Both are per-thread kernels: a
//!   shared prefix is read once per row (decode) or per group (prefill), not once per step
//!   as the plan's items would allow; the forked kernel (docs/design.md, section 4) is the
//!   next step and will take the plan's items directly.
//! - Activations are [`DevMat`]: `[rows, cols]` bf16 on the device. Logits are computed in
//!   f32 by the lm_head GEMM for the gathered `logit_rows` only and copied to the host.
//!
//! Every CUDA failure is returned as [`SpindleError::Device`] (its source a `CudaError`); nothing panics and nothing
//! here needs `unsafe` (the kernel wrappers hold the FFI calls).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtrMut, DriverError};
use half::bf16;
use model_loader::{Checkpoint, ModelConfig};

use super::kernels::{self as kern, CacheShape, Chunks, DecodeWorkspace, KvCache};
use super::{Blas, CudaError, Gpu};
use crate::backend::{Backend, LayerWeight, StepInput, Weight};
use crate::error::{Result, SpindleError};

/// Maps a cudarc driver error into the crate's error type.
fn drv<T>(r: std::result::Result<T, DriverError>) -> Result<T> {
    r.map_err(|e| SpindleError::from(CudaError::from(e)))
}

fn backend_err(msg: impl Into<String>) -> SpindleError {
    SpindleError::Backend(msg.into())
}

/// A `[rows, cols]` bf16 activation buffer on the device.
///
/// The allocation holds at least one element (CUDA refuses empty allocations), so always
/// go through [`DevMat::view`] / [`DevMat::view_mut`], which are exactly `rows * cols` long.
pub struct DevMat {
    /// Rows (one per step token).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    buf: CudaSlice<bf16>,
}

impl DevMat {
    fn zeros(stream: &Arc<CudaStream>, rows: usize, cols: usize) -> Result<Self> {
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

/// How many K/V blocks the backend allocates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvPoolSize {
    /// Exactly this many blocks.
    Blocks(usize),
    /// This fraction (0, 1] of the device memory free after the weights are uploaded.
    FreeFraction(f64),
}

/// Options of [`CudaBackend::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Size of the K/V pool.
    pub pool: KvPoolSize,
    /// Tokens per split of the decode kernel (split-KV).
    pub partition_size: usize,
    /// Run groups of consecutive rows sharing a chunk list (prefill chunks) through the
    /// prefill kernel; `false`: the decode kernel for every row.
    pub use_prefill_kernel: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device: 0,
            block_size: 16,
            pool: KvPoolSize::FreeFraction(0.9),
            partition_size: 512,
            use_prefill_kernel: true,
        }
    }
}

/// What [`CudaBackend::load`] chose for the K/V pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolInfo {
    /// Blocks allocated.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Bytes of one block over all layers, K and V.
    pub bytes_per_block: usize,
    /// Bytes of weights uploaded.
    pub weight_bytes: usize,
    /// Device memory free after the weights, before the pool (bytes).
    pub free_after_weights: usize,
    /// Total device memory (bytes).
    pub total: usize,
}

impl std::fmt::Display for PoolInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const GIB: f64 = (1u64 << 30) as f64;
        write!(
            f,
            "KV pool: {} blocks x {} tokens ({:.2} GiB; {} B/block over all layers), weights {:.2} GiB, free after weights {:.2} of {:.2} GiB",
            self.num_blocks,
            self.block_size,
            (self.num_blocks * self.bytes_per_block) as f64 / GIB,
            self.bytes_per_block,
            self.weight_bytes as f64 / GIB,
            self.free_after_weights as f64 / GIB,
            self.total as f64 / GIB,
        )
    }
}

struct DLinear {
    w: CudaSlice<bf16>, // [out, inp]
    bias: Option<CudaSlice<bf16>>,
    out: usize,
    inp: usize,
}

struct DLayer {
    input_norm: CudaSlice<bf16>,
    q: DLinear,
    k: DLinear,
    v: DLinear,
    o: DLinear,
    q_norm: Option<CudaSlice<bf16>>,
    k_norm: Option<CudaSlice<bf16>>,
    post_norm: CudaSlice<bf16>,
    gate: DLinear,
    up: DLinear,
    down: DLinear,
}

/// Which attention kernel a step uses, with its device arrays.
enum AttnLaunch {
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
}

/// The current step's inputs on the device. Buffers hold at least one element; the
/// lengths are kept alongside.
struct StepBufs {
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
}

/// Uploads a host vector (at least one element allocated).
fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy>(
    stream: &Arc<CudaStream>,
    host: &[T],
) -> Result<CudaSlice<T>> {
    if host.is_empty() {
        return drv(stream.alloc_zeros::<T>(1));
    }
    drv(stream.clone_htod(host))
}

fn to_i32(what: &str, v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| backend_err(format!("{what} {v} exceeds i32")))
}

struct Loader<'a> {
    ck: &'a Checkpoint,
    stream: &'a Arc<CudaStream>,
    bytes: usize,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<CudaSlice<bf16>> {
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

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<DLinear> {
        let w = self.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(DLinear { w, bias, out, inp })
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
        let gpu = Gpu::new(opts.device)?;
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
        })
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
    /// layers: per row (decode) or per row group (prefill), the visible view length. This
    /// is the per-thread kernel's logical count, not the plan's `kv_tokens_read`.
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

/// Host-side attention arrays of one step, derived from the plan.
struct HostAttn {
    /// Per entry (row or group): its chunk list.
    indptr: Vec<i32>,
    block: Vec<i32>,
    start: Vec<i32>,
    len: Vec<i32>,
    row_limit: Vec<i32>,
    /// `Some(q_indptr)` when rows are grouped for the prefill kernel.
    groups: Option<Vec<i32>>,
    /// Sum over entries of the visible view length (logical K/V tokens read).
    logical_tokens: u64,
    max_view: usize,
}

type ChunkTriple = (i32, i32, i32);

/// Row r's chunks: the chunks of its items in `row_partials` (view) order.
fn row_chunk_lists(
    step: &StepInput,
    num_blocks: usize,
    block_size: usize,
) -> Result<Vec<Vec<ChunkTriple>>> {
    let plan = &step.plan;
    let bad = |what: &str| backend_err(format!("malformed attention plan: {what}"));
    let items = plan.num_items();
    if plan.item_chunk_ptr.len() != items + 1
        || plan.item_row_ptr.len() != items + 1
        || plan.row_partial_ptr.len() != plan.num_rows + 1
        || plan.row_limit.len() != plan.num_rows
    {
        return Err(bad("CSR array lengths"));
    }
    let mut partial_item = vec![u32::MAX; plan.item_rows.len()];
    for i in 0..items {
        let (a, b) = (
            plan.item_row_ptr[i] as usize,
            plan.item_row_ptr[i + 1] as usize,
        );
        let slots = partial_item
            .get_mut(a..b)
            .ok_or_else(|| bad("item_row_ptr"))?;
        slots.fill(i as u32);
    }
    let mut out = Vec::with_capacity(plan.num_rows);
    for r in 0..plan.num_rows {
        let (a, b) = (
            plan.row_partial_ptr[r] as usize,
            plan.row_partial_ptr[r + 1] as usize,
        );
        let ps = plan
            .row_partials
            .get(a..b)
            .ok_or_else(|| bad("row_partial_ptr"))?;
        let mut list = Vec::new();
        for &p in ps {
            let item = *partial_item
                .get(p as usize)
                .ok_or_else(|| bad("row_partials"))?;
            if item == u32::MAX || plan.item_rows[p as usize] as usize != r {
                return Err(bad("partial not served to its row"));
            }
            let (ca, cb) = (
                plan.item_chunk_ptr[item as usize] as usize,
                plan.item_chunk_ptr[item as usize + 1] as usize,
            );
            for c in plan
                .chunks
                .get(ca..cb)
                .ok_or_else(|| bad("item_chunk_ptr"))?
            {
                if c.block as usize >= num_blocks || c.start as usize + c.len as usize > block_size
                {
                    return Err(bad(&format!(
                        "chunk {c:?} outside the pool ({num_blocks} blocks of {block_size})"
                    )));
                }
                list.push((c.block as i32, c.start as i32, c.len as i32));
            }
        }
        out.push(list);
    }
    Ok(out)
}

fn host_attention(
    step: &StepInput,
    num_blocks: usize,
    block_size: usize,
    group_rows: bool,
) -> Result<HostAttn> {
    let lists = row_chunk_lists(step, num_blocks, block_size)?;
    let limits: Vec<usize> = step.plan.row_limit.iter().map(|&l| l as usize).collect();
    for (r, (list, &lim)) in lists.iter().zip(&limits).enumerate() {
        let view: usize = list.iter().map(|c| c.2 as usize).sum();
        if view < lim {
            return Err(backend_err(format!(
                "malformed attention plan: row {r} sees {lim} tokens but its items hold {view}"
            )));
        }
    }
    let row_limit = limits
        .iter()
        .map(|&l| to_i32("row_limit", l as u32))
        .collect::<Result<Vec<_>>>()?;
    let max_view = limits.iter().copied().max().unwrap_or(0);
    // Groups: maximal runs of consecutive rows whose lists are prefixes of one another (the
    // group reads the longest; each row's limit masks the rest).
    let mut entries: Vec<(usize, usize, usize)> = Vec::new(); // (first row, end row, list row)
    let mut r = 0;
    while r < lists.len() {
        let (mut end, mut longest) = (r + 1, r);
        while group_rows && end < lists.len() {
            let (a, b) = (&lists[longest], &lists[end]);
            let prefix = if a.len() <= b.len() {
                b.starts_with(a)
            } else {
                a.starts_with(b)
            };
            if !prefix {
                break;
            }
            if b.len() > a.len() {
                longest = end;
            }
            end += 1;
        }
        entries.push((r, end, longest));
        r = end;
    }
    let grouped = group_rows && entries.iter().any(|&(a, b, _)| b - a > 1);
    let mut h = HostAttn {
        indptr: vec![0],
        block: Vec::new(),
        start: Vec::new(),
        len: Vec::new(),
        row_limit,
        groups: None,
        logical_tokens: 0,
        max_view,
    };
    let push_list = |h: &mut HostAttn, list: &[ChunkTriple]| -> Result<()> {
        for &(b, s, l) in list {
            h.block.push(b);
            h.start.push(s);
            h.len.push(l);
        }
        h.indptr.push(to_i32("num_chunks", h.block.len() as u32)?);
        Ok(())
    };
    if grouped {
        let mut q_indptr = vec![0i32];
        for &(a, b, longest) in &entries {
            push_list(&mut h, &lists[longest])?;
            q_indptr.push(b as i32);
            h.logical_tokens += limits[a..b].iter().copied().max().unwrap_or(0) as u64;
        }
        h.groups = Some(q_indptr);
    } else {
        for (list, &lim) in lists.iter().zip(&limits) {
            push_list(&mut h, list)?;
            h.logical_tokens += lim as u64;
        }
    }
    Ok(h)
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
        let prefill_ok = self.opts.use_prefill_kernel && kern::prefill_rows_per_tile(gqa) > 0;
        let h = host_attention(step, nb, bs, prefill_ok)?;
        let as_i32 = |what: &str, v: &[u32]| -> Result<Vec<i32>> {
            v.iter().map(|&x| to_i32(what, x)).collect()
        };
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
        self.step = Some(StepBufs {
            rows,
            tokens: upload(&stream, &as_i32("token", &step.tokens)?)?,
            positions: upload(&stream, &as_i32("position", &step.positions)?)?,
            slots: upload(&stream, &as_i32("slot", &step.slots)?)?,
            logit_rows: upload(&stream, &as_i32("logit row", &step.logit_rows)?)?,
            num_logit_rows: step.logit_rows.len(),
            num_entries: h.indptr.len() - 1,
            chunk_indptr: upload(&stream, &h.indptr)?,
            num_chunks: h.block.len(),
            chunk_block: upload(&stream, &h.block)?,
            chunk_start: upload(&stream, &h.start)?,
            chunk_len: upload(&stream, &h.len)?,
            row_limit: upload(&stream, &h.row_limit)?,
            launch,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Chunk;
    use crate::plan::{AttentionMode, AttentionPlan, PlanThread};

    fn chunk(block: u32, start: u32, len: u32) -> Chunk {
        Chunk { block, start, len }
    }

    fn step_of(threads: &[PlanThread], mode: AttentionMode, split: usize) -> StepInput {
        let plan = AttentionPlan::build(threads, mode, split);
        let n = plan.num_rows;
        StepInput {
            tokens: vec![0; n],
            positions: vec![0; n],
            slots: vec![0; n],
            plan,
            ..Default::default()
        }
    }

    #[test]
    fn forked_plan_rows_get_their_whole_view_in_order() {
        // Two threads share blocks 0-1 then each has one block of its own; thread 0 decodes
        // one row, thread 1 prefills three (causal limits).
        let threads = vec![
            PlanThread {
                chunks: vec![chunk(0, 0, 4), chunk(1, 0, 4), chunk(2, 0, 2)],
                rows: vec![(0, 10)],
            },
            PlanThread {
                chunks: vec![chunk(0, 0, 4), chunk(1, 0, 4), chunk(3, 0, 3)],
                rows: vec![(1, 9), (2, 10), (3, 11)],
            },
        ];
        for split in [0, 4] {
            let step = step_of(&threads, AttentionMode::Forked, split);
            let lists = row_chunk_lists(&step, 8, 4).unwrap();
            assert_eq!(lists[0], vec![(0, 0, 4), (1, 0, 4), (2, 0, 2)]);
            for list in &lists[1..4] {
                assert_eq!(list, &vec![(0, 0, 4), (1, 0, 4), (3, 0, 3)]);
            }
            let h = host_attention(&step, 8, 4, true).unwrap();
            assert_eq!(h.groups, Some(vec![0, 1, 4]));
            assert_eq!(h.indptr, vec![0, 3, 6]);
            assert_eq!(h.logical_tokens, 10 + 11);
            let h = host_attention(&step, 8, 4, false).unwrap();
            assert_eq!(h.groups, None);
            assert_eq!(h.indptr, vec![0, 3, 6, 9, 12]);
            assert_eq!(h.row_limit, vec![10, 9, 10, 11]);
            assert_eq!(h.max_view, 11);
        }
    }

    #[test]
    fn rows_seeing_fewer_items_group_with_longer_ones() {
        // Split items of 2 tokens: row 1 (limit 5) does not read the last item, row 2 does.
        let threads = vec![PlanThread {
            chunks: vec![chunk(0, 0, 4), chunk(1, 0, 1), chunk(1, 1, 2)],
            rows: vec![(0, 5), (1, 7)],
        }];
        let step = step_of(&threads, AttentionMode::Forked, 2);
        let lists = row_chunk_lists(&step, 4, 4).unwrap();
        assert!(lists[1].starts_with(&lists[0]));
        let h = host_attention(&step, 4, 4, true).unwrap();
        assert_eq!(h.groups, Some(vec![0, 2]));
        assert_eq!(h.indptr, vec![0, lists[1].len() as i32]);
    }

    #[test]
    fn bad_plans_are_errors() {
        let threads = vec![PlanThread {
            chunks: vec![chunk(9, 0, 4)],
            rows: vec![(0, 4)],
        }];
        let step = step_of(&threads, AttentionMode::Naive, 0);
        assert!(
            host_attention(&step, 4, 4, true).is_err(),
            "block outside the pool"
        );
        let mut step = step_of(
            &[PlanThread {
                chunks: vec![chunk(0, 0, 4)],
                rows: vec![(0, 4)],
            }],
            AttentionMode::Naive,
            0,
        );
        step.plan.row_limit[0] = 5;
        assert!(
            host_attention(&step, 4, 4, true).is_err(),
            "limit past the view"
        );
    }
}
