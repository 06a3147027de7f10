//! The one weight table of the model, shared by every backend: [`Weights`] is filled from
//! the loader's expected tensor list ([`ModelConfig::expected_tensor_table`]), so tensor
//! names and shapes are spelled once (in `model-loader`), and each backend only says how a
//! matrix or a vector is stored ([`WeightStore`]) and read ([`WeightLoader`]).
//!
//! A backend may keep a layer in another form than [`LayerWeights`] (the CUDA backend
//! concatenates q/k/v and gate/up at load): [`Weights::load_with`] hands each layer over
//! as it is read, so only one layer is held twice at a time.

use super::{LayerWeight, Weight};
use crate::error::{Result, SpindleError};
use model_loader::{ExpectedTensor, LayerTensor, ModelConfig, TensorRole};

/// How a backend stores weights.
pub trait WeightStore {
    /// A `[out, in]` matrix (also the `[vocab, hidden]` embedding).
    type Matrix;
    /// A `[n]` vector (norm weights, biases).
    type Vector;
}

/// Reads one expected tensor into a backend's storage.
pub trait WeightLoader<S: WeightStore> {
    /// A matrix of shape `t.shape` (`[rows, cols]`).
    fn matrix(&mut self, t: &ExpectedTensor) -> Result<S::Matrix>;
    /// A vector of shape `t.shape` (`[n]`).
    fn vector(&mut self, t: &ExpectedTensor) -> Result<S::Vector>;
}

/// A linear layer: `[out, inp]` weights and an optional `[out]` bias.
pub struct Linear<S: WeightStore> {
    /// `[out, inp]`.
    pub w: S::Matrix,
    /// `[out]`, where the model has one.
    pub bias: Option<S::Vector>,
    /// Output width.
    pub out: usize,
    /// Input width.
    pub inp: usize,
}

/// One decoder layer's weights, as the checkpoint holds them.
pub struct LayerWeights<S: WeightStore> {
    pub input_norm: S::Vector,     // [hidden]
    pub q: Linear<S>,              // [q_dim, hidden]
    pub k: Linear<S>,              // [kv_dim, hidden]
    pub v: Linear<S>,              // [kv_dim, hidden]
    pub o: Linear<S>,              // [hidden, q_dim]
    pub q_norm: Option<S::Vector>, // [head_dim], Qwen3
    pub k_norm: Option<S::Vector>, // [head_dim], Qwen3
    pub post_norm: S::Vector,      // [hidden]
    pub gate: Linear<S>,           // [inter, hidden]
    pub up: Linear<S>,             // [inter, hidden]
    pub down: Linear<S>,           // [hidden, inter]
}

/// The model's weights: embeddings, layers (as `L`), final norm and untied output head.
pub struct Weights<S: WeightStore, L = LayerWeights<S>> {
    /// `[vocab, hidden]`: token lookups, and the output head when tied.
    pub embed: S::Matrix,
    /// One per decoder layer.
    pub layers: Vec<L>,
    /// `[hidden]`.
    pub final_norm: S::Vector,
    /// `[vocab, hidden]`; `None`: tied to `embed`.
    pub lm_head: Option<Linear<S>>,
}

fn missing(name: &str) -> SpindleError {
    SpindleError::Backend(format!("weight table: {name} was not read"))
}

fn dims2(t: &ExpectedTensor) -> Result<(usize, usize)> {
    match t.shape[..] {
        [o, i] => Ok((o, i)),
        _ => Err(SpindleError::Backend(format!(
            "{}: expected a matrix, got shape {:?}",
            t.name, t.shape
        ))),
    }
}

/// Per-role slots of one layer while its tensors are read.
struct LayerSlots<S: WeightStore> {
    vectors: [Option<S::Vector>; 9],
    matrices: [Option<(S::Matrix, usize, usize)>; 7],
}

const fn matrix_slot(t: LayerTensor) -> Option<usize> {
    Some(match t {
        LayerTensor::Q => 0,
        LayerTensor::K => 1,
        LayerTensor::V => 2,
        LayerTensor::O => 3,
        LayerTensor::Gate => 4,
        LayerTensor::Up => 5,
        LayerTensor::Down => 6,
        _ => return None,
    })
}

const fn vector_slot(t: LayerTensor) -> usize {
    match t {
        LayerTensor::InputNorm => 0,
        LayerTensor::QBias => 1,
        LayerTensor::KBias => 2,
        LayerTensor::VBias => 3,
        LayerTensor::OBias => 4,
        LayerTensor::QNorm => 5,
        LayerTensor::KNorm => 6,
        LayerTensor::PostNorm => 7,
        // Matrices never reach here; a spare slot keeps this total.
        _ => 8,
    }
}

