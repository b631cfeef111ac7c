// The quantizer's rounding of factor rows (offline/rounding.py: quantize_rows, quantize_mixed_rows: float16 group
// scales refined by alternating least squares, the best seen kept), with a group's values kept in registers through
// every refinement step, where the tensor code wrote every step's temporaries to memory:
// - torch.ops.bitsmoe.rounding_losses: the cost model's measurement (offline/cost.py: unit_losses), each row rounded at
//   every candidate width and the weighted squared error summed (113 of 499 s on a layer of Qwen3-30B-A3B's shape in
//   tensor code, benchmarks/README.md "Quantization speed");
// - torch.ops.bitsmoe.round_rows: the codes and scales of rows at a width each (the export's rounding).
// The Python code stays the reference (tests/test_rounding_kernels.py). Sums run lane by lane, then across the lanes:
// the values match the reference to float32 rounding, not bit for bit (a scale whose error ties another's within that
// rounding may be chosen instead of it).
#include "rounding.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace bitsmoe::rounding;

constexpr int kMaxWeights = 4;

// sum_i w_i (c_i s - x_i)^2 over a group (in float32, as the reference sums a row's)
[[gnu::always_inline]] inline double weighted_error(const float* c, float s, const float* x, const float* w,
                                                    int64_t G) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < G; ++i) sum += (c[i] * s - x[i]) * (c[i] * s - x[i]) * w[i];
  return sum;
}

// rows [begin, end) of rounding_losses; cloned for AVX-512 and AVX2 (chosen when the library loads): the lanes of
// every step vectorise, where x86-64's baseline has no vector rounding
__attribute__((target_clones("avx512f", "avx2", "default"))) void row_losses(
    const float* fp, const float* wp, double* op, int64_t begin, int64_t end, int64_t E, int64_t R, int64_t Rw,
    int64_t I, int64_t V, at::IntArrayRef widths, const std::vector<Width>& kinds, int64_t G, int64_t steps) {
  std::vector<float> c(G);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t e = row / R, r = row % R;
    const float* x = fp + row * I;
    const float* wrow[kMaxWeights];
    for (int64_t v = 0; v < V; ++v) wrow[v] = wp + ((v * E + e) * Rw + (Rw == 1 ? 0 : r)) * I;
    for (size_t j = 0; j < widths.size(); ++j) {
      double loss[kMaxWeights] = {};
      for (int64_t g0 = 0; g0 < I; g0 += G) {
        const float* xg = x + g0;
        float s = 0;  // width 0: the row dropped, every code 0
        if (widths[j] == 0)
          std::fill(c.begin(), c.end(), 0.0f);
        else
          s = round_group(xg, G, widths[j], kinds[j], steps, c.data());
        for (int64_t v = 0; v < V; ++v) loss[v] += weighted_error(c.data(), s, xg, wrow[v] + g0, G);
      }
      for (int64_t v = 0; v < V; ++v) op[((v * E + e) * R + r) * static_cast<int64_t>(widths.size()) + j] = loss[v];
    }
  }
}

// rows [begin, end) of round_rows
__attribute__((target_clones("avx512f", "avx2", "default"))) void rows_rounded(const float* xp, const int64_t* bp,
                                                                               const std::vector<Width>& kinds,
                                                                               int8_t* cp, at::Half* sp, int64_t begin,
                                                                               int64_t end, int64_t I, int64_t G,
                                                                               int64_t steps) {
  std::vector<float> c(G);
  for (int64_t row = begin; row < end; ++row) {
    if (bp[row] == 0) {  // dropped: codes and scales 0
      std::fill(cp + row * I, cp + (row + 1) * I, int8_t{0});
      std::fill(sp + row * (I / G), sp + (row + 1) * (I / G), at::Half(0.0f));
      continue;
    }
    for (int64_t g0 = 0; g0 < I; g0 += G) {
      const float s = round_group(xp + row * I + g0, G, bp[row], kinds[bp[row]], steps, c.data());
      sp[(row * I + g0) / G] = static_cast<at::Half>(s);  // exact: the scale is a float16 value
      for (int64_t i = 0; i < G; ++i) cp[row * I + g0 + i] = static_cast<int8_t>(c[i]);
    }
  }
}

