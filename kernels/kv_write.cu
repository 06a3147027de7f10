// KV cache writes: scatter new K/V rows into paged slots (vLLM reshape_and_cache), and the
// batched copy-on-write block copy across all layers (vLLM copy_blocks), 16-byte vectors.
#include <cuda_bf16.h>
#include <stdint.h>

#include "spindle_kernels.h"

namespace spindle {

// Grid: num_tokens CTAs. Each token's [num_kv_heads, head_dim] row is contiguous both in
// the input and in the cache (slot-major layout), so this is a row copy.
template <bool VEC>
__global__ void __launch_bounds__(128)
    kv_write_kernel(const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                    __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
                    const int32_t* __restrict__ slot_mapping, int row_elems, int64_t num_slots) {
    const int t = blockIdx.x;
    const int slot = slot_mapping[t];
    if (slot < 0 || slot >= num_slots) return;
    const size_t src = (size_t)t * row_elems;
    const size_t dst = (size_t)slot * row_elems;
    if (VEC) {
        const int n = row_elems / 8;
        const uint4* ks = reinterpret_cast<const uint4*>(k + src);
        const uint4* vs = reinterpret_cast<const uint4*>(v + src);
        uint4* kd = reinterpret_cast<uint4*>(k_cache + dst);
        uint4* vd = reinterpret_cast<uint4*>(v_cache + dst);
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            kd[i] = ks[i];
            vd[i] = vs[i];
        }
    } else {
        for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
            k_cache[dst + i] = k[src + i];
            v_cache[dst + i] = v[src + i];
        }
    }
}

// Grid: (num_pairs, num_layers). Copies one block of one layer, K and V.
__global__ void __launch_bounds__(256)
    copy_blocks_kernel(__nv_bfloat16* const* __restrict__ k_caches,
                       __nv_bfloat16* const* __restrict__ v_caches,
                       const int32_t* __restrict__ block_pairs, int num_blocks,
                       int64_t block_elems) {
    const int pair = blockIdx.x;
    const int layer = blockIdx.y;
    const int64_t src = block_pairs[2 * pair];
    const int64_t dst = block_pairs[2 * pair + 1];
    if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
    const int64_t n = block_elems / 8;
    const uint4* ks = reinterpret_cast<const uint4*>(k_caches[layer] + src * block_elems);
    const uint4* vs = reinterpret_cast<const uint4*>(v_caches[layer] + src * block_elems);
    uint4* kd = reinterpret_cast<uint4*>(k_caches[layer] + dst * block_elems);
    uint4* vd = reinterpret_cast<uint4*>(v_caches[layer] + dst * block_elems);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        kd[i] = ks[i];
        vd[i] = vs[i];
    }
}

}  // namespace spindle

extern "C" int spindle_kv_write(const sp_bf16* k, const sp_bf16* v, sp_bf16* k_cache,
                                sp_bf16* v_cache, const int32_t* slot_mapping,
                                int32_t num_tokens, int32_t num_kv_heads, int32_t head_dim,
                                int32_t block_size, int32_t num_blocks, sp_stream stream) {
    if (num_tokens < 0 || num_kv_heads <= 0 || head_dim <= 0 || block_size <= 0 ||
        num_blocks < 0)
        return cudaErrorInvalidValue;
    if (num_tokens == 0) return cudaSuccess;
    const int row = num_kv_heads * head_dim;
    const int64_t slots = (int64_t)num_blocks * block_size;
    if (row % 8 == 0)
        spindle::kv_write_kernel<true><<<num_tokens, 128, 0, stream>>>(k, v, k_cache, v_cache,
                                                                       slot_mapping, row, slots);
    else
        spindle::kv_write_kernel<false><<<num_tokens, 128, 0, stream>>>(
            k, v, k_cache, v_cache, slot_mapping, row, slots);
    return cudaGetLastError();
}

extern "C" int spindle_copy_blocks(sp_bf16* const* k_caches, sp_bf16* const* v_caches,
                                   const int32_t* block_pairs, int32_t num_layers,
                                   int32_t num_pairs, int32_t num_blocks, int64_t block_elems,
                                   sp_stream stream) {
    if (num_layers < 0 || num_pairs < 0 || num_blocks < 0 || block_elems <= 0 || block_elems % 8 != 0 ||
        num_layers > 65535)
        return cudaErrorInvalidValue;
    if (num_layers == 0 || num_pairs == 0) return cudaSuccess;
    dim3 grid(num_pairs, num_layers);
    spindle::copy_blocks_kernel<<<grid, 256, 0, stream>>>(k_caches, v_caches, block_pairs,
                                                          num_blocks, block_elems);
    return cudaGetLastError();
}
