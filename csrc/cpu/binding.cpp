// torch.ops.bitsmoe.moe for the CPU dispatch key: the op of bitsmoe_vllm/ops.py (same arguments, same result as the
// reference there) on the packed codes, with the kernels of moe_cpu.h for the CPU's instruction set, split across
// torch's intra-op threads. Also torch.ops.bitsmoe.cpu_isa(): which instruction set a call would use.
//
// torch.ops.bitsmoe.moe_int: the same layer with its factors in the CPU layout of bitsmoe_vllm/cpu_layout.py, on
// the integer kernels (AVX-512 VNNI; moe_cpu.h, "the integer path").
//
// The instruction set is chosen at every call from the CPU's flags (AVX-512 where present, else AVX2; the integer
// path where AVX-512 VNNI, BW, VBMI and GFNI are, with AMX tiles for the experts with many tokens where the CPU has
// AMX-INT8 and the OS grants its tile state, bfloat16 tiles for bfloat16 layers where it also has AMX-BF16); the
// environment variable BITSMOE_CPU_ISA=avx512-amx|avx512-vnni|avx512|avx2 forces one (tests run each; a CPU without
// it is refused; avx512-vnni turns the tiles off, avx512 and avx2 the integer path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moe_cpu.h"
#include "scratch_pool.h"

namespace {

using namespace bitsmoe::cpu;

constexpr int64_t kItemsPerThread = 4;  // gate/up: rank rows split in parts until there are this many items per thread
constexpr int64_t kMinPartRows = 256;   // ... but no part smaller than this
constexpr int64_t kBlockRows = 64;      // down work item: 64 rank rows of one expert or more ...
constexpr int64_t kDownItemsPerThread = 16;  // ... as few as give this many items a thread (down_shares)

const char* forced_isa() {
  const char* isa = std::getenv("BITSMOE_CPU_ISA");
  return isa != nullptr && *isa != '\0' ? isa : nullptr;
}

bool has_int_path() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni");
}

// whether bitsmoe::moe_int may run: the CPU has it, and BITSMOE_CPU_ISA does not force the float kernels
bool int_path() {
  const char* forced = forced_isa();
  return forced == nullptr ? has_int_path()
                           : std::string(forced) == "avx512-vnni" || std::string(forced) == "avx512-amx";
}

// whether bitsmoe::moe_int runs the experts with many tokens on AMX tiles: the CPU and OS allow it (amx_usable asks
// the OS for the tile state, which must happen before any tile instruction), and BITSMOE_CPU_ISA does not force the
// VNNI kernels or the float kernels
bool amx_path() {
  const char* forced = forced_isa();
  if (forced == nullptr) return has_int_path() && amx_usable();
  if (std::string(forced) != "avx512-amx") return false;
  TORCH_CHECK(has_int_path() && amx_usable(),
              "BITSMOE_CPU_ISA=avx512-amx: this CPU (or its OS, for AMX's tile state) does not support it");
  return true;
}

// the float kernels of bitsmoe::moe
const Kernels& kernels() {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (const char* forced = forced_isa()) {
    const std::string isa(forced);
    TORCH_CHECK(isa == "avx512-amx" || isa == "avx512-vnni" || isa == "avx512" || isa == "avx2",
                "BITSMOE_CPU_ISA=", isa,
                ": expected avx512-amx, avx512-vnni, avx512 or avx2, or unset to choose from the CPU's flags");
    TORCH_CHECK(isa == "avx512-amx"    ? has_int_path() && amx_usable()
                : isa == "avx512-vnni" ? has_int_path()
                : isa == "avx512"      ? avx512
                                       : avx2,
                "BITSMOE_CPU_ISA=", isa, ": this CPU (or its OS, for AMX's tile state) does not support it");
    return isa == "avx2" ? kAvx2 : kAvx512;
  }
  TORCH_CHECK(avx512 || avx2, "bitsmoe: the CPU kernel needs AVX-512, or AVX2 with FMA and F16C; this CPU has neither");
  return avx512 ? kAvx512 : kAvx2;
}

std::vector<int64_t> cpu_layout_constants() {
  using namespace bitsmoe::cpu;
  std::vector<int64_t> c{kGroupsPerBlock, kDownGroupRows};
  c.insert(c.end(), std::begin(kClassWidths), std::end(kClassWidths));
  return c;
}

// what the vLLM method runs: avx512-amx or avx512-vnni (bitsmoe::moe_int on the CPU layout, with AMX tiles for the
// experts with many tokens or without), else avx512 or avx2 (bitsmoe::moe)
std::string cpu_isa() {
  const Kernels& k = kernels();  // checks BITSMOE_CPU_ISA
  return amx_path() ? kAmx.name : int_path() ? kAvx512Vnni.name : k.name;
}

