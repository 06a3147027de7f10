//! GPU kernel tests: every launcher in `kernels/spindle_kernels.h`, through its safe
//! wrapper in `spindle::backend::cuda`, against the CPU backend's own functions (attention through
//! `cpu_attention::attention` on a plan built from the same chunk lists, RMSNorm, RoPE and
//! SiLU through `backend::cpu`), computed in f32 on the same bf16 inputs. Without a CUDA
//! driver every GPU test prints `SKIPPED: <test>: no CUDA driver (<reason>)` and passes;
//! the tests named `tolerance_*` run on the CPU alone and show that the tolerance catches
//! the slips it is there to catch.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use spindle::backend::cpu::{rms_norm_rows, rope_inv_freq, rope_rows, silu_mul as cpu_silu_mul};
use spindle::backend::cpu_attention::{self, AttnShape};
use spindle::backend::cuda::kernels::{
    self, CacheShape, Chunks, DecodeWorkspace, KvCache, SampleParams,
};
use spindle::backend::cuda::{Blas, Gpu};
use spindle::kv::Chunk;
use spindle::plan::{AttentionPlan, PlanRow, PlanThread};
use spindle::AttentionMode;

#[path = "gpu_kernels/forked.rs"]
mod forked;
#[path = "common/sample_ref.rs"]
mod sample_ref;
use sample_ref::sample_ref;

// ------------------------------------------------------------------ harness

/// Reports a skipped GPU test. With `SPINDLE_REQUIRE_GPU` set (the GPU run sets it) a
/// missing GPU is a failure, so a green run on a GPU machine means the tests ran.
fn skip(test: &str, reason: &str) {
    assert!(
        std::env::var_os("SPINDLE_REQUIRE_GPU").is_none(),
        "{test}: SPINDLE_REQUIRE_GPU is set but {reason}"
    );
    println!("SKIPPED: {test}: {reason}");
}

fn gpu(test: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            skip(test, &format!("no CUDA driver ({e})"));
            None
        }
    }
}

/// Deterministic test data from spindle's one seeded generator.
struct Rng(spindle::generate::rng::Rng);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(spindle::generate::rng::Rng::new(seed))
    }
    fn uniform(&mut self) -> f32 {
        self.0.next_f32()
    }
    fn range(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
    fn normal_ish(&mut self) -> f32 {
        (self.uniform() + self.uniform() + self.uniform() - 1.5) * 2.0
    }
    fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(self.normal_ish() * scale))
            .collect()
    }
}

fn f32s(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// `x` rounded to bf16 and back: what a kernel that computes exactly in f32 and stores bf16
/// would return.
fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

fn up<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    s.clone_htod(v).expect("htod")
}

fn down<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<T> {
    let v = s.clone_dtoh(d).expect("dtoh");
    s.synchronize().expect("sync");
    v
}

// ------------------------------------------------------------------ tolerance
//
// A kernel's bf16 output `g` is accepted against the f32 reference `w` when, element by
// element, `|g - w| <= RTOL * |w| + ATOL * max|w over its row|` (a row: one query vector of
// one head for attention, one normalised row for RMSNorm, ...).
//
// - RTOL = 1e-2: storing an f32 result as bf16 costs at most 2^-9 = 0.2 % relative; the
//   kernels with two roundings (RMSNorm rounds x * rstd before the weight multiply) or an
//   f32 sum in another order stay under 0.5 %; 1e-2 leaves a factor of two over that.
// - ATOL = 2e-3 of the row's largest magnitude: elements that cancel to near zero are only
//   as exact as the row's scale (f32 reordering of the same sum).
//
// The tolerance scales with each row: an attention row over a long view has outputs of a
// few hundredths (an average of many values), so a fixed 2e-2 absolute bound would accept
// anything. `tolerance_*` below show, on the CPU, that this bound rejects a reference that
// dropped one token of a 999-token view, or the first token of every split, and accepts
// the exact result rounded to bf16.

const RTOL: f32 = 1e-2;
const ATOL: f32 = 2e-3;

/// Worst `|g - w| / tol` over all elements (`<= 1` passes), or the first failing element.
fn check_close(
    got: &[f32],
    want: &[f32],
    row_len: usize,
    atol: f32,
    rtol: f32,
) -> Result<f32, String> {
    if got.len() != want.len() || row_len == 0 || !want.len().is_multiple_of(row_len) {
        return Err(format!(
            "length {} vs {} (row length {row_len})",
            got.len(),
            want.len()
        ));
    }
    let mut worst = 0.0f32;
    for (r, (gr, wr)) in got.chunks(row_len).zip(want.chunks(row_len)).enumerate() {
        let scale = wr.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for (i, (g, w)) in gr.iter().zip(wr).enumerate() {
            let tol = rtol * w.abs() + atol * scale;
            let err = (g - w).abs();
            if !g.is_finite() || err > tol {
                return Err(format!(
                    "row {r} [{i}]: got {g}, want {w} (err {err:.3e} > tol {tol:.3e}, row scale {scale:.3e})"
                ));
            }
            if tol > 0.0 {
                worst = worst.max(err / tol);
            }
        }
    }
    Ok(worst)
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], row_len: usize, atol: f32, rtol: f32) {
    match check_close(got, want, row_len, atol, rtol) {
        Ok(worst) => println!("{what}: worst error {:.2} of its tolerance", worst),
        Err(e) => panic!("{what}: {e}"),
    }
}

// ------------------------------------------------------------------ attention reference

/// A view: list of (block, start, len) chunks.
type View = Vec<(i32, i32, i32)>;

/// Random view of `len` tokens whose chunks start anywhere inside random blocks.
fn random_view(rng: &mut Rng, len: usize, num_blocks: usize, bs: usize) -> View {
    let mut v = Vec::new();
    let mut left = len;
    while left > 0 {
        let block = rng.range(num_blocks);
        let start = rng.range(bs);
        let n = (1 + rng.range(bs - start)).min(left);
        v.push((block as i32, start as i32, n as i32));
        left -= n;
    }
    v
}

/// Contiguous view over a chain of blocks (`num_blocks` of them, in a scattered order)
/// starting at slot `offset` of the first block.
fn chain_view(num_blocks: usize, offset: usize, len: usize, bs: usize) -> View {
    let mut v = Vec::new();
    let (mut pos, mut left, mut i) = (offset, len, 0usize);
    while left > 0 {
        let n = (bs - pos).min(left);
        // 7919 is prime, so this visits the blocks in a scattered order.
        v.push((((3 + 7919 * i) % num_blocks) as i32, pos as i32, n as i32));
        left -= n;
        pos = 0;
        i += 1;
    }
    v
}

fn view_len(v: &View) -> usize {
    v.iter().map(|c| c.2 as usize).sum()
}

struct Csr {
    indptr: Vec<i32>,
    block: Vec<i32>,
    start: Vec<i32>,
    len: Vec<i32>,
}

