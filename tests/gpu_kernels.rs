//! GPU kernel tests: every launcher in `kernels/spindle_kernels.h`, through its safe
//! wrapper in `spindle::cuda`, against a small CPU reference written here (f32 math on
//! bf16-rounded inputs). Without a CUDA driver every test prints
//! `SKIPPED: <test>: no CUDA driver (<reason>)` and passes.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use spindle::cuda::kernels::{self, CacheShape, Chunks, DecodeWorkspace, KvCache, SampleParams};
use spindle::cuda::{Blas, Gpu};

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

/// xorshift64*: deterministic test data without a rand dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn range(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
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

fn up<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    s.clone_htod(v).expect("htod")
}

fn down<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<T> {
    let v = s.clone_dtoh(d).expect("dtoh");
    s.synchronize().expect("sync");
    v
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let tol = atol + rtol * w.abs();
        assert!(g.is_finite(), "{what}[{i}]: got {g}, want {w}");
        if err > tol {
            panic!("{what}[{i}]: got {g}, want {w} (err {err} > tol {tol})");
        }
        if err > worst.0 {
            worst = (err, i);
        }
    }
    println!("{what}: max abs err {:.3e} at {}", worst.0, worst.1);
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

/// Contiguous view over a block chain starting at slot `offset` of the first block.
fn chain_view(blocks: &[usize], offset: usize, len: usize, bs: usize) -> View {
    let mut v = Vec::new();
    let (mut pos, mut left, mut bi) = (offset, len, 0);
    while left > 0 {
        let n = (bs - pos).min(left);
        v.push((blocks[bi] as i32, pos as i32, n as i32));
        left -= n;
        pos = 0;
        bi += 1;
    }
    v
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

    /// out[h] for one query row.
    fn reference(&self, q: &[f32], view: &View, limit: usize, scale: f32) -> Vec<f32> {
        let s = self.shape;
        let d = s.head_dim;
        let gqa = self.hq / s.num_kv_heads;
        let slots: Vec<usize> = view
            .iter()
            .flat_map(|&(b, st, l)| {
                (0..l).map(move |i| b as usize * s.block_size + (st + i) as usize)
            })
            .collect();
        let n = limit.min(slots.len());
        let mut out = vec![0.0f32; self.hq * d];
        for h in 0..self.hq {
            let kvh = h / gqa;
            let qh = &q[h * d..(h + 1) * d];
            let row = |slot: usize| (slot * s.num_kv_heads + kvh) * d;
            let scores: Vec<f32> = slots[..n]
                .iter()
                .map(|&sl| {
                    let kr = &self.k[row(sl)..row(sl) + d];
                    qh.iter().zip(kr).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale
                })
                .collect();
            if n == 0 {
                continue;
            }
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = p.iter().sum();
            for (j, &sl) in slots[..n].iter().enumerate() {
                let vr = &self.v[row(sl)..row(sl) + d];
                for x in 0..d {
                    out[h * d + x] += p[j] / z * vr[x].to_f32();
                }
            }
        }
        out
    }
}

