// How fast two threads read three 2048 x 2048 bases from memory (caches flushed by reading 256 MiB) while
// multiplying them by one token, as the CPU integer path does at T = 1: 4 rows at a time, row-major (4 streams a
// row apart, the next rows prefetched into L2: the kernel before) or tiled (the 4 rows' 64-column chunks side by
// side, one stream: the CPU basis layout of bitsmoe_vllm/cpu_layout.py), for int8 (vpdpbusd on the token's hi and lo
// bytes) and float16 weights (vcvtph2ps + FMA); and, for scale, a plain read of the same bytes with no arithmetic.
// Weights on huge pages; median of 200.
//
//     g++ -O2 -march=native -fopenmp benchmarks/basis_read_micro.cpp -o /tmp/basis_read_micro && /tmp/basis_read_micro
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

constexpr int64_t kRows = 2048, kCols = 2048, kBases = 3;
volatile int64_t sink;

char* huge_buffer(size_t bytes) {
  constexpr size_t kHuge = 2 << 20;
  void* p = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  char* a = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1));
  madvise(a, bytes, MADV_HUGEPAGE);
  memset(a, 1, bytes);  // written: a never-written buffer reads as the zero page
  return a;
}

// the address of row r's element c: row-major (kChunk 0), or tiled (blocks of 4 rows, each kChunk-column chunk's
// rows side by side)
template <int kChunk>
int64_t at(int64_t r, int64_t c) {
  return kChunk ? (r / 4 * kCols + c / kChunk * 4 * kChunk + r % 4 * kChunk + c % kChunk) : r * kCols + c;
}

template <int kTiled>
void int8_rows(const int8_t* w, const int8_t* xh, const int8_t* xl, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; r += 4) {
    __m512i hi[4], lo[4];
    for (int i = 0; i < 4; ++i) hi[i] = lo[i] = _mm512_setzero_si512();
    for (int64_t c = 0; c < kCols; c += 64) {
      if (!kTiled && r + 20 <= r1)
        for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + at<0>(r + 16 + i, c)), _MM_HINT_T2);
      const __m512i a = _mm512_loadu_si512(xh + c), b = _mm512_loadu_si512(xl + c);
      for (int i = 0; i < 4; ++i) {
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w + at<kTiled>(r + i, c)), _mm512_set1_epi8(-128));
        hi[i] = _mm512_dpbusd_epi32(hi[i], u, a);
        lo[i] = _mm512_dpbusd_epi32(lo[i], u, b);
      }
    }
    for (int i = 0; i < 4; ++i)
      out[r + i] = _mm512_reduce_add_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[i]), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(lo[i])));
  }
}

template <int kTiled>
void f16_rows(const uint16_t* w, const float* x, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; r += 4) {
    __m512 acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < kCols; c += 16) {
      if (!kTiled && c % 32 == 0 && r + 20 <= r1)
        for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + at<0>(r + 16 + i, c)), _MM_HINT_T2);
      const __m512 xv = _mm512_loadu_ps(x + c);
      for (int i = 0; i < 4; ++i)
        acc[i] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + at<kTiled>(r + i, c)))), xv, acc[i]);
    }
    for (int i = 0; i < 4; ++i) out[r + i] = _mm512_reduce_add_ps(acc[i]);
  }
}

int64_t plain_read(const char* p, int64_t bytes) {
  __m512i a = _mm512_setzero_si512(), b = a;
  for (int64_t o = 0; o < bytes; o += 128) {
    a = _mm512_add_epi32(a, _mm512_loadu_si512(p + o));
    b = _mm512_add_epi32(b, _mm512_loadu_si512(p + o + 64));
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
}

int main() {
  constexpr int64_t kFlush = 256 << 20;
  const char* flush = huge_buffer(kFlush);
  char* weights = huge_buffer(kBases * kRows * kCols * 2);
  alignas(64) static int8_t xh[kCols], xl[kCols];
  alignas(64) static float x[kCols], out[kRows];
  for (int i = 0; i < kCols; ++i) xh[i] = static_cast<int8_t>(i), xl[i] = static_cast<int8_t>(3 * i), x[i] = 1e-3f * i;
  const auto time = [&](const char* name, int64_t element_bytes, auto rows) {
    const int64_t bytes = kBases * kRows * kCols * element_bytes;
    std::vector<double> ms;
    for (int it = 0; it < 200; ++it) {
#pragma omp parallel
      sink = plain_read(flush + kFlush / omp_get_num_threads() * omp_get_thread_num(), kFlush / omp_get_num_threads());
      const auto start = std::chrono::steady_clock::now();
      for (int64_t b = 0; b < kBases; ++b)
#pragma omp parallel
      {
        const int64_t share = kRows / omp_get_num_threads();
        rows(weights + b * kRows * kCols * element_bytes, share * omp_get_thread_num(), share * (omp_get_thread_num() + 1));
      }
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(ms.begin(), ms.end());
    printf("%-26s %6.3f ms  %5.1f GB/s\n", name, ms[100], bytes / ms[100] / 1e6);
  };
  const auto int8 = [&](auto tiled) {
    return [&](const char* w, int64_t r0, int64_t r1) { int8_rows<decltype(tiled)::value>(reinterpret_cast<const int8_t*>(w), xh, xl, r0, r1, out); };
  };
  const auto f16 = [&](auto tiled) {
    return [&](const char* w, int64_t r0, int64_t r1) { f16_rows<decltype(tiled)::value>(reinterpret_cast<const uint16_t*>(w), x, r0, r1, out); };
  };
  for (int round = 0; round < 2; ++round) {
    time("int8 plain read", 1, [&](const char* w, int64_t r0, int64_t r1) { sink = plain_read(w + r0 * kCols, (r1 - r0) * kCols); });
    time("int8 row-major + prefetch", 1, int8(std::integral_constant<int, 0>{}));
    time("int8 tiled, 64 columns", 1, int8(std::integral_constant<int, 64>{}));
    time("float16 plain read", 2, [&](const char* w, int64_t r0, int64_t r1) { sink = plain_read(w + 2 * r0 * kCols, 2 * (r1 - r0) * kCols); });
    time("float16 row-major + prefetch", 2, f16(std::integral_constant<int, 0>{}));
    time("float16 tiled, 64 columns", 2, f16(std::integral_constant<int, 64>{}));
  }
}
