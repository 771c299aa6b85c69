// GGUF (ggml) weight block formats decoded on the device: Q8_0, Q4_0, Q4_K, Q5_K, Q6_K.
//
// A weight row of K elements is K / kBlockElems blocks of kBlockBytes bytes, stored back to
// back exactly as in the GGUF file (little-endian, fp16 scales). Each decoder reads one "group"
// of 8 consecutive elements of a block, group g covering elements [8 g, 8 g + 8) (g <
// kBlockElems / 8), as w[i] = scale * q[i] - offset (offset 0 unless kHasOffset): q exact
// small integers as fp32, scale and offset the group's fp32 factors. Rounded as in the `gguf`
// package's dequantize (scale = d * sub-block scale, then scale * q - offset, no fused
// multiply-add), dequant8 gives the same fp32 values.
//
// Integers become floats by the exponent trick (2^23 + q has q in its mantissa), which is full
// rate where int-to-float conversion is a quarter-rate instruction.
//
// Alignment: a block starts on a 2-byte boundary at least (every block size is even). Q4_K and
// Q5_K blocks (144 and 176 bytes) start on 16-byte boundaries when the row data does, which
// their 8-byte loads need; the others use 2-byte loads.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace kestrel::gguf {

// GGML type ids (gguf.GGMLQuantizationType), shared with Python (kestrel/ops/gguf.py).
enum GgmlType : int { kQ4_0 = 2, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

__device__ __forceinline__ float load_f16(const uint8_t* p) {  // p 2-byte aligned
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// 8 bytes at p as two little-endian words (lo: bytes 0..3, hi: bytes 4..7).
__device__ __forceinline__ void load8_align2(const uint8_t* p, uint32_t& lo, uint32_t& hi) {
  const auto* h = reinterpret_cast<const unsigned short*>(p);
  lo = static_cast<uint32_t>(__ldg(h)) | (static_cast<uint32_t>(__ldg(h + 1)) << 16);
  hi = static_cast<uint32_t>(__ldg(h + 2)) | (static_cast<uint32_t>(__ldg(h + 3)) << 16);
}

__device__ __forceinline__ void load8_align8(const uint8_t* p, uint32_t& lo, uint32_t& hi) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  lo = v.x;
  hi = v.y;
}

// Byte i (0..7, a compile-time constant after unrolling) of the 8 bytes (lo, hi).
__device__ __forceinline__ uint32_t byte_of(uint32_t lo, uint32_t hi, int i) {
  return ((i < 4 ? lo : hi) >> (8 * (i & 3))) & 0xFFu;
}

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }

// float(q - bias) for 0 <= q < 2^23, exact: (2^23 + q) - (2^23 + bias).
template <int BIAS>
__device__ __forceinline__ float int_to_float(uint32_t q) {
  return __int_as_float(0x4B000000 | q) - (8388608.f + static_cast<float>(BIAS));
}

// Q8_0: 34 bytes = fp16 d, int8 q[32]; w = d * q.
struct BlockQ8_0 {
  static constexpr int kBlockElems = 32;
  static constexpr int kBlockBytes = 34;
  static constexpr bool kHasOffset = false;
  static __device__ __forceinline__ void decode8(const uint8_t* b, int g, float (&q)[8],
                                                 float& scale, float& offset) {
    scale = load_f16(b);
    offset = 0.f;
    uint32_t lo, hi;
    load8_align2(b + 2 + 8 * g, lo, hi);
    lo ^= 0x80808080u;  // int8 -> int8 + 128, unsigned
    hi ^= 0x80808080u;
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = int_to_float<128>(byte_of(lo, hi, i));
  }
};

// Q4_0: 18 bytes = fp16 d, 16 bytes of nibbles; element i < 16 is the low nibble of byte i,
// element 16 + i the high nibble; w = d * (nibble - 8).
struct BlockQ4_0 {
  static constexpr int kBlockElems = 32;
  static constexpr int kBlockBytes = 18;
  static constexpr bool kHasOffset = false;
  static __device__ __forceinline__ void decode8(const uint8_t* b, int g, float (&q)[8],
                                                 float& scale, float& offset) {
    scale = load_f16(b);
    offset = 0.f;
    uint32_t lo, hi;
    load8_align2(b + 2 + 8 * (g & 1), lo, hi);
    const int shift = (g >> 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = int_to_float<8>((byte_of(lo, hi, i) >> shift) & 0xFu);
  }
};

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K block (12 packed bytes s):
// j < 4: s[j] & 63 and s[j + 4] & 63; j >= 4: the low / high nibble of s[j + 4] with the two
// top bits of s[j - 4] / s[j] above them.
__device__ __forceinline__ void scale_min_k4(const uint8_t* s, int j, float& scale, float& min) {
  uint32_t sc, mn;
  if (j < 4) {
    sc = __ldg(s + j) & 63u;
    mn = __ldg(s + j + 4) & 63u;
  } else {
    const uint32_t packed = __ldg(s + j + 4);
    sc = (packed & 0xFu) | ((static_cast<uint32_t>(__ldg(s + j - 4)) >> 6) << 4);
    mn = (packed >> 4) | ((static_cast<uint32_t>(__ldg(s + j)) >> 6) << 4);
  }
  scale = int_to_float<0>(sc);
  min = int_to_float<0>(mn);
}

// d and dmin of a Q4_K / Q5_K block (its first 4 bytes; the block is 4-byte aligned).
__device__ __forceinline__ void load_d_dmin(const uint8_t* b, float& d, float& dmin) {
  const uint32_t u = __ldg(reinterpret_cast<const unsigned int*>(b));
  d = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xFFFFu)));
  dmin = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}

