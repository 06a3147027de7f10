//! Safe wrappers over the kernel launchers of `kernels/spindle_kernels.h`, one per
//! launcher (mistral.rs style, docs/gpu.md section 4): each checks every length against
//! the shapes it is given and returns `Err(CudaError::Shape)` before launching, then makes
//! the one `unsafe` FFI call. Indices held in device memory (chunk lists, slots, block
//! pairs, tile plans, token ids) cannot be checked here; the kernels bounds-check them and
//! skip out-of-range entries, so a bad plan gives wrong numbers, never a stray access.
//!
//! Everything is enqueued on the given stream; nothing synchronises.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::ffi;
use super::{CudaError, Result};

/// A device buffer read by a kernel (a `CudaSlice` or `CudaView`).
pub type In<'a, T> = &'a dyn DevicePtr<T>;
/// A device buffer written by a kernel (a `CudaSlice` or `CudaViewMut`).
pub type Out<'a, T> = &'a mut dyn DevicePtrMut<T>;

/// Shape of one layer's paged KV cache: `[num_blocks, block_size, num_kv_heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    /// Physical blocks.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl CacheShape {
    /// Elements in one layer's K (or V) cache.
    pub fn elems(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }
    /// Elements in one block of one layer's K (or V) cache.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }
}

/// One layer's K and V caches, read-only.
pub struct KvCache<'a> {
    /// `[num_blocks, block_size, num_kv_heads, head_dim]` bf16.
    pub k: In<'a, bf16>,
    /// `[num_blocks, block_size, num_kv_heads, head_dim]` bf16.
    pub v: In<'a, bf16>,
    /// Their shape.
    pub shape: CacheShape,
}

/// Chunk lists in CSR form (docs/gpu.md, section 3): entry i of `indptr` starts the chunks
/// of row (decode) or group (prefill) i; chunk c is `len[c]` consecutive slots from slot
/// `start[c]` of block `block[c]`, never crossing the block.
pub struct Chunks<'a> {
    /// `[num_rows + 1]` (decode) or `[num_groups + 1]` (prefill).
    pub indptr: In<'a, i32>,
    /// `[num_chunks]` physical block id.
    pub block: In<'a, i32>,
    /// `[num_chunks]` first slot inside the block.
    pub start: In<'a, i32>,
    /// `[num_chunks]` tokens.
    pub len: In<'a, i32>,
}

fn i32_of(kernel: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::shape(kernel, format!("{what} = {v} exceeds i32")))
}

fn expect_len(kernel: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CudaError::shape(
            kernel,
            format!("{what}: length {got}, expected {want}"),
        ))
    }
}

fn cu(stream: &CudaStream) -> ffi::sp_stream {
    stream.cu_stream() as ffi::sp_stream
}

fn bind(stream: &CudaStream) -> Result<()> {
    // The runtime-API launchers use whatever context is current on this thread.
    Ok(stream.context().bind_to_thread()?)
}

/// Alignment, in bytes, of the K/V cache rows the attention and KV-copy kernels move with
/// 16-byte vector loads and stores (`uint4`).
const VEC_ALIGN: usize = 16;

/// `Err(Shape)` unless device pointer `p` is a multiple of `align` bytes. A `CudaView` into
/// the middle of a buffer can break the alignment a kernel's vector accesses need, which
/// would otherwise be a misaligned-address fault that poisons the whole context.
fn check_align<T>(kernel: &'static str, what: &str, p: *const T, align: usize) -> Result<()> {
    if (p as usize).is_multiple_of(align) {
        Ok(())
    } else {
        Err(CudaError::shape(
            kernel,
            format!("{what}: device pointer {p:?} is not {align}-byte aligned"),
        ))
    }
}

/// The alignments every attention kernel needs: K/V caches for `uint4` staging, q and out
/// for the 4-byte (two bf16) loads and stores.
fn check_attention_align(
    kernel: &'static str,
    q: *const ffi::sp_bf16,
    k: *const ffi::sp_bf16,
    v: *const ffi::sp_bf16,
    out: *const ffi::sp_bf16,
) -> Result<()> {
    check_align(kernel, "k_cache", k, VEC_ALIGN)?;
    check_align(kernel, "v_cache", v, VEC_ALIGN)?;
    check_align(kernel, "q", q, 4)?;
    check_align(kernel, "out", out, 4)
}

macro_rules! rd {
    ($buf:expr, $stream:expr, $t:ty) => {{
        let (p, g) = $buf.device_ptr($stream);
        (p as usize as *const $t, g)
    }};
}
macro_rules! wr {
    ($buf:expr, $stream:expr, $t:ty) => {{
        let (p, g) = $buf.device_ptr_mut($stream);
        (p as usize as *mut $t, g)
    }};
}

/// Head dims the attention kernels are instantiated for (16 and 32 serve the tiny test
/// models; 64 and 128 real ones).
pub const ATTN_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

fn check_cache(kernel: &'static str, c: &KvCache<'_>) -> Result<()> {
    expect_len(kernel, "k_cache", c.k.len(), c.shape.elems())?;
    expect_len(kernel, "v_cache", c.v.len(), c.shape.elems())?;
    if !ATTN_HEAD_DIMS.contains(&c.shape.head_dim) {
        return Err(CudaError::shape(
            kernel,
            format!("head_dim {} not in {ATTN_HEAD_DIMS:?}", c.shape.head_dim),
        ));
    }
    if c.shape.block_size == 0 {
        return Err(CudaError::shape(kernel, "block_size is 0"));
    }
    i32_of(
        kernel,
        "num_blocks * block_size",
        c.shape.num_blocks * c.shape.block_size,
    )?;
    Ok(())
}

fn check_chunks(kernel: &'static str, ch: &Chunks<'_>, entries: usize) -> Result<usize> {
    expect_len(kernel, "chunk_indptr", ch.indptr.len(), entries + 1)?;
    let n = ch.block.len();
    expect_len(kernel, "chunk_start", ch.start.len(), n)?;
    expect_len(kernel, "chunk_len", ch.len.len(), n)?;
    i32_of(kernel, "num_chunks", n)?;
    Ok(n)
}

/// Split count of the decode kernel: `ceil(max_view_len / partition_size)`, at least 1.
pub fn decode_num_splits(max_view_len: usize, partition_size: usize) -> usize {
    max_view_len.div_ceil(partition_size.max(1)).max(1)
}

/// Scratch for split-KV decode partials; grows on demand and is reused across steps.
#[derive(Default)]
pub struct DecodeWorkspace {
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
    allocations: u64,
}

impl DecodeWorkspace {
    /// An empty workspace (allocates on first split launch).
    pub fn new() -> Self {
        Self::default()
    }

