"""The quantizer's CPU rounding kernels (csrc/cpu/rounding.cpp) against their references in tensor code:
torch.ops.bitsmoe.round_rows against offline.rounding.rounded_rows, torch.ops.bitsmoe.rounding_losses (the cost
model's) against offline.cost.row_losses with the reference's rounding."""

import pytest
import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.offline import cost
from bitsmoe_vllm.offline.rounding import rounded_rows

pytestmark = pytest.mark.skipif(not ops.CPU_KERNEL, reason="the CPU kernel library is not built")

WIDTHS = [0, 1, 2, 3, 4, 6, 8]


def row_losses(*args) -> torch.Tensor:
    """offline.cost.row_losses with every row rounded by the reference, not the kernel"""
    kernel, ops.CPU_KERNEL = ops.CPU_KERNEL, False
    try:
        return cost.row_losses(*args)
    finally:
        ops.CPU_KERNEL = kernel


def factors(E: int, R: int, I: int, G: int, seed: int) -> torch.Tensor:
    """Rows of varied scale, with the groups that need care: all zeros, values whose scale underflows float16,
    a group with one outlier."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(E, R, I, generator=g) * torch.rand(E, R, 1, generator=g) * 4
    f[0, 0] = 0
    f[0, 1, :G] = 1e-9
    f[0, 2, :G] = 1e-3 * torch.randn(G, generator=g)
    f[0, 2, 0] = 10
    return f


@pytest.mark.parametrize("odd", [True, False])
@pytest.mark.parametrize("G", [32, 96, 128])
def test_unweighted_losses_are_the_references_to_float32_rounding(odd, G):
    """With unit weights the loss is the error quantize_rows minimises, the same to float rounding even where the
    kernel's sums break a tie between two scales the other way."""
    f = factors(3, 8, 2 * G, G, seed=G)
    w = torch.ones(1, 3, 1, 2 * G)
    got = torch.ops.bitsmoe.rounding_losses(f, w, WIDTHS, G, 8, odd)
    want = row_losses(f, w, WIDTHS, G, 8, odd)
    assert got.shape == want.shape == (1, 3, 8, len(WIDTHS)) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)
    assert got[0, 0, 0].eq(0).all()  # a zero row costs nothing at any width


def test_weighted_losses_of_several_importances_at_once():
    """[V, E, R or 1, I] importances, as the cost model passes both of its own (the down projection's rank-free
    [E, 1, I]): per row the reference's loss, or, where the kernel kept another scale of the same error, close to it;
    summed over the rows the same to 1e-4."""
    G = 64
    f = factors(4, 16, 256, G, seed=1)
    for w in (torch.rand(2, 4, 16, 256), torch.rand(2, 4, 1, 256)):
        got = torch.ops.bitsmoe.rounding_losses(f, w, WIDTHS, G, 8, True)
        want = row_losses(f, w, WIDTHS, G, 8, True)
        close = torch.isclose(got, want, rtol=1e-5, atol=1e-12)
        assert close.float().mean() > 0.99
        torch.testing.assert_close(got.sum(2), want.sum(2), rtol=1e-4, atol=1e-12)


def test_fewer_refinement_steps_are_honoured():
    f, w = factors(2, 4, 128, 32, seed=2), torch.ones(1, 2, 1, 128)
    for steps in (0, 2):
        got = torch.ops.bitsmoe.rounding_losses(f, w, [2, 3], 32, steps, True)
        torch.testing.assert_close(got, row_losses(f, w, [2, 3], 32, steps, True), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"factors": torch.zeros(2, 4, 64, dtype=torch.float64)}, "factors must be float32"),
        ({"weights": torch.ones(1, 2, 3, 64)}, "weights must be float32"),
        ({"weights": torch.ones(5, 2, 1, 64)}, "1 to 4 weightings"),
        ({"widths": [5]}, "width 5 is not"),
        ({"group_size": 48}, "group size 48 must divide the row length 64"),
    ],
)
def test_bad_arguments_are_refused_with_what_is_wrong(change, message):
    args = {"factors": torch.zeros(2, 4, 64), "weights": torch.ones(1, 2, 1, 64), "widths": [2], "group_size": 32}
    args |= change
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bitsmoe.rounding_losses(args["factors"], args["weights"], args["widths"], args["group_size"], 8, True)


@pytest.mark.parametrize("odd", [True, False])
@pytest.mark.parametrize("G", [32, 96, 128])
def test_rows_round_to_the_references_codes_and_scales(odd, G):
    """Each row at its own width: the reference's codes and scales, or where the kernel's sums broke a tie of two
    scales the other way (rare), a rounding of about the same squared error: one float32 rounding can send the
    scale's refinement along another path (on an AMD EPYC build, one group of 128 ended 0.07 % above the reference's
    error)."""
    f = factors(1, 64, 2 * G, G, seed=3).reshape(64, 2 * G)
    bits = torch.tensor(WIDTHS[1:]).repeat(11)[:64]
    codes, scales = torch.ops.bitsmoe.round_rows(f, bits, G, 8, odd)
    want_codes, want_scales = rounded_rows(f, bits, G, 8, odd)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (64, 2)
    same = (codes == want_codes).reshape(64, 2, G).all(-1) & (scales == want_scales)
    assert same.float().mean() > 0.97

    def error(c, s):
        return (c.float() * s.float().repeat_interleave(G, 1) - f).pow(2).reshape(64, 2, G).sum(-1)

    got, want = error(codes, scales), error(want_codes, want_scales)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-12)
    torch.testing.assert_close(got.sum(), want.sum(), rtol=1e-4, atol=1e-12)


def test_round_rows_refuses_a_width_it_cannot_store():
    with pytest.raises(RuntimeError, match="row 1 has width 5"):
        torch.ops.bitsmoe.round_rows(torch.zeros(2, 32), torch.tensor([2, 5]), 32, 8, True)
