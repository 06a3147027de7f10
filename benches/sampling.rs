//! The host sampler's cost per row (`spindle::generate::sample_row`, what the CPU backend
//! and every custom-free request on it run once per generated token): microseconds per
//! sampled row at real vocabularies (SmolLM2's 49,152, Qwen's 151,936) and the settings
//! people use (`spindle run`'s default temperature 0.6 / top-k 20 / top-p 0.95, a plain
//! top-p 0.9, a top-k 50). Logits are a fixed pseudo-random row with a peaked head, like a
//! model's. Median of 9 rounds of `--reps` rows each (default 200, `--quick` 20). Writes
//! `target/bench/sampling.csv` (`vocab,temperature,top_k,top_p,us_per_row`;
//! `SPINDLE_BENCH_DIR` overrides).
//!
//! `cargo bench --bench sampling [-- --quick]`

use spindle::generate::{sample_row, RowSampling};
use std::path::PathBuf;
use std::time::Instant;

fn logits(vocab: usize) -> Vec<f32> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..vocab)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32;
            // A few dozen likely tokens over a long tail.
            if i % 997 == 3 {
                8.0 + 4.0 * u
            } else {
                4.0 * u - 2.0
            }
        })
        .collect()
}

fn main() {
    let mut reps = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => reps = 20,
            "--reps" => {
                reps = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                    eprintln!("sampling: --reps needs a number");
                    std::process::exit(2)
                })
            }
            "--bench" => {}
            other => {
                eprintln!("sampling: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let settings = [(0.6f32, 20u32, 0.95f32), (1.0, 0, 0.9), (0.7, 50, 1.0)];
    let mut csv = String::from("vocab,temperature,top_k,top_p,us_per_row\n");
    println!("vocab   temperature top_k top_p   us/row");
    for vocab in [49_152usize, 151_936] {
        let row = logits(vocab);
        for &(temperature, top_k, top_p) in &settings {
            let mut rounds = Vec::with_capacity(9);
            let mut sink = 0u64;
            for _ in 0..9 {
                let t = Instant::now();
                for r in 0..reps {
                    let s = RowSampling {
                        temperature,
                        top_k,
                        top_p,
                        uniform: (r as f64 * 0.618_033_988_7) % 1.0,
                    };
                    sink = sink.wrapping_add(sample_row(&row, &s) as u64);
                }
                rounds.push(t.elapsed().as_secs_f64() * 1e6 / reps as f64);
            }
            rounds.sort_by(f64::total_cmp);
            let us = rounds[rounds.len() / 2];
            println!(
                "{vocab:<7} {temperature:>11} {top_k:>5} {top_p:>5} {us:>8.1}   (sink {})",
                sink % 10
            );
            csv.push_str(&format!("{vocab},{temperature},{top_k},{top_p},{us:.2}\n"));
        }
    }
    let dir = std::env::var_os("SPINDLE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let path = dir.join("sampling.csv");
    std::fs::write(&path, csv).expect("csv");
    println!("sampling: wrote {}", path.display());
}
