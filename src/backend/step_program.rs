//! The fused step as a host-side list of operations ([`StepProgram`]): what the CUDA
//! backend launches for one step, built without a device so that its launch, allocation,
//! memset and copy counts can be checked on any machine (`tests/step_counters.rs`).
//!
//! The CUDA executor (`backend/cuda/backend.rs`, `CudaBackend::forward`) walks the same
//! list, one arm per [`Op`], and counts what it really does in [`StepCounters`]; on a GPU
//! `tests/gpu_engine.rs` checks the two agree. [`ArenaLayout`] is the activation memory the
//! program runs in, sized once at load for the largest step.

use model_loader::ModelConfig;

/// What one step does to the device, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounters {
    /// Kernel launches, cuBLAS GEMMs included (one call, one launch).
    pub launches: u64,
    /// Device allocations.
    pub allocations: u64,
    /// Device memsets (zero fills).
    pub memsets: u64,
    /// Host-to-device copies.
    pub h2d_copies: u64,
    /// Device-to-host copies.
    pub d2h_copies: u64,
    /// CUDA graph launches (a captured decode step replayed: its kernels are not counted
    /// in `launches`).
    pub graph_launches: u64,
}

impl StepCounters {
    /// `self - before`, field by field (counters only grow).
    pub fn since(&self, before: &StepCounters) -> StepCounters {
        StepCounters {
            launches: self.launches - before.launches,
            allocations: self.allocations - before.allocations,
            memsets: self.memsets - before.memsets,
            h2d_copies: self.h2d_copies - before.h2d_copies,
            d2h_copies: self.d2h_copies - before.d2h_copies,
            graph_launches: self.graph_launches - before.graph_launches,
        }
    }
}

/// A GEMM of the fused step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemm {
    /// `[rows, q + 2 kv]` from the concatenated q/k/v weights.
    Qkv,
    /// `[rows, hidden]` attention output projection.
    O,
    /// `[rows, 2 inter]` from the concatenated gate/up weights.
    GateUp,
    /// `[rows, hidden]`.
    Down,
    /// `[logit_rows, vocab]` f32 logits of the gathered rows.
    LmHead,
}

/// One operation of the fused step, in launch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The step's inputs (tokens, positions, slots, logit rows, block copies and the
    /// attention plan's arrays) in one copy from the pinned staging buffer.
    UploadInputs,
    /// Copy-on-write block copies, every layer in one launch (only when the step has some).
    CopyBlocks,
    /// `x = embed[tokens]`.
    Embed,
    /// `h = rmsnorm(x)` with layer 0's input norm.
    Norm { layer: usize },
    /// `x += delta; h = rmsnorm(x)` (the residual add fused into the next norm): layer
    /// `layer`'s input or post-attention norm, or the final norm for `layer == num_layers`.
    AddNorm { layer: usize, post_attention: bool },
    /// A GEMM of `layer`.
    Gemm { layer: usize, gemm: Gemm },
    /// The o_proj bias (models with `o_bias`), a launch of its own.
    OBias { layer: usize },
    /// Split the q/k/v GEMM's output with bias, q/k head norm and RoPE into q, writing k
    /// and v straight into `layer`'s cache slots (the K/V write fused in): one launch.
    QkvPrep { layer: usize },
    /// Attention of `layer` (`launches`: 2 for split-KV decode, which merges partials).
    Attention { layer: usize, launches: u64 },
    /// `act = silu(gate) * up` over the merged gate/up output.
    SiluMul { layer: usize },
    /// Gather the rows whose logits are wanted.
    GatherLogitRows,
    /// Greedy token of every logit row on the device (lowest index on ties, as the CPU
    /// sampler's `argmax`).
    Argmax,
    /// Token of every logit row on the device with its own temperature, top-k, top-p and
    /// uniform (greedy rows take the argmax): `kernels/sampling.cu`.
    Sample,
    /// Replay the step's captured CUDA graph (every op from `Embed` to the token choice).
    GraphLaunch,
    /// Copy the logits of the logit rows back to the host.
    Download,
    /// Copy the chosen token ids back to the host.
    DownloadTokens,
}

