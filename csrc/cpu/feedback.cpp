// The error feedback's sequential part (offline/coordinates.py: sub_block, for offline/gptq.py's and
// offline/lowrank.py's feedback): within a sub-block of m coordinates, each coordinate of every expert is rounded, its
// rounding error taken and spread over the later coordinates of the sub-block before the next one is rounded. The
// Python reference takes a dozen small tensor operations per coordinate; here it is one call per sub-block, an
// expert per task. Every value is computed as the reference computes it (the same operations in the same order, the
// same roundings), so the two give the same bits (tests/test_feedback_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "rounding.h"

namespace {

using namespace bitsmoe::rounding;

// One expert's sub-block: x [m, n] the coordinates' values, updated in place; src [m, n] or null: where a
// coordinate's error is taken from (null: x as updated); coef [m, m]: coef[j, k] spreads coordinate k's error to
// j > k; divisor [m] or null: the errors are divided by it; q, err [m, n]: the rounded values and the errors, written.
// The rows' strides are those of x, src, q and err.
struct Expert {
  float* x;
  const float* src;
  const float* coef;
  const float* divisor;
  float* q;
  float* err;
  int64_t m, n, strides[4];
};

// x += c d, each value rounded once (a fused multiply-add), as torch's addcmul_ rounds it on CPUs with FMA (AVX2,
// AVX-512); std::fma where the instruction is missing. Not inlined into the callers' clones: the avx2 one has no FMA,
// and it is the one whose rounding of a row must match round_rows' (rounding.cpp).
__attribute__((target_clones("avx512f", "fma", "default"))) void spread(float* x, const float* d, float c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::fma(c, d[i], x[i]);
}

// round(k, x_k, q_k) rounds coordinate k. Inlined into the target clones below, which vectorise it.
template <class Round>
[[gnu::always_inline]] inline void sub_block(const Expert& a, Round& round) {
  const int64_t m = a.m, n = a.n;
  for (int64_t k = 0; k < m; ++k) {
    float *xk = a.x + k * a.strides[0], *qk = a.q + k * a.strides[2], *dk = a.err + k * a.strides[3];
    round(k, xk, qk);
    const float* from = a.src ? a.src + k * a.strides[1] : xk;
    for (int64_t i = 0; i < n; ++i) dk[i] = from[i] - qk[i];
    if (a.divisor)
      for (int64_t i = 0; i < n; ++i) dk[i] /= a.divisor[k];
    for (int64_t j = k + 1; j < m; ++j) spread(a.x + j * a.strides[0], dk, a.coef[j * m + k], n);
  }
}

// coordinate k of the rank rows: a factor row of n values at width bits[k], rounded as round_rows rounds it, its
// group scales into scales + k * scale_stride
struct RankRow {
  const int64_t* bits;
  float* scales;
  int64_t scale_stride, n, G, steps;
  const Width* kinds;
  float* c;  // [G] scratch

  [[gnu::always_inline]] inline void operator()(int64_t k, const float* xk, float* qk) {
    const int64_t width = bits[k];
    for (int64_t g0 = 0; g0 < n; g0 += G) {
      const float s = width ? round_group(xk + g0, G, width, kinds[width], steps, c) : 0.0f;
      scales[k * scale_stride + g0 / G] = s;
      for (int64_t i = 0; i < G; ++i) qk[g0 + i] = width ? c[i] * s : 0.0f;
    }
  }
};

// coordinate k of the columns: value r rounded to the nearest code of width bits[r] at the scale step[k, r] (0 where
// the row is dropped: the value is 0)
struct Column {
  const int64_t* bits;
  const float* step;
  int64_t step_stride, n;
  const Width* kinds;

  [[gnu::always_inline]] inline void operator()(int64_t k, const float* xk, float* qk) {
    const float* s = step + k * step_stride;
    for (int64_t r = 0; r < n; ++r) {
      if (!(s[r] > 0)) {
        qk[r] = 0.0f;
        continue;
      }
      const Width& w = kinds[std::max<int64_t>(bits[r], 1)];
      qk[r] = (w.odd ? code_of<true>(xk[r] / s[r], w) : code_of<false>(xk[r] / s[r], w)) * s[r];
    }
  }
};

__attribute__((target_clones("avx512f", "avx2", "default"))) void rank_rows_block(const Expert& a, RankRow round) {
  std::vector<float> c(round.G);
  round.c = c.data();
  sub_block(a, round);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void columns_block(const Expert& a, Column round) {
  sub_block(a, round);
}

// The arguments both kinds of coordinate share, checked: x, src, q, err [E, m, n] float32 with contiguous rows; coef
// [E, m, m] and divisor [E, m] contiguous float32 (divisor and src optional).
struct SubBlock {
  at::Tensor x, src, coef, divisor, q, err;
  int64_t E, m, n;

  SubBlock(const char* op, const at::Tensor& x_, const std::optional<at::Tensor>& src_, const at::Tensor& coef_,
           const std::optional<at::Tensor>& divisor_, const at::Tensor& q_, const at::Tensor& err_)
      : x(x_),
        src(src_.value_or(at::Tensor())),
        coef(coef_),
        divisor(divisor_.value_or(at::Tensor())),
        q(q_),
        err(err_),
        E(x_.size(0)),
        m(x_.size(1)),
        n(x_.size(2)) {
    for (const at::Tensor* t : {&x, &src, &q, &err}) {
      if (!t->defined()) continue;
      TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->size(0) == E && t->size(1) == m &&
                      t->size(2) == n && t->stride(2) == 1,
                  op, ": x, src, q and err must be float32 [", E, ", ", m, ", ", n, "] with contiguous rows, got ",
                  t->scalar_type(), " ", t->sizes(), " strides ", t->strides());
    }
    TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.is_contiguous() && coef.sizes() == at::IntArrayRef({E, m, m}),
                op, ": coef must be contiguous float32 [", E, ", ", m, ", ", m, "], got ", coef.scalar_type(), " ",
                coef.sizes());
    TORCH_CHECK(!divisor.defined() || (divisor.scalar_type() == at::kFloat && divisor.is_contiguous() &&
                                       divisor.sizes() == at::IntArrayRef({E, m})),
                op, ": divisor must be contiguous float32 [", E, ", ", m, "]");
  }

