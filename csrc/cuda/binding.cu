// torch.ops.bitsmoe.moe_decode / moe_prefill: launch the kernels of moe_decode.cuh / moe_prefill.cuh on the
// current stream.
// Shapes and dtypes are checked here, with messages that name them; the kernels trust them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <string>

#include "moe_decode.cuh"
#include "moe_prefill.cuh"

namespace {

bitsmoe::Projection projection(const char* name, const at::Tensor& codes, const at::Tensor& scales,
                               const at::Tensor& rows, const at::Tensor& segs, int64_t rank, int64_t experts,
                               bool odd) {
  TORCH_CHECK(codes.is_cuda() && codes.scalar_type() == at::kInt && codes.dim() == 2 && codes.is_contiguous(), name,
              " codes: expected a contiguous CUDA int32 [planes, I/32] tensor, found ", codes.scalar_type(), " ",
              codes.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == rows.size(0),
              name, " scales: expected contiguous float16 [rows, I/G] with one row per entry of rows (", rows.size(0),
              "), found ", scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kInt && rows.dim() == 1 && rows.is_contiguous(), name,
              " rows: expected int32 [rows], found ", rows.scalar_type(), " ", rows.sizes());
  TORCH_CHECK(segs.scalar_type() == at::kInt && segs.dim() == 3 && segs.size(0) == experts &&
                  segs.size(1) == bitsmoe::kClasses && segs.size(2) == 3 && segs.is_contiguous(),
              name, " segs: expected int32 [", experts, ", ", bitsmoe::kClasses, ", 3], found ", segs.scalar_type(),
              " ", segs.sizes());
  return {codes.data_ptr<int32_t>(), reinterpret_cast<const __half*>(scales.data_ptr<at::Half>()),
          rows.data_ptr<int32_t>(),  segs.data_ptr<int32_t>(),
          static_cast<int>(rank),    odd};
}

// The multiprocessors of `device`, asked once per device (not again inside a CUDA-graph capture).
int multiprocessors(int device) {
  static std::array<std::atomic<int>, 64> known{};
  TORCH_CHECK(device >= 0 && device < static_cast<int>(known.size()), "bitsmoe: CUDA device ", device, " beyond the ",
              known.size(), " this build counts");
  int n = known[device].load();
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    known[device].store(n);
  }
  return n;
}

struct Layer {
  bitsmoe::Projection gate, up, down;
  int64_t I;
};

// The checks both ops share: z_u and ids against z_g, the three projections, their common I and the group size.
Layer checked_layer(const at::Tensor& z_g, const at::Tensor& z_u, const at::Tensor& ids, at::TensorList f,
                    int64_t down_rank, int64_t group_size, bool odd) {
  TORCH_CHECK(f.size() == 12, "factors: expected 12 tensors (codes, scales, rows, segs of gate, up, down), found ",
              f.size());
  TORCH_CHECK(z_g.is_cuda() && z_g.dim() == 2 && z_g.is_contiguous(),
              "z_g: expected a contiguous CUDA [T, R_gate] tensor, found ", z_g.sizes());
  TORCH_CHECK(
      z_u.scalar_type() == z_g.scalar_type() && z_u.dim() == 2 && z_u.size(0) == z_g.size(0) && z_u.is_contiguous(),
      "z_u: expected contiguous ", z_g.scalar_type(), " [", z_g.size(0), ", R_up], found ", z_u.scalar_type(), " ",
      z_u.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == z_g.size(0) && ids.is_contiguous(),
              "topk_ids: expected contiguous int64 [", z_g.size(0), ", K], found ", ids.scalar_type(), " ",
              ids.sizes());
  const int64_t experts = f[3].size(0), I = f[0].size(1) * 32;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && I % group_size == 0, "group_size ", group_size,
              ": expected a multiple of 32 dividing I = ", I);
  TORCH_CHECK(f[4].size(1) * 32 == I && f[8].size(1) * 32 == I, "codes: gate, up and down must have the same I; found ",
              I, ", ", f[4].size(1) * 32, ", ", f[8].size(1) * 32);
  return {projection("gate", f[0], f[1], f[2], f[3], z_g.size(1), experts, odd),
          projection("up", f[4], f[5], f[6], f[7], z_u.size(1), experts, odd),
          projection("down", f[8], f[9], f[10], f[11], down_rank, experts, odd), I};
}

