//! `spindle run`: adaptive generation on a prompt with a fork/join protocol, streaming the
//! growing tree (one line per thread chunk, prefixed by its path) and ending with stats.
//! Also the stream printer and stats report `spindle demo` shares.

use model_loader::Checkpoint;
use spindle::backend::Backend;
use spindle::device::{run_on, Device, EngineJob};
use spindle::engine::{Engine, EngineConfig, EngineStats};
use spindle::error::{Result, SpindleError};
use spindle::generate::events::path_label;
use spindle::generate::{
    EndReason, Event, Generator, Policy, Request, RequestOutput, SamplingParams, TagProtocol,
};
use spindle::tokenizer::{TextStream, Tokenizer};
use spindle::tree::{RequestId, ThreadId};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `spindle run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json), a .gguf file (its
    /// tokenizer comes from the file), or a directory holding one.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt (control tags written as text become their tokens).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn in the chat template's role markers (ChatML), ending
    /// with the start of the assistant's turn.
    #[arg(long)]
    pub chat: bool,
    /// threadweaver | threadweaver-reuse | multiverse | apr
    #[arg(long, default_value = "threadweaver")]
    pub protocol: String,
    /// 0 is greedy. Defaults follow Qwen3's thinking-mode advice (0.6, top-p 0.95, top-k 20).
    #[arg(long, default_value_t = 0.6)]
    pub temperature: f32,
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens the request generates over all threads (caps --request-budget).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Stop text for the root thread (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Write a Chrome trace (open in Perfetto) here.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks (default: room for the prompt and twice the request budget, since
    /// re-prefilled threads are cached twice).
    #[arg(long)]
    pub blocks: Option<usize>,
    #[arg(long, default_value_t = Policy::default().max_width)]
    pub max_width: usize,
    #[arg(long, default_value_t = Policy::default().max_depth)]
    pub max_depth: usize,
    #[arg(long, default_value_t = Policy::default().thread_budget)]
    pub thread_budget: usize,
    #[arg(long, default_value_t = Policy::default().request_budget)]
    pub request_budget: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value_t = Device::Auto)]
    pub device: Device,
    /// Engine steps A..B (0-based, B exclusive) bracketed by cudaProfilerStart/Stop, for
    /// `nsys`/`ncu` with `--capture-range=cudaProfilerApi` (docs/profiling.md); CUDA only.
    #[arg(long, value_parser = spindle::backend::profile::parse_steps)]
    pub profile_steps: Option<std::ops::Range<u64>>,
}

/// Prints generation events as readable lines: each thread's text in chunks prefixed by
/// its path (`[0.1]`, or `[r2 0.1]` with several requests), plus fork/join/wave notes.
pub struct StreamPrinter<'a> {
    tok: &'a Tokenizer,
    multi: bool,
    control: HashSet<u32>,
    paths: HashMap<ThreadId, (RequestId, Vec<u32>)>,
    streams: HashMap<ThreadId, (TextStream, String)>,
    /// Characters after which a thread's line is flushed.
    pub width: usize,
}

impl<'a> StreamPrinter<'a> {
    /// A printer decoding with `tok`; `multi` prefixes lines with the request id.
    pub fn new(tok: &'a Tokenizer, multi: bool) -> Self {
        Self {
            tok,
            multi,
            control: tok.special_ids().into_iter().collect(),
            paths: HashMap::new(),
            streams: HashMap::new(),
            width: 72,
        }
    }

    fn label(&self, thread: ThreadId) -> String {
        match self.paths.get(&thread) {
            Some((r, p)) if self.multi => format!("[r{r} {}]", path_label(p)),
            Some((_, p)) => format!("[{}]", path_label(p)),
            None => format!("[t{thread}]"),
        }
    }

    fn flush(&mut self, thread: ThreadId) {
        if let Some((_, line)) = self.streams.get_mut(&thread) {
            if !line.is_empty() {
                let text = std::mem::take(line);
                println!("{}", self.render_line(thread, &text));
            }
        }
    }

    /// One output line of a thread's text: indent, label, the text as is (newlines are
    /// split off by `on_event` before, so each text line gets its label).
    pub fn render_line(&self, thread: ThreadId, text: &str) -> String {
        let indent = "  ".repeat(self.paths.get(&thread).map_or(0, |p| p.1.len()));
        format!("{indent}{} {text}", self.label(thread))
    }

    /// Prints every complete text line of `thread` (up to each newline, blank lines included)
    /// and keeps the unfinished rest pending.
    fn flush_lines(&mut self, thread: ThreadId) {
        loop {
            let Some((_, line)) = self.streams.get_mut(&thread) else {
                return;
            };
            let Some(at) = line.find('\n') else { return };
            let head: String = line.drain(..=at).collect();
            let text = head.trim_end_matches('\n');
            println!("{}", self.render_line(thread, text));
        }
    }

    /// Flushes every thread's pending text.
    pub fn flush_all(&mut self) {
        let mut ids: Vec<ThreadId> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.flush(id);
        }
    }

    fn note(&self, thread: ThreadId, text: String) {
        let indent = "  ".repeat(self.paths.get(&thread).map_or(0, |p| p.1.len()));
        println!("{indent}{} ~ {text}", self.label(thread));
    }

    /// Prints one event.
    pub fn on_event(&mut self, e: &Event) {
        match e {
            Event::Token {
                request,
                thread,
                path,
                token,
            } => {
                self.paths.insert(*thread, (*request, path.clone()));
                let (stream, line) = self.streams.entry(*thread).or_default();
                line.push_str(&stream.push(self.tok, *token).unwrap_or_default());
                self.flush_lines(*thread);
                let long = self
                    .streams
                    .get(thread)
                    .is_some_and(|(_, line)| line.len() >= self.width);
                if self.control.contains(token) || long {
                    self.flush(*thread);
                }
            }
            Event::Forked {
                request,
                parent,
                path,
                children,
                join,
                running,
            } => {
                self.flush(*parent);
                self.paths.insert(*parent, (*request, path.clone()));
                for (i, &c) in children.iter().enumerate() {
                    let mut p = path.clone();
                    p.push(i as u32);
                    self.paths.insert(c, (*request, p));
                }
                self.note(
                    *parent,
                    format!("fork into {} threads ({join:?} join), {running} running", children.len()),
                );
            }
            Event::Waves {
                parent,
                children,
                running,
                started,
                free_blocks,
                blocks_per_child,
                ..
            } => self.note(
                *parent,
                format!(
                    "waves: {} started, {running} of {children} running ({free_blocks} free KV blocks, {blocks_per_child} planned per child)",
                    started.len()
                ),
            ),
            Event::ThreadEnded { thread, reason, .. } => {
                self.flush(*thread);
                self.note(*thread, format!("ended ({reason:?})"));
            }
            Event::Joined {
                parent,
                children,
                kind,
                reprefill,
                ..
            } => self.note(
                *parent,
                format!("joined {} threads ({kind:?}, {reprefill} tokens re-prefilled)", children.len()),
            ),
            Event::Preempted { thread } => self.note(*thread, "preempted (recomputed later)".into()),
            Event::Protocol {
                thread, problem, ..
            } => {
                self.flush(*thread);
                self.note(*thread, format!("protocol: {problem}"));
            }
            Event::Error { request, message } => println!("request {request} failed: {message}"),
            Event::Restarted { request, restarts } => println!(
                "request {request}: the KV pool could not hold it beside the others; starting it \
                 again (restart {restarts}), what was shown of it is discarded"
            ),
            Event::Finished { .. } => self.flush_all(),
        }
    }
}

/// Prints a finished request's stats.
pub fn print_request_stats(out: &RequestOutput) {
    let s = &out.stats;
    println!(
        "request {}: {:?}; {} threads, {} forks, peak width {}",
        out.request, out.reason, s.threads, s.forks, s.peak_width
    );
    let per: Vec<String> = s
        .tokens_per_thread
        .iter()
        .map(|t| format!("[{}] {}", t.path, t.tokens))
        .collect();
    println!("  tokens per thread: {}", per.join(", "));
    let ratio = if s.critical_path_tokens > 0 {
        s.total_tokens as f64 / s.critical_path_tokens as f64
    } else {
        0.0
    };
    println!(
        "  critical path {} tokens of {} total ({ratio:.2}x parallelism); {} steps vs {} thread-steps",
        s.critical_path_tokens, s.total_tokens, s.steps, s.thread_steps
    );
}

/// Prints the engine's stats.
pub fn print_engine_stats(s: &EngineStats) {
    println!(
        "engine: {} steps, peak width {}, {} preemptions, {} copy-on-write block copies",
        s.steps, s.peak_width, s.preemptions, s.cow_copies
    );
    println!(
        "KV blocks: peak {} used, {} without sharing: {} saved by sharing",
        s.blocks_peak,
        s.blocks_without_sharing,
        s.blocks_without_sharing.saturating_sub(s.blocks_peak)
    );
    if s.kv_tokens_read_naive > 0 {
        println!(
            "attention K/V tokens read: {} forked vs {} per-thread",
            s.kv_tokens_read, s.kv_tokens_read_naive
        );
    }
}

/// Runs `spindle run`.
pub fn run(args: &RunArgs) -> Result<()> {
    spindle::backend::profile::set_profile_steps(args.profile_steps.clone());
    let ck = Checkpoint::open(&args.model)?;
    let tok = Tokenizer::for_checkpoint(&ck)?;
    let protocol = TagProtocol::preset(&args.protocol, &tok)?;
    let split = protocol.split_tags();
    if !split.is_empty() {
        let list: Vec<String> = split
            .iter()
            .map(|t| format!("{} ({} tokens)", t.text, t.tokens))
            .collect();
        eprintln!(
            "warning: {} tags are not single tokens in this tokenizer: {}; they are matched on the decoded text",
            args.protocol,
            list.join(", ")
        );
    }
    let prompt_text = if args.chat {
        tok.chat_prompt(&args.prompt)?
    } else {
        args.prompt.clone()
    };
    let prompt = tok.encode_prompt(&prompt_text)?;
    let policy = Policy {
        max_width: args.max_width,
        max_depth: args.max_depth,
        thread_budget: args.thread_budget,
        request_budget: args.request_budget,
        ..Policy::default()
    };
    let stop = args
        .stop
        .iter()
        .map(|s| tok.encode(s))
        .collect::<Result<Vec<_>>>()?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop,
    };
    let budget = policy
        .request_budget
        .min(args.max_tokens.unwrap_or(usize::MAX));
    if args.block_size == 0 {
        return Err(SpindleError::InvalidSetting(
            "--block-size must be at least 1".into(),
        ));
    }
    let bs = args.block_size;
    let blocks = args.blocks.unwrap_or_else(|| {
        (prompt.len() + 2 * budget).div_ceil(bs) + 2 * policy.max_width * policy.max_depth + 8
    });
    let job = RunJob {
        args,
        tok: &tok,
        request: Some(Request::new(prompt, Arc::new(protocol), sampling)),
        policy,
        blocks,
    };
    run_on(args.device, &ck, blocks, bs, EngineConfig::default(), job)
}

/// Generation on an engine of any backend, streaming as it goes.
struct RunJob<'a> {
    args: &'a RunArgs,
    tok: &'a Tokenizer,
    request: Option<Request>,
    policy: Policy,
    blocks: usize,
}

impl EngineJob for RunJob<'_> {
    fn run<B: Backend>(self, engine: Engine<B>) -> Result<()> {
        let RunJob {
            args,
            tok,
            request,
            policy,
            blocks,
        } = self;
        let bs = engine.backend().block_size();
        let backend = engine.backend().name();
        let mut g = Generator::new(engine, policy);
        let Some(request) = request else {
            return Ok(());
        };
        let id = g.add_request(request)?;
        println!(
            "spindle run: {} protocol, {blocks} KV blocks of {bs} tokens, {backend} backend",
            args.protocol
        );
        let mut printer = StreamPrinter::new(tok, false);
        g.run(|e| printer.on_event(e))?;
        printer.flush_all();
        println!();
        let failed = g
            .output(id)
            .is_none_or(|out| out.reason == EndReason::Error);
        if let Some(out) = g.output(id) {
            print_request_stats(out);
        }
        print_engine_stats(&g.engine().stats());
        if let Some(path) = &args.trace {
            g.trace().write(path)?;
            println!(
                "trace written to {} (open in https://ui.perfetto.dev)",
                path.display()
            );
        }
        if failed {
            return Err(SpindleError::RunFailed(
                "the request failed (see the error above)".into(),
            ));
        }
        Ok(())
    }
}
