// Kernels over GGUF block-quantized weights W [N, K] (raw blocks, row n at weight + n *
// row_bytes; see gguf_blocks.cuh):
//   gguf_gemv:       out[m, n] = sum_k x[m, k] * W[n, k] for M = 1..8 activation rows (decode),
//                    weights dequantized in registers, fp32 accumulation, rounded once to T.
//   gguf_dequantize: out[n, k] = W[n, k] rounded to T (prefill: then a cuBLAS matmul).
// x [M, K] (row stride ldx), out [M, N] (row stride ldo) and the dequantized [N, K] (row
// stride ldo) are T = half or bf16.
//
// GEMV layout: one warp per kGemvRowsPerWarp output rows; lane l handles elements
// [256 s + 8 l, +8) of step s, so per step a warp reads 256 consecutive weights (whole blocks)
// of each of its rows and 512 contiguous activation bytes per activation row, with 16-byte
// activation loads through the read-only cache (the activations are shared by every warp and
// stay in L1/L2); the activations are converted once for all the warp's rows. Per 8-element
// group the sum is factored: sum w x = scale * sum q x - offset * sum x.
#pragma once

#include "common.cuh"
#include "gguf_blocks.cuh"

namespace kestrel::gguf {

constexpr int kMaxGemvRows = 8;  // activation rows of the fused GEMV (larger M: dequantize)
constexpr int kGemvWarps = 4;    // warps per GEMV block
constexpr int kGemvRowsPerWarp = 2;

struct GemvParams {
  void* out;              // [M, N] of T, row stride ldo
  const void* x;          // [M, K] of T, row stride ldx, 16-byte aligned rows
  const uint8_t* weight;  // [N, row_bytes]
  int64_t ldo;
  int64_t ldx;
  int64_t row_bytes;
  int64_t n;
  int k;
};

struct DequantParams {
  void* out;  // [N, K] of T, row stride ldo (ldo % 8 == 0, 16-byte aligned)
  const uint8_t* weight;
  int64_t ldo;
  int64_t row_bytes;
  int64_t n;
  int64_t k;
};

// 8 consecutive T at p (16-byte aligned) through the read-only cache, as fp32.
template <typename T>
__device__ __forceinline__ void ldg8(const T* p, float (&f)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  unpack8<T>(u, f);
}

template <typename T, typename B, int M>
__global__ void __launch_bounds__(kGemvWarps * 32) gguf_gemv_kernel(const GemvParams p) {
  constexpr int R = kGemvRowsPerWarp;
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)) * R;
  if (row0 >= p.n) return;  // no block barriers below
  const uint8_t* w[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {  // rows past the end re-read the last row; never stored
    w[r] = p.weight + (row0 + r < p.n ? row0 + r : p.n - 1) * p.row_bytes;
  }
  const T* __restrict__ x = static_cast<const T*>(p.x);
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  }
  // Two steps in flight while the registers allow it (more rows: one, or it spills).
#pragma unroll(M <= 4 ? 2 : 1)
  for (int e = lane * 8; e < p.k; e += 256) {
    const int64_t block_offset = static_cast<int64_t>(e / B::kBlockElems) * B::kBlockBytes;
    const int g = (e % B::kBlockElems) >> 3;
    float q[R][8], scale[R], offset[R];
#pragma unroll
    for (int r = 0; r < R; ++r) B::decode8(w[r] + block_offset, g, q[r], scale[r], offset[r]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xv[8];
      ldg8<T>(x + m * p.ldx + e, xv);
      float xsum = 0.f;
      if constexpr (B::kHasOffset) {
#pragma unroll
        for (int i = 0; i < 8; ++i) xsum += xv[i];
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(q[r][i], xv[i], dot);
        acc[r][m] = fmaf(scale[r], dot, acc[r][m]);
        if constexpr (B::kHasOffset) acc[r][m] = fmaf(-offset[r], xsum, acc[r][m]);
      }
    }
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float sum = group_sum<32>(acc[r][m]);
      if (lane == 0 && row0 + r < p.n) out[m * p.ldo + row0 + r] = from_float<T>(sum);
    }
  }
}

// One thread per 8-element group of W; the grid is flat over N * K / 8 groups.
template <typename T, typename B>
__global__ void __launch_bounds__(256) gguf_dequant_kernel(const DequantParams p) {
  const int64_t groups_per_row = p.k / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.n * groups_per_row) return;
  const int64_t row = idx / groups_per_row;
  const int64_t e = (idx - row * groups_per_row) * 8;
  float wv[8];
  dequant8<B>(p.weight + row * p.row_bytes + (e / B::kBlockElems) * B::kBlockBytes,
              static_cast<int>((e % B::kBlockElems) >> 3), wv);
  store_vec<T, 8>(static_cast<T*>(p.out) + row * p.ldo + e, wv);
}

template <typename T, typename B, int M>
cudaError_t launch_gemv_rows(const GemvParams& p, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.n, kGemvWarps * kGemvRowsPerWarp);
  if (blocks >= (1LL << 31)) return cudaErrorInvalidValue;
  gguf_gemv_kernel<T, B, M><<<static_cast<unsigned>(blocks), kGemvWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// M (1..kMaxGemvRows) picks the instantiation; the caller validated the sizes.
template <typename T, typename B>
cudaError_t launch_gemv(const GemvParams& p, int m, cudaStream_t stream) {
  switch (m) {
    case 1:
      return launch_gemv_rows<T, B, 1>(p, stream);
    case 2:
      return launch_gemv_rows<T, B, 2>(p, stream);
    case 3:
      return launch_gemv_rows<T, B, 3>(p, stream);
    case 4:
      return launch_gemv_rows<T, B, 4>(p, stream);
    case 5:
      return launch_gemv_rows<T, B, 5>(p, stream);
    case 6:
      return launch_gemv_rows<T, B, 6>(p, stream);
    case 7:
      return launch_gemv_rows<T, B, 7>(p, stream);
    case 8:
      return launch_gemv_rows<T, B, 8>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T, typename B>
cudaError_t launch_dequantize(const DequantParams& p, cudaStream_t stream) {
  constexpr int kBlock = 256;
  const int64_t blocks = ceil_div(p.n * (p.k / 8), kBlock);
  if (blocks >= (1LL << 31)) return cudaErrorInvalidValue;
  gguf_dequant_kernel<T, B><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kestrel::gguf
