// Token selection from f32 logits: greedy argmax, and temperature / top-k / top-p sampling
// driven by host-supplied uniforms. One 1024-thread CTA per row; top-k and top-p
// thresholds are found exactly by bisection on the f32 bit pattern of the probabilities
// (deterministic: no atomics, fixed reduction order), then inverse-CDF in vocab order.
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include "spindle_kernels.h"

namespace spindle {

constexpr int kSampleThreads = 1024;
constexpr unsigned kAll = 0xffffffffu;

struct ArgMax {
    float v;
    int i;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    // Larger value wins, lower index on ties; NaN never wins.
    if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
    return a;
}

__device__ ArgMax block_argmax(ArgMax x, ArgMax* sh) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        ArgMax o;
        o.v = __shfl_xor_sync(kAll, x.v, off);
        o.i = __shfl_xor_sync(kAll, x.i, off);
        x = better(x, o);
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = x;
    __syncthreads();
    x = sh[0];
    for (int w = 1; w < kSampleThreads / 32; ++w) x = better(x, sh[w]);
    return x;
}

// Sum in a fixed order (per-thread strided sums, butterfly, warps in order).
__device__ float block_sum(float x, float* sh) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kAll, x, off);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = x;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < kSampleThreads / 32; ++w) s += sh[w];
    return s;
}

__device__ int block_count(int x, int* sh) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kAll, x, off);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = x;
    __syncthreads();
    int s = 0;
    for (int w = 0; w < kSampleThreads / 32; ++w) s += sh[w];
    return s;
}

__device__ ArgMax row_argmax(const float* __restrict__ l, int vocab, ArgMax* sh) {
    ArgMax best{-CUDART_INF_F, vocab};
    for (int i = threadIdx.x; i < vocab; i += kSampleThreads) best = better(best, ArgMax{l[i], i});
    best = block_argmax(best, sh);
    if (best.i >= vocab) best.i = 0;  // all NaN / -inf
    return best;
}

