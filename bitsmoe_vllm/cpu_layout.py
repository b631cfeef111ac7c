"""The CPU integer path of a BitsMoE layer: `torch.ops.bitsmoe.moe_int` (csrc/cpu/moe_cpu_vnni.cpp, AVX-512 VNNI)
on the factors put once, at load, in the CPU layout. The reference (reference.moe_forward) stays the spec;
tests/test_cpu_int_path.py holds the two together.

    cpu = to_cpu_layer(layer)                         # once, at load
    y = moe_forward_int(x, topk_weights, topk_ids, cpu)

The layout (csrc/cpu/moe_cpu.h, CpuFactors): each expert's stored rows grouped by width class, widest first
(kernel_layout.repack), each class padded with rows of rank -1 and scale 0 to a multiple of the group size; one 64-bit
mask per group, plane and few columns, so that decoding a mask gives the 64 code bytes one vpdpbusd multiplies.
- gate and up (`to_cpu_factors`): 4-row groups, a mask per 16 columns whose bit 4j + r is the plane's bit of column j
  of the group's row r (four rows' activations make one int32 to broadcast). The groups of a class are taken 32 at a
  time (a block), and a block's masks are ordered [tile, group, chunk in the tile, plane], a tile being 8 chunks (128
  columns; 4 or 2 where a column group is narrower), so that the kernel reads a tile front to back.
- down (`to_cpu_down`): 16-row groups, a mask per 4 columns whose bit 4i + c is the plane's bit of column c of the
  group's row i (four columns' activations make one int32; the 16 rows' sums are the 16 lanes), a group's masks
  ordered [chunk, plane].
The masks end with at least 64 bytes of zeros (whole rows): the kernel reads a chunk's planes as one 64-byte load.
Scales are stored column-group major, [I/G, rows].
- int8 bases (`to_cpu_basis`): same shape, the rows in blocks of 4 (the last one n % 4 rows), a block stored one
  64-column chunk after the other (the last one what is left), a chunk the block's rows one after the other: the 4
  rows a thread multiplies at once are one stream (row-major, 4 streams a row apart, which read slower:
  benchmarks/basis_read_micro.cpp). Float bases stay row-major (tiled, no faster there).
The masks, scales and bases are copied onto huge pages (csrc/cpu/huge_pages.cpp).

Numerics: the kernel rounds activations to 16-bit integers (the gate/up inputs z * scale per 128 rows and column
group, the down input a per slot and column group, the input of an int8 basis per token), so it matches the float32
reference to a few 1e-5 relative (benchmarks/README.md, the integer path; the tests allow 2e-4).
"""

from dataclasses import dataclass, field, replace

import torch

from bitsmoe_vllm.kernel_layout import CLASS_WIDTHS, KernelFactors, repack
from bitsmoe_vllm.reference import Basis, Factors, MoELayer, op_extras

GROUPS_PER_BLOCK = 32  # gate/up 4-row groups whose activations share a rounding scale (csrc/cpu/moe_cpu.h)
DOWN_GROUP_ROWS = 16  # rows of a down group: the 16 int32 lanes of a vector
DOWN_BATCH_GROUPS = 256  # down groups converted at a time (bounds the transient int64 copies)


@dataclass(frozen=True)
class CpuFactors:
    masks: torch.Tensor  # [mask rows, I/16 (gate, up) or I/4 (down)] int64
    scales: torch.Tensor  # [I/G, rows] float16
    rows: torch.Tensor  # [rows] int32, each row's rank index (-1 for padding)
    segs: torch.Tensor  # [E, 6, 3] int32: per (expert, class) first group, groups, first mask row


