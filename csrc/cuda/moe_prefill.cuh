// BitsMoE prefill-path kernels (many tokens per expert). Leaf header: CUDA only, no torch.
//
// Tokens are grouped by expert: `sorted_slots` lists the slots (token * top_k + choice) expert by expert, and each
// tile of up to kTileM slots of one expert is a block row (tile_expert, tile_start, tile_count; tile_expert < 0 for
// unused tiles, so the grid is sized without knowing the counts: no host synchronisation). For each tile, factor
// tiles are decoded from the kernel layout (moe_decode.cuh) to 16-bit floats in shared memory and multiplied on
// the tensor cores (WMMA, fp32 accumulation):
//   gate_up_prefill:  a[s, :] = act(z_g[t] F_g,e, z_u[t] F_u,e)          (the K dimension: the expert's stored rows)
//   down_prefill:     u[s, rows[j]] = a[s, :] . F_d,e[j, :]             (the K dimension: I)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include "moe_decode.cuh"

namespace bitsmoe {

constexpr int kTileM = 64;            // slots per block
constexpr int kTileN = 64;            // output columns (gate_up: of I; down: stored rows) per block
constexpr int kPrefillThreads = 128;  // 4 warps, each a 32 x 32 quarter of the tile

template <typename T>
__device__ __forceinline__ T to_half(float v);
template <>
__device__ __forceinline__ __half to_half<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_half<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

struct StoredRow {  // where stored row j of an expert lives in the kernel layout
  int width;        // 0: past the expert's last stored row
  int plane;        // first plane
};

// Stored rows of expert e are contiguous in kernel order, class after class: the n-th one's width and planes.
__device__ __forceinline__ StoredRow stored_row(const int32_t* segs_e, int n) {
  const int widths[kClasses] = {8, 6, 4, 3, 2, 1};
#pragma unroll
  for (int c = 0; c < kClasses; ++c) {
    const int first = segs_e[3 * c] - segs_e[0], count = segs_e[3 * c + 1];
    if (n < first + count) return {widths[c], segs_e[3 * c + 2] + (n - first) * widths[c]};
  }
  return {0, 0};
}

__device__ __forceinline__ int stored_rows(const int32_t* segs_e) {
  int n = 0;
#pragma unroll
  for (int c = 0; c < kClasses; ++c) n += segs_e[3 * c + 1];
  return n;
}

// The 32 values of word w of stored row j (width b, planes from `plane`), scaled, written to out[0..32).
template <typename T>
__device__ __forceinline__ void decode_word(const Projection& p, StoredRow r, int j, int w, int words_per_row,
                                            int groups_per_row, int group, T* out) {
  uint32_t words[8];
#pragma unroll
  for (int q = 0; q < 8; ++q)
    words[q] = q < r.width ? static_cast<uint32_t>(__ldg(p.codes + (int64_t)(r.plane + q) * words_per_row + w)) : 0u;
  const float scale = __half2float(p.scales[(int64_t)j * groups_per_row + w * 32 / group]);
#pragma unroll
  for (int col = 0; col < 32; ++col) {
    uint32_t u = 0;
#pragma unroll
    for (int q = 0; q < 8; ++q) u |= ((words[q] >> col) & 1u) << q;
    out[col] = to_half<T>(scale * signed_code(u, r.width, p.odd));
  }
}

using Accumulators = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>[2][2];

// Each warp's 32 x 32 quarter of the kTileM x kTileN tile (warps 0-1 the top half, 2-3 the bottom) to C [kTileM][LDC].
template <int LDC>
__device__ __forceinline__ void store_quarter(float* C, Accumulators& acc, int warp) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int k = 0; k < 2; ++k)
      nvcuda::wmma::store_matrix_sync(C + ((warp / 2) * 32 + i * 16) * LDC + (warp % 2) * 32 + k * 16, acc[i][k], LDC,
                                      nvcuda::wmma::mem_row_major);
}

