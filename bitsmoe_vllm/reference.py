"""The numeric spec of BitsMoE: dequantization and the MoE forward, written from the math.

    z_g = B_g x,  z_u = B_u x                                  (shared bases, once per token; B = I if none)
    a_e = act(F_g,e^T z_g + b_g,e, F_u,e^T z_u + b_u,e)        (per selected expert, length I; biases if stored)
    y   = B_d sum_e w_e F_d,e a_e + sum_e w_e b_d,e            (rank-space sum, then the shared basis)

Factors F are rank-major [R, I] (FORMAT.md). Everything is computed in float32 and the result is
cast to the activation dtype. Slow but plain; it is also the fallback where no compiled kernel exists.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from bitsmoe_vllm import packing
from bitsmoe_vllm.activation import SILU, Activation
from bitsmoe_vllm.format import (
    BITS_DTYPE,
    PROJECTIONS,
    QuantConfig,
    basis_name,
    basis_scale_name,
    check_layer_tensors,
    expert_tensor_name,
)


@dataclass(frozen=True)
class Factors:
    """One projection of one MoE layer, all (local) experts concatenated in expert order."""

    codes: torch.Tensor  # [sum_e planes_e, I/32] int32
    scales: torch.Tensor  # [sum_e rows_e, I/G] float16
    bits: torch.Tensor  # [E, R] uint8
    odd: bool = True  # odd codes up to 6 bits (format version 2; version 1: False), bitsmoe_vllm.packing


@dataclass(frozen=True)
class Basis:
    weight: torch.Tensor  # gate/up [R, H], down [H, R]; float16/bfloat16, or int8 with `scale`
    scale: torch.Tensor | None = None  # [rows of weight] float16, int8 only


def layer_bases(gate: Basis, down_scale: torch.Tensor | None) -> tuple[Basis, Basis, Basis]:
    """The gate's, up's and down's bases of a layer that stores one (basis_sharing "layer"): the gate's [R, H] (int8:
    with its scale per row [R]) serves up too; down reads its codes transposed with its own one scale [1] on every row
    (its factor rows carry the per-row scales, FORMAT.md section 3). Down's is a copy, as the kernels take a stored
    down basis."""
    H = gate.weight.shape[1]
    down = Basis(gate.weight.T.contiguous(), None if down_scale is None else down_scale.expand(H).contiguous())
    return gate, gate, down


@dataclass(frozen=True)
class Biases:
    """Every (local) expert's biases, float32: gate and up [E, I], down [E, H]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass(frozen=True)
class MoELayer:
    gate_basis: Basis | None  # None: the identity (basis_dtype "identity"), nothing stored
    up_basis: Basis | None
    down_basis: Basis | None
    gate: Factors
    up: Factors
    down: Factors
    group_size: int
    activation: Activation = SILU
    biases: Biases | None = None

    def to(self, device: torch.device) -> "MoELayer":
        def basis(b: Basis | None) -> Basis | None:
            if b is None:
                return None
            return Basis(b.weight.to(device), None if b.scale is None else b.scale.to(device))

        def factors(f: Factors) -> Factors:
            return Factors(f.codes.to(device), f.scales.to(device), f.bits.to(device), f.odd)

        return MoELayer(
            basis(self.gate_basis),
            basis(self.up_basis),
            basis(self.down_basis),
            factors(self.gate),
            factors(self.up),
            factors(self.down),
            self.group_size,
            self.activation,
            None if self.biases is None else Biases(*(b.to(device) for b in vars(self.biases).values())),
        )


def op_extras(layer: MoELayer) -> tuple:
    """The last arguments of the bitsmoe ops (library.py): gate, up and down biases (None without) and the activation
    with its parameters, of a MoELayer or of a layout made from one (cuda.KernelLayer: the same two fields)."""
    b, act = layer.biases, layer.activation
    params = [] if act.alpha is None else [act.alpha, act.limit]
    biases = (None, None, None) if b is None else (b.gate, b.up, b.down)
    return (*biases, act.name, params)


def gather_layer(cfg: QuantConfig, module: str, tensors: Mapping[str, torch.Tensor]) -> MoELayer:
    """Build a MoELayer from a checkpoint's per-expert tensors (validated first)."""
    layer = cfg.layer(module)
    check_layer_tensors(cfg, layer, tensors)

    def cat(p: str, kind: str) -> torch.Tensor:
        parts = [
            tensors[expert_tensor_name(layer.module, e, cfg.projection_names[p], kind)] for e in range(cfg.num_experts)
        ]
        return torch.stack(parts) if kind in ("bits", "bias") else torch.cat(parts)

    def basis(p: str) -> Basis | None:
        if cfg.basis_dtype == "identity":
            return None
        name = cfg.projection_names[p]
        scale = tensors[basis_scale_name(module, name)] if cfg.basis_dtype == "int8" else None
        return Basis(tensors[basis_name(module, name)], scale)

    if cfg.basis_sharing == "layer":
        down_scale = basis_scale_name(module, cfg.projection_names["down"])
        bases = layer_bases(basis("gate"), tensors[down_scale] if cfg.basis_dtype == "int8" else None)
    else:
        bases = (basis("gate"), basis("up"), basis("down"))
    factors = {p: Factors(cat(p, "codes"), cat(p, "scales"), cat(p, "bits"), cfg.odd_codes) for p in PROJECTIONS}
    biases = Biases(*(cat(p, "bias") for p in PROJECTIONS)) if cfg.expert_bias else None
    return MoELayer(
        *bases,
        **factors,
        group_size=cfg.group_size,
        activation=cfg.act,
        biases=biases,
    )