    /// A workspace allocated now for `partials` partials of `num_q_heads` heads of
    /// `head_dim` (`[partials, heads, head_dim]` and `[partials, heads]` f32, zero-filled:
    /// two allocations and two memsets, counted in [`DecodeWorkspace::allocations`]), so
    /// that steps within that size allocate nothing.
    pub fn with_partials(
        stream: &Arc<CudaStream>,
        partials: usize,
        num_q_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let lse_len = (partials * num_q_heads).max(1);
        let mut ws = Self::default();
        ws.ensure(stream, lse_len * head_dim.max(1), lse_len)?;
        Ok(ws)
    }

    /// Makes room for `partials` partials of `num_q_heads` heads of `head_dim`, allocating
    /// (zero-filled, counted) only when it holds fewer: done before a CUDA graph is
    /// captured, so that no launch inside the capture allocates.
    pub fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        partials: usize,
        num_q_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let lse_len = (partials * num_q_heads).max(1);
        self.ensure(stream, lse_len * head_dim.max(1), lse_len)
    }

    fn ensure(&mut self, stream: &Arc<CudaStream>, o_len: usize, lse_len: usize) -> Result<()> {
        if self.part_o.as_ref().is_none_or(|b| b.len() < o_len) {
            self.part_o = Some(stream.alloc_zeros::<f32>(o_len)?);
            self.allocations += 1;
        }
        if self.part_lse.as_ref().is_none_or(|b| b.len() < lse_len) {
            self.part_lse = Some(stream.alloc_zeros::<f32>(lse_len)?);
            self.allocations += 1;
        }
        Ok(())
    }

    /// Zero-filled allocations made since creation (each also a memset).
    pub fn allocations(&self) -> u64 {
        self.allocations
    }
}

/// The checks every attention launch shares: the cache, the chunk lists (`entries` of
/// them), whole GQA groups, and `q` / `out` holding `rows x num_q_heads x head_dim` values.
/// Returns the number of chunks.
#[allow(clippy::too_many_arguments)]
fn check_attention_args(
    kernel: &'static str,
    cache: &KvCache<'_>,
    chunks: &Chunks<'_>,
    entries: usize,
    rows: usize,
    num_q_heads: usize,
    q_len: usize,
    out_len: usize,
) -> Result<usize> {
    check_cache(kernel, cache)?;
    let s = cache.shape;
    if num_q_heads == 0 || !num_q_heads.is_multiple_of(s.num_kv_heads) {
        return Err(CudaError::shape(
            kernel,
            format!(
                "num_q_heads {num_q_heads} not a multiple of num_kv_heads {}",
                s.num_kv_heads
            ),
        ));
    }
    let num_chunks = check_chunks(kernel, chunks, entries)?;
    expect_len(kernel, "q", q_len, rows * num_q_heads * s.head_dim)?;
    expect_len(kernel, "out", out_len, rows * num_q_heads * s.head_dim)?;
    Ok(num_chunks)
}

/// Paged decode attention (`kernels/paged_decode.cu`): for each query row r,
/// `out[r, h] = softmax(scale * q[r, h] . K_view^T) V_view` over the row's chunk list,
/// masked to view indices `< row_limit[r]`. `max_view_len` (>= every row_limit) and
/// `partition_size` fix the split count; splits > 1 use `ws`.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    stream: &Arc<CudaStream>,
    q: In<'_, bf16>, // [num_rows, num_q_heads, head_dim]
    cache: &KvCache<'_>,
    chunks: &Chunks<'_>,    // indptr [num_rows + 1]
    row_limit: In<'_, i32>, // [num_rows]
    out: Out<'_, bf16>,     // [num_rows, num_q_heads, head_dim]
    num_q_heads: usize,
    scale: f32,
    max_view_len: usize,
    partition_size: usize,
    ws: &mut DecodeWorkspace,
) -> Result<()> {
    const K: &str = "spindle_paged_decode";
    let s = cache.shape;
    let num_rows = row_limit.len();
    let num_chunks = check_attention_args(
        K,
        cache,
        chunks,
        num_rows,
        num_rows,
        num_q_heads,
        q.len(),
        out.len(),
    )?;
    if partition_size == 0 {
        return Err(CudaError::shape(K, "partition_size is 0"));
    }
    let num_splits = decode_num_splits(max_view_len, partition_size);
    if num_rows == 0 {
        return Ok(());
    }
    let lse_len = num_rows * num_q_heads * num_splits;
    if num_splits > 1 {
        ws.ensure(stream, lse_len * s.head_dim, lse_len)?;
    }
    bind(stream)?;
    let (q_p, _g0) = rd!(q, stream, ffi::sp_bf16);
    let (k_p, _g1) = rd!(cache.k, stream, ffi::sp_bf16);
    let (v_p, _g2) = rd!(cache.v, stream, ffi::sp_bf16);
    let (o_p, _g3) = wr!(out, stream, ffi::sp_bf16);
    let (ip, _g4) = rd!(chunks.indptr, stream, i32);
    let (cb, _g5) = rd!(chunks.block, stream, i32);
    let (cs, _g6) = rd!(chunks.start, stream, i32);
    let (cl, _g7) = rd!(chunks.len, stream, i32);
    let (rl, _g8) = rd!(row_limit, stream, i32);
    check_attention_align(K, q_p, k_p, v_p, o_p)?;
    let (mut po, mut pl) = (std::ptr::null_mut(), std::ptr::null_mut());
    let mut _g9 = None;
    let mut _g10 = None;
    if num_splits > 1 {
        let (a, b) = (ws.part_o.as_mut().unwrap(), ws.part_lse.as_mut().unwrap());
        let (p, g) = wr!(a, stream, f32);
        po = p;
        _g9 = Some(g);
        let (p, g) = wr!(b, stream, f32);
        pl = p;
        _g10 = Some(g);
    }
    let params = ffi::SpindleDecodeParams {
        q: q_p,
        k_cache: k_p,
        v_cache: v_p,
        out: o_p,
        chunk_indptr: ip,
        chunk_block: cb,
        chunk_start: cs,
        chunk_len: cl,
        row_limit: rl,
        part_o: po,
        part_lse: pl,
        num_rows: i32_of(K, "num_rows", num_rows)?,
        num_q_heads: i32_of(K, "num_q_heads", num_q_heads)?,
        num_kv_heads: i32_of(K, "num_kv_heads", s.num_kv_heads)?,
        head_dim: s.head_dim as i32,
        block_size: i32_of(K, "block_size", s.block_size)?,
        num_blocks: i32_of(K, "num_blocks", s.num_blocks)?,
        num_chunks: num_chunks as i32,
        num_splits: i32_of(K, "num_splits", num_splits)?,
        partition_size: i32_of(K, "partition_size", partition_size)?,
        scale,
    };
    i32_of(K, "num_rows * num_q_heads * num_splits", lse_len)?;
    // SAFETY: every pointer comes from a live device buffer of this context whose length was
    // checked above against the dims in `params`; device-side indices are bounds-checked by
    // the kernel; the guards (_g*) keep the buffers' stream ordering until the launch is issued.
    let code = unsafe { ffi::spindle_paged_decode(&params, cu(stream)) };
    CudaError::check(K, code)
}

