"""Would each MoE layer alone choose the kind of basis that all the layers choose? --basis-dtype auto costs the layers
after the first for the kind the first layer's costs choose (offline.selection.screen); this costs every kind on
every layer (the run stopped before the allocation), then runs the choice on all layers and on each layer alone, at
its share of the budget.

    .venv/bin/python -m benchmarks.bench_screen --bits 2.5 3.15 4.0
    .venv/bin/python -m benchmarks.bench_screen --model benchmarks/work/qwen3-30b-a3b-l2 \
        --calib benchmarks/work/demo-text.txt --calib-tokens 2048 --calib-seq-len 128 --bits 2.5
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.bench_quality import ROOT
from bitsmoe_vllm.offline import cli, quantize, selection
from bitsmoe_vllm.offline.cost_files import CostFiles
from bitsmoe_vllm.offline.plan import factor_kind, make_plan

RESULTS = ROOT / "benchmarks" / "results"


class Costed(Exception):
    """Raised where the allocation would start: the run directory then holds every layer's costs."""


def stop(*_):
    raise Costed


def per_layer_choices(argv: list[str]) -> dict:
    options = cli.parse(argv)
    quantize.screens, quantize.allocate_bits = (lambda plan: False), stop  # every kind on every layer, then stop
    try:
        quantize.quantize(options)
    except Costed:
        pass
    plan, work = make_plan(options), Path(options.out + ".partial")
    files = [work / "work" / f"layer-{i:05d}.safetensors" for i in plan.moe_layers]

    def row(p, costs):
        start = time.perf_counter()
        info = selection.choose(p, CostFiles(costs))[1]
        seconds = round(time.perf_counter() - start, 1)
        nearest = info["estimated_loss_nearest"]
        return {"basis": info["basis"], "kind": factor_kind(info["basis"]), "nearest": nearest, "seconds": seconds}

    out = {"all": row(plan, files)}
    out |= {str(i): row(plan.for_layers((i,)), [f]) for i, f in zip(plan.moe_layers, files)}
    shutil.rmtree(work)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "benchmarks" / "models" / "trained-moe")
    p.add_argument("--calib", type=Path, default=ROOT / "benchmarks" / "work" / "text-mixed" / "calib.jsonl")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.15, 4.0])
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "screen")
    a = p.parse_args()
    rows = {}
    for bits in a.bits:
        argv = ["--model", str(a.model), "--bits", str(bits), "--calib", str(a.calib)]
        argv += ["--calib-tokens", str(a.calib_tokens), "--calib-seq-len", str(a.calib_seq_len)]
        argv += ["--out", str(a.work / f"{bits}"), "--overwrite", "--allow-high-error"]
        rows[str(bits)] = per_layer_choices(argv)
        print(bits, {layer: r["basis"] for layer, r in rows[str(bits)].items()}, flush=True)
    model = a.model.resolve().relative_to(ROOT)
    result = {"model": str(model), "calib_tokens": a.calib_tokens, "machine": machine.describe(), "bits": rows}
    (RESULTS / f"basis_screen_{a.model.name.replace('-', '_')}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
