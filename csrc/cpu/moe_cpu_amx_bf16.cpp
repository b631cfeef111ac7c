// The integer path's gate/up and down for bfloat16 layers on AMX-BF16 tiles (moe_cpu.h, Bf16TileKernels): binding.cpp
// runs them in place of the int8 tiles (moe_cpu_amx.cpp) where the layer's input is bfloat16 and the CPU has AMX-BF16
// (down from 24 tokens an expert: below that its decode, dearer than the int8 tiles', cost more than it saved).
//
// The int8 tiles round each token's z to 16-bit integers once per (128 rank rows, column group), and add every 128
// rows' sums to float accumulators: at a few dozen tokens an expert that rounding and those additions took most of
// gate/up's time (benchmarks/README.md, "AMX tiles"). Here the codes' values (lowest + code * step, exact in
// bfloat16) are decoded once per call and expert, z times the column group's scales is rounded to bfloat16 once per
// (token, column group), and tdpbf16ps sums all of the part's rank rows in float: one tile store per 16 tokens x 16
// columns. z carries bfloat16's 8 significant bits, as the layer's bfloat16 input already does. down (further below)
// takes the activations in bfloat16 once per call instead of 16-bit integers per (slot, column group), and one float
// sum per column group where the int8 tiles take two (hi and lo bytes).
//
// Tiles: 0-3 float sums (16 tokens x 16 columns: two tiles of tokens x two column chunks), 4, 5 z times the scales
// (16 tokens x 32 rank rows), 6, 7 code values (16 pairs of rank rows x 16 columns x 2).
// GCC 12 flags its own _mm512_undefined_* inside the intrinsics header (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "moe_cpu.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512bf16,gfni,avx2,fma,f16c,amx-tile,amx-bf16")
#define BITSMOE_AVX512 1
#include "moe_cpu_impl.h"
#include "moe_cpu_int.h"
#include "moe_cpu_tiles.h"

namespace {

constexpr int kTile = 16;  // tokens of a tile, and columns
constexpr int kStep = 32;  // rank rows one tdpbf16ps sums
// What an expert's tokens keep in L2 at most: gate/up's z of a part's rows (float, and times the scales in bfloat16),
// down's activations in bfloat16. binding.cpp splits gate/up's rank rows in more parts for the average expert
// (kAmxBf16.part_bytes); the kernels below take an expert's tokens in blocks where one has more still (a router that
// has not learned to balance gives a few experts most of a prompt's tokens: 1,000-1,500 of 2,048 on a random-weights
// Qwen3-30B-A3B), decoding the values again for each block.
constexpr int64_t kPartBytes = 1 << 20;
constexpr int64_t kZBytes = sizeof(float) + sizeof(uint16_t);  // a token and rank row of z, float and bfloat16

// The most tokens of an expert, in whole pairs of tiles, whose `bytes_per_token` stay within kPartBytes
inline int64_t tokens_within(int64_t bytes_per_token) {
  constexpr int64_t kPair = 2 * kTile;
  return std::max<int64_t>(kPair, kPartBytes / bytes_per_token / kPair * kPair);
}

// tokens [j0, j0 + n) of tk
inline Tokens slice(const Tokens& tk, int64_t j0, int64_t n) { return {tk.token + j0, tk.slot + j0, n}; }

struct Tiles {
  Tiles() {
    load_tile_config({kTile, kTile, kTile, kTile, kTile, kTile, kTile, kTile}, {64, 64, 64, 64, 64, 64, 64, 64});
  }
  ~Tiles() { _tile_release(); }
};

// The tile instructions take their tile as an immediate
inline void zero_tile(int i) {
  switch (i) {
    case 0:
      _tile_zero(0);
      break;
    case 1:
      _tile_zero(1);
      break;
    case 2:
      _tile_zero(2);
      break;
    default:
      _tile_zero(3);
  }
}
inline void store_tile(int i, float* out, int64_t stride) {
  switch (i) {
    case 0:
      _tile_stored(0, out, stride * sizeof(float));
      break;
    case 1:
      _tile_stored(1, out, stride * sizeof(float));
      break;
    case 2:
      _tile_stored(2, out, stride * sizeof(float));
      break;
    default:
      _tile_stored(3, out, stride * sizeof(float));
  }
}

// The first `rows` rows (at most 16) of tile i (float sums) at out, rows `stride` apart: a partial tile goes through
// a buffer, so that nothing past the last row is written
inline void store_rows(int i, float* out, int64_t stride, int64_t rows) {
  if (rows >= kTile) {
    store_tile(i, out, stride);
    return;
  }
  alignas(64) float part[kTile * kTile];
  store_tile(i, part, kTile);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * stride, part + r * kTile, 64);
}

