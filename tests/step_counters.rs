//! The fused CUDA step's launch, allocation, memset and copy counts, checked on the host:
//! the step program (`spindle::backend::step_program`) is what the CUDA backend executes op
//! by op, so its counts are the step's (a GPU run checks the executor against it in
//! `tests/gpu_engine.rs`). No device needed; runs in every `cargo test`.

use model_loader::{preset_config, Arch, ModelConfig, Preset};
use spindle::backend::step_program::{Op, StepProgram, StepShape};

/// The targets for a decode step.
const MAX_LAUNCHES_PER_LAYER: u64 = 12;

fn configs() -> Vec<(String, ModelConfig)> {
    let mut out = Vec::new();
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
            .join("config.json");
        out.push((
            name.to_string(),
            ModelConfig::from_file(&path).expect("fixture config"),
        ));
    }
    for (p, n) in [
        (Preset::P0_6B, "qwen3-0.6b"),
        (Preset::P1_7B, "qwen3-1.7b"),
        (Preset::P8B, "qwen3-8b"),
    ] {
        out.push((n.to_string(), preset_config(Arch::Qwen3, p)));
    }
    // Llama with attention biases: the one shape with an o_proj bias launch.
    let mut llama = preset_config(Arch::Llama, Preset::Tiny);
    llama.attention_bias = true;
    out.push(("llama+bias".to_string(), llama));
    out
}

#[test]
fn decode_step_counts_meet_the_targets() {
    for (name, cfg) in configs() {
        for (rows, split, greedy) in [(1, false, false), (16, false, true), (64, true, true)] {
            let shape = StepShape {
                rows,
                logit_rows: rows,
                copies: false,
                // Split-KV decode (long views) merges partials in a second launch.
                attention_launches: if split { 2 } else { 1 },
                greedy,
            };
            let p = StepProgram::build(&cfg, &shape);
            let c = p.counters();
            let per_layer = p.launches_per_layer();
            let max = *per_layer.iter().max().expect("layers");
            println!(
                "{name} W={rows} split={split} greedy={greedy}: {} launches ({} layers, max {max}/layer), {} allocations, {} memsets, {} H2D, {} D2H",
                c.launches, cfg.num_layers, c.allocations, c.memsets, c.h2d_copies, c.d2h_copies
            );
            assert!(max <= MAX_LAUNCHES_PER_LAYER, "{name}: {per_layer:?}");
            assert_eq!(c.allocations, 0, "{name}");
            assert_eq!(c.memsets, 0, "{name}");
            assert_eq!(c.h2d_copies, 1, "{name}: one packed input copy");
            assert_eq!(c.d2h_copies, 1, "{name}: one download");
            // Head (embed) + layers + tail (final norm, gather, lm_head[, argmax]).
            let layers: u64 = per_layer.iter().sum();
            assert_eq!(c.launches, 1 + layers + 3 + greedy as u64, "{name}");
            assert_eq!(
                p.ops.contains(&Op::DownloadTokens),
                greedy,
                "{name}: greedy steps bring back token ids only"
            );
            assert_eq!(p.ops.contains(&Op::Download), !greedy, "{name}");
        }
    }
}

#[test]
fn every_layer_runs_each_fused_op_once() {
    let cfg = preset_config(Arch::Qwen3, Preset::Tiny);
    let shape = StepShape {
        rows: 4,
        logit_rows: 2,
        copies: true,
        attention_launches: 1,
        greedy: false,
    };
    let p = StepProgram::build(&cfg, &shape);
    for layer in 0..cfg.num_layers {
        let ops: Vec<&Op> = p.ops.iter().filter(|o| o.layer() == Some(layer)).collect();
        let count = |f: &dyn Fn(&Op) -> bool| ops.iter().filter(|o| f(o)).count();
        assert_eq!(
            count(&|o| matches!(o, Op::Gemm { .. })),
            4,
            "qkv, o, gate_up, down"
        );
        assert_eq!(count(&|o| matches!(o, Op::QkvPrep { .. })), 1);
        assert_eq!(count(&|o| matches!(o, Op::KvWrite { .. })), 1);
        assert_eq!(count(&|o| matches!(o, Op::Attention { .. })), 1);
        assert_eq!(count(&|o| matches!(o, Op::SiluMul { .. })), 1);
        assert_eq!(
            count(&|o| matches!(o, Op::Norm { .. } | Op::AddNorm { .. })),
            2,
            "input and post-attention norms, residual adds fused"
        );
    }
    assert_eq!(p.ops.first(), Some(&Op::UploadInputs));
    assert_eq!(p.ops.get(1), Some(&Op::CopyBlocks));
    assert_eq!(p.ops.last(), Some(&Op::Download));
}