fn csr(views: &[View]) -> Csr {
    let mut c = Csr {
        indptr: vec![0],
        block: vec![],
        start: vec![],
        len: vec![],
    };
    for v in views {
        for &(b, s, l) in v {
            c.block.push(b);
            c.start.push(s);
            c.len.push(l);
        }
        c.indptr.push(c.block.len() as i32);
    }
    c
}

struct AttnCase {
    shape: CacheShape,
    hq: usize,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

impl AttnCase {
    fn new(rng: &mut Rng, num_blocks: usize, bs: usize, hkv: usize, hq: usize, d: usize) -> Self {
        let shape = CacheShape {
            num_blocks,
            block_size: bs,
            num_kv_heads: hkv,
            head_dim: d,
        };
        let k = rng.bf16s(shape.elems(), 1.0);
        let v = rng.bf16s(shape.elems(), 1.0);
        AttnCase { shape, hq, k, v }
    }

    /// `[rows, hq * d]` attention of `q` (`[rows, hq * d]`), row r over `views[r]` masked to
    /// `limits[r]`, computed by the CPU backend's attention on a per-row (naive) plan built
    /// from the same chunk lists, with scale `1 / sqrt(d)`.
    fn reference(&self, q: &[bf16], views: &[&View], limits: &[i32]) -> Vec<f32> {
        let threads: Vec<PlanThread> = views
            .iter()
            .zip(limits)
            .enumerate()
            .map(|(r, (v, &limit))| PlanThread {
                chunks: v
                    .iter()
                    .map(|&(block, start, len)| Chunk {
                        block: block as u32,
                        start: start as u32,
                        len: len as u32,
                    })
                    .collect(),
                rows: vec![PlanRow {
                    row: r as u32,
                    limit: limit as u32,
                }],
            })
            .collect();
        let plan = AttentionPlan::build(&threads, AttentionMode::Naive, 0);
        let shape = AttnShape {
            num_heads: self.hq,
            num_kv_heads: self.shape.num_kv_heads,
            head_dim: self.shape.head_dim,
            block_size: self.shape.block_size,
        };
        cpu_attention::attention(&plan, &f32s(q), &f32s(&self.k), &f32s(&self.v), shape).output
    }
}

/// One decode launch: views, limits and queries over an [`AttnCase`].
struct DecodeInput {
    case: AttnCase,
    views: Vec<View>,
    limits: Vec<i32>,
    q: Vec<bf16>,
}

impl DecodeInput {
    fn reference(&self) -> Vec<f32> {
        let views: Vec<&View> = self.views.iter().collect();
        self.case.reference(&self.q, &views, &self.limits)
    }
}

/// Rows of the given lengths over a cache of `bs`-token blocks: even rows of 100+ tokens
/// start with a shared 100-token chain (starting mid-block), the rest is a private random
/// tail; every third row's limit is two thirds of its view.
fn decode_input(
    seed: u64,
    hkv: usize,
    gqa: usize,
    d: usize,
    bs: usize,
    lens: &[usize],
) -> DecodeInput {
    let mut rng = Rng::new(seed);
    let max_len = lens.iter().copied().max().unwrap_or(0);
    // Enough blocks that random chunks rarely repeat, capped for long views.
    let num_blocks = (3 * 1600 / bs).clamp(96, 4096).max(max_len / bs / 4 + 8);
    let case = AttnCase::new(&mut rng, num_blocks, bs, hkv, hkv * gqa, d);
    let prefix = chain_view(num_blocks, 5 % bs, 100, bs);
    let mut views = Vec::new();
    let mut limits = Vec::new();
    for (r, &len) in lens.iter().enumerate() {
        let mut v = if len >= 100 && r % 2 == 0 {
            prefix.clone()
        } else {
            Vec::new()
        };
        let have = view_len(&v);
        v.extend(random_view(&mut rng, len - have, num_blocks, bs));
        views.push(v);
        limits.push(if r % 3 == 2 {
            (len * 2 / 3) as i32
        } else {
            len as i32
        });
    }
    let q = rng.bf16s(lens.len() * case.hq * d, 1.0);
    DecodeInput {
        case,
        views,
        limits,
        q,
    }
}

/// Runs `paged_decode` on `input` and returns its `[rows, hq * d]` output.
fn launch_decode(g: &Gpu, input: &DecodeInput, partition: usize) -> Vec<f32> {
    let st = g.stream();
    let case = &input.case;
    let (hq, d) = (case.hq, case.shape.head_dim);
    let rows = input.limits.len();
    let c = csr(&input.views);
    let (kd, vd) = (up(st, &case.k), up(st, &case.v));
    let (qd, ip, cb, cs, cl, rl) = (
        up(st, &input.q),
        up(st, &c.indptr),
        up(st, &c.block),
        up(st, &c.start),
        up(st, &c.len),
        up(st, &input.limits),
    );
    let mut out = st.alloc_zeros::<bf16>(rows * hq * d).unwrap();
    let mut ws = DecodeWorkspace::new();
    let max_len = input.limits.iter().copied().max().unwrap_or(0) as usize;
    kernels::paged_decode(
        st,
        &qd,
        &KvCache {
            k: &kd,
            v: &vd,
            shape: case.shape,
        },
        &Chunks {
            indptr: &ip,
            block: &cb,
            start: &cs,
            len: &cl,
        },
        &rl,
        &mut out,
        hq,
        1.0 / (d as f32).sqrt(),
        max_len,
        partition,
        &mut ws,
    )
    .expect("paged_decode");
    f32s(&down(st, &out))
}

fn check_decode(test: &str, input: &DecodeInput, partition: usize) {
    let Some(g) = gpu(test) else { return };
    let got = launch_decode(&g, input, partition);
    let splits = kernels::decode_num_splits(
        input.limits.iter().copied().max().unwrap_or(0) as usize,
        partition,
    );
    assert_close(
        &format!(
            "{test} (bs {}, partition {partition}, {splits} splits)",
            input.case.shape.block_size
        ),
        &got,
        &input.reference(),
        input.case.shape.head_dim,
        ATOL,
        RTOL,
    );
}

#[allow(clippy::too_many_arguments)]
fn run_decode(
    test: &str,
    seed: u64,
    hkv: usize,
    gqa: usize,
    d: usize,
    lens: &[usize],
    partition: usize,
) {
    check_decode(test, &decode_input(seed, hkv, gqa, d, 16, lens), partition);
}

#[test]
fn decode_gqa1_d128_single_split() {
    run_decode(
        "decode_gqa1_d128_single_split",
        1,
        4,
        1,
        128,
        &[1, 17, 100, 255, 301],
        512,
    );
}

#[test]
fn decode_gqa4_d128_multi_split() {
    run_decode(
        "decode_gqa4_d128_multi_split",
        2,
        2,
        4,
        128,
        &[1500, 33, 700, 1029, 5],
        512,
    );
}

#[test]
fn decode_gqa8_d128_many_small_splits() {
    run_decode(
        "decode_gqa8_d128_many_small_splits",
        3,
        1,
        8,
        128,
        &[513, 130, 64, 1, 257, 999],
        64,
    );
}

#[test]
fn decode_gqa8_d64_multi_split() {
    run_decode(
        "decode_gqa8_d64_multi_split",
        4,
        2,
        8,
        64,
        &[1200, 77, 640],
        256,
    );
}

#[test]
fn decode_gqa5_d64_two_head_tiles() {
    // 5 q-heads per kv-head (Qwen2.5-32B shape) and 12 (two q-head tiles of 8).
    run_decode(
        "decode_gqa5_d64_two_head_tiles",
        5,
        2,
        5,
        64,
        &[300, 45, 129],
        100,
    );
    run_decode("decode_gqa12_d128", 6, 1, 12, 128, &[200, 31], 512);
}

#[test]
fn decode_long_views_8k() {
    // Views of 8k+ tokens: many splits of 512, and one split of 9000 (no merge).
    let input = decode_input(7, 2, 4, 128, 16, &[8200, 1, 9001, 4097]);
    check_decode("decode_long_views_8k", &input, 512);
    check_decode("decode_long_views_8k one split", &input, 9001);
}

#[test]
fn decode_block_sizes_1_3_16_with_splits_ending_mid_block() {
    // Partitions that are not multiples of the block size end every split mid-block.
    for (bs, partition) in [(1, 7), (3, 64), (3, 100), (16, 100), (16, 40)] {
        let input = decode_input(8 + bs as u64, 2, 4, 64, bs, &[700, 45, 301, 1, 160]);
        check_decode(
            &format!("decode_block_sizes bs {bs} partition {partition}"),
            &input,
            partition,
        );
    }
}

/// A view of whole and partial chunks and, for each chunk boundary b, rows with limits
/// b - 1, b and b + 1: a mask that stops one token early or late at a chunk's edge fails.
fn boundary_input(seed: u64, bs: usize) -> DecodeInput {
    let mut rng = Rng::new(seed);
    let (hkv, gqa, d) = (2, 4, 64);
    let num_blocks = 64;
    let case = AttnCase::new(&mut rng, num_blocks, bs, hkv, hkv * gqa, d);
    // A chain starting mid-block, then random chunks: boundaries at block edges and inside.
    let mut view = chain_view(num_blocks, bs / 2, 3 * bs, bs);
    view.extend(random_view(&mut rng, 40, num_blocks, bs));
    let mut limits = Vec::new();
    let mut edge = 0;
    for c in &view[..view.len() - 1] {
        edge += c.2;
        for l in [edge - 1, edge, edge + 1] {
            if l >= 1 && !limits.contains(&l) {
                limits.push(l);
            }
        }
    }
    let views = vec![view; limits.len()];
    let q = rng.bf16s(limits.len() * case.hq * d, 1.0);
    DecodeInput {
        case,
        views,
        limits,
        q,
    }
}

#[test]
fn decode_limits_beside_chunk_boundaries() {
    for bs in [1, 3, 16] {
        let input = boundary_input(30 + bs as u64, bs);
        // One split, and splits of 5 that also end beside the boundaries.
        check_decode(
            &format!("decode_limits_beside_chunk_boundaries bs {bs}"),
            &input,
            512,
        );
        check_decode(
            &format!("decode_limits_beside_chunk_boundaries bs {bs} split 5"),
            &input,
            5,
        );
    }
}

// ------------------------------------------------------------------ the tolerance's teeth
// CPU only: these run without a GPU and show that the tolerance above catches a masking
// slip on the very data the GPU tests use.

/// A masking slip: a row's (view, limit) to the (view, limit) a faulty kernel would use.
type Slip = Box<dyn Fn(&View, i32) -> (View, i32)>;

/// The reference with the view of every row changed by `slip` (which returns the new view
/// and limit), computed by the same CPU function.
fn slipped(input: &DecodeInput, slip: impl Fn(&View, i32) -> (View, i32)) -> Vec<f32> {
    let (views, limits): (Vec<View>, Vec<i32>) = input
        .views
        .iter()
        .zip(&input.limits)
        .map(|(v, &l)| slip(v, l))
        .unzip();
    let refs: Vec<&View> = views.iter().collect();
    input.case.reference(&input.q, &refs, &limits)
}

/// `view` without its token at view index `at` (the limit shrinks by one if it covered it).
fn drop_token(view: &View, limit: i32, at: usize) -> (View, i32) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for &(b, s, l) in view {
        let (lo, hi) = (pos, pos + l as usize);
        if (lo..hi).contains(&at) {
            let k = (at - lo) as i32;
            if k > 0 {
                out.push((b, s, k));
            }
            if k + 1 < l {
                out.push((b, s + k + 1, l - k - 1));
            }
        } else {
            out.push((b, s, l));
        }
        pos = hi;
    }
    let limit = if (at as i32) < limit {
        limit - 1
    } else {
        limit
    };
    (out, limit)
}

