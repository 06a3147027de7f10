//! Sampling on the backend (issue 14): the generator hands a thread's next-token choice to
//! the backend when its token source is the [`Sampler`], and the result must not depend on
//! where the choice is made. A test backend that behaves like a device one (it samples the
//! rows it is asked to and returns no logits unless some row needs them) must give the
//! same tokens and events as the plain CPU backend, and with only samplers it returns no
//! logits at all. Then the CUDA kernel's sampling semantics (its CPU port in
//! `common/sample_ref.rs`) against the CPU sampler's: the same distribution.

mod common;

use common::fixture;
use common::sample_ref::{kernel_choice, sample_ref, KernelChoice};
use model_loader::ModelConfig;
use spindle::backend::cpu::CpuBackend;
use spindle::backend::{sample_on_host, Backend, RowPick, StepInput, Weight};
use spindle::generate::rng::Rng;
use spindle::generate::sampler::argmax;
use spindle::generate::{
    row_distribution, sample_row, Action, ChildSpec, Decide, Event, ForkSpec, Generator, Policy,
    Protocol, Request, Role, RowSampling, Sampler, SamplingParams, Scripted, TagProtocol,
    ThreadParser, TokenSource, Truncation,
};
use spindle::tokenizer::Tokenizer;
use spindle::{AttentionMode, Engine, EngineConfig, JoinKind, Result, SpindleError};
use std::collections::BTreeMap;
use std::sync::Arc;

const MODEL: &str = "tiny-qwen2";

// ------------------------------------------------------------------ a device-like backend

/// The CPU backend, but choosing tokens as a device backend does: sampled rows come back
/// as ids only, and the logits buffer is emptied when no row asked for logits.
struct DeviceLike {
    inner: CpuBackend,
    /// Rows whose token the backend chose.
    rows_sampled: u64,
    /// Rows whose logits it handed back.
    rows_returned: u64,
    /// Breaks the contract: the first row's token is replaced by this.
    lie: Option<u32>,
}

impl DeviceLike {
    fn new() -> Self {
        Self {
            inner: cpu_backend(),
            rows_sampled: 0,
            rows_returned: 0,
            lie: None,
        }
    }
}

type Act = <CpuBackend as Backend>::Act;

impl Backend for DeviceLike {
    type Act = Act;

    fn name(&self) -> &'static str {
        "device-like"
    }
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }
    fn begin_step(&mut self, step: &StepInput) -> Result<()> {
        self.inner.begin_step(step)
    }
    fn embed(&mut self) -> Result<Act> {
        self.inner.embed()
    }
    fn rms_norm(&mut self, x: &Act, w: Weight) -> Result<Act> {
        self.inner.rms_norm(x, w)
    }
    fn add(&mut self, x: &mut Act, y: &Act) -> Result<()> {
        self.inner.add(x, y)
    }
    fn linear(&mut self, x: &Act, w: Weight) -> Result<Act> {
        self.inner.linear(x, w)
    }
    fn head_norm(&mut self, x: &mut Act, w: Weight) -> Result<()> {
        self.inner.head_norm(x, w)
    }
    fn rope(&mut self, x: &mut Act) -> Result<()> {
        self.inner.rope(x)
    }
    fn write_kv(&mut self, layer: usize, k: &Act, v: &Act) -> Result<()> {
        self.inner.write_kv(layer, k, v)
    }
    fn attention(&mut self, layer: usize, q: &Act) -> Result<Act> {
        self.inner.attention(layer, q)
    }
    fn silu_mul(&mut self, gate: &Act, up: &Act) -> Result<Act> {
        self.inner.silu_mul(gate, up)
    }
    fn logits(&mut self, x: &Act, out: &mut Vec<f32>) -> Result<()> {
        self.inner.logits(x, out)
    }
    fn forward(&mut self, step: &StepInput, logits: &mut Vec<f32>) -> Result<()> {
        self.inner.forward(step, logits)
    }

    fn forward_sampled(
        &mut self,
        step: &StepInput,
        picks: &[RowPick],
        logits: &mut Vec<f32>,
        tokens: &mut Vec<u32>,
    ) -> Result<()> {
        if picks.len() != step.logit_rows.len() {
            return Err(SpindleError::Backend("picks and logit rows differ".into()));
        }
        self.inner.forward(step, logits)?;
        let vocab = self.inner.config().vocab_size;
        sample_on_host(logits, vocab, picks, tokens)?;
        if let (Some(t), Some(first)) = (self.lie, tokens.first_mut()) {
            *first = t;
        }
        let sampled = picks
            .iter()
            .filter(|p| matches!(p, RowPick::Sample(_)))
            .count();
        self.rows_sampled += sampled as u64;
        if sampled == picks.len() {
            // Only the ids leave the device.
            logits.clear();
        } else {
            self.rows_returned += picks.len() as u64;
        }
        Ok(())
    }
}

