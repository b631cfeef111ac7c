"""The error feedback's CPU kernels (csrc/cpu/feedback.cpp: torch.ops.bitsmoe.feedback_rank_rows, feedback_columns)
against their reference, offline.coordinates.sub_block's loop over the coordinates (each row rounded by the same
round_rows, whose own reference is tested in test_rounding_kernels.py): the same bits, sub-block by sub-block and
through offline.gptq.round_factors on both of its paths."""

import pytest
import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.offline import gptq, lowrank
from bitsmoe_vllm.offline.coordinates import Columns, RankRows, sub_block
from bitsmoe_vllm.offline.lowrank import Tokens

pytestmark = pytest.mark.skipif(not ops.CPU_KERNEL, reason="the CPU kernel library is not built")

WIDTHS = torch.tensor([0, 1, 2, 3, 4, 6, 8])


def looped(quantize):
    """quantize as a plain function: sub_block then takes its reference loop."""
    return lambda i, f: quantize(i, f)


def sub_block_args(E: int, m: int, n: int, seed: int, dense: bool) -> list:
    """x, src, coef, divisor as offline.gptq.feedback (dense: the errors divided by U_ii, taken from x as updated) or
    offline.lowrank.feedback (taken from the original values) passes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, m, n, generator=g) * torch.rand(E, m, 1, generator=g)
    coef = torch.randn(E, m, m, generator=g) * 0.3
    if dense:
        return [x, None, coef, 0.5 + torch.rand(E, m, generator=g)]
    return [x, x + 0.01 * torch.randn(E, m, n, generator=g), coef, None]


def run(quantize, first: int, x, src, coef, divisor) -> tuple[torch.Tensor, ...]:
    x = x.clone()
    q, err = torch.empty_like(x), torch.empty_like(x)
    sub_block(quantize, first, x, src, coef, divisor, q, err)
    return x, q, err


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("odd", [True, False])
def test_rank_rows_are_the_references_bits(dense, odd):
    E, n, m, G, first = 5, 192, 16, 64, 3
    g = torch.Generator().manual_seed(1)
    bits = WIDTHS[torch.randint(0, len(WIDTHS), (E, first + m), generator=g)]
    args = sub_block_args(E, m, n, seed=2, dense=dense)
    got_scales, want_scales = torch.zeros(E, first + m, n // G), torch.zeros(E, first + m, n // G)
    got = run(RankRows(bits, got_scales, G, 8, odd), first, *args)
    want = run(looped(RankRows(bits, want_scales, G, 8, odd)), first, *args)
    for a, b in zip((*got, got_scales), (*want, want_scales), strict=True):
        assert torch.equal(a, b)
    assert got[1][bits[:, first:] == 0].eq(0).all() and got_scales[:, :first].eq(0).all()  # only its own coordinates
    assert not torch.equal(got[0], args[0])  # the errors were spread


@pytest.mark.parametrize("dense", [True, False])
def test_columns_are_the_references_bits(dense):
    E, n, m, first = 4, 96, 16, 5
    g = torch.Generator().manual_seed(3)
    bits = WIDTHS[torch.randint(0, len(WIDTHS), (E, n), generator=g)]
    step = torch.rand(E, first + m, n, generator=g) * 0.2 * (bits > 0)[:, None]  # a dropped row has no scale
    args = sub_block_args(E, m, n, seed=4, dense=dense)
    got = run(Columns(bits, step, True), first, *args)
    want = run(looped(Columns(bits, step, True)), first, *args)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert got[1].transpose(1, 2)[bits == 0].eq(0).all()


@pytest.mark.parametrize("few", [True, False])
@pytest.mark.parametrize("projection", ["gate", "down"])
def test_round_factors_gives_the_references_bits(monkeypatch, few, projection):
    """Whole projections through offline.gptq.round_factors, more coordinates than a block (lowrank.BLOCK), on the
    dense Hessians and on few experts' tokens (lowrank.Tokens), with the kernels and with the reference loop."""
    E, R, I, G = 3, 160, 128, 32
    g = torch.Generator().manual_seed(5)
    n = R if projection != "down" else I
    z = torch.randn(E, 40 if few else 4 * n, n, generator=g)
    tokens = [40, 25, 0]  # expert 2 got none: rounded to nearest
    for e, t in enumerate(tokens):
        z[e, t:] = 0
    hessian = Tokens(z, tokens) if few else z.transpose(1, 2) @ z
    factors = torch.randn(E, R, I, generator=g) * 0.05
    bits = WIDTHS[torch.randint(0, len(WIDTHS), (E, R), generator=g)]
    got = gptq.round_factors(projection, factors, bits, hessian, G, 8)
    reference = sub_block
    for module in (gptq, lowrank):
        monkeypatch.setattr(module, "sub_block", lambda quantize, *args: reference(looped(quantize), *args))
    want = gptq.round_factors(projection, factors, bits, hessian, G, 8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_refusals_name_the_shapes():
    x = torch.zeros(2, 4, 64)
    coef, bits, scales = torch.zeros(2, 4, 4), torch.full((2, 4), 2), torch.zeros(2, 4, 2)
    with pytest.raises(RuntimeError, match=r"coef must be contiguous float32 \[2, 4, 4\], got Float \[2, 3, 3\]"):
        torch.ops.bitsmoe.feedback_rank_rows(x, None, coef[:, :3, :3], None, x, x, bits, scales, 32, 8, True)
    with pytest.raises(RuntimeError, match="width 5 is not 0 or a supported width"):
        torch.ops.bitsmoe.feedback_rank_rows(x, None, coef, None, x, x, bits + 3, scales, 32, 8, True)
    with pytest.raises(RuntimeError, match=r"step must be float32 \[2, 4, 64\]"):
        torch.ops.bitsmoe.feedback_columns(x, None, coef, None, x, x, torch.full((2, 64), 2), scales, True)