impl Op {
    /// The layer an op belongs to (`None` for the step's head and tail).
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Op::Norm { layer }
            | Op::Gemm { layer, .. }
            | Op::QkvPrep { layer }
            | Op::OBias { layer }
            | Op::Attention { layer, .. }
            | Op::SiluMul { layer } => Some(layer),
            Op::AddNorm { layer, .. } => Some(layer),
            _ => None,
        }
    }

    /// Its NVTX range name (the kernel family).
    pub fn name(&self) -> &'static str {
        match *self {
            Op::UploadInputs => "upload_inputs",
            Op::CopyBlocks => "copy_blocks",
            Op::Embed => "embed",
            Op::Norm { .. } | Op::AddNorm { .. } => "rmsnorm",
            Op::Gemm { gemm, .. } => match gemm {
                Gemm::Qkv => "gemm.qkv",
                Gemm::O => "gemm.o",
                Gemm::GateUp => "gemm.gate_up",
                Gemm::Down => "gemm.down",
                Gemm::LmHead => "gemm.lm_head",
            },
            Op::OBias { .. } => "bias_add",
            Op::QkvPrep { .. } => "qkv_prep",
            Op::Attention { .. } => "attention",
            Op::SiluMul { .. } => "silu_mul",
            Op::GatherLogitRows => "gather_logit_rows",
            Op::Argmax => "argmax",
            Op::Sample => "sample",
            Op::GraphLaunch => "graph",
            Op::Download | Op::DownloadTokens => "download",
        }
    }

    /// What the op costs on the device.
    pub fn counters(&self) -> StepCounters {
        let mut c = StepCounters::default();
        match *self {
            Op::UploadInputs => c.h2d_copies = 1,
            Op::Download | Op::DownloadTokens => c.d2h_copies = 1,
            Op::Attention { launches, .. } => c.launches = launches,
            Op::GraphLaunch => c.graph_launches = 1,
            _ => c.launches = 1,
        }
        c
    }
}

/// The shape of one step, as far as the program depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Rows (tokens) of the step.
    pub rows: usize,
    /// Rows whose output is wanted.
    pub logit_rows: usize,
    /// Whether the step has copy-on-write block copies.
    pub copies: bool,
    /// Launches of one layer's attention (1, or 2 for split-KV decode).
    pub attention_launches: u64,
    /// How tokens are chosen on the device (their ids come back when some are).
    pub tokens: TokenOp,
    /// Whether the logit rows' logits come back to the host.
    pub logits_back: bool,
    /// Whether the step replays a captured CUDA graph (a pure-decode step padded to its
    /// bucket; see `backend::graph_layout`).
    pub graph: bool,
}

/// How a step chooses tokens on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOp {
    /// None: the host chooses from the logits.
    None,
    /// Every row greedy ([`Op::Argmax`]).
    Argmax,
    /// Per-row sampling ([`Op::Sample`]; greedy rows too).
    Sample,
}

/// The fused step's operations, in launch order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepProgram {
    /// Every op of the step.
    pub ops: Vec<Op>,
    /// Layers of the model.
    pub num_layers: usize,
}

impl StepProgram {
    /// The program of a step of `shape` on a model of `cfg`'s shape.
    pub fn build(cfg: &ModelConfig, shape: &StepShape) -> Self {
        let mut p = Self {
            ops: Vec::new(),
            num_layers: cfg.num_layers,
        };
        p.build_into(cfg, shape);
        p
    }

    /// What a CUDA graph of a step of `shape` captures: the program without its copies
    /// (the inputs are uploaded before the replay, the tokens and logits copied back
    /// after it).
    pub fn graph_body(cfg: &ModelConfig, shape: &StepShape) -> Self {
        let mut p = Self::default();
        p.graph_body_into(cfg, shape);
        p
    }

    /// [`StepProgram::graph_body`] into `self`, reusing its op list.
    pub fn graph_body_into(&mut self, cfg: &ModelConfig, shape: &StepShape) {
        self.build_into(
            cfg,
            &StepShape {
                graph: false,
                ..*shape
            },
        );
        self.ops.retain(|op| {
            !matches!(
                op,
                Op::UploadInputs | Op::CopyBlocks | Op::Download | Op::DownloadTokens
            )
        });
    }

