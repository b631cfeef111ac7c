// torch.ops.bitsmoe.moe for the CPU dispatch key: the op of bitsmoe_vllm/ops.py (same arguments, same result as the
// reference there) on the packed codes, with the kernels of moe_cpu.h for the CPU's instruction set, split across
// torch's intra-op threads. Also torch.ops.bitsmoe.cpu_isa(): which instruction set a call would use.
//
// The instruction set is chosen at every call from the CPU's flags (AVX-512 where present, else AVX2); the
// environment variable BITSMOE_CPU_ISA=avx2|avx512 forces one (tests run both; a CPU without it is refused).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "moe_cpu.h"

namespace {

using namespace bitsmoe::cpu;

constexpr int64_t kItemsPerThread = 4;  // gate/up: rank rows split in parts until there are this many items per thread
constexpr int64_t kMinPartRows = 256;   // ... but no part smaller than this
constexpr int64_t kBlockRows = 64;      // down work item: 64 rank rows for one expert

const Kernels& kernels() {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const char* forced = std::getenv("BITSMOE_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    const std::string isa(forced);
    TORCH_CHECK(isa == "avx512" || isa == "avx2", "BITSMOE_CPU_ISA=", isa, ": expected avx512 or avx2, or unset to choose from the CPU's flags");
    TORCH_CHECK(isa == "avx512" ? avx512 : avx2, "BITSMOE_CPU_ISA=", isa, ": this CPU does not support it");
    return isa == "avx512" ? kAvx512 : kAvx2;
  }
  TORCH_CHECK(avx512 || avx2, "bitsmoe: the CPU kernel needs AVX-512, or AVX2 with FMA and F16C; this CPU has neither");
  return avx512 ? kAvx512 : kAvx2;
}

std::string cpu_isa() { return kernels().name; }

void check_2d(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == dtype && (rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols),
              "bitsmoe::moe (CPU): ", name, ": expected ", dtype, " [", rows < 0 ? std::string("*") : std::to_string(rows), ", ",
              cols < 0 ? std::string("*") : std::to_string(cols), "], found ", t.scalar_type(), " ", t.sizes());
}

// A basis and the tensors that keep its storage contiguous for the call.
struct BasisArg {
  Basis view;
  at::Tensor weight, scale;
};

BasisArg basis_arg(const char* name, const at::Tensor& weight, const std::optional<at::Tensor>& scale, int64_t rows, int64_t in) {
  BasisArg b{{}, weight.contiguous(), {}};
  TORCH_CHECK(b.weight.dim() == 2 && (rows < 0 || b.weight.size(0) == rows) && b.weight.size(1) == in, "bitsmoe::moe (CPU): ", name,
              ": expected [", rows < 0 ? std::string("*") : std::to_string(rows), ", ", in, "], found ", b.weight.sizes());
  switch (b.weight.scalar_type()) {
    case at::kHalf: b.view.type = BasisType::kFloat16; break;
    case at::kBFloat16: b.view.type = BasisType::kBFloat16; break;
    case at::kFloat: b.view.type = BasisType::kFloat32; break;
    case at::kChar:
      b.view.type = BasisType::kInt8;
      TORCH_CHECK(scale.has_value(), "bitsmoe::moe (CPU): ", name, " is int8 but has no scale");
      b.scale = scale->contiguous();
      TORCH_CHECK(b.scale.scalar_type() == at::kHalf && b.scale.dim() == 1 && b.scale.size(0) == b.weight.size(0), "bitsmoe::moe (CPU): ",
                  name, "_scale: expected Half [", b.weight.size(0), "], found ", b.scale.scalar_type(), " ", b.scale.sizes());
      b.view.scale = reinterpret_cast<const uint16_t*>(b.scale.data_ptr<at::Half>());
      break;
    default: TORCH_CHECK(false, "bitsmoe::moe (CPU): ", name, ": expected float16, bfloat16, float32 or int8, found ", b.weight.scalar_type());
  }
  b.view.weight = b.weight.data_ptr();
  b.view.n = b.weight.size(0);
  b.view.in = in;
  return b;
}

// One projection's factors, the tensors behind them, and each expert's first plane and stored row.
struct FactorsArg {
  Factors view;
  at::Tensor codes, scales, bits, plane_at, row_at;
};

