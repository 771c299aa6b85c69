// Paged decode attention: one query token per sequence over a paged KV cache.
//
// Grid (kv_head x query-head subgroup, sequence, split). A block serves up to G query heads
// that share one kv head, so each K/V row is read once for all of them (GQA). The host plans
// num_splits (the grid's z size) for the batch's longest context when the batch alone would not
// fill the GPU; each sequence then cuts its own context into splits on the device, from its real
// seq_len (decode_split_len: even splits of at least min_split_len tokens), so a short context
// uses few splits and the blocks of its empty splits return at once (a captured graph planned for
// the longest context it serves stays parallel for short ones). Each non-empty split writes its
// normalized partial output and log2-sum-exp to a workspace, and a merge kernel combines the
// sequence's non-empty splits. With one split the block writes the output directly.
//
// Inside a block: each token is read by LPT = D / 8 lanes (16 bytes each), so a warp handles
// 32 / LPT tokens per step (a "token slot" per lane group) and a tile of TILE = slots * U tokens
// per iteration. Every thread copies exactly the 16-byte K/V chunks it will read itself, with
// cp.async into a STAGES-deep shared-memory ring, so loads run STAGES - 1 tiles ahead of the
// math with no block barrier (only per-thread cp.async waits). Each token slot keeps its own
// online-softmax state (max, sum, 8 accumulators per head); the slots are merged through shared
// memory at the end (reusing the ring).
//
// The cache element type KV is T or float8 e4m3 (kIsFp8): an FP8 lane chunk is 8 bytes (8
// codes, an 8-byte cp.async), converted to fp32 in registers; k_scale is folded into the query
// (scale_log2 carries it) and v_scale into the output (DecodeParams::v_scale).
//
// Capturable in a CUDA graph: no host synchronization, no allocation; the launch shape depends
// only on (num_seqs, heads, num_splits), all fixed by the caller.
#pragma once

#include <cmath>

#include "common.cuh"
#include "mma.cuh"

namespace kestrel::attention {

struct DecodeParams {
  const void* q;  // [num_seqs, Hq, D], token stride q_stride, head stride D
  int64_t q_stride;
  void* out;  // [num_seqs, Hq, D], token stride out_stride, head stride D
  int64_t out_stride;
  const void* key_cache;  // [num_blocks, block_size, Hkv, D] contiguous
  const void* value_cache;
  const int32_t* block_tables;  // [num_seqs, bt_stride]
  int64_t bt_stride;
  const int32_t* seq_lens;  // [num_seqs], each >= 1
  int num_seqs, num_q_heads, num_kv_heads, block_size;
  float scale_log2;     // softmax scale * log2(e)
  int heads_per_block;  // G: query heads per block (1, 2, 4 or 8), the kernel template
  int num_splits;       // >= 1: splits per sequence in the grid (planned for the longest)
  int min_split_len;    // >= 1: the shortest split of a sequence (see decode_split_len)
  float* partial_out;   // [num_splits, num_seqs, Hq, D] fp32 (num_splits > 1 only)
  float* partial_lse;   // [num_splits, num_seqs, Hq] fp32, log2 domain
  float v_scale;        // the output is multiplied by it (1 unless the cache is FP8)
};

// Tokens per split of a sequence of seq_len tokens over num_splits splits: even splits, none
// shorter than min_split_len, so the sequence fills decode_valid_splits() <= num_splits splits
// (their union is [0, seq_len), each token in exactly one) and the rest are empty. Split
// starts are not rounded to KV blocks: the loops address each token through the block table on
// its own, so alignment buys nothing, and the longest sequence keeps the host's split length.
// Mirrored in Python by kestrel.ops.attention_cuda.decode_split_len (its tests check coverage).
__host__ __device__ __forceinline__ int decode_split_len(int seq_len, int num_splits,
                                                         int min_split_len) {
  const int even = static_cast<int>((static_cast<int64_t>(seq_len) + num_splits - 1) / num_splits);
  return even > min_split_len ? even : min_split_len;
}

// Non-empty splits of a sequence: ceil(seq_len / split_len), at most num_splits.
__host__ __device__ __forceinline__ int decode_valid_splits(int seq_len, int split_len) {
  return (seq_len + split_len - 1) / split_len;
}

// Epilogue of one (sequence, query head, split) for output element d: the normalized output when
// the sequence is not split, else the fp32 partial output and its log2-domain LSE for the merge.
template <typename T>
__device__ __forceinline__ void store_decode_result(const DecodeParams& p, int split, int seq,
                                                    int h, int D, int d, float o, float mx,
                                                    float sum) {
  o *= p.v_scale;  // an FP8 cache's V codes are V / v_scale (the merge is linear in o)
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + seq * p.out_stride + h * D + d;
    *out = from_float<T>(o / sum);
  } else {
    const int64_t row = (static_cast<int64_t>(split) * p.num_seqs + seq) * p.num_q_heads + h;
    p.partial_out[row * D + d] = o / sum;
    if (d == 0) p.partial_lse[row] = mx + __log2f(sum);
  }
}

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kTableChunk = 1024;  // block-table entries staged in shared memory at a time

