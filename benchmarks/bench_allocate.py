"""The bit allocator on a synthetic instance the size of Qwen3-30B-A3B: 48 layers x 3 projections x
128 experts x 2048 rank rows, grouped into units of --unit-rows, widths {0,1,2,3,4,6,8}, I 768, G 128.
Reports wall time and the optimality gap; writes JSON to benchmarks/results/.

    .venv/bin/python benchmarks/bench_allocate.py --unit-rows 64 32 16

With --model (a checkpoint of Qwen3-30B-A3B's shape, e.g. benchmarks/work/qwen3-30b-a3b-l1 that
bench_quantize_vs_gptq builds): bitsmoe-quantize's whole allocation stage (the choice of basis, then the
allocation) for --layers such MoE layers, on synthetic costs of every kind the defaults measure (the identity
basis one unit per rank row: 37.7M units at 48 layers) saved a layer at a time in a run directory as
bitsmoe-quantize saves its measured ones, with its wall time and peak RSS.

    .venv/bin/python benchmarks/bench_allocate.py --model benchmarks/work/qwen3-30b-a3b-l1 --layers 48
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from bitsmoe_vllm.offline.allocate import allocate  # noqa: E402
from bitsmoe_vllm.offline.cost_files import CostFiles  # noqa: E402
from bitsmoe_vllm.offline.heap import peak_rss_mb  # noqa: E402
from bitsmoe_vllm.offline.plan import Options, make_plan  # noqa: E402
from bitsmoe_vllm.offline.quantize import allocate_bits  # noqa: E402
from bitsmoe_vllm.offline.rundir import RunDir  # noqa: E402


def qwen3_30b_instance(unit_rows: int, seed: int = 0):
    """48 layers x 3 projections x 128 experts x 2048 ranks in units of unit_rows, widths 0..8, I 768, G 128."""
    rng = np.random.default_rng(seed)
    widths = np.array([0, 1, 2, 3, 4, 6, 8])
    per_expert = 2048 // unit_rows
    U = 48 * 3 * 128 * per_expert
    cost = np.broadcast_to(unit_rows * (widths * 768 + (widths > 0) * 6 * 16), (U, len(widths))).astype(float)
    energy = rng.lognormal(0, 1, U) * np.exp(-4 * np.tile(np.arange(per_expert), U // per_expert) / per_expert)
    relative = np.array([1.0, 0.36, 0.12, 0.035, 0.0095, 0.0006, 0.00004])  # error of rounding at each width
    loss = energy[:, None] * relative * rng.uniform(0.7, 1.3, (U, len(widths)))
    loss[:, 0] = energy
    return loss, cost, 2.5 * 48 * 3 * 128 * 2048 * 768


def synthetic_losses(units_per_expert: int, experts: int, seed: int | tuple[int, ...]) -> torch.Tensor:
    """[experts * units_per_expert, 7] losses at widths 0..8 shaped as qwen3_30b_instance's."""
    rng = np.random.default_rng(seed)
    relative = np.array([1.0, 0.36, 0.12, 0.035, 0.0095, 0.0006, 0.00004])
    decay = np.exp(-4 * np.tile(np.arange(units_per_expert), experts) / units_per_expert)
    energy = rng.lognormal(0, 1, experts * units_per_expert) * decay
    loss = energy[:, None] * relative * rng.uniform(0.7, 1.3, (len(energy), len(relative)))
    loss[:, 0] = energy
    return torch.from_numpy(loss)


def pipeline(model: Path, layers: int) -> dict:
    """allocate_bits for `layers` MoE layers of model's shape, defaults (--bits 2.5, --basis-dtype auto), on
    synthetic costs saved a layer at a time as bitsmoe-quantize saves its measured ones."""
    plan = make_plan(Options(model=str(model), out="", bits=2.5, calib=()))
    E, I, H = plan.num_experts, plan.intermediate_size, plan.hidden_size
    plan = dataclasses.replace(plan, moe_layers=tuple(range(layers)), total_weights=layers * 3 * E * I * H)
    kinds = sorted(plan.candidates_by_kind().items())
    units = {f"loss-{k}": 0 for k, _ in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "out", {}, False, False)
        for layer in range(layers):
            costs = {"routed_tokens": torch.ones(E), "residual_energy": torch.ones((), dtype=torch.float64)}
            for seed, (kind, of_kind) in enumerate(kinds):
                per_expert = len(plan.with_basis(of_kind[0]).unit_cost)
                loss = costs[f"loss-{kind}"] = synthetic_losses(per_expert, 3 * E, (seed, layer))
                costs[f"nearest-{kind}"] = loss * 1.5
                units[f"loss-{kind}"] += len(loss)
                for b in of_kind if kind != "identity" else ():
                    costs[f"basis_loss-{b}"] = loss[:, 0] * 0.01
            run.save(f"layer-{layer:05d}", costs)
            del costs, loss
        costs = CostFiles([run.path(f"layer-{layer:05d}") for layer in range(layers)])
        start = time.perf_counter()
        final, _, stats = allocate_bits(plan, run, costs)
        seconds = time.perf_counter() - start
    return {
        "model": str(model),
        "layers": layers,
        "units": units,
        "basis": final.basis,
        "wall_seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_rss_mb() / 2**10, 2),
        "gap": stats["gap"],
        "mip_status": stats["mip_status"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--unit-rows", type=int, nargs="+", default=[64, 32, 16])
    p.add_argument("--model", type=Path, help="the whole allocation stage for --layers MoE layers of this shape")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "allocate_qwen3_30b.json"))
    a = p.parse_args()
    if a.model:
        run = pipeline(a.model, a.layers)
        print(json.dumps(run))
        save(Path(a.out), pipeline=run)
        return
    runs = []
    for rows in a.unit_rows:
        loss, cost, budget = qwen3_30b_instance(unit_rows=rows)
        start = time.perf_counter()
        result = allocate(loss, cost, budget)
        runs.append(
            {
                "unit_rows": rows,
                "units": len(loss),
                "options_per_unit": loss.shape[1],
                "wall_seconds": round(time.perf_counter() - start, 2),
                "gap": result.gap,
                "core_units": result.core_units,
                "mip_status": result.mip_status,
                "budget_used": result.cost / budget,
            }
        )
        print(json.dumps(runs[-1]))
    save(Path(a.out), runs=runs)


def save(out: Path, **results) -> None:
    """The results into `out`, keeping its other keys (the --unit-rows runs and the --model run share one file)."""
    saved = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps(saved | {"machine": describe(), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
