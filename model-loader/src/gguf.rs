//! GGUF checkpoints (llama.cpp's single-file format): header, metadata and tensor-index parsing
//! with typed errors, the Llama / Qwen2 / Qwen3 metadata mapped to a [`ModelConfig`], tensor
//! names mapped to Hugging Face's, and loading with every tensor dequantised to f32 (with
//! llama.cpp's rope row order for q/k undone, so the weights match Hugging Face's layout).
//!
//! A small writer ([`write_gguf`]) makes GGUF files for tests.

use crate::config::ModelConfig;
use crate::dequant::{dequantize, GgmlType};
use crate::error::LoadError;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Default alignment of the tensor data region and of every tensor in it.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8 (UTF-8).
    String(String),
    /// Type 9: values of one type.
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The value as a non-negative integer, for any integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, for the float types.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, for a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, for an array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The boolean, for a bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
}

/// One entry of the tensor index, validated against the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: innermost (contiguous) first.
    pub dims: Vec<u64>,
    /// The stored element type.
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor's first byte in the file.
    pub start: usize,
    /// Absolute byte offset one past its last byte.
    pub end: usize,
}

impl GgufTensorInfo {
    /// The shape outermost first (row-major, as Hugging Face writes it).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF header: version, metadata and tensor index (in file order).
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Every metadata key and value.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensors, in the order the index lists them.
    pub tensors: Vec<GgufTensorInfo>,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: &str, need: u64) -> LoadError {
        LoadError::GgufTruncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset: self.pos as u64,
            need,
            file_len: self.bytes.len() as u64,
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], LoadError> {
        let slice = usize::try_from(n)
            .ok()
            .and_then(|n| self.bytes.get(self.pos..self.pos.checked_add(n)?))
            .ok_or_else(|| self.truncated(what, n))?;
        self.pos += slice.len();
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], LoadError> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, LoadError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| LoadError::GgufMetadata {
            path: self.path.to_path_buf(),
            key: what.to_string(),
            msg: "is not valid UTF-8".to_string(),
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, LoadError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(LoadError::GgufMetadata {
                        path: self.path.to_path_buf(),
                        key: key.to_string(),
                        msg: format!("bool byte is {b}, not 0 or 1"),
                    })
                }
            },
            8 => GgufValue::String(self.string(key)?),
            9 if depth == 0 => {
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte: a count beyond the rest of the file
                // is truncation, caught before allocating for it.
                let left = (self.bytes.len() - self.pos) as u64;
                if n > left {
                    return Err(self.truncated(key, n));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(LoadError::GgufMetadata {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    msg: if other == 9 {
                        "nested arrays are not supported".to_string()
                    } else {
                        format!("has unknown value type {other}")
                    },
                })
            }
        })
    }
}

/// Parses and validates the GGUF file whose complete contents are `bytes`; `path` is named in
/// errors.
///
/// Checks the magic and version (2 or 3), that the metadata and tensor index lie inside the
/// file, that every tensor has a known ggml type, at most four non-zero dimensions whose
/// innermost is a whole number of blocks, and data inside the file. Never panics.
pub fn parse_gguf(bytes: &[u8], path: &Path) -> Result<GgufHeader, LoadError> {
    let mut r = Reader {
        bytes,
        pos: 0,
        path,
    };
    let magic = r.u32("magic")?;
    if magic != GGUF_MAGIC {
        return Err(LoadError::GgufMagic {
            path: path.to_path_buf(),
            found: magic.to_le_bytes(),
        });
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(LoadError::GgufVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32(&key)?;
        let value = r.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(LoadError::GgufMetadata {
                    path: path.to_path_buf(),
                    key: "general.alignment".into(),
                    msg: format!("must be a power of two, got {v:?}"),
                })
            }
        },
    };

    struct Raw {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        offset: u64,
    }
    let mut raw = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32(&name)?;
        let shape_err = |msg: String| LoadError::GgufShape {
            path: path.to_path_buf(),
            tensor: name.clone(),
            msg,
        };
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(shape_err(format!(
                "has {n_dims} dimensions (1 to 4 allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let type_id = r.u32(&name)?;
        let offset = r.u64(&name)?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| LoadError::UnknownQuant {
            path: path.to_path_buf(),
            tensor: name.clone(),
            type_id,
        })?;
        if dims.contains(&0) {
            return Err(shape_err(format!("has a zero dimension {dims:?}")));
        }
        if dims[0] % ty.block_len() as u64 != 0 {
            return Err(shape_err(format!(
                "innermost dimension {} is not a multiple of the {}-value {ty} block",
                dims[0],
                ty.block_len()
            )));
        }
        raw.push(Raw {
            name,
            dims,
            ty,
            offset,
        });
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;

    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let numel = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let nbytes = numel.and_then(|n| t.ty.bytes_for(n));
        let start = data_start.checked_add(t.offset);
        let end = start.zip(nbytes).and_then(|(s, n)| s.checked_add(n));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(LoadError::GgufShape {
                path: path.to_path_buf(),
                tensor: t.name,
                msg: format!("size of {:?} {} overflows", t.dims, t.ty),
            });
        };
        if end > file_len || t.offset % alignment != 0 {
            return Err(LoadError::GgufTensorData {
                path: path.to_path_buf(),
                tensor: t.name,
                start,
                end,
                file_len,
                alignment,
            });
        }
        tensors.push(GgufTensorInfo {
            name: t.name,
            dims: t.dims,
            ty: t.ty,
            start: start as usize,
            end: end as usize,
        });
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
    })
}

