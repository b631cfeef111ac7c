"""The `bitsmoe` torch library: every op's schema and every fake (meta) implementation, in one place.

Implementations register elsewhere and declare nothing: the reference for every device in ops.py, the CPU kernels in
csrc/cpu (binding.cpp, huge_pages.cpp), the CUDA kernels in csrc/cuda/binding.cu. A fake is what torch.compile (vLLM
traces its MoE on CPU) sees instead of running an op. Imported before any kernel library is loaded.
"""

import torch

_LAYER = (
    "Tensor? gate_basis, Tensor? up_basis, Tensor? down_basis, "
    "Tensor? gate_basis_scale, Tensor? up_basis_scale, Tensor? down_basis_scale"
)
_FACTORS = "Tensor gate_{0}, Tensor gate_scales, Tensor gate_{1}, Tensor up_{0}, Tensor up_scales, Tensor up_{1}"
# the experts' biases (gate and up [E, I], down [E, H] float32) and activation (bitsmoe_vllm/activation.py)
_ACT = (
    "Tensor? gate_bias=None, Tensor? up_bias=None, Tensor? down_bias=None, str activation='silu', "
    "float[] activation_params=[]"
)
_MOE = (
    f"(Tensor x, Tensor topk_weights, Tensor topk_ids, {_LAYER}, {{}}, int group_size, bool odd_codes, {_ACT}) -> "
    "Tensor"
)
_DOWN = ", Tensor down_{0}, Tensor down_scales, Tensor down_{1}"
_CUDA = (
    "(Tensor z_g, Tensor z_u, Tensor ids, {}Tensor[] factors, int down_rank, int group_size, bool odd_codes, "
    "Tensor? gate_bias=None, Tensor? up_bias=None, str activation='silu', float[] activation_params=[]) -> Tensor"
)
_TILES = "Tensor sorted_slots, Tensor tile_expert, Tensor tile_start, Tensor tile_count, "

SCHEMAS = {
    # the layer on its stored tensors (FORMAT.md section 4): the reference, or the CPU float kernel
    "moe": _MOE.format(_FACTORS.format("codes", "bits") + _DOWN.format("codes", "bits")),
    # the reference on every device: where the backend oracle found a kernel wrong, or none runs the layer
    "moe_reference": _MOE.format(_FACTORS.format("codes", "bits") + _DOWN.format("codes", "bits")),
    # the CPU integer path on the CPU layout (bitsmoe_vllm/cpu_layout.py)
    "moe_int": _MOE.format(
        "Tensor gate_masks, Tensor gate_scales, Tensor gate_rows, Tensor gate_segs, "
        "Tensor up_masks, Tensor up_scales, Tensor up_rows, Tensor up_segs, "
        "Tensor down_masks, Tensor down_scales, Tensor down_rows, Tensor down_segs"
    ),
    "cpu_isa": "() -> str",  # the instruction set the CPU kernels run with
    "cpu_layout_constants": "() -> int[]",  # what the CPU layout must agree on (cpu_layout.check_constants)
    "huge_page_copy": "(Tensor t) -> Tensor",  # t copied into memory advised for transparent huge pages
    # the quantizer's cost model (offline/cost.py): each factor row's weighted rounding loss at every width
    "rounding_losses": "(Tensor factors, Tensor weights, int[] widths, int group_size, int steps, bool odd_codes) "
    "-> Tensor",
    # the quantizer's rounding (offline/rounding.py): codes and float16 scales of rows at a width each
    "round_rows": "(Tensor rows, Tensor bits, int group_size, int steps, bool odd_codes) -> (Tensor, Tensor)",
    # the quantizer's error feedback (offline/coordinates.py): a sub-block of coordinates rounded in order, each one's
    # error spread over the later ones; x, q, err (and scales) written
    "feedback_rank_rows": "(Tensor(a!) x, Tensor? src, Tensor coef, Tensor? divisor, Tensor(b!) q, Tensor(c!) err, "
    "Tensor bits, Tensor(d!) scales, int group_size, int steps, bool odd_codes) -> ()",
    "feedback_columns": "(Tensor(a!) x, Tensor? src, Tensor coef, Tensor? divisor, Tensor(b!) q, Tensor(c!) err, "
    "Tensor bits, Tensor step, bool odd_codes) -> ()",
    # CUDA, on the kernel layout (bitsmoe_vllm/cuda.py); factors: gate, up, down as codes, scales, rows, segs
    "moe_decode": _CUDA.format(""),
    "moe_prefill": _CUDA.format(_TILES),
    "cuda_layout_constants": "() -> int[]",  # what the kernel layout must agree on (cuda.load_kernels)
}

_lib = torch.library.Library("bitsmoe", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _like_x(x, topk_weights, topk_ids, *layer_tensors_group_size_and_activation, **activation):
    return torch.empty_like(x)


def _rank_space(z_g, ids, down_rank):  # u [T * K, down_rank] float32
    return z_g.new_empty((ids.numel(), down_rank), dtype=torch.float32)


def _decode(z_g, z_u, ids, factors, down_rank, *sizes_and_activation, **activation):
    return _rank_space(z_g, ids, down_rank)


def _prefill(z_g, z_u, ids, slots, expert, start, count, factors, down_rank, *sizes_and_activation, **activation):
    return _rank_space(z_g, ids, down_rank)


for _name in ("moe", "moe_reference", "moe_int"):
    torch.library.register_fake(f"bitsmoe::{_name}", _like_x, lib=_lib)
torch.library.register_fake("bitsmoe::moe_decode", _decode, lib=_lib)
torch.library.register_fake("bitsmoe::moe_prefill", _prefill, lib=_lib)
torch.library.register_fake("bitsmoe::huge_page_copy", torch.empty_like, lib=_lib)
