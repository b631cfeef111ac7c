// The integer path's helpers (moe_cpu.h), shared by its AVX-512 VNNI kernels (moe_cpu_vnni.cpp) and its AMX tile
// kernels (moe_cpu_amx.cpp): the decode of packed codes to bytes, the rounding of activations to 16-bit integers, and
// the walk over an expert's blocks of one width. Included after moe_cpu_impl.h, under the including file's
// `#pragma GCC target`; internal linkage only.
#pragma once

namespace {

using bitsmoe::cpu::CpuFactors;
using bitsmoe::cpu::kClassWidths;
using bitsmoe::cpu::kGroupsPerBlock;
using bitsmoe::cpu::QuantizedRows;

constexpr float kQMax = 32639.f;  // 256 * 127 + 127: q = 256 hi + lo with hi, lo in [-127, 127]

// the 64 offset codes (bytes) of a B-bit chunk whose B plane masks start at m: byte n has plane p's bit n as its bit
// p. vpermb puts byte k of plane p at byte 7 - p of qword k (zeros above plane B - 1), and gf2p8affineqb, with those
// qwords as its 8 x 8 bit matrices and 1 << j as byte j, transposes each. 3 instructions for any width; masked adds
// took 2 per plane (benchmarks/decode_micro.cpp, in L1: 1.00-1.01 ns per 64 codes at every width, against 1.23 / 1.61
// ns at 2 / 3 bits). Reads 64 bytes from m, which the layout allows (its masks end with 64 bytes of zeros); after a
// masked load the decode takes 1.49-1.67 ns.
constexpr long long transposed_qword(int k) {
  return 0x0008101820283038ll + k * 0x0101010101010101ll;
}  // byte 7 - p: 8p + k
template <int B>
inline __m512i decode_bytes(const uint64_t* m) {
  constexpr uint64_t kPlanes = 0x0101010101010101ull * ((0xFF00u >> B) & 0xFF);  // bytes 7 - p for p < B
  const __m512i index =
      _mm512_set_epi64(transposed_qword(7), transposed_qword(6), transposed_qword(5), transposed_qword(4),
                       transposed_qword(3), transposed_qword(2), transposed_qword(1), transposed_qword(0));
  const __m512i planes = _mm512_maskz_permutexvar_epi8(kPlanes, index, _mm512_loadu_si512(m));
  return _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64(0x8040201008040201ll), planes, 0);
}

// The codes this many bytes ahead of [at, at + bytes) asked for into L2, by the kernels as they decode. The factors are
// streams that the hardware prefetcher alone read at 12-15 GB/s of the AMX Xeon's ~22 (one token's gate/up and down
// took 0.65 and 0.37 ms there, 0.47 and 0.26 ms with this; 2-8 KiB ahead all gave about that: benchmarks/README.md,
// "A Xeon with a 480 MiB L3").
constexpr int kAheadBytes = 4096;
inline void prefetch_ahead(const uint64_t* at, int bytes) {
  for (int b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(at) + kAheadBytes + b, _MM_HINT_T1);
}

// z's row of the next token into L1 while this token's is gathered: the gathers' scattered lines stall on memory where
// z has outgrown L2 (16 MiB at 2,048 tokens of Qwen3-30B-A3B's shape, where the gathers took a tenth of the layer)
inline void prefetch_row(const float* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
}

// the first n (at most 16) lanes
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// q = round(y[i] * inv) for y [n], stored as bytes hi, lo [n] with q = 256 hi + lo; returns the sums of q's lanes. In
// 64-value chunks: r = q + 128 holds hi in its byte 1 and lo + 128 in its byte 0 (|q| <= kQMax), two byte permutes
// gather those bytes of 4 vectors (one masked byte store per 16 values took twice as long)
inline __m512i round_bytes(const float* y, int64_t n, __m512 inv, int8_t* hi, int8_t* lo) {
  // bytes 0-31: byte 0 of the two sources' 32 words; bytes 32-63: their byte 1
  const __m512i pick =
      _mm512_set_epi32(0x7d797571, 0x6d696561, 0x5d595551, 0x4d494541, 0x3d393531, 0x2d292521, 0x1d191511, 0x0d090501,
                       0x7c787470, 0x6c686460, 0x5c585450, 0x4c484440, 0x3c383430, 0x2c282420, 0x1c181410, 0x0c080400);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 64) {
    __m512i r[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t at = i + 16 * k;
      const __m512i q =
          _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(at < n ? first_lanes(n - at) : 0, y + at), inv));
      sum = _mm512_add_epi32(sum, q);
      r[k] = _mm512_add_epi32(q, _mm512_set1_epi32(128));
    }
    const __m512i a = _mm512_permutex2var_epi8(r[0], pick, r[1]), b = _mm512_permutex2var_epi8(r[2], pick, r[3]);
    const __mmask64 m = n - i >= 64 ? ~0ull : (1ull << (n - i)) - 1;
    _mm512_mask_storeu_epi8(lo + i, m, _mm512_xor_si512(_mm512_shuffle_i64x2(a, b, 0x44), _mm512_set1_epi8(-128)));
    _mm512_mask_storeu_epi8(hi + i, m, _mm512_shuffle_i64x2(a, b, 0xEE));
  }
  return sum;
}

