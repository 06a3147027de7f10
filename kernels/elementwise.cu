// Element-wise layers of a Qwen-style decoder: RMSNorm (plain, q/k-norm, fused residual
// add), NeoX/HF rotary embedding, SiLU(gate) * up, embedding gather, bias add. bf16 I/O,
// f32 math.
#include <cuda_bf16.h>
#include <stdint.h>

#include "spindle_kernels.h"

namespace spindle {

constexpr unsigned kMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kMask, x, off);
    return x;
}

// RMSNorm. ROWS_PER_CTA rows per 256-thread CTA (8 warps): 8 -> a warp per row (short
// rows such as q/k norm over head_dim), 1 -> the whole CTA per row (hidden-size rows).
// HF order: y = bf16(x * rstd), out = bf16(w * y). ADD: x = bf16(x + residual) first.
template <int ROWS_PER_CTA, bool ADD>
__global__ void __launch_bounds__(256)
    rmsnorm_kernel(__nv_bfloat16* out, __nv_bfloat16* x, const __nv_bfloat16* __restrict__ res,
                   const __nv_bfloat16* __restrict__ w, int rows, int n, float eps) {
    constexpr int TPR = 256 / ROWS_PER_CTA;  // threads per row
    __shared__ float red[8];
    const int sub = threadIdx.x / TPR;
    const int t = threadIdx.x % TPR;
    const int row = blockIdx.x * ROWS_PER_CTA + sub;
    const bool live = row < rows;
    __nv_bfloat16* xr = x + (size_t)(live ? row : 0) * n;
    float ss = 0.f;
    if (live) {
        for (int i = t; i < n; i += TPR) {
            float z = __bfloat162float(xr[i]);
            if (ADD) {
                const __nv_bfloat16 zb =
                    __float2bfloat16(z + __bfloat162float(res[(size_t)row * n + i]));
                xr[i] = zb;
                z = __bfloat162float(zb);
            }
            ss = fmaf(z, z, ss);
        }
    }
    ss = warp_sum(ss);
    if (TPR > 32) {
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
        __syncthreads();
        ss = 0.f;
#pragma unroll
        for (int i = 0; i < TPR / 32; ++i) ss += red[i];
    }
    if (!live) return;
    const float rstd = rsqrtf(ss / (float)n + eps);
    __nv_bfloat16* o = out + (size_t)row * n;
    for (int i = t; i < n; i += TPR) {
        const float y = __bfloat162float(__float2bfloat16(__bfloat162float(xr[i]) * rstd));
        o[i] = __float2bfloat16(y * __bfloat162float(w[i]));
    }
}

template <bool ADD>
static cudaError_t launch_rmsnorm(sp_bf16* out, sp_bf16* x, const sp_bf16* res,
                                  const sp_bf16* w, int rows, int n, float eps,
                                  cudaStream_t stream) {
    if (rows < 0 || n <= 0) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    if (n <= 256) {
        rmsnorm_kernel<8, ADD><<<(rows + 7) / 8, 256, 0, stream>>>(out, x, res, w, rows, n, eps);
    } else {
        rmsnorm_kernel<1, ADD><<<rows, 256, 0, stream>>>(out, x, res, w, rows, n, eps);
    }
    return cudaGetLastError();
}

// Grid-stride over (token, head, i < head_dim/2).
__global__ void __launch_bounds__(256)
    rope_neox_kernel(__nv_bfloat16* q, __nv_bfloat16* k, const int32_t* __restrict__ positions,
                     int num_tokens, int hq, int hk, int head_dim, float theta) {
    const int half = head_dim / 2;
    const int heads = hq + hk;
    const int64_t total = (int64_t)num_tokens * heads * half;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const int h = (int)((idx / half) % heads);
        const int64_t tok = idx / ((int64_t)half * heads);
        // HF: inv_freq = 1 / theta^(2i/d) in f32, angle = f32(pos) * inv_freq.
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
        const float ang = (float)positions[tok] * inv_freq;
        float sn, cs;
        sincosf(ang, &sn, &cs);
        __nv_bfloat16* base = (h < hq) ? q + (tok * hq + h) * head_dim
                                       : k + (tok * hk + (h - hq)) * head_dim;
        const float x1 = __bfloat162float(base[i]);
        const float x2 = __bfloat162float(base[i + half]);
        base[i] = __float2bfloat16(x1 * cs - x2 * sn);
        base[i + half] = __float2bfloat16(x2 * cs + x1 * sn);
    }
}