void check_2d(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols) {
  TORCH_CHECK(
      t.dim() == 2 && t.scalar_type() == dtype && (rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols),
      "bitsmoe::moe (CPU): ", name, ": expected ", dtype, " [", rows < 0 ? std::string("*") : std::to_string(rows),
      ", ", cols < 0 ? std::string("*") : std::to_string(cols), "], found ", t.scalar_type(), " ", t.sizes());
}

// A basis and the tensors that keep its storage contiguous for the call.
struct BasisArg {
  Basis view;
  at::Tensor weight, scale;
};

BasisArg basis_arg(const char* name, const at::Tensor& weight, const std::optional<at::Tensor>& scale, int64_t rows,
                   int64_t in) {
  BasisArg b{{}, weight.contiguous(), {}};
  TORCH_CHECK(b.weight.dim() == 2 && (rows < 0 || b.weight.size(0) == rows) && b.weight.size(1) == in,
              "bitsmoe::moe (CPU): ", name, ": expected [", rows < 0 ? std::string("*") : std::to_string(rows), ", ",
              in, "], found ", b.weight.sizes());
  switch (b.weight.scalar_type()) {
    case at::kHalf:
      b.view.type = BasisType::kFloat16;
      break;
    case at::kBFloat16:
      b.view.type = BasisType::kBFloat16;
      break;
    case at::kFloat:
      b.view.type = BasisType::kFloat32;
      break;
    case at::kChar:
      b.view.type = BasisType::kInt8;
      TORCH_CHECK(scale.has_value(), "bitsmoe::moe (CPU): ", name, " is int8 but has no scale");
      b.scale = scale->contiguous();
      TORCH_CHECK(b.scale.scalar_type() == at::kHalf && b.scale.dim() == 1 && b.scale.size(0) == b.weight.size(0),
                  "bitsmoe::moe (CPU): ", name, "_scale: expected Half [", b.weight.size(0), "], found ",
                  b.scale.scalar_type(), " ", b.scale.sizes());
      b.view.scale = reinterpret_cast<const uint16_t*>(b.scale.data_ptr<at::Half>());
      break;
    default:
      TORCH_CHECK(false, "bitsmoe::moe (CPU): ", name, ": expected float16, bfloat16, float32 or int8, found ",
                  b.weight.scalar_type());
  }
  b.view.weight = b.weight.data_ptr();
  b.view.n = b.weight.size(0);
  b.view.in = in;
  return b;
}

// Scratch memory of a call through no operator (a cold operator call, code and tables out of cache after the weights
// streamed through, costs a visible share of a layer at T = 1): from torch's CPU allocator below 2 MiB, above from
// the pool that keeps its blocks between calls (scratch_pool.h)
template <class T>
struct Scratch {
  static constexpr int64_t kPooledBytes = int64_t{1} << 21;
  c10::DataPtr data;
  std::unique_ptr<PooledBlock> pooled;
  explicit Scratch(int64_t n) {
    const int64_t bytes = std::max<int64_t>(n, 1) * sizeof(T);
    if (bytes < kPooledBytes)
      data = c10::GetCPUAllocator()->allocate(bytes);
    else
      pooled = std::make_unique<PooledBlock>(bytes);
  }
  T* get() const { return static_cast<T*>(pooled ? pooled->get() : data.get()); }
};

// One projection's factors, the tensors behind them, and each expert's first plane and stored row.
struct FactorsArg {
  Factors view;
  at::Tensor codes, scales, bits;
  std::vector<int64_t> plane_at, row_at;
};

FactorsArg factors_arg(const Kernels& k, const char* name, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& bits, int64_t E, int64_t I, int64_t G, bool odd) {
  FactorsArg f{{},
               codes.contiguous(),
               scales.contiguous(),
               bits.contiguous(),
               std::vector<int64_t>(E + 1),
               std::vector<int64_t>(E + 1)};
  check_2d((std::string(name) + "_bits").c_str(), f.bits, at::kByte, E, -1);
  check_2d((std::string(name) + "_codes").c_str(), f.codes, at::kInt, -1, I / 32);
  check_2d((std::string(name) + "_scales").c_str(), f.scales, at::kHalf, -1, I / G);
  k.expert_offsets(f.bits.data_ptr<uint8_t>(), E, f.bits.size(1), f.plane_at.data(), f.row_at.data());
  const int64_t planes = f.plane_at[E], rows = f.row_at[E];
  TORCH_CHECK(f.codes.size(0) == planes && f.scales.size(0) == rows, "bitsmoe::moe (CPU): ", name, "_bits ask for ",
              planes, " planes and ", rows, " scale rows, found ", name, "_codes ", f.codes.sizes(), " and ", name,
              "_scales ", f.scales.sizes());
  f.view = {reinterpret_cast<const uint32_t*>(f.codes.data_ptr<int32_t>()),
            reinterpret_cast<const uint16_t*>(f.scales.data_ptr<at::Half>()),
            f.bits.data_ptr<uint8_t>(),
            f.plane_at.data(),
            f.row_at.data(),
            f.bits.size(1),
            I / 32,
            I / G,
            G / 32,
            odd};
  return f;
}

