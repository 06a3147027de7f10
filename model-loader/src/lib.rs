//! Memory-mapped, zero-copy, validated loading of Hugging Face safetensors checkpoints
//! (Llama, Qwen2, Qwen3), a streaming safetensors writer, and synthetic checkpoint generation.
//!
//! [`Checkpoint::open`] reads `config.json` into a [`ModelConfig`], maps `model.safetensors` (or
//! the shards of `model.safetensors.index.json`), validates every header and checks that each
//! tensor the config implies is present with the right shape. Every failure is a typed
//! [`LoadError`] naming the file and the tensor or config field.

pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod error;
pub mod safetensors;
pub mod synth;
pub mod tensor;
pub mod writer;

pub use checkpoint::{Checkpoint, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
pub use config::{Arch, ModelConfig};
pub use dtype::DType;
pub use error::LoadError;
pub use safetensors::{parse_safetensors, TensorInfo};
pub use synth::{generate_checkpoint, preset_config, Preset};
pub use tensor::TensorView;
pub use writer::{write_safetensors, TensorSpec};
