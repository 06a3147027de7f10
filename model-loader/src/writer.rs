//! Writing safetensors files by streaming each tensor's bytes from a callback, so that
//! multi-gigabyte checkpoints never have to be held in memory.

use crate::dtype::DType;
use crate::error::LoadError;
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Name, dtype and shape of one tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Size of the tensor's data in bytes (`None` if it overflows u64).
    pub fn byte_len(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_bytes() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
    }
}

/// Counts the bytes a fill callback writes.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count = self.count.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a safetensors file at `path` holding `specs`, laid out contiguously in order.
///
/// `fill(i, w)` must write exactly `specs[i]`'s bytes (little-endian elements, row-major) to `w`;
/// it is called once per spec, in order. Output goes through a `BufWriter`. The header carries
/// `__metadata__: {"format": "pt"}` and is space-padded to a multiple of 8 bytes so the data region
/// is 8-byte aligned. On any error the partial file is removed.
///
/// Errors: [`LoadError::InvalidSpec`] for a duplicate or reserved name or an overflowing shape,
/// [`LoadError::ByteLength`] if a callback writes the wrong number of bytes, [`LoadError::Io`].
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    fill: &mut dyn FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<(), LoadError> {
    let header = build_header(path, specs)?;
    let result = write_file(path, &header, specs, fill);
    if result.is_err() {
        // Best effort: do not leave a truncated file that looks like a checkpoint.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// The padded JSON header for `specs`.
fn build_header(path: &Path, specs: &[TensorSpec]) -> Result<Vec<u8>, LoadError> {
    let invalid = |spec: &TensorSpec, msg: &str| LoadError::InvalidSpec {
        path: path.to_path_buf(),
        tensor: spec.name.clone(),
        msg: msg.to_string(),
    };
    let mut header = Map::new();
    header.insert("__metadata__".to_string(), json!({ "format": "pt" }));
    let mut offset = 0u64;
    for spec in specs {
        if spec.name == "__metadata__" {
            return Err(invalid(spec, "the name is reserved"));
        }
        if header.contains_key(&spec.name) {
            return Err(invalid(spec, "the name is used twice"));
        }
        let end = spec
            .byte_len()
            .and_then(|len| offset.checked_add(len))
            .ok_or_else(|| invalid(spec, "its byte size overflows"))?;
        header.insert(
            spec.name.clone(),
            json!({
                "dtype": spec.dtype.name(),
                "shape": spec.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| LoadError::io(path, std::io::Error::other(e)))?;
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    Ok(bytes)
}

fn write_file(
    path: &Path,
    header: &[u8],
    specs: &[TensorSpec],
    fill: &mut dyn FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<(), LoadError> {
    let io = |e| LoadError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header).map_err(io)?;
    for (i, spec) in specs.iter().enumerate() {
        let mut counting = Counting {
            inner: &mut w,
            count: 0,
        };
        fill(i, &mut counting).map_err(io)?;
        let actual = counting.count;
        let expected = spec.byte_len().unwrap_or(u64::MAX);
        if actual != expected {
            return Err(LoadError::ByteLength {
                path: path.to_path_buf(),
                tensor: spec.name.clone(),
                expected,
                actual,
            });
        }
    }
    w.flush().map_err(io)?;
    Ok(())
}
