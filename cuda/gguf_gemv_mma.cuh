// GGUF GEMV v2 (KESTREL_GGUF_GEMV=v2, the default): out [M, N] = x [M, K] @ W^T for M = 1..8
// on the tensor cores, one mma.sync.m16n8k16 tile = 16 weight rows x 16 k x the 8 activation
// rows (M < 8 leaves columns of the tile zero).
//
// Exactness: the A operand holds the raw quants as exact small integers in T (q plus a magic
// bias: the exponent trick on 16-bit floats, one LOP3 per two weights), B holds x as given, so
// every product is exact and accumulates in fp32. The scales stay outside the mma: per scale
// group ("unit" of 32 or 16 elements) and row, sum_k w x = f * S - h * X with S = sum (bias + q)
// x from one mma, X = sum x from an mma with an all-ones A, f the group scale and h = f * bias +
// offset (the K-quant min). Nothing is rounded to T except x itself, as in the reference.
//
// Work split: a CTA of W warps (1..8, chosen by the launcher) owns 16 weight rows; warp w takes
// chunks of kU consecutive blocks (Mma<B>::kU or half of it: launch_gemv_mma), chunk c = w, w +
// W, ..., all its loads for a chunk issued before any use; the warps' partial sums meet in shared
// memory. Lane (g = lane / 4, t = lane % 4) loads rows g and g + 8 of the tile, the bytes of each
// scale group that the mma fragment layout (mma.cuh) gives to t, and activation row g (lanes with g
// >= M load none).
//
// Element order inside a unit: "span 8" (Q4_K, Q5_K): t holds unit elements [8t, 8t + 8), k-step
// 0 takes (0, 2) and (1, 3) of them, k-step 1 (4, 6) and (5, 7); x is one 16-byte load.
// "Span 4" (Q6_K, Q4_0, Q8_0): k-step s takes unit elements 16 s + 4 t + (0, 2) and (1, 3),
// so a 16-element scale group is one k-step; x is two 8-byte loads.
#pragma once

#include "common.cuh"
#include "gguf_blocks.cuh"
#include "gguf_gemv.cuh"
#include "mma.cuh"

namespace kestrel::gguf::v2 {

constexpr int kTileRows = 16;
constexpr int kMaxWarps = 8;

// 16-bit float magic: bits | q (q < 128 for bf16, < 1024 for half) is the value kValue + q.
template <typename T>
struct Magic;
template <>
struct Magic<half> {
  static constexpr uint32_t kBits = 0x64006400u;  // 1024
  static constexpr float kValue = 1024.f;
  static constexpr uint32_t kOnes = 0x3C003C00u;
};
template <>
struct Magic<__nv_bfloat16> {
  static constexpr uint32_t kBits = 0x43004300u;  // 128
  static constexpr float kValue = 128.f;
  static constexpr uint32_t kOnes = 0x3F803F80u;
};

// w >> s for s >= 0, w << -s otherwise (s a compile-time constant after unrolling).
__device__ __forceinline__ uint32_t shr(uint32_t w, int s) { return s >= 0 ? w >> s : w << -s; }

// The nibbles at bits [s, s + 4) and [s + 16, s + 20) of w as two T (magic + q).
template <typename T>
__device__ __forceinline__ uint32_t nib2(uint32_t w, int s) {
  return (shr(w, s) & 0x000F000Fu) | Magic<T>::kBits;
}

// 4 bytes at a 2-byte aligned address.
__device__ __forceinline__ uint32_t ld32_a2(const uint8_t* p) {
  const auto* h = reinterpret_cast<const unsigned short*>(p);
  return static_cast<uint32_t>(__ldg(h)) | (static_cast<uint32_t>(__ldg(h + 1)) << 16);
}

__device__ __forceinline__ float f16_bits(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFFu)));
}

// Byte i of w as float (exact).
__device__ __forceinline__ float byte_f(uint32_t w, int i) {
  return int_to_float<0>((w >> (8 * i)) & 0xFFu);
}