fn run_decode(
    test: &str,
    seed: u64,
    hkv: usize,
    gqa: usize,
    d: usize,
    lens: &[usize],
    partition: usize,
) {
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(seed);
    let bs = 16;
    let case = AttnCase::new(&mut rng, 96, bs, hkv, hkv * gqa, d);
    let hq = case.hq;
    // Views: a shared prefix chain (starting mid-block) then a private random tail, with the
    // limit sometimes below the view length.
    let prefix = chain_view(&[3, 7, 11, 40, 41, 42, 43, 5], 5, 100, bs);
    let mut views = Vec::new();
    let mut limits = Vec::new();
    for (r, &len) in lens.iter().enumerate() {
        let mut v = if len >= 100 && r % 2 == 0 {
            prefix.clone()
        } else {
            Vec::new()
        };
        let have: usize = v.iter().map(|c| c.2 as usize).sum();
        v.extend(random_view(&mut rng, len - have, case.shape.num_blocks, bs));
        views.push(v);
        limits.push(if r % 3 == 2 {
            (len * 2 / 3) as i32
        } else {
            len as i32
        });
    }
    let rows = lens.len();
    let q = rng.bf16s(rows * hq * d, 1.0);
    let scale = 1.0 / (d as f32).sqrt();
    let c = csr(&views);
    let (kd, vd) = (up(st, &case.k), up(st, &case.v));
    let (qd, ip, cb, cs, cl, rl) = (
        up(st, &q),
        up(st, &c.indptr),
        up(st, &c.block),
        up(st, &c.start),
        up(st, &c.len),
        up(st, &limits),
    );
    let mut out = st.alloc_zeros::<bf16>(rows * hq * d).unwrap();
    let mut ws = DecodeWorkspace::new();
    let max_len = *lens.iter().max().unwrap();
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
        scale,
        max_len,
        partition,
        &mut ws,
    )
    .expect("paged_decode");
    let got = f32s(&down(st, &out));
    let qf = f32s(&q);
    let mut want = Vec::new();
    for r in 0..rows {
        want.extend(case.reference(
            &qf[r * hq * d..(r + 1) * hq * d],
            &views[r],
            limits[r] as usize,
            scale,
        ));
    }
    assert_close(test, &got, &want, 2e-2, 2e-2);
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