def dequantize_basis(basis: Basis) -> torch.Tensor:
    """The basis in float32; int8 rows are multiplied by their scale."""
    w = basis.weight.float()
    return w if basis.scale is None else w * basis.scale.float()[:, None]


def expert_offsets(bits: torch.Tensor) -> tuple[list[int], list[int]]:
    """First plane and first stored row of each expert in Factors.codes / .scales; bits [E, R]."""
    planes = bits.to(torch.int64).sum(1)
    rows = (bits > 0).sum(1)
    zero = torch.zeros(1, dtype=torch.int64, device=bits.device)
    return torch.cat([zero, planes.cumsum(0)]).tolist(), torch.cat([zero, rows.cumsum(0)]).tolist()


def dequantize_factor(
    codes: torch.Tensor, scales: torch.Tensor, bits: torch.Tensor, group_size: int, odd: bool = True
) -> torch.Tensor:
    """One expert's factor: codes [planes, I/32] int32, scales [rows, I/G] fp16, bits [R] uint8 -> [R, I] float32.

    Row k with b = bits[k] > 0 owns the next b planes of `codes` and the next row of `scales`;
    rows with 0 bits are zero.
    """
    if bits.dtype != BITS_DTYPE:
        raise ValueError(f"dequantize_factor: bits must be uint8, found {bits.dtype}")
    R, I = bits.shape[0], codes.shape[1] * packing.WORD_BITS
    b = bits.to(torch.int64)
    stored = b.nonzero().flatten()  # rank indices with bits > 0, ascending
    widths = b[stored]
    if codes.shape[0] != int(widths.sum()) or scales.shape[0] != len(stored):
        raise ValueError(
            f"dequantize_factor: bits ask for {int(widths.sum())} planes and {len(stored)} scale rows, "
            f"found codes {list(codes.shape)} and scales {list(scales.shape)}"
        )
    out = torch.zeros(R, I, dtype=torch.float32, device=codes.device)
    first_plane = widths.cumsum(0) - widths
    for width in widths.unique().tolist():
        sel = (widths == width).nonzero().flatten()  # positions among stored rows
        planes = codes[first_plane[sel, None] + torch.arange(width, device=codes.device)]  # [n, b, I/32]
        q = packing.unpack(planes, width, I, odd).float()  # [n, I]
        out[stored[sel]] = q * scales[sel].float().repeat_interleave(group_size, dim=1)
    return out


def expert_factor(
    factors: Factors, expert: int, group_size: int, offsets: tuple[list[int], list[int]] | None = None
) -> torch.Tensor:
    """Dequantized [R, I] float32 factor of one expert; `offsets` = expert_offsets(factors.bits), if at hand."""
    plane_at, row_at = offsets or expert_offsets(factors.bits)
    codes = factors.codes[plane_at[expert] : plane_at[expert + 1]]
    scales = factors.scales[row_at[expert] : row_at[expert + 1]]
    return dequantize_factor(codes, scales, factors.bits[expert], group_size, factors.odd)


def expert_factors(layer: MoELayer) -> dict[str, list[torch.Tensor]]:
    """Every expert's dequantized factors {projection: [[R, I]] per expert}: moe_forward's, computed once for a caller
    that runs many forwards of one layer (evaluation: 5x faster on the trained MoE)."""
    out = {}
    for p in PROJECTIONS:
        f = getattr(layer, p)
        offsets = expert_offsets(f.bits)
        out[p] = [expert_factor(f, e, layer.group_size, offsets) for e in range(f.bits.shape[0])]
    return out


def moe_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    layer: MoELayer,
    dequantized: dict[str, list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """BitsMoE routed-expert output. x [T, H]; topk_weights [T, K]; topk_ids [T, K] -> [T, H] in x.dtype.

    Expert ids index the layer's experts; negative ids (experts held elsewhere) contribute nothing. `dequantized`:
    expert_factors(layer), if at hand.
    """
    xf = x.float()
    z_gate = xf if layer.gate_basis is None else xf @ dequantize_basis(layer.gate_basis).T  # [T, R_gate]
    z_up = xf if layer.up_basis is None else xf @ dequantize_basis(layer.up_basis).T  # [T, R_up]
    t = torch.zeros(x.shape[0], layer.down.bits.shape[1], dtype=torch.float32, device=x.device)  # [T, R_down]
    factors = {p: getattr(layer, p) for p in PROJECTIONS}
    offsets = {p: expert_offsets(f.bits) for p, f in factors.items()} if dequantized is None else {}

    def factor(p: str, e: int) -> torch.Tensor:
        if dequantized is not None:
            return dequantized[p][e]
        return expert_factor(factors[p], e, layer.group_size, offsets[p])  # [R_p, I]

    b = layer.biases
    bias_out = None if b is None else torch.zeros(x.shape[0], b.down.shape[1], dtype=torch.float32, device=x.device)
    for e in topk_ids[topk_ids >= 0].unique().tolist():
        token, slot = (topk_ids == e).nonzero(as_tuple=True)  # [n], [n]
        h_gate, h_up = z_gate[token] @ factor("gate", e), z_up[token] @ factor("up", e)  # [n, I]
        if b is not None:
            h_gate, h_up = h_gate + b.gate[e], h_up + b.up[e]
        w = topk_weights[token, slot].float()[:, None]
        t.index_add_(0, token, w * (layer.activation(h_gate, h_up) @ factor("down", e).T))  # [n, R_down]
        if b is not None:
            bias_out.index_add_(0, token, w * b.down[e])
    y = t if layer.down_basis is None else t @ dequantize_basis(layer.down_basis).T
    return (y if b is None else y + bias_out).to(x.dtype)  # [T, H]