// EB: bytes per cache element (2: T, 1: float8 e4m3).
template <int D, int G, int EB = 2>
struct DecodeShape {
  static constexpr int LPT = D / 8;                      // lanes per token
  static constexpr int TPW = 32 / LPT;                   // tokens per warp per step
  static constexpr int SLOTS = kDecodeWarps * TPW;       // token slots per block
  static constexpr int U = 4;                            // tokens per slot per tile
  static constexpr int TILE = SLOTS * U;                 // tokens per tile (stage)
  static constexpr int STAGES = G >= 8 ? 4 : 3;          // 2 blocks/SM at G = 8, 3-4 below
  static constexpr int CHUNK = 8 * EB;                   // bytes a lane copies per token
  static constexpr int STAGE_BYTES = TILE * D * EB * 2;  // K and V: 16 KB (8 KB for FP8)
  static constexpr int MERGE_BYTES = SLOTS * G * (D + 2) * 4;
  static constexpr int SMEM =
      STAGES * STAGE_BYTES > MERGE_BYTES ? STAGES * STAGE_BYTES : MERGE_BYTES;
};

template <typename T, typename KV, int D, int G>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_kernel(const DecodeParams p) {
  using S = DecodeShape<D, G, sizeof(KV)>;
  constexpr int EB = sizeof(KV);
  constexpr int LPT = S::LPT, TPW = S::TPW, SLOTS = S::SLOTS, U = S::U, TILE = S::TILE;
  constexpr int STAGES = S::STAGES;
  static_assert(D % 64 == 0 && D <= 256, "head_dim must be 64, 128 or 256");

  extern __shared__ __align__(16) unsigned char smem_decode[];
  __shared__ int table_s[kTableChunk];

  const int group = p.num_q_heads / p.num_kv_heads;
  const int sub_groups = (group + G - 1) / G;
  const int kvh = blockIdx.x / sub_groups;
  const int g0 = (blockIdx.x % sub_groups) * G;
  const int nheads = min(G, group - g0);
  const int qh0 = kvh * group + g0;  // first query head of this block
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int seq_len = p.seq_lens[seq];
  const int split_len = decode_split_len(seq_len, p.num_splits, p.min_split_len);
  const int start = split * split_len;
  const int end = min(seq_len, start + split_len);
  if (start >= end) return;  // empty split: the merge reads only non-empty splits

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int lt = lane % LPT;                 // this lane's 8-element chunk of the head
  const int slot = warp * TPW + lane / LPT;  // this lane's token slot

  // q, pre-multiplied by scale * log2(e) so scores are in the log2 domain.
  float qv[G][8];
  const T* q = static_cast<const T*>(p.q) + seq * p.q_stride + lt * 8;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < nheads) {
      load_vec<T, 8>(q + (qh0 + g) * D, qv[g]);
#pragma unroll
      for (int j = 0; j < 8; ++j) qv[g][j] *= p.scale_log2;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) qv[g][j] = 0.f;
    }
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
  }

  const KV* kc = static_cast<const KV*>(p.key_cache);
  const KV* vc = static_cast<const KV*>(p.value_cache);
  const int64_t head_off = static_cast<int64_t>(kvh) * D + lt * 8;
  const int64_t row_elems = static_cast<int64_t>(p.num_kv_heads) * D;  // one cache row (token)
  const int bs = p.block_size;
  const int32_t* bt = p.block_tables + seq * p.bt_stride;
  const int chunk_tokens = (kTableChunk - 1) * bs;  // any chunk spans <= kTableChunk blocks
  const uint32_t ring = mma::smem_addr(smem_decode);
  // This thread's chunk of token u of a tile, within a stage; V follows K by TILE * D * EB bytes.
  const uint32_t my_off = static_cast<uint32_t>(slot * D * EB + lt * S::CHUNK);

  for (int c0 = start; c0 < end; c0 += chunk_tokens) {
    const int c1 = min(end, c0 + chunk_tokens);
    const int first_blk = c0 / bs;
    const int nblk = (c1 - 1) / bs - first_blk + 1;
    __syncthreads();  // the previous chunk's table is no longer read
    for (int i = threadIdx.x; i < nblk; i += kDecodeThreads) table_s[i] = bt[first_blk + i];
    __syncthreads();
    const int ntiles = (c1 - c0 + TILE - 1) / TILE;

    // Copies this thread's chunks of tile t into stage t % STAGES (zero-filled past c1).
    auto issue = [&](int t) {
      if (t < ntiles) {
        const uint32_t stage = ring + (t % STAGES) * S::STAGE_BYTES + my_off;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int pos = c0 + t * TILE + u * SLOTS + slot;
          const bool valid = pos < c1;
          int64_t off = 0;
          if (valid) {
            const int b = pos / bs;
            off = (static_cast<int64_t>(table_s[b - first_blk]) * bs + (pos - b * bs)) * row_elems +
                  head_off;
          }
          const uint32_t dst = stage + u * SLOTS * D * EB;
          if constexpr (kIsFp8<KV>) {
            mma::cp_async8(dst, kc + off, valid);
            mma::cp_async8(dst + TILE * D * EB, vc + off, valid);
          } else {
            mma::cp_async16(dst, kc + off, valid);
            mma::cp_async16(dst + TILE * D * EB, vc + off, valid);
          }
        }
      }
      mma::cp_async_commit();  // possibly empty: keeps the group count uniform
    };
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) issue(t);

    for (int t = 0; t < ntiles; ++t) {
      mma::cp_async_wait<STAGES - 2>();  // tile t landed (this thread's own copies)
      issue(t + STAGES - 1);             // into the stage of tile t - 1, already consumed
      const unsigned char* stage = smem_decode + (t % STAGES) * S::STAGE_BYTES + my_off;
      const int p0 = c0 + t * TILE;
      float s[U][G];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        ok[u] = p0 + u * SLOTS + slot < c1;
        float kf[8];
        load_kv8<T, KV>(stage + u * SLOTS * D * EB, kf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float d = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) d = fmaf(qv[g][j], kf[j], d);
          s[u][g] = d;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float total = group_sum<LPT>(s[u][g]);  // every lane of the token gets it
          s[u][g] = ok[u] ? total : -INFINITY;
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float mx = m[g];
#pragma unroll
        for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][g]);
        // mx == -inf only when this slot has seen no token yet; keep the state as it is.
        const float scale_old = mx == -INFINITY ? 1.f : fast_exp2(m[g] - mx);
        m[g] = mx;
        l[g] *= scale_old;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] *= scale_old;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float vf[8];
        load_kv8<T, KV>(stage + u * SLOTS * D * EB + TILE * D * EB, vf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float pr = ok[u] ? fast_exp2(s[u][g] - m[g]) : 0.f;
          l[g] += pr;
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(pr, vf[j], acc[g][j]);
        }
      }
    }
    mma::cp_async_wait<0>();  // only empty groups remain; the next chunk starts clean
  }

  // Merge the token slots of this block through shared memory (reusing the ring).
  __syncthreads();
  float* red_m = reinterpret_cast<float*>(smem_decode);  // [SLOTS][G]
  float* red_l = red_m + SLOTS * G;                      // [SLOTS][G]
  float* red_acc = red_l + SLOTS * G;                    // [SLOTS][G][D], 16-byte aligned
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lt == 0) {
      red_m[slot * G + g] = m[g];
      red_l[slot * G + g] = l[g];
    }
    float4* dst = reinterpret_cast<float4*>(red_acc + (slot * G + g) * D + lt * 8);
    dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nheads * D; i += kDecodeThreads) {
    const int g = i / D;
    const int d = i - g * D;
    float mx = -INFINITY;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) mx = fmaxf(mx, red_m[s * G + g]);
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      const float w = fast_exp2(red_m[s * G + g] - mx);  // 0 for slots that saw no token
      sum += red_l[s * G + g] * w;
      o += red_acc[(s * G + g) * D + d] * w;
    }
    store_decode_result<T>(p, split, seq, qh0 + g, D, d, o, mx, sum);
  }
}