// The fused step's q/k/v epilogue: one warp per (token, head) of a [tokens, hq + 2 hk, d]
// q/k/v projection output. Bit-identical to spindle_bias_add, then spindle_rmsnorm over
// each q and k head (n = d <= 256: a warp per row, the same lane striding and reduction),
// then spindle_rope_neox, on separate q, k, v buffers. With a cache (k_cache non-null),
// k and v heads go straight to their token's slot of the paged cache instead
// ([num_slots, hk, d] slot-major, as spindle_kv_write; a slot outside [0, num_slots) is
// skipped): the K/V write fused in.
__global__ void __launch_bounds__(256)
    qkv_prep_kernel(__nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ k,
                    __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ qkv,
                    const __nv_bfloat16* __restrict__ bias, const __nv_bfloat16* __restrict__ q_norm,
                    const __nv_bfloat16* __restrict__ k_norm, const int32_t* __restrict__ positions,
                    __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
                    const int32_t* __restrict__ slots, int64_t num_slots,
                    int num_tokens, int hq, int hk, int d, float eps, float theta) {
    const int lane = threadIdx.x & 31;
    const int heads = hq + 2 * hk;
    const int64_t item = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (item >= (int64_t)num_tokens * heads) return;
    const int64_t tok = item / heads;
    const int h = (int)(item % heads);
    const __nv_bfloat16* src = qkv + tok * heads * d + (int64_t)h * d;
    const __nv_bfloat16* b = bias ? bias + (int64_t)h * d : nullptr;
    __nv_bfloat16* dst;
    const __nv_bfloat16* nw;
    bool rotate = true;
    // Where a k or v head goes: its row of k / v, or its token's cache slot.
    int64_t kv_row = tok;
    __nv_bfloat16* kd = k;
    __nv_bfloat16* vd = v;
    if (k_cache != nullptr && h >= hq) {
        const int slot = slots[tok];
        if (slot < 0 || slot >= num_slots) return;
        kv_row = slot;
        kd = k_cache;
        vd = v_cache;
    }
    if (h < hq) {
        dst = q + (tok * hq + h) * d;
        nw = q_norm;
    } else if (h < hq + hk) {
        dst = kd + (kv_row * hk + (h - hq)) * d;
        nw = k_norm;
    } else {
        dst = vd + (kv_row * hk + (h - hq - hk)) * d;
        nw = nullptr;
        rotate = false;
    }
    // bias_add: bf16(x + b), f32 add.
    auto load = [&](int i) {
        float x = __bfloat162float(src[i]);
        if (b) x = __bfloat162float(__float2bfloat16(x + __bfloat162float(b[i])));
        return x;
    };
    float rstd = 0.f;
    if (nw) {
        float ss = 0.f;
        for (int i = lane; i < d; i += 32) {
            const float z = load(i);
            ss = fmaf(z, z, ss);
        }
        ss = warp_sum(ss);
        rstd = rsqrtf(ss / (float)d + eps);
    }
    // rmsnorm (HF order): y = bf16(x * rstd), out = bf16(w * y).
    auto normed = [&](int i) {
        float x = load(i);
        if (nw) {
            const float y = __bfloat162float(__float2bfloat16(x * rstd));
            x = __bfloat162float(__float2bfloat16(y * __bfloat162float(nw[i])));
        }
        return x;
    };
    if (!rotate) {
        for (int i = lane; i < d; i += 32) dst[i] = __float2bfloat16(normed(i));
        return;
    }
    const int half = d / 2;
    const float pos = (float)positions[tok];
    for (int i = lane; i < half; i += 32) {
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)d);
        const float ang = pos * inv_freq;
        float sn, cs;
        sincosf(ang, &sn, &cs);
        const float x1 = normed(i);
        const float x2 = normed(i + half);
        dst[i] = __float2bfloat16(x1 * cs - x2 * sn);
        dst[i + half] = __float2bfloat16(x2 * cs + x1 * sn);
    }
}