// The activation and the gate/up biases [E, I] float32 (both or neither) of the ops' last arguments.
bitsmoe::Activation activation(const std::optional<at::Tensor>& gate_bias, const std::optional<at::Tensor>& up_bias,
                               c10::string_view name, c10::ArrayRef<double> params, int64_t experts, int64_t I) {
  const bool swigluoai = name == "swigluoai";
  TORCH_CHECK(swigluoai || name == "silu", "activation '", std::string(name), "': expected silu or swigluoai");
  TORCH_CHECK(params.size() == (swigluoai ? 2u : 0u), "activation ", std::string(name), " takes ",
              swigluoai ? "2 parameters (alpha, limit)" : "no parameter", ", found ", params.size());
  TORCH_CHECK(gate_bias.has_value() == up_bias.has_value(), "gate_bias and up_bias must both be given, or neither");
  for (const auto* b : {&gate_bias, &up_bias})
    TORCH_CHECK(!b->has_value() || ((*b)->is_cuda() && (*b)->scalar_type() == at::kFloat && (*b)->is_contiguous() &&
                                    (*b)->dim() == 2 && (*b)->size(0) == experts && (*b)->size(1) == I),
                "gate_bias, up_bias: expected contiguous CUDA float32 [", experts, ", ", I, "]");
  return {gate_bias.has_value() ? gate_bias->data_ptr<float>() : nullptr,
          up_bias.has_value() ? up_bias->data_ptr<float>() : nullptr, swigluoai,
          swigluoai ? static_cast<float>(params[0]) : 0.0f, swigluoai ? static_cast<float>(params[1]) : 0.0f};
}