    /// [`StepProgram::build`] into `self`, reusing its op list (no allocation once it has
    /// held the longest program).
    pub fn build_into(&mut self, cfg: &ModelConfig, shape: &StepShape) {
        let n = cfg.num_layers;
        self.num_layers = n;
        let ops = &mut self.ops;
        ops.clear();
        ops.push(Op::UploadInputs);
        if shape.rows == 0 {
            return;
        }
        if shape.graph {
            ops.push(Op::GraphLaunch);
            if shape.logit_rows > 0 {
                if shape.tokens != TokenOp::None {
                    ops.push(Op::DownloadTokens);
                }
                if shape.logits_back || shape.tokens == TokenOp::None {
                    ops.push(Op::Download);
                }
            }
            return;
        }
        if shape.copies {
            ops.push(Op::CopyBlocks);
        }
        ops.push(Op::Embed);
        for layer in 0..n {
            ops.push(if layer == 0 {
                Op::Norm { layer }
            } else {
                // x += the previous layer's down projection; h = input_norm(x).
                Op::AddNorm {
                    layer,
                    post_attention: false,
                }
            });
            ops.extend([
                Op::Gemm {
                    layer,
                    gemm: Gemm::Qkv,
                },
                Op::QkvPrep { layer },
                Op::Attention {
                    layer,
                    launches: shape.attention_launches,
                },
                Op::Gemm {
                    layer,
                    gemm: Gemm::O,
                },
            ]);
            if cfg.o_bias() {
                ops.push(Op::OBias { layer });
            }
            ops.extend([
                Op::AddNorm {
                    layer,
                    post_attention: true,
                },
                Op::Gemm {
                    layer,
                    gemm: Gemm::GateUp,
                },
                Op::SiluMul { layer },
                Op::Gemm {
                    layer,
                    gemm: Gemm::Down,
                },
            ]);
        }
        if shape.logit_rows > 0 {
            // x += the last down projection; h = final_norm(x).
            ops.push(Op::AddNorm {
                layer: n,
                post_attention: false,
            });
            ops.push(Op::GatherLogitRows);
            ops.push(Op::Gemm {
                layer: n,
                gemm: Gemm::LmHead,
            });
            match shape.tokens {
                TokenOp::None => {}
                TokenOp::Argmax => ops.extend([Op::Argmax, Op::DownloadTokens]),
                TokenOp::Sample => ops.extend([Op::Sample, Op::DownloadTokens]),
            }
            if shape.logits_back || shape.tokens == TokenOp::None {
                ops.push(Op::Download);
            }
        }
    }

    /// What the whole step costs.
    pub fn counters(&self) -> StepCounters {
        self.ops.iter().fold(StepCounters::default(), |mut a, op| {
            let c = op.counters();
            a.launches += c.launches;
            a.allocations += c.allocations;
            a.memsets += c.memsets;
            a.h2d_copies += c.h2d_copies;
            a.d2h_copies += c.d2h_copies;
            a.graph_launches += c.graph_launches;
            a
        })
    }

    /// Launches of each decoder layer (`[num_layers]`).
    pub fn launches_per_layer(&self) -> Vec<u64> {
        let mut v = vec![0; self.num_layers];
        for op in &self.ops {
            if let Some(l) = op.layer().filter(|&l| l < self.num_layers) {
                v[l] += op.counters().launches;
            }
        }
        v
    }
}

/// The activation buffers the fused step runs in, for steps of up to `rows` rows and
/// `logit_rows` logit rows: element counts, bf16 unless noted. Allocated once at load; a step with
/// more rows grows them (counted as allocations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaLayout {
    /// Rows the arena holds.
    pub rows: usize,
    /// Logit rows the arena holds.
    pub logit_rows: usize,
    /// `[rows, hidden]`: the residual stream `x`, the normed `h`, the residual's delta
    /// (o_proj / down_proj output) and the gathered logit rows: four of these.
    pub hidden: usize,
    /// `[rows, q + 2 kv]` fused projection output.
    pub qkv: usize,
    /// `[rows, q]` rotated queries, and again the attention output (keys and values go
    /// straight to the cache).
    pub q: usize,
    /// `[rows, 2 inter]` merged gate/up output.
    pub gate_up: usize,
    /// `[rows, inter]` silu(gate) * up.
    pub act: usize,
    /// `[logit_rows, vocab]` f32 logits.
    pub logits_f32: usize,
}