fn cpu_backend() -> CpuBackend {
    let ck = model_loader::Checkpoint::open(&fixture(MODEL)).expect("fixture opens");
    CpuBackend::load(&ck, 256, 16).expect("backend")
}

fn engine<B: Backend>(backend: B) -> Engine<B> {
    Engine::new(
        backend,
        EngineConfig {
            mode: AttentionMode::Forked,
            check_invariants: true,
            ..Default::default()
        },
    )
}

fn generator<B: Backend>(backend: B) -> Generator<B> {
    let e = engine(backend);
    Generator::new(
        e,
        Policy {
            thread_budget: 24,
            request_budget: 96,
            child_growth_tokens: 16,
            ..Policy::default()
        },
    )
}

#[test]
fn a_sampled_step_returns_ids_and_only_the_logits_asked_for() {
    let mut plain = engine(cpu_backend());
    let mut dev = engine(DeviceLike::new());
    let vocab = plain.backend().config().vocab_size;
    let mut ids = Vec::new();
    for prompt in [&[1u32, 2, 3][..], &[4, 5]] {
        ids.push((
            plain.add_request(prompt).expect("request"),
            dev.add_request(prompt).expect("request"),
        ));
    }
    // The first thread asks for logits at every token: its earlier rows come back as
    // logits whatever its pick.
    plain.set_all_logits(ids[0].0, true).expect("thread");
    dev.set_all_logits(ids[0].1, true).expect("thread");
    let first = ids[0].1;
    let want = plain.step().expect("step");
    let want_rows: Vec<Vec<f32>> = want
        .threads
        .iter()
        .map(|t| want.last_logits(t).expect("logits").to_vec())
        .collect();
    let out = dev
        .step_sampled(|t| {
            if t.id == first {
                RowPick::Logits
            } else {
                RowPick::Sample(RowSampling::GREEDY)
            }
        })
        .expect("step");
    assert_eq!(
        out.tokens.len(),
        4,
        "three rows of the first thread, one of the second"
    );
    assert_eq!(
        out.logits.len(),
        4 * vocab,
        "some row asked: every row's logits"
    );
    assert_eq!(out.token_of(&out.threads[0]), None);
    assert_eq!(out.logits_of(&out.threads[0]).len(), 3);
    assert_eq!(
        out.token_of(&out.threads[1]),
        Some(argmax(&want_rows[1])),
        "the backend's greedy id"
    );
    // Every row sampled: ids only, and no logits to read (no panic either).
    for (p, d) in &ids {
        plain.feed(*p, &[7]).expect("feed");
        dev.feed(*d, &[7]).expect("feed");
    }
    let want = plain.step().expect("step");
    let want: Vec<u32> = want
        .threads
        .iter()
        .map(|t| argmax(want.last_logits(t).expect("logits")))
        .collect();
    let out = dev
        .step_sampled(|_| RowPick::Sample(RowSampling::GREEDY))
        .expect("step");
    assert!(out.logits.is_empty());
    let got: Vec<Option<u32>> = out.threads.iter().map(|t| out.token_of(t)).collect();
    assert_eq!(got, want.into_iter().map(Some).collect::<Vec<_>>());
    assert!(out.threads.iter().all(|t| out.last_logits(t).is_none()));
    assert!(out.threads.iter().all(|t| out.logits_of(t).len() == 0));
    assert_eq!(
        dev.last_output().tokens.len(),
        2,
        "last_output keeps the ids"
    );
    // A plain step afterwards has logits and no ids.
    for (_, d) in &ids {
        dev.feed(*d, &[8]).expect("feed");
    }
    let out = dev.step().expect("step");
    assert!(out.tokens.is_empty());
    assert!(out.threads.iter().all(|t| out.token_of(t).is_none()));
    assert_eq!(out.logits.len(), 2 * vocab);
}

