"""The CPU integer path (torch.ops.bitsmoe.moe_int on the CPU layout of bitsmoe_vllm/cpu_layout.py, AVX-512 VNNI, and
AMX tiles for the experts with many tokens) against the reference, and the CPU layout against FORMAT.md read
literally; the AMX tiles against the VNNI kernels are test_cpu_amx_tiles.py's. Skipped on CPUs without AVX-512 VNNI,
BW, VBMI and GFNI; the AMX runs on CPUs without AMX-TILE and AMX-INT8."""

import pytest
import torch

from bitsmoe_vllm import cpu_layout, ops
from bitsmoe_vllm.cpu_layout import (
    DOWN_GROUP_ROWS,
    GROUPS_PER_BLOCK,
    tile_chunks,
    to_cpu_basis,
    to_cpu_down,
    to_cpu_factors,
    to_cpu_layer,
)
from bitsmoe_vllm.format import READABLE_VERSIONS
from bitsmoe_vllm.kernel_layout import CLASS_WIDTHS
from bitsmoe_vllm.reference import expert_factor, moe_forward
from tests.helpers import (
    INT_PATH_TOLERANCE,
    LAYERS,
    TOKENS,
    WIDTHS,
    dense_from_cpu_basis,
    force_isa,
    layer_of,
    relative_error,
    routing,
)


# avx512-amx: the experts with 6 tokens or more (down: 3), and the int8 bases of calls with 32 tokens or more, take the
# AMX tiles (kAmx, csrc/cpu/moe_cpu_amx.cpp), the rest the VNNI kernels; the tests' T = 17 and 65 give some experts
# more, some fewer
@pytest.fixture(params=["avx512-vnni", "avx512-amx"])
def int_path(request, monkeypatch):
    force_isa(monkeypatch, request.param)


def add_rows(F: torch.Tensor, cpu, e: int, row0: int, u: torch.Tensor, b: int, G: int) -> None:
    """F[e, rank] += the stored rows from row0 of the layout whose offset codes are u [rows, I] (padding skipped)."""
    code = 2 * u - (2**b - 1) if b <= 6 else u - 2 ** (b - 1)  # version 2: odd codes up to 6 bits
    for r in range(len(u)):
        if cpu.rows[row0 + r] >= 0:
            F[e, cpu.rows[row0 + r]] += code[r] * cpu.scales[:, row0 + r].float().repeat_interleave(G)
        else:
            assert not cpu.scales[:, row0 + r].any() and not u[r].any(), "padding rows have scale 0 and no codes"


