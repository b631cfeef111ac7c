"""The CPU integer path of a BitsMoE layer: `torch.ops.bitsmoe.moe_int` (csrc/cpu/moe_cpu_vnni.cpp, AVX-512 VNNI)
on gate and up factors put once, at load, in the CPU layout; down stays canonical. The reference
(reference.moe_forward) stays the spec; tests/test_cpu_kernel.py holds the two together.

    cpu = to_cpu_layer(layer)                         # once, at load
    y = moe_forward_int(x, topk_weights, topk_ids, cpu)

The layout (csrc/cpu/moe_cpu.h, CpuFactors): each expert's stored rows grouped by width class, widest first
(kernel_layout.repack), each class padded with zero rows to a multiple of 4; per 4-row group and plane, one 64-bit
mask per 16 columns whose bit 4j + r is the plane's bit of column j of the group's row r, so that decoding a mask
gives the bytes one vpdpbusd multiplies by four rows' activations. The groups of a class are taken 16 at a time
(a block), and a block's masks are ordered [tile, group, chunk in the tile, plane], a tile being 8 chunks (128
columns; 4 or 2 where a column group is narrower), so that the kernel reads a tile front to back. Scales are stored column-group major.

Numerics: the kernel rounds activations to 16-bit integers (the gate/up inputs z * scale per 64 rows and column
group, the down input a per slot and column group), so it matches the float32 reference to about 1e-5 relative.
"""

from dataclasses import dataclass, replace

import torch

from bitsmoe_vllm.kernel_layout import CLASS_WIDTHS, repack
from bitsmoe_vllm.reference import Factors, MoELayer

GROUPS_PER_BLOCK = 16  # 4-row groups whose activations share a rounding scale (csrc/cpu/moe_cpu_vnni.cpp)


@dataclass(frozen=True)
class CpuFactors:
    masks: torch.Tensor  # [mask rows, I/16] int64
    scales: torch.Tensor  # [I/G, rows] float16
    rows: torch.Tensor  # [rows] int32, each row's rank index (0 for padding)
    segs: torch.Tensor  # [E, 6, 3] int32: per (expert, class) first 4-row group, groups, first mask row


@dataclass(frozen=True)
class CpuLayer:
    layer: MoELayer  # bases and down as loaded; gate and up empty (they are in `gate`, `up`)
    gate: CpuFactors
    up: CpuFactors


def _spread(x: torch.Tensor) -> torch.Tensor:
    """16-bit values -> bit j moved to bit 4j (int64)."""
    x = (x | (x << 24)) & 0x000000FF000000FF
    x = (x | (x << 12)) & 0x000F000F000F000F
    x = (x | (x << 6)) & 0x0303030303030303
    return (x | (x << 3)) & 0x1111111111111111


