//! Helpers shared by the integration tests: fixture paths, scratch directories and raw
//! safetensors surgery for building malformed files.
#![allow(dead_code)]

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A fresh, empty scratch directory unique to `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("model-loader-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a fixture's `config.json` and `model.safetensors` into a fresh scratch directory.
pub fn copy_fixture(fixture: &str, name: &str) -> PathBuf {
    let dir = scratch(name);
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join(fixture).join(file), dir.join(file)).unwrap();
    }
    dir
}

/// The header map and data region of a safetensors file.
pub fn read_raw(path: &Path) -> (Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), bytes[8 + n..].to_vec())
}

/// Writes a safetensors file from a header map and a data region, without any checks.
pub fn write_raw(path: &Path, header: &Map<String, Value>, data: &[u8]) {
    let text = serde_json::to_vec(header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// Applies `edit` to the header of `dir/model.safetensors` and writes it back.
pub fn edit_header(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join("model.safetensors");
    let (mut header, data) = read_raw(&path);
    edit(&mut header);
    write_raw(&path, &header, &data);
}

/// Applies `edit` to `dir/config.json` and writes it back.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}