// z_g [T, R_g], z_u [T, R_u] float32; ids [T, K] int64 (negative: expert held elsewhere); `factors` the codes, scales,
// rows and segs of gate, up and down in kernel layout; the activation with the gate/up biases -> u [T * K, R_down]
// float32.
at::Tensor moe_decode(const at::Tensor& z_g, const at::Tensor& z_u, const at::Tensor& ids, at::TensorList factors,
                      int64_t down_rank, int64_t group_size, bool odd_codes, const std::optional<at::Tensor>& gate_bias,
                      const std::optional<at::Tensor>& up_bias, c10::string_view activation_name,
                      c10::ArrayRef<double> activation_params) {
  TORCH_CHECK(z_g.scalar_type() == at::kFloat, "z_g: the decode path takes float32, found ", z_g.scalar_type());
  const Layer l = checked_layer(z_g, z_u, ids, factors, down_rank, group_size, odd_codes);
  const bitsmoe::Activation act =
      activation(gate_bias, up_bias, activation_name, activation_params, factors[3].size(0), l.I);
  const c10::cuda::CUDAGuard guard(z_g.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t slots = ids.numel();
  auto u = at::zeros({slots, down_rank}, z_g.options());
  if (slots == 0) return u;
  // Enough blocks for every multiprocessor (4 each) when few slots are decoded: the rank rows in chunks, each warp
  // keeping at least 4 rows of a full-rank expert.
  const int64_t fill = 4 * multiprocessors(z_g.get_device());
  const int tiles = static_cast<int>((l.I / 32 + bitsmoe::kWordsPerTile - 1) / bitsmoe::kWordsPerTile);
  const int64_t most = std::max<int64_t>(1, std::max(l.gate.rank, l.up.rank) / (4 * bitsmoe::kSplits));
  const int chunks = static_cast<int>(std::clamp<int64_t>((fill + slots * tiles - 1) / (slots * tiles), 1, most));
  auto h = at::empty({chunks, slots, 2, l.I}, z_g.options());
  bitsmoe::gate_up_decode<<<dim3(slots, tiles, chunks), dim3(32, bitsmoe::kSplits), 0, stream>>>(
      l.gate, l.up, z_g.data_ptr<float>(), z_u.data_ptr<float>(), ids.data_ptr<int64_t>(),
      static_cast<int>(ids.size(1)), static_cast<int>(l.I), static_cast<int>(group_size), h.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto a = at::empty({slots, l.I}, z_g.options());
  bitsmoe::gate_up_finish<<<(slots * l.I + 255) / 256, 256, 0, stream>>>(
      h.data_ptr<float>(), chunks, slots, static_cast<int>(l.I), ids.data_ptr<int64_t>(), act, a.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 8 warps a block, at least 2 rows a warp
  const int row_blocks =
      static_cast<int>(std::clamp<int64_t>((fill + slots - 1) / slots, 4, std::max<int64_t>(4, down_rank / 16)));
  bitsmoe::down_decode<<<dim3(slots, row_blocks), 256, 0, stream>>>(l.down, a.data_ptr<float>(),
                                                                    ids.data_ptr<int64_t>(), static_cast<int>(l.I),
                                                                    static_cast<int>(group_size), u.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return u;
}

template <typename T>
void launch_prefill(const at::Tensor& z_g, const at::Tensor& z_u, const Layer& l, const bitsmoe::Tiles& tiles,
                    int64_t n_tiles, int64_t top_k, int64_t group_size, const bitsmoe::Activation& act, at::Tensor& a,
                    at::Tensor& u, cudaStream_t stream) {
  T* a_ptr = reinterpret_cast<T*>(a.data_ptr());
  const int columns = static_cast<int>((l.I + bitsmoe::kTileN - 1) / bitsmoe::kTileN);
  bitsmoe::gate_up_prefill<T><<<dim3(n_tiles, columns), bitsmoe::kPrefillThreads, 0, stream>>>(
      l.gate, l.up, reinterpret_cast<const T*>(z_g.data_ptr()), reinterpret_cast<const T*>(z_u.data_ptr()), tiles,
      static_cast<int>(top_k), static_cast<int>(l.I), static_cast<int>(group_size), act, a_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int row_tiles = (l.down.rank + bitsmoe::kTileN - 1) / bitsmoe::kTileN;
  bitsmoe::down_prefill<T><<<dim3(n_tiles, row_tiles), bitsmoe::kPrefillThreads, 0, stream>>>(
      l.down, a_ptr, tiles, static_cast<int>(l.I), static_cast<int>(group_size), u.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// As moe_decode, with z in bfloat16 or float16 and the tile tables of bitsmoe_vllm/cuda.py (sorted_slots [T*K],
// tile_expert / tile_start / tile_count [tiles], int32) -> u [T * K, R_down] float32.
at::Tensor moe_prefill(const at::Tensor& z_g, const at::Tensor& z_u, const at::Tensor& ids,
                       const at::Tensor& sorted_slots, const at::Tensor& tile_expert, const at::Tensor& tile_start,
                       const at::Tensor& tile_count, at::TensorList factors, int64_t down_rank, int64_t group_size,
                       bool odd_codes, const std::optional<at::Tensor>& gate_bias,
                       const std::optional<at::Tensor>& up_bias, c10::string_view activation_name,
                       c10::ArrayRef<double> activation_params) {
  const auto dtype = z_g.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "z_g: the prefill path takes bfloat16 or float16, found ",
              dtype);
  const Layer l = checked_layer(z_g, z_u, ids, factors, down_rank, group_size, odd_codes);
  const bitsmoe::Activation act =
      activation(gate_bias, up_bias, activation_name, activation_params, factors[3].size(0), l.I);
  const int64_t n_tiles = tile_expert.numel();
  for (const auto* t : {&sorted_slots, &tile_expert, &tile_start, &tile_count}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous() && t->is_cuda(),
                "tile tables: expected contiguous CUDA int32 vectors, found ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(sorted_slots.numel() == ids.numel() && tile_start.numel() == n_tiles && tile_count.numel() == n_tiles,
              "tile tables: sorted_slots must have T*K = ", ids.numel(),
              " entries and the three tile vectors the same length");
  const c10::cuda::CUDAGuard guard(z_g.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto a = at::empty({ids.numel(), l.I}, z_g.options());
  auto u = at::zeros({ids.numel(), down_rank}, z_g.options().dtype(at::kFloat));
  if (ids.numel() == 0 || n_tiles == 0) return u;
  const bitsmoe::Tiles tiles{sorted_slots.data_ptr<int32_t>(), tile_expert.data_ptr<int32_t>(),
                             tile_start.data_ptr<int32_t>(), tile_count.data_ptr<int32_t>()};
  if (dtype == at::kBFloat16) {
    launch_prefill<__nv_bfloat16>(z_g, z_u, l, tiles, n_tiles, ids.size(1), group_size, act, a, u, stream);
  } else {
    launch_prefill<__half>(z_g, z_u, l, tiles, n_tiles, ids.size(1), group_size, act, a, u, stream);
  }
  return u;
}

}  // namespace

// The schemas and fakes are declared in bitsmoe_vllm/library.py, imported before this library is loaded.
TORCH_LIBRARY_IMPL(bitsmoe, CompositeExplicitAutograd, m) {  // what bitsmoe_vllm/cuda.py checks its layout against
  m.impl("cuda_layout_constants", [] { return std::vector<int64_t>{bitsmoe::kTileM}; });
}

TORCH_LIBRARY_IMPL(bitsmoe, CUDA, m) {
  m.impl("moe_decode", &moe_decode);
  m.impl("moe_prefill", &moe_prefill);
}