// Combines the non-empty splits of each (sequence, query head): the same per-sequence split
// length as the attention kernels, so the same splits. Grid (Hq, num_seqs), D threads.
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(const DecodeParams p) {
  const int h = blockIdx.x;
  const int seq = blockIdx.y;
  const int seq_len = p.seq_lens[seq];
  const int split_len = decode_split_len(seq_len, p.num_splits, p.min_split_len);
  const int nvalid = min(p.num_splits, decode_valid_splits(seq_len, split_len));
  const int64_t stride = static_cast<int64_t>(p.num_seqs) * p.num_q_heads;  // rows per split
  const int64_t row0 = static_cast<int64_t>(seq) * p.num_q_heads + h;
  float mx = -INFINITY;
  for (int s = 0; s < nvalid; ++s) mx = fmaxf(mx, p.partial_lse[s * stride + row0]);
  float sum = 0.f, o = 0.f;
  for (int s = 0; s < nvalid; ++s) {
    const float w = fast_exp2(p.partial_lse[s * stride + row0] - mx);
    sum += w;
    o += w * p.partial_out[(s * stride + row0) * D + threadIdx.x];
  }
  T* out = static_cast<T*>(p.out) + seq * p.out_stride + h * D + threadIdx.x;
  *out = from_float<T>(o / sum);
}