#[test]
fn a_backend_that_breaks_the_sampling_contract_is_an_error() {
    let vocab = cpu_backend().config().vocab_size as u32;
    // A token past the vocabulary for a sampled row, a token for a logits row.
    for (lie, pick) in [
        (vocab, RowPick::Sample(RowSampling::GREEDY)),
        (3, RowPick::Logits),
    ] {
        let mut dev = engine(DeviceLike {
            lie: Some(lie),
            ..DeviceLike::new()
        });
        dev.add_request(&[1, 2]).expect("request");
        match dev.step_sampled(|_| pick) {
            Err(SpindleError::Backend(what)) => assert!(what.contains(&lie.to_string()), "{what}"),
            other => panic!(
                "lie {lie} for {pick:?}: {:?}",
                other.map(|o| o.tokens.to_vec())
            ),
        }
    }
}

// ------------------------------------------------------------------ a tree without tags

/// Forks whatever the model writes: the root forks into `width` children after its 3rd
/// and 20th tokens, a child forks once more after its 2nd token (depth 1), and children
/// end after 5 tokens. So sampled text (random weights) still grows a tree.
struct Counting {
    width: usize,
    join: JoinKind,
}

struct CountingParser {
    role: Role,
    width: usize,
    join: JoinKind,
    forked_at: Vec<usize>,
}

impl Protocol for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn parser(&self, role: Role) -> Box<dyn ThreadParser> {
        Box::new(CountingParser {
            role,
            width: self.width,
            join: self.join,
            forked_at: Vec::new(),
        })
    }
    fn control_tokens(&self) -> Vec<u32> {
        Vec::new()
    }
}

impl CountingParser {
    fn fork(&mut self, n: usize) -> Action {
        self.forked_at.push(n);
        Action::Fork(ForkSpec {
            children: (0..self.width as u32)
                .map(|i| ChildSpec {
                    prime: vec![11 + i, 7],
                })
                .collect(),
            share_context: self.join != JoinKind::Reprefill || self.width > 2,
            join: self.join,
            after_join: vec![5],
        })
    }
}

impl ThreadParser for CountingParser {
    fn on_token(&mut self, generated: &[u32]) -> Action {
        let n = generated.len();
        match self.role {
            Role::Root if (n == 3 || n == 20) && !self.forked_at.contains(&n) => self.fork(n),
            Role::Child { index } if index == 0 && n == 2 && self.forked_at.is_empty() => {
                self.fork(n)
            }
            Role::Child { .. } if n >= 5 => Action::End { returns: None },
            _ => Action::Text,
        }
    }
    fn on_truncate(&mut self, _generated: &[u32]) -> Truncation {
        Truncation::default()
    }
}

fn params(seed: u64, temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
        ..Default::default()
    }
}

/// The [`Sampler`] as a custom source would be: it never lets the backend sample, so every
/// token is drawn on the host from the logits (the path before backends could sample).
struct HostOnly(Sampler);

impl TokenSource for HostOnly {
    fn next_token(&mut self, d: Decide<'_>) -> u32 {
        self.0.next_token(d)
    }
}

/// Requests of sampled text that fork by count, with several samplers and seeds (one
/// greedy); with `host_only` their samplers draw on the host.
fn counting_requests(host_only: bool) -> Vec<Request> {
    let settings = [
        (1, 0.9, 0, 1.0, JoinKind::Reprefill),
        (2, 1.3, 50, 0.95, JoinKind::Reuse),
        (3, 0.7, 20, 0.9, JoinKind::Reprefill),
        (4, 0.0, 0, 1.0, JoinKind::Reuse),
        (5, 1.0, 5, 0.5, JoinKind::Reprefill),
    ];
    settings
        .iter()
        .enumerate()
        .map(|(i, &(seed, t, k, p, join))| {
            let protocol: Arc<dyn Protocol> = Arc::new(Counting {
                width: 2 + i % 2,
                join,
            });
            let p = params(seed, t, k, p);
            let r = Request::new(vec![3 + i as u32, 9, 14, 2], protocol, p.clone());
            if host_only {
                r.with_source(Box::new(HostOnly(Sampler::new(p))))
            } else {
                r
            }
        })
        .collect()
}

