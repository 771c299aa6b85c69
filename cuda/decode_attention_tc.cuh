// Paged decode attention on tensor cores for large GQA groups (head_dim 64 or 128): the query
// heads that share a kv head are the 16 rows of an mma.sync m16n8k16 tile (rows past the group
// are zero), so K and V are read once per kv head and the per-token cost is two tensor-core
// instructions instead of one CUDA-core dot product and shuffle reduction per head.
//
// Same grid, split and merge contract as decode_attention.cuh (grid (kv_head x subgroup of up to
// 16 heads, sequence, split); each sequence's split length from its own seq_len,
// decode_split_len; partial outputs + log2-sum-exp when num_splits > 1). Each of the 4
// warps takes 16 tokens of every 64-token tile and streams its own slices through a per-warp
// STAGES-deep cp.async ring (XOR-swizzled rows for conflict-free ldmatrix), so only warp-level
// barriers run in the main loop. Each warp keeps an online softmax over its tokens; the warps
// are merged through shared memory at the end.
//
// An FP8 (e4m3) cache (KV = __nv_fp8_e4m3) streams its codes through the same per-warp ring
// (16 codes per 16-byte cp.async, unswizzled); before a tile's MMAs each lane widens the chunks
// it copied itself to T, exactly, into one per-warp swizzled K/V tile, which the ldmatrix calls
// read as for a 16-bit cache. k_scale rides in scale_log2, v_scale in the epilogue.
//
// Capturable in a CUDA graph: no host synchronization, no allocation.
#pragma once

#include <cmath>

#include "common.cuh"
#include "decode_attention.cuh"
#include "mma.cuh"

namespace kestrel::attention {

constexpr int kTcHeads = 16;  // query heads (mma rows) per block
constexpr int kTcSlice = 16;  // tokens per warp per tile
constexpr int kTcStages = 3;

template <int D, bool FP8 = false>
struct DecodeTcShape {
  static constexpr int CH = D / 8;                      // 16-byte chunks per row (16-bit)
  static constexpr int SLICE_BYTES = kTcSlice * D * 2;  // K (or V) of one warp slice, 16-bit
  static constexpr int WARP_STAGE = 2 * SLICE_BYTES;    // K and V
  // FP8: the ring holds codes (RAW_SLICE bytes per K or V slice); one widened tile (CONV
  // bytes, K and V) precedes it in each warp's region.
  static constexpr int RAW_CH = D / 16;  // 16-byte chunks per row of codes
  static constexpr int RAW_SLICE = kTcSlice * D;
  static constexpr int RAW_STAGE = 2 * RAW_SLICE;
  static constexpr int CONV = FP8 ? WARP_STAGE : 0;
  static constexpr int PER_WARP = FP8 ? CONV + kTcStages * RAW_STAGE : kTcStages * WARP_STAGE;
  static constexpr int RING = kDecodeWarps * PER_WARP;
  static constexpr int MERGE = kDecodeWarps * kTcHeads * (D + 2) * 4;
  static constexpr int SMEM = RING > MERGE ? RING : MERGE;
};

template <typename T, typename KV, int D>
__global__ void __launch_bounds__(kDecodeThreads, 2)
    decode_attention_tc_kernel(const DecodeParams p) {
  constexpr bool kFp8 = kIsFp8<KV>;
  using S = DecodeTcShape<D, kFp8>;
  constexpr int CH = S::CH;
  static_assert(D == 64 || D == 128, "the tensor-core decode handles head_dim 64 and 128");

  extern __shared__ __align__(128) unsigned char smem_tc[];
  __shared__ int table_s[kTableChunk];

  const int group = p.num_q_heads / p.num_kv_heads;
  const int sub_groups = (group + kTcHeads - 1) / kTcHeads;
  const int kvh = blockIdx.x / sub_groups;
  const int g0 = (blockIdx.x % sub_groups) * kTcHeads;
  const int nheads = min(kTcHeads, group - g0);
  const int qh0 = kvh * group + g0;  // query head of mma row 0
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int seq_len = p.seq_lens[seq];
  const int split_len = decode_split_len(seq_len, p.num_splits, p.min_split_len);
  const int start = split * split_len;
  const int end = min(seq_len, start + split_len);
  if (start >= end) return;  // empty split: the merge reads only non-empty splits

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;

  // Q as A fragments: row r = head qh0 + r (zero past nheads), k-step kk = dims 16 kk ...
  uint32_t qf[D / 16][4];
  {
    const T* q = static_cast<const T*>(p.q) + seq * p.q_stride + qh0 * D + 2 * t4;
    const bool lo = g < nheads, hi = g + 8 < nheads;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const T* r0 = q + g * D + kk * 16;
      const T* r1 = r0 + 8 * D;
      qf[kk][0] = lo ? *reinterpret_cast<const uint32_t*>(r0) : 0u;
      qf[kk][1] = hi ? *reinterpret_cast<const uint32_t*>(r1) : 0u;
      qf[kk][2] = lo ? *reinterpret_cast<const uint32_t*>(r0 + 8) : 0u;
      qf[kk][3] = hi ? *reinterpret_cast<const uint32_t*>(r1 + 8) : 0u;
    }
  }
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain; rows g and g + 8
  float row_sum[2] = {0.f, 0.f};              // this thread's share of its rows

