// Paged prefill attention for Hopper (sm_90a) with warpgroup MMA (wgmma), head_dim 64 and 128.
//
// A block of NWG warpgroups (128 threads each) owns a tile of BM = 64 NWG query rows of one
// (sequence, head) (decomposition in prefill_common.cuh); warpgroup w owns rows 64 w .. 64 w + 63
// and all warpgroups share the BN-key K/V tiles in shared memory. Shapes (Sm90Shape, measured on
// the H100, docs/performance.md): head_dim 128 runs NWG 2, BN 128 (one block per SM, 8 warps);
// head_dim 64 runs NWG 1, BN 64 (two blocks per SM). Q lives in registers (A fragments). Per
// key tile j, in each warpgroup:
//   S_j = Q K_j^T   wgmma m64nBNk16, K from shared memory (K-major, 128-byte swizzle)
//   softmax         fp32 registers (the mma.sync accumulator layout, see wgmma.cuh); maxima and
//                   sums reduced as trees so their fixed-latency dependencies overlap
//   O += P_j V_j    wgmma m64nDk16, P from registers, V from shared memory (N-major)
// Software pipeline: S_{j+1} and P_j V_j are issued together, the softmax of S_{j+1} runs while
// P_j V_j is still on the tensor cores, and only the rescale of O waits for it. K/V tiles are
// gathered from the paged cache with cp.async by all threads into a 3-stage ring (tile t in
// stage t % 3; rows past the visible range zero-filled), issued two tiles ahead; the
// block-table entries of a tile are read one iteration before its copies are issued.
//
// Shared-memory tiles hold [rows][D] as D / 64 column blocks of [rows][64] (128 bytes a row),
// 16-byte chunk c of row r at chunk c ^ (r % 8): the wgmma 128-byte swizzle. The Q tile is
// staged in stage 2 during the prologue, before tile 2 is loaded there.
//
// An FP8 (e4m3) cache (KV = __nv_fp8_e4m3) goes through a 3-stage ring of codes instead (16
// codes per cp.async, rows unswizzled), and two 16-bit stages hold the widened tiles the wgmma
// reads: after the barrier that frees widened stage (j + 1) % 2 (every warpgroup is past
// P_{j-1} V_{j-1}), each thread widens the codes of tile j + 1 it copied itself, exactly, then
// a proxy fence and a barrier precede S_{j+1}. k_scale rides in scale_log2, v_scale in the
// epilogue (PrefillParams). Q is staged in widened stage 1 during the prologue.
//
// Capturable in a CUDA graph: no host synchronization, no allocation.
#pragma once

#include "common.cuh"
#include "mma.cuh"
#include "prefill_common.cuh"
#include "wgmma.cuh"

