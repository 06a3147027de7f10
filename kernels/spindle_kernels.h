// C ABI of spindle's CUDA kernels: every extern "C" launcher and parameter struct.
// This is the one header bindgen reads (build.rs -> OUT_DIR/kernels_ffi.rs); the .cu files
// include it so declaration and definition cannot drift apart.
//
// Conventions
// - bf16 tensors are `sp_bf16` (__nv_bfloat16 under nvcc, uint16_t for bindgen), row-major,
//   contiguous; every pointer carries its shape in a comment.
// - Every launcher enqueues on `stream` (a cudaStream_t / CUstream) and returns a
//   cudaError_t as int: 0 = success, cudaErrorInvalidValue (1) for bad arguments, otherwise
//   the launch error. Nothing synchronises.
// - KV cache per layer: [num_blocks, block_size, num_kv_heads, head_dim] bf16; a physical
//   slot is block * block_size + slot_in_block.
// - Indices read from device memory (chunk lists, slots, block pairs, tile plans, token
//   ids) are bounds-checked by the kernels: out-of-range entries are skipped (or give
//   zeros), never dereferenced, so a bad host plan cannot make a kernel read or write
//   outside the buffers whose sizes the launch arguments describe.
// - Attention views (design-notes section 2): a query row sees a list of chunks, each a run
//   of consecutive slots inside ONE block: (chunk_block, chunk_start, chunk_len). The view
//   is the concatenation of the row's chunks in order; view index v < row_limit[r] is
//   visible, v >= row_limit[r] is masked (prefill causality / tree visibility).
#ifndef SPINDLE_KERNELS_H
#define SPINDLE_KERNELS_H

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_runtime.h>
typedef __nv_bfloat16 sp_bf16;
typedef cudaStream_t sp_stream;
#else
typedef uint16_t sp_bf16;
typedef void* sp_stream;
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Head dims the attention kernels are instantiated for.
#define SPINDLE_ATTN_HEAD_DIM_16 16
#define SPINDLE_ATTN_HEAD_DIM_32 32
#define SPINDLE_ATTN_HEAD_DIM_64 64
#define SPINDLE_ATTN_HEAD_DIM_128 128
// Query vectors (rows x q-heads of one kv-head) one prefill CTA holds.
#define SPINDLE_PREFILL_QUERIES_PER_TILE 64

// ---------------------------------------------------------------- paged_decode.cu
// Split-KV paged decode attention, one query row per CSR entry.
// Grid: (num_rows, num_kv_heads * head_tiles, num_splits). Each CTA stages its split's
// K/V once and serves every q-head of its kv-head (GQA), then a log-sum-exp reduce merges
// the splits when num_splits > 1.
typedef struct SpindleDecodeParams {
    const sp_bf16* q;             // [num_rows, num_q_heads, head_dim]
    const sp_bf16* k_cache;       // [num_blocks, block_size, num_kv_heads, head_dim]
    const sp_bf16* v_cache;       // [num_blocks, block_size, num_kv_heads, head_dim]
    sp_bf16* out;                 // [num_rows, num_q_heads, head_dim]
    const int32_t* chunk_indptr;  // [num_rows + 1]   chunks of row r: [indptr[r], indptr[r+1])
    const int32_t* chunk_block;   // [num_chunks]     physical block id
    const int32_t* chunk_start;   // [num_chunks]     first slot inside the block
    const int32_t* chunk_len;     // [num_chunks]     tokens; start + len <= block_size
    const int32_t* row_limit;     // [num_rows]       visible view tokens of row r
    float* part_o;                // [num_rows, num_q_heads, num_splits, head_dim] (num_splits > 1)
    float* part_lse;              // [num_rows, num_q_heads, num_splits]           (num_splits > 1)
    int32_t num_rows;
    int32_t num_q_heads;
    int32_t num_kv_heads;         // num_q_heads % num_kv_heads == 0
    int32_t head_dim;             // 16, 32, 64 or 128
    int32_t block_size;
    int32_t num_blocks;           // chunks naming a block outside [0, num_blocks) are skipped
    int32_t num_chunks;           // length of chunk_block / chunk_start / chunk_len
    int32_t num_splits;           // >= 1; split s covers view [s*P, (s+1)*P), the last one to the end
    int32_t partition_size;       // P, tokens per split (any positive value; 512 is typical)
    float scale;                  // softmax scale, usually 1/sqrt(head_dim)
} SpindleDecodeParams;

