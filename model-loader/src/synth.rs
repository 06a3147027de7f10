//! Synthetic checkpoints: preset model shapes (tiny up to Qwen3-8B sizes) and deterministic
//! random BF16 weights streamed to disk, for tests and benchmarks without downloading models.

use crate::checkpoint::{CONFIG_FILE, SINGLE_FILE};
use crate::config::{Arch, ModelConfig};
use crate::dtype::DType;
use crate::error::LoadError;
use crate::writer::{write_safetensors, TensorSpec};
use half::bf16;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

/// A model size. Real sizes follow Qwen3-0.6B, Qwen3-1.7B and Qwen3-8B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, intermediate 128, vocab 512.
    Tiny,
    /// Qwen3-0.6B shapes (tied embeddings).
    P0_6B,
    /// Qwen3-1.7B shapes (tied embeddings).
    P1_7B,
    /// Qwen3-8B shapes (separate `lm_head`).
    P8B,
}

impl Preset {
    /// All presets, smallest first.
    pub const ALL: [Preset; 4] = [Preset::Tiny, Preset::P0_6B, Preset::P1_7B, Preset::P8B];

    /// The name accepted by `FromStr`: `"tiny"`, `"0.6b"`, `"1.7b"`, `"8b"`.
    pub fn name(&self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::P0_6B => "0.6b",
            Preset::P1_7B => "1.7b",
            Preset::P8B => "8b",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = LoadError;

    /// Parses `tiny`, `0.6b`, `1.7b` or `8b` (case-insensitive); otherwise [`LoadError::BadPreset`].
    fn from_str(s: &str) -> Result<Preset, LoadError> {
        let wanted = s.trim().to_ascii_lowercase();
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == wanted)
            .ok_or_else(|| LoadError::BadPreset(s.to_string()))
    }
}

/// The config of `preset` with `arch`'s features: Qwen3 has q/k norms and rope_theta 1e6,
/// Qwen2 has q/k/v biases and rope_theta 1e6, Llama has neither and rope_theta 5e5.
pub fn preset_config(arch: Arch, preset: Preset) -> ModelConfig {
    // (hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied)
    let (hidden, layers, heads, kv, head_dim, inter, vocab, tied) = match preset {
        Preset::Tiny => (64, 2, 4, 2, 16, 128, 512, false),
        Preset::P0_6B => (1024, 28, 16, 8, 128, 3072, 151936, true),
        Preset::P1_7B => (2048, 28, 16, 8, 128, 6144, 151936, true),
        Preset::P8B => (4096, 36, 32, 8, 128, 12288, 151936, false),
    };
    let (rope_theta, rms_norm_eps, max_pos) = match arch {
        Arch::Llama => (500_000.0, 1e-5, 8192),
        Arch::Qwen2 => (1_000_000.0, 1e-6, 32768),
        Arch::Qwen3 => (1_000_000.0, 1e-6, 40960),
    };
    let (eos_token_ids, bos_token_id) = match preset {
        Preset::Tiny => (vec![0], None),
        _ => (vec![151645], Some(151643)),
    };
    ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rope_theta,
        rms_norm_eps,
        tie_word_embeddings: tied,
        attention_bias: arch == Arch::Qwen2,
        qk_norm: arch == Arch::Qwen3,
        max_position_embeddings: max_pos,
        eos_token_ids,
        bos_token_id,
    }
}

/// A splitmix64 stream (the crate's generator, `crate::rng`), stepped in place.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        crate::rng::splitmix64(&mut self.0)
    }
}

/// FNV-1a, to give each tensor its own stream independent of tensor order.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// 65536 bf16 bit patterns evenly spanning `center ± half_width`, indexed by 16 random bits.
fn uniform_table(center: f32, half_width: f32) -> Box<[u16; 65536]> {
    let mut table = Box::new([0u16; 65536]);
    for (k, slot) in table.iter_mut().enumerate() {
        let u = (k as f32 + 0.5) / 65536.0; // in (0, 1)
        *slot = bf16::from_f32(center + (2.0 * u - 1.0) * half_width).to_bits();
    }
    table
}

/// Elements generated per write (2 MiB of bf16).
const CHUNK_ELEMS: usize = 1 << 20;

