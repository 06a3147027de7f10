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
    // matrixmultiply packs the whole right-hand side into a fresh buffer on every call. For
    // a wide weight (an lm_head is 150k x 1k) that buffer is hundreds of MB of new pages
    // zeroed by the kernel each step; taking the output columns in panels keeps it small
    // enough to be reused from the heap.
    let panel = (PACK_BYTES / (4 * k.max(1))).clamp(64, n.max(64));
    let mut j0 = 0;
    while j0 < n {
        let cols = panel.min(n - j0);
        // SAFETY: the asserts above bound every access: `a` is m x k with row stride k;
        // the panel of `w` starts at row j0 and is read as k x cols with row stride 1 and
        // column stride k, ending at element (j0 + cols) * k <= n * k; the panel of `out`
        // starts at column j0 and is m x cols with row stride n, ending inside its m * n
        // elements. The three buffers do not alias.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                cols,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                w.as_ptr().add(j0 * k),
                1,
                k as isize,
                0.0,
                out.as_mut_ptr().add(j0),
                n as isize,
                1,
            );
        }
        j0 += cols;
    }
    out
}

/// Largest right-hand-side panel packed per GEMM call (bytes): under glibc's largest
/// mmap threshold, so the packing buffer is recycled rather than mapped afresh.
const PACK_BYTES: usize = 8 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_loop() {
        let (m, k, n) = (3, 5, 4);
        check(m, k, n);
        // Wide enough to be taken in several panels.
        check(2, 300_000, 70);
    }

    fn check(m: usize, k: usize, n: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let out = matmul_wt(&a, &w, m, k, n);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * w[j * k + p]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-3 * (1.0 + want.abs()));
            }
        }
    }
}
