//! Vector-friendly inner loops for the CPU backend, and the run-time check for AVX2/FMA: written as fixed-width lanes so the
//! compiler turns them into SIMD (a plain iterator sum is a sequential chain of adds that
//! it may not reorder, so it stays scalar).

/// Lanes summed independently; 8 f32 fill one 256-bit register (two SSE registers).
const LANES: usize = 8;

/// `sum(a[i] * b[i])` over `min(a.len(), b.len())` elements, in 8 independent lanes summed
/// pairwise at the end (a fixed order: the same inputs always give the same result).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let body = n / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for (x, y) in a[..body]
        .chunks_exact(LANES)
        .zip(b[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in a[body..].iter().zip(&b[body..]) {
        tail += x * y;
    }
    let (lo, hi) = acc.split_at(LANES / 2);
    let mut half = [0.0f32; LANES / 2];
    for l in 0..LANES / 2 {
        half[l] = lo[l] + hi[l];
    }
    (half[0] + half[2]) + (half[1] + half[3]) + tail
}

/// Whether the CPU has AVX2 and FMA (checked once): the kernels compiled for them are
/// chosen at run time, so one binary runs everywhere.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::dot;

    #[test]
    fn dot_matches_a_plain_sum() {
        for n in [0usize, 1, 7, 8, 9, 16, 63, 64, 65, 128, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
        }
        // Only the common length counts.
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0]), 14.0);
    }
}
