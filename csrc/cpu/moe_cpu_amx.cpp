// The integer path's gate/up, down and int8 bases on AMX tiles (moe_cpu.h, TileKernels): binding.cpp runs them where
// amx_usable(), for the experts with at least kAmx.min_tokens tokens (down: min_down_tokens) and the calls with at
// least kAmx.min_basis_tokens. gate/up and down take the integer sums and the float steps of moe_cpu_vnni.cpp, in its
// order, so their output is the same bit for bit; the bases' float steps differ (one conversion of the exact sums).
//
// Tiles: 0, 1 the sums of the hi and lo bytes (16 tokens x 16 columns, int32), 2, 3 the activations' hi and lo bytes
// (16 tokens x K), 4 the decoded codes (K / 4 rows of 16 columns x 4 codes: a decoded 64-byte chunk of the CPU layout
// is one such row, for gate/up as for down). tdpbsud multiplies signed (activation) by unsigned (code) bytes. The
// int8 bases take two blocks of rows at a time: 5, 6 and 7 are the second block's sums and codes.
// GCC 12 flags its own _mm512_undefined_* inside the intrinsics header (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "moe_cpu.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c,amx-tile,amx-int8")
#define BITSMOE_AVX512 1
#include "moe_cpu_impl.h"
#include "moe_cpu_int.h"
#include "moe_cpu_tiles.h"

namespace {

constexpr int kTile = 16;  // rows of a tile: tokens (sums, activations) or groups of 4 codes (codes)

// A zeroed, 64-byte aligned array freed on scope exit (the rounding helpers load zr with aligned loads).
template <class T>
struct Buffer {
  explicit Buffer(int64_t n) : p(static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t{64}))) {
    std::memset(p, 0, n * sizeof(T));
  }
  ~Buffer() { ::operator delete[](p, std::align_val_t{64}); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* p;
};

// The tile shapes above with K = k_bytes, loaded into this thread's tile configuration for the scope.
struct Tiles {
  explicit Tiles(int k_bytes) {
    const auto k = static_cast<uint16_t>(k_bytes);
    const auto q = static_cast<uint8_t>(k_bytes / 4);
    load_tile_config({kTile, kTile, kTile, kTile, q, kTile, kTile, q}, {64, 64, k, k, 64, 64, 64, 64});
  }
  ~Tiles() { _tile_release(); }
};

// The sums of 16 tokens' hi and lo bytes (rows a_stride apart) times 16 columns of codes, over `steps` K-steps of
// k_bytes each (codes: k_bytes / 4 rows of 64 bytes a step), into hi, lo [16, 16]
inline void tile_sums(const int8_t* a_hi, const int8_t* a_lo, int64_t a_stride, const uint8_t* codes, int steps,
                      int k_bytes, int32_t* hi, int32_t* lo) {
  _tile_zero(0);
  _tile_zero(1);
  for (int s = 0; s < steps; ++s) {
    _tile_loadd(2, a_hi + s * k_bytes, a_stride);
    _tile_loadd(3, a_lo + s * k_bytes, a_stride);
    _tile_loadd(4, codes + s * k_bytes / 4 * 64, 64);
    _tile_dpbsud(0, 2, 4);
    _tile_dpbsud(1, 3, 4);
  }
  _tile_stored(0, hi, 64);
  _tile_stored(1, lo, 64);
}

// ---- gate/up: as moe_cpu_vnni.cpp's project_block, every token of the expert at once ------------------------------

constexpr int kBlockRows = 4 * kGroupsPerBlock;  // rank rows of a block: the K of one token's activation row

