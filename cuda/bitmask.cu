// apply_token_bitmask: validates the arguments and launches the kernel for the logits' width.
#include "bitmask.cuh"
#include "kernels.h"

namespace kestrel::api {

namespace {

constexpr int kFp16 = 0, kBf16 = 1, kFp32 = 2;
constexpr uint16_t kNegInfFp16 = 0xFC00;
constexpr uint16_t kNegInfBf16 = 0xFF80;
constexpr uint32_t kNegInfFp32 = 0xFF800000u;

}  // namespace

int apply_token_bitmask(const TokenBitmaskArgs& a, ptr_t stream) {
  if (a.num_rows < 0 || a.num_rows > bitmask::kMaxRows) return cudaErrorInvalidValue;
  if (a.vocab < 1 || a.words < 1 || a.row_stride < a.vocab || a.num_logit_rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (a.logits_dtype != kFp16 && a.logits_dtype != kBf16 && a.logits_dtype != kFp32) {
    return cudaErrorInvalidValue;
  }
  if (a.num_rows == 0) return cudaSuccess;
  if (a.logits == 0 || a.rows == 0 || a.bitmask == 0) return cudaErrorInvalidValue;
  bitmask::Params p{};
  p.logits = reinterpret_cast<void*>(a.logits);
  p.row_stride = a.row_stride;
  p.num_logit_rows = a.num_logit_rows;
  p.vocab = a.vocab;
  p.rows = reinterpret_cast<const int64_t*>(a.rows);
  p.bitmask = reinterpret_cast<const int32_t*>(a.bitmask);
  p.words = a.words;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.logits_dtype) {
    case kFp32:
      return bitmask::launch<uint32_t, kNegInfFp32>(p, s, a.num_rows);
    case kFp16:
      return bitmask::launch<uint16_t, kNegInfFp16>(p, s, a.num_rows);
    default:
      return bitmask::launch<uint16_t, kNegInfBf16>(p, s, a.num_rows);
  }
}

}  // namespace kestrel::api
