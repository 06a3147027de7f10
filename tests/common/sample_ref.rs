//! A CPU port of the CUDA sampling kernel's semantics (`spindle_sample` in
//! `kernels/sampling.cu`): the GPU kernel tests check the kernel against it, and the CPU
//! tests check it draws from the same distribution as the CPU sampler.
//!
//! The kernel: greedy (argmax, lowest id among ties, NaN never wins) when the temperature
//! is not positive or the largest logit is not finite; else `p = exp((l - max) / t)` in f32,
//! `tau` = the k-th largest `p` (top-k), raised to the largest `p` whose kept mass
//! `sum(p >= tau)` still reaches `top_p` times the top-k mass (top-p, when
//! `0 < top_p < 1`); the kept set is `{p >= tau, p > 0}` (NaN never kept, every token tied
//! at `tau` kept), and the token is found by inverting its CDF in vocabulary order.

/// What the kernel draws from for one row.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelChoice {
    /// The argmax.
    Greedy(usize),
    /// The kept tokens in vocabulary order with their unnormalised weights `p`.
    Sampled(Vec<(usize, f64)>),
}

/// The kernel's argmax: the largest non-NaN logit, lowest index among ties; 0 when every
/// logit is NaN.
pub fn kernel_argmax(l: &[f32]) -> usize {
    let mut best: Option<usize> = None;
    for (i, &x) in l.iter().enumerate() {
        if !x.is_nan() && best.is_none_or(|b| x > l[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0)
}

/// The kept set of one row at temperature `t`, top-k `k` (0: all) and top-p `p`.
pub fn kernel_choice(l: &[f32], t: f32, k: i32, p: f32) -> KernelChoice {
    let vocab = l.len();
    let best = kernel_argmax(l);
    let mx = l.get(best).copied().unwrap_or(f32::NAN);
    // Not only `t <= 0.0`: a NaN temperature is greedy too (the kernel tests `!(temp > 0)`).
    if t.is_nan() || t <= 0.0 || !mx.is_finite() {
        return KernelChoice::Greedy(best);
    }
    let inv_t = 1.0 / t;
    let pr: Vec<f32> = l.iter().map(|x| ((x - mx) * inv_t).exp()).collect();
    // NaN probabilities are never counted (`p >= t` is false for them).
    let mut sorted: Vec<f32> = pr.iter().copied().filter(|x| !x.is_nan()).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut tau = 0.0f32;
    if k > 0 && (k as usize) < vocab {
        tau = sorted.get(k as usize - 1).copied().unwrap_or(0.0);
    }
    if p > 0.0 && p < 1.0 {
        let z: f64 = pr.iter().filter(|&&x| x >= tau).map(|&x| x as f64).sum();
        let target = p as f64 * z;
        let mut cum = 0.0f64;
        for &x in sorted.iter().filter(|&&x| x >= tau) {
            cum += x as f64;
            if cum >= target {
                tau = x;
                break;
            }
        }
        // Ties: every token equal to tau is kept (the set is {p >= tau}).
    }
    KernelChoice::Sampled(
        pr.iter()
            .enumerate()
            .filter(|(_, &x)| x >= tau && x > 0.0)
            .map(|(i, &x)| (i, x as f64))
            .collect(),
    )
}

/// Reference sampler with the semantics documented for `spindle_sample`. Returns the
/// picked token and the kept set's cumulative-mass boundaries (token, mass up to and
/// including it), in vocabulary order (empty when greedy).
pub fn sample_ref(l: &[f32], t: f32, k: i32, p: f32, u: f32) -> (i32, Vec<(usize, f64)>) {
    let kept = match kernel_choice(l, t, k, p) {
        KernelChoice::Greedy(i) => return (i as i32, vec![]),
        KernelChoice::Sampled(kept) => kept,
    };
    let total: f64 = kept.iter().map(|k| k.1).sum();
    let target = u as f64 * total;
    let mut cum = 0.0;
    let mut bounds = Vec::new();
    let mut pick = kept.last().map_or(0, |k| k.0 as i32);
    let mut found = false;
    for &(i, x) in &kept {
        cum += x;
        bounds.push((i, cum / total));
        if !found && cum > target {
            pick = i as i32;
            found = true;
        }
    }
    (pick, bounds)
}
