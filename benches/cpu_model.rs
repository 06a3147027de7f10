//! The whole model on the CPU backend, in tokens per second: a prefill (a P-token prompt,
//! last logits only) and a shared-prefix decode (the prompt forked into W threads that each
//! decode S greedy tokens), forked and per-thread attention side by side.
//!
//! `cargo bench --bench cpu_model -- --model DIR [--prompt 512] [--width 8,64] [--steps 32]`
//! (`--quick` for one small run). Without `--model` it builds a SmolLM2-135M-shaped
//! synthetic checkpoint (random weights: speed depends on shapes only). Prints one line per
//! workload and writes `target/bench/cpu_model.csv` (`SPINDLE_BENCH_DIR` overrides).
//! `scripts/bench-vs-torch` runs it beside PyTorch on the same checkpoint.

use model_loader::Checkpoint;
use spindle::backend::cpu::CpuBackend;
use spindle::generate::sampler::argmax;
use spindle::{AttentionMode, Engine, EngineConfig, ThreadId};
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Args {
    model: Option<PathBuf>,
    prompt: usize,
    widths: Vec<usize>,
    steps: usize,
    quick: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: None,
        prompt: 512,
        widths: vec![8, 64],
        steps: 32,
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> Result<usize, String> {
        let v = v.ok_or(format!("{what} needs a value"))?;
        v.parse().map_err(|_| format!("bad {what} {v}"))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--model" => a.model = Some(PathBuf::from(it.next().ok_or("--model needs a dir")?)),
            "--prompt" => a.prompt = num(it.next(), "--prompt")?,
            "--steps" => a.steps = num(it.next(), "--steps")?,
            "--width" => {
                let v = it.next().ok_or("--width needs a value")?;
                a.widths = v
                    .split(',')
                    .map(|w| w.parse().map_err(|_| format!("bad --width {v}")))
                    .collect::<Result<_, _>>()?;
            }
            "--quick" => a.quick = true,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.quick {
        a.prompt = a.prompt.min(128);
        a.widths = vec![4];
        a.steps = a.steps.min(8);
    }
    Ok(a)
}

/// A deterministic prompt of `n` tokens inside the vocabulary.
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn engine(ck: &Checkpoint, tokens: usize, mode: AttentionMode) -> Engine<CpuBackend> {
    let bs = 16;
    let blocks = tokens.div_ceil(bs) + 64;
    let backend = CpuBackend::load(ck, blocks, bs).expect("CPU backend loads the checkpoint");
    Engine::new(
        backend,
        EngineConfig {
            mode,
            ..Default::default()
        },
    )
}

/// Runs the engine until idle; returns the root's last logits row.
fn run_prefill(e: &mut Engine<CpuBackend>, root: ThreadId) -> Vec<f32> {
    let mut last = Vec::new();
    while e.has_work() {
        let out = e.step().expect("step");
        for t in out.threads {
            if t.thread == root {
                if let Some(row) = out.last_logits(t) {
                    last = row.to_vec();
                }
            }
        }
    }
    last
}

/// Prefill tokens per second (the prompt, last logits only).
fn prefill(ck: &Checkpoint, p: usize) -> f64 {
    let vocab = ck.config().vocab_size;
    let mut e = engine(ck, p, AttentionMode::Forked);
    let t0 = Instant::now();
    let root = e.add_request(&prompt(p, vocab)).expect("add");
    let last = run_prefill(&mut e, root);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(last.len(), vocab, "prefill produced its last logits");
    p as f64 / secs
}

/// Decode tokens per second: the prompt (untimed) forked into `w` threads, each decoding
/// `steps` greedy tokens.
fn decode(ck: &Checkpoint, p: usize, w: usize, steps: usize, mode: AttentionMode) -> f64 {
    let vocab = ck.config().vocab_size;
    let mut e = engine(ck, p + w * (steps + 1), mode);
    let root = e.add_request(&prompt(p, vocab)).expect("add");
    let last = run_prefill(&mut e, root);
    let kids = e.fork(root, w, true).expect("fork");
    let first = argmax(&last);
    for (i, &k) in kids.iter().enumerate() {
        // Distinct first tokens, so the threads diverge at once.
        e.feed(k, &[(first as usize + i) as u32 % vocab as u32])
            .expect("feed");
    }
    let mut next = Vec::with_capacity(w);
    let t0 = Instant::now();
    for s in 0..steps {
        let out = e.step().expect("step");
        assert_eq!(out.rows, w, "one row per thread");
        if s + 1 == steps {
            break;
        }
        next.clear();
        for t in out.threads {
            let row = out.last_logits(t).expect("logits");
            next.push((t.thread, argmax(row)));
        }
        for &(t, token) in &next {
            e.feed(t, &[token]).expect("feed");
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    (w * steps) as f64 / secs
}

fn synthetic(dir: &Path) -> PathBuf {
    use model_loader::{write_safetensors, Arch, DType, Preset, TensorSpec};
    // SmolLM2-135M's shape: Llama, 30 layers, hidden 576, 9 heads / 3 kv-heads, head_dim
    // 64, intermediate 1536, vocab 49152, tied embeddings.
    let mut c = model_loader::preset_config(Arch::Llama, Preset::Tiny);
    c.hidden_size = 576;
    c.num_layers = 30;
    c.num_heads = 9;
    c.num_kv_heads = 3;
    c.head_dim = 64;
    c.intermediate_size = 1536;
    c.vocab_size = 49152;
    c.tie_word_embeddings = true;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&c.to_hf_json()).expect("json"),
    )
    .expect("config");
    let tensors = c.expected_tensors();
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, shape)| TensorSpec {
            name: name.clone(),
            dtype: DType::F32,
            shape: shape.clone(),
        })
        .collect();
    let mut state = 1u32;
    write_safetensors(&dir.join("model.safetensors"), &specs, &mut |i, w| {
        let (name, shape) = &tensors[i];
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        let (center, amp) = if name.ends_with("norm.weight") {
            (1.0, 0.1)
        } else {
            (0.0, (3.0 / fan_in).sqrt())
        };
        let mut bytes = Vec::with_capacity(4 * n);
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let u = (state >> 8) as f32 / (1u32 << 24) as f32;
            bytes.extend_from_slice(&(center + amp * (2.0 * u - 1.0)).to_le_bytes());
        }
        w.write_all(&bytes)
    })
    .expect("weights");
    dir.to_path_buf()
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cpu_model: {e}");
            std::process::exit(2);
        }
    };
    let out_dir = std::env::var_os("SPINDLE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out_dir).expect("bench dir");
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => synthetic(&out_dir.join("smollm2-135m-synthetic")),
    };
    let ck = Checkpoint::open(&dir).unwrap_or_else(|e| {
        eprintln!("cpu_model: {e}");
        std::process::exit(1);
    });
    let c = ck.config();
    println!(
        "cpu_model: {} ({} layers, hidden {}, {}/{} heads, vocab {}), prompt {}, {} decode steps",
        dir.display(),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.vocab_size,
        args.prompt,
        args.steps
    );
    let mut csv = String::from("workload,threads,prompt,steps,mode,tok_per_s\n");
    let tps = prefill(&ck, args.prompt);
    println!("prefill {} tokens: {tps:.1} tok/s", args.prompt);
    csv.push_str(&format!("prefill,1,{},0,forked,{tps:.2}\n", args.prompt));
    for &w in &args.widths {
        let forked = decode(&ck, args.prompt, w, args.steps, AttentionMode::Forked);
        let naive = decode(&ck, args.prompt, w, args.steps, AttentionMode::Naive);
        println!(
            "decode {w} threads x {} steps over a shared {}-token prefix: forked {forked:.1} tok/s, per-thread {naive:.1} tok/s, forked/per-thread {:.2}x",
            args.steps,
            args.prompt,
            forked / naive
        );
        for (mode, v) in [("forked", forked), ("naive", naive)] {
            csv.push_str(&format!(
                "decode,{w},{},{},{mode},{v:.2}\n",
                args.prompt, args.steps
            ));
        }
    }
    let path = out_dir.join("cpu_model.csv");
    std::fs::write(&path, csv).expect("csv");
    println!("CSV: {}", path.display());
}
