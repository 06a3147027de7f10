//! CPU matrix products through `matrixmultiply` (multithreaded f32 GEMM).

/// `out[m, n] = a[m, k] @ w[n, k]^T` (a linear layer with weights stored as Hugging Face does).
pub fn matmul_wt(a: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(
        a.len(),
        m * k,
        "matmul_wt: a has {} elements, want {m}x{k}",
        a.len()
    );
    assert_eq!(
        w.len(),
        n * k,
        "matmul_wt: w has {} elements, want {n}x{k}",
        w.len()
    );
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    // SAFETY: the asserts above bound every access: `a` is m x k with row stride k, `w` read
    // as k x n with row stride 1 and column stride k stays inside its n * k elements, and
    // `out` is m x n with row stride n; the three buffers do not alias.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_loop() {
        let (m, k, n) = (3, 5, 4);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let out = matmul_wt(&a, &w, m, k, n);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * w[j * k + p]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
