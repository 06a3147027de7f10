//! Parsing and validating the safetensors format: the 8-byte header length, the JSON header,
//! dtypes, shapes and data offsets (in range, consistent with dtype × shape, not overlapping).

use crate::dtype::DType;
use crate::error::LoadError;
use serde_json::{Map, Value};
use std::path::Path;

/// One tensor entry of a validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first byte in the file (8 + header length + relative start).
    pub start: usize,
    /// Absolute byte offset one past the last byte in the file.
    pub end: usize,
}

/// Parses and fully validates the header of the safetensors file whose complete contents are
/// `bytes`; `path` is named in errors. Returns the tensors sorted by start offset.
///
/// Checks: the 8-byte little-endian header length fits in the file; the header is a JSON object
/// (an optional `__metadata__` object is skipped); each entry has a supported `dtype`, a `shape`
/// of non-negative integers and `data_offsets` `[start, end]` inside the data region whose length
/// equals dtype size × element count; no two tensors overlap. Never panics.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<TensorInfo>, LoadError> {
    let file_len = bytes.len() as u64;
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(LoadError::HeaderTooShort {
            path: path.to_path_buf(),
            len: file_len,
        });
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    let header_too_long = || LoadError::HeaderLength {
        path: path.to_path_buf(),
        len: header_len,
        file_len,
    };
    let header_len_usize = usize::try_from(header_len).map_err(|_| header_too_long())?;
    let (header, data) = rest
        .split_at_checked(header_len_usize)
        .ok_or_else(header_too_long)?;
    let data_base = 8 + header_len_usize; // cannot overflow: header_len_usize <= bytes.len() - 8

    let header_err = |msg: String| LoadError::HeaderJson {
        path: path.to_path_buf(),
        msg,
    };
    let value: Value = serde_json::from_slice(header).map_err(|e| header_err(e.to_string()))?;
    let Value::Object(entries) = value else {
        return Err(header_err("expected a JSON object".to_string()));
    };

    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in &entries {
        if name == "__metadata__" {
            if !entry.is_object() {
                return Err(header_err("`__metadata__` must be an object".to_string()));
            }
            continue;
        }
        let mut info = parse_entry(name, entry, data.len(), path)?;
        info.start += data_base;
        info.end += data_base;
        tensors.push(info);
    }

    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    // Sorted by start, a non-empty tensor overlaps an earlier one exactly when it starts before
    // the furthest end seen so far. Empty tensors occupy no bytes and overlap nothing.
    let mut furthest: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.start != t.end) {
        if let Some(f) = furthest {
            if f.end > t.start {
                return Err(LoadError::OverlappingTensors {
                    path: path.to_path_buf(),
                    a: f.name.clone(),
                    b: t.name.clone(),
                });
            }
        }
        if furthest.is_none_or(|f| t.end > f.end) {
            furthest = Some(t);
        }
    }
    Ok(tensors)
}

/// Validates one header entry; offsets in the result are relative to the data region.
fn parse_entry(
    name: &str,
    entry: &Value,
    data_len: usize,
    path: &Path,
) -> Result<TensorInfo, LoadError> {
    let err = |msg: &str| LoadError::HeaderJson {
        path: path.to_path_buf(),
        msg: format!("tensor `{name}`: {msg}"),
    };
    let obj: &Map<String, Value> = entry
        .as_object()
        .ok_or_else(|| err("entry is not an object"))?;

    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| err("`dtype` is missing or not a string"))?;
    let dtype = DType::from_name(dtype_name).ok_or_else(|| LoadError::UnsupportedDType {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: dtype_name.to_string(),
    })?;

    let shape_value = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| err("`shape` is missing or not a list"))?;
    let shape = shape_value
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| err("`shape` must hold non-negative integers"))?;

    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| err("`data_offsets` is missing or not a list"))?;
    let (start, end) = match offsets.as_slice() {
        [s, e] => match (s.as_u64(), e.as_u64()) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(err("`data_offsets` must hold non-negative integers")),
        },
        _ => return Err(err("`data_offsets` must have exactly two entries")),
    };
    let data_len_u64 = data_len as u64;
    if start > end || end > data_len_u64 {
        return Err(LoadError::OffsetsOutOfRange {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            start,
            end,
            data_len: data_len_u64,
        });
    }

    let expected = shape
        .iter()
        .try_fold(dtype.size_bytes() as u64, |acc, &d| {
            acc.checked_mul(d as u64)
        })
        .ok_or_else(|| err("shape's byte size overflows"))?;
    let actual = end - start;
    if expected != actual {
        return Err(LoadError::ByteLength {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected,
            actual,
        });
    }
    // Both fit in usize: end <= data_len.
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        start: start as usize,
        end: end as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data_len, 0);
        v
    }

    fn p() -> &'static Path {
        Path::new("t.safetensors")
    }

    #[test]
    fn parses_valid_header() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"e":{"dtype":"F16","shape":[0],"data_offsets":[8,8]}}"#;
        let t = parse_safetensors(&file(h, 16), p()).unwrap();
        let names: Vec<_> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "e", "b"]);
        let base = 8 + h.len();
        assert_eq!((t[0].start, t[0].end), (base, base + 8));
    }

    #[test]
    fn detects_non_adjacent_overlap() {
        let h = r#"{"big":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert!(matches!(
            parse_safetensors(&file(h, 16), p()),
            Err(LoadError::OverlappingTensors { .. })
        ));
    }

    #[test]
    fn rejects_bad_headers() {
        let bad = [
            r#"[]"#,
            r#"{"a":1}"#,
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
            r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,4]}}"#,
            r#"{"__metadata__":3}"#,
        ];
        for h in bad {
            assert!(
                matches!(
                    parse_safetensors(&file(h, 4), p()),
                    Err(LoadError::HeaderJson { .. })
                ),
                "{h}"
            );
        }
        let reversed = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#;
        assert!(matches!(
            parse_safetensors(&file(reversed, 4), p()),
            Err(LoadError::OffsetsOutOfRange { .. })
        ));
    }

    #[test]
    fn never_panics_on_corruption() {
        let h = r#"{"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
        let good = file(h, 16);
        for cut in 0..good.len() {
            let _ = parse_safetensors(&good[..cut], p());
        }
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            let mut f = good.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state % f.len() as u64) as usize;
                if let Some(b) = f.get_mut(i) {
                    *b = (state >> 32) as u8;
                }
            }
            let _ = parse_safetensors(&f, p());
        }
    }
}