#[test]
fn tolerance_accepts_bf16_rounding() {
    for (seed, lens) in [
        (2u64, vec![1500, 33, 700, 1029, 5]),
        (3, vec![513, 130, 999]),
    ] {
        let input = decode_input(seed, 2, 4, 128, 16, &lens);
        let want = input.reference();
        let worst = check_close(&bf16_round(&want), &want, 128, ATOL, RTOL)
            .expect("the exact result stored as bf16 passes");
        assert!(worst <= 0.5, "bf16 rounding uses {worst} of the tolerance");
    }
}

#[test]
fn tolerance_catches_one_dropped_token() {
    // The slips of a kernel that masks one token too many: the first, a middle or the last
    // visible token of a 999-token view, and the first token of every 512-token split.
    let input = decode_input(3, 1, 8, 128, 16, &[999]);
    let want = input.reference();
    let slips: [(&str, Slip); 4] = [
        ("first token", Box::new(|v: &View, l| drop_token(v, l, 0))),
        (
            "middle token",
            Box::new(|v: &View, l| drop_token(v, l, 500)),
        ),
        (
            "last visible token",
            Box::new(|v: &View, l| (v.clone(), l - 1)),
        ),
        (
            "first token of every split",
            Box::new(|v: &View, l| {
                let (v, l) = drop_token(v, l, 512);
                drop_token(&v, l, 0)
            }),
        ),
    ];
    for (what, slip) in slips {
        let bad = bf16_round(&slipped(&input, slip));
        let verdict = check_close(&bad, &want, 128, ATOL, RTOL);
        // For the record: the old fixed bound (2e-2 absolute + 2e-2 relative).
        let old = check_close(&bad, &want, bad.len(), 0.0, 0.0).is_err()
            && bad
                .iter()
                .zip(&want)
                .any(|(b, w)| (b - w).abs() > 2e-2 + 2e-2 * w.abs());
        println!("dropped {what}: {verdict:?}; the old 2e-2 bound would catch it: {old}");
        assert!(
            verdict.is_err(),
            "a reference that dropped the {what} of a 999-token view passes the tolerance"
        );
    }
    // The same slip over the multi-split case of `decode_gqa4_d128_multi_split`.
    let input = decode_input(2, 2, 4, 128, 16, &[1500, 33, 700, 1029, 5]);
    let want = input.reference();
    let bad = bf16_round(&slipped(&input, |v, l| {
        let mut out = (v.clone(), l);
        for at in (0..view_len(v)).step_by(512).rev() {
            out = drop_token(&out.0, out.1, at);
        }
        out
    }));
    assert!(
        check_close(&bad, &want, 128, ATOL, RTOL).is_err(),
        "dropping the first token of every split passes the tolerance"
    );
}