// One of the part's blocks (moe_cpu_int.h, for_groups) and its first row in the part's rank rows, K
struct Block {
  int b;
  int64_t group0;
  int n;
  const uint64_t* masks;
  int64_t k0;  // a multiple of kStep; the rows from k0 + 4n to the next multiple are zeros
};

// The values of a B-bit code, lowest + code * step, as bfloat16 words (exact: at most 8 significant bits): 64 words
// in two registers, of which vpermw reads the first 32 (B <= 5) and vpermi2w all (B = 6)
template <int B>
struct CodeValues {
  __m512i lo, hi;
  explicit CodeValues(bool odd) {
    const __m512 lane = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 v[4];
    for (int k = 0; k < 4; ++k)
      v[k] = _mm512_fmadd_ps(_mm512_add_ps(lane, _mm512_set1_ps(16.f * k)), _mm512_set1_ps(step_of_plane<B>(0, odd)),
                             _mm512_set1_ps(lowest_code<B>(odd)));
    lo = (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]);
    hi = (__m512i)_mm512_cvtne2ps_pbh(v[3], v[2]);
  }
};

// byte 2w (w = 2j + r) of a tile row: byte 4j + r of the decode, + 2 for the second row
struct PairIndex {
  alignas(64) int8_t v[64];
  constexpr PairIndex() : v{} {
    for (int i = 0; i < 64; ++i) v[i] = static_cast<int8_t>(2 * (i / 2) - (i / 2) % 2);
  }
};
constexpr PairIndex kPairs{};

// The 64 codes of a 4-row group's chunk (planes at m; byte 4j + r of the decode is column j, row r) as two tile rows
// of their values in bfloat16, rows 0 and 1 (word 2j + r: column j, row r) then rows 2 and 3. Widths up to 6: the
// codes' bytes spread to words, looked up in `values`; 8 bits: through float (256 values)
template <int B>
inline void decode_values(const uint64_t* m, const CodeValues<B>& values, uint16_t* out) {
  const __m512i d = decode_bytes<B>(m), pairs = _mm512_load_si512(kPairs.v);
  constexpr __mmask64 kEven = 0x5555555555555555ull;
  for (int h = 0; h < 2; ++h) {
    const __m512i index = _mm512_maskz_permutexvar_epi8(kEven, _mm512_add_epi8(pairs, _mm512_set1_epi8(2 * h)), d);
    __m512i v;
    if constexpr (B <= 5)
      v = _mm512_permutexvar_epi16(index, values.lo);
    else if constexpr (B == 6)
      v = _mm512_permutex2var_epi16(values.lo, index, values.hi);
    else {
      const __m512 low = _mm512_set1_ps(lowest_code<B>(false));
      const __m512 v0 = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(index))), low);
      const __m512 v1 =
          _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(index, 1))), low);
      v = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
    }
    _mm512_store_si512(out + 32 * h, v);
  }
}

// Chunks [c0, c0 + cc) of tile t (tile_chunks chunks of 16 columns, within one column group) of a block's values into
// w: chunk c's rows at w + ((c - c0) * K + k0) * 16, as pairs of rank rows of 16 columns
template <int B>
void decode_block(const CpuFactors& f, const Block& bl, int64_t t, int64_t c0, int64_t cc, int64_t K, int64_t k0,
                  uint16_t* w) {
  const int64_t tc = f.tile_chunks;
  const CodeValues<B> values(f.odd);
  const uint64_t* m = bl.masks + t * bl.n * tc * B;  // a block's masks: [tile, group, chunk in the tile, plane]
  for (int q = 0; q < bl.n; ++q, m += tc * B) {
    prefetch_ahead(m, tc * B * 8);
    for (int64_t c = c0; c < c0 + cc; ++c) decode_values<B>(m + c * B, values, w + ((c - c0) * K + k0 + 4 * q) * 16);
  }
}

