// The integer kernels of moe_cpu.h ("the integer path") for AVX-512 with VNNI, BW, VBMI and GFNI; binding.cpp uses
// them only where the CPU reports all four. The float helpers (float bases, SiLU, width dispatch) are
// moe_cpu_impl.h's, compiled here once more; the decode and rounding helpers moe_cpu_int.h's.
//
// 64 codes of any width cost 3 instructions to decode (a load, a byte permute, a bit transpose) and 2 vpdpbusd (hi
// and lo bytes of the activation), where the float path spends b/16 masked multiply-adds per code.
// GCC 12 flags its own _mm512_undefined_* inside the intrinsics header (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>

#include "moe_cpu.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")
#define BITSMOE_AVX512 1
#include "moe_cpu_impl.h"
#include "moe_cpu_int.h"

namespace {

// acc + the products of u's unsigned bytes and s's signed bytes, four to a lane (vpdpbusd). In assembly: around the
// intrinsic, GCC 12 copies the accumulator to another register and back (4 moves per vpdpbusd in project_block)
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// NT tokens x NC chunks of 16 columns from c0, summed over the block's n groups in registers, then added to h
template <int B, int NT, int NC>
inline void add_tile(const CpuFactors& f, const uint64_t* masks, int n, int64_t c0, const RoundedRows* rr,
                     float* const* h) {
  __m512i hi[NT][NC], lo[NT][NC];
#pragma GCC unroll 32
  for (int i = 0; i < NT * NC; ++i) hi[i / NC][i % NC] = lo[i / NC][i % NC] = _mm512_setzero_si512();
  // the tile holding chunk c0: per group, its tile_chunks chunks' planes one after the other
  const uint64_t* m = masks + ((c0 / f.tile_chunks) * n * f.tile_chunks + c0 % f.tile_chunks) * B;
  const bool first_pass = c0 % f.tile_chunks == 0;  // of the passes over this tile, the one that prefetches
  for (int q = 0; q < n; ++q, m += f.tile_chunks * B) {
    if (first_pass) prefetch_ahead(m, f.tile_chunks * B * 8);
    __m512i yh[NT], yl[NT];
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      yh[j] = _mm512_set1_epi32(rr[j].hi[q]);
      yl[j] = _mm512_set1_epi32(rr[j].lo[q]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512i u = decode_bytes<B>(m + c * B);
#pragma GCC unroll 4
      for (int j = 0; j < NT; ++j) {
        hi[j][c] = dpbusd(hi[j][c], u, yh[j]);
        lo[j][c] = dpbusd(lo[j][c], u, yl[j]);
      }
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < NT * NC; ++i) {
    const int j = i / NC, c = i % NC;
    float* out = h[j] + 16 * (c0 + c);
    const __m512 v =
        _mm512_fmadd_ps(_mm512_set1_ps(rr[j].scale), combine(hi[j][c], lo[j][c]), _mm512_set1_ps(rr[j].offset));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), v));
  }
}

// chunks [c0, c1) of NT tokens: 16 sums per token in registers (8 chunks for one token, 4 for two, 2 for four),
// never across a tile
template <int B, int NT>
inline void add_tiles(const CpuFactors& f, const uint64_t* masks, int n, int64_t c0, int64_t c1, const RoundedRows* rr,
                      float* const* h) {
  constexpr int kWide = 8 / NT;
  if (f.tile_chunks % kWide == 0)
    for (int64_t c = c0; c < c1; c += kWide) add_tile<B, NT, kWide>(f, masks, n, c, rr, h);
  else
    for (int64_t c = c0; c < c1; c += 2) add_tile<B, NT, 2>(f, masks, n, c, rr, h);
}

// the n groups from group0 (width B, their first mask row at `masks`) for every token of the expert
template <int B>
void project_block(const CpuFactors& f, const float* z, const Tokens& tk, int64_t group0, int n, const uint64_t* masks,
                   float* acc) {
  const int64_t I = 16 * f.chunks;
  const float step = step_of_plane<B>(0, f.odd), lowest = lowest_code<B>(f.odd);
  for (int64_t j = 0; j < tk.n;) {
    const int nt = tk.n - j >= 4 ? 4 : tk.n - j >= 2 ? 2 : 1;
    alignas(64) float zr[4][4 * kGroupsPerBlock];
    float* h[4];
    for (int t = 0; t < nt; ++t) {
      gather_rows(f, z + tk.token[j + t] * f.R, 4 * group0, 4 * n, zr[t]);
      h[t] = acc + (j + t) * I;
    }
    for (int64_t g = 0; g < f.groups; ++g) {
      const int64_t c0 = g * f.group_chunks, c1 = c0 + f.group_chunks;
      RoundedRows rr[4];
      for (int t = 0; t < nt; ++t) round_rows(f, zr[t], 4 * group0, 4 * n, g, step, lowest, rr[t]);
      if (nt == 4)
        add_tiles<B, 4>(f, masks, n, c0, c1, rr, h);
      else if (nt == 2)
        add_tiles<B, 2>(f, masks, n, c0, c1, rr, h);
      else
        add_tiles<B, 1>(f, masks, n, c0, c1, rr, h);
    }
    j += nt;
  }
}

