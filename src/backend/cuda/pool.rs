//! How many K/V blocks the CUDA backend allocates ([`KvPoolSize`], [`CudaOptions`]) and
//! what it chose ([`PoolInfo`]).

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
    /// Rows (tokens) of the largest step the activation arena is sized for at load; a
    /// larger step grows it (counted allocations). The engine's default step budget.
    pub max_step_rows: usize,
    /// Rows whose logits one step may want, for the arena's f32 logits buffer.
    pub max_logit_rows: usize,
    /// Attention partials (rows x KV splits for split-KV decode, lowered partials for
    /// kernel v2) the attention workspace holds at load (`[partials, heads, head_dim]` f32
    /// and `[partials, heads]` f32): a step that needs more grows it once (counted
    /// allocation and memset each buffer). Default
    /// [`crate::backend::step_program::DEFAULT_MAX_STEP_PARTIALS`].
    pub max_step_partials: usize,
    /// Run whole steps as the fused program (`StepProgram`); `false`: the op-by-op layer
    /// loop (every op allocates its output), for debugging.
    pub fused_step: bool,
    /// CUDA graphs for steps that choose their tokens on the device and want every row's
    /// token (pure decode): see [`GraphMode`]. `SPINDLE_CUDA_GRAPHS` (`on`, `off`,
    /// `padded`) overrides it at load.
    pub graphs: GraphMode,
    /// Rows of the largest step run as a graph (steps with more run eagerly).
    pub max_graph_rows: usize,
}

/// How the CUDA backend runs the steps a graph could run (`backend::graph_layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphMode {
    /// Every step eagerly, unpadded.
    Off,
    /// Captured per bucket of row counts, then replayed: one graph launch a step.
    On,
    /// The graph's padded program, launched op by op without capturing: the eager twin
    /// a graph is checked against (debugging).
    PaddedEager,
}

impl GraphMode {
    /// `SPINDLE_CUDA_GRAPHS` if set (`on`/`1`, `off`/`0`, `padded`), else `default`.
    pub fn from_env(default: GraphMode) -> crate::error::Result<Self> {
        match std::env::var("SPINDLE_CUDA_GRAPHS").as_deref() {
            Err(_) | Ok("") => Ok(default),
            Ok("on") | Ok("1") => Ok(Self::On),
            Ok("off") | Ok("0") => Ok(Self::Off),
            Ok("padded") => Ok(Self::PaddedEager),
            Ok(other) => Err(crate::error::SpindleError::InvalidSetting(format!(
                "SPINDLE_CUDA_GRAPHS={other}: expected on, off or padded"
            ))),
        }
    }
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device: 0,
            block_size: 16,
            pool: KvPoolSize::FreeFraction(0.9),
            partition_size: 512,
            use_prefill_kernel: true,
            max_step_rows: 4096,
            max_logit_rows: 256,
            max_step_partials: crate::backend::step_program::DEFAULT_MAX_STEP_PARTIALS,
            fused_step: true,
            graphs: GraphMode::On,
            max_graph_rows: crate::backend::graph_layout::DEFAULT_MAX_GRAPH_ROWS,
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
