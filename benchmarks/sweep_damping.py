"""The error feedback's damping (offline.gptq.DAMP, a share of the mean diagonal added to every Hessian: the feedback,
the cost model's shares and the down projection's fit) against quality, on a model of bench_quality.py with its
calibration and evaluation text (bench_quality.prepare: built where missing). Quantizes in this process with DAMP
patched, evaluates as bench_quality does, and prints one JSON line per run.

    .venv/bin/python -m benchmarks.sweep_damping trained-moe 0.001@2.5 0.003@2.140625   # DAMP@BITS ...
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from benchmarks.bench_quality import MODELS, prepare
from benchmarks.quality_metrics import evaluate, window_log_probs
from bitsmoe_vllm.offline import cli, gptq
from bitsmoe_vllm.offline.calibrate import read_texts, token_stream
from bitsmoe_vllm.offline.evaluate import load_model

WORK = Path(__file__).resolve().parent / "work"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("runs", nargs="+", help="DAMP@BITS")
    p.add_argument("--out", type=Path, default=Path("/tmp/sweep_damping"), help="where the checkpoints go")
    a = p.parse_args()
    model, text, _ = prepare(a.model, WORK, argparse.Namespace(experts=8, top_k=6))  # bench_quality's defaults
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    tokens = torch.tensor(token_stream(tokenizer, read_texts([str(text["eval"])]))[:8192])
    reference = window_log_probs(load_model(str(model), torch.device("cpu")), tokens)
    for run in a.runs:
        damp, bits = run.split("@")
        gptq.DAMP = float(damp)
        out = a.out / f"{a.model}-{damp}-{bits}"
        args = ["--model", str(model), "--out", str(out), "--bits", bits, "--calib", str(text["calib"])]
        args += ["--calib-tokens", "16384", "--calib-seq-len", "512", "--overwrite", "--allow-high-error"]
        start = time.time()
        if cli.main(args):
            raise SystemExit(f"bitsmoe-quantize {' '.join(args)} failed")
        report = json.loads((out / "quantization_report.json").read_text())
        row = {"model": a.model, "damp": float(damp), "bits": float(bits), "calib_tokens": 16384}
        row |= {"wall_s": round(time.time() - start, 1), "worst_relative_error": report["worst_relative_error"]}
        print(json.dumps(row | evaluate(out, tokens, reference)), flush=True)


if __name__ == "__main__":
    main()