/// The lowered attention plan on the device ([`crate::plan::lower::LoweredPlan`]'s arrays,
/// each its own length).
pub struct ForkedPlan<'a> {
    /// `[num_units, UNIT_WIDTH]`.
    pub units: In<'a, i32>,
    /// `[partials]` query row of each lowered partial.
    pub unit_rows: In<'a, i32>,
    /// `[partials]` 1 where the partial is its row's only one.
    pub partial_direct: In<'a, i32>,
    /// `[num_chunks]` each.
    pub chunk_block: In<'a, i32>,
    pub chunk_start: In<'a, i32>,
    pub chunk_len: In<'a, i32>,
    /// `[num_rows]`.
    pub row_limit: In<'a, i32>,
    /// `[num_rows + 1]` and `[row parts]`: each row's partials in view order.
    pub row_part_ptr: In<'a, i32>,
    pub row_parts: In<'a, i32>,
    /// `[merge rows]`.
    pub merge_rows: In<'a, i32>,
}

/// Forked attention, kernel v2 (`kernels/forked_attention.cu`): every work unit of the
/// lowered plan staged once for all the rows it serves, partials merged per row in view
/// order. `out[r, h] = softmax(scale * q[r, h] . K_view(r)^T) V_view(r)` masked to view
/// indices `< row_limit[r]`. Partials live in `ws`.
#[allow(clippy::too_many_arguments)]
pub fn forked_attention(
    stream: &Arc<CudaStream>,
    q: In<'_, bf16>, // [num_rows, num_q_heads, head_dim]
    cache: &KvCache<'_>,
    plan: &ForkedPlan<'_>,
    out: Out<'_, bf16>, // [num_rows, num_q_heads, head_dim]
    num_q_heads: usize,
    scale: f32,
    ws: &mut DecodeWorkspace,
) -> Result<()> {
    const K: &str = "spindle_forked_attention";
    const WIDTH: usize = crate::plan::lower::UNIT_WIDTH;
    const _: () = assert!(WIDTH == ffi::SPINDLE_FORKED_UNIT_WIDTH as usize);
    const _: () = assert!(
        crate::plan::lower::TILE_TOKENS == ffi::SPINDLE_FORKED_TILE_TOKENS as usize
            && crate::plan::lower::CTA_ROWS == ffi::SPINDLE_FORKED_CTA_ROWS as usize
    );
    check_cache(K, cache)?;
    let s = cache.shape;
    let num_rows = plan.row_limit.len();
    if num_q_heads == 0
        || !num_q_heads.is_multiple_of(s.num_kv_heads)
        || num_q_heads / s.num_kv_heads > ffi::SPINDLE_FORKED_CTA_ROWS as usize
    {
        return Err(CudaError::shape(
            K,
            format!(
                "{num_q_heads} q heads over {} kv heads (whole groups of at most {})",
                s.num_kv_heads,
                ffi::SPINDLE_FORKED_CTA_ROWS
            ),
        ));
    }
    if !plan.units.len().is_multiple_of(WIDTH) {
        return Err(CudaError::shape(
            K,
            format!(
                "units: length {} is not whole units of {WIDTH}",
                plan.units.len()
            ),
        ));
    }
    let num_units = plan.units.len() / WIDTH;
    let num_partials = plan.unit_rows.len();
    expect_len(K, "partial_direct", plan.partial_direct.len(), num_partials)?;
    let num_chunks = plan.chunk_block.len();
    expect_len(K, "chunk_start", plan.chunk_start.len(), num_chunks)?;
    expect_len(K, "chunk_len", plan.chunk_len.len(), num_chunks)?;
    expect_len(K, "row_part_ptr", plan.row_part_ptr.len(), num_rows + 1)?;
    expect_len(K, "q", q.len(), num_rows * num_q_heads * s.head_dim)?;
    expect_len(K, "out", out.len(), num_rows * num_q_heads * s.head_dim)?;
    let lse_len = num_partials * num_q_heads;
    i32_of(K, "partials * num_q_heads", lse_len)?;
    i32_of(K, "units", plan.units.len())?;
    i32_of(K, "num_chunks", num_chunks)?;
    i32_of(K, "row parts", plan.row_parts.len())?;
    i32_of(K, "merge rows", plan.merge_rows.len())?;
    if num_units > u32::MAX as usize / 2 || plan.merge_rows.len() > u32::MAX as usize / 2 {
        return Err(CudaError::shape(K, "grid too large"));
    }
    if num_rows == 0 {
        return Ok(());
    }
    ws.ensure(stream, (lse_len * s.head_dim).max(1), lse_len.max(1))?;
    bind(stream)?;
    let (q_p, _g0) = rd!(q, stream, ffi::sp_bf16);
    let (k_p, _g1) = rd!(cache.k, stream, ffi::sp_bf16);
    let (v_p, _g2) = rd!(cache.v, stream, ffi::sp_bf16);
    let (o_p, _g3) = wr!(out, stream, ffi::sp_bf16);
    let (un, _g4) = rd!(plan.units, stream, i32);
    let (ur, _g5) = rd!(plan.unit_rows, stream, i32);
    let (pd, _g6) = rd!(plan.partial_direct, stream, i32);
    let (cb, _g7) = rd!(plan.chunk_block, stream, i32);
    let (cs, _g8) = rd!(plan.chunk_start, stream, i32);
    let (cl, _g9) = rd!(plan.chunk_len, stream, i32);
    let (rl, _g10) = rd!(plan.row_limit, stream, i32);
    let (rp, _g11) = rd!(plan.row_part_ptr, stream, i32);
    let (rps, _g12) = rd!(plan.row_parts, stream, i32);
    let (mr, _g13) = rd!(plan.merge_rows, stream, i32);
    check_attention_align(K, q_p, k_p, v_p, o_p)?;
    let ws_o = ws
        .part_o
        .as_mut()
        .ok_or_else(|| CudaError::shape(K, "workspace not allocated"))?;
    let (po, _g14) = wr!(ws_o, stream, f32);
    let ws_l = ws
        .part_lse
        .as_mut()
        .ok_or_else(|| CudaError::shape(K, "workspace not allocated"))?;
    let (pl, _g15) = wr!(ws_l, stream, f32);
    let params = ffi::SpindleForkedParams {
        q: q_p,
        k_cache: k_p,
        v_cache: v_p,
        out: o_p,
        units: un,
        unit_rows: ur,
        partial_direct: pd,
        chunk_block: cb,
        chunk_start: cs,
        chunk_len: cl,
        row_limit: rl,
        row_part_ptr: rp,
        row_parts: rps,
        merge_rows: mr,
        part_o: po,
        part_lse: pl,
        num_rows: i32_of(K, "num_rows", num_rows)?,
        num_q_heads: i32_of(K, "num_q_heads", num_q_heads)?,
        num_kv_heads: i32_of(K, "num_kv_heads", s.num_kv_heads)?,
        head_dim: s.head_dim as i32,
        block_size: i32_of(K, "block_size", s.block_size)?,
        num_blocks: i32_of(K, "num_blocks", s.num_blocks)?,
        num_chunks: num_chunks as i32,
        num_units: num_units as i32,
        num_partials: num_partials as i32,
        num_row_parts: plan.row_parts.len() as i32,
        num_merge_rows: plan.merge_rows.len() as i32,
        scale,
    };
    // SAFETY: every pointer comes from a live device buffer of this context whose length was
    // checked above against the counts in `params` (the workspace holds num_partials x
    // num_q_heads (x head_dim) floats); indices read on the device are clamped or skipped by
    // the kernels; the guards (_g*) keep the buffers' stream ordering until the launch is
    // issued.
    let code = unsafe { ffi::spindle_forked_attention(&params, cu(stream)) };
    CudaError::check(K, code)
}