FactorsArg factors_arg(const Kernels& k, const char* name, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& bits, int64_t E, int64_t I,
                       int64_t G) {
  FactorsArg f{{}, codes.contiguous(), scales.contiguous(), bits.contiguous(), {}, {}};
  check_2d((std::string(name) + "_bits").c_str(), f.bits, at::kByte, E, -1);
  check_2d((std::string(name) + "_codes").c_str(), f.codes, at::kInt, -1, I / 32);
  check_2d((std::string(name) + "_scales").c_str(), f.scales, at::kHalf, -1, I / G);
  f.plane_at = at::empty({E + 1}, at::kLong);
  f.row_at = at::empty({E + 1}, at::kLong);
  k.expert_offsets(f.bits.data_ptr<uint8_t>(), E, f.bits.size(1), f.plane_at.data_ptr<int64_t>(), f.row_at.data_ptr<int64_t>());
  const int64_t planes = f.plane_at.data_ptr<int64_t>()[E], rows = f.row_at.data_ptr<int64_t>()[E];
  TORCH_CHECK(f.codes.size(0) == planes && f.scales.size(0) == rows, "bitsmoe::moe (CPU): ", name, "_bits ask for ", planes, " planes and ", rows,
              " scale rows, found ", name, "_codes ", f.codes.sizes(), " and ", name, "_scales ", f.scales.sizes());
  f.view = {reinterpret_cast<const uint32_t*>(f.codes.data_ptr<int32_t>()),
            reinterpret_cast<const uint16_t*>(f.scales.data_ptr<at::Half>()),
            f.bits.data_ptr<uint8_t>(),
            f.plane_at.data_ptr<int64_t>(),
            f.row_at.data_ptr<int64_t>(),
            f.bits.size(1),
            I / 32,
            I / G,
            G / 32};
  return f;
}

// out [T, b.n] = x [T, b.in] @ b^T, rows split across threads
at::Tensor basis_product(const Kernels& k, const Basis& b, const at::Tensor& x) {
  at::Tensor out = at::empty({x.size(0), b.n}, x.options());
  at::parallel_for(0, b.n, 16, [&](int64_t r0, int64_t r1) { k.basis_rows(b, x.data_ptr<float>(), x.size(0), out.data_ptr<float>(), r0, r1); });
  return out;
}

