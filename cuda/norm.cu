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

int rms_norm(ptr_t out, ptr_t x, ptr_t weight, int64_t rows, int64_t inner, int64_t stride_outer,
             int64_t stride_inner, int64_t hidden, double eps, int dtype, bool vec8, ptr_t stream) {
  if (inner <= 0 || hidden > INT32_MAX) return cudaErrorInvalidValue;
  norm::RmsNormParams p{};
  p.out = reinterpret_cast<void*>(out);
  p.x = reinterpret_cast<void*>(x);
  p.weight = reinterpret_cast<const void*>(weight);
  p.rows = rows;
  p.inner = inner;
  p.stride_outer = stride_outer;
  p.stride_inner = stride_inner;
  p.hidden = static_cast<int>(hidden);
  p.eps = static_cast<float>(eps);
  return run_rms_norm<false>(p, dtype, vec8, stream);
}

int fused_add_rms_norm(ptr_t x, ptr_t residual, ptr_t weight, int64_t rows, int64_t hidden,
                       double eps, int dtype, bool vec8, ptr_t stream) {
  if (hidden > INT32_MAX) return cudaErrorInvalidValue;
  norm::RmsNormParams p{};
  p.x = reinterpret_cast<void*>(x);
  p.residual = reinterpret_cast<void*>(residual);
  p.weight = reinterpret_cast<const void*>(weight);
  p.rows = rows;
  p.inner = 1;
  p.stride_outer = hidden;
  p.stride_inner = 0;
  p.hidden = static_cast<int>(hidden);
  p.eps = static_cast<float>(eps);
  return run_rms_norm<true>(p, dtype, vec8, stream);
}

}  // namespace kestrel::api