@dataclass(frozen=True)
class CpuLayer:
    layer: MoELayer  # bases as to_cpu_basis leaves them; the factors empty (they are in `gate`, `up`, `down`)
    gate: CpuFactors
    up: CpuFactors
    down: CpuFactors
    op_args: tuple = field(init=False, repr=False)  # moe_int's arguments after x, topk_weights and topk_ids

    def __post_init__(self):
        # Gathered once: per call they cost a measurable share of a cold call (benchmarks/README.md, design timings).
        bases = (self.layer.gate_basis, self.layer.up_basis, self.layer.down_basis)
        factors = (t for f in (self.gate, self.up, self.down) for t in (f.masks, f.scales, f.rows, f.segs))
        args = (
            *(None if b is None else b.weight for b in bases),
            *(None if b is None else b.scale for b in bases),
            *factors,
            self.layer.group_size,
            self.layer.down.odd,
            *op_extras(self.layer),
        )
        object.__setattr__(self, "op_args", args)


@dataclass(frozen=True)
class _Padded:
    """The stored rows of a repacked projection, each (expert, class) padded to a multiple of the group size."""

    seg: torch.Tensor  # [rows] each padded row's (expert, class) index
    local: torch.Tensor  # [rows] its index inside its (expert, class)
    stored: torch.Tensor  # [rows] bool: a stored row, not padding
    groups: torch.Tensor  # [E * 6] groups per (expert, class)
    mask_first: torch.Tensor  # [E * 6] first mask row
    rows: torch.Tensor  # [rows] int32 rank index, -1 for padding
    scales: torch.Tensor  # [I/G, rows] float16, 0 for padding
    segs: torch.Tensor  # [E, 6, 3] int32


def _pad(f: Factors, group_rows: int) -> tuple[KernelFactors, torch.Tensor, _Padded]:
    """f repacked, each (expert, class)'s first plane in it, and its rows padded to groups of group_rows."""
    k = repack(f)  # stored rows grouped by (expert, class); segs [E, 6, 3]: first row, rows, first plane
    E = f.bits.shape[0]
    seg_row, counts, seg_plane = (k.segs[..., i].flatten().long() for i in range(3))
    groups = (counts + group_rows - 1) // group_rows
    planes = groups * torch.tensor(CLASS_WIDTHS).repeat(E)  # mask rows per (expert, class)
    group_first, mask_first = groups.cumsum(0) - groups, planes.cumsum(0) - planes
    seg = torch.arange(E * len(CLASS_WIDTHS)).repeat_interleave(group_rows * groups)
    local = torch.arange(len(seg)) - group_rows * group_first[seg]
    stored = local < counts[seg]
    source = seg_row[seg] + local
    rows = torch.full((len(seg),), -1, dtype=torch.int32)
    rows[stored] = k.rows[source[stored]]
    scales = torch.zeros(len(seg), f.scales.shape[1], dtype=torch.float16)
    scales[stored] = k.scales[source[stored]]
    segs = (
        torch.stack([group_first, groups, mask_first], 1).reshape(E, len(CLASS_WIDTHS), 3).to(torch.int32).contiguous()
    )
    return k, seg_plane, _Padded(seg, local, stored, groups, mask_first, rows, scales.T.contiguous(), segs)


def _class_codes(k: KernelFactors, seg_plane: torch.Tensor, pad: _Padded, c: int, b: int) -> tuple[torch.Tensor, ...]:
    """The padded rows of class c (width b): their codes [rows, b, I/32] as int64 (0 for padding), (expert, class)
    indices and indices inside it."""
    mine = pad.seg % len(CLASS_WIDTHS) == c
    planes = seg_plane[pad.seg[mine]] + pad.local[mine] * b  # first plane in k.codes of each padded row of the class
    codes = torch.zeros(int(mine.sum()), b, k.codes.shape[1], dtype=torch.int64)
    ok = pad.stored[mine]
    codes[ok] = k.codes[planes[ok, None] + torch.arange(b)].to(torch.int64) & 0xFFFFFFFF
    return codes, pad.seg[mine], pad.local[mine]


