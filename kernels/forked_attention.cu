// Forked attention (kernel v2): the lowered attention plan (src/plan/lower.rs) executed as
// built, so a K/V span shared by many threads is read once per step for all of them.
//
// Design notes
// ------------
// Work. The host lowers the plan into work units: a unit is one split [view_begin,
// view_end) of one plan item plus the query rows that read it (a row tile of a forked
// item, or one row of a per-thread item). Each unit carries the chunk holding view_begin
// and the offset inside it, so a split never walks the item's earlier chunks.
//
// One CTA = (unit, kv-head), 4 warps, 128 threads. The CTA stacks the unit's rows x the
// q-heads of its kv-head into up to 64 query vectors ("stacked rows"; vector s is row
// unit_rows[row_begin + s / gqa], head kv_head * gqa + s % gqa); warp w owns stacked rows
// 16w..16w+15, one m16 tile. Q fragments live in registers for the whole unit.
//
// K/V path. Per 64-token tile, warp 0 turns the chunk cursor into the tile's 64 slot
// addresses (a warp prefix sum over chunk lengths, carried across tiles, never rewound);
// then all 128 threads issue 16-byte cp.async copies of the tile's K and V rows of this
// kv-head into shared memory (zero-fill for missing tokens). Two buffers: tile i+1 is in
// flight while tile i is computed. Shared rows are padded to head_dim + 8 bf16 so the
// 32-bit K fragment loads and the ldmatrix.trans V loads are free of bank conflicts.
//
// Math. S = Q K^T with mma.sync.m16n8k16 (bf16 in, f32 accumulate): per warp a 16 x 64
// score tile in 32 registers (C fragments: a thread holds rows g and g+8, columns 2t, 2t+1
// of each 8-column tile). Logits are scaled by scale * log2(e) and masked per row at
// min(row_limit, view_end), which gives causal and tree visibility, so prefill and decode
// rows share this kernel. Online softmax in base 2 (row max over the quad by two
// shuffles), P rounded to bf16 and fed straight from the S accumulators as the A operand
// of O += P V (the FlashAttention-2 register reuse; V fragments by ldmatrix.x4.trans).
//
// Output. A row with one partial (partial_direct) gets its normalised output written here
// in bf16: the merge is fused away. Other rows get (o / l, m + log2 l) at their lowered
// partial index; forked_merge_kernel then combines each row's partials in view order in
// f32, exactly as the CPU backend does (src/plan/lower.rs `interpret` is the spec).
//
// Why. Decode attention is bound by K/V bytes. Staging a shared span once per step for
// every row that reads it divides those bytes by the fork width; tensor cores keep the
// math off the critical path for 64 stacked rows (scalar f32 dot products could not), and
// the split rule of the lowering fills the SMs when items are few and long.
//
// Safety. Indices read from device memory are clamped or skipped: a malformed plan yields
// wrong numbers, never an out-of-bounds access.
#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>

#include "spindle_kernels.h"

