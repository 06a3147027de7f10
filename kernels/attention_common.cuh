// Shared body of spindle's paged attention kernels (decode and prefill): chunk-list
// walking (CSR spans, design-notes section 2), K/V staging through shared memory once per
// CTA for every query vector of one kv-head (GQA rows x heads), online softmax over token
// tiles in base 2, and the split-KV log-sum-exp merge (design-notes section 3, item 4).
//
// One CTA = one work item: a set of query vectors (rows x q-heads) that share ONE chunk
// list and ONE kv-head, each vector with its own row_limit, over the view range of one
// split. CUDA-core dot products (a tensor-core variant is future work, see docs/gpu.md).
#pragma once

#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>

#include "spindle_kernels.h"

namespace spindle {

constexpr int kAttnThreads = 128;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

struct AttnArgs {
    const __nv_bfloat16* __restrict__ q;        // [num_rows, num_q_heads, D]
    const __nv_bfloat16* __restrict__ k_cache;  // [num_blocks, block_size, num_kv_heads, D]
    const __nv_bfloat16* __restrict__ v_cache;  // [num_blocks, block_size, num_kv_heads, D]
    __nv_bfloat16* __restrict__ out;            // [num_rows, num_q_heads, D]
    const int32_t* __restrict__ chunk_block;    // [num_chunks]
    const int32_t* __restrict__ chunk_start;    // [num_chunks]
    const int32_t* __restrict__ chunk_len;      // [num_chunks]
    const int32_t* __restrict__ row_limit;      // [num_rows]
    float* __restrict__ part_o;                 // [num_rows, num_q_heads, num_splits, D]
    float* __restrict__ part_lse;               // [num_rows, num_q_heads, num_splits] (log2)
    int num_rows;
    int num_q_heads;
    int num_kv_heads;
    int block_size;
    int num_blocks;
    int num_chunks;
    int num_splits;      // 1: write out directly; > 1: write part_o / part_lse
    int partition_size;  // tokens per split (ignored when num_splits == 1)
    float scale_log2;    // softmax scale * log2(e)
};

// What one CTA computes.
struct Work {
    int c_begin, c_end;  // chunk list [c_begin, c_end)
    int row0, nrows;     // query rows row0 .. row0 + nrows
    int kv_head;
    int head0, nh;       // q-heads head0 .. head0 + nh (all of kv_head)
    int split;
};

__device__ __forceinline__ float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// Warp 0 only (all 32 lanes, uniform ci/vb). Advances the cursor (chunk ci whose first
// token has view index vb) over every chunk that ends at or before t1, and, when addr is
// not null, writes the physical slot of each view index v in [t0, t1) into addr[v - t0].
__device__ __forceinline__ void walk_chunks(const AttnArgs& a, int c_end, int& ci, int& vb,
                                            int t0, int t1, int* addr) {
    const int lane = threadIdx.x & 31;
    while (true) {
        const int j = ci + lane;
        const bool live = j < c_end;
        const int len = live ? max(0, a.chunk_len[j]) : 0;
        int incl = len;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int n = __shfl_up_sync(kFull, incl, off);
            if (lane >= off) incl += n;
        }
        const int cstart = vb + incl - len;
        const int cend = vb + incl;
        if (addr != nullptr && live) {
            const int lo = max(cstart, t0);
            const int hi = min(cend, t1);
            const int blk = a.chunk_block[j], st = a.chunk_start[j];
            const bool ok = blk >= 0 && blk < a.num_blocks && st >= 0 &&
                            st <= a.block_size - len;
            if (ok && lo < hi) {
                const int base = blk * a.block_size + st - cstart;
                for (int v = lo; v < hi; ++v) addr[v - t0] = base + v;
            }
        }
        // View ends are monotone in the lane, so the consumed chunks are a lane prefix.
        const unsigned done = __ballot_sync(kFull, live && cend <= t1);
        const int n_done = __popc(done);
        const int adv = __shfl_sync(kFull, incl, n_done > 0 ? n_done - 1 : 0);
        if (n_done > 0) {
            ci += n_done;
            vb += adv;
        }
        if (n_done < 32) break;
    }
}

template <int D, int QT, int TT>
struct AttnSmem {
    static constexpr int W = D / 2 + 1;  // bf16x2 words per row, padded to an odd stride
    uint32_t q[QT][W];
    uint32_t k[TT][W];
    uint32_t v[TT][W];
    float s[QT][TT];
    int addr[TT];
    int limit[QT];
    float m[QT];
    float l[QT];
    float alpha[QT];
    int max_limit;
};

