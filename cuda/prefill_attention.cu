// Instantiates paged prefill attention for fp16 / bf16 and head dims 64, 128, 256.
#include <cmath>

#include "kernels.h"
#include "prefill_attention.cuh"
#include "prefill_attention_sm90.cuh"

namespace kestrel::api {

int paged_prefill_attention(ptr_t out, int64_t out_stride, ptr_t q, int64_t q_stride,
                            ptr_t key_cache, ptr_t value_cache, ptr_t block_tables,
                            int64_t bt_stride, ptr_t query_start_loc, ptr_t seq_lens,
                            int64_t num_seqs, int64_t num_tokens, int64_t num_q_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                            double scale, int variant, int dtype, ptr_t stream) {
  if (num_seqs < 0 || num_seqs > INT32_MAX || num_tokens < 0 || num_tokens > INT32_MAX ||
      num_q_heads <= 0 || num_q_heads > 65535 || num_kv_heads <= 0 || block_size <= 0 ||
      block_size > (1 << 20) || variant < 0 || variant > 2) {
    return cudaErrorInvalidValue;
  }
  // variant 0: wgmma where it runs (sm_90, head_dim 64/128), else mma.sync; 1: mma.sync; 2: wgmma.
  const bool sm90 = attention::use_sm90_prefill() && (head_dim == 64 || head_dim == 128);
  if (variant == 2 && !sm90) return cudaErrorInvalidValue;
  const bool wgmma = variant == 2 || (variant == 0 && sm90);
  attention::PrefillParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.q_stride = q_stride;
  p.out = reinterpret_cast<void*>(out);
  p.out_stride = out_stride;
  p.key_cache = reinterpret_cast<const void*>(key_cache);
  p.value_cache = reinterpret_cast<const void*>(value_cache);
  p.block_tables = reinterpret_cast<const int32_t*>(block_tables);
  p.bt_stride = bt_stride;
  p.query_start_loc = reinterpret_cast<const int32_t*>(query_start_loc);
  p.seq_lens = reinterpret_cast<const int32_t*>(seq_lens);
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.block_size = static_cast<int>(block_size);
  p.block_shift = -1;
  for (int shift = 0; shift < 21; ++shift) {
    if ((int64_t{1} << shift) == block_size) p.block_shift = shift;
  }
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (head_dim) {
      case 64:
        return wgmma ? attention::launch_prefill_attention_sm90<T, 64>(p, num_tokens, s)
                     : attention::launch_prefill_attention<T, 64>(p, num_tokens, s);
      case 128:
        return wgmma ? attention::launch_prefill_attention_sm90<T, 128>(p, num_tokens, s)
                     : attention::launch_prefill_attention<T, 128>(p, num_tokens, s);
      case 256:
        return attention::launch_prefill_attention<T, 256>(p, num_tokens, s);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace kestrel::api
