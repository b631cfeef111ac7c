"""One line that says what machine a benchmark ran on."""

import os
import platform
from pathlib import Path

EXTENSIONS = (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))  # widest first


def cpuinfo() -> dict[str, str]:
    """cpu0's fields in /proc/cpuinfo (empty where there is none)."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def describe() -> str:
    """VMs of one name differ (an "AMD EPYC" was a Zen 4 with AVX-512 one day, a Zen 3 with AVX2 the next), and the
    kernels pick their code by the vector extensions: the line names the CPU's family, model and widest extension."""
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = next((name for flag, name in EXTENSIONS if flag in flags), "no AVX2")
    cpu = info.get("model name") or platform.machine()
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')}, {isa})"
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