// Clamps a work item read from device memory to the buffers' bounds.
__device__ __forceinline__ Work sanitize(const AttnArgs& a, Work w) {
    w.c_begin = min(max(w.c_begin, 0), a.num_chunks);
    w.c_end = min(max(w.c_end, w.c_begin), a.num_chunks);
    if (w.row0 < 0 || w.row0 >= a.num_rows) w.nrows = 0;
    w.nrows = max(0, min(w.nrows, a.num_rows - w.row0));
    return w;
}

template <int D, int QT, int TT>
__device__ __forceinline__ void attn_body(const AttnArgs& a, Work w,
                                          AttnSmem<D, QT, TT>& sm) {
    static_assert(D % 16 == 0 && D <= 128 && kAttnThreads % (D / 2) == 0,
                  "head_dim must be 16, 32, 64 or 128");
    static_assert(TT % 32 == 0, "token tile must be a multiple of 32");
    constexpr int DW = D / 2;                     // words per row
    constexpr int QG = kAttnThreads / DW;         // q groups in the PV phase
    constexpr int NQ = (QT + QG - 1) / QG;        // q vectors per thread in PV
    constexpr int NWARPS = kAttnThreads / 32;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    w = sanitize(a, w);
    const int nq = w.nrows * w.nh;

    // ---- load Q (bf16 pairs), limits, softmax state
    for (int i = tid; i < QT * DW; i += kAttnThreads) {
        const int qi = i / DW, wd = i % DW;
        uint32_t val = 0;
        if (qi < nq) {
            const int row = w.row0 + qi / w.nh;
            const int head = w.head0 + qi % w.nh;
            const uint32_t* src = reinterpret_cast<const uint32_t*>(
                a.q + ((size_t)row * a.num_q_heads + head) * D);
            val = src[wd];
        }
        sm.q[qi][wd] = val;
    }
    if (tid < QT) {
        int lim = 0;
        if (tid < nq) lim = a.row_limit[w.row0 + tid / w.nh];
        sm.limit[tid] = lim;
        sm.m[tid] = -CUDART_INF_F;
        sm.l[tid] = 0.f;
    }
    __syncthreads();
    if (warp == 0) {
        int ml = 0;
        for (int i = lane; i < QT; i += 32) ml = max(ml, sm.limit[i]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) ml = max(ml, __shfl_xor_sync(kFull, ml, off));
        if (lane == 0) sm.max_limit = ml;
    }
    __syncthreads();

    // ---- this split's view range
    const int max_limit = sm.max_limit;
    const int v_begin = w.split * a.partition_size;
    const int v_end = (w.split == a.num_splits - 1)
                          ? max_limit
                          : min(max_limit, (w.split + 1) * a.partition_size);
    const int my_w = tid % DW;   // PV: word owned
    const int my_q0 = tid / DW;  // PV: first q vector owned (stride QG)
    float acc[NQ][2];
#pragma unroll
    for (int j = 0; j < NQ; ++j) acc[j][0] = acc[j][1] = 0.f;

    int ci = w.c_begin, vb = 0;  // chunk cursor, meaningful in warp 0 only
    if (v_begin < v_end && warp == 0) walk_chunks(a, w.c_end, ci, vb, v_begin, v_begin, nullptr);

    for (int t0 = v_begin; t0 < v_end; t0 += TT) {
        const int t1 = min(t0 + TT, v_end);
        // -- token addresses
        for (int t = tid; t < TT; t += kAttnThreads) sm.addr[t] = -1;
        __syncthreads();
        if (warp == 0) walk_chunks(a, w.c_end, ci, vb, t0, t1, sm.addr);
        __syncthreads();
        // -- stage K and V (zeros for missing tokens)
        constexpr int VEC = D / 8;  // uint4 per row
        for (int i = tid; i < TT * VEC; i += kAttnThreads) {
            const int t = i / VEC, c = i % VEC;
            const int slot = sm.addr[t];
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (slot >= 0) {
                const size_t off = ((size_t)slot * a.num_kv_heads + w.kv_head) * D;
                kv = reinterpret_cast<const uint4*>(a.k_cache + off)[c];
                vv = reinterpret_cast<const uint4*>(a.v_cache + off)[c];
            }
            uint32_t* kd = &sm.k[t][c * 4];
            uint32_t* vd = &sm.v[t][c * 4];
            kd[0] = kv.x; kd[1] = kv.y; kd[2] = kv.z; kd[3] = kv.w;
            vd[0] = vv.x; vd[1] = vv.y; vd[2] = vv.z; vd[3] = vv.w;
        }
        __syncthreads();
        // -- scores (base-2 logits), masked to -inf
        for (int i = tid; i < QT * TT; i += kAttnThreads) {
            const int qi = i / TT, t = i % TT;
            float s = -CUDART_INF_F;
            if (qi < nq && sm.addr[t] >= 0 && t0 + t < sm.limit[qi]) {
                float d0 = 0.f, d1 = 0.f;
#pragma unroll 16
                for (int x = 0; x < DW; ++x) {
                    const uint32_t qw = sm.q[qi][x];
                    const uint32_t kw = sm.k[t][x];
                    d0 = fmaf(bf_lo(qw), bf_lo(kw), d0);
                    d1 = fmaf(bf_hi(qw), bf_hi(kw), d1);
                }
                s = (d0 + d1) * a.scale_log2;
            }
            sm.s[qi][t] = s;
        }
        __syncthreads();
        // -- online softmax, one warp per q vector
        for (int qi = warp; qi < QT; qi += NWARPS) {
            float sv[TT / 32];
            float mx = -CUDART_INF_F;
#pragma unroll
            for (int j = 0; j < TT / 32; ++j) {
                sv[j] = sm.s[qi][lane + 32 * j];
                mx = fmaxf(mx, sv[j]);
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
            const float m_old = sm.m[qi];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < TT / 32; ++j) {
                const float p = (m_new == -CUDART_INF_F) ? 0.f : exp2f(sv[j] - m_new);
                sm.s[qi][lane + 32 * j] = p;
                sum += p;
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
            if (lane == 0) {
                const float al = (m_new == -CUDART_INF_F) ? 1.f : exp2f(m_old - m_new);
                sm.alpha[qi] = al;
                sm.l[qi] = sm.l[qi] * al + sum;
                sm.m[qi] = m_new;
            }
        }
        __syncthreads();
        // -- O = O * alpha + P V
#pragma unroll
        for (int j = 0; j < NQ; ++j) {
            const int qi = my_q0 + j * QG;
            if (qi < QT) {
                const float al = sm.alpha[qi];
                acc[j][0] *= al;
                acc[j][1] *= al;
            }
        }
#pragma unroll 4
        for (int t = 0; t < TT; ++t) {
            const uint32_t vw = sm.v[t][my_w];
            const float v0 = bf_lo(vw), v1 = bf_hi(vw);
#pragma unroll
            for (int j = 0; j < NQ; ++j) {
                const int qi = my_q0 + j * QG;
                if (qi < QT) {
                    const float p = sm.s[qi][t];
                    acc[j][0] = fmaf(p, v0, acc[j][0]);
                    acc[j][1] = fmaf(p, v1, acc[j][1]);
                }
            }
        }
        __syncthreads();  // before the next tile overwrites addr/k/v/s
    }

    // ---- finalize
#pragma unroll
    for (int j = 0; j < NQ; ++j) {
        const int qi = my_q0 + j * QG;
        if (qi < nq) {
            const int row = w.row0 + qi / w.nh;
            const int head = w.head0 + qi % w.nh;
            const float l = sm.l[qi];
            const float inv = l > 0.f ? 1.f / l : 0.f;
            if (a.num_splits == 1) {
                uint32_t* dst = reinterpret_cast<uint32_t*>(
                    a.out + ((size_t)row * a.num_q_heads + head) * D);
                dst[my_w] = pack_bf16x2(acc[j][0] * inv, acc[j][1] * inv);
            } else {
                const size_t idx = ((size_t)row * a.num_q_heads + head) * a.num_splits + w.split;
                float2* dst = reinterpret_cast<float2*>(a.part_o + idx * D);
                dst[my_w] = make_float2(acc[j][0] * inv, acc[j][1] * inv);
                if (my_w == 0) a.part_lse[idx] = l > 0.f ? sm.m[qi] + log2f(l) : -CUDART_INF_F;
            }
        }
    }
}

// Merge split partials: out[r, h] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M).
// Grid: num_rows * num_q_heads CTAs of D threads.
template <int D>
__global__ void __launch_bounds__(D) attn_merge_kernel(const float* __restrict__ part_o,
                                                       const float* __restrict__ part_lse,
                                                       __nv_bfloat16* __restrict__ out,
                                                       int num_splits) {
    const size_t idx = blockIdx.x;  // row * num_q_heads + head
    const float* lse = part_lse + idx * num_splits;
    float m = -CUDART_INF_F;
    for (int s = 0; s < num_splits; ++s) m = fmaxf(m, lse[s]);
    const int d = threadIdx.x;
    float num = 0.f, den = 0.f;
    if (m != -CUDART_INF_F) {
        for (int s = 0; s < num_splits; ++s) {
            const float ls = lse[s];
            if (ls == -CUDART_INF_F) continue;
            const float wgt = exp2f(ls - m);
            num = fmaf(wgt, part_o[(idx * num_splits + s) * D + d], num);
            den += wgt;
        }
    }
    out[idx * D + d] = __float2bfloat16(den > 0.f ? num / den : 0.f);
}

}  // namespace spindle