#[test]
fn decode_rejects_bad_shapes() {
    let Some(g) = gpu("decode_rejects_bad_shapes") else {
        return;
    };
    let st = g.stream();
    let shape = CacheShape {
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 96,
    };
    let kd = st.alloc_zeros::<bf16>(shape.elems()).unwrap();
    let q = st.alloc_zeros::<bf16>(96).unwrap();
    let i = up(st, &[0i32, 0]);
    let e = st.alloc_zeros::<i32>(0).unwrap();
    let lim = up(st, &[0i32]);
    let mut out = st.alloc_zeros::<bf16>(96).unwrap();
    let r = kernels::paged_decode(
        st,
        &q,
        &KvCache {
            k: &kd,
            v: &kd,
            shape,
        },
        &Chunks {
            indptr: &i,
            block: &e,
            start: &e,
            len: &e,
        },
        &lim,
        &mut out,
        1,
        1.0,
        0,
        512,
        &mut DecodeWorkspace::new(),
    );
    assert!(r.is_err(), "head_dim 96 must be rejected");
}

#[test]
fn attention_rejects_misaligned_caches() {
    let test = "attention_rejects_misaligned_caches";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let shape = CacheShape {
        num_blocks: 2,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 64,
    };
    // A view one element into a buffer: 2-byte aligned, not 16.
    let big = st.alloc_zeros::<bf16>(shape.elems() + 8).unwrap();
    let kd = big.slice(1..1 + shape.elems());
    let q = st.alloc_zeros::<bf16>(64).unwrap();
    let (i, b, s, l, lim) = (
        up(st, &[0i32, 1]),
        up(st, &[0i32]),
        up(st, &[0i32]),
        up(st, &[4i32]),
        up(st, &[4i32]),
    );
    let mut out = st.alloc_zeros::<bf16>(64).unwrap();
    let r = kernels::paged_decode(
        st,
        &q,
        &KvCache {
            k: &kd,
            v: &kd,
            shape,
        },
        &Chunks {
            indptr: &i,
            block: &b,
            start: &s,
            len: &l,
        },
        &lim,
        &mut out,
        1,
        1.0,
        4,
        512,
        &mut DecodeWorkspace::new(),
    );
    match r {
        Err(spindle::backend::cuda::CudaError::Shape { msg, .. }) => {
            assert!(msg.contains("aligned"), "{test}: {msg}")
        }
        other => panic!("{test}: a misaligned cache must be refused, got {other:?}"),
    }
}

/// Prefill over `groups` of (cached prefix tokens, new rows) with `bs`-token blocks: row i
/// of a group sees the prefix and new rows 0..=i.
fn run_prefill_bs(
    test: &str,
    seed: u64,
    (hkv, gqa, d, bs): (usize, usize, usize, usize),
    groups: &[(usize, usize)],
) {
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(seed);
    let longest = groups.iter().map(|&(p, r)| p + r).max().unwrap_or(0);
    let num_blocks = (2560 / bs).max(longest / bs / 4 + 8);
    let case = AttnCase::new(&mut rng, num_blocks, bs, hkv, hkv * gqa, d);
    let hq = case.hq;
    let mut views = Vec::new();
    let mut q_indptr = vec![0i32];
    let mut limits = Vec::new();
    let mut row_view = Vec::new();
    for (gi, &(prefix, rows)) in groups.iter().enumerate() {
        let view = random_view(&mut rng, prefix + rows, case.shape.num_blocks, bs);
        for i in 0..rows {
            limits.push((prefix + i + 1) as i32);
            row_view.push(gi);
        }
        views.push(view);
        q_indptr.push(q_indptr.last().unwrap() + rows as i32);
    }
    let rows = limits.len();
    let q = rng.bf16s(rows * hq * d, 1.0);
    let scale = 1.0 / (d as f32).sqrt();
    let c = csr(&views);
    let plan = kernels::prefill_plan(&q_indptr, gqa).expect("plan");
    let (kd, vd) = (up(st, &case.k), up(st, &case.v));
    let (qd, qi, ip, cb, cs, cl, rl) = (
        up(st, &q),
        up(st, &q_indptr),
        up(st, &c.indptr),
        up(st, &c.block),
        up(st, &c.start),
        up(st, &c.len),
        up(st, &limits),
    );
    let (tg, tr) = (up(st, &plan.tile_group), up(st, &plan.tile_row));
    let mut out = st.alloc_zeros::<bf16>(rows * hq * d).unwrap();
    kernels::prefill_attention(
        st,
        &qd,
        &KvCache {
            k: &kd,
            v: &vd,
            shape: case.shape,
        },
        &qi,
        &Chunks {
            indptr: &ip,
            block: &cb,
            start: &cs,
            len: &cl,
        },
        &rl,
        &tg,
        &tr,
        &mut out,
        hq,
        scale,
    )
    .expect("prefill_attention");
    let got = f32s(&down(st, &out));
    let row_views: Vec<&View> = row_view.iter().map(|&gi| &views[gi]).collect();
    let want = case.reference(&q, &row_views, &limits);
    assert_close(&format!("{test} (bs {bs})"), &got, &want, d, ATOL, RTOL);
}

fn run_prefill(test: &str, seed: u64, hkv: usize, gqa: usize, d: usize, groups: &[(usize, usize)]) {
    run_prefill_bs(test, seed, (hkv, gqa, d, 16), groups);
}

#[test]
fn prefill_gqa1_d128() {
    run_prefill(
        "prefill_gqa1_d128",
        11,
        2,
        1,
        128,
        &[(0, 70), (37, 5), (5, 1)],
    );
}

#[test]
fn prefill_gqa4_d128() {
    run_prefill(
        "prefill_gqa4_d128",
        12,
        2,
        4,
        128,
        &[(100, 33), (0, 17), (250, 2)],
    );
}

#[test]
fn prefill_gqa8_d64() {
    run_prefill("prefill_gqa8_d64", 13, 1, 8, 64, &[(31, 40), (0, 9)]);
}

