// Grammar bitmask (structured outputs): set the logits of disallowed tokens to -inf, in place.
//
// One thread per (constrained row, token): a warp reads one 32-bit word of the row's bitmask
// (one broadcast load) and writes only the disallowed tokens' logits (consecutive, so the
// stores of a warp coalesce). Only the bit pattern of -inf is stored, so the kernel is
// templated on the storage width alone (fp32: 32 bits; fp16 and bf16: 16 bits).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kestrel::bitmask {

struct Params {
  void* logits;  // [num_logit_rows, row_stride]
  int64_t row_stride;
  int64_t num_logit_rows;
  int64_t vocab;
  const int64_t* rows;     // [num_rows]: the logit row of bitmask row r
  const int32_t* bitmask;  // [num_rows, words]
  int64_t words;
};

template <typename Bits, Bits kNegInf>
__global__ void apply_token_bitmask_kernel(Params p) {
  const int64_t r = blockIdx.y;
  const int64_t row = p.rows[r];
  if (row < 0 || row >= p.num_logit_rows) return;  // never write outside the logits
  Bits* out = static_cast<Bits*>(p.logits) + row * p.row_stride;
  const int32_t* mask = p.bitmask + r * p.words;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < p.vocab;
       v += step) {
    const int64_t w = v >> 5;
    const bool allowed =
        w < p.words && ((static_cast<uint32_t>(__ldg(mask + w)) >> (v & 31)) & 1u) != 0;
    if (!allowed) out[v] = kNegInf;
  }
}

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksPerRow = 1024;  // a grid-stride loop covers longer rows
constexpr int64_t kMaxRows = 65535;         // gridDim.y

template <typename Bits, Bits kNegInf>
cudaError_t launch(const Params& p, cudaStream_t stream, int64_t num_rows) {
  int64_t blocks = (p.vocab + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocksPerRow) blocks = kMaxBlocksPerRow;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(num_rows));
  apply_token_bitmask_kernel<Bits, kNegInf><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kestrel::bitmask