// fn(r0, r1) over rows [from, to) split across threads in whole blocks of `block` rows (r0 - from a multiple of block)
template <class Fn>
void for_row_blocks(int64_t from, int64_t to, int64_t block, Fn fn) {
  at::parallel_for(0, (to - from + block - 1) / block, 4,
                   [&](int64_t b0, int64_t b1) { fn(from + block * b0, std::min(from + block * b1, to)); });
}

// out [T, b.n] = x [T, b.in] @ b^T
void basis_product(const Kernels& k, const Basis& b, const float* x, int64_t T, float* out) {
  for_row_blocks(0, b.n, 4, [&](int64_t r0, int64_t r1) { k.basis_rows(b, x, T, out, r0, r1); });
}

// As basis_product on the integer path: an int8 basis multiplies x rounded to 16 bits per row (moe_cpu.h), others
// as floats. With amx, an int8 basis' rows in whole 16-row tiles run on AMX tiles where T and b.in allow.
void basis_product_int(const VnniKernels& v, const Kernels& k, bool amx, const Basis& b, const float* x, int64_t T,
                       float* out) {
  if (b.type != BasisType::kInt8) return basis_product(k, b, x, T, out);
  const int64_t padded = (T + 15) / 16 * 16;  // the tiles read whole 16-token tiles
  const Scratch<int8_t> bytes(2 * padded * b.in);
  const Scratch<float> scale(2 * T);
  const QuantizedRows q{bytes.get(), bytes.get() + padded * b.in, scale.get(), scale.get() + T, b.in, 1};
  v.round(x, T, q);
  const int64_t tiled = amx && T >= kAmx.min_basis_tokens && b.in % 64 == 0 ? b.n / 16 * 16 : 0;
  for_row_blocks(0, tiled, 16, [&](int64_t r0, int64_t r1) { kAmx.int8_rows(b, q, T, out, r0, r1); });
  for_row_blocks(tiled, b.n, 4, [&](int64_t r0, int64_t r1) { v.int8_rows(b, q, T, out, r0, r1); });
}

// The slots of each expert (ids < 0: held elsewhere, in no list), and the experts with any.
struct Routing {
  std::vector<int64_t> start, token, slot, used;
  Tokens of(int64_t e) const {
    return Tokens{token.data() + start[e], slot.data() + start[e], start[e + 1] - start[e]};
  }
};

template <class Id>
Routing route(const Id* id, int64_t slots, int64_t K, int64_t E) {
  Routing r{std::vector<int64_t>(E + 1, 0), std::vector<int64_t>(slots), std::vector<int64_t>(slots), {}};
  for (int64_t s = 0; s < slots; ++s) {
    TORCH_CHECK(id[s] < E, "bitsmoe::moe (CPU): topk_ids holds expert ", id[s], " but the layer has ", E, " experts");
    if (id[s] >= 0) ++r.start[id[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) r.start[e + 1] += r.start[e];
  std::vector<int64_t> fill(r.start.begin(), r.start.end() - 1);
  for (int64_t s = 0; s < slots; ++s)
    if (id[s] >= 0) {
      r.token[fill[id[s]]] = s / K;
      r.slot[fill[id[s]]++] = s;
    }
  for (int64_t e = 0; e < E; ++e)
    if (r.start[e + 1] > r.start[e]) r.used.push_back(e);
  return r;
}

Routing route(const at::Tensor& topk_ids, int64_t E) {
  const at::Tensor ids = topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong
                             ? topk_ids.contiguous()
                             : topk_ids.to(at::kLong);
  if (ids.scalar_type() == at::kInt) return route(ids.data_ptr<int32_t>(), ids.numel(), ids.size(1), E);
  return route(ids.data_ptr<int64_t>(), ids.numel(), ids.size(1), E);
}

// Checks the arguments both ops share.
void check_tokens(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids, bool identity,
                  const std::optional<at::Tensor>& up_basis, const std::optional<at::Tensor>& down_basis, int64_t I,
                  int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "bitsmoe::moe (CPU): x: expected [T, H], found ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "bitsmoe::moe (CPU): x: expected float32, bfloat16 or float16, found ", x.scalar_type());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_weights.sizes() == topk_ids.sizes() &&
                  !topk_ids.is_floating_point(),
              "bitsmoe::moe (CPU): expected integer topk_ids and topk_weights of one shape [", x.size(0),
              ", K], found ", topk_ids.scalar_type(), " ", topk_ids.sizes(), " and ", topk_weights.sizes());
  TORCH_CHECK(up_basis.has_value() != identity && down_basis.has_value() != identity,
              "bitsmoe::moe (CPU): the gate, up and down bases must all be given, or all be None (identity bases)");
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && I > 0 && I % group_size == 0, "bitsmoe::moe (CPU): group_size ",
              group_size, " must be a positive multiple of 32 that divides I = ", I);
}

