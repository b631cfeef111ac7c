// The bodies of the CPU kernels declared in moe_cpu.h, written once over a few vector helpers. Included only by
// moe_cpu_avx512.cpp and moe_cpu_avx2.cpp, after their `#pragma GCC target` and with BITSMOE_AVX512 set to 1 or 0.
// Everything here has internal linkage, and no standard-library template is instantiated (the instruction set
// must not leak into code shared with the rest of the program).
//
// Decoding 32 columns of a b-bit row costs b masked adds on top of a constant: bit j of plane p is bit p of column
// j's offset code, so the lanes to add 2^p to are the plane word itself, shifted (FORMAT.md, "Bit packing").

namespace {

using bitsmoe::cpu::Activation;
using bitsmoe::cpu::Basis;
using bitsmoe::cpu::BasisType;
using bitsmoe::cpu::Factors;
using bitsmoe::cpu::Tokens;

#if BITSMOE_AVX512
using V = __m512;
constexpr int kLanes = 16;
constexpr int kTileTokens = 8;  // tokens whose sums stay in registers (2 vectors per word each)
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float a) { return _mm512_set1_ps(a); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vdiv(V a, V b) { return _mm512_div_ps(a, b); }
inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V vfloor(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline V vpow2(V k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23));
}
inline float vsum(V v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));  // + the other 256-bit half
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));  // + the neighbouring 128-bit quarter
  __m128 s = _mm512_castps512_ps128(v);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// v + step in the lanes whose bit is set in the low kLanes bits of `lanes`; as a multiply-add by 1, measured faster
// than a masked add (benchmarks/README.md, design timings)
inline V add_where(V v, uint32_t lanes, V step) {
  return _mm512_mask_fmadd_ps(v, static_cast<__mmask16>(lanes), _mm512_set1_ps(1.f), step);
}
inline V load_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline V load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline V load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
using V = __m256;
constexpr int kLanes = 8;
constexpr int kTileTokens = 2;  // tokens whose sums stay in registers (4 vectors per word each)
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float a) { return _mm256_set1_ps(a); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vdiv(V a, V b) { return _mm256_div_ps(a, b); }
inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline V vfloor(V a) { return _mm256_floor_ps(a); }
inline V vpow2(V k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
}
inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline V add_where(V v, uint32_t lanes, V step) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), bit), bit);
  return _mm256_add_ps(v, _mm256_and_ps(_mm256_castsi256_ps(set), step));
}
inline V load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline V load_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline V load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

