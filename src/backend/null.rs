//! A backend that does no arithmetic: every operation returns at once and the logits are
//! zeros. With it only spindle's own work per step remains (feed, schedule, plan, batch,
//! outputs), which is what `benches/runtime.rs` and the allocation test measure.

use super::{Backend, StepInput, Weight};
use crate::error::Result;
use model_loader::ModelConfig;

/// The no-arithmetic backend over a model shape and a cache of `num_blocks` blocks.
#[derive(Debug, Clone)]
pub struct NullBackend {
    cfg: ModelConfig,
    block_size: usize,
    num_blocks: usize,
    /// Rows whose logits the current step wants.
    logit_rows: usize,
}

impl NullBackend {
    /// A backend for `cfg` whose cache holds `num_blocks` blocks of `block_size` tokens.
    pub fn new(cfg: ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        Self {
            cfg,
            block_size,
            num_blocks,
            logit_rows: 0,
        }
    }
}

impl Backend for NullBackend {
    /// Activations carry nothing.
    type Act = ();

    fn name(&self) -> &'static str {
        "null"
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
        self.logit_rows = step.logit_rows.len();
        Ok(())
    }

    fn embed(&mut self) -> Result<()> {
        Ok(())
    }

    fn rms_norm(&mut self, _x: &(), _w: Weight) -> Result<()> {
        Ok(())
    }

    fn add(&mut self, _x: &mut (), _y: &()) -> Result<()> {
        Ok(())
    }

    fn linear(&mut self, _x: &(), _w: Weight) -> Result<()> {
        Ok(())
    }

    fn head_norm(&mut self, _x: &mut (), _w: Weight) -> Result<()> {
        Ok(())
    }

    fn rope(&mut self, _x: &mut ()) -> Result<()> {
        Ok(())
    }

    fn write_kv(&mut self, _layer: usize, _k: &(), _v: &()) -> Result<()> {
        Ok(())
    }

    fn attention(&mut self, _layer: usize, _q: &()) -> Result<()> {
        Ok(())
    }

    fn silu_mul(&mut self, _gate: &(), _up: &()) -> Result<()> {
        Ok(())
    }

    fn logits(&mut self, _x: &(), out: &mut Vec<f32>) -> Result<()> {
        // Zeros of the right shape in the caller's buffer: only rows it did not hold before
        // are written, so a steady step neither allocates nor touches the vocabulary.
        out.resize(self.logit_rows * self.cfg.vocab_size, 0.0);
        Ok(())
    }
}