__global__ void __launch_bounds__(256)
    silu_mul_kernel(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ gate,
                    const __nv_bfloat16* __restrict__ up, int rows, int n, int ld) {
    const int64_t total = (int64_t)rows * n;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = idx / n, c = idx % n;
        const float g = __bfloat162float(gate[r * ld + c]);
        const float u = __bfloat162float(up[r * ld + c]);
        out[idx] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
    }
}

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// Grid: num_tokens CTAs.
template <typename T>
__global__ void __launch_bounds__(256)
    embedding_kernel(T* __restrict__ out, const __nv_bfloat16* __restrict__ table,
                     const int32_t* __restrict__ ids, int hidden, int vocab) {
    const int t = blockIdx.x;
    const int id = ids[t];
    const bool ok = id >= 0 && id < vocab;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float val = ok ? __bfloat162float(table[(size_t)id * hidden + i]) : 0.f;
        out[(size_t)t * hidden + i] = from_f32<T>(val);
    }
}

__global__ void __launch_bounds__(256)
    bias_add_kernel(__nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ bias,
                    int rows, int n) {
    const int64_t total = (int64_t)rows * n;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        x[idx] = __float2bfloat16(__bfloat162float(x[idx]) + __bfloat162float(bias[idx % n]));
    }
}

static unsigned grid_for(int64_t total) {
    int64_t g = (total + 255) / 256;
    if (g > 65535LL * 16) g = 65535LL * 16;
    return (unsigned)(g < 1 ? 1 : g);
}

}  // namespace spindle

extern "C" int spindle_rmsnorm(sp_bf16* out, const sp_bf16* x, const sp_bf16* w, int32_t rows,
                               int32_t n, float eps, sp_stream stream) {
    // x is only read in the plain form; the kernel shares the fused form's signature.
    return spindle::launch_rmsnorm<false>(out, const_cast<sp_bf16*>(x), nullptr, w, rows, n,
                                          eps, stream);
}

extern "C" int spindle_fused_add_rmsnorm(sp_bf16* out, sp_bf16* x, const sp_bf16* residual,
                                         const sp_bf16* w, int32_t rows, int32_t n, float eps,
                                         sp_stream stream) {
    return spindle::launch_rmsnorm<true>(out, x, residual, w, rows, n, eps, stream);
}

extern "C" int spindle_rope_neox(sp_bf16* q, sp_bf16* k, const int32_t* positions,
                                 int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
                                 int32_t head_dim, float theta, sp_stream stream) {
    if (num_tokens < 0 || num_q_heads < 0 || num_kv_heads < 0 || head_dim <= 0 ||
        head_dim % 2 != 0 || !(theta > 0.f))
        return cudaErrorInvalidValue;
    const int64_t total = (int64_t)num_tokens * (num_q_heads + num_kv_heads) * (head_dim / 2);
    if (total == 0) return cudaSuccess;
    spindle::rope_neox_kernel<<<spindle::grid_for(total), 256, 0, stream>>>(
        q, k, positions, num_tokens, num_q_heads, num_kv_heads, head_dim, theta);
    return cudaGetLastError();
}

extern "C" int spindle_silu_mul(sp_bf16* out, const sp_bf16* gate, const sp_bf16* up,
                                int32_t rows, int32_t n, int32_t ld, sp_stream stream) {
    if (rows < 0 || n < 0 || ld < n) return cudaErrorInvalidValue;
    const int64_t total = (int64_t)rows * n;
    if (total == 0) return cudaSuccess;
    spindle::silu_mul_kernel<<<spindle::grid_for(total), 256, 0, stream>>>(out, gate, up, rows,
                                                                            n, ld);
    return cudaGetLastError();
}

extern "C" int spindle_embedding_bf16(sp_bf16* out, const sp_bf16* table, const int32_t* ids,
                                      int32_t num_tokens, int32_t hidden, int32_t vocab,
                                      sp_stream stream) {
    if (num_tokens < 0 || hidden <= 0 || vocab < 0) return cudaErrorInvalidValue;
    if (num_tokens == 0) return cudaSuccess;
    spindle::embedding_kernel<__nv_bfloat16><<<num_tokens, 256, 0, stream>>>(out, table, ids,
                                                                             hidden, vocab);
    return cudaGetLastError();
}

