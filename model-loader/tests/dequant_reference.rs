//! The dequantisers against gguf-py (llama.cpp's Python package) on random blocks:
//! `tests/data/dequant-reference.json`, made by `scripts/make-dequant-reference.py`.

use model_loader::dequant::dequantize;
use model_loader::GgmlType;
use serde_json::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn random_blocks_match_gguf_py() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/dequant-reference.json"
    );
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("JSON");
    let mut types = 0;
    for name in ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"] {
        let case = &r[name];
        let ty = GgmlType::from_id(case["id"].as_u64().expect("id") as u32).expect("known type");
        assert_eq!(ty.name(), name);
        let bytes = hex(case["bytes"].as_str().expect("bytes"));
        let want: Vec<f32> = serde_json::from_value(case["values"].clone()).expect("values");
        let got = dequantize(ty, &bytes).expect("whole blocks");
        assert_eq!(got.len(), want.len(), "{name}");
        let mut worst = 0f32;
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs() / w.abs().max(1e-3));
        }
        println!(
            "{name}: {} values, max relative diff vs gguf-py {worst:.2e}",
            got.len()
        );
        assert!(worst <= 1e-6, "{name}: {worst}");
        types += 1;
    }
    assert_eq!(types, 5);
}