impl ArenaLayout {
    /// The buffers for steps of up to `rows` rows and `logit_rows` logit rows (at least one
    /// element each).
    pub fn new(cfg: &ModelConfig, rows: usize, logit_rows: usize) -> Self {
        let n = |width: usize| (rows * width).max(1);
        Self {
            rows,
            logit_rows,
            hidden: n(cfg.hidden_size),
            qkv: n(cfg.q_dim() + 2 * cfg.kv_dim()),
            q: n(cfg.q_dim()),
            gate_up: n(2 * cfg.intermediate_size),
            act: n(cfg.intermediate_size),
            logits_f32: (logit_rows * cfg.vocab_size).max(1),
        }
    }

    /// Bytes of device memory the buffers take.
    pub fn bytes(&self) -> usize {
        2 * (4 * self.hidden + self.qkv + 2 * self.q + self.gate_up + self.act)
            + 4 * self.logits_f32
    }
}

/// Where each input of a step sits in the packed `i32` staging buffer (one host-to-device
/// copy per step; see [`pack_step`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackLayout {
    /// `[rows]` token ids.
    pub tokens: std::ops::Range<usize>,
    /// `[rows]` positions.
    pub positions: std::ops::Range<usize>,
    /// `[rows]` cache slots.
    pub slots: std::ops::Range<usize>,
    /// `[logit_rows]` rows whose logits are wanted.
    pub logit_rows: std::ops::Range<usize>,
    /// `[4, logit_rows]` per-row sampling: temperature, top_k, top_p, uniform (f32 as
    /// bits but top_k); empty when tokens are not chosen on the device.
    pub sampling: std::ops::Range<usize>,
    /// `[2 * copies]` (src, dst) block pairs of the copy-on-write copies.
    pub copies: std::ops::Range<usize>,
    /// The attention plan's arrays ([`AttentionArrays`], concatenated): each array's place
    /// is its [`AttentionRanges`] range shifted by `attention.start`.
    pub attention: std::ops::Range<usize>,
    /// Elements used.
    pub len: usize,
}

/// Staging elements (`i32`) for steps of up to `rows` rows, the capacity the CUDA backend
/// allocates at load (pinned host buffer and its device twin): tokens, positions, slots and
/// logit rows, 256 block copies, and the attention plan's arrays ([`ATTENTION_RESERVE`] plus
/// [`ATTENTION_RESERVE_PER_ROW`] a row). A step that needs more (kernel v1's per-row chunk
/// lists of long views, a v2 plan of many chunks or partials) grows it to twice its need:
/// two counted allocations, once, after which steps of that size allocate nothing.
pub fn stage_capacity(rows: usize) -> usize {
    4 * rows + 2 * 256 + ATTENTION_RESERVE_PER_ROW * rows + ATTENTION_RESERVE
}

/// Staging elements reserved per row for the attention plan's arrays: its row_limit and
/// row_part_ptr entries, its partials (unit_rows, partial_direct, row_parts, 3 each) and a
/// share of the units (`UNIT_WIDTH` each).
pub const ATTENTION_RESERVE_PER_ROW: usize = 64;
/// Staging elements reserved for the attention arrays whatever the rows: the plan's chunks
/// (block, start, len: 3 each), e.g. a 4k-token prefix in 16-token blocks takes 768.
pub const ATTENTION_RESERVE: usize = 16 * 1024;

/// Attention partials the CUDA backend's workspace holds at load by default
/// (`CudaOptions::max_step_partials`): a W = 64 decode step over a shared 4k prefix lowers to
/// about 2,100 on 132 SMs (`tests/step_counters.rs`). At `[partials, heads, head_dim]` f32
/// that is 32 MiB for 16 heads of 128, 64 MiB for 32.
pub const DEFAULT_MAX_STEP_PARTIALS: usize = 4096;

/// What [`pack_step`] packs beside the step itself.
#[derive(Debug, Clone, Copy)]
pub struct PackExtra<'a> {
    /// The attention arrays (already lowered).
    pub attention: &'a [i32],
    /// One pick per logit row when tokens are chosen on the device (empty: none).
    pub picks: &'a [super::RowPick],
    /// Rows after padding (a CUDA graph's bucket; the step's own rows when not padded).
    /// A padded step must want the logits of every row, in order.
    pub pad_rows: usize,
}

