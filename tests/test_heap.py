"""offline.heap.peak_rss_mb: the report's peak memory is the quantizer's own, whoever started it."""

import subprocess
import sys

import pytest
import torch

CHILD = "from bitsmoe_vllm.offline.heap import peak_rss_mb; print(peak_rss_mb())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_process_started_by_a_big_one_reports_its_own_peak():
    """getrusage's ru_maxrss would give the parent's RSS at the fork (measured: 1,757 MiB here, the child's own 13)."""
    held = torch.ones(768 * 2**20 // 4)  # 768 MiB the parent holds and has touched
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    assert 0 < float(out) < 256, out
    del held


def test_a_process_that_allocates_reports_it():
    code = "import torch; x = torch.ones(512 * 2**20 // 4); " + CHILD  # 512 MiB, touched
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) > 512, out