// Q4_K: 144 bytes = fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles. Sub-block
// j (32 elements) takes the low (j even) or high (j odd) nibbles of bytes [32 (j / 2), +32);
// w = (d * scale_j) * q - (dmin * min_j).
struct BlockQ4_K {
  static constexpr int kBlockElems = 256;
  static constexpr int kBlockBytes = 144;
  static constexpr bool kHasOffset = true;
  static __device__ __forceinline__ void decode8(const uint8_t* b, int g, float (&q)[8],
                                                 float& scale, float& offset) {
    const int j = g >> 2;  // sub-block of the group
    float sc, mn, d, dmin;
    scale_min_k4(b + 4, j, sc, mn);
    load_d_dmin(b, d, dmin);
    scale = mul(d, sc);
    offset = mul(dmin, mn);
    uint32_t lo, hi;
    load8_align8(b + 16 + 32 * (j >> 1) + 8 * (g & 3), lo, hi);
    const int shift = (j & 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = int_to_float<0>((byte_of(lo, hi, i) >> shift) & 0xFu);
  }
};

// Q5_K: 176 bytes = fp16 d, fp16 dmin, 12 bytes of scales/mins, qh[32], 128 bytes of nibbles.
// As Q4_K, with a fifth bit: bit j of qh[e % 32] for element e of sub-block j.
struct BlockQ5_K {
  static constexpr int kBlockElems = 256;
  static constexpr int kBlockBytes = 176;
  static constexpr bool kHasOffset = true;
  static __device__ __forceinline__ void decode8(const uint8_t* b, int g, float (&q)[8],
                                                 float& scale, float& offset) {
    const int j = g >> 2;
    float sc, mn, d, dmin;
    scale_min_k4(b + 4, j, sc, mn);
    load_d_dmin(b, d, dmin);
    scale = mul(d, sc);
    offset = mul(dmin, mn);
    uint32_t lo, hi, hlo, hhi;
    load8_align8(b + 48 + 32 * (j >> 1) + 8 * (g & 3), lo, hi);
    load8_align8(b + 16 + 8 * (g & 3), hlo, hhi);
    const int shift = (j & 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t v =
          ((byte_of(lo, hi, i) >> shift) & 0xFu) | (((byte_of(hlo, hhi, i) >> j) & 1u) << 4);
      q[i] = int_to_float<0>(v);
    }
  }
};

// Q6_K: 210 bytes = ql[128], qh[64], int8 scales[16], fp16 d. Element e (chunk c = e / 32,
// half n = c / 4): low 4 bits from ql[64 n + 32 (c % 2) + e % 32] (low nibble for c % 4 < 2,
// else high), top 2 bits from qh[32 n + e % 32] >> (2 (c % 4)); w = (d * scales[e / 16]) *
// (q - 32).
struct BlockQ6_K {
  static constexpr int kBlockElems = 256;
  static constexpr int kBlockBytes = 210;
  static constexpr bool kHasOffset = false;
  static __device__ __forceinline__ void decode8(const uint8_t* b, int g, float (&q)[8],
                                                 float& scale, float& offset) {
    const int c = g >> 2;
    const int n = c >> 2;
    const int sub_scale = static_cast<int8_t>(__ldg(b + 192 + (g >> 1)));
    scale = mul(load_f16(b + 208), static_cast<float>(sub_scale));
    offset = 0.f;
    uint32_t lo, hi, hlo, hhi;
    load8_align2(b + 64 * n + 32 * (c & 1) + 8 * (g & 3), lo, hi);
    load8_align2(b + 128 + 32 * n + 8 * (g & 3), hlo, hhi);
    const int lshift = ((c & 3) >> 1) * 4;
    const int hshift = (c & 3) * 2;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t v =
          ((byte_of(lo, hi, i) >> lshift) & 0xFu) | (((byte_of(hlo, hhi, i) >> hshift) & 3u) << 4);
      q[i] = int_to_float<32>(v);
    }
  }
};

// The 8 weights of group g as fp32, rounded as the `gguf` package's dequantize rounds them.
template <typename B>
__device__ __forceinline__ void dequant8(const uint8_t* b, int g, float (&w)[8]) {
  float q[8], scale, offset;
  B::decode8(b, g, q, scale, offset);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    w[i] = B::kHasOffset ? __fsub_rn(mul(scale, q[i]), offset) : mul(scale, q[i]);
  }
}

template <typename B>
struct BlockTag {
  using type = B;
};

// Calls fn(BlockTag<B>{}) for the block format of a GGML type id; other ids are invalid.
template <typename Fn>
cudaError_t dispatch_block(int ggml_type, Fn&& fn) {
  switch (ggml_type) {
    case kQ8_0:
      return fn(BlockTag<BlockQ8_0>{});
    case kQ4_0:
      return fn(BlockTag<BlockQ4_0>{});
    case kQ4_K:
      return fn(BlockTag<BlockQ4_K>{});
    case kQ5_K:
      return fn(BlockTag<BlockQ5_K>{});
    case kQ6_K:
      return fn(BlockTag<BlockQ6_K>{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace kestrel::gguf
