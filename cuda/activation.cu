// Instantiates silu_and_mul for fp16 / bf16 and both vector widths.
#include "activation.cuh"
#include "kernels.h"

namespace kestrel::api {

int silu_and_mul(ptr_t out, ptr_t x, int64_t tokens, int64_t inter, int dtype, bool vec8,
                 ptr_t stream) {
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* o = reinterpret_cast<T*>(out);
    const T* in = reinterpret_cast<const T*>(x);
    return vec8 ? activation::launch_silu_and_mul<T, 8>(o, in, tokens, inter, s)
                : activation::launch_silu_and_mul<T, 1>(o, in, tokens, inter, s);
  });
}

}  // namespace kestrel::api
