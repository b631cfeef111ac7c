"""Packaging: entry points, console scripts, the wheel (built without CUDA, installed into a fresh venv), and the core
importing without vLLM."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.helpers import random_checkpoint

REPO = Path(__file__).parent.parent
CORE_MODULES = ["bitsmoe_vllm.checkpoint", "bitsmoe_vllm.format", "bitsmoe_vllm.packing", "bitsmoe_vllm.reference"]
OFFLINE_MODULES = sorted(
    f"bitsmoe_vllm.offline.{p.stem}" for p in (REPO / "offline").glob("*.py") if p.stem not in {"__init__", "__main__"}
)


def test_vllm_plugin_entry_point_is_installed():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("bitsmoe") == "bitsmoe_vllm.plugin:register"


BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command, expected",
    [
        ([str(BIN / "bitsmoe-quantize"), "--help"], "--candidate-bits"),
        ([sys.executable, "-m", "bitsmoe_vllm.offline", "--help"], "--unit-rows"),
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


@pytest.mark.slow
def test_wheel_builds_without_cuda_and_its_quickstart_runs_in_a_fresh_venv(tmp_path):
    # a copy without the in-place builds, so the kernels are compiled here and nothing is left behind
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests", "*.so", "work", "results")
    shutil.copytree(REPO, source, ignore=ignore)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("bitsmoe_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bitsmoe_vllm/format.py" in names and "bitsmoe_vllm/offline/cli.py" in names
    assert not [
        n for n in names if n.split("/")[0] not in ("bitsmoe_vllm",) and ".dist-info/" not in n
    ]  # nothing generic
    compiled = [n for n in names if n.endswith(".so")]
    # the CPU kernel; no CUDA here, so no CUDA kernels
    assert len(compiled) == 1 and compiled[0].startswith("bitsmoe_vllm/_cpu")

    # A fresh venv with the wheel alone; its dependencies are read from this environment's site-packages by path (a
    # .pth line adds a path without running that directory's own .pth files, so this checkout's editable install
    # stays out of it).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = Path(
        subprocess.check_output(
            [env_dir / "bin" / "python", "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(env_dir / "bin" / "python"),
        "install",
        "--no-deps",
        "-q",
        str(wheel),
    ]
    result = subprocess.run(install, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"  # not the checkout, so nothing is imported from it
    run.mkdir()

    def sh(*command):
        env = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}"}
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=run, env=env)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
        return result.stdout

    where = sh(
        env_dir / "bin" / "python",
        "-c",
        "import bitsmoe_vllm.offline, importlib.util; print(bitsmoe_vllm.offline.__file__, "
        "importlib.util.find_spec('offline'))",
    )
    assert where.split()[0].startswith(str(site)) and where.split()[1] == "None"
    for script in ("bitsmoe-quantize", "bitsmoe-eval", "bitsmoe-demo-model"):
        assert "usage:" in sh(env_dir / "bin" / script, "--help")
    sh(env_dir / "bin" / "bitsmoe-demo-model", "tiny", "--layers", "2", "--text", "text.txt")
    quantize = [
        "--model",
        "tiny",
        "--out",
        "tiny-bitsmoe",
        "--bits",
        "2.5",
        "--calib",
        "text.txt",
        "--calib-seq-len",
        "128",
    ]
    summary = sh(env_dir / "bin" / "bitsmoe-quantize", *quantize, "--calib-tokens", "1024")
    assert "tiny-bitsmoe" in summary and (run / "tiny-bitsmoe" / "quantization_report.json").is_file()


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
