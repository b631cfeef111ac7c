"""One line that says what machine a benchmark ran on."""

import os
import platform
from pathlib import Path

EXTENSIONS = (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))  # widest first


def cpuinfo(field: str) -> str:
    """cpu0's `field` in /proc/cpuinfo ("" where there is none)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return ""


def describe() -> str:
    """VMs of one name differ (an "AMD EPYC" was a Zen 4 with AVX-512 one day, a Zen 3 with AVX2 the next), and the
    kernels pick their code by the vector extensions: the line names the CPU's family, model and widest extension."""
    flags = set(cpuinfo("flags").split())
    isa = next((name for flag, name in EXTENSIONS if flag in flags), "no AVX2")
    cpu = cpuinfo("model name") or platform.machine()
    if cpuinfo("cpu family"):
        cpu += f" (family {cpuinfo('cpu family')} model {cpuinfo('model')}, {isa})"
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
