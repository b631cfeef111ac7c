"""The compiled kernels' layout of one projection (csrc/cuda/moe_decode.cuh), made once at load from FORMAT.md's
canonical layout by `repack`; `repack_reference` is the same written as plain loops, the spec it is tested against.

Each expert's stored rows are grouped by width class, widest first (8, 6, 4, 3, 2, 1 bits), rank order inside a
class, so that the rows a kernel loop decodes share one width. Codes and scales are the canonical ones reordered;
`rows` gives each stored row's rank index and `segs` [E, 6, 3] each (expert, class)'s first stored row, number of
rows and first plane.
"""

from dataclasses import dataclass

import torch

from bitsmoe_vllm.reference import Factors, expert_offsets

CLASS_WIDTHS = (8, 6, 4, 3, 2, 1)


@dataclass(frozen=True)
class KernelFactors:
    codes: torch.Tensor  # [P, I/32] int32
    scales: torch.Tensor  # [S, I/G] float16
    rows: torch.Tensor  # [S] int32
    segs: torch.Tensor  # [E, 6, 3] int32
    rank: int  # R


def _class_of(widths: torch.Tensor) -> torch.Tensor:
    table = torch.full((9,), -1, dtype=torch.int64, device=widths.device)
    table[list(CLASS_WIDTHS)] = torch.arange(len(CLASS_WIDTHS), device=widths.device)
    return table[widths]


def repack(f: Factors) -> KernelFactors:
    """Canonical Factors (one projection, all local experts) -> KernelFactors, on f's device, vectorised."""
    bits = f.bits.to(torch.int64)  # [E, R]
    E, R = bits.shape
    expert, rank = (bits > 0).nonzero(as_tuple=True)  # stored rows in canonical order (expert, then rank)
    width = bits[expert, rank]
    first_plane = width.cumsum(0) - width  # canonical first plane of each stored row
    group = expert * len(CLASS_WIDTHS) + _class_of(width)  # (expert, class), in kernel order
    order = torch.sort(group * R + rank).indices  # kernel order of the stored rows
    width_k = width[order]
    starts_k = width_k.cumsum(0) - width_k  # first plane of each row in the kernel codes
    plane = torch.arange(int(width_k.sum()), device=bits.device)
    source = plane - starts_k.repeat_interleave(width_k) + first_plane[order].repeat_interleave(width_k)
    counts = torch.bincount(group, minlength=E * len(CLASS_WIDTHS)).reshape(E, -1)  # [E, 6]
    planes = counts * torch.tensor(CLASS_WIDTHS, device=bits.device)
    segs = torch.stack(
        [
            counts.flatten().cumsum(0) - counts.flatten(),
            counts.flatten(),
            planes.flatten().cumsum(0) - planes.flatten(),
        ],
        1,
    )
    return KernelFactors(
        f.codes[source].contiguous(),
        f.scales[order].contiguous(),
        rank[order].to(torch.int32).contiguous(),
        segs.reshape(E, len(CLASS_WIDTHS), 3).to(torch.int32).contiguous(),
        R,
    )


def repack_reference(f: Factors) -> KernelFactors:
    """repack, expert by expert, class by class, row by row (FORMAT.md section 3 read literally)."""
    E, R = f.bits.shape
    plane_at, row_at = expert_offsets(f.bits)
    codes, scales, rows, segs = [], [], [], []
    n_rows = n_planes = 0
    for e in range(E):
        bits = f.bits[e].tolist()
        stored = [k for k in range(R) if bits[k] > 0]
        first = {k: plane_at[e] + sum(bits[q] for q in stored if q < k) for k in stored}  # canonical first plane
        scale_row = {k: row_at[e] + n for n, k in enumerate(stored)}
        for b in CLASS_WIDTHS:
            members = [k for k in stored if bits[k] == b]
            segs.append([n_rows, len(members), n_planes])
            for k in members:
                codes.append(f.codes[first[k] : first[k] + b])
                scales.append(f.scales[scale_row[k] : scale_row[k] + 1])
                rows.append(k)
            n_rows += len(members)
            n_planes += len(members) * b
    empty_codes, empty_scales = f.codes[:0], f.scales[:0]
    return KernelFactors(
        torch.cat(codes) if codes else empty_codes,
        torch.cat(scales) if scales else empty_scales,
        torch.tensor(rows, dtype=torch.int32),
        torch.tensor(segs, dtype=torch.int32).reshape(E, len(CLASS_WIDTHS), 3),
        R,
    )
