//! The backend interface: the operations a transformer step needs, on some device.
//!
//! The layer loop (`crate::model`) is written once against this trait; the CPU backend
//! (f32, the reference) and the CUDA backend implement it. A backend owns the weights and
//! the K/V storage; the host side (block pool, views, plan) is shared by all backends.

pub mod cpu;
pub mod cpu_attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod graph_layout;
pub mod null;
pub mod packed;
pub mod profile;
pub mod simd;
pub mod step_program;
pub mod weights;

use crate::error::{Result, SpindleError};
pub use crate::generate::RowSampling;
use crate::kv::BlockCopy;
use crate::plan::AttentionPlan;
use model_loader::ModelConfig;

/// A weight matrix or vector of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    FinalNorm,
    LmHead,
    Layer(usize, LayerWeight),
}

/// A weight inside one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    InputNorm,
    Q,
    K,
    V,
    O,
    QNorm,
    KNorm,
    PostNorm,
    Gate,
    Up,
    Down,
}

/// Everything one fused step needs, built on the host.
#[derive(Debug, Clone, Default)]
pub struct StepInput {
    /// `[rows]`: the token fed at each row.
    pub tokens: Vec<u32>,
    /// `[rows]`: its position (for RoPE).
    pub positions: Vec<u32>,
    /// `[rows]`: cache slot (`block * block_size + offset`) its K/V is written to.
    pub slots: Vec<u32>,
    /// Rows whose logits are wanted, in output order.
    pub logit_rows: Vec<u32>,
    /// Copy-on-write block copies to do before anything is written.
    pub copies: Vec<BlockCopy>,
    /// Which rows attend to which chunks.
    pub plan: AttentionPlan,
}

/// How a backend chooses one logits row's next token in [`Backend::forward_sampled`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowPick {
    /// Hand the row's logits back; the host chooses (a custom token source, scoring).
    Logits,
    /// Choose on the backend (on the device for CUDA): greedy, or temperature / top-k /
    /// top-p at the thread's pre-drawn uniform. Only the token id has to come back.
    Sample(RowSampling),
}

/// The token of a [`RowPick::Logits`] row in [`Backend::forward_sampled`]'s output.
pub const NO_TOKEN: u32 = u32::MAX;

/// Checks that `picks` has one entry per logits row of `step` ([`Backend::forward_sampled`]'s
/// contract, for every backend).
pub fn check_picks(step: &StepInput, picks: &[RowPick]) -> Result<()> {
    if picks.len() != step.logit_rows.len() {
        return Err(SpindleError::Backend(format!(
            "{} picks for {} logit rows",
            picks.len(),
            step.logit_rows.len()
        )));
    }
    Ok(())
}

/// The host's choice for every row of `picks` from `logits` (`[picks, vocab]`), into
/// `tokens` ([`NO_TOKEN`] for a `Logits` row): [`Backend::forward_sampled`]'s default, with
/// the CPU sampler's exact choices.
pub fn sample_on_host(
    logits: &[f32],
    vocab: usize,
    picks: &[RowPick],
    tokens: &mut Vec<u32>,
) -> Result<()> {
    tokens.clear();
    if logits.len() < picks.len() * vocab {
        return Err(SpindleError::Backend(format!(
            "{} picks for {} logits of vocab {vocab}",
            picks.len(),
            logits.len()
        )));
    }
    tokens.extend(picks.iter().enumerate().map(|(i, p)| match p {
        RowPick::Logits => NO_TOKEN,
        RowPick::Sample(s) => crate::generate::sample_row(&logits[i * vocab..(i + 1) * vocab], s),
    }));
    Ok(())
}

/// A device that can run the transformer's operations. `Act` is an activation buffer of
/// shape `[rows, width]` living on the device.
pub trait Backend {
    /// Activation buffer type.
    type Act;

    /// Short name for logs ("cpu", "cuda").
    fn name(&self) -> &'static str;
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;
    /// Tokens per KV block.
    fn block_size(&self) -> usize;
    /// Number of KV blocks the backend's cache holds.
    fn num_blocks(&self) -> usize;
    /// Uploads the step's inputs and performs its copy-on-write block copies.
    fn begin_step(&mut self, step: &StepInput) -> Result<()>;
    /// `[rows, hidden]` embeddings of the step's tokens.
    fn embed(&mut self) -> Result<Self::Act>;
    /// `[rows, hidden]` RMSNorm of `x` with weight `w`.
    fn rms_norm(&mut self, x: &Self::Act, w: Weight) -> Result<Self::Act>;
    /// `x += y` in place.
    fn add(&mut self, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    /// `[rows, out]` = `x @ w^T` (+ the weight's bias, where the model has one).
    fn linear(&mut self, x: &Self::Act, w: Weight) -> Result<Self::Act>;
    /// RMSNorm over each head of `x` (`[rows, heads * head_dim]`) in place (Qwen3 q/k norm).
    fn head_norm(&mut self, x: &mut Self::Act, w: Weight) -> Result<()>;
    /// Rotary embedding of every head of `x` at the step's positions, in place.
    fn rope(&mut self, x: &mut Self::Act) -> Result<()>;
    /// Writes the step's K and V (`[rows, kv_heads * head_dim]`) of `layer` into their slots.
    fn write_kv(&mut self, layer: usize, k: &Self::Act, v: &Self::Act) -> Result<()>;
    /// `[rows, heads * head_dim]` attention of `q` over the cache of `layer`, per the plan.
    fn attention(&mut self, layer: usize, q: &Self::Act) -> Result<Self::Act>;
    /// `[rows, inter]` = silu(gate) * up.
    fn silu_mul(&mut self, gate: &Self::Act, up: &Self::Act) -> Result<Self::Act>;
    /// Host copy of `[logit_rows, vocab]` logits for the step's `logit_rows` of `x` (already
    /// normed), written over `out`.
    fn logits(&mut self, x: &Self::Act, out: &mut Vec<f32>) -> Result<()>;

    /// One whole step: `[logit_rows, vocab]` logits into `logits`. The default runs the
    /// layer loop of [`crate::model::layer_loop`] through the operations above; a backend
    /// may run a fused program of its own instead (the CUDA backend does), with the same
    /// results up to its rounding.
    fn forward(&mut self, step: &StepInput, logits: &mut Vec<f32>) -> Result<()>
    where
        Self: Sized,
    {
        crate::model::layer_loop(self, step, logits)
    }

    /// One whole step that also chooses tokens: `picks` has one entry per logits row
    /// (`step.logit_rows`); `tokens` gets one id per row ([`NO_TOKEN`] for a
    /// [`RowPick::Logits`] row). When some row asked for logits, `logits` is
    /// `[logit rows, vocab]` and holds the logits of every row that asked; a backend that
    /// samples on its device copies back only those rows (the others' values are
    /// unspecified) and, when no row asked, may leave `logits` empty (only token ids come
    /// back). The default runs [`Backend::forward`] (every row's logits) and samples on
    /// the host ([`sample_on_host`]).
    fn forward_sampled(
        &mut self,
        step: &StepInput,
        picks: &[RowPick],
        logits: &mut Vec<f32>,
        tokens: &mut Vec<u32>,
    ) -> Result<()>
    where
        Self: Sized,
    {
        check_picks(step, picks)?;
        self.forward(step, logits)?;
        let vocab = self.config().vocab_size;
        sample_on_host(logits, vocab, picks, tokens)
    }
}