#[test]
fn prefill_gqa5_d64() {
    run_prefill("prefill_gqa5_d64", 14, 2, 5, 64, &[(64, 25), (3, 13)]);
}

#[test]
fn prefill_block_sizes_1_3_16() {
    for bs in [1, 3, 16] {
        run_prefill_bs(
            "prefill_block_sizes_1_3_16",
            16 + bs as u64,
            (2, 4, 64, bs),
            &[(37, 20), (0, 9), (bs + 1, 3)],
        );
    }
}

#[test]
fn prefill_long_prefix_8k() {
    run_prefill_bs(
        "prefill_long_prefix_8k",
        17,
        (2, 4, 128, 16),
        &[(8190, 5), (0, 3)],
    );
}

#[test]
fn prefill_matches_decode_rows() {
    // Single-row groups through the prefill kernel equal the decode kernel.
    let test = "prefill_matches_decode_rows";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(15);
    let case = AttnCase::new(&mut rng, 64, 16, 2, 8, 128);
    let views: Vec<View> = (0..4)
        .map(|i| random_view(&mut rng, 50 + 90 * i, 64, 16))
        .collect();
    let limits: Vec<i32> = views.iter().map(|v| v.iter().map(|c| c.2).sum()).collect();
    let q = rng.bf16s(4 * 8 * 128, 1.0);
    let c = csr(&views);
    let qi: Vec<i32> = (0..=4).collect();
    let plan = kernels::prefill_plan(&qi, 4).unwrap();
    let (kd, vd) = (up(st, &case.k), up(st, &case.v));
    let (qd, qid, ip, cb, cs, cl, rl) = (
        up(st, &q),
        up(st, &qi),
        up(st, &c.indptr),
        up(st, &c.block),
        up(st, &c.start),
        up(st, &c.len),
        up(st, &limits),
    );
    let (tg, tr) = (up(st, &plan.tile_group), up(st, &plan.tile_row));
    let cache = KvCache {
        k: &kd,
        v: &vd,
        shape: case.shape,
    };
    let chunks = Chunks {
        indptr: &ip,
        block: &cb,
        start: &cs,
        len: &cl,
    };
    let mut o1 = st.alloc_zeros::<bf16>(q.len()).unwrap();
    let mut o2 = st.alloc_zeros::<bf16>(q.len()).unwrap();
    kernels::prefill_attention(
        st, &qd, &cache, &qid, &chunks, &rl, &tg, &tr, &mut o1, 8, 0.1,
    )
    .unwrap();
    kernels::paged_decode(
        st,
        &qd,
        &cache,
        &chunks,
        &rl,
        &mut o2,
        8,
        0.1,
        320,
        512,
        &mut DecodeWorkspace::new(),
    )
    .unwrap();
    // Two bf16 results of the same f32 math: each within half a bf16 step of it.
    assert_close(
        test,
        &f32s(&down(st, &o1)),
        &f32s(&down(st, &o2)),
        128,
        ATOL,
        RTOL,
    );
}

// ------------------------------------------------------------------ KV cache

#[test]
fn kv_write_scatters_rows() {
    let test = "kv_write_scatters_rows";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(21);
    for (hkv, d) in [(2usize, 128usize), (1, 64), (3, 10)] {
        let shape = CacheShape {
            num_blocks: 8,
            block_size: 16,
            num_kv_heads: hkv,
            head_dim: d,
        };
        let row = hkv * d;
        let slots: Vec<i32> = vec![0, 17, 5 * 16 + 3, -1, 127, 40];
        let k = rng.bf16s(slots.len() * row, 1.0);
        let v = rng.bf16s(slots.len() * row, 1.0);
        let kc0 = rng.bf16s(shape.elems(), 1.0);
        let vc0 = rng.bf16s(shape.elems(), 1.0);
        let (kd, vd, sd) = (up(st, &k), up(st, &v), up(st, &slots));
        let (mut kc, mut vc) = (up(st, &kc0), up(st, &vc0));
        kernels::kv_write(st, &kd, &vd, &mut kc, &mut vc, &sd, shape).expect("kv_write");
        let (mut ke, mut ve) = (kc0.clone(), vc0.clone());
        for (t, &s) in slots.iter().enumerate() {
            if s < 0 {
                continue;
            }
            let s = s as usize;
            ke[s * row..(s + 1) * row].copy_from_slice(&k[t * row..(t + 1) * row]);
            ve[s * row..(s + 1) * row].copy_from_slice(&v[t * row..(t + 1) * row]);
        }
        assert!(down(st, &kc) == ke, "{test}: k cache (hkv {hkv}, d {d})");
        assert!(down(st, &vc) == ve, "{test}: v cache (hkv {hkv}, d {d})");
    }
}

#[test]
fn copy_blocks_all_layers() {
    let test = "copy_blocks_all_layers";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(22);
    let shape = CacheShape {
        num_blocks: 10,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 64,
    };
    let layers = 3;
    let host_k: Vec<Vec<bf16>> = (0..layers).map(|_| rng.bf16s(shape.elems(), 1.0)).collect();
    let host_v: Vec<Vec<bf16>> = (0..layers).map(|_| rng.bf16s(shape.elems(), 1.0)).collect();
    let mut dk: Vec<CudaSlice<bf16>> = host_k.iter().map(|h| up(st, h)).collect();
    let mut dv: Vec<CudaSlice<bf16>> = host_v.iter().map(|h| up(st, h)).collect();
    let pairs: Vec<i32> = vec![1, 4, 2, 9, 7, 0];
    let pd = up(st, &pairs);
    {
        let mut kr: Vec<&mut dyn cudarc::driver::DevicePtrMut<bf16>> = dk
            .iter_mut()
            .map(|s| s as &mut dyn cudarc::driver::DevicePtrMut<bf16>)
            .collect();
        let mut vr: Vec<&mut dyn cudarc::driver::DevicePtrMut<bf16>> = dv
            .iter_mut()
            .map(|s| s as &mut dyn cudarc::driver::DevicePtrMut<bf16>)
            .collect();
        kernels::copy_blocks(st, &mut kr, &mut vr, &pd, shape).expect("copy_blocks");
    }
    let be = shape.block_elems();
    for l in 0..layers {
        for (host, dev) in [(&host_k[l], &dk[l]), (&host_v[l], &dv[l])] {
            let mut want = host.clone();
            for p in pairs.chunks(2) {
                let (s, d) = (p[0] as usize, p[1] as usize);
                want.copy_within(s * be..(s + 1) * be, d * be);
            }
            assert!(down(st, dev) == want, "{test}: layer {l}");
        }
    }
}

// ------------------------------------------------------------------ element-wise

/// The CPU backend's RMSNorm (f32) of `[rows, w.len()]`.
fn rms_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    rms_norm_rows(x, w, eps, &mut out);
    out
}

