// The per-format pieces of the tensor-core GGUF GEMV (gguf_gemv_mma.cuh): for a 16-row tile and
// lane (g = lane / 4, t = lane % 4), Mma<B>::load fetches the bytes of rows g and g + 8 of one
// block that the mma fragment layout (mma.cuh) gives to t, and Mma<B>::compute turns them into
// exact integer A fragments (quant + a magic bias, in T), multiplies them with x and adds the
// scaled group sums to the lane's four accumulators.
//
// Element order inside a 32-element unit: "span 8" (Q4_K, Q5_K): t holds unit elements
// [8t, 8t + 8), k-step 0 takes (0, 2) and (1, 3) of them, k-step 1 (4, 6) and (5, 7); x is one
// 16-byte load. "Span 4" (Q6_K, Q4_0, Q8_0): k-step s takes unit elements 16 s + 4 t + (0, 2)
// and (1, 3), so a 16-element scale group is one k-step; x is two 8-byte loads.
//
// load<kGlobal>: kGlobal reads global memory through the read-only cache; otherwise the block
// pointers point into shared memory (the staged copy of gguf_gemv_mma.cuh's v3; Q6_K, Q4_0 and
// Q8_0 only, whose 2-byte aligned blocks need 2-byte loads).
#pragma once

#include "common.cuh"
#include "gguf_blocks.cuh"
#include "mma.cuh"

namespace kestrel::gguf::v2 {

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

// 2 bytes at a 2-byte aligned address (global through the read-only cache, or shared).
template <bool kGlobal>
__device__ __forceinline__ uint32_t ld16(const uint8_t* p) {
  const auto* h = reinterpret_cast<const unsigned short*>(p);
  if constexpr (kGlobal) return __ldg(h);
  return *h;
}

// 4 bytes at a 2-byte aligned address.
template <bool kGlobal>
__device__ __forceinline__ uint32_t ld32_a2(const uint8_t* p) {
  return ld16<kGlobal>(p) | (ld16<kGlobal>(p + 2) << 16);
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
  static constexpr bool kStaged = false;  // 16-byte aligned blocks: direct 8/16-byte loads
  static constexpr int kU = 2;            // blocks per chunk
  struct Raw {
    uint4 h[2];
    uint2 q[2][4];  // [row][pair]: qs bytes 32 p + 8 t .. + 8
  };
  template <bool kGlobal>
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
  static constexpr bool kStaged = false;  // 16-byte aligned blocks: direct 8/16-byte loads
  static constexpr int kU = 2;
  struct Raw {
    uint4 h[2];
    uint2 qh[2];    // qh bytes 8 t .. + 8
    uint2 q[2][4];  // qs bytes 32 p + 8 t .. + 8
  };
  template <bool kGlobal>
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
  static constexpr bool kStaged = true;  // v3 stages its 2-byte aligned blocks in shared memory
  static constexpr int kU = 2;
  struct Raw {
    uint32_t ql[2][8];  // [row][4 n + 2 h + s]: ql bytes 64 n + 32 h + 16 s + 4 t .. + 4
    uint32_t qh[2][4];  // [row][2 n + s]: qh bytes 32 n + 16 s + 4 t .. + 4
    uint32_t sc[2][4];  // the 16 int8 scales
    uint32_t d[2];
  };
  template <bool kGlobal>
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* const (&blk)[2], int t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int v = 0; v < 8; ++v) r.ql[i][v] = ld32_a2<kGlobal>(blk[i] + 16 * v + 4 * t);
#pragma unroll
      for (int v = 0; v < 4; ++v) r.qh[i][v] = ld32_a2<kGlobal>(blk[i] + 128 + 16 * v + 4 * t);
#pragma unroll
      for (int v = 0; v < 4; ++v) r.sc[i][v] = ld32_a2<kGlobal>(blk[i] + 192 + 4 * v);
      r.d[i] = ld16<kGlobal>(blk[i] + 208);
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
  static constexpr bool kStaged = true;  // v3 stages its 2-byte aligned blocks in shared memory
  static constexpr int kU = 8;
  struct Raw {
    uint32_t q[2];  // qs bytes 4 t .. + 4: elements 4 t + i (low), 16 + 4 t + i (high)
    uint32_t d[2];
  };
  template <bool kGlobal>
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* const (&blk)[2], int t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      r.d[i] = ld16<kGlobal>(blk[i]);
      r.q[i] = ld32_a2<kGlobal>(blk[i] + 2 + 4 * t);
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
  static constexpr bool kStaged = true;  // v3 stages its 2-byte aligned blocks in shared memory
  static constexpr int kU = 8;
  struct Raw {
    uint32_t q[2][2];  // [row][s]: int8 qs 16 s + 4 t .. + 4
    uint32_t d[2];
  };
  template <bool kGlobal>
  static __device__ __forceinline__ void load(Raw& r, const uint8_t* const (&blk)[2], int t) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      r.d[i] = ld16<kGlobal>(blk[i]);
      r.q[i][0] = ld32_a2<kGlobal>(blk[i] + 2 + 4 * t);
      r.q[i][1] = ld32_a2<kGlobal>(blk[i] + 18 + 4 * t);
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
}  // namespace kestrel::gguf::v2