namespace kestrel::attention {

constexpr int kSm90Stages = 3;

// Block shape the launcher uses for head dim D: warpgroups per block and key-tile rows. On the
// H100 (4k tokens, causal, Hkv 8) head_dim 128 ran 1.16x faster with (2, 128) than with (1, 64)
// and 1.08x faster than with (2, 64); head_dim 64 ran fastest with (1, 64), 1.22x faster than (2,
// 64) and 1.10x faster than (2, 128). (2, 128) takes 246 registers a thread (one block per SM).
template <int D>
struct Sm90Shape {
  static constexpr int kWarpgroups = D == 128 ? 2 : 1;
  static constexpr int kBN = D == 128 ? 128 : 64;
};

template <int D, int BN>
__host__ __device__ constexpr int sm90_stage_bytes() {
  return 2 * BN * D * 2;  // K and V tiles, 16-bit
}

// FP8: two widened 16-bit stages, then kSm90Stages stages of codes (K and V, 1 byte each).
template <int D, int BN, bool FP8 = false>
__host__ __device__ constexpr int sm90_smem_bytes() {
  return (FP8 ? 2 * sm90_stage_bytes<D, BN>() + kSm90Stages * 2 * BN * D
              : kSm90Stages * sm90_stage_bytes<D, BN>()) +
         1024;  // slack for 1 KB alignment
}

// Byte offset of 16-byte chunk c (of D / 8) of row r in a swizzled [ROWS][D] tile.
template <int ROWS>
__device__ __forceinline__ uint32_t sw128(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * (ROWS * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// In-place pairwise reduction of v[0..N) into v[0] (N a power of two), depth log2(N).
template <int N, typename Op>
__device__ __forceinline__ void tree_reduce(float (&v)[N], Op op) {
  if constexpr (N > 1) {
#pragma unroll
    for (int n = 0; n < N / 2; ++n) v[n] = op(v[n], v[n + N / 2]);
    tree_reduce<N / 2>(reinterpret_cast<float (&)[N / 2]>(v), op);
  }
}

// softmax_scores (prefill_common.cuh) with the row maxima and sums reduced as trees instead of
// serial chains, so the fixed-latency FMNMX / FADD dependencies overlap. Same contract.
template <int NS>
__device__ __forceinline__ void softmax_scores_tree(float (&s)[NS][4], float (&row_max)[2],
                                                    float (&row_sum)[2], float (&alpha)[2],
                                                    bool masked, int key0, int qpos0,
                                                    float scale_log2) {
  static_assert((NS & (NS - 1)) == 0, "NS must be a power of two");
  if (masked) {
    const int key_t = key0 + 2 * (threadIdx.x % 4);
#pragma unroll
    for (int n = 0; n < NS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (key_t + n * 8 + (e & 1) > qpos0 + (e < 2 ? 0 : 8)) s[n][e] = -INFINITY;
      }
    }
  }
  float m0[NS], m1[NS];
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    m0[n] = fmaxf(s[n][0], s[n][1]);
    m1[n] = fmaxf(s[n][2], s[n][3]);
  }
  const auto max_op = [](float a, float b) { return fmaxf(a, b); };
  tree_reduce(m0, max_op);
  tree_reduce(m1, max_op);
  float mx0 = m0[0], mx1 = m1[0];
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  mx0 = fmaxf(row_max[0], mx0 * scale_log2);  // log2 domain
  mx1 = fmaxf(row_max[1], mx1 * scale_log2);
  alpha[0] = fast_exp2(row_max[0] - mx0);  // 0 on the first tile (row_max = -inf)
  alpha[1] = fast_exp2(row_max[1] - mx1);
  row_max[0] = mx0;
  row_max[1] = mx1;
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    s[n][0] = fast_exp2(fmaf(s[n][0], scale_log2, -mx0));
    s[n][1] = fast_exp2(fmaf(s[n][1], scale_log2, -mx0));
    s[n][2] = fast_exp2(fmaf(s[n][2], scale_log2, -mx1));
    s[n][3] = fast_exp2(fmaf(s[n][3], scale_log2, -mx1));
    m0[n] = s[n][0] + s[n][1];
    m1[n] = s[n][2] + s[n][3];
  }
  const auto add_op = [](float a, float b) { return a + b; };
  tree_reduce(m0, add_op);
  tree_reduce(m1, add_op);
  row_sum[0] = fmaf(row_sum[0], alpha[0], m0[0]);
  row_sum[1] = fmaf(row_sum[1], alpha[1], m1[0]);
}