// x [T, H] as float32: x itself, or a converted copy in `copy`
const float* as_float(const at::Tensor& x, Scratch<float>& copy) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.data_ptr<float>();
  const at::Tensor c = x.contiguous();
  const int64_t n = c.numel();
  copy = Scratch<float>(n);
  if (c.scalar_type() == at::kBFloat16)
    std::copy_n(c.data_ptr<at::BFloat16>(), n, copy.get());
  else if (c.scalar_type() == at::kHalf)
    std::copy_n(c.data_ptr<at::Half>(), n, copy.get());
  else
    std::copy_n(c.data_ptr<float>(), n, copy.get());
  return copy.get();
}

// The experts' activation and gate/up biases from the ops' last arguments (bitsmoe_vllm/library.py), with the tensors
// that keep the biases contiguous for the call.
struct ActivationArg {
  Activation view;
  at::Tensor gate_bias, up_bias;
};

ActivationArg activation_arg(c10::string_view name, c10::ArrayRef<double> params,
                             const std::optional<at::Tensor>& gate_bias, const std::optional<at::Tensor>& up_bias,
                             int64_t E, int64_t I) {
  const bool swigluoai = name == "swigluoai";
  TORCH_CHECK(swigluoai || name == "silu", "bitsmoe::moe (CPU): activation '", std::string(name),
              "': expected silu or swigluoai");
  TORCH_CHECK(params.size() == (swigluoai ? 2u : 0u), "bitsmoe::moe (CPU): activation ", std::string(name), " takes ",
              swigluoai ? "2 parameters (alpha, limit)" : "no parameter", ", found ", params.size());
  TORCH_CHECK(gate_bias.has_value() == up_bias.has_value(),
              "bitsmoe::moe (CPU): gate_bias and up_bias must both be given, or neither");
  ActivationArg a{{swigluoai, swigluoai ? static_cast<float>(params[0]) : 0.f,
                   swigluoai ? static_cast<float>(params[1]) : 0.f, nullptr, nullptr},
                  {},
                  {}};
  if (gate_bias.has_value()) {
    a.gate_bias = gate_bias->contiguous();
    a.up_bias = up_bias->contiguous();
    check_2d("gate_bias", a.gate_bias, at::kFloat, E, I);
    check_2d("up_bias", a.up_bias, at::kFloat, E, I);
    a.view.gate_bias = a.gate_bias.data_ptr<float>();
    a.view.up_bias = a.up_bias.data_ptr<float>();
  }
  return a;
}

// gate/up work items: each used expert's rank rows in this many parts
int64_t gate_up_parts(int64_t used, int64_t rows) {
  return std::clamp((kItemsPerThread * at::get_num_threads() + used - 1) / std::max(used, int64_t{1}), int64_t{1},
                    std::max(int64_t{1}, rows / kMinPartRows));
}

// Each expert's down in this many shares of its rank rows: 64 rows or more, as many as give kDownItemsPerThread items
// a thread. Fewer, larger shares where many experts have tokens: every share of a tile expert gathers its slots'
// activations again (at 512 tokens on Qwen3-30B-A3B's shape, 64-row shares copied and zeroed ~100 KiB 4,096 times)
int64_t down_shares(int64_t used, int64_t R_d) {
  return std::clamp((kDownItemsPerThread * at::get_num_threads() + used - 1) / std::max(used, int64_t{1}), int64_t{1},
                    (R_d + kBlockRows - 1) / kBlockRows);
}

