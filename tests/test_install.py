"""Packaging: entry points, console script, the build without CUDA, and the core importing without vLLM."""

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.random_layers import random_checkpoint

REPO = Path(__file__).parent.parent
CORE_MODULES = ["bitsmoe_vllm.checkpoint", "bitsmoe_vllm.format", "bitsmoe_vllm.packing", "bitsmoe_vllm.reference"]
OFFLINE_MODULES = sorted(f"offline.{p.stem}" for p in (REPO / "offline").glob("*.py") if p.stem not in {"__init__", "__main__"})


def test_vllm_plugin_entry_point_is_installed():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("bitsmoe") == "bitsmoe_vllm.plugin:register"


BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command, expected",
    [
        ([str(BIN / "bitsmoe-quantize"), "--help"], "--candidate-bits"),
        ([sys.executable, "-m", "offline", "--help"], "--unit-rows"),
        ([str(BIN / "bitsmoe-eval"), "ppl", "--help"], "--stride"),
    ],
)
def test_console_scripts_are_installed(command, expected):
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and expected in result.stdout, result.stderr


def test_core_and_offline_import_without_vllm():
    hide_vllm = "import sys; sys.modules['vllm'] = None"  # any `import vllm` now raises ImportError
    imports = "; ".join(f"import {m}" for m in CORE_MODULES + OFFLINE_MODULES)
    check = "assert not [m for m in sys.modules if m.split('.')[0] == 'vllm' and sys.modules[m] is not None]"
    result = subprocess.run([sys.executable, "-c", f"{hide_vllm}; {imports}; {check}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_wheel_builds_without_cuda(tmp_path):
    source = tmp_path / "src"  # a copy without the in-place builds, so the kernels are compiled here and nothing is left behind
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests", "*.so"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("bitsmoe_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bitsmoe_vllm/format.py" in names and "offline/cli.py" in names
    compiled = [n for n in names if n.endswith(".so")]
    assert len(compiled) == 1 and compiled[0].startswith("bitsmoe_vllm/_cpu")  # the CPU kernel; no CUDA here, so no CUDA kernels
    assert not [n for n in names if n.startswith("tests/")]


def test_vllm_loads_the_plugin_through_its_entry_point():
    pytest.importorskip("vllm")
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm.model_executor.layers.quantization import get_quantization_config; "
        "print(get_quantization_config('bitsmoe').__module__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "bitsmoe_vllm.config"


def test_bitsmoe_config_reads_the_format():
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.quantization import get_quantization_config

    from bitsmoe_vllm.config import BitsMoEConfig
    from bitsmoe_vllm.plugin import register

    register()
    register()  # idempotent
    assert get_quantization_config("bitsmoe") is BitsMoEConfig
    cfg, _ = random_checkpoint(64, 64, 4, (64, 64, 64), 32)
    parsed = BitsMoEConfig.from_config(cfg.to_dict())
    assert parsed.get_name() == "bitsmoe" and parsed.spec == cfg
    with pytest.raises(ValueError, match="format_version: unknown version 9"):
        BitsMoEConfig.from_config(cfg.to_dict() | {"format_version": 9})
    with pytest.raises(ValueError, match="needs a BitsMoE checkpoint"):
        BitsMoEConfig()
