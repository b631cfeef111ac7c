// The gate/up inner loop of the CPU integer path (csrc/cpu/moe_cpu_vnni.cpp) in L1, with three ways to decode 64
// codes from their bit planes: masked byte adds (one per plane, the kernel before), and vpermb + gf2p8affineqb (the
// kernel now) after a plain or a masked 64-byte load. Checks that all three give the same sums.
//
//     g++ -O2 -march=icelake-server benchmarks/decode_micro.cpp -o /tmp/decode_micro && /tmp/decode_micro
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

enum class Decode { kMaskedAdds, kTranspose, kTransposeMaskedLoad };

constexpr long long transposed_qword(int k) { return 0x0008101820283038ll + k * 0x0101010101010101ll; }

template <int B, Decode D>
inline __m512i decode(const uint64_t* m) {
  if constexpr (D == Decode::kMaskedAdds) {
    __m512i u = _mm512_maskz_mov_epi8(_cvtu64_mask64(m[0]), _mm512_set1_epi8(1));
    for (int p = 1; p < B; ++p) u = _mm512_mask_add_epi8(u, _cvtu64_mask64(m[p]), u, _mm512_set1_epi8(static_cast<char>(1 << p)));
    return u;
  } else {
    constexpr uint64_t kPlanes = 0x0101010101010101ull * ((0xFF00u >> B) & 0xFF);
    const __m512i index = _mm512_set_epi64(transposed_qword(7), transposed_qword(6), transposed_qword(5), transposed_qword(4),
                                           transposed_qword(3), transposed_qword(2), transposed_qword(1), transposed_qword(0));
    const __m512i raw = D == Decode::kTranspose ? _mm512_loadu_si512(m) : _mm512_maskz_loadu_epi8(B == 8 ? ~0ull : (1ull << (8 * B)) - 1, m);
    return _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64(0x8040201008040201ll), _mm512_maskz_permutexvar_epi8(kPlanes, index, raw), 0);
  }
}

inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// 8 chunks of 16 columns at a time, summed over `groups` 4-row groups (masks [group, chunk, plane]), as add_tile
template <int B, Decode D>
__attribute__((noinline)) void run(const uint64_t* masks, const int32_t* yhi, const int32_t* ylo, int groups, int chunks, float* out) {
  for (int c0 = 0; c0 < chunks; c0 += 8) {
    __m512i hi[8], lo[8];
    for (int c = 0; c < 8; ++c) hi[c] = lo[c] = _mm512_setzero_si512();
    for (int g = 0; g < groups; ++g) {
      const __m512i yh = _mm512_set1_epi32(yhi[g]), yl = _mm512_set1_epi32(ylo[g]);
      const uint64_t* m = masks + (static_cast<size_t>(g) * chunks + c0) * B;
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        const __m512i u = decode<B, D>(m + c * B);
        hi[c] = dpbusd(hi[c], u, yh);
        lo[c] = dpbusd(lo[c], u, yl);
      }
    }
    for (int c = 0; c < 8; ++c) {
      const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[c]), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(lo[c]));
      _mm512_storeu_ps(out + 16 * (c0 + c), _mm512_add_ps(_mm512_loadu_ps(out + 16 * (c0 + c)), f));
    }
  }
}

// ns per 64 codes on 64 rows x 768 columns (16 groups x 48 chunks), the sums left in out
template <int B, Decode D>
double time_it(float* out) {
  constexpr int kGroups = 16, kChunks = 48, kReps = 20000;
  std::vector<uint64_t> m(kGroups * kChunks * B + 8);  // 64 bytes past the last chunk, as the layout has
  for (size_t i = 0; i + 8 < m.size(); ++i) m[i] = 0x9E3779B97F4A7C15ull * (i + 1);
  const std::vector<int32_t> yh(kGroups, 0x01020304), yl(kGroups, 0x05060708);
  std::memset(out, 0, sizeof(float) * 16 * kChunks);
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < kReps; ++r) run<B, D>(m.data(), yh.data(), yl.data(), kGroups, kChunks, out);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s / (double(kReps) * kGroups * kChunks) * 1e9;  // a (group, chunk) is 64 codes
}

template <int B>
void compare() {
  static float a[16 * 48], b[16 * 48], c[16 * 48];
  const double adds = time_it<B, Decode::kMaskedAdds>(a), transpose = time_it<B, Decode::kTranspose>(b),
               masked = time_it<B, Decode::kTransposeMaskedLoad>(c);
  const bool same = std::memcmp(a, b, sizeof a) == 0 && std::memcmp(a, c, sizeof a) == 0;
  std::printf("%d bits: masked adds %.2f ns, transpose %.2f ns, transpose after a masked load %.2f ns per 64 codes; same sums: %s\n", B,
              adds, transpose, masked, same ? "yes" : "NO");
}

int main() {
  compare<1>();
  compare<2>();
  compare<3>();
  compare<4>();
  compare<6>();
  compare<8>();
}