impl<'a> PackExtra<'a> {
    /// Only the attention arrays: no device sampling, no padding.
    pub fn attention(attention: &'a [i32]) -> Self {
        Self {
            attention,
            picks: &[],
            pad_rows: 0,
        }
    }
}

/// Elements the packed inputs of `step` take with `extra`.
pub fn packed_len(step: &super::StepInput, extra: &PackExtra<'_>) -> usize {
    let pad = extra.pad_rows.saturating_sub(step.tokens.len());
    let logit_rows = step.logit_rows.len() + pad;
    let sampling = if extra.picks.is_empty() {
        0
    } else {
        4 * logit_rows
    };
    3 * (step.tokens.len() + pad)
        + logit_rows
        + sampling
        + 2 * step.copies.len()
        + extra.attention.len()
}

/// Packs `step`'s tokens, positions, slots, logit rows, the picks' sampling settings and
/// the block copies, then the attention arrays, into `out`. Padded rows (up to
/// `extra.pad_rows`) get token 0, position 0, slot -1 (nothing written), their own logit
/// row and greedy sampling. `Err` when a value does not fit an `i32`, a padded step does
/// not want every row's logits in order, or `out` is too small (size it with
/// [`packed_len`]).
pub fn pack_step(
    step: &super::StepInput,
    extra: &PackExtra<'_>,
    out: &mut [i32],
) -> crate::error::Result<PackLayout> {
    use super::RowPick;
    use crate::error::SpindleError;
    let rows = step.tokens.len();
    let pad = extra.pad_rows.saturating_sub(rows);
    if pad > 0 && !step.logit_rows.iter().copied().eq(0..rows as u32) {
        return Err(SpindleError::Backend(
            "a padded step must want the logits of every row, in row order".into(),
        ));
    }
    if !extra.picks.is_empty() && extra.picks.len() != step.logit_rows.len() {
        return Err(SpindleError::Backend(format!(
            "{} picks for {} logit rows",
            extra.picks.len(),
            step.logit_rows.len()
        )));
    }
    let need = packed_len(step, extra);
    if out.len() < need {
        return Err(SpindleError::Backend(format!(
            "step inputs need {need} staging elements, {} available",
            out.len()
        )));
    }
    let mut at = 0usize;
    let mut put = |what: &str, vals: &mut dyn Iterator<Item = u32>, fill: i32| {
        let start = at;
        for v in vals {
            out[at] = i32::try_from(v)
                .map_err(|_| SpindleError::Backend(format!("{what} {v} exceeds i32")))?;
            at += 1;
        }
        out[at..at + pad].fill(fill);
        at += pad;
        Ok::<_, SpindleError>(start..at)
    };
    let tokens = put("token", &mut step.tokens.iter().copied(), 0)?;
    let positions = put("position", &mut step.positions.iter().copied(), 0)?;
    let slots = put("slot", &mut step.slots.iter().copied(), -1)?;
    let logit_rows = {
        let r = put("logit row", &mut step.logit_rows.iter().copied(), 0)?;
        // Each padded row is its own logit row.
        for (i, x) in out[r.end - pad..r.end].iter_mut().enumerate() {
            *x = (rows + i) as i32;
        }
        r
    };
    let sampling = if extra.picks.is_empty() {
        at..at
    } else {
        // [4, logit rows]: temperature (f32 bits), top_k, top_p (f32 bits), uniform (f32
        // bits, below 1). A Logits row is greedy (its token is not used).
        let n = logit_rows.len();
        let start = at;
        for (i, pick) in extra.picks.iter().enumerate() {
            let s = match pick {
                RowPick::Sample(s) => *s,
                RowPick::Logits => super::RowSampling::GREEDY,
            };
            let greedy = s.is_greedy();
            out[start + i] = (if greedy { 0.0f32 } else { s.temperature }).to_bits() as i32;
            out[start + n + i] = if greedy {
                0
            } else {
                i32::try_from(s.top_k).unwrap_or(i32::MAX)
            };
            out[start + 2 * n + i] = s.top_p.to_bits() as i32;
            let u = (s.uniform as f32).clamp(0.0, BELOW_ONE);
            out[start + 3 * n + i] = u.to_bits() as i32;
        }
        for i in extra.picks.len()..n {
            out[start + i] = 0.0f32.to_bits() as i32;
            out[start + n + i] = 0;
            out[start + 2 * n + i] = 1.0f32.to_bits() as i32;
            out[start + 3 * n + i] = 0;
        }
        at += 4 * n;
        start..at
    };
    let copies = {
        let start = at;
        for c in &step.copies {
            for v in [c.src, c.dst] {
                out[at] = i32::try_from(v)
                    .map_err(|_| SpindleError::Backend(format!("block {v} exceeds i32")))?;
                at += 1;
            }
        }
        start..at
    };
    let start = at;
    out[at..at + extra.attention.len()].copy_from_slice(extra.attention);
    at += extra.attention.len();
    Ok(PackLayout {
        tokens,
        positions,
        slots,
        logit_rows,
        sampling,
        copies,
        attention: start..at,
        len: at,
    })
}

