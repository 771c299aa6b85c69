// Skinny GEMM for decode (M = 1..8 activation rows) over a dense weight W [N, K]:
//   out[m, n] = (sum_k x[m, k] * W[n, k]) * scale[n] + bias[n]
// x [M, K] and out [M, N] are T = half or bf16 (row strides ldx, ldo); W is either T or
// float8 e4m3 (W8A16: the fp8 codes are widened to T exactly, the activations stay T), row
// stride ldw elements; scale (fp32 [N]) and bias (T [N]) are optional. fp32 accumulation, one
// rounding to T at the end.
//
// Design (memory bound: the weight is read once, everything else is small):
// - Tensor cores do the multiply-adds, mma.sync m16n8k16 with W as the 16-row A operand and
//   x^T as the 8-column B operand (M < 8 leaves columns of zeros). CUDA-core fp32 FMAs cannot
//   keep up at M = 8 with fp8 weights (8 FMAs per weight byte at 4 TB/s is past the fp32 peak),
//   the tensor cores idle along at any M here, and the cost does not depend on M.
// - One block per 16-row tile of W; its kWarps warps split K into contiguous ranges and their
//   fp32 tiles are summed through shared memory (no workspace, no atomics, deterministic).
//   kWarps is 16 when there are few tiles (N < kWideBelowRows), else 8.
// - Lane (g = lane / 4, t = lane % 4) loads 16 bytes of weight rows g and g + 8 and 16 bytes
//   (32 for fp8) of activation row g at the same k, so each load instruction reads 8 rows x
//   64 contiguous bytes. The reduction over k does not care which k sits in which mma slot, so
//   the loaded registers are the A / B fragments as they are (see the fragment layouts in
//   mma.cuh); only A and B must agree, and they do by construction.
// - Weight loads go in batches of kUnroll steps (8 x 16 bytes per lane), software pipelined:
//   batch i + 1 is issued before batch i is consumed, so 8 to 16 loads per lane are in flight;
//   through the non-coherent path without L1 allocation (streamed once). Activations go
//   through __ldg and stay in L1/L2 for all the blocks.
// - fp8 -> T by bit moves: e4m3 s.eeee.mmm becomes T's sign, exponent and top mantissa bits,
//   then one multiply by 2^(bias(T) - 7) fixes the exponent bias; exact for every finite e4m3
//   value, subnormals included (T keeps subnormals; the multiply is exact, a power of two).
//   e4m3fn NaN (0x7f / 0xff) is not preserved (it reads as +-480): weights hold no NaN.
//   (WeightKind::kFp8Cvt does it with the cvt instructions instead, for the benchmark to
//   compare; it batches 2 steps, not kUnroll, to stay in registers.)
#pragma once

#include <cuda_fp8.h>

#include "common.cuh"
#include "mma.cuh"