template <typename T, typename KV, int D, int G>
cudaError_t launch_decode_g(const DecodeParams& p, cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const dim3 grid(p.num_kv_heads * ((group + G - 1) / G), p.num_seqs, p.num_splits);
  constexpr int smem = DecodeShape<D, G, sizeof(KV)>::SMEM;
  cudaError_t err = cudaFuncSetAttribute(decode_attention_kernel<T, KV, D, G>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  decode_attention_kernel<T, KV, D, G><<<grid, kDecodeThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  decode_merge_kernel<T, D><<<dim3(p.num_q_heads, p.num_seqs), D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename KV, int D>
cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.block_size <= 0 ||
      p.num_splits < 1 || p.min_split_len < 1 || p.num_seqs > 65535 || p.num_splits > 65535) {
    return cudaErrorInvalidValue;
  }
  switch (p.heads_per_block) {
    case 1:
      return launch_decode_g<T, KV, D, 1>(p, stream);
    case 2:
      return launch_decode_g<T, KV, D, 2>(p, stream);
    case 4:
      return launch_decode_g<T, KV, D, 4>(p, stream);
    case 8:
      return launch_decode_g<T, KV, D, 8>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Resident decode blocks per multiprocessor for this (dtype, head_dim, heads per block), 0 on
// error.
template <typename T, typename KV, int D, int G>
int decode_blocks_per_sm_g() {
  int blocks = 0;
  constexpr int smem = DecodeShape<D, G, sizeof(KV)>::SMEM;
  if (cudaFuncSetAttribute(decode_attention_kernel<T, KV, D, G>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    return 0;
  }
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, decode_attention_kernel<T, KV, D, G>, kDecodeThreads, smem);
  return err == cudaSuccess ? blocks : 0;
}

template <typename T, typename KV, int D>
int decode_blocks_per_sm(int heads_per_block) {
  switch (heads_per_block) {
    case 1:
      return decode_blocks_per_sm_g<T, KV, D, 1>();
    case 2:
      return decode_blocks_per_sm_g<T, KV, D, 2>();
    case 4:
      return decode_blocks_per_sm_g<T, KV, D, 4>();
    case 8:
      return decode_blocks_per_sm_g<T, KV, D, 8>();
    default:
      return 0;
  }
}

}  // namespace kestrel::attention