#[test]
fn rmsnorm_plain_and_qk_norm() {
    let test = "rmsnorm_plain_and_qk_norm";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(31);
    for (rows, n) in [(5usize, 4096usize), (37, 128), (3, 77), (9, 1000)] {
        let x = rng.bf16s(rows * n, 2.0);
        let w = rng.bf16s(n, 1.0);
        let (xd, wd) = (up(st, &x), up(st, &w));
        let mut out = st.alloc_zeros::<bf16>(rows * n).unwrap();
        kernels::rmsnorm(st, &mut out, &xd, &wd, 1e-6).expect("rmsnorm");
        let want = rms_ref(&f32s(&x), &f32s(&w), 1e-6);
        assert_close(
            &format!("{test} {rows}x{n}"),
            &f32s(&down(st, &out)),
            &want,
            n,
            ATOL,
            RTOL,
        );
        let mut xi = up(st, &x);
        kernels::rmsnorm_inplace(st, &mut xi, &wd, 1e-6).expect("rmsnorm_inplace");
        assert_close(
            &format!("{test} inplace {rows}x{n}"),
            &f32s(&down(st, &xi)),
            &want,
            n,
            ATOL,
            RTOL,
        );
    }
}

#[test]
fn fused_add_rmsnorm_updates_residual() {
    let test = "fused_add_rmsnorm_updates_residual";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(32);
    for (rows, n) in [(4usize, 2048usize), (7, 64)] {
        let x = rng.bf16s(rows * n, 2.0);
        let r = rng.bf16s(rows * n, 2.0);
        let w = rng.bf16s(n, 1.0);
        let (mut xd, rd, wd) = (up(st, &x), up(st, &r), up(st, &w));
        let mut out = st.alloc_zeros::<bf16>(rows * n).unwrap();
        kernels::fused_add_rmsnorm(st, &mut out, &mut xd, &rd, &wd, 1e-6).expect("fused");
        let sum: Vec<bf16> = x
            .iter()
            .zip(&r)
            .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
            .collect();
        assert!(down(st, &xd) == sum, "{test}: residual stream");
        let want = rms_ref(&f32s(&sum), &f32s(&w), 1e-6);
        assert_close(test, &f32s(&down(st, &out)), &want, n, ATOL, RTOL);
    }
}

#[test]
fn rope_neox_half_split() {
    let test = "rope_neox_half_split";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(33);
    for (hq, hk, d) in [(8usize, 2usize, 128usize), (4, 4, 64)] {
        let pos: Vec<i32> = vec![0, 1, 2, 31, 1000, 4097, 32000];
        let t = pos.len();
        let q = rng.bf16s(t * hq * d, 1.0);
        let k = rng.bf16s(t * hk * d, 1.0);
        let (mut qd, mut kd, pd) = (up(st, &q), up(st, &k), up(st, &pos));
        let theta = 1_000_000.0f32;
        kernels::rope_neox(st, &mut qd, &mut kd, &pd, hq, hk, d, theta).expect("rope");
        // The CPU backend's RoPE on the same inputs.
        let inv_freq = rope_inv_freq(d, theta);
        let positions: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
        let rot = |x: &[bf16], heads: usize| -> Vec<f32> {
            let mut o = f32s(x);
            rope_rows(&mut o, heads * d, &positions, &inv_freq);
            o
        };
        for (what, dev, host, heads) in [("q", &qd, &q, hq), ("k", &kd, &k, hk)] {
            let got = f32s(&down(st, dev));
            let want = rot(host, heads);
            let w = heads * d;
            for (ti, &p) in pos.iter().enumerate() {
                // Both sides compute the angle p * inv_freq in f32, but powf and sincosf
                // may differ by a few ulp between CUDA and Rust: an angle error of up to
                // p * 3 * 2^-23 (0.011 rad at p = 32000) moves an output by that times the
                // pair's magnitude, so the absolute part grows with the position.
                let atol = ATOL + p as f32 * 6e-7;
                assert_close(
                    &format!("{test} {what} d={d} pos {p}"),
                    &got[ti * w..(ti + 1) * w],
                    &want[ti * w..(ti + 1) * w],
                    d,
                    atol,
                    RTOL,
                );
            }
        }
    }
}

#[test]
fn silu_mul_merged_and_split() {
    let test = "silu_mul_merged_and_split";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(34);
    let (rows, n) = (5, 333);
    let gu = rng.bf16s(rows * 2 * n, 3.0);
    // The CPU backend's SiLU x up on the same halves.
    let (gate_f, up_f): (Vec<f32>, Vec<f32>) = (0..rows * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (gu[r * 2 * n + c].to_f32(), gu[r * 2 * n + n + c].to_f32())
        })
        .unzip();
    let want = cpu_silu_mul(&gate_f, &up_f);
    let gd = up(st, &gu);
    let mut out = st.alloc_zeros::<bf16>(rows * n).unwrap();
    kernels::silu_mul(st, &mut out, &gd, n).expect("silu_mul");
    assert_close(test, &f32s(&down(st, &out)), &want, n, ATOL, RTOL);
    let gate: Vec<bf16> = (0..rows)
        .flat_map(|r| gu[r * 2 * n..r * 2 * n + n].to_vec())
        .collect();
    let upv: Vec<bf16> = (0..rows)
        .flat_map(|r| gu[r * 2 * n + n..(r + 1) * 2 * n].to_vec())
        .collect();
    let (g2, u2) = (up(st, &gate), up(st, &upv));
    let mut out2 = st.alloc_zeros::<bf16>(rows * n).unwrap();
    kernels::silu_mul_split(st, &mut out2, &g2, &u2, n).expect("silu_mul_split");
    assert_close(
        &format!("{test} split"),
        &f32s(&down(st, &out2)),
        &want,
        n,
        ATOL,
        RTOL,
    );
}

#[test]
fn embedding_gather_bf16_and_f32() {
    let test = "embedding_gather_bf16_and_f32";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(35);
    let (vocab, hidden) = (50, 72);
    let table = rng.bf16s(vocab * hidden, 1.0);
    let ids: Vec<i32> = vec![3, 0, 49, 3, -1, 50];
    let (td, idd) = (up(st, &table), up(st, &ids));
    let mut want = Vec::new();
    for &i in &ids {
        if (0..vocab as i32).contains(&i) {
            want.extend(f32s(&table[i as usize * hidden..(i as usize + 1) * hidden]));
        } else {
            want.extend(std::iter::repeat_n(0.0, hidden));
        }
    }
    let mut ob = st.alloc_zeros::<bf16>(ids.len() * hidden).unwrap();
    kernels::embedding(st, &mut ob, &td, &idd, hidden).expect("embedding bf16");
    assert_close(
        &format!("{test} bf16"),
        &f32s(&down(st, &ob)),
        &want,
        hidden,
        0.0,
        0.0,
    );
    let mut of = st.alloc_zeros::<f32>(ids.len() * hidden).unwrap();
    kernels::embedding(st, &mut of, &td, &idd, hidden).expect("embedding f32");
    assert_close(
        &format!("{test} f32"),
        &down(st, &of),
        &want,
        hidden,
        0.0,
        0.0,
    );
}