/// Host-side tile plan for [`prefill_attention`]: tile t covers rows
/// `[tile_row[t], min(tile_row[t] + rows_per_tile, q_indptr[tile_group[t] + 1]))`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    /// Group of each tile.
    pub tile_group: Vec<i32>,
    /// First row of each tile.
    pub tile_row: Vec<i32>,
    /// Rows per full tile for this GQA ratio.
    pub rows_per_tile: usize,
}

/// Rows per prefill tile for `gqa` q-heads per kv-head (0 if unsupported, i.e. > 64).
pub fn prefill_rows_per_tile(gqa: usize) -> usize {
    let Ok(g) = i32::try_from(gqa) else { return 0 };
    // SAFETY: pure host function, no pointers.
    let r = unsafe { ffi::spindle_prefill_rows_per_tile(g) };
    r.max(0) as usize
}

/// Builds the prefill tile plan from the host copy of `q_indptr` (`[num_groups + 1]`).
pub fn prefill_plan(q_indptr: &[i32], gqa: usize) -> Result<PrefillPlan> {
    const K: &str = "spindle_prefill_attention";
    let rpt = prefill_rows_per_tile(gqa);
    if rpt == 0 {
        return Err(CudaError::shape(
            K,
            format!("GQA ratio {gqa} unsupported (1..=64)"),
        ));
    }
    let mut plan = PrefillPlan {
        tile_group: Vec::new(),
        tile_row: Vec::new(),
        rows_per_tile: rpt,
    };
    for g in 0..q_indptr.len().saturating_sub(1) {
        let (a, b) = (q_indptr[g], q_indptr[g + 1]);
        if b < a || a < 0 {
            return Err(CudaError::shape(
                K,
                format!("q_indptr not monotone at group {g}"),
            ));
        }
        let mut r = a;
        while r < b {
            plan.tile_group.push(g as i32);
            plan.tile_row.push(r);
            r += rpt as i32;
        }
    }
    Ok(plan)
}

/// Prefill attention with tree visibility (`kernels/prefill_attention.cu`): rows of group g
/// (`q_indptr[g]..q_indptr[g+1]`) share chunk list g; row r sees view indices
/// `< row_limit[r]`. `tile_group` / `tile_row` come from [`prefill_plan`].
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention(
    stream: &Arc<CudaStream>,
    q: In<'_, bf16>, // [num_rows, num_q_heads, head_dim]
    cache: &KvCache<'_>,
    q_indptr: In<'_, i32>,   // [num_groups + 1]
    chunks: &Chunks<'_>,     // indptr [num_groups + 1]
    row_limit: In<'_, i32>,  // [num_rows]
    tile_group: In<'_, i32>, // [num_tiles]
    tile_row: In<'_, i32>,   // [num_tiles]
    out: Out<'_, bf16>,      // [num_rows, num_q_heads, head_dim]
    num_q_heads: usize,
    scale: f32,
) -> Result<()> {
    const K: &str = "spindle_prefill_attention";
    let s = cache.shape;
    let num_rows = row_limit.len();
    let num_groups = q_indptr
        .len()
        .checked_sub(1)
        .ok_or_else(|| CudaError::shape(K, "q_indptr is empty"))?;
    let num_chunks = check_attention_args(
        K,
        cache,
        chunks,
        num_groups,
        num_rows,
        num_q_heads,
        q.len(),
        out.len(),
    )?;
    if prefill_rows_per_tile(num_q_heads / s.num_kv_heads) == 0 {
        return Err(CudaError::shape(K, "GQA ratio above 64"));
    }
    let num_tiles = tile_group.len();
    expect_len(K, "tile_row", tile_row.len(), num_tiles)?;
    if num_rows == 0 || num_tiles == 0 {
        return Ok(());
    }
    bind(stream)?;
    let (q_p, _g0) = rd!(q, stream, ffi::sp_bf16);
    let (k_p, _g1) = rd!(cache.k, stream, ffi::sp_bf16);
    let (v_p, _g2) = rd!(cache.v, stream, ffi::sp_bf16);
    let (o_p, _g3) = wr!(out, stream, ffi::sp_bf16);
    let (qi, _g4) = rd!(q_indptr, stream, i32);
    let (ip, _g5) = rd!(chunks.indptr, stream, i32);
    let (cb, _g6) = rd!(chunks.block, stream, i32);
    let (cs, _g7) = rd!(chunks.start, stream, i32);
    let (cl, _g8) = rd!(chunks.len, stream, i32);
    let (rl, _g9) = rd!(row_limit, stream, i32);
    let (tg, _g10) = rd!(tile_group, stream, i32);
    let (tr, _g11) = rd!(tile_row, stream, i32);
    check_attention_align(K, q_p, k_p, v_p, o_p)?;
    let params = ffi::SpindlePrefillParams {
        q: q_p,
        k_cache: k_p,
        v_cache: v_p,
        out: o_p,
        q_indptr: qi,
        chunk_indptr: ip,
        chunk_block: cb,
        chunk_start: cs,
        chunk_len: cl,
        row_limit: rl,
        tile_group: tg,
        tile_row: tr,
        num_rows: i32_of(K, "num_rows", num_rows)?,
        num_groups: i32_of(K, "num_groups", num_groups)?,
        num_tiles: i32_of(K, "num_tiles", num_tiles)?,
        num_q_heads: i32_of(K, "num_q_heads", num_q_heads)?,
        num_kv_heads: i32_of(K, "num_kv_heads", s.num_kv_heads)?,
        head_dim: s.head_dim as i32,
        block_size: i32_of(K, "block_size", s.block_size)?,
        num_blocks: i32_of(K, "num_blocks", s.num_blocks)?,
        num_chunks: num_chunks as i32,
        scale,
    };
    // SAFETY: pointers from live device buffers whose lengths were checked above; device-side
    // indices (q_indptr, chunks, tiles) are bounds-checked by the kernel; guards held.
    let code = unsafe { ffi::spindle_prefill_attention(&params, cu(stream)) };
    CudaError::check(K, code)
}