// y = B_d (sum over each token's choices of w u), the choices in order; identity: the sum itself; then the down
// biases [E, H] of the experts routed to, w b_e, expert by expert. product(basis, x, T, out) is the op's basis
// product (basis_product or basis_product_int).
template <class Product>
at::Tensor finish(Product product, const float* u, int64_t R_d, const at::Tensor& topk_weights,
                  const std::optional<at::Tensor>& down_basis, const std::optional<at::Tensor>& down_basis_scale,
                  int64_t H, const at::Tensor& x, const Routing& r, const std::optional<at::Tensor>& down_bias) {
  const int64_t T = topk_weights.size(0), K = topk_weights.size(1);
  const at::Tensor w32 =
      topk_weights.scalar_type() == at::kFloat ? topk_weights.contiguous() : topk_weights.to(at::kFloat).contiguous();
  const float* w = w32.data_ptr<float>();
  const Scratch<float> t(T * R_d);
  at::parallel_for(0, T, 16, [&](int64_t j0, int64_t j1) {  // u is T K R_d floats, read once: 134 MB at T = 2048
    for (int64_t j = j0; j < j1; ++j) {
      float* tj = t.get() + j * R_d;
      for (int64_t r = 0; r < R_d; ++r) tj[r] = w[j * K] * u[j * K * R_d + r];
      for (int64_t k = 1; k < K; ++k)
        for (int64_t r = 0; r < R_d; ++r) tj[r] += w[j * K + k] * u[(j * K + k) * R_d + r];
    }
  });
  at::Tensor y = at::empty({T, H}, x.options());
  Scratch<float> y32(x.scalar_type() == at::kFloat ? 0 : T * H);
  float* out = x.scalar_type() == at::kFloat ? y.data_ptr<float>() : y32.get();
  if (down_basis.has_value())
    product(basis_arg("down_basis", *down_basis, down_basis_scale, H, R_d).view, t.get(), T, out);
  else
    std::copy_n(t.get(), T * H, out);
  if (down_bias.has_value()) {
    const at::Tensor b = down_bias->contiguous();
    check_2d("down_bias", b, at::kFloat, static_cast<int64_t>(r.start.size()) - 1, H);
    for (const int64_t e : r.used)
      for (int64_t i = r.start[e]; i < r.start[e + 1]; ++i) {
        const float* be = b.data_ptr<float>() + e * H;
        float* yt = out + r.token[i] * H;
        for (int64_t c = 0; c < H; ++c) yt[c] += w[r.slot[i]] * be[c];
      }
  }
  if (x.scalar_type() == at::kBFloat16)
    std::copy_n(out, T * H, y.data_ptr<at::BFloat16>());
  else if (x.scalar_type() == at::kHalf)
    std::copy_n(out, T * H, y.data_ptr<at::Half>());
  return y;
}

// z_g, z_u = B_g x, B_u x into z_g [T, R_g], z_u [T, R_u] (x itself for identity bases: returns x, x)
template <class Product>
std::pair<const float*, const float*> shared_projections(Product product, const float* xf, int64_t T, int64_t H,
                                                         const std::optional<at::Tensor>& gate_basis,
                                                         const std::optional<at::Tensor>& up_basis,
                                                         const std::optional<at::Tensor>& gate_basis_scale,
                                                         const std::optional<at::Tensor>& up_basis_scale, float* z_g,
                                                         float* z_u) {
  if (!gate_basis.has_value()) return {xf, xf};
  product(basis_arg("gate_basis", *gate_basis, gate_basis_scale, -1, H).view, xf, T, z_g);
  product(basis_arg("up_basis", *up_basis, up_basis_scale, -1, H).view, xf, T, z_u);
  return {z_g, z_u};
}

// The three parallel loops both ops run, over the experts with tokens: gate_up(e, tokens, part, h) writes one part's
// pre-activations [2, n, I] (each expert's rank rows in `parts` shares); activate(e, h of e [parts, 2, n, I], tokens)
// turns them into the slots' inputs to down; down(e, tokens, share, shares, u) writes u [slots, R_d] for one of the
// expert's shares of rank rows (down_shares), all of its slots' rows where it is one share and whole_rows(tokens).
// Fills u.
template <class GateUp, class Activate, class Down, class WholeRows>
void run_experts(const Routing& r, int64_t parts, int64_t I, int64_t R_d, int64_t slots, float* u, GateUp gate_up,
                 Activate activate, Down down, WholeRows whole_rows) {
  const int64_t used_n = static_cast<int64_t>(r.used.size());
  const Scratch<float> h(r.start.back() * parts * 2 * I);  // per expert [parts, 2, n, I]
  at::parallel_for(0, used_n * parts, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = r.used[i / parts], part = i % parts;
      const Tokens tk = r.of(e);
      gate_up(e, tk, part, h.get() + r.start[e] * parts * 2 * I + part * 2 * tk.n * I);
    }
  });
  at::parallel_for(0, used_n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      activate(r.used[i], h.get() + r.start[r.used[i]] * parts * 2 * I, r.of(r.used[i]));
  });
  const int64_t row_blocks = down_shares(used_n, R_d);
  // the rows down writes whole are not zeroed first (u is 134 MB at T = 2048 on Qwen3-30B-A3B's shape)
  std::vector<uint8_t> written(slots, 0);
  if (row_blocks == 1)
    for (const int64_t e : r.used)
      if (whole_rows(r.of(e)))
        for (int64_t i = r.start[e]; i < r.start[e + 1]; ++i) written[r.slot[i]] = 1;
  at::parallel_for(0, slots, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      if (!written[s]) std::fill_n(u + s * R_d, R_d, 0.f);
  });
  at::parallel_for(0, used_n * row_blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      down(r.used[i / row_blocks], r.of(r.used[i / row_blocks]), i % row_blocks, row_blocks, u);
  });
}