// The B fragments (x as T pairs) of a unit for activation row pointer xu (unit start).
template <typename T, bool kSpan8>
__device__ __forceinline__ void load_x(const T* xu, bool valid, int t, uint32_t (&b)[2][2]) {
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  if (valid) {
    if constexpr (kSpan8) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(xu + 8 * t));
      w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
    } else {
      const uint2 u0 = __ldg(reinterpret_cast<const uint2*>(xu + 4 * t));
      const uint2 u1 = __ldg(reinterpret_cast<const uint2*>(xu + 16 + 4 * t));
      w[0] = u0.x, w[1] = u0.y, w[2] = u1.x, w[3] = u1.y;
    }
  }
#pragma unroll
  for (int s = 0; s < 2; ++s) {  // words (x0 x1, x2 x3) -> (x0 x2), (x1 x3)
    b[s][0] = __byte_perm(w[2 * s], w[2 * s + 1], 0x5410);
    b[s][1] = __byte_perm(w[2 * s], w[2 * s + 1], 0x7632);
  }
}

// acc[0..1] (row g) += fa * S - ha * X; acc[2..3] (row g + 8) with fb, hb.
__device__ __forceinline__ void apply(float (&acc)[4], const float (&s)[4], const float (&x)[4],
                                      float fa, float ha, float fb, float hb) {
  acc[0] = fmaf(fa, s[0], fmaf(-ha, x[0], acc[0]));
  acc[1] = fmaf(fa, s[1], fmaf(-ha, x[1], acc[1]));
  acc[2] = fmaf(fb, s[2], fmaf(-hb, x[2], acc[2]));
  acc[3] = fmaf(fb, s[3], fmaf(-hb, x[3], acc[3]));
}

// One 32-element unit with a single scale per row: a[s] the A fragments of k-step s.
template <typename T>
__device__ __forceinline__ void unit32(float (&acc)[4], const uint32_t (&a)[2][4],
                                       const uint32_t (&b)[2][2], float fa, float ha, float fb,
                                       float hb) {
  constexpr uint32_t kOnes = Magic<T>::kOnes;
  const uint32_t ones[4] = {kOnes, kOnes, kOnes, kOnes};
  float s[4] = {0.f, 0.f, 0.f, 0.f}, x[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    mma::mma_16816<T>(s, a[k], b[k][0], b[k][1]);
    mma::mma_16816<T>(x, ones, b[k][0], b[k][1]);
  }
  apply(acc, s, x, fa, ha, fb, hb);
}

// One k-step (16 elements) with its own scale per row.
template <typename T>
__device__ __forceinline__ void unit16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1, float fa, float ha, float fb, float hb) {
  constexpr uint32_t kOnes = Magic<T>::kOnes;
  const uint32_t ones[4] = {kOnes, kOnes, kOnes, kOnes};
  float s[4] = {0.f, 0.f, 0.f, 0.f}, x[4] = {0.f, 0.f, 0.f, 0.f};
  mma::mma_16816<T>(s, a, b0, b1);
  mma::mma_16816<T>(x, ones, b0, b1);
  apply(acc, s, x, fa, ha, fb, hb);
}

// The 8 six-bit scales and mins of a Q4_K / Q5_K header (words 1..3 of it), as bytes.
__device__ __forceinline__ void k4_scales(const uint4& h, uint32_t (&sc)[2], uint32_t (&mn)[2]) {
  sc[0] = h.y & 0x3F3F3F3Fu;
  mn[0] = h.z & 0x3F3F3F3Fu;
  sc[1] = (h.w & 0x0F0F0F0Fu) | ((h.y >> 2) & 0x30303030u);
  mn[1] = ((h.w >> 4) & 0x0F0F0F0Fu) | ((h.z >> 2) & 0x30303030u);
}

// Scale f and bias term h of sub-block j of a Q4_K / Q5_K row (q unsigned: bias = magic).
template <typename T>
__device__ __forceinline__ void k4_factors(const uint4& h, const uint32_t (&sc)[2],
                                           const uint32_t (&mn)[2], int j, float& f, float& o) {
  const float scale = mul(f16_bits(h.x), byte_f(sc[j >> 2], j & 3));
  const float offset = mul(f16_bits(h.x >> 16), byte_f(mn[j >> 2], j & 3));
  f = scale;
  o = fmaf(scale, Magic<T>::kValue, offset);
}

template <typename B>
struct Mma;

