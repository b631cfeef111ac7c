"""Fixtures of the tests in tests/ and benchmarks/tests/: tiny checkpoints, local text, a quantize call."""

import os

import pytest

# as bitsmoe-quantize sets it (offline/cli.py): the tests that quantize in this process and compare bytes need MKL's
# results not to depend on where its operands lie; set before MKL's first call
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from bitsmoe_vllm.offline.demo import build_tiny_model, corpus


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> directory of a tiny random checkpoint of that architecture, built once per session."""
    built = {}

    def get(arch: str, **shape):
        key = (arch, tuple(sorted(shape.items())))
        if key not in built:
            built[key] = build_tiny_model(arch, tmp_path_factory.mktemp(arch), **shape)
        return built[key]

    return get


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """Local English text (Python's builtin docstrings, ~30k characters) for calibration and evaluation."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(corpus()))
    return path


@pytest.fixture(scope="session")
def quantize_tiny(calib_file):
    """quantize_tiny(model, out, bits, **options) -> the BitsMoE directory, with the small calibration tests use."""
    from bitsmoe_vllm.offline.plan import Options
    from bitsmoe_vllm.offline.quantize import quantize

    def run(model, out, bits: float, calib_tokens: int = 1024, **options):
        return quantize(
            Options(
                model=str(model),
                out=str(out),
                bits=bits,
                calib=(str(calib_file),),
                calib_tokens=calib_tokens,
                calib_seq_len=128,
                unit_rows=8,
                **options,
            )
        )

    return run
