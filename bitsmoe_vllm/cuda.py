"""The CUDA path of a BitsMoE layer: the kernels of csrc/cuda (torch.ops.bitsmoe) on the layer in kernel
layout. The reference (reference.moe_forward) stays the spec; tests/test_kernels.py holds the two together.

    kernel = to_kernel_layer(layer)            # once, at load (repack + float32 bases)
    y = moe_forward_cuda(x, topk_weights, topk_ids, kernel, "decode")  # or "prefill"; ops.moe_layer chooses

z = B x for gate and up in one GEMM; then either the decode path (few tokens per expert: per (token, expert) the
gate/up factor products on the packed codes with SiLU, the down factor products in rank space; float32,
csrc/cuda/moe_decode.cuh) or the prefill path (tokens grouped by expert, factor tiles decoded to bf16/fp16 in
shared memory, tensor-core MMA with float32 accumulation, csrc/cuda/moe_prefill.cuh); the routing-weighted sum
over each token's experts in a fixed order; one GEMM with B_d. No host synchronisation.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from bitsmoe_vllm import library  # noqa: F401 (the ops declared before the kernels load)
from bitsmoe_vllm.activation import SILU, Activation
from bitsmoe_vllm.kernel_layout import KernelFactors, repack
from bitsmoe_vllm.reference import Biases, MoELayer, dequantize_basis, op_extras

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cuda"


_loaded = False


def load_kernels(build: bool = False) -> bool:
    """Make torch.ops.bitsmoe available: the library built at install (bitsmoe_vllm/_cuda*.so), or with
    build=True compiled now from csrc/cuda (torch.utils.cpp_extension; for machines without an install build).
    False when neither is at hand."""
    global _loaded
    if _loaded:
        return True
    spec = importlib.util.find_spec("bitsmoe_vllm._cuda")
    if spec is not None and spec.origin:
        torch.ops.load_library(spec.origin)
    elif build:
        from torch.utils.cpp_extension import load

        arch = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
        load(
            "bitsmoe_cuda_jit",
            [str(CSRC / "binding.cu")],
            extra_cuda_cflags=["-O3", "-std=c++20", *arch],
            is_python_module=False,
        )
    else:
        return False

    if list(torch.ops.bitsmoe.cuda_layout_constants()) != [TILE_M]:
        raise RuntimeError(
            "bitsmoe: the CUDA kernel library has the layout constants "
            f"{list(torch.ops.bitsmoe.cuda_layout_constants())} "
            f"(slots per prefill tile) and bitsmoe_vllm/cuda.py writes [{TILE_M}]: reinstall bitsmoe-vllm"
        )
    _loaded = True
    return True


@dataclass(frozen=True)
class KernelLayer:
    gate_up_basis: torch.Tensor | None  # [R_gate + R_up, H] float32; None: identity bases
    down_basis: torch.Tensor | None  # [H, R_down] float32
    gate: KernelFactors
    up: KernelFactors
    down: KernelFactors
    group_size: int
    odd_codes: bool  # format version 2's codes
    activation: Activation = SILU
    biases: Biases | None = None  # float32, contiguous


def to_kernel_layer(layer: MoELayer) -> KernelLayer:
    """The layer in kernel layout, on its device. Identity bases stay None; others are stacked for one GEMM."""
    if layer.gate_basis is None:
        gate_up, down = None, None
    else:
        gate_up = torch.cat([dequantize_basis(layer.gate_basis), dequantize_basis(layer.up_basis)]).contiguous()
        down = dequantize_basis(layer.down_basis).contiguous()
    b = layer.biases
    return KernelLayer(
        gate_up,
        down,
        repack(layer.gate),
        repack(layer.up),
        repack(layer.down),
        layer.group_size,
        layer.down.odd,
        layer.activation,
        None if b is None else Biases(*(t.float().contiguous() for t in (b.gate, b.up, b.down))),
    )


TILE_M = 64  # slots per prefill tile (kTileM in csrc/cuda/moe_prefill.cuh)


def prefill_tiles(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """The prefill kernels' tile tables, computed on the device with no host synchronisation: slots sorted by expert
    (held-elsewhere slots last), and for each of ceil(slots / TILE_M) + E tiles its expert (-1: unused), first
    position in the sorted slots and number of slots."""
    flat = topk_ids.flatten().to(torch.int64)
    key = torch.where(flat < 0, num_experts, flat)
    sorted_slots = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, key, torch.ones_like(key)
    )[:-1]
    tiles_per_expert = (counts + TILE_M - 1) // TILE_M
    tile_end = tiles_per_expert.cumsum(0)
    tile = torch.arange(-(-flat.numel() // TILE_M) + num_experts, device=flat.device)
    expert = torch.searchsorted(tile_end, tile, right=True)  # num_experts: past the last used tile
    e = expert.clamp(max=num_experts - 1)
    local = tile - (tile_end - tiles_per_expert)[e]
    start = (counts.cumsum(0) - counts)[e] + local * TILE_M
    count = (counts[e] - local * TILE_M).clamp(0, TILE_M)
    expert = torch.where(expert < num_experts, expert, -1)
    return tuple(t.to(torch.int32).contiguous() for t in (sorted_slots, expert, start, count))


def moe_forward_cuda(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: KernelLayer, path: str
) -> torch.Tensor:
    """reference.moe_forward on the CUDA kernels: x [T, H] -> [T, H] in x.dtype. path: "decode" (any dtype) or
    "prefill" (tensor cores: bfloat16 or float16 x); ops.moe_layer chooses."""
    T, K = topk_ids.shape
    E = layer.gate.segs.shape[0]
    if path not in ("decode", "prefill") or (path == "prefill" and x.dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError(
            f"moe_forward_cuda: path {path!r} with {x.dtype} activations; expected decode, or prefill with bf16/fp16"
        )
    z_dtype = torch.float32 if path == "decode" else x.dtype
    xf = x.float()
    if layer.gate_up_basis is None:
        z_g = z_u = xf.to(z_dtype).contiguous()
    else:
        z = (xf @ layer.gate_up_basis.T).to(z_dtype)  # [T, R_gate + R_up]: one GEMM for both
        z_g, z_u = z[:, : layer.gate.rank].contiguous(), z[:, layer.gate.rank :].contiguous()
    g, u, d = layer.gate, layer.up, layer.down
    factors = [getattr(f, n) for f in (g, u, d) for n in ("codes", "scales", "rows", "segs")]
    ids = topk_ids.to(torch.int64).contiguous()
    gate_bias, up_bias, _, name, params = op_extras(layer)  # the down bias is added below
    act, b = (gate_bias, up_bias, name, params), layer.biases
    if path == "decode":
        out = torch.ops.bitsmoe.moe_decode(z_g, z_u, ids, factors, d.rank, layer.group_size, layer.odd_codes, *act)
    else:
        tiles = prefill_tiles(ids, E)
        out = torch.ops.bitsmoe.moe_prefill(
            z_g, z_u, ids, *tiles, factors, d.rank, layer.group_size, layer.odd_codes, *act
        )
    w = topk_weights.float()
    t = (out.view(T, K, d.rank) * w[..., None]).sum(1)  # fixed order: deterministic
    y = t if layer.down_basis is None else t @ layer.down_basis.T
    if b is not None:  # sum_k w_k b_d[e_k], choices held elsewhere left out: [T, E] weights (not [T, K, H] rows)
        per_expert = torch.zeros(T, E, device=y.device).scatter_add_(1, ids.clamp(min=0), w * (ids >= 0))
        y = y + per_expert @ b.down
    return y.to(x.dtype)
