// RMSNorm and fused residual-add + RMSNorm.
//
// Numerics follow kestrel.ops.norm (the Hugging Face Llama order): mean of squares in fp32,
// normed = round_T(x * rsqrt(mean + eps)), out = round_T(weight * normed).
// fused: residual <- round_T(x + residual); x <- rms_norm(residual).
//
// Layout: a row is `hidden` contiguous elements. rms_norm reads row r of x at
// (r / inner) * stride_outer + (r % inner) * stride_inner (elements), so a [T, H, D] view of a
// larger tensor (per-head q/k norm) needs no copy; out is contiguous [rows, hidden].
// The fused op works in place on contiguous [rows, hidden] x and residual.
#pragma once

#include "common.cuh"

namespace kestrel::norm {

struct RmsNormParams {
  void* out;             // rms_norm: [rows, hidden] contiguous; fused: unused (x is written)
  void* x;               // see the layout note above (fused: contiguous, overwritten)
  void* residual;        // fused only: [rows, hidden] contiguous, overwritten with x + residual
  const void* weight;    // [hidden]
  int64_t rows;          // number of rows
  int64_t inner;         // rows per outer index (1 for a plain 2-D x)
  int64_t stride_outer;  // elements
  int64_t stride_inner;  // elements
  int hidden;
  float eps;
};

// TPR threads cooperate on one row; each holds up to NV vectors of VEC elements in registers.
template <typename T, int VEC, int NV, int TPR, bool FUSED>
__global__ void __launch_bounds__(TPR >= 256 ? TPR : 256) rms_norm_kernel(const RmsNormParams p) {
  constexpr int kBlock = TPR >= 256 ? TPR : 256;
  constexpr int kRowsPerBlock = kBlock / TPR;
  const int sub = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + sub;
  // kRowsPerBlock > 1 only when TPR == 32 (no block barrier), so early exit is safe there;
  // with one row per block the whole block leaves together.
  if (row >= p.rows) return;

  const int64_t in_off =
      FUSED ? row * p.hidden : (row / p.inner) * p.stride_outer + (row % p.inner) * p.stride_inner;
  T* x = static_cast<T*>(p.x) + in_off;
  T* res = FUSED ? static_cast<T*>(p.residual) + row * p.hidden : nullptr;
  const T* w = static_cast<const T*>(p.weight);
  T* out = FUSED ? x : static_cast<T*>(p.out) + row * p.hidden;
  const int nvec = p.hidden / VEC;

  float v[NV][VEC];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int idx = lane + i * TPR;
    if (idx < nvec) {
      load_vec<T, VEC>(x + idx * VEC, v[i]);
      if constexpr (FUSED) {
        float r[VEC];
        load_vec<T, VEC>(res + idx * VEC, r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = round_to<T>(v[i][j] + r[j]);
        store_vec<T, VEC>(res + idx * VEC, v[i]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum_sq += v[i][j] * v[i][j];
    }
  }
  sum_sq = group_sum<32>(sum_sq);
  if constexpr (TPR > 32) {
    __shared__ float warp_sums[TPR / 32];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) warp_sums[warp] = sum_sq;
    __syncthreads();
    sum_sq = 0.f;
#pragma unroll
    for (int i = 0; i < TPR / 32; ++i) sum_sq += warp_sums[i];
  }
  const float inv_rms = rsqrtf(sum_sq / static_cast<float>(p.hidden) + p.eps);

#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int idx = lane + i * TPR;
    if (idx < nvec) {
      float wv[VEC];
      load_vec<T, VEC>(w + idx * VEC, wv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = wv[j] * round_to<T>(v[i][j] * inv_rms);
      store_vec<T, VEC>(out + idx * VEC, v[i]);
    }
  }
}

template <typename T, int VEC, int NV, int TPR, bool FUSED>
cudaError_t launch_rms_norm_cfg(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int kBlock = TPR >= 256 ? TPR : 256;
  constexpr int kRowsPerBlock = kBlock / TPR;
  const int64_t blocks = ceil_div(p.rows, kRowsPerBlock);
  rms_norm_kernel<T, VEC, NV, TPR, FUSED><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

// NV: vectors per thread, a power of two; at most 4 with 1024 threads (64 registers each).
template <typename T, int VEC, int TPR, bool FUSED>
cudaError_t launch_rms_norm_nv(const RmsNormParams& p, int nv, cudaStream_t stream) {
  switch (nv) {
    case 1:
      return launch_rms_norm_cfg<T, VEC, 1, TPR, FUSED>(p, stream);
    case 2:
      return launch_rms_norm_cfg<T, VEC, 2, TPR, FUSED>(p, stream);
    case 4:
      return launch_rms_norm_cfg<T, VEC, 4, TPR, FUSED>(p, stream);
    case 8:
      if constexpr (TPR < 1024) return launch_rms_norm_cfg<T, VEC, 8, TPR, FUSED>(p, stream);
      return cudaErrorInvalidValue;
    default:
      return cudaErrorInvalidValue;
  }
}

inline int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// Longest row the kernels hold in registers: 1024 threads x 4 vectors of VEC elements
// (hidden <= 32768 on the 16-byte path, <= 4096 on the scalar one).
constexpr int64_t kMaxVectorsPerRow = 1024 * 4;

// VEC = 8 needs hidden % 8 == 0 and 16-byte aligned rows (checked by the caller).
template <typename T, int VEC, bool FUSED>
cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const int64_t nvec = p.hidden / VEC;
  if (p.hidden <= 0 || p.hidden % VEC != 0 || nvec > kMaxVectorsPerRow || p.rows >= (1LL << 31)) {
    return cudaErrorInvalidValue;
  }
  if (nvec <= 32 * 4)
    return launch_rms_norm_nv<T, VEC, 32, FUSED>(p, next_pow2(ceil_div(nvec, 32)), stream);
  if (nvec <= 256 * 8)
    return launch_rms_norm_nv<T, VEC, 256, FUSED>(p, next_pow2(ceil_div(nvec, 256)), stream);
  return launch_rms_norm_nv<T, VEC, 1024, FUSED>(p, next_pow2(ceil_div(nvec, 1024)), stream);
}

}  // namespace kestrel::norm