/// Streams `numel` random bf16 values drawn from `table` to `w`.
fn write_random(
    w: &mut dyn Write,
    numel: u64,
    rng: &mut SplitMix64,
    table: &[u16; 65536],
    buf: &mut [u8],
) -> std::io::Result<()> {
    let mut remaining = numel;
    while remaining > 0 {
        let n = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(CHUNK_ELEMS);
        let Some(bytes) = buf.get_mut(..n * 2) else {
            return Err(std::io::Error::other("chunk buffer too small"));
        };
        let (quads, tail) = bytes.as_chunks_mut::<8>();
        for quad in quads {
            let r = rng.next();
            let v = [
                table[usize::from(r as u16)],
                table[usize::from((r >> 16) as u16)],
                table[usize::from((r >> 32) as u16)],
                table[usize::from((r >> 48) as u16)],
            ];
            *quad = bytemuck::cast(v.map(u16::to_le_bytes));
        }
        let r = rng.next();
        for (i, pair) in tail.as_chunks_mut::<2>().0.iter_mut().enumerate() {
            let bits = r.rotate_right(16 * i as u32) as u16;
            *pair = table[usize::from(bits)].to_le_bytes();
        }
        w.write_all(bytes)?;
        remaining -= n as u64;
    }
    Ok(())
}

/// Writes a deterministic random checkpoint (`config.json` + BF16 `model.safetensors`) with the
/// shapes of `preset` and the features of `arch` into `out_dir` (created if needed).
///
/// Weights and biases are uniform with standard deviation 0.02; norm weights are 1 ± 0.02.
/// The same `seed` gives byte-identical files. Data is generated and written in 2 MiB chunks,
/// so even the 8B preset (16 GB) runs in constant memory.
pub fn generate_checkpoint(
    arch: Arch,
    preset: Preset,
    seed: u64,
    out_dir: &Path,
) -> Result<(), LoadError> {
    std::fs::create_dir_all(out_dir).map_err(|e| LoadError::io(out_dir, e))?;
    let config = preset_config(arch, preset);

    let config_path = out_dir.join(CONFIG_FILE);
    let mut text = serde_json::to_string_pretty(&config.to_hf_json())
        .map_err(|e| LoadError::io(&config_path, std::io::Error::other(e)))?;
    text.push('\n');
    std::fs::write(&config_path, text).map_err(|e| LoadError::io(&config_path, e))?;

    let specs: Vec<TensorSpec> = config
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| TensorSpec {
            name,
            dtype: DType::BF16,
            shape,
        })
        .collect();
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let weights = uniform_table(0.0, 0.02 * 3f32.sqrt());
    let norms = uniform_table(1.0, 0.02);
    let mut buf = vec![0u8; CHUNK_ELEMS * 2];
    let mut fill = |i: usize, w: &mut dyn Write| -> std::io::Result<()> {
        let Some(spec) = specs.get(i) else {
            return Err(std::io::Error::other("tensor index out of range"));
        };
        let table = if spec.name.ends_with("norm.weight") {
            &norms
        } else {
            &weights
        };
        let numel = spec.byte_len().unwrap_or(0) / 2;
        let mut rng = SplitMix64(seed ^ fnv1a(&spec.name));
        write_random(w, numel, &mut rng, table, &mut buf)
    };
    write_safetensors(&out_dir.join(SINGLE_FILE), &specs, &mut fill)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_names_parse() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        assert_eq!(" 8B ".parse::<Preset>().unwrap(), Preset::P8B);
        assert!(matches!("7b".parse::<Preset>(), Err(LoadError::BadPreset(s)) if s == "7b"));
    }

    #[test]
    fn random_tail_is_written() {
        let table = uniform_table(0.0, 1.0);
        for numel in [0u64, 1, 3, 4, 5, 7, 9] {
            let mut out = Vec::new();
            let mut buf = vec![0u8; CHUNK_ELEMS * 2];
            write_random(&mut out, numel, &mut SplitMix64(1), &table, &mut buf).unwrap();
            assert_eq!(out.len() as u64, numel * 2);
        }
    }

    #[test]
    fn preset_configs_round_trip_through_json() {
        for arch in Arch::ALL {
            for p in Preset::ALL {
                let c = preset_config(arch, p);
                let text = c.to_hf_json().to_string();
                assert_eq!(
                    ModelConfig::from_json_str(&text, Path::new("c")).unwrap(),
                    c
                );
            }
        }
    }
}