impl<S: WeightStore> LayerWeights<S> {
    /// Reads layer `layer`'s tensors, as [`ModelConfig::expected_layer_tensors`] lists them.
    pub fn load(cfg: &ModelConfig, layer: usize, ld: &mut impl WeightLoader<S>) -> Result<Self> {
        let mut s = LayerSlots::<S> {
            vectors: Default::default(),
            matrices: Default::default(),
        };
        for t in cfg.expected_layer_tensors(layer) {
            let TensorRole::Layer(_, lt) = t.role else {
                return Err(missing(&t.name));
            };
            match matrix_slot(lt) {
                Some(i) => {
                    let (o, inp) = dims2(&t)?;
                    s.matrices[i] = Some((ld.matrix(&t)?, o, inp));
                }
                None => s.vectors[vector_slot(lt)] = Some(ld.vector(&t)?),
            }
        }
        let [q, k, v, o, gate, up, down] = s.matrices;
        let [input_norm, q_bias, k_bias, v_bias, o_bias, q_norm, k_norm, post_norm, _] = s.vectors;
        let lin = |m: Option<(S::Matrix, usize, usize)>, bias, what: &str| -> Result<Linear<S>> {
            let (w, out, inp) = m.ok_or_else(|| missing(&format!("layer {layer} {what}")))?;
            Ok(Linear { w, bias, out, inp })
        };
        let vec = |v: Option<S::Vector>, what: &str| {
            v.ok_or_else(|| missing(&format!("layer {layer} {what}")))
        };
        Ok(Self {
            input_norm: vec(input_norm, "input norm")?,
            q: lin(q, q_bias, "q_proj")?,
            k: lin(k, k_bias, "k_proj")?,
            v: lin(v, v_bias, "v_proj")?,
            o: lin(o, o_bias, "o_proj")?,
            q_norm,
            k_norm,
            post_norm: vec(post_norm, "post-attention norm")?,
            gate: lin(gate, None, "gate_proj")?,
            up: lin(up, None, "up_proj")?,
            down: lin(down, None, "down_proj")?,
        })
    }

    /// The linear layer `w` names.
    pub fn linear(&self, w: LayerWeight) -> Option<&Linear<S>> {
        Some(match w {
            LayerWeight::Q => &self.q,
            LayerWeight::K => &self.k,
            LayerWeight::V => &self.v,
            LayerWeight::O => &self.o,
            LayerWeight::Gate => &self.gate,
            LayerWeight::Up => &self.up,
            LayerWeight::Down => &self.down,
            _ => return None,
        })
    }

    /// The norm vector `w` names (`None` for matrices and absent q/k norms).
    pub fn vector(&self, w: LayerWeight) -> Option<&S::Vector> {
        match w {
            LayerWeight::InputNorm => Some(&self.input_norm),
            LayerWeight::PostNorm => Some(&self.post_norm),
            LayerWeight::QNorm => self.q_norm.as_ref(),
            LayerWeight::KNorm => self.k_norm.as_ref(),
            _ => None,
        }
    }
}

impl<S: WeightStore> Weights<S> {
    /// Reads every expected tensor of `cfg` through `ld`.
    pub fn load(cfg: &ModelConfig, ld: &mut impl WeightLoader<S>) -> Result<Self> {
        Self::load_with(cfg, ld, |_, l| Ok(l))
    }
}

impl<S: WeightStore, L> Weights<S, L> {
    /// Reads every expected tensor of `cfg` through `ld`, turning each layer into an `L`
    /// with `finish` as soon as it is read (layers in order, then the final norm and head).
    pub fn load_with(
        cfg: &ModelConfig,
        ld: &mut impl WeightLoader<S>,
        mut finish: impl FnMut(usize, LayerWeights<S>) -> Result<L>,
    ) -> Result<Self> {
        let (mut embed, mut final_norm, mut lm_head) = (None, None, None);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for t in cfg.expected_tensor_table() {
            match t.role {
                TensorRole::Embedding => embed = Some(ld.matrix(&t)?),
                TensorRole::FinalNorm => final_norm = Some(ld.vector(&t)?),
                TensorRole::LmHead => {
                    let (out, inp) = dims2(&t)?;
                    lm_head = Some(Linear {
                        w: ld.matrix(&t)?,
                        bias: None,
                        out,
                        inp,
                    });
                }
                // A layer is read whole at its first tensor.
                TensorRole::Layer(i, _) if i == layers.len() => {
                    let l = LayerWeights::load(cfg, i, ld)?;
                    layers.push(finish(i, l)?);
                }
                TensorRole::Layer(..) => {}
            }
        }
        if layers.len() != cfg.num_layers {
            return Err(missing(&format!(
                "{} of {} layers",
                layers.len(),
                cfg.num_layers
            )));
        }
        Ok(Self {
            embed: embed.ok_or_else(|| missing("embedding"))?,
            layers,
            final_norm: final_norm.ok_or_else(|| missing("final norm"))?,
            lm_head,
        })
    }