struct Tiles {
  const int32_t* sorted_slots;  // [slots], grouped by expert
  const int32_t* expert;        // [tiles], -1: unused
  const int32_t* start;         // [tiles] first position in sorted_slots
  const int32_t* count;         // [tiles] slots in the tile, <= kTileM
};

// grid (tiles, ceil(I / kTileN)), block kPrefillThreads. z_g [T, R_g], z_u [T, R_u] and a [slots, I] in T.
template <typename T>
__global__ void __launch_bounds__(kPrefillThreads)
    gate_up_prefill(Projection gate, Projection up, const T* __restrict__ z_g, const T* __restrict__ z_u, Tiles tiles,
                    int top_k, int I, int group, Activation act, T* __restrict__ a) {
  using namespace nvcuda;
  constexpr int BK = 16, LDA = BK + 8, LDB = kTileN + 8, LDC = kTileN + 4;
  __shared__ __align__(32) T As[kTileM * LDA];
  __shared__ __align__(32) T Bs[BK * LDB];
  __shared__ __align__(32) float Cg[kTileM * LDC];
  __shared__ __align__(32) float Cu[kTileM * LDC];
  __shared__ int token_of[kTileM];
  __shared__ int slot_of[kTileM];
  const int e = tiles.expert[blockIdx.x];
  if (e < 0) return;
  const int count = tiles.count[blockIdx.x], n0 = blockIdx.y * kTileN, tid = threadIdx.x, warp = tid / 32;
  const int words_per_row = I / 32, groups_per_row = I / group;
  for (int m = tid; m < kTileM; m += kPrefillThreads) {
    const int slot = m < count ? tiles.sorted_slots[tiles.start[blockIdx.x] + m] : -1;
    slot_of[m] = slot;
    token_of[m] = slot < 0 ? -1 : slot / top_k;
  }
  Accumulators acc;
  for (int which = 0; which < 2; ++which) {
    const Projection p = which == 0 ? gate : up;
    const T* z = which == 0 ? z_g : z_u;
    const int32_t* segs_e = p.segs + e * kClasses * 3;
    const int first = segs_e[0], n_rows = stored_rows(segs_e);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int k = 0; k < 2; ++k) wmma::fill_fragment(acc[i][k], 0.0f);
    __syncthreads();  // token_of is written
    for (int k0 = 0; k0 < n_rows; k0 += BK) {
      for (int idx = tid; idx < kTileM * BK;
           idx += kPrefillThreads) {  // A: z of the tile's tokens at the chunk's ranks
        const int m = idx / BK, k = idx % BK;
        const bool valid = token_of[m] >= 0 && k0 + k < n_rows;
        As[m * LDA + k] = valid ? z[(int64_t)token_of[m] * p.rank + __ldg(p.rows + first + k0 + k)] : to_half<T>(0.0f);
      }
      for (int idx = tid; idx < BK * (kTileN / 32);
           idx += kPrefillThreads) {  // B: decoded factor rows, 32 columns each
        const int k = idx / (kTileN / 32), part = idx % (kTileN / 32), w = n0 / 32 + part;
        T* out = Bs + k * LDB + part * 32;
        const StoredRow r = k0 + k < n_rows ? stored_row(segs_e, k0 + k) : StoredRow{0, 0};
        if (r.width > 0 && w < words_per_row) {
          decode_word<T>(p, r, first + k0 + k, w, words_per_row, groups_per_row, group, out);
        } else {
          for (int col = 0; col < 32; ++col) out[col] = to_half<T>(0.0f);
        }
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + ((warp / 2) * 32 + i * 16) * LDA, LDA);
#pragma unroll
      for (int k = 0; k < 2; ++k) wmma::load_matrix_sync(fb[k], Bs + (warp % 2) * 32 + k * 16, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int k = 0; k < 2; ++k) wmma::mma_sync(acc[i][k], fa[i], fb[k], acc[i][k]);
      __syncthreads();
    }
    store_quarter<LDC>(which == 0 ? Cg : Cu, acc, warp);
  }
  __syncthreads();
  for (int idx = tid; idx < kTileM * kTileN; idx += kPrefillThreads) {
    const int m = idx / kTileN, n = idx % kTileN;
    if (slot_of[m] >= 0 && n0 + n < I) {
      a[(int64_t)slot_of[m] * I + n0 + n] = to_half<T>(activate(act, e, n0 + n, I, Cg[m * LDC + n], Cu[m * LDC + n]));
    }
  }
}

