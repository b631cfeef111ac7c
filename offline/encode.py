"""Encode one decomposed MoE layer, with a bit-width per rank row, into FORMAT.md tensors."""

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from bitsmoe_vllm import packing
from bitsmoe_vllm.format import (
    BITS_DTYPE,
    PROJECTIONS,
    LayerLayout,
    ProjectionLayout,
    QuantConfig,
    basis_name,
    basis_scale_name,
    expert_tensor_name,
    stored_bits,
)

from .decompose import Decomposition
from .rounding import REFINE_STEPS, codes_for, quantize_basis, quantize_rows


def encode_factor(
    factor: torch.Tensor,
    bits: torch.Tensor,
    group_size: int,
    scale_steps: int = REFINE_STEPS,
    row_scales: torch.Tensor | None = None,
    odd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """factor [R, I] float, bits [R] -> codes [sum(bits), I/32] int32, scales [count(bits > 0), I/G] float16;
    odd: format version 2's codes (bitsmoe_vllm.packing).

    Rows keep rank order; row k owns bits[k] consecutive planes (the inverse of reference.dequantize_factor).
    row_scales [R, I/G]: the scales rows were already rounded with (offline.gptq), else fitted here.
    """
    I = factor.shape[1]
    if I % packing.WORD_BITS:
        raise ValueError(f"encode_factor: row length {I} is not a multiple of {packing.WORD_BITS}")
    b = bits.to(factor.device, torch.int64)
    stored = b.nonzero().flatten()
    widths = b[stored]
    first_plane = widths.cumsum(0) - widths
    codes = torch.zeros(int(widths.sum()), I // packing.WORD_BITS, dtype=torch.int32, device=factor.device)
    scales = torch.zeros(len(stored), I // group_size, dtype=torch.float16, device=factor.device)
    for width in widths.unique().tolist():
        sel = (widths == width).nonzero().flatten()
        if row_scales is None:
            q, scales[sel] = quantize_rows(factor[stored[sel]], width, group_size, scale_steps, odd)
        else:
            scales[sel] = row_scales[stored[sel]].half()
            q = codes_for(factor[stored[sel]], width, scales[sel], group_size, odd)
        planes = first_plane[sel, None] + torch.arange(width, device=factor.device)  # [n, b]
        codes[planes.flatten()] = packing.pack(q, width, odd).flatten(0, 1)
    return codes, scales


def encode_layer(
    module: str,
    decompositions: Mapping[str, Decomposition],
    bits: Mapping[str, torch.Tensor],
    *,
    group_size: int,
    basis_dtype: str,
    basis_sharing: str = "projection",
    projection_names: Mapping[str, str],
    scale_steps: int = REFINE_STEPS,
    encoded: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    odd: bool = True,
) -> tuple[LayerLayout, dict[str, torch.Tensor]]:
    """decompositions[p] of projection p; bits[p] [E, R] per-row widths -> (layout, name -> tensor). encoded[p]: each
    expert's codes and scales (encode_factor) where the factors were rounded already (offline.gptq), else they are
    rounded here. basis_sharing "layer": the three decompositions share one basis, stored once (FORMAT.md)."""
    tensors: dict[str, torch.Tensor] = {}
    layouts = {}
    whole = basis_sharing == "layer"  # one basis [R, H] for the layer, stored with the gate's names
    for p in PROJECTIONS:
        dec, widths, name = decompositions[p], bits[p].to(torch.int64), projection_names[p]
        if (dec.basis is None) != (basis_dtype == "identity"):
            raise ValueError(
                f"encode_layer: {module} {p}: basis_dtype {basis_dtype} with a decomposition whose basis is "
                f"{'the identity' if dec.basis is None else 'stored'}"
            )
        if whole and dec.basis is not None and not torch.equal(dec.basis, decompositions["gate"].basis):
            raise ValueError(f"encode_layer: {module} {p}: basis_sharing layer with a basis other than the gate's")
        if dec.basis is not None and (p == "gate" or not whole):
            basis = dec.basis.T if p == "down" else dec.basis  # down stores U_d = V^T [H, R]
            tensors[basis_name(module, name)], scale = quantize_basis(basis, basis_dtype)
            if scale is not None:
                tensors[basis_scale_name(module, name)] = scale
        # down reads a layer's int8 basis as its codes transposed times one scale t [1] (FORMAT.md section 3): its
        # factor rows carry the basis rows' scales s, as s / t (the float16 rounding of each rescaled scale adds
        # about 0.2 % to an 8-bit row's squared rounding error, nothing measurable to narrower rows')
        to_down = whole and p == "down" and basis_dtype == "int8"
        if to_down:
            s = tensors[basis_scale_name(module, projection_names["gate"])].float()
            t = s.max().half().reshape(1)
            tensors[basis_scale_name(module, name)], row_factor = t, s / t.float()
        for e, factor in enumerate(dec.factors):
            if encoded is None:
                codes, row_scales = encode_factor(factor, widths[e], group_size, scale_steps, odd=odd)
            else:
                codes, row_scales = encoded[p][e]
            if to_down:
                row_scales = (row_scales.float() * row_factor[widths[e] > 0, None]).half()
            tensors[expert_tensor_name(module, e, name, "codes")] = codes
            tensors[expert_tensor_name(module, e, name, "scales")] = row_scales
            tensors[expert_tensor_name(module, e, name, "bits")] = widths[e].to(BITS_DTYPE)
        layouts[p] = ProjectionLayout(
            rank=dec.factors.shape[1],
            rows=tuple((widths > 0).sum(1).tolist()),
            planes=tuple(widths.sum(1).tolist()),
        )
    return LayerLayout(module=module, **layouts), tensors


def build_quant_config(layers: Sequence[LayerLayout], **fields) -> QuantConfig:
    """A validated QuantConfig for `layers`, with achieved_bits computed from them (FORMAT.md section 6).

    `fields` are QuantConfig's other fields except achieved_bits.
    """
    draft = QuantConfig(layers=tuple(layers), achieved_bits={"all": 0.0, "factors": 0.0}, **fields)
    cfg = dataclasses.replace(draft, achieved_bits=stored_bits(draft))
    cfg.validate()
    return cfg
