// Host entry points of kestrel._kernels: plain C++ types only (no CUDA or pybind11 headers), so
// bindings.cpp compiles with the host compiler. Pointers are device addresses as integers
// (torch's data_ptr()), strides are in elements, `stream` is a cudaStream_t as an integer and
// `dtype` a kestrel::DTypeCode (0 = fp16, 1 = bf16). Each returns a cudaError_t as int
// (0 = success); error_string() turns it into text.
#pragma once

#include <cstdint>

namespace kestrel::api {

using ptr_t = std::uintptr_t;

const char* error_string(int code);

// out[r] = rms_norm(x[r]) for r < rows; x row r at (r / inner) * stride_outer +
// (r % inner) * stride_inner; out and weight contiguous. vec8: 16-byte vector path.
int rms_norm(ptr_t out, ptr_t x, ptr_t weight, int64_t rows, int64_t inner, int64_t stride_outer,
             int64_t stride_inner, int64_t hidden, double eps, int dtype, bool vec8, ptr_t stream);

// residual <- x + residual; x <- rms_norm(residual); both contiguous [rows, hidden].
int fused_add_rms_norm(ptr_t x, ptr_t residual, ptr_t weight, int64_t rows, int64_t hidden,
                       double eps, int dtype, bool vec8, ptr_t stream);

// out [tokens, inter] = silu(x[:, :inter]) * x[:, inter:], x [tokens, 2 * inter] contiguous.
int silu_and_mul(ptr_t out, ptr_t x, int64_t tokens, int64_t inter, int dtype, bool vec8,
                 ptr_t stream);

// Rotate q [T, Hq, D] and k [T, Hkv, D] in place (token strides q_stride, k_stride; head stride
// D) with cos_sin (fp32 [max_position, D]) at positions, then write k and v (token stride
// v_stride) into the paged caches [num_blocks, block_size, Hkv, D] at slot_mapping (< 0: skip).
int rotary_embedding_and_cache(ptr_t positions, bool positions_int64, ptr_t q, int64_t q_stride,
                               int64_t num_q_heads, ptr_t k, int64_t k_stride, int64_t num_kv_heads,
                               ptr_t v, int64_t v_stride, ptr_t cos_sin, ptr_t key_cache,
                               ptr_t value_cache, ptr_t slot_mapping, bool slots_int64,
                               int64_t num_tokens, int64_t head_dim, int dtype, bool vec8,
                               ptr_t stream);

// Decode attention: one query per sequence (q row i, token stride q_stride), K/V through
// block_tables [num_seqs, bt_stride] int32 and seq_lens [num_seqs] int32. Each block serves
// heads_per_block (1, 2, 4 or 8: CUDA cores; 16: tensor cores, head_dim 64/128) query heads of
// one kv head. With num_splits > 1
// each sequence is cut into at most num_splits even pieces of at least min_split_len tokens
// (1..16384), chosen on the device from its own seq_len, merged through `workspace` (fp32, at
// least num_splits * num_seqs * num_q_heads * (head_dim + 1) floats, workspace_floats given).
int paged_decode_attention(ptr_t out, int64_t out_stride, ptr_t q, int64_t q_stride,
                           ptr_t key_cache, ptr_t value_cache, ptr_t block_tables,
                           int64_t bt_stride, ptr_t seq_lens, int64_t num_seqs, int64_t num_q_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, double scale,
                           int64_t heads_per_block, int64_t num_splits, int64_t min_split_len,
                           ptr_t workspace, int64_t workspace_floats, int dtype, ptr_t stream);

// Resident decode-attention blocks per multiprocessor of the current device for this head_dim,
// heads per block and dtype (0 when unsupported): the split planner's wave size.
int paged_decode_blocks_per_sm(int64_t head_dim, int64_t heads_per_block, int dtype);

// Prefill attention over query chunks: sequence i owns q rows
// [query_start_loc[i] - query_start_loc[0], query_start_loc[i + 1] - query_start_loc[0]),
// the last rows of its seq_lens[i]-token context, causal. num_tokens: rows of q. variant: 0 picks
// the kernel (wgmma on sm_90 for head_dim 64/128, else mma.sync), 1 forces mma.sync, 2 wgmma.
int paged_prefill_attention(ptr_t out, int64_t out_stride, ptr_t q, int64_t q_stride,
                            ptr_t key_cache, ptr_t value_cache, ptr_t block_tables,
                            int64_t bt_stride, ptr_t query_start_loc, ptr_t seq_lens,
                            int64_t num_seqs, int64_t num_tokens, int64_t num_q_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                            double scale, int variant, int dtype, ptr_t stream);

}  // namespace kestrel::api
