// The rounding of one group of a factor row to codes and a float16 scale (offline/rounding.py: quantize_rows), shared
// by the quantizer's kernels: rounding.cpp (the cost model's losses, the export's rows) and feedback.cpp (the error
// feedback). Inline, so that each kernel's target clones vectorise it for their instruction set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace bitsmoe::rounding {

// float16 rounding of a scale, as torch's .half().float(): nearest, ties to even
[[gnu::always_inline]] inline float fp16(float v) { return static_cast<float>(static_cast<_Float16>(v)); }

struct Width {
  bool odd;  // format version 2's odd codes (packing.code_bounds)
  float bottom, top;
};

// a width a row can have: 0 (dropped) or a packed width (packing.SUPPORTED_WIDTHS)
inline bool allocatable(int64_t b) { return b == 0 || b == 1 || b == 2 || b == 3 || b == 4 || b == 6 || b == 8; }

inline Width width_of(int64_t bits, bool odd_codes) {
  const bool odd = bits == 1 || (odd_codes && bits != 8);  // packing.ODD_WIDTHS: every width but 8
  const float top = odd ? static_cast<float>((1 << bits) - 1) : static_cast<float>((1 << (bits - 1)) - 1);
  return {odd, odd ? -top : -top - 1, top};
}

// width_of every packed width, indexed by the width (1 to 8)
inline std::vector<Width> widths_by_bits(bool odd_codes) {
  std::vector<Width> kinds(9);
  for (const int64_t w : {1, 2, 3, 4, 6, 8}) kinds[w] = width_of(w, odd_codes);
  return kinds;
}

// packing.round_to_codes of v (x in units of the scale); Odd a template argument, so that the loops have no branch
template <bool Odd>
[[gnu::always_inline]] inline float code_of(float v, const Width& w) {
  // floor as nearbyint, one less where that rounded up: GCC vectorises nearbyint, not floor (which may trap). 2 n -+ 1,
  // not 2 (n - 1) + 1 where n > h: GCC's AVX2 path keeps the subtraction under a branch (it may trap) and the loops
  // stay scalar, 9x slower than the AVX-512 path's masked subtraction (the same values either way)
  const float h = v * 0.5f, n = std::nearbyint(Odd ? h : v);
  const float c = Odd ? 2.0f * n + (n > h ? -1.0f : 1.0f) : n;
  return std::min(std::max(c, w.bottom), w.top);
}

// quantize_rows' scale for one group x [G] at width bits >= 2. The sums are OpenMP SIMD reductions: lane by lane,
// then across the lanes.
template <bool Odd>
[[gnu::always_inline]] inline float group_scale(const float* x, int64_t G, const Width& w, int64_t steps) {
  float absmax = 0;
#pragma omp simd reduction(max : absmax)
  for (int64_t i = 0; i < G; ++i) absmax = std::max(absmax, std::abs(x[i]));
  float scale = fp16(absmax / w.top), best = scale, best_err = std::numeric_limits<float>::infinity();
  for (int64_t step = 0; step <= steps; ++step) {
    const float s = scale, safe = s > 0 ? s : 1.0f, on = s > 0 ? 1.0f : 0.0f;  // a zero scale rounds 0
    float err = 0, qq = 0, cx = 0;
#pragma omp simd reduction(+ : err, qq, cx)
    for (int64_t i = 0; i < G; ++i) {
      const float c = code_of<Odd>(x[i] / safe * on, w), d = c * s - x[i];
      err += d * d, qq += c * c, cx += c * x[i];
    }
    if (err < best_err) best = s, best_err = err;
    if (qq > 0) scale = fp16(cx / std::max(qq, 1.0f));
    // the next scale depends on this one only: at a fixed point every later step would measure it again, and the
    // best stays (the same result; rounding_losses 1.4x faster on Gaussian rows)
    if (scale == s) break;
  }
  return best;
}

// quantize_rows of one group x [G] at width b >= 1 (w = width_of(b)): its scale, and its codes into c [G]
[[gnu::always_inline]] inline float round_group(const float* x, int64_t G, int64_t b, const Width& w, int64_t steps,
                                                float* c) {
  if (b == 1) {  // the sign, at the least-squares scale mean |x|
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < G; ++i) sum += std::abs(x[i]);
    for (int64_t i = 0; i < G; ++i) c[i] = x[i] >= 0 ? 1.0f : -1.0f;
    return fp16(sum / static_cast<float>(G));
  }
  const float s = w.odd ? group_scale<true>(x, G, w, steps) : group_scale<false>(x, G, w, steps);
  const float safe = s > 0 ? s : 1.0f, on = s > 0 ? 1.0f : 0.0f;
  // a copy the stores to c cannot alias: through the reference GCC reloaded the bounds at every code, did not
  // vectorise the loop, and branched on each code's rounding (two thirds of rounding_losses' time at 2 bits)
  const Width k = w;
  if (k.odd) {
#pragma omp simd
    for (int64_t i = 0; i < G; ++i) c[i] = code_of<true>(x[i] / safe * on, k);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < G; ++i) c[i] = code_of<false>(x[i] / safe * on, k);
  }
  return s;
}

}  // namespace bitsmoe::rounding
