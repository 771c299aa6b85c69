// Host launcher of the dense skinny GEMM (dense_gemv.cuh): argument checks, then the dispatch
// over the activation dtype and the weight format (T or fp8 e4m3).
#include "dense_gemv.cuh"
#include "kernels.h"

namespace kestrel::api {

int dense_gemv(const DenseGemvArgs& a, ptr_t stream) {
  using dense_gemv::kWeightFp8;
  const bool fp8 = a.weight_dtype == kWeightFp8;
  if (!fp8 && a.weight_dtype != a.dtype) return cudaErrorInvalidValue;
  const int64_t k_multiple = fp8 ? 16 : 8;  // whole 16-byte weight chunks per lane
  const int64_t weight_bytes = fp8 ? 1 : 2;
  if (a.m < 1 || a.m > dense_gemv::kMaxRows || a.n < 0) return cudaErrorInvalidValue;
  if (a.k <= 0 || a.k % k_multiple != 0 || a.k > INT32_MAX / 2) return cudaErrorInvalidValue;
  if (a.out == 0 || a.x == 0 || a.weight == 0) return cudaErrorInvalidValue;
  // 16-byte aligned rows of x and W; rows of out and x that do not overlap their neighbours.
  if (a.x % 16 != 0 || a.ldx % 8 != 0 || a.weight % 16 != 0) return cudaErrorInvalidValue;
  if (a.ldw < a.k || (a.ldw * weight_bytes) % 16 != 0) return cudaErrorInvalidValue;
  if (a.ldx < 0 || a.ldo < 0 || (a.m > 1 && (a.ldx < a.k || a.ldo < a.n))) {
    return cudaErrorInvalidValue;
  }
  if (a.warps != 0 && a.warps != dense_gemv::kNarrowWarps && a.warps != dense_gemv::kWideWarps) {
    return cudaErrorInvalidValue;
  }
  if (a.fp8_widen != 0 && a.fp8_widen != 1) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  dense_gemv::Params p{};
  p.out = reinterpret_cast<void*>(a.out);
  p.x = reinterpret_cast<const void*>(a.x);
  p.weight = reinterpret_cast<const void*>(a.weight);
  p.scale = reinterpret_cast<const float*>(a.scale);
  p.bias = reinterpret_cast<const void*>(a.bias);
  p.ldo = a.ldo;
  p.ldx = a.ldx;
  p.ldw = a.ldw;
  p.n = a.n;
  p.m = static_cast<int>(a.m);
  p.k = static_cast<int>(a.k);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto dtag) {
    using T = typename decltype(dtag)::type;
    using dense_gemv::WeightKind;
    const int w = static_cast<int>(a.warps);
    if (!fp8) return dense_gemv::launch<T, WeightKind::k16Bit>(p, w, s);
    return a.fp8_widen == 1 ? dense_gemv::launch<T, WeightKind::kFp8Cvt>(p, w, s)
                            : dense_gemv::launch<T, WeightKind::kFp8Bits>(p, w, s);
  });
}

}  // namespace kestrel::api
