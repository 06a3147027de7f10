//! The typed error returned by every fallible operation of the loader.

use std::path::PathBuf;

/// Everything that can go wrong while reading a config, parsing or validating safetensors or
/// GGUF, opening a checkpoint or writing one.
///
/// Every variant names the file involved and, where it applies, the tensor or config field.
/// `Display` renders a single line of the form `PATH: what went wrong`.
#[derive(thiserror::Error, Debug)]
pub enum LoadError {
    /// Reading, mapping, creating or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// `config.json` is not valid JSON (or not a JSON object).
    #[error("{}: invalid config JSON: {msg}", path.display())]
    ConfigJson {
        /// The config file.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },

    /// A config field is missing or has the wrong type or an invalid value.
    #[error("{}: config field `{field}` {msg}", path.display())]
    ConfigField {
        /// The config file.
        path: PathBuf,
        /// The JSON key.
        field: String,
        /// What is wrong with it.
        msg: String,
    },

    /// The config names an architecture this loader does not implement.
    #[error("{}: unsupported architecture `{arch}` (supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)", path.display())]
    UnsupportedArch {
        /// The config file.
        path: PathBuf,
        /// The architecture (or `model_type`) found.
        arch: String,
    },

    /// The config's fields are individually valid but contradict each other.
    #[error("{}: inconsistent config: {msg}", path.display())]
    InconsistentConfig {
        /// The config file.
        path: PathBuf,
        /// Which constraint fails.
        msg: String,
    },

    /// The safetensors file is shorter than its 8-byte header-length prefix.
    #[error("{}: file is {len} bytes, too short for the 8-byte safetensors header length", path.display())]
    HeaderTooShort {
        /// The safetensors file.
        path: PathBuf,
        /// The file's length in bytes.
        len: u64,
    },

    /// The header length prefix points past the end of the file.
    #[error("{}: header length {len} exceeds the {file_len}-byte file", path.display())]
    HeaderLength {
        /// The safetensors file.
        path: PathBuf,
        /// The declared header length.
        len: u64,
        /// The file's length in bytes.
        file_len: u64,
    },

    /// The safetensors header is not valid JSON or does not follow the format.
    #[error("{}: invalid safetensors header: {msg}", path.display())]
    HeaderJson {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong (names the tensor where one is involved).
        msg: String,
    },

    /// A tensor is stored in a dtype this loader does not read (only F32, F16, BF16 are).
    #[error("{}: tensor `{tensor}` has unsupported dtype {dtype} (supported: F32, F16, BF16)", path.display())]
    UnsupportedDType {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype string from the header.
        dtype: String,
    },

    /// A tensor's `data_offsets` are reversed or reach past the data region.
    #[error("{}: tensor `{tensor}` data_offsets [{start}, {end}] are outside the {data_len}-byte data region", path.display())]
    OffsetsOutOfRange {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Declared start, relative to the data region.
        start: u64,
        /// Declared end (exclusive), relative to the data region.
        end: u64,
        /// Length of the data region (file length minus 8 minus header length).
        data_len: u64,
    },

    /// Two tensors' byte ranges overlap.
    #[error("{}: tensors `{a}` and `{b}` have overlapping data_offsets", path.display())]
    OverlappingTensors {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor that starts first.
        a: String,
        /// The tensor whose range starts inside `a`'s.
        b: String,
    },

    /// A tensor's byte length disagrees with dtype size times element count.
    #[error("{}: tensor `{tensor}` has {actual} bytes, expected {expected} from its dtype and shape", path.display())]
    ByteLength {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// dtype size × number of elements.
        expected: u64,
        /// The length given by `data_offsets` (or written by a callback).
        actual: u64,
    },

    /// A tensor required by the config has a different shape.
    #[error("{}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}", path.display())]
    WrongShape {
        /// The safetensors file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        actual: Vec<usize>,
    },

    /// A tensor required by the config (or asked for by name) is absent.
    #[error("{}: missing tensor `{tensor}`", path.display())]
    MissingTensor {
        /// The weights file (`model.safetensors`, the shard the index names, or the index).
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },

    /// The same tensor name is stored in two shards.
    #[error("{}: tensor `{tensor}` is also stored in {}", path.display(), other.display())]
    DuplicateTensor {
        /// The shard where it was found second.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shard where it was found first.
        other: PathBuf,
    },

    /// The shard index names a shard file that does not exist.
    #[error("{}: shard `{shard}` listed in weight_map does not exist", index_path.display())]
    MissingShard {
        /// `model.safetensors.index.json`.
        index_path: PathBuf,
        /// The shard file name as written in the index.
        shard: String,
    },

    /// `model.safetensors.index.json` is not valid JSON or lacks a proper `weight_map`.
    #[error("{}: invalid shard index: {msg}", path.display())]
    IndexJson {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },

    /// The directory has neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{}: no model.safetensors or model.safetensors.index.json", dir.display())]
    NoWeights {
        /// The checkpoint directory.
        dir: PathBuf,
    },

    /// `write_safetensors` was given specs it cannot write (duplicate or reserved name, overflowing shape).
    #[error("{}: cannot write tensor `{tensor}`: {msg}", path.display())]
    InvalidSpec {
        /// The file being written.
        path: PathBuf,
        /// The offending tensor name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },

    /// A GGUF file does not start with the magic `GGUF`.
    #[error("{}: not a GGUF file (magic {found:?}, expected \"GGUF\")", path.display())]
    GgufMagic {
        /// The GGUF file.
        path: PathBuf,
        /// The first four bytes.
        found: [u8; 4],
    },

    /// A GGUF file has a format version this loader does not read (2 and 3 are read).
    #[error("{}: unsupported GGUF version {version} (supported: 2, 3)", path.display())]
    GgufVersion {
        /// The GGUF file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },

    /// The GGUF header (metadata or tensor index) runs past the end of the file.
    #[error("{}: truncated GGUF header: {what} needs {need} bytes at offset {offset} of the {file_len}-byte file", path.display())]
    GgufTruncated {
        /// The GGUF file.
        path: PathBuf,
        /// What was being read (a metadata key, a tensor name, or a header field).
        what: String,
        /// Where it starts.
        offset: u64,
        /// Bytes (or array elements) needed.
        need: u64,
        /// The file's length.
        file_len: u64,
    },

    /// A GGUF metadata value is missing, of the wrong type, or invalid.
    #[error("{}: GGUF metadata `{key}` {msg}", path.display())]
    GgufMetadata {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        msg: String,
    },

    /// A GGUF tensor is stored in a ggml type this loader does not dequantise.
    #[error("{}: tensor `{tensor}` has unknown or unsupported ggml type {type_id} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)", path.display())]
    UnknownQuant {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// The ggml type id.
        type_id: u32,
    },

    /// A GGUF tensor's data lies outside the file or is misaligned.
    #[error("{}: tensor `{tensor}` data [{start}, {end}) is outside the {file_len}-byte file or not {alignment}-byte aligned", path.display())]
    GgufTensorData {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset (exclusive).
        end: u64,
        /// The file's length.
        file_len: u64,
        /// The required alignment of offsets.
        alignment: u64,
    },

    /// A GGUF tensor's dimensions are invalid for its type.
    #[error("{}: tensor `{tensor}` {msg}", path.display())]
    GgufShape {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },

    /// A directory given as a model holds several GGUF files and no `config.json`.
    #[error("{}: holds {count} .gguf files; name the one to load", dir.display())]
    AmbiguousGguf {
        /// The directory.
        dir: PathBuf,
        /// How many `.gguf` files it holds.
        count: usize,
    },

    /// A preset name that is not one of `tiny`, `0.6b`, `1.7b`, `8b`.
    #[error("unknown preset `{0}` (expected one of: tiny, 0.6b, 1.7b, 8b)")]
    BadPreset(String),
}

impl LoadError {
    /// Shorthand for [`LoadError::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.into(),
            source,
        }
    }
}
