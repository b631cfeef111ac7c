"""The code's layout is owned by its tools: ruff format, ruff check and clang-format (csrc/) find nothing to change."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CSRC = sorted(str(p) for p in (REPO / "csrc").rglob("*") if p.suffix in {".cpp", ".h", ".cu", ".cuh"})


@pytest.mark.parametrize(
    "command",
    [["ruff", "format", "--check", "."], ["ruff", "check", "."], ["clang-format", "--dry-run", "-Werror", *CSRC]],
    ids=["ruff-format", "ruff-check", "clang-format"],
)
def test_the_tools_find_nothing_to_change(command):
    tool = BIN / command[0]
    if not tool.exists():
        pytest.fail(f"{command[0]} is not installed next to {sys.executable}: pip install -e '.[dev]'")
    result = subprocess.run([str(tool), *command[1:]], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, (
        f"`{' '.join(command[:3])}` wants changes; run it without --check/--dry-run:\n"
        + (result.stdout + result.stderr)[-3000:]
    )