def tile_chunks(group_size: int) -> int:
    """Chunks of 16 columns in a tile: 8, 4 or 2, the most that divides a column group."""
    return next(t for t in (8, 4, 2) if group_size // 16 % t == 0)


def to_cpu_factors(f: Factors, group_size: int) -> CpuFactors:
    """Canonical Factors (one projection, all local experts, on the CPU) -> CpuFactors."""
    width = tile_chunks(group_size)
    k = repack(f)  # stored rows grouped by (expert, class); segs [E, 6, 3]: first row, rows, first plane
    E, words = f.bits.shape[0], f.codes.shape[1]
    seg_row, counts, seg_plane = (k.segs[..., i].flatten().long() for i in range(3))
    groups = (counts + 3) // 4
    widths = torch.tensor(CLASS_WIDTHS).repeat(E)
    group_first, mask_first = groups.cumsum(0) - groups, (groups * widths).cumsum(0) - groups * widths
    seg = torch.arange(E * len(CLASS_WIDTHS)).repeat_interleave(4 * groups)  # each padded row's (expert, class)
    local = torch.arange(len(seg)) - 4 * group_first[seg]
    stored = local < counts[seg]
    source = seg_row[seg] + local  # its row in k, where stored
    rows = torch.zeros(len(seg), dtype=torch.int32)
    rows[stored] = k.rows[source[stored]]
    scales = torch.zeros(len(seg), f.scales.shape[1], dtype=torch.float16)
    scales[stored] = k.scales[source[stored]]
    masks = torch.zeros(int((groups * widths).sum()) * 2 * words, dtype=torch.int64)
    for c, b in enumerate(CLASS_WIDTHS):
        mine = seg % len(CLASS_WIDTHS) == c
        if not mine.any():
            continue
        planes = seg_plane[seg[mine]] + local[mine] * b  # first plane in k.codes of each padded row of the class
        codes = torch.zeros(int(mine.sum()), b, words, dtype=torch.int64)
        ok = stored[mine]
        codes[ok] = k.codes[planes[ok, None] + torch.arange(b)].to(torch.int64) & 0xFFFFFFFF
        halves = torch.stack([codes & 0xFFFF, codes >> 16], -1).reshape(-1, 4, b, 2 * words)  # 16 columns each
        group_masks = sum(_spread(halves[:, r]) << r for r in range(4))  # [groups, b, I/16]
        # each group's place: its block of 16 in its (expert, class), then [tile, group in block, chunk in tile, plane]
        s, q = seg[mine][::4], local[mine][::4] // 4
        block, in_block = q // GROUPS_PER_BLOCK, torch.clamp(groups[s] - q // GROUPS_PER_BLOCK * GROUPS_PER_BLOCK, max=GROUPS_PER_BLOCK)
        start = (mask_first[s] + block * GROUPS_PER_BLOCK * b) * 2 * words
        chunk, plane = torch.arange(2 * words)[None, None, :], torch.arange(b)[None, :, None]
        tile, in_tile = chunk // width, chunk % width
        place = ((tile * in_block[:, None, None] + (q % GROUPS_PER_BLOCK)[:, None, None]) * width + in_tile) * b + plane
        where = start[:, None, None] + place
        masks[where.flatten()] = group_masks.flatten()
    segs = torch.stack([group_first, groups, mask_first], 1).reshape(E, len(CLASS_WIDTHS), 3).to(torch.int32)
    return CpuFactors(masks.reshape(-1, 2 * words), scales.T.contiguous(), rows, segs.contiguous())


def to_cpu_layer(layer: MoELayer) -> CpuLayer:
    """The layer with gate and up in the CPU layout; it holds no reference to the canonical gate and up."""
    gate, up = to_cpu_factors(layer.gate, layer.group_size), to_cpu_factors(layer.up, layer.group_size)
    empty = Factors(layer.gate.codes[:0].clone(), layer.gate.scales[:0].clone(), layer.gate.bits[:, :0].clone())
    return CpuLayer(replace(layer, gate=empty, up=empty), gate, up)


def moe_forward_int(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, cpu: CpuLayer) -> torch.Tensor:
    """[T, H] routed-expert output in x.dtype, as reference.moe_forward, on the integer path."""
    layer, bases = cpu.layer, (cpu.layer.gate_basis, cpu.layer.up_basis, cpu.layer.down_basis)
    return torch.ops.bitsmoe.moe_int(
        x, topk_weights, topk_ids,
        *(None if b is None else b.weight for b in bases), *(None if b is None else b.scale for b in bases),
        cpu.gate.masks, cpu.gate.scales, cpu.gate.rows, cpu.gate.segs,
        cpu.up.masks, cpu.up.scales, cpu.up.rows, cpu.up.segs,
        layer.down.codes, layer.down.scales, layer.down.bits,
        layer.group_size,
    )  # fmt: skip


def register_fake() -> None:
    """The meta implementation torch.compile traces (once the library defining the op is loaded)."""

    @torch.library.register_fake("bitsmoe::moe_int")
    def _(x, topk_weights, topk_ids, *layer_tensors_and_group_size):
        return torch.empty_like(x)
