import json
import re
from pathlib import Path

import pytest
import torch

from bitsmoe_vllm import packing
from bitsmoe_vllm.packing import code_range, is_odd, nearest_codes, pack, unpack, words_per_plane
from tests.helpers import PACK_LENGTHS, WIDTHS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_codes(bits: int, shape: tuple[int, ...], seed: int = 0, odd: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo, hi = code_range(bits, odd)
    if is_odd(bits, odd):
        return torch.randint(0, 1 << bits, shape, generator=g) * 2 + lo
    return torch.randint(lo, hi + 1, shape, generator=g)


@pytest.mark.parametrize("shape", [(3, 2, 64), (5, 32), (96,), (0, 32), (2, 0)])
@pytest.mark.parametrize("bits", WIDTHS)
def test_the_cpus_words_are_those_of_the_path_other_devices_take(bits, shape):
    """pack's numpy path (the CPU's) against its torch path (any other device's), bit for bit."""
    u = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    words = packing._words_numpy(u, bits)
    assert words.dtype == torch.int32 and words.shape == (*shape[:-1], bits, shape[-1] // 32)
    assert torch.equal(words, packing._words_torch(u, bits))


@pytest.mark.parametrize("odd", [True, False], ids=["version-2", "version-1"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", PACK_LENGTHS)
@pytest.mark.parametrize("bits", WIDTHS)
def test_round_trip_is_exact(bits, n, device, odd):
    codes = random_codes(bits, (3, 2, n), seed=bits * 1000 + n, odd=odd).to(device)
    words = pack(codes, bits, odd)
    assert words.dtype == torch.int32 and words.shape == (3, 2, bits, words_per_plane(n))
    assert torch.equal(unpack(words, bits, n, odd).cpu(), codes.cpu().to(torch.int8))


@pytest.mark.parametrize("bits", WIDTHS)
def test_version_1_reads_the_same_bits_as_the_codes_it_had(bits):
    """FORMAT.md section 9: version 2's odd code 2c + 1 and version 1's code c share their offset code up to 6 bits;
    1 and 8 bits are the same in both."""
    v1 = random_codes(bits, (200,), seed=bits, odd=False)
    words = pack(v1, bits, odd=False)
    v2 = unpack(words, bits, 200).long()
    assert torch.equal(v2, 2 * v1 + 1 if 2 <= bits <= 6 else v1)
    assert torch.equal(pack(v2, bits), words)


@pytest.mark.parametrize("odd", [True, False], ids=["version-2", "version-1"])
@pytest.mark.parametrize("bits", WIDTHS)
def test_extreme_codes_and_no_padding_waste(bits, odd):
    lo, hi = code_range(bits, odd)
    codes = torch.tensor([lo, hi] * 48)  # 96 codes = 3 full words per plane
    words = pack(codes, bits, odd)
    assert words.numel() * 32 == bits * 96  # exactly b bits per code, 3 and 6 included
    assert torch.equal(unpack(words, bits, 96, odd), codes.to(torch.int8))


@pytest.mark.parametrize("odd", [True, False], ids=["version-2", "version-1"])
@pytest.mark.parametrize("bits", WIDTHS)
def test_nearest_codes_are_the_nearest_of_all_codes(bits, odd):
    lo, hi = code_range(bits, odd)
    every = torch.arange(lo, hi + 1, 2 if is_odd(bits, odd) else 1).float()
    v = torch.linspace(lo - 3, hi + 3, 997)
    nearest = nearest_codes(v, bits, odd)
    assert torch.isin(nearest, every).all()
    assert torch.allclose((v - nearest).abs(), (v[:, None] - every).abs().min(1).values)


def test_unused_bits_of_the_last_word_are_zero():
    words = pack(torch.full((33,), 7), 3)  # u = 7: every used bit is 1
    assert words[:, 1].tolist() == [1, 1, 1]  # column 32 only
    assert (words[:, 0] == -1).all()  # all 32 bits set


@pytest.mark.parametrize("bits, bad", [(2, 2), (2, 5), (3, -9), (6, 0), (1, 0), (8, 128)])
def test_out_of_range_codes_are_refused(bits, bad):
    with pytest.raises(ValueError, match=f"{bits}-bit range"):
        pack(torch.tensor([1, bad]), bits)


@pytest.mark.parametrize("bits, bad", [(2, 2), (2, -3), (3, 4), (1, 0), (8, 128)])
def test_out_of_range_codes_of_version_1_are_refused(bits, bad):
    with pytest.raises(ValueError, match=f"{bits}-bit range"):
        pack(torch.tensor([1, bad]), bits, odd=False)


@pytest.mark.parametrize("bits", [0, 5, 7, 16])
def test_unsupported_width_is_refused(bits):
    with pytest.raises(ValueError, match=f"unsupported code width {bits}"):
        pack(torch.zeros(4, dtype=torch.int64), bits)


def test_unpack_checks_its_input_shape():
    with pytest.raises(ValueError, match="33 codes need 2 words per plane, found 1"):
        unpack(torch.zeros(3, 1, dtype=torch.int32), 3, 33)
    with pytest.raises(ValueError, match=r"expected int32 words \[\.\.\., 2, W\]"):
        unpack(torch.zeros(3, 1, dtype=torch.int32), 2, 10)


def golden_vectors() -> list[dict]:
    text = (Path(__file__).parent.parent / "FORMAT.md").read_text()
    block = re.search(r"<!-- golden-vectors -->\s*```json\n(.*?)```", text, re.DOTALL)
    assert block, "FORMAT.md lost its golden-vectors block"
    return json.loads(block.group(1))


def test_golden_vectors_from_format_md_byte_for_byte():
    vectors = golden_vectors()
    assert sorted({v["bits"] for v in vectors}) == list(WIDTHS)
    for v in vectors:
        codes = torch.tensor(v["codes"])
        words = pack(codes, v["bits"])
        assert words.numpy().tobytes().hex() == v["bytes"], f"{v['bits']}-bit golden vector"
        stored = torch.frombuffer(bytearray(bytes.fromhex(v["bytes"])), dtype=torch.int32)
        assert torch.equal(unpack(stored.view(v["bits"], -1), v["bits"], len(codes)), codes.to(torch.int8))


def test_worked_example_words():
    words = pack(torch.tensor([7, -7, 1, 3, -1, 5, -5, -3, 1, 3]), 3)
    assert words.flatten().tolist() == [0x259, 0xB1, 0x32D]
