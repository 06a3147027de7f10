//! The fused CUDA step's launch, allocation, memset and copy counts, checked on the host:
//! the step program (`spindle::backend::step_program`) is what the CUDA backend executes op
//! by op, so its counts are the step's (a GPU run checks the executor against it in
//! `tests/gpu_engine.rs`). No device needed; runs in every `cargo test`.

use model_loader::{preset_config, Arch, ModelConfig, Preset};
use spindle::backend::graph_layout::{
    bucket_for, pad_lowered_into, GraphCaps, DEFAULT_MAX_GRAPH_ROWS,
};
use spindle::backend::step_program::{
    forked_attention_launches, pack_step, packed_len, stage_capacity, AttentionArrays, Op,
    PackExtra, StepProgram, StepShape, TokenOp, DEFAULT_MAX_STEP_PARTIALS,
};
use spindle::backend::{RowPick, RowSampling};
use spindle::plan::lower::{lower, lower_into, LowerConfig, LoweredPlan};

mod common;
use common::decode::decode_step;

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
        for (rows, split, tokens) in [
            (1, false, TokenOp::None),
            (16, false, TokenOp::Argmax),
            (64, true, TokenOp::Sample),
        ] {
            let greedy = tokens != TokenOp::None;
            let shape = StepShape {
                rows,
                logit_rows: rows,
                copies: false,
                // Split-KV decode (long views) merges partials in a second launch.
                attention_launches: if split { 2 } else { 1 },
                tokens,
                logits_back: false,
                graph: false,
            };
            let p = StepProgram::build(&cfg, &shape);
            let c = p.counters();
            let per_layer = p.launches_per_layer();
            let max = *per_layer.iter().max().expect("layers");
            // The program has no allocating or zero-filling op (the arena is allocated at
            // load); that the device sees none is measured by the GPU test
            // `fused_step_matches_the_layer_loop_without_allocating`.
            println!(
                "{name} W={rows} split={split} tokens={tokens:?}: {} launches ({} layers, max {max}/layer), {} H2D, {} D2H",
                c.launches, cfg.num_layers, c.h2d_copies, c.d2h_copies
            );
            assert!(max <= MAX_LAUNCHES_PER_LAYER, "{name}: {per_layer:?}");
            assert_eq!(c.h2d_copies, 1, "{name}: one packed input copy");
            assert_eq!(c.d2h_copies, 1, "{name}: one download");
            // Head (embed) + layers + tail (final norm, gather, lm_head[, argmax/sample]).
            let layers: u64 = per_layer.iter().sum();
            assert_eq!(c.launches, 1 + layers + 3 + greedy as u64, "{name}");
            assert_eq!(
                p.ops.contains(&Op::DownloadTokens),
                greedy,
                "{name}: steps that choose on the device bring back token ids only"
            );
            assert_eq!(p.ops.contains(&Op::Download), !greedy, "{name}");
            assert_eq!(p.ops.contains(&Op::Sample), tokens == TokenOp::Sample);

            // The same step replayed as a CUDA graph: one graph launch, the inputs' copy
            // and the tokens' copy; the captured body is the eager program's kernels.
            let g = StepProgram::build(
                &cfg,
                &StepShape {
                    graph: true,
                    ..shape
                },
            );
            let gc = g.counters();
            let body = StepProgram::graph_body(&cfg, &shape);
            println!(
                "{name} W={rows} graph: {} launches, {} graph launch, {} H2D, {} D2H; body {} launches",
                gc.launches,
                gc.graph_launches,
                gc.h2d_copies,
                gc.d2h_copies,
                body.counters().launches
            );
            assert_eq!(gc.launches, 0, "{name}: nothing launched outside the graph");
            assert_eq!(gc.graph_launches, 1, "{name}: one graph launch per step");
            assert_eq!((gc.h2d_copies, gc.d2h_copies), (1, 1), "{name}");
            assert_eq!(body.counters().launches, c.launches, "{name}");
            assert_eq!(body.counters().h2d_copies + body.counters().d2h_copies, 0);
            assert!(body
                .launches_per_layer()
                .iter()
                .all(|&l| l <= MAX_LAUNCHES_PER_LAYER));
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
        tokens: TokenOp::None,
        logits_back: true,
        graph: false,
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
        // The K/V write is fused into qkv_prep (no launch of its own).
        assert_eq!(count(&|o| matches!(o, Op::QkvPrep { .. })), 1);
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

/// The attention arrays travel in the step's one copy: kernel v2's lowering of a real
/// decode step's plan (W threads over a shared 4k prefix) packs into the staging buffer the
/// backend allocates at load for W rows, every array where its range says, so a steady
/// decode step does no allocation and exactly one host-to-device copy; its partials fit the
/// attention workspace allocated at load; the host buffers (lowering, concatenated arrays)
/// keep their capacity from step to step.
#[test]
fn attention_arrays_travel_in_the_one_packed_copy() {
    let cfg = preset_config(Arch::Qwen3, Preset::P1_7B);
    for w in [1usize, 16, 64] {
        let capacity = stage_capacity(w); // what load allocates for max_step_rows = w
        let mut staging = vec![0i32; capacity];
        let mut arrays = AttentionArrays::default();
        let mut lowered = LoweredPlan::default();
        let mut caps = None;
        for age in 0..4 {
            let (step, num_blocks) = decode_step(w, 4096, age);
            let mut lc = LowerConfig::new(cfg.num_heads, cfg.num_kv_heads, num_blocks, 16);
            lc.num_sms = 132; // an H200
            lower_into(&step.plan, &lc, &mut lowered).expect("lowers");
            assert_eq!(lowered, lower(&step.plan, &lc).expect("lowers"));
            arrays.clear();
            let ranges = arrays.push_lowered(&lowered);
            let need = packed_len(&step, &PackExtra::attention(&arrays.data));
            assert!(
                need <= capacity,
                "W={w}: {need} staging elements exceed the load-time {capacity} (the step would grow it)"
            );
            let pack =
                pack_step(&step, &PackExtra::attention(&arrays.data), &mut staging).expect("packs");
            assert_eq!(pack.len, need);
            let r = ranges.shifted(pack.attention.start);
            assert_eq!(r.units.end.max(r.merge_rows.end), pack.attention.end);
            let at = |range: &std::ops::Range<usize>| &staging[range.clone()];
            assert_eq!(at(&r.units), &lowered.units[..]);
            assert_eq!(at(&r.unit_rows), &lowered.unit_rows[..]);
            assert_eq!(at(&r.partial_direct), &lowered.partial_direct[..]);
            assert_eq!(at(&r.chunk_block), &lowered.chunk_block[..]);
            assert_eq!(at(&r.chunk_start), &lowered.chunk_start[..]);
            assert_eq!(at(&r.chunk_len), &lowered.chunk_len[..]);
            assert_eq!(at(&r.row_limit), &lowered.row_limit[..]);
            assert_eq!(at(&r.row_part_ptr), &lowered.row_part_ptr[..]);
            assert_eq!(at(&r.row_parts), &lowered.row_parts[..]);
            assert_eq!(at(&r.merge_rows), &lowered.merge_rows[..]);
            let tokens: Vec<i32> = step.tokens.iter().map(|&t| t as i32).collect();
            assert_eq!(
                at(&pack.tokens),
                &tokens[..],
                "the step's own inputs alongside"
            );
            let program = StepProgram::build(
                &cfg,
                &StepShape {
                    rows: w,
                    logit_rows: w,
                    copies: false,
                    attention_launches: forked_attention_launches(
                        w,
                        lowered.num_units(),
                        lowered.merge_rows.len(),
                    ),
                    tokens: TokenOp::Argmax,
                    logits_back: false,
                    graph: false,
                },
            );
            let c = program.counters();
            println!(
                "qwen3-1.7b W={w} step {age}: {} attention elements ({} units, {} partials, {} chunks) in one copy of {need} of {capacity} staged (no growth); {} H2D",
                arrays.len(),
                lowered.num_units(),
                lowered.num_partials(),
                lowered.chunk_block.len(),
                c.h2d_copies
            );
            assert_eq!(c.h2d_copies, 1);
            assert!(
                lowered.num_partials() <= DEFAULT_MAX_STEP_PARTIALS,
                "W={w}: {} partials outgrow the workspace sized at load",
                lowered.num_partials()
            );
            // Steady decode: a step that fits the host buffers' capacity keeps them.
            if let Some((data_cap, units_cap)) = caps {
                if arrays.len() <= data_cap && lowered.units.len() <= units_cap {
                    assert_eq!(
                        (arrays.data.capacity(), lowered.units.capacity()),
                        (data_cap, units_cap),
                        "W={w} step {age}: host buffers reallocated"
                    );
                }
            }
            caps = Some((arrays.data.capacity(), lowered.units.capacity()));

            // As a CUDA graph step: the lowering fits the bucket's first capacities (so
            // steady decode replays instead of re-capturing), and the padded inputs fit
            // the staging buffer allocated at load.
            let bucket = bucket_for(w, DEFAULT_MAX_GRAPH_ROWS).expect("a bucket");
            let gcaps = GraphCaps::initial(bucket, 132, DEFAULT_MAX_STEP_PARTIALS);
            assert!(gcaps.fits(&lowered), "W={w}: {gcaps:?}");
            let mut padded = LoweredPlan::default();
            pad_lowered_into(&lowered, &gcaps, &mut padded).expect("pads");
            let mut garrays = AttentionArrays::default();
            let granges = garrays.push_lowered(&padded);
            let picks = vec![RowPick::Sample(RowSampling::GREEDY); w];
            let extra = PackExtra {
                attention: &garrays.data,
                picks: &picks,
                pad_rows: bucket,
            };
            let gneed = packed_len(&step, &extra);
            println!(
                "qwen3-1.7b W={w} graph bucket {bucket}: {gcaps:?}, {gneed} staging elements of {capacity}"
            );
            assert!(
                gneed <= capacity,
                "W={w}: graph inputs outgrow the staging buffer"
            );
            let gpack = pack_step(&step, &extra, &mut staging).expect("packs");
            assert_eq!(gpack.tokens.len(), bucket);
            assert_eq!(
                granges.units.len(),
                gcaps.units * 8,
                "a fixed place per bucket"
            );
        }
    }
}

/// The GPU graph test's script (`tests/common/graph_script.rs`) is valid and has the
/// shapes that test relies on: every decode step fits the 8-row bucket, and exactly the
/// step it expects to outgrow the bucket's first chunk capacity does. Run on the CPU.
#[test]
fn the_graph_tests_script_has_the_shapes_it_claims() {
    let ck = model_loader::Checkpoint::open(&common::fixture("tiny-qwen3")).expect("fixture");
    let bs = 8;
    let mut b = spindle::CpuBackend::load(&ck, 1024, bs).expect("cpu backend");
    let (steps, kinds) = common::graph_script::run(&mut b, bs);
    let caps = GraphCaps::initial(8, 132, DEFAULT_MAX_STEP_PARTIALS);
    assert_eq!(steps.len(), kinds.len());
    for (i, ((ids, logits, _, chunks), kind)) in steps.iter().zip(&kinds).enumerate() {
        println!(
            "graph script step {i} ({kind}): {} rows, {chunks} chunks",
            ids.len()
        );
        assert!(
            bucket_for(ids.len(), DEFAULT_MAX_GRAPH_ROWS) == Some(8),
            "step {i}"
        );
        assert_eq!(
            logits.len(),
            ck.config().vocab_size,
            "step {i}: row 2's logits"
        );
    }
    // The first step beyond the first capacities is the one run eagerly (the ones after
    // it run with grown capacities).
    let first_big = steps.iter().position(|s| s.3 > caps.chunks);
    assert!(first_big.is_some(), "some step must outgrow the capacities");
    assert_eq!(first_big, kinds.iter().position(|k| *k == "eager"));
    assert_eq!(kinds.iter().filter(|k| **k == "eager").count(), 1);
    let captures = kinds.iter().filter(|k| **k == "capture").count();
    assert_eq!(captures, 3);
}
