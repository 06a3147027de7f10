//! Every input the fuzz targets (`fuzz/`, cargo-fuzz on nightly) found a problem with, kept
//! under `fuzz/regressions/<target>/` and replayed here on stable through the same checks the
//! targets run (`fuzz/checks.rs`): each must now give a typed error or a consistent result,
//! never a panic. Findings and how to fuzz: `docs/reliability.md`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

#[test]
fn every_kept_fuzz_input_passes_its_target_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut targets: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fuzz/regressions")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    targets.sort();
    for dir in targets {
        let target = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("target name")
            .to_string();
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("target folder")
            .map(|e| e.expect("entry").path())
            .collect();
        inputs.sort();
        for input in inputs {
            let data = std::fs::read(&input).expect("input");
            assert!(
                checks::run(&target, &data),
                "{}: no fuzz target {target}",
                input.display()
            );
        }
    }
}

#[test]
fn the_seed_shapes_pass_every_check() {
    // Quick sanity on stable that each check accepts well-formed inputs end to end.
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for f in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let dir = fixtures.join(f);
        checks::config_json(&std::fs::read(dir.join("config.json")).expect("config"));
        checks::safetensors_header(&std::fs::read(dir.join("model.safetensors")).expect("st"));
        checks::tree_file(&std::fs::read(dir.join("reference.json")).expect("reference"));
    }
    for sel in 0..0x20u8 {
        checks::protocol_tokens(&[sel, 0, 0x41, 2, 0x42, 0x43, 3, 2, 0x44, 3, 1, 0x45, 4]);
    }
}