def dense_from_cpu_layout(cpu, E: int, R: int, I: int, G: int) -> torch.Tensor:
    """[E, R, I] gate or up factors read back from CpuFactors bit by bit, as moe_cpu.h describes the layout."""
    F, masks, tile = torch.zeros(E, R, I), cpu.masks.flatten(), tile_chunks(G)
    bit = torch.arange(64)
    for e in range(E):
        for c, b in enumerate(CLASS_WIDTHS):
            first, n, mask_row = cpu.segs[e, c].tolist()
            for q in range(n):
                block, place = divmod(q, GROUPS_PER_BLOCK)
                in_block = min(GROUPS_PER_BLOCK, n - block * GROUPS_PER_BLOCK)
                base = (mask_row + block * GROUPS_PER_BLOCK * b) * (I // 16)
                u = torch.zeros(4, I, dtype=torch.int64)  # the group's 4 rows' offset codes
                for chunk in range(I // 16):
                    t, in_tile = divmod(chunk, tile)
                    for p in range(b):
                        word = masks[base + ((t * in_block + place) * tile + in_tile) * b + p]
                        u[:, 16 * chunk : 16 * chunk + 16] += (((word >> bit) & 1).reshape(16, 4).T) << p
                add_rows(F, cpu, e, 4 * (first + q), u, b, G)
    return F


def dense_from_cpu_down(cpu, E: int, R: int, I: int, G: int) -> torch.Tensor:
    """[E, R, I] down factors read back from CpuFactors (16-row groups, masks of 4 columns) as moe_cpu.h describes."""
    F, masks = torch.zeros(E, R, I), cpu.masks.flatten()
    bit = torch.arange(64)
    for e in range(E):
        for c, b in enumerate(CLASS_WIDTHS):
            first, n, mask_row = cpu.segs[e, c].tolist()
            for q in range(n):
                words = masks[(mask_row + q * b) * (I // 4) :][: I // 4 * b].reshape(I // 4, b)  # [chunk, plane]
                planes = ((words[..., None] >> bit) & 1).reshape(
                    I // 4, b, DOWN_GROUP_ROWS, 4
                )  # bit 4i + c: row i, column c
                u = sum(planes[:, p] << p for p in range(b)).permute(1, 0, 2).reshape(DOWN_GROUP_ROWS, I)
                add_rows(F, cpu, e, DOWN_GROUP_ROWS * (first + q), u, b, G)
    return F


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-R{s[4]}")
@pytest.mark.parametrize("basis_dtype", ["float16", "int8"])
def test_cpu_basis_layout_holds_the_bases(shape, basis_dtype):
    layer = layer_of(shape, basis_dtype=basis_dtype)
    for basis in (layer.gate_basis, layer.up_basis, layer.down_basis):  # rows not a multiple of 4, columns not of 64
        cpu = to_cpu_basis(basis)
        read = dense_from_cpu_basis if basis_dtype == "int8" else lambda w: w  # float bases stay row-major
        assert cpu.weight.shape == basis.weight.shape and torch.equal(read(cpu.weight), basis.weight)
        assert cpu.scale is basis.scale


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-G{s[5]}")
def test_cpu_layout_holds_the_canonical_factors(shape):
    H, I, E, K, ranks, G = shape
    layer = layer_of(shape)
    for f, R, to_cpu, read_back, group_rows in (
        (layer.gate, ranks[0], lambda f: to_cpu_factors(f, G), dense_from_cpu_layout, 4),
        (layer.up, ranks[1], lambda f: to_cpu_factors(f, G), dense_from_cpu_layout, 4),
        (layer.down, ranks[2], to_cpu_down, dense_from_cpu_down, DOWN_GROUP_ROWS),
    ):
        cpu = to_cpu(f)
        expected = torch.stack([expert_factor(f, e, G) for e in range(E)])
        assert torch.equal(read_back(cpu, E, R, I, G), expected)
        assert cpu.rows.shape[0] % group_rows == 0 and cpu.scales.shape == (I // G, cpu.rows.shape[0])
        assert not cpu.masks.flatten()[-8:].any(), (
            "the masks end with 64 bytes of zeros (the kernel reads 64 bytes a chunk)"
        )


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-E{s[2]}")
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_path_matches_reference_mixed_widths(int_path, shape, T, dtype):
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, seed=T)
    w, ids = routing(T, E, K, seed=T, used_experts=E - 1)  # the last expert gets no tokens
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(dtype)
    y = ops.moe_layer(x, w, ids, layer, to_cpu_layer(layer))
    assert y.dtype == dtype and y.shape == (T, H)
    assert relative_error(y, moe_forward(x.float(), w, ids, layer)) < INT_PATH_TOLERANCE[dtype]


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-E{s[2]}")
@pytest.mark.parametrize("T", [5, 300])  # 300: experts with 16 tokens or more, on AMX tiles where present
def test_int_path_runs_gpt_oss_biases_and_activation(int_path, shape, T):
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, basis_dtype="int8", seed=T, gpt_oss=True)
    w, ids = routing(T, E, K, seed=T)
    ids[1, 0] = -1  # a choice held by another expert-parallel rank: neither its output nor its bias
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    y = ops.moe_layer(x, w, ids, layer, to_cpu_layer(layer))
    assert relative_error(y, moe_forward(x, w, ids, layer)) < INT_PATH_TOLERANCE[torch.float32]


@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"H{s[0]}-I{s[1]}-E{s[2]}")
@pytest.mark.parametrize("T", TOKENS)
def test_int_path_int8_bases_on_rounded_tokens(int_path, shape, T):
    """int8 bases multiply each token rounded to 16 bits with one scale: here one channel 20x the others sets it"""
    H, I, E, K, _, _ = shape
    layer = layer_of(shape, basis_dtype="int8", seed=T)
    w, ids = routing(T, E, K, seed=T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    x[:, 1] *= 20
    assert (
        relative_error(ops.moe_layer(x, w, ids, layer, to_cpu_layer(layer)), moe_forward(x, w, ids, layer))
        < INT_PATH_TOLERANCE[torch.float32]
    )


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("basis_dtype", ["float16", "bfloat16", "int8", "identity"])
@pytest.mark.parametrize("version", READABLE_VERSIONS)
def test_int_path_every_width_and_basis(int_path, width, basis_dtype, version):
    H, I, E, K, _, _ = LAYERS[1]
    layer = layer_of(LAYERS[1], widths=(width,), basis_dtype=basis_dtype, seed=width, format_version=version)
    w, ids = routing(17, E, K, seed=width)
    ids[3, 1] = -1  # a choice held by another expert-parallel rank
    x = torch.randn(17, H, generator=torch.Generator().manual_seed(width))
    y = ops.moe_layer(x, w, ids, layer, to_cpu_layer(layer))
    assert relative_error(y, moe_forward(x, w, ids, layer)) < INT_PATH_TOLERANCE[torch.float32]


@pytest.mark.parametrize("basis_dtype", ["float16", "int8"])
def test_int_path_bases_with_partial_blocks_and_chunks(int_path, basis_dtype):
    shape = (
        136,
        64,
        4,
        2,
        (30, 17, 134),
        32,
    )  # gate/up rows 30, 17 (blocks of 4: 2, 1 left), 136 / 134 columns (64 + 64 + 8 / 6)
    layer = layer_of(shape, basis_dtype=basis_dtype)
    w, ids = routing(5, 4, 2, seed=3)
    x = torch.randn(5, 136, generator=torch.Generator().manual_seed(3))
    assert (
        relative_error(ops.moe_layer(x, w, ids, layer, to_cpu_layer(layer)), moe_forward(x, w, ids, layer))
        < INT_PATH_TOLERANCE[torch.float32]
    )


def test_int_path_no_tokens_gives_zeros_and_reruns_are_identical(int_path):
    H, I, E, K, _, _ = LAYERS[0]
    layer = layer_of(LAYERS[0])
    cpu = to_cpu_layer(layer)
    x = torch.randn(65, H)
    w, ids = routing(65, E, K, seed=1)
    first = ops.moe_layer(x, w, ids, layer, cpu)
    assert torch.equal(first, ops.moe_layer(x, w, ids, layer, cpu))
    assert torch.equal(ops.moe_layer(x, w, torch.full_like(ids, -1), layer, cpu), torch.zeros_like(x))
    assert ops.moe_layer(x[:0], w[:0], ids[:0], layer, cpu).shape == (0, H)


# Rank 512 at ~750 tokens an expert: bfloat16 tiles split gate/up in 2 parts to keep z within part_bytes, and down
# in shares. 32 experts of rank 64: down in one share, which writes its slots' rows of u whole, not zeroed first.
POOLED = [
    ((512, 64, 4, 2, (512, 512, 512), 32), (1500, 700, 1500)),
    ((64, 64, 32, 2, (64, 64, 64), 32), (5000, 3000, 5000)),
]


@pytest.mark.parametrize("shape, sizes", POOLED, ids=["R512-E4", "R64-E32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_path_large_calls_reuse_pooled_scratch(int_path, shape, sizes, dtype):
    """Calls whose scratch (MiBs here) comes from the pool that keeps it between calls (csrc/cpu/scratch_pool.h): a
    smaller call on the blocks a larger one left, then the larger one again, bit for bit."""
    H, _, E, K, _, _ = shape
    layer = layer_of(shape, basis_dtype="identity", seed=3)
    cpu = to_cpu_layer(layer)
    outputs = []
    for T in sizes:
        w, ids = routing(T, E, K, seed=T)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(dtype)
        outputs.append(ops.moe_layer(x, w, ids, layer, cpu))
        assert relative_error(outputs[-1], moe_forward(x.float(), w, ids, layer)) < INT_PATH_TOLERANCE[dtype]
    assert torch.equal(outputs[0], outputs[2])


def int_args(cpu, x, w, ids):
    bases = (cpu.layer.gate_basis, cpu.layer.up_basis, cpu.layer.down_basis)
    return (
        x,
        w,
        ids,
        *(b.weight for b in bases),
        *(b.scale for b in bases),
        *(getattr(f, n) for f in (cpu.gate, cpu.up, cpu.down) for n in ("masks", "scales", "rows", "segs")),
        cpu.layer.group_size,
        cpu.layer.down.odd,
    )


def test_int_path_opcheck(int_path):
    H, I, E, K, _, _ = LAYERS[1]
    cpu = to_cpu_layer(layer_of(LAYERS[1], basis_dtype="int8"))
    w, ids = routing(5, E, K, seed=2)
    torch.library.opcheck(torch.ops.bitsmoe.moe_int.default, int_args(cpu, torch.randn(5, H), w, ids))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(13, a[13][:, :-1]), r"up_masks: expected Long \[\*, 6\], found Long \[\d+, 5\]"),
        (lambda a: a.__setitem__(12, a[12][:-1]), r"gate_segs: expected Int \[5, 6, 3\], found Int \[4, 6, 3\]"),
        (
            lambda a: a.__setitem__(16, a[16].index_fill(2, torch.tensor(1), 10**6)),
            r"up_segs row 0 points past up_rows \[\d+\] or up_masks",
        ),
        (lambda a: a.__setitem__(15, a[15][:4]), r"up_rows: expected Int \[\d+\], found Int \[4\]"),
        (
            lambda a: a.__setitem__(9, a[9][:-2]),
            r"gate_segs row \d+ points past .* gate_masks \[\d+, 6\] \(whose last 64 bytes must be padding\)",
        ),
        (lambda a: a.__setitem__(17, a[17][:, :-1]), r"down_masks: expected Long \[\*, 24\], found Long \[\d+, 23\]"),
        (lambda a: a.__setitem__(18, a[18][:-1]), r"down_scales: expected Half \[3, \*\], found Half \[2, \d+\]"),
        (
            lambda a: a.__setitem__(20, a[20].index_fill(2, torch.tensor(0), 10**6)),
            r"down_segs row \d+ points past down_rows \[\d+\] or down_masks",
        ),
    ],
    ids=["masks", "segs", "segs-past", "rows", "masks-unpadded", "down-masks", "down-scales", "down-segs-past"],
)
def test_int_path_refuses_bad_layouts_with_their_shapes(int_path, change, message):
    H, I, E, K, _, _ = LAYERS[1]
    w, ids = routing(3, E, K, seed=0)
    args = list(int_args(to_cpu_layer(layer_of(LAYERS[1])), torch.randn(3, H), w, ids))
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bitsmoe.moe_int(*args)


def test_int_path_is_refused_when_the_float_kernels_are_forced(int_path, monkeypatch):
    H, I, E, K, _, _ = LAYERS[0]
    cpu = to_cpu_layer(layer_of(LAYERS[0]))
    w, ids = routing(2, E, K, seed=0)
    monkeypatch.setenv("BITSMOE_CPU_ISA", "avx512")
    assert torch.ops.bitsmoe.cpu_isa() == "avx512"
    with pytest.raises(RuntimeError, match="needs AVX-512 with VNNI, BW, VBMI and GFNI, which this CPU lacks"):
        ops.moe_layer(torch.randn(2, H), w, ids, cpu.layer, cpu)


def test_a_kernel_library_with_other_layout_constants_is_refused(monkeypatch):
    assert ops.CPU_KERNEL
    cpu_layout.check_constants()  # this install: one source tree
    monkeypatch.setattr(cpu_layout, "GROUPS_PER_BLOCK", 16)
    with pytest.raises(RuntimeError, match=r"layout constants \[32, 16, 8, 6, 4, 3, 2, 1\] .* writes \[16, 16, 8, 6"):
        cpu_layout.check_constants()