/// Writes new K/V rows into their cache slots (`kernels/kv_write.cu`); `slot_mapping[t] < 0`
/// skips token t.
pub fn kv_write(
    stream: &Arc<CudaStream>,
    k: In<'_, bf16>,           // [num_tokens, num_kv_heads, head_dim]
    v: In<'_, bf16>,           // [num_tokens, num_kv_heads, head_dim]
    k_cache: Out<'_, bf16>,    // [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Out<'_, bf16>,    // [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: In<'_, i32>, // [num_tokens]
    shape: CacheShape,
) -> Result<()> {
    const K: &str = "spindle_kv_write";
    let t = slot_mapping.len();
    let row = shape.num_kv_heads * shape.head_dim;
    expect_len(K, "k", k.len(), t * row)?;
    expect_len(K, "v", v.len(), t * row)?;
    expect_len(K, "k_cache", k_cache.len(), shape.elems())?;
    expect_len(K, "v_cache", v_cache.len(), shape.elems())?;
    i32_of(
        K,
        "num_blocks * block_size",
        shape.num_blocks * shape.block_size,
    )?;
    if row == 0 || shape.block_size == 0 {
        return Err(CudaError::shape(K, "zero-sized cache row or block"));
    }
    if t == 0 {
        return Ok(());
    }
    bind(stream)?;
    let (kp, _g0) = rd!(k, stream, ffi::sp_bf16);
    let (vp, _g1) = rd!(v, stream, ffi::sp_bf16);
    let (kc, _g2) = wr!(k_cache, stream, ffi::sp_bf16);
    let (vc, _g3) = wr!(v_cache, stream, ffi::sp_bf16);
    let (sm, _g4) = rd!(slot_mapping, stream, i32);
    if row.is_multiple_of(8) {
        // The launcher then picks the 16-byte vector copy for every row.
        check_align(K, "k", kp, VEC_ALIGN)?;
        check_align(K, "v", vp, VEC_ALIGN)?;
        check_align(K, "k_cache", kc, VEC_ALIGN)?;
        check_align(K, "v_cache", vc, VEC_ALIGN)?;
    }
    // SAFETY: lengths checked above; the kernel skips slots outside
    // [0, num_blocks * block_size); guards held across the call.
    let code = unsafe {
        ffi::spindle_kv_write(
            kp,
            vp,
            kc,
            vc,
            sm,
            i32_of(K, "num_tokens", t)?,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
            shape.block_size as i32,
            shape.num_blocks as i32,
            cu(stream),
        )
    };
    CudaError::check(K, code)
}

/// Copy-on-write block copies (`kernels/kv_write.cu`): for every layer and every pair
/// `(src, dst)` in `block_pairs` (`[num_pairs, 2]`), copies block src to block dst in both
/// the K and the V cache, in one launch. All layers share `shape`.
pub fn copy_blocks(
    stream: &Arc<CudaStream>,
    k_caches: &mut [&mut dyn DevicePtrMut<bf16>],
    v_caches: &mut [&mut dyn DevicePtrMut<bf16>],
    block_pairs: In<'_, i32>,
    shape: CacheShape,
) -> Result<()> {
    const K: &str = "spindle_copy_blocks";
    let layers = k_caches.len();
    expect_len(K, "v_caches", v_caches.len(), layers)?;
    for (i, c) in k_caches.iter().enumerate() {
        expect_len(K, &format!("k_caches[{i}]"), c.len(), shape.elems())?;
    }
    for (i, c) in v_caches.iter().enumerate() {
        expect_len(K, &format!("v_caches[{i}]"), c.len(), shape.elems())?;
    }
    if !block_pairs.len().is_multiple_of(2) {
        return Err(CudaError::shape(K, "block_pairs length is odd"));
    }
    let pairs = block_pairs.len() / 2;
    let be = shape.block_elems();
    if be == 0 || !be.is_multiple_of(8) {
        return Err(CudaError::shape(
            K,
            format!("block_elems {be} must be a positive multiple of 8"),
        ));
    }
    if layers == 0 || pairs == 0 {
        return Ok(());
    }
    bind(stream)?;
    let mut guards = Vec::with_capacity(2 * layers);
    let mut kp = Vec::with_capacity(layers);
    let mut vp = Vec::with_capacity(layers);
    for c in k_caches.iter_mut() {
        let (p, g) = c.device_ptr_mut(stream);
        kp.push(p);
        guards.push(g);
    }
    for c in v_caches.iter_mut() {
        let (p, g) = c.device_ptr_mut(stream);
        vp.push(p);
        guards.push(g);
    }
    for (i, &p) in kp.iter().chain(&vp).enumerate() {
        let what = if i < layers { "k_caches" } else { "v_caches" };
        check_align(K, what, p as usize as *const u8, VEC_ALIGN)?;
    }
    let kd = stream.clone_htod(&kp)?;
    let vd = stream.clone_htod(&vp)?;
    let (kdp, _g0) = rd!(kd, stream, *mut ffi::sp_bf16);
    let (vdp, _g1) = rd!(vd, stream, *mut ffi::sp_bf16);
    let (bp, _g2) = rd!(block_pairs, stream, i32);
    // SAFETY: the pointer tables hold live cache buffers of `shape.elems()` elements each
    // (checked above); the kernel skips block ids outside [0, num_blocks); guards held.
    let code = unsafe {
        ffi::spindle_copy_blocks(
            kdp,
            vdp,
            bp,
            i32_of(K, "num_layers", layers)?,
            i32_of(K, "num_pairs", pairs)?,
            i32_of(K, "num_blocks", shape.num_blocks)?,
            be as i64,
            cu(stream),
        )
    };
    drop(guards);
    CudaError::check(K, code)
}

fn check_rows(kernel: &'static str, what: &str, len: usize, rows: usize, n: usize) -> Result<()> {
    expect_len(kernel, what, len, rows * n)
}

/// `out = rmsnorm(x) * w` over rows of length `n = w.len()` (HF order: the normalised value
/// is rounded to bf16 before the weight multiply). Also q/k norm with n = head_dim.
pub fn rmsnorm(
    stream: &Arc<CudaStream>,
    out: Out<'_, bf16>, // [rows, n]
    x: In<'_, bf16>,    // [rows, n]
    w: In<'_, bf16>,    // [n]
    eps: f32,
) -> Result<()> {
    const K: &str = "spindle_rmsnorm";
    let n = w.len();
    if n == 0 {
        return Err(CudaError::shape(K, "empty weight"));
    }
    let rows = x.len() / n;
    check_rows(K, "x", x.len(), rows, n)?;
    check_rows(K, "out", out.len(), rows, n)?;
    bind(stream)?;
    let (xp, _g0) = rd!(x, stream, ffi::sp_bf16);
    let (wp, _g1) = rd!(w, stream, ffi::sp_bf16);
    let (op, _g2) = wr!(out, stream, ffi::sp_bf16);
    // SAFETY: x/out hold rows * n elements and w n (checked); guards held.
    let code = unsafe {
        ffi::spindle_rmsnorm(
            op,
            xp,
            wp,
            i32_of(K, "rows", rows)?,
            i32_of(K, "n", n)?,
            eps,
            cu(stream),
        )
    };
    CudaError::check(K, code)
}