/// The Hugging Face name of a GGUF tensor, or `None` for a name with no counterpart.
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The Hugging Face config a GGUF's metadata describes, validated by
/// [`ModelConfig::from_json_str`] (errors name the GGUF file). `has_output` says whether the
/// file stores `output.weight` (otherwise the embedding is tied); `has_qkv_bias` whether it
/// stores `blk.0.attn_q.bias`.
pub fn gguf_config(
    header: &GgufHeader,
    path: &Path,
    has_output: bool,
    has_qkv_bias: bool,
) -> Result<ModelConfig, LoadError> {
    let meta = &header.metadata;
    let field_err = |key: &str, msg: &str| LoadError::GgufMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        msg: msg.to_string(),
    };
    let arch = meta
        .get("general.architecture")
        .ok_or_else(|| field_err("general.architecture", "is missing"))?
        .as_str()
        .ok_or_else(|| field_err("general.architecture", "must be a string"))?;
    let class = match arch {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        other => {
            return Err(LoadError::UnsupportedArch {
                path: path.to_path_buf(),
                arch: format!("{other} (GGUF general.architecture)"),
            })
        }
    };
    let int = |key: &str| -> Result<Option<u64>, LoadError> {
        let key = format!("{arch}.{key}");
        meta.get(&key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| field_err(&key, "must be a non-negative integer"))
            })
            .transpose()
    };
    let req = |key: &str| -> Result<u64, LoadError> {
        int(key)?.ok_or_else(|| field_err(&format!("{arch}.{key}"), "is missing"))
    };
    let float = |key: &str| -> Result<Option<f64>, LoadError> {
        let key = format!("{arch}.{key}");
        meta.get(&key)
            .map(|v| v.as_f64().ok_or_else(|| field_err(&key, "must be a float")))
            .transpose()
    };
    let token = |key: &str| -> Result<Option<u64>, LoadError> {
        meta.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| field_err(key, "must be a token id"))
            })
            .transpose()
    };
    if let Some(kind) = meta.get(&format!("{arch}.rope.scaling.type")) {
        if kind.as_str() != Some("none") {
            return Err(field_err(
                &format!("{arch}.rope.scaling.type"),
                "is not supported (only plain RoPE)",
            ));
        }
    }
    if header.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        return Err(field_err(
            "rope_freqs.weight",
            "(rope frequency factors) is not supported (only plain RoPE)",
        ));
    }
    let vocab = match int("vocab_size")? {
        Some(v) => v,
        None => meta
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map(|a| a.len() as u64)
            .or_else(|| {
                header
                    .tensors
                    .iter()
                    .find(|t| t.name == "token_embd.weight")
                    .and_then(|t| t.dims.get(1).copied())
            })
            .ok_or_else(|| field_err(&format!("{arch}.vocab_size"), "is missing"))?,
    };
    let mut obj = Map::new();
    obj.insert("architectures".into(), json!([class]));
    obj.insert("vocab_size".into(), json!(vocab));
    obj.insert("hidden_size".into(), json!(req("embedding_length")?));
    obj.insert(
        "intermediate_size".into(),
        json!(req("feed_forward_length")?),
    );
    obj.insert("num_hidden_layers".into(), json!(req("block_count")?));
    let heads = req("attention.head_count")?;
    obj.insert("num_attention_heads".into(), json!(heads));
    obj.insert(
        "num_key_value_heads".into(),
        json!(int("attention.head_count_kv")?.unwrap_or(heads)),
    );
    if let Some(hd) = int("attention.key_length")? {
        obj.insert("head_dim".into(), json!(hd));
    }
    if let Some(theta) = float("rope.freq_base")? {
        obj.insert("rope_theta".into(), json!(theta));
    }
    if let Some(eps) = float("attention.layer_norm_rms_epsilon")? {
        obj.insert("rms_norm_eps".into(), json!(eps));
    }
    if let Some(ctx) = int("context_length")? {
        obj.insert("max_position_embeddings".into(), json!(ctx));
    }
    obj.insert("tie_word_embeddings".into(), json!(!has_output));
    if arch != "qwen2" {
        obj.insert("attention_bias".into(), json!(has_qkv_bias));
    }
    if let Some(eos) = token("tokenizer.ggml.eos_token_id")? {
        obj.insert("eos_token_id".into(), json!(eos));
    }
    if let Some(bos) = token("tokenizer.ggml.bos_token_id")? {
        obj.insert("bos_token_id".into(), json!(bos));
    }
    ModelConfig::from_json_str(&Value::Object(obj).to_string(), path)
}