fn run_prefill(test: &str, seed: u64, hkv: usize, gqa: usize, d: usize, groups: &[(usize, usize)]) {
    // groups: (prefix tokens already cached, new rows); row i of a group sees prefix + i + 1.
    let Some(g) = gpu(test) else { return };
    let st = g.stream();
    let mut rng = Rng::new(seed);
    let bs = 16;
    let case = AttnCase::new(&mut rng, 160, bs, hkv, hkv * gqa, d);
    let hq = case.hq;
    let mut views = Vec::new();
    let mut q_indptr = vec![0i32];
    let mut limits = Vec::new();
    let mut row_view = Vec::new();
    for (gi, &(prefix, rows)) in groups.iter().enumerate() {
        let view = random_view(&mut rng, prefix + rows, case.shape.num_blocks, bs);
        for i in 0..rows {
            // Causal inside the group: row i sees the cached prefix and new rows 0..=i.
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
    let qf = f32s(&q);
    let mut want = Vec::new();
    for r in 0..rows {
        want.extend(case.reference(
            &qf[r * hq * d..(r + 1) * hq * d],
            &views[row_view[r]],
            limits[r] as usize,
            scale,
        ));
    }
    assert_close(test, &got, &want, 2e-2, 2e-2);
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
    assert_close(
        test,
        &f32s(&down(st, &o1)),
        &f32s(&down(st, &o2)),
        1e-2,
        1e-2,
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

fn rms_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    x.chunks(n)
        .flat_map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let rstd = 1.0 / (ms + eps).sqrt();
            r.iter()
                .zip(w)
                .map(move |(v, wv)| bf16::from_f32(bf16::from_f32(v * rstd).to_f32() * wv).to_f32())
                .collect::<Vec<_>>()
        })
        .collect()
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
            2e-2,
            2e-2,
        );
        let mut xi = up(st, &x);
        kernels::rmsnorm_inplace(st, &mut xi, &wd, 1e-6).expect("rmsnorm_inplace");
        assert_close(
            &format!("{test} inplace {rows}x{n}"),
            &f32s(&down(st, &xi)),
            &want,
            2e-2,
            2e-2,
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
        assert_close(test, &f32s(&down(st, &out)), &want, 2e-2, 2e-2);
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
        let rot = |x: &[bf16], heads: usize| -> Vec<f32> {
            let mut o = f32s(x);
            for (ti, &ps) in pos.iter().enumerate() {
                for h in 0..heads {
                    let b = (ti * heads + h) * d;
                    for i in 0..d / 2 {
                        let inv = 1.0f32 / theta.powf((2 * i) as f32 / d as f32);
                        let a = ps as f32 * inv;
                        let (s, c) = a.sin_cos();
                        let (x1, x2) = (x[b + i].to_f32(), x[b + i + d / 2].to_f32());
                        o[b + i] = x1 * c - x2 * s;
                        o[b + i + d / 2] = x2 * c + x1 * s;
                    }
                }
            }
            o
        };
        assert_close(
            &format!("{test} q"),
            &f32s(&down(st, &qd)),
            &rot(&q, hq),
            2e-2,
            2e-2,
        );
        assert_close(
            &format!("{test} k"),
            &f32s(&down(st, &kd)),
            &rot(&k, hk),
            2e-2,
            2e-2,
        );
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
    let silu = |x: f32| x / (1.0 + (-x).exp());
    let mut want = Vec::new();
    for r in 0..rows {
        for c in 0..n {
            want.push(silu(gu[r * 2 * n + c].to_f32()) * gu[r * 2 * n + n + c].to_f32());
        }
    }
    let gd = up(st, &gu);
    let mut out = st.alloc_zeros::<bf16>(rows * n).unwrap();
    kernels::silu_mul(st, &mut out, &gd, n).expect("silu_mul");
    assert_close(test, &f32s(&down(st, &out)), &want, 2e-2, 2e-2);
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
        2e-2,
        2e-2,
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
        0.0,
        0.0,
    );
    let mut of = st.alloc_zeros::<f32>(ids.len() * hidden).unwrap();
    kernels::embedding(st, &mut of, &td, &idd, hidden).expect("embedding f32");
    assert_close(&format!("{test} f32"), &down(st, &of), &want, 0.0, 0.0);
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
    assert_close(test, &f32s(&down(st, &xd)), &want, 0.0, 0.0);
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

/// Reference sampler with the semantics documented for `spindle_sample`. Returns
/// (kept-set mass prefix boundaries, picked token).
fn sample_ref(l: &[f32], t: f32, k: i32, p: f32, u: f32) -> (i32, Vec<(usize, f64)>) {
    let vocab = l.len();
    if t <= 0.0 {
        let mut best = 0;
        for i in 0..vocab {
            if l[i] > l[best] {
                best = i;
            }
        }
        return (best as i32, vec![]);
    }
    let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let pr: Vec<f32> = l.iter().map(|x| ((x - mx) * (1.0 / t)).exp()).collect();
    let mut sorted = pr.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let mut tau = 0.0f32;
    if k > 0 && (k as usize) < vocab {
        tau = sorted[k as usize - 1];
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
    let kept: Vec<(usize, f64)> = pr
        .iter()
        .enumerate()
        .filter(|(_, &x)| x >= tau && x > 0.0)
        .map(|(i, &x)| (i, x as f64))
        .collect();
    let total: f64 = kept.iter().map(|k| k.1).sum();
    let target = u as f64 * total;
    let mut cum = 0.0;
    let mut bounds = Vec::new();
    let mut pick = kept.last().unwrap().0 as i32;
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
            // Accept only a neighbour across a boundary within float rounding of the target.
            let near = bounds
                .iter()
                .any(|&(_, c)| (c - uni[r] as f64).abs() < 1e-4);
            let kept = bounds.iter().any(|&(i, _)| i as i32 == got[r]);
            assert!(
                near && kept,
                "{test}: row {r} cfg {:?}: got {}, want {want}",
                cfgs[r % cfgs.len()],
                got[r]
            );
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
    assert_close(&format!("{test} f32"), &down(st, &of), &want, 1e-3, 1e-3);
    blas.linear(&xd, &wd, &mut of, m, n, k, true)
        .expect("linear accumulate");
    let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
    assert_close(
        &format!("{test} accumulate"),
        &down(st, &of),
        &twice,
        2e-3,
        1e-3,
    );
    let mut ob = st.alloc_zeros::<bf16>(m * n).unwrap();
    blas.linear(&xd, &wd, &mut ob, m, n, k, false)
        .expect("linear bf16");
    assert_close(
        &format!("{test} bf16"),
        &f32s(&down(st, &ob)),
        &want,
        2e-2,
        2e-2,
    );
    assert!(
        blas.linear(&xd, &wd, &mut ob, m, n + 1, k, false).is_err(),
        "{test}: shape check"
    );
}