/// In-place RMSNorm (`x = rmsnorm(x) * w`), e.g. q/k norm on a `[tokens, heads, head_dim]`
/// buffer with `w.len() == head_dim`.
pub fn rmsnorm_inplace(
    stream: &Arc<CudaStream>,
    x: Out<'_, bf16>,
    w: In<'_, bf16>,
    eps: f32,
) -> Result<()> {
    const K: &str = "spindle_rmsnorm";
    let n = w.len();
    if n == 0 {
        return Err(CudaError::shape(K, "empty weight"));
    }
    let rows = x.len() / n;
    check_rows(K, "x", x.len(), rows, n)?;
    bind(stream)?;
    let (wp, _g1) = rd!(w, stream, ffi::sp_bf16);
    let (xp, _g0) = wr!(x, stream, ffi::sp_bf16);
    // SAFETY: x holds rows * n elements, w n (checked); the kernel supports out == x.
    let code = unsafe {
        ffi::spindle_rmsnorm(
            xp,
            xp,
            wp,
            i32_of(K, "rows", rows)?,
            i32_of(K, "n", n)?,
            eps,
            cu(stream),
        )
    };
    CudaError::check(K, code)
}

/// `x = bf16(x + residual); out = rmsnorm(x) * w` (x becomes the new residual stream).
pub fn fused_add_rmsnorm(
    stream: &Arc<CudaStream>,
    out: Out<'_, bf16>,     // [rows, n]
    x: Out<'_, bf16>,       // [rows, n] in/out
    residual: In<'_, bf16>, // [rows, n]
    w: In<'_, bf16>,        // [n]
    eps: f32,
) -> Result<()> {
    const K: &str = "spindle_fused_add_rmsnorm";
    let n = w.len();
    if n == 0 {
        return Err(CudaError::shape(K, "empty weight"));
    }
    let rows = x.len() / n;
    check_rows(K, "x", x.len(), rows, n)?;
    check_rows(K, "residual", residual.len(), rows, n)?;
    check_rows(K, "out", out.len(), rows, n)?;
    bind(stream)?;
    let (rp, _g0) = rd!(residual, stream, ffi::sp_bf16);
    let (wp, _g1) = rd!(w, stream, ffi::sp_bf16);
    let (xp, _g2) = wr!(x, stream, ffi::sp_bf16);
    let (op, _g3) = wr!(out, stream, ffi::sp_bf16);
    // SAFETY: all buffers hold rows * n (w: n) elements (checked); guards held.
    let code = unsafe {
        ffi::spindle_fused_add_rmsnorm(
            op,
            xp,
            rp,
            wp,
            i32_of(K, "rows", rows)?,
            i32_of(K, "n", n)?,
            eps,
            cu(stream),
        )
    };
    CudaError::check(K, code)
}

/// NeoX/HF half-split rotary embedding in place on q and k (f32 angles,
/// `inv_freq[i] = 1 / theta^(2i / head_dim)`).
#[allow(clippy::too_many_arguments)]
pub fn rope_neox(
    stream: &Arc<CudaStream>,
    q: Out<'_, bf16>,       // [num_tokens, num_q_heads, head_dim]
    k: Out<'_, bf16>,       // [num_tokens, num_kv_heads, head_dim]
    positions: In<'_, i32>, // [num_tokens]
    num_q_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    theta: f32,
) -> Result<()> {
    const K: &str = "spindle_rope_neox";
    let t = positions.len();
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(CudaError::shape(
            K,
            format!("head_dim {head_dim} must be even and positive"),
        ));
    }
    expect_len(K, "q", q.len(), t * num_q_heads * head_dim)?;
    expect_len(K, "k", k.len(), t * num_kv_heads * head_dim)?;
    i32_of(K, "q elements", q.len())?;
    bind(stream)?;
    let (pp, _g0) = rd!(positions, stream, i32);
    let (qp, _g1) = wr!(q, stream, ffi::sp_bf16);
    let (kp, _g2) = wr!(k, stream, ffi::sp_bf16);
    // SAFETY: q/k lengths checked against num_tokens x heads x head_dim; guards held.
    let code = unsafe {
        ffi::spindle_rope_neox(
            qp,
            kp,
            pp,
            i32_of(K, "num_tokens", t)?,
            i32_of(K, "num_q_heads", num_q_heads)?,
            i32_of(K, "num_kv_heads", num_kv_heads)?,
            i32_of(K, "head_dim", head_dim)?,
            theta,
            cu(stream),
        )
    };
    CudaError::check(K, code)
}

/// Shape of [`qkv_prep`]: heads and the RMSNorm / RoPE constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QkvShape {
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub theta: f32,
}

/// Where [`qkv_prep`] puts the keys and values.
pub enum KvDest<'a> {
    /// `[tokens, hk * d]` buffers each.
    Buffers { k: Out<'a, bf16>, v: Out<'a, bf16> },
    /// Each token's slot of the paged caches (`slots[t]` outside the pool skips token t):
    /// the K/V write fused in, bit-identical to [`kv_write`] after the split.
    Cache {
        k_cache: Out<'a, bf16>, // [num_blocks, block_size, hk, d]
        v_cache: Out<'a, bf16>, // [num_blocks, block_size, hk, d]
        slots: In<'a, i32>,     // [tokens]
        shape: CacheShape,
    },
}

