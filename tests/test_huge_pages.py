"""torch.ops.bitsmoe.huge_page_copy (csrc/cpu/huge_pages.cpp): the memory the CPU layout's weights are copied into."""

import re
from pathlib import Path

import pytest
import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.cpu_layout import to_cpu_layer
from tests.helpers import dense_from_cpu_basis, layer_of

HUGE = 2**21
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture(autouse=True)
def cpu_kernel():
    assert ops.CPU_KERNEL, (
        "bitsmoe_vllm/_cpu*.so is not built: run `pip install --no-build-isolation -e .` (scripts/setup.sh does)"
    )


def mapping_of(address: int) -> dict | None:
    """The /proc/self/smaps entry holding address: its range and AnonHugePages (kB), or None if unmapped."""
    entries = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text())
    for entry in entries:
        start, end = (int(v, 16) for v in entry.split(" ", 1)[0].split("-"))
        if start <= address < end:
            return {"start": start, "end": end, "huge_kB": int(re.search(r"AnonHugePages:\s+(\d+)", entry).group(1))}
    return None


def test_copy_is_contiguous_equal_and_starts_on_a_huge_page():
    t = torch.randn(1500, 1001).t()  # 6 MB, not contiguous
    h = torch.ops.bitsmoe.huge_page_copy(t)
    assert torch.equal(h, t) and h.is_contiguous() and h.dtype == t.dtype
    assert h.data_ptr() % HUGE == 0
    small = torch.arange(1000)
    copy = torch.ops.bitsmoe.huge_page_copy(small)
    assert torch.equal(copy, small) and copy.data_ptr() != small.data_ptr(), "under 2 MiB: a plain copy, still a copy"


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off here")
def test_copy_gets_huge_pages_and_its_mapping_goes_with_it():
    h = torch.ops.bitsmoe.huge_page_copy(torch.ones(3 * HUGE // 4, dtype=torch.int32))  # 6 MiB: 3 huge pages
    address = h.data_ptr()
    mapping = mapping_of(address)
    assert mapping["start"] <= address and address + 3 * HUGE <= mapping["end"]
    assert mapping["huge_kB"] > 0, f"no huge page in the mapping: {mapping}"
    del h
    assert mapping_of(address) is None, "the mapping is unmapped when the tensor is freed"


def test_cpu_layer_weights_are_on_huge_pages():
    layer = layer_of((1536, 1024, 8, 2, (1536, 1536, 1536), 128), widths=(3, 4), basis_dtype="int8")
    cpu = to_cpu_layer(layer)
    tensors = [cpu.layer.gate_basis.weight, cpu.layer.up_basis.weight, cpu.layer.down_basis.weight]
    tensors += [t for f in (cpu.gate, cpu.up, cpu.down) for t in (f.masks, f.scales)]
    large = [t for t in tensors if t.numel() * t.element_size() >= HUGE]
    assert len(large) == 6, "the layer is big enough that its bases and masks are over 2 MiB"
    assert all(t.data_ptr() % HUGE == 0 for t in large)
    assert torch.equal(dense_from_cpu_basis(cpu.layer.down_basis.weight), layer.down_basis.weight)
