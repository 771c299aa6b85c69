// Instantiates the fused rotary + KV-cache write for fp16 / bf16 and both vector widths.
#include "kernels.h"
#include "rotary.cuh"

namespace kestrel::api {

int rotary_embedding_and_cache(ptr_t positions, bool positions_int64, ptr_t q, int64_t q_stride,
                               int64_t num_q_heads, ptr_t k, int64_t k_stride, int64_t num_kv_heads,
                               ptr_t v, int64_t v_stride, ptr_t cos_sin, ptr_t key_cache,
                               ptr_t value_cache, ptr_t slot_mapping, bool slots_int64,
                               int64_t num_tokens, int64_t head_dim, int dtype, bool vec8,
                               ptr_t stream) {
  if (num_q_heads <= 0 || num_kv_heads <= 0 || head_dim > 4096 || num_q_heads > 4096 ||
      num_kv_heads > 4096) {
    return cudaErrorInvalidValue;
  }
  rotary::RotaryParams p{};
  p.positions = reinterpret_cast<const void*>(positions);
  p.positions_int64 = positions_int64;
  p.q = reinterpret_cast<void*>(q);
  p.q_stride = q_stride;
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.k = reinterpret_cast<void*>(k);
  p.k_stride = k_stride;
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.v = reinterpret_cast<const void*>(v);
  p.v_stride = v_stride;
  p.cos_sin = reinterpret_cast<const float*>(cos_sin);
  p.key_cache = reinterpret_cast<void*>(key_cache);
  p.value_cache = reinterpret_cast<void*>(value_cache);
  p.slot_mapping = reinterpret_cast<const void*>(slot_mapping);
  p.slots_int64 = slots_int64;
  p.num_tokens = num_tokens;
  p.head_dim = static_cast<int>(head_dim);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return vec8 ? rotary::launch_rotary_kv<T, 8>(p, s) : rotary::launch_rotary_kv<T, 1>(p, s);
  });
}

}  // namespace kestrel::api