namespace spindle {
namespace forked {

constexpr int kThreads = 128;
constexpr int kTile = SPINDLE_FORKED_TILE_TOKENS;
constexpr int kCtaRows = SPINDLE_FORKED_CTA_ROWS;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kCtaRows == 16 * (kThreads / 32), "one m16 tile per warp");
static_assert(kTile == 64, "two slots per lane in the chunk walk");

struct Args {
    const __nv_bfloat16* __restrict__ q;        // [num_rows, num_q_heads, D]
    const __nv_bfloat16* __restrict__ k_cache;  // [num_blocks, block_size, num_kv_heads, D]
    const __nv_bfloat16* __restrict__ v_cache;  // [num_blocks, block_size, num_kv_heads, D]
    __nv_bfloat16* __restrict__ out;            // [num_rows, num_q_heads, D]
    const int32_t* __restrict__ units;          // [num_units, UNIT_WIDTH]
    const int32_t* __restrict__ unit_rows;      // [num_partials]
    const int32_t* __restrict__ partial_direct; // [num_partials]
    const int32_t* __restrict__ chunk_block;    // [num_chunks]
    const int32_t* __restrict__ chunk_start;    // [num_chunks]
    const int32_t* __restrict__ chunk_len;      // [num_chunks]
    const int32_t* __restrict__ row_limit;      // [num_rows]
    float* __restrict__ part_o;                 // [num_partials, num_q_heads, D]
    float* __restrict__ part_lse;               // [num_partials, num_q_heads]
    int num_rows, num_q_heads, num_kv_heads, gqa, block_size, num_blocks, num_chunks,
        num_units, num_partials;
    float scale_log2;
};

// Shared memory of one CTA (dynamic): K and V tiles, double buffered, then slot addresses.
template <int D>
struct Smem {
    static constexpr int kStride = D + 8;  // bf16 per staged row: 16-byte pad
    static constexpr int kTileElems = kTile * kStride;
    static constexpr size_t kBytes =
        4 * (size_t)kTileElems * sizeof(__nv_bfloat16) + 2 * kTile * sizeof(int);
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int n = valid ? 16 : 0;  // 0: zero-fill the 16 bytes
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// d[0..3] += a (16x16 bf16, row) * b (16x8 bf16, col), f32 accumulators.
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// Warp 0, all lanes, uniform cursor. Writes the slot of every view index v in [t0, t1)
// into slot[v - t0] (-1 where no valid chunk covers it) and advances the cursor (chunk ci
// starts at view index cv) past every chunk that ends at or before t1.
__device__ __forceinline__ void walk_tile(const Args& a, int ce, int& ci, int& cv, int t0,
                                          int t1, int* slot) {
    const int lane = threadIdx.x & 31;
    slot[lane] = -1;
    slot[lane + 32] = -1;
    __syncwarp();
    while (true) {
        const int j = ci + lane;
        const bool live = j < ce;
        const int len = live ? max(0, a.chunk_len[j]) : 0;
        int incl = len;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int n = __shfl_up_sync(kFull, incl, off);
            if (lane >= off) incl += n;
        }
        const int cstart = cv + incl - len;
        const int cend = cv + incl;
        if (live) {
            const int lo = max(cstart, t0);
            const int hi = min(cend, t1);
            const int blk = a.chunk_block[j], st = a.chunk_start[j];
            const bool ok = blk >= 0 && blk < a.num_blocks && st >= 0 && st <= a.block_size - len;
            if (ok && lo < hi) {
                const int base = blk * a.block_size + st - cstart;
                for (int v = lo; v < hi; ++v) slot[v - t0] = base + v;
            }
        }
        // View ends are monotone in the lane: the consumed chunks are a lane prefix.
        const unsigned done = __ballot_sync(kFull, live && cend <= t1);
        const int n_done = __popc(done);
        const int adv = __shfl_sync(kFull, incl, n_done > 0 ? n_done - 1 : 0);
        if (n_done > 0) {
            ci += n_done;
            cv += adv;
        }
        if (n_done < 32 || ci >= ce) break;
    }
    __syncwarp();
}

// All threads: cp.async the K and V rows (this kv-head) of the tile's slots.
template <int D>
__device__ __forceinline__ void issue_tile(const Args& a, int kv_head, const int* slot,
                                           __nv_bfloat16* ks, __nv_bfloat16* vs) {
    constexpr int kVec = D / 8;  // 16-byte pieces per row
    for (int i = threadIdx.x; i < kTile * kVec; i += kThreads) {
        const int t = i / kVec, c = i % kVec;
        const int s = slot[t];
        const bool valid = s >= 0;
        const size_t off = valid ? ((size_t)s * a.num_kv_heads + kv_head) * D + c * 8 : 0;
        cp_async16(ks + t * Smem<D>::kStride + c * 8, a.k_cache + off, valid);
        cp_async16(vs + t * Smem<D>::kStride + c * 8, a.v_cache + off, valid);
    }
}

template <int D>
__global__ void __launch_bounds__(kThreads, 2) forked_attention_kernel(Args a) {
    static_assert(D % 16 == 0 && D <= 128, "head_dim 16, 32, 64 or 128");
    constexpr int KK = D / 16;     // k-steps of S = Q K^T
    constexpr int NT = kTile / 8;  // 8-token column tiles of S
    constexpr int DT = D / 8;      // 8-wide column tiles of O
    constexpr int ST = Smem<D>::kStride;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* kbuf = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [2][kTile][ST]
    __nv_bfloat16* vbuf = kbuf + 2 * Smem<D>::kTileElems;              // [2][kTile][ST]
    int* slots = reinterpret_cast<int*>(vbuf + 2 * Smem<D>::kTileElems);  // [2][kTile]

    const int unit = blockIdx.x;
    const int kv_head = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tq = lane & 3;
    if (unit >= a.num_units || kv_head >= a.num_kv_heads) return;
    const int32_t* f = a.units + (size_t)unit * SPINDLE_FORKED_UNIT_WIDTH;
    const int vb = max(f[0], 0);
    const int ve = max(f[1], vb);
    const int off0 = f[3];
    int ci = min(max(f[2], 0), a.num_chunks);
    const int ce = min(max(f[4], ci), a.num_chunks);
    const int rb = min(max(f[5], 0), a.num_partials);
    const int nrows = min(min(max(f[6], rb), a.num_partials) - rb, kCtaRows / a.gqa);
    int cv = vb - max(off0, 0);

    // This thread's two stacked rows (g and g + 8 of its warp): partial, row, head, limit.
    int part[2], row[2], head[2], lim[2];
    const __nv_bfloat16* qp[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int s = warp * 16 + g + 8 * i;
        const int k = s / a.gqa;
        part[i] = -1;
        row[i] = -1;
        head[i] = kv_head * a.gqa + s % a.gqa;
        lim[i] = 0;
        qp[i] = nullptr;
        if (k < nrows) {
            const int r = a.unit_rows[rb + k];
            if (r >= 0 && r < a.num_rows) {
                part[i] = rb + k;
                row[i] = r;
                lim[i] = min(a.row_limit[r], ve);
                qp[i] = a.q + ((size_t)r * a.num_q_heads + head[i]) * D;
            }
        }
    }
    const bool warp_active = warp * 16 < nrows * a.gqa;

    // Q fragments (A operand, row-major 16 x 16 per k-step).
    uint32_t qf[KK][4];
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
        const int c0 = kk * 16 + 2 * tq;
        qf[kk][0] = qp[0] ? *reinterpret_cast<const uint32_t*>(qp[0] + c0) : 0u;
        qf[kk][1] = qp[1] ? *reinterpret_cast<const uint32_t*>(qp[1] + c0) : 0u;
        qf[kk][2] = qp[0] ? *reinterpret_cast<const uint32_t*>(qp[0] + c0 + 8) : 0u;
        qf[kk][3] = qp[1] ? *reinterpret_cast<const uint32_t*>(qp[1] + c0 + 8) : 0u;
    }
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m[2] = {-CUDART_INF_F, -CUDART_INF_F};
    float l[2] = {0.f, 0.f};

