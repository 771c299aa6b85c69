// Instantiates paged prefill attention for fp16 / bf16, head dims 64, 128, 256 and caches of the
// query dtype or float8 e4m3 (both kernels).
#include <cmath>

#include "kernels.h"
#include "prefill_attention.cuh"
#include "prefill_attention_sm90.cuh"

namespace kestrel::api {

int paged_prefill_attention(const PrefillAttentionArgs& a, ptr_t stream) {
  if (a.num_seqs < 0 || a.num_seqs > INT32_MAX || a.num_tokens < 0 || a.num_tokens > INT32_MAX ||
      a.num_q_heads <= 0 || a.num_q_heads > 65535 || a.num_kv_heads <= 0 || a.block_size <= 0 ||
      a.block_size > (1 << 20) || a.variant < 0 || a.variant > 2) {
    return cudaErrorInvalidValue;
  }
  const int64_t head_dim = a.head_dim, num_tokens = a.num_tokens;
  const bool fp8 = a.kv_dtype == kFloat8E4M3;
  if (fp8 && !(a.k_scale > 0 && a.v_scale > 0)) return cudaErrorInvalidValue;
  // variant 0: wgmma where it runs (sm_90, head_dim 64/128), else mma.sync; 1: mma.sync; 2: wgmma.
  const bool sm90 = attention::use_sm90_prefill() && (head_dim == 64 || head_dim == 128);
  if (a.variant == 2 && !sm90) return cudaErrorInvalidValue;
  const bool wgmma = a.variant == 2 || (a.variant == 0 && sm90);
  attention::PrefillParams p{};
  p.q = reinterpret_cast<const void*>(a.q);
  p.q_stride = a.q_stride;
  p.out = reinterpret_cast<void*>(a.out);
  p.out_stride = a.out_stride;
  p.key_cache = reinterpret_cast<const void*>(a.key_cache);
  p.value_cache = reinterpret_cast<const void*>(a.value_cache);
  p.block_tables = reinterpret_cast<const int32_t*>(a.block_tables);
  p.bt_stride = a.bt_stride;
  p.query_start_loc = reinterpret_cast<const int32_t*>(a.query_start_loc);
  p.seq_lens = reinterpret_cast<const int32_t*>(a.seq_lens);
  p.num_seqs = static_cast<int>(a.num_seqs);
  p.num_q_heads = static_cast<int>(a.num_q_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.block_size = static_cast<int>(a.block_size);
  p.block_shift = -1;
  for (int shift = 0; shift < 21; ++shift) {
    if ((int64_t{1} << shift) == a.block_size) p.block_shift = shift;
  }
  // An FP8 cache holds K / k_scale and V / v_scale (see decode_attention.cu).
  p.scale_log2 = static_cast<float>(a.scale * (fp8 ? a.k_scale : 1.0) * M_LOG2E);
  p.v_scale = fp8 ? static_cast<float>(a.v_scale) : 1.f;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype_kv(a.dtype, a.kv_dtype, [&](auto tag, auto kv_tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using KV = typename decltype(kv_tag)::type;
    switch (head_dim) {
      case 64:
        return wgmma ? attention::launch_prefill_attention_sm90<T, KV, 64>(p, num_tokens, s)
                     : attention::launch_prefill_attention<T, KV, 64>(p, num_tokens, s);
      case 128:
        return wgmma ? attention::launch_prefill_attention_sm90<T, KV, 128>(p, num_tokens, s)
                     : attention::launch_prefill_attention<T, KV, 128>(p, num_tokens, s);
      case 256:
        return attention::launch_prefill_attention<T, KV, 256>(p, num_tokens, s);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace kestrel::api
