//! Linear-layer weights packed once at load for the CPU backend, and the matrix product
//! that consumes them: `out[m, n] = a[m, k] @ W[n, k]^T`.
//!
//! Layout: `[ceil(n / 16) panels][k][16]`, each panel the 16 output features
//! `16 p .. 16 p + 16` interleaved along k (zeros past `n`), in f32 or, for bf16
//! checkpoints, bf16 (widened in the kernel, so memory stays at the file's size). A decode
//! step (a few rows) streams every weight once, in order, with nothing repacked per call;
//! a prefill reuses each panel, small enough for L2, across all its rows. Panels are split
//! across the rayon pool's threads; the kernel uses AVX2 and FMA when the CPU has them
//! (checked once), else a portable loop the compiler vectorises.

use super::simd::has_avx2_fma;
use half::bf16;
use rayon::prelude::*;

/// Output features per panel (two 8-lane registers).
pub const PANEL: usize = 16;
/// Activation rows per register tile.
const ROWS: usize = 4;
/// Panels per parallel task (enough work to outweigh the task's cost).
const PANELS_PER_TASK: usize = 4;

/// Packed storage.
#[derive(Debug, Clone)]
enum Data {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
}

/// A `[n, k]` weight matrix (Hugging Face's `[out_features, in_features]`), packed.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    data: Data, // [panels, k, PANEL]
}

/// Packs the `[n, k]` matrix whose element `i` (row-major) is `get(i)`.
fn pack_with<T: Copy + Default>(n: usize, k: usize, get: impl Fn(usize) -> T) -> Vec<T> {
    let panels = n.div_ceil(PANEL);
    let mut out = vec![T::default(); panels * k * PANEL];
    for j in 0..n {
        let base = (j / PANEL) * k * PANEL + j % PANEL;
        for p in 0..k {
            out[base + p * PANEL] = get(j * k + p);
        }
    }
    out
}

fn pack<T: Copy + Default>(w: &[T], n: usize, k: usize) -> Vec<T> {
    assert_eq!(
        w.len(),
        n * k,
        "packing a {n}x{k} matrix from {} values",
        w.len()
    );
    pack_with(n, k, |i| w[i])
}

/// Element `i` of little-endian `bytes` holding `N`-byte values.
fn le<const N: usize>(bytes: &[u8], i: usize) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&bytes[i * N..(i + 1) * N]);
    b
}

impl PackedMatrix {
    /// Packs f32 weights `w` (`[n, k]`, row-major).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        Self {
            n,
            k,
            data: Data::F32(pack(w, n, k)),
        }
    }

    /// Packs f32 weights stored as little-endian bytes (a checkpoint's, no copy first).
    pub fn from_f32_le(bytes: &[u8], n: usize, k: usize) -> Self {
        assert_eq!(bytes.len(), 4 * n * k, "packing a {n}x{k} f32 matrix");
        Self {
            n,
            k,
            data: Data::F32(pack_with(n, k, |i| f32::from_le_bytes(le(bytes, i)))),
        }
    }

    /// Packs bf16 weights stored as little-endian bytes, kept as bf16.
    pub fn from_bf16_le(bytes: &[u8], n: usize, k: usize) -> Self {
        assert_eq!(bytes.len(), 2 * n * k, "packing a {n}x{k} bf16 matrix");
        Self {
            n,
            k,
            data: Data::Bf16(pack_with(n, k, |i| u16::from_le_bytes(le(bytes, i)))),
        }
    }

    /// Packs bf16 weights `w` (`[n, k]`, row-major), kept as bf16.
    pub fn from_bf16(w: &[bf16], n: usize, k: usize) -> Self {
        let bits: Vec<u16> = w.iter().map(|x| x.to_bits()).collect();
        Self {
            n,
            k,
            data: Data::Bf16(pack(&bits, n, k)),
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes of packed storage.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(v) => 4 * v.len(),
            Data::Bf16(v) => 2 * v.len(),
        }
    }

    /// Weight row `j` (`[k]`) into `out` as f32 (an embedding lookup on a packed table).
    /// Returns false when `j` is out of range.
    pub fn row_into(&self, j: usize, out: &mut [f32]) -> bool {
        if j >= self.n || out.len() != self.k {
            return false;
        }
        let base = (j / PANEL) * self.k * PANEL + j % PANEL;
        match &self.data {
            Data::F32(v) => {
                for (p, o) in out.iter_mut().enumerate() {
                    *o = v[base + p * PANEL];
                }
            }
            Data::Bf16(v) => {
                for (p, o) in out.iter_mut().enumerate() {
                    *o = bf16::from_bits(v[base + p * PANEL]).to_f32();
                }
            }
        }
        true
    }

    /// `out[m, n] = a[m, k] @ W^T`.
    pub fn matmul(&self, a: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(
            a.len(),
            m * k,
            "matmul: a has {} values, want {m}x{k}",
            a.len()
        );
        let mut out = vec![0.0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        let panels = n.div_ceil(PANEL);
        // [panels, m, PANEL]: each task owns whole panels; scattered into out at the end.
        let mut out_t = vec![0.0f32; panels * m * PANEL];
        let fast = has_avx2_fma();
        let task = PANELS_PER_TASK * m * PANEL;
        out_t
            .par_chunks_mut(task)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (pp, dst) in chunk.chunks_exact_mut(m * PANEL).enumerate() {
                    let panel = t * PANELS_PER_TASK + pp;
                    let range = panel * k * PANEL..(panel + 1) * k * PANEL;
                    match &self.data {
                        Data::F32(v) => panel_f32(a, &v[range], m, k, dst, fast),
                        Data::Bf16(v) => panel_bf16(a, &v[range], m, k, dst, fast),
                    }
                }
            });
        for (panel, block) in out_t.chunks_exact(m * PANEL).enumerate() {
            let j0 = panel * PANEL;
            let width = PANEL.min(n - j0);
            for (i, src) in block.chunks_exact(PANEL).enumerate() {
                out[i * n + j0..i * n + j0 + width].copy_from_slice(&src[..width]);
            }
        }
        out
    }
}