at::Tensor moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
               const std::optional<at::Tensor>& gate_basis, const std::optional<at::Tensor>& up_basis,
               const std::optional<at::Tensor>& down_basis, const std::optional<at::Tensor>& gate_basis_scale,
               const std::optional<at::Tensor>& up_basis_scale, const std::optional<at::Tensor>& down_basis_scale,
               const at::Tensor& gate_codes, const at::Tensor& gate_scales, const at::Tensor& gate_bits,
               const at::Tensor& up_codes, const at::Tensor& up_scales, const at::Tensor& up_bits,
               const at::Tensor& down_codes, const at::Tensor& down_scales, const at::Tensor& down_bits,
               int64_t group_size, bool odd_codes, const std::optional<at::Tensor>& gate_bias,
               const std::optional<at::Tensor>& up_bias, const std::optional<at::Tensor>& down_bias,
               c10::string_view activation, c10::ArrayRef<double> activation_params) {
  const Kernels& k = kernels();
  const bool identity = !gate_basis.has_value();
  const int64_t E = gate_bits.size(0), I = gate_codes.dim() == 2 ? gate_codes.size(1) * 32 : -1;
  check_tokens(x, topk_weights, topk_ids, identity, up_basis, down_basis, I, group_size);
  const int64_t T = x.size(0), H = x.size(1), K = topk_ids.size(1);
  const int64_t R_g = identity ? H : gate_basis->size(0), R_u = identity ? H : up_basis->size(0);
  const int64_t R_d = identity ? H : down_basis->size(1);
  const FactorsArg g = factors_arg(k, "gate", gate_codes, gate_scales, gate_bits, E, I, group_size, odd_codes);
  const FactorsArg u = factors_arg(k, "up", up_codes, up_scales, up_bits, E, I, group_size, odd_codes);
  const FactorsArg d = factors_arg(k, "down", down_codes, down_scales, down_bits, E, I, group_size, odd_codes);
  TORCH_CHECK(g.view.R == R_g && u.view.R == R_u && d.view.R == R_d, "bitsmoe::moe (CPU): factor ranks (gate ",
              g.view.R, ", up ", u.view.R, ", down ", d.view.R, ") differ from the bases' (", R_g, ", ", R_u, ", ", R_d,
              ")");
  const ActivationArg act = activation_arg(activation, activation_params, gate_bias, up_bias, E, I);
  if (T == 0) return at::empty_like(x);

  Scratch<float> x_copy(0);
  const float* xf = as_float(x, x_copy);
  const auto product = [&](const Basis& b, const float* in, int64_t rows, float* out) {
    basis_product(k, b, in, rows, out);
  };
  const Scratch<float> z_gate(identity ? 0 : T * R_g), z_up(identity ? 0 : T * R_u);
  const auto [z_g, z_u] = shared_projections(product, xf, T, H, gate_basis, up_basis, gate_basis_scale, up_basis_scale,
                                             z_gate.get(), z_up.get());
  const Routing r = route(topk_ids, E);

  // h = (F_g^T z_g, F_u^T z_u), a = act(h_g + b_g, h_u + b_u) per slot, u = F_d a
  const int64_t parts = gate_up_parts(static_cast<int64_t>(r.used.size()), std::min(R_g, R_u));
  const Scratch<float> a(T * K * I), out(T * K * R_d);
  run_experts(
      r, parts, I, R_d, T * K, out.get(),
      [&](int64_t e, const Tokens& tk, int64_t part, float* h) {
        k.gate_up_part(g.view, u.view, e, z_g, z_u, tk, part, parts, h);
      },
      [&](int64_t e, const float* h, const Tokens& tk) { k.activate(h, parts, tk, I, act.view, e, a.get()); },
      [&](int64_t e, const Tokens& tk, int64_t share, int64_t shares, float* dst) {
        k.down(d.view, e, a.get(), tk, R_d * share / shares, R_d * (share + 1) / shares, dst);
      },
      [](const Tokens&) { return false; });
  return finish(product, out.get(), R_d, topk_weights, down_basis, down_basis_scale, H, x, r, down_bias);
}

// Factors in the CPU layout (moe_cpu.h, CpuFactors) with groups of group_rows rows (gate and up 4, down 16),
// checked against each other and E, R, I, G.
struct CpuFactorsArg {
  CpuFactors view;
  at::Tensor masks, scales, rows, segs;
};

