//! Memory-mapped, zero-copy, validated loading of Hugging Face safetensors checkpoints
//! (Llama, Qwen2, Qwen3) and of GGUF files (dequantised to f32 at load), a streaming
//! safetensors writer, and synthetic checkpoint generation.
//!
//! [`Checkpoint::open`] reads `config.json` into a [`ModelConfig`], maps `model.safetensors` (or
//! the shards of `model.safetensors.index.json`), validates every header and checks that each
//! tensor the config implies is present with the right shape. Every failure is a typed
//! [`LoadError`] naming the file and the tensor or config field. Given a `.gguf` file (or a
//! directory holding one and no `config.json`), it reads the config from the GGUF metadata and
//! owns every tensor as f32 under its Hugging Face name instead.

pub mod checkpoint;
pub mod config;
pub mod dequant;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod rng;
pub mod safetensors;
pub mod synth;
pub mod tensor;
pub mod writer;

pub use checkpoint::{Checkpoint, GgufSource, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
pub use config::{Arch, ExpectedTensor, LayerTensor, ModelConfig, TensorRole};
pub use dequant::GgmlType;
pub use dtype::DType;
pub use error::LoadError;
pub use gguf::{GgufHeader, GgufValue};
pub use safetensors::{parse_safetensors, TensorInfo};
pub use synth::{generate_checkpoint, preset_config, Preset};
pub use tensor::TensorView;
pub use writer::{write_safetensors, TensorSpec};
