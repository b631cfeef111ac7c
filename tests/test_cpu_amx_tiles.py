"""The CPU integer path's AMX tiles (csrc/cpu/moe_cpu_amx.cpp, moe_cpu_amx_bf16.cpp) against its VNNI kernels and the
reference: the int8 tiles give the VNNI kernels' sums, the bfloat16 tiles their own rounding of bfloat16 inputs.
Skipped on CPUs without AMX-TILE and AMX-INT8 (the bfloat16 tiles: AMX-BF16 and AVX512-BF16)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.cpu_layout import to_cpu_layer
from bitsmoe_vllm.format import READABLE_VERSIONS
from bitsmoe_vllm.reference import moe_forward
from tests.helpers import (
    HAS_AMX,
    HAS_AMX_BF16,
    INT_PATH_TOLERANCE,
    LAYERS,
    WIDTHS,
    force_isa,
    layer_of,
    relative_error,
    routing,
)

ROOT = Path(__file__).resolve().parents[1]

# + int8 bases of 70 rows (4 tiles of 16 rows on AMX, 6 rows on VNNI) and 128 columns (two 64-column tiles)
AMX_LAYERS = LAYERS + ((128, 64, 4, 2, (70, 64, 128), 32), (128, 128, 4, 2, (96, 64, 128), 128))


def outputs_on_each_isa(monkeypatch, layer, x, w, ids):
    """The layer on x on the AMX tiles and on the VNNI kernels, and the float reference"""
    cpu, ref = to_cpu_layer(layer), moe_forward(x.float(), w, ids, layer)
    out = {}
    for isa in ("avx512-vnni", "avx512-amx"):
        force_isa(monkeypatch, isa)
        out[isa] = ops.moe_layer(x, w, ids, layer, cpu)
    return out["avx512-amx"], out["avx512-vnni"], ref


@pytest.mark.parametrize("shape", AMX_LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-R{s[4][0]}-G{s[5]}")
@pytest.mark.parametrize("basis_dtype", ["float16", "int8", "identity"])
@pytest.mark.parametrize("per_expert", [40, 4])
def test_amx_tiles_give_the_vnni_kernels_sums(monkeypatch, shape, basis_dtype, per_expert):
    """Every expert with 16 tokens or more (whole and partial 16-token tiles), or with a few (down on tiles from 3
    tokens, gate/up from 6): the experts' integer sums and the float steps around them are the VNNI kernels', so the
    same output bit for bit; the int8 bases' sums too, but not their float steps (the 16-bit rounding of activations
    after them turns the difference into 2e-5)."""
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, basis_dtype=basis_dtype, seed=5)
    T = per_expert * E // K + 3
    w, ids = routing(T, E, K, seed=5)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert counts.min() >= 16 if per_expert == 40 else ((counts >= 3) & (counts < 6)).any()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    amx, vnni, ref = outputs_on_each_isa(monkeypatch, layer, x, w, ids)
    assert relative_error(vnni, ref) < INT_PATH_TOLERANCE[torch.float32]
    assert relative_error(amx, ref) < INT_PATH_TOLERANCE[torch.float32]
    if basis_dtype == "int8":
        assert relative_error(amx, vnni) < 1e-4
    else:
        assert torch.equal(amx, vnni)


# T 100: x's hi and lo bytes within 1 MiB, the int8 bases' tiles made two 16-row blocks at a time (6 blocks of gate's
# 96 rows: on two threads a strip of two and one of one); T 4200 over it: all of a thread's rows at once
@pytest.mark.parametrize("T", [100, 4200])
def test_amx_int8_bases_in_strips_give_the_vnni_kernels_sums(monkeypatch, T):
    shape = (128, 64, 4, 2, (96, 64, 128), 32)
    layer = layer_of(shape, basis_dtype="int8", seed=13)
    w, ids = routing(T, 4, 2, seed=13)
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(13))
    amx, vnni, ref = outputs_on_each_isa(monkeypatch, layer, x, w, ids)
    assert relative_error(vnni, ref) < INT_PATH_TOLERANCE[torch.float32]
    assert relative_error(amx, ref) < INT_PATH_TOLERANCE[torch.float32]
    assert relative_error(amx, vnni) < 1e-4


def bf16_tiles_against_vnni(monkeypatch, layer, shape, seed):
    """(AMX, VNNI) relative errors against the float reference, and whether their outputs differ, for a bfloat16 input
    of T tokens that gives every expert 16 or more."""
    H, I, E, K, _, _ = shape
    T = 40 * E // K + 3
    w, ids = routing(T, E, K, seed=seed)
    assert torch.bincount(ids.flatten(), minlength=E).min() >= 16
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).bfloat16()
    return tiles_against_vnni(monkeypatch, layer, x, w, ids)


def tiles_against_vnni(monkeypatch, layer, x, w, ids):
    """(AMX, VNNI) relative errors of the layer on x against the float reference, and whether their outputs differ"""
    amx, vnni, ref = outputs_on_each_isa(monkeypatch, layer, x, w, ids)
    return relative_error(amx, ref), relative_error(vnni, ref), not torch.equal(amx, vnni)


# A bfloat16 layer's experts with 6 tokens or more take gate/up on bfloat16 tiles (kAmxBf16, moe_cpu_amx_bf16.cpp),
# those with 24 or more down too (here most experts have ~40, some fewer): z times the scales and a rounded to
# bfloat16, the codes' values exact. On these layers the error is 1.7-2.1x the VNNI kernels', which is the bfloat16
# output's rounding alone (2.9e-3 to 3.5e-3 against 1.6e-3).
BF16_TILES_ERROR = 2.5


@pytest.mark.skipif(not HAS_AMX_BF16, reason="this CPU lacks AMX-BF16 or AVX512-BF16")
@pytest.mark.parametrize("width", WIDTHS)  # looked up in one register (1-4), two (6), or through float (8)
@pytest.mark.parametrize("version", READABLE_VERSIONS)
def test_amx_bf16_tiles_every_width(monkeypatch, width, version):
    layer = layer_of(LAYERS[0], widths=(width,), seed=width, format_version=version)
    amx, vnni, differ = bf16_tiles_against_vnni(monkeypatch, layer, LAYERS[0], seed=width)
    assert differ, "the bfloat16 tiles ran"
    assert amx < BF16_TILES_ERROR * vnni and amx < INT_PATH_TOLERANCE[torch.bfloat16]


@pytest.mark.skipif(not HAS_AMX_BF16, reason="this CPU lacks AMX-BF16 or AVX512-BF16")
@pytest.mark.parametrize("shape", AMX_LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-R{s[4][0]}-G{s[5]}")
@pytest.mark.parametrize("basis_dtype", ["int8", "identity"])
def test_amx_bf16_tiles_mixed_widths(monkeypatch, shape, basis_dtype):
    """Blocks of every width in one part (their rows padded to 32), and tile_chunks 2 (G 32), 4 (G 64) and 8 (G 128)"""
    layer = layer_of(shape, basis_dtype=basis_dtype, seed=7)
    amx, vnni, differ = bf16_tiles_against_vnni(monkeypatch, layer, shape, seed=7)
    assert differ, "the bfloat16 tiles ran"
    assert amx < BF16_TILES_ERROR * vnni and amx < INT_PATH_TOLERANCE[torch.bfloat16]


@pytest.mark.skipif(not HAS_AMX_BF16, reason="this CPU lacks AMX-BF16 or AVX512-BF16")
@pytest.mark.parametrize("shape", AMX_LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-R{s[4][0]}-G{s[5]}")
@pytest.mark.parametrize("per_expert", [6, 11, 16, 17])
def test_amx_bf16_tiles_one_tile_of_tokens(monkeypatch, shape, per_expert):
    """Experts of at most 16 tokens (one tile of them) take gate/up block by block (one_token_tile), in passes of 4
    chunks of a tile of 8 (G 128), each block's rows padded to 32 with zeros; 17 tokens: two tiles (tile_products)"""
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, basis_dtype="int8", seed=per_expert)
    T = per_expert * E // K
    ids = (torch.arange(T * K) % E).reshape(T, K)  # every expert per_expert tokens
    w = torch.softmax(torch.randn(T, K, generator=torch.Generator().manual_seed(per_expert)), dim=-1)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(per_expert)).bfloat16()
    amx, vnni, differ = tiles_against_vnni(monkeypatch, layer, x, w, ids)
    assert differ, "the bfloat16 tiles ran"
    assert amx < BF16_TILES_ERROR * vnni and amx < INT_PATH_TOLERANCE[torch.bfloat16]


