// GGUF GEMV v2 / v3 (KESTREL_GGUF_GEMV=v2, the default, or v3): out [M, N] = x [M, K] @ W^T
// for M = 1..8 on the tensor cores, one mma.sync.m16n8k16 tile = 16 weight rows x 16 k x the 8
// activation rows (M < 8 leaves columns of the tile zero).
//
// Exactness: the A operand holds the raw quants as exact small integers in T (q plus a magic
// bias: the exponent trick on 16-bit floats, one LOP3 per two weights), B holds x as given, so
// every product is exact and accumulates in fp32. The scales stay outside the mma: per scale
// group ("unit" of 32 or 16 elements) and row, sum_k w x = f * S - h * X with S = sum (bias + q)
// x from one mma, X = sum x from an mma with an all-ones A, f the group scale and h = f * bias +
// offset (the K-quant min). Nothing is rounded to T except x itself, as in the reference.
//
// Work split: a CTA of W warps (1..8, chosen by the launcher) owns 16 weight rows; warp w takes
// chunks of kU consecutive blocks (Mma<B>::kU or half of it: launch_gemv_mma), chunks w, w + W,
// ..., all its loads for a chunk issued before any use; the warps' partial sums meet in shared
// memory. Lane (g = lane / 4, t = lane % 4) loads rows g and g + 8 of the tile, the bytes of
// each scale group that the mma fragment layout (mma.cuh) gives to t, and activation row g
// (lanes with g >= M load none).
//
// Per-format decoding: gguf_mma_blocks.cuh. v3 differs from v2 only for Q6_K, Q4_0 and Q8_0:
// their blocks are 2-byte aligned, so v2's fragment loads are 2-byte loads spread over 8 rows
// per instruction; v3 first copies each chunk (16 rows x kU blocks) into shared memory with
// coalesced 4-byte loads (the aligned words around the chunk), then reads the fragments there.
#pragma once

#include "common.cuh"
#include "gguf_gemv.cuh"
#include "gguf_mma_blocks.cuh"

