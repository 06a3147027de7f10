//! `spindle inspect --model DIR|FILE.gguf`: what a checkpoint holds, or why it cannot be loaded.

use model_loader::{Checkpoint, DType};
use spindle::error::Result;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Arguments of `spindle inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Checkpoint directory (config.json + safetensors), a .gguf file, or a directory holding one.
    #[arg(long)]
    pub model: PathBuf,
    /// Print only the summary, not the tensor table.
    #[arg(long)]
    pub summary: bool,
}

/// Loads and validates the checkpoint, then prints its summary and tensor table.
pub fn run(args: &InspectArgs) -> Result<()> {
    let ck = Checkpoint::open(&args.model)?;
    print!("{}", report(&ck, !args.summary));
    Ok(())
}

/// The text `inspect` prints.
pub fn report(ck: &Checkpoint, table: bool) -> String {
    let c = ck.config();
    let tensors = ck.tensors();
    let mut dtypes: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut stored: u64 = 0;
    for t in &tensors {
        let e = dtypes.entry(t.dtype.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.numel() as u64;
        stored += t.numel() as u64;
    }
    let mut s = String::new();
    let files: Vec<String> = ck
        .files()
        .iter()
        .map(|f| {
            f.file_name().map_or_else(
                || f.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
        .collect();
    s += &format!("model        {}\n", ck.dir().display());
    s += &format!("architecture {}\n", c.arch.name());
    s += &format!(
        "parameters   {} ({:.3} B) expected by config, {} stored in {} tensors\n",
        c.num_parameters(),
        c.num_parameters() as f64 / 1e9,
        stored,
        tensors.len()
    );
    let dt: Vec<String> = dtypes
        .iter()
        .map(|(k, (n, p))| format!("{k}: {n} tensors, {p} values"))
        .collect();
    s += &format!("dtypes       {}\n", dt.join("; "));
    s += &format!("files        {}\n", files.join(", "));
    if let Some(g) = ck.gguf() {
        let mut stored: BTreeMap<&str, usize> = BTreeMap::new();
        for ty in g.stored_types.values() {
            *stored.entry(ty.name()).or_default() += 1;
        }
        let st: Vec<String> = stored.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        s += &format!(
            "gguf         version {}, stored as {} (dequantised to F32 at load)\n",
            g.version,
            st.join(", ")
        );
    }
    s += &format!(
        "shape        {} layers, hidden {}, heads {} (kv {}), head_dim {}, intermediate {}, vocab {}\n",
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size
    );
    s += &format!(
        "features     rope_theta {}, rms_norm_eps {:e}, tied embeddings {}, q/k/v bias {}, q/k norm {}\n",
        c.rope_theta,
        c.rms_norm_eps,
        c.tie_word_embeddings,
        c.qkv_bias(),
        c.qk_norm
    );
    let kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * DType::BF16.size_bytes();
    s += &format!("kv cache     {kv_bytes} bytes per token in bf16\n");
    if table {
        let w = tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        s += &format!("\n{:<w$}  {:<5}  shape\n", "name", "dtype");
        for t in &tensors {
            s += &format!("{:<w$}  {:<5}  {:?}\n", t.name, t.dtype.name(), t.shape);
        }
    }
    s
}
