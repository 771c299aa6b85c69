// Rotary position embedding (rotate-half / NeoX style) of q and k, fused with writing the rotated
// k and v into the paged KV cache.
//
// For a head vector x = (x1, x2) (halves of head_dim) and the row cos_sin[pos] = (c, s):
// x <- (x1 * c - x2 * s, x2 * c + x1 * s), in fp32, rounded to T (as kestrel.ops.rotary).
// q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]: head stride D, token strides given (views into a
// fused qkv projection need no copy). Caches [num_blocks, block_size, Hkv, D] contiguous, of
// element type KV: T, or float8 e4m3 codes of k / k_scale and v / v_scale (store_kv in
// common.cuh: the value rounded to T first, then saturated to +-448); slot s < 0 skips the
// cache write of that token (q and k are still rotated).
#pragma once

#include "common.cuh"

namespace kestrel::rotary {

struct RotaryParams {
  const void* positions;  // [num_tokens] int32 or int64, each in [0, max_position)
  bool positions_int64;
  void* q;
  int64_t q_stride;
  int num_q_heads;
  void* k;
  int64_t k_stride;
  int num_kv_heads;
  const void* v;
  int64_t v_stride;
  const float* cos_sin;  // [max_position, D]: cos in [0, D/2), sin in [D/2, D)
  void* key_cache;
  void* value_cache;
  const void* slot_mapping;  // [num_tokens] int32 or int64
  bool slots_int64;
  int64_t num_tokens;
  int head_dim;
  float k_scale;  // FP8 caches only: stored = k / k_scale (> 0)
  float v_scale;
};

__device__ __forceinline__ int64_t read_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// One block per token; threads stride over (head, VEC-chunk of the first half) pairs.
template <typename T, typename KV, int VEC>
__global__ void __launch_bounds__(256) rotary_kv_kernel(const RotaryParams p) {
  const int64_t t = blockIdx.x;
  const int64_t pos = read_index(p.positions, p.positions_int64, t);
  const int64_t slot = read_index(p.slot_mapping, p.slots_int64, t);
  const int D = p.head_dim;
  const int half_dim = D / 2;
  const int chunks = half_dim / VEC;
  const float* cs = p.cos_sin + pos * D;
  const int heads = p.num_q_heads + p.num_kv_heads;
  const int64_t cache_row = slot * p.num_kv_heads * D;  // first element of this token's row

  for (int w = threadIdx.x; w < heads * chunks; w += blockDim.x) {
    const int h = w / chunks;
    const int c = (w - h * chunks) * VEC;
    const bool is_k = h >= p.num_q_heads;
    const int kh = h - p.num_q_heads;
    T* base = is_k ? static_cast<T*>(p.k) + t * p.k_stride + kh * D
                   : static_cast<T*>(p.q) + t * p.q_stride + h * D;
    float x1[VEC], x2[VEC], cos_v[VEC], sin_v[VEC];
    load_vec<T, VEC>(base + c, x1);
    load_vec<T, VEC>(base + half_dim + c, x2);
    if constexpr (VEC == 8) {  // the row is 16-byte aligned: D % 16 == 0, fp32
      const float4* cp = reinterpret_cast<const float4*>(cs + c);
      const float4* sp = reinterpret_cast<const float4*>(cs + half_dim + c);
      const float4 c0 = cp[0], c1 = cp[1], s0 = sp[0], s1 = sp[1];
      const float cv[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
      const float sv[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        cos_v[j] = cv[j];
        sin_v[j] = sv[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        cos_v[j] = cs[c + j];
        sin_v[j] = cs[half_dim + c + j];
      }
    }
    float y1[VEC], y2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y1[j] = x1[j] * cos_v[j] - x2[j] * sin_v[j];
      y2[j] = x2[j] * cos_v[j] + x1[j] * sin_v[j];
    }
    store_vec<T, VEC>(base + c, y1);
    store_vec<T, VEC>(base + half_dim + c, y2);
    if (is_k && slot >= 0) {
      KV* dst = static_cast<KV*>(p.key_cache) + cache_row + kh * D;
      store_kv<T, KV, VEC>(dst + c, y1, p.k_scale);
      store_kv<T, KV, VEC>(dst + half_dim + c, y2, p.k_scale);
    }
  }
  if (slot < 0) return;
  const int v_chunks = D / VEC;
  for (int w = threadIdx.x; w < p.num_kv_heads * v_chunks; w += blockDim.x) {
    const int h = w / v_chunks;
    const int c = (w - h * v_chunks) * VEC;
    const T* src = static_cast<const T*>(p.v) + t * p.v_stride + h * D + c;
    KV* dst = static_cast<KV*>(p.value_cache) + cache_row + h * D + c;
    if constexpr (kIsFp8<KV>) {
      float vf[VEC];
      load_vec<T, VEC>(src, vf);
      store_kv<T, KV, VEC>(dst, vf, p.v_scale);
    } else if constexpr (VEC == 8) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst[j] = src[j];
    }
  }
}

// VEC = 8 needs D % 16 == 0 and 16-byte aligned rows and strides (checked by the caller); an
// FP8 cache's rows are then 8-byte aligned.
template <typename T, typename KV, int VEC>
cudaError_t launch_rotary_kv(const RotaryParams& p, cudaStream_t stream) {
  if (p.head_dim <= 0 || p.head_dim % (2 * VEC) != 0 || p.num_tokens >= (1LL << 31)) {
    return cudaErrorInvalidValue;
  }
  if (kIsFp8<KV> && !(p.k_scale > 0.f && p.v_scale > 0.f)) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  const int items = (p.num_q_heads + p.num_kv_heads) * (p.head_dim / 2 / VEC);
  const int block = items >= 256 ? 256 : ((items + 31) / 32) * 32;
  rotary_kv_kernel<T, KV, VEC><<<static_cast<unsigned>(p.num_tokens), block, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kestrel::rotary