// factors [E, R, I] float32, weights [V, E, R or 1, I] float32, widths [J] -> [V, E, R, J] float64: row (e, r)'s
// sum_i weights[v, e, r, i] (Q_b(f) - f)_i^2 at width widths[j] (0: the row dropped, Q = 0)
at::Tensor rounding_losses(const at::Tensor& factors, const at::Tensor& weights, at::IntArrayRef widths,
                           int64_t group_size, int64_t steps, bool odd_codes) {
  TORCH_CHECK(factors.dim() == 3 && factors.scalar_type() == at::kFloat,
              "rounding_losses: factors must be float32 [E, R, I], got ", factors.scalar_type(), " ", factors.sizes());
  const int64_t E = factors.size(0), R = factors.size(1), I = factors.size(2);
  TORCH_CHECK(weights.dim() == 4 && weights.scalar_type() == at::kFloat && weights.size(1) == E &&
                  (weights.size(2) == R || weights.size(2) == 1) && weights.size(3) == I,
              "rounding_losses: weights must be float32 [V, ", E, ", ", R, " or 1, ", I, "], got ",
              weights.scalar_type(), " ", weights.sizes());
  const int64_t V = weights.size(0), J = static_cast<int64_t>(widths.size()), G = group_size;
  TORCH_CHECK(V >= 1 && V <= kMaxWeights, "rounding_losses: 1 to ", kMaxWeights, " weightings, got ", V);
  TORCH_CHECK(G > 0 && I % G == 0, "rounding_losses: the group size ", G, " must divide the row length ", I);
  TORCH_CHECK(steps >= 0, "rounding_losses: steps must be >= 0, got ", steps);
  std::vector<Width> kinds;
  for (const int64_t b : widths) {
    TORCH_CHECK(allocatable(b), "rounding_losses: width ", b, " is not 0 or a supported width (1, 2, 3, 4, 6, 8)");
    kinds.push_back(b >= 1 ? width_of(b, odd_codes) : Width{false, 0, 0});
  }
  const at::Tensor f = factors.contiguous(), w = weights.contiguous();
  at::Tensor out = at::zeros({V, E, R, J}, factors.options().dtype(at::kDouble));
  at::parallel_for(0, E * R, 1, [&](int64_t begin, int64_t end) {
    row_losses(f.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<double>(), begin, end, E, R, w.size(2), I, V,
               widths, kinds, G, steps);
  });
  return out;
}

// rows [N, I] float32, bits [N] int64 (0 or a supported width) -> codes [N, I] int8 and scales [N, I / group_size]
// float16 of offline/rounding.py: quantize_mixed_rows (a row of width 0: codes and scales 0)
std::tuple<at::Tensor, at::Tensor> round_rows(const at::Tensor& rows, const at::Tensor& bits, int64_t group_size,
                                              int64_t steps, bool odd_codes) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kFloat, "round_rows: rows must be float32 [N, I], got ",
              rows.scalar_type(), " ", rows.sizes());
  const int64_t N = rows.size(0), I = rows.size(1), G = group_size;
  TORCH_CHECK(bits.dim() == 1 && bits.size(0) == N && bits.scalar_type() == at::kLong,
              "round_rows: bits must be int64 [", N, "], got ", bits.scalar_type(), " ", bits.sizes());
  TORCH_CHECK(G > 0 && I % G == 0, "round_rows: the group size ", G, " must divide the row length ", I);
  TORCH_CHECK(steps >= 0, "round_rows: steps must be >= 0, got ", steps);
  const at::Tensor b = bits.contiguous(), x = rows.contiguous();
  const int64_t* bp = b.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(allocatable(bp[n]), "round_rows: row ", n, " has width ", bp[n],
                ", not 0 or a supported width (1, 2, 3, 4, 6, 8)");
  const std::vector<Width> kinds = widths_by_bits(odd_codes);
  at::Tensor codes = at::empty({N, I}, rows.options().dtype(at::kChar));
  at::Tensor scales = at::empty({N, I / G}, rows.options().dtype(at::kHalf));
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    rows_rounded(x.data_ptr<float>(), bp, kinds, codes.data_ptr<int8_t>(), scales.data_ptr<at::Half>(), begin, end, I,
                 G, steps);
  });
  return {codes, scales};
}

}  // namespace

// The schemas are declared in bitsmoe_vllm/library.py.
TORCH_LIBRARY_IMPL(bitsmoe, CPU, m) {
  m.impl("rounding_losses", &rounding_losses);
  m.impl("round_rows", &round_rows);
}