/// The largest `f32` below `1.0` (a uniform rounded to 1.0 would fall past every token).
const BELOW_ONE: f32 = f32::from_bits(0x3f7f_ffff);

/// Where each attention array sits in [`AttentionArrays::data`] (and, shifted by
/// [`PackLayout::attention`]`.start`, in the staging buffer). Arrays a kernel does not use
/// stay empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttentionRanges {
    /// `[entries + 1]` CSR over rows (v1 decode) or groups (v1 prefill); `[1]` for v2.
    pub chunk_indptr: std::ops::Range<usize>,
    /// `[chunks]` each: block, first slot in the block, length.
    pub chunk_block: std::ops::Range<usize>,
    pub chunk_start: std::ops::Range<usize>,
    pub chunk_len: std::ops::Range<usize>,
    /// `[rows]` tokens each row sees.
    pub row_limit: std::ops::Range<usize>,
    /// v1 prefill: `[groups + 1]` rows of each group, `[tiles]` group and first row of
    /// each tile.
    pub q_indptr: std::ops::Range<usize>,
    pub tile_group: std::ops::Range<usize>,
    pub tile_row: std::ops::Range<usize>,
    /// v2: `[units, UNIT_WIDTH]`.
    pub units: std::ops::Range<usize>,
    /// v2: `[partials]` each: query row, 1 when the row's only partial.
    pub unit_rows: std::ops::Range<usize>,
    pub partial_direct: std::ops::Range<usize>,
    /// v2: `[rows + 1]` and `[row parts]`: each row's partials in view order.
    pub row_part_ptr: std::ops::Range<usize>,
    pub row_parts: std::ops::Range<usize>,
    /// v2: `[merge rows]`.
    pub merge_rows: std::ops::Range<usize>,
}

impl AttentionRanges {
    /// Every range moved `by` elements on (into the staging buffer's attention slot).
    pub fn shifted(&self, by: usize) -> Self {
        let m = |r: &std::ops::Range<usize>| r.start + by..r.end + by;
        Self {
            chunk_indptr: m(&self.chunk_indptr),
            chunk_block: m(&self.chunk_block),
            chunk_start: m(&self.chunk_start),
            chunk_len: m(&self.chunk_len),
            row_limit: m(&self.row_limit),
            q_indptr: m(&self.q_indptr),
            tile_group: m(&self.tile_group),
            tile_row: m(&self.tile_row),
            units: m(&self.units),
            unit_rows: m(&self.unit_rows),
            partial_direct: m(&self.partial_direct),
            row_part_ptr: m(&self.row_part_ptr),
            row_parts: m(&self.row_parts),
            merge_rows: m(&self.merge_rows),
        }
    }
}

/// A step's attention arrays concatenated into one host vector, which [`pack_step`] places
/// in the staging buffer's attention slot: they travel in the step's one copy. Kept across
/// steps (cleared, capacity kept) so steady decode does not reallocate it.
#[derive(Debug, Clone, Default)]
pub struct AttentionArrays {
    /// The arrays, back to back.
    pub data: Vec<i32>,
}

impl AttentionArrays {
    /// Empties it for the next step (capacity kept).
    pub fn clear(&mut self) {
        self.data.clear();
    }

    /// Appends `a`; returns where it landed.
    pub fn push(&mut self, a: &[i32]) -> std::ops::Range<usize> {
        let start = self.data.len();
        self.data.extend_from_slice(a);
        start..self.data.len()
    }

