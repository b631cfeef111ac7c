"""The CPU kernel (csrc/cpu, torch.ops.bitsmoe.moe on the CPU dispatch key) against the reference, for every
instruction set this CPU has. The kernel is built at install (scripts/setup.sh); a missing build fails here."""

import dataclasses

import pytest
import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.format import READABLE_VERSIONS
from bitsmoe_vllm.reference import moe_forward, op_extras
from tests.helpers import LAYERS, TOKENS, WIDTHS, layer_of, relative_error, routing

ISAS = ["avx2", "avx512"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    assert ops.CPU_KERNEL, (
        "bitsmoe_vllm/_cpu*.so is not built: run `pip install --no-build-isolation -e .` (scripts/setup.sh does)"
    )
    if request.param == "avx512" and "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("BITSMOE_CPU_ISA", request.param)
    assert torch.ops.bitsmoe.cpu_isa() == request.param
    return request.param


# float32 activations: only the summation order differs; 16-bit ones: both round the same float32 result once
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-E{s[2]}")
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_mixed_widths(isa, shape, T, dtype):
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, seed=T)
    w, ids = routing(T, E, K, seed=T, used_experts=E - 1)  # the last expert gets no tokens
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(dtype)
    y = ops.moe_layer(x, w, ids, layer)
    assert y.dtype == dtype and y.shape == (T, H)
    assert relative_error(y, moe_forward(x.float(), w, ids, layer)) < TOLERANCE[dtype]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("basis_dtype", ["float16", "bfloat16", "int8", "identity"])
@pytest.mark.parametrize("version", READABLE_VERSIONS)
def test_kernel_every_width_and_basis(isa, width, basis_dtype, version):
    shape = LAYERS[1]
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, widths=(width,), basis_dtype=basis_dtype, seed=width, format_version=version)
    w, ids = routing(17, E, K, seed=width)
    ids[3, 1] = -1  # a choice held by another expert-parallel rank
    x = torch.randn(17, H, generator=torch.Generator().manual_seed(width))
    assert relative_error(ops.moe_layer(x, w, ids, layer), moe_forward(x, w, ids, layer)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-E{s[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_runs_gpt_oss_biases_and_activation(isa, shape, dtype):
    """Expert biases and swigluoai (a limit of 1.5, clamping many entries), as the reference computes them."""
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, seed=7, gpt_oss=True)
    w, ids = routing(33, E, K, seed=7, used_experts=E - 1)
    ids[3, 1] = -1  # a choice held by another expert-parallel rank: neither its output nor its bias
    x = torch.randn(33, H, generator=torch.Generator().manual_seed(7)).to(dtype)
    y, ref = ops.moe_layer(x, w, ids, layer), moe_forward(x.float(), w, ids, layer)
    assert relative_error(y, ref) < TOLERANCE[dtype]
    assert relative_error(moe_forward(x.float(), w, ids, dataclasses.replace(layer, biases=None)), ref) > 0.1


def test_float16_activations_and_int32_ids(isa):
    H, I, E, K, _, _ = LAYERS[2]
    layer = layer_of(LAYERS[2], seed=3)
    w, ids = routing(9, E, K, seed=3)
    x = torch.randn(9, H).half()
    y = ops.moe_layer(x, w.half(), ids.int(), layer)
    assert (
        y.dtype == torch.float16 and relative_error(y, moe_forward(x.float(), w, ids, layer)) < TOLERANCE[torch.float16]
    )


def test_no_tokens_gives_zeros_and_reruns_are_identical(isa):
    H, I, E, K, _, _ = LAYERS[0]
    layer = layer_of(LAYERS[0])
    x = torch.randn(65, H)
    w, ids = routing(65, E, K, seed=1)
    first = ops.moe_layer(x, w, ids, layer)
    assert torch.equal(first, ops.moe_layer(x, w, ids, layer))  # work split over threads never changes a sum
    assert torch.equal(ops.moe_layer(x, w, torch.full_like(ids, -1), layer), torch.zeros_like(x))
    assert ops.moe_layer(x[:0], w[:0], ids[:0], layer).shape == (0, H)


def op_args(layer, x, w, ids):
    bases = (layer.gate_basis, layer.up_basis, layer.down_basis)
    return (
        x,
        w,
        ids,
        *(b.weight for b in bases),
        *(b.scale for b in bases),
        *(getattr(getattr(layer, p), n) for p in ("gate", "up", "down") for n in ("codes", "scales", "bits")),
        layer.group_size,
        layer.down.odd,
        *op_extras(layer),
    )


@pytest.mark.parametrize("gpt_oss", [False, True], ids=["silu", "gpt-oss"])
def test_opcheck(isa, gpt_oss):
    H, I, E, K, _, _ = LAYERS[1]
    layer = layer_of(LAYERS[1], basis_dtype="int8", gpt_oss=gpt_oss)
    w, ids = routing(5, E, K, seed=2)
    torch.library.opcheck(torch.ops.bitsmoe.moe.default, op_args(layer, torch.randn(5, H), w, ids))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a: a.__setitem__(9, a[9][:-1]),
            r"gate_bits ask for \d+ planes and \d+ scale rows, found gate_codes \[\d+, 3\]",
        ),
        (lambda a: a.__setitem__(13, a[13].float()), r"up_scales: expected Half \[\*, 3\], found Float \[\d+, 3\]"),
        (lambda a: a.__setitem__(3, a[3][:, :-1]), r"gate_basis: expected \[\*, 48\], found \[17, 47\]"),
        (lambda a: a.__setitem__(2, a[2] + 5), r"topk_ids holds expert [5-9] but the layer has 5 experts"),
        (lambda a: a.__setitem__(18, 48), r"group_size 48 must be a positive multiple of 32 that divides I = 96"),
    ],
    ids=["codes", "scales-dtype", "basis-shape", "expert-id", "group-size"],
)
def test_bad_arguments_are_refused_with_their_shapes(change, message):
    H, I, E, K, _, _ = LAYERS[1]
    w, ids = routing(3, E, K, seed=0)
    args = list(op_args(layer_of(LAYERS[1]), torch.randn(3, H), w, ids))
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bitsmoe.moe(*args)
