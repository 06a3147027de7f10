//! Opening a Hugging Face checkpoint directory: config, memory-mapped safetensors (single file or
//! shards listed in `model.safetensors.index.json`), the tensor index and its validation against
//! the tensors the config implies. A `.gguf` file (or a directory holding one and no
//! `config.json`) opens as a checkpoint whose tensors are owned f32 buffers.

use crate::config::ModelConfig;
use crate::dequant::GgmlType;
use crate::dtype::DType;
use crate::error::LoadError;
use crate::gguf::{self, GgufValue};
use crate::safetensors::{parse_safetensors, TensorInfo};
use crate::tensor::TensorView;
use memmap2::Mmap;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

/// File name of the config.
pub const CONFIG_FILE: &str = "config.json";
/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Where a tensor lives: which shard (or, for a GGUF checkpoint, which owned buffer), and its
/// validated header entry.
#[derive(Debug)]
struct Entry {
    shard: usize,
    info: TensorInfo,
}

/// What a GGUF checkpoint keeps besides its tensors: the file's metadata (the tokenizer lives
/// there) and the type each tensor was stored in.
#[derive(Debug)]
pub struct GgufSource {
    /// The GGUF file.
    pub path: PathBuf,
    /// Format version.
    pub version: u32,
    /// Every metadata key and value.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Hugging Face tensor name -> the ggml type it was stored in.
    pub stored_types: BTreeMap<String, GgmlType>,
}

/// Where the tensor bytes are: memory-mapped safetensors, or buffers owned by the checkpoint
/// (a GGUF dequantised at load).
#[derive(Debug)]
enum Storage {
    Mapped(Vec<Shard>),
    /// One safetensors image held in memory for the program's life (a model built into
    /// the binary).
    Static(&'static [u8]),
    /// One f32 buffer per tensor, values little-endian in memory order (see `owned_bytes`).
    Owned(Vec<Vec<f32>>, Box<GgufSource>),
}

/// An opened, fully validated checkpoint: its config and zero-copy access to every tensor.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    /// `model.safetensors`, or the index file for a sharded checkpoint (named in lookup errors).
    weights_path: PathBuf,
    storage: Storage,
    index: BTreeMap<String, Entry>,
}

/// The bytes of an owned f32 buffer, as the little-endian data a `TensorView` promises.
fn owned_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// The GGUF file a model path names: the path itself if it ends in `.gguf`, or the only `.gguf`
/// in a directory without `config.json`. `None` means "open as safetensors".
fn gguf_path(path: &Path) -> Result<Option<PathBuf>, LoadError> {
    let is_gguf = |p: &Path| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    };
    if path.is_file() {
        return Ok(is_gguf(path).then(|| path.to_path_buf()));
    }
    if !path.is_dir() || path.join(CONFIG_FILE).exists() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| LoadError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_gguf(p))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        count => Err(LoadError::AmbiguousGguf {
            dir: path.to_path_buf(),
            count,
        }),
    }
}

/// Memory-maps a safetensors file and validates its header.
fn open_shard(path: &Path) -> Result<(Shard, Vec<TensorInfo>), LoadError> {
    let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
    let len = file.metadata().map_err(|e| LoadError::io(path, e))?.len();
    if len < 8 {
        return Err(LoadError::HeaderTooShort {
            path: path.to_path_buf(),
            len,
        });
    }
    // SAFETY: the mapping is read-only and lives as long as the `Checkpoint`. The caller must not
    // truncate or rewrite checkpoint files while they are open (the usual contract of memory-mapped
    // model loading); every offset handed out is validated against the mapped length.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
    let infos = parse_safetensors(&mmap, path)?;
    Ok((
        Shard {
            path: path.to_path_buf(),
            mmap,
        },
        infos,
    ))
}

/// The shard index: each tensor's shard file name, and the distinct shard names in first-seen order.
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
    shards: Vec<String>,
}

fn read_index(path: &Path) -> Result<ShardIndex, LoadError> {
    let err = |msg: String| LoadError::IndexJson {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| err("missing `weight_map` object".to_string()))?;
    if map.is_empty() {
        return Err(err("`weight_map` is empty".to_string()));
    }
    let mut weight_map = BTreeMap::new();
    let mut shards: Vec<String> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| err(format!("weight_map entry for `{tensor}` is not a string")))?;
        let plain = !shard.is_empty()
            && Path::new(shard)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(err(format!(
                "shard `{shard}` for `{tensor}` is not a relative path inside the checkpoint"
            )));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
        weight_map.insert(tensor.clone(), shard.to_string());
    }
    Ok(ShardIndex { weight_map, shards })
}

