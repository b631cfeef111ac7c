"""The bit allocator on a synthetic instance the size of Qwen3-30B-A3B: 48 layers x 3 projections x
128 experts x 2048 rank rows, grouped into units of --unit-rows, widths {0,1,2,3,4,6,8}, I 768, G 128.
Reports wall time and the optimality gap; writes JSON to benchmarks/results/.

    .venv/bin/python benchmarks/bench_allocate.py --unit-rows 64 32 16
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from bitsmoe_vllm.offline.allocate import allocate  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--unit-rows", type=int, nargs="+", default=[64, 32, 16])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "allocate_qwen3_30b.json"))
    a = p.parse_args()
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
    Path(a.out).write_text(json.dumps({"machine": describe(), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