    const int n_tiles = (ve - vb + kTile - 1) / kTile;
    if (n_tiles > 0) {
        if (warp == 0) walk_tile(a, ce, ci, cv, vb, min(vb + kTile, ve), slots);
        __syncthreads();
        issue_tile<D>(a, kv_head, slots, kbuf, vbuf);
        cp_async_commit();
    }
    for (int it = 0; it < n_tiles; ++it) {
        const int buf = it & 1;
        const int t0 = vb + it * kTile;
        if (it + 1 < n_tiles) {
            const int n0 = t0 + kTile;
            int* nslot = slots + (buf ^ 1) * kTile;
            if (warp == 0) walk_tile(a, ce, ci, cv, n0, min(n0 + kTile, ve), nslot);
            __syncthreads();
            issue_tile<D>(a, kv_head, nslot, kbuf + (buf ^ 1) * Smem<D>::kTileElems,
                          vbuf + (buf ^ 1) * Smem<D>::kTileElems);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (warp_active) {
            const __nv_bfloat16* ks = kbuf + buf * Smem<D>::kTileElems;
            const __nv_bfloat16* vs = vbuf + buf * Smem<D>::kTileElems;
            // ---- S = Q K^T (16 x 64 per warp)
            float s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KK; ++kk) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const __nv_bfloat16* kr = ks + (nt * 8 + g) * ST + kk * 16 + 2 * tq;
                    const uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr);
                    const uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + 8);
                    mma16816(s[nt], qf[kk], b0, b1);
                }
            }
            // ---- scale, mask, row max over the quad
            float mx[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int v = t0 + nt * 8 + 2 * tq + (e & 1);
                    const int i = e >> 1;
                    const float x = v < lim[i] ? s[nt][e] * a.scale_log2 : -CUDART_INF_F;
                    s[nt][e] = x;
                    mx[i] = fmaxf(mx[i], x);
                }
            }
            float alpha[2], mn[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(kFull, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(kFull, mx[i], 2));
                mn[i] = fmaxf(m[i], mx[i]);
                alpha[i] = (mn[i] == -CUDART_INF_F) ? 1.f : exp2f(m[i] - mn[i]);
                m[i] = mn[i];
            }
            // ---- P = 2^(S - m), row sums (thread-local; reduced over the quad at the end)
            float sum[2] = {0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1;
                    const float p = (mn[i] == -CUDART_INF_F) ? 0.f : exp2f(s[nt][e] - mn[i]);
                    s[nt][e] = p;
                    sum[i] += p;
                }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + sum[i];
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][0] *= alpha[0];
                o[dt][1] *= alpha[0];
                o[dt][2] *= alpha[1];
                o[dt][3] *= alpha[1];
            }
            // ---- O += P V: P from the S accumulators, V by ldmatrix.trans
            const int mi = lane >> 3, ri = lane & 7;