#[test]
fn bias_add_rows() {
    let test = "bias_add_rows";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(36);
    let (rows, n) = (6, 130);
    let x = rng.bf16s(rows * n, 1.0);
    let b = rng.bf16s(n, 1.0);
    let (mut xd, bd) = (up(st, &x), up(st, &b));
    kernels::bias_add(st, &mut xd, &bd).expect("bias_add");
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| bf16::from_f32(v.to_f32() + b[i % n].to_f32()).to_f32())
        .collect();
    assert_close(test, &f32s(&down(st, &xd)), &want, n, 0.0, 0.0);
}

// ------------------------------------------------------------------ sampling

#[test]
fn argmax_lowest_index_on_ties() {
    let test = "argmax_lowest_index_on_ties";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(41);
    let (rows, vocab) = (5, 151_936);
    let mut l: Vec<f32> = (0..rows * vocab).map(|_| rng.normal_ish() * 5.0).collect();
    let mut want = Vec::new();
    for r in 0..rows {
        let (a, b) = (rng.range(vocab), rng.range(vocab));
        l[r * vocab + a] = 100.0;
        l[r * vocab + b] = 100.0;
        want.push(a.min(b) as i32);
    }
    let ld = up(st, &l);
    let mut out = st.alloc_zeros::<i32>(rows).unwrap();
    kernels::argmax(st, &mut out, &ld).expect("argmax");
    assert_eq!(down(st, &out), want, "{test}");
}

#[test]
fn sample_top_k_top_p_matches_reference() {
    let test = "sample_top_k_top_p_matches_reference";
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(42);
    let vocab = 151_936;
    // (temperature, top_k, top_p)
    let cfgs: Vec<(f32, i32, f32)> = vec![
        (0.0, 0, 1.0),
        (1.0, 1, 1.0),
        (0.7, 50, 0.9),
        (1.0, 0, 0.5),
        (0.6, 20, 0.95),
        (1.3, 0, 1.0),
        (1.0, 200, 1.0),
        (0.8, 0, 0.8),
    ];
    let reps = 4;
    let rows = cfgs.len() * reps;
    let l: Vec<f32> = (0..rows * vocab).map(|_| rng.normal_ish() * 4.0).collect();
    let (mut temp, mut topk, mut topp, mut uni) = (vec![], vec![], vec![], vec![]);
    for r in 0..rows {
        let (t, k, p) = cfgs[r % cfgs.len()];
        temp.push(t);
        topk.push(k);
        topp.push(p);
        uni.push(rng.uniform());
    }
    let ld = up(st, &l);
    let (td, kd, pd, ud) = (up(st, &temp), up(st, &topk), up(st, &topp), up(st, &uni));
    let mut out = st.alloc_zeros::<i32>(rows).unwrap();
    let params = SampleParams {
        temperature: &td,
        top_k: &kd,
        top_p: &pd,
        uniform: &ud,
    };
    kernels::sample(st, &mut out, &ld, &params).expect("sample");
    let got = down(st, &out);
    // Same uniforms again: identical picks (the host owns determinism).
    kernels::sample(st, &mut out, &ld, &params).expect("sample");
    assert_eq!(down(st, &out), got, "{test}: not deterministic");
    for r in 0..rows {
        let (want, bounds) = sample_ref(
            &l[r * vocab..(r + 1) * vocab],
            temp[r],
            topk[r],
            topp[r],
            uni[r],
        );
        if got[r] != want {
            // Accept only the kept token right beside the reference's pick, and only when
            // the cumulative-mass boundary between the two lies within float rounding of
            // the uniform (the kernel sums in f32, the reference in f64). Any other token,
            // or a boundary farther away, is a wrong pick.
            let j = bounds.iter().position(|&(i, _)| i as i32 == want);
            let beside = j.and_then(|j| {
                if j + 1 < bounds.len() && bounds[j + 1].0 as i32 == got[r] {
                    Some(bounds[j].1)
                } else if j > 0 && bounds[j - 1].0 as i32 == got[r] {
                    Some(bounds[j - 1].1)
                } else {
                    None
                }
            });
            let boundary_gap = beside.map(|c| (c - uni[r] as f64).abs());
            assert!(
                boundary_gap.is_some_and(|gap| gap < 1e-5),
                "{test}: row {r} cfg {:?}: got {}, want {want} (boundary gap {boundary_gap:?})",
                cfgs[r % cfgs.len()],
                got[r]
            );
            println!("{test}: row {r}: neighbour across a boundary {boundary_gap:?} from u");
        }
    }
}

// ------------------------------------------------------------------ GEMM

#[test]
fn linear_bf16_f32_accumulate() {
    let test = "linear_bf16_f32_accumulate";
    let Some(g) = gpu(test) else { return };
    let blas = match Blas::new(g.stream().clone()) {
        Ok(b) => b,
        Err(e) => {
            skip(test, &format!("no cuBLAS ({e})"));
            return;
        }
    };
    let st = g.stream();
    let mut rng = Rng::new(51);
    let (m, n, k) = (5, 33, 96);
    let x = rng.bf16s(m * k, 1.0);
    let w = rng.bf16s(n * k, 1.0);
    let mut want = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = (0..k)
                .map(|t| x[i * k + t].to_f32() * w[j * k + t].to_f32())
                .sum();
        }
    }
    let (xd, wd) = (up(st, &x), up(st, &w));
    let mut of = st.alloc_zeros::<f32>(m * n).unwrap();
    blas.linear(&xd, &wd, &mut of, m, n, k, false)
        .expect("linear f32");
    // f32 output: the same exact bf16 products, summed in another order (and tensor cores'
    // accumulation): 1e-3 of the row's scale is far above that and far below a wrong term.
    assert_close(&format!("{test} f32"), &down(st, &of), &want, n, 1e-3, 1e-3);
    blas.linear(&xd, &wd, &mut of, m, n, k, true)
        .expect("linear accumulate");
    let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
    assert_close(
        &format!("{test} accumulate"),
        &down(st, &of),
        &twice,
        n,
        1e-3,
        1e-3,
    );
    let mut ob = st.alloc_zeros::<bf16>(m * n).unwrap();
    blas.linear(&xd, &wd, &mut ob, m, n, k, false)
        .expect("linear bf16");
    assert_close(
        &format!("{test} bf16"),
        &f32s(&down(st, &ob)),
        &want,
        n,
        ATOL,
        RTOL,
    );
    assert!(
        blas.linear(&xd, &wd, &mut ob, m, n + 1, k, false).is_err(),
        "{test}: shape check"
    );
}

// ------------------------------------------------------------------ fused q/k/v epilogue

