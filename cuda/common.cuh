// Shared device helpers for the Kestrel kernels: dtype traits, 16-byte vector loads/stores with
// fp32 conversion, warp reductions and the dtype dispatch used by every launcher.
//
// Conventions: every launcher takes raw device pointers, sizes and a cudaStream_t and returns a
// cudaError_t (cudaErrorInvalidValue for unsupported sizes; the launch error otherwise).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace kestrel {

// Dtype codes shared with Python (kestrel/ops/_dispatch.py).
enum DTypeCode : int { kFloat16 = 0, kBFloat16 = 1 };

template <typename T>
struct Pair;  // the 2-wide vector type of T
template <>
struct Pair<half> {
  using type = half2;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

__device__ __forceinline__ float2 to_float2(half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }

template <typename T>
__device__ __forceinline__ typename Pair<T>::type from_float2(float2 v);
template <>
__device__ __forceinline__ half2 from_float2<half>(float2 v) {
  return __float22half2_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat162 from_float2<__nv_bfloat16>(float2 v) {
  return __float22bfloat162_rn(v);
}

__device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ half from_float<half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round an fp32 value to T and back (the value a T tensor would hold).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Load VEC consecutive T at p (16-byte aligned when VEC == 8) into fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  if constexpr (VEC == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const auto* h = reinterpret_cast<const typename Pair<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = to_float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = to_float(p[i]);
  }
}

// Convert 8 values held in a uint4 (as loaded from memory) to fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const auto* h = reinterpret_cast<const typename Pair<T>::type*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = to_float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// Round VEC fp32 values to T and store them at p (16-byte aligned when VEC == 8).
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  if constexpr (VEC == 8) {
    uint4 u;
    auto* h = reinterpret_cast<typename Pair<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = from_float2<T>(make_float2(f[2 * i], f[2 * i + 1]));
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_float<T>(f[i]);
  }
}

// Sum over the WIDTH lanes of each aligned lane group (WIDTH a power of two <= 32).
template <int WIDTH = 32>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// 2^x with the hardware approximation (about 2 ulp; 2^-inf == 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the element type named by a DTypeCode.
template <typename Fn>
cudaError_t dispatch_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat16:
      return fn(TypeTag<half>{});
    case kBFloat16:
      return fn(TypeTag<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kestrel