impl Checkpoint {
    /// Opens a checkpoint directory: `config.json` plus `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json` (`weight_map`). A single file takes precedence over an index.
    ///
    /// Validates the config, every safetensors header (see [`parse_safetensors`]), that no tensor
    /// is stored twice, that the index agrees with the shards, and that every tensor the config
    /// implies is present with the right shape. Extra tensors (e.g. `rotary_emb.inv_freq`, or
    /// `lm_head.weight` with tied embeddings) are kept but not required.
    ///
    /// `dir` may also be a `.gguf` file, or a directory holding exactly one `.gguf` and no
    /// `config.json`: see [`Checkpoint::open_gguf`].
    pub fn open(dir: &Path) -> Result<Checkpoint, LoadError> {
        if let Some(file) = gguf_path(dir)? {
            return Checkpoint::open_gguf(&file);
        }
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;

        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        let (weights_path, shard_names, weight_map) = if single.exists() {
            (single, vec![SINGLE_FILE.to_string()], None)
        } else if index_path.exists() {
            let index = read_index(&index_path)?;
            for shard in &index.shards {
                if !dir.join(shard).exists() {
                    return Err(LoadError::MissingShard {
                        index_path,
                        shard: shard.clone(),
                    });
                }
            }
            (index_path, index.shards, Some(index.weight_map))
        } else {
            return Err(LoadError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut index: BTreeMap<String, Entry> = BTreeMap::new();
        for (shard_idx, name) in shard_names.iter().enumerate() {
            let (shard, infos) = open_shard(&dir.join(name))?;
            for info in infos {
                if let Some(prev) = index.get(&info.name) {
                    let other = shards
                        .get(prev.shard)
                        .map_or_else(PathBuf::new, |s: &Shard| s.path.clone());
                    return Err(LoadError::DuplicateTensor {
                        path: shard.path.clone(),
                        tensor: info.name,
                        other,
                    });
                }
                index.insert(
                    info.name.clone(),
                    Entry {
                        shard: shard_idx,
                        info,
                    },
                );
            }
            shards.push(shard);
        }

        // The index must agree with where tensors actually are.
        if let Some(weight_map) = &weight_map {
            for (tensor, shard_name) in weight_map {
                let shard_idx = shard_names.iter().position(|s| s == shard_name);
                let found = index.get(tensor).map(|e| e.shard);
                if found.is_none() || found != shard_idx {
                    return Err(LoadError::MissingTensor {
                        path: dir.join(shard_name),
                        tensor: tensor.clone(),
                    });
                }
            }
        }

        let checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            weights_path,
            storage: Storage::Mapped(shards),
            index,
        };
        checkpoint.validate_tensors()?;
        Ok(checkpoint)
    }

    /// A checkpoint from a `config.json` text and a single safetensors image already in
    /// memory (a model built into the program with `include_bytes!`): no files, no mapping.
    /// `name` labels it in errors (as if it were a directory). Validated like [`Checkpoint::open`].
    pub fn from_static(
        name: &str,
        config_json: &str,
        weights: &'static [u8],
    ) -> Result<Checkpoint, LoadError> {
        let dir = PathBuf::from(name);
        let config = ModelConfig::from_json_str(config_json, &dir.join(CONFIG_FILE))?;
        let weights_path = dir.join(SINGLE_FILE);
        if weights.len() < 8 {
            return Err(LoadError::HeaderTooShort {
                path: weights_path,
                len: weights.len() as u64,
            });
        }
        let index = parse_safetensors(weights, &weights_path)?
            .into_iter()
            .map(|info| (info.name.clone(), Entry { shard: 0, info }))
            .collect();
        let checkpoint = Checkpoint {
            dir,
            config,
            weights_path,
            storage: Storage::Static(weights),
            index,
        };
        checkpoint.validate_tensors()?;
        Ok(checkpoint)
    }

    /// Opens a GGUF file: maps it, validates the header (see [`gguf::parse_gguf`]), reads the
    /// config from its metadata, and dequantises every tensor to an owned f32 buffer under its
    /// Hugging Face name (Llama's q/k rows put back in Hugging Face's rope order). The mapping
    /// is dropped once the tensors are decoded. Every tensor the config implies must be present
    /// with the right shape, as for safetensors.
    pub fn open_gguf(path: &Path) -> Result<Checkpoint, LoadError> {
        let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
        // SAFETY: read-only mapping, dropped before this function returns; the caller must not
        // truncate or rewrite the file meanwhile (the usual memory-mapped loading contract).
        // Every offset read through it is bounds-checked by `parse_gguf`.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        let header = gguf::parse_gguf(&mmap, path)?;
        let has = |name: &str| header.tensors.iter().any(|t| t.name == name);
        let config = gguf::gguf_config(
            &header,
            path,
            has("output.weight"),
            has("blk.0.attn_q.bias"),
        )?;
        let loaded = gguf::load_tensors(&header, &mmap, path, &config)?;
        drop(mmap);

        let mut index = BTreeMap::new();
        let mut buffers = Vec::with_capacity(loaded.len());
        let mut stored_types = BTreeMap::new();
        for (i, t) in loaded.into_iter().enumerate() {
            let info = TensorInfo {
                name: t.name.clone(),
                dtype: DType::F32,
                shape: t.shape,
                start: 0,
                end: t.values.len() * 4,
            };
            if index.contains_key(&t.name) {
                return Err(LoadError::DuplicateTensor {
                    path: path.to_path_buf(),
                    tensor: t.name,
                    other: path.to_path_buf(),
                });
            }
            stored_types.insert(t.name.clone(), t.stored);
            index.insert(t.name, Entry { shard: i, info });
            // Stored little-endian so the bytes match what a TensorView promises.
            buffers.push(
                t.values
                    .into_iter()
                    .map(|v| f32::from_bits(v.to_bits().to_le()))
                    .collect(),
            );
        }
        let source = GgufSource {
            path: path.to_path_buf(),
            version: header.version,
            metadata: header.metadata,
            stored_types,
        };
        let checkpoint = Checkpoint {
            dir: path.parent().map_or_else(PathBuf::new, Path::to_path_buf),
            config,
            weights_path: path.to_path_buf(),
            storage: Storage::Owned(buffers, Box::new(source)),
            index,
        };
        checkpoint.validate_tensors()?;
        Ok(checkpoint)
    }

    /// The GGUF file's metadata and stored types, for a checkpoint opened from a GGUF.
    pub fn gguf(&self) -> Option<&GgufSource> {
        match &self.storage {
            Storage::Owned(_, source) => Some(source),
            Storage::Mapped(_) | Storage::Static(_) => None,
        }
    }

    /// Checks that every tensor the config implies is present with the right shape.
    fn validate_tensors(&self) -> Result<(), LoadError> {
        for (name, shape) in self.config.expected_tensors() {
            let Some(entry) = self.index.get(&name) else {
                return Err(LoadError::MissingTensor {
                    path: self.weights_path.clone(),
                    tensor: name,
                });
            };
            if entry.info.shape != shape {
                return Err(LoadError::WrongShape {
                    path: self.shard_path(entry.shard),
                    tensor: name,
                    expected: shape,
                    actual: entry.info.shape.clone(),
                });
            }
        }
        Ok(())
    }

    fn shard_path(&self, shard: usize) -> PathBuf {
        match &self.storage {
            Storage::Mapped(shards) => shards
                .get(shard)
                .map_or_else(|| self.weights_path.clone(), |s| s.path.clone()),
            Storage::Owned(..) | Storage::Static(_) => self.weights_path.clone(),
        }
    }

    fn view<'a>(&'a self, entry: &'a Entry) -> Option<TensorView<'a>> {
        let bytes: &[u8] = match &self.storage {
            Storage::Mapped(shards) => &shards.get(entry.shard)?.mmap,
            Storage::Owned(buffers, _) => owned_bytes(buffers.get(entry.shard)?),
            Storage::Static(bytes) => bytes,
        };
        let data = bytes.get(entry.info.start..entry.info.end)?;
        Some(TensorView {
            name: &entry.info.name,
            dtype: entry.info.dtype,
            shape: &entry.info.shape,
            data,
        })
    }

    /// Tells the OS that the named tensor's mapped file pages are not needed now (a backend
    /// that has copied the tensor calls it), so a model's file pages and its in-memory copy
    /// are not both resident at once. Reading the tensor again still works: its pages come
    /// back from the file. Only whole pages inside the tensor are released; a tensor held in
    /// memory (a dequantised GGUF) or an unknown name is left as it is.
    pub fn release_pages(&self, name: &str) {
        let (Storage::Mapped(shards), Some(entry)) = (&self.storage, self.index.get(name)) else {
            return;
        };
        let Some(shard) = shards.get(entry.shard) else {
            return;
        };
        const PAGE: usize = 4096;
        let start = entry.info.start.div_ceil(PAGE) * PAGE;
        let end = entry.info.end / PAGE * PAGE;
        if end <= start || end > shard.mmap.len() {
            return;
        }
        // SAFETY: the mapping is a read-only, shared mapping of the file (`Mmap::map`), so
        // MADV_DONTNEED only drops clean page-cache pages from this process; any later read
        // of the range (through a `TensorView` still alive) faults the same bytes back in
        // from the file, the same guarantee as the mapping itself. The range lies inside the
        // mapping (checked above) and is page-aligned.
        let _ = unsafe {
            shard.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                end - start,
            )
        };
    }

    /// The validated config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The checkpoint directory (for a GGUF, the directory holding the file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A zero-copy view of the named tensor; [`LoadError::MissingTensor`] if there is none.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, LoadError> {
        self.index
            .get(name)
            .and_then(|e| self.view(e))
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.weights_path.clone(),
                tensor: name.to_string(),
            })
    }

    /// Views of every stored tensor (including extra ones), sorted by name.
    pub fn tensors(&self) -> Vec<TensorView<'_>> {
        self.index.values().filter_map(|e| self.view(e)).collect()
    }

    /// The safetensors files backing this checkpoint, in shard order (or the GGUF file).
    pub fn files(&self) -> Vec<PathBuf> {
        match &self.storage {
            Storage::Mapped(shards) => shards.iter().map(|s| s.path.clone()).collect(),
            Storage::Owned(..) | Storage::Static(_) => vec![self.weights_path.clone()],
        }
    }
}