void project_part(const CpuFactors& f, int64_t e, const float* z, const Tokens& tk, int64_t part, int64_t parts,
                  float* acc) {
  for (int64_t i = 0; i < tk.n * 16 * f.chunks; i += 16) _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
  for_groups(f, e, part, parts, kGroupsPerBlock, [&](int b, int64_t group0, int n, const uint64_t* masks) {
    with_width(b, [&](auto width) { project_block<decltype(width)::kBits>(f, z, tk, group0, n, masks, acc); });
  });
}

void gate_up_part_int(const CpuFactors& g, const CpuFactors& u, int64_t e, const float* z_g, const float* z_u,
                      const Tokens& tk, int64_t part, int64_t parts, float* h) {
  project_part(g, e, z_g, tk, part, parts, h);
  project_part(u, e, z_u, tk, part, parts, h + tk.n * 16 * g.chunks);
}

// ---- a = act(h_g, h_u), rounded per (slot, column group) --------------------------------------------------------

// rows [row0, row0 + rows) of x [*, q.I], each column group rounded with a scale of its own into q
void round_groups(const float* x, int64_t row0, int64_t rows, const QuantizedRows& q) {
  const int64_t G = q.I / q.groups;
  for (int64_t s = row0; s < row0 + rows; ++s)
    for (int64_t g = 0; g < q.groups; ++g) {
      const int64_t at = s * q.I + g * G;
      round_values(x + at, G, q.hi + at, q.lo + at, q.scale + s * q.groups + g, q.sum + s * q.groups + g);
    }
}

void round_int(const float* x, int64_t rows, const QuantizedRows& q) { round_groups(x, 0, rows, q); }

void activate_int(const float* h, int64_t parts, const Tokens& tk, const Activation& act, int64_t e, float* a,
                  const QuantizedRows& q) {
  activate(h, parts, tk, q.I, act, e, a);
  for (int64_t j = 0; j < tk.n; ++j) round_groups(a, tk.slot[j], 1, q);
}

// ---- int8 bases: out[t, r] = scale_r * sum_i W[r, i] x[t, i], x rounded to 16 bits per row -----------------------

// Where an int8 basis's row r is in the CPU basis layout: row r - first of the block of m rows from row `first`
// (the last block n % 4 rows if that is not 0); in the chunk of columns c0 to c0 + 63 (the last one what is left)
// of that block, at first * in + c0 * m + (r - first) * (the chunk's columns)
struct RowAt {
  int64_t first, m, k;
};
inline RowAt row_at(const Basis& b, int64_t r) {
  const int64_t first = r / 4 * 4;
  return {first, b.n - first < 4 ? b.n - first : 4, r - first};
}
inline int64_t chunk_width(const Basis& b, int64_t c0) { return b.in - c0 < 64 ? b.in - c0 : 64; }
inline int64_t chunk_at(const Basis& b, const RowAt& row, int64_t c0) {
  return row.first * b.in + c0 * row.m + row.k * chunk_width(b, c0);
}

// W + 128 (the sign bit flipped) is vpdpbusd's unsigned operand and x's bytes the signed one: the 128 added to every
// weight adds 128 * (sum of x as rounded) to every row, x.sum, taken off at the end. Tiled, a block's rows are one
// stream (row-major they were 4 streams a row apart, the rows ahead prefetched: benchmarks/basis_read_micro.cpp).
template <int NR, int NT>
void int8_block(const Basis& b, const QuantizedRows& x, int64_t r, int64_t t, float* out) {
  __m512i hi[NR][NT], lo[NR][NT];
#pragma GCC unroll 8
  for (int i = 0; i < NR * NT; ++i) hi[i / NT][i % NT] = lo[i / NT][i % NT] = _mm512_setzero_si512();
  const RowAt row = row_at(b, r);  // NR rows: a whole block, or one row
  const int8_t* xhi = x.hi + t * x.I;
  const int8_t* xlo = x.lo + t * x.I;
  for (int64_t c = 0; c < b.in; c += 64) {
    const int64_t width = chunk_width(b, c);
    const __mmask64 m = width == 64 ? ~0ull : (1ull << width) - 1;
    const int8_t* w = static_cast<const int8_t*>(b.weight) + chunk_at(b, row, c);  // row i: w + i * width
    __m512i xh[NT], xl[NT];
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      xh[j] = _mm512_maskz_loadu_epi8(m, xhi + j * x.I + c);
      xl[j] = _mm512_maskz_loadu_epi8(m, xlo + j * x.I + c);
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) {
      const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + i * width), _mm512_set1_epi8(-128));