/// `qkv_prep` (one launch) gives bit for bit what the unfused sequence gives: the q/k/v
/// GEMM output split by heads, `bias_add`, `rmsnorm_inplace` per q and k head, `rope_neox`;
/// and with the K/V write fused in (`KvDest::Cache`), the caches `kv_write` would leave,
/// a token with slot -1 writing nothing.
#[test]
fn qkv_prep_equals_bias_norm_rope_in_sequence() {
    const T: &str = "qkv_prep_equals_bias_norm_rope_in_sequence";
    let Some(g) = gpu(T) else {
        return;
    };
    let s = g.stream().clone();
    let mut rng = Rng::new(71);
    for (t, hq, hk, d, bias, norm) in [
        (5, 4, 2, 16, true, false),
        (3, 8, 2, 64, false, true),
        (7, 16, 8, 128, true, true),
        (2, 4, 4, 256, false, false),
    ] {
        let (qd, kd) = (hq * d, hk * d);
        let width = qd + 2 * kd;
        let qkv = rng.bf16s(t * width, 2.0);
        let b = rng.bf16s(width, 0.5);
        let (qn, kn) = (rng.bf16s(d, 1.0), rng.bf16s(d, 1.0));
        let pos: Vec<i32> = (0..t).map(|i| (i * 37 + 5) as i32).collect();
        let (eps, theta) = (1e-6f32, 1e6f32);
        // Reference: split on the host, then the unfused kernels.
        let col = |lo: usize, w: usize| -> Vec<bf16> {
            (0..t)
                .flat_map(|r| qkv[r * width + lo..r * width + lo + w].to_vec())
                .collect()
        };
        let (mut q_ref, mut k_ref, mut v_ref) = (
            up(&s, &col(0, qd)),
            up(&s, &col(qd, kd)),
            up(&s, &col(qd + kd, kd)),
        );
        let pos_d = up(&s, &pos);
        if bias {
            kernels::bias_add(&s, &mut q_ref, &up(&s, &b[..qd])).expect("bias q");
            kernels::bias_add(&s, &mut k_ref, &up(&s, &b[qd..qd + kd])).expect("bias k");
            kernels::bias_add(&s, &mut v_ref, &up(&s, &b[qd + kd..])).expect("bias v");
        }
        let (qn_d, kn_d) = (up(&s, &qn), up(&s, &kn));
        if norm {
            kernels::rmsnorm_inplace(&s, &mut q_ref, &qn_d, eps).expect("q norm");
            kernels::rmsnorm_inplace(&s, &mut k_ref, &kn_d, eps).expect("k norm");
        }
        kernels::rope_neox(&s, &mut q_ref, &mut k_ref, &pos_d, hq, hk, d, theta).expect("rope");
        // Fused.
        let (mut q, mut k, mut v) = (
            up(&s, &vec![bf16::ZERO; t * qd]),
            up(&s, &vec![bf16::ZERO; t * kd]),
            up(&s, &vec![bf16::ZERO; t * kd]),
        );
        let b_d = up(&s, &b);
        let qkv_d = up(&s, &qkv);
        kernels::qkv_prep(
            &s,
            &mut q,
            kernels::KvDest::Buffers {
                k: &mut k,
                v: &mut v,
            },
            &qkv_d,
            bias.then_some(&b_d as kernels::In<'_, bf16>),
            norm.then_some((
                &qn_d as kernels::In<'_, bf16>,
                &kn_d as kernels::In<'_, bf16>,
            )),
            &pos_d,
            kernels::QkvShape {
                num_q_heads: hq,
                num_kv_heads: hk,
                head_dim: d,
                eps,
                theta,
            },
        )
        .expect("qkv_prep");
        let what = format!("t={t} hq={hq} hk={hk} d={d} bias={bias} norm={norm}");
        let bits = |x: Vec<bf16>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(down(&s, &q)), bits(down(&s, &q_ref)), "q, {what}");
        assert_eq!(bits(down(&s, &k)), bits(down(&s, &k_ref)), "k, {what}");
        assert_eq!(bits(down(&s, &v)), bits(down(&s, &v_ref)), "v, {what}");

        // The K/V write fused in: token i goes to slot 3 t - 2 i (token 1: slot -1, none).
        let shape = CacheShape {
            num_blocks: 2,
            block_size: 2 * t,
            num_kv_heads: hk,
            head_dim: d,
        };
        let slots: Vec<i32> = (0..t)
            .map(|i| if i == 1 { -1 } else { (3 * t - 2 * i) as i32 })
            .collect();
        let slots_d = up(&s, &slots);
        let junk = rng.bf16s(shape.elems(), 1.0);
        let (mut kc_ref, mut vc_ref) = (up(&s, &junk), up(&s, &junk));
        kernels::kv_write(
            &s,
            &k_ref,
            &v_ref,
            &mut kc_ref,
            &mut vc_ref,
            &slots_d,
            shape,
        )
        .expect("kv_write");
        let (mut kc, mut vc) = (up(&s, &junk), up(&s, &junk));
        let mut q2 = up(&s, &vec![bf16::ZERO; t * qd]);
        kernels::qkv_prep(
            &s,
            &mut q2,
            kernels::KvDest::Cache {
                k_cache: &mut kc,
                v_cache: &mut vc,
                slots: &slots_d,
                shape,
            },
            &qkv_d,
            bias.then_some(&b_d as kernels::In<'_, bf16>),
            norm.then_some((
                &qn_d as kernels::In<'_, bf16>,
                &kn_d as kernels::In<'_, bf16>,
            )),
            &pos_d,
            kernels::QkvShape {
                num_q_heads: hq,
                num_kv_heads: hk,
                head_dim: d,
                eps,
                theta,
            },
        )
        .expect("qkv_prep into the cache");
        assert_eq!(
            bits(down(&s, &q2)),
            bits(down(&s, &q_ref)),
            "q (cache), {what}"
        );
        assert_eq!(
            bits(down(&s, &kc)),
            bits(down(&s, &kc_ref)),
            "k cache, {what}"
        );
        assert_eq!(
            bits(down(&s, &vc)),
            bits(down(&s, &vc_ref)),
            "v cache, {what}"
        );
        println!("{T}: {what}: q, k, v and the fused cache write bit-identical");
    }
    // Shapes the kernel cannot take are typed errors before any launch.
    let z = up(&s, &[bf16::ZERO; 8]);
    let p = up(&s, &[0i32]);
    let bad = kernels::QkvShape {
        num_q_heads: 1,
        num_kv_heads: 1,
        head_dim: 3,
        eps: 1e-6,
        theta: 1e4,
    };
    let (mut a, mut b2, mut c) = (z.clone(), z.clone(), z.clone());
    let kv = kernels::KvDest::Buffers {
        k: &mut b2,
        v: &mut c,
    };
    assert!(kernels::qkv_prep(&s, &mut a, kv, &z, None, None, &p, bad).is_err());
}
