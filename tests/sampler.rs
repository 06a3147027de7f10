//! The sampler's distribution, checked by frequency: for each setting of temperature,
//! top-k and top-p, many seeded draws must stay inside the truncated support and match the
//! expected probabilities, tightly enough that each plausible bug fails with probability
//! above 1 - 1e-9 (and a correct sampler passes with probability above 1 - 1e-9).

use spindle::generate::rng::Rng;
use spindle::generate::sampler::argmax;
use spindle::generate::{Decide, Sampler, SamplingParams, TokenSource};

/// Ids are not in logit order, and no two logits tie.
const LOGITS: [f32; 8] = [1.0, 3.0, -0.5, 2.2, 0.3, 2.6, -2.0, 1.6];

/// Draws per setting.
const DRAWS: usize = 40_000;

/// Largest allowed |frequency - probability| per token.
///
/// Hoeffding: for one token, P(|f - p| >= DELTA) <= 2 exp(-2 DRAWS DELTA^2) = 2 e^-50
/// ~ 3.9e-22, so over 8 tokens and 6 settings a correct sampler fails with probability
/// below 2e-20. A bug whose distribution moves some token by at least 2 DELTA (asserted
/// below for every bug named) passes only if that token's frequency lands DELTA away
/// from its mean: again below 3.9e-22. A token outside the support that a bug keeps has
/// probability at least MIN_LEAK here, so it is never drawn with probability at most
/// (1 - MIN_LEAK)^DRAWS, below 1e-900.
const DELTA: f64 = 0.025;
const MIN_LEAK: f64 = 0.05;

/// The intended distribution, written from the definitions: softmax of logits / T over
/// the k largest (all when k = 0), then the smallest prefix (most likely first) whose
/// probability reaches p, renormalised.
fn expected(logits: &[f32], t: f64, k: usize, p: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if k > 0 {
        order.truncate(k);
    }
    let w: Vec<f64> = order
        .iter()
        .map(|&i| (logits[i] as f64 / t).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let mut keep = order.len();
    let mut acc = 0.0;
    for (j, x) in w.iter().enumerate() {
        acc += x / z;
        if acc >= p {
            keep = j + 1;
            break;
        }
    }
    let z: f64 = w[..keep].iter().sum();
    let mut probs = vec![0.0; logits.len()];
    for (&i, x) in order[..keep].iter().zip(&w) {
        probs[i] = x / z;
    }
    probs
}

fn frequencies(t: f32, k: usize, p: f32, seed: u64) -> Vec<f64> {
    frequencies_of(&LOGITS, t, k, p, seed)
}

fn frequencies_of(logits: &[f32], t: f32, k: usize, p: f32, seed: u64) -> Vec<f64> {
    let s = Sampler::new(SamplingParams {
        temperature: t,
        top_k: k,
        top_p: p,
        ..Default::default()
    });
    let mut rng = Rng::new(seed);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..DRAWS {
        counts[s.sample(logits, &mut rng) as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / DRAWS as f64).collect()
}

fn max_gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn draws_follow_the_truncated_tempered_distribution() {
    // (temperature, top-k, top-p)
    let settings = [
        (1.0f32, 0usize, 1.0f32),
        (0.5, 0, 1.0),
        (2.0, 3, 1.0),
        (0.7, 2, 1.0),
        (1.0, 0, 0.7),
        (1.5, 5, 0.9),
    ];
    for (i, &(t, k, p)) in settings.iter().enumerate() {
        let want = expected(&LOGITS, t as f64, k, p as f64);
        // The test has teeth: each bug it is meant to catch moves the distribution far
        // enough (see DELTA) or keeps a token that must not be drawn (see MIN_LEAK).
        let mut bugs = Vec::new();
        if t != 1.0 {
            bugs.push((
                "temperature multiplied",
                expected(&LOGITS, 1.0 / t as f64, k, p as f64),
            ));
        }
        if k > 0 {
            bugs.push(("top-k ignored", expected(&LOGITS, t as f64, 0, p as f64)));
            bugs.push((
                "top-k + 1 kept",
                expected(&LOGITS, t as f64, k + 1, p as f64),
            ));
        }
        if p < 1.0 {
            bugs.push(("top-p ignored", expected(&LOGITS, t as f64, k, 1.0)));
        }
        for (bug, q) in &bugs {
            let leak = q
                .iter()
                .zip(&want)
                .filter(|(_, &w)| w == 0.0)
                .map(|(&q, _)| q)
                .fold(0.0, f64::max);
            assert!(
                max_gap(q, &want) >= 2.0 * DELTA || leak >= MIN_LEAK,
                "setting {i}: the test could not tell {bug:?} apart"
            );
        }
        let got = frequencies(t, k, p, 0x5a3e + i as u64);
        for (id, (&f, &w)) in got.iter().zip(&want).enumerate() {
            if w == 0.0 {
                assert_eq!(
                    f, 0.0,
                    "T {t}, k {k}, p {p}: token {id} is outside the support"
                );
            } else {
                assert!(
                    (f - w).abs() < DELTA,
                    "T {t}, k {k}, p {p}: token {id} drawn {f:.4}, expected {w:.4}"
                );
            }
        }
        println!("T {t}, k {k}, p {p}: frequencies {got:.3?}, expected {want:.3?}");
    }
}

#[test]
fn greedy_settings_take_the_argmax_every_time() {
    let mut rng = Rng::new(9);
    for (t, k) in [
        (0.0f32, 0usize),
        (0.0, 3),
        (1.0, 1),
        (5.0, 1),
        (f32::NAN, 0),
    ] {
        let s = Sampler::new(SamplingParams {
            temperature: t,
            top_k: k,
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&LOGITS, &mut rng), 1, "T {t}, k {k}");
        }
    }
}

#[test]
fn greedy_ties_go_to_the_lowest_id() {
    assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0, 2.0]), 1);
    assert_eq!(argmax(&[3.0, 3.0]), 0);
    assert_eq!(argmax(&[]), 0);
    let s = Sampler::new(SamplingParams::default());
    assert_eq!(s.sample(&[1.0, 4.0, 4.0], &mut Rng::new(1)), 1);
}