/// The fused step's q/k/v epilogue (one launch): splits the `[tokens, (hq + 2 hk) * d]`
/// output of the concatenated q/k/v GEMM into `q` and the keys and values (`kv`), adding
/// `bias`, applying the per-head `norms` (q_norm, k_norm) and NeoX RoPE at `positions` to
/// q and k; the same numbers as [`bias_add`], [`rmsnorm_inplace`] and [`rope_neox`] in
/// sequence (and [`kv_write`] for [`KvDest::Cache`]).
#[allow(clippy::too_many_arguments)]
pub fn qkv_prep(
    stream: &Arc<CudaStream>,
    q: Out<'_, bf16>, // [tokens, hq * d]
    kv: KvDest<'_>,
    qkv: In<'_, bf16>,                           // [tokens, (hq + 2 hk) * d]
    bias: Option<In<'_, bf16>>,                  // [(hq + 2 hk) * d]
    norms: Option<(In<'_, bf16>, In<'_, bf16>)>, // [d] each
    positions: In<'_, i32>,                      // [tokens]
    shape: QkvShape,
) -> Result<()> {
    const K: &str = "spindle_qkv_prep";
    let (hq, hk, d) = (shape.num_q_heads, shape.num_kv_heads, shape.head_dim);
    if hq == 0 || hk == 0 || d == 0 || d > 256 || !d.is_multiple_of(2) {
        return Err(CudaError::shape(
            K,
            format!("{hq} q heads, {hk} kv heads of {d} (head_dim even, at most 256)"),
        ));
    }
    let t = positions.len();
    let width = (hq + 2 * hk) * d;
    expect_len(K, "qkv", qkv.len(), t * width)?;
    expect_len(K, "q", q.len(), t * hq * d)?;
    match &kv {
        KvDest::Buffers { k, v } => {
            expect_len(K, "k", k.len(), t * hk * d)?;
            expect_len(K, "v", v.len(), t * hk * d)?;
        }
        KvDest::Cache {
            k_cache,
            v_cache,
            slots,
            shape: cs,
        } => {
            if cs.num_kv_heads != hk || cs.head_dim != d || cs.block_size == 0 {
                return Err(CudaError::shape(
                    K,
                    format!(
                        "cache of {} kv heads of {} for {hk} of {d}",
                        cs.num_kv_heads, cs.head_dim
                    ),
                ));
            }
            expect_len(K, "k_cache", k_cache.len(), cs.elems())?;
            expect_len(K, "v_cache", v_cache.len(), cs.elems())?;
            expect_len(K, "slots", slots.len(), t)?;
            i32_of(K, "num_blocks * block_size", cs.num_blocks * cs.block_size)?;
        }
    }
    i32_of(K, "qkv elements", qkv.len())?;
    if let Some(b) = bias {
        expect_len(K, "bias", b.len(), width)?;
    }
    if let Some((qn, kn)) = norms {
        expect_len(K, "q_norm", qn.len(), d)?;
        expect_len(K, "k_norm", kn.len(), d)?;
    }
    bind(stream)?;
    let (xp, _g0) = rd!(qkv, stream, ffi::sp_bf16);
    let (pp, _g1) = rd!(positions, stream, i32);
    let (bp, _g2) = match bias {
        Some(b) => {
            let (p, g) = rd!(b, stream, ffi::sp_bf16);
            (p, Some(g))
        }
        None => (std::ptr::null(), None),
    };
    let (qnp, knp, _g3, _g4) = match norms {
        Some((qn, kn)) => {
            let (a, ga) = rd!(qn, stream, ffi::sp_bf16);
            let (b, gb) = rd!(kn, stream, ffi::sp_bf16);
            (a, b, Some(ga), Some(gb))
        }
        None => (std::ptr::null(), std::ptr::null(), None, None),
    };
    let (qp, _g5) = wr!(q, stream, ffi::sp_bf16);
    let (nt, nq, nk, hd) = (
        i32_of(K, "num_tokens", t)?,
        i32_of(K, "num_q_heads", hq)?,
        i32_of(K, "num_kv_heads", hk)?,
        i32_of(K, "head_dim", d)?,
    );
    let code = match kv {
        KvDest::Buffers { k, v } => {
            let (kp, _g6) = wr!(k, stream, ffi::sp_bf16);
            let (vp, _g7) = wr!(v, stream, ffi::sp_bf16);
            // SAFETY: every length checked against tokens x heads x head_dim above; bias
            // and norms are null or checked; guards held until the call returns.
            unsafe {
                ffi::spindle_qkv_prep(
                    qp,
                    kp,
                    vp,
                    xp,
                    bp,
                    qnp,
                    knp,
                    pp,
                    nt,
                    nq,
                    nk,
                    hd,
                    shape.eps,
                    shape.theta,
                    cu(stream),
                )
            }
        }
        KvDest::Cache {
            k_cache,
            v_cache,
            slots,
            shape: cs,
        } => {
            let (kc, _g6) = wr!(k_cache, stream, ffi::sp_bf16);
            let (vc, _g7) = wr!(v_cache, stream, ffi::sp_bf16);
            let (sp, _g8) = rd!(slots, stream, i32);
            // SAFETY: as above; the caches hold num_blocks x block_size slots of hk x d
            // (checked) and the kernel skips slots outside them; guards held.
            unsafe {
                ffi::spindle_qkv_prep_cache(
                    qp,
                    kc,
                    vc,
                    sp,
                    i32_of(K, "num_blocks", cs.num_blocks)?,
                    i32_of(K, "block_size", cs.block_size)?,
                    xp,
                    bp,
                    qnp,
                    knp,
                    pp,
                    nt,
                    nq,
                    nk,
                    hd,
                    shape.eps,
                    shape.theta,
                    cu(stream),
                )
            }
        }
    };
    CudaError::check(K, code)
}

/// `out[r, c] = silu(gate_up[r, c]) * gate_up[r, n + c]` for a merged `[rows, 2n]`
/// gate/up projection output.
pub fn silu_mul(
    stream: &Arc<CudaStream>,
    out: Out<'_, bf16>,
    gate_up: In<'_, bf16>,
    n: usize,
) -> Result<()> {
    const K: &str = "spindle_silu_mul";
    if n == 0 {
        return Err(CudaError::shape(K, "n is 0"));
    }
    let rows = out.len() / n;
    check_rows(K, "out", out.len(), rows, n)?;
    check_rows(K, "gate_up", gate_up.len(), rows, 2 * n)?;
    i32_of(K, "gate_up elements", gate_up.len())?;
    bind(stream)?;
    let (gp, _g0) = rd!(gate_up, stream, ffi::sp_bf16);
    let (op, _g1) = wr!(out, stream, ffi::sp_bf16);
    // SAFETY: gate_up holds rows * 2n elements, out rows * n (checked); up = gate + n stays
    // inside each row; guards held.
    let code = unsafe {
        ffi::spindle_silu_mul(
            op,
            gp,
            gp.add(n),
            rows as i32,
            n as i32,
            2 * n as i32,
            cu(stream),
        )
    };
    CudaError::check(K, code)
}

/// `out[r, c] = silu(gate[r, c]) * up[r, c]` for separate `[rows, n]` buffers.
pub fn silu_mul_split(
    stream: &Arc<CudaStream>,
    out: Out<'_, bf16>,
    gate: In<'_, bf16>,
    up: In<'_, bf16>,
    n: usize,
) -> Result<()> {
    const K: &str = "spindle_silu_mul";
    if n == 0 {
        return Err(CudaError::shape(K, "n is 0"));
    }
    let rows = out.len() / n;
    check_rows(K, "out", out.len(), rows, n)?;
    check_rows(K, "gate", gate.len(), rows, n)?;
    check_rows(K, "up", up.len(), rows, n)?;
    i32_of(K, "elements", out.len())?;
    bind(stream)?;
    let (gp, _g0) = rd!(gate, stream, ffi::sp_bf16);
    let (up_, _g1) = rd!(up, stream, ffi::sp_bf16);
    let (op, _g2) = wr!(out, stream, ffi::sp_bf16);
    // SAFETY: all three hold rows * n elements (checked); guards held.
    let code =
        unsafe { ffi::spindle_silu_mul(op, gp, up_, rows as i32, n as i32, n as i32, cu(stream)) };
    CudaError::check(K, code)
}

