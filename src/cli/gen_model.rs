//! `spindle gen-model`: a random-weight checkpoint at the real shapes of a model size, in
//! Hugging Face layout (bf16), so benchmarks and tests need no download.

use model_loader::{generate_checkpoint, preset_config, Arch, Preset};
use spindle::error::{Result, SpindleError};
use std::path::PathBuf;

/// Architecture names accepted on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchArg {
    Llama,
    Qwen2,
    Qwen3,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Arch {
        match a {
            ArchArg::Llama => Arch::Llama,
            ArchArg::Qwen2 => Arch::Qwen2,
            ArchArg::Qwen3 => Arch::Qwen3,
        }
    }
}

/// Arguments of `spindle gen-model`.
#[derive(Debug, clap::Args)]
pub struct GenModelArgs {
    #[arg(long, value_enum)]
    pub arch: ArchArg,
    /// tiny | 0.6b | 1.7b | 8b
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes the checkpoint and says what it wrote.
pub fn run(args: &GenModelArgs) -> Result<()> {
    let preset: Preset = args.preset.parse()?;
    let arch = Arch::from(args.arch);
    let cfg = preset_config(arch, preset);
    std::fs::create_dir_all(&args.out).map_err(|source| SpindleError::Io {
        path: args.out.clone(),
        source,
    })?;
    generate_checkpoint(arch, preset, args.seed, &args.out)?;
    println!(
        "wrote {} {} ({} parameters, bf16, seed {}) to {}",
        arch.name(),
        preset.name(),
        cfg.num_parameters(),
        args.seed,
        args.out.display()
    );
    Ok(())
}