CpuFactorsArg cpu_factors_arg(const char* name, const at::Tensor& masks, const at::Tensor& scales,
                              const at::Tensor& rows, const at::Tensor& segs, int64_t group_rows, int64_t E, int64_t R,
                              int64_t I, int64_t G, bool odd) {
  CpuFactorsArg f{{}, masks.contiguous(), scales.contiguous(), rows.contiguous(), segs.contiguous()};
  const std::string n(name);
  const int64_t chunk_columns = 64 / group_rows;  // a mask holds group_rows x chunk_columns codes
  check_2d((n + "_masks").c_str(), f.masks, at::kLong, -1, I / chunk_columns);
  check_2d((n + "_scales").c_str(), f.scales, at::kHalf, I / G, -1);
  TORCH_CHECK(f.rows.dim() == 1 && f.rows.scalar_type() == at::kInt && f.rows.size(0) == f.scales.size(1),
              "bitsmoe::moe_int (CPU): ", n, "_rows: expected Int [", f.scales.size(1), "], found ",
              f.rows.scalar_type(), " ", f.rows.sizes());
  TORCH_CHECK(f.segs.dim() == 3 && f.segs.scalar_type() == at::kInt && f.segs.size(0) == E && f.segs.size(1) == 6 &&
                  f.segs.size(2) == 3,
              "bitsmoe::moe_int (CPU): ", n, "_segs: expected Int [", E, ", 6, 3], found ", f.segs.scalar_type(), " ",
              f.segs.sizes());
  const int32_t* s = f.segs.data_ptr<int32_t>();
  const int64_t words = f.masks.size(1);  // the kernels read 64 bytes (8 words) from a chunk's first plane
  for (int64_t i = 0; i < E * 6; ++i)
    TORCH_CHECK(s[3 * i] >= 0 && s[3 * i + 1] >= 0 && s[3 * i + 2] >= 0 &&
                    group_rows * (s[3 * i] + s[3 * i + 1]) <= f.rows.size(0) &&
                    (s[3 * i + 2] + s[3 * i + 1] * kClassWidths[i % 6]) * words + 8 <= f.masks.numel(),
                "bitsmoe::moe_int (CPU): ", n, "_segs row ", i, " points past ", n, "_rows ", f.rows.sizes(), " or ", n,
                "_masks ", f.masks.sizes(), " (whose last 64 bytes must be padding)");
  f.view = {reinterpret_cast<const uint64_t*>(f.masks.data_ptr<int64_t>()),
            reinterpret_cast<const uint16_t*>(f.scales.data_ptr<at::Half>()),
            f.rows.data_ptr<int32_t>(),
            s,
            R,
            I / chunk_columns,
            I / G,
            G / chunk_columns,
            G / 16 % 8 == 0   ? 8
            : G / 16 % 4 == 0 ? 4
                              : 2,
            f.rows.size(0),
            odd};
  return f;
}

