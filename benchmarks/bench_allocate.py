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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from offline.allocate import allocate  # noqa: E402
from tests.test_allocate import qwen3_30b_instance  # noqa: E402


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
        runs.append({
            "unit_rows": rows, "units": len(loss), "options_per_unit": loss.shape[1],
            "wall_seconds": round(time.perf_counter() - start, 2), "gap": result.gap, "core_units": result.core_units,
            "mip_status": result.mip_status, "budget_used": result.cost / budget,
        })  # fmt: skip
        print(json.dumps(runs[-1]))
    Path(a.out).write_text(json.dumps({"machine": describe(), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