def _spread(x: torch.Tensor) -> torch.Tensor:
    """16-bit values -> bit j moved to bit 4j (int64)."""
    x = (x | (x << 24)) & 0x000000FF000000FF
    x = (x | (x << 12)) & 0x000F000F000F000F
    x = (x | (x << 6)) & 0x0303030303030303
    return (x | (x << 3)) & 0x1111111111111111


def _zero_masks(pad: _Padded, words: int) -> torch.Tensor:
    """Zeros for the masks of every group, rows of `words` words, then whole rows of zeros holding at least 64 bytes:
    the kernel reads a chunk's planes as 64 bytes."""
    rows = int(pad.mask_first[-1] + pad.groups[-1] * CLASS_WIDTHS[-1])
    return torch.zeros((rows + -(-8 // words)) * words, dtype=torch.int64)


def tile_chunks(group_size: int) -> int:
    """Chunks of 16 columns in a tile: 8, 4 or 2, the most that divides a column group."""
    return next(t for t in (8, 4, 2) if group_size // 16 % t == 0)


def to_cpu_factors(f: Factors, group_size: int) -> CpuFactors:
    """Canonical gate or up Factors (one projection, all local experts, on the CPU) -> CpuFactors (4-row groups)."""
    width = tile_chunks(group_size)
    k, seg_plane, pad = _pad(f, 4)
    words = f.codes.shape[1]
    masks = _zero_masks(pad, 2 * words)
    for c, b in enumerate(CLASS_WIDTHS):
        codes, seg, local = _class_codes(k, seg_plane, pad, c, b)
        if len(codes) == 0:
            continue
        halves = torch.stack([codes & 0xFFFF, codes >> 16], -1).reshape(-1, 4, b, 2 * words)  # 16 columns each
        group_masks = sum(_spread(halves[:, r]) << r for r in range(4))  # [groups, b, I/16]
        # each group's place: its block of GROUPS_PER_BLOCK in its (expert, class), then
        # [tile, group in block, chunk in tile, plane]
        s, q = seg[::4], local[::4] // 4
        block = q // GROUPS_PER_BLOCK
        in_block = torch.clamp(pad.groups[s] - block * GROUPS_PER_BLOCK, max=GROUPS_PER_BLOCK)
        start = (pad.mask_first[s] + block * GROUPS_PER_BLOCK * b) * 2 * words
        chunk, plane = torch.arange(2 * words)[None, None, :], torch.arange(b)[None, :, None]
        tile, in_tile = chunk // width, chunk % width
        place = ((tile * in_block[:, None, None] + (q % GROUPS_PER_BLOCK)[:, None, None]) * width + in_tile) * b + plane
        masks[(start[:, None, None] + place).flatten()] = group_masks.flatten()
    return CpuFactors(masks.reshape(-1, 2 * words), pad.scales, pad.rows, pad.segs)


def to_cpu_down(f: Factors) -> CpuFactors:
    """Canonical down Factors (all local experts, on the CPU) -> CpuFactors (16-row groups, masks of 4 columns)."""
    k, seg_plane, pad = _pad(f, DOWN_GROUP_ROWS)
    chunks = f.codes.shape[1] * 8
    masks = _zero_masks(pad, chunks)
    nibble, lane = 4 * torch.arange(8), 4 * torch.arange(DOWN_GROUP_ROWS)
    for c, b in enumerate(CLASS_WIDTHS):
        codes, seg, local = _class_codes(k, seg_plane, pad, c, b)
        codes = codes.reshape(-1, DOWN_GROUP_ROWS, b, f.codes.shape[1])
        seg, q = seg[::DOWN_GROUP_ROWS], local[::DOWN_GROUP_ROWS] // DOWN_GROUP_ROWS
        for g0 in range(0, len(codes), DOWN_BATCH_GROUPS):
            part = codes[g0 : g0 + DOWN_BATCH_GROUPS]
            columns = ((part[..., None] >> nibble) & 0xF).reshape(
                len(part), DOWN_GROUP_ROWS, b, chunks
            )  # 4 columns each
            group_masks = (columns << lane[None, :, None, None]).sum(1)  # [groups, b, I/4]; lanes do not overlap
            start = (pad.mask_first[seg[g0 : g0 + DOWN_BATCH_GROUPS]] + q[g0 : g0 + DOWN_BATCH_GROUPS] * b) * chunks
            where = start[:, None] + torch.arange(b * chunks)  # a group's masks: [chunk, plane]
            masks[where.flatten()] = group_masks.transpose(1, 2).flatten()
    return CpuFactors(masks.reshape(-1, chunks), pad.scales, pad.rows, pad.segs)


def _blocks(w: torch.Tensor, m: int) -> torch.Tensor:
    """w [blocks * m, in] in the CPU basis layout, blocks of m rows."""
    full = w.shape[1] // 64 * 64
    b = w.reshape(-1, m, w.shape[1])
    chunks = b[..., :full].reshape(len(b), m, full // 64, 64).transpose(1, 2)  # [block, chunk, row, column]
    return torch.cat([chunks.reshape(len(b), -1), b[..., full:].reshape(len(b), -1)], 1).reshape(w.shape)


def to_cpu_basis(basis: Basis) -> Basis:
    """The basis on huge pages, an int8 one in the CPU basis layout (module docstring, csrc/cpu/moe_cpu.h)."""
    w, whole = basis.weight, len(basis.weight) // 4 * 4
    if w.dtype == torch.int8:
        w = torch.cat([_blocks(w[:whole], 4), _blocks(w[whole:], len(w) - whole) if whole < len(w) else w[:0]])
    return replace(basis, weight=torch.ops.bitsmoe.huge_page_copy(w))


def to_cpu_layer(layer: MoELayer) -> CpuLayer:
    """The layer with its factors in the CPU layout, and they and the bases on huge pages (csrc/cpu/huge_pages.cpp);
    it holds no reference to the canonical factors or bases."""
    huge = torch.ops.bitsmoe.huge_page_copy
    gate, up, down = (
        replace(f, masks=huge(f.masks), scales=huge(f.scales))
        for f in (
            to_cpu_factors(layer.gate, layer.group_size),
            to_cpu_factors(layer.up, layer.group_size),
            to_cpu_down(layer.down),
        )
    )
    g, u, d = (None if b is None else to_cpu_basis(b) for b in (layer.gate_basis, layer.up_basis, layer.down_basis))
    f = layer.gate  # emptied, but keeping what its codes mean (odd)
    empty = replace(f, codes=f.codes[:0].clone(), scales=f.scales[:0].clone(), bits=f.bits[:, :0].clone())
    return CpuLayer(
        replace(layer, gate_basis=g, up_basis=u, down_basis=d, gate=empty, up=empty, down=empty), gate, up, down
    )


def moe_forward_int(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, cpu: CpuLayer) -> torch.Tensor:
    """[T, H] routed-expert output in x.dtype, as reference.moe_forward, on the integer path."""
    return torch.ops.bitsmoe.moe_int.default(x, topk_weights, topk_ids, *cpu.op_args)


def check_constants() -> None:
    """Refuse a kernel library whose layout constants differ from the ones this module writes the layout with."""
    kernel, ours = list(torch.ops.bitsmoe.cpu_layout_constants()), [GROUPS_PER_BLOCK, DOWN_GROUP_ROWS, *CLASS_WIDTHS]
    if kernel != ours:
        raise RuntimeError(
            f"bitsmoe: the CPU kernel library (bitsmoe_vllm/_cpu) has the layout constants {kernel} (groups per block, "
            f"down group rows, width classes) and bitsmoe_vllm/cpu_layout.py writes {ours}: reinstall bitsmoe-vllm "
            "(`pip install --no-build-isolation -e .`) so that both come from one source tree"
        )
