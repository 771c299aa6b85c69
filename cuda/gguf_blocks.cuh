// GGUF (ggml) weight block formats decoded on the device: Q8_0, Q4_0, Q4_K, Q5_K, Q6_K.
//
// A weight row of K elements is K / kBlockElems blocks of kBlockBytes bytes, stored back to
// back exactly as in the GGUF file (little-endian, fp16 scales). Each decoder turns one
// "group" of 8 consecutive elements of a block into fp32: group g covers elements
// [8 g, 8 g + 8) of the block (g < kBlockElems / 8). The values are the ones the `gguf`
// package's dequantize gives (same fp32 operations, no fused multiply-add).
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

// Q8_0: 34 bytes = fp16 d, int8 q[32]; w = d * q.
struct BlockQ8_0 {
  static constexpr int kBlockElems = 32;
  static constexpr int kBlockBytes = 34;
  static __device__ __forceinline__ void dequant8(const uint8_t* b, int g, float (&w)[8]) {
    const float d = load_f16(b);
    uint32_t lo, hi;
    load8_align2(b + 2 + 8 * g, lo, hi);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int q = static_cast<int8_t>(static_cast<uint8_t>(byte_of(lo, hi, i)));
      w[i] = mul(d, static_cast<float>(q));
    }
  }
};

// Q4_0: 18 bytes = fp16 d, 16 bytes of nibbles; element i < 16 is the low nibble of byte i,
// element 16 + i the high nibble; w = d * (nibble - 8).
struct BlockQ4_0 {
  static constexpr int kBlockElems = 32;
  static constexpr int kBlockBytes = 18;
  static __device__ __forceinline__ void dequant8(const uint8_t* b, int g, float (&w)[8]) {
    const float d = load_f16(b);
    uint32_t lo, hi;
    load8_align2(b + 2 + 8 * (g & 1), lo, hi);
    const int shift = (g >> 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int q = static_cast<int>((byte_of(lo, hi, i) >> shift) & 0xFu) - 8;
      w[i] = mul(d, static_cast<float>(q));
    }
  }
};

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K block (12 packed bytes s):
// j < 4: s[j] & 63 and s[j + 4] & 63; j >= 4: the low / high nibble of s[j + 4] with the two
// top bits of s[j - 4] / s[j] above them.
__device__ __forceinline__ void scale_min_k4(const uint8_t* s, int j, float& scale, float& min) {
  if (j < 4) {
    scale = static_cast<float>(__ldg(s + j) & 63);
    min = static_cast<float>(__ldg(s + j + 4) & 63);
  } else {
    const int packed = __ldg(s + j + 4);
    scale = static_cast<float>((packed & 0xF) | ((__ldg(s + j - 4) >> 6) << 4));
    min = static_cast<float>((packed >> 4) | ((__ldg(s + j) >> 6) << 4));
  }
}

// Q4_K: 144 bytes = fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles. Sub-block
// j (32 elements) takes the low (j even) or high (j odd) nibbles of bytes [32 (j / 2), +32);
// w = (d * scale_j) * q - (dmin * min_j).
struct BlockQ4_K {
  static constexpr int kBlockElems = 256;
  static constexpr int kBlockBytes = 144;
  static __device__ __forceinline__ void dequant8(const uint8_t* b, int g, float (&w)[8]) {
    const int j = g >> 2;  // sub-block of the group
    float scale, min;
    scale_min_k4(b + 4, j, scale, min);
    const float d = mul(load_f16(b), scale);
    const float m = mul(load_f16(b + 2), min);
    uint32_t lo, hi;
    load8_align8(b + 16 + 32 * (j >> 1) + 8 * (g & 3), lo, hi);
    const int shift = (j & 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float q = static_cast<float>((byte_of(lo, hi, i) >> shift) & 0xFu);
      w[i] = __fsub_rn(mul(d, q), m);
    }
  }
};

// Q5_K: 176 bytes = fp16 d, fp16 dmin, 12 bytes of scales/mins, qh[32], 128 bytes of nibbles.
// As Q4_K, with a fifth bit: bit j of qh[e % 32] for element e of sub-block j.
struct BlockQ5_K {
  static constexpr int kBlockElems = 256;
  static constexpr int kBlockBytes = 176;
  static __device__ __forceinline__ void dequant8(const uint8_t* b, int g, float (&w)[8]) {
    const int j = g >> 2;
    float scale, min;
    scale_min_k4(b + 4, j, scale, min);
    const float d = mul(load_f16(b), scale);
    const float m = mul(load_f16(b + 2), min);
    uint32_t lo, hi, hlo, hhi;
    load8_align8(b + 48 + 32 * (j >> 1) + 8 * (g & 3), lo, hi);
    load8_align8(b + 16 + 8 * (g & 3), hlo, hhi);
    const int shift = (j & 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t q = ((byte_of(lo, hi, i) >> shift) & 0xFu) |
                         (((byte_of(hlo, hhi, i) >> j) & 1u) << 4);
      w[i] = __fsub_rn(mul(d, static_cast<float>(q)), m);
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
  static __device__ __forceinline__ void dequant8(const uint8_t* b, int g, float (&w)[8]) {
    const int c = g >> 2;
    const int n = c >> 2;
    const float d = mul(load_f16(b + 208), static_cast<float>(static_cast<int8_t>(
                                               __ldg(b + 192 + (g >> 1)))));
    uint32_t lo, hi, hlo, hhi;
    load8_align2(b + 64 * n + 32 * (c & 1) + 8 * (g & 3), lo, hi);
    load8_align2(b + 128 + 32 * n + 8 * (g & 3), hlo, hhi);
    const int lshift = ((c & 3) >> 1) * 4;
    const int hshift = (c & 3) * 2;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int q = static_cast<int>(((byte_of(lo, hi, i) >> lshift) & 0xFu) |
                                     (((byte_of(hlo, hhi, i) >> hshift) & 3u) << 4)) -
                    32;
      w[i] = mul(d, static_cast<float>(q));
    }
  }
};

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
