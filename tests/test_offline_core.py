"""Decomposition and rounding against the math they implement."""

import itertools

import pytest
import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.offline.decompose import shared_basis
from bitsmoe_vllm.offline.encode import encode_factor
from bitsmoe_vllm.offline.rounding import codes_for, quantize_basis, quantize_mixed_rows, quantize_rows
from bitsmoe_vllm.packing import code_range, nearest_codes, pack, unpack
from tests.helpers import ALLOCATION_WIDTHS, WIDTHS


@pytest.fixture(params=["kernel", "reference"])
def rounding(request, monkeypatch):
    """The rounding tests run on the CPU kernel (csrc/cpu/rounding.cpp) and on its reference in tensor code."""
    if request.param == "kernel" and not ops.CPU_KERNEL:
        pytest.skip("the CPU kernel library is not built")
    if request.param == "reference":
        monkeypatch.setattr(ops, "CPU_KERNEL", False)


def expert_stack(E=5, I=24, H=16, seed=0):
    return torch.randn(E, I, H, generator=torch.Generator().manual_seed(seed))  # [E, I, H]


def test_full_rank_decomposition_is_exact():
    W = expert_stack()
    dec = shared_basis(W, rank=16)
    torch.testing.assert_close(dec.basis @ dec.basis.T, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(dec.factors.transpose(1, 2) @ dec.basis, W, atol=1e-4, rtol=1e-4)  # W_e = F_e^T V
    assert (dec.energy[:-1] >= dec.energy[1:]).all()


@pytest.mark.parametrize("rank", [1, 5, 11])
def test_truncation_error_is_the_dropped_energy(rank):
    """Eckart-Young on the stacked [E*I, H] matrix: the residual energy is the sum of the dropped eigenvalues."""
    W = expert_stack(seed=rank)
    full, dec = shared_basis(W, rank=16), shared_basis(W, rank=rank)
    residual = W - dec.factors.transpose(1, 2) @ dec.basis
    assert float((residual**2).sum()) == pytest.approx(float(full.energy[rank:].sum()), rel=1e-4)


def test_basis_signs_are_fixed():
    dec = shared_basis(expert_stack(), rank=16)
    peak = dec.basis.abs().argmax(1)
    assert (dec.basis[torch.arange(16), peak] > 0).all()


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.16 \(hidden size\), got 17"):
        shared_basis(expert_stack(), rank=17)


def plain_rtn_error(x, bits, G):
    hi = code_range(bits)[1]
    g = x.reshape(x.shape[0], -1, G)
    scale = g.abs().amax(-1, keepdim=True).half().float() / hi
    return float((nearest_codes(g / scale, bits) * scale - g).pow(2).sum())


@pytest.mark.parametrize("bits", [b for b in WIDTHS if b > 1])
def test_least_squares_rounding_beats_absmax_rounding(bits, rounding):
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    codes, scales = quantize_rows(x, bits, 32)
    lo, hi = code_range(bits)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (16, 4)
    assert codes.min() >= lo and codes.max() <= hi
    err = float((codes.float() * scales.float().repeat_interleave(32, 1) - x).pow(2).sum())
    assert err <= plain_rtn_error(x, bits, 32)


def test_rounding_error_falls_with_bits(rounding):
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in WIDTHS:
        codes, scales = quantize_rows(x, bits, 64)
        errors.append(float((codes.float() * scales.float().repeat_interleave(64, 1) - x).pow(2).sum()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def test_one_bit_is_sign_times_mean_magnitude(rounding):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    codes, scales = quantize_rows(x, 1, 32)
    assert torch.equal(codes, torch.where(x >= 0, 1, -1).to(torch.int8))
    torch.testing.assert_close(scales, x.abs().reshape(3, 2, 32).mean(-1).half())


def test_rows_of_mixed_widths_round_as_each_width_alone(rounding):
    """Width 0 (a dropped row, which offline.gptq rounds with the others): codes and scales 0."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 128, generator=g) * torch.rand(40, 1, generator=g) * 3
    x[5] = 0
    bits = torch.tensor(ALLOCATION_WIDTHS)[torch.randint(0, len(ALLOCATION_WIDTHS), (40,), generator=g)]
    codes, scales = quantize_mixed_rows(x, bits, 32)
    assert (bits == 0).sum() >= 3 and not codes[bits == 0].any() and not scales[bits == 0].any()
    for b in bits[bits > 0].unique().tolist():
        want_codes, want_scales = quantize_rows(x[bits == b], b, 32)
        assert torch.equal(codes[bits == b], want_codes) and torch.equal(scales[bits == b], want_scales)


def test_int8_basis_round_trip():
    basis = torch.linalg.qr(torch.randn(40, 24)).Q.T  # [24, 40]
    codes, scale = quantize_basis(basis, "int8")
    assert codes.dtype == torch.int8 and scale.shape == (24,)
    torch.testing.assert_close(
        codes.float() * scale.float()[:, None], basis, atol=float(scale.max()) / 2 + 1e-6, rtol=0
    )
    weight, no_scale = quantize_basis(basis, "bfloat16")
    assert no_scale is None and torch.equal(weight, basis.bfloat16())
    with pytest.raises(ValueError, match="unknown basis dtype 'fp8'"):
        quantize_basis(basis, "fp8")


def test_encode_refuses_rows_not_a_multiple_of_32():
    with pytest.raises(ValueError, match="row length 40 is not a multiple of 32"):
        encode_factor(torch.randn(2, 40), torch.tensor([2, 2]), 40)


@pytest.mark.parametrize("bits", WIDTHS)
def test_a_group_of_zeros_gets_scale_0_and_codes_that_pack(bits, rounding):
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(bits))
    x[:, :32] = 0
    codes, scales = quantize_rows(x, bits, 32)
    assert (scales[:, 0] == 0).all()
    assert torch.equal(codes_for(x, bits, scales, 32), codes)
    assert torch.equal(unpack(pack(codes, bits), bits, 64), codes)  # the zero group's codes are valid codes
