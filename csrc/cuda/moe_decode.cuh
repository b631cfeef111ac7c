// BitsMoE decode-path kernels (few tokens per expert). Leaf header: CUDA only, no torch.
//
// Kernel layout of one projection (made once at load by `repack`, from FORMAT.md's canonical layout):
//   codes  [P, I/32] int32  each expert's stored rows grouped by width class (widest first, kernel_layout.CLASS_WIDTHS;
//                           rank order inside a class), each row's b bit planes consecutive (FORMAT.md section 5
//                           inside a plane)
//   scales [S, I/G]  fp16   one row per stored row, same order
//   rows   [S]       int32  rank index k of each stored row
//   segs   [E, kClasses, 3] int32  per expert and width class: first stored row, number of rows, first plane
//
// The MoE layer (FORMAT.md section 4) for slots s = (token t, choice c) with expert e = ids[t, c]:
//   gate_up_decode:  h[c, s, :] = partial sums of F_g,e^T z_g[t] and F_u,e^T z_u[t] over chunk c of the rank rows
//   gate_up_finish:  a[s, :] = act(sum_c h_g[c, s, :], sum_c h_u[c, s, :])           (I columns, fp32; Activation)
//   down_decode:     u[s, k] = F_d,e[k, :] . a[s, :]                                   (rank space, fp32)
// and the host sums t = sum_c w[t, c] u[(t, c), :] in a fixed order, then y = B_d t. The rank rows are split over
// chunks (blocks) so that a few tokens still fill the GPU: one block per slot left 124 of an H200's 132
// multiprocessors idle at T = 1 (benchmarks/README.md, CUDA kernels on an H200). No atomics: every output element
// is written by exactly one thread and partial sums are added in a fixed order, so results are deterministic.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace bitsmoe {

constexpr int kClasses = 6;  // width classes, widest first: 8, 6, 4, 3, 2, 1 bits

constexpr int kWordsPerTile = 32;  // word columns per block (1024 output columns); one lane each
constexpr int kSplits = 8;         // warps per block in gate_up_decode, each over a share of the rows

// The signed code of offset code u at width b (FORMAT.md section 4): odd codes (format version 2 up to 6 bits,
// version 1 at 1 bit only; `odd` is the version's choice) are 2u - (2^b - 1), the others u - 2^(b-1).
__device__ __forceinline__ float signed_code(uint32_t u, int b, bool odd) {
  return b == 1 || (odd && b <= 6) ? 2.0f * float(u) - float((1 << b) - 1) : float(int(u) - (1 << (b - 1)));
}

// Signed code of column `col` (0..31) of a row whose b planes are words[0..b).
template <int B>
__device__ __forceinline__ float code_at(const uint32_t (&words)[B], int col, bool odd) {
  uint32_t u = 0;
#pragma unroll
  for (int p = 0; p < B; ++p) u |= ((words[p] >> col) & 1u) << p;
  return signed_code(u, B, odd);
}

// acc[col] += f * code(col) for the 32 columns of word `w` of one stored row (planes at `planes`, row stride `ld`).
template <int B>
__device__ __forceinline__ void accumulate_row(float (&acc)[32], const int32_t* __restrict__ planes, int ld, int w,
                                               float f, bool odd) {
  uint32_t words[B];
#pragma unroll
  for (int p = 0; p < B; ++p) words[p] = static_cast<uint32_t>(__ldg(planes + p * ld + w));
#pragma unroll
  for (int col = 0; col < 32; ++col) acc[col] += f * code_at<B>(words, col, odd);
}

// Sum over this warp's share of an expert's stored rows (those at position share, share + shares, ... of each width
// class) of z[k] * scale * code, for word column w.
template <int B>
__device__ __forceinline__ void accumulate_class(float (&acc)[32], const int32_t* __restrict__ codes,
                                                 const __half* __restrict__ scales, const int32_t* __restrict__ rows,
                                                 const int32_t* seg, const float* __restrict__ z, int words_per_row,
                                                 int groups_per_row, int group, int w, int share, int shares,
                                                 bool odd) {
  const int first = seg[0], count = seg[1], plane0 = seg[2];
  for (int r = share; r < count; r += shares) {
    const int j = first + r;
    const float f = z[__ldg(rows + j)] * __half2float(scales[(int64_t)j * groups_per_row + w * 32 / group]);
    accumulate_row<B>(acc, codes + (int64_t)(plane0 + r * B) * words_per_row, words_per_row, w, f, odd);
  }
}