/// One f32 panel (`[k, PANEL]`) against every row of `a`, into `dst` (`[m, PANEL]`).
fn panel_f32(a: &[f32], w: &[f32], m: usize, k: usize, dst: &mut [f32], fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is true only when the CPU reports AVX2 and FMA, the features
        // `avx2::panel` is compiled for; its slices are checked there.
        unsafe { avx2::panel::<false>(a, w.as_ptr() as *const u8, w.len(), m, k, dst) };
        return;
    }
    let _ = fast;
    portable_panel(a, m, k, dst, |p, l| w[p * PANEL + l]);
}

/// One bf16 panel against every row of `a`.
fn panel_bf16(a: &[f32], w: &[u16], m: usize, k: usize, dst: &mut [f32], fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: as in `panel_f32`.
        unsafe { avx2::panel::<true>(a, w.as_ptr() as *const u8, w.len(), m, k, dst) };
        return;
    }
    let _ = fast;
    portable_panel(a, m, k, dst, |p, l| {
        bf16::from_bits(w[p * PANEL + l]).to_f32()
    });
}

/// The portable kernel: `dst[i][l] = sum_p a[i][p] * w(p, l)`.
fn portable_panel(a: &[f32], m: usize, k: usize, dst: &mut [f32], w: impl Fn(usize, usize) -> f32) {
    for i in 0..m {
        let row = &a[i * k..(i + 1) * k];
        let mut acc = [0.0f32; PANEL];
        for (p, &x) in row.iter().enumerate() {
            for (l, s) in acc.iter_mut().enumerate() {
                *s += x * w(p, l);
            }
        }
        dst[i * PANEL..(i + 1) * PANEL].copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PANEL, ROWS};
    use std::arch::x86_64::*;

    /// Two 8-lane registers of panel row `p`: f32, or bf16 widened (bits << 16).
    ///
    /// # Safety
    /// `w` points at `len` elements (f32, or u16 when `BF16`) and `(p + 1) * PANEL <= len`.
    #[inline(always)]
    unsafe fn load<const BF16: bool>(w: *const u8, p: usize) -> (__m256, __m256) {
        if BF16 {
            let v = _mm256_loadu_si256(w.add(2 * p * PANEL) as *const __m256i);
            let lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v));
            let hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(v));
            (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(lo)),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(hi)),
            )
        } else {
            let f = w as *const f32;
            (
                _mm256_loadu_ps(f.add(p * PANEL)),
                _mm256_loadu_ps(f.add(p * PANEL + 8)),
            )
        }
    }

    /// Rows `i..i + R` of `a` against the panel.
    ///
    /// # Safety
    /// As [`load`] for every `p < k`; `a` holds rows `i..i + R` of length `k`; `dst` holds
    /// `(i + R) * PANEL` values.
    #[inline(always)]
    unsafe fn tile<const R: usize, const BF16: bool>(
        a: &[f32],
        w: *const u8,
        k: usize,
        i: usize,
        dst: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let rows: [&[f32]; R] = std::array::from_fn(|r| &a[(i + r) * k..(i + r + 1) * k]);
        for p in 0..k {
            let (w0, w1) = load::<BF16>(w, p);
            for r in 0..R {
                let x = _mm256_set1_ps(*rows[r].get_unchecked(p));
                acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
            }
        }
        for (r, pair) in acc.iter().enumerate() {
            let out = dst[(i + r) * PANEL..(i + r + 1) * PANEL].as_mut_ptr();
            _mm256_storeu_ps(out, pair[0]);
            _mm256_storeu_ps(out.add(8), pair[1]);
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `w` points at `len` elements (f32, or u16 when `BF16`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel<const BF16: bool>(
        a: &[f32],
        w: *const u8,
        len: usize,
        m: usize,
        k: usize,
        dst: &mut [f32],
    ) {
        // Every access below stays inside these bounds.
        assert!(len >= k * PANEL && a.len() >= m * k && dst.len() >= m * PANEL);
        let mut i = 0;
        while i < m {
            match m - i {
                1 => tile::<1, BF16>(a, w, k, i, dst),
                2 => tile::<2, BF16>(a, w, k, i, dst),
                3 => tile::<3, BF16>(a, w, k, i, dst),
                _ => tile::<ROWS, BF16>(a, w, k, i, dst),
            }
            i += (m - i).min(ROWS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(a: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        out
    }

    fn check(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (idx, (g, w)) in got.iter().zip(want).enumerate() {
            let bound = 2e-6 * k as f64 * (1.0 + w.abs());
            assert!((*g as f64 - w).abs() <= bound, "{what}[{idx}]: {g} vs {w}");
        }
    }

    #[test]
    fn f32_and_bf16_match_a_plain_loop() {
        // Rows 1..=9 (every register tile and remainder), k odd, n not a multiple of a
        // panel or of a task, and a prefill-sized m.
        for (m, k, n) in [
            (1, 5, 3),
            (3, 37, 17),
            (4, 64, 16),
            (9, 33, 130),
            (70, 48, 70),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let p = PackedMatrix::from_f32(&w, n, k);
            check(&p.matmul(&a, m), &plain(&a, &w, m, k, n), k, "f32");
            let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
            let wr: Vec<f32> = wb.iter().map(|x| x.to_f32()).collect();
            let pb = PackedMatrix::from_bf16(&wb, n, k);
            check(&pb.matmul(&a, m), &plain(&a, &wr, m, k, n), k, "bf16");
            assert_eq!(pb.bytes() * 2, p.bytes());
            // From a checkpoint's little-endian bytes: the same packing.
            let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            let p2 = PackedMatrix::from_f32_le(&bytes, n, k);
            assert_eq!(p2.matmul(&a, m), p.matmul(&a, m));
            let bytes: Vec<u8> = wb.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
            let pb2 = PackedMatrix::from_bf16_le(&bytes, n, k);
            assert_eq!(pb2.matmul(&a, m), pb.matmul(&a, m));
        }
    }

    #[test]
    fn portable_and_avx2_kernels_agree() {
        let (m, k) = (6, 41);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..PANEL * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let packed = pack(&w, PANEL, k);
        let mut x = vec![0.0; m * PANEL];
        let mut y = vec![0.0; m * PANEL];
        panel_f32(&a, &packed, m, k, &mut x, false);
        panel_f32(&a, &packed, m, k, &mut y, has_avx2_fma());
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{p} vs {q}");
        }
    }

    #[test]
    fn rows_read_back() {
        let (n, k) = (19, 7);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let p = PackedMatrix::from_f32(&w, n, k);
        let mut row = vec![0.0; k];
        for j in 0..n {
            assert!(p.row_into(j, &mut row));
            assert_eq!(row, &w[j * k..(j + 1) * k]);
        }
        assert!(!p.row_into(n, &mut row), "row past the end");
    }
}