at::Tensor moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids, const std::optional<at::Tensor>& gate_basis,
               const std::optional<at::Tensor>& up_basis, const std::optional<at::Tensor>& down_basis,
               const std::optional<at::Tensor>& gate_basis_scale, const std::optional<at::Tensor>& up_basis_scale,
               const std::optional<at::Tensor>& down_basis_scale, const at::Tensor& gate_codes, const at::Tensor& gate_scales,
               const at::Tensor& gate_bits, const at::Tensor& up_codes, const at::Tensor& up_scales, const at::Tensor& up_bits,
               const at::Tensor& down_codes, const at::Tensor& down_scales, const at::Tensor& down_bits, int64_t group_size) {
  const Kernels& k = kernels();
  TORCH_CHECK(x.dim() == 2, "bitsmoe::moe (CPU): x: expected [T, H], found ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "bitsmoe::moe (CPU): x: expected float32, bfloat16 or float16, found ", x.scalar_type());
  const int64_t T = x.size(0), H = x.size(1), K = topk_ids.dim() == 2 ? topk_ids.size(1) : -1;
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_weights.sizes() == topk_ids.sizes() && !topk_ids.is_floating_point(),
              "bitsmoe::moe (CPU): expected integer topk_ids and topk_weights of one shape [", T, ", K], found ", topk_ids.scalar_type(),
              " ", topk_ids.sizes(), " and ", topk_weights.sizes());
  const bool identity = !gate_basis.has_value();
  TORCH_CHECK(up_basis.has_value() != identity && down_basis.has_value() != identity,
              "bitsmoe::moe (CPU): the gate, up and down bases must all be given, or all be None (identity bases)");
  const int64_t E = gate_bits.size(0), I = gate_codes.dim() == 2 ? gate_codes.size(1) * 32 : -1;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && I > 0 && I % group_size == 0, "bitsmoe::moe (CPU): group_size ", group_size,
              " must be a positive multiple of 32 that divides I = ", I);
  const int64_t R_g = identity ? H : gate_basis->size(0), R_u = identity ? H : up_basis->size(0);
  const int64_t R_d = identity ? H : down_basis->size(1);
  const FactorsArg g = factors_arg(k, "gate", gate_codes, gate_scales, gate_bits, E, I, group_size);
  const FactorsArg u = factors_arg(k, "up", up_codes, up_scales, up_bits, E, I, group_size);
  const FactorsArg d = factors_arg(k, "down", down_codes, down_scales, down_bits, E, I, group_size);
  TORCH_CHECK(g.view.R == R_g && u.view.R == R_u && d.view.R == R_d, "bitsmoe::moe (CPU): factor ranks (gate ", g.view.R, ", up ", u.view.R,
              ", down ", d.view.R, ") differ from the bases' (", R_g, ", ", R_u, ", ", R_d, ")");
  if (T == 0) return at::empty_like(x);

  // shared projections
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor z_g = xf, z_u = xf;
  if (!identity) {
    z_g = basis_product(k, basis_arg("gate_basis", *gate_basis, gate_basis_scale, -1, H).view, xf);
    z_u = basis_product(k, basis_arg("up_basis", *up_basis, up_basis_scale, -1, H).view, xf);
  }

  // the slots of each expert (ids < 0: held elsewhere, in no list)
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0), token(T * K), slot(T * K);
  for (int64_t s = 0; s < T * K; ++s) {
    TORCH_CHECK(id[s] < E, "bitsmoe::moe (CPU): topk_ids holds expert ", id[s], " but the layer has ", E, " experts");
    if (id[s] >= 0) ++start[id[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t s = 0; s < T * K; ++s)
    if (id[s] >= 0) {
      token[fill[id[s]]] = s / K;
      slot[fill[id[s]]++] = s;
    }
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) used.push_back(e);
  auto tokens_of = [&](int64_t e) { return Tokens{token.data() + start[e], slot.data() + start[e], start[e + 1] - start[e]}; };

  // h = (F_g^T z_g, F_u^T z_u) per expert in `parts` shares of the rank rows, then a = silu(h_g) * h_u per slot
  const int64_t used_n = static_cast<int64_t>(used.size());
  const int64_t parts = std::clamp((kItemsPerThread * at::get_num_threads() + used_n - 1) / std::max(used_n, int64_t{1}), int64_t{1},
                                   std::max(int64_t{1}, std::min(R_g, R_u) / kMinPartRows));
  at::Tensor h = at::empty({start[E] * parts * 2 * I}, xf.options());  // per expert [parts, 2, n, I]
  at::parallel_for(0, used_n * parts, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = used[i / parts], part = i % parts;
      const Tokens tk = tokens_of(e);
      float* h_e = h.data_ptr<float>() + start[e] * parts * 2 * I;
      k.gate_up_part(g.view, u.view, e, z_g.data_ptr<float>(), z_u.data_ptr<float>(), tk, part, parts, h_e + part * 2 * tk.n * I);
    }
  });
  at::Tensor a = at::empty({T * K, I}, xf.options());
  at::parallel_for(0, used_n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      k.activate(h.data_ptr<float>() + start[used[i]] * parts * 2 * I, parts, tokens_of(used[i]), I, a.data_ptr<float>());
  });
  const int64_t row_blocks = (R_d + kBlockRows - 1) / kBlockRows;
  at::Tensor out = at::zeros({T * K, R_d}, xf.options());
  at::parallel_for(0, used_n * row_blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = used[i / row_blocks], r0 = (i % row_blocks) * kBlockRows, r1 = std::min(r0 + kBlockRows, R_d);
      k.down(d.view, e, a.data_ptr<float>(), tokens_of(e), r0, r1, out.data_ptr<float>());
    }
  });

  // the routing-weighted sum over each token's choices, in choice order; then the down basis
  const at::Tensor t = (out.view({T, K, R_d}) * topk_weights.to(at::kFloat).unsqueeze(-1)).sum(1);
  const at::Tensor y = identity ? t : basis_product(k, basis_arg("down_basis", *down_basis, down_basis_scale, H, R_d).view, t.contiguous());
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitsmoe, m) { m.def("cpu_isa() -> str", &cpu_isa); }

TORCH_LIBRARY_IMPL(bitsmoe, CPU, m) { m.impl("moe", &moe); }