#pragma unroll
            for (int kt = 0; kt < kTile / 16; ++kt) {
                uint32_t pa[4];
                pa[0] = pack_bf16x2(s[2 * kt][0], s[2 * kt][1]);
                pa[1] = pack_bf16x2(s[2 * kt][2], s[2 * kt][3]);
                pa[2] = pack_bf16x2(s[2 * kt + 1][0], s[2 * kt + 1][1]);
                pa[3] = pack_bf16x2(s[2 * kt + 1][2], s[2 * kt + 1][3]);
#pragma unroll
                for (int d2 = 0; d2 < D / 16; ++d2) {
                    uint32_t vb4[4];
                    const __nv_bfloat16* vr =
                        vs + (kt * 16 + (mi & 1) * 8 + ri) * ST + d2 * 16 + (mi >> 1) * 8;
                    ldmatrix_x4_trans(vb4, vr);
                    mma16816(o[2 * d2], pa, vb4[0], vb4[1]);
                    mma16816(o[2 * d2 + 1], pa, vb4[2], vb4[3]);
                }
            }
        }
        __syncthreads();  // buffer `buf` is refilled by the next iteration's copies
    }

    // ---- finalize: a direct row's output, or the partial (o / l, m + log2 l)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(kFull, l[i], 1);
        l[i] += __shfl_xor_sync(kFull, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (part[i] < 0) continue;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        const bool direct = a.partial_direct[part[i]] == 1;
        if (direct) {
            __nv_bfloat16* dst = a.out + ((size_t)row[i] * a.num_q_heads + head[i]) * D;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * tq) =
                    pack_bf16x2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
        } else {
            const size_t idx = (size_t)part[i] * a.num_q_heads + head[i];
            float* dst = a.part_o + idx * D;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<float2*>(dst + dt * 8 + 2 * tq) =
                    make_float2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
            if (tq == 0) a.part_lse[idx] = l[i] > 0.f ? m[i] + log2f(l[i]) : -CUDART_INF_F;
        }
    }
}

// Merge per (merge row, q-head), D threads: partials in view order, f32 online
// log-sum-exp; a row with no partial (or none that saw a token) is zero.
template <int D>
__global__ void __launch_bounds__(D) forked_merge_kernel(
    const float* __restrict__ part_o, const float* __restrict__ part_lse,
    const int32_t* __restrict__ row_part_ptr, const int32_t* __restrict__ row_parts,
    const int32_t* __restrict__ merge_rows, __nv_bfloat16* __restrict__ out, int num_rows,
    int num_q_heads, int num_partials, int num_row_parts) {
    const int row = merge_rows[blockIdx.x];
    const int head = blockIdx.y;
    if (row < 0 || row >= num_rows) return;
    const int d = threadIdx.x;
    const int pb = min(max(row_part_ptr[row], 0), num_row_parts);
    const int pe = min(max(row_part_ptr[row + 1], pb), num_row_parts);
    float m = -CUDART_INF_F, den = 0.f, acc = 0.f;
    for (int j = pb; j < pe; ++j) {
        const int p = row_parts[j];
        if (p < 0 || p >= num_partials) continue;
        const size_t idx = (size_t)p * num_q_heads + head;
        const float lse = part_lse[idx];
        if (lse == -CUDART_INF_F) continue;
        const float mn = fmaxf(m, lse);
        const float sa = exp2f(m - mn);
        const float sb = exp2f(lse - mn);
        den = den * sa + sb;
        acc = acc * sa + sb * part_o[idx * D + d];
        m = mn;
    }
    out[((size_t)row * num_q_heads + head) * D + d] = __float2bfloat16(den > 0.f ? acc / den : 0.f);
}

// The kernel's dynamic shared memory above 48 KiB: a function attribute of the current
// context, set by spindle_forked_attention_prepare (once per opened device), never per
// launch (a host call in every step).
template <int D>
static cudaError_t allow_smem() {
    return cudaFuncSetAttribute(forked_attention_kernel<D>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)Smem<D>::kBytes);
}