/// A ThreadWeaver request whose tags come from a script and whose free tokens a
/// [`Scripted`] source samples itself (from the logits: a custom source).
fn scripted_request(tok: &Tokenizer) -> Request {
    const SCRIPTS: &[(&[u32], &str)] = &[
        (
            &[],
            "{2}<Parallel><Outlines><Outline> 1: a</Outline><Outline> 2: b</Outline>\
             </Outlines>{3}</Parallel><|endoftext|>",
        ),
        (&[0], "{7}</Thread>"),
        (&[1], "{4}</Thread>"),
    ];
    let p = params(9, 0.8, 40, 0.9);
    let mut source = Scripted::new(tok.special_ids()).sampling(p.clone());
    for (path, text) in SCRIPTS {
        source = source.script(path, Scripted::parse(tok, text).expect("script"));
    }
    let protocol = Arc::new(TagProtocol::threadweaver(tok, JoinKind::Reprefill).expect("protocol"));
    Request::new(tok.encode("<think> go").expect("encodes"), protocol, p)
        .with_source(Box::new(source))
}

/// Every request's threads (path, prime, generated) and end, and every event.
type Run = (
    BTreeMap<u64, (String, Vec<(Vec<u32>, Vec<u32>, Vec<u32>)>)>,
    Vec<Event>,
);

fn run<B: Backend>(g: &mut Generator<B>, requests: Vec<Request>) -> Run {
    let ids: Vec<_> = requests
        .into_iter()
        .map(|r| g.add_request(r).expect("request"))
        .collect();
    let mut events = Vec::new();
    g.run(|e| events.push(e.clone())).expect("generation runs");
    assert!(g.engine().pool().all_free(), "blocks leaked");
    let mut out = BTreeMap::new();
    for id in ids {
        let o = g.output(id).expect("finished");
        let threads = o
            .threads
            .iter()
            .map(|t| (t.path.clone(), t.prime.clone(), t.generated.clone()))
            .collect();
        out.insert(id.index() as u64, (format!("{:?}", o.reason), threads));
    }
    (out, events)
}

fn forks(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Forked { .. }))
        .count()
}

#[test]
fn backend_sampling_matches_the_host_and_returns_only_ids() {
    let host = run(&mut generator(cpu_backend()), counting_requests(true));
    let plain = run(&mut generator(cpu_backend()), counting_requests(false));
    assert_eq!(
        plain, host,
        "sampling in the backend = sampling on the host"
    );
    let mut g = generator(DeviceLike::new());
    let device = run(&mut g, counting_requests(false));
    assert_eq!(device, plain, "the same tokens and events on both backends");
    assert!(forks(&plain.1) >= 5, "the requests grew trees");
    let generated: usize = plain
        .0
        .values()
        .flat_map(|(_, t)| t.iter().map(|t| t.2.len()))
        .sum();
    assert!(generated > 100, "{generated} tokens generated");
    let b = g.engine().backend();
    eprintln!(
        "{} forks, {generated} tokens, {} rows sampled, {} returned",
        forks(&plain.1),
        b.rows_sampled,
        b.rows_returned
    );
    assert_eq!(b.rows_returned, 0, "only samplers: no logits came back");
    assert!(
        b.rows_sampled >= generated as u64,
        "{} rows sampled for {generated} tokens",
        b.rows_sampled
    );
}

#[test]
fn a_custom_source_in_the_batch_still_gets_logits() {
    let tok = Tokenizer::from_file(&fixture(MODEL).join("tokenizer.json")).expect("tokenizer");
    let requests = |tok: &Tokenizer| {
        let mut r = counting_requests(false);
        r.insert(2, scripted_request(tok));
        r
    };
    let plain = run(&mut generator(cpu_backend()), requests(&tok));
    let mut g = generator(DeviceLike::new());
    let device = run(&mut g, requests(&tok));
    assert_eq!(device, plain, "the same tokens and events on both backends");
    let (reason, threads) = &plain.0[&2];
    assert_eq!(reason, "Eos", "the scripted request ran its script");
    assert_eq!(threads.len(), 3);
    let b = g.engine().backend();
    assert!(b.rows_returned > 0, "the scripted threads needed logits");
    assert!(b.rows_sampled > 0);
}