template <int B>
void project_block(const CpuFactors& f, const float* z, const Tokens& tk, int64_t group0, int n, const uint64_t* masks,
                   float* acc) {
  const int64_t I = 16 * f.chunks, tiles = (tk.n + kTile - 1) / kTile, gc = f.group_chunks, tc = f.tile_chunks;
  const int steps = (4 * n + 63) / 64;  // K-steps of 64 rank rows; rows past 4n are zeros in both operands
  const float step = step_of_plane<B>(0, f.odd), lowest = lowest_code<B>(f.odd);
  Buffer<float> zr(tk.n * kBlockRows), scale(tk.n), offset(tk.n);
  Buffer<int8_t> a_hi(tiles * kTile * kBlockRows), a_lo(tiles * kTile * kBlockRows);
  Buffer<uint8_t> codes(gc * steps * kTile * 64);  // per chunk of the column group: its K-steps' rows
  alignas(64) int32_t hi[kTile * kTile], lo[kTile * kTile];
  for (int64_t j = 0; j < tk.n; ++j) gather_rows(f, z + tk.token[j] * f.R, 4 * group0, 4 * n, zr.p + j * kBlockRows);
  for (int64_t g = 0; g < f.groups; ++g) {
    for (int64_t j = 0; j < tk.n; ++j)  // the row's first 4n bytes; the rest stays zero
      round_rows(f, zr.p + j * kBlockRows, 4 * group0, 4 * n, g, step, lowest, a_hi.p + j * kBlockRows,
                 a_lo.p + j * kBlockRows, scale.p + j, offset.p + j);
    for (int64_t k = 0; k < gc; ++k) {
      const int64_t c = g * gc + k;  // the chunk; its masks as moe_cpu_vnni.cpp's add_tile finds them
      const uint64_t* m = masks + ((c / tc) * n * tc + c % tc) * B;
      for (int q = 0; q < n; ++q) {
        if (c % tc == 0) prefetch_ahead(m + q * tc * B, tc * B * 8);  // the tile's rows, once
        _mm512_storeu_si512(codes.p + (k * steps * kTile + q) * 64, decode_bytes<B>(m + q * tc * B));
      }
    }
    for (int64_t k = 0; k < gc; ++k)
      for (int64_t t = 0; t < tiles; ++t) {
        tile_sums(a_hi.p + t * kTile * kBlockRows, a_lo.p + t * kTile * kBlockRows, kBlockRows,
                  codes.p + k * steps * kTile * 64, steps, 64, hi, lo);
        for (int64_t r = 0, j = t * kTile; r < kTile && j < tk.n; ++r, ++j) {
          float* out = acc + j * I + 16 * (g * gc + k);
          const __m512 sums = combine(_mm512_load_si512(hi + r * kTile), _mm512_load_si512(lo + r * kTile));
          const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(scale.p[j]), sums, _mm512_set1_ps(offset.p[j]));
          _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), v));
        }
      }
  }
}

void project_part(const CpuFactors& f, int64_t e, const float* z, const Tokens& tk, int64_t part, int64_t parts,
                  float* acc) {
  std::memset(acc, 0, tk.n * 16 * f.chunks * sizeof(float));
  for_groups(f, e, part, parts, kGroupsPerBlock, [&](int b, int64_t group0, int n, const uint64_t* masks) {
    with_width(b, [&](auto width) { project_block<decltype(width)::kBits>(f, z, tk, group0, n, masks, acc); });
  });
}

void gate_up_part_amx(const CpuFactors& g, const CpuFactors& u, int64_t e, const float* z_g, const float* z_u,
                      const Tokens& tk, int64_t part, int64_t parts, float* h) {
  const Tiles tiles(64);
  project_part(g, e, z_g, tk, part, parts, h);
  project_part(u, e, z_u, tk, part, parts, h + tk.n * 16 * g.chunks);
}

// ---- down: as moe_cpu_vnni.cpp's down_group, every slot of the expert at once --------------------------------------

// One 16-row group of width B (masks [chunk of 4 columns, plane], rows from row0) for the expert's slots, whose
// activations are gathered in a_hi, a_lo [tiles * 16, I]; total [n, 16] scratch
template <int B>
void down_group(const CpuFactors& d, const uint64_t* masks, int64_t row0, const QuantizedRows& a, const Tokens& tk,
                const int8_t* a_hi, const int8_t* a_lo, int k_bytes, uint8_t* codes, float* total, float* u) {
  const int64_t I = a.I, G = I / a.groups, tiles = (tk.n + kTile - 1) / kTile;
  const int steps = static_cast<int>(G / k_bytes);
  alignas(64) int32_t hi[kTile * kTile], lo[kTile * kTile];
  std::memset(total, 0, tk.n * 16 * sizeof(float));
  for (int64_t g = 0; g < d.groups; ++g) {
    for (int64_t m = 0; m < d.group_chunks; ++m) {
      prefetch_ahead(masks + (g * d.group_chunks + m) * B, B * 8);
      _mm512_storeu_si512(codes + m * 64, decode_bytes<B>(masks + (g * d.group_chunks + m) * B));
    }
    const __m512 s =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.scales + g * d.stored_rows + row0)));
    for (int64_t t = 0; t < tiles; ++t) {
      tile_sums(a_hi + t * kTile * I + g * G, a_lo + t * kTile * I + g * G, I, codes, steps, k_bytes, hi, lo);
      for (int64_t r = 0, j = t * kTile; r < kTile && j < tk.n; ++r, ++j) {
        const int64_t at = tk.slot[j] * a.groups + g;
        const __m512 sums = combine(_mm512_load_si512(hi + r * kTile), _mm512_load_si512(lo + r * kTile));
        const __m512 offset =
            _mm512_fmadd_ps(s, _mm512_set1_ps(lowest_code<B>(d.odd) * a.sum[at]), _mm512_loadu_ps(total + 16 * j));
        _mm512_storeu_ps(
            total + 16 * j,
            _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(step_of_plane<B>(0, d.odd) * a.scale[at])), sums, offset));
      }
    }
  }
  const __m512i rank = _mm512_loadu_si512(d.rows + row0);
  const __mmask16 stored = _mm512_cmpge_epi32_mask(rank, _mm512_setzero_si512());  // padding rows have rank -1
  for (int64_t j = 0; j < tk.n; ++j)
    _mm512_mask_i32scatter_ps(u + tk.slot[j] * d.R, stored, rank, _mm512_loadu_ps(total + 16 * j), 4);
}