// acc's rows (n, at most 16) of tile t's columns [16 c0, 16 (c0 + CC)) = a (one tile of tokens) times the part's code
// values, block by block: each block's values decoded into w (in L1: CC * 128 rank rows * 16 columns) and multiplied
// at once, the CC sums held in tiles 0 to CC - 1 over all the part's rows. Decoding all the part's rows of a tile first
// (tile_products) writes them to L2 and loads them back, a tile load from L2 taking twice one from L1: gate/up took
// 19.6-19.9 ms that way, 15.8-16.1 ms this way, at T = 128 on Qwen3-30B-A3B's shape (8 tokens an expert). The same
// for two tiles of tokens (two chunks at a time) changed nothing at T = 512.
template <int CC>
void one_token_tile(const CpuFactors& f, const std::vector<Block>& blocks, int64_t t, int64_t c0, const uint16_t* a,
                    int64_t lda, int64_t n, int64_t I, uint16_t* w, float* acc) {
  for (int c = 0; c < CC; ++c) zero_tile(c);
  for (const Block& bl : blocks) {
    const int64_t rows = 4 * bl.n, K = (rows + kStep - 1) / kStep * kStep;
    with_width(bl.b, [&](auto width) { decode_block<decltype(width)::kBits>(f, bl, t, c0, CC, K, 0, w); });
    for (int c = 0; c < CC; ++c) std::memset(w + (c * K + rows) * 16, 0, (K - rows) * 16 * sizeof(uint16_t));
    for (int64_t s = 0; s < K; s += kStep) {
      _tile_loadd(4, a + bl.k0 + s, lda * sizeof(uint16_t));
      _tile_loadd(5, w + s * 16, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, w + (K + s) * 16, 64);
      _tile_dpbf16ps(1, 4, 6);
      if constexpr (CC == 4) {
        _tile_loadd(5, w + (2 * K + s) * 16, 64);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, w + (3 * K + s) * 16, 64);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
  }
  for (int c = 0; c < CC; ++c) store_rows(c, acc + 16 * (t * f.tile_chunks + c0 + c), I, n);
}

// out [rows, 32] (rows at most 16 * NT, I apart) = NT tiles of 16 tokens' y (a, rows lda apart) times two column
// chunks of code values (w, the second K * 16 after the first), over K rank rows: each y tile loaded (from L2) feeds
// two products, each values tile NT
template <int NT>
inline void tile_products(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t K, int64_t rows, int64_t I,
                          float* out) {
  for (int i = 0; i < 2 * NT; ++i) zero_tile(i);
  for (int64_t s = 0; s < K; s += kStep) {
    _tile_loadd(6, w + s * 16, 64);
    _tile_loadd(7, w + (K + s) * 16, 64);
    _tile_loadd(4, a + s, lda * sizeof(uint16_t));
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (NT == 2) {
      _tile_loadd(5, a + kTile * lda + s, lda * sizeof(uint16_t));
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  for (int i = 0; i < NT; ++i, rows -= kTile, out += kTile * I) {
    store_rows(2 * i, out, I, rows);
    store_rows(2 * i + 1, out + 16, I, rows);
  }
}

// acc [n, I] = the part's rows of F^T z for every token of the expert
void project_part(const CpuFactors& f, int64_t e, const float* z, const Tokens& tk, int64_t part, int64_t parts,
                  float* acc) {
  const int64_t I = 16 * f.chunks, tc = f.tile_chunks;
  std::vector<Block> blocks;
  int64_t K = 0;
  for_groups(f, e, part, parts, kGroupsPerBlock, [&](int b, int64_t group0, int n, const uint64_t* masks) {
    blocks.push_back({b, group0, n, masks, K});
    K += (4 * n + kStep - 1) / kStep * kStep;
  });
  if (K == 0) {
    std::memset(acc, 0, tk.n * I * sizeof(float));
    return;
  }
  const int64_t most = tokens_within(kZBytes * K);  // z of the part's rows in float and bfloat16
  if (tk.n > most) {
    for (int64_t j0 = 0; j0 < tk.n; j0 += most)
      project_part(f, e, z, slice(tk, j0, std::min(most, tk.n - j0)), part, parts, acc + j0 * I);
    return;
  }
  const int64_t tiles = (tk.n + kTile - 1) / kTile;
  // y = z * s for one column group [tiles * 16, K] in bfloat16, rows past n and padding rows zero; rows `lda` apart,
  // not a multiple of 4 KiB, which would put a tile's 16 rows in one set of L1
  const int64_t lda = K + 32;
  uint16_t* a = scratch<uint16_t, 0>(tiles * kTile * lda);
  uint16_t* w = scratch<uint16_t, 1>(tc * K * 16);  // the code values of one tile of columns, [chunk, K / 2, 16, 2]
  float* zr = scratch<float, 2>(tk.n * K);          // z of the part's rows, [n, K], padding rows zero
  float* s = scratch<float, 3>(K);                  // one column group's scales of the part's rows, padding rows zero
  std::memset(a + tk.n * lda, 0, (tiles * kTile - tk.n) * lda * sizeof(uint16_t));
  if (tiles > 1)  // (one tile of tokens: one_token_tile lays out and pads w itself)
    for (const Block& bl : blocks) {
      const int rows = 4 * bl.n, padded = (rows + kStep - 1) / kStep * kStep;
      for (int64_t k = 0; k < tc; ++k)
        std::memset(w + (k * K + bl.k0 + rows) * 16, 0, (padded - rows) * 16 * sizeof(uint16_t));
    }
  // token by token, so that each token's row of z and zr is read once (block by block re-read them: at 128 tokens an
  // expert the gathering and scaling of z took 35 % of the call's samples that way, 25 % this way)
  for (int64_t j = 0; j < tk.n; ++j) {
    if (j + 1 < tk.n) prefetch_row(z + tk.token[j + 1] * f.R, f.R);
    for (const Block& bl : blocks) {
      float* to = zr + j * K + bl.k0;
      gather_rows(f, z + tk.token[j] * f.R, 4 * bl.group0, 4 * bl.n, to);  // whole vectors: to 16 rows past
      if (bl.n % 8 != 0 && bl.n % 8 <= 4) _mm512_store_ps(to + (4 * bl.n + 15) / 16 * 16, _mm512_setzero_ps());
    }
  }
  for (int64_t g = 0; g < f.groups; ++g) {
    for (const Block& bl : blocks) {
      const int rows = 4 * bl.n, padded = (rows + kStep - 1) / kStep * kStep;
      const uint16_t* scales = f.scales + g * f.stored_rows + 4 * bl.group0;
      for (int i = 0; i < padded; i += 16)
        _mm512_store_ps(s + bl.k0 + i,
                        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(i < rows ? first_lanes(rows - i) : 0, scales + i)));
    }
    for (int64_t j = 0; j < tk.n; ++j)
      for (int64_t i = 0; i < K; i += 32)
        _mm512_store_si512(
            a + j * lda + i,
            (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_load_ps(zr + j * K + i + 16), _mm512_load_ps(s + i + 16)),
                                         _mm512_mul_ps(_mm512_load_ps(zr + j * K + i), _mm512_load_ps(s + i))));
    for (int64_t t = g * f.group_chunks / tc; t < (g + 1) * f.group_chunks / tc; ++t) {
      if (tiles == 1) {
        for (int64_t c0 = 0; c0 < tc; c0 += 4)  // tile_chunks is 2, 4 or 8
          (tc == 2 ? one_token_tile<2> : one_token_tile<4>)(f, blocks, t, c0, a, lda, tk.n, I, w, acc);
        continue;
      }
      for (const Block& bl : blocks)
        with_width(bl.b, [&](auto width) { decode_block<decltype(width)::kBits>(f, bl, t, 0, tc, K, bl.k0, w); });
      for (int64_t k = 0; k < tc; k += 2)  // tile_chunks is 2, 4 or 8
        for (int64_t tt = 0; tt < tiles; tt += 2)
          if (tt + 1 < tiles)
            tile_products<2>(a + tt * kTile * lda, lda, w + k * K * 16, K, tk.n - tt * kTile, I,
                             acc + tt * kTile * I + 16 * (t * tc + k));
          else
            tile_products<1>(a + tt * kTile * lda, lda, w + k * K * 16, K, tk.n - tt * kTile, I,
                             acc + tt * kTile * I + 16 * (t * tc + k));
    }
  }
}

void gate_up_part_bf16(const CpuFactors& g, const CpuFactors& u, int64_t e, const float* z_g, const float* z_u,
                       const Tokens& tk, int64_t part, int64_t parts, float* h) {
  const Tiles tiles;
  project_part(g, e, z_g, tk, part, parts, h);
  project_part(u, e, z_u, tk, part, parts, h + tk.n * 16 * g.chunks);
}

// ---- down: u[slot, rank] = sum_c F_d[rank, c] a[slot, c] ------------------------------------------------------------

// Columns [c0, c0 + G) of a 16-row group's code values (width B, masks [chunk of 4 columns, plane] at m) as G / 2 tile
// rows of 16 rows x 2 columns (the decode's byte 4i + c is row i, column c of the chunk)
template <int B>
void decode_down(const uint64_t* m, int64_t c0, int64_t G, bool odd, uint16_t* w) {
  const CodeValues<B> values(odd);
  for (int64_t c = c0 / 4; c < (c0 + G) / 4; ++c) {
    prefetch_ahead(m + c * B, B * 8);
    decode_values<B>(m + c * B, values, w + (4 * c - c0) * 16);
  }
}

// u [slots, d.R] for part `part` of `parts` of expert e's 16-row groups, two groups against every token at a time: per
// column group the float sums of a (rounded to bfloat16) times the code values, times the group's scales (one per
// row and column group, so not foldable into a) added to the rows' totals. A part that is the whole expert keeps all
// of its totals (in stored order, in L2) and writes each slot's row of u once, front to back, gathering the ranks
// from them: scattered 16 ranks at a time into rows of u out of cache, the totals took 35 ms of a 250 ms layer at
// T = 2048 on Qwen3-30B-A3B's shape.
void down_bf16(const CpuFactors& d, int64_t e, const float* a, const Tokens& tk, int64_t part, int64_t parts,
               float* u) {
  const int64_t I = 4 * d.chunks, G = I / d.groups, tiles = (tk.n + kTile - 1) / kTile, lda = I + 32;
  const int64_t most = tokens_within(2 * lda);  // the activations in bfloat16
  if (tk.n > most) {
    for (int64_t j0 = 0; j0 < tk.n; j0 += most)
      down_bf16(d, e, a, slice(tk, j0, std::min(most, tk.n - j0)), part, parts, u);
    return;
  }
  const Tiles tile_config;
  const bool whole = parts == 1;
  int64_t S = 0;  // the expert's stored rows
  for (int c = 0; c < 6; ++c) S += bitsmoe::cpu::kDownGroupRows * d.segs[e * 18 + 3 * c + 1];
  const int64_t stride = whole ? S : 32;                     // of `total`'s rows
  uint16_t* ab = scratch<uint16_t, 0>(tiles * kTile * lda);  // the slots' a in bfloat16, rows past n zero
  uint16_t* w = scratch<uint16_t, 1>(2 * G * 16);            // two groups' code values for one column group
  float* sums = scratch<float, 2>(tiles * kTile * 32);       // [token, 2 groups x 16 rows] of one column group
  float* totals = scratch<float, 3>(tk.n * stride);          // ... over all column groups: [token, stride]
  int32_t* at = scratch<int32_t, 4>(d.R);                    // whole: each rank's stored row, -1 for none
  if (whole) std::fill_n(at, d.R, -1);
  std::memset(ab + tk.n * lda, 0, (tiles * kTile - tk.n) * lda * sizeof(uint16_t));
  for (int64_t j = 0; j < tk.n; ++j)
    for (int64_t c = 0; c < I; c += 32) {  // I is a multiple of G, a multiple of 32 (binding.cpp checks)
      const float* row = a + tk.slot[j] * I + c;
      _mm512_store_si512(ab + j * lda + c,
                         (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row)));
    }
  int64_t local = 0;  // whole: the expert's stored rows before this pair
  for_groups(d, e, part, parts, 1, [&](int b, int64_t group0, int n, const uint64_t* masks) {
    with_width(b, [&](auto width) {
      constexpr int B = decltype(width)::kBits;
      for (int q = 0, pair = 2; q < n; q += 2, local += 16 * pair) {
        pair = n - q >= 2 ? 2 : 1;
        float* total = whole ? totals + local : totals;
        if (pair == 1) std::memset(w + G * 16, 0, G * 16 * sizeof(uint16_t));
        for (int64_t j = 0; j < tk.n; ++j) std::memset(total + j * stride, 0, 16 * pair * sizeof(float));
        for (int64_t g = 0; g < d.groups; ++g) {
          for (int h = 0; h < pair; ++h)
            decode_down<B>(masks + (q + h) * B * d.chunks, g * G, G, d.odd, w + h * G * 16);
          for (int64_t t = 0; t < tiles; t += 2)
            if (t + 1 < tiles)
              tile_products<2>(ab + t * kTile * lda + g * G, lda, w, G, tk.n - t * kTile, 32, sums + t * kTile * 32);
            else
              tile_products<1>(ab + t * kTile * lda + g * G, lda, w, G, tk.n - t * kTile, 32, sums + t * kTile * 32);
          for (int h = 0; h < pair; ++h) {
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(d.scales + g * d.stored_rows + 16 * (group0 + q + h))));
            for (int64_t j = 0; j < tk.n; ++j) {
              float* to = total + j * stride + 16 * h;
              _mm512_storeu_ps(to, _mm512_fmadd_ps(s, _mm512_load_ps(sums + j * 32 + 16 * h), _mm512_loadu_ps(to)));
            }
          }
        }
        for (int h = 0; h < pair; ++h) {
          const __m512i rank = _mm512_loadu_si512(d.rows + 16 * (group0 + q + h));
          const __mmask16 stored = _mm512_cmpge_epi32_mask(rank, _mm512_setzero_si512());  // padding rows: rank -1
          if (whole) {
            const __m512i row =
                _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(local + 16 * h)),
                                 _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
            _mm512_mask_i32scatter_epi32(at, stored, rank, row, 4);
          } else {
            for (int64_t j = 0; j < tk.n; ++j)
              _mm512_mask_i32scatter_ps(u + tk.slot[j] * d.R, stored, rank, _mm512_loadu_ps(total + j * 32 + 16 * h),
                                        4);
          }
        }
      }
    });
  });
  if (!whole) return;
  // u's rows with streaming stores where whole aligned vectors: read by nothing before finish() sums them over the
  // slots
  for (int64_t j = 0; j < tk.n; ++j) {
    if (j + 1 < tk.n) prefetch_row(totals + (j + 1) * S, S);
    float* row = u + tk.slot[j] * d.R;
    const bool stream = d.R % 16 == 0 && (reinterpret_cast<uintptr_t>(row) & 63) == 0;
    for (int64_t r = 0; r < d.R; r += 16) {
      const __mmask16 in = first_lanes(d.R - r);
      const __m512i from = _mm512_maskz_loadu_epi32(in, at + r);
      const __mmask16 stored = _mm512_mask_cmpge_epi32_mask(in, from, _mm512_setzero_si512());
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), stored, from, totals + j * S, 4);
      if (stream)
        _mm512_stream_ps(row + r, v);
      else
        _mm512_mask_storeu_ps(row + r, in, v);
    }
  }
  _mm_sfence();
}

}  // namespace

bool bitsmoe::cpu::amx_bf16_usable() {
  static const bool usable = [] {
    constexpr unsigned kAmxBf16 = 1u << 22;  // CPUID (7, 0) EDX bit 22
    unsigned eax, ebx, ecx, edx;
    return amx_usable() && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & kAmxBf16) &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return usable;
}

const bitsmoe::cpu::Bf16TileKernels bitsmoe::cpu::kAmxBf16 = {24, kPartBytes, kZBytes, &gate_up_part_bf16, &down_bf16};