template <>
struct Mma<BlockQ4_K> {
  static constexpr int kU = 2;  // blocks per chunk
  struct Raw {
    uint4 h[2];
    uint2 q[2][4];  // [row][pair]: qs bytes 32 p + 8 t .. + 8
  };
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* const (&blk)[2], int t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      r.h[i] = __ldg(reinterpret_cast<const uint4*>(blk[i]));
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        r.q[i][p] = __ldg(reinterpret_cast<const uint2*>(blk[i] + 16 + 32 * p + 8 * t));
      }
    }
  }
  template <typename T>
  static __device__ __forceinline__ void compute(const Raw& r, const T* xb, bool xv, int t,
                                                 float (&acc)[4]) {
    uint32_t sc[2][2], mn[2][2];
    k4_scales(r.h[0], sc[0], mn[0]);
    k4_scales(r.h[1], sc[1], mn[1]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      uint32_t b[2][2];
      load_x<T, true>(xb + 32 * j, xv, t, b);
      const int sh = 4 * (j & 1);
      uint32_t a[2][4];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const uint32_t wa = k ? r.q[0][j >> 1].y : r.q[0][j >> 1].x;
        const uint32_t wb = k ? r.q[1][j >> 1].y : r.q[1][j >> 1].x;
        a[k][0] = nib2<T>(wa, sh);
        a[k][1] = nib2<T>(wb, sh);
        a[k][2] = nib2<T>(wa, sh + 8);
        a[k][3] = nib2<T>(wb, sh + 8);
      }
      float fa, ha, fb, hb;
      k4_factors<T>(r.h[0], sc[0], mn[0], j, fa, ha);
      k4_factors<T>(r.h[1], sc[1], mn[1], j, fb, hb);
      unit32<T>(acc, a, b, fa, ha, fb, hb);
    }
  }
};

template <>
struct Mma<BlockQ5_K> {
  static constexpr int kU = 2;
  struct Raw {
    uint4 h[2];
    uint2 qh[2];    // qh bytes 8 t .. + 8
    uint2 q[2][4];  // qs bytes 32 p + 8 t .. + 8
  };
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* const (&blk)[2], int t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      r.h[i] = __ldg(reinterpret_cast<const uint4*>(blk[i]));
      r.qh[i] = __ldg(reinterpret_cast<const uint2*>(blk[i] + 16 + 8 * t));
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        r.q[i][p] = __ldg(reinterpret_cast<const uint2*>(blk[i] + 48 + 32 * p + 8 * t));
      }
    }
  }
  template <typename T>
  static __device__ __forceinline__ void compute(const Raw& r, const T* xb, bool xv, int t,
                                                 float (&acc)[4]) {
    uint32_t sc[2][2], mn[2][2];
    k4_scales(r.h[0], sc[0], mn[0]);
    k4_scales(r.h[1], sc[1], mn[1]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      uint32_t b[2][2];
      load_x<T, true>(xb + 32 * j, xv, t, b);
      const int sh = 4 * (j & 1);
      uint32_t a[2][4];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const uint32_t w[2] = {k ? r.q[0][j >> 1].y : r.q[0][j >> 1].x,
                               k ? r.q[1][j >> 1].y : r.q[1][j >> 1].x};
        const uint32_t hw[2] = {k ? r.qh[0].y : r.qh[0].x, k ? r.qh[1].y : r.qh[1].x};
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // bit j of qh bytes (0, 2) / (1, 3) -> bits 4 and 20
          a[k][i] = nib2<T>(w[i], sh) | (shr(hw[i], j - 4) & 0x00100010u);
          a[k][i + 2] = nib2<T>(w[i], sh + 8) | (shr(hw[i], j + 4) & 0x00100010u);
        }
      }
      float fa, ha, fb, hb;
      k4_factors<T>(r.h[0], sc[0], mn[0], j, fa, ha);
      k4_factors<T>(r.h[1], sc[1], mn[1], j, fb, hb);
      unit32<T>(acc, a, b, fa, ha, fb, hb);
    }
  }
};