#pragma GCC unroll 4
      for (int j = 0; j < NT; ++j) {
        hi[i][j] = dpbusd(hi[i][j], wu, xh[j]);
        lo[i][j] = dpbusd(lo[i][j], wu, xl[j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      const float sum = x.scale[t + j] * _mm512_reduce_add_ps(combine(hi[i][j], lo[i][j])) - 128.f * x.sum[t + j];
      out[(t + j) * b.n + r + i] = half(b.scale[r + i]) * sum;
    }
}

// x: rounded by round_int with one group per row
void int8_rows(const Basis& b, const QuantizedRows& x, int64_t T, float* out, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    int64_t t = 0;
    for (; t + 2 <= T; t += 2) int8_block<4, 2>(b, x, r, t, out);
    if (t < T) int8_block<4, 1>(b, x, r, t, out);
  }
  for (; r < r1; ++r)
    for (int64_t t = 0; t < T; ++t) int8_block<1, 1>(b, x, r, t, out);
}

// ---- down: u[slot, k] = F[k, :] . a[slot, :] on the CPU layout, 16 rows (the 16 lanes) at a time --------------

// a's hi or lo bytes of columns 4m to 4m + 3, one int32 broadcast to every lane
inline __m512i four_columns(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// One 16-row group of width B (its masks [chunk of 4 columns, plane] at `masks`, its rows from row0) for NT slots.
// Each slot's sums run in 4 / NT chains (chunks taken in turn) so that consecutive vpdpbusd do not wait on each other.
template <int B, int NT>
void down_group(const CpuFactors& d, const uint64_t* masks, int64_t row0, const QuantizedRows& a, const int64_t* slot,
                float* u) {
  constexpr int P = 4 / NT;
  const int64_t I = a.I;
  __m512 total[NT];
  for (int j = 0; j < NT; ++j) total[j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < d.groups; ++g) {
    __m512i hi[NT][P], lo[NT][P];
#pragma GCC unroll 8
    for (int i = 0; i < NT * P; ++i) hi[i / P][i % P] = lo[i / P][i % P] = _mm512_setzero_si512();
    for (int64_t m = g * d.group_chunks; m < (g + 1) * d.group_chunks; m += P) {
      prefetch_ahead(masks + m * B, P * B * 8);
#pragma GCC unroll 4
      for (int c = 0; c < P; ++c) {
        const __m512i codes = decode_bytes<B>(masks + (m + c) * B);
#pragma GCC unroll 4
        for (int j = 0; j < NT; ++j) {
          hi[j][c] = dpbusd(hi[j][c], codes, four_columns(a.hi + slot[j] * I + 4 * (m + c)));
          lo[j][c] = dpbusd(lo[j][c], codes, four_columns(a.lo + slot[j] * I + 4 * (m + c)));
        }
      }
    }
    const __m512 s =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.scales + g * d.stored_rows + row0)));
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      __m512i h = hi[j][0], l = lo[j][0];
      for (int c = 1; c < P; ++c) {
        h = _mm512_add_epi32(h, hi[j][c]);
        l = _mm512_add_epi32(l, lo[j][c]);
      }
      const int64_t at = slot[j] * a.groups + g;
      const __m512 offset = _mm512_fmadd_ps(s, _mm512_set1_ps(lowest_code<B>(d.odd) * a.sum[at]), total[j]);
      total[j] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(step_of_plane<B>(0, d.odd) * a.scale[at])),
                                 combine(h, l), offset);
    }
  }
  const __m512i rank = _mm512_loadu_si512(d.rows + row0);
  const __mmask16 stored = _mm512_cmpge_epi32_mask(rank, _mm512_setzero_si512());  // padding rows have rank -1
  for (int j = 0; j < NT; ++j) _mm512_mask_i32scatter_ps(u + slot[j] * d.R, stored, rank, total[j], 4);
}

// the 16-row groups in part `part` of `parts` of expert e's, for every slot of the expert
void down_int(const CpuFactors& d, int64_t e, const QuantizedRows& a, const Tokens& tk, int64_t part, int64_t parts,
              float* u) {
  for_groups(d, e, part, parts, 1, [&](int b, int64_t group0, int n, const uint64_t* masks) {
    for (int q = 0; q < n; ++q)
      with_width(b, [&](auto width) {
        constexpr int B = decltype(width)::kBits;
        const uint64_t* m = masks + q * B * d.chunks;
        const int64_t row0 = 16 * (group0 + q);
        int64_t j = 0;
        for (; j + 4 <= tk.n; j += 4) down_group<B, 4>(d, m, row0, a, tk.slot + j, u);
        for (; j + 2 <= tk.n; j += 2) down_group<B, 2>(d, m, row0, a, tk.slot + j, u);
        for (; j < tk.n; ++j) down_group<B, 1>(d, m, row0, a, tk.slot + j, u);
      });
  });
}

}  // namespace

const bitsmoe::cpu::VnniKernels bitsmoe::cpu::kAvx512Vnni = {"avx512-vnni",     &round_int,    &int8_rows,
                                                             &gate_up_part_int, &activate_int, &down_int};
