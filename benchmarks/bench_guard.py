"""The quality guard's threshold against perplexity: bitsmoe-quantize runs on the MoEfied SmolLM2 of bench_quality
(same text splits and model), each row's per-layer relative errors from its report (held-out calibration tokens)
beside the perplexity of the result (non-overlapping 512-token windows of the evaluation text).

    .venv/bin/python -m benchmarks.bench_guard     # writes benchmarks/results/quality_guard.json
"""

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import torch
import transformers

from benchmarks import machine
from benchmarks.quality_metrics import windows
from bitsmoe_vllm.offline.calibrate import read_texts, token_stream
from bitsmoe_vllm.offline.evaluate import load_model

ROOT = Path(__file__).resolve().parent.parent
ROWS = {  # name -> bitsmoe-quantize options beyond the model, text and calibration size
    "defaults-2.0": ["--bits", "2.0"],
    "defaults-2.5": ["--bits", "2.5"],
    "defaults-3.0": ["--bits", "3.0"],
    "shared-int8-2.5": ["--bits", "2.5", "--basis-dtype", "int8"],  # the default before --basis-dtype auto
}


@torch.no_grad()
def perplexity(checkpoint: Path, tokens: torch.Tensor) -> float:
    model, nll, count = load_model(str(checkpoint), torch.device("cpu")), 0.0, 0
    for w in windows(tokens):
        log_probs = torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
        nll, count = nll - float(log_probs.gather(1, w[1:, None]).sum()), count + len(w) - 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    p.add_argument("--model", default="smollm2-moe-e8k6", help="under --work, as bench_quality builds it")
    p.add_argument("--eval-tokens", type=int, default=4096)
    a = p.parse_args()
    model = a.work / a.model
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    tokens = torch.tensor(token_stream(tokenizer, read_texts([str(a.work / "text" / "eval.jsonl")]))[: a.eval_tokens])
    result = {"machine": machine.describe(), "model": str(model.name), "eval_tokens": len(tokens), "rows": {}}
    result["rows"]["unquantized"] = {"ppl_windows": perplexity(model, tokens)}
    for name, options in ROWS.items():
        out = a.work / "guard" / name
        start = time.time()
        command = [
            str(ROOT / ".venv" / "bin" / "bitsmoe-quantize"),
            "--model",
            str(model),
            "--out",
            str(out),
            "--calib",
            str(a.work / "text" / "calib.jsonl"),
            "--calib-tokens",
            "16384",
            "--calib-seq-len",
            "512",
            "--overwrite",
            "--allow-high-error",
            *options,
        ]
        subprocess.run(command, check=True, capture_output=True)
        report = json.loads((out / "quantization_report.json").read_text())
        errors = [layer["relative_error"] for layer in report["layers"].values()]
        result["rows"][name] = {
            "options": options,
            "basis": report["basis"],
            "all_in_bits": report["bits"]["achieved_all"],
            "relative_errors": errors,
            "worst_relative_error": max(errors),
            "ppl_windows": perplexity(out, tokens),
            "wall_s": round(time.time() - start, 1),
        }
        print(name, json.dumps({k: v for k, v in result["rows"][name].items() if k != "relative_errors"}), flush=True)
        (ROOT / "benchmarks" / "results" / "quality_guard.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
