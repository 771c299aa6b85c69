// Paged prefill attention for Hopper (sm_90a) with warpgroup MMA (wgmma), head_dim 64 and 128.
//
// One warpgroup (128 threads) per block owns a tile of BM = 64 query rows of one (sequence,
// head) (decomposition in prefill_common.cuh). Q lives in registers (A fragments). Per BN = 64-key
// tile j:
//   S_j = Q K_j^T   wgmma m64n64k16, K from shared memory (K-major, 128-byte swizzle)
//   softmax         fp32 registers (the mma.sync accumulator layout, see wgmma.cuh)
//   O += P_j V_j    wgmma m64nDk16, P from registers, V from shared memory (N-major)
// Software pipeline: S_{j+1} and P_j V_j are issued together, the softmax of S_{j+1} runs while
// P_j V_j is still on the tensor cores, and only the rescale of O waits for it. K/V tiles are
// gathered from the paged cache with cp.async into a 3-stage ring (tile t in stage t % 3; rows
// past the visible range zero-filled), issued two tiles ahead. Two blocks share an SM.
//
// Shared-memory tiles hold [rows][D] as D / 64 column blocks of [rows][64] (128 bytes a row),
// 16-byte chunk c of row r at chunk c ^ (r % 8): the wgmma 128-byte swizzle. The Q tile is
// staged in stage 2 during the prologue, before tile 2 is loaded there.
//
// Capturable in a CUDA graph: no host synchronization, no allocation.
#pragma once

#include "common.cuh"
#include "mma.cuh"
#include "prefill_common.cuh"
#include "wgmma.cuh"

namespace kestrel::attention {

constexpr int kSm90Threads = 128;
constexpr int kSm90BM = 64;
constexpr int kSm90BN = 64;
constexpr int kSm90Stages = 3;

template <int D>
__host__ __device__ constexpr int sm90_stage_bytes() {
  return 2 * kSm90BN * D * 2;  // K and V tiles, 16-bit
}

template <int D>
__host__ __device__ constexpr int sm90_smem_bytes() {
  return kSm90Stages * sm90_stage_bytes<D>() + 1024;  // slack for 1 KB alignment
}

// Byte offset of 16-byte chunk c (of D / 8) of row r in a swizzled [ROWS][D] tile.
template <int ROWS>
__device__ __forceinline__ uint32_t sw128(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * (ROWS * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

template <typename T, int D>
__global__ void __launch_bounds__(kSm90Threads, 2)
    prefill_attention_sm90_kernel(const PrefillParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BM = kSm90BM, BN = kSm90BN;
  constexpr int CH = D / 8;                          // 16-byte chunks per row
  constexpr uint32_t kStage = sm90_stage_bytes<D>();  // multiple of 1024
  constexpr uint32_t kKBytes = BN * D * 2;
  static_assert(D == 64 || D == 128, "the wgmma kernel handles head_dim 64 and 128");
  static_assert(BM * D * 2 <= kStage, "the Q tile is staged in one K/V stage");

  extern __shared__ __align__(128) unsigned char smem_sm90[];
  const uint32_t stage0 = (mma::smem_addr(smem_sm90) + 1023) & ~1023u;  // 1 KB-aligned atoms
  const uint32_t q_s = stage0 + 2 * kStage;  // prologue only

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  PrefillTile tile;
  if (!locate_tile<BM>(p, tile)) return;  // uniform across the block
  const int head = blockIdx.y;
  const int kvh = head / (p.num_q_heads / p.num_kv_heads);
  const int n_tiles = (tile.kv_end + BN - 1) / BN;
  const int first_masked = (tile.ctx0 + tile.m0) / BN;  // tiles >= this may hold hidden keys

  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.key_cache);
  const T* vg = static_cast<const T*>(p.value_cache);
  const int32_t* bt = p.block_tables + tile.seq * p.bt_stride;

  // Copies key tile j (K and V) into its stage and commits the copies as one group.
  auto load_kv = [&](int j) {
    if (j < n_tiles) {
      const uint32_t k_dst = stage0 + (j % kSm90Stages) * kStage;
      for (int i = tid; i < BN * CH; i += kSm90Threads) {
        const int r = i / CH, c = i % CH;
        const int pos = j * BN + r;
        const bool valid = pos < tile.kv_end;
        const int64_t off = valid ? kv_offset(p, bt, pos, kvh, D, c) : 0;
        const uint32_t at = sw128<BN>(r, c);
        mma::cp_async16(k_dst + at, kg + off, valid);
        mma::cp_async16(k_dst + kKBytes + at, vg + off, valid);
      }
    }
    mma::cp_async_commit();  // possibly empty: keeps the group count uniform
  };
  auto k_desc = [&](int j, int kk) {  // K-major K tile j, k-step kk (16 dims)
    const uint32_t k = stage0 + (j % kSm90Stages) * kStage + (kk >> 2) * (BN * 128) + (kk & 3) * 32;
    return wgmma::make_desc(k, 16, 1024);
  };

  // ---- prologue: Q (to registers), tiles 0..2 in flight, S_0 ----
  for (int i = tid; i < BM * CH; i += kSm90Threads) {
    const int r = i / CH, c = i % CH;
    const bool valid = r < tile.rows;
    const int64_t row = tile.q_begin + tile.m0 + r;
    const T* src = valid ? qg + row * p.q_stride + head * D + c * 8 : qg;
    mma::cp_async16(q_s + sw128<BM>(r, c), src, valid);
  }
  load_kv(0);  // group: Q + tile 0
  load_kv(1);
  mma::cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[D / 16][4];  // A fragments of this warp's 16 rows, k-step kk = dims 16 kk ..
  const int q_row = warp * 16 + (lane & 15);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    mma::ldmatrix_x4(qf[kk], q_s + sw128<BM>(q_row, 2 * kk + (lane >> 4)));
  }
  __syncthreads();  // the Q staging area (stage 2) is free
  load_kv(2);
  wgmma::fence_proxy_async();  // tile 0 (cp.async writes) -> wgmma reads
  __syncthreads();

  float s[BN / 8][4];
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wgmma::mma_rs_n64<T, false>(s, qf[kk], k_desc(0, kk), kk);
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
    // Softmax of S_j while P_{j-1} V_{j-1} may still run.
    float alpha[2];
    softmax_scores(s, row_max, row_sum, alpha, j >= first_masked, j * BN, qpos0, p.scale_log2);
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
    __syncthreads();
    if (j >= 1) load_kv(j + 2);  // into stage (j - 1) % 3; tiles 0..2 came with the prologue

    wgmma::fence();
    const bool next = j + 1 < n_tiles;
    if (next) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wgmma::mma_rs_n64<T, false>(s, qf[kk], k_desc(j + 1, kk), kk);
      }
    }
    wgmma::commit();
    const uint32_t v = stage0 + (j % kSm90Stages) * kStage + kKBytes;
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

template <typename T, int D>
cudaError_t launch_prefill_attention_sm90(PrefillParams p, int64_t num_tokens,
                                          cudaStream_t stream) {
  const int64_t slots = ceil_div(num_tokens, kSm90BM) + p.num_seqs;
  if (slots >= (1LL << 31)) return cudaErrorInvalidValue;
  p.tile_slots = static_cast<int>(slots);
  constexpr int smem = sm90_smem_bytes<D>();
  cudaError_t err = cudaFuncSetAttribute(prefill_attention_sm90_kernel<T, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.tile_slots, p.num_q_heads);
  prefill_attention_sm90_kernel<T, D><<<grid, kSm90Threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kestrel::attention
