"""Bit-plane packing of signed b-bit codes into 32-bit words (FORMAT.md, "Bit packing").

A row of n codes at width b becomes b planes of ceil(n / 32) words. Bit j of word w in
plane p is bit p of the offset code of column 32 * w + j. Every width packs with no
padding inside a word; only the last word of a plane may hold unused (zero) bits.

Signed codes and offset codes (u is what the bits hold):
    b >= 2: q in [-2^(b-1), 2^(b-1) - 1],  u = q + 2^(b-1)
    b == 1: q in {-1, +1},                  u = (q + 1) / 2

Pure torch; works on any device.
"""

import torch

WORD_BITS = 32
SUPPORTED_WIDTHS = (1, 2, 3, 4, 6, 8)


def code_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed code at `bits` bits."""
    _check_width(bits)
    if bits == 1:
        return -1, 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def words_per_plane(n: int) -> int:
    return -(-n // WORD_BITS)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes [..., n] (any integer dtype) into int32 words [..., bits, ceil(n/32)]."""
    _check_width(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dim() == 0:
        raise ValueError(f"pack: codes must be an integer tensor [..., n], got {codes.dtype} {list(codes.shape)}")
    lo, hi = code_range(bits)
    q = codes.to(torch.int64)
    if q.numel() and (q.min() < lo or q.max() > hi or (bits == 1 and (q == 0).any())):
        raise ValueError(
            f"pack: codes outside the {bits}-bit range "
            f"{'{-1, +1}' if bits == 1 else f'[{lo}, {hi}]'}: found min {int(q.min())}, max {int(q.max())}"
        )
    u = (q + 1) // 2 if bits == 1 else q + (1 << (bits - 1))  # [..., n]
    n = u.shape[-1]
    width = words_per_plane(n)
    u = torch.nn.functional.pad(u, (0, width * WORD_BITS - n)).unflatten(-1, (width, WORD_BITS))  # [..., W, 32]
    column_bit = torch.arange(WORD_BITS, device=u.device, dtype=torch.int64)
    planes = [(((u >> p) & 1) << column_bit).sum(-1) for p in range(bits)]  # each [..., W], in [0, 2^32)
    words = torch.stack(planes, dim=-2)  # [..., bits, W]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack int32 words [..., bits, W] into signed int8 codes [..., n]."""
    _check_width(bits)
    if words.dtype != torch.int32 or words.dim() < 2 or words.shape[-2] != bits:
        raise ValueError(f"unpack: expected int32 words [..., {bits}, W], got {words.dtype} {list(words.shape)}")
    if words.shape[-1] != words_per_plane(n):
        raise ValueError(f"unpack: {n} codes need {words_per_plane(n)} words per plane, found {words.shape[-1]}")
    column_bit = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    # int32 shifts are arithmetic, but "& 1" keeps exactly the bit asked for
    plane_bits = ((words.unsqueeze(-1) >> column_bit) & 1).to(torch.uint8)  # [..., bits, W, 32]
    u = plane_bits[..., 0, :, :].clone()
    for p in range(1, bits):
        u |= plane_bits[..., p, :, :] << p
    u = u.flatten(-2)[..., :n].to(torch.int16)  # [..., n] in [0, 2^bits)
    q = 2 * u - 1 if bits == 1 else u - (1 << (bits - 1))
    return q.to(torch.int8)


def _check_width(bits: int) -> None:
    if bits not in SUPPORTED_WIDTHS:
        raise ValueError(f"unsupported code width {bits}; supported widths are {list(SUPPORTED_WIDTHS)}")
