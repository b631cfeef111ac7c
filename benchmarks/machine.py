"""One line that says what machine a benchmark ran on."""

import os
import platform
from pathlib import Path


def describe() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    mem = next(
        (
            int(line.split()[1]) / 2**20
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU used"


def last_level_cache_bytes() -> int:
    """The largest cache cpu0 reports (sysfs; 0 where it reports none). A VM's slice of a shared L3 is not known:
    this is the whole cache, so reading twice it evicts whatever another call left there."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip() if (index / "size").exists() else ""
        if text:
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=0)
