// Paged split-KV decode attention over CSR chunk lists (vLLM v2 / FlashInfer batch decode
// shape): one CTA per (row, kv-head, q-head tile, split) stages the split's K/V once for
// all q-heads of the kv-head; a log-sum-exp merge kernel combines splits.
#include "attention_common.cuh"

namespace spindle {

constexpr int kDecodeTokTile = 64;

template <int D, int QT>
__global__ void __launch_bounds__(kAttnThreads)
    paged_decode_kernel(AttnArgs a, const int32_t* __restrict__ chunk_indptr, int gqa,
                        int head_tiles) {
    __shared__ AttnSmem<D, QT, kDecodeTokTile> sm;
    Work w;
    const int row = blockIdx.x;
    w.kv_head = blockIdx.y / head_tiles;
    const int ht = blockIdx.y % head_tiles;
    w.c_begin = chunk_indptr[row];
    w.c_end = chunk_indptr[row + 1];
    w.row0 = row;
    w.nrows = 1;
    w.head0 = w.kv_head * gqa + ht * QT;
    w.nh = min(QT, gqa - ht * QT);
    w.split = blockIdx.z;
    attn_body<D, QT, kDecodeTokTile>(a, w, sm);
}

template <int D, int QT>
static cudaError_t launch_decode(const AttnArgs& a, const SpindleDecodeParams& p, int gqa,
                                 cudaStream_t stream) {
    const int head_tiles = (gqa + QT - 1) / QT;
    dim3 grid(p.num_rows, p.num_kv_heads * head_tiles, p.num_splits);
    paged_decode_kernel<D, QT><<<grid, kAttnThreads, 0, stream>>>(a, p.chunk_indptr, gqa,
                                                                   head_tiles);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.num_splits == 1) return err;
    attn_merge_kernel<D><<<p.num_rows * p.num_q_heads, D, 0, stream>>>(
        p.part_o, p.part_lse, a.out, p.num_splits);
    return cudaGetLastError();
}

template <int D>
static cudaError_t dispatch_gqa(const AttnArgs& a, const SpindleDecodeParams& p, int gqa,
                                cudaStream_t stream) {
    if (gqa == 1) return launch_decode<D, 1>(a, p, gqa, stream);
    if (gqa == 2) return launch_decode<D, 2>(a, p, gqa, stream);
    if (gqa <= 4) return launch_decode<D, 4>(a, p, gqa, stream);
    return launch_decode<D, 8>(a, p, gqa, stream);  // 5..8 in one tile, more in several
}

}  // namespace spindle

extern "C" int spindle_paged_decode(const SpindleDecodeParams* params, sp_stream stream) {
    using namespace spindle;
    if (params == nullptr) return cudaErrorInvalidValue;
    const SpindleDecodeParams& p = *params;
    if (p.num_rows < 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0 ||
        p.num_q_heads % p.num_kv_heads != 0 || p.block_size <= 0 ||
        p.num_blocks < 0 || p.num_chunks < 0 ||
        (int64_t)p.num_blocks * p.block_size > 0x7fffffff || p.num_splits <= 0 ||
        p.partition_size <= 0 || p.num_rows > 0x7fffffff / p.num_q_heads ||
        p.num_kv_heads > 65535 || p.num_splits > 65535)
        return cudaErrorInvalidValue;
    if (p.head_dim != 16 && p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 128)
        return cudaErrorInvalidValue;
    if (p.num_splits > 1 && (p.part_o == nullptr || p.part_lse == nullptr))
        return cudaErrorInvalidValue;
    if (p.num_rows == 0) return cudaSuccess;
    const int gqa = p.num_q_heads / p.num_kv_heads;
    if (p.num_kv_heads * ((gqa + 7) / 8) > 65535) return cudaErrorInvalidValue;
    AttnArgs a;
    a.q = p.q;
    a.k_cache = p.k_cache;
    a.v_cache = p.v_cache;
    a.out = p.out;
    a.chunk_block = p.chunk_block;
    a.chunk_start = p.chunk_start;
    a.chunk_len = p.chunk_len;
    a.row_limit = p.row_limit;
    a.part_o = p.part_o;
    a.part_lse = p.part_lse;
    a.num_q_heads = p.num_q_heads;
    a.num_kv_heads = p.num_kv_heads;
    a.num_rows = p.num_rows;
    a.block_size = p.block_size;
    a.num_blocks = p.num_blocks;
    a.num_chunks = p.num_chunks;
    a.num_splits = p.num_splits;
    a.partition_size = p.partition_size;
    a.scale_log2 = p.scale * kLog2e;
    // 16 and 32: small test models (tiny fixtures); 64 and 128: real ones.
    if (p.head_dim == 16) return dispatch_gqa<16>(a, p, gqa, stream);
    if (p.head_dim == 32) return dispatch_gqa<32>(a, p, gqa, stream);
    if (p.head_dim == 64) return dispatch_gqa<64>(a, p, gqa, stream);
    return dispatch_gqa<128>(a, p, gqa, stream);
}
