// Paged prefill attention on tensor cores with mma.sync m16n8k16 (sm_80+), flash-attention-2
// style; the path for non-Hopper GPUs and for head_dim 256 (see prefill_common.cuh for the work
// decomposition and prefill_attention_sm90.cuh for the Hopper kernel).
//
// K/V tiles of BN keys are copied from the paged cache with cp.async into a double-buffered,
// XOR-swizzled shared-memory ring (16-byte chunk c of row r lives at chunk c ^ (r % 8), so
// ldmatrix reads 8 rows of one column without bank conflicts). Rows past the visible range are
// zero-filled, so no stale or NaN data reaches the products. Each of the 4 warps owns 16 query
// rows: S = Q K^T and O += P V on tensor cores, online softmax in fp32 registers (log2 domain).
//
// An FP8 cache (KV = __nv_fp8_e4m3) is copied the same way, one tile ahead, into a second,
// unswizzled double buffer of codes (16 per cp.async); once a tile has landed each thread widens
// the chunks it copied to T, exactly, into the swizzled tiles, so the MMAs are those of a 16-bit
// cache; k_scale rides in scale_log2 and v_scale in the epilogue (PrefillParams).
//
// Capturable in a CUDA graph: no host synchronization, no allocation.
#pragma once

#include "common.cuh"
#include "mma.cuh"
#include "prefill_common.cuh"