int spindle_paged_decode(const SpindleDecodeParams* params, sp_stream stream);

// ---------------------------------------------------------------- prefill_attention.cu
// Variable-length prefill attention with tree visibility. Rows are grouped: all rows of
// group g (q_indptr[g]..q_indptr[g+1], e.g. the new tokens of one thread) share the chunk
// list chunk_indptr[g]..chunk_indptr[g+1]; causality/tree visibility comes from row_limit.
// Work is split into tiles planned on the host (see spindle_prefill_rows_per_tile): tile t
// covers rows [tile_row[t], min(tile_row[t] + rows_per_tile, q_indptr[tile_group[t]+1])).
// Each CTA stages K/V once for all rows x q-heads of its tile (online softmax, no splits).
typedef struct SpindlePrefillParams {
    const sp_bf16* q;             // [num_rows, num_q_heads, head_dim]
    const sp_bf16* k_cache;       // [num_blocks, block_size, num_kv_heads, head_dim]
    const sp_bf16* v_cache;       // [num_blocks, block_size, num_kv_heads, head_dim]
    sp_bf16* out;                 // [num_rows, num_q_heads, head_dim]
    const int32_t* q_indptr;      // [num_groups + 1] rows of group g
    const int32_t* chunk_indptr;  // [num_groups + 1] chunks of group g
    const int32_t* chunk_block;   // [num_chunks]
    const int32_t* chunk_start;   // [num_chunks]
    const int32_t* chunk_len;     // [num_chunks]
    const int32_t* row_limit;     // [num_rows]
    const int32_t* tile_group;    // [num_tiles] group of tile t
    const int32_t* tile_row;      // [num_tiles] first row of tile t (inside its group)
    int32_t num_rows;
    int32_t num_groups;
    int32_t num_tiles;
    int32_t num_q_heads;
    int32_t num_kv_heads;
    int32_t head_dim;             // 16, 32, 64 or 128
    int32_t block_size;
    int32_t num_blocks;
    int32_t num_chunks;
    float scale;
} SpindlePrefillParams;

// Rows per prefill tile for a GQA ratio (q-heads per kv-head); 0 if the ratio is unsupported.
int spindle_prefill_rows_per_tile(int32_t gqa_ratio);
int spindle_prefill_attention(const SpindlePrefillParams* params, sp_stream stream);

// ---------------------------------------------------------------- forked_attention.cu
// Forked attention (kernel v2) over a lowered plan (src/plan/lower.rs): one CTA per
// (work unit, kv-head) stages the unit's K/V tiles once for every query row the unit
// serves (rows x q-heads stacked, tensor cores), writes a partial (o, lse) per row, or the
// row's output when it has one partial; a merge kernel combines the rest per row in view
// order. Prefill and decode rows go through the same kernel (per-row limits).
#define SPINDLE_FORKED_UNIT_WIDTH 8      // int32 fields per unit (U_* in src/plan/lower.rs)
#define SPINDLE_FORKED_TILE_TOKENS 64    // tokens per staged K/V tile
#define SPINDLE_FORKED_CTA_ROWS 64       // stacked query vectors (rows x q-heads) per CTA
typedef struct SpindleForkedParams {
    const sp_bf16* q;              // [num_rows, num_q_heads, head_dim]
    const sp_bf16* k_cache;        // [num_blocks, block_size, num_kv_heads, head_dim]
    const sp_bf16* v_cache;        // [num_blocks, block_size, num_kv_heads, head_dim]
    sp_bf16* out;                  // [num_rows, num_q_heads, head_dim]
    const int32_t* units;          // [num_units, SPINDLE_FORKED_UNIT_WIDTH]
    const int32_t* unit_rows;      // [num_partials] query row of lowered partial p
    const int32_t* partial_direct; // [num_partials] 1: p is its row's only partial
    const int32_t* chunk_block;    // [num_chunks]
    const int32_t* chunk_start;    // [num_chunks]
    const int32_t* chunk_len;      // [num_chunks]
    const int32_t* row_limit;      // [num_rows]
    const int32_t* row_part_ptr;   // [num_rows + 1] partials of row r, view order
    const int32_t* row_parts;      // [num_row_parts]
    const int32_t* merge_rows;     // [num_merge_rows] rows with 0 or >= 2 partials
    float* part_o;                 // [num_partials, num_q_heads, head_dim]
    float* part_lse;               // [num_partials, num_q_heads] (log2)
    int32_t num_rows;
    int32_t num_q_heads;
    int32_t num_kv_heads;          // num_q_heads / num_kv_heads <= SPINDLE_FORKED_CTA_ROWS
    int32_t head_dim;              // 16, 32, 64 or 128
    int32_t block_size;
    int32_t num_blocks;
    int32_t num_chunks;
    int32_t num_units;
    int32_t num_partials;
    int32_t num_row_parts;
    int32_t num_merge_rows;
    float scale;                   // softmax scale, usually 1/sqrt(head_dim)
} SpindleForkedParams;