template <>
struct Mma<BlockQ6_K> {
  static constexpr int kU = 2;
  struct Raw {
    uint32_t ql[2][8];  // [row][4 n + 2 h + s]: ql bytes 64 n + 32 h + 16 s + 4 t .. + 4
    uint32_t qh[2][4];  // [row][2 n + s]: qh bytes 32 n + 16 s + 4 t .. + 4
    uint32_t sc[2][4];  // the 16 int8 scales
    uint32_t d[2];
  };
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* const (&blk)[2], int t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int v = 0; v < 8; ++v) r.ql[i][v] = ld32_a2(blk[i] + 16 * v + 4 * t);
#pragma unroll
      for (int v = 0; v < 4; ++v) r.qh[i][v] = ld32_a2(blk[i] + 128 + 16 * v + 4 * t);
#pragma unroll
      for (int v = 0; v < 4; ++v) r.sc[i][v] = ld32_a2(blk[i] + 192 + 4 * v);
      r.d[i] = __ldg(reinterpret_cast<const unsigned short*>(blk[i] + 208));
    }
  }
  template <typename T>
  static __device__ __forceinline__ void compute(const Raw& r, const T* xb, bool xv, int t,
                                                 float (&acc)[4]) {
    const float d[2] = {f16_bits(r.d[0]), f16_bits(r.d[1])};
#pragma unroll
    for (int c = 0; c < 8;
         ++c) {  // chunk of 32 elements: ql nibble (c & 3) / 2, qh shift 2 (c & 3)
      uint32_t b[2][2];
      load_x<T, false>(xb + 32 * c, xv, t, b);
      const int n = c >> 2, nsh = 4 * ((c & 3) >> 1), qsh = 2 * (c & 3);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint32_t a[4];
        float f[2], h[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const uint32_t w = r.ql[i][4 * n + 2 * (c & 1) + s];
          const uint32_t hw = r.qh[i][2 * n + s];
          a[i] = nib2<T>(w, nsh) | (shr(hw, qsh - 4) & 0x00300030u);
          a[i + 2] = nib2<T>(w, nsh + 8) | (shr(hw, qsh + 4) & 0x00300030u);
          const int g = 2 * c + s;  // scale index
          const int sub = static_cast<int8_t>((r.sc[i][g >> 2] >> (8 * (g & 3))) & 0xFFu);
          f[i] = mul(d[i], static_cast<float>(sub));
          h[i] = f[i] * (Magic<T>::kValue + 32.f);
        }
        unit16<T>(acc, a, b[s][0], b[s][1], f[0], h[0], f[1], h[1]);
      }
    }
  }
};

template <>
struct Mma<BlockQ4_0> {
  static constexpr int kU = 8;
  struct Raw {
    uint32_t q[2];  // qs bytes 4 t .. + 4: elements 4 t + i (low), 16 + 4 t + i (high)
    uint32_t d[2];
  };
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* const (&blk)[2], int t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      r.d[i] = __ldg(reinterpret_cast<const unsigned short*>(blk[i]));
      r.q[i] = ld32_a2(blk[i] + 2 + 4 * t);
    }
  }
  template <typename T>
  static __device__ __forceinline__ void compute(const Raw& r, const T* xb, bool xv, int t,
                                                 float (&acc)[4]) {
    uint32_t b[2][2];
    load_x<T, false>(xb, xv, t, b);
    uint32_t a[2][4];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        a[k][i] = nib2<T>(r.q[i], 4 * k);
        a[k][i + 2] = nib2<T>(r.q[i], 4 * k + 8);
      }
    }
    const float fa = f16_bits(r.d[0]), fb = f16_bits(r.d[1]);
    constexpr float kBias = Magic<T>::kValue + 8.f;
    unit32<T>(acc, a, b, fa, fa * kBias, fb, fb * kBias);
  }
};

