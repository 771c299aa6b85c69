// Shared device helpers for the Kestrel kernels: dtype traits, 16-byte vector loads/stores with
// fp32 conversion, warp reductions and the dtype dispatch used by every launcher.
//
// Conventions: every launcher takes raw device pointers, sizes and a cudaStream_t and returns a
// cudaError_t (cudaErrorInvalidValue for unsupported sizes; the launch error otherwise).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace kestrel {

// Dtype codes shared with Python (kestrel/ops/_dispatch.py).
// kFloat8E4M3 is a KV-cache (and weight) storage type only, never a compute dtype.
enum DTypeCode : int { kFloat16 = 0, kBFloat16 = 1, kFloat8E4M3 = 2 };

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

// ---- float8 e4m3 (e4m3fn: max 448, no infinities) KV-cache elements ----------------------
// A cache of type KV holds T itself or e4m3 codes of x / scale (saturated to +-448, rounded to
// nearest even); reading it back multiplies by the scale. KV = __nv_fp8_e4m3 selects FP8.
template <typename KV>
inline constexpr bool kIsFp8 = std::is_same_v<KV, __nv_fp8_e4m3>;

// x / scale as an e4m3 code: IEEE division, then round to nearest even with saturation to
// +-448 (infinities too; NaN stays NaN), as torch's clamp(-448, 448).to(float8_e4m3fn).
__device__ __forceinline__ uint8_t fp8_encode(float x, float scale) {
  return static_cast<uint8_t>(
      __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3));
}

// Two e4m3 codes (low byte first) -> fp32 pair, exactly (every e4m3 value is an fp16 value).
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t two_codes) {
  const __half2_raw raw =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_codes & 0xffffu), __NV_E4M3);
  return __half22float2(__half2(raw));
}

// Eight e4m3 codes held in a uint2 (as loaded from memory, first element in the low byte)
// -> fp32.
__device__ __forceinline__ void unpack8_fp8(const uint2& u, float (&f)[8]) {
  const uint32_t w[2] = {u.x, u.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 lo = fp8x2_to_float2(w[i]);
    const float2 hi = fp8x2_to_float2(w[i] >> 16);
    f[4 * i] = lo.x;
    f[4 * i + 1] = lo.y;
    f[4 * i + 2] = hi.x;
    f[4 * i + 3] = hi.y;
  }
}

// Eight e4m3 codes (a uint2) -> eight T values packed in a uint4, exactly.
template <typename T>
__device__ __forceinline__ uint4 fp8x8_to(const uint2& u) {
  float f[8];
  unpack8_fp8(u, f);
  uint4 out;
  auto* h = reinterpret_cast<typename Pair<T>::type*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = from_float2<T>(make_float2(f[2 * i], f[2 * i + 1]));
  return out;
}

// Eight KV-cache elements at p -> fp32 (16 bytes of T, 16-byte aligned; or 8 e4m3 codes,
// 8-byte aligned). Scales are the caller's.
template <typename T, typename KV>
__device__ __forceinline__ void load_kv8(const void* p, float (&f)[8]) {
  if constexpr (kIsFp8<KV>) {
    unpack8_fp8(*reinterpret_cast<const uint2*>(p), f);
  } else {
    unpack8<T>(*reinterpret_cast<const uint4*>(p), f);
  }
}

// Stores VEC fp32 values into a KV cache of type KV: rounded to T; for an FP8 cache then
// divided by `scale` and encoded (the T rounding first, so the cache holds the code of the
// value a T tensor would hold). p is 16-byte (T, VEC 8) or 8-byte (fp8, VEC 8) aligned.
template <typename T, typename KV, int VEC>
__device__ __forceinline__ void store_kv(KV* p, const float (&f)[VEC], float scale) {
  if constexpr (kIsFp8<KV>) {
    uint8_t b[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) b[j] = fp8_encode(round_to<T>(f[j]), scale);
    if constexpr (VEC == 8) {
      uint2 u;
      u.x = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
      u.y = b[4] | (b[5] << 8) | (b[6] << 16) | (static_cast<uint32_t>(b[7]) << 24);
      *reinterpret_cast<uint2*>(p) = u;
    } else {
      auto* bytes = reinterpret_cast<uint8_t*>(p);
#pragma unroll
      for (int j = 0; j < VEC; ++j) bytes[j] = b[j];
    }
  } else {
    store_vec<T, VEC>(p, f);
  }
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

// Calls fn(TypeTag<T>{}, TypeTag<KV>{}) with T named by `dtype` and KV the KV-cache element
// type named by `kv_dtype`: -1 or dtype itself (KV = T), or kFloat8E4M3 (KV = __nv_fp8_e4m3).
template <typename Fn>
cudaError_t dispatch_dtype_kv(int dtype, int kv_dtype, Fn&& fn) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (kv_dtype == -1 || kv_dtype == dtype) return fn(tag, TypeTag<T>{});
    if (kv_dtype == kFloat8E4M3) return fn(tag, TypeTag<__nv_fp8_e4m3>{});
    return cudaErrorInvalidValue;
  });
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kestrel
