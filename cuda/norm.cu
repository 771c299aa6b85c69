// Instantiates the RMSNorm kernels for fp16 / bf16 and both vector widths.
#include "kernels.h"
#include "norm.cuh"

namespace kestrel::api {

namespace {

template <bool FUSED>
int run_rms_norm(const norm::RmsNormParams& p, int dtype, bool vec8, ptr_t stream) {
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return vec8 ? norm::launch_rms_norm<T, 8, FUSED>(p, s)
                : norm::launch_rms_norm<T, 1, FUSED>(p, s);
  });
}

}  // namespace

int rms_norm(const RmsNormArgs& a, ptr_t stream) {
  if (a.inner <= 0 || a.hidden > INT32_MAX) return cudaErrorInvalidValue;
  norm::RmsNormParams p{};
  p.out = reinterpret_cast<void*>(a.out);
  p.x = reinterpret_cast<void*>(a.x);
  p.weight = reinterpret_cast<const void*>(a.weight);
  p.rows = a.rows;
  p.inner = a.inner;
  p.stride_outer = a.stride_outer;
  p.stride_inner = a.stride_inner;
  p.hidden = static_cast<int>(a.hidden);
  p.eps = static_cast<float>(a.eps);
  return run_rms_norm<false>(p, a.dtype, a.vec8, stream);
}

int fused_add_rms_norm(const FusedAddRmsNormArgs& a, ptr_t stream) {
  if (a.hidden > INT32_MAX) return cudaErrorInvalidValue;
  norm::RmsNormParams p{};
  p.x = reinterpret_cast<void*>(a.x);
  p.residual = reinterpret_cast<void*>(a.residual);
  p.weight = reinterpret_cast<const void*>(a.weight);
  p.rows = a.rows;
  p.inner = 1;
  p.stride_outer = a.hidden;
  p.stride_inner = 0;
  p.hidden = static_cast<int>(a.hidden);
  p.eps = static_cast<float>(a.eps);
  return run_rms_norm<true>(p, a.dtype, a.vec8, stream);
}

}  // namespace kestrel::api
