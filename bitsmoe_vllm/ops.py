"""`torch.ops.bitsmoe.moe`: the BitsMoE MoE layer as one custom op, and the dispatch behind it.

A custom op with a fake (meta) implementation, so torch.compile (vLLM traces its CPU MoE) treats the
layer as one opaque call. On CPU the op runs the C++ kernel of csrc/cpu (registered for the CPU dispatch key
by the library built at install, bitsmoe_vllm/_cpu*.so; CPU_KERNEL says whether it is loaded); elsewhere, and on
CPU without that library, the reference (`reference.moe_forward`). `moe_layer` sends a layer already in the CUDA
kernels' layout to them instead (bitsmoe_vllm/cuda.py), and one in the CPU layout to the integer path
(bitsmoe_vllm/cpu_layout.py).
"""

import importlib.util

import torch

from bitsmoe_vllm import cpu_layout
from bitsmoe_vllm.cpu_layout import CpuLayer, moe_forward_int
from bitsmoe_vllm.cuda import KernelLayer, moe_forward_cuda
from bitsmoe_vllm.reference import Basis, Factors, MoELayer, moe_forward

PREFILL_SLOTS_PER_EXPERT = 16  # tensor cores pay once the token choices average this many per expert (to be tuned on a GPU)


@torch.library.custom_op("bitsmoe::moe", mutates_args=())
def moe(
    x: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K] local expert ids, -1 = not here
    gate_basis: torch.Tensor | None,  # [R_gate, H]; None: the identity
    up_basis: torch.Tensor | None,  # [R_up, H]
    down_basis: torch.Tensor | None,  # [H, R_down]
    gate_basis_scale: torch.Tensor | None,  # [R_gate] for int8 bases
    up_basis_scale: torch.Tensor | None,
    down_basis_scale: torch.Tensor | None,
    gate_codes: torch.Tensor,  # [sum_e planes_e, I/32] int32
    gate_scales: torch.Tensor,  # [sum_e rows_e, I/G] float16
    gate_bits: torch.Tensor,  # [E, R_gate] uint8
    up_codes: torch.Tensor,
    up_scales: torch.Tensor,
    up_bits: torch.Tensor,
    down_codes: torch.Tensor,
    down_scales: torch.Tensor,
    down_bits: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """[T, H] routed-expert output in x.dtype (FORMAT.md section 4)."""
    layer = MoELayer(
        _basis(gate_basis, gate_basis_scale), _basis(up_basis, up_basis_scale), _basis(down_basis, down_basis_scale),
        Factors(gate_codes, gate_scales, gate_bits), Factors(up_codes, up_scales, up_bits),
        Factors(down_codes, down_scales, down_bits), group_size,
    )  # fmt: skip
    return moe_forward(x, topk_weights, topk_ids, layer)


def _basis(weight: torch.Tensor | None, scale: torch.Tensor | None) -> Basis | None:
    return None if weight is None else Basis(weight, scale)


@moe.register_fake
def _(x, topk_weights, topk_ids, *layer_tensors_and_group_size):
    return torch.empty_like(x)


def _load_cpu_kernel() -> bool:
    spec = importlib.util.find_spec("bitsmoe_vllm._cpu")
    if spec is None or not spec.origin:
        return False
    torch.ops.load_library(spec.origin)
    cpu_layout.register_fake()
    return True


CPU_KERNEL = _load_cpu_kernel()


def moe_layer(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    layer: MoELayer,
    kernel: KernelLayer | CpuLayer | None = None,
) -> torch.Tensor:
    """The dispatch: the kernels whose layout the layer was put in at load (`kernel`: CUDA, bitsmoe_vllm/cuda.py, or
    the CPU integer path, bitsmoe_vllm/cpu_layout.py), else torch.ops.bitsmoe.moe (the C++ kernel on CPU, the
    reference elsewhere) with the layer's tensors taken from a MoELayer."""
    if isinstance(kernel, CpuLayer):
        return moe_forward_int(x, topk_weights, topk_ids, kernel)
    if kernel is not None:
        many = topk_ids.numel() >= PREFILL_SLOTS_PER_EXPERT * kernel.gate.segs.shape[0]  # a shape, known when tracing
        path = "prefill" if many and x.dtype in (torch.bfloat16, torch.float16) else "decode"
        return moe_forward_cuda(x, topk_weights, topk_ids, kernel, path)
    bases = (layer.gate_basis, layer.up_basis, layer.down_basis)
    return torch.ops.bitsmoe.moe(
        x, topk_weights, topk_ids,
        *(None if b is None else b.weight for b in bases), *(None if b is None else b.scale for b in bases),
        layer.gate.codes, layer.gate.scales, layer.gate.bits,
        layer.up.codes, layer.up.scales, layer.up.bits,
        layer.down.codes, layer.down.scales, layer.down.bits,
        layer.group_size,
    )  # fmt: skip
