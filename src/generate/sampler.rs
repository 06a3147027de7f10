//! Choosing the next token: the [`TokenSource`] trait (given a thread's place, its tokens
//! and its logits, pick a token) and [`Sampler`], its real implementation (greedy,
//! temperature, top-k, top-p) drawing from the thread's own seeded generator.

use super::rng::Rng;
use crate::tree::RequestId;

/// What a token source sees when a thread needs its next token.
pub struct Decide<'a> {
    /// The request.
    pub request: RequestId,
    /// The thread's path in the tree (child indices from the root).
    pub path: &'a [u32],
    /// Tokens this thread has generated so far (prompt, primes and re-prefills excluded).
    pub generated: &'a [u32],
    /// `[vocab]` logits for the next token.
    pub logits: &'a [f32],
    /// The thread's own generator, seeded from the request seed and its place in the tree.
    pub rng: &'a mut Rng,
}

/// Picks each thread's next token.
pub trait TokenSource: Send {
    /// The next token of the thread described by `d`.
    fn next_token(&mut self, d: Decide<'_>) -> u32;

    /// The request starts again from its prompt (the pool could not hold it beside the
    /// others): a source whose choices depend on its own state goes back to its start, so
    /// the run repeats. A source that depends only on what `next_token` is given (like
    /// [`Sampler`]) has nothing to do.
    fn restart(&mut self) {}

    /// How the backend may choose this thread's next token instead of handing its logits
    /// to [`TokenSource::next_token`] ([`crate::backend::RowPick::Sample`]): the settings
    /// and the uniform of the draw `next_token` would make, previewed from `rng` without
    /// advancing it. None (the default) when the source must see the logits: the
    /// generator then calls `next_token` as usual. A source that returns Some must choose
    /// exactly what [`sample_row`] chooses from those settings, so both paths agree.
    fn backend_sampling(&self, rng: &Rng) -> Option<RowSampling> {
        let _ = rng;
        None
    }

    /// The thread took the token the backend chose with [`TokenSource::backend_sampling`]'s
    /// settings: advance `rng` exactly as `next_token` would have (once per token).
    fn took_backend_token(&mut self, rng: &mut Rng) {
        let _ = rng;
    }
}

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0: all).
    pub top_p: f32,
    /// Seed of the request; every thread derives its own generator from it.
    pub seed: u64,
    /// Most tokens the request may generate over all its threads (caps the policy's
    /// request budget when set).
    pub max_tokens: Option<usize>,
    /// Token sequences that end the root thread when it generates one of them.
    pub stop: Vec<Vec<u32>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_tokens: None,
            stop: Vec::new(),
        }
    }
}

/// The real token source: samples from the logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    /// A sampler with `params`.
    pub fn new(params: SamplingParams) -> Self {
        Self { params }
    }

    /// The settings of one row for a backend that samples itself
    /// ([`crate::backend::Backend::forward_sampled`]): greedy (temperature 0) when this
    /// sampler is greedy, else its settings and the uniform its next draw from `rng` would
    /// give. `rng` is not advanced: call [`Sampler::commit`] once the token is taken, so a
    /// thread that got no token this step keeps its stream.
    pub fn row_sampling(&self, rng: &Rng) -> RowSampling {
        let p = &self.params;
        if self.is_greedy() {
            return RowSampling::GREEDY;
        }
        RowSampling {
            temperature: p.temperature,
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            uniform: rng.clone().next_f64(),
        }
    }

    /// Advances `rng` past the draw [`Sampler::row_sampling`] previewed (nothing when
    /// greedy), leaving it where [`Sampler::sample`] would have.
    pub fn commit(&self, rng: &mut Rng) {
        if !self.is_greedy() {
            rng.next_f64();
        }
    }

    /// Whether this sampler takes the argmax (and draws nothing).
    pub fn is_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0 || !p.temperature.is_finite() || p.top_k == 1 || p.top_p <= 0.0
    }

    /// Picks a token from `logits` with `rng` (greedy when the temperature is 0).
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        let s = self.row_sampling(rng);
        self.commit(rng);
        sample_row(logits, &s)
    }
}

/// How one logits row's token is chosen from a uniform drawn beforehand: what a backend
/// that samples on its device is given per row (see [`sample_row`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// 0 (or not finite): greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    /// The thread's draw in `[0, 1)` (unused when greedy).
    pub uniform: f64,
}

impl RowSampling {
    /// Greedy: the argmax, lowest id among ties.
    pub const GREEDY: RowSampling = RowSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        uniform: 0.0,
    };

    /// Whether the row takes the argmax.
    pub fn is_greedy(&self) -> bool {
        // top_p <= 0 keeps one token, the argmax: greedy here, so the device kernel (which
        // reads top_p <= 0 as "no cut") is never asked.
        self.temperature <= 0.0
            || !self.temperature.is_finite()
            || self.top_k == 1
            || self.top_p <= 0.0
    }
}