// ------------------------------------------------------------------ the kernel's semantics

/// A random logits row: normal-ish values scaled by `spread`, with some exact ties and
/// some `-inf` / NaN entries.
fn random_row(rng: &mut Rng, vocab: usize) -> Vec<f32> {
    let spread = [0.5f32, 2.0, 6.0][rng.below(3) as usize];
    let mut l: Vec<f32> = (0..vocab)
        .map(|_| {
            let z: f32 = (0..4).map(|_| rng.next_f32()).sum::<f32>() - 2.0;
            z * spread
        })
        .collect();
    if vocab > 4 && rng.below(3) == 0 {
        for _ in 0..1 + vocab / 20 {
            let (a, b) = (rng.below(vocab as u64), rng.below(vocab as u64));
            l[a as usize] = l[b as usize];
        }
    }
    if vocab > 2 && rng.below(4) == 0 {
        for _ in 0..1 + vocab / 50 {
            let i = rng.below(vocab as u64) as usize;
            l[i] = if rng.below(2) == 0 {
                f32::NEG_INFINITY
            } else {
                f32::NAN
            };
        }
    }
    l
}

/// The kernel's distribution for a row: token -> probability.
fn kernel_distribution(l: &[f32], s: &RowSampling) -> BTreeMap<u32, f64> {
    match kernel_choice(l, s.temperature, s.top_k as i32, s.top_p) {
        KernelChoice::Greedy(i) => BTreeMap::from([(i as u32, 1.0)]),
        KernelChoice::Sampled(kept) => {
            let total: f64 = kept.iter().map(|k| k.1).sum();
            kept.iter().map(|&(i, w)| (i as u32, w / total)).collect()
        }
    }
}

/// Whether tokens tie exactly at the top-k or top-p cut of the CPU sampler (where the
/// kernel keeps every tied token and the CPU sampler the lowest ids), or the cumulative
/// mass passes `top_p` within rounding of a token's edge (f32 sums on the kernel, f64 on
/// the CPU): rows where the two may legitimately keep different sets.
fn at_a_boundary(l: &[f32], s: &RowSampling) -> bool {
    let finite: Vec<f32> = {
        let mut v: Vec<f32> = l.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| b.total_cmp(a));
        v
    };
    if s.top_k > 0 && (s.top_k as usize) < finite.len() {
        let k = s.top_k as usize;
        if finite[k - 1] == finite[k] {
            return true;
        }
    }
    if s.top_p < 1.0 && !finite.is_empty() {
        let top = if s.top_k > 0 {
            &finite[..finite.len().min(s.top_k as usize)]
        } else {
            &finite[..]
        };
        let w: Vec<f64> = top
            .iter()
            .map(|&x| ((x - top[0]) as f64 / s.temperature as f64).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let mut acc = 0.0;
        for (i, q) in w.iter().enumerate() {
            acc += q / z;
            if (acc - s.top_p as f64).abs() < 1e-5 {
                return true;
            }
            if acc >= s.top_p as f64 {
                // Ties at the cut: the next token has the same logit.
                return i + 1 < top.len() && top[i + 1] == top[i];
            }
        }
    }
    false
}

/// Row settings over the grid of the issue: temperatures 0.3..2, top-k 0/1/5/50, top-p
/// 0.5/0.9/1.0.
fn random_sampling(rng: &mut Rng) -> RowSampling {
    RowSampling {
        temperature: 0.3 + 1.7 * rng.next_f32(),
        top_k: [0, 1, 5, 50][rng.below(4) as usize],
        top_p: [0.5, 0.9, 1.0][rng.below(3) as usize],
        uniform: 0.0,
    }
}