    /// Appends kernel v2's arrays of `lp` (and a `[1]` zero `chunk_indptr`, which v2 does
    /// not read); returns their ranges.
    pub fn push_lowered(&mut self, lp: &crate::plan::lower::LoweredPlan) -> AttentionRanges {
        AttentionRanges {
            chunk_indptr: self.push(&[0]),
            chunk_block: self.push(&lp.chunk_block),
            chunk_start: self.push(&lp.chunk_start),
            chunk_len: self.push(&lp.chunk_len),
            row_limit: self.push(&lp.row_limit),
            units: self.push(&lp.units),
            unit_rows: self.push(&lp.unit_rows),
            partial_direct: self.push(&lp.partial_direct),
            row_part_ptr: self.push(&lp.row_part_ptr),
            row_parts: self.push(&lp.row_parts),
            merge_rows: self.push(&lp.merge_rows),
            ..Default::default()
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Launches kernel v2 makes for one layer: the item kernel, then the merge kernel when some
/// row has several partials (or none).
pub fn forked_attention_launches(rows: usize, units: usize, merge_rows: usize) -> u64 {
    u64::from(rows > 0 && units > 0) + u64::from(rows > 0 && merge_rows > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model_loader::{preset_config, Arch, Preset};

    #[test]
    fn packed_inputs_land_where_the_layout_says() {
        use crate::kv::BlockCopy;
        let step = crate::backend::StepInput {
            tokens: vec![5, 6, 7],
            positions: vec![10, 11, 12],
            slots: vec![20, 21, 22],
            logit_rows: vec![2],
            copies: vec![BlockCopy { src: 3, dst: 4 }],
            ..Default::default()
        };
        let mut buf = vec![-1; 16];
        let l = pack_step(&step, &PackExtra::attention(&[99, 98]), &mut buf).expect("fits");
        assert_eq!(l.len, packed_len(&step, &PackExtra::attention(&[99, 98])));
        assert_eq!(&buf[l.tokens.clone()], &[5, 6, 7]);
        assert_eq!(&buf[l.positions.clone()], &[10, 11, 12]);
        assert_eq!(&buf[l.slots.clone()], &[20, 21, 22]);
        assert_eq!(&buf[l.logit_rows.clone()], &[2]);
        assert_eq!(&buf[l.copies.clone()], &[3, 4]);
        assert_eq!(&buf[l.attention.clone()], &[99, 98]);
        assert_eq!(buf[l.len], -1, "nothing written past the layout");
        let mut small = vec![0; l.len - 1];
        assert!(pack_step(&step, &PackExtra::attention(&[99, 98]), &mut small).is_err());
        let big = crate::backend::StepInput {
            tokens: vec![u32::MAX],
            positions: vec![0],
            slots: vec![0],
            ..Default::default()
        };
        assert!(
            pack_step(&big, &PackExtra::attention(&[]), &mut buf).is_err(),
            "token beyond i32"
        );
    }

    #[test]
    fn padded_steps_and_device_sampling_pack_as_documented() {
        use crate::backend::{RowPick, RowSampling};
        let step = crate::backend::StepInput {
            tokens: vec![5, 6],
            positions: vec![10, 11],
            slots: vec![20, 21],
            logit_rows: vec![0, 1],
            ..Default::default()
        };
        let hot = RowSampling {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.9,
            uniform: 0.999_999_999_9,
        };
        let picks = [RowPick::Sample(hot), RowPick::Logits];
        let extra = PackExtra {
            attention: &[7],
            picks: &picks,
            pad_rows: 4,
        };
        let mut buf = vec![-9; packed_len(&step, &extra) + 1];
        let l = pack_step(&step, &extra, &mut buf).expect("fits");
        assert_eq!(l.len, packed_len(&step, &extra));
        assert_eq!(&buf[l.tokens.clone()], &[5, 6, 0, 0]);
        assert_eq!(&buf[l.positions.clone()], &[10, 11, 0, 0]);
        assert_eq!(
            &buf[l.slots.clone()],
            &[20, 21, -1, -1],
            "padding writes no slot"
        );
        assert_eq!(&buf[l.logit_rows.clone()], &[0, 1, 2, 3]);
        let f = |i: usize| f32::from_bits(buf[l.sampling.start + i] as u32);
        assert_eq!(l.sampling.len(), 16);
        assert_eq!(
            [f(0), f(1), f(2), f(3)],
            [0.7, 0.0, 0.0, 0.0],
            "temperatures"
        );
        assert_eq!(
            &buf[l.sampling.start + 4..l.sampling.start + 8],
            &[20, 0, 0, 0]
        );
        assert_eq!([f(8), f(9), f(10), f(11)], [0.9, 1.0, 1.0, 1.0], "top_p");
        assert!(
            f(12) < 1.0 && f(12) > 0.9999,
            "a uniform stays below 1: {}",
            f(12)
        );
        assert_eq!(&buf[l.attention.clone()], &[7]);
        assert_eq!(buf[l.len], -9);

        // Padding needs every row's logits in order; picks must match the logit rows.
        let partial = crate::backend::StepInput {
            logit_rows: vec![1],
            ..step.clone()
        };
        let one = [RowPick::Logits];
        let e = PackExtra {
            picks: &one,
            ..extra
        };
        assert!(pack_step(&partial, &e, &mut buf).is_err());
        let e = PackExtra {
            picks: &one,
            pad_rows: 0,
            ..extra
        };
        assert!(
            pack_step(&step, &e, &mut buf).is_err(),
            "one pick for two rows"
        );
    }

    #[test]
    fn attention_arrays_land_at_their_shifted_ranges() {
        use crate::plan::lower::LoweredPlan;
        let lp = LoweredPlan {
            units: vec![1, 2, 3, 4, 5, 6, 7, 8],
            unit_rows: vec![0, 1],
            partial_direct: vec![1, 1],
            row_part_ptr: vec![0, 1, 2],
            row_parts: vec![0, 1],
            chunk_block: vec![9],
            chunk_start: vec![0],
            chunk_len: vec![5],
            row_limit: vec![5, 4],
            ..Default::default()
        };
        let mut a = AttentionArrays::default();
        a.push(&[-7]); // whatever an earlier caller left is cleared
        a.clear();
        let r = a.push_lowered(&lp);
        assert_eq!(a.len(), 1 + 8 + 2 + 2 + 3 + 2 + 3 + 2);
        assert!(
            r.merge_rows.is_empty() && r.q_indptr.is_empty(),
            "unused arrays empty"
        );
        let step = crate::backend::StepInput {
            tokens: vec![1, 2],
            positions: vec![4, 3],
            slots: vec![40, 30],
            ..Default::default()
        };
        let extra = PackExtra::attention(&a.data);
        let mut buf = vec![-1; packed_len(&step, &extra)];
        let l = pack_step(&step, &extra, &mut buf).expect("fits");
        let r = r.shifted(l.attention.start);
        assert_eq!(l.attention.start, 6);
        assert_eq!(&buf[r.chunk_indptr.clone()], &[0]);
        assert_eq!(&buf[r.units.clone()], &lp.units[..]);
        assert_eq!(&buf[r.unit_rows.clone()], &lp.unit_rows[..]);
        assert_eq!(&buf[r.partial_direct.clone()], &lp.partial_direct[..]);
        assert_eq!(&buf[r.row_part_ptr.clone()], &lp.row_part_ptr[..]);
        assert_eq!(&buf[r.row_parts.clone()], &lp.row_parts[..]);
        assert_eq!(&buf[r.chunk_block.clone()], &[9]);
        assert_eq!(&buf[r.chunk_len.clone()], &[5]);
        assert_eq!(&buf[r.row_limit.clone()], &[5, 4]);
        assert_eq!(r.row_limit.end.max(r.row_parts.end), l.len);
    }

    #[test]
    fn empty_step_only_uploads() {
        let cfg = preset_config(Arch::Qwen3, Preset::Tiny);
        let shape = StepShape {
            rows: 0,
            logit_rows: 0,
            copies: false,
            attention_launches: 1,
            tokens: TokenOp::None,
            logits_back: true,
            graph: false,
        };
        assert_eq!(StepProgram::build(&cfg, &shape).ops, vec![Op::UploadInputs]);
        let graph = StepShape {
            graph: true,
            ..shape
        };
        assert_eq!(StepProgram::build(&cfg, &graph).ops, vec![Op::UploadInputs]);
    }
}
