"""Rounding of factor rows and shared bases to the codes and scales of FORMAT.md.

Factor rows: signed codes (bitsmoe_vllm.packing: odd up to 6 bits in format version 2, odd=True), one
float16 scale per group of G columns. For b >= 2 the scale starts at absmax / (the largest code) and is
refined by alternating least squares (codes given scale, then scale given codes); each step cannot
increase the group's squared error, and the best scale seen is kept. For b = 1 the code is the sign and
the scale mean |x| (the least-squares scale).
"""

import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.packing import code_bounds, round_to_codes

REFINE_STEPS = 8


def quantize_rows(
    rows: torch.Tensor, bits: int, group_size: int, steps: int = REFINE_STEPS, odd: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, I] float -> codes [N, I] int8, scales [N, I/G] float16 (dequantized = codes * scale)."""
    return quantize_mixed_rows(rows, torch.full((len(rows),), bits, device=rows.device), group_size, steps, odd)


def quantize_mixed_rows(
    rows: torch.Tensor, bits: torch.Tensor, group_size: int, steps: int = REFINE_STEPS, odd: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows with a width per row, bits [N] (0 or a supported width), in one pass (offline.gptq rounds a
    coordinate of every expert at once): the same codes and scales as quantize_rows on each width's rows, and codes
    and scales 0 for a row of width 0 (dropped). On the CPU by the kernel torch.ops.bitsmoe.round_rows
    (csrc/cpu/rounding.cpp), elsewhere by rounded_rows, its reference."""
    N, I = rows.shape
    if I % group_size:
        raise ValueError(f"quantize_rows: group size {group_size} does not divide the row length {I}")
    if rows.device.type == "cpu" and ops.CPU_KERNEL:
        return torch.ops.bitsmoe.round_rows(rows.float(), bits.to(torch.int64), group_size, steps, odd)
    return rounded_rows(rows, bits, group_size, steps, odd)


def rounded_rows(
    rows: torch.Tensor, bits: torch.Tensor, group_size: int, steps: int = REFINE_STEPS, odd: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_mixed_rows in tensor code, on any device."""
    N, I = rows.shape
    x = rows.float().reshape(N, I // group_size, group_size)
    b = bits.to(device=rows.device, dtype=torch.int64)[:, None, None]
    dropped, b = b == 0, b.clamp(min=1)  # a dropped row is rounded as a 1-bit one, then zeroed
    sign = b == 1
    bounds = code_bounds(b, odd)
    scale = _fp16(torch.where(sign, x.abs().mean(-1, keepdim=True), x.abs().amax(-1, keepdim=True) / bounds[2]))
    signs = torch.where(x >= 0, 1.0, -1.0)
    best_scale, best_err = scale, torch.full_like(scale, float("inf"))
    for _ in range(steps + 1):
        codes = torch.where(sign, signs, _round(x, scale, bounds))
        err = ((codes * scale - x) ** 2).sum(-1, keepdim=True)
        better = (err < best_err) & ~sign | torch.isinf(best_err) & sign
        best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
        qq = (codes * codes).sum(-1, keepdim=True)
        scale = _fp16(torch.where(qq > 0, (codes * x).sum(-1, keepdim=True) / qq.clamp_min(1), scale))
    codes = torch.where(sign, signs, _round(x, best_scale, bounds))
    codes, best_scale = torch.where(dropped, 0, codes), torch.where(dropped, 0, best_scale)
    return codes.reshape(N, I).to(torch.int8), best_scale.squeeze(-1).half()


def codes_for(rows: torch.Tensor, bits: int, scales: torch.Tensor, group_size: int, odd: bool = True) -> torch.Tensor:
    """The codes [N, I] int8 of rows [N, I] at given scales [N, I/G] (rows already on that grid give theirs back)."""
    N, I = rows.shape
    x, scale = rows.float().reshape(N, I // group_size, group_size), scales.float()[..., None]
    if bits == 1:
        return torch.where(x >= 0, 1, -1).reshape(N, I).to(torch.int8)
    return _round(x, scale, code_bounds(torch.tensor(bits, device=x.device), odd)).reshape(N, I).to(torch.int8)


def quantize_basis(basis: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store a float basis as `dtype` ("float16", "bfloat16", "int8"); int8 gets one float16 scale per row."""
    if dtype in ("float16", "bfloat16"):
        return basis.to(getattr(torch, dtype)).contiguous(), None
    if dtype != "int8":
        raise ValueError(f"unknown basis dtype {dtype!r}; expected float16, bfloat16 or int8")
    scale = _fp16(basis.float().abs().amax(1, keepdim=True) / 127)  # [rows, 1]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.where(scale > 0, (basis.float() / safe).round().clamp(-127, 127), 0)
    return codes.to(torch.int8), scale.squeeze(1).half()


def _round(x: torch.Tensor, scale: torch.Tensor, bounds: tuple) -> torch.Tensor:
    """The codes of x at scale; bounds = packing.code_bounds of the widths."""
    # a group of zeros has scale 0: any code stands for 0, and the one nearest 0 is valid at every width
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return round_to_codes(torch.where(scale > 0, x / safe, 0), bounds)


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    # Codes are chosen against the scale that is stored, so rounding the scale to float16 costs nothing extra.
    return scale.half().float()