namespace kestrel::dense_gemv {

constexpr int kWeightFp8 = 2;    // weight dtype code of float8 e4m3 (0, 1: the DTypeCode of T)
constexpr int kMaxRows = 8;      // activation rows (the mma's N)
constexpr int kTileRows = 16;    // weight rows per block (the mma's M)
constexpr int kNarrowWarps = 8;  // warps per block, each a contiguous K range (large N)
constexpr int kWideWarps = 16;   // warps per block below kWideBelowRows rows
// At 112-128 registers an SM holds 16 warps: two 8-warp blocks or one 16-warp block. Below
// 528 tiles (8448 rows: the 7B qkv / o / down shapes, every 0.5B one but gate_up) 16 warps
// per tile halve each warp's K range, so more of the few tiles' loads are in flight at once.
// A guess to be settled by bench_kernels.py --only gemv (which times both).
constexpr int64_t kWideBelowRows = 8448;
constexpr int kUnroll = 4;  // K steps whose weight loads are in flight together

struct Params {
  void* out;           // [M, N] of T, row stride ldo
  const void* x;       // [M, K] of T, row stride ldx; 16-byte aligned rows
  const void* weight;  // [N, K] of W, row stride ldw; 16-byte aligned rows
  const float* scale;  // [N] or nullptr (1)
  const void* bias;    // [N] of T or nullptr (0)
  int64_t ldo;
  int64_t ldx;
  int64_t ldw;
  int64_t n;
  int m;
  int k;  // a multiple of 8 (16 for fp8 weights)
};

// 16 bytes of a weight stream: read once, so not kept in L1.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 2^(exponent bias of T - 7) as a T pair: rescales the moved e4m3 bits (see widen_fp8).
template <typename T>
__device__ __forceinline__ uint32_t fp8_bias_pair() {
  return std::is_same_v<T, half> ? 0x5c005c00u   // 2^8 in fp16, twice
                                 : 0x7b807b80u;  // 2^120 in bf16, twice
}

// Two e4m3 codes in the low (b0) and high (b1) bytes of `pair` -> T pair (b0 in the low half).
// Each code moves to the top byte of its 16-bit half (sign at bit 15); its 7 exponent and
// mantissa bits then shift down so the 3 mantissa bits lead T's mantissa: T's exponent field
// holds the e4m3 exponent, a value 2^(bias(T) - 7) too small, fixed by one exact multiply.
template <typename T>
__device__ __forceinline__ uint32_t widen_fp8(uint32_t word, int pair) {
  constexpr int kMantissa = std::is_same_v<T, half> ? 10 : 7;  // T's mantissa bits
  constexpr int kShift = kMantissa - 3;                        // e4m3 has 3
  constexpr uint32_t kBody = 0x7fu << kShift;                  // exponent + mantissa bits
  // byte 2 * pair -> byte 1, byte 2 * pair + 1 -> byte 3, zeros elsewhere
  const uint32_t hi = __byte_perm(word, 0u, pair == 0 ? 0x1404u : 0x3424u);
  const uint32_t bits = (hi & 0x80008000u) | ((hi >> (8 - kShift)) & (kBody | kBody << 16));
  using P = typename Pair<T>::type;
  const uint32_t bias = fp8_bias_pair<T>();
  const P v = __hmul2(*reinterpret_cast<const P*>(&bits), *reinterpret_cast<const P*>(&bias));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The same through the hardware conversion (cvt e4m3x2 -> f16x2, sm_89+; then f16 -> f32 ->
// bf16 for bf16, all exact): fewer integer ops, more conversion-pipe ones. Which is faster is
// for bench_gemv.py to say (Args.fp8_widen picks; the bit moves are the default).
template <typename T>
__device__ __forceinline__ uint32_t widen_fp8_cvt(uint32_t word, int pair) {
  const auto codes = static_cast<__nv_fp8x2_storage_t>(word >> (16 * pair));
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(codes, __NV_E4M3);
  if constexpr (std::is_same_v<T, half>) {
    return static_cast<uint32_t>(raw.x) | static_cast<uint32_t>(raw.y) << 16;
  } else {
    const __nv_bfloat162 v = __float22bfloat162_rn(__half22float2(__half2(raw)));
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// How the kernel reads the weight: T itself, or e4m3 codes widened by bit moves or by cvt.
enum class WeightKind { k16Bit, kFp8Bits, kFp8Cvt };

// Per lane and K step: rows g and g + 8 of the weight tile and row g of x, as mma fragments.
// kElems: k values per lane and step (8: 16-bit weights; 16: fp8), kMmas = kElems / 4.
template <typename T, bool kFp8>
struct Step {
  static constexpr int kElems = kFp8 ? 16 : 8;
  static constexpr int kMmas = kElems / 4;       // m16n8k16 per step (4 k per lane and mma)
  static constexpr int kWarpElems = 4 * kElems;  // k per warp and step (4 lanes share a row)
  static constexpr int kWeightBytes = kFp8 ? 1 : 2;
};

template <typename T, WeightKind kKind, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) dense_gemv_kernel(const Params p) {
  constexpr bool kFp8 = kKind != WeightKind::k16Bit;
  constexpr int kU = kKind == WeightKind::kFp8Cvt ? 2 : kUnroll;  // cvt: more registers
  using S = Step<T, kFp8>;
  __shared__ float partial[kWarps][kTileRows][kMaxRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  // Rows past the end re-read the last row (never stored).
  const int64_t ra = row0 + g < p.n ? row0 + g : p.n - 1;
  const int64_t rb = row0 + g + 8 < p.n ? row0 + g + 8 : p.n - 1;
  const char* wa = static_cast<const char*>(p.weight) + ra * p.ldw * S::kWeightBytes;
  const char* wb = static_cast<const char*>(p.weight) + rb * p.ldw * S::kWeightBytes;
  const T* xr = static_cast<const T*>(p.x) + (g < p.m ? g : 0) * p.ldx;
  const bool has_x = g < p.m;  // lanes of activation rows past M feed zeros

  // This warp's K steps [s_begin, s_end) of S::kWarpElems each.
  const int steps = (p.k + S::kWarpElems - 1) / S::kWarpElems;
  const int s_begin = static_cast<int>(static_cast<int64_t>(steps) * warp / kWarps);
  const int s_end = static_cast<int>(static_cast<int64_t>(steps) * (warp + 1) / kWarps);
  float c[2][4] = {};  // two accumulators (even / odd steps): shorter mma dependency chains
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  // kU steps of weight chunks, loaded together. A chunk past this warp's range or past K
  // re-reads the row's first chunk (no branches) and its activations are zeroed, so it adds
  // nothing (weights are finite).
  struct Batch {
    uint4 a[kU], b[kU];
    int off[kU];
    bool ok[kU];
  };
  auto issue = [&](int s0, Batch& q) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int e = (s0 + u) * S::kWarpElems + t * S::kElems;  // this lane's first k
      const bool in = s0 + u < s_end && e < p.k;               // k % kElems == 0: whole chunks only
      q.ok[u] = has_x && in;
      q.off[u] = in ? e : 0;
      q.a[u] = load_stream(wa + static_cast<int64_t>(q.off[u]) * S::kWeightBytes);
      q.b[u] = load_stream(wb + static_cast<int64_t>(q.off[u]) * S::kWeightBytes);
    }
  };
  auto consume = [&](const Batch& q) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      uint4 xv[S::kElems / 8];
#pragma unroll
      for (int h = 0; h < S::kElems / 8; ++h) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(xr + q.off[u] + 8 * h));
        xv[h] = q.ok[u] ? v : zero;
      }
      const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);  // S::kElems / 2 words
      const uint32_t* aw = reinterpret_cast<const uint32_t*>(&q.a[u]);
      const uint32_t* bw = reinterpret_cast<const uint32_t*>(&q.b[u]);
#pragma unroll
      for (int j = 0; j < S::kMmas; ++j) {
        if constexpr (kFp8) {  // word j of the 16 codes = k 4j .. 4j + 3
          const auto widen = [](uint32_t word, int pair) {
            return kKind == WeightKind::kFp8Cvt ? widen_fp8_cvt<T>(word, pair)
                                                : widen_fp8<T>(word, pair);
          };
          const uint32_t frag[4] = {widen(aw[j], 0), widen(bw[j], 0), widen(aw[j], 1),
                                    widen(bw[j], 1)};
          mma::mma_16816<T>(c[u & 1], frag, xw[2 * j], xw[2 * j + 1]);
        } else {  // words 2j, 2j + 1 = k 4j .. 4j + 3
          const uint32_t frag[4] = {aw[2 * j], bw[2 * j], aw[2 * j + 1], bw[2 * j + 1]};
          mma::mma_16816<T>(c[u & 1], frag, xw[2 * j], xw[2 * j + 1]);
        }
      }
    }
  };
  // Software pipelined: the next batch is in flight while this one is consumed (the loads
  // cannot sink into their uses: those are in the next iteration).
  Batch cur;
  if (s_begin < s_end) issue(s_begin, cur);
  for (int s0 = s_begin; s0 < s_end; s0 += kU) {
    Batch next;
    if (s0 + kU < s_end) issue(s0 + kU, next);  // warp-uniform
    consume(cur);
    cur = next;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) c[0][i] += c[1][i];
  // c0, c1: (row g, columns 2t, 2t + 1); c2, c3: (row g + 8, same columns).
  partial[warp][g][2 * t] = c[0][0];
  partial[warp][g][2 * t + 1] = c[0][1];
  partial[warp][g + 8][2 * t] = c[0][2];
  partial[warp][g + 8][2 * t + 1] = c[0][3];
  __syncthreads();
  if (threadIdx.x >= kTileRows * kMaxRows) return;
  const int r = threadIdx.x / kMaxRows, m = threadIdx.x % kMaxRows;
  const int64_t row = row0 + r;
  if (m >= p.m || row >= p.n) return;
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += partial[w][r][m];
  if (p.scale != nullptr) sum *= p.scale[row];
  if (p.bias != nullptr) sum += to_float(static_cast<const T*>(p.bias)[row]);
  static_cast<T*>(p.out)[m * p.ldo + row] = from_float<T>(sum);
}

// The caller validated the sizes and alignment (dense_gemv.cu).
// warps: kNarrowWarps, kWideWarps, or 0 to choose by N (kWideBelowRows).
template <typename T, WeightKind kKind>
cudaError_t launch(const Params& p, int warps, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.n, kTileRows);
  if (blocks >= (1LL << 31)) return cudaErrorInvalidValue;
  const auto grid = static_cast<unsigned>(blocks);
  if (warps == 0) warps = p.n < kWideBelowRows ? kWideWarps : kNarrowWarps;
  if (warps == kWideWarps) {
    dense_gemv_kernel<T, kKind, kWideWarps><<<grid, kWideWarps * 32, 0, stream>>>(p);
  } else if (warps == kNarrowWarps) {
    dense_gemv_kernel<T, kKind, kNarrowWarps><<<grid, kNarrowWarps * 32, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace kestrel::dense_gemv
