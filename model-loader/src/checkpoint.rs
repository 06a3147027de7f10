//! Opening a Hugging Face checkpoint directory: config, memory-mapped safetensors (single file or
//! shards listed in `model.safetensors.index.json`), the tensor index and its validation against
//! the tensors the config implies.

use crate::config::ModelConfig;
use crate::error::LoadError;
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

/// Where a tensor lives: which shard, and its validated header entry.
#[derive(Debug)]
struct Entry {
    shard: usize,
    info: TensorInfo,
}

/// An opened, fully validated checkpoint: its config and zero-copy access to every tensor.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    /// `model.safetensors`, or the index file for a sharded checkpoint (named in lookup errors).
    weights_path: PathBuf,
    shards: Vec<Shard>,
    index: BTreeMap<String, Entry>,
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
    pub fn open(dir: &Path) -> Result<Checkpoint, LoadError> {
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
            shards,
            index,
        };
        checkpoint.validate_tensors()?;
        Ok(checkpoint)
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
        self.shards
            .get(shard)
            .map_or_else(|| self.weights_path.clone(), |s| s.path.clone())
    }

    fn view<'a>(&'a self, entry: &'a Entry) -> Option<TensorView<'a>> {
        let data = self
            .shards
            .get(entry.shard)?
            .mmap
            .get(entry.info.start..entry.info.end)?;
        Some(TensorView {
            name: &entry.info.name,
            dtype: entry.info.dtype,
            shape: &entry.info.shape,
            data,
        })
    }

    /// The validated config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The checkpoint directory.
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

    /// The safetensors files backing this checkpoint, in shard order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }
}