void down_amx(const CpuFactors& d, int64_t e, const QuantizedRows& a, const Tokens& tk, int64_t part, int64_t parts,
              float* u) {
  const int64_t I = a.I, G = I / a.groups, rows = (tk.n + kTile - 1) / kTile * kTile;
  const int k_bytes = G % 64 == 0 ? 64 : 32;  // G is a multiple of 32 (binding.cpp checks)
  const Tiles tiles(k_bytes);
  Buffer<int8_t> a_hi(rows * I), a_lo(rows * I);  // the slots' rows; the tiles' rows past n stay zero
  for (int64_t j = 0; j < tk.n; ++j) {
    std::memcpy(a_hi.p + j * I, a.hi + tk.slot[j] * I, I);
    std::memcpy(a_lo.p + j * I, a.lo + tk.slot[j] * I, I);
  }
  Buffer<uint8_t> codes(d.group_chunks * 64);
  Buffer<float> total(tk.n * 16);
  for_groups(d, e, part, parts, 1, [&](int b, int64_t group0, int n, const uint64_t* masks) {
    for (int q = 0; q < n; ++q)
      with_width(b, [&](auto width) {
        constexpr int B = decltype(width)::kBits;
        down_group<B>(d, masks + q * B * d.chunks, 16 * (group0 + q), a, tk, a_hi.p, a_lo.p, k_bytes, codes.p, total.p,
                      u);
      });
  });
}

// ---- int8 bases: out[t, r] = scale_r * x.scale[t] * sum_i W[r, i] q[t, i], both signed (tdpbssd) -----------------

// Rows r to r + 15 (4 whole blocks of the CPU basis layout) of columns c to c + 63 as a codes tile: row q holds
// columns c + 4q to c + 4q + 3 of each of the 16 rows, a 16 x 16 transpose of 4-byte words (4 stages, each swapping
// the off-diagonal blocks of s words: 64 two-source permutes)
inline void basis_tile(const Basis& b, int64_t r, int64_t c, int8_t* tile) {
  const int8_t* w = static_cast<const int8_t*>(b.weight);
  __m512i v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(w + (r + i / 4 * 4) * b.in + 4 * c + i % 4 * 64);
  for (int s = 8; s >= 1; s /= 2) {
    alignas(64) int32_t keep[16], swap[16];  // v[i] keeps its words j without bit s, v[i + s] its words with it
    for (int j = 0; j < 16; ++j) {
      keep[j] = j & s ? 16 + j - s : j;
      swap[j] = j & s ? 16 + j : j + s;
    }
    const __m512i k = _mm512_load_si512(keep), w2 = _mm512_load_si512(swap);
    for (int i = 0; i < 16; ++i)
      if (!(i & s)) {
        const __m512i a = v[i];
        v[i] = _mm512_permutex2var_epi32(a, k, v[i + s]);
        v[i + s] = _mm512_permutex2var_epi32(a, w2, v[i + s]);
      }
  }
  for (int q = 0; q < 16; ++q) _mm512_storeu_si512(tile + 64 * q, v[q]);
}

