"""Quantization wall time per stage and peak memory, on a locally built MoE with many layers.

Peak RSS is compared with what one layer and the calibration state need: the quantizer streams the
model, so the ratio must stay small whatever the number of layers. Writes JSON to benchmarks/results/.

    .venv/bin/python benchmarks/bench_quantize.py --layers 12 --hidden 512 --experts 16 --intermediate 512
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402


def python(code: str) -> str:
    """Run code in a fresh interpreter, which holds no model this process built."""
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO).stdout


def baseline_rss_mb() -> float:
    """Peak RSS of a process that only imports the quantizer (Python, torch, transformers)."""
    return float(
        python(
            "import bitsmoe_vllm.offline.quantize; from bitsmoe_vllm.offline.heap import peak_rss_mb; "
            "print(peak_rss_mb())"
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="mixtral")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--bits", type=float, default=2.5)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quantize_cpu.json"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, text = tmp / "model", tmp / "calib.txt"
        python(
            "from bitsmoe_vllm.offline.demo import build_tiny_model, corpus; "
            f"build_tiny_model({a.arch!r}, {str(model)!r}, layers={a.layers}, experts={a.experts}, "
            f"intermediate={a.intermediate}, hidden={a.hidden}); "
            f"open({str(text)!r}, 'w').write(chr(10).join(corpus() * 4))"
        )
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bitsmoe_vllm.offline",
                "--model",
                str(model),
                "--out",
                str(tmp / "q"),
                "--bits",
                str(a.bits),
                "--calib",
                str(text),
                "--calib-tokens",
                str(a.calib_tokens),
                "--calib-seq-len",
                "256",
            ],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        wall = time.perf_counter() - start
        report = json.loads((tmp / "q" / "quantization_report.json").read_text())
        model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    layer_bytes = 4 * (
        3 * a.experts * a.intermediate * a.hidden + 4 * a.hidden * a.hidden
    )  # float32 experts + attention (approx.)
    calib_bytes = 4 * a.calib_tokens * a.hidden * 3  # hidden in, hidden out, expert inputs
    base = baseline_rss_mb()
    peak = max(s["peak_rss_mb"] for s in report["stages"].values())
    result = {
        "machine": describe(),
        "model": {
            "arch": a.arch,
            "layers": a.layers,
            "hidden": a.hidden,
            "experts": a.experts,
            "intermediate": a.intermediate,
            "safetensors_mb": round(model_bytes / 2**20, 1),
        },
        "bits": a.bits,
        "calib_tokens": a.calib_tokens,
        "wall_seconds": round(wall, 2),
        "stages": report["stages"],
        "allocation": report["allocation"],
        "rss_mb": {
            "baseline_after_imports": round(base, 1),
            "peak": peak,
            "increase": round(peak - base, 1),
            "one_layer": round(layer_bytes / 2**20, 1),
            "calibration_state": round(calib_bytes / 2**20, 1),
            "increase_over_one_layer_plus_calibration": round((peak - base) * 2**20 / (layer_bytes + calib_bytes), 2),
        },
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
