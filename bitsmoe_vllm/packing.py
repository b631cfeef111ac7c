"""Bit-plane packing of signed b-bit codes into 32-bit words (FORMAT.md, "Bit packing").

A row of n codes at width b becomes b planes of ceil(n / 32) words. Bit j of word w in
plane p is bit p of the offset code of column 32 * w + j. Every width packs with no
padding inside a word; only the last word of a plane may hold unused (zero) bits.

Signed codes and offset codes (u is what the bits hold), FORMAT.md section 4:
    odd codes (b <= 6; format version 1: b = 1 only):  q odd in [-(2^b - 1), 2^b - 1],  u = (q + 2^b - 1) / 2
    other codes (b = 8; format version 1: b >= 2):     q in [-2^(b-1), 2^(b-1) - 1],    u = q + 2^(b-1)

Torch on any device; numpy packs on the CPU.
"""

import numpy as np
import torch

WORD_BITS = 32
SUPPORTED_WIDTHS = (1, 2, 3, 4, 6, 8)


ODD_WIDTHS = (1, 2, 3, 4, 6)  # format version 2's odd codes: an 8-bit one would not fit the kernels' int8


def is_odd(bits: int, odd: bool = True) -> bool:
    """Whether `bits`-bit codes are odd: in format version 2 (odd=True) up to 6 bits, in version 1 at 1 bit only."""
    return bits == 1 or (odd and bits in ODD_WIDTHS)


def code_range(bits: int, odd: bool = True) -> tuple[int, int]:
    """Smallest and largest signed code at `bits` bits."""
    _check_width(bits)
    if is_odd(bits, odd):
        return -((1 << bits) - 1), (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def code_bounds(bits: torch.Tensor | int, odd: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """code_range and is_odd of the widths `bits` (an int or a tensor, every entry a supported width), elementwise:
    (odd [bool], smallest code, largest code [float32]), the arguments of round_to_codes."""
    b = torch.as_tensor(bits)
    supported = torch.tensor(SUPPORTED_WIDTHS, device=b.device)
    if not torch.isin(b, supported).all():
        raise ValueError(f"code_bounds: widths {b.unique().tolist()} outside {list(SUPPORTED_WIDTHS)}")
    odd_b = (b == 1) | (odd & torch.isin(b, torch.tensor(ODD_WIDTHS, device=b.device)))
    top = torch.where(odd_b, (1 << b) - 1, (1 << (b - 1)) - 1).float()
    return odd_b, torch.where(odd_b, -top, -top - 1), top


def round_to_codes(v: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The codes nearest to the values v (float, in units of the scale), as floats; bounds = code_bounds(...), which
    broadcast with v (worked out once where many values are rounded at the same widths)."""
    odd_b, bottom, top = bounds
    return torch.where(odd_b, 2 * torch.floor(v / 2) + 1, v.round()).clamp(bottom, top)


def nearest_codes(v: torch.Tensor, bits: torch.Tensor | int, odd: bool = True) -> torch.Tensor:
    """round_to_codes at the widths `bits`."""
    return round_to_codes(v, code_bounds(torch.as_tensor(bits, device=v.device), odd))


def words_per_plane(n: int) -> int:
    return -(-n // WORD_BITS)


def pack(codes: torch.Tensor, bits: int, odd: bool = True) -> torch.Tensor:
    """Pack signed codes [..., n] (any integer dtype) into int32 words [..., bits, ceil(n/32)]; `odd`: format
    version 2's codes (version 1: False)."""
    _check_width(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dim() == 0:
        raise ValueError(f"pack: codes must be an integer tensor [..., n], got {codes.dtype} {list(codes.shape)}")
    lo, hi = code_range(bits, odd)
    odd_b = is_odd(bits, odd)
    if codes.numel():  # checked in the codes' own dtype: a narrower one could wrap a code into the range
        low, high = (int(v) for v in torch.aminmax(codes))
        even = odd_b and bool(((codes & 1) == 0).any())
        if low < lo or high > hi or even:
            kind = "odd codes in" if odd_b else "codes in"
            raise ValueError(
                f"pack: codes outside the {bits}-bit range ({kind} [{lo}, {hi}]): found min {low}, max {high}"
                + (", an even code" if even else "")
            )
    q = codes.to(torch.int32)
    u = (q + hi) >> 1 if odd_b else q - lo  # [..., n] in [0, 2^bits)
    n = u.shape[-1]
    u = torch.nn.functional.pad(u, (0, words_per_plane(n) * WORD_BITS - n))
    return _words_numpy(u, bits) if u.device.type == "cpu" else _words_torch(u, bits)


def _words_torch(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Offset codes u [..., 32 W] (int32) -> their bit planes' words [..., bits, W], on any device."""
    u = u.unflatten(-1, (-1, WORD_BITS))  # [..., W, 32]
    plane = torch.arange(bits, device=u.device, dtype=torch.int32)[:, None, None]
    column_bit = torch.arange(WORD_BITS, device=u.device, dtype=torch.int32)
    # every plane at once, in int32: the bits are distinct, so their sum is their OR and never overflows (bit 31 is
    # the sign, as the stored word has it); int64 words a plane at a time took 3-5x as long at 2 and 3 bits
    return (((u.unsqueeze(-3) >> plane) & 1) << column_bit).sum(-1, dtype=torch.int32)  # [..., bits, W]


def _words_numpy(u: torch.Tensor, bits: int) -> torch.Tensor:
    """_words_torch on the CPU by numpy.packbits, 3-24x faster on a [2048, 768] factor (benchmarks/bench_pack.py;
    the export packs every expert's factor): code j's bit goes to bit j % 8 of byte j // 8, so the little-endian
    int32 word j // 32 holds it at bit j % 32."""
    plane = torch.arange(bits, dtype=torch.uint8)[:, None]
    planes = (u.to(torch.uint8).unsqueeze(-2) >> plane) & 1  # [..., bits, 32 W]
    packed = np.packbits(planes.numpy(), axis=-1, bitorder="little")  # [..., bits, 4 W]
    return torch.from_numpy(packed.view("<i4").astype(np.int32, copy=False))  # a copy only on big-endian hosts


def unpack(words: torch.Tensor, bits: int, n: int, odd: bool = True) -> torch.Tensor:
    """Unpack int32 words [..., bits, W] into signed int8 codes [..., n]; `odd` as in pack."""
    _check_width(bits)
    if words.dtype != torch.int32 or words.dim() < 2 or words.shape[-2] != bits:
        raise ValueError(f"unpack: expected int32 words [..., {bits}, W], got {words.dtype} {list(words.shape)}")
    if words.shape[-1] != words_per_plane(n):
        raise ValueError(f"unpack: {n} codes need {words_per_plane(n)} words per plane, found {words.shape[-1]}")
    column_bit = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    # int32 shifts are arithmetic, but "& 1" keeps exactly the bit asked for; each plane's bits go straight into u
    # (all planes' bits as uint8 first, then combined: 1.1-2.6x slower)
    u = (words[..., 0, :, None] >> column_bit) & 1  # [..., W, 32]
    for p in range(1, bits):
        u |= ((words[..., p, :, None] >> column_bit) & 1) << p
    u = u.flatten(-2)[..., :n]  # [..., n] in [0, 2^bits)
    lo, hi = code_range(bits, odd)
    q = 2 * u - hi if is_odd(bits, odd) else u + lo
    return q.to(torch.int8)


def _check_width(bits: int) -> None:
    if bits not in SUPPORTED_WIDTHS:
        raise ValueError(f"unsupported code width {bits}; supported widths are {list(SUPPORTED_WIDTHS)}")