template <>
struct Mma<BlockQ8_0> {
  static constexpr int kU = 8;
  struct Raw {
    uint32_t q[2][2];  // [row][s]: int8 qs 16 s + 4 t .. + 4
    uint32_t d[2];
  };
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* const (&blk)[2], int t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      r.d[i] = __ldg(reinterpret_cast<const unsigned short*>(blk[i]));
      r.q[i][0] = ld32_a2(blk[i] + 2 + 4 * t);
      r.q[i][1] = ld32_a2(blk[i] + 18 + 4 * t);
    }
  }
  // Bytes (0, 2) (sel 0) or (1, 3) (sel 1) of four int8 as two T: half 1024 + 128 + q,
  // bf16 q itself (through fp32; bf16 holds every int8 exactly).
  template <typename T>
  static __device__ __forceinline__ uint32_t pair(uint32_t w, int sel) {
    const uint32_t u = w ^ 0x80808080u;  // q + 128, unsigned
    if constexpr (std::is_same_v<T, half>) {
      return __byte_perm(u, 0x64646464u, sel ? 0x4341 : 0x4240);
    } else {
      const float lo = int_to_float<128>((u >> (8 * sel)) & 0xFFu);
      const float hi = int_to_float<128>((u >> (8 * sel + 16)) & 0xFFu);
      return mma::pack2<T>(lo, hi);
    }
  }
  template <typename T>
  static __device__ __forceinline__ void compute(const Raw& r, const T* xb, bool xv, int t,
                                                 float (&acc)[4]) {
    uint32_t b[2][2];
    load_x<T, false>(xb, xv, t, b);
    uint32_t a[2][4];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        a[k][i] = pair<T>(r.q[i][k], 0);
        a[k][i + 2] = pair<T>(r.q[i][k], 1);
      }
    }
    const float fa = f16_bits(r.d[0]), fb = f16_bits(r.d[1]);
    constexpr float kBias = std::is_same_v<T, half> ? Magic<T>::kValue + 128.f : 0.f;
    unit32<T>(acc, a, b, fa, fa * kBias, fb, fb * kBias);
  }
};

// One CTA per 16 weight rows; blockDim.x = 32 W (W <= kMaxWarps). Params as gguf_gemv_kernel.
// kLight: chunks of Mma<B>::kU / 2 blocks, at most 7 warps, 3 CTAs per SM (80 registers; Q5_K
// and Q6_K would spill there, they keep 2); otherwise chunks of Mma<B>::kU, at most 8 warps and
// 128 registers (2 CTAs per SM).
template <typename B, bool kLight>
struct Shape {
  static constexpr bool kWide = std::is_same_v<B, BlockQ5_K> || std::is_same_v<B, BlockQ6_K>;
  static constexpr int kWarps = kLight ? 7 : kMaxWarps;
  static constexpr int kCtasPerSm = kLight && !kWide ? 3 : 2;
};

template <typename T, typename B, bool kLight>
__global__ void __launch_bounds__(Shape<B, kLight>::kWarps * 32, Shape<B, kLight>::kCtasPerSm)
    gguf_gemv_mma_kernel(const GemvParams p, const int m) {
  using Op = Mma<B>;
  constexpr int kU = kLight ? Op::kU / 2 : Op::kU;
  __shared__ float partial[kMaxWarps][4][32];
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
    typename Op::Raw raw[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (b0 + u < nb) {
        const int64_t off = static_cast<int64_t>(b0 + u) * B::kBlockBytes;
        const uint8_t* const blk[2] = {rows[0] + off, rows[1] + off};
        Op::load(raw[u], blk, t);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (b0 + u < nb) {
        Op::template compute<T>(raw[u], xrow + (b0 + u) * B::kBlockElems, xv, t, acc);
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

// The heavy kernel while every CTA is resident at once (two per SM: one round of loads covers
// the weight); otherwise the light one, whose three CTAs per SM leave no second wave of a few
// CTAs behind the first (qkv: 288 CTAs on 132 SMs) and keep as many bytes in flight.
template <typename T, typename B>
cudaError_t launch_gemv_mma(const GemvParams& p, int m, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.n, kTileRows);
  if (blocks >= (1LL << 31)) return cudaErrorInvalidValue;
  constexpr int kU = Mma<B>::kU;
  const auto grid = static_cast<unsigned>(blocks);
  if (blocks <= Shape<B, false>::kCtasPerSm * static_cast<int64_t>(sm_count())) {
    const int warps = gemv_mma_warps<B>(p.k, kU, Shape<B, false>::kWarps);
    gguf_gemv_mma_kernel<T, B, false><<<grid, 32 * warps, 0, stream>>>(p, m);
  } else {
    const int warps = gemv_mma_warps<B>(p.k, kU / 2, Shape<B, true>::kWarps);
    gguf_gemv_mma_kernel<T, B, true><<<grid, 32 * warps, 0, stream>>>(p, m);
  }
  return cudaGetLastError();
}

}  // namespace kestrel::gguf::v2