int spindle_forked_attention(const SpindleForkedParams* params, sp_stream stream);

// Allows spindle_forked_attention's kernels their dynamic shared memory (above 48 KiB at
// head_dim 128) in the current context: call once after opening a device, before any
// launch (Gpu::new does).
int spindle_forked_attention_prepare(void);

// Returns and clears the runtime's last error (after a failed CUDA graph capture, so the
// next launch's check does not report it again).
int spindle_clear_last_error(void);

// ---------------------------------------------------------------- kv_write.cu
// Scatter new K/V rows into the paged cache. slot_mapping[t] < 0 skips token t (padding).
int spindle_kv_write(
    const sp_bf16* k,              // [num_tokens, num_kv_heads, head_dim]
    const sp_bf16* v,              // [num_tokens, num_kv_heads, head_dim]
    sp_bf16* k_cache,              // [num_blocks, block_size, num_kv_heads, head_dim]
    sp_bf16* v_cache,              // [num_blocks, block_size, num_kv_heads, head_dim]
    const int32_t* slot_mapping,   // [num_tokens] block * block_size + slot, or -1
    int32_t num_tokens, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    int32_t num_blocks, sp_stream stream);

// Copy-on-write block copies for every layer in one launch: for each pair p and layer l,
// k_caches[l][block_pairs[2p+1]] = k_caches[l][block_pairs[2p]] (same for v).
int spindle_copy_blocks(
    sp_bf16* const* k_caches,      // [num_layers] device pointers, each a layer's k cache
    sp_bf16* const* v_caches,      // [num_layers] device pointers, each a layer's v cache
    const int32_t* block_pairs,    // [num_pairs, 2] (src block, dst block)
    int32_t num_layers, int32_t num_pairs,
    int32_t num_blocks,            // pairs naming a block outside [0, num_blocks) are skipped
    int64_t block_elems,           // block_size * num_kv_heads * head_dim (multiple of 8)
    sp_stream stream);

// ---------------------------------------------------------------- elementwise.cu
// out = rmsnorm(x) * w, f32 statistics. In place (out == x) is allowed. Also q/k norm:
// rows = tokens * heads, n = head_dim.
int spindle_rmsnorm(
    sp_bf16* out,                  // [rows, n]
    const sp_bf16* x,              // [rows, n]
    const sp_bf16* w,              // [n]
    int32_t rows, int32_t n, float eps, sp_stream stream);

// x = bf16(x + residual); out = rmsnorm(x) * w. x becomes the new residual stream.
int spindle_fused_add_rmsnorm(
    sp_bf16* out,                  // [rows, n]
    sp_bf16* x,                    // [rows, n] in/out
    const sp_bf16* residual,       // [rows, n]
    const sp_bf16* w,              // [n]
    int32_t rows, int32_t n, float eps, sp_stream stream);

// NeoX / HF half-split rotary embedding, in place on q and k, angles in f32:
// inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2;
// (x1, x2) = (x[i], x[i + head_dim/2]) -> (x1 cos - x2 sin, x2 cos + x1 sin).
int spindle_rope_neox(
    sp_bf16* q,                    // [num_tokens, num_q_heads, head_dim]
    sp_bf16* k,                    // [num_tokens, num_kv_heads, head_dim]
    const int32_t* positions,      // [num_tokens]
    int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float theta, sp_stream stream);

