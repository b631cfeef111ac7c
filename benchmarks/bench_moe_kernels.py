"""CUDA MoE-layer kernels (bitsmoe_vllm/cuda.py, csrc/cuda) against a bf16 grouped matmul, on the MoE layer
shapes of real models, at 2.0 / 2.5 / 3.0 factor bits per weight. Needs a CUDA device.

    python -m benchmarks.bench_moe_kernels [--tokens 1 4 16 64 256 2048] \
        [--out benchmarks/results/moe_kernels_cuda.json]

Both paths are timed at every T (decode: float32 on packed codes; prefill: tensor cores). Layers are random
(codes, scales, bases): timing only; tests/test_kernels.py checks correctness. Widths per
rank row: 2.0 bits = every row 2 bits, 2.5 = half 2 and half 3, 3.0 = every row 3 bits, full rank, float16
bases. Times are CUDA-event medians over rotating input sets. "Bytes" are what must be read at least once:
the codes and scales of the experts the tokens select, the bases, the activations and the routing, plus the
output written; GB/s = bytes / time. The bf16 baseline multiplies by dense bf16 expert weights, token-grouped,
one matmul per selected expert (torch), in the same run.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from bitsmoe_vllm.cuda import KernelLayer, load_kernels, moe_forward_cuda
from bitsmoe_vllm.kernel_layout import CLASS_WIDTHS, KernelFactors

SHAPES = {  # H, I, E, top-k
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
BITS = {2.0: {2: 1.0}, 2.5: {2: 0.5, 3: 0.5}, 3.0: {3: 1.0}}
GROUP = 128


def random_factors(E: int, R: int, I: int, mix: dict[int, float], g: torch.Generator) -> KernelFactors:
    """Kernel-layout factors with every rank row stored, widths in the proportions of `mix`."""
    counts = {b: round(R * share) for b, share in mix.items()}
    counts[max(counts)] += R - sum(counts.values())
    segs, rows, n_rows, n_planes = [], [], 0, 0
    for _ in range(E):
        for b in CLASS_WIDTHS:
            n = counts.get(b, 0)
            segs.append([n_rows, n, n_planes])
            rows += list(
                range(
                    sum(counts.get(w, 0) for w in CLASS_WIDTHS if w > b),
                    sum(counts.get(w, 0) for w in CLASS_WIDTHS if w >= b),
                )
            )
            n_rows, n_planes = n_rows + n, n_planes + n * b
    dev = "cuda"
    codes = torch.randint(-(2**31), 2**31 - 1, (n_planes, I // 32), generator=g, dtype=torch.int32).to(dev)
    scales = (torch.rand(n_rows, I // GROUP, generator=g) * 0.02 + 0.001).half().to(dev)
    return KernelFactors(
        codes,
        scales,
        torch.tensor(rows, dtype=torch.int32, device=dev),
        torch.tensor(segs, dtype=torch.int32, device=dev).reshape(E, len(CLASS_WIDTHS), 3),
        R,
    )


def median_ms(fn, inputs: list, repeats: int = 50, budget_ms: float = 1000) -> float:
    """Median of `repeats` CUDA-event timings (fewer, at least 5, where they would take over budget_ms)."""
    for args in inputs[:3]:
        fn(*args)  # warm-up: module load, allocator, handles
    times = []
    for r in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[r % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) >= 5 and sum(times) > budget_ms:
            break
    return statistics.median(times)


def ceilings() -> dict[str, float]:
    """This device's two ceilings, measured: a 2 GiB device-to-device copy (bytes read + written) and an 8192^3 bf16
    matmul on random data."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda s, d: d.copy_(s), [(src, dst)], repeats=20)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = median_ms(torch.mm, [(a, b)], repeats=20)
    return {"copy_GBps": 2 * src.numel() * 4 / copy_ms / 1e6, "bf16_mm_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def bf16_grouped(x, w, ids, gate_up, down):
    """Dense bf16 MoE: tokens grouped by expert, one matmul chain per selected expert."""
    y = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        h = x[token] @ gate_up[e].T
        g, u = h.chunk(2, dim=-1)
        y.index_add_(0, token, ((torch.nn.functional.silu(g) * u @ down[e].T) * w[token, slot, None]).to(y.dtype))
    return y


def write(out: Path, ceiling: dict, rows: list) -> None:
    doc = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ceilings": ceiling,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 2048])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/moe_kernels_cuda.json"))
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_kernels: no CUDA device")
    if not load_kernels(build=True):
        raise SystemExit("bench_moe_kernels: the CUDA kernels did not load")
    ceiling = ceilings()
    print(f"ceilings: copy {ceiling['copy_GBps']:.0f} GB/s, bf16 matmul {ceiling['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    g = torch.Generator().manual_seed(0)
    results = []
    for name in a.shapes:
        H, I, E, K = SHAPES[name]
        dense = {  # the bf16 baseline's weights, random
            "gate_up": (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to("cuda", torch.bfloat16),
            "down": (torch.randn(E, H, I, generator=g) / I**0.5).to("cuda", torch.bfloat16),
        }
        for bits, mix in BITS.items():
            bases = torch.linalg.qr(torch.randn(H, H, generator=g)).Q.to("cuda")
            layer = KernelLayer(
                torch.cat([bases, bases]).contiguous(),
                bases.T.contiguous(),
                random_factors(E, H, I, mix, g),
                random_factors(E, H, I, mix, g),
                random_factors(E, H, I, mix, g),
                GROUP,
                True,  # format version 2's odd codes, the quantizer's default
            )
            per_expert = sum(f.codes.numel() * 4 + f.scales.numel() * 2 for f in (layer.gate, layer.up, layer.down)) / E
            for T in a.tokens:
                inputs = []
                for _ in range(4):  # rotate input sets so repeated runs do not time the cache
                    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).cuda()
                    w = torch.softmax(torch.randn(T, K, generator=g), -1).cuda()
                    inputs.append((torch.randn(T, H, generator=g).to("cuda", torch.bfloat16), w, ids))
                selected = statistics.mean(len(ids.unique()) for _, _, ids in inputs)
                must_read = selected * per_expert + 3 * H * H * 4 + T * H * 2 * 2 + T * K * 16
                dense_read = selected * 3 * I * H * 2 + T * H * 2 * 2
                flops = 2 * T * K * 3 * H * I
                ms = {
                    path: median_ms(
                        lambda x, w, ids, path=path, layer=layer: moe_forward_cuda(x, w, ids, layer, path=path), inputs
                    )
                    for path in ("decode", "prefill")
                }
                base_ms = median_ms(lambda x, w, ids, d=dense: bf16_grouped(x, w, ids, d["gate_up"], d["down"]), inputs)
                row = {
                    "shape": name,
                    "H": H,
                    "I": I,
                    "E": E,
                    "top_k": K,
                    "bits": bits,
                    "T": T,
                    "bytes_must_read": must_read,
                    "selected_experts": selected,
                    "bf16_ms": base_ms,
                    "bf16_GBps": dense_read / base_ms / 1e6,
                    "bf16_TFLOPs": flops / base_ms / 1e9,
                }
                for path, t in ms.items():
                    row |= {f"{path}_ms": t, f"{path}_GBps": must_read / t / 1e6, f"{path}_TFLOPs": flops / t / 1e9}
                    row[f"{path}_of_copy"] = row[f"{path}_GBps"] / ceiling["copy_GBps"]
                    row[f"{path}_of_bf16_mm"] = row[f"{path}_TFLOPs"] / ceiling["bf16_mm_TFLOPs"]
                results.append(row)
                write(a.out, ceiling, results)  # after each row: a run cut short keeps what it measured
                print(
                    f"{name:18s} {bits:.1f} T={T:5d}  decode {ms['decode']:8.3f} ms {row['decode_GBps']:7.1f} GB/s "
                    f"({row['decode_of_copy']:4.0%} of copy)  prefill {ms['prefill']:8.3f} ms "
                    f"{row['prefill_TFLOPs']:6.1f} TFLOP/s ({row['prefill_of_bf16_mm']:4.0%} of mm)  "
                    f"bf16 {base_ms:8.3f} ms ({base_ms / min(ms.values()):.2f}x)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