template <typename T, typename KV, int D, int NWG, int BN>
__global__ void __launch_bounds__(128 * NWG, NWG == 1 ? 2 : 1)
    prefill_attention_sm90_kernel(const PrefillParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kFp8 = kIsFp8<KV>;
  constexpr int NT = 128 * NWG;                           // threads
  constexpr int BM = 64 * NWG;                            // query rows of the block
  constexpr int CH = D / 8;                               // 16-byte chunks per row (16-bit)
  constexpr uint32_t kStage = sm90_stage_bytes<D, BN>();  // multiple of 1024
  constexpr uint32_t kKBytes = BN * D * 2;
  // 16-byte chunks per row a thread copies: of T, or of codes (FP8).
  constexpr int kCH = kFp8 ? D / 16 : CH;
  constexpr uint32_t kRawStage = 2 * BN * D;  // FP8: K and V codes of one tile
  constexpr int kLoads = BN * kCH / NT;  // 16-byte chunks of K (and of V) a thread copies a tile
  constexpr int kRowStep = NT / kCH;     // rows between a thread's chunks
  static_assert(D == 64 || D == 128, "the wgmma kernel handles head_dim 64 and 128");
  static_assert(BN == 64 || BN == 128, "key tiles of 64 or 128");
  static_assert(BM * D * 2 <= kStage, "the Q tile is staged in one K/V stage");
  static_assert(NT % kCH == 0 && (BN * kCH) % NT == 0, "whole rows per copy round");

  extern __shared__ __align__(128) unsigned char smem_sm90[];
  const uint32_t stage0 = (mma::smem_addr(smem_sm90) + 1023) & ~1023u;  // 1 KB-aligned atoms
  // 16-bit: tile t in stage t % 3, Q staged in stage 2. FP8: tile t widened into stage t % 2,
  // its codes in raw stage t % 3 (after the two widened stages), Q staged in stage 1.
  const uint32_t q_s = stage0 + (kFp8 ? 1 : 2) * kStage;  // prologue only
  const uint32_t raw0 = stage0 + 2 * kStage;              // FP8 only
  unsigned char* const smem_gen = smem_sm90 + (stage0 - mma::smem_addr(smem_sm90));
  // Byte address of tile j's widened (FP8) or copied (16-bit) stage.
  auto tile_stage = [&](int j) -> uint32_t {
    return stage0 + (kFp8 ? j % 2 : j % kSm90Stages) * kStage;
  };

  const int tid = threadIdx.x;
  const int warp = tid / 32;  // warp w of the block: rows 16 w .. 16 w + 15 (warpgroup w / 4)
  const int lane = tid % 32;

  PrefillTile tile;
  if (!locate_tile<BM>(p, tile)) return;  // uniform across the block
  const int head = blockIdx.y;
  const int kvh = head / (p.num_q_heads / p.num_kv_heads);
  const int n_tiles = (tile.kv_end + BN - 1) / BN;
  // Tiles >= this may hold keys hidden from some row of this thread's warpgroup.
  const int first_masked = (tile.ctx0 + tile.m0 + 64 * (warp / 4)) / BN;

  const T* qg = static_cast<const T*>(p.q);
  const KV* kg = static_cast<const KV*>(p.key_cache);
  const KV* vg = static_cast<const KV*>(p.value_cache);
  const int32_t* bt = p.block_tables + tile.seq * p.bt_stride;

  // Copy work: thread tid copies chunk ld_c of rows ld_r + i kRowStep (i < kLoads) of a tile.
  // The block-table entries of a tile are fetched (fetch_blocks) well before the copies are
  // issued (issue_kv), so the table loads' latency hides behind the softmax.
  const int ld_c = tid % kCH, ld_r = tid / kCH;
  int blk[kLoads];
  auto fetch_blocks = [&](int j) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int pos = j * BN + ld_r + i * kRowStep;
      const int b = p.block_shift >= 0 ? pos >> p.block_shift : pos / p.block_size;
      blk[i] = pos < tile.kv_end ? bt[b] : 0;
    }
  };
  // Copies key tile j (K and V, its entries fetched) into its stage; commits one group.
  auto issue_kv = [&](int j) {
    if (j < n_tiles) {
      // 16-bit: straight into the swizzled stage; FP8: codes, row r's chunk at r * D + 16 c.
      const uint32_t k_dst =
          kFp8 ? raw0 + (j % kSm90Stages) * kRawStage : stage0 + (j % kSm90Stages) * kStage;
      const uint32_t v_off = kFp8 ? BN * D : kKBytes;
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int r = ld_r + i * kRowStep;
        const int pos = j * BN + r;
        const bool valid = pos < tile.kv_end;
        const int in_block = p.block_shift >= 0 ? pos & (p.block_size - 1) : pos % p.block_size;
        const int64_t row = static_cast<int64_t>(blk[i]) * p.block_size + in_block;
        const int64_t off = valid ? (row * p.num_kv_heads + kvh) * D + ld_c * (kFp8 ? 16 : 8) : 0;
        const uint32_t at = kFp8 ? static_cast<uint32_t>(r * D + ld_c * 16) : sw128<BN>(r, ld_c);
        mma::cp_async16(k_dst + at, kg + off, valid);
        mma::cp_async16(k_dst + v_off + at, vg + off, valid);
      }
    }
    mma::cp_async_commit();  // possibly empty: keeps the group count uniform
  };
  // FP8: widens the codes of tile j this thread copied (its issue_kv chunks, landed) into
  // widened stage j % 2: chunk c of codes becomes 16-bit chunks 2c and 2c + 1 of the row.
  auto widen = [&](int j) {
    if constexpr (kFp8) {
      if (j < n_tiles) {
        const unsigned char* src = smem_gen + (raw0 - stage0) + (j % kSm90Stages) * kRawStage;
        unsigned char* dst = smem_gen + (j % 2) * kStage;
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
          const int r = ld_r + i * kRowStep;
#pragma unroll
          for (int kv = 0; kv < 2; ++kv) {  // K, then V
            const uint4 codes =
                *reinterpret_cast<const uint4*>(src + kv * BN * D + r * D + ld_c * 16);
            unsigned char* d = dst + kv * kKBytes;
            *reinterpret_cast<uint4*>(d + sw128<BN>(r, 2 * ld_c)) =
                fp8x8_to<T>(make_uint2(codes.x, codes.y));
            *reinterpret_cast<uint4*>(d + sw128<BN>(r, 2 * ld_c + 1)) =
                fp8x8_to<T>(make_uint2(codes.z, codes.w));
          }
        }
      }
    }
  };
  auto k_desc = [&](int j, int kk) {  // K-major K tile j, k-step kk (16 dims)
    const uint32_t k = tile_stage(j) + (kk >> 2) * (BN * 128) + (kk & 3) * 32;
    return wgmma::make_desc(k, 16, 1024);
  };
  auto mma_s = [&](float (&acc)[BN / 8][4], const uint32_t (&a)[4], uint64_t desc, int scale_d) {
    if constexpr (BN == 64) {
      wgmma::mma_rs_n64<T, false>(acc, a, desc, scale_d);
    } else {
      wgmma::mma_rs_n128<T, false>(acc, a, desc, scale_d);
    }
  };

  // ---- prologue: Q (to registers), tiles 0..2 in flight, S_0 ----
  for (int i = tid; i < BM * CH; i += NT) {
    const int r = i / CH, c = i % CH;
    const bool valid = r < tile.rows;
    const int64_t row = tile.q_begin + tile.m0 + r;
    const T* src = valid ? qg + row * p.q_stride + head * D + c * 8 : qg;
    mma::cp_async16(q_s + sw128<BM>(r, c), src, valid);
  }
  fetch_blocks(0);
  issue_kv(0);  // group: Q + tile 0
  fetch_blocks(1);
  issue_kv(1);
  fetch_blocks(2);
  mma::cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[D / 16][4];  // A fragments of this warp's 16 rows, k-step kk = dims 16 kk ..
  const int q_row = warp * 16 + (lane & 15);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    mma::ldmatrix_x4(qf[kk], q_s + sw128<BM>(q_row, 2 * kk + (lane >> 4)));
  }
  __syncthreads();  // the Q staging area (stage 2; FP8: widened stage 1) is free
  issue_kv(2);
  widen(0);                    // FP8: this thread's codes of tile 0 landed (the wait above)
  wgmma::fence_proxy_async();  // tile 0 (cp.async or widening writes) -> wgmma reads
  __syncthreads();

  float s[BN / 8][4];
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) mma_s(s, qf[kk], k_desc(0, kk), kk);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_operands(s);

  const int r0 = warp * 16 + lane / 4;         // this thread's first row in the tile
  const int qpos0 = tile.ctx0 + tile.m0 + r0;  // its position (the second row: + 8)
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  // P_j as A fragments (keys 16 kc .. 16 kc + 15). The wgmma reads them asynchronously, so they
  // stay pinned (fence_operands) until the wait that completes P_j V_j.
  uint32_t pa[BN / 16][4];
  for (int j = 0; j < n_tiles; ++j) {
    if (j >= 1) fetch_blocks(j + 2);  // consumed by issue_kv(j + 2) below
    // Softmax of S_j while P_{j-1} V_{j-1} may still run.
    float alpha[2];
    softmax_scores_tree(s, row_max, row_sum, alpha, j >= first_masked, j * BN, qpos0, p.scale_log2);
    wgmma::wait<0>();  // P_{j-1} V_{j-1} done: O may be rescaled, stage (j - 1) % 3 is free
    wgmma::fence_operands(o);
    wgmma::fence_operands(pa);
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      pa[kc][0] = mma::pack2<T>(s[2 * kc][0], s[2 * kc][1]);
      pa[kc][1] = mma::pack2<T>(s[2 * kc][2], s[2 * kc][3]);
      pa[kc][2] = mma::pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      pa[kc][3] = mma::pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
    }
    rescale_rows(o, alpha);
    // Tile j + 1 must have landed. It is the newest copy group except at j = 0, where the
    // prologue's tile 2 came after it.
    if (j == 0) {
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    wgmma::fence_proxy_async();
    __syncthreads();  // every warpgroup is past P_{j-1} V_{j-1}: stage (j - 1) % 3 is free
    if constexpr (kFp8) {
      // Widened stage (j + 1) % 2 held tile j - 1, free now; raw stage (j + 1) % 3 landed.
      widen(j + 1);
      wgmma::fence_proxy_async();
      __syncthreads();
    }
    if (j >= 1) issue_kv(j + 2);  // into stage (j - 1) % 3; tiles 0..2 came with the prologue

    wgmma::fence();
    const bool next = j + 1 < n_tiles;
    if (next) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) mma_s(s, qf[kk], k_desc(j + 1, kk), kk);
    }
    wgmma::commit();
    const uint32_t v = tile_stage(j) + kKBytes;
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      // Keys 16 kc .. 16 kc + 15 are rows of V; 64-dim column blocks lie BN * 128 bytes apart.
      const uint64_t desc_v = wgmma::make_desc(v + kc * 16 * 128, BN * 128, 1024);
      if constexpr (D == 64) {
        wgmma::mma_rs_n64<T, true>(o, pa[kc], desc_v, 1);
      } else {
        wgmma::mma_rs_n128<T, true>(o, pa[kc], desc_v, 1);
      }
    }
    wgmma::commit();
    wgmma::wait<1>();  // S_{j+1} ready; P_j V_j continues
    wgmma::fence_operands(s);
  }
  wgmma::wait<0>();
  wgmma::fence_operands(o);
  wgmma::fence_operands(pa);
  store_output<T>(p, tile, head, r0, o, row_sum);
#endif
}

// True when the current device runs the wgmma kernel (compute capability 9.0) and it was built.
inline bool use_sm90_prefill() {
#if defined(KESTREL_HAS_SM90A)
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

template <typename T, typename KV, int D, int NWG = Sm90Shape<D>::kWarpgroups,
          int BN = Sm90Shape<D>::kBN>
cudaError_t launch_prefill_attention_sm90(PrefillParams p, int64_t num_tokens,
                                          cudaStream_t stream) {
  constexpr int BM = 64 * NWG;
  const int64_t slots = ceil_div(num_tokens, BM) + p.num_seqs;
  if (slots >= (1LL << 31)) return cudaErrorInvalidValue;
  p.tile_slots = static_cast<int>(slots);
  constexpr int smem = sm90_smem_bytes<D, BN, kIsFp8<KV>>();
  cudaError_t err = cudaFuncSetAttribute(prefill_attention_sm90_kernel<T, KV, D, NWG, BN>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.tile_slots, p.num_q_heads);
  prefill_attention_sm90_kernel<T, KV, D, NWG, BN><<<grid, 128 * NWG, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kestrel::attention
