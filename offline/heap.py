"""The process's memory: the C heap's free pages returned to the system, and the peak RSS the report gives."""

import ctypes
import ctypes.util
import re
import resource
import sys
from pathlib import Path

_trim = None
if sys.platform.startswith("linux"):
    _trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)  # glibc; others have none


def release() -> None:
    """Return the free pages of glibc's heap to the system. Blocks of a few MB freed between long-lived ones (the
    encoded experts) stay in the heap, whose holes the next block sizes do not fill: one Qwen3-30B-A3B-shaped layer's
    export peaked 0.2-0.3 GB higher without this (benchmarks/README.md). A no-op with another C library."""
    if _trim is not None:
        _trim(0)


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB (VmHWM). Not getrusage's ru_maxrss where /proc has it: a process started by
    another (a notebook, a benchmark) inherits there its parent's RSS at the fork before its exec (a child of a
    process holding 2 GiB reported 2,062 MiB; a run of Qwen3-30B-A3B-shaped layers 4.5 GB instead of 3.4)."""
    status = Path("/proc/self/status")
    found = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.is_file() else None
    if found:
        return int(found.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
