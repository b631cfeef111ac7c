"""Memory the C heap holds but no tensor uses, returned to the system."""

import ctypes
import ctypes.util
import sys

_trim = None
if sys.platform.startswith("linux"):
    _trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)  # glibc; others have none


def release() -> None:
    """Return the free pages of glibc's heap to the system. Blocks of a few MB freed between long-lived ones (the
    encoded experts) stay in the heap, whose holes the next block sizes do not fill: one Qwen3-30B-A3B-shaped layer's
    export peaked 0.2-0.3 GB higher without this (benchmarks/README.md). A no-op with another C library."""
    if _trim is not None:
        _trim(0)
