"""The error feedback's rounding of a sub-block of coordinates (offline.gptq.feedback, offline.lowrank.feedback): each
coordinate of every expert rounded after the rounding errors of those before it in the sub-block are spread over it,
and the two kinds of coordinate the factors have. On the CPU by torch.ops.bitsmoe.feedback_rank_rows / feedback_columns
(csrc/cpu/feedback.cpp, the same bits); sub_block's loop is the reference, and runs any other rounding."""

import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.packing import code_bounds, round_to_codes

from .rounding import quantize_mixed_rows


def sub_block(quantize, first: int, x, src, coef, divisor, q, err) -> None:
    """Round coordinates first .. first + m: x [E, m, n] their values, updated as the errors are spread; src [E, m, n]
    or None: the values an error is taken from (None: x as updated); coef [E, m, m]: coef[:, j, k] spreads
    coordinate k's error to j > k; divisor [E, m] or None: the errors are divided by it; q, err [E, m, n]: the rounded
    values and the errors, written. quantize(i, values [E, n]) rounds coordinate i (RankRows, Columns or any)."""
    if isinstance(quantize, RankRows | Columns) and x.device.type == "cpu" and ops.CPU_KERNEL:
        quantize.kernel(first, x, src, coef.contiguous(), None if divisor is None else divisor.contiguous(), q, err)
        return
    for k in range(x.shape[1]):
        q[:, k] = quantize(first + k, x[:, k])
        d = err[:, k]
        torch.sub(x[:, k] if src is None else src[:, k], q[:, k], out=d)
        if divisor is not None:
            d.div_(divisor[:, k, None])
        x[:, k + 1 :].addcmul_(coef[:, k + 1 :, k, None], d[:, None])  # no temporary


class RankRows:
    """The gate and up's coordinates, their rank rows: coordinate k of expert e is a factor row [I] of width bits[e, k]
    ([E, n] int64, the coordinates in the order they are rounded), rounded as offline.rounding.quantize_mixed_rows
    rounds it; its scales [I / G] go to scales[e, k] ([E, n, I / G] float32)."""

    def __init__(self, bits: torch.Tensor, scales: torch.Tensor, group_size: int, steps: int, odd: bool):
        self.bits, self.scales, self.group_size, self.steps, self.odd = bits, scales, group_size, steps, odd

    def __call__(self, k: int, f: torch.Tensor) -> torch.Tensor:
        codes, s = quantize_mixed_rows(f, self.bits[:, k], self.group_size, self.steps, self.odd)  # width 0: 0
        self.scales[:, k] = s.float()
        return codes.float() * self.scales[:, k].repeat_interleave(self.group_size, dim=1)

    def kernel(self, first: int, x, src, coef, divisor, q, err) -> None:
        at = slice(first, first + x.shape[1])
        torch.ops.bitsmoe.feedback_rank_rows(
            x, src, coef, divisor, q, err, self.bits[:, at], self.scales[:, at], self.group_size, self.steps, self.odd
        )


class Columns:
    """The down projection's coordinates, the columns of its factor [R, I]: value r of coordinate i of expert e is
    rounded to the nearest code of its row's width bits[e, r] ([E, R] int64) at the scale step[e, i, r] ([E, n, R]
    float32, the coordinates in the order they are rounded; 0 for a dropped row, whose values are 0)."""

    def __init__(self, bits: torch.Tensor, step: torch.Tensor, odd: bool):
        self.bits, self.step, self.odd = bits, step, odd
        self.bounds = code_bounds(bits.clamp(min=1), odd)  # width-0 rows have no scale: zero below

    def __call__(self, i: int, f: torch.Tensor) -> torch.Tensor:
        s = self.step[:, i]
        on = s > 0
        return torch.where(on, round_to_codes(f / torch.where(on, s, 1.0), self.bounds) * s, 0.0)

    def kernel(self, first: int, x, src, coef, divisor, q, err) -> None:
        step = self.step[:, first : first + x.shape[1]]
        torch.ops.bitsmoe.feedback_columns(x, src, coef, divisor, q, err, self.bits, step, self.odd)
