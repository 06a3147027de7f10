//! The transformer forward pass (Llama / Qwen2 / Qwen3), written once against [`Backend`].

use crate::backend::{Backend, LayerWeight as L, StepInput, Weight};
use crate::error::Result;

/// Runs one fused step through every layer and leaves `[logit_rows, vocab]` logits in
/// `logits` (replacing what it held; its allocation is reused where the backend can):
/// [`Backend::forward`], which is [`layer_loop`] unless the backend fuses the step itself.
pub fn forward<B: Backend>(backend: &mut B, step: &StepInput, logits: &mut Vec<f32>) -> Result<()> {
    backend.forward(step, logits)
}

/// The layer loop, one [`Backend`] operation at a time (the CPU backend's step, and the
/// reference every fused step is checked against).
pub fn layer_loop<B: Backend>(
    backend: &mut B,
    step: &StepInput,
    logits: &mut Vec<f32>,
) -> Result<()> {
    backend.begin_step(step)?;
    let (num_layers, qk_norm) = (backend.config().num_layers, backend.config().qk_norm);
    let mut x = backend.embed()?; // [rows, hidden]
    for layer in 0..num_layers {
        let w = |lw| Weight::Layer(layer, lw);
        let h = backend.rms_norm(&x, w(L::InputNorm))?;
        let mut q = backend.linear(&h, w(L::Q))?; // [rows, heads * head_dim]
        let mut k = backend.linear(&h, w(L::K))?; // [rows, kv_heads * head_dim]
        let v = backend.linear(&h, w(L::V))?; // [rows, kv_heads * head_dim]
        if qk_norm {
            backend.head_norm(&mut q, w(L::QNorm))?;
            backend.head_norm(&mut k, w(L::KNorm))?;
        }
        backend.rope(&mut q)?;
        backend.rope(&mut k)?;
        backend.write_kv(layer, &k, &v)?;
        let attn = backend.attention(layer, &q)?; // [rows, heads * head_dim]
        let o = backend.linear(&attn, w(L::O))?; // [rows, hidden]
        backend.add(&mut x, &o)?;
        let h = backend.rms_norm(&x, w(L::PostNorm))?;
        let gate = backend.linear(&h, w(L::Gate))?; // [rows, inter]
        let up = backend.linear(&h, w(L::Up))?;
        let act = backend.silu_mul(&gate, &up)?;
        let down = backend.linear(&act, w(L::Down))?; // [rows, hidden]
        backend.add(&mut x, &down)?;
    }
    let x = backend.rms_norm(&x, Weight::FinalNorm)?;
    backend.logits(&x, logits)
}
