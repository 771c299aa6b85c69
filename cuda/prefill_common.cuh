// Shared pieces of the paged prefill attention kernels (mma.sync and wgmma versions): the
// launch parameters, the tile scheduler, the online-softmax step on accumulator fragments and
// the output epilogue.
//
// Work unit: one (query tile of BM rows of one sequence, query head). Grid (tile slots, Hq):
// the tile slots are an upper bound on sum_i ceil(query_len_i / BM); each block finds its
// (sequence, tile) by a prefix sum over query_start_loc, and slots past the last tile exit.
// Slots are taken in reverse so the last (longest-context) tiles of a batch start first.
// Query j of sequence i sits at position seq_len_i - query_len_i + j and sees keys 0..that
// position (cached prefix plus the chunk's own earlier tokens).
//
// Fragment layout (mma.sync m16n8 accumulators, also wgmma m64nN per warp): with g = lane / 4,
// t = lane % 4, s[n][0..1] hold row g, columns 8n + 2t + {0, 1}; s[n][2..3] the same for row g + 8.
#pragma once

#include <cmath>

#include "common.cuh"

namespace kestrel::attention {

struct PrefillParams {
  const void* q;  // [num_tokens, Hq, D], token stride q_stride, head stride D
  int64_t q_stride;
  void* out;  // [num_tokens, Hq, D], token stride out_stride, head stride D
  int64_t out_stride;
  const void* key_cache;  // [num_blocks, block_size, Hkv, D] contiguous
  const void* value_cache;
  const int32_t* block_tables;  // [num_seqs, bt_stride]
  int64_t bt_stride;
  const int32_t* query_start_loc;  // [num_seqs + 1]; rows are relative to query_start_loc[0]
  const int32_t* seq_lens;         // [num_seqs]
  int num_seqs, num_q_heads, num_kv_heads, block_size;
  int block_shift;   // log2(block_size) when it is a power of two, else -1
  float scale_log2;  // softmax scale * log2(e) (* k_scale for an FP8 cache)
  float v_scale;     // the output is multiplied by it (1 unless the cache is FP8)
  int tile_slots;    // gridDim.x
};

// The query tile a block works on and the key range it needs.
struct PrefillTile {
  int seq;      // sequence index in the prefill batch
  int q_begin;  // first q/out row of the sequence
  int m0;       // first query of the tile within the sequence
  int rows;     // valid query rows in the tile (<= BM)
  int ctx0;     // position of the sequence's first query
  int kv_end;   // keys [0, kv_end) are visible to some row of the tile
};

// Finds this block's tile; returns false (uniformly across the block) for an unused slot.
// Uses warp 0 and two block barriers; every thread of the block must call it.
template <int BM>
__device__ __forceinline__ bool locate_tile(const PrefillParams& p, PrefillTile& t) {
  __shared__ int s_seq, s_tile;
  const int lane = threadIdx.x % 32;
  const int slot = p.tile_slots - 1 - static_cast<int>(blockIdx.x);
  if (threadIdx.x == 0) s_seq = -1;
  __syncthreads();
  if (threadIdx.x < 32) {
    int base = 0;
    for (int s0 = 0; s0 < p.num_seqs; s0 += 32) {
      const int s = s0 + lane;
      const int n =
          s < p.num_seqs ? (p.query_start_loc[s + 1] - p.query_start_loc[s] + BM - 1) / BM : 0;
      int incl = n;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      const int excl = incl - n;
      if (slot >= base + excl && slot < base + incl) {
        s_seq = s;
        s_tile = slot - base - excl;
      }
      base += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  t.seq = s_seq;
  if (t.seq < 0) return false;
  const int q_len = p.query_start_loc[t.seq + 1] - p.query_start_loc[t.seq];
  t.q_begin = p.query_start_loc[t.seq] - p.query_start_loc[0];
  t.m0 = s_tile * BM;
  t.rows = min(BM, q_len - t.m0);
  t.ctx0 = p.seq_lens[t.seq] - q_len;
  t.kv_end = t.ctx0 + t.m0 + t.rows;
  return true;
}

// Online-softmax update for a BN-key tile of raw scores s (NS = BN / 8 fragments) of this
// thread's two rows, at positions qpos0 and qpos0 + 8 (scale_log2 = softmax scale * log2(e) > 0;
// row_max is kept in the log2 domain): masks keys past each row's position when `masked`,
// updates row_max / row_sum, leaves the unnormalized probabilities in s and returns in alpha the
// factors by which the output accumulators must be rescaled. key0: position of the tile's first
// key. The caller guarantees every row sees at least one key in the first tile it processes (key 0
// is visible to all), so maxima are finite.
template <int NS>
__device__ __forceinline__ void softmax_scores(float (&s)[NS][4], float (&row_max)[2],
                                               float (&row_sum)[2], float (&alpha)[2], bool masked,
                                               int key0, int qpos0, float scale_log2) {
  if (masked) {  // only tiles that reach past some row's position pay for the mask
    const int key_t = key0 + 2 * (threadIdx.x % 4);
#pragma unroll
    for (int n = 0; n < NS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (key_t + n * 8 + (e & 1) > qpos0 + (e < 2 ? 0 : 8)) s[n][e] = -INFINITY;
      }
    }
  }
  // Raw-score maxima; scale_log2 > 0, so scaling commutes with max.
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
    mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  mx0 = fmaxf(row_max[0], mx0 * scale_log2);  // log2 domain
  mx1 = fmaxf(row_max[1], mx1 * scale_log2);
  alpha[0] = fast_exp2(row_max[0] - mx0);  // 0 on the first tile (row_max = -inf)
  alpha[1] = fast_exp2(row_max[1] - mx1);
  row_max[0] = mx0;
  row_max[1] = mx1;
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    s[n][0] = fast_exp2(fmaf(s[n][0], scale_log2, -mx0));
    s[n][1] = fast_exp2(fmaf(s[n][1], scale_log2, -mx0));
    s[n][2] = fast_exp2(fmaf(s[n][2], scale_log2, -mx1));
    s[n][3] = fast_exp2(fmaf(s[n][3], scale_log2, -mx1));
    sum0 += s[n][0] + s[n][1];
    sum1 += s[n][2] + s[n][3];
  }
  row_sum[0] = row_sum[0] * alpha[0] + sum0;
  row_sum[1] = row_sum[1] * alpha[1] + sum1;
}

// o (NO fragments of the thread's two rows) *= alpha of its row.
template <int NO>
__device__ __forceinline__ void rescale_rows(float (&o)[NO][4], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < NO; ++i) {
    o[i][0] *= alpha[0];
    o[i][1] *= alpha[0];
    o[i][2] *= alpha[1];
    o[i][3] *= alpha[1];
  }
}

