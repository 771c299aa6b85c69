// Instantiates paged decode attention for fp16 / bf16 and head dims 64, 128, 256.
#include <cmath>

#include "decode_attention.cuh"
#include "decode_attention_tc.cuh"
#include "kernels.h"

namespace kestrel::api {

int paged_decode_attention(ptr_t out, int64_t out_stride, ptr_t q, int64_t q_stride,
                           ptr_t key_cache, ptr_t value_cache, ptr_t block_tables,
                           int64_t bt_stride, ptr_t seq_lens, int64_t num_seqs, int64_t num_q_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, double scale,
                           int64_t heads_per_block, int64_t num_splits, int64_t min_split_len,
                           ptr_t workspace, int64_t workspace_floats, int dtype, ptr_t stream) {
  if (num_q_heads <= 0 || num_q_heads > 65535 || num_kv_heads <= 0 || block_size <= 0 ||
      block_size > (1 << 20) || num_splits < 1 || num_splits > 65535 || min_split_len < 1 ||
      min_split_len > (1 << 14) || num_seqs < 0 || num_seqs > 65535) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = num_splits * num_seqs * num_q_heads;  // partial rows in the workspace
  if (num_splits > 1 && (workspace == 0 || workspace_floats < rows * (head_dim + 1))) {
    return cudaErrorInvalidValue;
  }
  attention::DecodeParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.q_stride = q_stride;
  p.out = reinterpret_cast<void*>(out);
  p.out_stride = out_stride;
  p.key_cache = reinterpret_cast<const void*>(key_cache);
  p.value_cache = reinterpret_cast<const void*>(value_cache);
  p.block_tables = reinterpret_cast<const int32_t*>(block_tables);
  p.bt_stride = bt_stride;
  p.seq_lens = reinterpret_cast<const int32_t*>(seq_lens);
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.block_size = static_cast<int>(block_size);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.heads_per_block = static_cast<int>(heads_per_block);
  p.num_splits = static_cast<int>(num_splits);
  p.min_split_len = static_cast<int>(min_split_len);
  p.partial_out = reinterpret_cast<float*>(workspace);
  p.partial_lse = p.partial_out + rows * head_dim;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool tc = heads_per_block == attention::kTcHeads;  // tensor-core kernel
    switch (head_dim) {
      case 64:
        return tc ? attention::launch_decode_tc<T, 64>(p, s)
                  : attention::launch_decode_attention<T, 64>(p, s);
      case 128:
        return tc ? attention::launch_decode_tc<T, 128>(p, s)
                  : attention::launch_decode_attention<T, 128>(p, s);
      case 256:
        return tc ? cudaErrorInvalidValue : attention::launch_decode_attention<T, 256>(p, s);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace kestrel::api

namespace kestrel::api {

int paged_decode_blocks_per_sm(int64_t head_dim, int64_t heads_per_block, int dtype) {
  const int g = static_cast<int>(heads_per_block);
  int blocks = 0;
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (head_dim) {
      case 64:
        blocks = g == attention::kTcHeads ? attention::decode_tc_blocks_per_sm<T, 64>()
                                          : attention::decode_blocks_per_sm<T, 64>(g);
        return cudaSuccess;
      case 128:
        blocks = g == attention::kTcHeads ? attention::decode_tc_blocks_per_sm<T, 128>()
                                          : attention::decode_blocks_per_sm<T, 128>(g);
        return cudaSuccess;
      case 256:
        blocks = attention::decode_blocks_per_sm<T, 256>(g);
        return cudaSuccess;
      default:
        return cudaErrorInvalidValue;
    }
  });
  return err == cudaSuccess ? blocks : 0;
}

}  // namespace kestrel::api