/// The CPU sampler's choice for one row given its uniform `s.uniform`: greedy, or the
/// temperature distribution over the `top_k` most likely tokens (ties broken by id), cut
/// to the smallest prefix whose probability reaches `top_p`, inverted at the uniform in
/// that descending order. Non-finite logits are never chosen (0 when none is finite).
/// The device kernel (`kernels/sampling.cu`) draws from the same distribution, inverting
/// in vocabulary order; it differs only on a row with a `+inf` logit, where it takes the
/// argmax.
pub fn sample_row(logits: &[f32], s: &RowSampling) -> u32 {
    if s.is_greedy() {
        return argmax(logits);
    }
    let Some((order, probs)) = kept_tokens(logits, s) else {
        return 0;
    };
    let total: f64 = probs.iter().sum();
    let mut u = s.uniform * total;
    for (q, &id) in probs.iter().zip(&order) {
        if u < *q {
            return id;
        }
        u -= q;
    }
    order[order.len() - 1]
}

/// The distribution [`sample_row`] draws from (over its uniform): each kept token with its
/// probability (summing to 1), most likely first, ties by id. Greedy rows, and rows with
/// no finite logit, give their one token with probability 1.
///
/// A backend that samples on its device must draw from this distribution. The CUDA kernel
/// keeps `{p >= tau}` and inverts its CDF in vocabulary order, which is the same
/// distribution except where tokens tie exactly at the top-k or top-p cut: the kernel
/// keeps every tied token there, this sampler keeps the lowest ids.
pub fn row_distribution(logits: &[f32], s: &RowSampling) -> Vec<(u32, f64)> {
    if s.is_greedy() {
        return vec![(argmax(logits), 1.0)];
    }
    let Some((order, probs)) = kept_tokens(logits, s) else {
        return vec![(0, 1.0)];
    };
    let total: f64 = probs.iter().sum();
    order
        .into_iter()
        .zip(probs.iter().map(|q| q / total))
        .collect()
}

/// `x`'s bits as a u32 that orders like `f32::total_cmp` (larger for larger `x`).
fn rank_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The tokens [`sample_row`] may choose for a sampled (not greedy) row, most likely first
/// (ties by id), with their weights: probabilities over the top-k set, the set then cut
/// to top-p (so they sum to at most 1). None when no logit is finite.
fn kept_tokens(logits: &[f32], s: &RowSampling) -> Option<(Vec<u32>, Vec<f64>)> {
    // Descending by logit (`total_cmp`), ties by id, so the order is total and
    // reproducible: each finite token becomes one u64 key that sorts ascending in that
    // order (integer compares, no indirection).
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (u64::from(!rank_bits(x)) << 32) | i as u64)
        .collect();
    if keys.is_empty() {
        return None;
    }
    let k = s.top_k as usize;
    if k > 0 && k < keys.len() {
        // Only the k best are kept: select them (linear), then sort those alone.
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
    }
    // Keys are distinct (they hold the id), so an unstable sort gives the one order.
    keys.sort_unstable();
    let mut order: Vec<u32> = keys.iter().map(|&key| key as u32).collect();
    let max = logits[order[0] as usize];
    let inv_t = 1.0 / s.temperature as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i as usize] - max) as f64 * inv_t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    for q in &mut probs {
        *q /= total;
    }
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    Some((order, probs))
}

impl TokenSource for Sampler {
    fn next_token(&mut self, d: Decide<'_>) -> u32 {
        self.sample(d.logits, d.rng)
    }

    fn backend_sampling(&self, rng: &Rng) -> Option<RowSampling> {
        Some(self.row_sampling(rng))
    }

    fn took_backend_token(&mut self, rng: &mut Rng) {
        self.commit(rng);
    }
}

/// Index of the largest logit (the lowest index among ties; NaN is never chosen, as in
/// the CUDA `argmax` kernel; 0 for an empty or all-NaN slice).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &x) in logits.iter().enumerate() {
        if !x.is_nan() && best.is_none_or(|b| x > logits[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-k by selection keeps exactly the tokens, in exactly the order, of a full sort
    /// truncated to k (ties broken by id), on rows full of ties and non-finite logits.
    #[test]
    fn top_k_selection_equals_the_full_sort() {
        let mut rng = Rng::new(9);
        for case in 0..200 {
            let vocab = 1 + rng.below(300) as usize;
            let logits: Vec<f32> = (0..vocab)
                .map(|_| match rng.below(12) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    // Few distinct values: many ties.
                    _ => (rng.below(7) as f32) * 0.5,
                })
                .collect();
            let k = 1 + rng.below(vocab as u64 + 3) as u32;
            let s = RowSampling {
                temperature: 0.9,
                top_k: k,
                top_p: 1.0,
                uniform: 0.5,
            };
            let mut want: Vec<u32> = (0..vocab as u32)
                .filter(|&i| logits[i as usize].is_finite())
                .collect();
            want.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            want.truncate(k as usize);
            let got = kept_tokens(&logits, &s).map(|(o, _)| o).unwrap_or_default();
            assert_eq!(got, want, "case {case}: vocab {vocab}, k {k}");
        }
    }

    fn sampler(temperature: f32, top_k: usize, top_p: f32) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        })
    }

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(sampler(0.0, 0, 1.0).sample(&logits, &mut rng), 1);
        for _ in 0..50 {
            let t = sampler(1.0, 2, 1.0).sample(&logits, &mut rng);
            assert!(t == 1 || t == 2);
            assert_eq!(sampler(1.0, 0, 0.1).sample(&logits, &mut rng), 1);
        }
        let seen: std::collections::BTreeSet<u32> = (0..400)
            .map(|_| sampler(5.0, 0, 1.0).sample(&logits, &mut rng))
            .collect();
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn argmax_skips_nan() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, f32::NAN, 3.0]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
    }
}
