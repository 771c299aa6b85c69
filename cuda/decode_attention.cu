// Instantiates paged decode attention for fp16 / bf16, head dims 64, 128, 256 and caches of the
// query dtype or float8 e4m3 (both kernels: CUDA cores, and tensor cores for 64 / 128).
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
  const bool fp8 = a.kv_dtype == kFloat8E4M3;
  if (fp8 && !(a.k_scale > 0 && a.v_scale > 0)) return cudaErrorInvalidValue;
  // An FP8 cache holds K / k_scale and V / v_scale: k_scale joins the softmax scale, v_scale
  // multiplies the output.
  p.scale_log2 = static_cast<float>(a.scale * (fp8 ? a.k_scale : 1.0) * M_LOG2E);
  p.v_scale = fp8 ? static_cast<float>(a.v_scale) : 1.f;
  p.heads_per_block = static_cast<int>(a.heads_per_block);
  p.num_splits = static_cast<int>(a.num_splits);
  p.min_split_len = static_cast<int>(a.min_split_len);
  p.partial_out = reinterpret_cast<float*>(a.workspace);
  p.partial_lse = p.partial_out + rows * a.head_dim;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype_kv(a.dtype, a.kv_dtype, [&](auto tag, auto kv_tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using KV = typename decltype(kv_tag)::type;
    const bool tc = a.heads_per_block == attention::kTcHeads;  // tensor-core kernel
    switch (a.head_dim) {
      case 64:
        return tc ? attention::launch_decode_tc<T, KV, 64>(p, s)
                  : attention::launch_decode_attention<T, KV, 64>(p, s);
      case 128:
        return tc ? attention::launch_decode_tc<T, KV, 128>(p, s)
                  : attention::launch_decode_attention<T, KV, 128>(p, s);
      case 256:
        return tc ? cudaErrorInvalidValue : attention::launch_decode_attention<T, KV, 256>(p, s);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace kestrel::api

namespace kestrel::api {

int paged_decode_blocks_per_sm(int64_t head_dim, int64_t heads_per_block, int dtype, int kv_dtype) {
  const int g = static_cast<int>(heads_per_block);
  int blocks = 0;
  const cudaError_t err = dispatch_dtype_kv(dtype, kv_dtype, [&](auto tag, auto kv_tag) {
    using T = typename decltype(tag)::type;
    using KV = typename decltype(kv_tag)::type;
    const bool tc = g == attention::kTcHeads;
    switch (head_dim) {
      case 64:
        blocks = tc ? attention::decode_tc_blocks_per_sm<T, KV, 64>()
                    : attention::decode_blocks_per_sm<T, KV, 64>(g);
        return cudaSuccess;
      case 128:
        blocks = tc ? attention::decode_tc_blocks_per_sm<T, KV, 128>()
                    : attention::decode_blocks_per_sm<T, KV, 128>(g);
        return cudaSuccess;
      case 256:
        blocks = attention::decode_blocks_per_sm<T, KV, 256>(g);
        return cudaSuccess;
      default:
        return cudaErrorInvalidValue;
    }
  });
  return err == cudaSuccess ? blocks : 0;
}

}  // namespace kestrel::api
