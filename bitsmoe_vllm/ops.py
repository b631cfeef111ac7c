"""`torch.ops.bitsmoe.moe`: the BitsMoE MoE layer as one custom op, and `moe_layer`, the call that runs the
implementation the backend oracle (bitsmoe_vllm/backend.py) chose at load.

Ops of the bitsmoe library (schemas and fakes in library.py), so torch.compile (vLLM traces its CPU MoE) treats the
layer as one opaque call. On CPU `bitsmoe::moe` runs the C++ float kernel of csrc/cpu (registered for the CPU dispatch
key by the library built at install, bitsmoe_vllm/_cpu*.so; CPU_KERNEL says whether it is loaded); elsewhere, and on
CPU without that library, the reference (`reference.moe_forward`). `bitsmoe::moe_reference` is the reference on every
device, where the oracle found a kernel wrong.
"""

import importlib.util

import torch

from bitsmoe_vllm import cpu_layout, library  # noqa: F401 (library: the ops declared before any kernel loads)
from bitsmoe_vllm.activation import Activation
from bitsmoe_vllm.cpu_layout import CpuLayer, moe_forward_int
from bitsmoe_vllm.cuda import KernelLayer, moe_forward_cuda
from bitsmoe_vllm.reference import Basis, Biases, Factors, MoELayer, moe_forward, op_extras

# Tensor cores pay once the token choices average this many per expert (to be tuned on a GPU).
PREFILL_SLOTS_PER_EXPERT = 16


def _moe(
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
    odd_codes: bool,  # format version 2's codes
    gate_bias: torch.Tensor | None = None,  # [E, I] float32
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,  # [E, H]
    activation: str = "silu",
    activation_params: list[float] = (),  # swigluoai: alpha, limit
) -> torch.Tensor:
    """[T, H] routed-expert output in x.dtype (FORMAT.md section 4)."""
    layer = MoELayer(
        _basis(gate_basis, gate_basis_scale),
        _basis(up_basis, up_basis_scale),
        _basis(down_basis, down_basis_scale),
        Factors(gate_codes, gate_scales, gate_bits, odd_codes),
        Factors(up_codes, up_scales, up_bits, odd_codes),
        Factors(down_codes, down_scales, down_bits, odd_codes),
        group_size,
        Activation(activation, *activation_params),
        None if gate_bias is None else Biases(gate_bias, up_bias, down_bias),
    )
    return moe_forward(x, topk_weights, topk_ids, layer)


# The reference for every device; the CPU kernel library registers bitsmoe::moe for CPU over it, none moe_reference.
torch.library.register_kernel("bitsmoe::moe", None, _moe)
torch.library.register_kernel("bitsmoe::moe_reference", None, _moe)


def _basis(weight: torch.Tensor | None, scale: torch.Tensor | None) -> Basis | None:
    return None if weight is None else Basis(weight, scale)


def _load_cpu_kernel() -> bool:
    spec = importlib.util.find_spec("bitsmoe_vllm._cpu")
    if spec is None or not spec.origin:
        return False
    torch.ops.load_library(spec.origin)
    cpu_layout.check_constants()
    return True


CPU_KERNEL = _load_cpu_kernel()


class Reference:
    """moe_layer's `kernel` for the reference, also on a device that has a compiled kernel for bitsmoe::moe."""


REFERENCE = Reference()
Kernel = KernelLayer | CpuLayer | Reference | None  # None: bitsmoe::moe (the C++ float kernel on CPU)


def moe_layer(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: MoELayer | None, kernel: Kernel = None
) -> torch.Tensor:
    """[T, H] routed-expert output: the CUDA kernels or the CPU integer path on the layer in their layout (`kernel`,
    made at load; `layer` unused), else bitsmoe::moe, or bitsmoe::moe_reference for REFERENCE, on `layer`."""
    if isinstance(kernel, CpuLayer):
        return moe_forward_int(x, topk_weights, topk_ids, kernel)
    if isinstance(kernel, KernelLayer):
        many = topk_ids.numel() >= PREFILL_SLOTS_PER_EXPERT * kernel.gate.segs.shape[0]  # a shape, known when tracing
        path = "prefill" if many and x.dtype in (torch.bfloat16, torch.float16) else "decode"
        return moe_forward_cuda(x, topk_weights, topk_ids, kernel, path)
    op = torch.ops.bitsmoe.moe_reference if isinstance(kernel, Reference) else torch.ops.bitsmoe.moe
    bases = (layer.gate_basis, layer.up_basis, layer.down_basis)
    return op(
        x,
        topk_weights,
        topk_ids,
        *(None if b is None else b.weight for b in bases),
        *(None if b is None else b.scale for b in bases),
        layer.gate.codes,
        layer.gate.scales,
        layer.gate.bits,
        layer.up.codes,
        layer.up.scales,
        layer.up.bits,
        layer.down.codes,
        layer.down.scales,
        layer.down.bits,
        layer.group_size,
        layer.down.odd,
        *op_extras(layer),
    )