__device__ __forceinline__ void accumulate_expert(float (&acc)[32], const int32_t* codes, const __half* scales,
                                                  const int32_t* rows, const int32_t* segs_e, const float* z,
                                                  int words_per_row, int groups_per_row, int group, int w, int share,
                                                  int shares, bool odd) {
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
  accumulate_class<8>(acc, codes, scales, rows, segs_e + 0 * 3, z, words_per_row, groups_per_row, group, w, share,
                      shares, odd);
  accumulate_class<6>(acc, codes, scales, rows, segs_e + 1 * 3, z, words_per_row, groups_per_row, group, w, share,
                      shares, odd);
  accumulate_class<4>(acc, codes, scales, rows, segs_e + 2 * 3, z, words_per_row, groups_per_row, group, w, share,
                      shares, odd);
  accumulate_class<3>(acc, codes, scales, rows, segs_e + 3 * 3, z, words_per_row, groups_per_row, group, w, share,
                      shares, odd);
  accumulate_class<2>(acc, codes, scales, rows, segs_e + 4 * 3, z, words_per_row, groups_per_row, group, w, share,
                      shares, odd);
  accumulate_class<1>(acc, codes, scales, rows, segs_e + 5 * 3, z, words_per_row, groups_per_row, group, w, share,
                      shares, odd);
}

// The experts' activation (bitsmoe_vllm/activation.py) with their gate and up biases [E, I] fp32 (nullptr: none):
// a = act(h_g + b_g, h_u + b_u), act = silu(g) * u or gpt-oss's swigluoai.
struct Activation {
  const float* gate_bias;
  const float* up_bias;
  bool swigluoai;
  float alpha, limit;
};

__device__ __forceinline__ float activate(const Activation& act, int64_t e, int64_t col, int I, float g, float u) {
  if (act.gate_bias != nullptr) {
    g += act.gate_bias[e * I + col];
    u += act.up_bias[e * I + col];
  }
  if (!act.swigluoai) return g / (1.0f + __expf(-g)) * u;
  g = fminf(g, act.limit);
  return (fmaxf(fminf(u, act.limit), -act.limit) + 1.0f) * (g / (1.0f + __expf(-act.alpha * g)));
}

struct Projection {  // one projection in kernel layout
  const int32_t* codes;
  const __half* scales;
  const int32_t* rows;
  const int32_t* segs;  // [E, kClasses, 3]
  int rank;             // R: length of z (gate, up) or of u (down)
  bool odd;             // odd codes up to 6 bits (format version 2)
};

// grid (slots, ceil(I / 32 / kWordsPerTile), chunks), block (32, kSplits). z_g [T, R_g], z_u [T, R_u] fp32;
// h [chunks, slots, 2, I] fp32: block chunk c's warp `split` takes the stored rows at positions c * kSplits + split
// (mod chunks * kSplits) of each width class. Slots whose expert id is negative (held elsewhere) get h = 0.
__global__ void __launch_bounds__(32 * kSplits)
    gate_up_decode(Projection gate, Projection up, const float* __restrict__ z_g, const float* __restrict__ z_u,
                   const int64_t* __restrict__ ids, int top_k, int I, int group, float* __restrict__ h) {
  __shared__ float part[kSplits][32][33];  // [split][lane][column], padded against bank conflicts
  __shared__ float sum[32][33];
  const int slot = blockIdx.x, lane = threadIdx.x, split = threadIdx.y;
  const int share = blockIdx.z * kSplits + split, shares = gridDim.z * kSplits;
  const int words_per_row = I / 32, groups_per_row = I / group;
  const int w = blockIdx.y * kWordsPerTile + lane;
  const int64_t e = ids[slot];
  const int token = slot / top_k;
  float acc[32];
#pragma unroll
  for (int which = 0; which < 2; ++which) {  // unrolled, so each pass reads its projection's fields directly
    const Projection p = which == 0 ? gate : up;
    const float* z = (which == 0 ? z_g : z_u) + (int64_t)token * p.rank;
    if (e >= 0 && w < words_per_row) {
      accumulate_expert(acc, p.codes, p.scales, p.rows, p.segs + e * kClasses * 3, z, words_per_row, groups_per_row,
                        group, w, share, shares, p.odd);
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
    }
#pragma unroll
    for (int col = 0; col < 32; ++col) part[split][lane][col] = acc[col];
    __syncthreads();
    for (int col = split; col < 32; col += kSplits) {  // fixed summation order over splits: deterministic
      float total = 0.0f;
      for (int s = 0; s < kSplits; ++s) total += part[s][lane][col];
      sum[lane][col] = total;
    }
    __syncthreads();
    const int64_t base =
        (((int64_t)blockIdx.z * gridDim.x + slot) * 2 + which) * I + (int64_t)blockIdx.y * kWordsPerTile * 32;
    for (int idx = split * 32 + lane; idx < kWordsPerTile * 32; idx += 32 * kSplits) {  // coalesced
      const int word = idx / 32, col = idx % 32;
      if (blockIdx.y * kWordsPerTile + word < words_per_row) h[base + idx] = sum[word][col];
    }
    __syncthreads();  // sum and part are rewritten by the next projection
  }
}