/// Logits far from 0 (as a model's can be, or any logits at a low temperature): the
/// softmax is taken relative to the largest, so exp does not overflow to infinity.
#[test]
fn large_logits_do_not_overflow() {
    // exp(400) fits an f64; exp(800) (the logits added to, not less, their maximum) does
    // not, and then every weight is infinite and the draw is garbage.
    let logits = [400.0f32, 398.0, 399.0, 396.5];
    let want = expected(&logits, 1.0, 0, 1.0);
    let got = frequencies_of(&logits, 1.0, 0, 1.0, 0x1a7e);
    for (id, (&f, &w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (f - w).abs() < DELTA,
            "token {id} drawn {f:.4}, expected {w:.4}"
        );
    }
}

/// The [`TokenSource`] face of the sampler draws the thread's token from its logits with
/// the thread's own generator: the same token as `sample`, and the generator advanced the
/// same way.
#[test]
fn next_token_samples_with_the_threads_generator() {
    for (t, logits) in [(1.0f32, &LOGITS[..]), (0.0, &[0.5, -1.0, 4.0, 2.0][..])] {
        let mut s = Sampler::new(SamplingParams {
            temperature: t,
            ..Default::default()
        });
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let (mut a, mut b) = (Rng::new(seed), Rng::new(seed));
            let token = s.next_token(Decide {
                request: spindle::RequestId(0),
                path: &[1, 0],
                generated: &[3, 4],
                logits,
                rng: &mut a,
            });
            assert_eq!(token, s.sample(logits, &mut b), "T {t}, seed {seed}");
            assert_eq!(a.next_u64(), b.next_u64(), "T {t}, seed {seed}");
            seen.insert(token);
        }
        if t == 0.0 {
            assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![2]);
        } else {
            assert!(seen.len() >= 4, "T {t}: only {seen:?} drawn");
        }
    }
}