/// Output element types of [`embedding`].
pub trait EmbedOut: cudarc::driver::DeviceRepr {
    #[doc(hidden)]
    const F32: bool;
}
impl EmbedOut for bf16 {
    const F32: bool = false;
}
impl EmbedOut for f32 {
    const F32: bool = true;
}

/// `out[t] = table[ids[t]]` (bf16 table; out bf16 or f32); ids outside the vocabulary give
/// zero rows.
pub fn embedding<T: EmbedOut>(
    stream: &Arc<CudaStream>,
    out: Out<'_, T>,     // [num_tokens, hidden]
    table: In<'_, bf16>, // [vocab, hidden]
    ids: In<'_, i32>,    // [num_tokens]
    hidden: usize,
) -> Result<()> {
    const K: &str = "spindle_embedding";
    if hidden == 0 || !table.len().is_multiple_of(hidden) {
        return Err(CudaError::shape(
            K,
            format!(
                "table length {} not a multiple of hidden {hidden}",
                table.len()
            ),
        ));
    }
    let vocab = table.len() / hidden;
    let t = ids.len();
    expect_len(K, "out", out.len(), t * hidden)?;
    bind(stream)?;
    let (tp, _g0) = rd!(table, stream, ffi::sp_bf16);
    let (ip, _g1) = rd!(ids, stream, i32);
    let (t32, h32, v32) = (
        i32_of(K, "num_tokens", t)?,
        i32_of(K, "hidden", hidden)?,
        i32_of(K, "vocab", vocab)?,
    );
    // SAFETY: out holds num_tokens * hidden elements of T (checked), table vocab * hidden;
    // the kernel range-checks ids; guards held.
    let code = if T::F32 {
        let (op, _g2) = wr!(out, stream, f32);
        unsafe { ffi::spindle_embedding_f32(op, tp, ip, t32, h32, v32, cu(stream)) }
    } else {
        let (op, _g2) = wr!(out, stream, ffi::sp_bf16);
        unsafe { ffi::spindle_embedding_bf16(op, tp, ip, t32, h32, v32, cu(stream)) }
    };
    CudaError::check(K, code)
}

/// `x[r, :] += bias` in place.
pub fn bias_add(stream: &Arc<CudaStream>, x: Out<'_, bf16>, bias: In<'_, bf16>) -> Result<()> {
    const K: &str = "spindle_bias_add";
    let n = bias.len();
    if n == 0 {
        return Err(CudaError::shape(K, "empty bias"));
    }
    let rows = x.len() / n;
    check_rows(K, "x", x.len(), rows, n)?;
    i32_of(K, "elements", x.len())?;
    bind(stream)?;
    let (bp, _g0) = rd!(bias, stream, ffi::sp_bf16);
    let (xp, _g1) = wr!(x, stream, ffi::sp_bf16);
    // SAFETY: x holds rows * n elements, bias n (checked); guards held.
    let code = unsafe { ffi::spindle_bias_add(xp, bp, rows as i32, n as i32, cu(stream)) };
    CudaError::check(K, code)
}

/// Greedy decoding: `out[r] = argmax(logits[r, :])`, lowest index on ties.
pub fn argmax(stream: &Arc<CudaStream>, out: Out<'_, i32>, logits: In<'_, f32>) -> Result<()> {
    const K: &str = "spindle_argmax";
    let rows = out.len();
    if rows == 0 {
        return Ok(());
    }
    if !logits.len().is_multiple_of(rows) || logits.len() == 0 {
        return Err(CudaError::shape(
            K,
            format!("logits length {} not rows ({rows}) x vocab", logits.len()),
        ));
    }
    let vocab = logits.len() / rows;
    bind(stream)?;
    let (lp, _g0) = rd!(logits, stream, f32);
    let (op, _g1) = wr!(out, stream, i32);
    // SAFETY: logits holds rows * vocab, out rows (checked); guards held.
    let code = unsafe {
        ffi::spindle_argmax(
            op,
            lp,
            i32_of(K, "rows", rows)?,
            i32_of(K, "vocab", vocab)?,
            cu(stream),
        )
    };
    CudaError::check(K, code)
}

/// Per-row sampling parameters for [`sample`], each `[rows]`.
pub struct SampleParams<'a> {
    /// <= 0 means greedy.
    pub temperature: In<'a, f32>,
    /// <= 0 or >= vocab means no top-k.
    pub top_k: In<'a, i32>,
    /// Outside (0, 1) means no top-p.
    pub top_p: In<'a, f32>,
    /// Host-drawn uniforms in [0, 1).
    pub uniform: In<'a, f32>,
}

/// Temperature / top-k / top-p sampling with host-supplied uniforms (semantics in
/// `kernels/spindle_kernels.h`, `spindle_sample`).
pub fn sample(
    stream: &Arc<CudaStream>,
    out: Out<'_, i32>,
    logits: In<'_, f32>,
    p: &SampleParams<'_>,
) -> Result<()> {
    const K: &str = "spindle_sample";
    let rows = out.len();
    for (what, len) in [
        ("temperature", p.temperature.len()),
        ("top_k", p.top_k.len()),
        ("top_p", p.top_p.len()),
        ("uniform", p.uniform.len()),
    ] {
        expect_len(K, what, len, rows)?;
    }
    if rows == 0 {
        return Ok(());
    }
    if !logits.len().is_multiple_of(rows) || logits.len() == 0 {
        return Err(CudaError::shape(
            K,
            format!("logits length {} not rows ({rows}) x vocab", logits.len()),
        ));
    }
    let vocab = logits.len() / rows;
    bind(stream)?;
    let (lp, _g0) = rd!(logits, stream, f32);
    let (tp, _g1) = rd!(p.temperature, stream, f32);
    let (kp, _g2) = rd!(p.top_k, stream, i32);
    let (pp, _g3) = rd!(p.top_p, stream, f32);
    let (up, _g4) = rd!(p.uniform, stream, f32);
    let (op, _g5) = wr!(out, stream, i32);
    // SAFETY: logits holds rows * vocab, every per-row buffer rows (checked); guards held.
    let code = unsafe {
        ffi::spindle_sample(
            op,
            lp,
            tp,
            kp,
            pp,
            up,
            i32_of(K, "rows", rows)?,
            i32_of(K, "vocab", vocab)?,
            cu(stream),
        )
    };
    CudaError::check(K, code)
}