  const KV* kc = static_cast<const KV*>(p.key_cache);
  const KV* vc = static_cast<const KV*>(p.value_cache);
  const int64_t row_elems = static_cast<int64_t>(p.num_kv_heads) * D;
  const int bs = p.block_size;
  const int32_t* bt = p.block_tables + seq * p.bt_stride;
  const int chunk_tokens = (kTableChunk - 1) * bs;
  // 16-bit: this warp's ring of K/V tiles. FP8: its widened tile, then its ring of codes.
  unsigned char* warp_smem = smem_tc + warp * S::PER_WARP;
  const uint32_t ring = mma::smem_addr(warp_smem) + S::CONV;
  // ldmatrix lane roles (mma.cuh): K rows for B of Q K^T, V rows (transposed) for P V.
  const int k_row = (lane & 7) + ((lane >> 4) << 3);
  const int k_chunk = (lane >> 3) & 1;
  const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
  const int v_chunk = lane >> 4;
  constexpr int kTile = kDecodeWarps * kTcSlice;  // tokens per block per iteration

  for (int c0 = start; c0 < end; c0 += chunk_tokens) {
    const int c1 = min(end, c0 + chunk_tokens);
    const int first_blk = c0 / bs;
    const int nblk = (c1 - 1) / bs - first_blk + 1;
    __syncthreads();  // the previous chunk's table is no longer read
    for (int i = threadIdx.x; i < nblk; i += kDecodeThreads) table_s[i] = bt[first_blk + i];
    __syncthreads();
    const int ntiles = (c1 - c0 + kTile - 1) / kTile;

    // Copies this warp's slice of tile t (K and V) into its stage t % kTcStages.
    auto issue = [&](int t) {
      if (kFp8 && t < ntiles) {  // codes, row r's chunk c at r * D + 16 c (no swizzle)
        const uint32_t stage = ring + (t % kTcStages) * S::RAW_STAGE;
        const int base = c0 + t * kTile + warp * kTcSlice;
        for (int i = lane; i < kTcSlice * S::RAW_CH; i += 32) {
          const int r = i / S::RAW_CH, c = i % S::RAW_CH;
          const int pos = base + r;
          const bool valid = pos < c1;
          int64_t off = 0;
          if (valid) {
            const int b = pos / bs;
            off = (static_cast<int64_t>(table_s[b - first_blk]) * bs + (pos - b * bs)) * row_elems +
                  static_cast<int64_t>(kvh) * D + c * 16;
          }
          const uint32_t at = r * D + c * 16;
          mma::cp_async16(stage + at, kc + off, valid);
          mma::cp_async16(stage + S::RAW_SLICE + at, vc + off, valid);
        }
      } else if (!kFp8 && t < ntiles) {
        const uint32_t stage = ring + (t % kTcStages) * S::WARP_STAGE;
        const int base = c0 + t * kTile + warp * kTcSlice;
        for (int i = lane; i < kTcSlice * CH; i += 32) {
          const int r = i / CH, c = i % CH;
          const int pos = base + r;
          const bool valid = pos < c1;
          int64_t off = 0;
          if (valid) {
            const int b = pos / bs;
            off = (static_cast<int64_t>(table_s[b - first_blk]) * bs + (pos - b * bs)) * row_elems +
                  static_cast<int64_t>(kvh) * D + c * 8;
          }
          const uint32_t at = r * D * 2 + ((c ^ (r & 7)) << 4);
          mma::cp_async16(stage + at, kc + off, valid);
          mma::cp_async16(stage + S::SLICE_BYTES + at, vc + off, valid);
        }
      }
      mma::cp_async_commit();
    };
    // FP8: widens the codes of tile t this lane copied (the same chunks as in issue) into the
    // warp's swizzled 16-bit tile, chunk c of the codes becoming 16-bit chunks 2c and 2c + 1.
    auto widen = [&](int t) {
      if constexpr (kFp8) {
        const unsigned char* raw = warp_smem + S::CONV + (t % kTcStages) * S::RAW_STAGE;
        for (int i = lane; i < kTcSlice * S::RAW_CH; i += 32) {
          const int r = i / S::RAW_CH, c = i % S::RAW_CH;
          const int at0 = r * D * 2 + (((2 * c) ^ (r & 7)) << 4);
          const int at1 = r * D * 2 + (((2 * c + 1) ^ (r & 7)) << 4);
#pragma unroll
          for (int kv = 0; kv < 2; ++kv) {  // K, then V
            const uint4 codes =
                *reinterpret_cast<const uint4*>(raw + kv * S::RAW_SLICE + r * D + c * 16);
            unsigned char* dst = warp_smem + kv * S::SLICE_BYTES;
            *reinterpret_cast<uint4*>(dst + at0) = fp8x8_to<T>(make_uint2(codes.x, codes.y));
            *reinterpret_cast<uint4*>(dst + at1) = fp8x8_to<T>(make_uint2(codes.z, codes.w));
          }
        }
      }
    };
#pragma unroll
    for (int t = 0; t < kTcStages - 1; ++t) issue(t);

    for (int t = 0; t < ntiles; ++t) {
      mma::cp_async_wait<kTcStages - 2>();
      __syncwarp();  // the warp's copies of tile t are visible; tile t - 1 is no longer read
      issue(t + kTcStages - 1);
      uint32_t kb;
      if constexpr (kFp8) {
        widen(t);      // this lane's own copies of tile t have landed (the wait above)
        __syncwarp();  // the widened tile is visible to the warp
        kb = mma::smem_addr(warp_smem);
      } else {
        kb = ring + (t % kTcStages) * S::WARP_STAGE;
      }
      const uint32_t vb = kb + S::SLICE_BYTES;
      const int base = c0 + t * kTile + warp * kTcSlice;

      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // 16 heads x 16 tokens
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t b[4];
        const int chunk = 2 * kk + k_chunk;
        mma::ldmatrix_x4(b, kb + k_row * D * 2 + ((chunk ^ (k_row & 7)) << 4));
        mma::mma_16816<T>(s[0], qf[kk], b[0], b[1]);
        mma::mma_16816<T>(s[1], qf[kk], b[2], b[3]);
      }
      // Mask tokens past the chunk; online softmax over the slice (rows g, g + 8).
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int pos = base + n * 8 + 2 * t4 + (e & 1);
          s[n][e] = pos < c1 ? s[n][e] * p.scale_log2 : -INFINITY;
        }
        mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
        mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      mx0 = fmaxf(mx0, row_max[0]);
      mx1 = fmaxf(mx1, row_max[1]);
      // A warp's slices can all lie past the context (short sequences): keep -inf rows inert.
      const float alpha0 = mx0 == -INFINITY ? 1.f : fast_exp2(row_max[0] - mx0);
      const float alpha1 = mx1 == -INFINITY ? 1.f : fast_exp2(row_max[1] - mx1);
      const float sub0 = mx0 == -INFINITY ? 0.f : mx0;
      const float sub1 = mx1 == -INFINITY ? 0.f : mx1;
      row_max[0] = mx0;
      row_max[1] = mx1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        s[n][0] = fast_exp2(s[n][0] - sub0);
        s[n][1] = fast_exp2(s[n][1] - sub0);
        s[n][2] = fast_exp2(s[n][2] - sub1);
        s[n][3] = fast_exp2(s[n][3] - sub1);
        sum0 += s[n][0] + s[n][1];
        sum1 += s[n][2] + s[n][3];
      }
      row_sum[0] = row_sum[0] * alpha0 + sum0;
      row_sum[1] = row_sum[1] * alpha1 + sum1;
      uint32_t a[4];
      a[0] = mma::pack2<T>(s[0][0], s[0][1]);
      a[1] = mma::pack2<T>(s[0][2], s[0][3]);
      a[2] = mma::pack2<T>(s[1][0], s[1][1]);
      a[3] = mma::pack2<T>(s[1][2], s[1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        o[2 * dn][0] *= alpha0;
        o[2 * dn][1] *= alpha0;
        o[2 * dn][2] *= alpha1;
        o[2 * dn][3] *= alpha1;
        o[2 * dn + 1][0] *= alpha0;
        o[2 * dn + 1][1] *= alpha0;
        o[2 * dn + 1][2] *= alpha1;
        o[2 * dn + 1][3] *= alpha1;
        uint32_t b[4];
        const int chunk = 2 * dn + v_chunk;
        mma::ldmatrix_x4_trans(b, vb + v_row * D * 2 + ((chunk ^ (v_row & 7)) << 4));
        mma::mma_16816<T>(o[2 * dn], a, b[0], b[1]);
        mma::mma_16816<T>(o[2 * dn + 1], a, b[2], b[3]);
      }
    }
    mma::cp_async_wait<0>();
  }

  // Merge the 4 warps: per row, rescale each warp's (max, sum, output) to the common max.
  float l0 = row_sum[0], l1 = row_sum[1];
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  __syncthreads();                                   // the ring is reused for the merge
  float* red_m = reinterpret_cast<float*>(smem_tc);  // [warps][16]
  float* red_l = red_m + kDecodeWarps * kTcHeads;    // [warps][16]
  float* red_o = red_l + kDecodeWarps * kTcHeads;    // [warps][16][D]
  if (t4 == 0) {
    red_m[warp * kTcHeads + g] = row_max[0];
    red_m[warp * kTcHeads + g + 8] = row_max[1];
    red_l[warp * kTcHeads + g] = l0;
    red_l[warp * kTcHeads + g + 8] = l1;
  }
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    float* r0 = red_o + (warp * kTcHeads + g) * D + i * 8 + 2 * t4;
    r0[0] = o[i][0];
    r0[1] = o[i][1];
    r0[8 * D] = o[i][2];
    r0[8 * D + 1] = o[i][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nheads * D; i += kDecodeThreads) {
    const int h = i / D;
    const int d = i - h * D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, red_m[w * kTcHeads + h]);
    float sum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float wm = red_m[w * kTcHeads + h];
      const float wt = wm == -INFINITY ? 0.f : fast_exp2(wm - mx);
      sum += red_l[w * kTcHeads + h] * wt;
      acc += red_o[(w * kTcHeads + h) * D + d] * wt;
    }
    store_decode_result<T>(p, split, seq, qh0 + h, D, d, acc, mx, sum);
  }
}

template <typename T, typename KV, int D>
cudaError_t launch_decode_tc(const DecodeParams& p, cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const dim3 grid(p.num_kv_heads * ((group + kTcHeads - 1) / kTcHeads), p.num_seqs, p.num_splits);
  constexpr int smem = DecodeTcShape<D, kIsFp8<KV>>::SMEM;
  cudaError_t err = cudaFuncSetAttribute(decode_attention_tc_kernel<T, KV, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  decode_attention_tc_kernel<T, KV, D><<<grid, kDecodeThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  decode_merge_kernel<T, D><<<dim3(p.num_q_heads, p.num_seqs), D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename KV, int D>
int decode_tc_blocks_per_sm() {
  int blocks = 0;
  constexpr int smem = DecodeTcShape<D, kIsFp8<KV>>::SMEM;
  if (cudaFuncSetAttribute(decode_attention_tc_kernel<T, KV, D>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return 0;
  }
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, decode_attention_tc_kernel<T, KV, D>, kDecodeThreads, smem);
  return err == cudaSuccess ? blocks : 0;
}

}  // namespace kestrel::attention
