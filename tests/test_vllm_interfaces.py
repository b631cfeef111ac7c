"""The plugin through vLLM's own MoE layer, without a model or a server (tests/vllm_layer_check.py), with the suite's
vLLM; scripts/check_vllm_033.sh runs the same check with vLLM 0.33."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")


def test_a_bitsmoe_layer_builds_loads_and_runs_through_vllms_moe_layer():
    check = Path(__file__).with_name("vllm_layer_check.py")
    result = subprocess.run([sys.executable, str(check)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for layer in (
        "silu, a basis per projection",
        "silu, a basis per layer",
        "swigluoai, expert biases, a basis per projection",
    ):
        assert f"BitsMoE layer ({layer}) built, loaded and run through vLLM's MoE layer (" in result.stdout
