"""The error feedback's rounding of one batch of experts (offline.gptq.round_factors), with the sub-blocks in C++
(torch.ops.bitsmoe.feedback_rank_rows / feedback_columns) against offline.coordinates.sub_block's reference loop, taking
turns in one process (this VM's speed drifts by 20-30 % within an hour): Qwen3-30B-A3B's shape in the identity basis
(16 experts, the export's batch; gate: 2,048 rank rows of 768 entries, down: 768 columns of 2,048), on the few
tokens of its 2,048 calibration tokens (offline.lowrank) and on a dense Hessian."""

import json
import time
from pathlib import Path

import torch

from benchmarks import machine
from bitsmoe_vllm.offline import gptq, lowrank
from bitsmoe_vllm.offline.coordinates import sub_block
from bitsmoe_vllm.offline.lowrank import Tokens

RESULTS = Path(__file__).parent / "results" / "bench_feedback.json"
E, R, I, G = 16, 2048, 768, 128
REPEATS = 5


def reference(quantize, *args) -> None:
    sub_block(lambda i, f: quantize(i, f), *args)  # a plain function: the reference loop


def cases() -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(60, 300, (E,), generator=g).tolist()  # the Qwen3-shaped layers' spread per expert

    def few(n: int) -> Tokens:
        z = torch.zeros(E, max(tokens), n)
        for e, t in enumerate(tokens):
            z[e, :t] = torch.randn(t, n, generator=g)
        return Tokens(z, tokens)

    x = torch.randn(E, 2000, I, generator=g)
    factors = torch.randn(E, R, I, generator=g) * 0.02
    bits = torch.tensor([0, 1, 2, 3, 4, 6, 8])[
        torch.multinomial(torch.tensor([3, 10, 30, 30, 20, 6, 1.0]), E * R, True)
    ]
    return {
        "gate, few tokens": ("gate", factors, bits.view(E, R), few(R)),
        "down, few tokens": ("down", factors, bits.view(E, R), few(I)),
        "down, dense Hessian": ("down", factors, bits.view(E, R), x.transpose(1, 2) @ x),
    }


def main() -> None:
    rows = {}
    for name, (projection, factors, bits, hessian) in cases().items():
        times = {"kernel": [], "reference": []}
        for _ in range(REPEATS):
            for way in times:
                patched = reference if way == "reference" else sub_block
                gptq.sub_block = lowrank.sub_block = patched
                start = time.perf_counter()
                out = gptq.round_factors(projection, factors, bits, hessian, G, 8)
                times[way].append(time.perf_counter() - start)
                rows.setdefault(name, {})[f"{way}_out"] = out
        gptq.sub_block = lowrank.sub_block = sub_block
        same = all(torch.equal(a, b) for a, b in zip(rows[name].pop("kernel_out"), rows[name].pop("reference_out")))
        rows[name] = {f"{way}_s": round(sorted(t)[REPEATS // 2], 3) for way, t in times.items()} | {"same_bits": same}
        print(f"{name}: {rows[name]}", flush=True)
    result = {"machine": machine.describe(), "experts": E, "factor": [R, I], "group_size": G, "rows": rows}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