// Normalizes o by the row sums (summed over the 4 threads of a row) and stores the thread's two
// rows: local row r0 = 16 * warp + lane / 4 and r0 + 8, written when < tile.rows.
template <typename T, int NO>
__device__ __forceinline__ void store_output(const PrefillParams& p, const PrefillTile& tile,
                                             int head, int r0, const float (&o)[NO][4],
                                             const float (&row_sum)[2]) {
  float l0 = row_sum[0], l1 = row_sum[1];
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = p.v_scale / l0, inv1 = p.v_scale / l1;
  using T2 = typename Pair<T>::type;
  T* out = static_cast<T*>(p.out) + head * (NO * 8) + 2 * (threadIdx.x % 4);
  if (r0 < tile.rows) {
    T* dst = out + static_cast<int64_t>(tile.q_begin + tile.m0 + r0) * p.out_stride;
#pragma unroll
    for (int i = 0; i < NO; ++i) {
      *reinterpret_cast<T2*>(dst + i * 8) =
          from_float2<T>(make_float2(o[i][0] * inv0, o[i][1] * inv0));
    }
  }
  if (r0 + 8 < tile.rows) {
    T* dst = out + static_cast<int64_t>(tile.q_begin + tile.m0 + r0 + 8) * p.out_stride;
#pragma unroll
    for (int i = 0; i < NO; ++i) {
      *reinterpret_cast<T2*>(dst + i * 8) =
          from_float2<T>(make_float2(o[i][2] * inv1, o[i][3] * inv1));
    }
  }
}

// Global element offset of key `pos` (< seq_len) of kv head kvh, 16-byte chunk c.
__device__ __forceinline__ int64_t kv_offset(const PrefillParams& p, const int32_t* bt, int pos,
                                             int kvh, int head_dim, int c) {
  const int b = p.block_shift >= 0 ? pos >> p.block_shift : pos / p.block_size;
  const int64_t row = static_cast<int64_t>(bt[b]) * p.block_size + (pos - b * p.block_size);
  return (row * p.num_kv_heads + kvh) * head_dim + c * 8;
}

}  // namespace kestrel::attention