// The fused step's q/k/v epilogue: splits qkv = [num_tokens, hq + 2 hk, head_dim] (q_proj,
// k_proj, v_proj outputs side by side) into q, k, v, adding bias (nullable, [hq + 2 hk,
// head_dim]), RMS-normalising every q and k head (q_norm / k_norm [head_dim], both or
// neither), then rotating q and k as spindle_rope_neox; bit-identical to those launches.
// head_dim <= 256 and even.
int spindle_qkv_prep(
    sp_bf16* q,                    // [num_tokens, num_q_heads, head_dim]
    sp_bf16* k,                    // [num_tokens, num_kv_heads, head_dim]
    sp_bf16* v,                    // [num_tokens, num_kv_heads, head_dim]
    const sp_bf16* qkv,            // [num_tokens, num_q_heads + 2 num_kv_heads, head_dim]
    const sp_bf16* bias,           // [(num_q_heads + 2 num_kv_heads) head_dim] or NULL
    const sp_bf16* q_norm,         // [head_dim] or NULL
    const sp_bf16* k_norm,         // [head_dim] or NULL
    const int32_t* positions,      // [num_tokens]
    int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float eps, float theta, sp_stream stream);

// spindle_qkv_prep with the K/V write fused in: k and v heads go straight to their token's
// slot of the paged caches (as spindle_kv_write; slots[t] outside [0, num_blocks *
// block_size) skips token t's k and v), q to q. Bit-identical to spindle_qkv_prep followed
// by spindle_kv_write.
int spindle_qkv_prep_cache(
    sp_bf16* q,                    // [num_tokens, num_q_heads, head_dim]
    sp_bf16* k_cache,              // [num_blocks, block_size, num_kv_heads, head_dim]
    sp_bf16* v_cache,              // [num_blocks, block_size, num_kv_heads, head_dim]
    const int32_t* slots,          // [num_tokens]
    int32_t num_blocks, int32_t block_size,
    const sp_bf16* qkv,            // [num_tokens, num_q_heads + 2 num_kv_heads, head_dim]
    const sp_bf16* bias,           // [(num_q_heads + 2 num_kv_heads) head_dim] or NULL
    const sp_bf16* q_norm,         // [head_dim] or NULL
    const sp_bf16* k_norm,         // [head_dim] or NULL
    const int32_t* positions,      // [num_tokens]
    int32_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    float eps, float theta, sp_stream stream);

// out = silu(gate) * up. gate/up rows have stride ld (merged gate_up: up = gate + n, ld = 2n).
int spindle_silu_mul(
    sp_bf16* out,                  // [rows, n]
    const sp_bf16* gate,           // [rows, ld] (first n used)
    const sp_bf16* up,             // [rows, ld] (first n used)
    int32_t rows, int32_t n, int32_t ld, sp_stream stream);

// out[t] = table[ids[t]]; ids outside [0, vocab) give a zero row.
int spindle_embedding_bf16(
    sp_bf16* out,                  // [num_tokens, hidden]
    const sp_bf16* table,          // [vocab, hidden]
    const int32_t* ids,            // [num_tokens]
    int32_t num_tokens, int32_t hidden, int32_t vocab, sp_stream stream);
int spindle_embedding_f32(
    float* out,                    // [num_tokens, hidden]
    const sp_bf16* table,          // [vocab, hidden]
    const int32_t* ids,            // [num_tokens]
    int32_t num_tokens, int32_t hidden, int32_t vocab, sp_stream stream);

// x[r, :] = bf16(x[r, :] + bias), f32 add.
int spindle_bias_add(
    sp_bf16* x,                    // [rows, n]
    const sp_bf16* bias,           // [n]
    int32_t rows, int32_t n, sp_stream stream);

// ---------------------------------------------------------------- sampling.cu
// Greedy: out[r] = argmax logits[r, :], lowest index on ties.
int spindle_argmax(
    int32_t* out,                  // [rows]
    const float* logits,           // [rows, vocab]
    int32_t rows, int32_t vocab, sp_stream stream);

// Temperature / top-k / top-p sampling with host-supplied uniforms (the host owns the RNG).
// Per row: temperature <= 0 -> argmax. Else p_i = exp((l_i - max) / T); top-k keeps
// {p >= k-th largest p} (top_k <= 0 or >= vocab: all; ties at the boundary kept); top-p
// then keeps {p >= t} for the largest t whose kept mass >= top_p * (top-k mass)
// (top_p >= 1: all); the token is the first index, in vocabulary order, where the
// running kept mass exceeds uniform * kept mass.
int spindle_sample(
    int32_t* out,                  // [rows]
    const float* logits,           // [rows, vocab]
    const float* temperature,      // [rows]
    const int32_t* top_k,          // [rows]
    const float* top_p,            // [rows]
    const float* uniform,          // [rows] in [0, 1)
    int32_t rows, int32_t vocab, sp_stream stream);

#ifdef __cplusplus
}
#endif

#endif  // SPINDLE_KERNELS_H