  Expert expert(int64_t e) const {
    return {x.data_ptr<float>() + e * x.stride(0),
            src.defined() ? src.data_ptr<float>() + e * src.stride(0) : nullptr,
            coef.data_ptr<float>() + e * m * m,
            divisor.defined() ? divisor.data_ptr<float>() + e * m : nullptr,
            q.data_ptr<float>() + e * q.stride(0),
            err.data_ptr<float>() + e * err.stride(0),
            m,
            n,
            {x.stride(1), src.defined() ? src.stride(1) : 0, q.stride(1), err.stride(1)}};
  }
};

const int64_t* checked_widths(const char* op, const at::Tensor& bits) {
  const int64_t* bp = bits.data_ptr<int64_t>();
  for (int64_t i = 0; i < bits.numel(); ++i)
    TORCH_CHECK(allocatable(bp[i]), op, ": width ", bp[i], " is not 0 or a supported width (1, 2, 3, 4, 6, 8)");
  return bp;
}

// The rank rows of gate and up: coordinate k of expert e is a factor row of n values at width bits[e, k] ([E, m]
// int64), rounded as round_rows rounds it (groups of group_size), its scales into scales[e, k] ([E, m, n / G] float32).
void feedback_rank_rows(const at::Tensor& x, const std::optional<at::Tensor>& src, const at::Tensor& coef,
                        const std::optional<at::Tensor>& divisor, const at::Tensor& q, const at::Tensor& err,
                        const at::Tensor& bits, const at::Tensor& scales, int64_t group_size, int64_t steps,
                        bool odd_codes) {
  const SubBlock block("feedback_rank_rows", x, src, coef, divisor, q, err);
  const int64_t E = block.E, m = block.m, n = block.n, G = group_size;
  TORCH_CHECK(G > 0 && n % G == 0, "feedback_rank_rows: the group size ", G, " must divide the row length ", n);
  TORCH_CHECK(steps >= 0, "feedback_rank_rows: steps must be >= 0, got ", steps);
  TORCH_CHECK(bits.scalar_type() == at::kLong && bits.sizes() == at::IntArrayRef({E, m}),
              "feedback_rank_rows: bits must be int64 [", E, ", ", m, "], got ", bits.scalar_type(), " ", bits.sizes());
  TORCH_CHECK(
      scales.scalar_type() == at::kFloat && scales.sizes() == at::IntArrayRef({E, m, n / G}) && scales.stride(2) == 1,
      "feedback_rank_rows: scales must be float32 [", E, ", ", m, ", ", n / G, "] with contiguous rows, got ",
      scales.scalar_type(), " ", scales.sizes());
  const at::Tensor b = bits.contiguous();
  const int64_t* bp = checked_widths("feedback_rank_rows", b);
  const std::vector<Width> kinds = widths_by_bits(odd_codes);
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      rank_rows_block(block.expert(e), {bp + e * m, scales.data_ptr<float>() + e * scales.stride(0), scales.stride(1),
                                        n, G, steps, kinds.data(), nullptr});
  });
}

// The columns of down: coordinate k of expert e is a column of n values, value r rounded to the nearest code of width
// bits[e, r] ([E, n] int64) at the scale step[e, k, r] ([E, m, n] float32).
void feedback_columns(const at::Tensor& x, const std::optional<at::Tensor>& src, const at::Tensor& coef,
                      const std::optional<at::Tensor>& divisor, const at::Tensor& q, const at::Tensor& err,
                      const at::Tensor& bits, const at::Tensor& step, bool odd_codes) {
  const SubBlock block("feedback_columns", x, src, coef, divisor, q, err);
  const int64_t E = block.E, m = block.m, n = block.n;
  TORCH_CHECK(bits.scalar_type() == at::kLong && bits.sizes() == at::IntArrayRef({E, n}),
              "feedback_columns: bits must be int64 [", E, ", ", n, "], got ", bits.scalar_type(), " ", bits.sizes());
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.sizes() == at::IntArrayRef({E, m, n}) && step.stride(2) == 1,
              "feedback_columns: step must be float32 [", E, ", ", m, ", ", n, "] with contiguous rows, got ",
              step.scalar_type(), " ", step.sizes());
  const at::Tensor b = bits.contiguous();
  const int64_t* bp = checked_widths("feedback_columns", b);
  const std::vector<Width> kinds = widths_by_bits(odd_codes);
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      columns_block(block.expert(e),
                    {bp + e * n, step.data_ptr<float>() + e * step.stride(0), step.stride(1), n, kinds.data()});
  });
}

}  // namespace

// The schemas are declared in bitsmoe_vllm/library.py.
TORCH_LIBRARY_IMPL(bitsmoe, CPU, m) {
  m.impl("feedback_rank_rows", &feedback_rank_rows);
  m.impl("feedback_columns", &feedback_columns);
}