// v [n] rounded to 16-bit integers with one scale into hi, lo [n]; *scale = amax / kQMax, and *sum = *scale * (the
// sum of q), what the rounded values add up to
inline void round_values(const float* v, int64_t n, int8_t* hi, int8_t* lo, float* scale, float* sum) {
  __m512 top = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps(first_lanes(n - i), v + i)));
  const float amax = _mm512_reduce_max_ps(top);
  const __m512i q = round_bytes(v, n, _mm512_set1_ps(amax > 0.f ? kQMax / amax : 0.f), hi, lo);
  *scale = amax / kQMax;
  *sum = amax / kQMax * static_cast<float>(_mm512_reduce_add_epi32(q));
}

// 256 hi + lo of two integer sums, as floats
inline __m512 combine(__m512i hi, __m512i lo) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(lo));
}

// ---- gate/up's activations: y = z[token j, rank] * scale for a block of 4-row groups, rounded per column group --

// One token's y for a block's rows and one column group: byte r of hi[q] / lo[q] is row 4q + r; offset is the
// codes' lowest value times the sum of the rounded y (one number for the whole column group)
struct RoundedRows {
  int32_t hi[kGroupsPerBlock], lo[kGroupsPerBlock];
  float scale, offset;
};

// z[rank of row k] (0 for padding) for the n rows from row0 (once per block and token: the column groups share it)
inline void gather_rows(const CpuFactors& f, const float* z, int64_t row0, int n, float* zr) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    const __m512i rank = _mm512_maskz_loadu_epi32(m, f.rows + row0 + i);
    const __mmask16 stored =
        _mm512_mask_cmpge_epi32_mask(m, rank, _mm512_setzero_si512());  // padding rows have rank -1
    _mm512_store_ps(zr + i, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), stored, rank, z, 4));
  }
}

// y'[k] = zr[k] * scale[k, g] * step for the n rows from row0, rounded with one scale into hi, lo [n] (bytes), with
// *scale and *offset as RoundedRows'
inline void round_rows(const CpuFactors& f, const float* zr, int64_t row0, int n, int64_t g, float step, float lowest,
                       int8_t* hi, int8_t* lo, float* scale, float* offset) {
  alignas(64) float y[4 * kGroupsPerBlock];
  __m512 top = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, f.scales + g * f.stored_rows + row0 + i));
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_load_ps(m, zr + i), s), _mm512_set1_ps(step));
    _mm512_store_ps(y + i, v);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
  }
  const float amax = _mm512_reduce_max_ps(top);
  *scale = amax / kQMax;
  const __m512i sum = round_bytes(y, n, _mm512_set1_ps(amax > 0.f ? kQMax / amax : 0.f), hi, lo);
  *offset = lowest / step * *scale * static_cast<float>(_mm512_reduce_add_epi32(sum));
}
inline void round_rows(const CpuFactors& f, const float* zr, int64_t row0, int n, int64_t g, float step, float lowest,
                       RoundedRows& out) {
  round_rows(f, zr, row0, n, g, step, lowest, reinterpret_cast<int8_t*>(out.hi), reinterpret_cast<int8_t*>(out.lo),
             &out.scale, &out.offset);
}

// fn(b, first group, groups, their masks) for the blocks of part `part` of `parts` of expert e's groups, a block
// being `per_block` groups of one width class (the last of a class shorter)
template <class Fn>
void for_groups(const CpuFactors& f, int64_t e, int64_t part, int64_t parts, int per_block, Fn fn) {
  const int32_t* seg = f.segs + e * 18;
  int64_t total = 0;
  for (int c = 0; c < 6; ++c) total += (seg[3 * c + 1] + per_block - 1) / per_block;
  const int64_t first = total * part / parts, last = total * (part + 1) / parts;
  int64_t block = 0;  // the expert's blocks before this one
  for (int c = 0; c < 6; ++c)
    for (int64_t q = 0; q < seg[3 * c + 1]; q += per_block, ++block)
      if (block >= first && block < last)
        fn(kClassWidths[c], seg[3 * c] + q,
           static_cast<int>(seg[3 * c + 1] - q < per_block ? seg[3 * c + 1] - q : per_block),
           f.masks + (seg[3 * c + 2] + q * kClassWidths[c]) * f.chunks);
}

}  // namespace