/// Reorders the rows of a llama.cpp q or k projection (or bias) back to Hugging Face's order.
///
/// llama.cpp's converter interleaves each head's two rotary halves: its row `h*hd + 2i + j`
/// is Hugging Face's row `h*hd + j*hd/2 + i` (`j` in {0, 1}, `i < hd/2`). `w` is
/// `[rows, cols]` row-major with `rows = n_head * hd`.
pub fn unpermute_rope_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head.max(1);
    let half = hd / 2;
    // [rows, cols]
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// One tensor loaded from a GGUF: its Hugging Face name and shape, values in f32, and the
/// type it was stored in.
#[derive(Debug)]
pub struct LoadedTensor {
    /// Hugging Face name (or the GGUF name, for tensors with no counterpart).
    pub name: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Values, row-major; `shape.product()` long.
    pub values: Vec<f32>,
    /// The ggml type it was stored in.
    pub stored: GgmlType,
}

/// Dequantises every tensor of a parsed GGUF (whose file contents are `bytes`) to f32 under its
/// Hugging Face name, undoing llama.cpp's rope row order for Llama's q/k projections.
pub fn load_tensors(
    header: &GgufHeader,
    bytes: &[u8],
    path: &Path,
    config: &ModelConfig,
) -> Result<Vec<LoadedTensor>, LoadError> {
    let permuted = config.arch == crate::config::Arch::Llama;
    let mut out = Vec::with_capacity(header.tensors.len());
    for t in &header.tensors {
        let data = bytes
            .get(t.start..t.end)
            .ok_or_else(|| LoadError::GgufTensorData {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                start: t.start as u64,
                end: t.end as u64,
                file_len: bytes.len() as u64,
                alignment: 1,
            })?;
        let mut values = dequantize(t.ty, data).ok_or_else(|| LoadError::GgufShape {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            msg: format!("{} bytes are not whole {} blocks", data.len(), t.ty),
        })?;
        let shape = t.shape();
        let name = hf_tensor_name(&t.name).unwrap_or_else(|| t.name.clone());
        if permuted {
            let heads = if name.ends_with("self_attn.q_proj.weight")
                || name.ends_with("self_attn.q_proj.bias")
            {
                Some(config.num_heads)
            } else if name.ends_with("self_attn.k_proj.weight")
                || name.ends_with("self_attn.k_proj.bias")
            {
                Some(config.num_kv_heads)
            } else {
                None
            };
            if let Some(n_head) = heads {
                let rows = shape[0];
                let cols = values.len() / rows.max(1);
                if rows % n_head != 0 || (rows / n_head) % 2 != 0 {
                    return Err(LoadError::GgufShape {
                        path: path.to_path_buf(),
                        tensor: t.name.clone(),
                        msg: format!("{rows} rows do not split into {n_head} heads of even size"),
                    });
                }
                values = unpermute_rope_rows(&values, rows, cols, n_head);
            }
        }
        out.push(LoadedTensor {
            name,
            shape,
            values,
            stored: t.ty,
        });
    }
    Ok(out)
}

/// A tensor for [`write_gguf`]: GGUF name, ggml dims (innermost first), ggml type id and the
/// raw encoded bytes.
#[derive(Debug, Clone)]
pub struct GgufTensorSpec {
    /// GGUF tensor name.
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// ggml type id (0 = F32, 3 = Q4_1, ...), written as is.
    pub type_id: u32,
    /// The encoded data.
    pub data: Vec<u8>,
}

/// Encodes a GGUF (version 3, 32-byte alignment) with the given metadata and tensors, in order.
/// No validation: tests use it to make broken files too.
pub fn write_gguf(metadata: &[(String, GgufValue)], tensors: &[GgufTensorSpec]) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(u8::from(*x)),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(items) => {
                let elem = items.first().map_or(4, GgufValue::type_id);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(out, item);
                }
            }
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    let align = DEFAULT_ALIGNMENT as usize;
    let mut out = Vec::new();
    out.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.type_id.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len().div_ceil(align) * align;
    }
    out.resize(out.len().div_ceil(align) * align, 0);
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(out.len().div_ceil(align) * align, 0);
    }
    out
}