#[test]
fn the_kernel_spec_and_the_cpu_sampler_keep_the_same_distribution() {
    let mut rng = Rng::new(2024);
    let (mut compared, mut skipped, mut sampled) = (0, 0, 0);
    for _ in 0..600 {
        let vocab = 1 + rng.below(2000) as usize;
        let l = random_row(&mut rng, vocab);
        let s = random_sampling(&mut rng);
        if at_a_boundary(&l, &s) {
            skipped += 1;
            continue;
        }
        compared += 1;
        let cpu: BTreeMap<u32, f64> = row_distribution(&l, &s).into_iter().collect();
        let total: f64 = cpu.values().sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "CPU probabilities sum to {total}"
        );
        let kernel = kernel_distribution(&l, &s);
        // The kernel's f32 exponentials underflow to 0 (never kept) where the CPU's f64
        // ones keep a token of probability < 1e-30: compare kept sets above that.
        let kept = |d: &BTreeMap<u32, f64>| -> Vec<u32> {
            d.iter()
                .filter(|(_, &p)| p > 1e-30)
                .map(|(&i, _)| i)
                .collect()
        };
        assert_eq!(kept(&cpu), kept(&kernel), "kept sets, vocab {vocab}, {s:?}");
        for (i, p) in &cpu {
            let q = kernel.get(i).copied().unwrap_or(0.0);
            assert!(
                (p - q).abs() < 1e-5,
                "token {i}: CPU {p}, kernel {q} (vocab {vocab}, {s:?})"
            );
        }
        if cpu.len() > 1 {
            sampled += 1;
        }
    }
    eprintln!("{compared} rows compared ({sampled} with several kept tokens), {skipped} skipped");
    assert!(
        compared >= 450,
        "{compared} rows compared, {skipped} skipped"
    );
    assert!(
        sampled >= 200,
        "{sampled} rows with more than one kept token"
    );
}

#[test]
fn tied_tokens_at_the_top_k_cut_are_the_documented_difference() {
    // Three tokens tie for second place; top-2 keeps token 1 only on the CPU (lowest id),
    // all three in the kernel.
    let l = [5.0f32, 3.0, 3.0, 3.0, 0.0];
    let s = RowSampling {
        temperature: 1.0,
        top_k: 2,
        top_p: 1.0,
        uniform: 0.0,
    };
    let cpu: Vec<u32> = row_distribution(&l, &s).iter().map(|d| d.0).collect();
    let kernel: Vec<u32> = kernel_distribution(&l, &s).into_keys().collect();
    assert_eq!(cpu, vec![0, 1]);
    assert_eq!(kernel, vec![0, 1, 2, 3]);
    assert!(at_a_boundary(&l, &s));
}

#[test]
fn the_kernel_spec_and_the_cpu_sampler_draw_the_same_frequencies() {
    // For a grid of uniforms the two samplers invert different orders (vocabulary vs most
    // likely first), so single draws differ; their token frequencies must not.
    const N: usize = 4000;
    let mut rng = Rng::new(77);
    let mut compared = 0;
    let mut worst: f64 = 0.0;
    while compared < 40 {
        let vocab = 2 + rng.below(300) as usize;
        let l = random_row(&mut rng, vocab);
        let mut s = random_sampling(&mut rng);
        if s.top_k == 1 || at_a_boundary(&l, &s) {
            continue;
        }
        compared += 1;
        let mut cpu = BTreeMap::<u32, usize>::new();
        let mut kernel = BTreeMap::<u32, usize>::new();
        for i in 0..N {
            s.uniform = (i as f64 + 0.5) / N as f64;
            *cpu.entry(sample_row(&l, &s)).or_default() += 1;
            let (k, _) = sample_ref(&l, s.temperature, s.top_k as i32, s.top_p, s.uniform as f32);
            *kernel.entry(k as u32).or_default() += 1;
        }
        let kept = row_distribution(&l, &s).len();
        let tokens: std::collections::BTreeSet<u32> =
            cpu.keys().chain(kernel.keys()).copied().collect();
        let tv: f64 = tokens
            .iter()
            .map(|t| {
                let a = cpu.get(t).copied().unwrap_or(0) as f64;
                let b = kernel.get(t).copied().unwrap_or(0) as f64;
                (a - b).abs()
            })
            .sum::<f64>()
            / (2 * N) as f64;
        // A grid inverts each CDF to within one grid step per token edge.
        let bound = 3.0 / N as f64 * kept as f64 + 1e-4;
        worst = worst.max(tv / bound);
        assert!(
            tv < bound,
            "total variation {tv} > {bound} (vocab {vocab}, {kept} kept, {s:?})"
        );
    }
    eprintln!("worst total variation / bound: {worst:.3}");
}