// grid ceil(slots * I / 256), block 256: a [slots, I] = act(sum_c h_g[c], sum_c h_u[c]) of the slot's expert
// (ids [slots]), the chunks in order.
__global__ void __launch_bounds__(256)
    gate_up_finish(const float* __restrict__ h, int chunks, int64_t slots, int I, const int64_t* __restrict__ ids,
                   Activation act, float* __restrict__ a) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= slots * I) return;
  const int64_t slot = idx / I, col = idx % I, e = ids[slot];
  if (e < 0) return;  // held elsewhere: down_decode skips the slot
  float g = 0.0f, u = 0.0f;
  for (int c = 0; c < chunks; ++c) {
    const float* p = h + ((c * slots + slot) * 2) * I + col;
    g += p[0];
    u += p[I];
  }
  a[idx] = activate(act, e, col, I, g, u);
}

// Dot of one stored row (width B, planes at `planes`) with a[0..I), accumulated over this lane's words.
template <int B>
__device__ __forceinline__ float row_dot(const int32_t* __restrict__ planes, const __half* __restrict__ scale_row,
                                         const float* __restrict__ a, int words_per_row, int group, int lane,
                                         bool odd) {
  float sum = 0.0f;
  for (int w = lane; w < words_per_row; w += 32) {
    uint32_t words[B];
#pragma unroll
    for (int p = 0; p < B; ++p) words[p] = static_cast<uint32_t>(__ldg(planes + p * words_per_row + w));
    float part = 0.0f;
#pragma unroll
    for (int col = 0; col < 32; ++col) part += code_at<B>(words, col, odd) * a[w * 32 + col];
    sum += part * __half2float(scale_row[w * 32 / group]);
  }
  return sum;
}

template <int B>
__device__ __forceinline__ void down_class(const Projection& d, const int32_t* seg, const float* a, float* u,
                                           int words_per_row, int groups_per_row, int group, int warp, int warps,
                                           int lane) {
  const int first = seg[0], count = seg[1], plane0 = seg[2];
  for (int r = warp; r < count; r += warps) {
    const int j = first + r;
    float dot = row_dot<B>(d.codes + (int64_t)(plane0 + r * B) * words_per_row, d.scales + (int64_t)j * groups_per_row,
                           a, words_per_row, group, lane, d.odd);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);  // same order in every run
    if (lane == 0) u[__ldg(d.rows + j)] = dot;
  }
}

// grid (slots, row_blocks), block (32 * warps). u [slots, R_down] fp32 must be zeroed: rows with 0 bits stay 0.
// Warp v of block b takes, of every width class, the rows whose position in the class is congruent to
// v * row_blocks + b mod (warps * row_blocks); each row's dot is the same whatever row_blocks is.
__global__ void __launch_bounds__(256)
    down_decode(Projection down, const float* __restrict__ a, const int64_t* __restrict__ ids, int I, int group,
                float* __restrict__ u) {
  const int slot = blockIdx.x, lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32 * gridDim.y, warp = threadIdx.x / 32 * gridDim.y + blockIdx.y;
  const int64_t e = ids[slot];
  if (e < 0) return;
  const int words_per_row = I / 32, groups_per_row = I / group;
  const float* a_s = a + (int64_t)slot * I;
  float* u_s = u + (int64_t)slot * down.rank;
  const int32_t* segs_e = down.segs + e * kClasses * 3;
  down_class<8>(down, segs_e + 0 * 3, a_s, u_s, words_per_row, groups_per_row, group, warp, warps, lane);
  down_class<6>(down, segs_e + 1 * 3, a_s, u_s, words_per_row, groups_per_row, group, warp, warps, lane);
  down_class<4>(down, segs_e + 2 * 3, a_s, u_s, words_per_row, groups_per_row, group, warp, warps, lane);
  down_class<3>(down, segs_e + 3 * 3, a_s, u_s, words_per_row, groups_per_row, group, warp, warps, lane);
  down_class<2>(down, segs_e + 4 * 3, a_s, u_s, words_per_row, groups_per_row, group, warp, warps, lane);
  down_class<1>(down, segs_e + 5 * 3, a_s, u_s, words_per_row, groups_per_row, group, warp, warps, lane);
}

}  // namespace bitsmoe
