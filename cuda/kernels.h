// Host entry points of kestrel._kernels: plain C++ types only (no CUDA or pybind11 headers), so
// bindings.cpp compiles with the host compiler. Pointers are device addresses as integers
// (torch's data_ptr()), strides are in elements, `stream` is a cudaStream_t as an integer and
// `dtype` a kestrel::DTypeCode (0 = fp16, 1 = bf16). `kv_dtype` names a KV cache's element
// type: -1 (the default) or dtype itself, or 2 = float8 e4m3 (codes of x / scale, saturated to
// +-448; k_scale and v_scale > 0, read back as code * scale). Each returns a cudaError_t as
// int (0 = success); error_string() turns it into text.
//
// The launches with many arguments take a parameter struct (bound to Python with named fields,
// e.g. _kernels.DecodeAttentionArgs, set by name; an unknown name is an AttributeError). Fields
// start at zero, and dtype at -1, which every launcher rejects, so arguments never filled in
// give an error code, not a launch; the launchers validate the values as before.
#pragma once

#include <cstdint>

namespace kestrel::api {

using ptr_t = std::uintptr_t;

const char* error_string(int code);

// rms_norm: out[r] = rms_norm(x[r]) for r < rows; x row r at (r / inner) * stride_outer +
// (r % inner) * stride_inner; out and weight contiguous. vec8: 16-byte vector path.
struct RmsNormArgs {
  ptr_t out = 0;
  ptr_t x = 0;
  ptr_t weight = 0;  // [hidden]
  int64_t rows = 0;
  int64_t inner = 0;  // rows per outer index (1 for a plain 2-D x)
  int64_t stride_outer = 0;
  int64_t stride_inner = 0;
  int64_t hidden = 0;
  double eps = 0.0;
  int dtype = -1;
  bool vec8 = false;
};
int rms_norm(const RmsNormArgs& args, ptr_t stream);

// fused_add_rms_norm: residual <- x + residual; x <- rms_norm(residual); both contiguous
// [rows, hidden].
struct FusedAddRmsNormArgs {
  ptr_t x = 0;
  ptr_t residual = 0;
  ptr_t weight = 0;  // [hidden]
  int64_t rows = 0;
  int64_t hidden = 0;
  double eps = 0.0;
  int dtype = -1;
  bool vec8 = false;
};
int fused_add_rms_norm(const FusedAddRmsNormArgs& args, ptr_t stream);

// out [tokens, inter] = silu(x[:, :inter]) * x[:, inter:], x [tokens, 2 * inter] contiguous.
int silu_and_mul(ptr_t out, ptr_t x, int64_t tokens, int64_t inter, int dtype, bool vec8,
                 ptr_t stream);

// rotary_embedding_and_cache: rotate q [T, Hq, D] and k [T, Hkv, D] in place (token strides
// q_stride, k_stride; head stride D) with cos_sin (fp32 [max_position, D]) at positions, then
// write k and v (token stride v_stride) into the paged caches [num_blocks, block_size, Hkv, D]
// at slot_mapping (< 0: skip).
struct RotaryCacheArgs {
  ptr_t positions = 0;  // [T] int32, or int64 with positions_int64
  bool positions_int64 = false;
  ptr_t q = 0;
  int64_t q_stride = 0;
  int64_t num_q_heads = 0;
  ptr_t k = 0;
  int64_t k_stride = 0;
  int64_t num_kv_heads = 0;
  ptr_t v = 0;
  int64_t v_stride = 0;
  ptr_t cos_sin = 0;
  ptr_t key_cache = 0;
  ptr_t value_cache = 0;
  ptr_t slot_mapping = 0;  // [T] int32, or int64 with slots_int64
  bool slots_int64 = false;
  int64_t num_tokens = 0;
  int64_t head_dim = 0;
  int dtype = -1;
  int kv_dtype = -1;  // the caches' element type (see the top of this file)
  double k_scale = 1.0;
  double v_scale = 1.0;
  bool vec8 = false;
};
int rotary_embedding_and_cache(const RotaryCacheArgs& args, ptr_t stream);

// paged_decode_attention: one query per sequence (q row i, token stride q_stride), K/V through
// block_tables [num_seqs, bt_stride] int32 and seq_lens [num_seqs] int32. Each block serves
// heads_per_block (1, 2, 4 or 8: CUDA cores; 16: tensor cores, head_dim 64/128) query heads of
// one kv head. With num_splits > 1 each sequence is cut into at most num_splits even pieces of
// at least min_split_len tokens (1..16384), chosen on the device from its own seq_len, merged
// through `workspace` (fp32, at least num_splits * num_seqs * num_q_heads * (head_dim + 1)
// floats, workspace_floats given). Both kernels read FP8 caches (kv_dtype 2).
struct DecodeAttentionArgs {
  ptr_t out = 0;
  int64_t out_stride = 0;
  ptr_t q = 0;
  int64_t q_stride = 0;
  ptr_t key_cache = 0;
  ptr_t value_cache = 0;
  ptr_t block_tables = 0;
  int64_t bt_stride = 0;
  ptr_t seq_lens = 0;
  int64_t num_seqs = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 0;
  double scale = 0.0;
  int64_t heads_per_block = 0;
  int64_t num_splits = 1;
  int64_t min_split_len = 0;
  ptr_t workspace = 0;
  int64_t workspace_floats = 0;
  int dtype = -1;
  int kv_dtype = -1;
  double k_scale = 1.0;  // FP8 caches only
  double v_scale = 1.0;
};
int paged_decode_attention(const DecodeAttentionArgs& args, ptr_t stream);

// Resident decode-attention blocks per multiprocessor of the current device for this head_dim,
// heads per block, dtype and cache dtype (0 when unsupported): the split planner's wave size.
int paged_decode_blocks_per_sm(int64_t head_dim, int64_t heads_per_block, int dtype, int kv_dtype);

// paged_prefill_attention over query chunks: sequence i owns q rows
// [query_start_loc[i] - query_start_loc[0], query_start_loc[i + 1] - query_start_loc[0]),
// the last rows of its seq_lens[i]-token context, causal. num_tokens: rows of q. variant: 0 picks
// the kernel (wgmma on sm_90 for head_dim 64/128, else mma.sync), 1 forces mma.sync, 2 wgmma.
// Both kernels read FP8 caches.
struct PrefillAttentionArgs {
  ptr_t out = 0;
  int64_t out_stride = 0;
  ptr_t q = 0;
  int64_t q_stride = 0;
  ptr_t key_cache = 0;
  ptr_t value_cache = 0;
  ptr_t block_tables = 0;
  int64_t bt_stride = 0;
  ptr_t query_start_loc = 0;
  ptr_t seq_lens = 0;
  int64_t num_seqs = 0;
  int64_t num_tokens = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 0;
  double scale = 0.0;
  int variant = 0;
  int dtype = -1;
  int kv_dtype = -1;
  double k_scale = 1.0;  // FP8 caches only
  double v_scale = 1.0;
};
int paged_prefill_attention(const PrefillAttentionArgs& args, ptr_t stream);

// GGUF block-quantized weights W [n, k]: raw GGUF blocks of GGML type `ggml_type` (Q4_0 = 2,
// Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14), row i at weight + i * row_bytes, with
// row_bytes = k / block_elems * block_bytes and weight 16-byte aligned.
// gguf_gemv: out [m, n] (row stride ldo) = x [m, k] (row stride ldx, 16-byte aligned rows) @
// W^T for m = 1..8, fp32 accumulation, in dtype.
struct GgufGemvArgs {
  ptr_t out = 0;
  int64_t ldo = 0;
  ptr_t x = 0;
  int64_t ldx = 0;
  ptr_t weight = 0;
  int64_t row_bytes = 0;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int ggml_type = -1;
  int dtype = -1;
};
int gguf_gemv(const GgufGemvArgs& args, ptr_t stream);

// gguf_dequantize: out [n, k] (row stride ldo, a multiple of 8; 16-byte aligned) = W in dtype.
struct GgufDequantizeArgs {
  ptr_t out = 0;
  int64_t ldo = 0;
  ptr_t weight = 0;
  int64_t row_bytes = 0;
  int64_t n = 0;
  int64_t k = 0;
  int ggml_type = -1;
  int dtype = -1;
};
int gguf_dequantize(const GgufDequantizeArgs& args, ptr_t stream);

// dense_gemv: out [m, n] (row stride ldo) = (x [m, k] @ W^T) * scale + bias for m = 1..8, fp32
// accumulation, rounded once to dtype. x: dtype, row stride ldx (a multiple of 8), 16-byte
// aligned. W [n, k], row stride ldw elements (16-byte aligned rows): weight_dtype == dtype, or
// 2 = float8 e4m3 (then k % 16 == 0; else k % 8 == 0). scale: fp32 [n] or 0; bias: dtype [n]
// or 0. For benchmarks: warps per 16-row block, 8 or 16 (0: chosen by n); fp8_widen, how e4m3
// codes become dtype: 0 bit moves, 1 the cvt instructions.
struct DenseGemvArgs {
  ptr_t out = 0;
  int64_t ldo = 0;
  ptr_t x = 0;
  int64_t ldx = 0;
  ptr_t weight = 0;
  int64_t ldw = 0;
  ptr_t scale = 0;
  ptr_t bias = 0;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t warps = 0;
  int64_t fp8_widen = 0;
  int weight_dtype = -1;
  int dtype = -1;
};
int dense_gemv(const DenseGemvArgs& args, ptr_t stream);

// apply_token_bitmask: in place, for each r < num_rows and v < vocab,
// logits[rows[r] * row_stride + v] = -inf unless bit (v % 32) of bitmask[r * words + v / 32] is
// set (v >= 32 * words is never allowed). rows: int64 [num_rows] on the device (rows outside
// [0, num_logit_rows) are skipped); bitmask: int32 [num_rows, words] contiguous. logits_dtype: 0
// fp16, 1 bf16, 2 fp32 (only the bit pattern of -inf is written, so any float layout works).
struct TokenBitmaskArgs {
  ptr_t logits = 0;
  int64_t row_stride = 0;  // elements between logit rows (>= vocab)
  int64_t num_logit_rows = 0;
  int64_t vocab = 0;
  ptr_t rows = 0;
  int64_t num_rows = 0;
  ptr_t bitmask = 0;
  int64_t words = 0;
  int logits_dtype = -1;
};
int apply_token_bitmask(const TokenBitmaskArgs& args, ptr_t stream);

}  // namespace kestrel::api
