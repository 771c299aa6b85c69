// SwiGLU gate: out[t, i] = silu(x[t, i]) * x[t, inter + i], math in fp32, rounded once.
// x [tokens, 2 * inter] and out [tokens, inter] are contiguous.
#pragma once

#include "common.cuh"

namespace kestrel::activation {

// One thread per VEC-element vector of the output; the grid is flat over tokens * inter / VEC.
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
    silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t num_vectors,
                        int64_t vectors_per_row, int64_t inter) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_vectors) return;
  const int64_t t = idx / vectors_per_row;
  const int64_t i = (idx - t * vectors_per_row) * VEC;
  const T* gate_ptr = x + t * 2 * inter + i;
  float gate[VEC], up[VEC];
  load_vec<T, VEC>(gate_ptr, gate);
  load_vec<T, VEC>(gate_ptr + inter, up);
#pragma unroll
  for (int j = 0; j < VEC; ++j) gate[j] = gate[j] / (1.f + __expf(-gate[j])) * up[j];
  store_vec<T, VEC>(out + t * inter + i, gate);
}

// VEC = 8 needs inter % 8 == 0 and 16-byte aligned x and out (checked by the caller).
template <typename T, int VEC>
cudaError_t launch_silu_and_mul(T* out, const T* x, int64_t tokens, int64_t inter,
                                cudaStream_t stream) {
  if (tokens < 0 || inter <= 0 || inter % VEC != 0) return cudaErrorInvalidValue;
  const int64_t vectors_per_row = inter / VEC;
  const int64_t num_vectors = tokens * vectors_per_row;
  if (num_vectors == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  const int64_t blocks = ceil_div(num_vectors, kBlock);
  if (blocks >= (1LL << 31)) return cudaErrorInvalidValue;
  silu_and_mul_kernel<T, VEC><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
      out, x, num_vectors, vectors_per_row, inter);
  return cudaGetLastError();
}

}  // namespace kestrel::activation
