//! `spindle demo`: needs no download. A built-in tiny model (the tiny-qwen2 test fixture:
//! random weights, 2 layers, vocab 384) runs a synthetic scripted workload through the real
//! engine: forks, a nested fork, re-prefill and KV-reuse joins, APR's context-free
//! children, all batched; then prints the trees, the stats, and the steps taken against
//! the steps the same work would need one thread at a time.

use super::run::{print_engine_stats, print_request_stats, StreamPrinter};
use model_loader::Checkpoint;
use spindle::backend::Backend;
use spindle::device::{run_on, Device, EngineJob};
use spindle::engine::{Engine, EngineConfig};
use spindle::error::{Result, SpindleError};
use spindle::generate::demo::workload;
use spindle::generate::{EndReason, Generator, Policy};
use spindle::tokenizer::Tokenizer;
use std::path::PathBuf;

const CONFIG: &str = include_str!("../../tests/fixtures/tiny-qwen2/config.json");
const WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/tiny-qwen2/model.safetensors");
const TOKENIZER: &str = include_str!("../../tests/fixtures/tiny-qwen2/tokenizer.json");

/// Arguments of `spindle demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks (shrink it, e.g. to 24, to see children run in waves).
    #[arg(long, default_value_t = 256)]
    pub blocks: usize,
    /// Write a Chrome trace (open in Perfetto) here.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// auto, cpu or cuda.
    #[arg(long, default_value_t = Device::Auto)]
    pub device: Device,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            block_size: 16,
            blocks: 256,
            trace: None,
            device: Device::Auto,
        }
    }
}

/// Runs `spindle demo` on the built-in model, straight from the program's own bytes.
pub fn run(args: &DemoArgs) -> Result<()> {
    println!("spindle demo: a SYNTHETIC workload.");
    println!("  model: built-in tiny Qwen2 with RANDOM weights (2 layers, vocab 384)");
    println!("  control tags (<Parallel>, <Outline>, </Thread>, <spawn>, ...) are SCRIPTED;");
    println!("  every other token is the model's own argmax (restricted to plain word pieces).");
    println!("  The engine, forward passes, forks, joins and KV cache are real.");
    let ck = Checkpoint::from_static("built-in tiny-qwen2", CONFIG, WEIGHTS)?;
    let tok = Tokenizer::from_bytes(TOKENIZER.as_bytes())?;
    let policy = Policy {
        thread_budget: 64,
        request_budget: 512,
        child_growth_tokens: 32,
        ..Policy::default()
    };
    let job = DemoJob {
        args,
        tok: &tok,
        policy,
    };
    run_on(
        args.device,
        &ck,
        args.blocks,
        args.block_size,
        EngineConfig::default(),
        job,
    )
}

/// The scripted workload on an engine of any backend.
struct DemoJob<'a> {
    args: &'a DemoArgs,
    tok: &'a Tokenizer,
    policy: Policy,
}

impl EngineJob for DemoJob<'_> {
    fn run<B: Backend>(self, engine: Engine<B>) -> Result<()> {
        let DemoJob { args, tok, policy } = self;
        println!("  backend: {}\n", engine.backend().name());
        let mut g = Generator::new(engine, policy);
        let mut ids = Vec::new();
        for d in workload(tok)? {
            let id = g.add_request(d.request)?;
            println!("request r{id}: {}", d.title);
            ids.push(id);
        }
        println!("\n--- streaming (all requests share each step) ---");
        let mut printer = StreamPrinter::new(tok, true);
        g.run(|e| printer.on_event(e))?;
        printer.flush_all();
        println!("\n--- trees ---");
        let mut thread_steps = 0;
        let mut failed = 0;
        for &id in &ids {
            if g.output(id)
                .is_none_or(|out| out.reason == EndReason::Error)
            {
                failed += 1;
            }
            if let Some(out) = g.output(id) {
                print!("{}", out.render_tree(Some(tok)));
                print_request_stats(out);
                thread_steps += out.stats.thread_steps;
                println!();
            }
        }
        let stats = g.engine().stats();
        print_engine_stats(&stats);
        println!(
            "steps: {} fused steps for all requests vs {} one thread at a time ({:.1}x fewer)",
            stats.steps,
            thread_steps,
            thread_steps as f64 / stats.steps.max(1) as f64
        );
        if let Some(path) = &args.trace {
            g.trace().write(path)?;
            println!(
                "trace written to {} (open in https://ui.perfetto.dev)",
                path.display()
            );
        }
        println!("\nThis workload is synthetic: random weights, scripted control tokens.");
        if failed > 0 {
            return Err(SpindleError::RunFailed(format!(
                "{failed} of {} requests failed (see the errors above)",
                ids.len()
            )));
        }
        Ok(())
    }
}