template <int D>
static cudaError_t launch(const Args& a, const SpindleForkedParams& p, cudaStream_t stream) {
    if (p.num_units > 0) {
        const size_t bytes = Smem<D>::kBytes;
        dim3 grid(p.num_units, p.num_kv_heads);
        forked_attention_kernel<D><<<grid, kThreads, bytes, stream>>>(a);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    if (p.num_merge_rows > 0) {
        dim3 grid(p.num_merge_rows, p.num_q_heads);
        forked_merge_kernel<D><<<grid, D, 0, stream>>>(p.part_o, p.part_lse, p.row_part_ptr,
                                                      p.row_parts, p.merge_rows, p.out,
                                                      p.num_rows, p.num_q_heads,
                                                      p.num_partials, p.num_row_parts);
        return cudaGetLastError();
    }
    return cudaSuccess;
}

}  // namespace forked
}  // namespace spindle

extern "C" int spindle_forked_attention(const SpindleForkedParams* params, sp_stream stream) {
    using namespace spindle::forked;
    if (params == nullptr) return cudaErrorInvalidValue;
    const SpindleForkedParams& p = *params;
    if (p.num_rows < 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0 ||
        p.num_q_heads % p.num_kv_heads != 0 || p.num_q_heads / p.num_kv_heads > kCtaRows ||
        p.block_size <= 0 || p.num_blocks < 0 || p.num_chunks < 0 || p.num_units < 0 ||
        p.num_partials < 0 || p.num_row_parts < 0 || p.num_merge_rows < 0 ||
        (int64_t)p.num_blocks * p.block_size > 0x7fffffff || p.num_kv_heads > 65535 ||
        p.num_q_heads > 65535 || p.num_rows > 0x7fffffff / p.num_q_heads)
        return cudaErrorInvalidValue;
    if (p.head_dim != 16 && p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 128)
        return cudaErrorInvalidValue;
    if (p.num_units > 0 && (p.q == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
                            p.units == nullptr || p.unit_rows == nullptr ||
                            p.partial_direct == nullptr || p.row_limit == nullptr ||
                            (p.num_chunks > 0 && (p.chunk_block == nullptr ||
                                                  p.chunk_start == nullptr ||
                                                  p.chunk_len == nullptr))))
        return cudaErrorInvalidValue;
    if (p.num_partials > 0 && (p.part_o == nullptr || p.part_lse == nullptr))
        return cudaErrorInvalidValue;
    if (p.num_merge_rows > 0 && (p.row_part_ptr == nullptr || p.merge_rows == nullptr ||
                                 (p.num_row_parts > 0 && p.row_parts == nullptr)))
        return cudaErrorInvalidValue;
    if (p.out == nullptr && p.num_rows > 0) return cudaErrorInvalidValue;
    if (p.num_rows == 0) return cudaSuccess;
    Args a;
    a.q = p.q;
    a.k_cache = p.k_cache;
    a.v_cache = p.v_cache;
    a.out = p.out;
    a.units = p.units;
    a.unit_rows = p.unit_rows;
    a.partial_direct = p.partial_direct;
    a.chunk_block = p.chunk_block;
    a.chunk_start = p.chunk_start;
    a.chunk_len = p.chunk_len;
    a.row_limit = p.row_limit;
    a.part_o = p.part_o;
    a.part_lse = p.part_lse;
    a.num_rows = p.num_rows;
    a.num_q_heads = p.num_q_heads;
    a.num_kv_heads = p.num_kv_heads;
    a.gqa = p.num_q_heads / p.num_kv_heads;
    a.block_size = p.block_size;
    a.num_blocks = p.num_blocks;
    a.num_chunks = p.num_chunks;
    a.num_units = p.num_units;
    a.num_partials = p.num_partials;
    a.scale_log2 = p.scale * kLog2e;
    switch (p.head_dim) {
        case 16: return launch<16>(a, p, stream);
        case 32: return launch<32>(a, p, stream);
        case 64: return launch<64>(a, p, stream);
        default: return launch<128>(a, p, stream);
    }
}

extern "C" int spindle_forked_attention_prepare(void) {
    using namespace spindle::forked;
    cudaError_t err = allow_smem<16>();
    if (err == cudaSuccess) err = allow_smem<32>();
    if (err == cudaSuccess) err = allow_smem<64>();
    if (err == cudaSuccess) err = allow_smem<128>();
    return err;
}

extern "C" int spindle_clear_last_error(void) { return cudaGetLastError(); }
