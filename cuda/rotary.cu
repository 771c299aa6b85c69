// Instantiates the fused rotary + KV-cache write for fp16 / bf16, caches of that dtype or
// float8 e4m3, and both vector widths.
#include "kernels.h"
#include "rotary.cuh"

namespace kestrel::api {

int rotary_embedding_and_cache(const RotaryCacheArgs& a, ptr_t stream) {
  if (a.num_q_heads <= 0 || a.num_kv_heads <= 0 || a.head_dim > 4096 || a.num_q_heads > 4096 ||
      a.num_kv_heads > 4096) {
    return cudaErrorInvalidValue;
  }
  rotary::RotaryParams p{};
  p.positions = reinterpret_cast<const void*>(a.positions);
  p.positions_int64 = a.positions_int64;
  p.q = reinterpret_cast<void*>(a.q);
  p.q_stride = a.q_stride;
  p.num_q_heads = static_cast<int>(a.num_q_heads);
  p.k = reinterpret_cast<void*>(a.k);
  p.k_stride = a.k_stride;
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.v = reinterpret_cast<const void*>(a.v);
  p.v_stride = a.v_stride;
  p.cos_sin = reinterpret_cast<const float*>(a.cos_sin);
  p.key_cache = reinterpret_cast<void*>(a.key_cache);
  p.value_cache = reinterpret_cast<void*>(a.value_cache);
  p.slot_mapping = reinterpret_cast<const void*>(a.slot_mapping);
  p.slots_int64 = a.slots_int64;
  p.num_tokens = a.num_tokens;
  p.head_dim = static_cast<int>(a.head_dim);
  p.k_scale = static_cast<float>(a.k_scale);
  p.v_scale = static_cast<float>(a.v_scale);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype_kv(a.dtype, a.kv_dtype, [&](auto tag, auto kv_tag) {
    using T = typename decltype(tag)::type;
    using KV = typename decltype(kv_tag)::type;
    return a.vec8 ? rotary::launch_rotary_kv<T, KV, 8>(p, s)
                  : rotary::launch_rotary_kv<T, KV, 1>(p, s);
  });
}

}  // namespace kestrel::api
