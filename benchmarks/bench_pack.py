"""Bit-plane packing on the CPU: packing.pack's numpy path against its torch path (the one other devices take), per
width, and the export's encoding of one Qwen3-30B-A3B-shaped factor (offline.encode.encode_factor, every width)."""

import json
import time
from pathlib import Path

import torch

from benchmarks import machine
from bitsmoe_vllm import packing
from bitsmoe_vllm.offline.encode import encode_factor

RESULTS = Path(__file__).parent / "results" / "bench_pack.json"
R, I, G = 2048, 768, 128  # a factor of Qwen3-30B-A3B's in the identity basis: H rank rows of I entries
REPEATS = 20


def median_ms(fn, *args, **kwargs) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return round(sorted(times)[REPEATS // 2] * 1e3, 2)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = {}
    for bits in packing.SUPPORTED_WIDTHS:
        u = torch.randint(0, 1 << bits, (R, I), generator=g, dtype=torch.int32)  # offset codes, as pack makes them
        rows[bits] = {"torch_ms": median_ms(packing._words_torch, u, bits)}
        rows[bits]["numpy_ms"] = median_ms(packing._words_numpy, u, bits)
        print(f"{bits} bits: torch {rows[bits]['torch_ms']} ms, numpy {rows[bits]['numpy_ms']} ms", flush=True)
    # the two Qwen3-shaped layers' widths at 2.5 bits (benchmarks/README.md), row scales given as the feedback's
    share = torch.tensor([0.03, 0.1, 0.3, 0.3, 0.2, 0, 0.06, 0, 0.01])
    widths = torch.multinomial(share, R, replacement=True, generator=g)
    factor = torch.randn(R, I, generator=g)
    scales = torch.where(widths[:, None] > 0, torch.rand(R, I // G, generator=g) + 0.5, 0.0).half().float()
    encode = median_ms(encode_factor, factor, widths, G, row_scales=scales)
    print(f"encode_factor [{R}, {I}]: {encode} ms", flush=True)
    result = {"machine": machine.describe(), "codes": [R, I], "pack": rows, "encode_factor_ms": encode}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