namespace kestrel::gguf::v2 {

constexpr int kTileRows = 16;
constexpr int kMaxWarps = 8;

// kLight: chunks of Mma<B>::kU / 2 blocks, at most 7 warps, 3 CTAs per SM (80 registers; Q5_K
// and Q6_K would spill there, they keep 2; staged Q4_0 / Q8_0 too, with whole chunks); otherwise
// chunks of Mma<B>::kU, at most 8 warps and 128 registers (2 CTAs per SM). kStage (v3, the formats
// with Mma<B>::kStaged): the chunk goes through shared memory, kWpr 4-byte words per row (== 4 mod
// 8: the fragment reads of the 8 rows of an instruction fall in different banks); 6 warps for
// Q6_K's big chunks (48 KB).
template <typename B, bool kLight, bool kStage>
struct Shape {
  static constexpr bool kWide = std::is_same_v<B, BlockQ5_K> || std::is_same_v<B, BlockQ6_K>;
  static constexpr bool kHalf = kLight && (kWide || !kStage);  // staged Q4_0 / Q8_0: 2 CTAs
  static constexpr int kU = kHalf ? Mma<B>::kU / 2 : Mma<B>::kU;
  static constexpr int kWarps = kLight ? 7 : (kStage && kWide ? 6 : kMaxWarps);
  static constexpr int kCtasPerSm = kLight && !kWide && !kStage ? 3 : 2;
  static constexpr int kWords = (kU * B::kBlockBytes + 2 + 3) / 4;  // most words a row touches
  static constexpr int kWpr = kStage ? (kWords + 3) / 8 * 8 + 4 : 1;
};

template <typename T, typename B, bool kLight, bool kStage>
__global__ void __launch_bounds__(Shape<B, kLight, kStage>::kWarps * 32,
                                  Shape<B, kLight, kStage>::kCtasPerSm)
    gguf_gemv_mma_kernel(const GemvParams p, const int m) {
  using Op = Mma<B>;
  using S = Shape<B, kLight, kStage>;
  constexpr int kU = S::kU, kWpr = S::kWpr;
  __shared__ float partial[kMaxWarps][4][32];
  __shared__ uint32_t stage[kStage ? S::kWarps : 1][kTileRows * kWpr];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const uint8_t* rows[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // rows past the end re-read the last row; never stored
    const int64_t r = row0 + g + 8 * i;
    rows[i] = p.weight + (r < p.n ? r : p.n - 1) * p.row_bytes;
  }
  const bool xv = g < m;
  const T* xrow = static_cast<const T*>(p.x) + (xv ? g : 0) * p.ldx;
  const int nb = p.k / B::kBlockElems;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b0 = warp * kU; b0 < nb; b0 += warps * kU) {
    if constexpr (kStage) {
      constexpr int kPerRow = (S::kWords + 31) / 32;  // words per lane and row
      const int bytes = min(kU, nb - b0) * B::kBlockBytes;
      const int64_t chunk = static_cast<int64_t>(b0) * B::kBlockBytes;
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // 8 rows at a time (registers)
        uint32_t v[8][kPerRow];
#pragma unroll
        for (int r8 = 0; r8 < 8; ++r8) {  // row r's words: 32 lanes on consecutive words
          const int64_t r = row0 + 8 * half + r8;
          const auto a =
              reinterpret_cast<uintptr_t>(p.weight + (r < p.n ? r : p.n - 1) * p.row_bytes + chunk);
          const int words = static_cast<int>(((a & 3) + bytes + 3) >> 2);
          const auto* src = reinterpret_cast<const uint32_t*>(a & ~uintptr_t{3});
#pragma unroll
          for (int j = 0; j < kPerRow; ++j) {
            const int w = lane + 32 * j;
            v[r8][j] = w < words ? __ldg(src + w) : 0u;
          }
        }
        if (half == 0) __syncwarp();  // the previous chunk's fragment reads are done
#pragma unroll
        for (int r8 = 0; r8 < 8; ++r8) {
#pragma unroll
          for (int j = 0; j < kPerRow; ++j) {
            const int w = lane + 32 * j;
            if (w < S::kWords) stage[warp][(8 * half + r8) * kWpr + w] = v[r8][j];
          }
        }
      }
      __syncwarp();
      const uint8_t* base[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const auto shift = static_cast<int>(reinterpret_cast<uintptr_t>(rows[i] + chunk) & 3);
        base[i] = reinterpret_cast<const uint8_t*>(&stage[warp][(g + 8 * i) * kWpr]) + shift;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {  // fragments from shared memory, one block at a time
        if (b0 + u < nb) {
          typename Op::Raw raw;
          const uint8_t* const blk[2] = {base[0] + u * B::kBlockBytes,
                                         base[1] + u * B::kBlockBytes};
          Op::template load<false>(raw, blk, t);
          Op::template compute<T>(raw, xrow + (b0 + u) * B::kBlockElems, xv, t, acc);
        }
      }
    } else {
      typename Op::Raw raw[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (b0 + u < nb) {
          const int64_t off = static_cast<int64_t>(b0 + u) * B::kBlockBytes;
          const uint8_t* const blk[2] = {rows[0] + off, rows[1] + off};
          Op::template load<true>(raw[u], blk, t);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (b0 + u < nb) {
          Op::template compute<T>(raw[u], xrow + (b0 + u) * B::kBlockElems, xv, t, acc);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][i][lane] = acc[i];
  __syncthreads();
  // 128 sums: c-fragment i of lane l is row g + 8 (i / 2), activation row 2 t + i % 2.
  for (int idx = threadIdx.x; idx < 128; idx += blockDim.x) {
    const int i = idx >> 5, l = idx & 31;
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += partial[w][i][l];
    const int om = 2 * (l & 3) + (i & 1);
    const int64_t row = row0 + (l >> 2) + 8 * (i >> 1);
    if (om < m && row < p.n) static_cast<T*>(p.out)[om * p.ldo + row] = from_float<T>(sum);
  }
}

// Warps per CTA: the chunks (of u blocks) of a row spread evenly over at most max_warps warps.
template <typename B>
int gemv_mma_warps(int k, int u, int max_warps) {
  const int chunks = static_cast<int>(ceil_div(k / B::kBlockElems, u));
  const int iters = static_cast<int>(ceil_div(chunks, max_warps));
  return static_cast<int>(ceil_div(chunks, iters));
}

// Multiprocessors of the current device (cached per device; no device work, capture-safe).
inline int sm_count() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = n > 0 ? n : 132;
  }
  return cached[dev];
}

template <typename T, typename B, bool kLight, bool kStage>
cudaError_t launch_gemv_mma_shape(const GemvParams& p, int m, unsigned grid, cudaStream_t stream) {
  using S = Shape<B, kLight, kStage>;
  const int warps = gemv_mma_warps<B>(p.k, S::kU, S::kWarps);
  gguf_gemv_mma_kernel<T, B, kLight, kStage><<<grid, 32 * warps, 0, stream>>>(p, m);
  return cudaGetLastError();
}

// The heavy kernel while every CTA is resident at once (two per SM: one round of loads covers
// the weight); otherwise the light one, whose three CTAs per SM leave no second wave of a few
// CTAs behind the first (qkv: 288 CTAs on 132 SMs) and keep as many bytes in flight. stage:
// v3 (shared-memory staging for the formats that have it).
template <typename T, typename B>
cudaError_t launch_gemv_mma(const GemvParams& p, int m, bool stage, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.n, kTileRows);
  if (blocks >= (1LL << 31)) return cudaErrorInvalidValue;
  const auto grid = static_cast<unsigned>(blocks);
  const bool light = blocks > 2LL * sm_count();
  if constexpr (Mma<B>::kStaged) {
    if (stage) {
      return light ? launch_gemv_mma_shape<T, B, true, true>(p, m, grid, stream)
                   : launch_gemv_mma_shape<T, B, false, true>(p, m, grid, stream);
    }
  }
  return light ? launch_gemv_mma_shape<T, B, true, false>(p, m, grid, stream)
               : launch_gemv_mma_shape<T, B, false, false>(p, m, grid, stream);
}

}  // namespace kestrel::gguf::v2