    /// The layer `i`, or an error naming it.
    pub fn layer(&self, i: usize) -> Result<&L> {
        self.layers
            .get(i)
            .ok_or_else(|| SpindleError::Backend(format!("no layer {i}")))
    }
}

impl<S: WeightStore> Weights<S> {
    /// The linear layer `w` names (the untied `lm_head` included).
    pub fn linear(&self, w: Weight) -> Result<&Linear<S>> {
        match w {
            Weight::LmHead => self
                .lm_head
                .as_ref()
                .ok_or_else(|| SpindleError::Backend("lm_head is tied".into())),
            Weight::Layer(i, lw) => self
                .layer(i)?
                .linear(lw)
                .ok_or_else(|| SpindleError::Backend(format!("{lw:?} is not a matrix"))),
            Weight::FinalNorm => Err(SpindleError::Backend("final norm is not a matrix".into())),
        }
    }

    /// The norm vector `w` names.
    pub fn vector(&self, w: Weight) -> Result<&S::Vector> {
        let missing = || SpindleError::Backend(format!("{w:?} is not a vector of this model"));
        match w {
            Weight::FinalNorm => Ok(&self.final_norm),
            Weight::Layer(i, lw) => self
                .layers
                .get(i)
                .and_then(|l| l.vector(lw))
                .ok_or_else(missing),
            Weight::LmHead => Err(missing()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores each tensor as its name, so the table's wiring is visible.
    struct Names;
    impl WeightStore for Names {
        type Matrix = String;
        type Vector = String;
    }
    impl WeightLoader<Names> for Vec<String> {
        fn matrix(&mut self, t: &ExpectedTensor) -> Result<String> {
            self.push(t.name.clone());
            Ok(t.name.clone())
        }
        fn vector(&mut self, t: &ExpectedTensor) -> Result<String> {
            self.push(t.name.clone());
            Ok(t.name.clone())
        }
    }

    #[test]
    fn every_expected_tensor_lands_in_its_slot_once() {
        use model_loader::{Arch, Preset};
        for (arch, preset) in [
            (Arch::Llama, Preset::Tiny),
            (Arch::Qwen2, Preset::Tiny),
            (Arch::Qwen3, Preset::Tiny),
            (Arch::Qwen3, Preset::P8B),
        ] {
            let mut cfg = model_loader::preset_config(arch, preset);
            // Biases on for Llama too, so the o_proj bias slot is exercised.
            if arch == Arch::Llama {
                cfg.attention_bias = true;
            }
            let mut read = Vec::new();
            let w = Weights::<Names>::load(&cfg, &mut read).expect("table");
            let expected: Vec<String> =
                cfg.expected_tensors().into_iter().map(|(n, _)| n).collect();
            let (mut a, mut b) = (read.clone(), expected.clone());
            a.sort();
            b.sort();
            assert_eq!(a, b, "{arch:?} {preset:?}: each tensor read exactly once");
            let last = cfg.num_layers - 1;
            let l = w.layer(last).expect("layer");
            let p = format!("model.layers.{last}");
            assert_eq!(l.q.w, format!("{p}.self_attn.q_proj.weight"));
            assert_eq!(l.down.w, format!("{p}.mlp.down_proj.weight"));
            assert_eq!(l.post_norm, format!("{p}.post_attention_layernorm.weight"));
            assert_eq!((l.q.out, l.q.inp), (cfg.q_dim(), cfg.hidden_size));
            assert_eq!(
                (l.down.out, l.down.inp),
                (cfg.hidden_size, cfg.intermediate_size)
            );
            assert_eq!(
                l.k.bias.as_deref(),
                cfg.qkv_bias()
                    .then(|| format!("{p}.self_attn.k_proj.bias"))
                    .as_deref()
            );
            assert_eq!(l.o.bias.is_some(), cfg.o_bias());
            assert_eq!(l.q_norm.is_some(), cfg.qk_norm);
            assert_eq!(w.embed, "model.embed_tokens.weight");
            assert_eq!(w.final_norm, "model.norm.weight");
            assert_eq!(w.lm_head.is_some(), !cfg.tie_word_embeddings);
            assert_eq!(w.layers.len(), cfg.num_layers);
        }
    }
}