namespace kestrel::attention {

constexpr int kPrefillThreads = 128;
constexpr int kPrefillBM = 64;  // query rows per block: 16 per warp

template <int D>
__host__ __device__ constexpr int prefill_bn() {
  return D == 256 ? 32 : 64;
}

// Q + double-buffered K and V, 16-bit (+ double-buffered K and V codes for an FP8 cache).
template <int D, bool FP8 = false>
__host__ __device__ constexpr int prefill_smem_bytes() {
  return (kPrefillBM + 4 * prefill_bn<D>()) * D * 2 + (FP8 ? 4 * prefill_bn<D>() * D : 0);
}

// Offset (elements) of 16-byte chunk c of row r in a swizzled [rows][D] tile.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

template <typename T, typename KV, int D>
__global__ void __launch_bounds__(kPrefillThreads) prefill_attention_kernel(const PrefillParams p) {
  constexpr int BM = kPrefillBM;
  constexpr int BN = prefill_bn<D>();
  constexpr int CH = D / 8;            // 16-byte chunks per row
  constexpr bool kQInRegs = D <= 128;  // D = 256 re-reads Q from shared memory
  static_assert(D % 64 == 0 && D <= 256, "head_dim must be 64, 128 or 256");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [BM][D]
  T* k_s = q_s + BM * D;                    // [2][BN][D]
  T* v_s = k_s + 2 * BN * D;                // [2][BN][D]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  PrefillTile tile;
  if (!locate_tile<BM>(p, tile)) return;  // uniform across the block
  const int head = blockIdx.y;
  const int kvh = head / (p.num_q_heads / p.num_kv_heads);
  const int rows = tile.rows, kv_end = tile.kv_end;
  const int n_tiles = (kv_end + BN - 1) / BN;
  const int first_masked = (tile.ctx0 + tile.m0) / BN;  // tiles >= this may hold hidden keys

  const T* qg = static_cast<const T*>(p.q);
  const KV* kg = static_cast<const KV*>(p.key_cache);
  const KV* vg = static_cast<const KV*>(p.value_cache);
  const int32_t* bt = p.block_tables + tile.seq * p.bt_stride;

  // ---- prologue: Q tile (group 0), K/V tile 0 (group 1) ----
  for (int i = tid; i < BM * CH; i += kPrefillThreads) {
    const int r = i / CH, c = i % CH;
    const bool valid = r < rows;
    const int64_t row = tile.q_begin + tile.m0 + r;
    const T* src = valid ? qg + row * p.q_stride + head * D + c * 8 : qg;
    mma::cp_async16(mma::smem_addr(q_s + swz<D>(r, c)), src, valid);
  }
  mma::cp_async_commit();

  // FP8: the codes of K/V tile buffer buf, [BN][D] bytes each, after the 16-bit tiles.
  unsigned char* k_raw = reinterpret_cast<unsigned char*>(v_s + 2 * BN * D);  // [2][BN][D]
  unsigned char* v_raw = k_raw + 2 * BN * D;
  constexpr int RAW_CH = D / 16;  // 16-byte chunks of codes per row
  auto load_kv = [&](int buf, int j) {
    if constexpr (kIsFp8<KV>) {  // codes; chunk c of row r at r * D + 16 c
      for (int i = tid; i < BN * RAW_CH; i += kPrefillThreads) {
        const int r = i / RAW_CH, c = i % RAW_CH;
        const int pos = j * BN + r;
        const bool valid = pos < kv_end;
        const int64_t off = valid ? kv_offset(p, bt, pos, kvh, D, 0) + c * 16 : 0;
        const int at = buf * BN * D + r * D + c * 16;
        mma::cp_async16(mma::smem_addr(k_raw + at), kg + off, valid);
        mma::cp_async16(mma::smem_addr(v_raw + at), vg + off, valid);
      }
    } else {  // straight into the swizzled tiles
      T* kd = k_s + buf * BN * D;
      T* vd = v_s + buf * BN * D;
      for (int i = tid; i < BN * CH; i += kPrefillThreads) {
        const int r = i / CH, c = i % CH;
        const int pos = j * BN + r;
        const bool valid = pos < kv_end;
        const int64_t off = valid ? kv_offset(p, bt, pos, kvh, D, c) : 0;
        mma::cp_async16(mma::smem_addr(kd + swz<D>(r, c)), kg + off, valid);
        mma::cp_async16(mma::smem_addr(vd + swz<D>(r, c)), vg + off, valid);
      }
    }
  };
  // FP8: widens the codes of buffer buf this thread copied (the chunks of load_kv) into the
  // swizzled tiles: chunk c of codes becomes 16-bit chunks 2c and 2c + 1.
  auto widen = [&](int buf) {
    if constexpr (kIsFp8<KV>) {
      for (int i = tid; i < BN * RAW_CH; i += kPrefillThreads) {
        const int r = i / RAW_CH, c = i % RAW_CH;
        const int at = buf * BN * D + r * D + c * 16;
        const uint4 kc8 = *reinterpret_cast<const uint4*>(k_raw + at);
        const uint4 vc8 = *reinterpret_cast<const uint4*>(v_raw + at);
        T* kd = k_s + buf * BN * D;
        T* vd = v_s + buf * BN * D;
        *reinterpret_cast<uint4*>(kd + swz<D>(r, 2 * c)) = fp8x8_to<T>(make_uint2(kc8.x, kc8.y));
        *reinterpret_cast<uint4*>(kd + swz<D>(r, 2 * c + 1)) =
            fp8x8_to<T>(make_uint2(kc8.z, kc8.w));
        *reinterpret_cast<uint4*>(vd + swz<D>(r, 2 * c)) = fp8x8_to<T>(make_uint2(vc8.x, vc8.y));
        *reinterpret_cast<uint4*>(vd + swz<D>(r, 2 * c + 1)) =
            fp8x8_to<T>(make_uint2(vc8.z, vc8.w));
      }
    }
  };
  load_kv(0, 0);
  mma::cp_async_commit();

  const int r0 = warp * 16 + lane / 4;         // this thread's first row in the tile
  const int qpos0 = tile.ctx0 + tile.m0 + r0;  // its position (the second row: + 8)

  uint32_t qf[kQInRegs ? D / 16 : 1][4];
  // A-operand address of Q rows warp*16 + (lane % 16), chunk 2 * kk + lane / 16.
  const int q_row = warp * 16 + (lane & 15);
  if constexpr (kQInRegs) {
    mma::cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      mma::ldmatrix_x4(qf[kk], mma::smem_addr(q_s + swz<D>(q_row, 2 * kk + (lane >> 4))));
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's share; summed over the quad at the end

  // ldmatrix lane roles (see mma.cuh): K rows for B of S = Q K^T, V rows (transposed) for P V.
  const int k_row = (lane & 7) + ((lane >> 4) << 3);
  const int k_chunk = (lane >> 3) & 1;
  const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
  const int v_chunk = lane >> 4;

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      load_kv((j + 1) & 1, j + 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    // FP8: this thread's codes of tile j have landed; 16-bit buffer j & 1 was last read in
    // tile j - 2, before that tile's final barrier.
    widen(j & 1);
    __syncthreads();
    const T* kb = k_s + (j & 1) * BN * D;
    const T* vb = v_s + (j & 1) * BN * D;

    // S = Q K^T for this warp's 16 rows x BN keys.
    float s[BN / 8][4];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      if constexpr (kQInRegs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = qf[kk][e];
      } else {
        mma::ldmatrix_x4(a, mma::smem_addr(q_s + swz<D>(q_row, 2 * kk + (lane >> 4))));
      }
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t b[4];
        const int r = nn * 16 + k_row;
        mma::ldmatrix_x4(b, mma::smem_addr(kb + swz<D>(r, 2 * kk + k_chunk)));
        mma::mma_16816<T>(s[2 * nn], a, b[0], b[1]);
        mma::mma_16816<T>(s[2 * nn + 1], a, b[2], b[3]);
      }
    }

    // Tile 0 holds key 0, visible to every row, so each row's max is finite from the start.
    float alpha[2];
    softmax_scores(s, row_max, row_sum, alpha, j >= first_masked, j * BN, qpos0, p.scale_log2);
    rescale_rows(o, alpha);

    // O += P V, P taken straight from the S accumulators as A fragments.
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      uint32_t a[4];
      a[0] = mma::pack2<T>(s[2 * kc][0], s[2 * kc][1]);
      a[1] = mma::pack2<T>(s[2 * kc][2], s[2 * kc][3]);
      a[2] = mma::pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      a[3] = mma::pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t b[4];
        const int r = kc * 16 + v_row;
        mma::ldmatrix_x4_trans(b, mma::smem_addr(vb + swz<D>(r, 2 * dn + v_chunk)));
        mma::mma_16816<T>(o[2 * dn], a, b[0], b[1]);
        mma::mma_16816<T>(o[2 * dn + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with buffer j & 1 before it is refilled
  }

  store_output<T>(p, tile, head, r0, o, row_sum);
}

template <typename T, typename KV, int D>
cudaError_t launch_prefill_attention(PrefillParams p, int64_t num_tokens, cudaStream_t stream) {
  if (p.num_seqs == 0 || num_tokens == 0) return cudaSuccess;
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.block_size <= 0 ||
      p.num_q_heads > 65535) {
    return cudaErrorInvalidValue;
  }
  const int64_t slots = ceil_div(num_tokens, kPrefillBM) + p.num_seqs;
  if (slots >= (1LL << 31)) return cudaErrorInvalidValue;
  p.tile_slots = static_cast<int>(slots);
  constexpr int smem = prefill_smem_bytes<D, kIsFp8<KV>>();
  cudaError_t err = cudaFuncSetAttribute(prefill_attention_kernel<T, KV, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.tile_slots, p.num_q_heads);
  prefill_attention_kernel<T, KV, D><<<grid, kPrefillThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kestrel::attention