constexpr int64_t kPanelTokens = 128;  // tokens whose activations (hi and lo, 2 x 256 KiB at H 2048) stay in L2
constexpr int64_t kStripX = 1 << 20;   // x's hi and lo bytes up to which the tiles are made two blocks at a time

// Rows [r0, r1) of out [T, b.n], r0 and r1 multiples of 16 within the basis' whole 4-row blocks, b.in a multiple of
// 64; x's hi and lo rows readable up to the next multiple of 16 (the rows past T are never stored). The rows' tiles
// are made a strip of blocks at a time and taken against every panel of tokens before the next strip. Where x's hi
// and lo stay in L2 (kStripX) a strip is two blocks, whose tiles stay in cache (all of them, 4 MiB a basis on one
// thread, went out to memory and back: benchmarks/README.md, "The int8 bases' tiles in strips"). A larger x takes all
// of the rows as one strip, made once: row block by row block over the whole of x streamed x from memory once per 16
// rows (T = 2048: 1 GB a basis)
void int8_rows_amx(const Basis& b, const QuantizedRows& x, int64_t T, float* out, int64_t r0, int64_t r1) {
  const Tiles tiles(64);
  const int64_t chunks = b.in / 64, blocks = (r1 - r0) / kTile, strip = 2 * T * b.in <= kStripX ? 2 : blocks;
  int8_t* codes = scratch<int8_t, 0>(strip * chunks * kTile * 64);  // [block of 16 rows, chunk of 64 columns] tiles
  alignas(64) int32_t hi[2][kTile * kTile], lo[2][kTile * kTile];
  for (int64_t k0 = 0; k0 < blocks; k0 += strip) {
    const int64_t k1 = std::min(blocks, k0 + strip);
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t c = 0; c < chunks; ++c)
        basis_tile(b, r0 + kTile * k, 64 * c, codes + ((k - k0) * chunks + c) * kTile * 64);
    for (int64_t t0 = 0; t0 < T; t0 += kPanelTokens)
      for (int64_t k = k0; k < k1; k += 2) {
        const bool two = k + 1 < k1;  // two blocks of rows against each x tile: 4 tile loads for 4 products
        const int8_t* tile = codes + (k - k0) * chunks * kTile * 64;
        for (int64_t t = t0; t < T && t < t0 + kPanelTokens; t += kTile) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(5);
          _tile_zero(6);
          for (int64_t c = 0; c < chunks; ++c) {
            _tile_loadd(2, x.hi + t * b.in + 64 * c, b.in);
            _tile_loadd(3, x.lo + t * b.in + 64 * c, b.in);
            _tile_loadd(4, tile + c * kTile * 64, 64);
            _tile_dpbssd(0, 2, 4);
            _tile_dpbssd(1, 3, 4);
            if (two) {
              _tile_loadd(7, tile + (chunks + c) * kTile * 64, 64);
              _tile_dpbssd(5, 2, 7);
              _tile_dpbssd(6, 3, 7);
            }
          }
          _tile_stored(0, hi[0], 64);
          _tile_stored(1, lo[0], 64);
          _tile_stored(5, hi[1], 64);
          _tile_stored(6, lo[1], 64);
          for (int i = 0; i < (two ? 2 : 1); ++i) {
            const int64_t r = r0 + kTile * (k + i);
            const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.scale + r)));
            for (int64_t j = 0; j < kTile && t + j < T; ++j) {
              const __m512 sums = combine(_mm512_load_si512(hi[i] + j * kTile), _mm512_load_si512(lo[i] + j * kTile));
              _mm512_storeu_ps(out + (t + j) * b.n + r,
                               _mm512_mul_ps(scale, _mm512_mul_ps(_mm512_set1_ps(x.scale[t + j]), sums)));
            }
          }
        }
      }
  }
}

}  // namespace

bool bitsmoe::cpu::amx_usable() {
  static const bool usable = [] {
    constexpr unsigned kAmxTileInt8 = 3u << 24;  // CPUID (7, 0) EDX bits 24 and 25
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || (edx & kAmxTileInt8) != kAmxTileInt8) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // arch_prctl(2), the tile data state component
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return usable;
}

// The thresholds where the tiles start to win, measured on the 2-core AMX Xeon (benchmarks/README.md, "AMX tiles";
// down's: "The int8 bases' tiles in strips")
const bitsmoe::cpu::TileKernels bitsmoe::cpu::kAmx = {"avx512-amx",      6,        3, 32, &int8_rows_amx,
                                                      &gate_up_part_amx, &down_amx};