inline float half(uint16_t h) { return _cvtsh_ss(h); }
inline float bfloat(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// e^x for x clamped to [-87, 88], as Cephes' expf: x = k ln2 + r, e^r = 1 + r + r^2 P(r), 2^k in the exponent
inline V vexp(V x) {
  x = vmin(vmax(x, vset(-87.f)), vset(88.f));
  const V k = vfloor(vfma(x, vset(1.44269504088896341f), vset(0.5f)));
  const V r = vfma(k, vset(2.12194440e-4f), vfma(k, vset(-0.693359375f), x));
  constexpr float kPoly[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  V y = vset(1.9875691500e-4f);
  for (const float c : kPoly) y = vfma(y, r, vset(c));
  y = vfma(y, vmul(r, r), vadd(r, vset(1.f)));
  return vmul(y, vpow2(k));
}

// ---- bases: rows of a dense matrix times a few vectors --------------------------------------------------------

constexpr int64_t element_bytes(BasisType t) { return t == BasisType::kInt8 ? 1 : t == BasisType::kFloat32 ? 4 : 2; }

template <BasisType BT>
inline V load_chunk(const Basis& b, int64_t r, int64_t i) {
  if constexpr (BT == BasisType::kFloat16) return load_f16(static_cast<const uint16_t*>(b.weight) + r * b.in + i);
  if constexpr (BT == BasisType::kBFloat16) return load_bf16(static_cast<const uint16_t*>(b.weight) + r * b.in + i);
  if constexpr (BT == BasisType::kInt8) return load_i8(static_cast<const int8_t*>(b.weight) + r * b.in + i);
  if constexpr (BT == BasisType::kFloat32) return vload(static_cast<const float*>(b.weight) + r * b.in + i);
}

template <BasisType BT>
inline float load_one(const Basis& b, int64_t r, int64_t i) {
  if constexpr (BT == BasisType::kFloat16) return half(static_cast<const uint16_t*>(b.weight)[r * b.in + i]);
  if constexpr (BT == BasisType::kBFloat16) return bfloat(static_cast<const uint16_t*>(b.weight)[r * b.in + i]);
  if constexpr (BT == BasisType::kInt8) return static_cast<const int8_t*>(b.weight)[r * b.in + i];
  if constexpr (BT == BasisType::kFloat32) return static_cast<const float*>(b.weight)[r * b.in + i];
}

// out[t, r] for NR rows from r and NT tokens from t: each weight chunk is read once for NT tokens
template <BasisType BT, int NR, int NT>
void basis_block(const Basis& b, const float* x, int64_t r, int64_t t, float* out) {
  V acc[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = vzero();
  // a row is often one 4 KiB page, where the hardware prefetcher starts over: ask for the rows 4 blocks ahead
  // meanwhile, into L2 only (each faster than the alternative where measured: benchmarks/README.md, design timings)
  const int64_t row_bytes = b.in * element_bytes(BT);
  const char* next = static_cast<const char*>(b.weight) + (r + 4 * NR) * row_bytes;
  const bool prefetch = r + 5 * NR <= b.n;
  int64_t c = 0;
  for (; c + kLanes <= b.in; c += kLanes) {
    if (prefetch && c * element_bytes(BT) % 64 == 0)
      for (int i = 0; i < NR; ++i) _mm_prefetch(next + i * row_bytes + c * element_bytes(BT), _MM_HINT_T2);
    V w[NR];
    for (int i = 0; i < NR; ++i) w[i] = load_chunk<BT>(b, r + i, c);
    for (int j = 0; j < NT; ++j) {
      const V xv = vload(x + (t + j) * b.in + c);
      for (int i = 0; i < NR; ++i) acc[i][j] = vfma(w[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    const float scale = BT == BasisType::kInt8 ? half(b.scale[r + i]) : 1.f;
    for (int j = 0; j < NT; ++j) {
      float sum = vsum(acc[i][j]);
      for (int64_t cc = c; cc < b.in; ++cc) sum += load_one<BT>(b, r + i, cc) * x[(t + j) * b.in + cc];
      out[(t + j) * b.n + r + i] = sum * scale;
    }
  }
}

template <BasisType BT>
void basis_rows_of(const Basis& b, const float* x, int64_t T, float* out, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) basis_block<BT, 4, 4>(b, x, r, t, out);
    for (; t < T; ++t) basis_block<BT, 4, 1>(b, x, r, t, out);
  }
  for (; r < r1; ++r) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) basis_block<BT, 1, 4>(b, x, r, t, out);
    for (; t < T; ++t) basis_block<BT, 1, 1>(b, x, r, t, out);
  }
}

void basis_rows(const Basis& b, const float* x, int64_t T, float* out, int64_t r0, int64_t r1) {
  switch (b.type) {
    case BasisType::kFloat16:
      basis_rows_of<BasisType::kFloat16>(b, x, T, out, r0, r1);
      break;
    case BasisType::kBFloat16:
      basis_rows_of<BasisType::kBFloat16>(b, x, T, out, r0, r1);
      break;
    case BasisType::kInt8:
      basis_rows_of<BasisType::kInt8>(b, x, T, out, r0, r1);
      break;
    case BasisType::kFloat32:
      basis_rows_of<BasisType::kFloat32>(b, x, T, out, r0, r1);
      break;
  }
}

// ---- factors on the packed codes ------------------------------------------------------------------------------

void expert_offsets(const uint8_t* bits, int64_t E, int64_t R, int64_t* plane_at, int64_t* row_at) {
  plane_at[0] = row_at[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    uint32_t planes = 0, rows = 0;  // 32 bits: the compiler vectorises the byte sums
    for (int64_t k = 0; k < R; ++k) {
      planes += bits[e * R + k];
      rows += bits[e * R + k] != 0;
    }
    plane_at[e + 1] = plane_at[e] + planes;
    row_at[e + 1] = row_at[e] + rows;
  }
}

// a B-bit code j stands for lowest_code + j * step_of_plane(0): bit p of j adds step_of_plane(p). Odd codes (format
// version 2 up to 6 bits, version 1 at 1 bit only; `odd` is the version's choice) are -(2^B - 1) + 2j, the others
// -2^(B-1) + j.
template <int B>
constexpr bool odd_width(bool odd) {
  return B == 1 || (odd && B <= 6);
}
template <int B>
constexpr float lowest_code(bool odd) {
  return odd_width<B>(odd) ? -static_cast<float>((1 << B) - 1) : -static_cast<float>(1 << (B - 1));
}
template <int B>
constexpr float step_of_plane(int p, bool odd) {
  return static_cast<float>((odd_width<B>(odd) ? 2 : 1) << p);
}

// columns [c, c + kLanes) of a row whose plane words (one per plane) for these 32 columns are `word`
template <int B>
inline V decode(const uint32_t (&word)[B], int c, bool odd) {
  V q = vset(lowest_code<B>(odd));
  for (int p = 0; p < B; ++p) q = add_where(q, word[p] >> c, vset(step_of_plane<B>(p, odd)));
  return q;
}

template <int B>
inline void load_words(const uint32_t* planes, int64_t words, int64_t w, uint32_t (&word)[B]) {
  for (int p = 0; p < B; ++p) word[p] = planes[p * words + w];
}

// fn(Width<b>{}) for a row width b known only at run time; Width<B>::kBits gives it back as a constant
template <int B>
struct Width {
  static constexpr int kBits = B;
};

template <class Fn>
inline void with_width(int b, Fn fn) {
  switch (b) {
    case 1:
      return fn(Width<1>{});
    case 2:
      return fn(Width<2>{});
    case 3:
      return fn(Width<3>{});
    case 4:
      return fn(Width<4>{});
    case 6:
      return fn(Width<6>{});
    case 8:
      return fn(Width<8>{});
  }
}

// Calls fn(k, b, planes, scales) for each stored row k in [r0, r1) of expert e: its width, plane words and scales.
template <class Fn>
void for_stored_rows(const Factors& f, int64_t e, int64_t r0, int64_t r1, Fn fn) {
  const uint8_t* bits = f.bits + e * f.R;
  uint32_t planes_before = 0, rows_before = 0;  // 32 bits: the compiler vectorises the byte sums
  for (int64_t k = 0; k < r0; ++k) {
    planes_before += bits[k];
    rows_before += bits[k] != 0;
  }
  int64_t plane = f.plane_at[e] + planes_before, row = f.row_at[e] + rows_before;
  for (int64_t k = r0; k < r1; ++k) {
    if (bits[k] == 0) continue;
    fn(k, bits[k], f.codes + plane * f.words, f.scales + row * f.groups);
    plane += bits[k];
    ++row;
  }
}

// ---- gate/up: h[j, :] = sum over stored rows k of z[token j, k] F[k, :] ---------------------------------------
// The rows are taken kRowBlock stored rows at a time, sorted by width so that the width is a constant in the inner
// loops; for each few columns, the sums stay in registers across the block's rows and are added to h once.
constexpr int kRowBlock = 64;
constexpr int kWidths[] = {1, 2, 3, 4, 6, 8};  // with_width's

struct StoredRow {
  const uint32_t* planes;
  const uint16_t* scales;
  int64_t k;
};

struct RowBlock {
  StoredRow rows[6][kRowBlock];  // by width, kWidths[i]
  int count[6];
};

// Calls fn(block) for the stored rows in [r0, r1) of expert e, kRowBlock at a time.
template <class Fn>
void for_row_blocks(const Factors& f, int64_t e, int64_t r0, int64_t r1, Fn fn) {
  RowBlock block{};
  int n = 0;
  for_stored_rows(f, e, r0, r1, [&](int64_t k, int b, const uint32_t* planes, const uint16_t* scales) {
    const int i = b <= 4 ? b - 1 : b == 6 ? 4 : 5;
    block.rows[i][block.count[i]++] = {planes, scales, k};
    if (++n == kRowBlock) {
      fn(block);
      for (int& c : block.count) c = 0;
      n = 0;
    }
  });
  if (n > 0) fn(block);
}

// fn(Width<b>{}, rows, n) for each width b of the block, with its n rows
template <class Fn>
inline void for_widths(const RowBlock& block, Fn fn) {
  for (int i = 0; i < 6; ++i)
    if (block.count[i] > 0) with_width(kWidths[i], [&](auto width) { fn(width, block.rows[i], block.count[i]); });
}

// One token, NW words from w0 (in one group): with z_k s fixed per group, plane p of row k adds the constant
// z_k s 2^p to the lanes its word selects, and the codes' offset (z_k s lo per column) is one number per group.
template <int NW>
void add_block_one_token(const Factors& f, const RowBlock& block, const float* z, int64_t w0, float* acc) {
  constexpr int C = NW * 32 / kLanes;
  const int64_t g = w0 / f.group_words;
  V sum[C];
  for (V& v : sum) v = vzero();
  float offset = 0.f;
  for_widths(block, [&](auto width, const StoredRow* rows, int n) {
    constexpr int B = decltype(width)::kBits;
    for (int r = 0; r < n; ++r) {
      const float s = z[rows[r].k] * half(rows[r].scales[g]);
      offset += s * lowest_code<B>(f.odd);
      V step[B];
      for (int p = 0; p < B; ++p) step[p] = vset(s * step_of_plane<B>(p, f.odd));
      for (int w = 0; w < NW; ++w) {
        uint32_t word[B];
        load_words<B>(rows[r].planes, f.words, w0 + w, word);
        for (int c = 0; c < 32 / kLanes; ++c)
          for (int p = 0; p < B; ++p)
            sum[w * 32 / kLanes + c] = add_where(sum[w * 32 / kLanes + c], word[p] >> (c * kLanes), step[p]);
      }
    }
  });
  for (int v = 0; v < C; ++v)
    vstore(acc + 32 * w0 + v * kLanes, vadd(vload(acc + 32 * w0 + v * kLanes), vadd(sum[v], vset(offset))));
}

// NT tokens, word w: each word is decoded once for the NT tokens
template <int NT>
void add_block_tokens(const Factors& f, const RowBlock& block, const float* z, const int64_t* token, int64_t w,
                      float* acc) {
  constexpr int C = 32 / kLanes;
  const int64_t I = 32 * f.words, g = w / f.group_words;
  V sum[NT][C];
  for (int j = 0; j < NT; ++j)
    for (int c = 0; c < C; ++c) sum[j][c] = vzero();
  for_widths(block, [&](auto width, const StoredRow* rows, int n) {
    constexpr int B = decltype(width)::kBits;
    for (int r = 0; r < n; ++r) {
      const float s = half(rows[r].scales[g]);
      uint32_t word[B];
      load_words<B>(rows[r].planes, f.words, w, word);
      V q[C];
      for (int c = 0; c < C; ++c) q[c] = decode<B>(word, c * kLanes, f.odd);
      for (int j = 0; j < NT; ++j) {
        const V coef = vset(z[token[j] * f.R + rows[r].k] * s);
        for (int c = 0; c < C; ++c) sum[j][c] = vfma(coef, q[c], sum[j][c]);
      }
    }
  });
  for (int j = 0; j < NT; ++j)
    for (int c = 0; c < C; ++c)
      vstore(acc + j * I + 32 * w + c * kLanes, vadd(vload(acc + j * I + 32 * w + c * kLanes), sum[j][c]));
}

// acc [n, I] = sum over the stored rows k in part `part` of `parts` of z[token j, k] F_e[k, :]
void project_rows(const Factors& f, int64_t e, const float* z, const Tokens& tk, int64_t part, int64_t parts,
                  float* acc) {
  const int64_t I = 32 * f.words;
  for (int64_t i = 0; i < tk.n * I; i += kLanes) vstore(acc + i, vzero());
  // one token: AVX-512 8 sums (of 32 registers), AVX2 8 (of 16); tiles within a group
  constexpr int kMaxTile = BITSMOE_AVX512 ? 4 : 2;
  const int tile = f.group_words % kMaxTile == 0 ? kMaxTile : f.group_words % 2 == 0 ? 2 : 1;
  for_row_blocks(f, e, f.R * part / parts, f.R * (part + 1) / parts, [&](const RowBlock& block) {
    if (tk.n == 1) {
      const float* z1 = z + tk.token[0] * f.R;
      for (int64_t w0 = 0; w0 < f.words; w0 += tile) {
        if (tile == 4)
          add_block_one_token<4>(f, block, z1, w0, acc);
        else if (tile == 2)
          add_block_one_token<2>(f, block, z1, w0, acc);
        else
          add_block_one_token<1>(f, block, z1, w0, acc);
      }
      return;
    }
    for (int64_t w = 0; w < f.words; ++w) {  // up to kTileTokens tokens at a time
      int64_t j = 0;
      for (; j + kTileTokens <= tk.n; j += kTileTokens)
        add_block_tokens<kTileTokens>(f, block, z, tk.token + j, w, acc + j * I);
      for (; kTileTokens > 4 && j + 4 <= tk.n; j += 4) add_block_tokens<4>(f, block, z, tk.token + j, w, acc + j * I);
      for (; j + 2 <= tk.n; j += 2) add_block_tokens<2>(f, block, z, tk.token + j, w, acc + j * I);
      for (; j < tk.n; ++j) add_block_tokens<1>(f, block, z, tk.token + j, w, acc + j * I);
    }
  });
}

void gate_up_part(const Factors& g, const Factors& u, int64_t e, const float* z_g, const float* z_u, const Tokens& tk,
                  int64_t part, int64_t parts, float* h) {
  project_rows(g, e, z_g, tk, part, parts, h);
  project_rows(u, e, z_u, tk, part, parts, h + tk.n * 32 * g.words);
}

void activate(const float* h, int64_t parts, const Tokens& tk, int64_t I, const Activation& act, int64_t e, float* a) {
  const int64_t size = tk.n * I;  // h [parts, 2, n, I]: gate then up
  for (int64_t j = 0; j < tk.n; ++j) {
    float* out = a + tk.slot[j] * I;
    for (int64_t c = 0; c < I; c += kLanes) {
      V g = vzero(), u = vzero();
      for (int64_t p = 0; p < parts; ++p) {  // in part order: the same sums however the work was split
        g = vadd(g, vload(h + 2 * p * size + j * I + c));
        u = vadd(u, vload(h + (2 * p + 1) * size + j * I + c));
      }
      if (act.gate_bias != nullptr) {
        g = vadd(g, vload(act.gate_bias + e * I + c));
        u = vadd(u, vload(act.up_bias + e * I + c));
      }
      if (!act.swigluoai) {
        vstore(out + c, vmul(vdiv(g, vadd(vset(1.f), vexp(vsub(vzero(), g)))), u));
        continue;
      }
      // (min(u, limit) clamped below at -limit, + 1) * g' sigmoid(alpha g'), g' = min(g, limit)
      g = vmin(g, vset(act.limit));
      u = vadd(vmax(vmin(u, vset(act.limit)), vset(-act.limit)), vset(1.f));
      const V glu = vdiv(g, vadd(vset(1.f), vexp(vmul(vset(-act.alpha), g))));
      vstore(out + c, vmul(glu, u));
    }
  }
}

// u[slot j, k] = F[k, :] . a[slot j, :] for NB slots at once, one stored row k (B bits); two sums per slot (even and
// odd vectors of each word) so consecutive multiply-adds do not wait on each other
template <int B, int NB>
void dot_row(const Factors& f, const uint32_t* planes, const uint16_t* scales, const float* const (&a)[NB],
             float (&out)[NB]) {
  static_assert(32 % kLanes == 0);
  V total[NB];
  for (int j = 0; j < NB; ++j) total[j] = vzero();
  for (int64_t g = 0; g < f.groups; ++g) {
    V acc[NB][2];
    for (int j = 0; j < NB; ++j) acc[j][0] = acc[j][1] = vzero();
    for (int64_t w = g * f.group_words; w < (g + 1) * f.group_words; ++w) {
      uint32_t word[B];
      load_words<B>(planes, f.words, w, word);
      for (int c = 0; c < 32; c += kLanes) {
        const V q = decode<B>(word, c, f.odd);
        const int half_of_word = c * 2 / 32;
        for (int j = 0; j < NB; ++j) acc[j][half_of_word] = vfma(q, vload(a[j] + 32 * w + c), acc[j][half_of_word]);
      }
    }
    const V s = vset(half(scales[g]));
    for (int j = 0; j < NB; ++j) total[j] = vfma(s, vadd(acc[j][0], acc[j][1]), total[j]);
  }
  for (int j = 0; j < NB; ++j) out[j] = vsum(total[j]);
}

template <int NB>
void dot_rows_of_slots(const Factors& d, const uint32_t* planes, const uint16_t* scales, int b, const float* a,
                       const int64_t* slot, int64_t k, float* u) {
  const int64_t I = 32 * d.words;
  const float* rows[NB];
  float out[NB] = {};
  for (int j = 0; j < NB; ++j) rows[j] = a + slot[j] * I;
  with_width(b, [&](auto w) { dot_row<decltype(w)::kBits, NB>(d, planes, scales, rows, out); });
  for (int j = 0; j < NB; ++j) u[slot[j] * d.R + k] = out[j];
}

void down(const Factors& d, int64_t e, const float* a, const Tokens& tk, int64_t r0, int64_t r1, float* u) {
  for_stored_rows(d, e, r0, r1, [&](int64_t k, int b, const uint32_t* planes, const uint16_t* scales) {
    int64_t j = 0;
    for (; j + 4 <= tk.n; j += 4) dot_rows_of_slots<4>(d, planes, scales, b, a, tk.slot + j, k, u);
    for (; j + 2 <= tk.n; j += 2) dot_rows_of_slots<2>(d, planes, scales, b, a, tk.slot + j, k, u);
    for (; j < tk.n; ++j) dot_rows_of_slots<1>(d, planes, scales, b, a, tk.slot + j, k, u);
  });
}

}  // namespace
