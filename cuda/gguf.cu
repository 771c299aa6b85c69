// Host launchers of the GGUF block-quantized weight kernels (gguf_gemv.cuh): argument checks,
// then the dispatch over dtype, block format and activation rows.
#include <cstdlib>
#include <cstring>

#include "gguf_gemv.cuh"
#include "gguf_gemv_mma.cuh"
#include "kernels.h"

namespace kestrel::api {

namespace {

// The block size (elements, bytes) of a supported GGML type id; false for any other id.
bool block_size_of(int ggml_type, int64_t& elems, int64_t& bytes) {
  return gguf::dispatch_block(ggml_type, [&](auto tag) {
           using B = typename decltype(tag)::type;
           elems = B::kBlockElems;
           bytes = B::kBlockBytes;
           return cudaSuccess;
         }) == cudaSuccess;
}

// Common checks on the weight: K a positive multiple of the block, rows of exactly
// K / block_elems blocks, 16-byte aligned data (the 8-byte loads of Q4_K / Q5_K need it).
bool weight_ok(int ggml_type, ptr_t weight, int64_t row_bytes, int64_t n, int64_t k) {
  int64_t elems = 0, bytes = 0;
  if (!block_size_of(ggml_type, elems, bytes)) return false;
  if (n < 0 || k <= 0 || k % elems != 0 || row_bytes != k / elems * bytes) return false;
  return weight != 0 && weight % 16 == 0;
}

// The GEMV variant: KESTREL_GGUF_GEMV=v1 (gguf_gemv.cuh, fp32 FMAs) or v2 (gguf_gemv_mma.cuh,
// tensor cores; the default when unset or empty); 0 for any other value. Read at every call (a
// getenv, no device work), so a test or benchmark can switch it between launches / captures.
// The staged variant of v2 (Q6_K / Q4_0 / Q8_0 through shared memory, `staged` below) is not
// selectable: on the H200 it failed a Q4_0 test (one row of one block) and was slower than v2.
int gemv_variant() {
  const char* v = std::getenv("KESTREL_GGUF_GEMV");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "v2") == 0) return 2;
  return std::strcmp(v, "v1") == 0 ? 1 : 0;
}

}  // namespace

int gguf_gemv(const GgufGemvArgs& a, ptr_t stream) {
  if (!weight_ok(a.ggml_type, a.weight, a.row_bytes, a.n, a.k)) return cudaErrorInvalidValue;
  if (a.m < 1 || a.m > gguf::kMaxGemvRows || a.k > INT32_MAX / 2) return cudaErrorInvalidValue;
  if (a.out == 0 || a.x == 0 || a.x % 16 != 0 || a.ldx % 8 != 0) return cudaErrorInvalidValue;
  if ((a.m > 1 && (a.ldx < a.k || a.ldo < a.n)) || a.ldx < 0 || a.ldo < 0) {
    return cudaErrorInvalidValue;
  }
  if (a.n == 0) return cudaSuccess;
  gguf::GemvParams p{};
  p.out = reinterpret_cast<void*>(a.out);
  p.x = reinterpret_cast<const void*>(a.x);
  p.weight = reinterpret_cast<const uint8_t*>(a.weight);
  p.ldo = a.ldo;
  p.ldx = a.ldx;
  p.row_bytes = a.row_bytes;
  p.n = a.n;
  p.k = static_cast<int>(a.k);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const int variant = gemv_variant();
  if (variant == 0) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto dtag) {
    using T = typename decltype(dtag)::type;
    return gguf::dispatch_block(a.ggml_type, [&](auto btag) {
      using B = typename decltype(btag)::type;
      if (variant == 1) return gguf::launch_gemv<T, B>(p, static_cast<int>(a.m), s);
      return gguf::v2::launch_gemv_mma<T, B>(p, static_cast<int>(a.m), /*staged=*/false, s);
    });
  });
}

int gguf_dequantize(const GgufDequantizeArgs& a, ptr_t stream) {
  if (!weight_ok(a.ggml_type, a.weight, a.row_bytes, a.n, a.k)) return cudaErrorInvalidValue;
  if (a.out == 0 || a.out % 16 != 0 || a.ldo % 8 != 0 || a.ldo < a.k) {
    return cudaErrorInvalidValue;
  }
  if (a.n == 0) return cudaSuccess;
  gguf::DequantParams p{};
  p.out = reinterpret_cast<void*>(a.out);
  p.weight = reinterpret_cast<const uint8_t*>(a.weight);
  p.ldo = a.ldo;
  p.row_bytes = a.row_bytes;
  p.n = a.n;
  p.k = a.k;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto dtag) {
    using T = typename decltype(dtag)::type;
    return gguf::dispatch_block(a.ggml_type, [&](auto btag) {
      using B = typename decltype(btag)::type;
      return gguf::launch_dequantize<T, B>(p, s);
    });
  });
}

}  // namespace kestrel::api
