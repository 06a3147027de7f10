//! Random sequences of engine calls (add / feed / fork / join / finish / cancel / release /
//! forget / step) on a tiny pool, with the engine's invariant checks on: every call returns
//! a value or a typed error, never a panic; after every step the incremental plan equals
//! the plan built from scratch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_loader::ModelConfig;
use spindle::backend::null::NullBackend;
use spindle::kv::SharedTail;
use spindle::plan::{AttentionPlan, PlanThread};
use spindle::{AttentionMode, Engine, EngineConfig, JoinKind};

const CONFIG: &str = include_str!("../../tests/fixtures/tiny-llama/config.json");

/// Reads bytes one at a time, zeros once the input runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

fn scratch_plan(e: &Engine<NullBackend>) -> AttentionPlan {
    let out = e.last_output();
    let bs = e.pool().block_size();
    let mut row = 0u32;
    let threads: Vec<PlanThread> = out
        .threads
        .iter()
        .map(|t| {
            let view = &e.thread(t.thread).expect("an output's thread exists").view;
            let rows = (0..t.fed)
                .map(|i| (row + i as u32, (view.len() - t.fed + i + 1) as u32))
                .collect();
            row += t.fed as u32;
            PlanThread {
                chunks: view.chunks(bs),
                rows,
            }
        })
        .collect();
    AttentionPlan::build(&threads, e.config().mode, e.config().split_tokens)
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let Ok(cfg) = ModelConfig::from_json_str(CONFIG, "config.json".as_ref()) else {
        return;
    };
    let vocab = cfg.vocab_size as u32;
    let setup = b.next();
    let block = [1usize, 2, 4, 16][(setup & 3) as usize];
    let blocks = 4 + (b.next() % 60) as usize;
    let mut e = Engine::new(
        NullBackend::new(cfg, block, blocks),
        EngineConfig {
            mode: if setup & 4 == 0 {
                AttentionMode::Forked
            } else {
                AttentionMode::Naive
            },
            split_tokens: [0, 3, 8, 512][((setup >> 3) & 3) as usize],
            max_step_tokens: 1 + (b.next() % 64) as usize,
            prefill_chunk: 1 + (b.next() % 16) as usize,
            shared_tail: if setup & 32 == 0 {
                SharedTail::NewSpan
            } else {
                SharedTail::CopyOnWrite
            },
            max_fork_width: 8,
            max_fork_depth: 4,
            check_invariants: true,
        },
    );
    for _ in 0..256 {
        if b.0.is_empty() {
            break;
        }
        let op = b.next() % 12;
        let n = e.threads().len() + 2;
        let id = b.next() as usize % n;
        let arg = b.next();
        let tokens: Vec<u32> = (0..arg % 24)
            .map(|i| (u32::from(arg) * 31 + i as u32) % (vocab + 2))
            .collect();
        let _ = match op {
            0 => e.add_request(&tokens).map(drop),
            1 => e.feed(id, &tokens),
            2 => e.fork(id, (arg % 6) as usize, arg & 8 == 0).map(drop),
            3 => e
                .fork_with(id, (arg % 6) as usize, true, Some(JoinKind::Reprefill))
                .map(drop),
            4 => e.finish(id),
            5 => e
                .join(
                    id,
                    if arg & 1 == 0 {
                        JoinKind::Reuse
                    } else {
                        JoinKind::Reprefill
                    },
                )
                .map(drop),
            6 => e.cancel(id),
            7 => e.cancel_thread(id),
            8 => e.release_cache(id),
            9 => e.forget(id),
            10 => e.set_returns(id, &tokens),
            _ => match e.step() {
                Ok(_) => {
                    assert_eq!(
                        e.last_plan(),
                        &scratch_plan(&e),
                        "incremental plan differs from the plan built from scratch"
                    );
                    Ok(())
                }
                Err(err) => Err(err),
            },
        };
    }
    // Cancelling every request leaves every block free.
    let roots: Vec<usize> = e
        .threads()
        .iter()
        .filter(|t| t.parent.is_none())
        .map(|t| t.id)
        .collect();
    for r in roots {
        e.cancel(r).expect("cancel a root");
    }
    assert!(e.pool().all_free(), "blocks leaked");
});