@pytest.mark.skipif(not HAS_AMX_BF16, reason="this CPU lacks AMX-BF16 or AVX512-BF16")
def test_amx_bf16_tiles_take_a_crowded_expert_in_blocks(monkeypatch):
    """Two experts routed every token (as a router that has not learned to balance does with most of a prompt): their
    6,000 tokens in blocks of gate/up (z of 6,000 x 64 rows: over 1 MiB) and of down (activations of 6,000 x 96
    bfloat16: over 1 MiB)"""
    shape = (64, 64, 4, 2, (64, 64, 64), 32)
    layer = layer_of(shape, basis_dtype="identity", seed=11)
    w, ids = routing(6000, 2, 2, seed=11)
    x = torch.randn(6000, 64, generator=torch.Generator().manual_seed(11)).bfloat16()
    amx, vnni, differ = tiles_against_vnni(monkeypatch, layer, x, w, ids)
    assert differ, "the bfloat16 tiles ran"
    assert amx < BF16_TILES_ERROR * vnni and amx < INT_PATH_TOLERANCE[torch.bfloat16]


@pytest.mark.skipif(not HAS_AMX, reason="this CPU lacks AMX-TILE or AMX-INT8")
def test_amx_forced_in_a_new_process_asks_the_os_for_the_tile_state():
    """Linux kills a process at its first tile instruction unless it asked for the tile state: also when
    BITSMOE_CPU_ISA forces the tiles and nothing called cpu_isa() first"""
    script = (
        "import torch; from bitsmoe_vllm import ops; from bitsmoe_vllm.cpu_layout import to_cpu_layer; "
        "from tests.helpers import LAYERS, layer_of, routing; "
        "layer = layer_of(LAYERS[0], basis_dtype='int8'); w, ids = routing(64, 8, 2, seed=0); "
        "print(float(ops.moe_layer(torch.randn(64, 64), w, ids, layer, to_cpu_layer(layer)).norm()))"
    )
    env = {**os.environ, "BITSMOE_CPU_ISA": "avx512-amx"}
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) > 0