extern "C" int spindle_embedding_f32(float* out, const sp_bf16* table, const int32_t* ids,
                                     int32_t num_tokens, int32_t hidden, int32_t vocab,
                                     sp_stream stream) {
    if (num_tokens < 0 || hidden <= 0 || vocab < 0) return cudaErrorInvalidValue;
    if (num_tokens == 0) return cudaSuccess;
    spindle::embedding_kernel<float><<<num_tokens, 256, 0, stream>>>(out, table, ids, hidden,
                                                                     vocab);
    return cudaGetLastError();
}

extern "C" int spindle_bias_add(sp_bf16* x, const sp_bf16* bias, int32_t rows, int32_t n,
                                sp_stream stream) {
    if (rows < 0 || n <= 0) return cudaErrorInvalidValue;
    const int64_t total = (int64_t)rows * n;
    if (total == 0) return cudaSuccess;
    spindle::bias_add_kernel<<<spindle::grid_for(total), 256, 0, stream>>>(x, bias, rows, n);
    return cudaGetLastError();
}

namespace spindle {

// Both q/k/v epilogue entry points: checks the shared arguments, then one launch (k_cache
// null: k and v to their buffers; else to the cache slots, num_slots of them).
static int qkv_prep_launch(sp_bf16* q, sp_bf16* k, sp_bf16* v, const sp_bf16* qkv,
                           const sp_bf16* bias, const sp_bf16* q_norm, const sp_bf16* k_norm,
                           const int32_t* positions, sp_bf16* k_cache, sp_bf16* v_cache,
                           const int32_t* slots, int64_t num_slots, int32_t num_tokens,
                           int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
                           float eps, float theta, sp_stream stream) {
    if (num_tokens < 0 || num_q_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 ||
        head_dim > 256 || head_dim % 2 != 0 || !(theta > 0.f) ||
        (q_norm == nullptr) != (k_norm == nullptr))
        return cudaErrorInvalidValue;
    const int64_t items = (int64_t)num_tokens * (num_q_heads + 2 * num_kv_heads);
    if (items == 0) return cudaSuccess;
    const int64_t grid = (items + 7) / 8;
    if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
    qkv_prep_kernel<<<(unsigned)grid, 256, 0, stream>>>(
        q, k, v, qkv, bias, q_norm, k_norm, positions, k_cache, v_cache, slots, num_slots,
        num_tokens, num_q_heads, num_kv_heads, head_dim, eps, theta);
    return cudaGetLastError();
}

}  // namespace spindle

extern "C" int spindle_qkv_prep(sp_bf16* q, sp_bf16* k, sp_bf16* v, const sp_bf16* qkv,
                                const sp_bf16* bias, const sp_bf16* q_norm,
                                const sp_bf16* k_norm, const int32_t* positions,
                                int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
                                int32_t head_dim, float eps, float theta, sp_stream stream) {
    return spindle::qkv_prep_launch(q, k, v, qkv, bias, q_norm, k_norm, positions, nullptr,
                                    nullptr, nullptr, 0, num_tokens, num_q_heads, num_kv_heads,
                                    head_dim, eps, theta, stream);
}

extern "C" int spindle_qkv_prep_cache(sp_bf16* q, sp_bf16* k_cache, sp_bf16* v_cache,
                                      const int32_t* slots, int32_t num_blocks,
                                      int32_t block_size, const sp_bf16* qkv,
                                      const sp_bf16* bias, const sp_bf16* q_norm,
                                      const sp_bf16* k_norm, const int32_t* positions,
                                      int32_t num_tokens, int32_t num_q_heads,
                                      int32_t num_kv_heads, int32_t head_dim, float eps,
                                      float theta, sp_stream stream) {
    if (num_blocks < 0 || block_size <= 0 || k_cache == nullptr || v_cache == nullptr ||
        slots == nullptr)
        return cudaErrorInvalidValue;
    return spindle::qkv_prep_launch(q, nullptr, nullptr, qkv, bias, q_norm, k_norm, positions,
                                    k_cache, v_cache, slots, (int64_t)num_blocks * block_size,
                                    num_tokens, num_q_heads, num_kv_heads, head_dim, eps, theta,
                                    stream);
}
