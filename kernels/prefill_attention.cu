// Variable-length prefill attention with tree visibility over paged K/V: one CTA per
// (host-planned row tile, kv-head) stages each K/V token tile once for all rows x q-heads
// of the tile (up to 64 query vectors), online softmax, per-row limits for causality.
#include "attention_common.cuh"

namespace spindle {

constexpr int kPrefillTokTile = 32;
constexpr int kPrefillQ = SPINDLE_PREFILL_QUERIES_PER_TILE;

// Min 4 CTAs/SM: without it ptxas picks 80 registers for D=64 and spills.
template <int D>
__global__ void __launch_bounds__(kAttnThreads, 4)
    prefill_kernel(AttnArgs a, const int32_t* __restrict__ q_indptr,
                   const int32_t* __restrict__ chunk_indptr,
                   const int32_t* __restrict__ tile_group, const int32_t* __restrict__ tile_row,
                   int num_groups, int gqa, int rows_per_tile) {
    __shared__ AttnSmem<D, kPrefillQ, kPrefillTokTile> sm;
    const int tile = blockIdx.x;
    const int g = tile_group[tile];
    const bool ok = g >= 0 && g < num_groups;
    Work w;
    w.kv_head = blockIdx.y;
    w.c_begin = ok ? chunk_indptr[g] : 0;
    w.c_end = ok ? chunk_indptr[g + 1] : 0;
    w.row0 = tile_row[tile];
    w.nrows = ok ? max(0, min(rows_per_tile, q_indptr[g + 1] - w.row0)) : 0;
    w.head0 = w.kv_head * gqa;
    w.nh = gqa;
    w.split = 0;
    attn_body<D, kPrefillQ, kPrefillTokTile>(a, w, sm);
}

}  // namespace spindle

extern "C" int spindle_prefill_rows_per_tile(int32_t gqa_ratio) {
    if (gqa_ratio <= 0 || gqa_ratio > spindle::kPrefillQ) return 0;
    return spindle::kPrefillQ / gqa_ratio;
}

extern "C" int spindle_prefill_attention(const SpindlePrefillParams* params, sp_stream stream) {
    using namespace spindle;
    if (params == nullptr) return cudaErrorInvalidValue;
    const SpindlePrefillParams& p = *params;
    if (p.num_rows < 0 || p.num_tiles < 0 || p.num_groups < 0 || p.num_q_heads <= 0 ||
        p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.block_size <= 0 ||
        p.num_blocks < 0 || p.num_chunks < 0 ||
        (int64_t)p.num_blocks * p.block_size > 0x7fffffff ||
        p.num_kv_heads > 65535)
        return cudaErrorInvalidValue;
    if (p.head_dim != 16 && p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 128)
        return cudaErrorInvalidValue;
    const int gqa = p.num_q_heads / p.num_kv_heads;
    const int rows_per_tile = spindle_prefill_rows_per_tile(gqa);
    if (rows_per_tile == 0) return cudaErrorInvalidValue;
    if (p.num_tiles == 0 || p.num_rows == 0) return cudaSuccess;
    AttnArgs a;
    a.q = p.q;
    a.k_cache = p.k_cache;
    a.v_cache = p.v_cache;
    a.out = p.out;
    a.chunk_block = p.chunk_block;
    a.chunk_start = p.chunk_start;
    a.chunk_len = p.chunk_len;
    a.row_limit = p.row_limit;
    a.part_o = nullptr;
    a.part_lse = nullptr;
    a.num_q_heads = p.num_q_heads;
    a.num_kv_heads = p.num_kv_heads;
    a.num_rows = p.num_rows;
    a.block_size = p.block_size;
    a.num_blocks = p.num_blocks;
    a.num_chunks = p.num_chunks;
    a.num_splits = 1;
    a.partition_size = 1 << 30;
    a.scale_log2 = p.scale * kLog2e;
    dim3 grid(p.num_tiles, p.num_kv_heads);
    if (p.head_dim == 16)
        prefill_kernel<16><<<grid, kAttnThreads, 0, stream>>>(
            a, p.q_indptr, p.chunk_indptr, p.tile_group, p.tile_row, p.num_groups, gqa,
            rows_per_tile);
    else if (p.head_dim == 32)
        prefill_kernel<32><<<grid, kAttnThreads, 0, stream>>>(
            a, p.q_indptr, p.chunk_indptr, p.tile_group, p.tile_row, p.num_groups, gqa,
            rows_per_tile);
    else if (p.head_dim == 64)
        prefill_kernel<64><<<grid, kAttnThreads, 0, stream>>>(
            a, p.q_indptr, p.chunk_indptr, p.tile_group, p.tile_row, p.num_groups, gqa,
            rows_per_tile);
    else
        prefill_kernel<128><<<grid, kAttnThreads, 0, stream>>>(
            a, p.q_indptr, p.chunk_indptr, p.tile_group, p.tile_row, p.num_groups, gqa,
            rows_per_tile);
    return cudaGetLastError();
}
