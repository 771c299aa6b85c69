// Instantiates paged decode attention for fp16 / bf16 and head dims 64, 128, 256.
#include <cmath>

#include "decode_attention.cuh"
#include "decode_attention_tc.cuh"
#include "kernels.h"

namespace kestrel::api {

int paged_decode_attention(const DecodeAttentionArgs& a, ptr_t stream) {
  if (a.num_q_heads <= 0 || a.num_q_heads > 65535 || a.num_kv_heads <= 0 || a.block_size <= 0 ||
      a.block_size > (1 << 20) || a.num_splits < 1 || a.num_splits > 65535 || a.min_split_len < 1 ||
      a.min_split_len > (1 << 14) || a.num_seqs < 0 || a.num_seqs > 65535) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = a.num_splits * a.num_seqs * a.num_q_heads;  // partial rows (workspace)
  if (a.num_splits > 1 && (a.workspace == 0 || a.workspace_floats < rows * (a.head_dim + 1))) {
    return cudaErrorInvalidValue;
  }
  attention::DecodeParams p{};
  p.q = reinterpret_cast<const void*>(a.q);
  p.q_stride = a.q_stride;
  p.out = reinterpret_cast<void*>(a.out);
  p.out_stride = a.out_stride;
  p.key_cache = reinterpret_cast<const void*>(a.key_cache);
  p.value_cache = reinterpret_cast<const void*>(a.value_cache);
  p.block_tables = reinterpret_cast<const int32_t*>(a.block_tables);
  p.bt_stride = a.bt_stride;
  p.seq_lens = reinterpret_cast<const int32_t*>(a.seq_lens);
  p.num_seqs = static_cast<int>(a.num_seqs);
  p.num_q_heads = static_cast<int>(a.num_q_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.block_size = static_cast<int>(a.block_size);
  p.scale_log2 = static_cast<float>(a.scale * M_LOG2E);
  p.heads_per_block = static_cast<int>(a.heads_per_block);
  p.num_splits = static_cast<int>(a.num_splits);
  p.min_split_len = static_cast<int>(a.min_split_len);
  p.partial_out = reinterpret_cast<float*>(a.workspace);
  p.partial_lse = p.partial_out + rows * a.head_dim;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool tc = a.heads_per_block == attention::kTcHeads;  // tensor-core kernel
    switch (a.head_dim) {
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