// grid (tiles, ceil(R_down / kTileN)), block kPrefillThreads. a [slots, I] in T; u [slots, R_down] fp32, zeroed.
template <typename T>
__global__ void __launch_bounds__(kPrefillThreads)
    down_prefill(Projection down, const T* __restrict__ a, Tiles tiles, int I, int group, float* __restrict__ u) {
  using namespace nvcuda;
  constexpr int BK = 32, LDA = BK + 8, LDB = BK + 8, LDC = kTileN + 4;
  __shared__ __align__(32) T As[kTileM * LDA];
  __shared__ __align__(32) T Bs[kTileN * LDB];  // column-major B: stored row n's 32 values at Bs[n * LDB]
  __shared__ __align__(32) float C[kTileM * LDC];
  __shared__ int slot_of[kTileM];
  const int e = tiles.expert[blockIdx.x];
  if (e < 0) return;
  const int32_t* segs_e = down.segs + e * kClasses * 3;
  const int first = segs_e[0], n_rows = stored_rows(segs_e), j0 = blockIdx.y * kTileN;
  if (j0 >= n_rows) return;
  const int count = tiles.count[blockIdx.x], tid = threadIdx.x, warp = tid / 32;
  const int words_per_row = I / 32, groups_per_row = I / group;
  for (int m = tid; m < kTileM; m += kPrefillThreads)
    slot_of[m] = m < count ? tiles.sorted_slots[tiles.start[blockIdx.x] + m] : -1;
  Accumulators acc;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int k = 0; k < 2; ++k) wmma::fill_fragment(acc[i][k], 0.0f);
  __syncthreads();
  for (int w = 0; w < words_per_row; ++w) {
    for (int idx = tid; idx < kTileM * BK; idx += kPrefillThreads) {  // A: the tile's activations at these 32 columns
      const int m = idx / BK, k = idx % BK;
      As[m * LDA + k] = slot_of[m] >= 0 ? a[(int64_t)slot_of[m] * I + w * 32 + k] : to_half<T>(0.0f);
    }
    for (int n = tid; n < kTileN; n += kPrefillThreads) {  // B: word w of each of the block's stored rows
      const StoredRow r = j0 + n < n_rows ? stored_row(segs_e, j0 + n) : StoredRow{0, 0};
      if (r.width > 0) {
        decode_word<T>(down, r, first + j0 + n, w, words_per_row, groups_per_row, group, Bs + n * LDB);
      } else {
        for (int col = 0; col < 32; ++col) Bs[n * LDB + col] = to_half<T>(0.0f);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + ((warp / 2) * 32 + i * 16) * LDA + kk, LDA);
#pragma unroll
      for (int k = 0; k < 2; ++k) wmma::load_matrix_sync(fb[k], Bs + ((warp % 2) * 32 + k * 16) * LDB + kk, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int k = 0; k < 2; ++k) wmma::mma_sync(acc[i][k], fa[i], fb[k], acc[i][k]);
    }
    __syncthreads();
  }
  store_quarter<LDC>(C, acc, warp);
  __syncthreads();
  for (int idx = tid; idx < kTileM * kTileN; idx += kPrefillThreads) {
    const int m = idx / kTileN, n = idx % kTileN;
    if (slot_of[m] >= 0 && j0 + n < n_rows)
      u[(int64_t)slot_of[m] * down.rank + __ldg(down.rows + first + j0 + n)] = C[m * LDC + n];
  }
}

}  // namespace bitsmoe