/// The GGUF name of a Hugging Face tensor (the inverse of [`hf_tensor_name`]).
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// A GGUF (all tensors F32) of a Hugging Face checkpoint, written the way llama.cpp's converter
/// writes it: config as `{arch}.*` metadata, GGUF tensor names, dims innermost first, and for
/// Llama the q/k rows of each head interleaved (numpy's
/// `w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)`). `extra` metadata (a tokenizer) is
/// appended. Tensors with no GGUF name are left out. For tests and fixtures.
pub fn gguf_from_checkpoint(
    ck: &crate::checkpoint::Checkpoint,
    extra: &[(String, GgufValue)],
) -> Vec<u8> {
    let c = ck.config();
    let arch = c.arch.model_type();
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(arch.into()),
        ),
        (k("block_count"), GgufValue::U32(c.num_layers as u32)),
        (
            k("context_length"),
            GgufValue::U32(c.max_position_embeddings as u32),
        ),
        (k("embedding_length"), GgufValue::U32(c.hidden_size as u32)),
        (
            k("feed_forward_length"),
            GgufValue::U32(c.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            GgufValue::U32(c.num_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            GgufValue::U32(c.num_kv_heads as u32),
        ),
        (k("attention.key_length"), GgufValue::U32(c.head_dim as u32)),
        (k("rope.freq_base"), GgufValue::F32(c.rope_theta)),
        (
            k("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(c.rms_norm_eps),
        ),
        (k("vocab_size"), GgufValue::U32(c.vocab_size as u32)),
    ];
    if let Some(&eos) = c.eos_token_ids.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(eos)));
    }
    if let Some(bos) = c.bos_token_id {
        meta.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(bos)));
    }
    meta.extend_from_slice(extra);
    let mut specs = Vec::new();
    for t in ck.tensors() {
        let Some(name) = gguf_tensor_name(t.name) else {
            continue;
        };
        let mut values = t.to_f32();
        let heads = if name.contains(".attn_q.") {
            c.num_heads
        } else if name.contains(".attn_k.") {
            c.num_kv_heads
        } else {
            0
        };
        if c.arch == crate::config::Arch::Llama && heads > 0 {
            // [n_head, 2, hd/2, cols] -> [n_head, hd/2, 2, cols]
            let rows = t.shape[0];
            let cols = values.len() / rows;
            let half = rows / heads / 2;
            let mut out = Vec::with_capacity(values.len());
            for h in 0..heads {
                for i in 0..half {
                    for j in 0..2 {
                        let r = (h * 2 + j) * half + i;
                        out.extend_from_slice(&values[r * cols..(r + 1) * cols]);
                    }
                }
            }
            values = out;
        }
        specs.push(GgufTensorSpec {
            name,
            dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
            type_id: 0,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
    }
    write_gguf(&meta, &specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_panics_on_corruption() {
        let meta = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Array(vec![GgufValue::String("a".into()); 3]),
            ),
        ];
        let tensors = [GgufTensorSpec {
            name: "t".into(),
            dims: vec![32, 2],
            type_id: 3,
            data: vec![7u8; 40],
        }];
        let good = write_gguf(&meta, &tensors);
        let p = Path::new("x.gguf");
        let header = parse_gguf(&good, p).expect("valid file parses");
        assert_eq!(header.tensors[0].shape(), vec![2, 32]);
        assert_eq!(header.tensors[0].end - header.tensors[0].start, 40);
        // Any cut before the tensor data ends is an error (the padding after it is not needed).
        for cut in 0..header.tensors[0].end {
            assert!(parse_gguf(&good[..cut], p).is_err(), "cut at {cut}");
        }
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            let mut f = good.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state % f.len() as u64) as usize;
                f[i] = (state >> 32) as u8;
            }
            let _ = parse_gguf(&f, p);
        }
    }

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.12.self_attn.k_proj.bias",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.3.self_attn.q_norm.weight",
        ] {
            let g = gguf_tensor_name(hf).unwrap();
            assert_eq!(hf_tensor_name(&g).as_deref(), Some(hf));
        }
        assert_eq!(
            hf_tensor_name("blk.7.ffn_gate.weight").as_deref(),
            Some("model.layers.7.mlp.gate_proj.weight")
        );
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermutes_rope_rows() {
        // One head of dim 4, 1 column: HF rows [a0 a1 | b0 b1] are stored by llama.cpp
        // interleaved as [a0 b0 a1 b1].
        let stored = [10.0, 20.0, 11.0, 21.0];
        assert_eq!(
            unpermute_rope_rows(&stored, 4, 1, 1),
            vec![10.0, 11.0, 20.0, 21.0]
        );
        // Two heads of dim 2 (one pair each) stay put.
        assert_eq!(
            unpermute_rope_rows(&[1.0, 2.0, 3.0, 4.0], 4, 1, 2),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }
}