// torch.ops.bitsmoe.moe_int: the same layer as bitsmoe::moe with its factors in the CPU layout, on the integer path
at::Tensor moe_int(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                   const std::optional<at::Tensor>& gate_basis, const std::optional<at::Tensor>& up_basis,
                   const std::optional<at::Tensor>& down_basis, const std::optional<at::Tensor>& gate_basis_scale,
                   const std::optional<at::Tensor>& up_basis_scale, const std::optional<at::Tensor>& down_basis_scale,
                   const at::Tensor& gate_masks, const at::Tensor& gate_scales, const at::Tensor& gate_rows,
                   const at::Tensor& gate_segs, const at::Tensor& up_masks, const at::Tensor& up_scales,
                   const at::Tensor& up_rows, const at::Tensor& up_segs, const at::Tensor& down_masks,
                   const at::Tensor& down_scales, const at::Tensor& down_rows, const at::Tensor& down_segs,
                   int64_t group_size, bool odd_codes, const std::optional<at::Tensor>& gate_bias,
                   const std::optional<at::Tensor>& up_bias, const std::optional<at::Tensor>& down_bias,
                   c10::string_view activation, c10::ArrayRef<double> activation_params) {
  TORCH_CHECK(int_path(),
              "bitsmoe::moe_int (CPU): needs AVX-512 with VNNI, BW, VBMI and GFNI, which this CPU lacks (or "
              "BITSMOE_CPU_ISA forces ",
              "the float kernels); use bitsmoe::moe on the canonical layout");
  const VnniKernels& v = kAvx512Vnni;
  const Kernels& k = kAvx512;
  const bool identity = !gate_basis.has_value();
  const int64_t E = down_segs.dim() == 3 ? down_segs.size(0) : -1,
                I = gate_masks.dim() == 2 ? gate_masks.size(1) * 16 : -1;
  check_tokens(x, topk_weights, topk_ids, identity, up_basis, down_basis, I, group_size);
  const int64_t T = x.size(0), H = x.size(1), K = topk_ids.size(1);
  const int64_t R_g = identity ? H : gate_basis->size(0), R_u = identity ? H : up_basis->size(0);
  const int64_t R_d = identity ? H : down_basis->size(1);
  const CpuFactorsArg g =
      cpu_factors_arg("gate", gate_masks, gate_scales, gate_rows, gate_segs, 4, E, R_g, I, group_size, odd_codes);
  const CpuFactorsArg u =
      cpu_factors_arg("up", up_masks, up_scales, up_rows, up_segs, 4, E, R_u, I, group_size, odd_codes);
  const CpuFactorsArg d =
      cpu_factors_arg("down", down_masks, down_scales, down_rows, down_segs, 16, E, R_d, I, group_size, odd_codes);
  const ActivationArg act = activation_arg(activation, activation_params, gate_bias, up_bias, E, I);
  if (T == 0) return at::empty_like(x);

  const bool amx = amx_path();
  Scratch<float> x_copy(0);
  const float* xf = as_float(x, x_copy);
  const auto product = [&](const Basis& b, const float* in, int64_t rows, float* out) {
    basis_product_int(v, k, amx, b, in, rows, out);
  };
  const Scratch<float> z_gate(identity ? 0 : T * R_g), z_up(identity ? 0 : T * R_u);
  const auto [z_g, z_u] = shared_projections(product, xf, T, H, gate_basis, up_basis, gate_basis_scale, up_basis_scale,
                                             z_gate.get(), z_up.get());
  const Routing r = route(topk_ids, E);
  const int64_t used = static_cast<int64_t>(r.used.size()), R_gu = std::min(R_g, R_u), groups = I / group_size;
  // a bfloat16 layer's experts on bfloat16 tiles where they take tiles: at its input's precision
  const bool bf16 = amx && x.scalar_type() == at::kBFloat16 && amx_bf16_usable();
  int64_t parts = gate_up_parts(used, R_gu);
  if (bf16 && used > 0)  // as many parts as keep an average expert's z within kAmxBf16.part_bytes
    parts =
        std::clamp((r.start.back() / used * R_gu * kAmxBf16.z_bytes + kAmxBf16.part_bytes - 1) / kAmxBf16.part_bytes,
                   parts, std::max(parts, R_gu / kMinPartRows));
  const Scratch<float> a(T * K * I), a_scale(2 * T * K * groups), out(T * K * R_d);
  const Scratch<int8_t> bytes(2 * T * K * I);
  const QuantizedRows q{bytes.get(), bytes.get() + T * K * I, a_scale.get(), a_scale.get() + T * K * groups, I, groups};
  const auto tiles = [&](const Tokens& tk) { return amx && tk.n >= kAmx.min_tokens; };
  const auto bf16_down = [&](const Tokens& tk) { return bf16 && tk.n >= kAmxBf16.min_down_tokens; };
  run_experts(
      r, parts, I, R_d, T * K, out.get(),
      [&](int64_t e, const Tokens& tk, int64_t part, float* h) {
        (!tiles(tk) ? v.gate_up_part
         : bf16     ? kAmxBf16.gate_up_part
                    : kAmx.gate_up_part)(g.view, u.view, e, z_g, z_u, tk, part, parts, h);
      },
      [&](int64_t e, const float* h, const Tokens& tk) {
        if (bf16_down(tk))  // which takes a in float
          k.activate(h, parts, tk, I, act.view, e, a.get());
        else
          v.activate(h, parts, tk, act.view, e, a.get(), q);
      },
      [&](int64_t e, const Tokens& tk, int64_t share, int64_t shares, float* dst) {
        if (bf16_down(tk))
          kAmxBf16.down(d.view, e, a.get(), tk, share, shares, dst);
        else
          (amx && tk.n >= kAmx.min_down_tokens ? kAmx.down : v.down)(d.view, e, q, tk, share, shares, dst);
      },
      bf16_down);
  return finish(product, out.get(), R_d, topk_weights, down_basis, down_basis_scale, H, x, r, down_bias);
}

}  // namespace

// The schemas and fakes are declared in bitsmoe_vllm/library.py, imported before this library is loaded.
TORCH_LIBRARY_IMPL(bitsmoe, CompositeExplicitAutograd, m) {  // no tensor arguments: any device
  m.impl("cpu_isa", &cpu_isa);
  m.impl("cpu_layout_constants", &cpu_layout_constants);
}

TORCH_LIBRARY_IMPL(bitsmoe, CPU, m) {
  m.impl("moe", &moe);
  m.impl("moe_int", &moe_int);
}