__global__ void __launch_bounds__(kSampleThreads)
    argmax_kernel(int32_t* __restrict__ out, const float* __restrict__ logits, int vocab) {
    __shared__ ArgMax sh[32];
    const ArgMax b = row_argmax(logits + (size_t)blockIdx.x * vocab, vocab, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = b.i;
}

__device__ __forceinline__ float prob(const float* l, int i, float mx, float inv_t) {
    return expf((l[i] - mx) * inv_t);
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(int32_t* __restrict__ out, const float* __restrict__ logits,
                  const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                  const float* __restrict__ top_p, const float* __restrict__ uniform,
                  int vocab) {
    __shared__ ArgMax sh_am[32];
    __shared__ float sh_f[32];
    __shared__ int sh_i[32];
    __shared__ float sh_scan[32];
    __shared__ int sh_pick;
    const int r = blockIdx.x;
    const float* l = logits + (size_t)r * vocab;
    const ArgMax best = row_argmax(l, vocab, sh_am);
    const float temp = temperature[r];
    if (!(temp > 0.f) || !(best.v > -CUDART_INF_F) || !(best.v < CUDART_INF_F)) {
        if (threadIdx.x == 0) out[r] = best.i;
        return;
    }
    const float mx = best.v;
    const float inv_t = 1.0f / temp;

    // top-k: tau_k = k-th largest p = the largest bit pattern b with count(p >= b) >= k.
    float tau = 0.f;
    const int k = top_k[r];
    if (k > 0 && k < vocab) {
        uint32_t lo = 0, hi = 0x3f800001u;  // count(>= lo) >= k, count(>= hi) < k
        while (hi - lo > 1) {
            const uint32_t mid = lo + (hi - lo) / 2;
            const float t = __uint_as_float(mid);
            int c = 0;
            for (int i = threadIdx.x; i < vocab; i += kSampleThreads) c += prob(l, i, mx, inv_t) >= t;
            if (block_count(c, sh_i) >= k) lo = mid; else hi = mid;
        }
        tau = __uint_as_float(lo);
    }
    // top-p over the top-k set: largest t whose kept mass >= top_p * mass(top-k set).
    const float pp = top_p[r];
    if (pp > 0.f && pp < 1.f) {
        float z = 0.f;
        for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
            const float p = prob(l, i, mx, inv_t);
            z += p >= tau ? p : 0.f;
        }
        const float target = pp * block_sum(z, sh_f);
        uint32_t lo = __float_as_uint(tau), hi = 0x3f800001u;
        while (hi - lo > 1) {
            const uint32_t mid = lo + (hi - lo) / 2;
            const float t = __uint_as_float(mid);
            float s = 0.f;
            for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
                const float p = prob(l, i, mx, inv_t);
                s += p >= t ? p : 0.f;
            }
            if (block_sum(s, sh_f) >= target) lo = mid; else hi = mid;
        }
        tau = __uint_as_float(lo);
    }

    // Inverse CDF in vocabulary order: thread t owns the contiguous segment [b, e).
    const int seg = (vocab + kSampleThreads - 1) / kSampleThreads;
    const int b = min(vocab, (int)threadIdx.x * seg), e = min(vocab, b + seg);
    float local = 0.f;
    int last = -1;
    for (int i = b; i < e; ++i) {
        const float p = prob(l, i, mx, inv_t);
        if (p >= tau && p > 0.f) {
            local += p;
            last = i;
        }
    }
    // Inclusive block scan of local (fixed order).
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float incl = local;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const float n = __shfl_up_sync(kAll, incl, off);
        if (lane >= off) incl += n;
    }
    if (lane == 31) sh_scan[warp] = incl;
    if (threadIdx.x == 0) sh_pick = -1;
    __syncthreads();
    if (warp == 0) {
        float wv = sh_scan[lane];
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const float n = __shfl_up_sync(kAll, wv, off);
            if (lane >= off) wv += n;
        }
        sh_scan[lane] = wv;  // inclusive over warps
    }
    __syncthreads();
    const float warp_base = warp > 0 ? sh_scan[warp - 1] : 0.f;
    incl += warp_base;
    const float excl = __shfl_up_sync(kAll, incl, 1);
    // Interval [my_lo, my_hi): bounds are shared bit-exactly between neighbours, so at
    // most one thread contains the target.
    const float my_lo = lane > 0 ? excl : warp_base;
    const float my_hi = lane < 31 ? incl : sh_scan[warp];
    const float total = sh_scan[31];
    const float target = uniform[r] * total;
    // Fallback for target >= total (rounding): the last kept token overall.
    const ArgMax lastk = block_argmax(ArgMax{(float)last, -last}, sh_am);
    if (local > 0.f && my_lo <= target && target < my_hi) {
        float run = my_lo;
        int pick = last;
        for (int i = b; i < e; ++i) {
            const float p = prob(l, i, mx, inv_t);
            if (p >= tau && p > 0.f) {
                run += p;
                if (run > target) {
                    pick = i;
                    break;
                }
            }
        }
        sh_pick = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int pick = sh_pick;
        if (pick < 0) pick = lastk.v >= 0.f ? (int)lastk.v : best.i;
        out[r] = pick;
    }
}

}  // namespace spindle

extern "C" int spindle_argmax(int32_t* out, const float* logits, int32_t rows, int32_t vocab,
                              sp_stream stream) {
    if (rows < 0 || vocab <= 0 || rows > 0x7fffffff) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    spindle::argmax_kernel<<<rows, spindle::kSampleThreads, 0, stream>>>(out, logits, vocab);
    return cudaGetLastError();
}

extern "C" int spindle_sample(int32_t* out, const float* logits, const float* temperature,
                              const int32_t* top_k, const float* top_p, const float* uniform,
                              int32_t rows, int32_t vocab, sp_stream stream) {
    if (rows < 0 || vocab <= 0) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    spindle::sample_kernel<<<rows, spindle::kSampleThreads, 0, stream>>>(
        out, logits, temperature, top_k, top_p, uniform, vocab);
    return cudaGetLastError();
}
